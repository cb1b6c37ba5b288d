"""Streaming latency against real-time factor of ESC-Base on this CPU, per segment size.

  python bench/bench_latency.py                    # 80 ms .. 10 s segments (~5 min on 2 busy cores)
  python bench/bench_latency.py --segments_ms 80 1000 --json

For each segment size F (the chunk size N = F, as `esc-jax compress -` uses
it; exact context C = `streaming.context_frames_for(codec)` = 24 frames =
0.48 s for ESC-Base):

  latency    algorithmic latency, measured by running the real streaming
             path (ChunkedEncoder -> StreamWriter segments -> ChunkedDecoder)
             with a zero-cost stand-in for the model, input pushed 1 ms at a
             time: `encoder` = longest time from a sample's arrival to the
             segment holding it being written (= segment + lookahead C);
             `pipe` = longest time from a sample's arrival to its decoded
             audio (compress - | decompress -: the decoder waits for the
             segments holding its own C frames of lookahead, plus half the
             cross-fade).
  RTF        ESC-Base (configs/9kbps.py model, random params, 6 streams =
             9 kbps) encode and decode of one full window (N + 2C frames for
             N new frames), best of --repeats after a compiling warm-up;
             RTF = seconds per second of new audio. `CPU` is the process CPU
             time per second of audio (XLA uses several threads; on an idle
             2-core machine wall >= CPU / 2).

A CPU keeps up in real time when encode + decode RTF < 1 (both ends on this
machine, as in the sox pipe). Wall times on a shared machine are pessimistic.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

SR = 16000


class NullCodec:
  """A codec's geometry with free encode / decode: measures the streaming algorithm alone."""

  def __init__(self, codec):
    self.samples_per_frame, self.hop = codec.samples_per_frame, codec.hop
    self.max_streams, self.group_size, self.codebook_size = codec.max_streams, codec.group_size, codec.codebook_size
    self._num_frames, self.check_streams = codec.num_frames, codec.check_streams

  def num_frames(self, n: int) -> int:
    return self._num_frames(n)

  def frames_to_samples(self, t: int) -> int:
    return t * self.samples_per_frame - self.hop

  def encode(self, x, num_streams):
    return np.zeros((1, num_streams, self.group_size, self.num_frames(np.shape(x)[-1])), np.int32)

  def decode(self, codes):
    return np.zeros((1, self.frames_to_samples(np.shape(codes)[-1])), np.float32)


