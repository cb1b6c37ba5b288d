"""The `.esc` file format: v2 (segmented, streamable) and v1 (read only).

All multi-byte integers are little-endian and unsigned unless noted. Codes are
bit-packed exactly as in v1: each code as B = log2(codebook_size) bits,
MSB-first (bytes filled from their most significant bit), in frame-major
order `for t: for s in range(S): for g in range(G): code[s, g, t]`, the last
byte zero-padded.

v2 stream
---------
  header | segment 0 | ... | segment K-1 | trailer | [last segment]

Header, V2_HEADER_SIZE = 37 bytes (`struct` `<4sBBIIHHBBBI8s` + u32 CRC); it
holds no totals, so it can be written before the input ends:

  offset size type  field
       0    4 bytes magic          b"ESCJ"
       4    1 u8    version        2
       5    1 u8    flags          reserved, must be 0
       6    4 u32   sample_rate    rate of the ORIGINAL input in Hz (> 0)
      10    4 u32   model_rate     codec sample rate in Hz (ESC: 16000)
      14    2 u16   frame_samples  samples per code frame at model_rate
                                   (ESC: 320 = 20 ms)
      16    2 u16   segment_frames F >= 1, code frames per full segment
                                   (default 50 = 1 s)
      18    1 u8    num_streams    S, 1..6 (1.5 kbps each at the defaults)
      19    1 u8    group_size     G >= 1 (ESC: 3)
      20    1 u8    codebook_bits  B, 1..16 (ESC: 10)
      21    4 u32   chunk_frames   encoder's chunk size in frames, 0 = whole
                                   file (a decoding hint)
      25    8 bytes fingerprint    model id (first 8 bytes of a sha256 of
                                   model config + params)
      33    4 u32   header_crc     zlib.crc32 of bytes [0, 33)

Segment k holding n frames (n = F for every segment but the last):

       0    P bytes codes          the n*S*G codes of frames [k*F, k*F + n),
                                   P = ceil(n * S * G * B / 8)
       P    3 u24   crc24          CRC-24/OpenPGP (poly 0x864CFB, init
                                   0xB704CE, MSB-first, no final xor) of the
                                   8-byte u64 index k followed by the P code
                                   bytes; stored most significant byte first

There is no segment header: a full segment is exactly
SEG(F) = ceil(F * S * G * B / 8) + 3 bytes, known from the header, so full
segment k starts at byte 37 + k * SEG(F). A flipped byte can therefore never
move a boundary (there is no length field to corrupt): it damages only its own
segment. The index in the CRC makes a segment that is moved, repeated or
spliced in from another position fail its check.

Trailer, TRAILER_SIZE = 32 bytes (`<4sQQQ` + u32 CRC), written when the input
ends; it comes right after the last FULL segment so that a reader knows the
size of the (optional) partial last segment that follows it:

       0    4 bytes magic          b"ESCE"
       4    8 u64   num_frames     T', code frames in the stream (all segments)
      12    8 u64   num_samples    exact signal length at model_rate
      20    8 u64   input_samples  exact length at the input's sample_rate,
                                   2**64 - 1 = unknown (from v1 sources)
      28    4 u32   trailer_crc    zlib.crc32 of bytes [0, 28)

Then, if T' % F = n > 0, the last segment with those n frames (SEG(n) bytes,
index K = T' // F), and the end of the stream: nothing may follow. The file
is exactly 37 + K * SEG(F) + 32 + (SEG(n) if n else 0) bytes (`stream_size`).

A reader at a segment boundary takes the next 32 bytes as the trailer iff they
start with b"ESCE" and their CRC-32 matches; otherwise the next SEG(F) bytes
are segment k (a full segment mistaken for the trailer needs a 32-bit magic
and a 32-bit CRC match). A segment whose CRC fails is reported and its span
concealed if at least a trailer's worth of bytes follows it; otherwise the
stream is reported truncated (or its end damaged) after the last good
segment.

Overhead: the payload is S * G * B bits per frame (S x 1.5 kbps for ESC);
each segment adds its 24-bit CRC plus 0..7 bits of byte padding, and the
file adds 69 bytes (header + trailer). Per-segment overhead at G = 3, B = 10
(`segment_overhead`; bits per second of audio in parentheses):

  kbps     F=10 (0.2 s)   F=25 (0.5 s)   F=50 (1 s)    F=100 (2 s)   F=250 (5 s)
  1.5      9.33% (140)    3.47% (52)     1.87% (28)    0.80% (12)    0.37% (5.6)
  3.0      4.00% (120)    1.87% (56)     0.80% (24)    0.40% (12)    0.16% (4.8)
  4.5      3.11% (140)    1.33% (60)     0.62% (28)    0.27% (12)    0.12% (5.6)
  6.0      2.00% (120)    0.80% (48)     0.40% (24)    0.20% (12)    0.08% (4.8)
  7.5      1.87% (140)    0.69% (52)     0.37% (28)    0.16% (12)    0.07% (5.6)
  9.0      1.33% (120)    0.62% (56)     0.27% (24)    0.13% (12)    0.05% (4.8)

A 24-bit CRC keeps 1 s segments under 2% at 1.5 kbps (a CRC-32 would cost
2.4%): it detects every error burst of up to 24 bits and every odd number of
bit errors, and misses a random corruption with probability 2**-24. Larger F
lowers overhead, smaller F lowers latency (a writer emits a segment when its
F frames exist) and the span lost to a corrupt byte.

Properties: the first S' streams of an S-stream encoding are the S'-stream
encoding, so `transcode` drops streams by repacking segments, bit-identical
to writing S' streams directly. Seeking (seekable files): full segment k is
at a computed offset and the trailer is found from the file size
(`StreamReader.read_trailer`, `StreamReader.seek`, `segment_range`).

v1 (legacy: read; written only by `encode_stream(..., version=1)`)
------------------------------------------------------------------
A 41-byte header (`<4sBBIQBBBII8s` + u32 CRC), then all codes:

       0    4 bytes magic          b"ESCJ"
       4    1 u8    version        1
       5    1 u8    flags          0
       6    4 u32   sample_rate    original input rate (Hz)
      10    8 u64   num_samples    length at 16 kHz
      18    1 u8    num_streams    S
      19    1 u8    group_size     G
      20    1 u8    codebook_bits  B
      21    4 u32   num_frames     T'
      25    4 u32   chunk_frames   encoder chunk hint
      29    8 bytes fingerprint
      37    4 u32   crc32          zlib.crc32 of bytes [0, 37) then the payload
      41    -       payload        ceil(T' * S * G * B / 8) bytes, no more

The reader sees a v1 file as one segment of T' frames (its single CRC covers
everything) whose totals are known from the header.

Errors: every malformed input raises only `BitstreamError` (a ValueError)
with a one-line message. `StreamReader(strict=False)` instead reports a
corrupt segment, a truncated or damaged end and trailing data as `Problem`s
(by default as `BitstreamWarning`s) and goes on; the header must be intact.
Consistency of num_frames with num_samples is model-dependent and is not
checked here.
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
import struct
import warnings
import zlib
from typing import BinaryIO, Callable, Iterator

import numpy as np

from esc_jax.files import seekable, write_bytes_atomic

MAGIC = b"ESCJ"
TRAILER_MAGIC = b"ESCE"
VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
MODEL_SAMPLE_RATE = 16000
FRAME_SAMPLES = 320  # ESC: 20 ms per code frame at 16 kHz
DEFAULT_SEGMENT_FRAMES = 50  # 1 s
MAX_STREAMS = 6
MAX_BITS = 16
FINGERPRINT_SIZE = 8
UNKNOWN = 2**64 - 1  # input_samples of a trailer that does not know it

_FIELDS = struct.Struct("<4sBBIQBBBII8s")  # v1: everything the CRC covers in the header
_CRC = struct.Struct("<I")
HEADER_SIZE = V1_HEADER_SIZE = _FIELDS.size + _CRC.size  # 41 (v1; kept for compatibility)
_FIELDS2 = struct.Struct("<4sBBIIHHBBBI8s")
V2_HEADER_SIZE = _FIELDS2.size + _CRC.size  # 37
_TRAILER = struct.Struct("<4sQQQ")
TRAILER_SIZE = _TRAILER.size + _CRC.size  # 32
SEGMENT_CRC_SIZE = 3
MAX_SEGMENT_BYTES = 1 << 24  # bounds a reader's buffer whatever the header says
MAX_V1_PAYLOAD = 1 << 30  # a v1 CRC covers the whole payload, which must be buffered
_READ_MAX = 1 << 20
_U16_MAX = 2**16 - 1
_U32_MAX = 2**32 - 1
_U64_MAX = 2**64 - 1


class BitstreamError(ValueError):
  """A `.esc` byte stream is malformed, truncated or corrupted."""


def payload_size(num_streams: int, group_size: int, num_frames: int, bits: int) -> int:
  """Payload length in bytes: ceil(num_frames * num_streams * group_size * bits / 8)."""
  return -(-(num_frames * num_streams * group_size * bits) // 8)


def payload_kbps(num_streams: int, group_size: int = 3, bits: int = 10, frame_ms: float = 20) -> float:
  """Payload bitrate in kbps (bits per ms): 1.5 per stream at the defaults."""
  return num_streams * group_size * bits / frame_ms


def streams_for_kbps(kbps, kbps_per_stream: float = 1.5, max_streams: int = MAX_STREAMS) -> int:
  """Number of streams s in 1..max_streams whose bitrate s * kbps_per_stream is `kbps`.

  The one rate-matching rule of the package (`Codec.streams_for_kbps` passes
  its model's rate, transcoding the stream's); ValueError names the valid rates.
  """
  valid = [s * kbps_per_stream for s in range(1, max_streams + 1)]
  try:
    x = float(kbps)
  except (TypeError, ValueError):
    x = math.nan
  s = round(x / kbps_per_stream) if math.isfinite(x) else 0
  if not (1 <= s <= max_streams and abs(x - s * kbps_per_stream) < 1e-3):
    raise ValueError(f"unsupported bitrate {kbps!r} kbps; choose one of {', '.join(f'{v:g}' for v in valid)}")
  return s


def _check_bits(bits: int) -> int:
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= MAX_BITS:
    raise ValueError(f"bits must be an integer in 1..{MAX_BITS}, got {bits!r}")
  return int(bits)


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
  """Packs (S, G, T) integer codes in [0, 2**bits) MSB-first, frame-major."""
  bits = _check_bits(bits)
  codes = np.asarray(codes)
  if codes.ndim != 3:
    raise ValueError(f"codes must have shape (S, G, T), got {codes.shape}")
  if codes.dtype == np.bool_ or not np.issubdtype(codes.dtype, np.integer):
    raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
  if codes.size and (codes.min() < 0 or codes.max() >= (1 << bits)):
    raise ValueError(f"codes out of range [0, {1 << bits}) for {bits} bits: "
                     f"min {codes.min()}, max {codes.max()}")
  flat = np.ascontiguousarray(codes.transpose(2, 0, 1)).reshape(-1).astype(">u2")
  bitmat = np.unpackbits(flat.view(np.uint8).reshape(-1, 2), axis=1)  # (N, 16)
  return np.packbits(bitmat[:, 16 - bits:]).tobytes()


def unpack_codes(data: bytes, num_streams: int, group_size: int, num_frames: int, bits: int) -> np.ndarray:
  """Inverse of `pack_codes`: returns int32 codes of shape (S, G, T)."""
  bits = _check_bits(bits)
  if min(num_streams, group_size, num_frames) < 0:
    raise ValueError("num_streams, group_size and num_frames must be >= 0")
  n = num_streams * group_size * num_frames
  expect = payload_size(num_streams, group_size, num_frames, bits)
  if len(data) != expect:
    raise BitstreamError(f"payload is {len(data)} bytes, expected {expect}")
  allbits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
  if allbits[n * bits:].any():
    raise BitstreamError("nonzero padding bits at end of payload")
  bitmat = np.zeros((n, 16), dtype=np.uint8)
  bitmat[:, 16 - bits:] = allbits[:n * bits].reshape(n, bits)
  flat = np.packbits(bitmat, axis=1).reshape(-1).view(">u2").astype(np.int32)
  return np.ascontiguousarray(flat.reshape(num_frames, num_streams, group_size).transpose(1, 2, 0))


# ---- v2 building blocks -----------------------------------------------------


def _crc24_table() -> list[int]:
  table = []
  for i in range(256):
    c = i << 16
    for _ in range(8):
      c = ((c << 1) ^ 0x864CFB if c & 0x800000 else c << 1) & 0xFFFFFF
    table.append(c & 0xFFFFFF)
  return table


_CRC24_TABLE = _crc24_table()


def crc24(data: bytes, crc: int = 0xB704CE) -> int:
  """CRC-24/OpenPGP of `data` (check value: crc24(b"123456789") == 0x21CF02)."""
  table = _CRC24_TABLE
  for b in data:
    crc = ((crc << 8) & 0xFFFFFF) ^ table[(crc >> 16) ^ b]
  return crc


def _segment_crc(index: int, body: bytes) -> bytes:
  return crc24(body, crc24(index.to_bytes(8, "little"))).to_bytes(3, "big")


def segment_size(num_frames: int, num_streams: int, group_size: int = 3, bits: int = 10) -> int:
  """Bytes of a v2 segment with `num_frames` frames: packed codes + 3-byte CRC."""
  return payload_size(num_streams, group_size, num_frames, bits) + SEGMENT_CRC_SIZE


def segment_overhead(num_streams: int, group_size: int = 3, bits: int = 10,
                     segment_frames: int = DEFAULT_SEGMENT_FRAMES) -> float:
  """Fraction of a full segment's bits that are not code bits (CRC + padding)."""
  code_bits = segment_frames * num_streams * group_size * bits
  return (8 * segment_size(segment_frames, num_streams, group_size, bits) - code_bits) / code_bits


