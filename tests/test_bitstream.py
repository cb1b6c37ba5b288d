"""Tests for the `.esc` bitstream format (esc_jax.bitstream): v1 first, then v2."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import os
import struct
import threading
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from esc_jax import bitstream as bs

FP = hashlib.sha256(b"esc-test-model").digest()[:8]


def _codes(rng, s, g, t, bits):
  return rng.integers(0, 1 << bits, size=(s, g, t), dtype=np.int64)


def _stream(s=3, g=3, t=7, bits=10, seed=0, **kw):
  codes = _codes(np.random.default_rng(seed), s, g, t, bits)
  args = dict(num_samples=t * 320, sample_rate=44100, codebook_size=1 << bits, fingerprint=FP, version=1)
  args.update(kw)
  return codes, bs.encode_stream(codes, **args)


@pytest.mark.parametrize("s", range(1, 7))
@pytest.mark.parametrize("bits", range(1, 17))
def test_pack_unpack_round_trip(s, bits):
  rng = np.random.default_rng(100 * s + bits)
  for g, t in [(3, 1), (3, 2), (1, 1), (3, 7), (2, 13), (3, 64)]:
    codes = _codes(rng, s, g, t, bits)
    codes.flat[0] = (1 << bits) - 1  # exercise the top value
    data = bs.pack_codes(codes, bits)
    assert len(data) == math.ceil(bits * s * g * t / 8)
    out = bs.unpack_codes(data, s, g, t, bits)
    assert out.dtype == np.int32 and out.shape == (s, g, t)
    np.testing.assert_array_equal(out, codes)


def test_known_answer_msb_first():
  # 1 = 0000000001, 2 = 0000000010 -> 00000000 01000000 0010|0000
  assert bs.pack_codes(np.array([[[1, 2]]]), 10) == bytes([0x00, 0x40, 0x20])
  assert bs.pack_codes(np.array([[[1023]]]), 10) == bytes([0xFF, 0xC0])


def test_known_answer_frame_major_order():
  # Streams: s0 = [1, 2], s1 = [3, 4] -> t0: 1, 3; t1: 2, 4.
  assert bs.pack_codes(np.array([[[1, 2]], [[3, 4]]]), 4) == bytes([0x13, 0x24])
  # Groups: g0 = [5, 6], g1 = [7, 8] -> t0: 5, 7; t1: 6, 8.
  assert bs.pack_codes(np.array([[[5, 6], [7, 8]]]), 4) == bytes([0x57, 0x68])
  # Stream then group within a frame: (s, g) = (0,0) (0,1) (1,0) (1,1).
  codes = np.array([[[1], [2]], [[3], [4]]])
  assert bs.pack_codes(codes, 4) == bytes([0x12, 0x34])


def test_pack_validation():
  with pytest.raises(ValueError):
    bs.pack_codes(np.array([[[1024]]]), 10)
  with pytest.raises(ValueError):
    bs.pack_codes(np.array([[[-1]]]), 10)
  with pytest.raises(ValueError):
    bs.pack_codes(np.array([[[0.0]]]), 10)
  with pytest.raises(ValueError):
    bs.pack_codes(np.zeros((2, 3)), 10)
  for bits in (0, 17):
    with pytest.raises(ValueError):
      bs.pack_codes(np.zeros((1, 1, 1), np.int32), bits)
  with pytest.raises(bs.BitstreamError):
    bs.unpack_codes(b"\x00\x40", 1, 1, 2, 10)
  with pytest.raises(bs.BitstreamError):  # nonzero padding bits
    bs.unpack_codes(bytes([0x00, 0x40, 0x21]), 1, 1, 2, 10)


def test_header_layout():
  assert bs.HEADER_SIZE == bs.V1_HEADER_SIZE == 41 < 64
  codes, data = _stream(s=2, g=3, t=5, bits=10, sample_rate=22050, num_samples=1601,
                        chunk_frames=50)
  assert data[0:4] == b"ESCJ"
  assert data[4] == 1 and data[5] == 0
  assert struct.unpack_from("<I", data, 6)[0] == 22050
  assert struct.unpack_from("<Q", data, 10)[0] == 1601
  assert tuple(data[18:21]) == (2, 3, 10)
  assert struct.unpack_from("<II", data, 21) == (5, 50)
  assert data[29:37] == FP
  crc = zlib.crc32(data[41:], zlib.crc32(data[:37]))
  assert struct.unpack_from("<I", data, 37)[0] == crc
  assert data[41:] == bs.pack_codes(codes, 10)


@pytest.mark.parametrize("s", range(1, 7))
@pytest.mark.parametrize("bits", [1, 7, 10, 16])
def test_encode_decode_round_trip(s, bits):
  for t in (0, 1, 3, 50):
    codes, data = _stream(s=s, t=t, bits=bits, seed=t, chunk_frames=25)
    assert len(data) == bs.HEADER_SIZE + math.ceil(bits * s * 3 * t / 8)
    header, out = bs.decode_stream(data)
    np.testing.assert_array_equal(out, codes)
    assert out.dtype == np.int32
    assert (header.num_streams, header.group_size, header.num_frames) == (s, 3, t)
    assert header.codebook_bits == bits and header.codebook_size == 1 << bits
    assert header.num_samples == t * 320 and header.sample_rate == 44100
    assert header.chunk_frames == 25 and header.fingerprint == FP
    assert header.version == 1 and header.flags == 0
    assert header.payload_bytes == len(data) - bs.HEADER_SIZE


def test_encode_validation():
  codes = np.zeros((1, 3, 4), np.int32)
  kw = dict(num_samples=1280, sample_rate=16000, codebook_size=1024, fingerprint=FP, version=1)
  for bad in (dict(codebook_size=1000), dict(codebook_size=1), dict(codebook_size=1 << 17),
              dict(fingerprint=b"short"), dict(sample_rate=0), dict(num_samples=-1),
              dict(chunk_frames=-1)):
    with pytest.raises(ValueError):
      bs.encode_stream(codes, **{**kw, **bad})
  for shape in ((0, 3, 4), (7, 3, 4), (1, 0, 4)):
    with pytest.raises(ValueError):
      bs.encode_stream(np.zeros(shape, np.int32), **kw)
  with pytest.raises(ValueError):
    bs.encode_stream(np.full((1, 3, 4), 1024), **kw)


@pytest.mark.parametrize("s", range(1, 7))
def test_payload_bitrate(s):
  t = 500  # 10 s at 20 ms per frame
  payload = bs.pack_codes(np.zeros((s, 3, t), np.int32), 10)
  bps = len(payload) * 8 / 10.0
  assert s * 1500 <= bps < s * 1500 + 8 / 10.0
  assert bs.payload_kbps(s) == pytest.approx(1.5 * s)
  assert bs.streams_for_kbps(1.5 * s) == s
  assert bs.streams_for_kbps(str(1.5 * s)) == s
  assert bs.streams_for_kbps(0.9 * s, 0.9) == s  # 64-entry codebooks: 6 bits x 3 / 20 ms


@pytest.mark.parametrize("kbps", [0, 1, 2.0, 10.5, 12, -1.5, float("nan"), "fast", None])
def test_streams_for_kbps_rejects(kbps):
  with pytest.raises(ValueError, match="1.5, 3, 4.5, 6, 7.5, 9"):
    bs.streams_for_kbps(kbps)


def _rejects(data):
  with pytest.raises(bs.BitstreamError) as e:
    bs.decode_stream(data)
  msg = str(e.value)
  assert msg and "\n" not in msg
  return msg


def test_malformed_inputs():
  _, data = _stream()
  assert "truncated header" in _rejects(b"")
  assert "truncated header" in _rejects(data[:40])
  assert "magic" in _rejects(b"RIFF" + data[4:])
  assert "version 3" in _rejects(data[:4] + b"\x03" + data[5:])
  assert "flags" in _rejects(data[:5] + b"\x01" + data[6:])
  assert "num_streams" in _rejects(data[:18] + b"\x00" + data[19:])
  assert "num_streams" in _rejects(data[:18] + b"\x07" + data[19:])
  assert "group_size" in _rejects(data[:19] + b"\x00" + data[20:])
  assert "codebook_bits" in _rejects(data[:20] + b"\x00" + data[21:])
  assert "codebook_bits" in _rejects(data[:20] + b"\x11" + data[21:])
  assert "truncated payload" in _rejects(data[:-1])
  assert "over-long payload" in _rejects(data + b"\x00")
  assert "CRC" in _rejects(data[:-1] + bytes([data[-1] ^ 0x80]))
  assert "CRC" in _rejects(data[:29] + b"\x00" * 8 + data[37:])  # fingerprint is covered
  assert "bytes" in _rejects(12345)
  assert "bytes" in _rejects("ESCJ")


_BASE_CODES, _BASE = _stream(s=4, g=3, t=9, bits=10, seed=7)
_FUZZ = settings(derandomize=True, max_examples=200, deadline=None, database=None,
                 suppress_health_check=list(HealthCheck))


@_FUZZ
@given(pos=st.integers(0, len(_BASE) - 1), mask=st.integers(1, 255))
def test_fuzz_single_byte_flip(pos, mask):
  data = bytearray(_BASE)
  data[pos] ^= mask
  _rejects(bytes(data))  # CRC32 detects every burst of <= 32 bits


@_FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, len(_BASE) - 1), st.integers(1, 255)), max_size=8),
       cut=st.integers(0, len(_BASE) + 4), tail=st.binary(max_size=4))
def test_fuzz_flips_and_truncations(flips, cut, tail):
  data = bytearray(_BASE)
  for pos, mask in flips:
    data[pos] ^= mask
  data = bytes(data[:cut]) + (tail if cut >= len(_BASE) else b"")
  try:
    header, codes = bs.decode_stream(data)
  except bs.BitstreamError:
    return
  assert data == _BASE  # only the untouched stream is valid
  np.testing.assert_array_equal(codes, _BASE_CODES)


@_FUZZ
@given(data=st.binary(max_size=120))
def test_fuzz_random_bytes(data):
  for d in (data, b"ESCJ\x01\x00" + data, b"ESCJ\x02\x00" + data):
    try:
      bs.decode_stream(d)
    except bs.BitstreamError:
      pass


def test_thirty_minutes_round_trip():  # speed: bench/bench_bitstream.py
  t = 90_000  # 30 min at 20 ms
  codes = _codes(np.random.default_rng(0), 6, 3, t, 10)
  data = bs.encode_stream(codes, num_samples=t * 320, sample_rate=16000, codebook_size=1024,
                          fingerprint=FP, version=1)
  _, out = bs.decode_stream(data)
  np.testing.assert_array_equal(out, codes)
  assert len(data) == bs.HEADER_SIZE + 6 * 3 * t * 10 // 8


def test_write_read_stream(tmp_path):
  codes, data = _stream()
  path = tmp_path / "a.esc"
  bs.write_stream(path, data)
  assert path.read_bytes() == data
  assert os.path.getsize(path) == bs.HEADER_SIZE + math.ceil(10 * 3 * 3 * 7 / 8)
  header, out = bs.read_stream(str(path))
  np.testing.assert_array_equal(out, codes)
  assert header.fingerprint == FP
  assert os.listdir(tmp_path) == ["a.esc"]


def test_read_stream_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.esc"):
    bs.read_stream(tmp_path / "missing.esc")
  bad = tmp_path / "bad.esc"
  bad.write_bytes(b"ESCJ")
  with pytest.raises(bs.BitstreamError, match="bad.esc: truncated header"):
    bs.read_stream(bad)


def test_write_stream_atomic_on_failure(tmp_path, monkeypatch):
  path = tmp_path / "a.esc"
  _, old = _stream(seed=1)
  _, new = _stream(seed=2)
  bs.write_stream(path, old)

  def boom(src, dst):
    raise OSError("simulated failure")

  monkeypatch.setattr(bs.os, "replace", boom)
  with pytest.raises(OSError, match="simulated"):
    bs.write_stream(path, new)
  assert path.read_bytes() == old
  assert os.listdir(tmp_path) == ["a.esc"]
  monkeypatch.undo()
  # A failure while writing (bad data type) also leaves nothing behind.
  with pytest.raises(TypeError):
    bs.write_stream(path, 12345)
  assert path.read_bytes() == old
  assert os.listdir(tmp_path) == ["a.esc"]


# ---- v2 ---------------------------------------------------------------------

F = bs.DEFAULT_SEGMENT_FRAMES  # 50 frames = 1 s


def _v2(codes, seg=F, n=None, n_in=None, **kw):
  t = codes.shape[2]
  args = dict(num_samples=t * 320 if n is None else n, sample_rate=44100, codebook_size=1024,
              fingerprint=FP, version=2, segment_frames=seg,
              input_samples=(t * 320 * 441 // 160 if n_in is None else n_in))
  args.update(kw)
  return bs.encode_stream(codes, **args)


def _header(s=2, seg=F, **kw):
  args = dict(sample_rate=44100, num_streams=s, group_size=3, codebook_bits=10, fingerprint=FP,
              segment_frames=seg)
  args.update(kw)
  return bs.StreamHeader(**args)


def _read(data, **kw):
  problems = []
  d = bs.read_codes(data, on_problem=problems.append, **kw)
  assert d.problems == problems
  return d


def test_crc24_check_value():
  assert bs.crc24(b"123456789") == 0x21CF02  # CRC-24/OpenPGP
  assert bs.crc24(b"") == 0xB704CE


def test_v2_layout():
  codes = _codes(np.random.default_rng(0), 2, 3, 123, 10)
  data = _v2(codes, seg=50, n=39_000, n_in=107_494, chunk_frames=500)
  assert bs.V2_HEADER_SIZE == 37 and bs.TRAILER_SIZE == 32
  # Header: no totals.
  assert data[0:4] == b"ESCJ" and data[4] == 2 and data[5] == 0
  assert struct.unpack_from("<IIHH", data, 6) == (44100, 16000, 320, 50)
  assert tuple(data[18:21]) == (2, 3, 10)
  assert struct.unpack_from("<I", data, 21)[0] == 500
  assert data[25:33] == FP
  assert struct.unpack_from("<I", data, 33)[0] == zlib.crc32(data[:33])
  # Two full segments of 50 frames: 50 * 2 * 3 * 10 bits = 375 bytes + CRC-24.
  seg = 375 + 3
  for k in range(2):
    body = data[37 + k * seg:37 + k * seg + 375]
    assert body == bs.pack_codes(codes[:, :, 50 * k:50 * (k + 1)], 10)
    crc = bs.crc24(k.to_bytes(8, "little") + body)
    assert data[37 + k * seg + 375:37 + (k + 1) * seg] == crc.to_bytes(3, "big")
  # Trailer after the last full segment.
  t = 37 + 2 * seg
  assert data[t:t + 4] == b"ESCE"
  assert struct.unpack_from("<QQQ", data, t + 4) == (123, 39_000, 107_494)
  assert struct.unpack_from("<I", data, t + 28)[0] == zlib.crc32(data[t:t + 28])
  # Last segment: 23 frames = 1380 bits = 172.5 -> 173 bytes (4 zero padding bits) + CRC.
  last = data[t + 32:]
  assert len(last) == 173 + 3 and last[:173] == bs.pack_codes(codes[:, :, 100:], 10)
  assert last[173:] == bs.crc24((2).to_bytes(8, "little") + last[:173]).to_bytes(3, "big")
  assert len(data) == bs.stream_size(123, 2, 3, 10, 50) == 37 + 2 * 378 + 32 + 176


def test_v2_header_has_no_totals():
  rng = np.random.default_rng(1)
  a, b = _v2(_codes(rng, 3, 3, 7, 10)), _v2(_codes(rng, 3, 3, 300, 10), n=5, n_in=9)
  assert a[:37] == b[:37]


@pytest.mark.parametrize("s", range(1, 7))
def test_v2_round_trip(s):
  rng = np.random.default_rng(s)
  for seg in (50, 1, 7):
    for t in (0, 1, seg - 1, seg, seg + 1, 2 * seg, 137):
      if t < 0:
        continue
      codes = _codes(rng, s, 3, t, 10)
      n, n_in = max(0, t * 320 - 17), t * 882 + 5
      data = _v2(codes, seg=seg, n=n, n_in=n_in, chunk_frames=250)
      assert len(data) == bs.stream_size(t, s, 3, 10, seg)
      header, out = bs.decode_stream(data)
      np.testing.assert_array_equal(out, codes)
      assert out.dtype == np.int32 and out.shape == (s, 3, t)
      assert (header.version, header.num_streams, header.segment_frames) == (2, s, seg)
      assert (header.num_frames, header.num_samples, header.input_samples) == (t, n, n_in)
      assert header.chunk_frames == 250 and header.fingerprint == FP and header.sample_rate == 44100
      reader = bs.StreamReader(data, strict=True)
      segs = list(reader)
      assert [g.index for g in segs] == list(range(-(-t // seg)))
      assert [g.num_frames for g in segs] == [min(seg, t - g.start_frame) for g in segs]
      assert all(g.start_frame == g.index * seg for g in segs)
      assert reader.trailer == bs.Trailer(t, n, n_in)


@pytest.mark.parametrize("bits", [1, 3, 7, 16])
def test_v2_round_trip_bits(bits):
  rng = np.random.default_rng(bits)
  for g, t, seg in [(1, 1, 1), (1, 9, 8), (2, 33, 5), (3, 101, 50)]:
    codes = _codes(rng, 1, g, t, bits)
    data = _v2(codes, seg=seg, codebook_size=1 << bits)
    assert len(data) == bs.stream_size(t, 1, g, bits, seg)
    np.testing.assert_array_equal(bs.decode_stream(data)[1], codes)


def test_v2_sizes_and_overhead():
  # Per full 1 s segment at G = 3, B = 10: 24 CRC bits plus 4 padding bits when S is odd.
  expect_bits = {1: 28, 2: 24, 3: 28, 4: 24, 5: 28, 6: 24}
  for s, extra in expect_bits.items():
    code_bits = 50 * s * 30
    assert bs.segment_size(50, s) * 8 == code_bits + extra
    assert bs.segment_overhead(s) == pytest.approx(extra / code_bits)
    # A 10 s file: header + 10 segments + trailer, exactly.
    data = _v2(np.zeros((s, 3, 500), np.int32))
    assert len(data) == 37 + 10 * (code_bits + extra) // 8 + 32
    bps = (len(data) - 69) * 8 / 10
    assert bps == s * 1500 + extra
  assert bs.segment_overhead(1) == pytest.approx(28 / 1500) and bs.segment_overhead(1) < 0.02
  assert max(bs.segment_overhead(s) for s in range(1, 7)) < 0.02
  # Other segment sizes at 1.5 kbps: 0.2 s, 0.5 s, 2 s, 5 s.
  assert [round(100 * bs.segment_overhead(1, segment_frames=f), 2) for f in (10, 25, 100, 250)] == \
      [9.33, 3.47, 0.8, 0.37]
  assert bs.stream_size(0, 6) == 69
  assert bs.stream_size(1, 1) == 69 + 4 + 3  # 30 bits -> 4 bytes


@pytest.mark.parametrize("rate, n_in", [(44100, 27_5624), (8000, 49_999), (16000, 100_000),
                                        (48000, 300_001)])
def test_v2_trailer_input_length_exact(rate, n_in):
  codes = np.zeros((1, 3, 313), np.int32)
  data = _v2(codes, sample_rate=rate, n=100_000, n_in=n_in)
  header, _ = bs.decode_stream(data)
  assert (header.sample_rate, header.num_samples, header.input_samples) == (rate, 100_000, n_in)
  unknown = _v2(codes, input_samples=None)
  assert bs.decode_stream(unknown)[0].input_samples is None
  assert struct.unpack_from("<Q", unknown, 37 + 6 * bs.segment_size(50, 1) + 20)[0] == 2**64 - 1


def test_writer_emits_segments_when_complete():
  h = _header(s=3)
  seg = h.segment_bytes
  assert seg == bs.segment_size(50, 3) == 566
  codes = _codes(np.random.default_rng(2), 3, 3, 173, 10)
  out = io.BytesIO()
  w = bs.StreamWriter(out, h)
  w.write_header()
  assert len(out.getvalue()) == 37
  sizes, pos = [], 0
  for n in (1, 20, 28, 1, 0, 60, 13, 50):  # 173 frames in uneven pieces
    w.write_frames(codes[:, :, pos:pos + n])
    pos += n
    sizes.append(len(out.getvalue()))
  assert sizes == [37, 37, 37, 37 + seg, 37 + seg, 37 + 2 * seg, 37 + 2 * seg, 37 + 3 * seg]
  assert w.segments_written == 3 and w.frames_written == 173
  assert w.close(55_000, 151_594) == bs.Trailer(173, 55_000, 151_594)
  assert out.getvalue() == _v2(codes, n=55_000, n_in=151_594)
  with pytest.raises(ValueError):
    w.write_frames(codes[:, :, :1])
  with pytest.raises(ValueError):
    w.close(1)


def test_writer_copies_and_validates():
  h = _header(s=1)
  buf = np.ones((1, 3, 10), np.int64)
  out = io.BytesIO()
  w = bs.StreamWriter(out, h)
  w.write_frames(buf)
  buf[:] = 5  # reusing the buffer must not change what was written
  w.write_frames(buf)
  w.close(6400, 6400)
  want = np.concatenate([np.ones((1, 3, 10)), np.full((1, 3, 10), 5)], axis=2)
  np.testing.assert_array_equal(bs.decode_stream(out.getvalue())[1], want)
  w = bs.StreamWriter(io.BytesIO(), h)
  for bad in (np.zeros((2, 3, 4), np.int32), np.zeros((1, 2, 4), np.int32), np.zeros((1, 3)),
              np.full((1, 3, 4), 1024), np.full((1, 3, 4), -1), np.zeros((1, 3, 4))):
    with pytest.raises(ValueError):
      w.write_frames(bad)
  for bad in (dict(num_streams=0), dict(num_streams=7), dict(group_size=0), dict(codebook_bits=0),
              dict(codebook_bits=17), dict(segment_frames=0), dict(segment_frames=65536),
              dict(sample_rate=0), dict(fingerprint=b"short"), dict(frame_samples=0),
              dict(model_rate=0), dict(chunk_frames=-1), dict(version=1),
              dict(segment_frames=65535, group_size=255)):  # 200 MB segments
    with pytest.raises(ValueError):
      bs.StreamWriter(io.BytesIO(), dataclasses.replace(h, **bad))
  with pytest.raises(ValueError):
    bs.StreamWriter(io.BytesIO(), h).close(-1)
  with pytest.raises(ValueError):
    bs.encode_stream(np.zeros((1, 3, 4), np.int32), num_samples=1, sample_rate=1, codebook_size=1024,
                     fingerprint=FP, version=3)


# ---- incremental reading ----------------------------------------------------


class _Trickle(io.RawIOBase):
  """A non-seekable byte source returning 1..3 bytes per read (like a slow pipe)."""

  def __init__(self, data, seed=0):
    self.data, self.pos = data, 0
    self.rng = np.random.default_rng(seed)

  def readable(self):
    return True

  def read(self, n=-1):
    k = int(self.rng.integers(1, 4)) if n is None or n < 0 else min(n, int(self.rng.integers(1, 4)))
    out = self.data[self.pos:self.pos + k]
    self.pos += len(out)
    return out


def test_incremental_reading_needs_no_lookahead():
  codes = _codes(np.random.default_rng(3), 4, 3, 217, 10)
  data = _v2(codes)
  seg = bs.segment_size(50, 4)
  src = _Trickle(data)
  reader = bs.StreamReader(src)
  assert src.pos == 37 and reader.trailer is None and reader.header.num_frames is None
  got = []
  for s in reader:
    if s.num_frames == 50:  # yielded as soon as its own last byte has arrived
      assert src.pos == 37 + (s.index + 1) * seg
    got.append(s.codes)
  assert src.pos == len(data) and reader.trailer == bs.Trailer(217, 217 * 320, 217 * 882)
  np.testing.assert_array_equal(np.concatenate(got, axis=2), codes)
  assert reader.problems == []
  # The same through read_codes, for every stream count.
  for s in range(1, 7):
    c = _codes(np.random.default_rng(s), s, 3, 61, 10)
    np.testing.assert_array_equal(bs.read_codes(_Trickle(_v2(c), s), strict=True).codes, c)


def test_real_pipe_segment_arrives_before_writer_finishes():
  codes = _codes(np.random.default_rng(4), 2, 3, 130, 10)
  r, w = os.pipe()
  got_first = threading.Event()
  waited = []

  def produce():
    with os.fdopen(w, "wb") as f:
      writer = bs.StreamWriter(f, _header(s=2))
      writer.write_frames(codes[:, :, :60])  # one full segment + 10 buffered frames
      waited.append(got_first.wait(timeout=20))  # the reader must get segment 0 now
      writer.write_frames(codes[:, :, 60:])
      writer.close(130 * 320, 130 * 882)

  thread = threading.Thread(target=produce)
  thread.start()
  with os.fdopen(r, "rb") as f:
    reader = bs.StreamReader(f)
    it = iter(reader)
    first = next(it)
    got_first.set()
    rest = list(it)
  thread.join(timeout=30)
  assert waited == [True]
  assert first.index == 0 and first.num_frames == 50
  assert [s.index for s in rest] == [1, 2]
  np.testing.assert_array_equal(np.concatenate([first.codes] + [s.codes for s in rest], axis=2), codes)
  assert reader.trailer == bs.Trailer(130, 130 * 320, 130 * 882)


# ---- v1 through the same API -------------------------------------------------


def test_v1_read_through_stream_reader():
  codes, data = _stream(s=5, t=77, seed=5, chunk_frames=25)
  assert data[4] == 1 and len(data) == bs.HEADER_SIZE + math.ceil(5 * 3 * 77 * 10 / 8)
  reader = bs.StreamReader(_Trickle(data))
  assert reader.header.version == 1 and reader.trailer == bs.Trailer(77, 77 * 320, None)
  segs = list(reader)
  assert len(segs) == 1 and (segs[0].index, segs[0].start_frame, segs[0].num_frames) == (0, 0, 77)
  np.testing.assert_array_equal(segs[0].codes, codes)
  d = _read(data)
  np.testing.assert_array_equal(d.codes, codes)
  assert d.valid.all() and d.header.num_samples == 77 * 320 and d.header.input_samples is None
  # Damage: one CRC covers the whole v1 file, so everything is concealed.
  bad = bytearray(data)
  bad[60] ^= 4
  d = _read(bytes(bad))
  assert not d.valid.any() and [p.kind for p in d.problems] == ["corrupt"]
  assert (d.problems[0].start_s, d.problems[0].end_s) == (0, 77 * 0.02)
  d = _read(data[:-1])
  assert d.codes.shape == (5, 3, 77) and not d.valid.any() and d.problems[0].kind == "truncated"
  assert [p.kind for p in _read(data + b"x").problems] == ["trailing"]


def test_v1_to_v2_transcode():
  codes, data = _stream(s=6, t=123, seed=6, chunk_frames=500)
  for s in range(1, 7):
    want = bs.encode_stream(codes[:s], num_samples=123 * 320, sample_rate=44100, codebook_size=1024,
                            fingerprint=FP, chunk_frames=500, version=2)
    assert bs.transcode(data, s) == want


# ---- scalability ------------------------------------------------------------


@pytest.mark.parametrize("s", range(1, 7))
def test_transcode_is_bit_identical(s):
  rng = np.random.default_rng(10 + s)
  for t in (0, 1, 50, 149):
    codes = _codes(rng, s, 3, t, 10)
    data = _v2(codes, chunk_frames=500)
    for k in range(1, s + 1):
      direct = _v2(codes[:k], chunk_frames=500)
      assert bs.transcode(data, k) == direct
      out = io.BytesIO()
      h = bs.transcode(_Trickle(data, k), k, out)  # pipe to file object: returns the header
      assert out.getvalue() == direct
      assert (h.num_streams, h.num_frames) == (k, t)
    assert bs.transcode(data, s, segment_frames=25) == _v2(codes, seg=25, chunk_frames=500)
    with pytest.raises(ValueError):
      bs.transcode(data, s + 1)
    with pytest.raises(ValueError):
      bs.transcode(data, 0)


def test_transcode_rejects_damage():
  data = bytearray(_v2(_codes(np.random.default_rng(0), 3, 3, 120, 10)))
  with pytest.raises(bs.BitstreamError, match="truncated"):
    bs.transcode(bytes(data[:-1]), 1)
  data[40] ^= 1
  with pytest.raises(bs.BitstreamError, match="CRC mismatch in segment 0"):
    bs.transcode(bytes(data), 1)


# ---- seeking ------------------------------------------------------------------


class _Counting(io.BytesIO):
  """A seekable file recording which byte ranges were read."""

  def __init__(self, data):
    super().__init__(data)
    self.reads = []

  def read(self, n=-1):
    pos = self.tell()
    out = super().read(n)
    self.reads.append((pos, pos + len(out)))
    return out


def test_seek_reads_only_the_needed_segments():
  codes = _codes(np.random.default_rng(7), 3, 3, 1234, 10)  # 24.68 s: 24 full segments + 34 frames
  data = _v2(codes, n=1234 * 320 - 99)
  seg = bs.segment_size(50, 3)
  f = _Counting(data)
  reader = bs.StreamReader(f)
  trailer = reader.read_trailer()
  assert trailer == bs.Trailer(1234, 1234 * 320 - 99, 1234 * 882)
  assert sum(b - a for a, b in f.reads) <= 37 + 2 * 32  # header + at most two trailer probes
  h = reader.header
  # [10.3 s, 12.3 s) with 8 frames of model context on each side -> frames 507..623 -> segments 10..12.
  r = bs.segment_range(h, 10.3, 2.0, context_frames=8, num_frames=trailer.num_frames)
  assert r == range(10, 13)
  f.reads.clear()
  reader.seek(r.start)
  segs = []
  for s in reader:
    if s.index >= r.stop:
      break
    segs.append(s)
  assert [s.index for s in segs] == [10, 11, 12]
  np.testing.assert_array_equal(np.concatenate([s.codes for s in segs], axis=2), codes[:, :, 500:650])
  lo = min(a for a, _ in f.reads)
  hi = max(b for _, b in f.reads)
  assert lo == 37 + 10 * seg and hi <= 37 + 14 * seg  # nothing before segment 10 was read
  # The partial last segment and beyond.
  reader.seek(24)
  assert [(s.index, s.num_frames) for s in reader] == [(24, 34)]
  assert reader.problems == []
  reader.seek(25)
  assert list(reader) == []
  assert bs.segment_range(h, 24.0, None, num_frames=1234) == range(24, 25)
  assert bs.segment_range(h, 0.0, 0.02) == range(0, 1)
  assert bs.segment_range(h, 0.99, 0.02) == range(0, 2)  # frames 49..50
  assert bs.segment_range(h, 30.0, 1.0, num_frames=1234) == range(30, 30)


def test_seek_exact_multiple_and_offset_stream():
  codes = _codes(np.random.default_rng(8), 2, 3, 200, 10)
  data = _v2(codes)
  f = io.BytesIO(b"prefix!" + data)  # a stream that starts mid-file
  f.seek(7)
  reader = bs.StreamReader(f)
  assert reader.read_trailer().num_frames == 200
  reader.seek(3)
  assert [s.index for s in reader] == [3]
  reader.seek(4)
  assert list(reader) == []
  reader.seek(1)
  np.testing.assert_array_equal(next(iter(reader)).codes, codes[:, :, 50:100])
  # No trailer where the size says (truncated or trailing bytes): unknown, seek still works.
  assert bs.StreamReader(data[:-5]).read_trailer() is None
  assert bs.StreamReader(data + b"\x00").read_trailer() is None
  with pytest.raises(ValueError):
    bs.StreamReader(_Trickle(data)).seek(1)
  assert bs.StreamReader(_Trickle(data)).read_trailer() is None


# ---- robustness -------------------------------------------------------------

_V2_CODES = _codes(np.random.default_rng(9), 2, 3, 187, 10)  # 3 full segments + 37 frames
_V2 = _v2(_V2_CODES)
_SEG = bs.segment_size(50, 2)  # 378
_TRAILER_AT = 37 + 3 * _SEG
# (start, end) byte ranges of the 4 segments: the last follows the trailer.
_SEGS = [(37 + k * _SEG, 37 + (k + 1) * _SEG) for k in range(3)] + [(_TRAILER_AT + 32, len(_V2))]


def test_corrupt_segment_is_concealed_and_reported():
  for k, (a, b) in enumerate(_SEGS):
    for pos in (a, (a + b) // 2, b - 1):  # codes and CRC bytes
      data = bytearray(_V2)
      data[pos] ^= 0x20
      d = _read(bytes(data))
      n = 50 if k < 3 else 37
      assert [(p.kind, p.segment, p.start_s, p.end_s) for p in d.problems] == \
          [("corrupt", k, k * 1.0, k * 1.0 + n * 0.02)]
      assert f"segment {k} ({k:.2f}-{k + n * 0.02:.2f} s)" in d.problems[0].message
      valid = np.ones(187, bool)
      valid[50 * k:50 * k + n] = False
      np.testing.assert_array_equal(d.valid, valid)
      np.testing.assert_array_equal(d.codes[:, :, valid], _V2_CODES[:, :, valid])
      assert not d.codes[:, :, ~valid].any()
      assert d.header.num_samples == 187 * 320 and d.trailer is not None
      with pytest.raises(bs.BitstreamError, match=f"CRC mismatch in segment {k}"):
        bs.decode_stream(bytes(data))


def test_default_reports_are_warnings():
  data = bytearray(_V2)
  data[100] ^= 1
  with pytest.warns(bs.BitstreamWarning, match=r"segment 0 \(0.00-1.00 s\)"):
    d = bs.read_codes(bytes(data))
  assert len(d.problems) == 1
  with pytest.warns(bs.BitstreamWarning, match="truncated"):
    bs.read_codes(_V2[:500])


def test_truncation_at_every_byte():
  for cut in range(len(_V2)):
    if cut < 37:
      with pytest.raises(bs.BitstreamError, match="truncated header"):
        bs.StreamReader(_V2[:cut])
      continue
    d = _read(_V2[:cut])
    whole = min(3, (cut - 37) // _SEG)  # whole segments before the cut
    frames = 187 if cut >= _SEGS[3][1] else 50 * whole
    assert d.valid.sum() == frames and d.valid[:frames].all()
    np.testing.assert_array_equal(d.codes[:, :, :frames], _V2_CODES[:, :, :frames])
    assert [p.kind for p in d.problems] == ["truncated"]
    p = d.problems[0]
    if cut >= _TRAILER_AT + 32:  # the trailer arrived: only the last segment is missing
      assert d.trailer is not None and d.codes.shape[2] == 187 and (p.start_s, p.end_s) == (3, 3.74)
    else:
      assert d.trailer is None and d.codes.shape[2] == frames and p.start_s == frames * 0.02
      assert d.header.num_frames == frames and d.header.num_samples == frames * 320
    with pytest.raises(bs.BitstreamError, match="truncated"):
      bs.decode_stream(_V2[:cut])
  assert _read(_V2).problems == []


def test_damaged_trailer_and_trailing_data():
  for pos in (_TRAILER_AT, _TRAILER_AT + 10, _TRAILER_AT + 31):
    data = bytearray(_V2)
    data[pos] ^= 0x01
    d = _read(bytes(data))
    assert d.valid.sum() == 150 and [p.kind for p in d.problems] == ["truncated"]
    np.testing.assert_array_equal(d.codes, _V2_CODES[:, :, :150])
  d = _read(_V2 + b"\x00\x01")
  assert [p.kind for p in d.problems] == ["trailing"] and d.valid.all()
  with pytest.raises(bs.BitstreamError, match="over-long stream"):
    bs.decode_stream(_V2 + b"\x00")
  # A valid trailer that contradicts the segments before it is malformed, not damage.
  bad = bytearray(_V2)
  body = bs.Trailer(250, 1, 1).to_bytes()
  bad[_TRAILER_AT:_TRAILER_AT + 32] = body
  with pytest.raises(bs.BitstreamError, match="trailer says 250 frames"):
    bs.read_codes(bytes(bad))


def test_v2_malformed_headers():
  assert "truncated header" in _rejects(_V2[:36])
  assert "header CRC" in _rejects(_V2[:10] + b"\x00" + _V2[11:])
  assert "version 9" in _rejects(_V2[:4] + b"\x09" + _V2[5:])

  def with_fields(**kw):
    h = bs.StreamReader(_V2).header
    h = dataclasses.replace(h, **kw)
    head = struct.pack("<4sBBIIHHBBBI8s", b"ESCJ", 2, h.flags, h.sample_rate, h.model_rate,
                       h.frame_samples, h.segment_frames, h.num_streams, h.group_size,
                       h.codebook_bits, h.chunk_frames, h.fingerprint)
    return head + struct.pack("<I", zlib.crc32(head)) + _V2[37:]

  assert "invalid header: num_streams" in _rejects(with_fields(num_streams=7))
  assert "invalid header: segment_frames" in _rejects(with_fields(segment_frames=0))
  assert "invalid header: codebook_bits" in _rejects(with_fields(codebook_bits=17))
  assert "invalid header: sample_rate" in _rejects(with_fields(sample_rate=0))
  assert "invalid header: only version 2 with flags 0" in _rejects(with_fields(flags=1))
  assert "exceeds" in _rejects(with_fields(segment_frames=65535, group_size=255, codebook_bits=16))
  with pytest.raises(bs.BitstreamError, match="binary file object"):
    bs.StreamReader(12345)
  with pytest.raises(bs.BitstreamError, match="binary stream"):
    bs.StreamReader(io.StringIO("ESCJ\x02"))


def _robust_read(data):
  """Non-strict and strict reads: only BitstreamError may escape; returns the non-strict result."""
  try:
    bs.decode_stream(data)
  except bs.BitstreamError as e:
    assert str(e) and "\n" not in str(e)
  try:
    d = bs.read_codes(data, on_problem=lambda p: None)
  except bs.BitstreamError as e:
    assert str(e) and "\n" not in str(e)
    d = None
  return d


@_FUZZ
@given(k=st.integers(0, 3), flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)),
                                          min_size=1, max_size=8))
def test_fuzz_flips_in_one_segment(k, flips):
  a, b = _SEGS[k]
  data = bytearray(_V2)
  for pos, mask in flips:
    data[a + pos % (b - a)] ^= mask
  d = _robust_read(bytes(data))
  if data == _V2:  # the flips cancelled out
    assert d.problems == [] and d.valid.all()
    return
  n = 50 if k < 3 else 37
  assert [(p.kind, p.segment, p.start_s, p.end_s) for p in d.problems] == \
      [("corrupt", k, k * 1.0, k * 1.0 + n * 0.02)]
  valid = np.ones(187, bool)
  valid[50 * k:50 * k + n] = False
  np.testing.assert_array_equal(d.valid, valid)
  np.testing.assert_array_equal(d.codes[:, :, valid], _V2_CODES[:, :, valid])


# Segments smaller than the trailer: 3 frames x 1 code x 4 bits = 2 bytes + CRC = 5 bytes.
_TINY_CODES = _codes(np.random.default_rng(11), 1, 1, 29, 4)
_TINY = _v2(_TINY_CODES, seg=3, codebook_size=16)
_TINY_SEGS = [(37 + 5 * k, 42 + 5 * k) for k in range(9)] + [(37 + 45 + 32, len(_TINY))]


@_FUZZ
@given(k=st.integers(0, 9), flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)),
                                          min_size=1, max_size=4))
def test_fuzz_flips_in_one_tiny_segment(k, flips):
  assert len(_TINY) == bs.stream_size(29, 1, 1, 4, 3) == 37 + 9 * 5 + 32 + 4
  a, b = _TINY_SEGS[k]
  data = bytearray(_TINY)
  for pos, mask in flips:
    data[a + pos % (b - a)] ^= mask
  d = _robust_read(bytes(data))
  if data == _TINY:
    assert d.problems == [] and d.valid.all()
    return
  n = 3 if k < 9 else 2
  assert [(p.kind, p.segment) for p in d.problems] == [("corrupt", k)]
  assert d.problems[0].start_s == pytest.approx(3 * k * 0.02)
  assert d.problems[0].end_s == pytest.approx((3 * k + n) * 0.02)
  valid = np.ones(29, bool)
  valid[3 * k:3 * k + n] = False
  np.testing.assert_array_equal(d.valid, valid)
  np.testing.assert_array_equal(d.codes[:, :, valid], _TINY_CODES[:, :, valid])


@_FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, len(_V2) - 1), st.integers(1, 255)), max_size=8),
       cut=st.integers(0, len(_V2) + 4), tail=st.binary(max_size=40))
def test_fuzz_v2_flips_and_truncations(flips, cut, tail):
  data = bytearray(_V2)
  for pos, mask in flips:
    data[pos] ^= mask
  data = bytes(data[:cut]) + (tail if cut >= len(_V2) else b"")
  d = _robust_read(data)
  if d is None:
    return
  # Whatever was recovered is exactly the original where valid.
  t = min(d.codes.shape[2], 187)
  np.testing.assert_array_equal(d.codes[:, :, :t][:, :, d.valid[:t]], _V2_CODES[:, :, :t][:, :, d.valid[:t]])
  if data == _V2:
    assert d.problems == [] and d.valid.all()


@_FUZZ
@given(data=st.binary(max_size=200), cut=st.integers(0, 37))
def test_fuzz_v2_random_segments(data, cut):
  _robust_read(_V2[:37] + data)  # a valid header followed by junk
  _robust_read(_V2[:cut] + data)


def test_v2_thirty_minutes_round_trip():  # speed: bench/bench_bitstream.py
  t = 90_000  # 30 min at 20 ms
  codes = _codes(np.random.default_rng(0), 6, 3, t, 10)
  data = _v2(codes)
  _, out = bs.decode_stream(data)
  np.testing.assert_array_equal(out, codes)
  assert len(data) == bs.stream_size(t, 6) == 37 + 1800 * 1128 + 32


def test_crc24_detects_bursts_and_odd_errors():
  # The documented guarantees: every burst of <= 24 bits and every odd number of bit errors.
  rng = np.random.default_rng(12)
  body = rng.integers(0, 256, 375, dtype=np.uint8)
  ref = bs._segment_crc(5, body.tobytes())
  bits = np.unpackbits(body)
  for _ in range(300):
    e = np.zeros_like(bits)
    length = int(rng.integers(1, 25))
    start = int(rng.integers(0, len(bits) - length + 1))
    e[start] = e[start + length - 1] = 1  # a burst: first and last bit flipped, any between
    e[start + 1:start + length - 1] = rng.integers(0, 2, max(0, length - 2))
    assert bs._segment_crc(5, np.packbits(bits ^ e).tobytes()) != ref
    e = np.zeros_like(bits)
    e[rng.choice(len(bits), 2 * int(rng.integers(0, 20)) + 1, replace=False)] = 1
    assert bs._segment_crc(5, np.packbits(bits ^ e).tobytes()) != ref
  assert bs._segment_crc(6, body.tobytes()) != ref  # the index is covered too
