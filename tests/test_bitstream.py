"""Tests for the `.esc` bitstream format (esc_jax.bitstream)."""
from __future__ import annotations

import hashlib
import math
import os
import struct
import time
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
  args = dict(num_samples=t * 320, sample_rate=44100, codebook_size=1 << bits, fingerprint=FP)
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
  assert bs.HEADER_SIZE == bs.StreamHeader.HEADER_SIZE == 41 < 64
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
  kw = dict(num_samples=1280, sample_rate=16000, codebook_size=1024, fingerprint=FP)
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
  assert "version" in _rejects(data[:4] + b"\x02" + data[5:])
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
  for d in (data, b"ESCJ\x01\x00" + data):
    try:
      bs.decode_stream(d)
    except bs.BitstreamError:
      pass


def test_thirty_minutes_is_fast():
  t = 90_000  # 30 min at 20 ms
  codes = _codes(np.random.default_rng(0), 6, 3, t, 10)
  start = time.perf_counter()
  data = bs.encode_stream(codes, num_samples=t * 320, sample_rate=16000, codebook_size=1024,
                          fingerprint=FP)
  _, out = bs.decode_stream(data)
  elapsed = time.perf_counter() - start
  np.testing.assert_array_equal(out, codes)
  assert len(data) == bs.HEADER_SIZE + 6 * 3 * t * 10 // 8
  assert elapsed < 1.0, elapsed


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
