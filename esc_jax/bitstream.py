"""The `.esc` file format: a fixed header followed by bit-packed codes.

All integers are little-endian and unsigned; the header is packed with no
padding (`struct` format `<4sBBIQBBBII8sI`, HEADER_SIZE = 41 bytes).

  offset size type  field
  ------ ---- ----  -----
       0    4 bytes magic          b"ESCJ"
       4    1 u8    version        1
       5    1 u8    flags          reserved, must be 0
       6    4 u32   sample_rate    rate of the ORIGINAL input file in Hz (> 0),
                                   for optional resampling back on decode
      10    8 u64   num_samples    length of the signal in samples at the
                                   16 kHz model rate (after resampling); the
                                   decoder trims its output to this length
      18    1 u8    num_streams    S, 1..6 (1.5 kbps each at the defaults)
      19    1 u8    group_size     G >= 1 (codes per stream per frame; ESC: 3)
      20    1 u8    codebook_bits  B = log2(codebook_size), 1..16 (ESC: 10)
      21    4 u32   num_frames     T' = code frames per group (one per 20 ms)
      25    4 u32   chunk_frames   frames per chunk used by the encoder,
                                   0 = whole file in one chunk (streaming hint)
      29    8 bytes fingerprint    caller-supplied model id, e.g. the first 8
                                   bytes of a sha256 of model config + params
      37    4 u32   crc32          zlib.crc32 of header bytes [0, 37) followed
                                   by the whole payload
      41    -       payload

Payload: the S*G*T' codes, each written as B bits MSB-first (most significant
bit of a code first, bytes filled from their most significant bit), in
frame-major order

  for t in range(T'): for s in range(S): for g in range(G): code[s, g, t]

so a prefix of the payload holds complete leading frames of every stream
(progressive decoding in time). The final byte is zero-padded; the payload
is exactly ceil(T' * S * G * B / 8) bytes and the file is exactly
HEADER_SIZE + that many bytes (no trailing data). Payload bitrate is
S * G * B / 20 ms, i.e. 1.5 kbps per stream for G = 3, B = 10.

Every malformed input to `decode_stream` raises `BitstreamError` (a
ValueError) with a one-line message. Consistency of num_frames with
num_samples is model-dependent and is not checked here.
"""
from __future__ import annotations

import dataclasses
import math
import os
import struct
import tempfile
import zlib
from typing import ClassVar

import numpy as np

MAGIC = b"ESCJ"
VERSION = 1
MODEL_SAMPLE_RATE = 16000
MAX_STREAMS = 6
MAX_BITS = 16
FINGERPRINT_SIZE = 8

_FIELDS = struct.Struct("<4sBBIQBBBII8s")  # everything the CRC covers in the header
_CRC = struct.Struct("<I")
HEADER_SIZE = _FIELDS.size + _CRC.size  # 41
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


def streams_for_kbps(kbps: float, group_size: int = 3, bits: int = 10, frame_ms: float = 20) -> int:
  """Number of streams (1..6) for a bitrate in {1.5, 3, 4.5, 6, 7.5, 9} kbps."""
  per = payload_kbps(1, group_size, bits, frame_ms)
  valid = [payload_kbps(s, group_size, bits, frame_ms) for s in range(1, MAX_STREAMS + 1)]
  try:
    x = float(kbps)
  except (TypeError, ValueError):
    x = math.nan
  s = round(x / per) if math.isfinite(x) else 0
  if not (1 <= s <= MAX_STREAMS and abs(x - s * per) < 1e-6):
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


@dataclasses.dataclass(frozen=True)
class StreamHeader:
  """Decoded `.esc` header (see module docstring for the byte layout)."""

  sample_rate: int  # original input file rate (Hz)
  num_samples: int  # signal length in samples at the 16 kHz model rate
  num_streams: int
  group_size: int
  codebook_bits: int
  num_frames: int
  chunk_frames: int
  fingerprint: bytes
  version: int = VERSION
  flags: int = 0
  crc32: int = 0

  HEADER_SIZE: ClassVar[int] = HEADER_SIZE

  @property
  def codebook_size(self) -> int:
    return 1 << self.codebook_bits

  @property
  def payload_bytes(self) -> int:
    return payload_size(self.num_streams, self.group_size, self.num_frames, self.codebook_bits)

  @property
  def duration_s(self) -> float:
    return self.num_samples / MODEL_SAMPLE_RATE

  @property
  def kbps(self) -> float:
    return payload_kbps(self.num_streams, self.group_size, self.codebook_bits)


def encode_stream(codes: np.ndarray, *, num_samples: int, sample_rate: int, codebook_size: int,
                  fingerprint: bytes, chunk_frames: int = 0) -> bytes:
  """Serialises (S, G, T) codes plus metadata into `.esc` bytes."""
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
  head = _FIELDS.pack(MAGIC, VERSION, 0, int(sample_rate), int(num_samples), s, g, bits, t,
                      int(chunk_frames), fingerprint)
  crc = zlib.crc32(payload, zlib.crc32(head))
  return head + _CRC.pack(crc) + payload


def decode_stream(data: bytes) -> tuple[StreamHeader, np.ndarray]:
  """Parses `.esc` bytes into (header, int32 codes (S, G, T)); BitstreamError if malformed."""
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise BitstreamError(f"expected bytes, got {type(data).__name__}")
  data = bytes(data)
  if len(data) < HEADER_SIZE:
    raise BitstreamError(f"truncated header: {len(data)} bytes, need {HEADER_SIZE}")
  if data[:4] != MAGIC:
    raise BitstreamError(f"not an .esc stream (magic {data[:4]!r}, expected {MAGIC!r})")
  (_, version, flags, sample_rate, num_samples, s, g, bits, t, chunk_frames,
   fingerprint) = _FIELDS.unpack_from(data, 0)
  (crc,) = _CRC.unpack_from(data, _FIELDS.size)
  if version != VERSION:
    raise BitstreamError(f"unsupported .esc version {version} (this reader supports {VERSION})")
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
  expect = payload_size(s, g, t, bits)
  got = len(data) - HEADER_SIZE
  if got != expect:
    kind = "truncated" if got < expect else "over-long"
    raise BitstreamError(f"{kind} payload: {got} bytes, expected {expect}")
  actual = zlib.crc32(data[HEADER_SIZE:], zlib.crc32(data[:_FIELDS.size]))
  if actual != crc:
    raise BitstreamError(f"CRC mismatch (stored 0x{crc:08x}, computed 0x{actual:08x}): stream is corrupted")
  codes = unpack_codes(data[HEADER_SIZE:], s, g, t, bits)
  header = StreamHeader(sample_rate=sample_rate, num_samples=num_samples, num_streams=s, group_size=g,
                        codebook_bits=bits, num_frames=t, chunk_frames=chunk_frames,
                        fingerprint=fingerprint, version=version, flags=flags, crc32=crc)
  return header, codes


def write_stream(path: str | os.PathLike, data: bytes) -> None:
  """Atomically writes `data` to `path` (temp file in the same dir + os.replace)."""
  path = os.fspath(path)
  d = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp's 0600 is for the temp file, not the result
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except OSError:
      pass
    raise


def read_stream(path: str | os.PathLike) -> tuple[StreamHeader, np.ndarray]:
  """Reads and decodes an `.esc` file; FileNotFoundError / BitstreamError on failure."""
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
