"""Codec checkpoints on disk and the user-facing `Codec` (`esc_jax.load`).

A codec directory (written by `convert_torch_weights.py` and by `train.py`):

  DIR/esc_config.json          {"model_name": ..., "model": {constructor keywords}, ...}
  DIR/checkpoints/<step>/...   orbax CheckpointManager steps; item "params" holds
                               the Flax params (train.py adds optimizer state etc.)

`load(DIR)` restores the params of the latest (or the best, or a given) step.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import pathlib
import shutil
import tempfile
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from esc_jax.codec import ESC, make_model

CONFIG_FILE = "esc_config.json"
CKPT_DIR = "checkpoints"
PARAMS_ITEM = "params"


class CheckpointError(ValueError):
  """A codec directory that cannot be loaded (one clear line)."""


def model_template(model: ESC):
  """ShapeDtypeStruct tree of the model's params (no computation)."""
  x = jax.ShapeDtypeStruct((1, 15920), jnp.float32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]


def write_json_atomic(path, obj) -> None:
  path = pathlib.Path(path)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    os.chmod(tmp, 0o644)
    with os.fdopen(fd, "w") as f:
      json.dump(obj, f, indent=1, sort_keys=True)
      f.write("\n")
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def read_codec_config(directory) -> dict:
  path = pathlib.Path(directory) / CONFIG_FILE
  if not path.is_file():
    raise CheckpointError(f"{directory}: not a codec directory (no {CONFIG_FILE})")
  try:
    cfg = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path}: unreadable codec config ({e})") from None
  if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
    raise CheckpointError(f"{path}: codec config must be a mapping with a 'model' mapping")
  return cfg


def save_codec(directory, params, model_config: Mapping[str, Any], model_name: str = "csvq+swinT",
               extra: Mapping[str, Any] | None = None, step: int = 0, overwrite: bool = False) -> pathlib.Path:
  """Write params + config as a codec directory, atomically.

  Everything goes to a temporary sibling directory that is renamed into place
  only when complete; an existing `directory` is replaced only if `overwrite`.
  """
  directory = pathlib.Path(directory).absolute()
  if directory.exists() and not overwrite:
    raise CheckpointError(f"{directory} already exists (pass overwrite=True / --overwrite to replace it)")
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp"))
  try:
    os.chmod(tmp, 0o755)
    cfg = {"model_name": model_name, "model": _plain(model_config), **dict(extra or {})}
    write_json_atomic(tmp / CONFIG_FILE, cfg)
    with ocp.CheckpointManager(tmp / CKPT_DIR) as mngr:
      mngr.save(step, args=ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardSave(params)}))
      mngr.wait_until_finished()
    if directory.exists():
      old = directory.with_name(f".{directory.name}.old")
      os.replace(directory, old)
      os.replace(tmp, directory)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return directory


def restore_params(directory, model: ESC, step: int | str | None = None):
  """Params of `step` (None = latest, "best" = best by the manager's metric)."""
  ckpt = pathlib.Path(directory).absolute() / CKPT_DIR
  if not ckpt.is_dir():
    raise CheckpointError(f"{directory}: no {CKPT_DIR}/ folder with saved params")
  with ocp.CheckpointManager(ckpt, item_names=(PARAMS_ITEM,)) as mngr:
    steps = mngr.all_steps()
    if not steps:
      raise CheckpointError(f"{ckpt}: no complete checkpoint step")
    if step is None:
      step = mngr.latest_step()
    elif step == "best":
      step = _best_step(directory, mngr, steps)
    if step not in steps:
      raise CheckpointError(f"{ckpt}: no step {step} (have {sorted(steps)})")
    template = model_template(model)
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(
          **{PARAMS_ITEM: ocp.args.StandardRestore(template)}))
    except Exception as e:  # orbax raises many types; one line for the user
      msg = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise CheckpointError(f"{ckpt}/{step}: params do not match the config in {CONFIG_FILE} ({msg})") from None
  params = restored[PARAMS_ITEM]
  _check_shapes(params, template, f"{ckpt}/{step}")
  return params


