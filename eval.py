"""Evaluate a codec directory on a folder of speech at every bitrate.

  python eval.py --checkpoint DIR --data FOLDER [--num_streams all|1..6]
      [--batch_size 8] [--output ./eval_results] [--max_files N] [--step latest|best|N]
      [--fit pad|crop] [--bucket_growth G] [--metrics pesq,stoi,mel_distance,si_sdr]

Prints a table of per-bitrate means ± standard deviations and writes
OUTPUT/results.json (per file and aggregate) and OUTPUT/metrics.png.
Exit codes: 0 ok, 1 data/evaluation error, 2 bad arguments or checkpoint.
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


def parse_args(argv=None):
  p = _Parser(description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", required=True, help="codec directory (convert_torch_weights.py / train.py)")
  p.add_argument("--data", required=True, help="folder of audio files (searched recursively)")
  p.add_argument("--num_streams", default="all", help="1..max_streams or 'all' (default)")
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--output", default="./eval_results", help="folder for results.json and metrics.png")
  p.add_argument("--max_files", type=int, default=None, help="evaluate the first N files (sorted paths)")
  p.add_argument("--step", type=_step, default=None, help="checkpoint step: latest (default), best or N")
  p.add_argument("--fit", choices=("pad", "crop"), default="pad",
                 help="pad: whole clips (padded, trimmed back); crop: largest valid prefix (original protocol)")
  p.add_argument("--bucket_growth", type=float, default=None,
                 help="pad lengths to a geometric grid with this ratio (e.g. 1.25): fewer compiles, "
                      "approximate near clip ends; default: exact per-clip lengths")
  p.add_argument("--metrics", default=",".join(("pesq", "stoi", "mel_distance", "si_sdr")),
                 help="comma-separated subset of pesq,stoi,mel_distance,si_sdr")
  p.add_argument("--no_progress", action="store_true", help="no progress bar")
  args = p.parse_args(argv)
  if args.batch_size < 1:
    p.error(f"--batch_size must be >= 1, got {args.batch_size}")
  if args.max_files is not None and args.max_files < 1:
    p.error(f"--max_files must be >= 1, got {args.max_files}")
  if args.bucket_growth is not None and not args.bucket_growth > 1:
    p.error(f"--bucket_growth must be > 1, got {args.bucket_growth}")
  if args.num_streams != "all":
    try:
      args.num_streams = int(args.num_streams)
    except ValueError:
      p.error(f"--num_streams must be 'all' or an integer, got {args.num_streams!r}")
  args.metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  from esc_jax import evaluation
  from esc_jax.checkpoint import CheckpointError, load

  try:
    files = evaluation.find_audio_files(args.data)
  except OSError as e:
    return _fail(e, 1)
  if not files:
    return _fail(f"no audio files ({', '.join(evaluation.AUDIO_EXTENSIONS)}) under {args.data}", 1)
  files = files[:args.max_files]
  try:
    codec = load(args.checkpoint, step=args.step)
  except CheckpointError as e:
    return _fail(e, 2)
  unknown = [m for m in args.metrics if m not in evaluation.METRICS]
  if unknown or not args.metrics:
    return _fail(f"--metrics must be a comma-separated subset of {','.join(evaluation.METRICS)}", 2)
  streams = None if args.num_streams == "all" else args.num_streams
  if streams is not None and not 1 <= streams <= codec.max_streams:
    return _fail(f"--num_streams must be in 1..{codec.max_streams}, got {streams}", 2)
  try:
    result = evaluation.evaluate(codec, files, num_streams=streams, batch_size=args.batch_size,
                                 metrics=args.metrics, fit=args.fit, bucket_growth=args.bucket_growth,
                                 progress=not args.no_progress)
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
  sys.exit(main())
