"""PyTorch state_dict -> Flax variables: a mechanical, strict name mapping.

Torch key `a.b.3.c.weight` names the Flax module path `a/b_3/c`; the leaf
depends on the Flax module found there: `kernel` (Linear weights transposed,
Conv2d (out, in, kh, kw) and ConvTranspose2d (in, out, kh, kw) both
transposed (2, 3, 1, 0)), `scale` (LayerNorm, BatchNorm), `embedding`
(nn.Embedding) or `negative_slope` (PReLU). BatchNorm buffers `running_mean`
/ `running_var` go to the "batch_stats" collection as `mean` / `var`
(`num_batches_tracked` is not needed). Both key layouts of the released
checkpoints are accepted (first release: `pre_swin`/`post_swin`,
`vqs.{m}.proj_down`/`proj_up`).
"""
from __future__ import annotations

import hashlib
import pathlib
import re
from typing import Any, Mapping

import numpy as np

# Buffers derived from the config, never parameters.
_DERIVED = (re.compile(r"(^|\.)(ft|ift)\.window$"),
            re.compile(r"\.relative_position_index$"),
            re.compile(r"\.codebook_initialized$"))
_LEGACY = ((re.compile(r"\.pre_swin\."), ".pre_nn."),
           (re.compile(r"\.post_swin\."), ".post_nn."),
           (re.compile(r"^quantizers\.(\d+)\.vqs\.(\d+)\.proj_down\."), r"quantizers.\1.down_projs.\2."),
           (re.compile(r"^quantizers\.(\d+)\.vqs\.(\d+)\.proj_up\."), r"quantizers.\1.up_projs.\2."))


class ConversionError(ValueError):
  """A state dict that does not match the model (names the key and shapes)."""


def is_derived(key: str) -> bool:
  return any(p.search(key) for p in _DERIVED)


def canonical_key(key: str) -> str:
  """Rename first-release keys to the latest layout."""
  for pat, rep in _LEGACY:
    key = pat.sub(rep, key)
  return key


def flax_path(key: str) -> tuple[str, ...]:
  """`encoder.blocks.0.swint_blocks.1.attn.qkv` -> ('encoder', 'blocks_0', 'swint_blocks_1', 'attn', 'qkv')."""
  out: list[str] = []
  for part in key.split("."):
    if part.isdigit() and out:
      out[-1] = f"{out[-1]}_{part}"
    else:
      out.append(part)
  return tuple(out)


def _convert_leaf(key: str, leaf: str, module: Mapping[str, Any], value: np.ndarray):
  """Returns (flax leaf name, array in Flax layout)."""
  if leaf == "weight":
    if "kernel" in module:
      if value.ndim == 2:
        return "kernel", value.T
      if value.ndim == 4:
        return "kernel", value.transpose(2, 3, 1, 0)
      raise ConversionError(f"{key}: unexpected weight rank {value.ndim}")
    for name in ("scale", "embedding", "negative_slope"):
      if name in module:
        return name, value
    raise ConversionError(f"{key}: no Flax weight at {'/'.join(flax_path(key)[:-1])}")
  return leaf, value


# BatchNorm buffers: torch leaf -> leaf in the "batch_stats" collection.
_STATS = {"running_mean": "mean", "running_var": "var"}


