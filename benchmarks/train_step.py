"""CLIP-LoRA train-step benchmark: ours (JAX) against a PyTorch peer built like the reference code.

Both sides run the same step at the same shape on the same machine in the same run: random
weights, LoRA on q, k, v of both towers (rank 2, alpha 1, scale alpha / sqrt(r), dropout 0.25),
a batch of 224x224 images, every class prompt "a photo of a {name}." re-encoded with gradients,
loss = cross-entropy of 100 * cos(image, text), AdamW (lr 2e-4, weight decay 1e-2) on a cosine
schedule. Images are synthetic and the same every step: the input pipeline is not measured.

* ours: `methods.lora.make_train_step` (one jitted step with donated state), prompts packed by
  `prompts.pack_prompts` as train.py does (exact: causal text tower pooled at the end token,
  each prompt cut there and attending only to itself); also run with the untrimmed 77-token
  prompts, one per row, to show what the packing buys.
* peer: `transformers.CLIPModel` in torch (fp32, 2 threads) whose q/k/v projections behave as the
  reference's LoRA layers: frozen base weight and bias, A (r x in, kaiming-uniform a=sqrt(5)),
  B (out x r), dropout on the branch input, and the branch applied through the dense product,
  `F.linear(x, W, b) + F.linear(dropout(x), (B @ A) * scale)`; 77-token prompts re-encoded every
  iteration; torch.optim.AdamW + CosineAnnealingLR. Prompts are tokenized once (the reference
  re-tokenizes every iteration: milliseconds).

B is set to small random values on both sides so the low-rank branch is not trivially zero.
Each implementation runs in its own subprocess, so the peak resident memory (VmHWM) of one does
not mix with another's. Every step is blocked on (`jax.block_until_ready`), `--warmup` steps run
first (and, for ours, compilation is timed separately), then the median of `--steps` is reported.

Model FLOPs (reference.md section 5; 1 multiply-add = 2 FLOPs): per transformer block and
sequence of n tokens of width d, the forward linear layers cost 24 n d^2 and attention 4 n^2 d.
The base weights are frozen, so a training step costs 2x the linear part (forward + input
gradients, no weight gradients) plus 3x the attention part, plus the low-rank branch
(12 n d r per adapted projection: 4 n d r forward, 8 n d r backward). MFU = these FLOPs / step
time / the dense 4096^3 matmul throughput that the same child process measures in JAX after its
steps, at the compute dtype (`--dtype bfloat16`: bf16 compute, fp32 parameters).

  python benchmarks/train_step.py --classes 10,100           # the full benchmark (minutes)
  python benchmarks/train_step.py --shape tiny --classes 10 --steps 1 --warmup 1  # smoke check
                                                              # (under a minute, mostly imports)
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from clip_lora_jax import xla_flags  # pylint: disable=wrong-import-position  (no JAX import)

TEMPLATE = "a photo of a {}."
# Words of realistic class names: prompts end at positions 7 to 17 of 77 on the benchmarks.
MAX_END = 17
NAME_WORDS = ("annual crop land", "herbaceous vegetation", "industrial buildings", "highway",
              "sea or lake", "boeing 737-800", "yellow-billed cuckoo", "chocolate mousse",
              "2012 tesla model s sedan", "sweet william", "bouncy castle", "playing cello",
              "staffordshire bull terrier", "outdoor apartment building", "interlaced",
              "wrinkled", "saint bernard", "grilled salmon", "snow mountain", "lighthouse")
LORA_RANK, LORA_ALPHA, LORA_DROPOUT = 2, 1.0, 0.25
B_INIT_STD = 0.01  # Small random B on both sides: the branch is exercised, not multiplied by 0.
IMPL_LABELS = {"ours": "ours (JAX, trimmed prompts)", "ours77": "ours (JAX, 77-token prompts)",
               "ours_xla": "ours (JAX, trimmed prompts, XLA_FLAGS+={flags})",
               "peer": "peer (torch, reference-style)"}


@dataclasses.dataclass(frozen=True)
class Spec:
  """Everything one child process needs (written as JSON; the peer child never imports jax)."""
  impl: str
  shape: str
  xla_flags: str  # Added to XLA_FLAGS of the `ours_xla` child only.
  hf_config: dict[str, Any]
  image_size: int
  batch: int
  classes: int
  token_ids: list[list[int]]  # (classes, 77), OpenAI layout.
  steps: int
  warmup: int
  dtype: str  # Compute dtype of ours (parameters stay float32); the peer is always float32.
  # The peer's optimizer, from configs/fewshot.py (ours reads that config itself).
  total_steps: int  # Schedule length (500 x 16 shots), as in a real run.
  learning_rate: float
  min_learning_rate: float
  weight_decay: float


def class_names(count: int, tokenizer: Callable[[list[str]], Any]) -> list[str]:
  """`count` distinct synthetic class names (phrases of NAME_WORDS, then pairs, then triples)
  whose prompts end at position MAX_END or earlier, as the real benchmarks' do."""
  names: list[str] = []
  for size in (1, 2, 3):
    for words in itertools.permutations(NAME_WORDS, size):
      name = " ".join(words)
      if tokenizer([TEMPLATE.format(name)])[0].argmax() <= MAX_END:
        names.append(name)
        if len(names) == count:
          return names
  raise ValueError(f"cannot make {count} distinct class names; the limit is {len(names)}")


