"""compress / decompress / transcode: CLI, files, pipes and chunked streaming.

(esc_jax/__main__.py, compress.py, streaming.py, on the tiny fixture codec.) XLA
compiles one program per input shape (~5 s each on 2 cores), so the tests share
shapes: files of 88 code frames, and chunked runs with CHUNK = 24 frames and
24 frames of context, whose windows are 48 frames (the first) and 72 frames
(all others) for every length.
"""
from __future__ import annotations

import io
import math
import os
import subprocess
import sys
import threading
import time
import types

import jax
import numpy as np
import pytest
import soundfile as sf
from hypothesis import given, settings
from hypothesis import strategies as st

import esc_jax
from esc_jax.config_lib import ESC_BASE
from esc_jax import bitstream, compress, streaming
from esc_jax.__main__ import load_codec, main
from esc_jax.audio_io import load_audio
from esc_jax.codec import make_model
from esc_jax.metrics import mel_distance, si_sdr

ASSETS = os.path.join(os.path.dirname(esc_jax.__file__), "assets")
# Every test file has T' = 88 code frames (27761..28080 samples), or is chunked with
# CHUNK = 24 frames and C = 24 frames of context: windows of 48 and 72 frames.
FRAMES = 88
CHUNK = 24
C = 24


@pytest.fixture(scope="module")
def codec(tiny_codec_dir):
  return load_codec(tiny_codec_dir)


@pytest.fixture(scope="module")
def speech():
  """~6.2 s of 16 kHz speech (the two bundled clips)."""
  return np.concatenate([sf.read(os.path.join(ASSETS, f"speech_{i}.wav"), dtype="float32")[0]
                         for i in (0, 1)])


def _cli(capsys, *argv):
  rc = main([str(a) for a in argv])
  return rc, capsys.readouterr().err


def _write(path, x, sr=16000, subtype="FLOAT"):
  sf.write(path, x, sr, subtype=subtype)
  return path


# ---- round trips ----------------------------------------------------------


def test_whole_file_codes_match_codec_encode(tmp_path, capsys, codec, tiny_codec_dir, speech):
  n = FRAMES * codec.samples_per_frame - codec.hop  # a valid length: no padding
  x = speech[:n]
  wav = _write(tmp_path / "in.wav", x)
  esc = tmp_path / "out.esc"
  kbps = codec.kbps(6)
  rc, err = _cli(capsys, "compress", wav, esc, "--checkpoint", tiny_codec_dir, "--kbps", kbps,
                 "--chunk_frames", 0)
  assert rc == 0, err
  header, codes = bitstream.read_stream(esc)
  np.testing.assert_array_equal(codes, codec.encode(x, 6)[0])
  assert (header.num_samples, header.sample_rate, header.chunk_frames) == (n, 16000, 0)
  assert header.fingerprint == codec.fingerprint and header.num_streams == 6
  bits = int(math.log2(codec.codebook_size))
  assert os.path.getsize(esc) == bitstream.stream_size(FRAMES, 6, 3, bits)  # v2, 1 s segments
  assert header.version == 2 and header.input_samples == n and header.segment_frames == 50

  out = tmp_path / "out.wav"
  rc, err = _cli(capsys, "decompress", esc, out, "--checkpoint", tiny_codec_dir, "--chunk_frames", 0)
  assert rc == 0, err
  y, sr = sf.read(out, dtype="float32")
  assert sr == 16000 and y.shape == (n,)
  ref = np.clip(codec.decode(codes[None], n)[0], -1, 1)
  np.testing.assert_allclose(y, ref, atol=1.5 / 32768)  # PCM_16 rounding


@pytest.mark.parametrize("n", [27761, 27901])
def test_length_preserved(tmp_path, capsys, codec, tiny_codec_dir, speech, n):
  wav = _write(tmp_path / "in.wav", speech[:n], subtype="PCM_16")
  esc, out = tmp_path / "x.esc", tmp_path / "y.wav"
  assert _cli(capsys, "compress", wav, esc, "--checkpoint", tiny_codec_dir, "--quiet")[0] == 0
  header, codes = bitstream.read_stream(esc)
  assert header.num_samples == n and codes.shape == (codec.max_streams, 3, codec.num_frames(n))
  assert _cli(capsys, "decompress", esc, out, "--checkpoint", tiny_codec_dir)[0] == 0
  assert sf.info(out).frames == n
  if n == 27761:  # a lossy output format gets its own subtype
    assert _cli(capsys, "decompress", esc, tmp_path / "y.ogg", "--checkpoint", tiny_codec_dir)[0] == 0
    assert (sf.info(tmp_path / "y.ogg").subtype, sf.info(tmp_path / "y.ogg").frames) == ("VORBIS", n)