def measure_latency(codec, segment_frames: int, context_frames: int, seconds: float = 30.0,
                    step: int = 16) -> tuple[float, float]:
  """(encoder, pipe) algorithmic latency in seconds of the streaming path, input pushed `step` samples at a time."""
  import io
  from esc_jax import bitstream, streaming
  null = NullCodec(codec)
  spf, f = null.samples_per_frame, segment_frames
  n = -(-f // streaming.ALIGN_FRAMES) * streaming.ALIGN_FRAMES
  header = bitstream.StreamHeader(sample_rate=SR, num_streams=1, group_size=null.group_size,
                                  codebook_bits=int(null.codebook_size).bit_length() - 1,
                                  fingerprint=bytes(8), chunk_frames=n, segment_frames=f,
                                  frame_samples=spf)
  enc = streaming.ChunkedEncoder(null, 1, n, context_frames)
  writer = bitstream.StreamWriter(io.BytesIO(), header, flush=False)
  dec = streaming.ChunkedDecoder(null, n, context_frames)
  # Long enough that whole segments remain well before the end (see `last` below).
  total = max(int(seconds * SR), (4 * (n + 2 * context_frames) + 2 * f) * spf)
  seg_time, out_time = [], np.zeros(total, np.int64)
  pending, given, out = [], 0, 0
  for pushed in range(step, total + 1, step):
    codes = enc.push(np.zeros(step, np.float32))
    writer.write_frames(codes)
    pending.append(codes)
    while len(seg_time) < writer.segments_written:  # segment k just left the encoder
      seg_time.append(pushed)
    ready = writer.segments_written * f - given  # the decoder sees whole segments only
    if ready > 0:
      buf = np.concatenate(pending, axis=2)
      for b in dec.push(buf[:, :, :ready]):
        out_time[out:out + len(b)] = pushed
        out += len(b)
      pending, given = [buf[:, :, ready:]], given + ready
  # Latency of a sample = when its segment / its audio came out - when it arrived (its index + 1).
  # Only whole segments well before the end count (the end of the input releases everything).
  last = (total // spf - 2 * (n + 2 * context_frames)) * spf
  seg_first = np.arange(len(seg_time)) * f * spf  # a segment's first sample waits longest
  enc_lat = max(t - (s + 1) for t, s in zip(seg_time, seg_first) if s < last)
  idx = np.arange(min(out, last))
  pipe_lat = int((out_time[idx] - (idx + 1)).max())
  return enc_lat / SR, pipe_lat / SR


def measure_rtf(codec, segment_frames: int, context_frames: int, repeats: int, streams: int):
  """Encode and decode of one full window of ESC-Base: (enc s, dec s, CPU s, first-call s) per window."""
  from bench_codec import speech, timed
  from esc_jax import streaming
  n = -(-segment_frames // streaming.ALIGN_FRAMES) * streaming.ALIGN_FRAMES
  win = streaming.regular_window(10 ** 4, n, context_frames)  # a full-width window
  width = win.end - win.start
  x = speech(width * codec.samples_per_frame / SR + 1)[:width * codec.samples_per_frame - codec.hop]
  first_e, t_enc, cpu_enc, codes = timed(lambda: codec.encode(x, streams), repeats)
  first_d, t_dec, cpu_dec, _ = timed(lambda: codec.decode(codes), repeats)
  return t_enc, t_dec, cpu_enc + cpu_dec, first_e + first_d


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--segments_ms", type=float, nargs="+", default=[80, 160, 320, 480, 1000, 2000, 5000, 10000])
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--streams", type=int, default=6)
  p.add_argument("--json", action="store_true", help="one JSON line per row instead of the table")
  args = p.parse_args(argv)

  from esc_jax import runtime
  runtime.preload_allocator()
  import jax
  from bench_codec import make_codec, table
  from esc_jax import bitstream, streaming
  runtime.enable_compile_cache()
  log = sys.stderr if args.json else sys.stdout
  print(f"jax {jax.__version__} {jax.devices()[0].platform}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}", file=log, flush=True)
  codec = make_codec("random")
  c = streaming.context_frames_for(codec)
  frame_s = codec.samples_per_frame / SR
  rows = []
  for ms in args.segments_ms:
    f = max(1, round(ms / 1000 / frame_s))
    enc_lat, pipe_lat = measure_latency(codec, f, c)
    t_enc, t_dec, cpu, first = measure_rtf(codec, f, c, args.repeats, args.streams)
    new_s = -(-f // streaming.ALIGN_FRAMES) * streaming.ALIGN_FRAMES * frame_s
    row = dict(segment_ms=round(f * frame_s * 1000), segment_frames=f, lookahead_ms=round(c * frame_s * 1000),
               latency_ms=round(enc_lat * 1000), pipe_latency_ms=round(pipe_lat * 1000),
               enc_rtf=round(t_enc / new_s, 3), dec_rtf=round(t_dec / new_s, 3),
               rtf=round((t_enc + t_dec) / new_s, 3), cpu_rtf=round(cpu / new_s, 3),
               compile_s=round(first, 1),
               overhead_1k5=round(100 * bitstream.segment_overhead(1, segment_frames=f), 2))
    row["real_time"] = row["rtf"] < 1
    rows.append(row)
    if args.json:
      print(json.dumps(row), flush=True)
  if args.json:
    return rows
  table(f"ESC-Base streaming, {args.streams} streams, exact context C = {c} frames ({c * frame_s * 1000:.0f} "
        f"ms); RTF: best of {args.repeats}, wall", [
            "segment ms", "latency ms (seg + C)", "pipe latency ms", "enc RTF", "dec RTF", "enc+dec RTF",
            "CPU RTF", "real time", "overhead @1.5k %"],
        [[r["segment_ms"], r["latency_ms"], r["pipe_latency_ms"], r["enc_rtf"], r["dec_rtf"], r["rtf"],
          r["cpu_rtf"], "yes" if r["real_time"] else "no", r["overhead_1k5"]] for r in rows])
  ok = [r for r in rows if r["real_time"]]
  if ok:
    best = min(ok, key=lambda r: r["latency_ms"])
    print(f"\nLowest latency in real time on this CPU: {best['latency_ms']} ms (segments of "
          f"{best['segment_ms']} ms; compress | decompress pipe: {best['pipe_latency_ms']} ms); "
          f"load average {os.getloadavg()[0]:.1f}")
  else:
    print("\nNo segment size runs in real time on this CPU.")
  return rows


if __name__ == "__main__":
  main()