def hide_unusable_torchvision() -> None:
  """transformers imports torchvision whenever it is installed (open-clip-torch pulls it in), and
  a torchvision built for another torch (the index's CUDA build next to a CPU-only torch) fails
  to import and takes transformers' CLIPModel and peft with it. The torch peers and oracles use
  none of it, so such a torchvision is hidden from this process (find_spec then finds nothing)."""
  try:
    import torchvision  # pylint: disable=import-outside-toplevel,unused-import  # noqa: F401
  except Exception:  # pylint: disable=broad-except  # RuntimeError for a mismatched build
    sys.modules["torchvision"] = None


def peak_rss_bytes() -> int:
  """Peak resident set size of this process (VmHWM), in bytes."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024
  raise RuntimeError("VmHWM not found in /proc/self/status")


def images_and_labels(spec: Spec) -> tuple[Any, Any]:
  """A fixed synthetic batch: (B, H, W, 3) float32 images and int32 labels."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  images = rng.standard_normal((spec.batch, spec.image_size, spec.image_size, 3), np.float32)
  return images, (np.arange(spec.batch) % spec.classes).astype(np.int32)


def time_steps(run_step: Callable[[], None], spec: Spec) -> list[float]:
  """Runs `warmup` then `steps` blocking steps; returns the timed ones, in seconds."""
  for i in range(spec.warmup):
    tick = time.perf_counter()
    run_step()
    print(f"  [{spec.impl}] warm-up {i + 1}: {time.perf_counter() - tick:.2f} s", file=sys.stderr)
  times = []
  for i in range(spec.steps):
    tick = time.perf_counter()
    run_step()
    times.append(time.perf_counter() - tick)
    print(f"  [{spec.impl}] step {i + 1}: {times[-1]:.2f} s", file=sys.stderr)
  return times


