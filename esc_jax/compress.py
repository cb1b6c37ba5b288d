"""File-level compression: audio files <-> `.esc` files with a `Codec`.

  compress_file(codec, "speech.wav", "speech.esc", num_streams=4)
  decompress_file(codec, "speech.esc", "speech_dec.wav", sample_rate="original")
  for src, dst in folder_pairs("in/", "out/", AUDIO_EXTENSIONS, ".esc"): ...

Audio is read and written block by block (`esc_jax.audio_io`) and coded in
chunks (`esc_jax.streaming`), so memory stays flat in the file's length.
Outputs are written atomically: a failure leaves nothing behind and does not
clobber an existing file.
"""
from __future__ import annotations

import os
import pathlib
from typing import Callable

from esc_jax import bitstream
from esc_jax.api import Codec
from esc_jax.audio_io import MODEL_RATE, AudioReader, write_audio_blocks
from esc_jax.files import find_files, write_bytes_atomic
from esc_jax.streaming import (ALIGN_FRAMES, DEFAULT_CHUNK_FRAMES, DEFAULT_CROSSFADE, context_frames_for,
                               decode_blocks, encode_blocks)

ESC_EXTENSION = ".esc"


class CodecMismatchError(ValueError):
  """A `.esc` stream that was not made by the loaded codec."""


def _seconds_progress(codec: Codec, progress):
  """Frames coded -> progress(seconds of audio), or None."""
  spf = codec.samples_per_frame
  return (lambda f: progress(f * spf / MODEL_RATE)) if progress else None


def compress_file(codec: Codec, src, dst, num_streams: int, chunk_frames: int = DEFAULT_CHUNK_FRAMES,
                  context_frames: int | None = None, progress: Callable[[float], None] | None = None
                  ) -> bitstream.StreamHeader:
  """Encodes the audio file `src` (any rate / channels) into the `.esc` file `dst`.

  chunk_frames = 0 encodes the whole file at once (exactly `codec.encode`).
  progress (optional) is called with seconds of audio coded.
  """
  context_frames = context_frames_for(codec) if context_frames is None else context_frames
  with AudioReader(src) as reader:
    codes, n = encode_blocks(codec, reader.blocks(), num_streams, chunk_frames, context_frames,
                             _seconds_progress(codec, progress))
    data = bitstream.encode_stream(codes, num_samples=n, sample_rate=reader.sample_rate,
                                   codebook_size=codec.codebook_size, fingerprint=codec.fingerprint,
                                   chunk_frames=chunk_frames)
  write_bytes_atomic(dst, data)
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
  0), 0 = whole file. Returns (header, samples written).
  """
  header, codes = bitstream.read_stream(src)
  check_stream(codec, header, os.fspath(src))
  rate = output_rate(header, sample_rate)
  if chunk_frames is None:
    chunk_frames = header.chunk_frames or DEFAULT_CHUNK_FRAMES
  if chunk_frames % ALIGN_FRAMES:  # a foreign encoder's hint we cannot use
    chunk_frames = DEFAULT_CHUNK_FRAMES
  context_frames = context_frames_for(codec) if context_frames is None else context_frames
  blocks = decode_blocks(codec, codes, header.num_samples, chunk_frames, context_frames, crossfade,
                         _seconds_progress(codec, progress))
  n = write_audio_blocks(dst, blocks, header.num_samples, MODEL_RATE, rate, subtype)
  return header, n


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
