"""Process set-up shared by the command-line programs: host allocator, compile cache and
multi-process JAX.

Call these before any computation (they configure the process and JAX, not the model).
"""
from __future__ import annotations

import ctypes.util
import glob
import itertools
import os
import platform
import sys

CACHE_ENV = "ESC_JAX_CACHE"  # folder of the persistent compile cache; "0"/"off"/"" disables it
MALLOC_ENV = "ESC_JAX_MALLOC"  # "tcmalloc" (default), "system", or the path of a malloc library
_PRELOADED_ENV = "ESC_JAX_MALLOC_PRELOADED"  # set in the re-executed process
_TCMALLOC = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so")


def find_tcmalloc() -> str | None:
  """The path (or soname) of an installed tcmalloc, e.g. Debian's libtcmalloc-minimal4; else None."""
  dirs = [os.path.join(sys.prefix, "lib"), "/usr/local/lib", "/usr/lib64", "/usr/lib"]
  dirs += glob.glob("/usr/lib/*-linux-gnu")
  for name in _TCMALLOC:
    for d in dirs:
      if os.path.isfile(os.path.join(d, name)):
        return os.path.join(d, name)
  return ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")


def _mapped(lib: str) -> bool:
  """Whether a library of `lib`'s file name is loaded in this process (Linux)."""
  try:
    with open("/proc/self/maps") as f:
      return os.path.basename(lib) in f.read()
  except OSError:
    return False


def preload_allocator() -> bool:
  """Restarts this program with tcmalloc preloaded (LD_PRELOAD), if installed and not loaded yet.

  XLA:CPU mallocs every call's buffers: an ESC-Base train step (batch 4 x 3 s)
  takes one ~5.5 GB block of temporaries, 60 s of encode + decode ~24 GB in
  all. glibc serves blocks that large with fresh `mmap`s and unmaps them on
  `free`, so each call page-faults its whole working set back in, 4 KiB at a
  time, zero-filled by the kernel: ~1.4 M faults and ~2 s of system CPU per
  train step (glibc's `mallopt` cannot fix it: with `mmap` off, blocks from
  XLA's worker threads still get one, and one shared arena slows every
  `malloc` after a compile). tcmalloc keeps freed pages for reuse: the train
  step takes ~30% less time, 60 s of encode + decode ~30% less, and the peak
  RSS is no higher. PyTorch's CPU launcher, `torch.backends.xeon.run_cpu`,
  offers the same preload. (Some processes still fault: a one-off ~5.6 GB
  after which RSS stays at twice the usual, or ~0.47 M pages on every train
  step at the old speed; the cause is not known yet.)

  Call it first thing in a program's main: it re-executes the same command
  line, so nothing done before is kept. $ESC_JAX_MALLOC: "tcmalloc" (default),
  "system" (do nothing) or the path of another malloc library to preload. It
  returns (False) only where it does not restart: no tcmalloc installed
  (`apt install libtcmalloc-minimal4`), not Linux, already preloaded, or the
  restart failed; the program then goes on with the allocator it has.
  """
  choice = os.environ.get(MALLOC_ENV, "tcmalloc").strip()
  if choice.lower() in ("", "0", "off", "none", "system") or platform.system() != "Linux":
    return False
  if os.environ.get(_PRELOADED_ENV) or not sys.argv or sys.argv[0] in ("", "-"):
    return False  # restarted already, or a program read from stdin (cannot be read again)
  lib = find_tcmalloc() if choice.lower() == "tcmalloc" else choice
  if not lib or _mapped(lib) or os.sep in lib and not os.path.isfile(lib):
    return False
  env = dict(os.environ, LD_PRELOAD=" ".join(filter(None, [lib, os.environ.get("LD_PRELOAD", "")])))
  env[_PRELOADED_ENV] = lib
  env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))  # no notice per big block
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
  except OSError:
    pass
  return False


def preloaded_allocator() -> str | None:
  """The malloc library this process runs with: the one `preload_allocator` restarted it
  with, else a tcmalloc preloaded by hand (its file name); None for the system malloc."""
  return os.environ.get(_PRELOADED_ENV) or next((n for n in _TCMALLOC if _mapped(n)), None)


def default_cache_dir() -> str | None:
  """$ESC_JAX_CACHE, else $XDG_CACHE_HOME/esc_jax/xla (~/.cache/esc_jax/xla); None if disabled."""
  path = os.environ.get(CACHE_ENV)
  if path is None:
    path = user_cache_dir("xla")
  return None if _disabled(path) else path


def user_cache_dir(name: str) -> str:
  """$XDG_CACHE_HOME/esc_jax/NAME (default ~/.cache/esc_jax/NAME)."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "esc_jax", name)


def _disabled(path: str) -> bool:
  return path.strip().lower() in ("", "0", "off", "none")


def enable_compile_cache(path: str | None = "default") -> str | None:
  """Turns on JAX's persistent compilation cache in `path` ("default": `default_cache_dir()`;
  None, "", "0", "off" or "none": off).

  Reruns and resumes then load compiled programs instead of compiling them
  (the ESC-Base train step compiles in ~1 min on 2 CPU cores). Returns the
  folder used, or None (disabled, or the folder cannot be created).
  """
  if path == "default":
    path = default_cache_dir()
  if not path or _disabled(path):
    return None
  try:
    os.makedirs(path, exist_ok=True)
  except OSError:
    return None
  import jax
  jax.config.update("jax_compilation_cache_dir", path)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # else JAX's own setting stands
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  return path


def gpu_gemm_flags(compute_dtype: str) -> bool:
  """For bfloat16 compute, adds `--xla_gpu_enable_triton_gemm=false` to XLA_FLAGS (cuBLAS
  matmuls instead of autotuned Triton ones) unless XLA_FLAGS already sets that flag.

  On an H200 with jax 0.11.2, XLA:GPU had not compiled the bfloat16 ESC-Base train
  step after 5 min with Triton matmuls; without them it compiled in ~95 s. Other
  platforms ignore the flag. Call before JAX starts its backends. Returns whether
  it was added.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if compute_dtype != "bfloat16" or "xla_gpu_enable_triton_gemm" in flags:
    return False
  os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_enable_triton_gemm=false".strip()
  return True


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
