"""bench/bench_gpu.py's trace summary on a synthetic GPU trace (a subprocess: the bench
defines absl flags of its own)."""
from __future__ import annotations

import gzip
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).absolute().parents[1]


def _trace(path: pathlib.Path) -> None:
  """Two steps: per step a 3 us gemm, a 1 us cuBLAS nvjet gemm and two 1 us fusions on the
  compute stream; the
  "XLA Ops" line and the host repeat them and must not count."""
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
  path.parent.mkdir(parents=True)
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": meta + events}, f)


def test_kernel_summary_counts_the_stream_lines(tmp_path):
  _trace(tmp_path / "plugins" / "profile" / "2026_11_26" / "vm.trace.json.gz")
  code = ("import sys; sys.argv = ['x']; import bench_gpu; "
          f"print(bench_gpu.kernel_summary({str(tmp_path)!r}, steps=2, step_s=10e-6))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "bench", capture_output=True, text=True,
                       timeout=300, check=True).stdout
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
  code = ("import sys; sys.argv = ['x']; import bench_gpu; "
          f"print(sorted(bench_gpu.read_peaks({str(rows)!r}).items()))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "bench", capture_output=True, text=True,
                       timeout=300, check=True).stdout
  assert out.strip() == str([("copy", 2847.0e9), ("float32", 352.5e12)])
