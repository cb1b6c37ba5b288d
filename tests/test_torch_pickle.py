"""Tests for the torch-free `.pth` reader (`esc_jax.torch_pickle`)."""
from __future__ import annotations

import builtins
import collections
import os
import pathlib
import pickle
import re
import struct
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from helpers import call, dict_, global_, obj, program, storage, tensor, write_pth
from esc_jax.torch_pickle import (
  CheckpointNotFoundError,
  CheckpointReadError,
  UnsafeCheckpointError,
  load_pth,
)

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "esc_tiny"
MODEL = FIXTURES / "model.pth"
MODEL_SEED = FIXTURES / "model_seed.pth"
NPZ = FIXTURES / "state_dict.npz"


# --- fixtures -----------------------------------------------------------------

def test_model_pth_matches_npz():
  ckpt = load_pth(MODEL)
  assert list(ckpt) == ["model_state_dict"]
  sd = ckpt["model_state_dict"]
  ref = np.load(NPZ)
  assert sorted(sd) == sorted(ref.files)
  for key in ref.files:
    got, want = sd[key], ref[key]
    assert isinstance(got, np.ndarray), key
    assert got.dtype == want.dtype, key
    assert got.shape == want.shape, key
    assert got.flags.c_contiguous and got.flags.writeable, key
    assert np.array_equal(got, want), key
  rpi = [k for k in sd if k.endswith("relative_position_index")]
  assert rpi and all(sd[k].dtype == np.int64 for k in rpi)


def _seed_to_latest(key: str) -> str | None:
  """Map a first-release key to the latest layout (None: no counterpart)."""
  if key.endswith(".codebook_initialized"):
    return None
  key = key.replace("encoder.pre_swin.", "encoder.pre_nn.")
  key = key.replace("decoder.post_swin.", "decoder.post_nn.")
  m = re.fullmatch(r"quantizers\.(\d+)\.vqs\.(\d+)\.proj_(down|up)\.weight",
                   key)
  if m:
    return f"quantizers.{m[1]}.{m[3]}_projs.{m[2]}.weight"
  return key


def test_model_seed_pth_matches_npz_after_renaming():
  sd = load_pth(MODEL_SEED)["model_state_dict"]
  ref = np.load(NPZ)
  mapped = {}
  for key, value in sd.items():
    assert isinstance(value, np.ndarray), key
    assert np.all(np.isfinite(value)), key
    new = _seed_to_latest(key)
    if new is not None:
      mapped[new] = value
  extra = sorted(k for k in sd if _seed_to_latest(k) is None)
  assert extra and all(k.startswith("quantizers.") for k in extra)
  assert sorted(mapped) == sorted(ref.files)
  for key in ref.files:
    assert mapped[key].dtype == ref[key].dtype, key
    assert np.array_equal(mapped[key], ref[key]), key
  # Spot-check the renamed families explicitly.
  assert np.array_equal(
      sd["encoder.pre_swin.swint_blocks.0.attn.qkv.weight"],
      ref["encoder.pre_nn.swint_blocks.0.attn.qkv.weight"])
  assert np.array_equal(sd["quantizers.2.vqs.1.proj_down.weight"],
                        ref["quantizers.2.down_projs.1.weight"])
  assert np.array_equal(sd["quantizers.5.vqs.0.proj_up.weight"],
                        ref["quantizers.5.up_projs.0.weight"])


# --- security -----------------------------------------------------------------

class _Reduce:
  """Object whose pickle calls `fn(*args)` on load."""

  def __init__(self, fn, *args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return self.fn, self.args


def _payloads(marker: pathlib.Path) -> dict[str, bytes]:
  shell = f"touch '{marker}'"
  code = f"open({str(marker)!r}, 'w').close()"
  return {
    # Hand-written GLOBAL 'os system' + REDUCE.
    "os.system": program(call(global_("os", "system"), obj(shell))),
    # Natural pickles: os.system pickles as posix.system on Linux.
    "builtins.eval": pickle.dumps(_Reduce(builtins.eval, code), protocol=2),
    "posix.system": pickle.dumps(_Reduce(os.system, shell), protocol=2),
    # Protocol 4 uses STACK_GLOBAL.
    "posix.system#4": pickle.dumps(_Reduce(os.system, shell), protocol=4),
    # Hidden after a legitimate tensor inside a state dict.
    "posix.system#nested": program(dict_(
        w=tensor(storage("0", 2), 0, (2,), (1,)),
        x=call(global_("posix", "system"), obj(shell)))),
  }


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "posix.system",
                                  "posix.system#4", "posix.system#nested"])
