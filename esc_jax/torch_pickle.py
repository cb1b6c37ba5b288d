"""Safe, torch-free reader of PyTorch `.pth` checkpoints.

Reads the zip format written by `torch.save` since torch 1.6: an archive with
one root folder (its name varies) holding `data.pkl` (the pickled object),
`data/<key>` (raw little-endian storage bytes) and optionally `byteorder`.
Tensors come back as C-contiguous numpy arrays (strides and storage offsets are
honoured, then copied); parameters become plain arrays; dicts, OrderedDicts,
lists and tuples stay as they are.

Security: unpickling goes through `find_class`, which maps an explicit
allow-list of names (tensor/storage rebuild functions, storage types, dtypes,
`collections.OrderedDict`) to local implementations. Nothing is ever imported;
any other global raises `UnsafeCheckpointError` before it can run.

Notes:
- bfloat16 tensors are returned as float32 (exact: bfloat16 is the upper half
  of a float32).
- Storages flagged `big` in `<root>/byteorder` are byte-swapped; results always
  use native byte order.
- Errors are `CheckpointReadError` (one line naming the file and the problem);
  a missing file raises `CheckpointNotFoundError`, which is both a
  `CheckpointReadError` and a `FileNotFoundError`.
- The legacy (pre-1.6, non-zip) format and TorchScript archives are rejected.
"""
from __future__ import annotations

import _compat_pickle  # stdlib: py2 -> py3 global names, messages only
import collections
import io
import math
import os
import pickle
import pickletools
import struct
import zipfile
import zlib
from typing import Any, Callable

import numpy as np

__all__ = [
  "CheckpointNotFoundError",
  "CheckpointReadError",
  "UnsafeCheckpointError",
  "load_pth",
]


class UnsafeCheckpointError(ValueError):
  """The pickle references a global outside the allow-list."""


class CheckpointReadError(ValueError):
  """The checkpoint is unreadable, truncated or malformed."""


class CheckpointNotFoundError(CheckpointReadError, FileNotFoundError):
  """The checkpoint file does not exist."""


class _Malformed(Exception):
  """Internal: structurally invalid pickle content (wrapped by `load_pth`)."""


# torch dtype name -> numpy dtype of the stored elements (little-endian).
_DTYPES: dict[str, np.dtype] = {
  "float32": np.dtype("<f4"),
  "float64": np.dtype("<f8"),
  "float16": np.dtype("<f2"),
  "bfloat16": np.dtype("<u2"),  # widened to float32 after striding
  "int64": np.dtype("<i8"),
  "int32": np.dtype("<i4"),
  "int16": np.dtype("<i2"),
  "int8": np.dtype("i1"),
  "uint8": np.dtype("u1"),
  "bool": np.dtype("?"),
}

_STORAGE_TYPES: dict[str, str] = {
  "FloatStorage": "float32",
  "DoubleStorage": "float64",
  "HalfStorage": "float16",
  "BFloat16Storage": "bfloat16",
  "LongStorage": "int64",
  "IntStorage": "int32",
  "ShortStorage": "int16",
  "CharStorage": "int8",
  "ByteStorage": "uint8",
  "BoolStorage": "bool",
  "UntypedStorage": "uint8",  # numel counts bytes
}


class _Frozen:
  """Immutable slotted base: pickle's BUILD opcode cannot alter instances.

  (No `__dict__`, no `__setstate__`, and `setattr` raises, so a crafted pickle
  cannot rewire the shared allow-list objects.)
  """
  __slots__ = ()

  def __init__(self, **fields: Any):
    for key, value in fields.items():
      object.__setattr__(self, key, value)

  def __setattr__(self, key: str, value: Any) -> None:
    raise AttributeError(f"{type(self).__name__} is immutable")

  __delattr__ = __setattr__


class _DType(_Frozen):
  """Stand-in for a torch dtype or storage class (not callable)."""
  __slots__ = ("torch_name",)
  torch_name: str

  def __init__(self, torch_name: str):
    super().__init__(torch_name=torch_name)

  @property
  def np_dtype(self) -> np.dtype:
    return _DTYPES[self.torch_name]


class _Storage(_Frozen):
  """A typed view of one `data/<key>` record."""
  __slots__ = ("key", "dtype", "array")
  key: str
  dtype: _DType
  array: np.ndarray  # 1-D, stored byte order

  def __init__(self, key: str, dtype: _DType, array: np.ndarray):
    super().__init__(key=key, dtype=dtype, array=array)


class _Global(_Frozen):
  """Callable stand-in for an allow-listed function."""
  __slots__ = ("name", "fn")
  name: str
  fn: Callable[..., Any]

  def __init__(self, name: str, fn: Callable[..., Any]):
    super().__init__(name=name, fn=fn)

  def __call__(self, *args: Any) -> Any:
    return self.fn(*args)


