"""ESC-Base compression speed, stage profile, chunking quality and peak memory on CPU.

  python bench/bench_codec.py                      # all sections (~25 min on 2 busy cores)
  python bench/bench_codec.py --skip_memory --seconds 10

Sections (one table each):
  rtf      encode / decode real-time factor (processing s / audio s) of ESC-Base
           (configs/9kbps.py model, random params, 6 streams = 9 kbps) on 10 s and
           60 s of speech, after a warm-up call that compiles; whole-file
           (`Codec.encode/decode`) and the chunked streaming path of the CLI.
  profile  encode / decode of 10 s split into STFT, encoder scales, RVQ + residual
           up layers, decoder, iSTFT, with XLA's FLOP counts.
  quality  chunked vs whole-file coding of 60 s: code agreement, SI-SDR and mel
           distance of the decoded audio (--alignment_study adds odd window starts).
  memory   peak RSS of `compress_file` / `decompress_file` (the CLI path) on a
           1-minute and a --long_minutes file, each in a fresh process; the
           1-minute file also in whole-file mode (chunk_frames=0) for contrast.

Random params (--params random, the default) are drawn per leaf from the
template (Flax's `model.init` of ESC-Base takes ~100 s to compile on 2 cores;
--params init uses it): run time does not depend on the values, and the
chunking results depend only on the receptive field.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SPEECH_GLOBS = ("/work/shared/data/speech_dev/*.wav", os.path.join(ROOT, "esc_jax", "assets", "*.wav"))
SR = 16000


def speech(seconds: float) -> np.ndarray:
  """Speech clips (16 kHz 16-bit mono wav, read with the standard library, so that it runs
  where soundfile is missing) concatenated and tiled to `seconds` of audio."""
  import wave
  files = next((sorted(glob.glob(g)) for g in SPEECH_GLOBS if glob.glob(g)), [])
  if not files:
    raise SystemExit("no speech clips found")
  clips = []
  for f in files:
    with wave.open(f) as w:
      clips.append(np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768)
  x = np.concatenate(clips)
  n = int(seconds * SR)
  return np.tile(x, -(-n // len(x)))[:n]


def random_params(model, seed: int = 0):
  """Params of `model`'s shapes: N(0, 1/fan_in) kernels, unit norms, zero biases, N(0, 1) codebooks."""
  import jax
  from esc_jax.checkpoint import model_template
  rng = np.random.default_rng(seed)

  def leaf(path, t):
    name = str(path[-1].key)
    if name == "scale":
      return np.ones(t.shape, np.float32)
    if name == "bias":
      return np.zeros(t.shape, np.float32)
    if name == "embedding":
      return rng.standard_normal(t.shape).astype(np.float32)
    if name == "relative_position_bias_table":
      return (0.02 * rng.standard_normal(t.shape)).astype(np.float32)
    fan_in = int(np.prod(t.shape[:-1])) or 1
    return (rng.standard_normal(t.shape) / np.sqrt(fan_in)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(leaf, model_template(model)["params"])


def make_codec(params_kind: str):
  import jax
  import jax.numpy as jnp
  from esc_jax.api import Codec
  from esc_jax.codec import make_model
  from esc_jax.config_lib import ESC_BASE
  model = make_model(ESC_BASE)
  t = time.perf_counter()
  if params_kind == "init":
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 560)))["params"]
  else:
    params = random_params(model)
  print(f"ESC-Base params ({params_kind}): {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
  return Codec(model, params, {"model": ESC_BASE})


def timed(fn, repeats: int):
  """(first-call s incl. compile, best of `repeats` wall s, CPU s of that run, last result).

  CPU time (all threads of this process) is less sensitive than wall time to
  other processes on a shared machine: on an idle 2-core machine wall time is
  at least CPU time / 2.
  """
  t = time.perf_counter()
  out = fn()
  first = time.perf_counter() - t
  best, cpu = float("inf"), float("nan")
  for _ in range(repeats):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    wall = time.perf_counter() - t
    if wall < best:
      best, cpu = wall, time.process_time() - c
  return first, best, cpu, out


def table(title: str, header: list[str], rows: list[list]) -> str:
  cells = [header] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  lines = [f"\n## {title}", " | ".join(h.ljust(w) for h, w in zip(cells[0], widths)),
           "-+-".join("-" * w for w in widths)]
  lines += [" | ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells[1:]]
  text = "\n".join(lines)
  print(text, flush=True)
  return text


# ---------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------


def bench_rtf(codec, seconds_list, repeats, streams):
  from esc_jax import streaming
  rows, keep = [], {}
  for secs in seconds_list:
    x = speech(secs)
    modes = [("whole", lambda: codec.encode(x, streams)[0],
              lambda c: codec.decode(c[None], len(x))[0])]
    if codec.num_frames(len(x)) > streaming.DEFAULT_CHUNK_FRAMES + 2 * streaming.context_frames_for(codec):
      modes.append(("chunked", lambda: streaming.encode_chunked(codec, x, streams),
                    lambda c: streaming.decode_chunked(codec, c, len(x))))
    for mode, enc, dec in modes:
      c_enc, t_enc, cpu_enc, codes = timed(enc, repeats)
      c_dec, t_dec, cpu_dec, y = timed(lambda: dec(codes), repeats)
      keep[(secs, mode)] = (x, codes, y)
      rows.append([f"{secs:g} s", mode, c_enc, t_enc, t_enc / secs, c_dec, t_dec, t_dec / secs,
                   t_enc + t_dec, (t_enc + t_dec) / secs, cpu_enc + cpu_dec])
  text = table(f"Real-time factor, ESC-Base, {streams} streams (wall s, best of {repeats}; 1st = first "
               "call, compiles)", ["audio", "mode", "enc 1st", "enc s", "enc RTF", "dec 1st", "dec s",
                                   "dec RTF", "enc+dec s", "RTF", "enc+dec CPU s"], rows)
  return text, keep


def bench_profile(codec, repeats, streams, seconds=10.0):
  import jax
  import jax.numpy as jnp
  from esc_jax import kernels, train_lib
  from esc_jax.codec import ESC
  from esc_jax.layers.attention import TransformerLayer
  from esc_jax.layers.scale import PatchEmbed
  m, p = codec.model, codec.params
  x = jnp.asarray(codec.pad(speech(seconds))[0])
  codes = jnp.asarray(codec.encode(np.asarray(x), streams))
  feat = m.apply({"params": p}, x, method=lambda mm, x: mm.spec(x)).transpose(0, 2, 3, 1)
  h = m.h_dims

  def layer(i):
    scale = None if i < 0 else "down"
    name = "pre_nn" if i < 0 else f"blocks_{i}"
    d_in, d_out = (h[0], h[0]) if i < 0 else (h[i], h[i + 1])
    mod = TransformerLayer(d_in, d_out, m.swin_heads[max(i, 0)], m.swin_depth, m.window_size,
                           m.mlp_ratio, scale, m.dtype)
    return name, lambda t, q=None: mod.apply({"params": (q or p)["encoder"][name]}, t)

  stages = [("stft", lambda x, q: m.apply({"params": q}, x, method=lambda mm, x: mm.spec(x)), x)]
  emb = PatchEmbed(m.in_dim, h[0], tuple(m.patch_size), dtype=m.dtype)
  t = emb.apply({"params": p["encoder"]["patch_embed"]}, feat)
  stages.append(("encoder patch_embed", lambda f, q: emb.apply({"params": q["encoder"]["patch_embed"]}, f), feat))
  for i in range(-1, len(h) - 1):
    name, fn = layer(i)
    stages.append((f"encoder {name} {tuple(t.shape[1:])}", fn, t))
    t = jax.jit(fn)(t, p)
  stages += [
      ("encoder (all)", lambda x, q: m.apply({"params": q}, x, method=lambda mm, x: mm._analyse(x)[1]), x),
      ("encode = encoder + RVQ + up layers", lambda x, q: m.apply({"params": q}, x, streams, method=ESC.encode),
       x),
      ("decoder (to features)",
       lambda c, q: m.apply({"params": q}, c, method=lambda mm, c: mm.decode_features(c)[1]), codes),
  ]
  rf = jax.jit(stages[-1][1])(codes, p)
  stages.append(("istft", lambda f, q: m.apply({"params": q}, f, method=lambda mm, f: mm.wave(f)), rf))
  stages.append(("decode (all)", lambda c, q: m.apply({"params": q}, c, method=ESC.decode), codes))
  rows = []
  for name, fn, arg in stages:
    # params as an argument, as in Codec (a closure would bake them in as constants)
    j = jax.jit(lambda params, a, fn=fn: fn(a, params))
    with kernels.disabled():  # XLA's count of a fresh trace: it sees no work in the kernels' custom calls
      gflop = train_lib.xla_cost(jax.jit(lambda params, a, fn=fn: fn(a, params)).lower(p, arg)) / 1e9
    _, best, cpu, _ = timed(lambda: jax.block_until_ready(j(p, arg)), repeats)
    rows.append([name, best, cpu, gflop, gflop / cpu if cpu else 0.0])
  return table(f"Stage profile, {seconds:g} s of audio (wall s, best of {repeats}; XLA's FLOP count; "
               "GFLOP per CPU s = per-core throughput)", ["stage", "s", "CPU s", "GFLOP", "GFLOP/CPU s"], rows)


def bench_quality(codec, keep, secs, streams, alignment_study: bool):
  from esc_jax import streaming
  from esc_jax.metrics import mel_distance, si_sdr
  x, whole, y_whole = keep[(secs, "whole")]
  rows = []
  variants = [("chunked N=500 C=%d" % streaming.context_frames_for(codec), keep[(secs, "chunked")][1:])]
  if alignment_study:
    align = streaming.ALIGN_FRAMES
    try:
      streaming.ALIGN_FRAMES = 1
      c = streaming.encode_chunked(codec, x, streams, 499, 25)
      variants.append(("odd starts N=499 C=25 (enc+dec)", (c, streaming.decode_chunked(codec, c, len(x), 499, 25))))
      variants.append(("odd starts N=499 C=25 (dec only)",
                       (whole, streaming.decode_chunked(codec, whole, len(x), 499, 25))))
    finally:
      streaming.ALIGN_FRAMES = align
  for name, (codes, y) in variants:
    frames = float(np.mean(np.all(codes == whole, axis=(0, 1))))
    rows.append([name, frames, float(np.mean(codes == whole)),
                 float(si_sdr(y_whole[None], y[None])[0]), float(mel_distance(y_whole[None], y[None])[0])])
  rows.append(["(whole-file decode vs input)", "", "", float(si_sdr(x[None], y_whole[None])[0]),
               float(mel_distance(x[None], y_whole[None])[0])])
  return table(f"Chunked vs whole-file coding, {secs:g} s of speech, ESC-Base {streams} streams",
               ["variant", "frames equal", "codes equal", "SI-SDR dB", "mel dist"], rows)


def _child(argv) -> None:
  """Runs in a fresh process: compress or decompress one file, print JSON stats."""
  kind, codec_dir, src, dst, chunk = argv
  from esc_jax import runtime
  runtime.preload_allocator()  # as the CLI does
  import esc_jax
  from esc_jax import compress
  t = time.perf_counter()
  codec = esc_jax.load(codec_dir)
  rss_load = _rss_now()
  if kind == "compress":
    compress.compress_file(codec, src, dst, codec.max_streams, chunk_frames=int(chunk))
  else:
    compress.decompress_file(codec, src, dst, chunk_frames=int(chunk))
  print(json.dumps(dict(seconds=time.perf_counter() - t, rss_load_mb=rss_load, peak_mb=_rss_now("VmHWM"))))


def _rss_now(field: str = "VmRSS") -> float:
  """MB of this process's resident set (VmRSS) or its peak (VmHWM) from /proc.

  VmHWM restarts at exec, unlike getrusage's ru_maxrss, which a child
  inherits from its (large) parent at fork.
  """
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_memory(codec, minutes_list, whole_minutes: float = 1.0):
  import soundfile as sf
  import esc_jax
  from esc_jax import streaming
  from esc_jax.config_lib import ESC_BASE
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    codec_dir = esc_jax.save_codec(os.path.join(tmp, "codec"), codec.params, ESC_BASE)
    block = speech(60)
    for minutes in minutes_list:
      wav, esc, out = (os.path.join(tmp, f"{minutes}min{e}") for e in (".wav", ".esc", ".out.wav"))
      with sf.SoundFile(wav, "w", SR, 1, "PCM_16") as f:  # written block by block
        for _ in range(int(minutes)):
          f.write(block)
      chunks = [streaming.DEFAULT_CHUNK_FRAMES] + ([0] if minutes == whole_minutes else [])
      for chunk in chunks:
        mode = "whole file" if chunk == 0 else f"chunked {chunk}"
        for kind, a, b in (("compress", wav, esc), ("decompress", esc, out)):
          p = subprocess.run([sys.executable, os.path.abspath(__file__), "--_child", kind, str(codec_dir), a, b,
                              str(chunk)], capture_output=True, text=True)
          if p.returncode:
            raise SystemExit(f"{kind} child failed:\n{p.stderr[-2000:]}")
          r = json.loads(p.stdout.strip().splitlines()[-1])
          rows.append([f"{minutes:g} min", mode, kind, r["seconds"], r["seconds"] / (minutes * 60),
                       r["rss_load_mb"], r["peak_mb"]])
      rows.append([f"{minutes:g} min", "", ".esc bytes", os.path.getsize(esc), "", "", ""])
  return table("Peak memory of compress_file / decompress_file, the CLI path (fresh process each; "
               "wall time includes loading and compiling)",
               ["file", "mode", "step", "wall s", "RTF", "RSS after load MB", "peak RSS MB"], rows)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seconds", type=float, nargs="+", default=[10, 60])
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--streams", type=int, default=6)
  p.add_argument("--params", choices=["random", "init"], default="random")
  p.add_argument("--long_minutes", type=float, default=10)
  p.add_argument("--skip_memory", action="store_true")
  p.add_argument("--skip_profile", action="store_true")
  p.add_argument("--skip_quality", action="store_true")
  p.add_argument("--alignment_study", action="store_true")
  p.add_argument("--out", default=None, help="also write the tables to this file")
  p.add_argument("--_child", nargs=5, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args._child:
    return _child(args._child)

  from esc_jax import runtime
  runtime.preload_allocator()
  import jax
  print(f"jax {jax.__version__} {jax.devices()[0].platform}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}", flush=True)
  codec = make_codec(args.params)
  texts = []
  text, keep = bench_rtf(codec, args.seconds, args.repeats, args.streams)
  texts.append(text)
  if not args.skip_profile:
    texts.append(bench_profile(codec, args.repeats, args.streams))
  long = [s for s in args.seconds if (s, "chunked") in keep]
  if long and not args.skip_quality:
    texts.append(bench_quality(codec, keep, long[-1], args.streams, args.alignment_study))
  if not args.skip_memory:
    texts.append(bench_memory(codec, sorted({1.0, args.long_minutes})))
  texts.append(f"load average at the end: {os.getloadavg()[0]:.1f}")
  print(texts[-1])
  if args.out:
    with open(args.out, "w") as f:
      f.write("\n".join(texts) + "\n")


if __name__ == "__main__":
  main()
