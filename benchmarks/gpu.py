"""GPU benchmark: CLIP-LoRA training and inference, ours (JAX) beside the PEFT peer (PyTorch).

Both run the recipe's step at the same shape, on the same device, in the same run, each class
count and implementation in its own process (so peak memory and time to the first step are its
own): random weights, batch 32, LoRA rank 2 on q, k, v of both towers (alpha 1, scale
alpha / sqrt(r), dropout 0.25), every class prompt "a photo of a {name}." re-encoded with
gradients each step, loss = cross-entropy of 100 * cos(image, text), AdamW (lr 2e-4, weight
decay 1e-2) on a cosine schedule, bf16 compute with fp32 parameters. Steps are synchronised;
the median of `--steps` after `--warmup` is reported.

* ours: `methods.lora.make_train_step` as train.py builds it (prompts packed by
  `prompts.pack_prompts`, donated state, uint8 pixels normalised on the device, as
  `data.train_batches` gives them), `--dtype` compute. Time to the first step is split
  into its stages (backend start, parameters, set-up, lowering, compilation, first step), with
  no compilation cache ("cold"), then again in a second process sharing the first one's
  persistent compilation cache ("warm"), as a second identical train.py run would.
* peer: `transformers.CLIPModel` + `peft.LoraConfig(r=2, lora_alpha=1, lora_dropout=0.25,
  use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj"])`, autocast bf16,
  `torch.optim.AdamW` + `CosineAnnealingLR`; prompts of CLIP's 77 tokens, as the reference
  pads them (`--peer-tokens longest`: padded to the longest, as a tokenizer called with
  `padding=True` gives them).

At the first class count (`--extras-classes`), ours also reports (`--extras`) the loss of its
first step in float32 against bf16, the merged-adapter image encoder's inference rate (batch
`--inference-batch`; the peer: PEFT's merged model under autocast fp16, as the official code
evaluates), and the training loop as train.py runs it (`training.fit` fed by
`data.train_batches`: JPEG decoding and augmentation on host threads) against the bare step;
`--variant XLA_FLAGS` adds a cold run of ours with those flags, `--compare-attention` one with
XLA's attention beside `--attention cudnn`, and `--profile` a kernel-time breakdown of ours at the
largest class count.

MFU: model FLOPs (reference.md section 5: forward linear 24 n d^2 and attention 4 n^2 d per
block, training 2x linear + 3x attention, prompts at their exact lengths) / step time / the
dense matmul rate the same process measures at the compute dtype. The memory column is the
device's peak bytes in use (JAX: `memory_stats`; torch: `max_memory_allocated`); on a CPU, the
peak resident memory of the process.

  python benchmarks/gpu.py                                     # the GPU benchmark (minutes)
  python benchmarks/gpu.py --shape tiny --classes 3 --steps 2 --warmup 1 --loop-steps 3 \\
      --inference-batch 8 --peak-size 256                      # CPU smoke check
"""

from __future__ import annotations

import argparse
import dataclasses
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

START = time.perf_counter()  # Before the heavy imports of a child: its import time.

import input_pipeline  # pylint: disable=wrong-import-position  (siblings; no JAX import)
import train_step as cpu_bench  # pylint: disable=wrong-import-position

REPO_ROOT = cpu_bench.REPO_ROOT
IMPLS = ("ours", "ours_warm", "ours_xla_attention", "ours_variant", "peer")
LABELS = {"ours": "ours (JAX)", "ours_warm": "ours, 2nd run (persistent cache)",
          "ours_xla_attention": "ours, XLA attention", "ours_variant": "ours, XLA_FLAGS+={}",
          "peer": "peer (transformers + peft)"}
EXTRAS = ("precision", "inference", "loop")
IMAGENET_STEPS = 8000  # 500 iterations x 16 shots.