@pytest.mark.parametrize("rate, channels", [(44100, 2), (8000, 1)])
def test_original_rate_length_exact(tmp_path, capsys, codec, tiny_codec_dir, speech, rate, channels):
  import soxr
  x = soxr.resample(speech[:27950], 16000, rate)
  n_in = len(x) - 7  # not a length that 16 kHz maps back to
  data = np.stack([x[:n_in], 0.5 * x[:n_in]], axis=1) if channels == 2 else x[:n_in]
  wav = _write(tmp_path / "in.wav", data, sr=rate, subtype="PCM_16")
  esc = tmp_path / "in.esc"
  assert _cli(capsys, "compress", wav, esc, "--checkpoint", tiny_codec_dir)[0] == 0
  header, codes = bitstream.read_stream(esc)
  assert (header.sample_rate, header.input_samples) == (rate, n_in)
  assert header.num_samples == len(load_audio(wav))  # mono 16 kHz length, as load_audio gives it
  assert codec.num_frames(header.num_samples) == FRAMES

  out16, out_orig = tmp_path / "o16.wav", tmp_path / "orig.wav"
  assert _cli(capsys, "decompress", esc, out16, "--checkpoint", tiny_codec_dir)[0] == 0
  info = sf.info(out16)
  assert (info.samplerate, info.channels, info.frames) == (16000, 1, header.num_samples)
  assert _cli(capsys, "decompress", esc, out_orig, "--checkpoint", tiny_codec_dir,
              "--sample_rate", "original")[0] == 0
  info = sf.info(out_orig)
  assert (info.samplerate, info.frames) == (rate, n_in)  # exactly the input's length (the trailer's)
  # the output is the decoded 16 kHz audio resampled
  y = sf.read(out_orig, dtype="float32")[0]
  ref = soxr.resample(codec.decode(codes[None], header.num_samples)[0], 16000, rate, quality="VHQ")
  m = min(len(ref), n_in)
  assert float(si_sdr(ref[None, :m], y[None, :m])[0]) > 40


def test_streams_for_kbps(codec):
  base = esc_jax.Codec(esc_jax.make_model(ESC_BASE), {})  # 1024 codes: 1.5 kbps per stream
  assert base.model.kbps_per_stream == 1.5 and base.samples_per_frame == 320
  assert [base.streams_for_kbps(k) for k in ("1.5", 3, 4.5, "6", 7.5, 9.0)] == [1, 2, 3, 4, 5, 6]
  for bad in ("5", "0", "10.5", "nan", "six"):
    with pytest.raises(ValueError, match="unsupported bitrate"):
      base.streams_for_kbps(bad)
  assert codec.streams_for_kbps(codec.kbps(2)) == 2  # 0.9 kbps per stream at 64 codes


# ---- chunking -------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(t=st.integers(1, 3000), n=st.integers(1, 300).map(lambda v: 2 * v), c=st.integers(0, 40))
def test_chunk_plan_partitions_frames(t, n, c):
  wins = streaming.chunk_plan(t, n, c)
  assert wins[0].keep_start == 0 and wins[-1].keep_end == wins[-1].end == t
  for a, b in zip(wins, wins[1:]):
    assert a.keep_end == b.keep_start  # every frame kept exactly once
  for w in wins:
    assert w.start % streaming.ALIGN_FRAMES == 0 and 0 <= w.start <= w.keep_start < w.keep_end <= w.end <= t
    assert w.keep_start - w.start >= c or w.start == 0  # exact context on both sides
    assert w.end - w.keep_end >= c or w.end == t
  for k, w in enumerate(wins[:-1]):  # chunk boundaries on multiples of N, independent of t
    assert w == streaming.regular_window(k, n, c) and w.keep_start == k * n and w.end < t
  full = n + c + c + c % 2
  widths = {w.end - w.start for w in wins}
  assert all(wd in (full, full + 1) or w.start == 0 for w, wd in zip(wins, (w.end - w.start for w in wins)))
  assert len(widths) <= math.ceil(c / n) + 3  # shapes to compile: first windows, full, final
  if t <= n + c:
    assert wins == [streaming.Window(0, t, 0, t)]


