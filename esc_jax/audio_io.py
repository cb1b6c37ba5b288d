"""Audio files: which files count as audio, whole-file and block-wise reading and writing.

Reading gives mono float32 at the model rate (16 kHz): channels are mixed by
their mean (`channel="mean"`, the default) or the first channel is taken
(`channel="first"`, the original's scripts), then resampled with soxr (VHQ).
Writing is atomic (`esc_jax.files.atomic_path`). Every failure is a
FileNotFoundError or a ValueError with one line naming the file and the problem.
"""
from __future__ import annotations

import os
from typing import Iterable, Iterator

import numpy as np

from esc_jax.files import atomic_path, find_files

MODEL_RATE = 16000
# What libsndfile reads (soundfile); the one list used by training, evaluation and the CLI.
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".au",
                    ".caf", ".w64", ".rf64")
BLOCK_SAMPLES = 1 << 16  # samples per block of block-wise reading / writing
CHANNEL_MODES = ("mean", "first")


def find_audio_files(folder, exclude=None) -> list:
  """Audio files under `folder` (recursive, sorted, hidden entries skipped)."""
  return find_files(folder, AUDIO_EXTENSIONS, exclude)


def one_line(e: BaseException) -> str:
  """The last line of an exception's message (libsndfile's are multi-line), or its type."""
  s = str(e).strip()
  return s.splitlines()[-1] if s else type(e).__name__


def to_mono(data: np.ndarray, channel: str = "mean") -> np.ndarray:
  """(L, C) float samples -> (L,) float32: channel mean or the first channel."""
  if channel == "mean" and data.shape[1] > 1:
    return data.mean(axis=1, dtype=np.float32)
  if channel in CHANNEL_MODES:  # the mean of one channel is that channel, exactly
    return np.ascontiguousarray(data[:, 0], dtype=np.float32)
  raise ValueError(f"channel must be one of {CHANNEL_MODES}, got {channel!r}")


def _check_finite(data: np.ndarray, path: str) -> None:
  if data.size and not np.all(np.isfinite(data)):
    raise ValueError(f"audio file {path} contains NaN or infinite samples")


def _open(path: str):
  import soundfile as sf
  if not os.path.isfile(path):
    raise FileNotFoundError(f"audio file not found: {path}")
  try:
    return sf.SoundFile(path)
  except Exception as e:  # libsndfile raises several types for corrupt files
    raise ValueError(f"cannot read audio file {path}: {one_line(e)}") from None


def load_audio(path, target_sr: int = MODEL_RATE, channel: str = "mean") -> np.ndarray:
  """Reads a whole audio file as (L,) float32 mono at `target_sr`.

  Raises FileNotFoundError (no such file) or ValueError (unreadable or corrupt,
  empty, non-finite samples).
  """
  path = os.fspath(path)
  with _open(path) as f:
    try:
      data = f.read(dtype="float32", always_2d=True)
    except Exception as e:
      raise ValueError(f"cannot read audio file {path}: {one_line(e)}") from None
    sr = int(f.samplerate)
  if data.size == 0:
    raise ValueError(f"audio file {path} is empty (no samples)")
  _check_finite(data, path)
  x = to_mono(data, channel)
  if sr != target_sr:
    import soxr
    x = soxr.resample(x, sr, target_sr, quality="VHQ")
  return np.ascontiguousarray(x, dtype=np.float32)


def _format_of(path: str) -> str:
  ext = os.path.splitext(path)[1].lstrip(".").upper()
  if not ext:
    raise ValueError(f"cannot write {path}: no file extension to pick the format from")
  return ext


def write_audio(path, audio, sr: int = MODEL_RATE, subtype: str | None = None) -> None:
  """Writes (L,) or (L, C) float audio atomically; the format follows the extension.

  Samples are clipped to [-1, 1] unless `subtype` is FLOAT/DOUBLE (default
  subtype: the format's, PCM_16 for WAV).
  """
  import soundfile as sf

  path = os.fspath(path)
  audio = np.asarray(audio, dtype=np.float32)
  if audio.ndim not in (1, 2) or audio.shape[0] == 0:
    raise ValueError(f"cannot write {path}: expected non-empty (L,) or (L, C) audio, got {audio.shape}")
  if not np.all(np.isfinite(audio)):
    raise ValueError(f"cannot write {path}: audio contains NaN or infinite samples")
  fmt = _format_of(path)
  if subtype is None or subtype.upper() not in ("FLOAT", "DOUBLE"):
    audio = np.clip(audio, -1.0, 1.0)
  with atomic_path(path) as tmp:
    sf.write(tmp, audio, sr, subtype=subtype, format=fmt)


