"""Running a sweep's cells: each an ordinary train.py / eval.py command in its own workdir, on
an existing engine, resumable, every outcome appended to the store as it ends.

Executors: "local" runs one cell per local accelerator at a time (a process each, pinned to its
GPU with CUDA_VISIBLE_DEVICES; one at a time without GPUs); "submitit" submits the cells as a
Slurm job array through submitit (cluster "local": submitit's local executor, to try the path
without Slurm); "inprocess" runs them one after the other in this process (tests, debugging).

Resuming: a cell whose output exists (a run's results.json, an evaluation's JSON) is finished
and not run again (its result is collected into the store if the store lacks it); any other is
run with its exact command, which resumes an interrupted run from its last checkpoint. A cell
that fails is retried once (resuming), then reported with its log; the others go on.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import queue
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

from clip_lora_jax import files
from clip_lora_jax.data import registry
from clip_lora_jax.errors import UserError
from clip_lora_jax.sweep import store
from clip_lora_jax.sweep.protocols import PLAIN, Cell, scoring

# The repository root: train.py, eval.py and configs/ live there.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXECUTORS = ("local", "submitit", "inprocess")
RETRIES = 1


@dataclasses.dataclass(frozen=True)
class Settings:
  """How the cells of a sweep are configured.

  Attributes:
    root: the sweep's directory: `runs/` (workdirs), `evals/`, `logs/`, the store.
    config_file: one config file for every method, given `:method=NAME` (configs/runlocal.py);
      None: each method's own recipe, `configs/<file>.py:dataset=D,shots=K,seed=S`.
    overrides: `key=value` config overrides of every cell (`--config.key=value`).
    python: the interpreter of the cells' commands.
    split_files: a directory of the protocol's split files (`split_zhou_<Dataset>.json`): each
      cell of a dataset the protocol splits by file runs on its file (`split_file_for`).
    shot_lists: published few-shot lists, a directory path in which `{dataset}` stands for the
      training dataset's name (e.g. `coop_data/{dataset}/split_fewshot`): training cells read
      their shots from `shot_<K>-seed_<S>` lists there (`config.shot_lists`).
  """
  root: str
  config_file: str | None = None
  overrides: tuple[str, ...] = ()
  python: str = sys.executable
  split_files: str | None = None
  shot_lists: str | None = None


@dataclasses.dataclass(frozen=True)
class Job:
  """A cell and how to run it: its command, log file and output file."""
  cell: Cell
  command: tuple[str, ...]
  log: str
  output: str


def workdir(settings: Settings, cell: Cell) -> str:
  """The workdir of the run `cell` is or evaluates."""
  return os.path.join(settings.root, "runs", cell.run.key)


def output_path(settings: Settings, cell: Cell) -> str:
  """The file holding `cell`'s result once it has finished."""
  if cell.kind == "train":
    return os.path.join(workdir(settings, cell), "results.json")
  return os.path.join(settings.root, "evals", f"{cell.key}.json")


def split_file_for(settings: Settings, dataset: str) -> str | None:
  """The split file of `dataset` in `settings.split_files`: None without that directory, for a
  dataset the protocol splits without a file (ImageNet, FGVC-Aircraft) or one whose TFDS keeps
  no file names to match (Food-101: its benchmark splits are carved, see the README)."""
  spec = registry.get_dataset(dataset)
  if settings.split_files is None or spec.split_file_name is None or spec.file_key is None:
    return None
  path = os.path.join(settings.split_files, spec.split_file_name)
  if not os.path.isfile(path):
    raise UserError(f"--split_files {settings.split_files}: no {spec.split_file_name} there, the "
                    f"protocol's split file of {spec.name}")
  return path


def config_args(settings: Settings, cell: Cell) -> list[str]:
  """The `--config ...` arguments of `cell` (the dataset scored: the target of an evaluation)."""
  from clip_lora_jax.methods import METHODS  # pylint: disable=import-outside-toplevel
  if settings.config_file:
    args = ["--config", f"{settings.config_file}:method={cell.method}",
            f"--config.dataset={cell.dataset}", f"--config.shots={cell.shots}",
            f"--config.seed={cell.seed}"]
  else:
    recipe = os.path.join(REPO, "configs", f"{METHODS[cell.method].config_file}.py")
    args = ["--config", f"{recipe}:dataset={cell.dataset},shots={cell.shots},seed={cell.seed}"]
  split_file = split_file_for(settings, cell.dataset)
  if split_file is not None:
    args.append(f"--config.split_file={split_file}")
  if settings.shot_lists is not None and cell.kind == "train":
    lists = settings.shot_lists.replace("{dataset}", cell.train_dataset.split("/")[0])
    args.append(f"--config.shot_lists={lists}")
  return args + [f"--config.{o}" for o in settings.overrides] + ["--config.progress=False"]