def lora_step_and_state(cfg: Any, lora_cfg: Any, token_ids: Any, dtype: str = "float32",
                        untrimmed: bool = False, attention: str = "xla", remat: bool = False
                        ) -> tuple[Any, Any, Any, list[list[int]]]:
  """`methods.lora.make_train_step` as `train.py` builds it (the recipe's optimizer and schedule,
  the class prompts packed, or one per row at full length if `untrimmed`) for base architecture
  `cfg` and adapter config `lora_cfg`; a function returning a fresh state whose B is small
  random (each call the same); the step's `text`; and the prompt work as [[prompts, tokens], ...] (the prompts at their exact lengths, for model
  FLOPs)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from clip_lora_jax import lora, prompts, sharding, training  # pylint: disable=import-outside-toplevel
  from clip_lora_jax.methods import lora as lora_method  # pylint: disable=import-outside-toplevel
  from configs import fewshot  # pylint: disable=import-outside-toplevel

  config = fewshot.get_config()
  optimizer = training.make_optimizer(config.optimizer, training.total_steps(config))
  ids = np.asarray(token_ids, np.int32)
  text = prompts.one_per_row(ids) if untrimmed else prompts.pack_prompts(ids)
  lengths, counts = np.unique(np.argmax(ids, axis=-1) + 1, return_counts=True)
  work = ([[len(ids), ids.shape[1]]] if untrimmed
          else [[int(c), int(n)] for n, c in zip(lengths, counts)])
  step_config = lora_method.StepConfig(cfg, lora_cfg, logit_scale=100.0,
                                    dtype=training.DTYPES[dtype], remat=remat, attention=attention)

  def initial_state():  # Made on the host CPU as train.py makes it, then put on the device.
    with sharding.on_host():
      adapter = lora.init(jax.random.PRNGKey(0), cfg, lora_cfg)
      keys = iter(jax.random.split(jax.random.PRNGKey(1), len(jax.tree.leaves(adapter))))
      adapter = jax.tree.map_with_path(
          lambda path, x: B_INIT_STD * jax.random.normal(next(keys), x.shape)
          if path[-1].key == "b" else x, adapter)
      state = lora_method.init_state(0, adapter, optimizer)
    return jax.device_put(state, jax.devices()[0])

  return (lora_method.make_train_step(step_config, optimizer), initial_state,
          jax.tree.map(jnp.asarray, text), work)


def run_ours(spec: Spec) -> dict[str, Any]:
  """Times `methods.lora.make_train_step` as `train.py` builds it; prompts trimmed unless ours77;
  `ours_xla` is `ours` run with `spec.xla_flags` added to XLA_FLAGS."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from clip_lora_jax import lora, model  # pylint: disable=import-outside-toplevel

  import_rss = peak_rss_bytes()
  cfg = model.get_config(spec.shape)
  params = model.init_params(jax.random.key(0), cfg)
  lora_cfg = lora.LoRAConfig()  # The reference defaults: the peer's constants above.
  assert (lora_cfg.rank, lora_cfg.alpha, lora_cfg.dropout) == (LORA_RANK, LORA_ALPHA, LORA_DROPOUT)
  step, initial_state, text, text_groups = lora_step_and_state(
      cfg, lora_cfg, spec.token_ids, spec.dtype, untrimmed=spec.impl == "ours77")
  state = initial_state()

  images, labels = (jnp.asarray(x) for x in images_and_labels(spec))

  tick = time.perf_counter()
  compiled = step.lower(state, params, images, labels, text).compile()
  compile_s = time.perf_counter() - tick

  def run_step() -> None:
    nonlocal state
    state, metrics = compiled(state, params, images, labels, text)
    jax.block_until_ready((state, metrics))

  times = time_steps(run_step, spec)
  rows, length = text.token_ids.shape
  return {"times": times, "compile_s": compile_s, "text_groups": text_groups,
          "text_layout": f"{rows}x{length}" + ("" if spec.impl == "ours77" else " packed"),
          "import_rss": import_rss, "trainable": lora.num_parameters(state["lora"]),
          "peak_gflops": matmul_peak_gflops(jnp.dtype(spec.dtype)),
          "versions": {"jax": jax.__version__}}


def xla_memory(shape: str, batch: int, token_ids: list[list[int]], dtype: str) -> None:
  """Prints XLA's own account of our step's memory (temporaries, arguments), with and without
  rematerialised blocks (`--config.remat`): compiled from shapes alone, nothing run."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from clip_lora_jax import lora, model  # pylint: disable=import-outside-toplevel
  cfg = model.get_config(shape)
  size = cfg.vision.image_size
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
  for remat in (False, True):
    step, initial_state, text, _ = lora_step_and_state(cfg, lora.LoRAConfig(), token_ids, dtype,
                                                       remat=remat)
    stats = step.lower(jax.eval_shape(initial_state), model.param_shapes(cfg), images, labels,
                       text).compile().memory_analysis()
    print(f"| {len(token_ids)} | {dtype} | {remat} | {gib(stats.temp_size_in_bytes)} | "
          f"{gib(stats.argument_size_in_bytes)} |", flush=True)


def matmul_peak_gflops(dtype: Any, n: int = 4096, repeats: int = 5) -> float:
  """Dense n^3 matmul throughput of JAX in this process at `dtype` (best of `repeats`)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  x = jnp.ones((n, n), dtype)
  matmul = jax.jit(jnp.dot)
  jax.block_until_ready(matmul(x, x))
  best = float("inf")
  for _ in range(repeats):
    tick = time.perf_counter()
    jax.block_until_ready(matmul(x, x))
    best = min(best, time.perf_counter() - tick)
  return 2 * n**3 / best / 1e9