def stream_size(num_frames: int, num_streams: int, group_size: int = 3, bits: int = 10,
                segment_frames: int = DEFAULT_SEGMENT_FRAMES) -> int:
  """Exact size in bytes of a v2 stream of `num_frames` code frames."""
  full, tail = divmod(num_frames, segment_frames)
  size = V2_HEADER_SIZE + full * segment_size(segment_frames, num_streams, group_size, bits) + TRAILER_SIZE
  return size + (segment_size(tail, num_streams, group_size, bits) if tail else 0)


@dataclasses.dataclass(frozen=True)
class StreamHeader:
  """A `.esc` header (see the module docstring for both byte layouts).

  num_samples / num_frames / input_samples are totals: for v1 they come from
  the header, for v2 from the trailer (None until it has been read).
  """

  sample_rate: int  # original input rate (Hz)
  num_streams: int
  group_size: int
  codebook_bits: int
  fingerprint: bytes
  chunk_frames: int = 0
  segment_frames: int = DEFAULT_SEGMENT_FRAMES  # v1: num_frames (one segment)
  model_rate: int = MODEL_SAMPLE_RATE
  frame_samples: int = FRAME_SAMPLES
  num_samples: int | None = None  # at model_rate
  num_frames: int | None = None
  input_samples: int | None = None  # at sample_rate; None = unknown
  version: int = VERSION
  flags: int = 0
  crc32: int = 0

  @property
  def header_size(self) -> int:
    return V1_HEADER_SIZE if self.version == 1 else V2_HEADER_SIZE

  @property
  def codebook_size(self) -> int:
    return 1 << self.codebook_bits

  @property
  def payload_bytes(self) -> int:
    """Bytes of all codes packed together (the v1 payload)."""
    return payload_size(self.num_streams, self.group_size, self.num_frames, self.codebook_bits)

  @property
  def segment_bytes(self) -> int:
    """Size of a full segment (v2)."""
    return segment_size(self.segment_frames, self.num_streams, self.group_size, self.codebook_bits)

  @property
  def frame_seconds(self) -> float:
    return self.frame_samples / self.model_rate

  @property
  def duration_s(self) -> float:
    return self.num_samples / self.model_rate

  @property
  def kbps(self) -> float:
    return payload_kbps(self.num_streams, self.group_size, self.codebook_bits, 1000 * self.frame_seconds)

  def with_trailer(self, trailer: Trailer) -> StreamHeader:
    """This header with the totals of `trailer` filled in."""
    return dataclasses.replace(self, num_frames=trailer.num_frames, num_samples=trailer.num_samples,
                               input_samples=trailer.input_samples)

  def to_bytes(self) -> bytes:
    """The v2 header bytes (validates the fields; ValueError if out of range)."""
    _check_header(self)
    head = _FIELDS2.pack(MAGIC, 2, 0, self.sample_rate, self.model_rate, self.frame_samples,
                         self.segment_frames, self.num_streams, self.group_size, self.codebook_bits,
                         self.chunk_frames, self.fingerprint)
    return head + _CRC.pack(zlib.crc32(head))


