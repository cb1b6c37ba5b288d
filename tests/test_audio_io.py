"""Audio files (esc_jax.audio_io, esc_jax.files): reading, writing, finding, atomic writes."""
from __future__ import annotations

import io
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
  with pytest.raises(FileNotFoundError, match="empty path"):  # not the current folder
    audio_io.find_audio_files("")


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


def test_strict_json_rows_and_codec_overwrite(tmp_path, tiny, tiny_config):
  """NaN metrics are written as null (strict JSON); save_codec overwrites past a stale `.old` folder."""
  import json
  from esc_jax import checkpoint, metric_writer
  w = metric_writer.MetricWriter(tmp_path / "m.jsonl")
  w.write(3, {"pesq": float("nan"), "loss": np.float32(0.5)}, prefix="val")
  assert json.loads((tmp_path / "m.jsonl").read_text()) == {"step": 3, "val/pesq": None, "val/loss": 0.5}
  assert files.json_safe({"a": [np.float64("inf"), np.int64(2)]}) == {"a": [None, 2]}
  model, params = tiny
  d = checkpoint.save_codec(tmp_path / "codec", params, tiny_config)
  (tmp_path / ".codec.old" / "junk").mkdir(parents=True)  # an interrupted overwrite's leftover
  checkpoint.save_codec(d, params, tiny_config, overwrite=True)
  assert not (tmp_path / ".codec.old").exists()
  assert checkpoint.restore_variables(d, model)["params"].keys() == params.keys()


# ---- byte streams (pipes) ----------------------------------------------------


class _Pipe(io.RawIOBase):
  """A non-seekable byte source returning at most `step` bytes per read (like a slow pipe)."""

  def __init__(self, data: bytes, step: int = 1000):
    self.data, self.pos, self.step = data, 0, step

  def readable(self):
    return True

  def readinto(self, b):
    n = min(len(b), self.step, len(self.data) - self.pos)
    b[:n] = self.data[self.pos:self.pos + n]
    self.pos += n
    return n


@pytest.mark.parametrize("subtype, channels, rate", [("PCM_16", 1, 16000), ("PCM_24", 2, 16000),
                                                     ("PCM_32", 1, 8000), ("PCM_U8", 1, 16000),
                                                     ("FLOAT", 3, 44100), ("DOUBLE", 1, 16000)])
def test_wav_stream_reader_equals_file_reader(tmp_path, subtype, channels, rate):
  rng = np.random.default_rng(channels)
  x = (0.5 * rng.standard_normal((12_344, channels))).clip(-1, 1).astype(np.float32)
  path = tmp_path / "a.wav"
  sf.write(path, x, rate, subtype=subtype)
  with audio_io.AudioReader(path) as r:
    want = np.concatenate(list(r.blocks()))
    assert r.input_frames == 12_344
  data = path.read_bytes()
  d = data.index(b"data")  # after fmt (and fact / extensible fields, whatever libsndfile wrote)
  unknown = data[:4] + b"\xff" * 4 + data[8:d + 4] + b"\xff" * 4 + data[d + 8:]  # as a pipe writer does
  for blob in (data, unknown):
    r = audio_io.WavStreamReader(io.BufferedReader(_Pipe(blob, 777)), block=4096)
    got = np.concatenate(list(r.blocks()))
    assert (r.sample_rate, r.channels, r.input_frames) == (rate, channels, 12_344)
    np.testing.assert_array_equal(got, want)  # same scaling, mixing and resampling as libsndfile's


def test_wav_stream_reader_raw_and_errors():
  x = np.random.default_rng(0).integers(-32768, 32768, 5000).astype("<i2")
  r = audio_io.WavStreamReader(io.BytesIO(x.tobytes() + b"\x01"), raw_rate=16000)  # a stray odd byte
  np.testing.assert_array_equal(np.concatenate(list(r.blocks())), x / np.float32(32768))
  assert r.input_frames == 5000
  for data, words in [(b"", "empty input"), (b"OggS" + bytes(40), "not a WAV stream"),
                      (b"RIFF\x00\x00\x00\x00WAVEfmt ", "ends before its data"),
                      (audio_io.wav_header(16000)[:36] + b"data", "ends before its data")]:
    with pytest.raises(ValueError, match=words):
      list(audio_io.WavStreamReader(io.BytesIO(data)).blocks())
  with pytest.raises(ValueError, match="no audio samples"):
    list(audio_io.WavStreamReader(io.BytesIO(audio_io.wav_header(16000, frames=0))).blocks())
  bad = bytearray(audio_io.wav_header(16000))
  bad[20:22] = (2).to_bytes(2, "little")  # ADPCM
  with pytest.raises(ValueError, match="unsupported WAV encoding"):
    audio_io.WavStreamReader(io.BytesIO(bytes(bad)))


def test_audio_writer_to_stream_and_file(tmp_path):
  y = (0.3 * np.sin(np.arange(30_000) / 7)).astype(np.float32)
  out = io.BytesIO()
  with audio_io.open_audio_writer(out, 16000, 44100) as w:
    for i in range(0, len(y), 4321):
      w.write(y[i:i + 4321])
    assert w.close(82_688) == 82_688  # the exact length asked for (soxr gives 82_688 or so)
  z, sr = sf.read(io.BytesIO(out.getvalue()), dtype="float32")
  assert sr == 44100 and len(z) == 82_688
  assert out.getvalue()[4:8] == (36 + 2 * 82_688).to_bytes(4, "little")  # seekable: sizes filled in
  path = tmp_path / "b.wav"  # the same bytes as the stream, through libsndfile
  with audio_io.open_audio_writer(path, 16000, 44100) as w:
    w.write(y)
    w.close(82_687)
  assert sf.info(path).frames == 82_687
  np.testing.assert_array_equal(sf.read(path, dtype="int16")[0], sf.read(io.BytesIO(out.getvalue()),
                                                                         dtype="int16")[0][:82_687])
  chunks = []  # a write-only stream (a pipe): the unknown-size header stays
  stream = type("Pipe", (), {"write": lambda self, b: chunks.append(bytes(b)), "flush": lambda self: None})()
  with audio_io.open_audio_writer(stream, 16000) as w:
    w.write(y[:1000])
    w.close(1000)
  data = b"".join(chunks)
  assert data[:44] == audio_io.wav_header(16000) and len(data) == 44 + 2000
  for ext, subtype in (("ogg", "VORBIS"), ("flac", "PCM_16")):  # lossy formats take their own subtype
    with audio_io.open_audio_writer(tmp_path / f"c.{ext}", 16000) as w:
      w.write(y)
      w.close(len(y))
    info = sf.info(tmp_path / f"c.{ext}")
    assert (info.subtype, info.frames) == (subtype, len(y))