def state_dict_to_variables(state_dict: Mapping[str, np.ndarray], template: Mapping[str, Any]) -> dict:
  """Map a torch state dict onto Flax variables {"params": ..., "batch_stats": ...}.

  Args:
    state_dict: torch name -> array (either release layout; derived buffers and
      BatchNorm `num_batches_tracked` ignored).
    template: the model's variables (e.g. `jax.eval_shape(model.init, ...)`);
      only structure and shapes are used. "batch_stats" exists for the
      convolution backbone only.
  Returns: a new variables tree (the template's collections) of float32 numpy arrays.
  Raises: ConversionError for a missing, unexpected, duplicated or mis-shaped key.
  """
  template = {c: template[c] for c in ("params", "batch_stats") if c in template}
  params_t, stats_t = template["params"], template.get("batch_stats", {})

  def locate(key, value):
    path = flax_path(canonical_key(key))
    if path[-1] == "num_batches_tracked" and _subtree(stats_t, path[:-1]) is not None:
      return None  # PyTorch's counter; momentum 0.1 does not use it
    if path[-1] in _STATS:
      if _subtree(stats_t, path[:-1]) is None:
        raise ConversionError(f"unexpected key {key!r}: the model has no BatchNorm at {'/'.join(path[:-1])}")
      return ("batch_stats",) + path[:-1] + (_STATS[path[-1]],), value
    module = _subtree(params_t, path[:-1])
    if module is None:
      raise ConversionError(f"unexpected key {key!r}: the model has no module {'/'.join(path[:-1])}")
    leaf, arr = _convert_leaf(key, path[-1], module, value)
    return ("params",) + path[:-1] + (leaf,), arr

  return _map_strict(state_dict, template, locate, skip=is_derived, torch_name=lambda p: _torch_name(p[1:], p[0]))


