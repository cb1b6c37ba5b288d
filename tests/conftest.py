"""Test-wide JAX settings: exact float32 matmuls for parity with PyTorch."""
from __future__ import annotations

import jax

jax.config.update("jax_default_matmul_precision", "highest")
