"""runtime.keep_host_memory: repeated XLA:CPU calls reuse their pages instead of faulting them in.

Each case runs in a fresh process: the allocator settings are process-wide and
must precede JAX's first computation.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = r"""
import json, resource
from esc_jax import runtime
applied = runtime.keep_host_memory()
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
print(json.dumps(dict(applied=applied, faults=min(faults),
                      async_dispatch=bool(jax.config.values["jax_cpu_enable_async_dispatch"]))))
"""

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc malloc settings")


def _probe(keep: str) -> dict:
  env = dict(os.environ, ESC_JAX_KEEP_HOST_MEMORY=keep, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300, check=True).stdout
  return json.loads(out.strip().splitlines()[-1])


@glibc_only
def test_keep_host_memory_reuses_pages():
  on, off = _probe("1"), _probe("0")
  assert on["applied"] and not on["async_dispatch"]
  assert not off["applied"] and off["async_dispatch"]
  pages = (128 << 20) // 4096  # one output's worth of 4 KiB pages
  assert off["faults"] > pages // 2  # glibc's default: a fresh mmap per call, faulted page by page
  assert on["faults"] < pages // 100  # kept: the next call reuses the freed block
