"""esc-jax command line: compress audio to `.esc` files and back.

  esc-jax compress IN.wav OUT.esc --checkpoint DIR --kbps 6
  esc-jax decompress IN.esc OUT.wav --checkpoint DIR [--sample_rate original]
  esc-jax compress IN_DIR OUT_DIR --checkpoint DIR     # folders: recursive, mirrored paths

(also `python -m esc_jax ...`). Errors print one `error: ...` line on stderr
and exit non-zero; outputs are written atomically, so a failure leaves no
partial file and does not clobber an existing one.

Compiled XLA programs are cached on disk (ESC_JAX_CACHE, default
~/.cache/esc_jax/xla; ESC_JAX_CACHE=0 disables it): the first run for a
given model and chunk shape compiles (~10 s per step for ESC-Base on 2 CPU cores),
later runs start in seconds.
"""
from __future__ import annotations

import argparse
import functools
import os
import pathlib
import sys


def _rate(s: str):
  if s == "original":
    return s
  try:
    v = int(s)
  except ValueError:
    v = 0
  if not 0 < v <= 768000:
    raise argparse.ArgumentTypeError(f"expected 'original' or a rate in Hz, got {s!r}")
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


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="esc-jax", description="ESC speech codec: compress / decompress.")
  sub = p.add_subparsers(dest="command", required=True)
  for name, help_in, help_out in (("compress", "audio file or folder", ".esc file or folder"),
                                  ("decompress", ".esc file or folder", "audio file or folder (.wav)")):
    c = sub.add_parser(name, help=f"{help_in} -> {help_out}")
    c.add_argument("input", help=help_in)
    c.add_argument("output", help=help_out)
    c.add_argument("--checkpoint", required=True, help="codec directory (esc_jax.load)")
    c.add_argument("--chunk_frames", type=_frames("chunk"), default=None,
                   help="code frames (20 ms) per chunk; 0 = whole file at once (default 500 = 10 s; "
                        "decompress: the stream's value)")
    c.add_argument("--context_frames", type=_frames("context"), default=None,
                   help="context frames on each side of a chunk (default: the model's receptive field)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    if name == "compress":
      c.add_argument("--kbps", default=None,
                     help="bitrate: 1.5, 3, 4.5, 6, 7.5 or 9 for ESC (default: the highest)")
    else:
      c.add_argument("--sample_rate", type=_rate, default=None,
                     help="output rate in Hz or 'original' (the input's rate; default 16000)")
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
    return bitstream.read_stream(path)[0].duration_s
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


def run(args) -> int:
  from esc_jax import compress, streaming
  from esc_jax.audio_io import AUDIO_EXTENSIONS

  src, dst = pathlib.Path(args.input), pathlib.Path(args.output)
  if not src.exists():
    raise FileNotFoundError(f"no such file or folder: {src}")
  codec = load_codec(args.checkpoint)
  if args.command == "compress":
    streams = codec.max_streams if args.kbps is None else codec.streams_for_kbps(args.kbps)
    chunk = streaming.DEFAULT_CHUNK_FRAMES if args.chunk_frames is None else args.chunk_frames

    def one(a, b, progress=None):
      compress.compress_file(codec, a, b, streams, chunk, args.context_frames, progress)
    exts, out_ext = AUDIO_EXTENSIONS, compress.ESC_EXTENSION
  else:
    def one(a, b, progress=None):
      compress.decompress_file(codec, a, b, args.sample_rate, args.chunk_frames, args.context_frames,
                               progress=progress)
    exts, out_ext = (compress.ESC_EXTENSION,), ".wav"

  if not src.is_dir():
    total = _seconds(src, args.command)
    fmt = "{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}]" if total else None
    with _progress_bar(args.quiet, total=total, unit="s", desc=src.name, bar_format=fmt) as bar:
      one(src, dst, bar.update)
    return 0

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
      runtime.enable_compile_cache()
    return run(args)
  except KeyboardInterrupt:
    _error("interrupted")
    return 130
  except Exception as e:  # one line, no traceback (ESC_JAX_DEBUG=1 shows it)
    if os.environ.get("ESC_JAX_DEBUG"):
      raise
    known = isinstance(e, (ValueError, OSError, RuntimeError))
    _error(_one_line(e) if known else f"{type(e).__name__}: {_one_line(e)}")
    return 1


if __name__ == "__main__":
  sys.exit(main())
