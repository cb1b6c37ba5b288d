"""Evaluate a codec on speech at every bitrate (the original's scripts/test.py, extended).

  codec = esc_jax.load("codec_dir")
  result = evaluate(codec, esc_jax.audio_io.find_audio_files("speech/"), num_streams=None)
  print(format_table(result)); save_results(result, "eval_results")

Metrics per file (identical to the original's scripts/metrics.py): wide-band
PESQ, mel distance, SI-SDR, plus STOI; per bitrate: their mean and (population)
standard deviation over the files, and the bitrate utilisation of all codes of
the set (rounded to 4 decimals like the original's EntropyCounter; the exact
value is kept as `utilization_exact`).

Exactness and batching:
- `fit="crop"` (the default) is the original's test protocol (scripts/test.py
  reads `x[0, :-80]`: a file's first channel without its last hop of 80
  samples): each clip loses its last hop and is cut to the largest valid
  length left (48000-sample test clips become 47920, exactly the original's
  input; other lengths lose < 20 ms more). These are the paper-comparable
  numbers. `fit="pad"` evaluates the whole clip instead: zero-padded to the
  codec's valid length (as `Codec.reconstruct` does) and trimmed back.
- Files are read as their first channel (`channel="first"`, the original's)
  or as the mean of their channels (`channel="mean"`, as the CLI codes them).
- Each batch is encoded once, with every stream, and decoded once per
  bitrate from the first s streams' codes (a stream's codes do not depend on
  the streams after it); one jitted decode program per batch shape, with the
  masked metrics, serves every bitrate: the number of streams is a traced
  argument and untransmitted streams leave the decoder state untouched
  (`jnp.where`). A single bitrate runs one program, encode and decode fused
  (`round_trip`). Audio and codes are bit-identical to `Codec.encode` +
  `Codec.decode` either way. Matmuls run at "highest" precision (no TF32/bf16
  passes on accelerators).
- Clips are sorted by length and batched with clips of the same padded
  length; the batch axis is filled up with silent rows (batch items are
  independent, so this is exact). With the default `bucket_growth=None`
  the padded length is each clip's own valid length, so every per-file value
  equals that of `Codec.reconstruct` on the clip alone. A test set of
  equal-length clips gives one shape, i.e. one compile of each program.
- `bucket_growth=g` (e.g. 1.25) instead pads to the next length on a fixed
  geometric grid of code frames (ratio g), so a set of varied lengths needs
  only ~log(max/min)/log(g) shapes. This is fast but approximate: the Swin
  windows and the STFT's reflect padding see the extra zeros, so the last
  few hundred ms of a reconstruction (and its last codes) can differ from
  the clip evaluated alone.
- Metrics never see padding: mel distance and SI-SDR run as one jitted batch
  function per batch shape that rebuilds each item's exact-length reflect
  padding from its length and masks frames/samples past it (equal to the
  per-file computation up to float summation order); PESQ and STOI run in
  numpy on the trimmed signals; codes are trimmed to the clip's own number of
  code frames before counting.
All clips are held in memory (16 kHz float32, ~230 MB per hour of audio).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import pathlib
import sys
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np

from esc_jax import metrics as M
from esc_jax.audio import SAMPLE_RATE
from esc_jax.audio_io import load_audio
from esc_jax.codec import check_num_streams
from esc_jax.files import atomic_path, is_path, json_safe, write_json_atomic
from esc_jax.losses import MEL_WINDOWS

METRICS = ("pesq", "stoi", "mel_distance", "si_sdr")
METRIC_LABELS = {"pesq": "PESQ", "stoi": "STOI", "mel_distance": "MelDist", "si_sdr": "SI-SDR",
                 "utilization": "Util"}
# The widest mel scale (2048) reflect-pads 1024 samples, which needs n > 1024.
MIN_SAMPLES = max(MEL_WINDOWS) // 2 + 1


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


def load_clips(items, channel: str = "first") -> tuple[list[str], list[np.ndarray], list[dict]]:
  """Paths / arrays / {name: path or array} -> (names, 16 kHz mono float32 arrays, skipped).

  Files are read with `audio_io.load_audio(path, channel=channel)`; arrays
  must already be (L,) 16 kHz float audio. Unreadable files are not fatal:
  each is listed in `skipped` as {"name", "reason"}.
  """
  pairs = list(items.items()) if isinstance(items, Mapping) else [
      (os.fspath(it) if is_path(it) else f"clip{i}", it)
      for i, it in enumerate(items)]
  names, clips, skipped = [], [], []
  for name, it in pairs:
    try:
      if is_path(it):
        x = load_audio(it, channel=channel)
      else:
        x = np.asarray(it)
        if x.ndim != 1 or not np.issubdtype(x.dtype, np.floating):
          raise ValueError(f"expected (L,) float audio, got {x.dtype} {x.shape}")
        x = x.astype(np.float32)
        if not np.all(np.isfinite(x)):
          raise ValueError("audio contains NaN or infinite samples")
    except (OSError, ValueError) as e:
      skipped.append({"name": str(name), "reason": str(e)})
      continue
    names.append(str(name))
    clips.append(x)
  return names, clips, skipped


# The jitted steps compile once per (model, batch shape): every Codec of a model
# (e.g. one per validation during training) reuses the compiled programs.


@functools.partial(jax.jit, static_argnums=0)
def _eval_step(model, variables, x, lengths, num_streams):
  """Round trip of a padded batch (B, L) at `num_streams` streams: (codes (B, max_streams,
  G, T'), of which the first num_streams are the transmitted ones, audio (B, L), and
  the masked mel distance and SI-SDR (B,))."""
  with jax.default_matmul_precision("highest"):
    codes, y = model.apply(variables, x, num_streams, method="round_trip")
    return (codes, *_scored(x, y, lengths))


@functools.partial(jax.jit, static_argnums=0)
def _encode_step(model, variables, x):
  """Codes (B, max_streams, G, T') of every stream of a padded batch (B, L)."""
  with jax.default_matmul_precision("highest"):
    return model.apply(variables, x, model.max_streams, method="encode")


@functools.partial(jax.jit, static_argnums=0)
def _decode_step(model, variables, codes, x, lengths, num_streams):
  """Audio (B, L) decoded from the first `num_streams` of every stream's codes, and its
  masked mel distance and SI-SDR (B,) against the batch x."""
  with jax.default_matmul_precision("highest"):
    return _scored(x, model.apply(variables, codes, num_streams, method="decode"), lengths)


def _scored(x, y, lengths):
  """(y, masked mel distance (B,), masked SI-SDR (B,)) of a reconstruction y of x."""
  return y, M.mel_distance(x, y, lengths), M.si_sdr(x, y, lengths)


# ---------------------------------------------------------------------------
# Batching plan
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Batch:
  indices: tuple[int, ...]  # clips in this batch
  length: int  # padded (valid) length L of every row
  rows: int  # batch rows incl. silent filler rows


def _bucket_frames(k: int, growth: float) -> int:
  """Smallest value >= k on the grid {ceil(growth^j)} (data independent)."""
  j = max(0, math.floor(math.log(k) / math.log(growth)) - 1)
  while math.ceil(growth ** j - 1e-9) < k:
    j += 1
  return math.ceil(growth ** j - 1e-9)


def plan_batches(lengths: Sequence[int], codec, batch_size: int,
                 bucket_growth: float | None = None) -> list[Batch]:
  """Group clips by padded length (see the module docstring) into batches.

  Groups with >= batch_size clips use batch_size rows throughout (the last
  batch is filled up); smaller groups use the next power of two.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if bucket_growth is not None and not bucket_growth > 1.0:
    raise ValueError(f"bucket_growth must be > 1, got {bucket_growth}")
  spf, hop = codec.samples_per_frame, codec.hop
  groups: dict[int, list[int]] = {}
  for i in sorted(range(len(lengths)), key=lambda i: (lengths[i], i)):
    target = codec.valid_length(lengths[i])
    if bucket_growth is not None:
      target = _bucket_frames((target + hop) // spf, bucket_growth) * spf - hop
    groups.setdefault(target, []).append(i)
  batches = []
  for length, idx in sorted(groups.items()):
    for start in range(0, len(idx), batch_size):
      chunk = tuple(idx[start:start + batch_size])
      rows = batch_size if len(idx) >= batch_size else min(batch_size, 1 << (len(chunk) - 1).bit_length())
      batches.append(Batch(chunk, length, rows))
  return batches


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------


def _summary(values) -> dict:
  v = np.asarray(values, np.float64)
  ok = v[np.isfinite(v)]
  mean = float(ok.mean()) if ok.size else float("nan")
  std = float(ok.std()) if ok.size else float("nan")
  return {"mean": mean, "std": std, "count": int(ok.size)}


FITS = ("crop", "pad")


def fit_clip(model, x: np.ndarray, fit: str) -> np.ndarray:
  """The part of clip `x` that is evaluated: "crop" = x[:-hop] cut to a valid length, "pad" = x."""
  if fit == "crop":
    return x[:model.largest_valid_length(x.shape[0] - model.hop)]
  if fit == "pad":
    return x
  raise ValueError(f"fit must be one of {FITS}, got {fit!r}")


def evaluate(codec, clips, num_streams: int | Sequence[int] | None = None, batch_size: int = 8,
             metrics: Sequence[str] = METRICS, fit: str = "crop", channel: str = "first",
             bucket_growth: float | None = None, progress: bool = True) -> dict[str, Any]:
  """Reconstruct `clips` at each bitrate and score them against the originals.

  Args:
    codec: an `esc_jax.Codec`.
    clips: paths (any rate; see `channel`), 1-D 16 kHz float arrays, or a
      mapping name -> path/array. Unreadable or too short clips are skipped
      and reported.
    num_streams: an int in 1..max_streams, a sequence of them, or None = all.
    metrics: subset of METRICS (utilisation is always computed).
    fit: "crop" (the original's protocol) or "pad" (whole clip); see the
      module docstring.
    channel: "first" (the original's) or "mean" channel of multi-channel files.
    bucket_growth: None = exact per-clip shapes; g > 1 = geometric length
      buckets (fewer compiles, approximate near clip ends).
  Returns:
    dict with "files" [{"name", "num_samples"}], "skipped" [{"name", "reason"}],
    "bitrates" [{"num_streams", "kbps", "num_files", "mean", "std", "count",
    "utilization", "utilization_exact", "per_file": {metric: [per file]}}],
    "shapes" (distinct batch shapes run) and the settings.
  Raises:
    ValueError: bad arguments, or no clip left to evaluate.
  """
  streams = _streams(codec, num_streams)
  unknown = [m for m in metrics if m not in METRICS]
  if unknown:
    raise ValueError(f"unknown metrics {unknown}; choose from {list(METRICS)}")
  fit_clip(codec.model, np.zeros(0, np.float32), fit)  # validates `fit`
  names, audio, skipped = load_clips(clips, channel)
  keep_names, keep = [], []
  for name, x in zip(names, audio):
    x = fit_clip(codec.model, x, fit)
    if x.shape[0] < MIN_SAMPLES:
      skipped.append({"name": name, "reason": f"too short ({x.shape[0]} samples{' after cropping' if fit == 'crop' else ''}; "
                                              f"the metrics need >= {MIN_SAMPLES})"})
      continue
    keep_names.append(name)
    keep.append(x)
  if not keep:
    raise ValueError(f"no clip to evaluate ({len(skipped)} skipped"
                     + (f", e.g. {skipped[0]['name']}: {skipped[0]['reason']}" if skipped else "") + ")")
  lengths = [x.shape[0] for x in keep]
  batches = plan_batches(lengths, codec, batch_size, bucket_growth)
  num_shapes = len({(b.rows, b.length) for b in batches})
  if progress and bucket_growth is None and num_shapes > 8:
    print(f"note: {num_shapes} distinct batch shapes (one compile each, two with several bitrates); "
          "bucket_growth=1.25 (--bucket_growth) needs far fewer, approximately near clip ends", file=sys.stderr)

  from tqdm import tqdm
  bar = tqdm(total=len(batches) * len(streams), disable=not progress, unit="batch", file=sys.stderr)
  per_file = {s: {m: [math.nan] * len(keep) for m in metrics} for s in streams}
  codes_all = {s: [] for s in streams}
  for b in batches:
    for s, out in zip(streams, _run_batch(codec, [keep[i] for i in b.indices], b, streams, metrics)):
      bar.set_description(f"{codec.kbps(s):g} kbps", refresh=False)
      for m in metrics:
        for i, v in zip(b.indices, out[m]):
          per_file[s][m][i] = float(v)
      codes_all[s] += out["codes"]
      bar.update(1)
  bar.close()
  results = []
  for s in streams:
    codes = np.concatenate(codes_all[s], axis=-1)[None]  # (1, s, groups, sum of frames)
    results.append({
        "num_streams": s, "kbps": codec.kbps(s), "num_files": len(keep),
        **{k: {m: _summary(per_file[s][m])[k] for m in metrics} for k in ("mean", "std", "count")},
        "utilization": M.bitrate_utilization(codes, codec.codebook_size, decimals=4),
        "utilization_exact": M.bitrate_utilization(codes, codec.codebook_size),
        "per_file": per_file[s]})
  return {
      "sample_rate": SAMPLE_RATE, "metrics": list(metrics), "fit": fit, "channel": channel,
      "batch_size": batch_size,
      "bucket_growth": bucket_growth, "num_files": len(keep), "num_skipped": len(skipped),
      "files": [{"name": n, "num_samples": int(l)} for n, l in zip(keep_names, lengths)],
      "skipped": skipped, "bitrates": results,
      "shapes": sorted({(b.rows, b.length) for b in batches})}


def _streams(codec, num_streams) -> list[int]:
  if num_streams is None:
    return list(range(1, codec.max_streams + 1))
  streams = [num_streams] if np.ndim(num_streams) == 0 else list(num_streams)
  if not streams:
    raise ValueError(f"num_streams must name at least one count in 1..{codec.max_streams}, got {num_streams!r}")
  return [check_num_streams(s, codec.max_streams) for s in streams]


def _run_batch(codec, clips: list[np.ndarray], batch: Batch, streams: list[int], metrics) -> Iterator[dict]:
  """Codec round trips of one batch at each stream count in `streams`, and the metrics
  of its real rows: yields one dict per stream count, in order."""
  k = len(clips)
  x = np.zeros((batch.rows, batch.length), np.float32)
  n = np.full(batch.rows, batch.length, np.int32)  # filler rows: full length
  for i, c in enumerate(clips):
    x[i, :c.shape[0]] = c
    n[i] = c.shape[0]
  model, variables = codec.model, codec.variables
  if len(streams) == 1:
    codes, *rest = _eval_step(model, variables, x, n, np.int32(streams[0]))
    runs = [rest]
  else:
    codes = _encode_step(model, variables, x)
    runs = [_decode_step(model, variables, codes, x, n, np.int32(s)) for s in streams]
  codes = jax.device_get(codes)
  refs = [x[i, :n[i]] for i in range(k)]
  for s, run in zip(streams, runs):
    y, mel, sdr = jax.device_get(run)
    out: dict[str, Any] = {"codes": [codes[i, :s, :, :codec.num_frames(int(n[i]))] for i in range(k)],
                           "mel_distance": mel[:k], "si_sdr": sdr[:k]}
    ests = [y[i, :n[i]] for i in range(k)]
    if "pesq" in metrics:
      out["pesq"] = [M.pesq_wb(r, e)[0] for r, e in zip(refs, ests)]
    if "stoi" in metrics:
      out["stoi"] = [M.stoi(r, e)[0] for r, e in zip(refs, ests)]
    yield out


# ---------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------


def format_table(result: Mapping[str, Any]) -> str:
  """Per-bitrate means ± standard deviations as a fixed-width text table."""
  ms = list(result["metrics"])
  head = ["kbps", "files"] + [METRIC_LABELS[m] for m in ms] + [METRIC_LABELS["utilization"]]
  rows = []
  for r in result["bitrates"]:
    rows.append([f"{r['kbps']:g}", str(r["num_files"])]
                + [f"{r['mean'][m]:.4f} ± {r['std'][m]:.4f}" for m in ms] + [f"{r['utilization']:.4f}"])
  widths = [max(len(h), *(len(row[j]) for row in rows)) for j, h in enumerate(head)]
  line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
  return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def plot_metrics(result: Mapping[str, Any], path) -> None:
  """PNG: each metric (mean ± std) and the utilisation against kbps."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  keys = list(result["metrics"]) + ["utilization"]
  kbps = [r["kbps"] for r in result["bitrates"]]
  cols = min(3, len(keys))
  rws = -(-len(keys) // cols)
  fig, axes = plt.subplots(rws, cols, figsize=(4 * cols, 3.2 * rws), squeeze=False)
  for ax, key in zip(axes.flat, keys):
    if key == "utilization":
      ax.plot(kbps, [r["utilization"] for r in result["bitrates"]], "o-")
    else:
      ax.errorbar(kbps, [r["mean"][key] for r in result["bitrates"]],
                  yerr=[r["std"][key] for r in result["bitrates"]], fmt="o-", capsize=3)
    ax.set_title(METRIC_LABELS[key])
    ax.set_xlabel("kbps")
    ax.set_xticks(kbps)
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(keys):]:
    ax.axis("off")
  fig.suptitle(f"{result['num_files']} files")
  fig.tight_layout()
  with atomic_path(path) as tmp:  # the temporary name keeps the .png suffix (format)
    fig.savefig(tmp, dpi=100)
  plt.close(fig)


def save_results(result: Mapping[str, Any], directory) -> tuple[pathlib.Path, pathlib.Path]:
  """Write DIR/results.json (strict JSON: NaN -> null) and DIR/metrics.png."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  js, png = directory / "results.json", directory / "metrics.png"
  write_json_atomic(js, json_safe(result))
  plot_metrics(result, png)
  return js, png
