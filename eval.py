"""Evaluate a codec directory on a folder of speech at every bitrate.

  python eval.py --checkpoint DIR --data FOLDER [--num_streams all|1..6]
      [--batch_size 8] [--output ./eval_results] [--max_files N] [--step latest|best|N]
      [--fit crop|pad] [--channel first|mean] [--bucket_growth G]
      [--metrics pesq,stoi,mel_distance,si_sdr] [--compile_cache default|DIR|off]

The defaults reproduce the original's test protocol (scripts/test.py: each
file's first channel without its last 80 samples, cut to a valid length), so
the numbers compare with the paper's; `--fit pad` scores whole files instead.
Prints a table of per-bitrate means ± standard deviations and writes
OUTPUT/results.json (per file and aggregate) and OUTPUT/metrics.png.
Exit codes: 0 ok, 1 data or evaluation error (values the library rejects included),
2 unparsable arguments or an unusable checkpoint.
See esc_jax/evaluation.py for what is computed and how.
"""
from __future__ import annotations

import argparse
import sys


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, no usage block
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _step(v: str):
  if v in ("latest", "best"):
    return None if v == "latest" else "best"
  try:
    return int(v)
  except ValueError:
    raise argparse.ArgumentTypeError(f"--step must be latest, best or an integer, got {v!r}") from None


def _streams(v: str):
  if v == "all":
    return None
  try:
    return int(v)
  except ValueError:
    raise argparse.ArgumentTypeError(f"--num_streams must be 'all' or an integer, got {v!r}") from None


def _positive(v: str) -> int:
  try:
    n = int(v)
  except ValueError:
    n = 0
  if n < 1:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {v!r}")
  return n


def parse_args(argv=None):
  p = _Parser(description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", required=True, help="codec directory (convert_torch_weights.py / train.py)")
  p.add_argument("--data", required=True, help="folder of audio files (searched recursively)")
  p.add_argument("--num_streams", type=_streams, default=None, help="1..max_streams or 'all' (default)")
  p.add_argument("--batch_size", type=_positive, default=8)
  p.add_argument("--output", default="./eval_results", help="folder for results.json and metrics.png")
  p.add_argument("--max_files", type=_positive, default=None, help="evaluate the first N files (sorted paths)")
  p.add_argument("--step", type=_step, default=None, help="checkpoint step: latest (default), best or N")
  p.add_argument("--fit", choices=("crop", "pad"), default="crop",
                 help="crop: the original's protocol (x[:-80], cut to a valid length; default); "
                      "pad: whole files (padded, trimmed back)")
  p.add_argument("--channel", choices=("first", "mean"), default="first",
                 help="multi-channel files: first channel (the original's; default) or channel mean")
  p.add_argument("--bucket_growth", type=float, default=None,
                 help="pad lengths to a geometric grid with this ratio (e.g. 1.25): fewer compiles, "
                      "approximate near clip ends; default: exact per-clip lengths")
  p.add_argument("--metrics", default="pesq,stoi,mel_distance,si_sdr",
                 help="comma-separated subset of pesq,stoi,mel_distance,si_sdr")
  p.add_argument("--no_progress", action="store_true", help="no progress bar")
  p.add_argument("--compile_cache", default="default",
                 help="persistent XLA compilation cache folder ('default': $ESC_JAX_CACHE or "
                      "~/.cache/esc_jax/xla; '' or 'off' disables): a rerun on the same shapes skips compiling")
  args = p.parse_args(argv)
  args.metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
  return args


def main(argv=None) -> int:
  """Command-line entry point; `argv` None = sys.argv (and the on-disk compile cache)."""
  args = parse_args(argv)
  if argv is None:
    from esc_jax import runtime
    runtime.enable_compile_cache(args.compile_cache)
  from esc_jax import evaluation
  from esc_jax.api import load
  from esc_jax.audio_io import AUDIO_EXTENSIONS, find_audio_files
  from esc_jax.checkpoint import CheckpointError

  try:
    files = find_audio_files(args.data)
  except OSError as e:
    return _fail(e, 1)
  if not files:
    return _fail(f"no audio files ({' '.join(AUDIO_EXTENSIONS)}) under {args.data}", 1)
  files = files[:args.max_files]
  try:
    codec = load(args.checkpoint, step=args.step)
  except CheckpointError as e:
    return _fail(e, 2)
  try:
    result = evaluation.evaluate(codec, files, num_streams=args.num_streams, batch_size=args.batch_size,
                                 metrics=args.metrics, fit=args.fit, channel=args.channel,
                                 bucket_growth=args.bucket_growth, progress=not args.no_progress)
  except ValueError as e:
    return _fail(e, 1)
  result = {"checkpoint": str(args.checkpoint), "step": "latest" if args.step is None else args.step,
            "data": str(args.data), **result}
  print(evaluation.format_table(result))
  for s in result["skipped"]:
    print(f"skipped {s['name']}: {s['reason']}", file=sys.stderr)
  try:
    js, png = evaluation.save_results(result, args.output)
  except OSError as e:
    return _fail(f"cannot write results to {args.output}: {e}", 1)
  print(f"{result['num_files']} files evaluated, {result['num_skipped']} skipped; wrote {js} and {png}")
  return 0


def _fail(msg, code: int) -> int:
  print("error: " + " ".join(str(msg).split()), file=sys.stderr)
  return code


if __name__ == "__main__":
  from esc_jax import runtime
  runtime.preload_allocator()
  sys.exit(main())