@dataclasses.dataclass(frozen=True)
class Trailer:
  """Totals written at the end of a v2 stream."""

  num_frames: int
  num_samples: int  # at the model rate
  input_samples: int | None = None  # at the input's rate; None = unknown

  def to_bytes(self) -> bytes:
    n_in = UNKNOWN if self.input_samples is None else _check_int("input_samples", self.input_samples,
                                                                 0, _U64_MAX - 1)
    body = _TRAILER.pack(TRAILER_MAGIC, _check_int("num_frames", self.num_frames, 0, _U64_MAX - 1),
                         _check_int("num_samples", self.num_samples, 0, _U64_MAX - 1), n_in)
    return body + _CRC.pack(zlib.crc32(body))


def _parse_trailer(data: bytes) -> Trailer | None:
  """The trailer in `data` (TRAILER_SIZE bytes), or None unless magic and CRC match."""
  if len(data) < TRAILER_SIZE or data[:4] != TRAILER_MAGIC:
    return None
  if zlib.crc32(data[:_TRAILER.size]) != _CRC.unpack_from(data, _TRAILER.size)[0]:
    return None
  _, t, n, n_in = _TRAILER.unpack_from(data, 0)
  return Trailer(t, n, None if n_in == UNKNOWN else n_in)


def _check_int(name: str, v, lo: int, hi: int) -> int:
  if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi:
    raise ValueError(f"{name} must be an integer in {lo}..{hi}, got {v!r}")
  return int(v)


