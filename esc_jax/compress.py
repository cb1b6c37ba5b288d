"""File- and stream-level compression: audio <-> `.esc` with a `Codec`.

  compress_file(codec, "speech.wav", "speech.esc", num_streams=4)
  compress_file(codec, sys.stdin.buffer, sys.stdout.buffer, 4)      # WAV in, segments out
  decompress_file(codec, "speech.esc", "speech_dec.wav", sample_rate="original")
  decompress_file(codec, "speech.esc", "part.wav", start=12.5, duration=3)   # seek
  decompress_file(codec, sys.stdin.buffer, sys.stdout.buffer)        # segments in, WAV out
  transcode_file("speech.esc", "speech_3k.esc", kbps=3)             # no model needed
  for src, dst in folder_pairs("in/", "out/", AUDIO_EXTENSIONS, ".esc"): ...

Sources and destinations are paths or binary streams (pipes). Audio is
read and written block by block (`esc_jax.audio_io`), coded in chunks
(`esc_jax.streaming`) and stored as a segmented v2 stream
(`esc_jax.bitstream`): memory stays flat in the input's length, and a pipe
gets each segment (or each window of audio) as soon as the model's context
allows.

Outputs to paths are written atomically: a failure leaves nothing behind and
does not clobber an existing file. On a stream, what was written before a
failure stays written: a `.esc` stream then lacks its trailer (a reader
reports it truncated), a WAV stream ends early; the caller sees the error.

Damage: a corrupt segment is reported (`bitstream.Problem`, with its index
and time span) and its span decoded as silence; a truncated stream decodes
up to its last whole segment. strict=True makes either an error instead.
"""
from __future__ import annotations

import contextlib
import math
import os
import pathlib
from typing import BinaryIO, Callable, Iterator

import numpy as np

from esc_jax import bitstream
from esc_jax.api import Codec
from esc_jax.audio_io import MODEL_RATE, AudioReader, WavStreamReader, open_audio_writer
from esc_jax.files import find_files, is_path, open_atomic, seekable
from esc_jax.streaming import (ALIGN_FRAMES, DEFAULT_CHUNK_FRAMES, DEFAULT_CROSSFADE, ChunkedDecoder,
                               ChunkedEncoder, decode_span)

ESC_EXTENSION = ".esc"
DEFAULT_SEGMENT_FRAMES = bitstream.DEFAULT_SEGMENT_FRAMES  # 1 s


class CodecMismatchError(ValueError):
  """A `.esc` stream that was not made by the loaded codec."""


def _name(x) -> str:
  """A path, or a stream's name (sys.stdin.buffer: "<stdin>")."""
  if is_path(x):
    return os.fspath(x)
  name = getattr(x, "name", None)
  return name if isinstance(name, str) else "stream"


def _seconds_progress(codec: Codec, progress):
  """Frames coded -> progress(seconds of audio), or None."""
  spf = codec.samples_per_frame
  return (lambda f: progress(f * spf / MODEL_RATE)) if progress else None


@contextlib.contextmanager
def _output(dst) -> Iterator[BinaryIO]:
  """A binary file to write: a path (atomic, flushed to disk before the rename) or the stream itself."""
  if not is_path(dst):
    yield dst
    dst.flush()
    return
  with open_atomic(dst) as f:
    yield f


@contextlib.contextmanager
def _input(src, what: str = ".esc file") -> Iterator[BinaryIO]:
  if not is_path(src):
    yield src
    return
  try:
    f = open(src, "rb")
  except FileNotFoundError:
    raise FileNotFoundError(f"no such {what}: {os.fspath(src)}") from None
  with f:
    yield f


@contextlib.contextmanager
def _audio_reader(src, raw_rate: int | None):
  """AudioReader (a sound file path) or WavStreamReader (a byte stream, or raw PCM)."""
  if is_path(src) and raw_rate is None:
    with AudioReader(src) as reader:
      yield reader
  else:
    with _input(src, "audio file") as f:
      yield WavStreamReader(f, raw_rate, name=_name(src))


# ---- compress -----------------------------------------------------------------