@dataclasses.dataclass(frozen=True)
class Spec:
  """What one child process runs (JSON between processes)."""
  impl: str
  shape: str
  hf_config: dict[str, Any]
  image_size: int
  batch: int
  classes: int
  token_ids: list[list[int]]
  steps: int
  warmup: int
  dtype: str
  attention: str
  remat: bool
  extras: tuple[str, ...]  # Of EXTRAS, measured by this child.
  peer_tokens: str  # "77" (CLIP's context, as the reference's prompts) or "longest".
  profile: bool  # Kernel-time breakdown of ours (jax.profiler).
  label: str  # Of an `ours_variant` child: its XLA flags.
  inference_batch: int
  inference_batches: int
  loop_steps: int
  peak_size: int
  total_steps: int
  learning_rate: float
  min_learning_rate: float
  weight_decay: float


def stage(spec: Spec, name: str, seconds: float, stages: dict[str, float]) -> None:
  """Records a stage's time and prints it at once (a run cut short still says where it was)."""
  stages[name] = seconds
  print(f"  [{spec.impl} {spec.classes}] {name}: {seconds:.2f} s", file=sys.stderr, flush=True)


class Timer:
  """`with timer("name"):` records the block's wall time as stage `name`."""

  def __init__(self, spec: Spec, stages: dict[str, float], sync: Callable[[], None] = lambda: None):
    self.spec, self.stages, self.sync = spec, stages, sync

  def __call__(self, name: str) -> "Timer":
    self.name = name
    return self

  def __enter__(self) -> None:
    print(f"  [{self.spec.impl} {self.spec.classes}] {self.name} ...", file=sys.stderr, flush=True)
    self.tick = time.perf_counter()

  def __exit__(self, *exc) -> None:
    self.sync()
    stage(self.spec, self.name, time.perf_counter() - self.tick, self.stages)


def timed_steps(run_step: Callable[[], None], spec: Spec) -> list[float]:
  """`warmup` then `steps` synchronised steps; the timed ones, in seconds."""
  for _ in range(spec.warmup):
    run_step()
  times = []
  for _ in range(spec.steps):
    tick = time.perf_counter()
    run_step()
    times.append(time.perf_counter() - tick)
  print(f"  [{spec.impl} {spec.classes}] median step {statistics.median(times) * 1e3:.1f} ms",
        file=sys.stderr, flush=True)
  return times


