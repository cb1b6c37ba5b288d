"""bench/bench_train.py's XLA:CPU step breakdown on a synthetic trace and HLO text (a
subprocess: the bench defines absl flags of its own)."""
from __future__ import annotations

import gzip
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).absolute().parents[1]

HLO = """\
ENTRY %main.1 (p: f32[4]) -> f32[4] {
  %ffi_call.3 = f32[4]{0} custom-call(%p), custom_call_target="esc_swin_block_bwd", metadata={op_name="jit(step_fn)/transpose(jvp(ESC))/ESC._analyse/encoder/blocks_0/swint_blocks_1/ffi_call"}
  %ynn_fusion.2 = f32[4]{0} fusion(%p), kind=kCustom, calls=%c, metadata={op_name="jit(step_fn)/transpose(jvp(ESC))/ESC.cross_scale/decoder.up/blocks_0/swint_blocks_1/mlp/linear_1/dot_general"}
  %ynn_fusion.7 = f32[4]{0} fusion(%p), kind=kCustom, calls=%c, metadata={op_name="jit(step_fn)/jvp(ESC)/ESC.cross_scale/decoder.up/blocks_1/swint_blocks_0/mlp/linear_2/dot_general"}
  %fusion.1 = f32[4]{0} fusion(%p), kind=kLoop, calls=%d, metadata={op_name="jit(step_fn)/jvp(ESC)/ESC.cross_scale/decoder.up/blocks_1/swint_blocks_0/norm1/add"}
  ROOT %add.9 = f32[4]{0} add(%p, %p)
}
"""


def _trace(path: pathlib.Path) -> None:
  """Two steps on two XLA worker threads (plus the executor's own spans and the python
  thread, which must not count): per step the backward kernel 30 ms, the two library
  matmuls 10 + 5 ms, the loop fusion 2 ms, the un-annotated add 1 ms (trace times are us)."""
  meta = [dict(ph="M", pid=1, name="process_name", args=dict(name="/host:CPU")),
          dict(ph="M", pid=1, tid=1, name="thread_name", args=dict(name="tf_XLAEigen/1")),
          dict(ph="M", pid=1, tid=2, name="thread_name", args=dict(name="tf_XLAEigen/2")),
          dict(ph="M", pid=1, tid=3, name="thread_name", args=dict(name="python"))]
  events = []
  for step in range(2):
    t = 100e3 * step
    events.append(dict(ph="X", pid=1, tid=1, name="ThunkExecutor::Execute", ts=t, dur=50e3))
    events.append(dict(ph="X", pid=1, tid=3, name="ffi_call.3", ts=t, dur=30e3))
    for tid, name, ms in ((1, "ffi_call.3", 30), (2, "ynn_fusion.2", 10), (2, "ynn_fusion.7", 5),
                          (1, "fusion.1", 2), (2, "add.9", 1)):
      events.append(dict(ph="X", pid=1, tid=tid, name=name, ts=t, dur=ms * 1e3))
      t += ms * 1e3
  path.parent.mkdir(parents=True)
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": meta + events}, f)


def test_cpu_step_breakdown_groups_thunks_by_kernel_module_and_direction(tmp_path):
  _trace(tmp_path / "plugins" / "profile" / "2026_11_27" / "vm.trace.json.gz")
  code = ("import sys; sys.argv = ['x']; import bench_train; "
          f"print(bench_train.cpu_step_breakdown({str(tmp_path)!r}, {HLO!r}, steps=2, step_s=0.1))")
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "bench", capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  lines = r.stdout.strip().splitlines()
  assert lines[0].startswith("XLA:CPU thunks: 48 ms per step of the 100 ms step")
  rows = [" ".join(line.split()) for line in lines[1:]]
  assert rows == [
      "30.0 ms 30.0% 1x custom call esc_swin_block_bwd",
      "10.0 ms 10.0% 1x backward ESC.cross_scale/decoder.up/blocks_i/swint_blocks_i [library]",
      "5.0 ms 5.0% 1x forward ESC.cross_scale/decoder.up/blocks_i/swint_blocks_i [library]",
      "2.0 ms 2.0% 1x forward ESC.cross_scale/decoder.up/blocks_i/swint_blocks_i",
      "1.0 ms 1.0% 1x forward (top level)",
  ], rows
