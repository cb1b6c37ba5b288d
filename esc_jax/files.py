"""Files on disk: atomic writes and recursive file finding (one rule each).

Every file the package writes goes through `atomic_path`: the content is
written to a temporary file in the target's folder and renamed over the target
only when complete, so a failure (or Ctrl-C) never leaves a partial file and
never clobbers what was there before.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import tempfile
from typing import Any, Iterable, Iterator, Mapping

import numpy as np


@contextlib.contextmanager
def atomic_path(path) -> Iterator[str]:
  """Yields a temporary path beside `path` (same extension); renamed onto `path` on success.

  The result gets mode 0644 (not mkstemp's 0600); on any exception the
  temporary file is removed and `path` is left as it was. A folder at `path`
  or a missing parent folder is an error before anything is written.
  """
  path = os.fspath(path)
  directory, base = os.path.split(os.path.abspath(path))
  if os.path.isdir(path):
    raise IsADirectoryError(f"{path} is a folder; give an output file name")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"output folder does not exist: {directory}")
  fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=f".tmp{os.path.splitext(base)[1]}", dir=directory)
  os.close(fd)
  try:
    yield tmp
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


@contextlib.contextmanager
def open_atomic(path, mode: str = "wb"):
  """A file opened for writing at a temporary path; flushed to disk and renamed onto `path` on success."""
  with atomic_path(path) as tmp, open(tmp, mode) as f:
    yield f
    f.flush()
    os.fsync(f.fileno())


def write_bytes_atomic(path, data: bytes) -> None:
  """Writes `data` to `path` atomically (flushed to disk before the rename)."""
  with open_atomic(path, "wb") as f:
    f.write(data)


def write_text_atomic(path, text: str) -> None:
  with open_atomic(path, "w") as f:
    f.write(text)


def write_json_atomic(path, obj: Any) -> None:
  """Pretty, key-sorted JSON with a trailing newline, written atomically."""
  write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def json_safe(obj):
  """obj with numpy scalars as Python values and non-finite floats as None (strict JSON)."""
  if isinstance(obj, np.generic):
    obj = obj.item()
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if isinstance(obj, Mapping):
    return {str(k): json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [json_safe(v) for v in obj]
  return obj


def is_path(x) -> bool:
  """Whether an input/output argument is a file path (str or os.PathLike) rather than a stream."""
  return isinstance(x, (str, os.PathLike))


def seekable(f) -> bool:
  """Whether a file object can seek (False for pipes, closed or odd objects)."""
  try:
    return bool(f.seekable())
  except (AttributeError, OSError, ValueError):
    return False


def find_files(folder, extensions: Iterable[str], exclude=None) -> list[pathlib.Path]:
  """Files under `folder` (recursive, sorted) whose extension is in `extensions`.

  Hidden files and folders (names starting with ".") are skipped, and so is
  the folder `exclude` (e.g. an output folder inside the input folder).
  Raises FileNotFoundError if `folder` is not a folder.
  """
  if not os.fspath(folder):
    raise FileNotFoundError("no folder given (empty path)")
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    raise FileNotFoundError(f"{folder}: no such folder")
  exts = {e.lower() for e in extensions}
  skip = pathlib.Path(exclude).resolve() if exclude is not None else None
  found = []
  for root, dirs, names in os.walk(folder):
    dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                     and (skip is None or pathlib.Path(root, d).resolve() != skip))
    found += [pathlib.Path(root, f) for f in names
              if not f.startswith(".") and os.path.splitext(f)[1].lower() in exts]
  return sorted(found)