def _map_strict(state_dict, template, locate, skip=lambda key: False, torch_name=None) -> dict:
  """The strict mapping loop: every leaf of `template` ({collection: tree}) filled exactly once.

  `locate(key, value)` returns (full path, collection first; array in Flax layout),
  or None for a key to ignore; `torch_name(full path)` names a missing leaf.
  """
  flat_template = _flatten(template)
  filled: dict[tuple[str, ...], np.ndarray] = {}
  source: dict[tuple[str, ...], str] = {}
  for key, value in state_dict.items():
    if skip(key):
      continue
    found = locate(key, np.asarray(value))
    if found is None:
      continue
    full, arr = found
    where = "/".join(full[1:])
    if full not in flat_template:
      raise ConversionError(f"unexpected key {key!r}: the model has no {full[0]} entry {where}")
    if full in filled:
      raise ConversionError(f"key {key!r} fills {where} already filled by {source[full]!r}")
    want = tuple(flat_template[full].shape)
    if tuple(arr.shape) != want:
      raise ConversionError(f"shape mismatch for {key!r}: checkpoint {tuple(np.shape(value))} "
                            f"(as {tuple(arr.shape)} in Flax layout) vs model {want} at {where}")
    filled[full] = np.ascontiguousarray(arr, dtype=np.float32)
    source[full] = key
  missing = [p for p in flat_template if p not in filled]
  if missing:
    raise ConversionError(f"missing key(s) in checkpoint: {', '.join(torch_name(p) for p in missing[:5])}"
                          + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
  out = _unflatten(filled)
  return {col: out.get(col, {}) for col in template}


def state_dict_to_params(state_dict: Mapping[str, np.ndarray], template: Mapping[str, Any]) -> dict:
  """Map a torch state dict onto a Flax params tree of a model without BatchNorm.

  Args:
    state_dict: torch name -> array (either release layout; buffers ignored).
    template: the model's params (e.g. from `init` or `jax.eval_shape`); only
      its structure and shapes are used.
  Returns: a new params tree of float32 numpy arrays.
  Raises: ConversionError for a missing, unexpected, duplicated or mis-shaped key
    (BatchNorm running statistics need `state_dict_to_variables`).
  """
  stats = next((k for k in state_dict if k.rsplit(".", 1)[-1] in _STATS), None)
  if stats is not None:
    raise ConversionError(f"{stats!r} is a BatchNorm statistic: convert a convolution-backbone "
                          "model with state_dict_to_variables")
  return state_dict_to_variables(state_dict, {"params": template})["params"]


def params_to_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Inverse mapping (Flax params -> torch names and layouts); handy for export and tests."""
  return variables_to_state_dict({"params": params})


def variables_to_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Inverse of `state_dict_to_variables` ("params" and "batch_stats"; no derived buffers)."""
  out = {}
  for col in ("params", "batch_stats"):
    for path, value in _flatten(variables.get(col, {})).items():
      value = np.asarray(value)
      if path[-1] == "kernel":
        value = value.T if value.ndim == 2 else value.transpose(3, 2, 0, 1)
      out[_torch_name(path, col)] = value
  return out


# Module lists of the original (`nn.ModuleList` attributes): `name_i` <-> `name.i`.
_LISTS = ("blocks", "block", "swint_blocks", "quantizers", "vqs", "down_projs", "up_projs")
_TORCH_LEAF = {"params": {"kernel": "weight", "scale": "weight", "embedding": "weight", "negative_slope": "weight"},
               "batch_stats": {v: k for k, v in _STATS.items()}}


def _torch_name(path: tuple[str, ...], collection: str = "params") -> str:
  parts = []
  for p in path[:-1]:
    m = re.fullmatch(r"(.*)_(\d+)", p)
    parts.extend([m.group(1), m.group(2)] if m and m.group(1) in _LISTS else [p])
  leaf = path[-1]
  parts.append(_TORCH_LEAF[collection].get(leaf, leaf))
  return ".".join(parts)


# ---- the adversarial discriminator (esc_jax.discriminator) ----
# Every `weight_norm` conv of the original has `weight_g` (out, 1, 1, 1),
# `weight_v` (out, in, kh, kw) and `bias` (out,); the Flax params keep the names
# with 4-D arrays in HWIO layout (transpose (2, 3, 1, 0)), bias unchanged.

def _convert_disc_leaf(key, leaf, module, value):
  if leaf in ("weight_g", "weight_v"):
    if value.ndim != 4:
      raise ConversionError(f"{key}: expected a 4-D conv tensor, got shape {value.shape}")
    return leaf, value.transpose(2, 3, 1, 0)
  if leaf == "bias":
    return leaf, value
  raise ConversionError(f"unexpected key {key!r}: discriminator convs have weight_g, weight_v, bias")


# `torch.nn.utils.parametrizations.weight_norm` (newer PyTorch) names g and v this way.
_DISC_ALIASES = ((re.compile(r"\.parametrizations\.weight\.original0$"), ".weight_g"),
                 (re.compile(r"\.parametrizations\.weight\.original1$"), ".weight_v"))


def _disc_canonical_key(key: str) -> str:
  for pat, rep in _DISC_ALIASES:
    key = pat.sub(rep, key)
  return key


def discriminator_torch_name(path: tuple[str, ...]) -> str:
  """('discriminators_5', 'band_convs_2_4_0', 'weight_v') -> 'discriminators.5.band_convs.2.4.0.weight_v'."""
  parts = []
  for p in path:
    m = re.fullmatch(r"(.*?)((?:_\d+)+)", p)
    parts.extend([m.group(1), *m.group(2)[1:].split("_")] if m else [p])
  return ".".join(parts)


def discriminator_state_dict_to_params(state_dict: Mapping[str, np.ndarray],
                                       template: Mapping[str, Any]) -> dict:
  """Map the original's discriminator state dict (`model_disc_state_dict`) onto Flax params.

  Args:
    state_dict: torch name (`discriminators.{i}.convs.{j}.0.weight_v`, ...; the
      `parametrizations.weight.original0/1` names of newer PyTorch also work) -> array.
    template: the `Discriminator`'s params (structure and shapes only).
  Returns: a new params tree of float32 numpy arrays.
  Raises: ConversionError for a missing, unexpected, duplicated or mis-shaped key.
  """
  def locate(key, value):
    path = flax_path(_disc_canonical_key(key))
    module = _subtree(template, path[:-1])
    if module is None:
      raise ConversionError(f"unexpected key {key!r}: the model has no module {'/'.join(path[:-1])}")
    leaf, arr = _convert_disc_leaf(key, path[-1], module, value)
    return ("params",) + path[:-1] + (leaf,), arr

  return _map_strict(state_dict, {"params": template}, locate,
                     torch_name=lambda p: discriminator_torch_name(p[1:]))["params"]


def discriminator_params_to_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Inverse of `discriminator_state_dict_to_params` (torch names and layouts)."""
  out = {}
  for path, value in _flatten(params).items():
    value = np.asarray(value)
    out[discriminator_torch_name(path)] = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value
  return out


def _subtree(tree, path):
  for p in path:
    if not isinstance(tree, Mapping) or p not in tree:
      return None
    tree = tree[p]
  return tree if isinstance(tree, Mapping) else None


def _flatten(tree, prefix=()):
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _unflatten(flat):
  out: dict = {}
  for path, v in flat.items():
    d = out
    for p in path[:-1]:
      d = d.setdefault(p, {})
    d[path[-1]] = v
  return out


# ---- released checkpoints -> codec directories ----

def read_model_config(path) -> tuple[dict, str]:
  """A release's config.yaml (`model:` + `model_name`) or a bare JSON/YAML mapping of
  the constructor keywords. Returns (model kwargs, model_name)."""
  import yaml  # JSON is YAML, so one parser serves both

  try:
    cfg = yaml.safe_load(pathlib.Path(path).read_text())
  except FileNotFoundError:
    raise ConversionError(f"config file not found: {path}") from None
  except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
    raise ConversionError(f"{path}: unreadable config ({type(e).__name__})") from None
  if not isinstance(cfg, Mapping):
    raise ConversionError(f"{path}: config must be a mapping of model keywords")
  if isinstance(cfg.get("model"), Mapping):
    return dict(cfg["model"]), str(cfg.get("model_name", "csvq+swinT"))
  return dict(cfg), "csvq+swinT"


def unwrap_state_dict(obj, where: str) -> dict:
  """`{"model_state_dict": sd}` or a bare state dict -> {name: array}."""
  if isinstance(obj, Mapping) and isinstance(obj.get("model_state_dict"), Mapping):
    obj = obj["model_state_dict"]
  if not isinstance(obj, Mapping) or not obj:
    raise ConversionError(f"{where}: not a state dict (expected a mapping of parameter names to tensors)")
  bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, np.ndarray)]
  if bad:
    raise ConversionError(f"{where}: not a state dict (entry {bad[0]!r} is not a named tensor)")
  return dict(obj)


def sha256_file(path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def convert_checkpoint(checkpoint, output, config=None, overwrite: bool = False):
  """Convert a released `model.pth` (+ config) into a codec directory for `esc_jax.load`.

  Args:
    checkpoint: path of the `.pth` file (read without torch, restricted unpickler).
    output: codec directory to create (written to a temp dir, renamed when complete).
    config: release `config.yaml` or JSON/YAML keywords; default `config.yaml` beside
      the checkpoint.
    overwrite: replace an existing `output`.
  Returns: (output path, number of parameters; BatchNorm statistics not counted).
  """
  from esc_jax.checkpoint import model_template, save_codec
  from esc_jax.codec import make_model
  from esc_jax.torch_pickle import load_pth

  checkpoint = pathlib.Path(checkpoint)
  output = pathlib.Path(output)
  if output.exists() and not overwrite:
    raise ConversionError(f"output {output} already exists (use --overwrite to replace it)")
  if config is None:
    config = checkpoint.parent / "config.yaml"
    if not config.is_file():
      raise ConversionError(f"no --config given and no config.yaml beside {checkpoint}")
  model_cfg, model_name = read_model_config(config)
  try:
    model = make_model(model_cfg, model_name)
    template = model_template(model)
  except (TypeError, ValueError) as e:
    raise ConversionError(f"{config}: invalid model config ({e})") from None
  state_dict = unwrap_state_dict(load_pth(checkpoint), str(checkpoint))
  try:
    variables = state_dict_to_variables(state_dict, template)
  except ConversionError as e:
    raise ConversionError(f"{checkpoint} does not fit the model of {config}: {e}") from None
  extra = {"source": {"checkpoint": checkpoint.name, "sha256": sha256_file(checkpoint),
                      "config": pathlib.Path(config).name}}
  save_codec(output, variables, model_cfg, model_name, extra=extra, overwrite=overwrite)
  return output, sum(int(v.size) for v in _flatten(variables["params"]).values())