def run_ours(spec: Spec) -> dict[str, Any]:
  """Our train step (and, with `extras`, precision, inference and the train.py loop)."""
  stages: dict[str, float] = {}
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from clip_lora_jax import lora, model  # pylint: disable=import-outside-toplevel
  stage(spec, "imports", time.perf_counter() - START, stages)
  timer = Timer(spec, stages)
  with timer("backend"):
    device = jax.devices()[0]
  with timer("parameters"):
    cfg = model.get_config(spec.shape)
    params = jax.block_until_ready(model.init_params(jax.random.key(0), cfg))
  attention = "xla" if spec.impl == "ours_xla_attention" else spec.attention
  with timer("set-up"):
    lora_cfg = lora.LoRAConfig()
    step, initial_state, text, work = cpu_bench.lora_step_and_state(
        cfg, lora_cfg, spec.token_ids, spec.dtype, attention=attention, remat=spec.remat)
    images, labels = (jnp.asarray(x) for x in pixels_and_labels(spec))
    state = jax.block_until_ready(initial_state())
  try:
    with timer("lowering"):
      lowered = step.lower(state, params, images, labels, text)
    with timer("compilation"):
      compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except  (reported, then XLA's attention)
    if attention != "cudnn":
      raise
    print(f"  cuDNN attention failed ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
          "using XLA's", file=sys.stderr, flush=True)
    attention = "xla"
    for name in ("lowering", "compilation"):
      if name in stages:
        stages[f"{name} (cuDNN, failed)"] = stages.pop(name)
    step, *_ = cpu_bench.lora_step_and_state(cfg, lora_cfg, spec.token_ids, spec.dtype,
                                             attention=attention, remat=spec.remat)
    with timer("lowering"):
      lowered = step.lower(state, params, images, labels, text)
    with timer("compilation"):
      compiled = lowered.compile()
  with Timer(spec, stages, sync=lambda: jax.block_until_ready(state))("first step"):
    state, metrics = compiled(state, params, images, labels, text)
  first_step_s = sum(v for k, v in stages.items() if k != "imports")
  stage(spec, "to first step (after imports)", first_step_s, stages)
  result: dict[str, Any] = {"stages": stages, "first_step_s": first_step_s,
                            "device": str(device.device_kind), "work": work,
                            "attention": attention, "xla_flags": spec.label,
                            "text_layout": "x".join(map(str, text.token_ids.shape)),
                            "versions": {"jax": jax.__version__}}
  if spec.impl == "ours_warm":
    return result

  def run_step() -> None:
    nonlocal state, metrics
    state, metrics = compiled(state, params, images, labels, text)
    jax.block_until_ready((state, metrics))

  result["times"] = timed_steps(run_step, spec)
  result["memory"] = device_peak_bytes(device)
  if spec.profile and spec.impl == "ours":
    with timer("profile"):
      result["profile"] = kernel_profile(run_step)
  if spec.extras and spec.impl == "ours":
    result.update(ours_extras(spec, cfg, lora_cfg, params, initial_state, images, labels, text,
                              state, compiled))
  result["peak_tflops"] = matmul_peak_tflops(spec)
  return result


def pixels_and_labels(spec: Spec) -> tuple[Any, Any]:
  """A fixed batch as train.py's input gives it: uint8 pixels (normalised on the device)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (spec.batch, spec.image_size, spec.image_size, 3), np.uint8)
  return pixels, (np.arange(spec.batch) % spec.classes).astype(np.int32)


def kernel_profile(step: Callable[[], None], steps: int = 5, top: int = 25) -> list[list[Any]]:
  """[kernel name, ms per step, share] of the `top` device kernels over `steps` traced steps."""
  import collections  # pylint: disable=import-outside-toplevel
  import glob  # pylint: disable=import-outside-toplevel
  import gzip  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(steps):
        step()
    (path,) = glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True)
    with gzip.open(path, "rt") as f:
      events = json.load(f)["traceEvents"]
  processes = {e["pid"]: str(e.get("args", {}).get("name", "")) for e in events
               if e.get("ph") == "M" and e.get("name") == "process_name"}
  devices = {pid for pid, name in processes.items() if "GPU" in name or "gpu" in name}
  print(f"  trace processes: {sorted(set(processes.values()))[:12]}", file=sys.stderr, flush=True)
  totals: collections.Counter = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in devices:
      totals[e["name"]] += e.get("dur", 0) / 1e3 / steps
  total = sum(totals.values()) or 1.0
  rows = [[name, ms, ms / total] for name, ms in totals.most_common(top)]
  return [["(all device kernels)", total, 1.0]] + rows


def device_peak_bytes(device: Any) -> int:
  """Peak bytes in use on the device (the process's peak RSS on a CPU, which reports none)."""
  stats = device.memory_stats() or {}
  return int(stats.get("peak_bytes_in_use") or cpu_bench.peak_rss_bytes())


def ours_extras(spec: Spec, cfg: Any, lora_cfg: Any, params: Any,
                initial_state: Callable[[], Any], images: Any, labels: Any, text: Any,
                state: Any, bf16_step: Any) -> dict[str, Any]:
  """`spec.extras` of EXTRAS: float32 vs bf16 loss of the first step, merged inference images/s,
  the train.py loop; `initial_state()` gives the state before the first step, `state` the
  trained one."""
  out: dict[str, Any] = {}
  stages: dict[str, float] = {}
  timer = Timer(spec, stages)

  if "precision" in spec.extras:
    with timer("float32 step"):
      f32_step, *_ = cpu_bench.lora_step_and_state(cfg, lora_cfg, spec.token_ids, "float32")
      losses = {}
      for name, fn in (("float32", f32_step), (spec.dtype, bf16_step)):
        _, m = fn(initial_state(), params, images, labels, text)
        losses[name] = float(m["loss"])
    out["first_loss"] = losses
  if "inference" in spec.extras:
    out.update(ours_inference(spec, cfg, lora_cfg, params, state))
  if "loop" in spec.extras:
    out["loop_s_per_step"] = train_py_loop(spec, params, initial_state, text, bf16_step)
  out["extra_stages"] = stages
  return out


def ours_inference(spec: Spec, cfg: Any, lora_cfg: Any, params: Any,
                   state: Any) -> dict[str, float]:
  """Images/s of the merged adapter's image encoder at the compute dtype."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from clip_lora_jax import lora, model, training  # pylint: disable=import-outside-toplevel
  with Timer(spec, {})("inference"):
    merged = jax.jit(lambda p, l: lora.merge(p, l, lora_cfg))(params, state["lora"])
    dtype = training.DTYPES[spec.dtype]
    encode = jax.jit(lambda p, x: model.encode_images(p, x, cfg, dtype=dtype))
    batch = jnp.asarray(np.random.default_rng(1).standard_normal(
        (spec.inference_batch, spec.image_size, spec.image_size, 3), np.float32))
    jax.block_until_ready(encode(merged, batch))
    tick = time.perf_counter()
    for _ in range(spec.inference_batches):
      emb = encode(merged, batch)
    jax.block_until_ready(emb)
    return {"inference_images_per_s": (spec.inference_batches * spec.inference_batch
                                       / (time.perf_counter() - tick))}


def train_py_loop(spec: Spec, params: Any, initial_state: Callable[[], Any], text: Any,
                  step: Any) -> float:
  """s/step of `training.fit` fed by `data.train_batches` (synthetic 500 x 375 JPEGs), as
  train.py runs them, after `warmup` steps."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from clip_lora_jax import data, metrics, training  # pylint: disable=import-outside-toplevel
  from configs import fewshot  # pylint: disable=import-outside-toplevel
  with Timer(spec, {})("train.py loop"):
    config = fewshot.get_config()
    config.progress, config.log_every = False, 10
    config.checkpoint_every = 10**9  # One save, at the end (as a run's last step).
    count = max(spec.batch * 4, 64)  # The warm-up steps decode them (the first epoch).
    rng = np.random.default_rng(0)
    few = data.FewShotSet([input_pipeline.synthetic_jpeg(rng, 500, 375) for _ in range(count)],
                          np.arange(count, dtype=np.int32) % spec.classes,
                          [], np.zeros(0, np.int32), spec.classes)
    batches = data.train_batches(few, batch_size=spec.batch, image_size=spec.image_size, seed=1)
    loop_state = initial_state()

    def next_step(s):
      batch = next(batches)
      return step(s, params, jnp.asarray(batch["image"]), jnp.asarray(batch["label"]), text)

    schedule = training.learning_rate_schedule(config.optimizer, training.total_steps(config))
    warm = spec.warmup
    with tempfile.TemporaryDirectory() as workdir:
      manager = training.checkpoint_manager(workdir, 1)
      with metrics.MetricWriter(workdir, enabled=False) as writer:
        loop_state = training.fit(loop_state, next_step, config, manager, writer, schedule,
                                  warm, desc="warm-up")
        tick = time.perf_counter()
        training.fit(loop_state, next_step, config, manager, writer, schedule,
                     warm + spec.loop_steps, desc="loop")
        return (time.perf_counter() - tick) / spec.loop_steps


def matmul_peak_tflops(spec: Spec) -> float:
  """Dense `peak_size`^3 matmul rate in this process at the compute dtype (best of 5)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  n = spec.peak_size
  x = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(spec.dtype))
  matmul = jax.jit(jnp.dot)
  jax.block_until_ready(matmul(x, x))
  best = float("inf")
  for _ in range(5):
    tick = time.perf_counter()
    jax.block_until_ready(matmul(x, x))
    best = min(best, time.perf_counter() - tick)
  return 2 * n**3 / best / 1e12


def run_peer(spec: Spec) -> dict[str, Any]:
  """transformers CLIPModel + peft LoRA, autocast bf16, AdamW + cosine."""
  stages: dict[str, float] = {}
  cpu_bench.hide_unusable_torchvision()
  import numpy as np  # pylint: disable=import-outside-toplevel
  import peft  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from torch.nn import functional as F  # pylint: disable=import-outside-toplevel
  stage(spec, "imports", time.perf_counter() - START, stages)
  cuda = torch.cuda.is_available()
  device = torch.device("cuda" if cuda else "cpu")
  sync = torch.cuda.synchronize if cuda else (lambda: None)
  timer = Timer(spec, stages, sync)
  torch.manual_seed(0)
  with timer("model"):
    clip = transformers.CLIPModel(transformers.CLIPConfig.from_dict(spec.hf_config)).to(device)
    clip = peft.get_peft_model(clip, peft.LoraConfig(
        r=cpu_bench.LORA_RANK, lora_alpha=cpu_bench.LORA_ALPHA,
        lora_dropout=cpu_bench.LORA_DROPOUT, use_rslora=True,
        target_modules=["q_proj", "k_proj", "v_proj"]))
    for name, p in clip.named_parameters():
      if "lora_B" in name:
        torch.nn.init.normal_(p, std=cpu_bench.B_INIT_STD)
    clip.train()
    trainable = [p for p in clip.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, spec.total_steps,
                                                           eta_min=spec.min_learning_rate)
    ids = np.asarray(spec.token_ids)  # (C, 77): CLIP's context, as the reference pads
    if spec.peer_tokens == "longest":  # as a tokenizer called with padding=True pads
      ids = ids[:, :int(np.argmax(ids, axis=-1).max()) + 1]
    token_ids = torch.tensor(ids, dtype=torch.long, device=device)
    attention_mask = (torch.arange(ids.shape[1], device=device)[None, :]
                      <= token_ids.argmax(-1)[:, None]).long()
    images, labels = cpu_bench.images_and_labels(spec)
    pixels = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)
    target = torch.from_numpy(labels).long().to(device)
  autocast = lambda dtype: torch.autocast(device.type, dtype=dtype)
  # transformers 5.x returns the projected features as a tensor or as `pooler_output`.
  features = lambda out: out if isinstance(out, torch.Tensor) else out.pooler_output

  def run_step() -> None:
    with autocast(torch.bfloat16):
      text = features(clip.get_text_features(input_ids=token_ids, attention_mask=attention_mask))
      image = features(clip.get_image_features(pixel_values=pixels))
      text = text / text.norm(dim=-1, keepdim=True)
      image = image / image.norm(dim=-1, keepdim=True)
      loss = F.cross_entropy(100.0 * image.float() @ text.float().t(), target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    sync()

  with timer("first step"):
    run_step()
  first_step_s = stages["model"] + stages["first step"]
  stage(spec, "to first step (after imports)", first_step_s, stages)
  result: dict[str, Any] = {"stages": stages, "first_step_s": first_step_s,
                            "times": timed_steps(run_step, spec),
                            "memory": (torch.cuda.max_memory_allocated() if cuda
                                       else cpu_bench.peak_rss_bytes()),
                            "work": [[1, int(n)] for n in np.argmax(ids, axis=-1) + 1],
                            "text_layout": "x".join(map(str, ids.shape)),
                            "versions": {"torch": torch.__version__, "peft": peft.__version__,
                                         "transformers": transformers.__version__}}
  if spec.extras:
    with timer("inference"):
      merged = clip.merge_and_unload().eval()
      batch = torch.randn(spec.inference_batch, 3, spec.image_size, spec.image_size,
                          device=device)
      with torch.no_grad(), autocast(torch.float16 if cuda else torch.bfloat16):
        merged.get_image_features(pixel_values=batch)
        sync()
        tick = time.perf_counter()
        for _ in range(spec.inference_batches):
          merged.get_image_features(pixel_values=batch)
        sync()
      result["inference_images_per_s"] = (spec.inference_batches * spec.inference_batch
                                          / (time.perf_counter() - tick))
  return result


def child_main(impl: str, spec_path: str) -> None:
  with open(spec_path) as f:
    spec = Spec(**json.load(f))
  result = run_peer(spec) if impl == "peer" else run_ours(spec)
  print("RESULT " + json.dumps(result), flush=True)


def run_child(impl: str, spec: Spec, env: dict[str, str], timeout: float) -> dict[str, Any]:
  """Runs `impl` in a fresh interpreter (stderr passes through); its result or {'error'}."""
  with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
    json.dump(dataclasses.asdict(dataclasses.replace(spec, impl=impl)), f)
  try:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", impl,
                           "--spec", f.name], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                          text=True, check=False, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout:.0f} s"}
  finally:
    os.remove(f.name)
  return cpu_bench.child_result(proc)


def step_flops(cfg: Any, batch: int, work: list[list[int]]) -> float:
  return cpu_bench.train_step_flops(cfg, batch, work)


def label_of(impl: str, result: dict[str, Any]) -> str:
  """The row name of a child's result (`ours_variant_N`: with its XLA flags)."""
  label = LABELS[impl.rsplit("_", 1)[0] if impl.startswith("ours_variant") else impl]
  label = label.format(result.get("xla_flags", "?"))
  return label + (f" [{result['attention']} attention]" if "attention" in result else "")


def report(cfg: Any, spec: Spec, results: dict[str, dict[str, Any]]) -> list[str]:
  """Markdown lines for one class count."""
  lines = [f"\n### {spec.classes} classes, batch {spec.batch}, {spec.shape}, {spec.dtype} "
           f"(median of {spec.steps} steps after {spec.warmup})\n",
           "| implementation | prompts (rows x tokens) | imports s | to first step s | "
           "s / step | images / s | peak memory GiB | model TFLOP | MFU |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for impl, r in results.items():
    if "error" in r:
      lines.append(f"| {label_of(impl, r)} | {r['error']} | | | | | | | |")
      continue
    flops = step_flops(cfg, spec.batch, r["work"])
    median = statistics.median(r["times"]) if "times" in r else None
    peak = results.get("ours", {}).get("peak_tflops")
    cells = [label_of(impl, r), r["text_layout"], f"{r['stages']['imports']:.1f}",
             f"{r['first_step_s']:.1f}",
             "-" if median is None else f"{median:.4f}",
             "-" if median is None else f"{spec.batch / median:.0f}",
             f"{r['memory'] / 2**30:.2f}" if "memory" in r else "-", f"{flops / 1e12:.2f}",
             "-" if median is None or not peak else f"{flops / median / (peak * 1e12):.0%}"]
    lines.append("| " + " | ".join(cells) + " |")
  ours, peer = results.get("ours", {}), results.get("peer", {})
  if "times" in ours and "times" in peer:
    speed = statistics.median(peer["times"]) / statistics.median(ours["times"])
    lines.append(f"\nours vs peer: {speed:.2f}x faster, {ours['memory'] / peer['memory']:.2f}x "
                 "the peak memory")
  if "times" in ours:
    lines.append("ours: stages to the first step: " + ", ".join(
        f"{k} {v:.1f} s" for k, v in ours["stages"].items()) + "; matmul peak "
        f"{ours['peak_tflops']:.0f} TFLOP/s")
  if "first_step_s" in results.get("ours_warm", {}):
    lines.append(f"ours, 2nd run with the persistent cache: {results['ours_warm']['first_step_s']:.1f}"
                 " s to the first step (" + ", ".join(
                     f"{k} {v:.1f} s" for k, v in results["ours_warm"]["stages"].items()) + ")")
  if "first_loss" in ours:
    f32, low = ours["first_loss"]["float32"], ours["first_loss"][spec.dtype]
    lines.append(f"first-step loss: float32 {f32:.5f}, {spec.dtype} {low:.5f} "
                 f"(difference {low - f32:+.5f}, {abs(low - f32) / f32:.2%})")
  for impl in ("ours", "peer"):
    if "inference_images_per_s" in results.get(impl, {}):
      lines.append(f"{label_of(impl, {})} merged image encoder, batch {spec.inference_batch}: "
                   f"{results[impl]['inference_images_per_s']:.0f} images/s")
  if "profile" in ours:
    lines.append("\nours, device kernels per step (jax.profiler, 5 steps):\n\n"
                 "| kernel | ms / step | share |\n| --- | ---: | ---: |")
    lines += [f"| `{name[:90]}` | {ms:.3f} | {share:.1%} |" for name, ms, share in ours["profile"]]
  if "loop_s_per_step" in ours:
    bare = statistics.median(ours["times"])
    lines.append(f"train.py loop (training.fit + data.train_batches, {os.cpu_count()} CPUs): "
                 f"{ours['loop_s_per_step']:.4f} s/step, {bare / ours['loop_s_per_step']:.0%} of "
                 "the bare step's rate")
  return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--classes", default="10,1000", help="comma-separated class counts")
  p.add_argument("--shape", default="ViT-B/16", help="architecture (`tiny` for a CPU smoke check)")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--steps", type=int, default=20, help="timed steps (median)")
  p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
  p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                 help="compute dtype of ours (parameters stay float32)")
  p.add_argument("--attention", choices=("xla", "cudnn"), default="xla",
                 help="our attention kernel (model.ATTENTION_IMPLEMENTATIONS); with cudnn, a "
                      "shape cuDNN refuses falls back to xla, reported")
  p.add_argument("--remat", action="store_true",
                 help="ours with rematerialised blocks (--config.remat): less memory, more work")
  p.add_argument("--impl", choices=("both", "ours", "peer"), default="both")
  p.add_argument("--no-warm", action="store_true", help="skip the second (cached) run of ours")
  p.add_argument("--compare-attention", action="store_true",
                 help="at the extras class count, also time ours with XLA's attention (beside "
                      "--attention cudnn)")
  p.add_argument("--extras-classes", type=int, default=None,
                 help="class count whose children also measure --extras, --compare-attention and "
                      "--variant (default: the first)")
  p.add_argument("--extras", default=",".join(EXTRAS),
                 help=f"comma-separated, of {', '.join(EXTRAS)} (empty: none)")
  p.add_argument("--variant", action="append", default=[], metavar="XLA_FLAGS",
                 help="at the extras class count, also time ours (cold) with these flags added to "
                      "XLA_FLAGS; repeatable")
  p.add_argument("--peer-tokens", choices=("77", "longest"), default="77",
                 help="the peer's prompts: CLIP's 77-token context (as the reference pads them) "
                      "or padded to the longest prompt")
  p.add_argument("--profile", action="store_true",
                 help="kernel-time breakdown of ours at the largest class count")
  p.add_argument("--inference-batch", type=int, default=256)
  p.add_argument("--inference-batches", type=int, default=20)
  p.add_argument("--loop-steps", type=int, default=40, help="timed steps of the train.py loop")
  p.add_argument("--peak-size", type=int, default=8192, help="n of the n^3 matmul peak")
  p.add_argument("--timeout", type=float, default=240, help="seconds per child process")
  p.add_argument("--json", help="also write every result to this JSON file")
  p.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
  p.add_argument("--spec", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  args.extras = tuple(e for e in args.extras.split(",") if e)
  if set(args.extras) - set(EXTRAS):
    p.error(f"--extras={','.join(args.extras)}: use some of {', '.join(EXTRAS)}")
  args.classes = cpu_bench.parse_classes(p, args.classes)
  if args.steps < 1 or args.warmup < 0 or args.batch < 1:
    p.error("--steps and --batch must be >= 1 and --warmup >= 0")
  return args


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  if args.child:
    child_main(args.child, args.spec)
    return
  from clip_lora_jax import checkpoints, training  # pylint: disable=import-outside-toplevel
  cfg, config, tokenizer = cpu_bench.base_setup(args.shape)
  impls = {"both": IMPLS, "ours": IMPLS[:4], "peer": IMPLS[4:]}[args.impl]
  impls = [i for i in impls if not (args.no_warm and i == "ours_warm")]
  extras_classes = args.classes[0] if args.extras_classes is None else args.extras_classes
  print(f"command: {shlex.join(['python', *sys.argv])}")
  print(f"host: {os.cpu_count()} CPUs")
  all_results, lines = {}, []
  for classes in args.classes:
    names = cpu_bench.class_names(classes, tokenizer)
    spec = Spec(impl="", shape=args.shape, hf_config=checkpoints.config_to_hf(cfg),
                image_size=cfg.vision.image_size, batch=args.batch, classes=classes,
                token_ids=tokenizer([cpu_bench.TEMPLATE.format(n) for n in names]).tolist(),
                steps=args.steps, warmup=args.warmup, dtype=args.dtype, attention=args.attention,
                remat=args.remat,
                extras=args.extras if classes == extras_classes else (),
                peer_tokens=args.peer_tokens, profile=args.profile and classes == max(args.classes),
                label="", inference_batch=args.inference_batch,
                inference_batches=args.inference_batches, loop_steps=args.loop_steps,
                peak_size=args.peak_size, total_steps=training.total_steps(config),
                learning_rate=config.optimizer.learning_rate,
                min_learning_rate=config.optimizer.min_learning_rate,
                weight_decay=config.optimizer.weight_decay)
    results = {}
    with tempfile.TemporaryDirectory() as cache:
      env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache,
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",  # as train.py sets it
             "PYTHONPATH": os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")])}
      for impl in impls:
        extras_here = classes == extras_classes
        if impl == "ours_xla_attention" and not (args.compare_attention and extras_here):
          continue
        if impl == "ours_variant":
          continue
        print(f"running {impl}, {classes} classes ...", file=sys.stderr, flush=True)
        results[impl] = run_child(impl, spec, env, args.timeout)
    for number, flags in enumerate(args.variant if "ours" in impls and classes == extras_classes
                                   else ()):
      print(f"running ours with XLA_FLAGS+={flags}, {classes} classes ...", file=sys.stderr,
            flush=True)
      variant = dataclasses.replace(spec, extras=(), profile=False, label=flags)
      with tempfile.TemporaryDirectory() as cache:  # cold, like the first run of ours
        env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache,
               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",  # as train.py sets it
               "PYTHONPATH": os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")]),
               "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()}
        results[f"ours_variant_{number}"] = run_child("ours_variant", variant, env, args.timeout)
    all_results[classes] = results
    lines += report(cfg, spec, results)
    print("\n".join(report(cfg, spec, results)), flush=True)
    if args.json:
      with open(args.json, "w") as f:
        json.dump({str(k): v for k, v in all_results.items()}, f, indent=1)
  largest = all_results[max(args.classes)].get("ours", {})
  if "times" in largest:
    per_step = statistics.median(largest["times"])
    print(f"\nprojected ImageNet 16-shot training ({IMAGENET_STEPS} steps at {max(args.classes)} "
          f"classes): {IMAGENET_STEPS * per_step / 60:.1f} min of steps "
          f"(+ {largest['first_step_s']:.0f} s to the first step)")
  versions = {k: v for r in all_results.values() for x in r.values()
              for k, v in x.get("versions", {}).items()}
  print(f"versions: {', '.join(f'{k} {v}' for k, v in sorted(versions.items()))}")


if __name__ == "__main__":
  main()
