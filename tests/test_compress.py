"""compress / decompress: CLI, files and chunked streaming (esc_jax/__main__.py, compress.py, streaming.py)."""
from __future__ import annotations

import math
import os
import subprocess
import sys

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
from esc_jax.metrics import mel_distance, si_sdr

ASSETS = os.path.join(os.path.dirname(esc_jax.__file__), "assets")
# Every test file has T' = 88 code frames (27761..28080 samples), and chunked runs use
# windows of CHUNK + 2 * 24 = 56 frames: two shapes to compile for the whole module.
FRAMES = 88
CHUNK = 8


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
  assert os.path.getsize(esc) == bitstream.HEADER_SIZE + math.ceil(codes.size * bits / 8)

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


def test_stereo_44k_input(tmp_path, capsys, codec, tiny_codec_dir, speech):
  import soxr
  x16 = speech[:27950]
  x44 = soxr.resample(x16, 16000, 44100)
  n44 = len(x44) - 7
  stereo = np.stack([x44[:n44], 0.5 * x44[:n44]], axis=1)
  wav = _write(tmp_path / "st.wav", stereo, sr=44100, subtype="PCM_16")
  esc = tmp_path / "st.esc"
  assert _cli(capsys, "compress", wav, esc, "--checkpoint", tiny_codec_dir)[0] == 0
  header, codes = bitstream.read_stream(esc)
  assert header.sample_rate == 44100
  assert header.num_samples == len(load_audio(wav))  # mono 16 kHz length, as load_audio gives it

  out16, out44 = tmp_path / "o16.wav", tmp_path / "o44.wav"
  assert _cli(capsys, "decompress", esc, out16, "--checkpoint", tiny_codec_dir)[0] == 0
  info = sf.info(out16)
  assert (info.samplerate, info.channels, info.frames) == (16000, 1, header.num_samples)
  assert _cli(capsys, "decompress", esc, out44, "--checkpoint", tiny_codec_dir,
              "--sample_rate", "original")[0] == 0
  info = sf.info(out44)
  assert info.samplerate == 44100 and info.frames == round(header.num_samples * 44100 / 16000)
  assert abs(info.frames - n44) <= 1  # the header keeps the length at 16 kHz only
  assert codec.num_frames(header.num_samples) == FRAMES
  # the 44.1 kHz output is the decoded 16 kHz audio resampled
  y44 = sf.read(out44, dtype="float32")[0]
  ref = soxr.resample(codec.decode(codes[None], header.num_samples)[0], 16000, 44100, quality="VHQ")
  assert float(si_sdr(ref[None, :info.frames], y44[None])[0]) > 40


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
    assert w.keep_start - w.start >= c or w.start == 0
    assert w.end - w.keep_end >= c or w.end == t
  if len(wins) > 1:
    assert {w.end - w.start for w in wins} <= {n + 2 * c, n + 2 * c + 1}  # at most 2 shapes to compile


def test_chunked_matches_whole_file(codec, speech):
  x = speech[:FRAMES * codec.samples_per_frame - codec.hop]
  assert len(streaming.chunk_plan(FRAMES, CHUNK, 24)) == 5
  whole = codec.encode(x, 6)[0]
  c = streaming.context_frames_for(codec)
  assert c == 24
  chunked = streaming.encode_chunked(codec, x, 6, CHUNK, c)
  # The context covers the receptive field: chunked codes are the whole-file codes.
  np.testing.assert_array_equal(chunked, whole)

  enc = streaming.ChunkedEncoder(codec, 6, CHUNK, c)
  for i in range(0, len(x), 777):  # push in odd-sized blocks: same codes
    enc.push(x[i:i + 777])
  np.testing.assert_array_equal(enc.finish(), chunked)

  y_whole = codec.decode(whole[None], len(x))
  y_chunk = streaming.decode_chunked(codec, chunked, len(x), CHUNK, c)[None]
  sdr = float(si_sdr(y_whole, y_chunk)[0])
  mel = float(mel_distance(y_whole, y_chunk)[0])
  assert y_chunk.shape == y_whole.shape
  assert sdr > 60 and mel < 0.01, (sdr, mel)  # measured: > 120 dB, 0.0


def test_chunked_cli(tmp_path, capsys, codec, tiny_codec_dir, speech):
  n = 27999  # arbitrary length
  wav = _write(tmp_path / "in.wav", speech[:n])
  esc, out = tmp_path / "in.esc", tmp_path / "out.wav"
  rc, err = _cli(capsys, "compress", wav, esc, "--checkpoint", tiny_codec_dir, "--chunk_frames", CHUNK)
  assert rc == 0, err
  header, codes = bitstream.read_stream(esc)
  assert header.chunk_frames == CHUNK and header.num_samples == n
  bits = int(math.log2(codec.codebook_size))
  assert os.path.getsize(esc) == bitstream.HEADER_SIZE + math.ceil(codes.size * bits / 8)
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
  compress.compress_file(codec, wav, d / "a.esc", codec.max_streams)
  return (d / "a.esc").read_bytes()


@pytest.fixture(scope="module")
def other_codec_dir(tmp_path_factory, codec, tiny_config):
  params = jax.tree_util.tree_map(lambda p: np.asarray(p) * 1.01, codec.params)
  return esc_jax.save_codec(tmp_path_factory.mktemp("other") / "codec", params, tiny_config)


def _bad_streams(good: bytes):
  flipped = bytearray(good)
  flipped[bitstream.HEADER_SIZE + 3] ^= 0x10
  return {
      "truncated": (good[:-5], "truncated"),
      "truncated_header": (good[:20], "truncated"),
      "flipped": (bytes(flipped), "CRC"),
      "foreign": (b"RIFF" + bytes(200), "not an .esc"),
  }


@pytest.mark.parametrize("case", ["truncated", "truncated_header", "flipped", "foreign"])
def test_corrupt_stream(tmp_path, capsys, tiny_codec_dir, good_esc, case):
  data, words = _bad_streams(good_esc)[case]
  src = tmp_path / "bad.esc"
  src.write_bytes(data)
  out = tmp_path / "out.wav"
  rc, err = _cli(capsys, "decompress", src, out, "--checkpoint", tiny_codec_dir)
  assert rc != 0 and err.startswith("error: ") and err.count("\n") == 1 and words in err, err
  assert not out.exists() and os.listdir(tmp_path) == ["bad.esc"]
  out.write_bytes(b"keep me")  # an existing output survives a failure
  assert _cli(capsys, "decompress", src, out, "--checkpoint", tiny_codec_dir)[0] != 0
  assert out.read_bytes() == b"keep me"


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
                      "--checkpoint", str(tiny_codec_dir)], capture_output=True, text=True, timeout=120,
                     env={**os.environ, "ESC_JAX_CACHE": "0"})
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