def test_malicious_global_is_refused(tmp_path, kind):
  marker = tmp_path / "pwned"
  payload = _payloads(marker)[kind]
  if kind == "builtins.eval":  # control: the payload is live under pickle
    pickle.loads(payload)
    assert marker.exists()
    marker.unlink()
  path = write_pth(tmp_path / "model.pth", payload,
                    {"0": np.zeros(2, "<f4").tobytes()})
  with pytest.raises(UnsafeCheckpointError) as info:
    load_pth(path)
  name = kind.split("#")[0]
  msg = str(info.value)
  assert f"'{name}'" in msg and "model.pth" in msg and "\n" not in msg
  assert "only tensor/storage rebuild functions" in msg
  assert not marker.exists()


def test_refused_global_is_not_imported(tmp_path):
  assert "this" not in sys.modules  # precondition: nothing in the suite imports it
  path = write_pth(tmp_path / "m.pth", program(global_("this", "s")))
  with pytest.raises(UnsafeCheckpointError, match="'this.s'"):
    load_pth(path)
  assert "this" not in sys.modules


def test_build_cannot_mutate_allowed_callables(tmp_path):
  # BUILD (setattr via slot state) on an allow-listed global must fail cleanly.
  state = obj((None, {"fn": None}))  # slot state -> setattr(inst, "fn", None)
  body = global_("torch._utils", "_rebuild_tensor_v2") + state + b"b"
  path = write_pth(tmp_path / "m.pth", program(body))
  with pytest.raises(CheckpointReadError, match="m.pth"):
    load_pth(path)
  assert np.array_equal(load_pth(MODEL)["model_state_dict"]["ft.window"],
                        np.load(NPZ)["ft.window"])


# --- read errors --------------------------------------------------------------

def _assert_read_error(path: pathlib.Path, exc_type=CheckpointReadError):
  with pytest.raises(exc_type) as info:
    load_pth(path)
  msg = str(info.value)
  assert path.name in msg and "\n" not in msg
  exc = info.value  # no chained zipfile/pickle traceback
  assert exc.__cause__ is None
  assert exc.__context__ is None or exc.__suppress_context__
  return msg


