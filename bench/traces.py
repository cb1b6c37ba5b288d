"""jax.profiler traces as the bench scripts read them (bench_gpu.py, bench_train.py)."""
from __future__ import annotations

import glob
import gzip
import json
import os


def newest(trace_dir: str) -> str | None:
  """The newest `*.trace.json.gz` that jax.profiler wrote under `trace_dir`, or None."""
  files = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.trace.json.gz")),
                 key=os.path.getmtime)
  return files[-1] if files else None


def events(path: str) -> list:
  """The trace's events (Chrome trace format)."""
  with gzip.open(path) as f:
    return json.load(f)["traceEvents"]


def xla_cpu_thunks(trace_events: list) -> list:
  """XLA:CPU's thunks: the complete events on XLA's worker threads, without the executor
  spans around them (names with '::')."""
  workers = {(e["pid"], e.get("tid")) for e in trace_events
             if e.get("ph") == "M" and e.get("name") == "thread_name" and "XLA" in e["args"]["name"]}
  return [e for e in trace_events
          if e.get("ph") == "X" and (e["pid"], e.get("tid")) in workers and "::" not in e["name"]]
