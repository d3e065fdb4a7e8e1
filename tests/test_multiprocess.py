"""Two processes on localhost (jax.distributed, gloo CPU collectives, 4 devices each) train the
runlocal config; one is killed mid-run, both restart from the checkpoint, and the final adapter
equals the one of the same command run by a single process (conftest's `runlocal_run`)."""

import os
import signal
import socket
import subprocess
import time

import jax
import numpy as np

from clip_lora_jax import lora
from conftest import ENV, ROOT, RUNLOCAL_OVERRIDES, train_cmd


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(workdir: str, process_id: int, port: int) -> subprocess.Popen:
  """Process `process_id` of 2, with 4 simulated CPU devices."""
  env = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  cmd = [*train_cmd(workdir, *RUNLOCAL_OVERRIDES), f"--coordinator_address=127.0.0.1:{port}",
         "--num_processes=2", f"--process_id={process_id}"]
  return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def finish(procs: list[subprocess.Popen]) -> None:
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]


def test_two_processes_killed_and_resumed_equal_one_process(tmp_path, runlocal_run):
  workdir = str(tmp_path / "two")
  port = free_port()
  procs = [launch(workdir, i, port) for i in range(2)]
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
  finish([launch(workdir, i, port) for i in range(2)])

  two, one = (lora.load_adapter(os.path.join(d, "adapter.safetensors"))
              for d in (workdir, runlocal_run[0]))
  assert any(np.any(x) for x in jax.tree.leaves(one.lora))
  # fp32: 8 devices over 2 processes change only the order of reductions.
  for a, b in zip(jax.tree.leaves(two.lora), jax.tree.leaves(one.lora)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