def job(settings: Settings, cell: Cell) -> Job:
  """`cell` as a command: train.py in its workdir, or eval.py of its run's adapter (plain CLIP
  for `PLAIN` scoring) writing its output file."""
  output = output_path(settings, cell)
  if cell.kind == "train":
    command = [settings.python, os.path.join(REPO, "train.py"), *config_args(settings, cell),
               "--workdir", workdir(settings, cell)]
  else:
    adapter = ([] if scoring(cell) == PLAIN else
               ["--adapter", os.path.join(workdir(settings, cell), "adapter.safetensors")])
    command = [settings.python, os.path.join(REPO, "eval.py"), *config_args(settings, cell),
               *adapter, "--output", output]
  return Job(cell, tuple(command), os.path.join(settings.root, "logs", f"{cell.key}.log"), output)


def execute(command: Sequence[str], log: str, env: dict[str, str] | None = None) -> dict[str, Any]:
  """Runs one cell's command (in a process of its own; also what a Slurm array task runs), its
  output appended to `log`: {"returncode", "wall_s", "peak_rss_mb"} (the process's peak RSS).
  Ctrl-C reaches the cell first, which saves a checkpoint, then stops the sweep."""
  os.makedirs(os.path.dirname(log), exist_ok=True)
  start = time.monotonic()
  with open(log, "a", encoding="utf-8") as f:
    f.write(f"$ {shlex.join(command)}\n")
    f.flush()
    proc = subprocess.Popen(list(command), stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                            env={**os.environ, **(env or {})})
    try:
      _, status, usage = os.wait4(proc.pid, 0)
    except KeyboardInterrupt:
      proc.send_signal(signal.SIGINT)
      proc.wait()
      raise
  return {"returncode": os.waitstatus_to_exitcode(status), "wall_s": time.monotonic() - start,
          "peak_rss_mb": usage.ru_maxrss / 1024}


def parse_config(args: Sequence[str]):
  """(config, overridden keys) of `--config FILE[:ARG] --config.KEY=VALUE ...` arguments, as
  train.py reads them: each value takes the type of the key's (a literal, else a string)."""
  import ast  # pylint: disable=import-outside-toplevel
  from clip_lora_jax import cli  # pylint: disable=import-outside-toplevel
  config = cli.load_config_file(args[args.index("--config") + 1])
  keys = []
  for arg in args:
    if arg.startswith("--config."):
      key, _, text = arg[len("--config."):].partition("=")
      try:
        value = ast.literal_eval(text)
      except (ValueError, SyntaxError):
        value = text
      try:
        config.update_from_flattened_dict({key: value})
      except TypeError:
        config.update_from_flattened_dict({key: text})
      keys.append(key)
  return config, keys


