"""Converter: released .pth -> codec directory -> esc_jax.load, strict and safe."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import yaml

import esc_jax
from esc_jax.convert import convert_checkpoint
from helpers import call, global_, obj, program, write_pth, write_state_dict_pth

ROOT = pathlib.Path(__file__).parent.parent
TINY = pathlib.Path(__file__).parent / "fixtures" / "esc_tiny"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  out = tmp_path_factory.mktemp("conv")
  for name in ("model.pth", "model_seed.pth"):
    convert_checkpoint(TINY / name, out / name, TINY / "config.json")
  return out


def test_both_release_layouts_reproduce_the_fixture(converted, golden):
  latest = esc_jax.load(converted / "model.pth")
  seed = esc_jax.load(converted / "model_seed.pth")
  for a, b in zip(*(map(np.asarray, __import__("jax").tree_util.tree_leaves(c.params)) for c in (latest, seed))):
    np.testing.assert_array_equal(a, b)
  for s in range(1, 7):
    codes = latest.encode(golden["audio"], num_streams=s)
    assert codes.dtype == np.int32
    np.testing.assert_array_equal(codes, golden[f"codes_s{s}"])
    audio = latest.decode(golden[f"codes_s{s}"])
    assert audio.dtype == np.float32 and np.abs(audio - golden[f"decoded_s{s}"]).max() <= 1e-5
  meta = json.loads((converted / "model.pth" / "esc_config.json").read_text())
  assert len(meta["source"]["sha256"]) == 64 and meta["model_name"] == "csvq+swinT"


def test_codec_api_pads_and_trims(converted, golden):
  codec = esc_jax.load(converted / "model.pth")
  x = golden["audio"][0, :12345]
  codes = codec.encode(x, 3)  # (L,) numpy input
  assert codes.shape == (1, 3, 3, codec.num_frames(12345))
  y = codec.decode(codes, length=12345)
  assert y.shape == (1, 12345) and y.dtype == np.float32
  np.testing.assert_array_equal(codec.reconstruct(x, 3), y)  # one program, the same audio
  # A valid-length prefix gives exactly the unpadded result.
  np.testing.assert_array_equal(codec.encode(golden["audio"], 6), golden["codes_s6"])
  with pytest.raises(ValueError, match="NaN"):
    codec.encode(np.full(1000, np.nan, np.float32))
  with pytest.raises(ValueError, match="empty"):
    codec.encode(np.zeros(0, np.float32))
  with pytest.raises(ValueError, match="num_streams"):
    codec.encode(x, 0)
  with pytest.raises(ValueError, match="codes must be in"):
    codec.decode(np.full((1, 2, 3, 4), 64))


def test_release_yaml_and_bare_state_dict(tmp_path, tiny_state_dict, golden):
  cfg = json.loads((TINY / "config.json").read_text())
  rel = tmp_path / "release"
  rel.mkdir()
  (rel / "config.yaml").write_text(yaml.safe_dump({"model_name": "csvq+swinT", "model": cfg,
                                                   "loss": {"mel_weight": 0.25}}))
  write_state_dict_pth(rel / "model.pth", tiny_state_dict, wrap=False)
  out, n = convert_checkpoint(rel / "model.pth", tmp_path / "out")  # config.yaml found beside it
  assert n == 57_746
  np.testing.assert_array_equal(esc_jax.load(out).encode(golden["audio"], 2), golden["codes_s2"])


def _cli(*args):
  return subprocess.run([sys.executable, str(ROOT / "convert_torch_weights.py"), *map(str, args)],
                        capture_output=True, text=True, cwd=ROOT)


def _assert_one_line_error(res, *words):
  assert res.returncode != 0
  lines = res.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
  for w in words:
    assert w in lines[0], lines[0]


@pytest.mark.parametrize("case", ["missing", "extra", "shape"])
def test_strict_state_dict_errors(tmp_path, tiny_state_dict, case):
  sd = dict(tiny_state_dict)
  if case == "missing":
    del sd["decoder.post_nn.swint_blocks.1.mlp.linear_2.bias"]
    words = ["missing", "decoder.post_nn.swint_blocks.1.mlp.linear_2.bias"]
  elif case == "extra":
    sd["encoder.extra_layer.weight"] = np.zeros((3, 3), np.float32)
    words = ["unexpected", "encoder.extra_layer.weight"]
  else:
    sd["encoder.patch_embed.proj.weight"] = np.zeros((8, 2, 3, 3), np.float32)
    words = ["encoder.patch_embed.proj.weight", "(8, 2, 3, 3)", "(3, 2, 2, 8)"]
  pth = write_state_dict_pth(tmp_path / "bad.pth", sd)
  out = tmp_path / "out"
  res = _cli("--checkpoint", pth, "--config", TINY / "config.json", "--output", out)
  _assert_one_line_error(res, *words)
  assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_wrong_config_and_unreadable_files(tmp_path):
  out = tmp_path / "out"
  cfg = json.loads((TINY / "config.json").read_text())
  (tmp_path / "wide.json").write_text(json.dumps(dict(cfg, h_dims=[8, 8, 12, 12, 16, 24])))
  _assert_one_line_error(_cli("--checkpoint", TINY / "model.pth", "--config", tmp_path / "wide.json",
                              "--output", out), "shape mismatch")
  (tmp_path / "bogus.json").write_text(json.dumps(dict(cfg, bogus=3)))
  _assert_one_line_error(_cli("--checkpoint", TINY / "model.pth", "--config", tmp_path / "bogus.json",
                              "--output", out), "bogus")
  trunc = tmp_path / "trunc.pth"
  trunc.write_bytes((TINY / "model.pth").read_bytes()[:100_000])
  _assert_one_line_error(_cli("--checkpoint", trunc, "--config", TINY / "config.json", "--output", out),
                         "trunc.pth")
  _assert_one_line_error(_cli("--checkpoint", tmp_path / "nope.pth", "--config", TINY / "config.json",
                              "--output", out), "nope.pth")
  assert not out.exists()


def test_malicious_checkpoint_is_refused_and_existing_output_kept(tmp_path):
  marker = tmp_path / "pwned"
  evil = program(call(global_("os", "system"), obj(f"touch {marker}")))
  pth = write_pth(tmp_path / "evil.pth", evil)
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("previous result")
  res = _cli("--checkpoint", pth, "--config", TINY / "config.json", "--output", out, "--overwrite")
  _assert_one_line_error(res, "os.system")
  assert not marker.exists()
  assert (out / "keep.txt").read_text() == "previous result"


def test_state_dict_roundtrip(tiny, tiny_state_dict):
  from esc_jax.convert import is_derived, params_to_state_dict
  _, params = tiny
  back = params_to_state_dict(params)
  assert set(back) == {k for k in tiny_state_dict if not is_derived(k)}
  for k, v in back.items():
    np.testing.assert_array_equal(v, tiny_state_dict[k])


def test_loading_mismatched_config_is_a_clear_error(converted, tmp_path):
  import shutil
  bad = tmp_path / "bad"
  shutil.copytree(converted / "model.pth", bad)
  cfg = json.loads((bad / "esc_config.json").read_text())
  cfg["model"]["h_dims"] = [8, 8, 12, 12, 16, 24]
  (bad / "esc_config.json").write_text(json.dumps(cfg))
  with pytest.raises(esc_jax.CheckpointError, match="config's model needs"):
    esc_jax.load(bad)
  with pytest.raises(esc_jax.CheckpointError, match="not a codec directory"):
    esc_jax.load(tmp_path)
