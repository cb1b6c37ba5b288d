"""Chunked (bounded-memory) compression of long files with a `Codec`.

Why chunking is sound. ESC has no recurrence and no global operation along
time: every layer is local in time. The STFT (hop 80, window 382) and the
patch (de-)embedding convolutions see a few frames; each Swin block attends
inside windows of 4 time patches (2 code frames), shifted by 2 patches every
other block, and patch merge/split only change the frequency axis, so the
time resolution (2 patches per code frame) is the same at every scale. The
exact receptive field is finite but wide (~2 frames per block, 24 blocks in
the encoder + residual decoder path), while in practice attention decays
quickly, so a code frame depends on a neighbourhood of well under a second.

The scheme (`chunk_plan`): windows of W = N + 2C code frames start at
multiples of N (N = `chunk_frames`, 500 = 10 s by default; C =
`context_frames`, 24 = 0.48 s by default). Window k keeps the codes of its
centre [kN + C, kN + N + C) (the first window also keeps its left edge), so
every frame is coded exactly once, with >= C frames of real context on both
sides of every kept frame. The last window ends at the file's last frame
(zero-padded to a valid length exactly as whole-file `Codec.encode` pads),
so the file's edges are coded as in whole-file mode; files of <= W frames are
a single window and give exactly the whole-file codes. Window starts are
multiples of ALIGN_FRAMES = 2 frames (4 time patches): the Swin window grid
(and its shifted twin) and the STFT frame grid of a window then coincide with
those of the whole file; at odd alignments the grids shift and codes drift
(see bench/bench_codec.py). Full windows all have one shape and the tail
window one of two, so jit compiles at most three shapes for any long file.

Decoding uses the same windows: each window of codes is decoded with its
context and only the audio of its kept frames is used; at each boundary the
two windows' audio is cross-faded (raised cosine over `crossfade` samples,
centred on the boundary, well inside both windows' context).

Memory. Audio is read in blocks (`soundfile`), mixed to mono and resampled
with `soxr.ResampleStream`; the encoder buffers at most one window plus one
read block; decoded audio is written block by block (through another
ResampleStream when the output rate is not 16 kHz) to a temporary file that
is renamed into place. Only the codes of the whole file are held: S x G x T'
int32, 6.5 MB for 30 minutes at 9 kbps (and the packed `.esc` payload,
1/3.2 of that). Peak memory is thus independent of the file's length apart
from those codes.
"""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np

from esc_jax import bitstream
from esc_jax.checkpoint import Codec

DEFAULT_CHUNK_FRAMES = 500  # 10 s per window centre
DEFAULT_CONTEXT_FRAMES = 24  # 0.48 s each side; >= ESC-Base's receptive field (`context_frames_for`)
DEFAULT_CROSSFADE = 640  # samples (40 ms) of raised-cosine cross-fade at chunk boundaries
ALIGN_FRAMES = 2  # window starts on multiples of 2 code frames = 4 time patches (one Swin window)
BLOCK_SAMPLES = 1 << 16  # samples per read / write block
MODEL_RATE = 16000


class Window(NamedTuple):
  """Code frames [start, end) are processed; frames [keep_start, keep_end) are kept."""
  start: int
  end: int
  keep_start: int
  keep_end: int