def test_chunked_matches_whole_file(codec, speech):
  x = speech[:FRAMES * codec.samples_per_frame - codec.hop]
  assert [(w.start, w.end) for w in streaming.chunk_plan(FRAMES, CHUNK, C)] == [(0, 48), (0, 72), (16, 88)]
  whole = codec.encode(x, 6)[0]
  assert streaming.context_frames_for(codec) == C
  chunked = streaming.encode_chunked(codec, x, 6, CHUNK, C)
  # The context covers the receptive field: chunked codes are the whole-file codes.
  np.testing.assert_array_equal(chunked, whole)

  spf, got = codec.samples_per_frame, []
  enc = streaming.ChunkedEncoder(codec, 6, CHUNK, C)
  for i in range(0, len(x), 777):  # push in odd-sized blocks: same codes, as soon as possible
    got.append(enc.push(x[i:i + 777]))
    have = codec.num_frames(enc.num_samples) - 1
    assert enc.frames_out == sum(c.shape[2] for c in got)
    assert enc.frames_out == max(0, have - C) // CHUNK * CHUNK  # frames [0, kN) once audio passes kN + C
  got.append(enc.finish())
  np.testing.assert_array_equal(np.concatenate(got, axis=2), chunked)
  assert [c.shape[2] for c in got if c.shape[2]] == [24, 24, 40]

  y_whole = codec.decode(whole[None], len(x))
  y_chunk = streaming.decode_chunked(codec, chunked, len(x), CHUNK, C)[None]
  sdr = float(si_sdr(y_whole, y_chunk)[0])
  mel = float(mel_distance(y_whole, y_chunk)[0])
  assert y_chunk.shape == y_whole.shape
  assert sdr > 60 and mel < 0.01, (sdr, mel)  # measured: > 120 dB, 0.0
  # Online decoding, codes pushed frame by frame: the same audio, each window once its codes are in.
  dec = streaming.ChunkedDecoder(codec, CHUNK, C)
  out = []
  for f in range(FRAMES):
    out += dec.push(chunked[:, :, f:f + 1])
    assert dec.samples_out == (0 if f < 47 else 24 * spf - 320 if f < 71 else 48 * spf - 320)
  out += dec.finish(FRAMES, len(x))
  np.testing.assert_array_equal(np.concatenate(out), y_chunk[0])


def test_default_context_is_the_models():
  """The chunked coders default to their model's own context (ESC-Large needs 44 frames, not Base's 24)."""
  large = make_model(dict(ESC_BASE, swin_depth=4))
  codec = types.SimpleNamespace(model=large, max_streams=6, samples_per_frame=320, hop=80, check_streams=int,
                                frames_to_samples=lambda t: t * 320 - 80)
  assert streaming.context_frames_for(codec) == 44
  assert streaming.ChunkedEncoder(codec, 6).context_frames == 44
  assert streaming.ChunkedDecoder(codec).context_frames == 44
  assert streaming.ChunkedDecoder(codec, context_frames=8).context_frames == 8


def test_chunked_cli(tmp_path, capsys, codec, tiny_codec_dir, speech):
  n = 27999  # arbitrary length
  wav = _write(tmp_path / "in.wav", speech[:n])
  esc, out = tmp_path / "in.esc", tmp_path / "out.wav"
  rc, err = _cli(capsys, "compress", wav, esc, "--checkpoint", tiny_codec_dir, "--chunk_frames", CHUNK)
  assert rc == 0, err
  header, codes = bitstream.read_stream(esc)
  assert header.chunk_frames == CHUNK and header.num_samples == n
  bits = int(math.log2(codec.codebook_size))
  assert os.path.getsize(esc) == bitstream.stream_size(FRAMES, 6, 3, bits)
  whole = codec.encode(speech[:n], 6)[0]
  np.testing.assert_array_equal(codes, whole)
  assert _cli(capsys, "decompress", esc, out, "--checkpoint", tiny_codec_dir)[0] == 0  # header's chunking
  y = sf.read(out, dtype="float32")[0]
  ref = np.clip(codec.decode(whole[None], n), -1, 1)
  assert y.shape == (n,) and float(si_sdr(ref, y[None])[0]) > 40


# ---- errors ---------------------------------------------------------------


@pytest.fixture(scope="module")
def good_esc(tmp_path_factory, codec, speech):
  d = tmp_path_factory.mktemp("esc")
  wav = _write(d / "a.wav", speech[:28000])
  # segments of 48 frames (0.96 s): decoding what is left of a damaged file reuses a compiled shape
  compress.compress_file(codec, wav, d / "a.esc", codec.max_streams, segment_frames=48)
  return (d / "a.esc").read_bytes()


@pytest.fixture(scope="module")
def other_codec_dir(tmp_path_factory, codec, tiny_config):
  params = jax.tree_util.tree_map(lambda p: np.asarray(p) * 1.01, codec.params)
  return esc_jax.save_codec(tmp_path_factory.mktemp("other") / "codec", params, tiny_config)


