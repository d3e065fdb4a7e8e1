"""CLIP-LoRA few-shot training on one benchmark dataset: the reference defaults.

Every dataset x shots x seed without a new file:

  python train.py --config configs/fewshot.py:dataset=dtd,shots=4,seed=2 --workdir runs/dtd_4_2

and any value from the command line, e.g. `--config.lora.rank=4 --config.model=ViT-B/32`.
"""

import ml_collections

from clip_lora_jax import config_args


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The CLIP-LoRA recipe; `arg` is `key=value,...` over dataset, shots and seed."""
  args = config_args.parse(arg, dataset="eurosat", shots=16, seed=1)
  c = ml_collections.ConfigDict()
  c.method = "lora"
  c.dataset = args.dataset  # A benchmark name, folder:/path/to/images or csv:/path/to/file.csv.
  c.shots = args.shots
  c.seed = args.seed

  # Base model: a Hugging Face hub id, a local checkpoint directory, a `.safetensors` file in
  # the OpenAI / OpenCLIP layout, or an architecture name (ViT-B/16 -> openai/clip-vit-base-patch16).
  c.model = "ViT-B/16"
  c.random_init = False  # Random weights of the named architecture: for tests and benchmarks.

  c.mock_data = False  # tfds.testing.mock_data with `mock_examples` random examples (offline).
  c.mock_examples = 64
  c.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data_dir.
  c.split_file = ml_collections.config_dict.placeholder(str)  # split_zhou_<Dataset>.json.
  # dataset=folder:/path or csv:/path.csv: a JSON object {class folder or label: name in prompts}
  # (default: the folder names, underscores as spaces).
  c.class_names_file = ml_collections.config_dict.placeholder(str)
  # Few-shot sampler: "reference" (the official code's images for this seed: with a split file,
  # and for ImageNet and FGVC-Aircraft), "numpy", or "lists" (the published lists of shot_lists);
  # unset: "lists" with shot_lists, else "reference" wherever it applies. The run records the one
  # it used (config.json, adapter).
  c.sampler = ml_collections.config_dict.placeholder(str)
  # A directory of published few-shot lists, shot_<K>-seed_<S>.json ({"train": [[path, label,
  # class name], ...], "val": [...]}) or CoOp's split_fewshot/shot_<K>-seed_<S>.pkl.
  c.shot_lists = ml_collections.config_dict.placeholder(str)
  c.cache_dir = ml_collections.config_dict.placeholder(str)  # Decoded few-shot subsets.

  c.lora = ml_collections.ConfigDict(dict(
      encoders="both", matrices="q,k,v", layers="all", rank=2, alpha=1.0, scaling="sqrt",
      dropout=0.25))

  c.template = "a photo of a {}."
  c.logit_scale = 100.0  # Fixed in the loss: cross-entropy of 100 * cos(image, text).
  c.batch_size = 32
  c.iterations_per_shot = 500  # Total steps = 500 x shots (8,000 at 16 shots).
  c.total_steps = ml_collections.config_dict.placeholder(int)  # Overrides the above.
  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=2e-4, min_learning_rate=1e-6, b1=0.9, b2=0.999, eps=1e-8,
      weight_decay=1e-2))

  c.dtype = "float32"  # "bfloat16": bf16 compute, fp32 parameters (GPU / TPU).
  c.attention = "xla"  # Attention kernel: "xla", or "cudnn" (GPU, bf16; see model.py).
  c.remat = False  # Rematerialise each block in the backward pass (saves activation memory).
  c.fsdp = False  # Shard the frozen base weights over devices (large backbones).

  c.log_every = 10
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.eval_every = 0  # Periodic top-1 on the validation shots; 0 = only the final test.
  c.eval_batch_size = 256
  c.export_merged = False  # Also write the merged model in the Hugging Face layout.
  c.progress = True
  return c