def run_peer(spec: Spec) -> dict[str, Any]:
  """Times the reference-style torch loop on `transformers.CLIPModel`."""
  hide_unusable_torchvision()
  import math  # pylint: disable=import-outside-toplevel

  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from torch import nn  # pylint: disable=import-outside-toplevel
  from torch.nn import functional as F  # pylint: disable=import-outside-toplevel

  import_rss = peak_rss_bytes()
  torch.set_num_threads(2)
  torch.manual_seed(0)

  class ReferenceLoRALinear(nn.Module):
    """A frozen linear layer plus the reference's LoRA branch through the dense (B @ A)."""

    def __init__(self, base: nn.Linear):
      super().__init__()
      self.weight, self.bias = base.weight, base.bias
      self.lora_A = nn.Parameter(torch.empty(LORA_RANK, base.in_features))
      self.lora_B = nn.Parameter(torch.empty(base.out_features, LORA_RANK))
      nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
      nn.init.normal_(self.lora_B, std=B_INIT_STD)
      self.dropout = nn.Dropout(LORA_DROPOUT)
      self.scaling = LORA_ALPHA / math.sqrt(LORA_RANK)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
      return (F.linear(x, self.weight, self.bias)
              + F.linear(self.dropout(x), (self.lora_B @ self.lora_A) * self.scaling))

  clip = transformers.CLIPModel(transformers.CLIPConfig.from_dict(spec.hf_config))
  clip.requires_grad_(False)
  for tower in (clip.vision_model, clip.text_model):
    for layer in tower.encoder.layers:
      for name in ("q_proj", "k_proj", "v_proj"):
        setattr(layer.self_attn, name, ReferenceLoRALinear(getattr(layer.self_attn, name)))
  clip.train()
  trainable = [p for p in clip.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(trainable, lr=spec.learning_rate, betas=(0.9, 0.999),
                                weight_decay=spec.weight_decay)
  scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, spec.total_steps,
                                                         eta_min=spec.min_learning_rate)
  token_ids = torch.tensor(spec.token_ids, dtype=torch.long)
  images, labels = images_and_labels(spec)
  pixels = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
  target = torch.from_numpy(labels).long()

  def run_step() -> None:
    text = clip.text_projection(clip.text_model(input_ids=token_ids).pooler_output)
    text = text / text.norm(dim=-1, keepdim=True)
    image = clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)
    image = image / image.norm(dim=-1, keepdim=True)
    loss = F.cross_entropy(100.0 * image @ text.t(), target)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()

  times = time_steps(run_step, spec)
  return {"times": times, "compile_s": None, "text_groups": [list(token_ids.shape)],
          "text_layout": "x".join(map(str, token_ids.shape)),
          "import_rss": import_rss, "trainable": sum(p.numel() for p in trainable),
          "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}


def child_main(impl: str, spec_path: str) -> None:
  """Runs one implementation and prints its result as the last line of stdout."""
  with open(spec_path) as f:
    spec = Spec(**json.load(f))
  result = run_peer(spec) if impl == "peer" else run_ours(spec)
  result["peak_rss"] = peak_rss_bytes()
  print("RESULT " + json.dumps(result))


def train_step_flops(cfg: Any, batch: int, text_groups: list[list[int]]) -> float:
  """Model FLOPs of one step (see the module docstring); `cfg` is a `model.CLIPConfig`."""
  def tower(n: int, d: int, layers: int, sequences: int) -> float:
    block = 2 * 24 * n * d * d + 3 * 4 * n * n * d + 3 * 12 * n * d * LORA_RANK
    return float(block) * layers * sequences
  return (tower(cfg.vision.num_positions, cfg.vision.width, cfg.vision.layers, batch)
          + sum(tower(tokens, cfg.text.width, cfg.text.layers, prompts)
                for prompts, tokens in text_groups))


def run_child(impl: str, spec: Spec) -> dict[str, Any]:
  """Runs `impl` in a fresh interpreter; returns its result or {'error': ...}."""
  env = dict(os.environ)
  if impl.startswith("ours"):
    xla_flags.use_fast_cpu_flags(env)  # As train.py does.
  if impl == "ours_xla":
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {spec.xla_flags}".strip()
  with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
    json.dump(dataclasses.asdict(dataclasses.replace(spec, impl=impl)), f)
  try:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", impl,
                           "--spec", f.name], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                          text=True, check=False)
  finally:
    os.remove(f.name)
  return child_result(proc)