def _damaged(good: bytes, case: str) -> bytes:
  if case == "flipped":  # a byte of segment 1 (0.96-1.76 s: the last, partial segment)
    bad = bytearray(good)
    bad[len(good) - 10] ^= 0x10
    return bytes(bad)
  return good[:-5]  # truncated: the last segment is incomplete


@pytest.mark.parametrize("case, words", [("flipped", "CRC mismatch in segment 1 (0.96-1.76 s)"),
                                         ("truncated", "last segment 1 (0.96-1.76 s) has")])
def test_damaged_stream_concealed_or_strict(tmp_path, capsys, tiny_codec_dir, good_esc, case, words):
  src = tmp_path / "bad.esc"
  src.write_bytes(_damaged(good_esc, case))
  clean, out = tmp_path / "clean.wav", tmp_path / "out.wav"
  (tmp_path / "good.esc").write_bytes(good_esc)
  assert _cli(capsys, "decompress", tmp_path / "good.esc", clean, "--checkpoint", tiny_codec_dir)[0] == 0
  # Default: a warning naming the segment and its span, the span decoded as silence, exit 0.
  rc, err = _cli(capsys, "decompress", src, out, "--checkpoint", tiny_codec_dir)
  assert rc == 0 and err.startswith("warning: ") and err.count("\n") == 1 and words in err, err
  y, y0 = sf.read(out, dtype="int16")[0], sf.read(clean, dtype="int16")[0]
  assert len(y) == len(y0) == 28000
  assert not y[15360:].any() and y0[15360:].any()  # the lost segment is silent
  far = 15360 - C * 320  # farther from it than the model's context: as decoded from the clean file
  np.testing.assert_allclose(y[:far], y0[:far], atol=1)  # PCM_16 of float-rounding-level differences
  # --strict: an error, no output, an existing output untouched.
  out.unlink()
  rc, err = _cli(capsys, "decompress", src, out, "--checkpoint", tiny_codec_dir, "--strict")
  assert rc != 0 and err.startswith("error: ") and err.count("\n") == 1 and words in err, err
  assert not out.exists()
  out.write_bytes(b"keep me")
  assert _cli(capsys, "decompress", src, out, "--checkpoint", tiny_codec_dir, "--strict")[0] != 0
  assert out.read_bytes() == b"keep me"


@pytest.mark.parametrize("data, words", [(lambda g: g[:20], "truncated header"),
                                         (lambda g: b"RIFF" + bytes(200), "not an .esc"),
                                         (lambda g: g[:37], "no complete segment")])
def test_unreadable_stream(tmp_path, capsys, tiny_codec_dir, good_esc, data, words):
  src = tmp_path / "bad.esc"
  src.write_bytes(data(good_esc))
  out = tmp_path / "out.wav"
  rc, err = _cli(capsys, "decompress", src, out, "--checkpoint", tiny_codec_dir)
  *warnings, last = err.splitlines()  # a header alone is also reported as truncated first
  assert rc != 0 and last.startswith("error: ") and words in last and len(warnings) <= 1, err
  assert not out.exists() and os.listdir(tmp_path) == ["bad.esc"]


def test_wrong_checkpoint(tmp_path, capsys, other_codec_dir, good_esc):
  src = tmp_path / "a.esc"
  src.write_bytes(good_esc)
  out = tmp_path / "a.wav"
  rc, err = _cli(capsys, "decompress", src, out, "--checkpoint", other_codec_dir)
  assert rc != 0 and err.count("\n") == 1 and "different codec" in err and "fingerprint" in err, err
  assert not out.exists()


def test_compress_errors(tmp_path, capsys, tiny_codec_dir, speech):
  empty = _write(tmp_path / "empty.wav", np.zeros(0, np.float32))
  garbage = tmp_path / "garbage.wav"
  garbage.write_bytes(b"RIFF....WAVEfmt nonsense" * 3)
  good = _write(tmp_path / "good.wav", speech[:3000])
  out = tmp_path / "o.esc"
  cases = [((empty,), "empty"), ((garbage,), "cannot read"), ((tmp_path / "missing.wav",), "no such"),
           ((good, "--kbps", "5"), "unsupported bitrate")]
  for (src, *extra), words in cases:
    rc, err = _cli(capsys, "compress", src, out, "--checkpoint", tiny_codec_dir, *extra)
    assert rc != 0 and err.startswith("error: ") and err.count("\n") == 1 and words in err, (src, err)
    assert not out.exists()
  rc, err = _cli(capsys, "compress", good, out, "--checkpoint", tmp_path)  # not a codec dir
  assert rc != 0 and err.count("\n") == 1 and "not a codec directory" in err
  assert sorted(os.listdir(tmp_path)) == ["empty.wav", "garbage.wav", "good.wav"]