def eval_module():
  """eval.py as a module, loaded once per process (its absl flags may be defined only once)."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  if "eval_cli" not in sys.modules:
    spec = importlib.util.spec_from_file_location("eval_cli", os.path.join(REPO, "eval.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["eval_cli"] = module
  return sys.modules["eval_cli"]


def execute_in_process(settings: Settings, item: Job) -> dict[str, Any]:
  """`item` run in this process, as its command would run it (a failure's traceback goes to its
  log); `peak_rss_mb` is this process's peak so far."""
  from clip_lora_jax import methods  # pylint: disable=import-outside-toplevel
  cell, start = item.cell, time.monotonic()
  code = 0
  try:
    config, keys = parse_config(config_args(settings, cell))
    if cell.kind == "train":
      methods.train_and_evaluate(config, workdir(settings, cell))
    else:
      adapter = item.command[item.command.index("--adapter") + 1] \
          if "--adapter" in item.command else None
      files.write_json(item.output, eval_module().evaluate(config, adapter, "test", "auto", keys))
  except Exception:  # pylint: disable=broad-except  (reported with its log, the sweep goes on)
    os.makedirs(os.path.dirname(item.log), exist_ok=True)
    with open(item.log, "a", encoding="utf-8") as f:
      f.write(f"$ {shlex.join(item.command)}\n{traceback.format_exc()}")
    code = 1
  return {"returncode": code, "wall_s": time.monotonic() - start,
          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def local_devices() -> list[dict[str, str]]:
  """One environment per local accelerator slot: each visible GPU, or one slot without GPUs."""
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  if visible is not None:
    ids = [i for i in visible.split(",") if i.strip()]
  elif shutil.which("nvidia-smi"):
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    ids = [str(i) for i, line in enumerate(listing.stdout.splitlines()) if line.startswith("GPU")]
  else:
    ids = []
  return [{"CUDA_VISIBLE_DEVICES": i} for i in ids] or [{}]


Outcome = dict[str, Any]
Started = Callable[[Job], None]


def run_local(jobs: Sequence[Job], started: Started, slots: list[dict[str, str]]
              ) -> Iterator[tuple[Job, Outcome]]:
  """`jobs` as processes, one per slot at a time; (job, outcome) as each ends."""
  free: queue.Queue = queue.Queue()
  for slot in slots:
    free.put(slot)

  def one(item: Job) -> Outcome:
    slot = free.get()
    try:
      started(item)
      return execute(item.command, item.log, slot)
    finally:
      free.put(slot)

  with concurrent.futures.ThreadPoolExecutor(len(slots)) as pool:
    futures = {pool.submit(one, item): item for item in jobs}
    try:
      for future in concurrent.futures.as_completed(futures):
        yield futures[future], future.result()
    except KeyboardInterrupt:
      for future in futures:
        future.cancel()
      raise


def run_in_process(settings: Settings, jobs: Sequence[Job], started: Started
                   ) -> Iterator[tuple[Job, Outcome]]:
  for item in jobs:
    started(item)
    yield item, execute_in_process(settings, item)


def run_submitit(settings: Settings, jobs: Sequence[Job], started: Started, cluster: str,
                 parameters: dict[str, Any]) -> Iterator[tuple[Job, Outcome]]:
  """`jobs` as one job array of submitit's executor for `cluster` ("slurm", or "local" to try
  it without Slurm); `parameters` go to `update_parameters` (e.g. slurm_partition,
  timeout_min, gpus_per_node). A task that dies is an outcome with its submitit log."""
  import submitit  # pylint: disable=import-outside-toplevel
  executor = submitit.AutoExecutor(folder=os.path.join(settings.root, "submitit", "%j"),
                                   cluster=cluster)
  executor.update_parameters(**parameters)
  submitted = executor.map_array(execute, [j.command for j in jobs], [j.log for j in jobs])
  by_id = {}
  for item, task in zip(jobs, submitted):
    started(item)
    by_id[task.job_id] = item
  for task in submitit.helpers.as_completed(submitted):
    item = by_id[task.job_id]
    try:
      yield item, task.result()
    except Exception as e:  # pylint: disable=broad-except  (the task died: its log says why)
      yield item, {"returncode": None, "wall_s": None, "peak_rss_mb": None,
                   "reason": f"{type(e).__name__}: {str(e)[-500:]}",
                   "log": str(task.paths.stderr)}


class Progress:
  """Cells done / running / failed and the estimated time left: a line on `out` and the
  store's progress.json at every change."""

  def __init__(self, root: str, total: int, slots: int, out: TextIO):
    self.root, self.total, self.slots, self.out = root, total, slots, out
    self.counts = {store.DONE: 0, store.FAILED: 0, store.NOT_APPLICABLE: 0, "running": 0}
    self.walls: list[float] = []
    self.start = time.time()
    self.lock = threading.Lock()

  def started(self, item: Job) -> None:
    with self.lock:
      self.counts["running"] += 1
      self._report(f"started {item.cell.key}")

  def ended(self, record: store.Record, ran: bool, counted: bool = True) -> None:
    with self.lock:
      if ran:
        self.counts["running"] -= 1
        if record.get("wall_s"):
          self.walls.append(record["wall_s"])
      if counted:
        self.counts[record["status"]] += 1
      if ran:
        self._report(f"{record['status']} {record['key']}")

  def eta_s(self) -> float | None:
    left = self.total - sum(self.counts[s] for s in (store.DONE, store.FAILED,
                                                    store.NOT_APPLICABLE))
    if not self.walls:
      return None
    return left * sum(self.walls) / len(self.walls) / self.slots

  def _report(self, event: str) -> None:
    eta = self.eta_s()
    state = {"total": self.total, **self.counts, "eta_s": eta, "updated": time.time(),
             "elapsed_s": time.time() - self.start, "last": event}
    store.write_progress(self.root, state)
    left = "?" if eta is None else f"{eta / 60:.1f} min"
    print(f"[sweep] {self.counts[store.DONE]}/{self.total} done, {self.counts['running']} "
          f"running, {self.counts[store.FAILED]} failed, {self.counts[store.NOT_APPLICABLE]} "
          f"not applicable; ~{left} left  ({event})", file=self.out, flush=True)


def _identity(cell: Cell) -> store.Record:
  return {"key": cell.key, "kind": cell.kind, "method": cell.method,
          "train_dataset": cell.train_dataset, "dataset": cell.dataset, "shots": cell.shots,
          "seed": cell.seed}


def _result(item: Job) -> dict[str, Any]:
  with open(item.output, encoding="utf-8") as f:
    result = json.load(f)
  prefix = "test_" if item.cell.kind == "train" else ""
  return {**{k: result[prefix + k] for k in ("top1", "top5", "count")},
          "peak_device_memory_mb": result.get("peak_device_memory_mb")}


def _record(item: Job, status: str, outcome: Outcome | None = None, attempts: int = 0,
            reason: str | None = None) -> store.Record:
  outcome = outcome or {}
  record = {**_identity(item.cell), "status": status, "command": shlex.join(item.command),
            "output": item.output, "log": outcome.get("log", item.log), "attempts": attempts,
            "wall_s": outcome.get("wall_s"), "peak_rss_mb": outcome.get("peak_rss_mb"),
            "reason": reason or outcome.get("reason"), "finished": time.time()}
  if status == store.DONE:
    record.update(_result(item))
  return record


def run(cells: Sequence[Cell], settings: Settings, executor: str = "local",
        slots: list[dict[str, str]] | None = None, cluster: str = "slurm",
        parameters: dict[str, Any] | None = None, out: TextIO = sys.stderr
        ) -> dict[str, store.Record]:
  """Runs every unfinished cell of `cells` (training cells first, then the evaluations of the
  runs that finished), appending each outcome to the store; returns the store's records of
  `cells` by key."""
  if executor not in EXECUTORS:
    raise UserError(f"executor {executor!r}: use one of {', '.join(EXECUTORS)}")
  cells = list(dict.fromkeys(cells))
  slots = slots or (local_devices() if executor == "local" else [{}])
  known = store.read(settings.root)
  progress = Progress(settings.root, len(cells), len(slots), out)
  records: dict[str, store.Record] = {}

  def keep(record: store.Record, ran: bool = False, counted: bool = True) -> None:
    records[record["key"]] = record
    if ran or known.get(record["key"]) != record:
      store.append(settings.root, [record])
    progress.ended(record, ran, counted)

  def launch(jobs: list[Job]) -> Iterator[tuple[Job, Outcome]]:
    if executor == "inprocess":
      return run_in_process(settings, jobs, progress.started)
    if executor == "submitit":
      return run_submitit(settings, jobs, progress.started, cluster, parameters or {})
    return run_local(jobs, progress.started, slots)

  for phase in ("train", "eval"):
    todo = []
    for cell in (c for c in cells if c.kind == phase):
      item = job(settings, cell)
      if phase == "eval" and scoring(cell) is None:
        keep(_record(item, store.NOT_APPLICABLE, reason=(
            f"a {cell.method} adapter holds a head over the classes of {cell.train_dataset}, "
            f"which cannot score those of {cell.target}")))
      elif os.path.exists(item.output):
        old = known.get(cell.key)
        keep(old if old and old["status"] == store.DONE else _record(item, store.DONE))
      elif phase == "eval" and records.get(cell.run.key, {}).get("status") != store.DONE:
        run_record = records.get(cell.run.key) or {}
        keep(_record(item, store.FAILED, reason=f"its training cell {cell.run.key} did not "
                     f"finish (log {run_record.get('log')})"))
      else:
        todo.append(item)
    for attempt in range(1, RETRIES + 2):
      failed = []
      for item, outcome in launch(todo):
        if outcome["returncode"] == 0 and os.path.exists(item.output):
          keep(_record(item, store.DONE, outcome, attempt), ran=True)
        elif attempt <= RETRIES:
          failed.append(item)
          keep(_record(item, store.FAILED, outcome, attempt, outcome.get("reason") or
                       f"exit status {outcome['returncode']}; retrying"), ran=True, counted=False)
        else:
          keep(_record(item, store.FAILED, outcome, attempt, outcome.get("reason") or
                       f"exit status {outcome['returncode']}"), ran=True)
      todo = failed
  return records
