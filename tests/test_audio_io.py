"""Audio files (esc_jax.audio_io, esc_jax.files): reading, writing, finding, atomic writes."""
from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest
import soundfile as sf

from esc_jax import audio_io, files

ASSETS = pathlib.Path(audio_io.__file__).parent / "assets"


@pytest.fixture(scope="module")
def speech():
  return [audio_io.load_audio(ASSETS / f"speech_{i}.wav") for i in range(2)]


def test_load_audio_resamples_stereo(tmp_path):
  sr = 44100
  t = np.arange(sr) / sr
  stereo = np.stack([np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * 440 * t)], axis=1)
  path = tmp_path / "stereo.wav"
  sf.write(path, stereo.astype(np.float32), sr, subtype="FLOAT")
  x = audio_io.load_audio(path)
  assert x.dtype == np.float32 and x.shape == (16000,)
  t16 = np.arange(16000) / 16000
  np.testing.assert_allclose(x[1000:-1000], 0.75 * np.sin(2 * np.pi * 440 * t16)[1000:-1000], atol=1e-3)


def test_load_audio_errors(tmp_path):
  empty = tmp_path / "empty.wav"
  sf.write(empty, np.zeros((0,), np.float32), 16000)
  nan = tmp_path / "nan.wav"
  sf.write(nan, np.array([0.0, np.nan, 0.1], np.float32), 16000, subtype="FLOAT")
  garbage = tmp_path / "garbage.wav"
  garbage.write_bytes(os.urandom(1000))
  for path in (empty, nan, garbage):
    with pytest.raises(ValueError, match=path.name):
      audio_io.load_audio(path)
  with pytest.raises(FileNotFoundError):
    audio_io.load_audio(tmp_path / "missing.wav")


def test_write_audio_round_trip(tmp_path, speech):
  path = tmp_path / "out.wav"
  audio_io.write_audio(path, speech[1], 16000)
  audio_io.write_audio(path, speech[1], 16000)  # overwrite in place
  np.testing.assert_allclose(audio_io.load_audio(path), speech[1], atol=1 / 32768)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out.wav"]  # no temp files left
  flt = tmp_path / "float.wav"
  y = np.random.default_rng(1).uniform(-1, 1, 5000).astype(np.float32)
  audio_io.write_audio(flt, y, 24000, subtype="FLOAT")
  assert sf.info(flt).samplerate == 24000
  np.testing.assert_array_equal(sf.read(flt, dtype="float32")[0], y)


def test_channel_modes_and_block_reader_equal_whole_file(tmp_path):
  sr = 22050
  rng = np.random.default_rng(0)
  stereo = (0.3 * rng.standard_normal((sr * 3, 2))).astype(np.float32)
  path = tmp_path / "stereo.flac"
  sf.write(path, stereo, sr, subtype="PCM_24")
  pcm = sf.read(path, dtype="float32")[0]
  for channel, ref in (("mean", pcm.mean(axis=1)), ("first", pcm[:, 0])):
    whole = audio_io.load_audio(path, target_sr=sr, channel=channel)
    np.testing.assert_array_equal(whole, ref.astype(np.float32))
    with audio_io.AudioReader(path, block=5000, target_sr=sr, channel=channel) as r:
      np.testing.assert_array_equal(np.concatenate(list(r.blocks())), whole)
  # Resampled block-wise reading matches whole-file resampling (soxr streaming vs one shot).
  whole16 = audio_io.load_audio(path)
  with audio_io.AudioReader(path, block=4096) as r:
    blocks16 = np.concatenate(list(r.blocks()))
  assert abs(len(blocks16) - len(whole16)) <= 1
  n = min(len(blocks16), len(whole16))
  np.testing.assert_allclose(blocks16[:n], whole16[:n], atol=1e-4)
  with pytest.raises(ValueError, match="channel"):
    audio_io.load_audio(path, channel="left")


def test_write_audio_blocks_exact_length_and_rate(tmp_path):
  y = (0.5 * np.sin(np.arange(16000) / 10)).astype(np.float32)
  out = tmp_path / "o.wav"
  n = audio_io.write_audio_blocks(out, [y[:7000], y[7000:]], 16000, 16000, 44100, subtype="FLOAT")
  assert n == 44100 and sf.info(out).frames == 44100 and sf.info(out).samplerate == 44100
  with pytest.raises(ValueError, match="extension"):
    audio_io.write_audio_blocks(tmp_path / "noext", [y], 16000)


def test_find_audio_files_one_rule(tmp_path):
  for rel in ("a.wav", "b.FLAC", "sub/c.ogg", ".hidden/d.wav", "sub/.e.wav", "notes.txt", "out/f.wav"):
    p = tmp_path / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"")
  found = [p.relative_to(tmp_path).as_posix() for p in audio_io.find_audio_files(tmp_path, exclude=tmp_path / "out")]
  assert found == ["a.wav", "b.FLAC", "sub/c.ogg"]
  with pytest.raises(FileNotFoundError):
    audio_io.find_audio_files(tmp_path / "missing")


def test_atomic_writes_leave_nothing_on_failure(tmp_path):
  path = tmp_path / "x.json"
  files.write_json_atomic(path, {"a": 1})
  assert oct(path.stat().st_mode & 0o777) == "0o644"
  with pytest.raises(RuntimeError):
    with files.atomic_path(path) as tmp:
      pathlib.Path(tmp).write_text("half")
      raise RuntimeError("boom")
  assert path.read_text().strip() == '{\n "a": 1\n}' and sorted(os.listdir(tmp_path)) == ["x.json"]
  with pytest.raises(IsADirectoryError):
    files.write_bytes_atomic(tmp_path, b"")
  with pytest.raises(FileNotFoundError, match="output folder does not exist"):
    files.write_bytes_atomic(tmp_path / "no" / "x.bin", b"")
