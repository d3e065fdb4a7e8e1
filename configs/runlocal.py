"""The whole pipeline offline on a CPU in about a minute: a tiny random-weight CLIP on mock
EuroSAT data (`tfds.testing.mock_data`). Accuracy is meaningless; everything else is real.

  python train.py --config configs/runlocal.py --workdir /tmp/runlocal
"""

from configs import fewshot


def get_config(arg: str | None = None):
  c = fewshot.get_config(arg or "dataset=eurosat,shots=2,seed=1")
  c.model = "tiny"
  c.random_init = True
  c.mock_data = True
  c.total_steps = 40
  c.batch_size = 8
  c.log_every = 5
  c.checkpoint_every = 20
  c.eval_batch_size = 16
  return c
