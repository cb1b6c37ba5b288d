"""train.py as 2 processes (jax.distributed on localhost, gloo CPU collectives) == 1 process.

The 2-process run (one CPU device each, one workdir) trains to step 2, stops, and
is rerun to step 4; the reference is train.py in one process with 2 forced host
devices, straight to step 4: the same global batch on a mesh of the same size.
Pre-training is steps 0-1, so the run covers both phases and the optimizer
renewal; the params start from the golden fixture's (train.init_from), which
saves compiling the initialisers. test_train.test_two_devices_equal_one
compares 2 devices with 1.

Both runs execute the same partitioned XLA program on each device; what differs
is where the rows come from (each process reads its own share of the data) and
the gradient all-reduce (gloo between processes vs in-process). Floating-point
addition of two operands is commutative, so the all-reduce gives the same bits
either way and the results must be identical: no tolerance, and any
data-sharding, collective or resume error shows.

Cost: four compiles of the step (~16 CPU-s each here with XLA_FLAGS below; on CPU
only process 0 writes the persistent compile cache and the other processes' cache
keys differ, so the resumed run's process 1 compiles again).
"""
from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import esc_jax
from esc_jax import checkpoint as ckpt
from esc_jax import train_lib
from helpers import IR_EMITTERS

ROOT = pathlib.Path(__file__).absolute().parents[1]
STOP, STEPS = 2, 4
# Both runs compile without LLVM optimisations and with the IR fusion emitters (helpers):
# the comparison needs the same program on both sides, not a fast one.
XLA_FLAGS = f"--xla_backend_optimization_level=0 {IR_EMITTERS}".strip()
OVERRIDES = {"train.pretrain_steps": 2, "optim.lr": 1e-3, "data.val_dir": "", "data.num_workers": 0,
             "ckpt.every_steps": 2, "ckpt.keep": 10, "log.every_steps": 1, "log.tensorboard": False}


def _config():
  sys.path.insert(0, str(ROOT / "configs"))
  try:
    import smoke  # configs/smoke.py
  finally:
    sys.path.pop(0)
  c = smoke.get_config()
  for k, v in OVERRIDES.items():
    sec, name = k.split(".")
    c[sec][name] = v
  return c


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(workdir, num_steps: int, processes: int, init_from, log_prefix) -> list:
  """train.py in `processes` processes (1: one process with 2 host devices); [(Popen, log path)].

  The persistent compile cache comes from conftest (JAX_COMPILATION_CACHE_DIR).
  """
  args = [sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'configs' / 'smoke.py'}",
          f"--workdir={workdir}", "--compile_cache=", f"--config.train.num_steps={num_steps}",
          f"--config.train.init_from={init_from}", *[f"--config.{k}={v}" for k, v in OVERRIDES.items()]]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=XLA_FLAGS)
  if processes == 1:
    envs = [dict(env, XLA_FLAGS=f"{XLA_FLAGS} --xla_force_host_platform_device_count=2")]
  else:
    coordinator = f"localhost:{_free_port()}"
    envs = [dict(env, JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES=str(processes),
                 JAX_PROCESS_ID=str(i)) for i in range(processes)]
  out = []
  for i, e in enumerate(envs):
    log = pathlib.Path(f"{log_prefix}.{i}.log")
    with open(log, "w") as f:  # a file, not a pipe: it can never fill up
      out.append((subprocess.Popen(args, env=e, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT), log))
  return out


