"""Shared test helpers: torch-format `.pth` files written without torch, tree comparison, and
subprocess environments."""
from __future__ import annotations

import importlib.metadata
import io
import os
import pathlib
import pickle
import zipfile

import jax
import numpy as np


# ---- hand-written pickles in the torch zip layout ----

def obj(value) -> bytes:
  """Pickle opcodes pushing `value` (protocol 2, no PROTO/STOP, no memo)."""
  buf = io.BytesIO()
  pickler = pickle.Pickler(buf, protocol=2)
  pickler.fast = True  # no memo PUTs, so fragments can be concatenated
  pickler.dump(value)
  return buf.getvalue()[2:-1]


def global_(module: str, name: str) -> bytes:
  return b"c" + f"{module}\n{name}\n".encode()


def call(fn: bytes, *args: bytes) -> bytes:
  """`fn(*args)` via MARK ... TUPLE REDUCE."""
  return fn + b"(" + b"".join(args) + b"tR"


def storage(key: str, numel: int, storage_type: str = "FloatStorage") -> bytes:
  """BINPERSID of ('storage', torch.<storage_type>, key, 'cpu', numel)."""
  return (b"(" + obj("storage") + global_("torch", storage_type) + obj(key)
          + obj("cpu") + obj(numel) + b"tQ")


def tensor(storage: bytes, offset: int, size: tuple, stride: tuple,
            fn: str = "_rebuild_tensor_v2") -> bytes:
  args = [storage, obj(offset), obj(size), obj(stride)]
  if fn == "_rebuild_tensor_v2":
    args += [obj(False), call(global_("collections", "OrderedDict"))]
  return call(global_("torch._utils", fn), *args)


def dict_(**items: bytes) -> bytes:
  """A dict whose values are the given opcode fragments."""
  body = b"".join(obj(k) + v for k, v in items.items())
  return b"}(" + body + b"u"


def program(body: bytes) -> bytes:
  return b"\x80\x02" + body + b"."


def write_pth(path: pathlib.Path, data_pkl: bytes | None,
               records: dict[str, bytes] | None = None,
               root: str = "archive", byteorder: str | None = "little"
               ) -> pathlib.Path:
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
    if data_pkl is not None:
      zf.writestr(f"{root}/data.pkl", data_pkl)
    if byteorder is not None:
      zf.writestr(f"{root}/byteorder", byteorder)
    for key, raw in (records or {}).items():
      zf.writestr(f"{root}/data/{key}", raw)
  return path


def write_state_dict_pth(path, state_dict, wrap=True):
  """A torch-format zip checkpoint of float32/int64 arrays, written without torch."""
  items, records = {}, {}
  for i, (name, arr) in enumerate(state_dict.items()):
    arr = np.ascontiguousarray(arr)
    kind = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}[arr.dtype]
    strides = tuple(s // arr.itemsize for s in arr.strides)
    items[name] = tensor(storage(str(i), arr.size, kind), 0, arr.shape, strides)
    records[str(i)] = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
  body = dict_(**items)
  if wrap:
    body = b"}(" + obj("model_state_dict") + body + b"u"
  return write_pth(pathlib.Path(path), program(body), records)



def assert_trees_close(a, b, rtol=0.0, atol=0.0):
  """Every leaf of pytree `a` close to the same leaf of `b` (error names the leaf's path)."""
  flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
  flat_b, tree_b = jax.tree_util.tree_flatten(b)
  assert tree_a.num_leaves == tree_b.num_leaves, (tree_a, tree_b)
  for (k, x), y in zip(flat_a, flat_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(k))


def two_device_env(**extra) -> dict:
  """Environment for a subprocess with 2 forced CPU devices (the suite's XLA flags kept)."""
  flags = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
  return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", **extra}


# XLA:CPU's LLVM IR fusion emitters instead of its MLIR ones: half the compile time of the
# smoke train step (33 -> 16 CPU-s). Only for train.py subprocesses compared with tolerances
# or with each other: the two emitters' programs can differ in the last bits, and the
# in-process tests compile with the default, as users do. The flag exists from jaxlib 0.10.
IR_EMITTERS = ("--xla_cpu_use_fusion_emitters=false"
               if tuple(int(v) for v in importlib.metadata.version("jaxlib").split(".")[:2]) >= (0, 10) else "")
COMPILE_WITH_IR_EMITTERS = {"xla_cpu_use_fusion_emitters": False} if IR_EMITTERS else {}  # compiler_options
