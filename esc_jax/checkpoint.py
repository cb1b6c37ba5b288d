"""Checkpoint layout on disk: codec directories and training checkpoints (orbax).

A codec directory (written by `convert_torch_weights.py` and by `train.py`):

  DIR/esc_config.json          {"model_name": ..., "model": {constructor keywords}, ...}
  DIR/checkpoints/<step>/ITEM  orbax CheckpointManager steps; item "params" holds the
                               Flax params, "batch_stats" the BatchNorm statistics of the
                               convolution variants; training adds "opt_state", "meta"
                               and the discriminator's items.

This module owns that layout: the item names, the retention policy of training
runs (the last `keep` steps plus the best one) and the rule that picks the
best step (`BEST_METRIC`, saved with each validated step). `esc_jax.load`
(esc_jax/api.py) reads codec directories through `restore_variables`.
"""
from __future__ import annotations

import functools
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

from esc_jax.files import write_json_atomic

CONFIG_FILE = "esc_config.json"
CKPT_DIR = "checkpoints"
PARAMS_ITEM = "params"
STATE_ITEMS = ("batch_stats",)  # model collections besides params, saved when present
# The validation metric that selects the "best" checkpoint and whether higher is better.
BEST_METRIC, BEST_MODE = "pesq", "max"


class CheckpointError(ValueError):
  """A codec directory or checkpoint that cannot be used (one clear line)."""


# ---------------------------------------------------------------------------
# Codec config
# ---------------------------------------------------------------------------


def plain(obj):
  """ConfigDict / tuples / numpy scalars -> JSON-able plain containers."""
  if hasattr(obj, "to_dict"):
    obj = obj.to_dict()
  if isinstance(obj, Mapping):
    return {str(k): plain(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [plain(v) for v in obj]
  if isinstance(obj, np.generic):
    return obj.item()
  return obj


def codec_config(model_config, model_name: str, extra: Mapping[str, Any] | None = None) -> dict:
  """The content of esc_config.json."""
  return {"model_name": model_name, "model": plain(model_config), **plain(dict(extra or {}))}


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


def model_template(model) -> dict:
  """ShapeDtypeStruct tree of the model's variables ({"params": ..., ...}; no computation).

  Remembered per model config (Flax modules hash by their fields): tracing the model's
  init takes ~1-2 s, and a process that loads codecs often asks again (eval, the CLI's
  commands run in one process, tests)."""
  return jax.tree.map(lambda s: s, _model_template(model))  # fresh containers for the caller


@functools.lru_cache(maxsize=16)
def _model_template(model) -> dict:
  x = jax.ShapeDtypeStruct((1, model.valid_length(1)), jnp.float32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), x)


# ---------------------------------------------------------------------------
# Codec directories
# ---------------------------------------------------------------------------


def save_codec(directory, variables, model_config: Mapping[str, Any], model_name: str = "csvq+swinT",
               extra: Mapping[str, Any] | None = None, step: int = 0, overwrite: bool = False) -> pathlib.Path:
  """Writes a codec directory atomically.

  `variables` is the params tree or a {"params": ..., "batch_stats": ...} dict.
  Everything goes to a temporary sibling directory renamed into place when
  complete; an existing `directory` is replaced only if `overwrite`.
  """
  variables = _as_variables(variables)
  directory = pathlib.Path(directory).absolute()
  if directory.exists() and not overwrite:
    raise CheckpointError(f"{directory} already exists (pass overwrite=True / --overwrite to replace it)")
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp"))
  try:
    os.chmod(tmp, 0o755)
    write_json_atomic(tmp / CONFIG_FILE, codec_config(model_config, model_name, extra))
    with ocp.CheckpointManager(tmp / CKPT_DIR) as mngr:
      mngr.save(step, args=ocp.args.Composite(**{k: ocp.args.StandardSave(v) for k, v in variables.items()}))
      mngr.wait_until_finished()
    if directory.exists():
      old = directory.with_name(f".{directory.name}.old")
      shutil.rmtree(old, ignore_errors=True)  # left by an interrupted overwrite
      os.replace(directory, old)
      try:
        os.replace(tmp, directory)
      except BaseException:
        os.replace(old, directory)  # put the previous codec back
        raise
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return directory


def _as_variables(tree) -> dict:
  if isinstance(tree, Mapping) and PARAMS_ITEM in tree:
    return {k: v for k, v in tree.items() if k == PARAMS_ITEM or k in STATE_ITEMS}
  return {PARAMS_ITEM: tree}


def restore_variables(directory, model, step: int | str | None = None) -> dict:
  """Variables ({"params", and "batch_stats" for BatchNorm models}) of a codec directory.

  step: None = latest, "best" = best by BEST_METRIC (the latest if no step was
  validated), or a step number. Shapes are checked against `model`.
  """
  ckpt = pathlib.Path(directory).absolute() / CKPT_DIR
  if not ckpt.is_dir():
    raise CheckpointError(f"{directory}: no {CKPT_DIR}/ folder with saved params")
  template = model_template(model)
  with ocp.CheckpointManager(ckpt, item_names=tuple(template)) as mngr:
    steps = mngr.all_steps()
    if not steps:
      raise CheckpointError(f"{ckpt}: no complete checkpoint step")
    if step is None:
      step = mngr.latest_step()
    elif step == "best":
      step = _best(mngr)
    if step not in steps:
      raise CheckpointError(f"{ckpt}: no step {step} (have {sorted(steps)})")
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(
          **{k: ocp.args.StandardRestore(v) for k, v in template.items()}))
    except Exception as e:  # orbax raises many types; one line for the user
      msg = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise CheckpointError(f"{ckpt}/{step}: saved variables do not match the config in {CONFIG_FILE} "
                            f"({msg})") from None
  variables = {k: restored[k] for k in template}
  check_shapes(variables, template, f"{ckpt}/{step}")
  return variables


