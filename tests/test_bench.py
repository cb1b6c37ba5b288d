"""The bench scripts' pure functions (each in a subprocess: the benches define absl flags
of their own): bench_gpu.py's trace summary on a synthetic GPU trace and its peak rows,
bench_train.py's XLA:CPU step breakdown on a synthetic trace and HLO text."""
from __future__ import annotations

import gzip
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).absolute().parents[1]


def _gpu_trace(path: pathlib.Path) -> None:
  """Two steps: per step a 3 us gemm, a 1 us cuBLAS nvjet gemm and two 1 us fusions on the
  compute stream; the "XLA Ops" line and the host repeat them and must not count."""
  meta = [dict(ph="M", pid=1, name="process_name", args=dict(name="/device:GPU:0")),
          dict(ph="M", pid=1, name="process_sort_index", args=dict(sort_index=1)),
          dict(ph="M", pid=1, tid=7, name="thread_name", args=dict(name="Stream #7(Compute)")),
          dict(ph="M", pid=1, tid=8, name="thread_name", args=dict(name="XLA Ops")),
          dict(ph="M", pid=2, name="process_name", args=dict(name="/host:CPU")),
          dict(ph="M", pid=2, tid=1, name="thread_name", args=dict(name="python"))]
  events = []
  for step in range(2):
    t = 100.0 * step
    for name, dur in (("sm90_xmma_gemm_f32", 3.0), ("nvjet_sm90_tst_32x64_bz_NTN", 1.0),
                      ("loop_add_fusion", 1.0), ("input_reduce_fusion", 1.0)):
      for pid, tid in ((1, 7), (1, 8), (2, 1)):
        events.append(dict(ph="X", pid=pid, tid=tid, name=name, ts=t, dur=dur))
      t += dur
  _write_trace(path, meta + events)


def _write_trace(path: pathlib.Path, events: list) -> None:
  path.parent.mkdir(parents=True)
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": events}, f)


def _bench(module: str, expression: str) -> str:
  """stdout of printing `expression` with bench/`module` imported."""
  code = f"import sys; sys.argv = ['x']; import {module}; print({expression})"
  return subprocess.run([sys.executable, "-c", code], cwd=ROOT / "bench", capture_output=True, text=True,
                        timeout=300, check=True).stdout


def test_kernel_summary_counts_the_stream_lines(tmp_path):
  _gpu_trace(tmp_path / "plugins" / "profile" / "2026_11_26" / "vm.trace.json.gz")
  out = _bench("bench_gpu", f"bench_gpu.kernel_summary({str(tmp_path)!r}, steps=2, step_s=10e-6)")
  head, *rows = out.strip().splitlines()
  # 4 kernels and 6 us of kernel time per step, against a 10 us step; the two gemms are 67% of it.
  assert head.startswith("trace: 4 kernels per step, 0.0 ms of kernel time per step (60% of the 0.0 ms step), "
                         "67% of it in matmul/convolution calls")
  assert [r.split()[-1] for r in rows] == ["sm90_xmma_gemm_f32", "nvjet_sm90_tst_32x64_bz_NTN", "loop_add_fusion",
                                           "input_reduce_fusion"]
  assert rows[0].split()[2] == "50.0%" and rows[0].split()[3] == "1x"
  assert (tmp_path / "train_step.trace.json.gz").is_file()  # the flat copy


def test_read_peaks_inverts_the_peak_rows(tmp_path):
  rows = tmp_path / "rows.jsonl"
  rows.write_text("\n".join(json.dumps(r) for r in (
      dict(work="peak", setting="matmul f32 (default prec.)", value=352.5, unit="TFLOP/s"),
      dict(work="train_step", dtype="float32", batch=36, s_per_step=0.1),
      dict(work="peak", setting="device copy (r + w)", value=2847.0, unit="GB/s"))) + "\n\n")
  out = _bench("bench_gpu", f"sorted(bench_gpu.read_peaks({str(rows)!r}).items())")
  assert out.strip() == str([("copy", 2847.0e9), ("float32", 352.5e12)])