def _best_step(directory, mngr, steps) -> int:
  """Step with the best saved metric (`best_metric` of esc_config.json, default max PESQ);
  the latest step when no step has that metric."""
  best = read_codec_config(directory).get("best_metric") or {"name": "pesq", "mode": "max"}
  scored = []
  for s in steps:
    value = (mngr.metrics(s) or {}).get(best["name"])
    if value is not None and math.isfinite(value):
      scored.append((value, s))
  if not scored:
    return mngr.latest_step()
  pick = max if best.get("mode", "max") == "max" else min
  return pick(scored)[1]


def _check_shapes(params, template, where):
  flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
  flat_t = jax.tree_util.tree_flatten_with_path(template)[0]
  if [k for k, _ in flat_p] != [k for k, _ in flat_t]:
    raise CheckpointError(f"{where}: parameter names do not match the model config")
  for (k, p), (_, t) in zip(flat_p, flat_t):
    if tuple(p.shape) != tuple(t.shape):
      raise CheckpointError(f"{where}: {jax.tree_util.keystr(k)} has shape {tuple(p.shape)}, "
                            f"the config's model needs {tuple(t.shape)}")


def _plain(obj):
  """ConfigDict / tuples -> JSON-able plain containers."""
  if hasattr(obj, "to_dict"):
    obj = obj.to_dict()
  if isinstance(obj, Mapping):
    return {str(k): _plain(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_plain(v) for v in obj]
  if isinstance(obj, np.generic):
    return obj.item()
  return obj


@functools.lru_cache(maxsize=8)
def _compiled(model: ESC):
  """Jitted (encode, decode) per model definition, shared by every Codec of that model."""
  encode = jax.jit(lambda p, x, s: model.apply({"params": p}, x, s, method=ESC.encode), static_argnums=2)
  decode = jax.jit(lambda p, c: model.apply({"params": p}, c, method=ESC.decode))
  return encode, decode


class Codec:
  """A loaded ESC codec: `encode` audio to codes and `decode` codes to audio.

  Inputs of any length are zero-padded to the next valid length
  (80 * (2 * overlap * k - 1) samples) and outputs trimmed back; for inputs of
  a valid length the results are exactly those of the original model.
  """

  def __init__(self, model: ESC, params, config: Mapping[str, Any] | None = None):
    self.model = model
    self.params = jax.tree_util.tree_map(jnp.asarray, params)
    self.config = dict(config or {})
    self._encode, self._decode = _compiled(model)

  # ---- properties ----
  sample_rate = 16000

  @property
  def max_streams(self) -> int:
    return self.model.max_streams

  @property
  def codebook_size(self) -> int:
    return self.model.codebook_size

  @property
  def group_size(self) -> int:
    return self.model.group_size

  @property
  def hop(self) -> int:
    return self.model.hop

  @property
  def samples_per_frame(self) -> int:
    """Audio samples per code frame (one code per group per 20 ms at defaults)."""
    return self.hop * self.model.patch_size[1] * self.model.overlap

  def valid_length(self, n: int) -> int:
    """Smallest length >= n that the model maps to itself (L = k*spf - hop)."""
    spf = self.samples_per_frame
    return max(1, -(-(n + self.hop) // spf)) * spf - self.hop

  def num_frames(self, n: int) -> int:
    """Code frames T' for an input of n samples."""
    return (self.valid_length(n) + self.hop) // self.samples_per_frame

  def kbps(self, num_streams: int) -> float:
    bits = np.log2(self.codebook_size) * self.group_size * num_streams
    return float(bits * self.sample_rate / self.samples_per_frame / 1000)

  @property
  def fingerprint(self) -> bytes:
    """8-byte digest of the model config and params (identifies a codec in `.esc` files)."""
    if not hasattr(self, "_fingerprint"):
      h = hashlib.sha256(json.dumps(self.config.get("model", {}), sort_keys=True).encode())
      for leaf in jax.tree_util.tree_leaves(self.params):
        h.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
      self._fingerprint = h.digest()[:8]
    return self._fingerprint

  # ---- codec ----
  def _audio_batch(self, audio) -> np.ndarray:
    x = np.asarray(audio)
    if x.ndim == 1:
      x = x[None]
    if x.ndim != 2:
      raise ValueError(f"audio must be (L,) or (B, L) mono samples, got shape {x.shape}")
    if x.shape[1] == 0 or x.shape[0] == 0:
      raise ValueError("audio is empty")
    if not np.issubdtype(x.dtype, np.floating):
      raise ValueError(f"audio must be floating point in [-1, 1], got dtype {x.dtype}")
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
      raise ValueError("audio contains NaN or infinite samples")
    return x

  def pad(self, audio) -> tuple[np.ndarray, int]:
    """(B, L) float32 zero-padded to a valid length, and the original L."""
    x = self._audio_batch(audio)
    n = x.shape[1]
    return np.pad(x, ((0, 0), (0, self.valid_length(n) - n))), n

  def encode(self, audio, num_streams: int = 6) -> np.ndarray:
    """(L,) or (B, L) audio at 16 kHz -> int32 codes (B, num_streams, group_size, T')."""
    if not isinstance(num_streams, (int, np.integer)) or not 1 <= num_streams <= self.max_streams:
      raise ValueError(f"num_streams must be an integer in 1..{self.max_streams}, got {num_streams!r}")
    x, _ = self.pad(audio)
    return np.asarray(self._encode(self.params, x, int(num_streams)))

  def decode(self, codes, length: int | None = None) -> np.ndarray:
    """int codes (B, s, group_size, T') or (s, group_size, T') -> float32 audio (B, L).

    L = 80 * (4T' - 1) (the valid length), or `length` when given (trimmed; <= L).
    """
    c = np.asarray(codes)
    if c.ndim == 3:
      c = c[None]
    if c.ndim != 4 or c.shape[2] != self.group_size or not 1 <= c.shape[1] <= self.max_streams:
      raise ValueError(f"codes must be (B, 1..{self.max_streams}, {self.group_size}, T'), got {c.shape}")
    if not np.issubdtype(c.dtype, np.integer):
      raise ValueError(f"codes must be integers, got dtype {c.dtype}")
    if c.size and (c.min() < 0 or c.max() >= self.codebook_size):
      raise ValueError(f"codes must be in [0, {self.codebook_size}), got [{c.min()}, {c.max()}]")
    if c.shape[3] == 0:
      raise ValueError("codes are empty (T' = 0)")
    wav = np.asarray(self._decode(self.params, c.astype(np.int32)))
    if length is not None:
      if length > wav.shape[1]:
        raise ValueError(f"length {length} exceeds the decoded length {wav.shape[1]}")
      wav = wav[:, :length]
    return wav

  def reconstruct(self, audio, num_streams: int = 6) -> np.ndarray:
    """encode then decode, trimmed to the input length: (B, L)."""
    x = self._audio_batch(audio)
    return self.decode(self.encode(x, num_streams), length=x.shape[1])


def load(directory, step: int | str | None = None, dtype=jnp.float32) -> Codec:
  """Load a codec directory written by `convert_torch_weights.py` or `train.py`.

  Args:
    directory: the codec directory (see module docstring).
    step: checkpoint step; None = latest, "best" = best validation PESQ.
    dtype: compute dtype (float32 reproduces the original exactly).
  """
  cfg = read_codec_config(directory)
  try:
    model = make_model(cfg["model"], cfg.get("model_name", "csvq+swinT"), dtype=dtype)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{directory}/{CONFIG_FILE}: invalid model config ({e})") from None
  return Codec(model, restore_params(directory, model, step), cfg)
