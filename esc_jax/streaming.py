"""Chunked (bounded-memory, streamable) encoding and decoding of long signals with a `Codec`.

Why chunking is sound. ESC has no recurrence and no global operation along
time: every layer is local in time. The STFT (hop 80, window 382) and the
patch (de-)embedding convolutions see a few frames; each Swin block attends
inside windows of 4 time patches (2 code frames), shifted by 2 patches every
other block, and patch merge/split only change the frequency axis, so the
time resolution (2 patches per code frame) is the same at every scale. The
exact receptive field is finite (`context_frames_for`: 24 frames = 0.48 s for
ESC-Base), so a window that sees C >= 24 frames of real signal on both sides
of the frames it keeps codes them exactly as whole-file coding does.

The scheme (`chunk_plan`). N = `chunk_frames` (500 = 10 s for files), C =
`context_frames` (default: the receptive field). Window k keeps frames
[kN, (k+1)N) and spans [max(0, kN - C2), (k+1)N + C), C2 = C rounded up to
even, so that windows start on multiples of ALIGN_FRAMES = 2 frames (4 time
patches): the
Swin window grid (and its shifted twin) and the STFT frame grid of a window
then coincide with those of the whole file; at odd alignments the grids shift
and codes drift (see bench/bench_codec.py). Such regular windows are used
while they end before the file's last frame T'; the final window keeps
[KN, T') and ends at T' (zero-padded to a valid length exactly as
whole-file `Codec.encode` pads), starting N + C + C2 frames before T' (or
at 0), so the file's edges are coded as in whole-file mode. Files of <= N + C
frames are a single window: exactly `Codec.encode`. Shapes to compile: the
full width, the final window's (full or full + 1), and ceil(C/N) widths of
the first windows (those that start at frame 0).

Keeping [kN, (k+1)N) puts chunk boundaries on multiples of N, so with N =
a stream's segment size (`esc_jax.bitstream`) each window completes one
segment: an online encoder emits segment k when it has audio up to frame
(k+1)N + C, an algorithmic latency of N + C frames.

Decoding uses the same windows: each window of codes is decoded with its
context and only the audio of its kept frames is used; at each boundary the
two windows' audio is cross-faded (raised cosine over `crossfade` samples,
centred on the boundary, well inside both windows' context). Every window
is a fixed computation, so decoding a few windows (`decode_span`) gives
bit-identical audio to the same span of a full decode. Frames marked lost
(corrupt segments) come out as silence: within a window the valid runs are
decoded separately, as if the signal ended at the gap (never by feeding
made-up codes to the model); a run that starts at an odd frame loses that
frame too, to stay on the 2-frame grid.

Memory. `ChunkedEncoder` buffers at most one window plus one pushed block
of audio and returns codes as windows complete; `ChunkedDecoder` buffers one
window of codes and returns audio as windows complete. With the block-wise
readers and writers of `esc_jax.audio_io` and `esc_jax.bitstream`'s
segmented streams, compression and decompression (`esc_jax.compress`) run in
memory independent of the input's length.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np

from esc_jax.api import Codec
from esc_jax.audio_io import BLOCK_SAMPLES

DEFAULT_CHUNK_FRAMES = 500  # 10 s per window centre
DEFAULT_CONTEXT_FRAMES = 24  # 0.48 s each side: ESC-Base's `context_frames_for` (the codec APIs default to
                             # their model's own context; this is `chunk_plan`'s default)
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

  The model's reach (`reach_frames`: its transformer or convolution layers on
  the longest coding path) plus four frames for the STFT window, the patch
  (de-)embedding convolutions and the VQ's frame grouping.
  """
  return _ceil_align(math.ceil(codec.model.reach_frames) + 4)


def _context(codec: Codec, context_frames: int | None) -> int:
  """context_frames, or the model's own (`context_frames_for`) when None."""
  return context_frames_for(codec) if context_frames is None else context_frames