class AudioReader:
  """A sound file read block by block as mono float32 at `target_sr` (bounded memory).

  Same mixing and resampling as `load_audio` (soxr.ResampleStream, VHQ).

    with AudioReader(path) as r:
      for block in r.blocks(): ...
  """

  def __init__(self, path, block: int = BLOCK_SAMPLES, target_sr: int = MODEL_RATE, channel: str = "mean"):
    self.path = os.fspath(path)
    to_mono(np.zeros((0, 1), np.float32), channel)  # validates `channel`
    self._f = _open(self.path)
    self.sample_rate = int(self._f.samplerate)
    self.channels = int(self._f.channels)
    self.target_sr, self.block, self.channel = target_sr, block, channel
    if self._f.frames == 0:
      self._f.close()
      raise ValueError(f"audio file {self.path} is empty (no samples)")

  @property
  def frames(self) -> int:
    """Length in samples at the file's own rate (as its header says)."""
    return int(self._f.frames)

  def close(self) -> None:
    self._f.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def blocks(self) -> Iterator[np.ndarray]:
    """Yields (n,) float32 blocks at `target_sr`; ValueError on bad data."""
    import soxr

    rs = None
    if self.sample_rate != self.target_sr:
      rs = soxr.ResampleStream(self.sample_rate, self.target_sr, 1, dtype="float32", quality="VHQ")
    total = 0
    while True:
      try:
        data = self._f.read(self.block, dtype="float32", always_2d=True)
      except Exception as e:
        raise ValueError(f"cannot read audio file {self.path}: {one_line(e)}") from None
      last = len(data) < self.block
      _check_finite(data, self.path)
      x = to_mono(data, self.channel)
      total += len(x)
      if rs is not None:
        x = rs.resample_chunk(x, last=last)
      if len(x):
        yield np.ascontiguousarray(x, dtype=np.float32)
      if last:
        break
    if total == 0:
      raise ValueError(f"audio file {self.path} is empty (no samples)")


def write_audio_blocks(path, blocks: Iterable[np.ndarray], num_samples: int, sample_rate: int = MODEL_RATE,
                       out_rate: int | None = None, subtype: str = "PCM_16") -> int:
  """Writes mono float blocks at `sample_rate` to `path` incrementally and atomically.

  The output is resampled to `out_rate` (default `sample_rate`) with
  soxr.ResampleStream and has exactly round(num_samples * out_rate /
  sample_rate) samples (trimmed or zero-padded at the end). Returns that length.
  """
  import soundfile as sf
  import soxr

  path = os.fspath(path)
  out_rate = int(out_rate or sample_rate)
  target = int(round(num_samples * out_rate / sample_rate))
  fmt = _format_of(path)
  rs = None
  if out_rate != sample_rate:
    rs = soxr.ResampleStream(sample_rate, out_rate, 1, dtype="float32", quality="VHQ")
  clip = subtype.upper() not in ("FLOAT", "DOUBLE")
  with atomic_path(path) as tmp:
    try:
      f = sf.SoundFile(tmp, "w", samplerate=out_rate, channels=1, subtype=subtype, format=fmt)
    except Exception as e:
      raise ValueError(f"cannot write {path}: {one_line(e)}") from None
    with f:
      written = 0

      def put(y):
        nonlocal written
        y = y[:target - written]
        if clip:
          y = np.clip(y, -1.0, 1.0)
        if len(y):
          f.write(y)
          written += len(y)

      for b in blocks:
        b = np.asarray(b, np.float32)
        put(rs.resample_chunk(b) if rs is not None else b)
      if rs is not None:
        put(rs.resample_chunk(np.zeros(0, np.float32), last=True))
      if written < target:
        put(np.zeros(target - written, np.float32))
  return target