def compress_file(codec: Codec, src, dst, num_streams: int, chunk_frames: int | None = None,
                  context_frames: int | None = None, segment_frames: int = DEFAULT_SEGMENT_FRAMES,
                  raw_rate: int | None = None, progress: Callable[[float], None] | None = None
                  ) -> bitstream.StreamHeader:
  """Encodes audio into a v2 `.esc` stream; returns its header with the totals.

  src: a sound file path (any format, rate, channels) or a binary stream of
  WAV, or of raw s16le mono PCM at raw_rate Hz. dst: a path (atomic) or a
  binary stream, which gets each segment as soon as it is complete.
  chunk_frames: None = 500 (10 s) for a path, the segment size (rounded up
  to even) for a stream, so that a pipe gets segment k once the audio of
  frame (k+1)F + C has arrived; 0 = the whole input at once (exactly
  `codec.encode`). context_frames None = the model's receptive field (codes
  equal whole-file encoding). progress is called with seconds of audio coded.
  """
  if chunk_frames is None:
    chunk_frames = DEFAULT_CHUNK_FRAMES if is_path(src) else -(-segment_frames // ALIGN_FRAMES) * ALIGN_FRAMES
  enc = ChunkedEncoder(codec, num_streams, chunk_frames, context_frames, _seconds_progress(codec, progress))
  with _audio_reader(src, raw_rate) as reader:
    header = bitstream.StreamHeader(
        sample_rate=reader.sample_rate, num_streams=num_streams, group_size=codec.group_size,
        codebook_bits=int(codec.codebook_size).bit_length() - 1, fingerprint=codec.fingerprint,
        chunk_frames=chunk_frames, segment_frames=segment_frames, model_rate=MODEL_RATE,
        frame_samples=codec.samples_per_frame)
    with _output(dst) as f:
      writer = bitstream.StreamWriter(f, header, flush=not is_path(dst))
      for block in reader.blocks():
        writer.write_frames(enc.push(block))
      writer.write_frames(enc.finish())
      trailer = writer.close(enc.num_samples, reader.input_frames)
  return writer.header.with_trailer(trailer)


# ---- decompress ---------------------------------------------------------------


def check_header(codec: Codec, header: bitstream.StreamHeader, name: str = "stream") -> None:
  """CodecMismatchError unless `codec` made the stream `header` describes (checked before any audio)."""
  if header.fingerprint != codec.fingerprint:
    raise CodecMismatchError(
        f"{name} was encoded with a different codec (stream fingerprint {header.fingerprint.hex()}, "
        f"checkpoint {codec.fingerprint.hex()})")
  if header.codebook_size != codec.codebook_size or header.group_size != codec.group_size \
      or header.num_streams > codec.max_streams or header.model_rate != MODEL_RATE \
      or header.frame_samples != codec.samples_per_frame:
    raise CodecMismatchError(f"{name}: {header.num_streams} streams x {header.group_size} codes of "
                             f"{header.codebook_bits} bits per {header.frame_samples}-sample frame at "
                             f"{header.model_rate} Hz do not fit this codec")


def check_lengths(codec: Codec, header: bitstream.StreamHeader, name: str = "stream") -> None:
  """BitstreamError unless the totals (v1 header or v2 trailer) are consistent for `codec`."""
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


def _output_length(n16: int, rate: int, sample_rate, input_samples: int | None) -> int:
  """Samples at `rate`: the input's exact length for "original" when the stream knows it."""
  if sample_rate == "original" and input_samples is not None:
    return input_samples
  return int(round(n16 * rate / MODEL_RATE))


def _decode_chunk_frames(header: bitstream.StreamHeader, chunk_frames):
  """chunk_frames, or the stream's hint (default 500) when None."""
  if chunk_frames is None:
    chunk_frames = header.chunk_frames or DEFAULT_CHUNK_FRAMES
    if chunk_frames % ALIGN_FRAMES:  # a foreign encoder's hint we cannot use
      chunk_frames = DEFAULT_CHUNK_FRAMES
  return chunk_frames


def _lost(header: bitstream.StreamHeader, n: int) -> tuple[np.ndarray, np.ndarray]:
  return np.zeros((header.num_streams, header.group_size, n), np.int32), np.zeros(n, bool)


def decompress_file(codec: Codec, src, dst, sample_rate: int | str | None = None,
                    chunk_frames: int | None = None, context_frames: int | None = None,
                    crossfade: int = DEFAULT_CROSSFADE, subtype: str | None = None, strict: bool = False,
                    start: float | None = None, duration: float | None = None,
                    on_problem: Callable[[bitstream.Problem], None] | None = None,
                    progress: Callable[[float], None] | None = None) -> tuple[bitstream.StreamHeader, int]:
  """Decodes a `.esc` stream (v2 or v1) into audio; returns (header with totals, samples written).

  src: a path or a binary stream (decoded segment by segment as it arrives).
  dst: an audio path (format by extension, atomic) or a binary stream (WAV,
  written window by window). sample_rate: None = 16 kHz, "original" = the
  input's rate (exactly the input's length when the stream records it), or
  an int. subtype: None = PCM_16 for WAV, else the format's default (ogg: VORBIS).
  chunk_frames: None = the stream's hint (default 500), 0 = whole
  file. Damage is reported to `on_problem` (default: BitstreamWarning) and
  concealed; strict=True raises BitstreamError instead (a path then gets
  nothing; a stream nothing either when src is seekable: it is checked first).

  start / duration (seconds): only that span, decoding only the windows that
  produce it (with their context): bit-identical to the same samples of a
  full decode. Needs no seekable src, but reads only the segments it needs
  from a seekable v2 file.
  """
  name = _name(src)
  try:
    with _input(src) as f:
      if strict and not is_path(dst) and seekable(f):  # all-or-nothing on a stream too
        origin = f.tell()
        for _ in bitstream.StreamReader(f, strict=True):
          pass
        f.seek(origin)
      reader = bitstream.StreamReader(f, strict=strict, on_problem=on_problem)
      header = reader.header
      check_header(codec, header, name)
      trailer = reader.read_trailer()  # v1, or a seekable v2 file: totals before any decoding
      if trailer is not None:
        check_lengths(codec, header.with_trailer(trailer), name)
      rate = output_rate(header, sample_rate)
      chunk_frames = _decode_chunk_frames(header, chunk_frames)  # context None: the model's (streaming)
      if start is not None or duration is not None:
        return _decompress_span(codec, reader, dst, name, rate, sample_rate, start or 0.0, duration,
                                chunk_frames, context_frames, crossfade, subtype)
      dec = ChunkedDecoder(codec, chunk_frames, context_frames, crossfade, _seconds_progress(codec, progress))
      with open_audio_writer(dst, MODEL_RATE, rate, subtype) as out:
        for seg in reader:
          codes, valid = (seg.codes, None) if seg.codes is not None else _lost(header, seg.num_frames)
          for b in dec.push(codes, valid):
            out.write(b)
        trailer = reader.trailer
        if trailer is not None:
          header = header.with_trailer(trailer)
          check_lengths(codec, header, name)
        else:  # truncated: the whole segments read, at the model's length for them
          t = dec.frames_in
          if t == 0:
            raise bitstream.BitstreamError("no complete segment to decode")
          header = header.with_trailer(bitstream.Trailer(t, codec.frames_to_samples(t)))
        if dec.frames_in == 0:  # every segment lost: silence
          for b in dec.push(*_lost(header, header.num_frames)):
            out.write(b)
        for b in dec.finish(header.num_frames, header.num_samples):
          out.write(b)
        n = out.close(_output_length(header.num_samples, rate, sample_rate, header.input_samples))
      return header, n
  except bitstream.BitstreamError as e:
    raise _named(e, name) from None


def _named(e: bitstream.BitstreamError, name: str) -> bitstream.BitstreamError:
  """e with the stream's name in front (once)."""
  msg = str(e)
  return e if msg.startswith(f"{name}: ") else bitstream.BitstreamError(f"{name}: {msg}")


def _decompress_span(codec, reader, dst, name, rate, sample_rate, start, duration, chunk_frames,
                     context_frames, crossfade, subtype):
  if not 0 <= start < math.inf or (duration is not None and not 0 < duration < math.inf):
    raise ValueError(f"start must be >= 0 and duration > 0 seconds, got start {start}, duration {duration}")
  h = reader.header
  trailer = reader.trailer
  if trailer is not None and h.version == 2:  # seekable: read only the segments needed
    header = h.with_trailer(trailer)

    def read_frames(f0, f1):
      codes, valid = _lost(h, f1 - f0)
      f = h.segment_frames
      reader.seek(f0 // f)
      for seg in reader:
        a, b = max(seg.start_frame, f0), min(seg.start_frame + seg.num_frames, f1)
        if seg.codes is not None and a < b:
          codes[:, :, a - f0:b - f0] = seg.codes[:, :, a - seg.start_frame:b - seg.start_frame]
          valid[a - f0:b - f0] = True
        if seg.start_frame + seg.num_frames >= f1:
          break
      return codes, valid
  else:  # a stream, v1, or a file whose end is damaged: read everything (codes only)
    d = bitstream.read_codes(reader)
    t = d.header.num_frames
    if t == 0 or not d.valid.any() and d.trailer is None:
      raise bitstream.BitstreamError("no complete segment to decode")
    header = d.header if d.trailer is not None else d.header.with_trailer(
        bitstream.Trailer(t, codec.frames_to_samples(t)))
    check_lengths(codec, header, name)

    def read_frames(f0, f1):
      return d.codes[:, :, f0:f1], d.valid[f0:f1]
  total = header.num_samples
  a = int(round(start * MODEL_RATE))
  b = total if duration is None else min(total, a + int(round(duration * MODEL_RATE)))
  if a >= total:
    raise ValueError(f"start {start:g} s is at or after the end of {name} ({total / MODEL_RATE:g} s)")
  y = decode_span(codec, read_frames, header.num_frames, a, b, total, chunk_frames, context_frames,
                  crossfade)
  with open_audio_writer(dst, MODEL_RATE, rate, subtype) as out:
    out.write(y)
    n = out.close(int(round(len(y) * rate / MODEL_RATE)))
  return header, n


# ---- transcode ----------------------------------------------------------------


def transcode_file(src, dst, kbps) -> bitstream.StreamHeader:
  """Rewrites a `.esc` stream (v2 or v1) at a lower bitrate by dropping streams (no model).

  Bit-identical to compressing at that bitrate directly. src / dst: paths
  (dst atomic) or binary streams (segments written as they are read).
  Returns the new header with the totals. Damage in src is an error.
  """
  name = _name(src)
  try:
    with _input(src) as f:
      reader = bitstream.StreamReader(f, strict=True)
      h = reader.header
      s = bitstream.streams_for_kbps(kbps, h.kbps / h.num_streams)
      if s > h.num_streams:
        raise ValueError(f"{name} has {h.num_streams} streams ({h.kbps:g} kbps): cannot transcode up "
                         f"to {float(kbps):g} kbps")
      with _output(dst) as out:
        return bitstream.transcode(reader, s, out)
  except bitstream.BitstreamError as e:
    raise _named(e, name) from None


# ---- folders ------------------------------------------------------------------


def folder_pairs(src, dst, extensions, out_ext: str) -> list[tuple[pathlib.Path, pathlib.Path]]:
  """(input, output) pairs of a folder run: inputs found recursively, outputs at mirrored paths.

  Hidden entries and the output folder (when inside the input folder) are
  skipped. ValueError if `dst` is a file, nothing matches, or two inputs
  would write the same output.
  """
  src, dst = pathlib.Path(src), pathlib.Path(dst)
  if dst.exists() and not dst.is_dir():
    raise ValueError(f"{dst} is not a folder (the input {src} is one)")
  pairs, seen = [], {}
  for f in find_files(src, extensions, exclude=dst):
    out = dst / f.relative_to(src).with_suffix(out_ext)
    if out in seen:
      raise ValueError(f"{f} and {seen[out]} would both be written to {out}")
    seen[out] = f
    pairs.append((f, out))
  if not pairs:
    raise ValueError(f"no {' / '.join(extensions) if len(extensions) < 3 else 'audio'} files in {src}")
  return pairs
