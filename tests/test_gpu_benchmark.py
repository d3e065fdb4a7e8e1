"""benchmarks/gpu.py runs end to end on a CPU with a tiny shape: ours (cold and warm), the PEFT
peer, and every extra (precision, inference, the train.py loop); the report has every row."""

import json
import os
import subprocess
import sys

from conftest import ENV, ROOT


def test_gpu_benchmark_smoke_on_cpu(tmp_path):
  out = tmp_path / "gpu.json"
  command = [sys.executable, os.path.join(ROOT, "benchmarks", "gpu.py"), "--shape", "tiny",
             "--classes", "3", "--steps", "1", "--warmup", "1", "--loop-steps", "1",
             "--inference-batch", "4", "--inference-batches", "1", "--peak-size", "128",
             "--json", str(out)]
  done = subprocess.run(command, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.loads(out.read_text())["3"]
  assert set(results) == {"ours", "ours_warm", "peer"}
  assert not [impl for impl, r in results.items() if "error" in r], done.stderr[-3000:]
  ours, peer = results["ours"], results["peer"]
  assert len(ours["times"]) == 1 and ours["memory"] > 0 and ours["peak_tflops"] > 0
  assert set(ours["first_loss"]) == {"float32", "bfloat16"}
  assert ours["inference_images_per_s"] > 0 and peer["inference_images_per_s"] > 0
  assert ours["loop_s_per_step"] > 0 and results["ours_warm"]["first_step_s"] > 0
  assert peer["text_layout"] == "3x77"  # CLIP's context, as the reference pads prompts
  for row in ("| ours (JAX) [xla attention] |", "| peer (transformers + peft) |",
              "ours vs peer:", "first-step loss:", "train.py loop", "projected ImageNet"):
    assert row in done.stdout, done.stdout