def test_truncated_checkpoint(tmp_path):
  raw = MODEL.read_bytes()
  path = tmp_path / "truncated.pth"
  path.write_bytes(raw[:len(raw) // 2])
  _assert_read_error(path)


def test_random_bytes(tmp_path):
  path = tmp_path / "random.pth"
  path.write_bytes(np.random.default_rng(0).bytes(4096))
  assert "not a zip" in _assert_read_error(path)


def test_empty_file(tmp_path):
  path = tmp_path / "empty.pth"
  path.write_bytes(b"")
  assert "empty" in _assert_read_error(path)


def test_legacy_format(tmp_path):
  path = tmp_path / "legacy.pth"
  path.write_bytes(pickle.dumps({"a": 1}, protocol=2))
  assert "legacy" in _assert_read_error(path)


def test_zip_without_data_pkl(tmp_path):
  path = write_pth(tmp_path / "nodata.pth", None, {"0": b"\0" * 8})
  assert "data.pkl" in _assert_read_error(path)


def test_missing_file(tmp_path):
  path = tmp_path / "missing.pth"
  _assert_read_error(path, CheckpointNotFoundError)
  with pytest.raises(FileNotFoundError):
    load_pth(path)


def test_directory(tmp_path):
  path = tmp_path / "adir.pth"
  path.mkdir()
  _assert_read_error(path)


def test_missing_storage_record(tmp_path):
  body = dict_(w=tensor(storage("7", 4), 0, (4,), (1,)))
  path = write_pth(tmp_path / "norecord.pth", program(body))
  assert "archive/data/7" in _assert_read_error(path)


def test_short_storage_record(tmp_path):
  body = dict_(w=tensor(storage("0", 4), 0, (4,), (1,)))
  path = write_pth(tmp_path / "short.pth", program(body),
                    {"0": np.zeros(3, "<f4").tobytes()})
  assert "expected 16" in _assert_read_error(path)


def test_garbage_data_pkl(tmp_path):
  path = write_pth(tmp_path / "garbage.pkl.pth", b"\x80\x02}q\x00(X")
  _assert_read_error(path)


def test_out_of_bounds_view(tmp_path):
  body = dict_(w=tensor(storage("0", 10), 2, (3, 4), (4, 1)))
  path = write_pth(tmp_path / "oob.pth", program(body),
                    {"0": np.zeros(10, "<f4").tobytes()})
  assert "overruns" in _assert_read_error(path)


# --- tensor semantics ---------------------------------------------------------

def test_strided_tensor_with_offset(tmp_path):
  base = np.arange(40, dtype="<f4")
  body = dict_(
      t=tensor(storage("0", 40), 3, (3, 4), (1, 5)),
      b=tensor(storage("0", 40), 7, (2, 3), (0, 2)),  # broadcast row
      e=tensor(storage("0", 40), 0, (0, 5), (5, 1)),
      s=tensor(storage("0", 40), 11, (), ()),
      old=tensor(storage("0", 40), 1, (2, 2), (10, 3), "_rebuild_tensor"))
  path = write_pth(tmp_path / "strided.pth", program(body),
                    {"0": base.tobytes()})
  out = load_pth(path)

  def view(offset, shape, strides):
    return np.lib.stride_tricks.as_strided(
        base[offset:], shape, tuple(4 * s for s in strides))

  for key, want in [("t", view(3, (3, 4), (1, 5))),
                    ("b", view(7, (2, 3), (0, 2))),
                    ("e", np.zeros((0, 5), np.float32)),
                    ("s", np.float32(11)),
                    ("old", view(1, (2, 2), (10, 3)))]:
    got = out[key]
    assert got.dtype == np.float32 and got.shape == np.shape(want), key
    assert got.flags.c_contiguous and got.flags.writeable, key
    assert np.array_equal(got, want), key
  assert out["t"][0].tolist() == [3, 8, 13, 18]
  # Tensors sharing a storage are independent copies.
  out["t"][0, 0] = -1
  assert out["b"][0, 0] == 7


def test_dtypes_parameters_and_containers(tmp_path):
  bf16_values = np.array([1.0, -2.5, 3.140625], np.float32)
  bf16_raw = (bf16_values.view(np.uint32) >> 16).astype("<u2").tobytes()
  records = {
    "f64": np.arange(3, dtype="<f8").tobytes(),
    "i8": np.array([-1, 2], "i1").tobytes(),
    "u8": np.array([255, 0], "u1").tobytes(),
    "bool": np.array([True, False, True], "?").tobytes(),
    "bf16": bf16_raw,
    "dt": np.array([1.5, 2.5], "<f4").tobytes(),
  }
  param = call(global_("torch._utils", "_rebuild_parameter"),
                tensor(storage("f64", 3, "DoubleStorage"), 0, (3,), (1,)),
                obj(True), call(global_("collections", "OrderedDict")))
  param_state = call(
      global_("torch._utils", "_rebuild_parameter_with_state"),
      tensor(storage("i8", 2, "CharStorage"), 0, (2,), (1,)),
      obj(False), call(global_("collections", "OrderedDict")), obj({}))
  od = call(global_("collections", "OrderedDict")) + b"(" + b"".join([
      obj("u8"), tensor(storage("u8", 2, "ByteStorage"), 0, (2,), (1,)),
      obj("bool"), tensor(storage("bool", 3, "BoolStorage"), 0, (3,), (1,)),
  ]) + b"u"
  body = dict_(
      param=param, param_state=param_state, od=od,
      bf16=tensor(storage("bf16", 3, "BFloat16Storage"), 0, (3,), (1,)),
      # Newer style: the storage type slot carries a dtype object.
      dt=tensor(storage("dt", 2, "float32"), 0, (2,), (1,)),
      meta=obj({"step": 3, "names": ["a", "b"], "pair": (1, 2.5)}))
  out = load_pth(write_pth(tmp_path / "mix.pth", program(body), records,
                            root="some_other_root"))
  assert out["param"].dtype == np.float64
  assert out["param"].tolist() == [0, 1, 2]
  assert out["param_state"].dtype == np.int8
  assert out["param_state"].tolist() == [-1, 2]
  assert isinstance(out["od"], collections.OrderedDict)
  assert list(out["od"]) == ["u8", "bool"]
  assert out["od"]["u8"].dtype == np.uint8
  assert out["od"]["bool"].dtype == np.bool_
  assert out["od"]["bool"].tolist() == [True, False, True]
  assert out["bf16"].dtype == np.float32
  assert np.array_equal(out["bf16"], bf16_values)
  assert out["dt"].tolist() == [1.5, 2.5]
  assert out["meta"] == {"step": 3, "names": ["a", "b"], "pair": (1, 2.5)}


def test_big_endian_byteorder(tmp_path):
  body = dict_(w=tensor(storage("0", 3, "LongStorage"), 0, (3,), (1,)))
  path = write_pth(tmp_path / "be.pth", program(body),
                    {"0": np.array([1, -2, 3], ">i8").tobytes()},
                    byteorder="big")
  w = load_pth(path)["w"]
  assert w.dtype == np.int64 and w.dtype.isnative
  assert w.tolist() == [1, -2, 3]


# --- robustness ---------------------------------------------------------------

_FUZZ_BASE = program(dict_(
    a=tensor(storage("0", 12), 2, (2, 3), (3, 1)),
    b=tensor(storage("1", 4, "LongStorage"), 0, (4,), (1,)),
    c=obj({"epoch": 1, "names": ["x", "y"]})))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(edits=[(178, 48)], cut=0)  # a persistent id holding an array: its repr spans lines
@given(st.lists(st.tuples(st.integers(0, len(_FUZZ_BASE) - 1),
                          st.integers(0, 255)), min_size=1, max_size=4),
       st.integers(0, len(_FUZZ_BASE)))
def test_fuzzed_data_pkl_fails_cleanly(tmp_path, edits, cut):
  data = bytearray(_FUZZ_BASE)
  for pos, value in edits:
    data[pos] = value
  path = write_pth(tmp_path / "fuzz.pth", bytes(data[:cut or None]),
                    {"0": np.arange(12, dtype="<f4").tobytes(),
                     "1": np.arange(4, dtype="<i8").tobytes()})
  try:
    load_pth(path)
  except UnsafeCheckpointError as exc:
    assert "fuzz.pth" in str(exc)
  except CheckpointReadError as exc:
    assert "fuzz.pth" in str(exc) and "\n" not in str(exc)


def test_state_dict_ordered_dict_with_metadata(tmp_path):
  # `torch.save(model.state_dict())`: OrderedDict + BUILD of `_metadata`.
  od = (call(global_("collections", "OrderedDict")) + b"(" + obj("w")
        + tensor(storage("0", 2), 0, (2,), (1,)) + b"u"
        + obj({"_metadata": {"": {"version": 1}}}) + b"b")
  out = load_pth(write_pth(tmp_path / "sd.pth", program(od),
                            {"0": np.array([1, 2], "<f4").tobytes()}))
  assert isinstance(out, collections.OrderedDict)
  assert out["w"].tolist() == [1.0, 2.0]
  assert out._metadata == {"": {"version": 1}}


@pytest.mark.parametrize("opcode,what", [(b"\x8e", "bytes8"), (b"\x8d", "unicodestring8"), (b"\x95", "frame")])
def test_a_huge_declared_length_is_refused_before_it_is_allocated(tmp_path, opcode, what):
  """A corrupt length field (here 20 GiB in an 8-byte BINBYTES8 / BINUNICODE8 / FRAME) is
  refused by the opcode scan: the unpickler would allocate it before reading (a fuzzed
  checkpoint once took 20 GB of RSS)."""
  pkl = b"\x80\x04" + opcode + struct.pack("<Q", 20 << 30) + b"abc."
  with pytest.raises(CheckpointReadError) as info:
    load_pth(write_pth(tmp_path / "big.pth", pkl, {}))
  msg = str(info.value)
  assert "big.pth" in msg and what in msg and "\n" not in msg and "MemoryError" not in msg


def test_a_data_pkl_over_the_size_limit_is_refused_before_decompressing(tmp_path, monkeypatch):
  """zipfile decompresses no more than the member's declared size, which is checked first
  (a zip bomb in data.pkl would otherwise be inflated in full)."""
  from esc_jax import torch_pickle
  path = write_pth(tmp_path / "sd.pth", _FUZZ_BASE, {"0": np.arange(12, dtype="<f4").tobytes(),
                                                      "1": np.arange(4, dtype="<i8").tobytes()})
  assert set(load_pth(path)) == {"a", "b", "c"}
  monkeypatch.setattr(torch_pickle, "MAX_PICKLE_BYTES", len(_FUZZ_BASE) - 1)
  with pytest.raises(CheckpointReadError, match=rf"sd.pth: data.pkl would decompress to {len(_FUZZ_BASE)} bytes"):
    load_pth(path)