def _ceil_align(n: int) -> int:
  return -(-n // ALIGN_FRAMES) * ALIGN_FRAMES


def check_chunking(chunk_frames: int, context_frames: int) -> None:
  """ValueError unless chunk_frames (0 = whole file) and context_frames are usable."""
  for name, v in (("chunk_frames", chunk_frames), ("context_frames", context_frames)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
      raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
  if chunk_frames % ALIGN_FRAMES:
    raise ValueError(f"chunk_frames must be a multiple of {ALIGN_FRAMES}, got {chunk_frames}")


def regular_window(k: int, chunk_frames: int, context_frames: int) -> Window:
  """Window k of a chunked run that does not reach the file's end (independent of its length)."""
  n, c = chunk_frames, context_frames
  return Window(max(0, k * n - _ceil_align(c)), (k + 1) * n + c, k * n, (k + 1) * n)


def chunk_plan(num_frames: int, chunk_frames: int = DEFAULT_CHUNK_FRAMES,
               context_frames: int = DEFAULT_CONTEXT_FRAMES) -> list[Window]:
  """Windows covering `num_frames` code frames (see the module docstring).

  chunk_frames = 0, or num_frames <= chunk_frames + context_frames, gives a
  single whole-file window.
  """
  check_chunking(chunk_frames, context_frames)
  n, c, t = chunk_frames, context_frames, num_frames
  if n == 0:
    return [Window(0, t, 0, t)]
  wins = []
  while (w := regular_window(len(wins), n, c)).end < t:
    wins.append(w)
  full = n + c + _ceil_align(c)
  start = max(0, (t - full) // ALIGN_FRAMES * ALIGN_FRAMES)
  wins.append(Window(start, t, len(wins) * n, t))
  return wins


def _concat(parts: list[np.ndarray], axis: int = -1) -> np.ndarray:
  return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=axis)


# ---------------------------------------------------------------------------
# Chunked encode
# ---------------------------------------------------------------------------


class ChunkedEncoder:
  """Online encoder: `push` 16 kHz audio blocks and get the codes that are ready.

    enc = ChunkedEncoder(codec, num_streams=4)
    for block in blocks:
      codes = enc.push(block)     # (S, G, n) int32, n >= 0: frames now final
    codes = enc.finish()          # the rest; T' = codec.num_frames(enc.num_samples) in all

  The codes equal `chunk_plan`'s windows encoded one by one; chunk_frames=0
  buffers the whole input and gives exactly `codec.encode`'s codes. Frames
  [kN, (k+1)N) come out once audio beyond frame (k+1)N + C has been pushed.
  """

  def __init__(self, codec: Codec, num_streams: int, chunk_frames: int = DEFAULT_CHUNK_FRAMES,
               context_frames: int | None = None,
               on_frames: Callable[[int], None] | None = None):
    context_frames = _context(codec, context_frames)
    check_chunking(chunk_frames, context_frames)
    self.codec = codec
    self.num_streams = codec.check_streams(num_streams)
    self.chunk_frames, self.context_frames = int(chunk_frames), int(context_frames)
    self.on_frames = on_frames  # progress callback: frames just coded
    self.num_samples = 0  # samples pushed so far
    self.frames_out = 0  # code frames returned so far
    self._buf: list[np.ndarray] = []  # audio from sample self._buf_start on
    self._buf_start = 0
    self._k = 0  # next regular window
    self._done = False

  def _window_audio(self, win: Window) -> np.ndarray:
    """Samples [start*spf, end*spf - hop) of the zero-padded signal."""
    spf = self.codec.samples_per_frame
    buf = self._buf[0] = _concat(self._buf)
    del self._buf[1:]
    a, b = win.start * spf - self._buf_start, win.end * spf - self.codec.hop - self._buf_start
    x = buf[a:b]
    return np.pad(x, (0, b - a - len(x)))

  def _encode(self, win: Window) -> np.ndarray:
    codes = self.codec.encode(self._window_audio(win), self.num_streams)[0]  # (S, G, end - start)
    kept = codes[:, :, win.keep_start - win.start:win.keep_end - win.start]
    self.frames_out += kept.shape[2]
    if self.on_frames:
      self.on_frames(kept.shape[2])
    return kept

  def _empty(self) -> np.ndarray:
    return np.zeros((self.num_streams, self.codec.group_size, 0), np.int32)

  def push(self, audio) -> np.ndarray:
    """Adds 16 kHz mono float samples; returns the codes (S, G, n) of every window now complete."""
    if self._done:
      raise RuntimeError("push after finish")
    x = np.asarray(audio, np.float32).reshape(-1)
    out = []
    if len(x):
      self._buf.append(x)
      self.num_samples += len(x)
    n = self.chunk_frames
    # Regular window k is complete (and not the final one) once T' > its end.
    while n and self.codec.num_frames(self.num_samples) > (win := regular_window(
        self._k, n, self.context_frames)).end:
      out.append(self._encode(win))
      self._k += 1
      self._drop_before(win.start)  # the final window never starts before the last regular one
    return _concat(out) if out else self._empty()

  def _drop_before(self, frame: int) -> None:
    cut = frame * self.codec.samples_per_frame - self._buf_start
    if cut <= 0:
      return
    buf = _concat(self._buf)[cut:]
    self._buf, self._buf_start = [buf], self._buf_start + cut

  def finish(self) -> np.ndarray:
    """Encodes the rest; returns the remaining codes (S, G, n) int32."""
    if self._done:
      raise RuntimeError("finish called twice")
    if self.num_samples == 0:
      raise ValueError("audio is empty")
    self._done = True
    t = self.codec.num_frames(self.num_samples)
    out = [self._encode(w) for w in chunk_plan(t, self.chunk_frames, self.context_frames)[self._k:]]
    self._buf = []
    return _concat(out)


def encode_blocks(codec: Codec, blocks: Iterable[np.ndarray], num_streams: int,
                  chunk_frames: int = DEFAULT_CHUNK_FRAMES, context_frames: int | None = None,
                  on_frames: Callable[[int], None] | None = None) -> tuple[np.ndarray, int]:
  """Chunked encoding of a stream of 16 kHz blocks -> (codes (S, G, T'), num_samples)."""
  enc = ChunkedEncoder(codec, num_streams, chunk_frames, context_frames, on_frames)
  parts = [enc.push(b) for b in blocks]
  parts.append(enc.finish())
  return _concat(parts), enc.num_samples


def encode_chunked(codec: Codec, audio, num_streams: int, chunk_frames: int = DEFAULT_CHUNK_FRAMES,
                   context_frames: int | None = None) -> np.ndarray:
  """(L,) 16 kHz audio -> codes (S, G, T') computed window by window."""
  x = np.asarray(audio, np.float32).reshape(-1)
  return encode_blocks(codec, [x[i:i + BLOCK_SAMPLES] for i in range(0, len(x), BLOCK_SAMPLES)],
                       num_streams, chunk_frames, context_frames)[0]


# ---------------------------------------------------------------------------
# Chunked decode
# ---------------------------------------------------------------------------


def _fade(n: int) -> np.ndarray:
  """Raised-cosine ramp 0 -> 1 over n samples (fade-in; 1 - ramp fades out)."""
  return (0.5 - 0.5 * np.cos(np.pi * (np.arange(n) + 0.5) / n)).astype(np.float32) if n else \
      np.zeros(0, np.float32)


def _crossfade_half(codec: Codec, crossfade: int, context_frames: int) -> int:
  return min(int(crossfade) // 2, max(codec.frames_to_samples(context_frames), 0))


def decode_window(codec: Codec, codes: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
  """codes (S, G, n) of frames [0, n) -> (n * spf - hop,) audio; frames not `valid` are silence.

  Valid runs are decoded separately, each from an even frame (a run starting
  at an odd frame drops that frame: window starts must stay on the 2-frame grid).
  """
  spf, n = codec.samples_per_frame, codes.shape[-1]
  if valid is None or valid.all():
    return codec.decode(codes[None])[0]
  y = np.zeros(codec.frames_to_samples(n), np.float32)
  for a, b in valid_runs(valid):
    a += a % ALIGN_FRAMES
    if a < b:
      part = codec.decode(codes[None, :, :, a:b])[0]  # (b - a) * spf - hop samples
      y[a * spf:a * spf + len(part)] = part
  return y


def valid_runs(valid) -> list[tuple[int, int]]:
  """[(a, b), ...]: the maximal runs of True in a (T,) bool array."""
  edges = np.flatnonzero(np.diff(np.concatenate([[0], np.asarray(valid, np.int8), [0]])))
  return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


class _Stitcher:
  """Joins windows' audio: kept samples, cross-faded at window boundaries.

  `pos` is the absolute sample index of the next sample returned. The first
  window added keeps its audio from keep_start * spf + half unless it starts
  the plan (a span of windows: `decode_span`).
  """

  def __init__(self, codec: Codec, half: int, total: int | None = None):
    self.spf, self.half, self.total = codec.samples_per_frame, half, total
    self.ramp = _fade(2 * half)
    self.pending = None  # previous window's audio for [boundary - half, boundary + half)
    self.pos = self.start = None  # next sample's index; the first sample's

  def add(self, win: Window, y: np.ndarray, final: bool) -> list[np.ndarray]:
    """Audio of window `win` (y: samples from win.start * spf) -> output blocks."""
    spf, half = self.spf, self.half
    off = win.start * spf
    a, z = win.keep_start * spf - off, win.keep_end * spf - off
    out = []
    if self.pending is not None:
      out.append(self.pending * self.ramp[::-1] + y[a - half:a + half] * self.ramp)
      a += half
    elif self.pos is None:
      if win.keep_start:
        a += half
      self.pos = self.start = off + a
    if final:
      out.append(y[a:])
      self.pending = None
    else:
      out.append(y[a:z - half])
      self.pending = y[z - half:z + half]
    return self._out(out)

  def add_rest(self, win: Window, y: np.ndarray) -> list[np.ndarray]:
    """The rest of the last window added (non-final), when it turns out to be the final one."""
    self.pending = None
    return self._out([y[win.keep_end * self.spf - win.start * self.spf - self.half:]])

  def _out(self, out: list[np.ndarray]) -> list[np.ndarray]:
    if self.total is not None:  # trim to the signal's length
      room, kept = self.total - self.pos, []
      for b in out:
        kept.append(b[:max(room, 0)])
        room -= len(kept[-1])
      out = kept
    self.pos += sum(len(b) for b in out)
    return [b for b in out if len(b)]


class ChunkedDecoder:
  """Online decoder: `push` codes as they arrive and get the audio that is ready.

    dec = ChunkedDecoder(codec)
    for codes, valid in pieces:            # (S, G, n) and (n,) bool: False = lost
      blocks = dec.push(codes, valid)      # 16 kHz audio now final
    blocks = dec.finish(num_frames, num_samples)   # the rest, trimmed

  Windows are `chunk_plan`'s; window k is decoded as soon as its last frame
  has been pushed, so audio up to frame (k+1)N lags the codes by C frames
  (were the stream to end right there, the final window would be the same
  one, only keeping more). Lost frames decode to silence (`decode_window`).
  Memory: one window of codes and of audio.
  """

  def __init__(self, codec: Codec, chunk_frames: int = DEFAULT_CHUNK_FRAMES,
               context_frames: int | None = None, crossfade: int = DEFAULT_CROSSFADE,
               on_frames: Callable[[int], None] | None = None):
    context_frames = _context(codec, context_frames)
    check_chunking(chunk_frames, context_frames)
    self.codec = codec
    self.chunk_frames, self.context_frames = int(chunk_frames), int(context_frames)
    self.on_frames = on_frames
    self.frames_in = 0  # frames pushed so far
    self.samples_out = 0
    self._stitch = _Stitcher(codec, _crossfade_half(codec, crossfade, context_frames))
    self._codes: list[np.ndarray] = []  # frames from self._buf_start on
    self._valid: list[np.ndarray] = []
    self._buf_start = 0
    self._shape = None  # (S, G)
    self._k = 0
    self._last = None  # (window, audio) of the last regular window
    self._done = False

  def _window(self, win: Window, final: bool) -> list[np.ndarray]:
    codes = self._codes[0] = _concat(self._codes)
    valid = self._valid[0] = _concat(self._valid)
    del self._codes[1:], self._valid[1:]
    a, b = win.start - self._buf_start, win.end - self._buf_start
    y = decode_window(self.codec, codes[:, :, a:b], valid[a:b])
    out = self._stitch.add(win, y, final)
    self._last = (win, y)
    self.samples_out += sum(len(x) for x in out)
    if self.on_frames:
      self.on_frames(win.keep_end - win.keep_start)
    return out

  def push(self, codes, valid=None) -> list[np.ndarray]:
    """Adds codes (S, G, n) of the next n frames; valid (n,) bool marks lost frames False.

    Returns the 16 kHz audio blocks of every window now complete.
    """
    if self._done:
      raise RuntimeError("push after finish")
    codes = np.asarray(codes)
    if codes.ndim != 3 or (self._shape is not None and codes.shape[:2] != self._shape):
      raise ValueError(f"codes must be (S, G, n) like the first push, got {codes.shape}")
    self._shape = codes.shape[:2]
    n = codes.shape[2]
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool).reshape(n)
    if not n:
      return []
    self._codes.append(codes)
    self._valid.append(valid)
    self.frames_in += n
    out = []
    while self.chunk_frames and self.frames_in >= (win := regular_window(
        self._k, self.chunk_frames, self.context_frames)).end:
      out += self._window(win, final=False)
      self._k += 1
      self._drop_before(win.start)
    return out

  def _drop_before(self, frame: int) -> None:
    cut = frame - self._buf_start
    if cut > 0:
      self._codes = [_concat(self._codes)[:, :, cut:]]
      self._valid = [_concat(self._valid)[cut:]]
      self._buf_start = frame

  def finish(self, num_frames: int | None = None, num_samples: int | None = None) -> list[np.ndarray]:
    """Decodes the rest. num_frames: the stream's T' (frames not pushed are lost; default: those
    pushed); num_samples: its length at 16 kHz (default: the valid length T' * spf - hop)."""
    if self._done:
      raise RuntimeError("finish called twice")
    self._done = True
    t = self.frames_in if num_frames is None else int(num_frames)
    if t < self.frames_in:
      raise ValueError(f"the stream has {t} frames but {self.frames_in} were pushed")
    total = _check_length(self.codec, t, num_samples)
    if self._shape is None:
      raise ValueError("no codes to decode")
    if t > self.frames_in:  # lost frames at the end: they complete no window
      lost = t - self.frames_in
      self._codes.append(np.zeros(self._shape + (lost,), np.int32))
      self._valid.append(np.zeros(lost, bool))
    self._stitch.total = total
    out = []
    plan = chunk_plan(t, self.chunk_frames, self.context_frames)
    if self._k == len(plan):  # the stream ends where the last window decoded ends: it was the final one
      win, y = self._last
      assert (win.start, win.end) == (plan[-1].start, plan[-1].end)
      out = self._stitch.add_rest(win, y)
      self.samples_out += sum(len(x) for x in out)
    for i, win in enumerate(plan[self._k:], self._k):
      out += self._window(win, final=i == len(plan) - 1)
    return out


def decode_blocks(codec: Codec, codes, num_samples: int | None = None,
                  chunk_frames: int = DEFAULT_CHUNK_FRAMES, context_frames: int | None = None,
                  crossfade: int = DEFAULT_CROSSFADE, on_frames: Callable[[int], None] | None = None,
                  valid=None) -> Iterator[np.ndarray]:
  """Yields the decoded 16 kHz audio of codes (S, G, T') window by window.

  The blocks total `num_samples` samples (default: the valid length
  T' * spf - hop). chunk_frames=0 decodes the whole file at once
  (`codec.decode`). valid (T',) bool: frames to conceal as silence are False.
  """
  codes = np.asarray(codes)
  if codes.ndim != 3 or codes.shape[-1] == 0:
    raise ValueError(f"codes must be a non-empty (S, G, T') array, got shape {codes.shape}")
  t = codes.shape[-1]
  _check_length(codec, t, num_samples)
  valid = np.ones(t, bool) if valid is None else np.asarray(valid, bool)
  dec = ChunkedDecoder(codec, chunk_frames, context_frames, crossfade, on_frames)
  step = chunk_frames or t
  for i in range(0, t, step):  # one window per push: audio comes out as it is decoded
    yield from dec.push(codes[:, :, i:i + step], valid[i:i + step])
  yield from dec.finish(t, num_samples)


def decode_chunked(codec: Codec, codes, num_samples: int | None = None,
                   chunk_frames: int = DEFAULT_CHUNK_FRAMES, context_frames: int | None = None,
                   crossfade: int = DEFAULT_CROSSFADE) -> np.ndarray:
  """codes (S, G, T') -> (L,) float32 16 kHz audio decoded window by window."""
  return _concat(list(decode_blocks(codec, codes, num_samples, chunk_frames, context_frames, crossfade)))


def _check_length(codec: Codec, num_frames: int, num_samples: int | None) -> int:
  """num_samples (default: the valid length of num_frames); ValueError if they do not match."""
  valid = codec.frames_to_samples(num_frames)
  total = valid if num_samples is None else int(num_samples)
  if not 0 < total <= valid or codec.num_frames(total) != num_frames:
    raise ValueError(f"{num_frames} code frames cannot carry {total} samples")
  return total


def decode_span(codec: Codec, read_frames: Callable[[int, int], tuple[np.ndarray, np.ndarray]],
                num_frames: int, start: int, stop: int, num_samples: int | None = None,
                chunk_frames: int = DEFAULT_CHUNK_FRAMES, context_frames: int | None = None,
                crossfade: int = DEFAULT_CROSSFADE) -> np.ndarray:
  """Samples [start, stop) of a stream's 16 kHz decode, decoding only the windows that make them.

  read_frames(f0, f1) -> (codes (S, G, f1 - f0), valid (f1 - f0,) bool) is
  called once, for the frames of those windows (each with its context). The
  result is bit-identical to the same samples of `decode_blocks` with the
  same chunking.
  """
  total = _check_length(codec, num_frames, num_samples)
  context_frames = _context(codec, context_frames)
  if not 0 <= start < stop <= total:
    raise ValueError(f"span [{start}, {stop}) is not inside the signal's {total} samples")
  plan = chunk_plan(num_frames, chunk_frames, context_frames)
  half, spf = _crossfade_half(codec, crossfade, context_frames), codec.samples_per_frame
  # The first window's own audio starts after its cross-fade; later ones join on.
  i0 = max(i for i, w in enumerate(plan) if i == 0 or w.keep_start * spf + half <= start)
  i1 = next(i for i in range(i0, len(plan)) if i == len(plan) - 1 or plan[i].keep_end * spf - half >= stop)
  f0, f1 = plan[i0].start, plan[i1].end
  codes, valid = read_frames(f0, f1)
  stitch, out = _Stitcher(codec, half, total), []
  for i in range(i0, i1 + 1):
    w = plan[i]
    y = decode_window(codec, codes[:, :, w.start - f0:w.end - f0], valid[w.start - f0:w.end - f0])
    out += stitch.add(w, y, final=i == len(plan) - 1)
  return _concat(out)[start - stitch.start:stop - stitch.start]
