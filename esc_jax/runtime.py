"""Process set-up shared by the command-line programs: compile cache and multi-process JAX.

Call these before any computation (they configure JAX, not the model).
"""
from __future__ import annotations

import itertools
import os

CACHE_ENV = "ESC_JAX_CACHE"  # folder of the persistent compile cache; "0"/"off"/"" disables it


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
