"""Audio files and streams: which files count as audio, whole-file and block-wise I/O.

Reading gives mono float32 at the model rate (16 kHz): channels are mixed by
their mean (`channel="mean"`, the default) or the first channel is taken
(`channel="first"`, the original's scripts), then resampled with soxr (VHQ).
Files are read with libsndfile (`AudioReader`); a byte stream such as
standard input is read as WAV or raw PCM as its bytes arrive
(`WavStreamReader`). `AudioWriter` writes blocks incrementally to a file
(atomically, `esc_jax.files.atomic_path`) or as WAV to a byte stream.
Every failure is a FileNotFoundError or a ValueError with one line naming the
file and the problem.
"""
from __future__ import annotations

import contextlib
import io
import os
import struct
from typing import BinaryIO, Iterable, Iterator

import numpy as np

from esc_jax.files import atomic_path, find_files, is_path, seekable

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


def _resampler(rate: int, target_sr: int):
  """A soxr.ResampleStream (VHQ, mono float32) from `rate` to `target_sr`, or None if equal."""
  if rate == target_sr:
    return None
  import soxr
  return soxr.ResampleStream(rate, target_sr, 1, dtype="float32", quality="VHQ")


def _at_rate(x: np.ndarray, rs, last: bool) -> np.ndarray:
  """A mono block through the block reader's resampler (None: already at the target rate)."""
  if rs is not None:
    x = rs.resample_chunk(x, last=last)
  return np.ascontiguousarray(x, dtype=np.float32)


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
    self.input_frames = 0  # frames read so far at the file's rate
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
    rs = _resampler(self.sample_rate, self.target_sr)
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
      self.input_frames = total
      x = _at_rate(x, rs, last)
      if len(x):
        yield x
      if last:
        break
    if total == 0:
      raise ValueError(f"audio file {self.path} is empty (no samples)")


# ---- byte streams (pipes) ----------------------------------------------------

WAV_UNKNOWN_SIZE = 0xFFFFFFFF  # RIFF / data size of a WAV stream whose length is not known yet
_WAVE_PCM, _WAVE_FLOAT, _WAVE_EXTENSIBLE = 1, 3, 0xFFFE


def _read_exact(f: BinaryIO, n: int) -> bytes:
  data = b""
  while len(data) < n:
    chunk = f.read(n - len(data))
    if not chunk:
      break
    data += chunk
  return data


def _read_some(f: BinaryIO, n: int) -> bytes:
  """Up to n bytes, as soon as any are available (`read1` on buffered pipes: no waiting for n)."""
  read1 = getattr(f, "read1", None)
  return read1(n) if read1 is not None else f.read(n)