def restore_params(directory, model, step: int | str | None = None):
  """The params tree of a codec directory (see `restore_variables`)."""
  return restore_variables(directory, model, step)[PARAMS_ITEM]


def check_shapes(tree, template, where: str) -> None:
  """CheckpointError unless `tree` has the names and shapes of `template`."""
  flat_p = jax.tree_util.tree_flatten_with_path(tree)[0]
  flat_t = jax.tree_util.tree_flatten_with_path(template)[0]
  if [k for k, _ in flat_p] != [k for k, _ in flat_t]:
    raise CheckpointError(f"{where}: parameter names do not match the model config")
  for (k, p), (_, t) in zip(flat_p, flat_t):
    if tuple(p.shape) != tuple(t.shape):
      raise CheckpointError(f"{where}: {jax.tree_util.keystr(k)} has shape {tuple(p.shape)}, "
                            f"the config's model needs {tuple(t.shape)}")


# ---------------------------------------------------------------------------
# Best step and training checkpoints
# ---------------------------------------------------------------------------


def _best(mngr: ocp.CheckpointManager) -> int:
  """The step with the best BEST_METRIC; the latest step when none was validated."""
  scored = [(m[BEST_METRIC], s) for s in mngr.all_steps()
            for m in [mngr.metrics(s) or {}]
            if isinstance(m.get(BEST_METRIC), (int, float)) and math.isfinite(m[BEST_METRIC])]
  if not scored:
    return mngr.latest_step()
  return (max if BEST_MODE == "max" else min)(scored)[1]


def best_step(directory) -> int | None:
  """Step of the best validated checkpoint in a codec directory or workdir (None if none)."""
  with ocp.CheckpointManager(pathlib.Path(directory).absolute() / CKPT_DIR,
                             options=ocp.CheckpointManagerOptions(create=False)) as mngr:
    if not any(mngr.metrics(s) for s in mngr.all_steps()):
      return None
    return _best(mngr)


def train_manager(workdir, keep: int) -> ocp.CheckpointManager:
  """The manager of a training run: keeps the last `keep` steps plus the best validated one."""
  pp = ocp.checkpoint_managers
  metric = lambda m: m[BEST_METRIC]
  policy = pp.AnyPreservationPolicy([
      pp.LatestN(n=max(1, int(keep))),
      pp.BestN(get_metric_fn=metric, reverse=BEST_MODE == "min", n=1, keep_checkpoints_without_metrics=False)])
  options = ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=metric, best_mode=BEST_MODE,
                                         enable_async_checkpointing=False, create=True)
  return ocp.CheckpointManager(pathlib.Path(workdir).absolute() / CKPT_DIR, options=options)


def save_step(mngr: ocp.CheckpointManager, step: int, items: Mapping[str, Any], meta: Mapping[str, Any],
              metrics: Mapping[str, float] | None = None) -> None:
  """Saves pytrees `items` (params, opt_state, ...) and the JSON `meta` as step `step`.

  `metrics` (validation results) are stored with the step when they hold a
  finite BEST_METRIC; they rank it for retention and `step="best"`.
  """
  ok = metrics is not None and math.isfinite(metrics.get(BEST_METRIC, float("nan")))
  args = {k: ocp.args.StandardSave(v) for k, v in items.items()}
  mngr.save(step, args=ocp.args.Composite(**args, meta=ocp.args.JsonSave(dict(meta))),
            metrics={k: float(v) for k, v in metrics.items()} if ok else None, force=True)
  mngr.wait_until_finished()


def restore_step(mngr: ocp.CheckpointManager, step: int, targets: Mapping[str, Any]) -> tuple[dict, dict]:
  """Restores the items of `targets` (abstract trees, shardings included) and the meta of `step`."""
  args = {k: ocp.args.StandardRestore(v) for k, v in targets.items()}
  try:
    r = mngr.restore(step, args=ocp.args.Composite(**args, meta=ocp.args.JsonRestore()))
  except Exception as e:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise CheckpointError(f"{mngr.directory}/{step}: cannot restore ({msg})") from None
  return {k: r[k] for k in targets}, dict(r["meta"])