def _check_header(h: StreamHeader) -> None:
  """ValueError unless `h` can be written as a v2 header."""
  if h.version != 2 or h.flags != 0:
    raise ValueError(f"only version 2 with flags 0 can be written, got {h.version}, {h.flags}")
  _check_int("sample_rate", h.sample_rate, 1, _U32_MAX)
  _check_int("model_rate", h.model_rate, 1, _U32_MAX)
  _check_int("frame_samples", h.frame_samples, 1, _U16_MAX)
  _check_int("segment_frames", h.segment_frames, 1, _U16_MAX)
  _check_int("num_streams", h.num_streams, 1, MAX_STREAMS)
  _check_int("group_size", h.group_size, 1, 255)
  _check_int("codebook_bits", h.codebook_bits, 1, MAX_BITS)
  _check_int("chunk_frames", h.chunk_frames, 0, _U32_MAX)
  if not isinstance(h.fingerprint, bytes) or len(h.fingerprint) != FINGERPRINT_SIZE:
    raise ValueError(f"fingerprint must be {FINGERPRINT_SIZE} bytes, got {h.fingerprint!r}")
  if h.segment_bytes > MAX_SEGMENT_BYTES:
    raise ValueError(f"a segment of {h.segment_bytes} bytes exceeds the {MAX_SEGMENT_BYTES}-byte limit")


def _check_codes(codes, num_streams: int, group_size: int, bits: int) -> np.ndarray:
  codes = np.asarray(codes)
  if codes.ndim != 3 or codes.shape[:2] != (num_streams, group_size):
    raise ValueError(f"codes must have shape ({num_streams}, {group_size}, T), got {codes.shape}")
  if codes.dtype == np.bool_ or not np.issubdtype(codes.dtype, np.integer):
    raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
  if codes.size and (codes.min() < 0 or codes.max() >= (1 << bits)):
    raise ValueError(f"codes out of range [0, {1 << bits}) for {bits} bits")
  return codes


# ---- writing ----------------------------------------------------------------


class StreamWriter:
  """Writes a v2 stream to a binary file object as its codes arrive.

    w = StreamWriter(f, header)   # nothing written yet
    w.write_header()              # optional: sent first by any write anyway
    w.write_frames(codes)         # (S, G, n): emits every segment completed
    w.close(num_samples, input_samples)  # trailer + partial last segment

  Each complete segment is written (and `f.flush()`ed, if `flush`) as soon
  as its F frames have been given, so a reader at the other end of a pipe
  can decode it. `close` does not close `f`.
  """

  def __init__(self, fileobj: BinaryIO, header: StreamHeader, *, flush: bool = True):
    _check_header(header)
    self.header = dataclasses.replace(header, num_samples=None, num_frames=None, input_samples=None)
    self._f = fileobj
    self._flush = flush and hasattr(fileobj, "flush")
    self._pending: list[np.ndarray] = []
    self._num_pending = 0
    self._header_written = False
    self.segments_written = 0
    self.frames_written = 0  # frames given so far (some may still be buffered)
    self.closed = False

  def _write(self, data: bytes) -> None:
    if not self._header_written:
      self._header_written = True
      self._f.write(self.header.to_bytes())
    self._f.write(data)

  def write_header(self) -> None:
    """Writes the header now (the first write does it anyway)."""
    self._write(b"")
    if self._flush:
      self._f.flush()

  def _emit(self, codes: np.ndarray) -> None:
    body = pack_codes(codes, self.header.codebook_bits)
    self._write(body + _segment_crc(self.segments_written, body))
    self.segments_written += 1

  def write_frames(self, codes) -> None:
    """Appends (S, G, n) codes; writes every segment they complete."""
    if self.closed:
      raise ValueError("write_frames on a closed StreamWriter")
    h = self.header
    codes = _check_codes(codes, h.num_streams, h.group_size, h.codebook_bits)
    if not codes.shape[2]:
      return
    self._pending.append(np.array(codes, np.int32))  # a copy: the caller may reuse its buffer
    self._num_pending += codes.shape[2]
    self.frames_written += codes.shape[2]
    f = h.segment_frames
    if self._num_pending < f:
      return
    buf = np.concatenate(self._pending, axis=2)
    full = buf.shape[2] // f * f
    for i in range(0, full, f):
      self._emit(buf[:, :, i:i + f])
    self._pending = [buf[:, :, full:]] if full < buf.shape[2] else []
    self._num_pending = buf.shape[2] - full
    if self._flush:
      self._f.flush()

  def close(self, num_samples: int, input_samples: int | None = None) -> Trailer:
    """Ends the stream: the trailer, then the partial last segment if any.

    num_samples: exact length at the model rate; input_samples: exact length
    at the header's sample_rate (None = unknown). Returns the trailer.
    """
    if self.closed:
      raise ValueError("StreamWriter already closed")
    trailer = Trailer(self.frames_written, num_samples, input_samples)
    data = trailer.to_bytes()
    self.closed = True
    self._write(data)
    if self._num_pending:
      self._emit(np.concatenate(self._pending, axis=2))
      self._pending, self._num_pending = [], 0
    if self._flush:
      self._f.flush()
    return trailer