class WavStreamReader:
  """Mono float32 blocks at `target_sr` from a WAV (or raw PCM) byte stream, e.g. standard input.

    r = WavStreamReader(sys.stdin.buffer)            # reads the WAV header
    r = WavStreamReader(f, raw_rate=16000)           # headerless: s16le mono PCM
    for block in r.blocks(): ...                     # as the bytes arrive
    r.input_frames                                   # frames read, at r.sample_rate

  WAV: PCM 8/16/24/32-bit, IEEE float 32/64-bit, WAVE_FORMAT_EXTENSIBLE; a
  data size of 0 or 0xFFFFFFFF (a stream of unknown length) reads to the
  end of the stream. Samples are scaled as libsndfile scales them, so a WAV
  file gives the same blocks through either reader. Blocks are yielded as
  soon as bytes arrive (no waiting for a full block), so a pipe's latency is
  not raised here. Same mixing and resampling as `AudioReader`.
  """

  def __init__(self, f: BinaryIO, raw_rate: int | None = None, block: int = BLOCK_SAMPLES,
               target_sr: int = MODEL_RATE, channel: str = "mean", name: str = "standard input"):
    to_mono(np.zeros((0, 1), np.float32), channel)  # validates `channel`
    self._f, self.name = f, name
    self.target_sr, self.block, self.channel = target_sr, block, channel
    self.input_frames = 0
    self._remaining = None  # data bytes left (None: to the end of the stream)
    if raw_rate is not None:
      if not 0 < int(raw_rate) <= 768000:
        raise ValueError(f"raw sample rate must be in 1..768000 Hz, got {raw_rate}")
      self.sample_rate, self.channels, self._dtype, self._scale = int(raw_rate), 1, np.dtype("<i2"), 32768.0
    else:
      self._read_header()

  def _bad(self, what: str) -> ValueError:
    return ValueError(f"cannot read {self.name}: {what}")

  def _read_header(self) -> None:
    head = _read_exact(self._f, 12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
      if not head:
        raise self._bad("no data (empty input)")
      raise self._bad("not a WAV stream (no RIFF/WAVE header; raw PCM needs --raw RATE)")
    fmt = None
    while True:
      chunk = _read_exact(self._f, 8)
      if len(chunk) < 8:
        raise self._bad("WAV stream ends before its data chunk")
      cid, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
      if cid == b"data":
        if fmt is None:
          raise self._bad("WAV data chunk before its fmt chunk")
        self._remaining = None if size in (0, WAV_UNKNOWN_SIZE) else size
        return
      if size > 1 << 20:
        raise self._bad(f"WAV {cid!r} chunk of {size} bytes before the data")
      body = _read_exact(self._f, size + (size & 1))
      if len(body) < size:
        raise self._bad("WAV stream ends inside its header")
      if cid == b"fmt ":
        fmt = self._parse_fmt(body[:size])

  def _parse_fmt(self, body: bytes) -> bool:
    if len(body) < 16:
      raise self._bad("WAV fmt chunk too short")
    tag, channels, rate, _, align, bits = struct.unpack_from("<HHIIHH", body)
    if tag == _WAVE_EXTENSIBLE and len(body) >= 26:
      tag = struct.unpack_from("<H", body, 24)[0]  # the sub-format GUID starts with the tag
    kinds = {(_WAVE_PCM, 8): ("u1", 128.0), (_WAVE_PCM, 16): ("<i2", 32768.0), (_WAVE_PCM, 24): ("i3", 2.0**23),
             (_WAVE_PCM, 32): ("<i4", 2.0**31), (_WAVE_FLOAT, 32): ("<f4", 1.0), (_WAVE_FLOAT, 64): ("<f8", 1.0)}
    if (tag, bits) not in kinds:
      raise self._bad(f"unsupported WAV encoding (format tag {tag}, {bits} bits; PCM 8/16/24/32 or float 32/64)")
    if channels == 0 or rate == 0 or align != channels * bits // 8:
      raise self._bad(f"invalid WAV fmt chunk ({channels} channels, {rate} Hz, block align {align})")
    kind, self._scale = kinds[(tag, bits)]
    self._dtype = kind if kind == "i3" else np.dtype(kind)
    self.sample_rate, self.channels = rate, channels
    return True

  @property
  def _frame_bytes(self) -> int:
    return self.channels * (3 if self._dtype == "i3" else self._dtype.itemsize)

  def _samples(self, data: bytes) -> np.ndarray:
    """(n, C) float32 of whole frames in `data`, scaled as libsndfile does."""
    if self._dtype == "i3":
      b = np.frombuffer(data, np.uint8).reshape(-1, 3).astype(np.int32)
      v = ((b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8) >> 8  # sign-extend 24 bits
    else:
      v = np.frombuffer(data, self._dtype)
    if self._dtype == np.dtype("u1"):
      v = v.astype(np.float32) - 128.0
    x = (v / self._scale if self._scale != 1.0 else v).astype(np.float32)
    return x.reshape(-1, self.channels)

  def blocks(self) -> Iterator[np.ndarray]:
    """Yields (n,) float32 blocks at `target_sr`; ValueError on bad data."""
    rs = _resampler(self.sample_rate, self.target_sr)
    fb, rest = self._frame_bytes, b""
    while True:
      want = self.block * fb if self._remaining is None else min(self.block * fb, self._remaining)
      data = _read_some(self._f, want) if want else b""
      if self._remaining is not None:
        self._remaining -= len(data)
      last = not data
      data = rest + data
      whole = len(data) // fb * fb
      data, rest = data[:whole], data[whole:]
      x = self._samples(data)
      _check_finite(x, self.name)
      x = to_mono(x, self.channel)
      self.input_frames += len(x)
      x = _at_rate(x, rs, last)
      if len(x):
        yield x
      if last:
        break
    if self.input_frames == 0:
      raise self._bad("no audio samples")


def wav_header(rate: int, channels: int = 1, subtype: str = "PCM_16", frames: int | None = None) -> bytes:
  """A 44-byte WAV header (PCM_16 or FLOAT); frames None = unknown length (sizes 0xFFFFFFFF)."""
  tag, width = {"PCM_16": (_WAVE_PCM, 2), "FLOAT": (_WAVE_FLOAT, 4)}[subtype.upper()]
  data = WAV_UNKNOWN_SIZE if frames is None else frames * channels * width
  riff = WAV_UNKNOWN_SIZE if frames is None else min(36 + data, WAV_UNKNOWN_SIZE)
  return (b"RIFF" + struct.pack("<I", riff) + b"WAVEfmt " + struct.pack(
      "<IHHIIHH", 16, tag, channels, rate, rate * channels * width, channels * width, 8 * width)
      + b"data" + struct.pack("<I", min(data, WAV_UNKNOWN_SIZE)))


class _WavStreamSink:
  """Mono WAV to a byte stream: header first (length unknown), then samples as they come."""

  def __init__(self, f: BinaryIO, rate: int, subtype: str):
    if subtype.upper() not in ("PCM_16", "FLOAT"):
      raise ValueError(f"a WAV stream is written as PCM_16 or FLOAT, not {subtype}")
    self._f, self.rate, self.subtype = f, rate, subtype.upper()
    self._origin = f.tell() if seekable(f) else None
    self.frames = 0
    self._started = False

  def write(self, y: np.ndarray) -> None:
    import soundfile as sf
    if not self._started:
      self._started = True
      self._f.write(wav_header(self.rate, 1, self.subtype))
    if len(y):
      buf = io.BytesIO()  # libsndfile's own sample conversion, as in the files it writes
      sf.write(buf, y, self.rate, subtype=self.subtype, format="RAW", endian="LITTLE")
      self._f.write(buf.getvalue())
      self.frames += len(y)
    self._f.flush()

  def close(self) -> None:
    if not self._started:
      self.write(np.zeros(0, np.float32))
    if self._origin is not None:  # a regular file: fill in the sizes
      end = self._f.tell()
      self._f.seek(self._origin)
      self._f.write(wav_header(self.rate, 1, self.subtype, self.frames))
      self._f.seek(end)
    self._f.flush()


class AudioWriter:
  """Mono float blocks at `sample_rate` written as they come, resampled to `out_rate`.

  `write` blocks, then `close(length)`: the output has exactly `length`
  samples at out_rate (the resampler's tail trimmed, or zero-padded). Up to
  HOLD samples are held back until then, so that trimming never needs to
  take back written samples. Use `open_audio_writer`.
  """

  HOLD = 256  # >> the few samples by which a resampled length can exceed the target

  def __init__(self, sink, sample_rate: int, out_rate: int, clip: bool):
    self._sink, self.sample_rate, self.out_rate, self._clip = sink, sample_rate, out_rate, clip
    self._rs = _resampler(sample_rate, out_rate)
    self._held = np.zeros(0, np.float32)
    self.written = 0

  def _put(self, y: np.ndarray) -> None:
    if self._clip:
      y = np.clip(y, -1.0, 1.0)
    if len(y):
      self._sink.write(y)
      self.written += len(y)

  def write(self, block) -> None:
    b = np.asarray(block, np.float32).reshape(-1)
    if self._rs is not None:
      b = self._rs.resample_chunk(b)
    self._held = np.concatenate([self._held, b]) if len(self._held) else b
    if len(self._held) > self.HOLD:
      self._put(self._held[:-self.HOLD])
      self._held = self._held[-self.HOLD:]

  def close(self, length: int) -> int:
    """Writes the rest, trimmed or zero-padded to `length` samples in all; returns `length`."""
    if self._rs is not None:
      self.write(np.zeros(0, np.float32))
      tail = self._rs.resample_chunk(np.zeros(0, np.float32), last=True)
      self._held = np.concatenate([self._held, tail])
    rest = length - self.written
    if rest < 0:
      raise ValueError(f"wrote {self.written} samples, more than the {length} wanted")
    self._put(self._held[:rest])
    if self.written < length:
      self._put(np.zeros(length - self.written, np.float32))
    return length


def _clips(subtype: str) -> bool:
  """Whether samples must be clipped to [-1, 1] for `subtype` (all but float formats)."""
  return subtype.upper() not in ("FLOAT", "DOUBLE")


@contextlib.contextmanager
def open_audio_writer(dst, sample_rate: int = MODEL_RATE, out_rate: int | None = None,
                      subtype: str | None = None) -> Iterator[AudioWriter]:
  """An `AudioWriter` to a file path (atomic; format by extension) or a binary stream (WAV).

  subtype: a soundfile subtype; None = PCM_16 for WAV and streams, else the format's default.

  A path is complete only after the block exits without error (a failure
  leaves nothing). A stream gets the WAV header with the first samples and
  unknown sizes (0xFFFFFFFF), filled in at the end when it is seekable; what
  was written before a failure stays written.
  """
  import soundfile as sf

  out_rate = int(out_rate or sample_rate)
  if not is_path(dst):
    subtype = subtype or "PCM_16"
    sink = _WavStreamSink(dst, out_rate, subtype)
    yield AudioWriter(sink, sample_rate, out_rate, _clips(subtype))
    sink.close()
    return
  path = os.fspath(dst)
  fmt = _format_of(path)
  with atomic_path(path) as tmp:
    try:
      subtype = subtype or ("PCM_16" if fmt == "WAV" else sf.default_subtype(fmt))
      f = sf.SoundFile(tmp, "w", samplerate=out_rate, channels=1, subtype=subtype, format=fmt)
    except Exception as e:
      raise ValueError(f"cannot write {path}: {one_line(e)}") from None
    clip = _clips(f.subtype)
    with f:
      yield AudioWriter(f, sample_rate, out_rate, clip)


def write_audio_blocks(path, blocks: Iterable[np.ndarray], num_samples: int, sample_rate: int = MODEL_RATE,
                       out_rate: int | None = None, subtype: str | None = None) -> int:
  """Writes mono float blocks at `sample_rate` to `path` incrementally and atomically.

  The output is resampled to `out_rate` (default `sample_rate`) with
  soxr.ResampleStream and has exactly round(num_samples * out_rate /
  sample_rate) samples (trimmed or zero-padded at the end). Returns that length.
  """
  out_rate = int(out_rate or sample_rate)
  with open_audio_writer(path, sample_rate, out_rate, subtype) as w:
    for b in blocks:
      w.write(b)
    return w.close(int(round(num_samples * out_rate / sample_rate)))
