"""esc-jax command line: compress audio to `.esc` streams and back, transcode, seek.

  esc-jax compress IN.wav OUT.esc --checkpoint DIR --kbps 6
  esc-jax decompress IN.esc OUT.wav --checkpoint DIR [--sample_rate original] [--strict]
  esc-jax decompress IN.esc PART.wav --checkpoint DIR --start 12.5 --duration 3   # seek
  esc-jax transcode IN.esc OUT.esc --kbps 3                                        # no model
  esc-jax compress IN_DIR OUT_DIR --checkpoint DIR     # folders: recursive, mirrored paths
  sox in.wav -t wav - | esc-jax compress - - --checkpoint DIR \
    | esc-jax decompress - - --checkpoint DIR | play -t wav -                  # real time

(also `python -m esc_jax ...`). `-` is standard input / output: compress
reads WAV (or raw s16le mono PCM with `--raw RATE`) and writes each segment
as soon as the model's context allows; decompress writes WAV window by window
(its sizes are 0xFFFFFFFF unless stdout is a regular file). Memory stays
bounded whatever the length.

A corrupt segment is reported on stderr (`warning: ...` with the segment and
its time span) and decoded as silence; a truncated stream decodes up to its
last whole segment with a warning; exit status 0. With --strict either is an
error. Errors print one `error: ...` line on stderr and exit non-zero;
outputs to files are written atomically, so a failure leaves no partial file
and does not clobber an existing one. On standard output, bytes written
before an error stay written (a `.esc` stream then lacks its trailer and
reads as truncated, a WAV stream ends early); --strict on a seekable input
checks the whole stream before writing any audio.

Compiled XLA programs are cached on disk (ESC_JAX_CACHE, default
~/.cache/esc_jax/xla; ESC_JAX_CACHE=0 disables it): the first run for a
given model and chunk shape compiles (~10 s per step for ESC-Base on 2 CPU cores),
later runs start in seconds.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import pathlib
import sys


def _rate(s: str, original: bool = True):
  if s == "original" and original:
    return s
  try:
    v = int(s)
  except ValueError:
    v = 0
  if not 0 < v <= 768000:
    what = "'original' or a rate in Hz" if original else "a rate in Hz"
    raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
  return v


def _frames(role: str):
  """argparse type: a frame count validated by `streaming.check_chunking` (role: chunk / context)."""
  def parse(s: str) -> int:
    from esc_jax import streaming
    try:
      v = int(s)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
    try:
      streaming.check_chunking(v, 0) if role == "chunk" else streaming.check_chunking(0, v)
    except ValueError as e:
      raise argparse.ArgumentTypeError(str(e)) from None
    return v
  return parse


def _positive(kind):
  def parse(v: str):
    try:
      x = kind(v)
    except ValueError:
      x = 0
    if not x > 0 or x != x or x == float("inf"):
      raise argparse.ArgumentTypeError(f"expected a positive number, got {v!r}")
    return x
  return parse


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="esc-jax", description="ESC speech codec: compress / decompress / transcode.")
  sub = p.add_subparsers(dest="command", required=True)
  for name, help_in, help_out in (("compress", "audio file or folder, or - (WAV on stdin)",
                                   ".esc file or folder, or - (stdout)"),
                                  ("decompress", ".esc file or folder, or - (stdin)",
                                   "audio file or folder (.wav), or - (WAV on stdout)")):
    c = sub.add_parser(name, help=f"{help_in} -> {help_out}")
    c.add_argument("input", help=help_in)
    c.add_argument("output", help=help_out)
    c.add_argument("--checkpoint", required=True, help="codec directory (esc_jax.load)")
    c.add_argument("--chunk_frames", type=_frames("chunk"), default=None,
                   help="code frames (20 ms) per chunk; 0 = whole file at once (default 500 = 10 s, "
                        "the segment size when reading a pipe; decompress: the stream's value)")
    c.add_argument("--context_frames", type=_frames("context"), default=None,
                   help="context frames on each side of a chunk (default: the model's receptive field, "
                        "exact)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    if name == "compress":
      c.add_argument("--kbps", default=None,
                     help="bitrate: 1.5, 3, 4.5, 6, 7.5 or 9 for ESC (default: the highest)")
      c.add_argument("--segment_frames", type=_positive(int), default=50,
                     help="code frames per segment (default 50 = 1 s; fewer: lower latency, more overhead)")
      c.add_argument("--raw", type=functools.partial(_rate, original=False), default=None, metavar="RATE",
                     help="the input is raw signed 16-bit little-endian mono PCM at RATE Hz")
    else:
      c.add_argument("--sample_rate", type=_rate, default=None,
                     help="output rate in Hz or 'original' (the input's rate and length; default 16000)")
      c.add_argument("--start", type=float, default=None, help="decode from this time (s)")
      c.add_argument("--duration", type=_positive(float), default=None, help="decode this many seconds")
      c.add_argument("--strict", action="store_true",
                     help="a corrupt or truncated stream is an error (default: concealed, with a warning)")
  t = sub.add_parser("transcode", help=".esc -> .esc at a lower bitrate (drops streams, no model)")
  t.add_argument("input", help=".esc file or - (stdin)")
  t.add_argument("output", help=".esc file or - (stdout)")
  t.add_argument("--kbps", required=True, help="the new bitrate (at most the input's)")
  return p


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, stamp):
  import esc_jax
  return esc_jax.load(path)


def load_codec(directory):
  """`esc_jax.load`, memoised per directory state (repeated `main` calls in one process)."""
  path = os.path.realpath(directory)
  try:
    stamp = tuple(os.stat(os.path.join(path, f)).st_mtime_ns for f in ("esc_config.json", "checkpoints"))
  except OSError:
    stamp = None
  return _load_cached(path, stamp)


def _seconds(path, command: str):
  """Duration of an input file for the progress bar (None if it cannot be read cheaply)."""
  try:
    if command == "compress":
      import soundfile as sf
      return sf.info(os.fspath(path)).duration
    from esc_jax import bitstream
    with open(path, "rb") as f:
      return bitstream.StreamReader(f, on_problem=lambda p: None).read_trailer().num_samples / 16000
  except Exception:  # the real run reports the problem
    return None


def _progress_bar(quiet: bool, **kw):
  from tqdm import tqdm
  return tqdm(disable=True if quiet else None, leave=False, dynamic_ncols=True, **kw)


def _error(msg: str) -> None:
  print(f"error: {msg}", file=sys.stderr, flush=True)


def _one_line(e: BaseException) -> str:
  s = " ".join(str(e).split())
  return s or type(e).__name__


_PROBLEM_ACTION = {"corrupt": "decoded as silence", "truncated": "decoding up to there",
                   "trailing": "ignored"}


def _warn_problem(name: str):
  def report(p) -> None:
    print(f"warning: {name}: {p.message}; {_PROBLEM_ACTION.get(p.kind, 'ignored')}", file=sys.stderr,
          flush=True)
  return report


def run(args) -> int:
  from esc_jax import compress
  from esc_jax.audio_io import AUDIO_EXTENSIONS

  def stdio(x: str, out: bool):
    return (sys.stdout.buffer if out else sys.stdin.buffer) if x == "-" else pathlib.Path(x)

  src, dst = stdio(args.input, False), stdio(args.output, True)
  if isinstance(src, pathlib.Path) and not src.exists():
    raise FileNotFoundError(f"no such file or folder: {src}")
  if args.command == "transcode":
    compress.transcode_file(src, dst, args.kbps)
    return 0
  codec = load_codec(args.checkpoint)
  if args.command == "compress":
    streams = codec.max_streams if args.kbps is None else codec.streams_for_kbps(args.kbps)

    def one(a, b, progress=None):
      compress.compress_file(codec, a, b, streams, args.chunk_frames, args.context_frames,
                             args.segment_frames, args.raw, progress)
    exts, out_ext = AUDIO_EXTENSIONS, compress.ESC_EXTENSION
  else:
    def one(a, b, progress=None):
      compress.decompress_file(codec, a, b, args.sample_rate, args.chunk_frames, args.context_frames,
                               strict=args.strict, start=args.start, duration=args.duration,
                               on_problem=_warn_problem(str(a) if a is not sys.stdin.buffer else "stdin"),
                               progress=progress)
    exts, out_ext = (compress.ESC_EXTENSION,), ".wav"

  if not isinstance(src, pathlib.Path) or not src.is_dir():
    total = _seconds(src, args.command) if isinstance(src, pathlib.Path) else None
    if args.command == "decompress" and (args.start is not None or args.duration is not None):
      total = args.duration
    fmt = "{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}]" if total else None
    with _progress_bar(args.quiet, total=total, unit="s", desc=getattr(src, "name", "stdin"),
                       bar_format=fmt) as bar:
      one(src, dst, bar.update)
    return 0

  if not isinstance(dst, pathlib.Path):
    raise ValueError("a folder input needs an output folder, not -")
  pairs = compress.folder_pairs(src, dst, exts, out_ext)
  failed = 0
  with _progress_bar(args.quiet, total=len(pairs), unit="file", desc=args.command) as bar:
    for a, b in pairs:
      try:
        b.parent.mkdir(parents=True, exist_ok=True)
        one(a, b)
      except (ValueError, OSError, RuntimeError) as e:
        failed += 1
        bar.clear()
        _error(f"{a}: {_one_line(e)}")
      bar.update(1)
  if failed:
    _error(f"{failed} of {len(pairs)} files failed")
    return 1
  return 0


def main(argv=None) -> int:
  """Command-line entry point; `argv` None = sys.argv (and the on-disk compile cache)."""
  args = build_parser().parse_args(argv)
  try:
    if argv is None:
      from esc_jax import runtime
      runtime.preload_allocator()
      runtime.enable_compile_cache()
    return run(args)
  except KeyboardInterrupt:
    _error("interrupted")
    return 130
  except BrokenPipeError:  # the reader of our stdout went away: stop quietly
    with contextlib.suppress(OSError):
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    _error("output pipe closed")
    return 1
  except Exception as e:  # one line, no traceback (ESC_JAX_DEBUG=1 shows it)
    if os.environ.get("ESC_JAX_DEBUG"):
      raise
    known = isinstance(e, (ValueError, OSError, RuntimeError))
    _error(_one_line(e) if known else f"{type(e).__name__}: {_one_line(e)}")
    return 1


if __name__ == "__main__":
  sys.exit(main())
