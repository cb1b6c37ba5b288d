"""Fused CPU kernels (XLA FFI custom calls), compiled from C++ on first use.

`swin_block.cc` runs a whole Swin block's forward, and its backward, per 4 x 4
window (see its header); `dense.cc` runs wide dense layers 16 rows at a time (`dense`),
`conv.cc` the de-embedding's convolution 16 columns at a time (`conv_same`); `simd.h`
holds what they share. They are built into one library once per machine
with the system C++ compiler (`$CXX`, else `c++`; extra flags from
`$ESC_JAX_KERNEL_CXXFLAGS`) into `$ESC_JAX_KERNEL_CACHE` (default
`~/.cache/esc_jax/kernels`), keyed by the sources, the flags, jaxlib's version and
the CPU's instruction sets, then loaded with ctypes and registered with XLA. When
JAX's default backend is not the CPU, without a compiler, or with
`ESC_JAX_CPU_KERNELS=0`, nothing is built and the model runs as plain XLA (the
same results within float32 rounding, ~2x slower Swin blocks on CPU). The kernels are
written for x86-64 with AVX-512, or AVX2 and FMA; other CPUs (e.g. ARM) run plain XLA.
"""
from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import subprocess
import tempfile
import warnings

import jax
import jax.extend.backend
import jax.numpy as jnp
import numpy as np

from esc_jax import runtime

_DIR = pathlib.Path(__file__).parent
_SOURCES = (_DIR / "swin_block.cc", _DIR / "dense.cc", _DIR / "conv.cc")  # compiled, with _DIR / "simd.h" included
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
# With GCC: scheduling before register allocation (off by default on x86), register
# pressure in mind. The same results; encode + decode of 10 s ~3% faster on the AVX2
# machine (in-process A/Bs, 22 of 32 pairs), the train step unchanged.
_GCC_FLAGS = ("-fschedule-insns", "-fsched-pressure")
SWIN_BLOCK_TARGET = "esc_swin_block_fwd"
SWIN_BLOCK_GRAD_TARGET = "esc_swin_block_bwd"
DENSE_TARGET = "esc_dense"
CONV_TARGET = "esc_conv"
# Weights (float32 bytes) from which `dense` runs a layer as the kernel rather than XLA's
# dot: ESC-Base's bottleneck blocks (C = 384, 0.6-2.4 MB). On AVX2 (Zen 3, 2 cores) in the
# encode + decode program XLA's dot ran these at 90-115 GFLOP/s, the kernel at 115-145.
DENSE_MIN_WEIGHT_BYTES = 1 << 19


def _env_off(name: str) -> bool:
  """Whether environment variable `name` (on when unset) is set to 0 / off / false / no / empty."""
  return os.environ.get(name, "1").strip().lower() in ("0", "off", "false", "no", "")


def _disabled() -> bool:
  return _env_off("ESC_JAX_CPU_KERNELS")


@functools.lru_cache(maxsize=None)
def _cpu_features() -> str:
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith(("flags", "Features")):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def isa_supported(features: str) -> bool:
  """Whether a CPU with these /proc/cpuinfo flags can run the kernels."""
  flags = set(features.split())
  return platform.machine().lower() in ("x86_64", "amd64") and ("avx512f" in flags or {"avx2", "fma"} <= flags)


def has_avx512() -> bool:
  """Whether this CPU has AVX-512, which the kernels' default build uses (else AVX2)."""
  return "avx512f" in _cpu_features().split()


def _cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("ESC_JAX_KERNEL_CACHE") or runtime.user_cache_dir("kernels"))


def _build() -> pathlib.Path:
  """The compiled library's path, compiling it first if this machine has none yet."""
  cxx = os.environ.get("CXX", "c++")
  version = subprocess.run([cxx, "--version"], check=True, capture_output=True, text=True, timeout=60).stdout
  gcc = "Free Software Foundation" in version and "clang" not in version.lower()
  flags = [*_FLAGS, *(_GCC_FLAGS if gcc else ()), *os.environ.get("ESC_JAX_KERNEL_CXXFLAGS", "").split()]
  key = hashlib.sha256("\0".join(
      [*(f.read_text() for f in (*_SOURCES, _DIR / "simd.h")), cxx, version, *flags, jax.lib.__version__,
       platform.machine(), _cpu_features()]
  ).encode()).hexdigest()[:16]
  out = _cache_dir() / f"kernels-{key}.so"
  if out.exists():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
  os.close(fd)
  try:
    subprocess.run([cxx, *flags, f"-I{jax.ffi.include_dir()}", *map(str, _SOURCES), "-o", tmp],
                   check=True, capture_output=True, text=True, timeout=300)
    os.chmod(tmp, 0o755)  # mkstemp's 0600 would keep other users of a shared cache out
    os.replace(tmp, out)  # atomic: concurrent builders each rename a complete file
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return out


_off = contextvars.ContextVar("esc_jax_kernels_off", default=False)  # inside `disabled()`


@contextlib.contextmanager
def disabled():
  """Model code traced inside this block (in this thread / context) takes the plain XLA
  path: e.g. to count a program's FLOP with XLA's cost analysis, which sees no work in a
  custom call. Trace a new function here: `jax.jit` reuses a function's earlier traces."""
  token = _off.set(True)
  try:
    yield
  finally:
    _off.reset(token)


def on_cpu(*args, cpu, default):
  """`jax.lax.platform_dependent(*args, cpu=cpu, default=default)`, tracing only `cpu`
  where the CPU is JAX's only backend. platform_dependent traces every branch and the
  lowering keeps one, so for the Swin blocks (kernels on CPU, XLA elsewhere) it traced
  each block twice: ~30% of the time to trace the tiny model's train step. Inside
  `disabled()` both are traced as before: for a program lowered for another platform
  than the process's (`jax.export` from a CPU-only process)."""
  if cpu_only():
    return cpu(*args)
  return jax.lax.platform_dependent(*args, cpu=cpu, default=default)