def _as_int_tuple(value: Any, what: str) -> tuple[int, ...]:
  if not isinstance(value, (tuple, list)):
    raise _Malformed(f"{what} must be a tuple, got {type(value).__name__}")
  out = []
  for v in value:
    if not isinstance(v, int) or v < 0:
      raise _Malformed(f"{what} must hold non-negative ints, got {value!r}")
    out.append(int(v))
  return tuple(out)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any,
                    stride: Any, *_unused: Any) -> np.ndarray:
  """Array view of `storage` (element offset/strides), copied C-contiguous."""
  if not isinstance(storage, _Storage):
    raise _Malformed(f"tensor storage must come from a storage record, got "
                     f"{type(storage).__name__}")
  if not isinstance(storage_offset, int) or storage_offset < 0:
    raise _Malformed(f"bad storage offset {storage_offset!r}")
  shape = _as_int_tuple(size, "size")
  strides = _as_int_tuple(stride, "stride")
  if len(shape) != len(strides):
    raise _Malformed(f"size {shape} and stride {strides} differ in rank")
  base = storage.array
  if 0 not in shape:
    last = storage_offset + sum((n - 1) * s for n, s in zip(shape, strides))
    if last >= base.shape[0]:
      raise _Malformed(
          f"tensor (offset {storage_offset}, size {shape}, stride {strides}) "
          f"overruns storage '{storage.key}' of {base.shape[0]} elements")
    # More elements than the storage holds means overlapping strides (an expanded
    # tensor), which no state dict saves; copying one could take any amount of memory.
    if math.prod(shape) > base.shape[0]:
      raise _Malformed(
          f"tensor (size {shape}, stride {strides}) has more elements than "
          f"storage '{storage.key}' of {base.shape[0]} (overlapping strides)")
    item = base.itemsize
    view = np.lib.stride_tricks.as_strided(
        base[storage_offset:], shape=shape,
        strides=tuple(s * item for s in strides), writeable=False)
  else:
    view = np.empty(shape, base.dtype)
  out = np.array(view, dtype=base.dtype.newbyteorder("="), order="C")
  if storage.dtype.torch_name == "bfloat16":
    out = (out.astype(np.uint32) << 16).view(np.float32)
  return out


def _rebuild_parameter(data: Any, *_unused: Any) -> Any:
  """A parameter is just its data."""
  if not isinstance(data, np.ndarray):
    raise _Malformed(f"parameter data must be a tensor, got "
                     f"{type(data).__name__}")
  return data


def _allowed_globals() -> dict[tuple[str, str], Any]:
  table: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
  }
  for name, fn in (("_rebuild_tensor_v2", _rebuild_tensor),
                   ("_rebuild_tensor", _rebuild_tensor),
                   ("_rebuild_parameter", _rebuild_parameter),
                   ("_rebuild_parameter_with_state", _rebuild_parameter)):
    table[("torch._utils", name)] = _Global(f"torch._utils.{name}", fn)
  for name, dtype in _STORAGE_TYPES.items():
    table[("torch", name)] = _DType(dtype)
  for name in _DTYPES:
    table[("torch", name)] = _DType(name)
  return table


_ALLOWED = _allowed_globals()


def _quote(text: str) -> str:
  """'text', or its repr when it holds newlines or other unprintables."""
  return f"'{text}'" if text.isprintable() else repr(text)


def _one_line(text: str, limit: int = 300) -> str:
  """`text` on one line (whitespace runs collapsed: reprs of arrays span lines), cut at
  `limit` characters."""
  text = " ".join(text.split())
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _decode(value: Any) -> Any:
  return value.decode("ascii") if isinstance(value, bytes) else value


class _Unpickler(pickle.Unpickler):
  """Unpickler resolving only allow-listed globals and zip storage records."""

  def __init__(self, file: Any, zf: zipfile.ZipFile, root: str,
               byteorder: str, path: str):
    super().__init__(file, encoding="utf-8")
    self._zf = zf
    self._root = root
    self._byteorder = "<" if byteorder == "little" else ">"
    self._path = path
    self._records: dict[str, bytes] = {}
    self._storages: dict[tuple[str, str], _Storage] = {}

  def find_class(self, module: str, name: str) -> Any:
    try:
      return _ALLOWED[(module, name)]
    except KeyError:
      pass
    # Report the name Python 3 would resolve (protocol 2 writes
    # `__builtin__.eval` for `builtins.eval`); nothing is imported.
    py3 = _compat_pickle.NAME_MAPPING.get(
        (module, name),
        (_compat_pickle.IMPORT_MAPPING.get(module, module), name))
    shown = _quote(f"{py3[0]}.{py3[1]}")
    if py3 != (module, name):
      shown += f" (pickled as {_quote(f'{module}.{name}')})"
    raise UnsafeCheckpointError(
        f"refusing to load global {shown} from {self._path}: only "
        f"tensor/storage rebuild functions and plain containers are allowed")

  def persistent_load(self, pid: Any) -> _Storage:
    if (not isinstance(pid, tuple) or len(pid) != 5
        or _decode(pid[0]) != "storage"):
      raise _Malformed(f"unsupported persistent id {pid!r}")
    _, storage_type, key, _location, numel = pid
    key = _decode(key)
    if not isinstance(storage_type, _DType):
      raise _Malformed(f"bad storage type {storage_type!r}")
    if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
      raise _Malformed(f"bad storage record {pid!r}")
    cache_key = (key, storage_type.torch_name)
    if cache_key in self._storages:
      return self._storages[cache_key]
    raw = self._record(key)
    dtype = storage_type.np_dtype.newbyteorder(self._byteorder)
    nbytes = numel * dtype.itemsize
    if len(raw) < nbytes:
      raise CheckpointReadError(
          f"{self._path}: storage record '{self._root}data/{key}' has "
          f"{len(raw)} bytes, expected {nbytes}")
    array = np.frombuffer(raw, dtype=dtype, count=numel)
    storage = _Storage(key, storage_type, array)
    self._storages[cache_key] = storage
    return storage

  def _record(self, key: str) -> bytes:
    if key not in self._records:
      name = f"{self._root}data/{key}"
      try:
        self._records[key] = self._zf.read(name)
      except KeyError:
        raise CheckpointReadError(
            f"{self._path}: missing storage record '{name}'") from None
    return self._records[key]


