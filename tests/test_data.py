"""The training input pipeline (esc_jax.data): folders, resampling, crops, state."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import soundfile as sf

from esc_jax import audio_io, data

CLIP = 15920


def _tone(sr, seconds, freq=440.0, channels=1):
  t = np.arange(int(sr * seconds)) / sr
  x = 0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * np.random.default_rng(int(freq)).standard_normal(t.size)
  x = x.astype(np.float32)
  return np.stack([x, 0.5 * x], 1) if channels == 2 else x


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """wav + flac at 8 / 16 / 44.1 kHz, mono and stereo, nested, plus a corrupt file."""
  root = tmp_path_factory.mktemp("audio")
  (root / "a" / "b").mkdir(parents=True)
  sf.write(root / "a" / "one.wav", _tone(16000, 2.0, 300), 16000)
  sf.write(root / "a" / "b" / "two.flac", _tone(44100, 2.5, 500, channels=2), 44100)
  sf.write(root / "three.WAV", _tone(8000, 0.3, 700), 8000)  # shorter than a clip
  (root / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
  (root / "notes.txt").write_text("not audio")
  return root


def _names(files):
  return sorted(f.path.rsplit("/", 1)[1] for f in files)


def test_scan_recursive_skips_corrupt(folder, caplog):
  with caplog.at_level(logging.WARNING):
    files = data.scan_audio_files(folder)
  assert _names(files) == ["one.wav", "three.WAV", "two.flac"]
  assert "broken.wav" in caplog.text
  rates = {f.path.rsplit("/", 1)[1]: (f.sample_rate, f.frames_at()) for f in files}
  assert rates["two.flac"] == (44100, 40000) and rates["three.WAV"] == (8000, 4800)


def test_empty_or_unreadable_folder_is_a_clear_error(tmp_path):
  with pytest.raises(data.DataError, match="no audio files"):
    data.scan_audio_files(tmp_path)
  with pytest.raises(data.DataError, match="does not exist"):
    data.scan_audio_files(tmp_path / "missing")
  (tmp_path / "bad.flac").write_bytes(b"fLaC garbage")
  with pytest.raises(data.DataError, match="none of the 1 audio files"):
    data.scan_audio_files(tmp_path)


def test_crop_is_the_resampled_mono_file(folder):
  files = {f.path.rsplit("/", 1)[1]: f for f in data.scan_audio_files(folder)}
  f = files["two.flac"]  # 44.1 kHz stereo: the crop reads and resamples only a segment
  full = audio_io.load_audio(f.path)
  for offset in (0, 777, 40000 - CLIP):
    clip = data.read_clip(f, offset, CLIP)
    assert clip.shape == (CLIP,) and clip.dtype == np.float32
    np.testing.assert_allclose(clip, full[offset:offset + CLIP], atol=1e-4)
  short = data.read_clip(files["three.WAV"], 0, CLIP)  # 0.3 s at 8 kHz -> 4800 samples + zeros
  np.testing.assert_allclose(short[:4700], audio_io.load_audio(files["three.WAV"].path)[:4700], atol=1e-4)
  assert np.all(short[4800:] == 0) and np.abs(short[:4800]).max() > 0.1


def test_batches_exact_length_deterministic(folder):
  def first(seed, n=3):
    it = data.train_iterator(data.scan_audio_files(folder), CLIP, batch_size=4, seed=seed, process_index=0, process_count=1)
    out = [next(it) for _ in range(n)]
    it.close()
    return out
  a, b, c = first(0), first(0), first(1)
  for x in a:
    assert x.shape == (4, CLIP) and x.dtype == np.float32 and np.all(np.isfinite(x))
    assert np.all(np.abs(x).max(axis=1) > 0.05)  # every row holds audio
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_iterator_state_restores_next_batch(folder):
  it = data.train_iterator(data.scan_audio_files(folder), CLIP, batch_size=2, seed=3, process_index=0, process_count=1)
  for _ in range(4):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(2)]
  it.close()
  it2 = data.train_iterator(data.scan_audio_files(folder), CLIP, batch_size=2, seed=3, process_index=0, process_count=1)
  it2.set_state(state)
  for e in expected:
    np.testing.assert_array_equal(next(it2), e)
  it2.close()


def test_process_shards_make_up_the_global_batch(folder):
  files = data.scan_audio_files(folder)
  glob = data.train_dataset(files, CLIP, batch_size=4, seed=5)
  shards = [data.train_dataset(files, CLIP, batch_size=4, seed=5, process_index=p, process_count=2)
            for p in range(2)]
  for k in range(3):  # process p's row j of step k is row 2j + p of the global batch
    g = glob[k]
    np.testing.assert_array_equal(shards[0][k], g[0::2])
    np.testing.assert_array_equal(shards[1][k], g[1::2])


def test_file_failing_after_scan_is_skipped(folder, tmp_path, caplog):
  files = data.scan_audio_files(folder)
  bad = data.AudioFile(str(tmp_path / "vanished.wav"), 32000, 16000)
  crop = data.RandomCrop([bad] + files, CLIP)
  with caplog.at_level(logging.WARNING):
    x = crop(0, np.random.default_rng(0))  # falls through to the next file
  assert x.shape == (CLIP,) and np.abs(x).max() > 0.05
  assert "vanished.wav" in caplog.text
  with pytest.raises(data.DataError, match="none of the 1 training files"):
    data.RandomCrop([bad], CLIP)(0, np.random.default_rng(0))


def test_epoch_length():
  assert data.steps_per_epoch(40, 4) == 10 and data.steps_per_epoch(41, 4) == 10 and data.steps_per_epoch(3, 4) == 1


def test_worker_processes_give_the_same_stream(folder):
  kw = dict(batch_size=2, seed=7, process_index=0, process_count=1)
  it0 = data.train_iterator(data.scan_audio_files(folder), CLIP, num_workers=0, **kw)
  it2 = data.train_iterator(data.scan_audio_files(folder), CLIP, num_workers=2, **kw)
  try:
    for _ in range(3):
      np.testing.assert_array_equal(next(it0), next(it2))
  finally:
    it0.close()
    it2.close()


def _libsndfile_clip(f, offset, n, sr=16000):
  """read_clip as first written: libsndfile's float32 samples, channel mean, np.pad (the reference)."""
  import math
  import soxr
  if f.sample_rate == sr:
    start, count, skip = offset, n, 0
  else:
    g = math.gcd(f.sample_rate, sr)
    period_in, period_out = f.sample_rate // g, sr // g
    k = -(-256 // period_in)
    first = max(0, int(offset * f.sample_rate / sr // period_in) - k)
    start, skip = first * period_in, offset - first * period_out
    count = int(math.ceil((offset + n) * f.sample_rate / sr)) - start + k * period_in
  x = sf.read(f.path, frames=max(count, 0), start=start, dtype="float32", always_2d=True)[0]
  x = x.mean(axis=1, dtype=np.float32)
  if f.sample_rate != sr and x.size:
    x = soxr.resample(x, f.sample_rate, sr, quality="VHQ")[skip:]
  return np.pad(x[:n], (0, n - x[:n].size)).astype(np.float32)


def test_fast_reading_gives_the_same_clips_and_batches(folder, tmp_path, monkeypatch):
  """read_clip (16-bit PCM read as int16 and scaled, mono without a mean, one allocation)
  == libsndfile's float32 conversion: the same clips, bit for bit, hence the same batches."""
  sf.write(tmp_path / "float.wav", _tone(16000, 1.5, 350), 16000, subtype="FLOAT")
  sf.write(tmp_path / "pcm24.wav", _tone(44100, 1.5, 450, channels=2), 44100, subtype="PCM_24")
  sf.write(tmp_path / "pcm16.flac", _tone(22050, 1.5, 550), 22050, subtype="PCM_16")
  files = data.scan_audio_files(folder) + data.scan_audio_files(tmp_path)
  subtypes = {sf.info(f.path).subtype for f in files}
  assert subtypes == {"PCM_16", "PCM_24", "FLOAT"} and {f.sample_rate for f in files} == {8000, 16000, 22050, 44100}
  for f in files:
    room = max(f.frames_at() - CLIP, 0)
    for offset in sorted({0, 1, 333, room // 2, room}):
      np.testing.assert_array_equal(data.read_clip(f, offset, CLIP), _libsndfile_clip(f, offset, CLIP),
                                    err_msg=f"{f.path} at {offset}")
  ds = data.train_dataset(files, CLIP, batch_size=4, seed=11)
  new = [ds[k] for k in range(4)]
  monkeypatch.setattr(data, "read_clip", _libsndfile_clip)
  for k, x in enumerate(new):
    np.testing.assert_array_equal(x, ds[k])