def child_result(proc: subprocess.CompletedProcess) -> dict[str, Any]:
  """The last `RESULT {json}` line a child benchmark process printed, or {'error': ...}."""
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode != 0 or not lines:
    return {"error": f"exit status {proc.returncode}" + (" (killed: out of memory?)"
                                                         if proc.returncode == -9 else "")}
  return json.loads(lines[-1][len("RESULT "):])


def parse_classes(parser: argparse.ArgumentParser, text: str) -> list[int]:
  """`--classes` "10,100" -> [10, 100], or a parser error."""
  try:
    classes = [int(c) for c in text.split(",")]
  except ValueError:
    parser.error(f"--classes={text!r}: give comma-separated integers, e.g. 10,100")
  if min(classes) < 1:
    parser.error("--classes: every class count must be >= 1")
  return classes


def base_setup(shape: str) -> tuple[Any, Any, Any]:
  """The parent's (architecture, recipe config, tokenizer); imported here, not in children."""
  from clip_lora_jax import model  # pylint: disable=import-outside-toplevel
  from clip_lora_jax.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel
  from configs import fewshot  # pylint: disable=import-outside-toplevel
  return model.get_config(shape), fewshot.get_config(), load_tokenizer()


def gib(n: float) -> str:
  return f"{n / 2**30:.2f}"


