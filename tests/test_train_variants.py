"""The ablation codecs in training, conversion, compression and evaluation (configs of
tests/fixtures/variants): BatchNorm statistics are trained, checkpointed, restored and
used, over the global batch when it is sharded.
"""
from __future__ import annotations

import functools
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import soundfile as sf

import esc_jax
from esc_jax import bitstream, train_lib
from esc_jax.__main__ import main as cli
from esc_jax.config_lib import base_config, smoke
from esc_jax.convert import convert_checkpoint
from esc_jax.metrics import si_sdr
from helpers import two_device_env

ROOT = pathlib.Path(__file__).absolute().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "variants"
VARIANTS = ("tiny_csvq_conv", "tiny_rvq_swint", "tiny_rvq_conv")


def variant_config(name: str, **overrides):
  """The smoke recipe (batch 2 of 1 s) for a fixture variant's model; no validation."""
  fixture = json.loads((FIXTURES / name / "config.json").read_text())
  c = smoke(base_config(fixture["model"], fixture["model_name"]), num_steps=3, pretrain_steps=1)
  c.data.val_dir = ""
  c.log.tensorboard = False
  c.optim.lr = 1e-3
  for k, v in overrides.items():
    sec, key = k.split(".")
    c[sec][key] = v
  return c


def _batches(seed=0):
  rng = np.random.default_rng(seed)
  while True:
    yield (0.1 * rng.standard_normal((2, 15920))).astype(np.float32)


def _changed(a, b) -> bool:
  return any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@functools.lru_cache(maxsize=None)
def _program(name):
  return train_lib.build(variant_config(name))


# Trained here: rvq+conv, whose BatchNorm statistics the loop and checkpoints must carry.
# The other variants' training steps are checked against the original's gradients in
# test_variants.py, and their loading in test_converted_variant_compresses_and_evaluates;
# their train loop is the one of ESC (test_train.py), without batch_stats.
TRAINED = "tiny_rvq_conv"


def test_variant_trains_and_loads(tmp_path):
  c = variant_config(TRAINED)
  program = _program(TRAINED)
  init = jax.device_get(train_lib.init_state(program))
  state = train_lib.train_and_evaluate(c, tmp_path, program=program, data=_batches())
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]
  assert all(np.isfinite(r["train/loss"]) for r in rows) and rows[-1]["train/pretrain"] == 0
  assert _changed(state.params, init.params)
  assert _changed(state.batch_stats, init.batch_stats)
  codec = esc_jax.load(tmp_path)  # params and the trained statistics, from the checkpoint
  for a, b in zip(jax.tree.leaves(codec.state["batch_stats"]), jax.tree.leaves(state.batch_stats), strict=True):
    np.testing.assert_array_equal(a, np.asarray(b))
  x = next(_batches(1))
  assert codec.reconstruct(x, 3).shape == x.shape


def _one_step(program):
  """(batch_stats leaves, params leaves) after one step from the initial state on a fixed batch."""
  x = next(_batches(2))
  s, _ = program.step(train_lib.init_state(program), train_lib.global_batch(program, x))
  s = jax.device_get(s)
  return jax.tree.leaves(s.batch_stats), jax.tree.leaves(s.params)


_TWO_DEVICES = r"""
import sys, jax, numpy as np
sys.path.insert(0, "tests")
from test_train_variants import TRAINED, _one_step, variant_config
from esc_jax import train_lib
assert len(jax.devices()) == 2
stats, params = _one_step(train_lib.build(variant_config(TRAINED)))
np.savez(sys.argv[1], *stats, *params)
"""


def test_batchnorm_statistics_of_the_global_batch_in_training(tmp_path):
  """One train step with the batch sharded over 2 devices (in a subprocess) updates BatchNorm
  from the whole batch: its statistics equal those of one device holding the batch."""
  out = tmp_path / "two.npz"
  res = subprocess.run([sys.executable, "-c", _TWO_DEVICES, str(out)], capture_output=True, text=True,
                       env=two_device_env(PYTHONPATH=str(ROOT)), cwd=ROOT, timeout=900)
  assert res.returncode == 0, res.stderr[-3000:]
  stats, params = _one_step(_program(TRAINED))
  two = [np.load(out)[f"arr_{i}"] for i in range(len(stats) + len(params))]
  for a, b in zip(two[:len(stats)], stats):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # Params: AdamW's first update is lr * (g / (|g| + eps) + wd * p), about +-lr wherever the gradient
  # is not well determined, so float rounding of tiny gradients (2 vs 1 device) shows up to 2 lr.
  lr = variant_config(TRAINED).optim.lr
  for a, b in zip(two[len(stats):], params):
    np.testing.assert_allclose(a, b, atol=2 * lr)


@pytest.mark.parametrize("name", VARIANTS)
def test_converted_variant_compresses_and_evaluates(name, tmp_path, capsys):
  out, n = convert_checkpoint(FIXTURES / name / "model.pth", tmp_path / "codec", FIXTURES / name / "config.json")
  codec = esc_jax.load(out)
  golden = np.load(FIXTURES / name / "golden.npz")
  np.testing.assert_array_equal(codec.encode(golden["audio"], 3), golden["codes_s3"])  # running statistics used
  wav, esc, back = tmp_path / "in.wav", tmp_path / "x.esc", tmp_path / "out.wav"
  sf.write(wav, golden["audio"][0], 16000, subtype="FLOAT")
  assert cli(["compress", str(wav), str(esc), "--checkpoint", str(out), "--kbps", str(codec.kbps(3)),
              "--quiet"]) == 0
  assert cli(["decompress", str(esc), str(back), "--checkpoint", str(out), "--quiet"]) == 0
  y = sf.read(back, dtype="float32")[0]
  ref = codec.decode(golden["codes_s3"][:1])[0]
  np.testing.assert_allclose(y, np.clip(ref, -1, 1), atol=1.5 / 32768)  # PCM_16
  # Chunked coding with the variant's own receptive field (context_frames_for) is exact:
  # 4 s in windows of 8 frames plus context give the whole-file codes.
  long = np.tile(golden["audio"][0], 4)
  sf.write(wav, long, 16000, subtype="FLOAT")
  assert cli(["compress", str(wav), str(esc), "--checkpoint", str(out), "--chunk_frames", "8", "--quiet"]) == 0
  np.testing.assert_array_equal(bitstream.read_stream(esc)[1], codec.encode(long, codec.max_streams)[0])
  sys.path.insert(0, str(ROOT))
  try:
    import eval as eval_cli  # eval.py
  finally:
    sys.path.pop(0)
  data = tmp_path / "data"
  data.mkdir()
  sf.write(data / "a.wav", golden["audio"][0], 16000, subtype="FLOAT")
  assert eval_cli.main(["--checkpoint", str(out), "--data", str(data), "--output", str(tmp_path / "ev"),
                        "--num_streams", "all", "--metrics", "si_sdr", "--fit", "pad", "--no_progress"]) == 0
  res = json.loads((tmp_path / "ev" / "results.json").read_text())
  # Encoded once, decoded per bitrate: at 3 streams, the original's own 3-stream
  # reconstruction scored with the same metric.
  ref_sdr = float(si_sdr(golden["audio"][:1], golden["eval_recon_s3"][:1])[0])
  assert res["bitrates"][2]["per_file"]["si_sdr"][0] == pytest.approx(ref_sdr, rel=1e-4)