def encode_stream(codes: np.ndarray, *, num_samples: int, sample_rate: int, codebook_size: int,
                  fingerprint: bytes, chunk_frames: int = 0, version: int = 2,
                  input_samples: int | None = None, segment_frames: int = DEFAULT_SEGMENT_FRAMES,
                  frame_samples: int = FRAME_SAMPLES, model_rate: int = MODEL_SAMPLE_RATE) -> bytes:
  """Serialises (S, G, T) codes into `.esc` bytes, v2 (default) or v1 (legacy, for compatibility tests).

  The v2 arguments (input_samples, segment_frames, frame_samples,
  model_rate) are ignored for v1; v2 writes through `StreamWriter`.
  """
  if version == 2:
    cs = int(codebook_size)
    if cs < 2 or cs & (cs - 1) or cs > (1 << MAX_BITS):
      raise ValueError(f"codebook_size must be a power of two in 2..{1 << MAX_BITS}, got {codebook_size}")
    codes = np.asarray(codes)
    if codes.ndim != 3:
      raise ValueError(f"codes must have shape (S, G, T), got {codes.shape}")
    header = StreamHeader(sample_rate=sample_rate, num_streams=codes.shape[0], group_size=codes.shape[1],
                          codebook_bits=cs.bit_length() - 1, fingerprint=bytes(fingerprint),
                          chunk_frames=chunk_frames, segment_frames=segment_frames,
                          model_rate=model_rate, frame_samples=frame_samples)
    out = io.BytesIO()
    w = StreamWriter(out, header, flush=False)
    w.write_frames(codes)
    w.close(num_samples, input_samples)
    return out.getvalue()
  if version != 1:
    raise ValueError(f"version must be 1 or 2, got {version!r}")
  return _encode_v1(codes, num_samples=num_samples, sample_rate=sample_rate, codebook_size=codebook_size,
                    fingerprint=fingerprint, chunk_frames=chunk_frames)


def _encode_v1(codes: np.ndarray, *, num_samples: int, sample_rate: int, codebook_size: int,
               fingerprint: bytes, chunk_frames: int = 0) -> bytes:
  codes = np.asarray(codes)
  if codes.ndim != 3:
    raise ValueError(f"codes must have shape (S, G, T), got {codes.shape}")
  s, g, t = codes.shape
  if not 1 <= s <= MAX_STREAMS:
    raise ValueError(f"num_streams must be in 1..{MAX_STREAMS}, got {s}")
  if not 1 <= g <= 255:
    raise ValueError(f"group_size must be in 1..255, got {g}")
  if t > _U32_MAX:
    raise ValueError(f"too many frames: {t}")
  cs = int(codebook_size)
  if cs < 2 or cs & (cs - 1) or cs > (1 << MAX_BITS):
    raise ValueError(f"codebook_size must be a power of two in 2..{1 << MAX_BITS}, got {codebook_size}")
  bits = cs.bit_length() - 1
  if not 0 <= int(num_samples) <= _U64_MAX:
    raise ValueError(f"num_samples out of range: {num_samples}")
  if not 1 <= int(sample_rate) <= _U32_MAX:
    raise ValueError(f"sample_rate must be a positive u32, got {sample_rate}")
  if not 0 <= int(chunk_frames) <= _U32_MAX:
    raise ValueError(f"chunk_frames must be a u32, got {chunk_frames}")
  fingerprint = bytes(fingerprint)
  if len(fingerprint) != FINGERPRINT_SIZE:
    raise ValueError(f"fingerprint must be exactly {FINGERPRINT_SIZE} bytes, got {len(fingerprint)}")
  payload = pack_codes(codes, bits)
  head = _FIELDS.pack(MAGIC, 1, 0, int(sample_rate), int(num_samples), s, g, bits, t,
                      int(chunk_frames), fingerprint)
  crc = zlib.crc32(payload, zlib.crc32(head))
  return head + _CRC.pack(crc) + payload


# ---- reading ----------------------------------------------------------------


class BitstreamWarning(UserWarning):
  """A recoverable problem in a `.esc` stream (corrupt segment, truncation)."""


@dataclasses.dataclass(frozen=True)
class Problem:
  """A recoverable problem met by a non-strict `StreamReader`.

  kind: "corrupt" (a segment failed its CRC and is concealed), "truncated"
  (the stream ends early or its end is damaged: nothing after `start_s` is
  known), "trailing" (bytes after the end of the stream). segment, start_s
  and end_s locate it (end_s is None when unknown).
  """

  kind: str
  message: str
  segment: int | None = None
  start_s: float | None = None
  end_s: float | None = None


@dataclasses.dataclass(frozen=True)
class Segment:
  """Frames [start_frame, start_frame + num_frames) of a stream.

  codes: int32 (S, G, num_frames), or None for a corrupt segment whose span
  [start_s, end_s) is to be concealed.
  """

  index: int
  start_frame: int
  num_frames: int
  codes: np.ndarray | None
  start_s: float
  end_s: float

  @property
  def corrupt(self) -> bool:
    return self.codes is None


def _span(h: StreamHeader, start: int, n: int) -> str:
  fs = h.frame_seconds
  return f"{start * fs:.2f}-{(start + n) * fs:.2f} s"