def report(cfg: Any, spec: Spec, results: dict[str, dict[str, Any]]) -> None:
  """Prints one case's table, the ratios against the peer and our model-FLOPs utilisation."""
  label = lambda impl: IMPL_LABELS[impl].format(flags=spec.xla_flags)
  print(f"\n### batch {spec.batch}, {spec.classes} classes, {spec.shape} ({spec.dtype} compute "
        f"for ours; median of {spec.steps} steps after {spec.warmup} warm-up)\n")
  print("| implementation | prompt rows x tokens | s / iteration (min-max) | images / s | compile s | "
        "peak RSS GiB | of which imports | trained params | model TFLOP | matmul peak GFLOP/s "
        "| MFU |")
  print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
  for impl, r in results.items():
    if "error" in r:
      print(f"| {label(impl)} | | {r['error']} | | | | | | | | |")
      continue
    median = statistics.median(r["times"])
    compile_s = "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
    flops = train_step_flops(cfg, spec.batch, r["text_groups"])
    peak = r.get("peak_gflops")
    mfu = "-" if peak is None else f"{flops / median / (peak * 1e9):.0%}"
    print(f"| {label(impl)} | {r['text_layout']} | {median:.3g} ({min(r['times']):.3g}-"
          f"{max(r['times']):.3g}) | {spec.batch / median:.1f} | {compile_s} | "
          f"{gib(r['peak_rss'])} | {gib(r['import_rss'])} | {r['trainable']:,} | "
          f"{flops / 1e12:.3g} | {'-' if peak is None else f'{peak:.0f}'} | {mfu} |")
  ok = {k: v for k, v in results.items() if "error" not in v}
  if "peer" in ok and len(ok) > 1:
    peer = ok.pop("peer")
    print("\n| vs peer | speed ratio (peer s / ours s) | peak RSS ratio (ours / peer) |")
    print("| --- | ---: | ---: |")
    for impl, r in ok.items():
      speed = statistics.median(peer["times"]) / statistics.median(r["times"])
      print(f"| {label(impl)} | {speed:.2f}x | {r['peak_rss'] / peer['peak_rss']:.2f} |")
  print("\nModel TFLOP: the work of the step at that row's prompt length (reference.md section 5; "
        "the peer executes more than its row says, through the dense B @ A; ours skips the last "
        "blocks' unpooled positions, 7% of it). MFU: model FLOPs / s over the 4096^3 matmul peak "
        "measured in the same process, at the compute dtype.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--classes", default="10,100", help="comma-separated class counts (one case each)")
  p.add_argument("--steps", type=int, default=5, help="timed steps per implementation (median)")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
  p.add_argument("--impl", choices=("both", "ours", "peer"), default="both")
  p.add_argument("--untrimmed", action=argparse.BooleanOptionalAction, default=True,
                 help="also time ours with the full 77-token prompts")
  p.add_argument("--shape", default="ViT-B/16",
                 help="architecture (`tiny`: a smoke check that runs in under a minute)")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--ours-xla-flags", default="",
                 help="if given, one more row: ours (trimmed) with these flags added to XLA_FLAGS, "
                      "e.g. --xla_cpu_experimental_ynn_fusion_type=")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="compute dtype of ours (parameters stay float32)")
  p.add_argument("--xla-memory", action="store_true",
                 help="only print XLA's memory account of our step (temporaries, arguments), "
                      "with and without --config.remat, at --dtype; nothing is run")
  p.add_argument("--child", choices=tuple(IMPL_LABELS), help=argparse.SUPPRESS)
  p.add_argument("--spec", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.steps < 1 or args.warmup < 0 or args.batch < 1:
    p.error("--steps and --batch must be >= 1 and --warmup >= 0")
  args.classes = parse_classes(p, args.classes)
  return args


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  if args.child:
    child_main(args.child, args.spec)
    return
  from clip_lora_jax import checkpoints, training  # pylint: disable=import-outside-toplevel
  cfg, config, tokenizer = base_setup(args.shape)
  impls = {"both": ["ours", "ours77", "ours_xla", "peer"], "ours": ["ours", "ours77", "ours_xla"],
           "peer": ["peer"]}[args.impl]
  impls = [i for i in impls if (args.untrimmed or i != "ours77")
           and (args.ours_xla_flags or i != "ours_xla")]
  print(f"command: {shlex.join([os.path.relpath(sys.executable, REPO_ROOT), *sys.argv])}")
  if args.xla_memory:
    print("\n| classes | dtype | remat | XLA temporaries GiB | arguments GiB |\n"
          "| ---: | --- | --- | ---: | ---: |")
    for classes in args.classes:
      names = class_names(classes, tokenizer)
      xla_memory(args.shape, args.batch, tokenizer([TEMPLATE.format(n) for n in names]).tolist(),
                 args.dtype)
    return
  print(f"machine: {os.cpu_count()} CPUs; load average before: "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
  for classes in args.classes:
    names = class_names(classes, tokenizer)
    spec = Spec(impl="", shape=args.shape, xla_flags=args.ours_xla_flags,
                hf_config=checkpoints.config_to_hf(cfg), image_size=cfg.vision.image_size,
                batch=args.batch, classes=classes,
                token_ids=tokenizer([TEMPLATE.format(n) for n in names]).tolist(),
                steps=args.steps, warmup=args.warmup, dtype=args.dtype,
                total_steps=training.total_steps(config),
                learning_rate=config.optimizer.learning_rate,
                min_learning_rate=config.optimizer.min_learning_rate,
                weight_decay=config.optimizer.weight_decay)
    results = {}
    for impl in impls:
      print(f"running {impl}, {classes} classes ...", file=sys.stderr)
      results[impl] = run_child(impl, spec)
    report(cfg, spec, results)
    sys.stdout.flush()
  versions = {k: v for r in results.values() for k, v in r.get("versions", {}).items()}
  print(f"\nversions: {', '.join(f'{k} {v}' for k, v in sorted(versions.items()))}")
  print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
  main()