def test_subprocess_error_has_no_traceback(tmp_path, tiny_codec_dir, good_esc):
  src = tmp_path / "a.esc"
  src.write_bytes(good_esc[:-1])
  out = tmp_path / "a.wav"
  out.write_bytes(b"old")
  p = subprocess.run([sys.executable, "-m", "esc_jax", "decompress", str(src), str(out),
                      "--checkpoint", str(tiny_codec_dir), "--strict"], capture_output=True, text=True,
                     timeout=120, env={**os.environ, "ESC_JAX_CACHE": "0"})
  assert p.returncode == 1 and p.stderr.startswith("error: ") and "Traceback" not in p.stderr, p.stderr
  assert p.stderr.strip().count("\n") == 0 and out.read_bytes() == b"old"


# ---- folders --------------------------------------------------------------


def test_folder_round_trip(tmp_path, capsys, tiny_codec_dir, speech):
  src = tmp_path / "in"
  (src / "sub" / "deeper").mkdir(parents=True)
  files = {"a.wav": 27800, "sub/b.wav": 28000, "sub/deeper/c.flac": 27900}
  for name, n in files.items():
    sf.write(src / name, speech[:n], 16000, subtype="PCM_16")
  (src / "notes.txt").write_text("not audio")
  rc, err = _cli(capsys, "compress", src, tmp_path / "esc", "--checkpoint", tiny_codec_dir)
  assert rc == 0, err
  escs = sorted(str(p.relative_to(tmp_path / "esc")) for p in (tmp_path / "esc").rglob("*") if p.is_file())
  assert escs == ["a.esc", "sub/b.esc", "sub/deeper/c.esc"]
  rc, err = _cli(capsys, "decompress", tmp_path / "esc", tmp_path / "out", "--checkpoint", tiny_codec_dir)
  assert rc == 0, err
  for name, n in files.items():
    out = (tmp_path / "out" / name).with_suffix(".wav")
    assert sf.info(out).frames == n and sf.info(out).samplerate == 16000


# ---- scalability: every bitrate, transcode -------------------------------------


def test_every_bitrate_round_trip_and_transcode(tmp_path, capsys, codec, tiny_codec_dir, speech):
  n = 27999
  x = speech[:n]
  wav = _write(tmp_path / "in.wav", x)
  full = tmp_path / "s6.esc"
  assert _cli(capsys, "compress", wav, full, "--checkpoint", tiny_codec_dir)[0] == 0
  bits = int(math.log2(codec.codebook_size))
  for s in range(1, 7):
    kbps = codec.kbps(s)
    direct, moved, out = tmp_path / f"d{s}.esc", tmp_path / f"t{s}.esc", tmp_path / f"t{s}.wav"
    assert _cli(capsys, "compress", wav, direct, "--checkpoint", tiny_codec_dir, "--kbps", kbps)[0] == 0
    rc, err = _cli(capsys, "transcode", full, moved, "--kbps", kbps)  # no model
    assert rc == 0, err
    assert moved.read_bytes() == direct.read_bytes()  # bit-identical to compressing at s streams
    header, codes = bitstream.read_stream(moved)
    assert (header.version, header.num_streams, header.num_samples) == (2, s, n)
    assert os.path.getsize(moved) == bitstream.stream_size(FRAMES, s, 3, bits)
    np.testing.assert_array_equal(codes, codec.encode(x, s)[0])
    if s in (1, 6):  # decoding at every rate is model parity (test_codec.py); each rate compiles ~5 s
      assert _cli(capsys, "decompress", moved, out, "--checkpoint", tiny_codec_dir, "--chunk_frames", 0)[0] == 0
      ref = np.clip(codec.decode(codes[None], n)[0], -1, 1)
      np.testing.assert_allclose(sf.read(out, dtype="float32")[0], ref, atol=1.5 / 32768)  # PCM_16 rounding
  # Through streams (pipes) too, and the errors.
  src, dst = io.BytesIO(full.read_bytes()), io.BytesIO()
  assert compress.transcode_file(src, dst, codec.kbps(2)).num_streams == 2
  assert dst.getvalue() == (tmp_path / "d2.esc").read_bytes()
  rc, err = _cli(capsys, "transcode", tmp_path / "d2.esc", tmp_path / "up.esc", "--kbps", codec.kbps(3))
  assert rc == 1 and "cannot transcode up" in err and not (tmp_path / "up.esc").exists()
  rc, err = _cli(capsys, "transcode", full, tmp_path / "x.esc", "--kbps", "1.0")
  assert rc == 1 and "unsupported bitrate" in err