def _find_root(zf: zipfile.ZipFile, path: str) -> str:
  """Archive prefix ('<folder>/' or '') of the entry holding `data.pkl`."""
  roots = sorted({n[:-len("data.pkl")] for n in zf.namelist()
                  if n == "data.pkl"
                  or (n.endswith("/data.pkl") and n.count("/") == 1)})
  if not roots:
    if any(n.endswith("constants.pkl") for n in zf.namelist()):
      raise CheckpointReadError(
          f"{path}: TorchScript archive (no data.pkl); save a state dict")
    raise CheckpointReadError(f"{path}: zip archive has no data.pkl entry")
  if len(roots) > 1:
    raise CheckpointReadError(
        f"{path}: ambiguous archive, several data.pkl roots {roots}")
  return roots[0]


def _byteorder(zf: zipfile.ZipFile, root: str, path: str) -> str:
  try:
    raw = zf.read(f"{root}byteorder")
  except KeyError:
    return "little"
  order = raw.decode("ascii", "replace").strip()
  if order not in ("little", "big"):
    raise CheckpointReadError(f"{path}: unknown byteorder {order!r}")
  return order


# data.pkl holds the structure, not the tensors (those are separate records): a few MB
# even for a training checkpoint. A larger one is refused before it is decompressed.
MAX_PICKLE_BYTES = 1 << 30


def _checked(pkl: bytes) -> bytes:
  """`pkl` once every length it declares lies within it. The unpickler allocates a
  declared bytes / str length before reading it, so one corrupt length field could
  ask for tens of GB; `pickletools.genops` reads no further than the data."""
  data = io.BytesIO(pkl)
  for op, arg, pos in pickletools.genops(data):
    if op.name == "FRAME" and arg > len(pkl) - data.tell():
      raise _Malformed(f"a frame of {arg} bytes at byte {pos} overruns the {len(pkl)}-byte data.pkl")
  return pkl


def load_pth(path: str | os.PathLike[str]) -> Any:
  """Load a zip-format `torch.save` checkpoint without torch.

  Returns the unpickled object (normally a dict) with every tensor as a numpy
  array. Raises `UnsafeCheckpointError` on non-allow-listed globals and
  `CheckpointReadError` (or its `CheckpointNotFoundError`) on any read error.
  """
  name = os.fspath(path)
  if not os.path.exists(name):
    raise CheckpointNotFoundError(f"{name}: no such checkpoint file")
  try:
    with open(name, "rb") as fh:
      head = fh.read(4)
      if not head:
        raise CheckpointReadError(f"{name}: empty file")
      if not zipfile.is_zipfile(fh):
        legacy = (" (legacy pre-1.6 torch.save format is not supported)"
                  if head[:1] == b"\x80" else "")
        raise CheckpointReadError(
            f"{name}: not a zip-format torch checkpoint{legacy}")
      fh.seek(0)
      with zipfile.ZipFile(fh) as zf:
        root = _find_root(zf, name)
        order = _byteorder(zf, root, name)
        size = zf.getinfo(f"{root}data.pkl").file_size  # what zipfile will decompress, at most
        if size > MAX_PICKLE_BYTES:
          raise CheckpointReadError(f"{name}: data.pkl would decompress to {size} bytes, over the "
                                    f"{MAX_PICKLE_BYTES} a checkpoint's pickle can need")
        pkl = _checked(zf.read(f"{root}data.pkl"))
        return _Unpickler(io.BytesIO(pkl), zf, root, order, name).load()
  except (UnsafeCheckpointError, CheckpointReadError):
    raise
  except _Malformed as exc:
    raise CheckpointReadError(f"{name}: malformed data.pkl: {_one_line(str(exc))}") from None
  except (OSError, EOFError, zipfile.BadZipFile, zlib.error, struct.error,
          pickle.UnpicklingError, AttributeError, IndexError, KeyError,
          TypeError, ValueError, UnicodeDecodeError, MemoryError, OverflowError,
          RecursionError, NotImplementedError) as exc:
    detail = _one_line(str(exc).splitlines()[0]) if str(exc) else ""
    detail = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    raise CheckpointReadError(
        f"{name}: unreadable checkpoint ({detail})") from None
