"""Process set-up shared by the command-line programs: host allocator, compile cache and
multi-process JAX.

Call these before any computation (they configure the process and JAX, not the model).
"""
from __future__ import annotations

import ctypes
import itertools
import os
import platform

CACHE_ENV = "ESC_JAX_CACHE"  # folder of the persistent compile cache; "0"/"off"/"" disables it
MALLOC_ENV = "ESC_JAX_KEEP_HOST_MEMORY"  # "0"/"off" leaves glibc's malloc settings alone

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_host_memory() -> bool:
  """Makes glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

  XLA:CPU mallocs every call's buffers: an ESC-Base train step (batch 4 x 3 s)
  takes ~5.5 GB of temporaries, 60 s of encode + decode ~24 GB over its
  programs. glibc serves such blocks with fresh `mmap`s (always, from the
  per-thread arenas XLA's worker threads use) and unmaps them on `free`, so each
  call page-faults its whole working set back in, 4 KiB at a time, zero-filled
  by the kernel: ~1.4 M faults and ~2 s of system CPU per train step. With one
  arena, no `mmap` and no trimming, later calls reuse the pages of the first:
  the train step takes ~17% less time, 60 s of encode + decode ~28% less.

  The cost: the process keeps its peak heap (RSS does not shrink between
  calls) and its threads share one malloc arena. Applies to Linux with glibc;
  elsewhere, or with $ESC_JAX_KEEP_HOST_MEMORY=0, it does nothing. Call it
  before the first JAX computation (threads that already have an arena keep
  it). Returns whether the settings were applied.
  """
  if os.environ.get(MALLOC_ENV, "1").strip().lower() in ("0", "off", "false", "no"):
    return False
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  try:
    mallopt = ctypes.CDLL("libc.so.6").mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  # -1 is SIZE_MAX as a trim threshold: never give the top of the heap back.
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
  if not all([mallopt(param, value) == 1 for param, value in settings]):
    return False
  import jax
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  return True


def default_cache_dir() -> str | None:
  """$ESC_JAX_CACHE, else $XDG_CACHE_HOME/esc_jax/xla (~/.cache/esc_jax/xla); None if disabled."""
  path = os.environ.get(CACHE_ENV)
  if path is None:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(base, "esc_jax", "xla")
  return None if path.strip().lower() in ("", "0", "off", "none") else path


def enable_compile_cache(path: str | None = "default") -> str | None:
  """Turns on JAX's persistent compilation cache in `path` ("default": `default_cache_dir()`).

  Reruns and resumes then load compiled programs instead of compiling them
  (the ESC-Base train step compiles in ~1 min on 2 CPU cores). Returns the
  folder used, or None (disabled, or the folder cannot be created).
  """
  if path == "default":
    path = default_cache_dir()
  if not path:
    return None
  try:
    os.makedirs(path, exist_ok=True)
  except OSError:
    return None
  import jax
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  return path


def maybe_initialize_distributed() -> bool:
  """`jax.distributed.initialize()` when a multi-process launch is detected.

  Explicit: JAX_COORDINATOR_ADDRESS (host:port) with JAX_NUM_PROCESSES and
  JAX_PROCESS_ID. Auto-detected by JAX: SLURM (SLURM_NTASKS > 1) and Open MPI
  (OMPI_COMM_WORLD_SIZE > 1). Call before any other JAX use. Returns whether it ran.

  It also selects gloo for cross-process collectives on the CPU backend (the
  default of recent jaxlib; older versions have none).
  """
  env = os.environ
  import jax
  kw = {}
  if env.get("JAX_COORDINATOR_ADDRESS"):
    kw["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
    if env.get("JAX_NUM_PROCESSES"):
      kw["num_processes"] = int(env["JAX_NUM_PROCESSES"])
    if env.get("JAX_PROCESS_ID"):
      kw["process_id"] = int(env["JAX_PROCESS_ID"])
  elif int(env.get("SLURM_NTASKS", "1")) <= 1 and int(env.get("OMPI_COMM_WORLD_SIZE", "1")) <= 1:
    return False
  if jax.config.values.get("jax_cpu_collectives_implementation", "gloo") in (None, "none"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kw)
  return True


_barriers = itertools.count()


def sync_processes(name: str, timeout_s: int = 3600) -> None:
  """Blocks until every process has called `sync_processes` with this `name` (no-op for one).

  A barrier of the jax.distributed coordination service, not a collective. The
  CPU backend's gloo collectives give up when a peer joins the first collective
  more than 30 s late, which happens when some processes load a program from
  the persistent compile cache and others compile it: JAX writes cache entries
  from process 0 only, and on CPU the other processes' cache keys differ.
  """
  import jax
  if jax.process_count() == 1:
    return
  from jax._src import distributed
  name = f"esc_jax/{name}/{next(_barriers)}"
  if distributed.global_state.client is None:  # processes without jax.distributed (TPU pod slices)
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
  else:
    distributed.global_state.client.wait_at_barrier(name, timeout_s * 1000)