def test_v1_files_still_decode(tmp_path, capsys, codec, tiny_codec_dir, speech):
  n = 28000
  wav = _write(tmp_path / "in.wav", speech[:n])
  v2 = tmp_path / "a.esc"
  assert _cli(capsys, "compress", wav, v2, "--checkpoint", tiny_codec_dir)[0] == 0
  header, codes = bitstream.read_stream(v2)
  v1 = tmp_path / "a1.esc"
  v1.write_bytes(bitstream.encode_stream(codes, num_samples=n, sample_rate=16000, version=1,
                                         codebook_size=codec.codebook_size, fingerprint=codec.fingerprint,
                                         chunk_frames=header.chunk_frames))
  assert v1.read_bytes()[4] == 1
  for src, out in ((v2, "a.wav"), (v1, "a1.wav")):
    assert _cli(capsys, "decompress", src, tmp_path / out, "--checkpoint", tiny_codec_dir)[0] == 0
  assert (tmp_path / "a1.wav").read_bytes() == (tmp_path / "a.wav").read_bytes()
  # seeking in a v1 file (no segments: it reads the codes, then decodes only the span)
  assert _cli(capsys, "decompress", v1, tmp_path / "p.wav", "--checkpoint", tiny_codec_dir,
              "--start", "0.5", "--duration", "0.25")[0] == 0
  np.testing.assert_array_equal(sf.read(tmp_path / "p.wav", dtype="int16")[0],
                                sf.read(tmp_path / "a.wav", dtype="int16")[0][8000:12000])


# ---- 30 s streams: seeking, pipes ----------------------------------------------


@pytest.fixture(scope="module")
def thirty(tmp_path_factory, codec, speech):
  """30 s of speech, compressed file to file with 0.48 s segments and chunks, and decoded."""
  d = tmp_path_factory.mktemp("thirty")
  x = np.tile(speech, 5)[:30 * 16000]
  wav = _write(d / "in.wav", x, subtype="PCM_16")
  esc, out = d / "in.esc", d / "out.wav"
  compress.compress_file(codec, wav, esc, 6, chunk_frames=CHUNK, segment_frames=CHUNK)
  compress.decompress_file(codec, esc, out)
  return wav, esc, out


class _Pipe(io.RawIOBase):
  """A non-seekable byte source (like a pipe)."""

  def __init__(self, data: bytes):
    self.data, self.pos = data, 0

  def readable(self):
    return True

  def readinto(self, b):
    n = min(len(b), len(self.data) - self.pos)
    b[:n] = self.data[self.pos:self.pos + n]
    self.pos += n
    return n


class _Counting(io.BytesIO):
  """A seekable file counting the bytes read."""

  read_bytes = 0

  def read(self, n=-1):
    out = super().read(n)
    self.read_bytes += len(out)
    return out


def test_seek_matches_full_decode(tmp_path, capsys, codec, tiny_codec_dir, thirty):
  _, esc, full = thirty
  y = sf.read(full, dtype="int16")[0]
  assert len(y) == 30 * 16000
  for start, duration in [(12.3, 2.0), (0.0, 0.5), (7.77, 0.01), (29.5, None), (0.47, 0.02)]:
    out = tmp_path / "span.wav"
    args = ["--start", start] + ([] if duration is None else ["--duration", duration])
    rc, err = _cli(capsys, "decompress", esc, out, "--checkpoint", tiny_codec_dir, *args)
    assert rc == 0, err
    a = round(start * 16000)
    b = len(y) if duration is None else a + round(duration * 16000)
    np.testing.assert_array_equal(sf.read(out, dtype="int16")[0], y[a:b])  # exactly the full decode's
  # Only the segments of the span's windows are read: [12.3 s, 14.3 s) needs frames 576..744 of
  # chunks of 24 with 24 frames of context, i.e. 7 of the 63 segments.
  data = esc.read_bytes()
  seg = bitstream.segment_size(CHUNK, 6, 3, 6)
  f = _Counting(data)
  _, n = compress.decompress_file(codec, f, io.BytesIO(), start=12.3, duration=2.0)
  assert n == 32000 and f.read_bytes <= 37 + 2 * 32 + 7 * seg < len(data) / 8
  # A non-seekable source reads everything but decodes the same span.
  pipe = io.BufferedReader(_Pipe(data))
  out = io.BytesIO()
  compress.decompress_file(codec, pipe, out, start=12.3, duration=2.0)
  np.testing.assert_array_equal(sf.read(io.BytesIO(out.getvalue()), dtype="int16")[0],
                                y[196800:228800])
  for bad, words in ((["--start", "30"], "at or after the end"), (["--start", "-1"], "start must be")):
    rc, err = _cli(capsys, "decompress", esc, tmp_path / "x.wav", "--checkpoint", tiny_codec_dir, *bad)
    assert rc == 1 and words in err, err


