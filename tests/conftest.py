"""Test-wide settings and the golden fixture of the original PyTorch ESC."""
from __future__ import annotations

import json
import os
import pathlib
import tempfile

# Set before jax is imported, so that CLI subprocesses of the tests inherit them:
# exact float32 matmuls for parity with PyTorch, and one persistent compilation
# cache for the session (fresh per run), so an XLA program that several tests or
# subprocesses build (e.g. the tiny codec's encode) is compiled once.
os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
# The suite is dominated by compiling small programs: LLVM optimisation level 0
# cuts CPU compile time by about a third (test_codec: 208 -> 142 CPU-s). XLA's
# HLO passes, and so the numerics every tolerance is about, are unchanged.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="esc_jax_xla_cache_"))
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
TINY = FIXTURES / "esc_tiny"


@pytest.fixture(scope="session")
def golden():
  return dict(np.load(TINY / "golden.npz"))


@pytest.fixture(scope="session")
def tiny_config():
  return json.loads((TINY / "config.json").read_text())


@pytest.fixture(scope="session")
def tiny_state_dict():
  return dict(np.load(TINY / "state_dict.npz"))


@pytest.fixture(scope="session")
def tiny(tiny_config, tiny_state_dict):
  """(model, params) of the fixture with the original weights mapped in."""
  from esc_jax.checkpoint import model_template
  from esc_jax.codec import make_model
  from esc_jax.convert import state_dict_to_params
  model = make_model(tiny_config)
  return model, state_dict_to_params(tiny_state_dict, model_template(model)["params"])


@pytest.fixture(scope="session")
def tiny_codec_dir(tmp_path_factory, tiny_config, tiny_state_dict):
  """A codec directory (esc_jax.save_codec) holding the fixture's original weights."""
  from esc_jax.checkpoint import model_template, save_codec
  from esc_jax.codec import make_model
  from esc_jax.convert import state_dict_to_params
  params = state_dict_to_params(tiny_state_dict, model_template(make_model(tiny_config))["params"])
  return save_codec(tmp_path_factory.mktemp("codec") / "esc_tiny", params, tiny_config)