HLO = """\
ENTRY %main.1 (p: f32[4]) -> f32[4] {
  %ffi_call.3 = f32[4]{0} custom-call(%p), custom_call_target="esc_swin_block_bwd", metadata={op_name="jit(step_fn)/transpose(jvp(ESC))/ESC._analyse/encoder/blocks_0/swint_blocks_1/ffi_call"}
  %ynn_fusion.2 = f32[4]{0} fusion(%p), kind=kCustom, calls=%c, metadata={op_name="jit(step_fn)/transpose(jvp(ESC))/ESC.cross_scale/decoder.up/blocks_0/swint_blocks_1/mlp/linear_1/dot_general"}
  %ynn_fusion.7 = f32[4]{0} fusion(%p), kind=kCustom, calls=%c, metadata={op_name="jit(step_fn)/jvp(ESC)/ESC.cross_scale/decoder.up/blocks_1/swint_blocks_0/mlp/linear_2/dot_general"}
  %fusion.1 = f32[4]{0} fusion(%p), kind=kLoop, calls=%d, metadata={op_name="jit(step_fn)/jvp(ESC)/ESC.cross_scale/decoder.up/blocks_1/swint_blocks_0/norm1/add"}
  ROOT %add.9 = f32[4]{0} add(%p, %p)
}
"""


def _cpu_trace(path: pathlib.Path) -> None:
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
  _write_trace(path, meta + events)


def test_cpu_step_breakdown_groups_thunks_by_kernel_module_and_direction(tmp_path):
  _cpu_trace(tmp_path / "plugins" / "profile" / "2026_11_27" / "vm.trace.json.gz")
  out = _bench("bench_train", f"bench_train.cpu_step_breakdown({str(tmp_path)!r}, {HLO!r}, steps=2, step_s=0.1)")
  lines = out.strip().splitlines()
  assert lines[0].startswith("XLA:CPU thunks: 48 ms per step of the 100 ms step")
  rows = [" ".join(line.split()) for line in lines[1:]]
  assert rows == [
      "30.0 ms 30.0% 1x custom call esc_swin_block_bwd",
      "10.0 ms 10.0% 1x backward ESC.cross_scale/decoder.up/blocks_i/swint_blocks_i [library]",
      "5.0 ms 5.0% 1x forward ESC.cross_scale/decoder.up/blocks_i/swint_blocks_i [library]",
      "2.0 ms 2.0% 1x forward ESC.cross_scale/decoder.up/blocks_i/swint_blocks_i",
      "1.0 ms 1.0% 1x forward (top level)",
  ], rows


def test_fma_peak_runs_the_c_program_or_says_there_is_no_compiler(monkeypatch):
  gflops = float(_bench("bench", "bench.fma_peak(1)"))
  assert 1 < gflops < 1e4  # one core: a few to a few hundred GFLOP/s
  monkeypatch.setenv("CC", "false")  # a "compiler" that fails
  assert _bench("bench", "bench.fma_peak(1)").strip() == "None"


def test_rounds_merge_to_the_median_row_and_paired_ratios():
  """bench.py --rounds: per row, the round with the median time, the median of the original's
  times and of the per-round ratios (each ours / original pair measured back to back), and
  their range; rows without a time or an original pass through."""
  rounds = [[dict(work="infer", audio_s=10, streams=6, s=s, original_s=o),
             dict(work="train_step", batch=4, s_per_step=t, original_s=2 * t + d),
             dict(work="data_pipeline", clips_per_s=c)]
            for s, o, t, d, c in ((1.0, 2.0, 4.0, 0.0, 10), (2.0, 5.0, 5.0, 1.0, 20), (1.5, 3.6, 6.0, 6.0, 30))]
  out = json.loads(_bench("bench", f"__import__('json').dumps(bench.merge_rounds({rounds!r}))"))
  infer, train, data = out
  assert (infer["s"], infer["original_s"], infer["rounds"]) == (1.5, 3.6, 3)
  assert (infer["ratio"], infer["ratio_min"], infer["ratio_max"]) == (2.4, 2.0, 2.5)
  assert (train["s_per_step"], train["original_s"], train["ratio"]) == (5.0, 11.0, 2.2)
  assert (train["ratio_min"], train["ratio_max"]) == (2.0, 3.0)
  assert data == rounds[0][2]
  rows = [dict(work="infer", audio_s=60, streams=1), dict(work="train_step", batch=4),
          dict(work="train_step", batch=36), dict(work="infer_chunked", audio_s=60)]
  keys = _bench("bench", f"[bench.reference_key(r) for r in {rows!r}]")
  assert keys.strip() == "[('infer', 60, 1), ('train_step', 3, 4), None, None]"
