"""Evaluation library (esc_jax.evaluation) and the eval.py CLI."""
from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import soundfile as sf
import soxr

import esc_jax
from esc_jax import audio_io, evaluation, metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
ASSETS = ROOT / "esc_jax" / "assets"
RTOL = 1e-4


@pytest.fixture(scope="module")
def codec(tiny_codec_dir):
  return esc_jax.load(tiny_codec_dir)


@pytest.fixture(scope="module")
def cli():
  spec = importlib.util.spec_from_file_location("esc_eval_cli", ROOT / "eval.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_masked_metrics_equal_exact_length_metrics(golden):
  x, y = golden["audio"], golden["eval_recon_s3"]
  lengths = [15920, 4001]
  xp, yp = x.copy(), y.copy()
  yp[1, 4001:] = np.random.default_rng(0).normal(size=15920 - 4001)  # garbage past the end
  mel = jax.jit(metrics.mel_distance)(xp, yp, lengths)
  sdr = jax.jit(metrics.si_sdr)(xp, yp, lengths)
  for b, n in enumerate(lengths):
    np.testing.assert_allclose(mel[b], jax.jit(metrics.mel_distance)(x[b:b + 1, :n], y[b:b + 1, :n])[0], rtol=RTOL)
    np.testing.assert_allclose(sdr[b], metrics.si_sdr(x[b:b + 1, :n], y[b:b + 1, :n])[0], rtol=RTOL)


def test_pipeline_reproduces_original_metrics(codec, golden, tmp_path):
  """Per-file values through files on disk equal the original's on the fixture (whole clips: fit="pad")."""
  paths = []
  for b in range(2):
    paths.append(tmp_path / f"clip{b}.wav")
    sf.write(paths[-1], golden["audio"][b], 16000, subtype="FLOAT")
  res = evaluation.evaluate(codec, paths, batch_size=2, fit="pad", progress=False)
  assert res["num_files"] == 2 and res["num_skipped"] == 0 and res["shapes"] == [(2, 15920)]
  assert [r["num_streams"] for r in res["bitrates"]] == [1, 2, 3, 4, 5, 6]
  for r in res["bitrates"]:
    s = r["num_streams"]
    pf = r["per_file"]
    np.testing.assert_allclose(pf["mel_distance"], golden[f"metric_meldist_s{s}"], rtol=RTOL)
    np.testing.assert_allclose(pf["si_sdr"], golden[f"metric_sisdr_s{s}"], rtol=RTOL)
    assert r["utilization"] == golden[f"metric_utilization_s{s}"]  # rounded to 4 like the original
    assert abs(r["utilization_exact"] - r["utilization"]) <= 5e-5
    ref, est = golden["audio"], golden[f"eval_recon_s{s}"]
    np.testing.assert_allclose(pf["pesq"], metrics.pesq_wb(ref, est), atol=1e-3)
    np.testing.assert_allclose(pf["stoi"], metrics.stoi(ref, est), atol=1e-4)
    assert r["mean"]["si_sdr"] == pytest.approx(np.mean(pf["si_sdr"]))
    assert r["std"]["pesq"] == pytest.approx(np.std(pf["pesq"]))
    assert r["kbps"] == pytest.approx(0.9 * s)  # 64-entry codebooks: 6 bits x 3 groups / 20 ms
  # Arrays in memory give the same numbers (same compiled shape).
  again = evaluation.evaluate(codec, {"a": golden["audio"][0], "b": golden["audio"][1]}, num_streams=[2, 6],
                              batch_size=2, metrics=("si_sdr",), fit="pad", progress=False)
  assert [r["per_file"]["si_sdr"] for r in again["bitrates"]] == [
      res["bitrates"][1]["per_file"]["si_sdr"], res["bitrates"][5]["per_file"]["si_sdr"]]
  # fit="crop" (the default) is the original's protocol: x[:-80] (here exactly the
  # fixture's input), cut to a valid length. (A single bitrate runs the fused round-trip
  # program instead of encode once + decode per bitrate: the same numbers.)
  longer = np.pad(golden["audio"], ((0, 0), (0, 80)))
  crop = evaluation.evaluate(codec, list(longer), num_streams=6, batch_size=2,
                             metrics=("mel_distance",), progress=False)
  assert crop["files"][0]["num_samples"] == 15920 and crop["fit"] == "crop"
  assert crop["bitrates"][0]["per_file"]["mel_distance"] == res["bitrates"][5]["per_file"]["mel_distance"]
  # Length buckets: a 15000-sample clip padded to the 15920 bucket beside a clip
  # of that exact valid length, which is unaffected (batch rows are independent).
  bucket = evaluation.evaluate(codec, [golden["audio"][0], golden["audio"][1, :15000]], batch_size=2, fit="pad",
                               bucket_growth=1.1, metrics=("mel_distance", "si_sdr"), progress=False)
  assert bucket["shapes"] == [(2, 15920)] and bucket["files"][1]["num_samples"] == 15000
  for r, e in zip(bucket["bitrates"], res["bitrates"]):
    assert r["per_file"]["mel_distance"][0] == e["per_file"]["mel_distance"][0]
    assert np.isfinite(r["per_file"]["si_sdr"][1])
  table = evaluation.format_table(res)
  assert len(table.splitlines()) == 2 + 6 and "PESQ" in table and "Util" in table


def test_pesq_of_identical_signal_is_maximal():
  x = audio_io.load_audio(ASSETS / "speech_0.wav")
  assert metrics.pesq_wb(x, x)[0] == pytest.approx(4.64, abs=0.01)


def test_plan_batches(codec):
  spf = codec.samples_per_frame
  lengths = [15920, 15700, 30000, 15000, 14000, 3000, 2000]
  exact = evaluation.plan_batches(lengths, codec, batch_size=2)
  assert sorted(i for b in exact for i in b.indices) == list(range(len(lengths)))
  for b in exact:
    assert all(codec.valid_length(lengths[i]) == b.length for i in b.indices)
    assert len(b.indices) <= b.rows <= 2
  assert {b.length for b in exact} == {codec.valid_length(n) for n in lengths}
  bucketed = evaluation.plan_batches(lengths, codec, batch_size=8, bucket_growth=1.5)
  assert len({b.length for b in bucketed}) < len({b.length for b in exact})
  for b in bucketed:
    assert (b.length + codec.hop) % spf == 0  # a valid length
    assert all(lengths[i] <= b.length for i in b.indices)
  with pytest.raises(ValueError):
    evaluation.plan_batches(lengths, codec, batch_size=0)


def test_skips_unreadable_and_short_clips(codec, tmp_path):
  bad = tmp_path / "bad.wav"
  bad.write_bytes(b"RIFF nonsense")
  with pytest.raises(ValueError, match="no clip to evaluate"):
    evaluation.evaluate(codec, [bad, np.zeros(500, np.float32)], progress=False)
  assert evaluation.load_clips([bad])[2][0]["name"] == str(bad)
  with pytest.raises(ValueError, match="num_streams"):
    evaluation.evaluate(codec, [np.zeros(16000, np.float32)], num_streams=7, progress=False)


@pytest.mark.parametrize("bad", [7, 0, True, 2.0, "6", [], [2, 7]])
def test_stream_counts_are_checked_like_encode(codec, bad):
  """evaluate() takes the stream counts encode() takes (bool and floats are not counts)."""
  with pytest.raises(ValueError, match="num_streams must"):
    evaluation._streams(codec, bad)
  assert evaluation._streams(codec, [np.int64(2), 6]) == [2, 6]
  assert evaluation._streams(codec, None) == [1, 2, 3, 4, 5, 6]


def _write_clips(folder: pathlib.Path):
  x = audio_io.load_audio(ASSETS / "speech_0.wav")
  (folder / "b_sub").mkdir(parents=True)
  sf.write(folder / "a.wav", x[:15920], 16000)
  sf.write(folder / "b.flac", x[8000:23700], 16000)
  st = soxr.resample(x[16000:31840], 16000, 44100)
  sf.write(folder / "b_sub" / "c.wav", np.stack([st, 0.5 * st], 1), 44100)  # stereo 44.1 kHz
  (folder / "d_corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
  sf.write(folder / "e.wav", x[:12000], 16000)  # beyond --max_files
  (folder / "notes.txt").write_text("not audio")


def test_cli_end_to_end(tiny_codec_dir, tmp_path):
  data, out = tmp_path / "data", tmp_path / "out"
  _write_clips(data)
  proc = subprocess.run(
      [sys.executable, str(ROOT / "eval.py"), "--checkpoint", str(tiny_codec_dir), "--data", str(data),
       "--output", str(out), "--max_files", "4", "--batch_size", "2",
       "--no_progress", "--compile_cache", str(tmp_path / "xla")], capture_output=True, text=True, cwd=ROOT,
      timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert any((tmp_path / "xla").iterdir())  # the compiled programs, for a rerun
  res = json.loads((out / "results.json").read_text())
  assert (out / "metrics.png").stat().st_size > 1000
  assert res["num_files"] == 3 and res["num_skipped"] == 1
  assert res["skipped"][0]["name"].endswith("d_corrupt.wav")
  # The original's protocol: x[:-80] cut to a valid length (15920 - 80 -> 15600 etc.).
  assert {pathlib.Path(f["name"]).name: f["num_samples"] for f in res["files"]} == {
      "a.wav": 15600, "b.flac": 15600, "c.wav": 15600}
  assert res["fit"] == "crop" and res["channel"] == "first"
  assert [r["kbps"] for r in res["bitrates"]] == pytest.approx([0.9 * s for s in range(1, 7)])
  assert res["shapes"] == [[2, 15600]]  # one valid length: one encode and one decode program for all bitrates
  for r in res["bitrates"]:
    for m in ("pesq", "stoi", "mel_distance", "si_sdr"):
      assert np.isfinite(r["mean"][m]) and np.isfinite(r["std"][m]) and len(r["per_file"][m]) == 3
    assert 0 < r["utilization"] <= 1
  assert "PESQ" in proc.stdout and "d_corrupt.wav" in proc.stderr


def _one_line_error(capsys):
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and len(err.splitlines()) == 1, err
  return err


def test_cli_errors(cli, tiny_codec_dir, tmp_path, capsys):
  empty = tmp_path / "empty"
  (empty / "sub").mkdir(parents=True)
  (empty / "sub" / "x.txt").write_text("")
  assert cli.main(["--checkpoint", str(tiny_codec_dir), "--data", str(empty)]) == 1
  assert "no audio files" in _one_line_error(capsys)
  assert cli.main(["--checkpoint", str(tiny_codec_dir), "--data", str(tmp_path / "missing")]) == 1
  _one_line_error(capsys)

  data = tmp_path / "data"
  data.mkdir()
  sf.write(data / "a.wav", np.zeros(16000, np.float32), 16000)
  assert cli.main(["--checkpoint", str(tmp_path), "--data", str(data)]) == 2  # not a codec dir
  assert "esc_config.json" in _one_line_error(capsys)

  mismatch = tmp_path / "mismatch"
  import shutil
  shutil.copytree(tiny_codec_dir, mismatch)
  cfg = json.loads((mismatch / "esc_config.json").read_text())
  cfg["model"]["codebook_size"] = 32
  (mismatch / "esc_config.json").write_text(json.dumps(cfg))
  assert cli.main(["--checkpoint", str(mismatch), "--data", str(data)]) == 2
  _one_line_error(capsys)

  assert cli.main(["--checkpoint", str(tiny_codec_dir), "--data", str(data), "--num_streams", "7"]) == 1
  assert "num_streams" in _one_line_error(capsys)  # the library's check, reported in one line
  with pytest.raises(SystemExit) as e:
    cli.main(["--checkpoint", str(tiny_codec_dir), "--data", str(data), "--step", "newest"])
  assert e.value.code == 2
  _one_line_error(capsys)
