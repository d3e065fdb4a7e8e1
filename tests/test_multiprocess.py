"""Two processes on localhost (jax.distributed, gloo CPU collectives, 4 devices each) train the
runlocal config; one is killed mid-run, both restart from the checkpoint, and the final adapter
equals the one of a single-process run."""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from clip_lora_jax import lora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = ("--config.total_steps=40", "--config.checkpoint_every=10", "--config.progress=False",
             "--config.eval_batch_size=16")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(workdir: str, process_id: int | None, port: int, devices: int) -> subprocess.Popen:
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config",
         os.path.join(ROOT, "configs/runlocal.py"), "--workdir", workdir, *OVERRIDES]
  if process_id is not None:
    cmd += [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
            f"--process_id={process_id}"]
  return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def finish(procs: list[subprocess.Popen]) -> None:
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]


def test_two_processes_killed_and_resumed_equal_one_process(tmp_path):
  workdir = str(tmp_path / "two")
  port = free_port()
  procs = [launch(workdir, i, port, devices=4) for i in range(2)]
  first = os.path.join(workdir, "checkpoints", "10")
  deadline = time.time() + 400
  while not os.path.isdir(first) and all(p.poll() is None for p in procs) \
      and time.time() < deadline:
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGKILL)  # One host dies; the other cannot go on without it.
  procs[1].wait()
  assert procs[1].returncode == -signal.SIGKILL, "the run ended before it could be killed"
  procs[0].kill()
  procs[0].communicate()
  assert not os.path.exists(os.path.join(workdir, "results.json"))

  port = free_port()
  finish([launch(workdir, i, port, devices=4) for i in range(2)])
  single = str(tmp_path / "one")
  finish([launch(single, None, 0, devices=1)])

  two, one = (lora.load_adapter(os.path.join(d, "adapter.safetensors")) for d in (workdir, single))
  assert any(np.any(x) for x in jax.tree.leaves(one.lora))
  # fp32: 8 devices over 2 processes change only the order of reductions.
  for a, b in zip(jax.tree.leaves(two.lora), jax.tree.leaves(one.lora)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
