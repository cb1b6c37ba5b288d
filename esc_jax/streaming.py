"""Chunked (bounded-memory) encoding and decoding of long signals with a `Codec`.

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

Memory. The encoder buffers at most one window plus one pushed block of
audio, the decoder yields audio window by window; with the block-wise readers
and writers of `esc_jax.audio_io`, file compression (`esc_jax.compress`) holds
only the codes of the whole file: S x G x T' int32, 6.5 MB for 30 minutes at
9 kbps. Peak memory is thus independent of the file's length apart from those
codes.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np

from esc_jax.api import Codec
from esc_jax.audio_io import BLOCK_SAMPLES

DEFAULT_CHUNK_FRAMES = 500  # 10 s per window centre
DEFAULT_CONTEXT_FRAMES = 24  # 0.48 s each side; >= ESC-Base's receptive field (`context_frames_for`)
DEFAULT_CROSSFADE = 640  # samples (40 ms) of raised-cosine cross-fade at chunk boundaries
ALIGN_FRAMES = 2  # window starts on multiples of 2 code frames = 4 time patches (one Swin window)


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