def keeps_activations() -> bool:
  """Whether a differentiated Swin block's forward kernel keeps qkv and fc1's output for
  the backward kernel, which then reads instead of recomputing them: the train step ~5%
  faster for ~0.3 GB more step memory per 3 s ESC-Base clip. Where the CPU is the only
  backend, unless `ESC_JAX_CPU_KERNEL_KEEP=0`."""
  return cpu_only() and not _env_off("ESC_JAX_CPU_KERNEL_KEEP")


def cpu_only() -> bool:
  """Whether code traced now runs on the CPU and nowhere else: the CPU is JAX's only
  backend and the kernels are not `disabled()` (then `on_cpu` traces only its CPU branch)."""
  return not _off.get() and set(jax.extend.backend.backends()) == {"cpu"}


def cpu_kernels_available() -> bool:
  """Whether model code being traced should use the fused CPU kernels: they are built
  and registered (on the first call), and not `disabled()`.

  False when JAX's default backend is not the CPU, on a CPU without AVX2 and FMA, with
  `ESC_JAX_CPU_KERNELS=0`, or when building fails (one warning says why).
  """
  return not _off.get() and _load()


@functools.lru_cache(maxsize=None)
def _load() -> bool:
  if _disabled() or jax.default_backend() != "cpu" or not isa_supported(_cpu_features()):
    return False
  try:
    lib = ctypes.cdll.LoadLibrary(str(_build()))
    for target, symbol in ((SWIN_BLOCK_TARGET, lib.EscSwinBlockFwd), (SWIN_BLOCK_GRAD_TARGET, lib.EscSwinBlockBwd),
                           (DENSE_TARGET, lib.EscDense), (CONV_TARGET, lib.EscConv)):
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(symbol), platform="cpu")
  except (OSError, subprocess.SubprocessError, AttributeError) as e:
    detail = getattr(e, "stderr", None) or str(e)
    warnings.warn(f"esc_jax: fused CPU kernels unavailable, using plain XLA ({detail.strip()[:500]})")
    return False
  return True


def _require_built():
  """Builds and registers the kernels if needed; RuntimeError where they cannot be."""
  if not _load():
    raise RuntimeError("esc_jax: the CPU kernels are not available here (see kernels.cpu_kernels_available)")


_NO_BIAS = np.zeros((1,), np.float32)  # the bias argument of a dense call without one


def dense_applies(x, w) -> bool:
  """Whether `dense` should compute x (..., K) @ w (K, N) (traced now): float32 both, at
  least one row, weights of at least DENSE_MIN_WEIGHT_BYTES, and the kernels available."""
  return (x.dtype == jnp.float32 and w.dtype == jnp.float32 and w.ndim == 2 and x.size > 0
          and 4 * w.size >= DENSE_MIN_WEIGHT_BYTES and cpu_kernels_available())


def dense(x, w, b=None, transpose: bool = False):
  """x (..., K) @ w + b as the CPU kernel (dense.cc): w (K, N), or (N, K)
  with `transpose` (x @ w.T); b (N,) or None. Float32; the sums run over K in order, so
  the result does not depend on the thread count. The caller checks `dense_applies`."""
  _require_built()
  n = w.shape[0] if transpose else w.shape[1]
  call = jax.ffi.ffi_call(DENSE_TARGET, jax.ShapeDtypeStruct((*x.shape[:-1], n), jnp.float32),
                          vmap_method="sequential")
  return call(x, w, _NO_BIAS if b is None else b, has_bias=b is not None, transpose=transpose)


# Weights (float32 bytes) from which `conv_same` runs a convolution as the kernel: ESC-Base's
# fused de-embedding (7 x 7 x 45 x 12, 106 KB), not the tiny test model's (19 KB).
CONV_MIN_WEIGHT_BYTES = 1 << 16


def conv_applies(x, kernel) -> bool:
  """Whether `conv_same` should compute the convolution of x (B, H, W, C) by kernel (KH,
  KW, C, N) (traced now): float32, odd kernel sizes, weights of at least
  CONV_MIN_WEIGHT_BYTES, and the kernels available."""
  return (x.dtype == jnp.float32 and kernel.dtype == jnp.float32 and x.ndim == 4 and kernel.ndim == 4
          and kernel.shape[0] % 2 == 1 and kernel.shape[1] % 2 == 1 and x.size > 0
          and 4 * kernel.size >= CONV_MIN_WEIGHT_BYTES and cpu_kernels_available())


def conv_same(x, kernel, bias):
  """Stride-1 cross-correlation of x (B, H, W, C) by kernel (KH, KW, C, N) (odd sizes) with
  (KH // 2, KW // 2) zero padding, plus bias (N,), as the CPU kernel (conv.cc): (B, H, W, N).
  XLA pads and transposes x to the kernel's (B, H + KH - 1, C, Wp) layout. The caller
  checks `conv_applies`."""
  _require_built()
  kh, kw, _, n = kernel.shape
  b, h, w, _ = x.shape
  wp = -(-w // 16) * 16 + kw - 1  # whole 16-column tiles, plus the taps past the last
  xt = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, wp - w - kw // 2), (0, 0))).transpose(0, 1, 3, 2)
  call = jax.ffi.ffi_call(CONV_TARGET, jax.ShapeDtypeStruct((b, h, w, n), jnp.float32), vmap_method="sequential")
  return call(xt, kernel, bias)