def _wait(procs) -> list[str]:
  """Waits for every process; their logs (the test fails with the tails of failed ones)."""
  try:
    codes = [p.wait(timeout=900) for p, _ in procs]
  finally:
    for p, _ in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  logs = [log.read_text() for _, log in procs]
  bad = [f"{log}:\n{text[-3000:]}" for (_, log), text, rc in zip(procs, logs, codes) if rc]
  assert not bad, "\n".join(bad)
  return logs


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_codec_dir):
  """(2-process workdir, 1-process workdir, logs of the 2-process run's first and second part)."""
  root = tmp_path_factory.mktemp("multiprocess")
  two, one = root / "two_processes", root / "one_process"
  first = _wait(_launch(two, STOP, 2, tiny_codec_dir, root / "two_first"))
  # The reference compiles alongside the resumed run (whose process 0 loads the
  # step from the compile cache; process 1 compiles it: see runtime.sync_processes).
  procs = (_launch(one, STEPS, 1, tiny_codec_dir, root / "one")
           + _launch(two, STEPS, 2, tiny_codec_dir, root / "two_resumed"))
  second = _wait(procs)[1:]
  return two, one, first, second


def _rows(workdir) -> list[dict]:
  """metrics.jsonl without the timing column."""
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [{k: v for k, v in r.items() if k != "train/steps_per_sec"} for r in rows]


def _opt_state(workdir, params, step):
  """The saved optimizer state, restored onto this process's one device."""
  tx = train_lib.make_optimizer(_config().optim)
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev),
                        jax.eval_shape(tx.init, params))
  with ckpt.train_manager(workdir, keep=100) as m:
    return ckpt.restore_step(m, step, {"opt_state": target})[0]["opt_state"]


def _assert_trees_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) and sum(np.size(x) for x in la) > 1000
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_two_processes_equal_one(runs):
  """Losses, drawn bitrates, gradient norms, params and Adam state: identical at every step."""
  two, one, _, _ = runs
  a, b = _rows(two), _rows(one)
  assert [r["step"] for r in b] == list(range(1, STEPS + 1))
  assert a == b  # every logged number: loss terms, num_streams, grad norm, lr
  assert [r["train/pretrain"] for r in a] == [1, 1, 0, 0] and a[2]["train/cb_loss"] > 0
  for step in (STOP, STEPS):
    pa, pb = esc_jax.load(two, step=step).params, esc_jax.load(one, step=step).params
    _assert_trees_equal(pa, pb)
    _assert_trees_equal(_opt_state(two, pa, step), _opt_state(one, pb, step))
  moved = [np.max(np.abs(np.asarray(x) - np.asarray(y))) for x, y in zip(
      jax.tree.leaves(esc_jax.load(two, step=STOP).params), jax.tree.leaves(esc_jax.load(two).params))]
  assert max(moved) > 1e-3  # steps 3-4 changed the params (the comparison is not vacuous)


def test_shared_workdir_and_resume(runs, tiny_codec_dir):
  """One workdir: process 0 logs, orbax writes complete steps, the rerun resumes at step 2."""
  two, _, first, second = runs
  for logs in (first, second):
    assert "(process 0 of 2)" in logs[0] and "(process 1 of 2)" in logs[1]
    assert "train:" in logs[0] and "train:" not in logs[1]  # the progress bar: process 0 only
  assert all(f"resumed {two} at step {STOP}" in log for log in second)
  assert all(f"initialised from {tiny_codec_dir}" in log and "resumed" not in log for log in first)
  # metrics.jsonl: one row per step (process 1 writes none; the rerun appended steps 3-4).
  assert [r["step"] for r in _rows(two)] == list(range(1, STEPS + 1))
  assert ckpt.read_codec_config(two) == ckpt.codec_config(_config().model, _config().model_name)
  assert json.loads((two / "config.json").read_text())["data"]["num_workers"] == 0
  with ocp.CheckpointManager(two / ckpt.CKPT_DIR) as m:
    assert m.all_steps() == [STOP, STEPS]
  for step in (STOP, STEPS):  # complete: every item there (orbax commits a step once all wrote)
    assert {p.name for p in (two / ckpt.CKPT_DIR / str(step)).iterdir() if p.is_dir()} == {
        "params", "opt_state", "meta"}
  left = sorted(p.name for p in two.iterdir() if p.name.startswith(".") and not p.name.startswith(".train_lock"))
  assert left == []  # no temporary files
  assert sorted(p.name for p in two.iterdir() if p.name.startswith(".train_lock")) == [
      ".train_lock.0", ".train_lock.1"]