def _wav_data(data: bytes) -> np.ndarray:
  return sf.read(io.BytesIO(data), dtype="int16")[0]


def test_pipe_chain_matches_files(tiny_codec_dir, thirty):
  """sox ... | esc-jax compress - - | esc-jax decompress - - | play ..., with the input fed slowly."""
  wav, esc, full = thirty
  data = wav.read_bytes()
  env = {**os.environ, "ESC_JAX_CACHE": os.environ["JAX_COMPILATION_CACHE_DIR"]}  # the session's programs
  cli = [sys.executable, "-m", "esc_jax"]
  enc = subprocess.Popen(cli + ["compress", "-", "-", "--checkpoint", str(tiny_codec_dir),
                                "--segment_frames", str(CHUNK)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
  dec = subprocess.Popen(cli + ["decompress", "-", "-", "--checkpoint", str(tiny_codec_dir)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
  first_audio = threading.Event()
  fed, fed_at_first_audio, waited, between = [0], [], [], []

  def feed():  # 0.25 s pieces, slowly; once half is in, nothing more until decoded audio comes out
    piece = 8000
    for i in range(0, len(data), piece):
      if i >= len(data) // 2 and not waited:
        waited.append(first_audio.wait(timeout=300))
      enc.stdin.write(data[i:i + piece])
      enc.stdin.flush()
      fed[0] = i + len(data[i:i + piece])
      time.sleep(0.002)
    enc.stdin.close()

  def relay():  # compress's stdout -> decompress's stdin, keeping a copy
    while chunk := os.read(enc.stdout.fileno(), 1 << 16):
      between.append(chunk)
      dec.stdin.write(chunk)
      dec.stdin.flush()
    dec.stdin.close()

  threads = [threading.Thread(target=feed), threading.Thread(target=relay)]
  for t in threads:
    t.start()
  out = []
  while chunk := os.read(dec.stdout.fileno(), 1 << 16):
    out.append(chunk)
    if not first_audio.is_set() and sum(map(len, out)) > 44:  # past the WAV header: audio
      fed_at_first_audio.append(fed[0])
      first_audio.set()
  for t in threads:
    t.join(timeout=300)
  assert enc.wait(timeout=300) == 0 and dec.wait(timeout=300) == 0, (enc.stderr.read(), dec.stderr.read())
  for p in (enc, dec):  # no warnings, no errors (whatever else JAX may log)
    err = p.stderr.read()
    assert b"warning:" not in err and b"error:" not in err, err
  # Audio came out while the input was still being written (at most half of it was in).
  assert waited == [True] and fed_at_first_audio[0] <= len(data) // 2 + 8000 < len(data)
  # The stream and the audio equal the file-to-file results (same segments and chunks).
  assert b"".join(between) == esc.read_bytes()
  audio = b"".join(out)
  assert audio[:4] == b"RIFF" and audio[40:44] == b"\xff\xff\xff\xff"  # length unknown on a pipe
  np.testing.assert_array_equal(_wav_data(audio), sf.read(full, dtype="int16")[0])


def test_raw_pcm_input(codec, thirty):
  wav, esc, _ = thirty
  x = sf.read(wav, dtype="int16")[0]
  out = io.BytesIO()
  header = compress.compress_file(codec, io.BytesIO(x.astype("<i2").tobytes()), out, 6, raw_rate=16000,
                                  segment_frames=CHUNK)
  assert header.input_samples == len(x) and out.getvalue() == esc.read_bytes()


# ---- robustness: fuzzing the decoder --------------------------------------------


@pytest.fixture(scope="module")
def short_esc(codec, speech):
  """4.8 s (240 frames) in 10 segments of 24 frames, chunks of 24; and its clean decode (float)."""
  x = np.tile(speech, 2)[:240 * 320 - 80]
  src = io.BytesIO()
  sf.write(src, x, 16000, format="WAV", subtype="FLOAT")
  esc = io.BytesIO()
  compress.compress_file(codec, io.BytesIO(src.getvalue()), esc, 6, segment_frames=CHUNK)
  data = esc.getvalue()
  out = io.BytesIO()
  compress.decompress_file(codec, io.BytesIO(data), out, subtype="FLOAT")
  return data, sf.read(io.BytesIO(out.getvalue()), dtype="float32")[0]


@settings(max_examples=20, deadline=None, derandomize=True, database=None)
@given(k=st.integers(2, 7), flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)),
                                          min_size=1, max_size=6))
def test_fuzz_flips_in_one_segment_decode(codec, short_esc, k, flips):
  """Flips confined to segment k: reported with its span; audio farther than the context is unchanged."""
  data, clean = short_esc
  seg = bitstream.segment_size(CHUNK, 6, 3, 6)
  a = 37 + k * seg
  bad = bytearray(data)
  for pos, mask in flips:
    bad[a + pos % seg] ^= mask
  problems, out = [], io.BytesIO()
  compress.decompress_file(codec, io.BytesIO(bytes(bad)), out, subtype="FLOAT", on_problem=problems.append)
  y = sf.read(io.BytesIO(out.getvalue()), dtype="float32")[0]
  assert len(y) == len(clean)
  if bad == data:  # the flips cancelled out
    assert problems == [] and np.array_equal(y, clean)
    return
  t0, t1 = k * CHUNK * 320, (k + 1) * CHUNK * 320  # the segment's samples
  assert [(p.kind, p.segment) for p in problems] == [("corrupt", k)]
  assert (problems[0].start_s, problems[0].end_s) == pytest.approx((t0 / 16000, t1 / 16000))
  assert not y[t0:t1].any()
  far = np.r_[0:t0 - C * 320, t1 + C * 320:len(y)]
  # Windows away from the gap are decoded exactly as in the clean file; those that contain it are
  # decoded as shorter runs, a different XLA program: float rounding only (measured <= 3e-8).
  np.testing.assert_allclose(y[far], clean[far], rtol=0, atol=1e-6)


class _StubCodec:
  """The tiny codec's geometry with a numpy decoder (a frame's audio mixes its codes and its
  neighbours'): exercises the whole decompress path on damaged streams without compiling."""

  samples_per_frame, hop, max_streams, group_size, codebook_size = 320, 80, 6, 3, 64

  def __init__(self, fingerprint):
    self.fingerprint = fingerprint

  def num_frames(self, n):
    return max(1, -(-(n + self.hop) // self.samples_per_frame))

  def frames_to_samples(self, t):
    return t * self.samples_per_frame - self.hop

  def decode(self, codes):
    c = np.asarray(codes, np.float32)[0].sum(axis=(0, 1)) / 1000
    c = np.convolve(c, np.ones(5, np.float32) / 5, mode="same")
    return np.repeat(c, self.samples_per_frame)[None, :-self.hop]


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=8),
       cut=st.integers(0, 10**6), keep_all=st.booleans(), tail=st.binary(max_size=40),
       strict=st.booleans(), pipe=st.booleans(), start=st.none() | st.floats(0, 5))
def test_fuzz_decompress_raises_only_format_errors(codec, short_esc, flips, cut, keep_all, tail, strict, pipe,
                                                   start):
  """Byte flips and truncations anywhere, from a file or a pipe, whole or a span: a decoded result or
  a BitstreamError, nothing else (StreamReader reads only what it needs, so nothing can hang)."""
  data = short_esc[0]
  bad = bytearray(data)
  for pos, mask in flips:
    bad[pos % len(bad)] ^= mask
  bad = bytes(bad) + tail if keep_all else bytes(bad[:cut % (len(bad) + 1)])
  stub = _StubCodec(codec.fingerprint)
  src = io.BufferedReader(_Pipe(bad) if pipe else io.BytesIO(bad))
  out = io.BytesIO()
  try:
    header, n = compress.decompress_file(stub, src, out, context_frames=C, strict=strict, start=start,
                                         duration=None if start is None else 0.5, on_problem=lambda p: None)
  except bitstream.BitstreamError as e:
    assert str(e).startswith("stream: ") and "\n" not in str(e)
    return
  except ValueError as e:  # a span past the end of what survived
    assert start is not None and "at or after the end" in str(e)
    return
  assert bad[:37] == data[:37] and (not strict or bad == data)
  y = sf.read(io.BytesIO(out.getvalue()), dtype="float32")[0]
  assert stub.num_frames(header.num_samples) == header.num_frames
  if start is None:
    assert len(y) == n == header.num_samples
  else:
    assert len(y) == n == min(8000, header.num_samples - round(start * 16000))