def context_frames_for(codec: Codec) -> int:
  """Context that covers the model's receptive field in time (24 frames for ESC-Base).

  A Swin block widens a token's reach by window/2 patches (window and shifted
  window alternate); `encode` runs the encoder (len(h_dims) layers) and the
  decoder's first max_streams - 2 up layers (residuals of the next streams),
  `decode` max_streams layers. Four more frames cover the STFT window, the
  patch (de-)embedding convolutions and the VQ's frame grouping.
  """
  m = codec.model
  layers = len(m.h_dims) + max(m.max_streams - 2, 0)
  reach = m.swin_depth * layers * (m.window_size // 2) / m.overlap
  c = math.ceil(reach) + 4
  return -(-c // ALIGN_FRAMES) * ALIGN_FRAMES


def check_chunking(chunk_frames: int, context_frames: int) -> None:
  """ValueError unless chunk_frames (0 = whole file) and context_frames are usable."""
  for name, v in (("chunk_frames", chunk_frames), ("context_frames", context_frames)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
      raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
  if chunk_frames % ALIGN_FRAMES:
    raise ValueError(f"chunk_frames must be a multiple of {ALIGN_FRAMES}, got {chunk_frames}")


def chunk_plan(num_frames: int, chunk_frames: int = DEFAULT_CHUNK_FRAMES,
               context_frames: int = DEFAULT_CONTEXT_FRAMES) -> list[Window]:
  """Windows covering `num_frames` code frames (see the module docstring).

  chunk_frames = 0, or num_frames <= chunk_frames + 2 * context_frames, gives
  a single whole-file window.
  """
  check_chunking(chunk_frames, context_frames)
  n, c, t = chunk_frames, context_frames, num_frames
  w = n + 2 * c
  if n == 0 or t <= w:
    return [Window(0, t, 0, t)]
  wins, k = [], 0
  while k * n + w < t:
    s = k * n
    wins.append(Window(s, s + w, s + c if k else 0, s + n + c))
    k += 1
  start = (t - w) // ALIGN_FRAMES * ALIGN_FRAMES
  wins.append(Window(start, t, wins[-1].keep_end, t))
  return wins


# ---------------------------------------------------------------------------
# Audio in / out in blocks
# ---------------------------------------------------------------------------


class AudioReader:
  """A sound file read block by block as mono float32 at 16 kHz.

  Mixes channels by their mean and resamples with `soxr.ResampleStream`
  (VHQ), as `esc_jax.audio.load_audio` does for whole files. Raises
  FileNotFoundError or ValueError (unreadable, empty, non-finite samples).
  """

  def __init__(self, path, block: int = BLOCK_SAMPLES, target_sr: int = MODEL_RATE):
    import soundfile as sf

    self.path = os.fspath(path)
    if not os.path.isfile(self.path):
      raise FileNotFoundError(f"audio file not found: {self.path}")
    try:
      self._f = sf.SoundFile(self.path)
    except Exception as e:  # libsndfile errors
      raise ValueError(f"cannot read audio file {self.path}: {_one_line(e)}") from None
    self.sample_rate = int(self._f.samplerate)
    self.channels = int(self._f.channels)
    self.target_sr = target_sr
    self.block = block
    if self._f.frames == 0:
      self._f.close()
      raise ValueError(f"audio file {self.path} is empty (no samples)")

  @property
  def frames(self) -> int:
    """Length in samples at the file's own rate (as the header says)."""
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
        raise ValueError(f"cannot read audio file {self.path}: {_one_line(e)}") from None
      last = len(data) < self.block
      if len(data) and not np.all(np.isfinite(data)):
        raise ValueError(f"audio file {self.path} contains NaN or infinite samples")
      x = data.mean(axis=1, dtype=np.float32)
      total += len(x)
      if rs is not None:
        x = rs.resample_chunk(x, last=last)
      if len(x):
        yield np.ascontiguousarray(x, dtype=np.float32)
      if last:
        break
    if total == 0:
      raise ValueError(f"audio file {self.path} is empty (no samples)")


@contextlib.contextmanager
def atomic_output(path):
  """Yields a temporary path next to `path`; renamed onto `path` only on success."""
  path = os.fspath(path)
  directory, base = os.path.split(os.path.abspath(path))
  ext = os.path.splitext(base)[1]
  fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=f".tmp{ext}", dir=directory)
  os.close(fd)
  try:
    yield tmp
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def write_audio_blocks(path, blocks: Iterable[np.ndarray], num_samples: int, sample_rate: int = MODEL_RATE,
                       out_rate: int | None = None, subtype: str = "PCM_16") -> int:
  """Writes 16 kHz mono blocks to `path` (WAV etc., by extension) incrementally and atomically.

  The output is resampled to `out_rate` (default: `sample_rate`) with
  `soxr.ResampleStream` and has exactly round(num_samples * out_rate /
  sample_rate) samples (trimmed or zero-padded by the resampler's rounding).
  Returns that length. No file is left at `path` if anything fails.
  """
  import soundfile as sf
  import soxr

  out_rate = int(out_rate or sample_rate)
  target = int(round(num_samples * out_rate / sample_rate))
  ext = os.path.splitext(os.fspath(path))[1].lstrip(".").upper()
  if not ext:
    raise ValueError(f"cannot write {path}: no file extension to pick the format from")
  rs = None
  if out_rate != sample_rate:
    rs = soxr.ResampleStream(sample_rate, out_rate, 1, dtype="float32", quality="VHQ")
  clip = subtype.upper() not in ("FLOAT", "DOUBLE")
  with atomic_output(path) as tmp:
    try:
      f = sf.SoundFile(tmp, "w", samplerate=out_rate, channels=1, subtype=subtype, format=ext)
    except Exception as e:
      raise ValueError(f"cannot write {path}: {_one_line(e)}") from None
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


# ---------------------------------------------------------------------------
# Chunked encode / decode
# ---------------------------------------------------------------------------


class ChunkedEncoder:
  """Online encoder: `push` 16 kHz audio blocks, `finish`, then read `codes`.

    enc = ChunkedEncoder(codec, num_streams=4)
    for block in reader.blocks(): enc.push(block)
    codes = enc.finish()          # (S, G, T') int32, T' = codec.num_frames(n)

  The codes equal `chunk_plan`'s windows encoded one by one; chunk_frames=0
  buffers the whole file and gives exactly `codec.encode`'s codes.
  """

  def __init__(self, codec: Codec, num_streams: int, chunk_frames: int = DEFAULT_CHUNK_FRAMES,
               context_frames: int = DEFAULT_CONTEXT_FRAMES,
               on_frames: Callable[[int], None] | None = None):
    check_chunking(chunk_frames, context_frames)
    if isinstance(num_streams, bool) or not isinstance(num_streams, (int, np.integer)) \
        or not 1 <= num_streams <= codec.max_streams:
      raise ValueError(f"num_streams must be an integer in 1..{codec.max_streams}, got {num_streams!r}")
    self.codec = codec
    self.num_streams = int(num_streams)
    self.chunk_frames, self.context_frames = int(chunk_frames), int(context_frames)
    self.on_frames = on_frames  # progress callback: frames just coded
    self.num_samples = 0  # samples pushed so far
    self._buf: list[np.ndarray] = []  # audio from sample self._buf_start on
    self._buf_len = 0
    self._buf_start = 0
    self._k = 0  # next full window
    self._codes: list[np.ndarray] = []
    self._done = False

  @property
  def _spf(self) -> int:
    return self.codec.samples_per_frame

  def _window_audio(self, start: int, end: int) -> np.ndarray:
    """Samples [start*spf, end*spf - hop) of the zero-padded signal."""
    spf = self._spf
    buf = np.concatenate(self._buf) if len(self._buf) > 1 else self._buf[0]
    self._buf = [buf]
    a, b = start * spf - self._buf_start, end * spf - self.codec.hop - self._buf_start
    x = buf[a:b]
    return np.pad(x, (0, b - a - len(x)))

  def _emit(self, win: Window) -> None:
    x = self._window_audio(win.start, win.end)
    codes = self.codec.encode(x, self.num_streams)[0]  # (S, G, end - start)
    self._codes.append(codes[:, :, win.keep_start - win.start:win.keep_end - win.start])
    if self.on_frames:
      self.on_frames(win.keep_end - win.keep_start)

  def push(self, audio) -> None:
    """Adds 16 kHz mono float samples; encodes every window that is now complete."""
    if self._done:
      raise RuntimeError("push after finish")
    x = np.asarray(audio, np.float32).reshape(-1)
    if not len(x):
      return
    self._buf.append(x)
    self._buf_len += len(x)
    self.num_samples += len(x)
    n, w = self.chunk_frames, self.chunk_frames + 2 * self.context_frames
    if n == 0:
      return
    c = self.context_frames
    # Window k is full (and not the last) once T' > kN + W, i.e. n > (kN + W) * spf - hop.
    while self.num_samples > (self._k * n + w) * self._spf - self.codec.hop:
      s = self._k * n
      self._emit(Window(s, s + w, s + c if self._k else 0, s + n + c))
      self._k += 1
      self._drop_before(self._k * n - n)  # keep from this window's start: the tail may reach back

  def _drop_before(self, frame: int) -> None:
    cut = frame * self._spf - self._buf_start
    if cut <= 0:
      return
    buf = np.concatenate(self._buf)[cut:]
    self._buf, self._buf_len, self._buf_start = [buf], len(buf), self._buf_start + cut

  def finish(self) -> np.ndarray:
    """Encodes the rest; returns all codes (S, G, T') int32."""
    if not self._done:
      if self.num_samples == 0:
        raise ValueError("audio is empty")
      t = self.codec.num_frames(self.num_samples)
      rest = [wi for wi in chunk_plan(t, self.chunk_frames, self.context_frames)[self._k:]]
      for wi in rest:
        self._emit(wi)
      self._buf, self._done = [], True
    codes = np.concatenate(self._codes, axis=-1) if len(self._codes) > 1 else self._codes[0]
    self._codes = [codes]
    return codes


def encode_blocks(codec: Codec, blocks: Iterable[np.ndarray], num_streams: int,
                  chunk_frames: int = DEFAULT_CHUNK_FRAMES, context_frames: int = DEFAULT_CONTEXT_FRAMES,
                  on_frames: Callable[[int], None] | None = None) -> tuple[np.ndarray, int]:
  """Chunked encoding of a stream of 16 kHz blocks -> (codes (S, G, T'), num_samples)."""
  enc = ChunkedEncoder(codec, num_streams, chunk_frames, context_frames, on_frames)
  for b in blocks:
    enc.push(b)
  return enc.finish(), enc.num_samples


def encode_chunked(codec: Codec, audio, num_streams: int, chunk_frames: int = DEFAULT_CHUNK_FRAMES,
                   context_frames: int = DEFAULT_CONTEXT_FRAMES) -> np.ndarray:
  """(L,) 16 kHz audio -> codes (S, G, T') computed window by window."""
  x = np.asarray(audio, np.float32).reshape(-1)
  return encode_blocks(codec, [x[i:i + BLOCK_SAMPLES] for i in range(0, len(x), BLOCK_SAMPLES)],
                       num_streams, chunk_frames, context_frames)[0]


def _fade(n: int) -> np.ndarray:
  """Raised-cosine ramp 0 -> 1 over n samples (fade-in; 1 - ramp fades out)."""
  return (0.5 - 0.5 * np.cos(np.pi * (np.arange(n) + 0.5) / n)).astype(np.float32) if n else \
      np.zeros(0, np.float32)


def decode_blocks(codec: Codec, codes, num_samples: int | None = None,
                  chunk_frames: int = DEFAULT_CHUNK_FRAMES, context_frames: int = DEFAULT_CONTEXT_FRAMES,
                  crossfade: int = DEFAULT_CROSSFADE,
                  on_frames: Callable[[int], None] | None = None) -> Iterator[np.ndarray]:
  """Yields the decoded 16 kHz audio of codes (S, G, T') window by window.

  The blocks total `num_samples` samples (default: the valid length
  T' * spf - hop). chunk_frames=0 decodes the whole file at once
  (`codec.decode`).
  """
  codes = np.asarray(codes)
  if codes.ndim != 3 or codes.shape[-1] == 0:
    raise ValueError(f"codes must be a non-empty (S, G, T') array, got shape {codes.shape}")
  check_chunking(chunk_frames, context_frames)
  spf, hop = codec.samples_per_frame, codec.hop
  t = codes.shape[-1]
  valid = t * spf - hop
  total = valid if num_samples is None else int(num_samples)
  if not 0 < total <= valid or codec.num_frames(total) != t:
    raise ValueError(f"{t} code frames cannot carry {total} samples")
  half = min(int(crossfade) // 2, max(context_frames * spf - hop, 0))
  ramp = _fade(2 * half)
  pending = None  # previous window's audio for [boundary - half, boundary + half)
  emitted = 0

  def out(y):
    nonlocal emitted
    y = y[:total - emitted]
    emitted += len(y)
    return y

  for win in chunk_plan(t, chunk_frames, context_frames):
    y = codec.decode(codes[None, :, :, win.start:win.end])[0]  # samples from win.start * spf
    off = win.start * spf
    a, z = win.keep_start * spf - off, win.keep_end * spf - off
    if pending is not None:
      yield out(pending * ramp[::-1] + y[a - half:a + half] * ramp)
      a += half
    if win.keep_end == t:
      yield out(y[a:])
    else:
      yield out(y[a:z - half])
      pending = y[z - half:z + half]
    if on_frames:
      on_frames(win.keep_end - win.keep_start)


def decode_chunked(codec: Codec, codes, num_samples: int | None = None,
                   chunk_frames: int = DEFAULT_CHUNK_FRAMES, context_frames: int = DEFAULT_CONTEXT_FRAMES,
                   crossfade: int = DEFAULT_CROSSFADE) -> np.ndarray:
  """codes (S, G, T') -> (L,) float32 16 kHz audio decoded window by window."""
  return np.concatenate(list(decode_blocks(codec, codes, num_samples, chunk_frames, context_frames,
                                           crossfade)))


def _one_line(e: BaseException) -> str:
  s = str(e).strip()
  return s.splitlines()[-1] if s else type(e).__name__


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


class CodecMismatchError(ValueError):
  """A `.esc` stream that was not made by the loaded codec."""


def streams_for_kbps(codec: Codec, kbps) -> int:
  """Number of streams giving `kbps` with this codec (1.5 .. 9 for ESC at 1024 codes)."""
  valid = {s: codec.kbps(s) for s in range(1, codec.max_streams + 1)}
  try:
    x = float(kbps)
  except (TypeError, ValueError):
    x = math.nan
  for s, v in valid.items():
    if abs(x - v) < 1e-3:
      return s
  raise ValueError(f"unsupported bitrate {kbps} kbps for this codec; choose one of "
                   f"{', '.join(f'{v:g}' for v in valid.values())}")


def compress_file(codec: Codec, src, dst, num_streams: int, chunk_frames: int = DEFAULT_CHUNK_FRAMES,
                  context_frames: int | None = None, progress: Callable[[float], None] | None = None
                  ) -> bitstream.StreamHeader:
  """Encodes the audio file `src` (any rate / channels) into the `.esc` file `dst`.

  chunk_frames = 0 encodes the whole file at once (exactly `codec.encode`).
  progress (optional) is called with seconds of audio coded. `dst` is written
  atomically; nothing is left there on failure.
  """
  context_frames = context_frames_for(codec) if context_frames is None else context_frames
  spf = codec.samples_per_frame
  on_frames = (lambda f: progress(f * spf / MODEL_RATE)) if progress else None
  with AudioReader(src) as reader:
    codes, n = encode_blocks(codec, reader.blocks(), num_streams, chunk_frames, context_frames, on_frames)
    data = bitstream.encode_stream(codes, num_samples=n, sample_rate=reader.sample_rate,
                                   codebook_size=codec.codebook_size, fingerprint=codec.fingerprint,
                                   chunk_frames=chunk_frames)
  bitstream.write_stream(dst, data)
  return bitstream.decode_stream(data)[0]


def check_stream(codec: Codec, header: bitstream.StreamHeader, name: str = "stream") -> None:
  """CodecMismatchError unless `codec` can decode the stream `header` describes."""
  if header.fingerprint != codec.fingerprint:
    raise CodecMismatchError(
        f"{name} was encoded with a different codec (stream fingerprint {header.fingerprint.hex()}, "
        f"checkpoint {codec.fingerprint.hex()})")
  if header.codebook_size != codec.codebook_size or header.group_size != codec.group_size \
      or header.num_streams > codec.max_streams:
    raise CodecMismatchError(f"{name}: {header.num_streams} streams x {header.group_size} codes of "
                             f"{header.codebook_bits} bits do not fit this codec")
  if header.num_samples == 0 or header.num_frames == 0 \
      or codec.num_frames(header.num_samples) != header.num_frames:
    raise bitstream.BitstreamError(f"{name}: {header.num_frames} code frames cannot carry "
                                   f"{header.num_samples} samples")


def output_rate(header: bitstream.StreamHeader, sample_rate: int | str | None) -> int:
  """16000 (None), the input file's rate ("original") or an explicit rate in Hz."""
  if sample_rate is None:
    return MODEL_RATE
  if sample_rate == "original":
    return header.sample_rate
  rate = int(sample_rate)
  if rate <= 0:
    raise ValueError(f"sample rate must be positive, got {sample_rate}")
  return rate


def decompress_file(codec: Codec, src, dst, sample_rate: int | str | None = None,
                    chunk_frames: int | None = None, context_frames: int | None = None,
                    crossfade: int = DEFAULT_CROSSFADE, subtype: str = "PCM_16",
                    progress: Callable[[float], None] | None = None) -> tuple[bitstream.StreamHeader, int]:
  """Decodes the `.esc` file `src` into the audio file `dst` (format by extension).

  sample_rate: None = 16 kHz, "original" = the input's rate from the header,
  or an int. chunk_frames: None = the header's value (the default when it is
  0), 0 = whole file. Returns (header, samples written). `dst` is written
  atomically; BitstreamError / CodecMismatchError leave nothing behind.
  """
  header, codes = bitstream.read_stream(src)
  check_stream(codec, header, os.fspath(src))
  rate = output_rate(header, sample_rate)
  if chunk_frames is None:
    chunk_frames = header.chunk_frames or DEFAULT_CHUNK_FRAMES
  if chunk_frames % ALIGN_FRAMES:  # a foreign encoder's hint we cannot use
    chunk_frames = DEFAULT_CHUNK_FRAMES
  context_frames = context_frames_for(codec) if context_frames is None else context_frames
  spf = codec.samples_per_frame
  on_frames = (lambda f: progress(f * spf / MODEL_RATE)) if progress else None
  blocks = decode_blocks(codec, codes, header.num_samples, chunk_frames, context_frames, crossfade, on_frames)
  n = write_audio_blocks(dst, blocks, header.num_samples, MODEL_RATE, rate, subtype)
  return header, n
