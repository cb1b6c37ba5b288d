"""Process-wide CPU settings that make XLA:CPU runs of ESC faster.

  from esc_jax import runtime
  runtime.configure_cpu()   # first thing in a script: before the first JAX computation

XLA:CPU allocates each executable's temporaries (~6 GB for an ESC-Base train
step at batch 4) with malloc, which hands blocks this large to fresh `mmap`s
and returns them at `free`: every step then page-faults its whole working set
in again (1.5M faults, ~20% of the step's CPU time in the kernel on 2 cores).
`configure_cpu` makes glibc keep freed memory for reuse instead. The cost:
the process keeps its peak heap size until it exits.

Model code never calls this; scripts opt in (train, benchmarks, long CLI runs).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import warnings

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def _backend_started() -> bool:
  xb = sys.modules.get("jax._src.xla_bridge")
  return bool(xb is not None and getattr(xb, "_backends", None))


def keep_freed_memory() -> bool:
  """glibc: serve large blocks from one heap that is never trimmed. Returns False where unsupported.

  One arena (XLA's worker threads would otherwise get per-thread arenas, which
  always `mmap` blocks over 64 MB), no `mmap`ed blocks, no trimming.
  """
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not glibc (e.g. musl)
    return False
  mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  return all(mallopt(p, v) == 1 for p, v in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))


def add_xla_flags(*flags: str) -> None:
  """Append flags to XLA_FLAGS unless a flag of the same name is already set there."""
  current = os.environ.get("XLA_FLAGS", "").split()
  names = {f.split("=")[0] for f in current}
  os.environ["XLA_FLAGS"] = " ".join(current + [f for f in flags if f.split("=")[0] not in names])


def configure_cpu(malloc: bool = True, xla_flags: tuple[str, ...] = ()) -> dict:
  """Apply the CPU settings; call before the first JAX computation (they act at backend start).

  Args:
    malloc: keep freed memory for reuse (`keep_freed_memory`).
    xla_flags: extra XLA_FLAGS entries (flags the user already set win).
  Returns: dict of what was applied.
  """
  if _backend_started():
    warnings.warn("esc_jax.runtime.configure_cpu() called after JAX started its backend: "
                  "XLA flags and the allocator settings of its threads no longer take effect")
  add_xla_flags(*xla_flags)
  return dict(malloc=keep_freed_memory() if malloc else False, xla_flags=os.environ.get("XLA_FLAGS", ""))