class StreamReader:
  """Reads a `.esc` stream (v2 or v1) incrementally from bytes or a binary file.

    r = StreamReader(sys.stdin.buffer)  # reads and checks the header
    for seg in r:                       # Segments, as their bytes arrive
      ...                               # seg.codes is None: conceal the span
    r.trailer                           # totals (None if the end was lost)

  The file object must block until data or EOF (like files, pipes,
  sys.stdin.buffer); the reader never asks for more bytes than the next
  decision needs, so each segment is yielded as soon as it is complete.

  strict=False: corrupt segments are yielded with codes None, and problems
  (see `Problem`) are appended to `problems` and passed to `on_problem`
  (default: a `BitstreamWarning`). strict=True: the first problem raises
  BitstreamError. A bad header always raises, as does a valid trailer whose
  frame count contradicts the segments before it.
  """

  def __init__(self, src, *, strict: bool = False, on_problem: Callable[[Problem], None] | None = None):
    if isinstance(src, (bytes, bytearray, memoryview)):
      src = io.BytesIO(bytes(src))
    elif not callable(getattr(src, "read", None)):
      raise BitstreamError(f"expected bytes or a binary file object, got {type(src).__name__}")
    self._f = src
    self._origin = 0  # where the stream starts in a seekable file
    if seekable(src):
      self._origin = src.tell()
    self._buf = bytearray()
    self._eof = False
    self.strict = strict
    self._on_problem = on_problem
    self.problems: list[Problem] = []
    self.trailer: Trailer | None = None
    self._state = "segments"  # -> "tail" -> "end" -> "done"
    self._k = 0  # index of the next segment
    self._tail = 0  # frames of the last segment (state "tail")
    self.header = self._read_header()

  # -- bytes --

  def _fill(self, n: int) -> bool:
    """Reads until `n` bytes are buffered or EOF; True if there are `n`."""
    while len(self._buf) < n and not self._eof:
      chunk = self._f.read(min(n - len(self._buf), _READ_MAX))
      if not chunk:
        self._eof = True
      elif not isinstance(chunk, (bytes, bytearray, memoryview)):
        raise BitstreamError(f"expected a binary stream, read {type(chunk).__name__}")
      else:
        self._buf += chunk
    return len(self._buf) >= n

  def _take(self, n: int) -> bytes:
    data = bytes(self._buf[:n])
    del self._buf[:n]
    return data

  def _problem(self, kind: str, message: str, segment: int | None = None, start: int | None = None,
               n: int | None = None) -> None:
    if self.strict:
      raise BitstreamError(message)
    fs = self.header.frame_seconds
    p = Problem(kind, message, segment, None if start is None else start * fs,
                None if start is None or n is None else (start + n) * fs)
    self.problems.append(p)
    if self._on_problem is None:
      warnings.warn(message, BitstreamWarning, stacklevel=3)
    else:
      self._on_problem(p)

  # -- header --

  def _read_header(self) -> StreamHeader:
    self._fill(5)
    buf = self._buf
    if len(buf) >= 4 and buf[:4] != MAGIC:
      raise BitstreamError(f"not an .esc stream (magic {bytes(buf[:4])!r}, expected {MAGIC!r})")
    if len(buf) < 5:
      raise BitstreamError(f"truncated header: {len(buf)} bytes")
    version = buf[4]
    if version not in SUPPORTED_VERSIONS:
      raise BitstreamError(f"unsupported .esc version {version} (this reader supports 1 and 2)")
    size = V1_HEADER_SIZE if version == 1 else V2_HEADER_SIZE
    if not self._fill(size):
      raise BitstreamError(f"truncated header: {len(buf)} bytes, need {size}")
    return self._header_v1() if version == 1 else self._header_v2()

  def _header_v2(self) -> StreamHeader:
    data = self._take(V2_HEADER_SIZE)
    (crc,) = _CRC.unpack_from(data, _FIELDS2.size)
    actual = zlib.crc32(data[:_FIELDS2.size])
    if crc != actual:
      raise BitstreamError(f"header CRC mismatch (stored 0x{crc:08x}, computed 0x{actual:08x}): "
                           "header is corrupted")
    (_, version, flags, sample_rate, model_rate, frame_samples, segment_frames, s, g, bits,
     chunk_frames, fingerprint) = _FIELDS2.unpack(data[:_FIELDS2.size])
    h = StreamHeader(sample_rate=sample_rate, num_streams=s, group_size=g, codebook_bits=bits,
                     fingerprint=fingerprint, chunk_frames=chunk_frames, segment_frames=segment_frames,
                     model_rate=model_rate, frame_samples=frame_samples, version=version, flags=flags,
                     crc32=crc)
    try:
      _check_header(h)
    except ValueError as e:
      raise BitstreamError(f"invalid header: {e}") from None
    return h

  def _header_v1(self) -> StreamHeader:
    head = bytes(self._buf[:V1_HEADER_SIZE])
    (_, version, flags, sample_rate, num_samples, s, g, bits, t, chunk_frames,
     fingerprint) = _FIELDS.unpack_from(head, 0)
    (crc,) = _CRC.unpack_from(head, _FIELDS.size)
    if flags != 0:
      raise BitstreamError(f"unsupported header flags 0x{flags:02x}")
    if sample_rate == 0:
      raise BitstreamError("sample_rate is 0")
    if not 1 <= s <= MAX_STREAMS:
      raise BitstreamError(f"num_streams {s} out of range 1..{MAX_STREAMS}")
    if g == 0:
      raise BitstreamError("group_size is 0")
    if not 1 <= bits <= MAX_BITS:
      raise BitstreamError(f"codebook_bits {bits} out of range 1..{MAX_BITS}")
    if payload_size(s, g, t, bits) > MAX_V1_PAYLOAD:
      raise BitstreamError(f"v1 payload of {payload_size(s, g, t, bits)} bytes exceeds the "
                           f"{MAX_V1_PAYLOAD}-byte limit")
    self._v1_crc = zlib.crc32(head[:_FIELDS.size])
    del self._buf[:V1_HEADER_SIZE]
    self.trailer = Trailer(t, num_samples, None)
    return StreamHeader(sample_rate=sample_rate, num_streams=s, group_size=g, codebook_bits=bits,
                        fingerprint=fingerprint, chunk_frames=chunk_frames, segment_frames=t,
                        num_samples=num_samples, num_frames=t, version=version, flags=flags, crc32=crc)

  # -- segments --

  def __iter__(self) -> Iterator[Segment]:
    while self._state != "done":
      seg = self._next_v1() if self.header.version == 1 else self._next_v2()
      if seg is not None:
        yield seg

  def _segment(self, index: int, start: int, n: int, body: bytes | None) -> Segment:
    h = self.header
    codes = None
    if body is not None:
      try:
        codes = unpack_codes(body, h.num_streams, h.group_size, n, h.codebook_bits)
      except BitstreamError as e:
        self._problem("corrupt", f"segment {index} ({_span(h, start, n)}): {e}", index, start, n)
    fs = h.frame_seconds
    return Segment(index, start, n, codes, start * fs, (start + n) * fs)

  def _corrupt(self, index: int, start: int, n: int) -> Segment:
    self._problem("corrupt", f"CRC mismatch in segment {index} ({_span(self.header, start, n)}): "
                  "segment is corrupted", index, start, n)
    return self._segment(index, start, n, None)

  def _finish(self) -> None:
    self._state = "done"
    if self._fill(1):
      what = "payload" if self.header.version == 1 else "stream"
      self._problem("trailing", f"over-long {what}: trailing data after the end of the stream")

  def _next_v1(self) -> Segment | None:
    h = self.header
    expect = h.payload_bytes
    if not self._fill(expect):
      self._state = "done"
      self._problem("truncated", f"truncated payload: {len(self._buf)} bytes, expected {expect}", 0, 0)
      return None
    body = self._take(expect)
    actual = zlib.crc32(body, self._v1_crc)
    seg = None
    if actual != h.crc32:
      self._problem("corrupt", f"CRC mismatch (stored 0x{h.crc32:08x}, computed 0x{actual:08x}): "
                    f"stream is corrupted ({_span(h, 0, h.num_frames)})", 0, 0, h.num_frames)
      seg = self._segment(0, 0, h.num_frames, None) if h.num_frames else None
    elif h.num_frames:
      seg = self._segment(0, 0, h.num_frames, body)
    self._finish()
    return seg

  def _next_v2(self) -> Segment | None:
    h = self.header
    f, k = h.segment_frames, self._k
    size = h.segment_bytes
    if self._state == "tail":
      return self._read_tail()
    self._fill(4)
    if not self._buf:
      self._state = "done"
      where = f"segment {k - 1}" if k else "the header"
      self._problem("truncated", f"truncated stream: it ends after {where} without a trailer "
                    f"({_span(h, 0, k * f)} decodable)", k, k * f)
      return None
    if self._buf[:4] == TRAILER_MAGIC and self._fill(TRAILER_SIZE):
      trailer = _parse_trailer(bytes(self._buf[:TRAILER_SIZE]))
      if trailer is not None:
        self._on_trailer(trailer)
        return None
    if self._fill(size) and bytes(self._buf[size - 3:size]) == _segment_crc(k, bytes(self._buf[:size - 3])):
      self._k += 1
      return self._segment(k, k * f, f, self._take(size)[:-3])
    if self._fill(size + TRAILER_SIZE):  # a trailer's worth follows: a damaged segment
      self._take(size)
      self._k += 1
      return self._corrupt(k, k * f, f)
    n = len(self._buf)
    self._take(n)
    self._state = "done"
    where = f"segment {k - 1}" if k else "the header"
    self._problem("truncated", f"truncated stream (or damaged end): {n} unreadable bytes after {where}, "
                  f"no trailer ({_span(h, 0, k * f)} decodable)", k, k * f)
    return None

  def _on_trailer(self, trailer: Trailer) -> None:
    h = self.header
    full, tail = divmod(trailer.num_frames, h.segment_frames)
    if full != self._k:
      raise BitstreamError(f"trailer says {trailer.num_frames} frames ({full} full segments) but "
                           f"{self._k} full segments precede it")
    self._take(TRAILER_SIZE)
    self.trailer = trailer
    self._tail = tail
    if tail:
      self._state = "tail"
    else:
      self._finish()

  def _read_tail(self) -> Segment | None:
    h = self.header
    k, n = self._k, self._tail
    start = k * h.segment_frames
    size = segment_size(n, h.num_streams, h.group_size, h.codebook_bits)
    if not self._fill(size):
      self._state = "done"
      self._problem("truncated", f"truncated stream: last segment {k} ({_span(h, start, n)}) has "
                    f"{len(self._buf)} of {size} bytes", k, start, n)
      return None
    data = self._take(size)
    self._k += 1
    seg = (self._segment(k, start, n, data[:-3]) if data[-3:] == _segment_crc(k, data[:-3])
           else self._corrupt(k, start, n))
    self._finish()
    return seg

  # -- random access --

  def read_trailer(self) -> Trailer | None:
    """The trailer, found from the file size in a seekable file without reading the segments.

    None if unknown: a non-seekable stream whose end has not been read yet, or
    a file that is truncated, damaged at its end or followed by extra bytes.
    Once found it is also `self.trailer`.
    """
    if self.trailer is not None or not seekable(self._f):
      return self.trailer
    h = self.header
    pos = self._f.tell()
    try:
      end = self._f.seek(0, io.SEEK_END)
      rel = end - self._origin - V2_HEADER_SIZE - TRAILER_SIZE
      for full in (rel // h.segment_bytes, rel // h.segment_bytes - 1):
        if full < 0:
          continue
        self._f.seek(self._origin + V2_HEADER_SIZE + full * h.segment_bytes)
        trailer = _parse_trailer(self._f.read(TRAILER_SIZE))
        if trailer is not None and trailer.num_frames < 2**62 \
            and stream_size(trailer.num_frames, h.num_streams, h.group_size, h.codebook_bits,
                            h.segment_frames) == end - self._origin:
          self.trailer = trailer
          return trailer
      return None
    finally:
      self._f.seek(pos)

  def seek(self, index: int) -> None:
    """Positions a seekable v2 reader so that iteration starts at segment `index`.

    Full segment k starts at byte V2_HEADER_SIZE + k * header.segment_bytes;
    nothing before it is read. Past the last segment, iteration yields nothing.
    """
    h = self.header
    if h.version != 2 or not seekable(self._f):
      raise ValueError("seek needs a v2 stream in a seekable file")
    index = _check_int("index", index, 0, _U64_MAX)
    trailer = self.read_trailer()
    self._buf.clear()
    self._eof = False
    self._state = "segments"
    if trailer is not None:
      full, tail = divmod(trailer.num_frames, h.segment_frames)
      if index > full or (index == full and not tail):
        self._state = "done"
        return
    self._f.seek(self._origin + V2_HEADER_SIZE + index * h.segment_bytes)
    self._k = index


def segment_range(header: StreamHeader, start_s: float, duration_s: float | None = None,
                  context_frames: int = 0, num_frames: int | None = None) -> range:
  """Indices of the segments holding frames of [start_s, start_s + duration_s).

  context_frames widens the frame range on both sides (model context);
  duration_s None = to the end; num_frames (from the trailer) clips it.
  """
  fs = header.frame_seconds
  f0 = max(0, math.floor(start_s / fs + 1e-9) - context_frames)
  if duration_s is None:
    if num_frames is None:
      raise ValueError("duration_s None needs num_frames")
    f1 = num_frames
  else:
    f1 = math.ceil((start_s + duration_s) / fs - 1e-9) + context_frames
  if num_frames is not None:
    f1 = min(f1, num_frames)
  f = max(1, header.segment_frames)
  return range(f0 // f, max(f0 // f, -(-f1 // f)))


@dataclasses.dataclass(frozen=True)
class DecodedStream:
  """All of a stream's codes; frames of corrupt segments are 0 and not `valid`."""

  header: StreamHeader  # totals from the trailer (if it was lost: see `read_codes`)
  codes: np.ndarray  # int32 (S, G, T)
  valid: np.ndarray  # bool (T,)
  problems: list[Problem]
  trailer: Trailer | None


def read_codes(src, *, strict: bool = False, on_problem: Callable[[Problem], None] | None = None
               ) -> DecodedStream:
  """Reads a whole stream (bytes, binary file or a `StreamReader`) into one array, concealing damage.

  A StreamReader is read from where it is, with its own strict / on_problem.

  Without a trailer (truncated stream) T is the frames of the whole segments
  read and num_samples is only the estimate T * frame_samples: a model may map
  T frames to fewer samples (ESC: T * 320 - hop), so recompute it there.
  """
  reader = src if isinstance(src, StreamReader) else StreamReader(src, strict=strict, on_problem=on_problem)
  h = reader.header
  segs = list(reader)
  t = reader.trailer.num_frames if reader.trailer else sum(s.num_frames for s in segs)
  codes = np.zeros((h.num_streams, h.group_size, t), np.int32)
  valid = np.zeros(t, bool)
  for s in segs:
    if s.codes is not None:
      codes[:, :, s.start_frame:s.start_frame + s.num_frames] = s.codes
      valid[s.start_frame:s.start_frame + s.num_frames] = True
  trailer = reader.trailer or Trailer(t, t * h.frame_samples, None)
  return DecodedStream(h.with_trailer(trailer), codes, valid, reader.problems, reader.trailer)


def decode_stream(data: bytes) -> tuple[StreamHeader, np.ndarray]:
  """Parses `.esc` bytes (v1 or v2) into (header with totals, int32 codes (S, G, T)).

  Strict: BitstreamError on any damage, truncation or trailing data.
  """
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise BitstreamError(f"expected bytes, got {type(data).__name__}")
  d = read_codes(bytes(data), strict=True)
  return d.header, d.codes


def transcode(src, num_streams: int, dst: BinaryIO | None = None, *,
              segment_frames: int | None = None) -> bytes | StreamHeader:
  """Rewrites a stream (bytes, binary file or a strict `StreamReader`; v1 or v2) with its first
  `num_streams` streams.

  No model is needed: ESC's first S' streams are its S'-stream encoding, so
  the result is bit-identical to writing those codes directly. Segments are
  written to `dst` as they are read (returns the written header, with totals),
  or returned as bytes.
  segment_frames: re-segment (default: keep; v1 sources get the default).
  Strict: BitstreamError if the source is damaged.
  """
  reader = src if isinstance(src, StreamReader) else StreamReader(src, strict=True)
  if not reader.strict:
    raise ValueError("transcode needs a strict StreamReader")
  h = reader.header
  _check_int("num_streams", num_streams, 1, h.num_streams)
  if segment_frames is None:
    segment_frames = h.segment_frames if h.version == 2 else DEFAULT_SEGMENT_FRAMES
  out_header = StreamHeader(sample_rate=h.sample_rate, num_streams=num_streams, group_size=h.group_size,
                            codebook_bits=h.codebook_bits, fingerprint=h.fingerprint,
                            chunk_frames=h.chunk_frames, segment_frames=segment_frames,
                            model_rate=h.model_rate, frame_samples=h.frame_samples)
  out = io.BytesIO() if dst is None else dst
  writer = StreamWriter(out, out_header, flush=dst is not None)
  writer.write_header()
  for seg in reader:
    writer.write_frames(seg.codes[:num_streams])
  writer.close(reader.trailer.num_samples, reader.trailer.input_samples)
  return out.getvalue() if dst is None else out_header.with_trailer(reader.trailer)


# ---- files ------------------------------------------------------------------


def write_stream(path: str | os.PathLike, data: bytes) -> None:
  """Writes `.esc` bytes to `path` atomically (`esc_jax.files.write_bytes_atomic`)."""
  write_bytes_atomic(path, data)


def read_stream(path: str | os.PathLike) -> tuple[StreamHeader, np.ndarray]:
  """Reads and decodes an `.esc` file (v1 or v2, strict); FileNotFoundError / BitstreamError."""
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError as e:
    raise FileNotFoundError(f"no such .esc file: {path}") from e
  try:
    return decode_stream(data)
  except BitstreamError as e:
    raise BitstreamError(f"{path}: {e}") from e
