"""runtime.preload_allocator: the programs restart once with tcmalloc preloaded, so repeated
XLA:CPU calls reuse their pages instead of page-faulting them in again.

Each case runs a fresh process: the restart replaces the process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from esc_jax import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAND_IN = "libanl.so.1"  # a glibc library no Python process loads: harmless to preload

RESTART = r"""
import json, os
print("start", flush=True)
from esc_jax import runtime
returned = runtime.preload_allocator()
print(json.dumps(dict(returned=returned, ld_preload=os.environ.get("LD_PRELOAD"),
                      lib=runtime.preloaded_allocator(), mapped=runtime._mapped("%s"))))
""" % STAND_IN

FAULTS = r"""
import json, resource
from esc_jax import runtime
runtime.preload_allocator()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sin(x) * x)  # a fresh 128 MiB output per call
x = jnp.ones((32 << 20,), jnp.float32)
f(x).block_until_ready()
faults = []
for _ in range(3):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  y = f(x)
  y.block_until_ready()
  del y
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(dict(lib=runtime.preloaded_allocator(), faults=min(faults))))
"""


def _run(script: str, malloc: str, **env) -> tuple[list[str], dict]:
  base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ESC_JAX_MALLOC_PRELOADED")}
  env = dict(base, ESC_JAX_MALLOC=malloc, JAX_PLATFORMS="cpu", **env)
  out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300, check=True).stdout.strip().splitlines()
  return out[:-1], json.loads(out[-1])


def test_restarts_once_with_the_library():
  printed, r = _run(RESTART, STAND_IN)
  assert printed == ["start", "start"]  # the command ran again, once
  assert r == dict(returned=False, ld_preload=STAND_IN, lib=STAND_IN, mapped=True)


def test_reports_a_tcmalloc_preloaded_by_hand():
  """`LD_PRELOAD=.../libtcmalloc_minimal.so.4 python bench/bench.py` labels its rows tcmalloc."""
  lib = runtime.find_tcmalloc()
  printed, r = _run(RESTART, "system", LD_PRELOAD=lib or STAND_IN)
  assert printed == ["start"]
  assert r["lib"] == (os.path.basename(lib) if lib else None)


@pytest.mark.parametrize("malloc", ["system", "/nonexistent/libmalloc.so"])
def test_no_restart(malloc):
  printed, r = _run(RESTART, malloc)
  assert printed == ["start"]
  assert r == dict(returned=False, ld_preload=None, lib=None, mapped=False)


def test_tcmalloc_reuses_pages():
  """With tcmalloc (CI installs it) the second call of a program faults in almost no pages;
  glibc's malloc maps and faults a fresh block every call."""
  pages = (128 << 20) // 4096
  _, system = _run(FAULTS, "system")
  assert system["lib"] is None and system["faults"] > pages // 2
  _, fast = _run(FAULTS, "tcmalloc")
  if runtime.find_tcmalloc() is None:  # not installed: the program runs on, unchanged
    assert fast["lib"] is None and fast["faults"] > pages // 2
  else:
    assert "tcmalloc" in fast["lib"] and fast["faults"] < pages // 100


@pytest.mark.parametrize("dtype, before, after", [
    ("bfloat16", None, "--xla_gpu_enable_triton_gemm=false"),
    ("bfloat16", "--xla_cpu_use_thunk_runtime=true", "--xla_cpu_use_thunk_runtime=true --xla_gpu_enable_triton_gemm=false"),
    ("bfloat16", "--xla_gpu_enable_triton_gemm=true", "--xla_gpu_enable_triton_gemm=true"),  # the user's choice stands
    ("float32", None, None),
])
def test_gpu_gemm_flags(monkeypatch, dtype, before, after):
  if before is None:
    monkeypatch.delenv("XLA_FLAGS", raising=False)
  else:
    monkeypatch.setenv("XLA_FLAGS", before)
  assert runtime.gpu_gemm_flags(dtype) == (after != before)
  assert os.environ.get("XLA_FLAGS") == after


def test_gpu_gemm_flag_is_accepted_on_cpu():
  """XLA aborts on flags it does not know; this one must be known to the CPU build too."""
  env = {**os.environ, "XLA_FLAGS": "--xla_gpu_enable_triton_gemm=false"}
  out = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; print(float(jnp.ones(3).sum()))"],
                       env=env, capture_output=True, text=True, timeout=120, check=True)
  assert out.stdout.strip() == "3.0"


@pytest.mark.parametrize("off", [None, "", "0", "off", "None"])
def test_compile_cache_off(off, tmp_path, monkeypatch):
  """The values the CLIs' --compile_cache and $ESC_JAX_CACHE document as "off" turn the cache
  off (no folder named "off" is made)."""
  monkeypatch.chdir(tmp_path)
  assert runtime.enable_compile_cache(off) is None
  assert not any(tmp_path.iterdir())
  monkeypatch.setenv(runtime.CACHE_ENV, off or "")
  assert runtime.default_cache_dir() is None
