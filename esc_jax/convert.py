"""PyTorch state_dict -> Flax params: a mechanical, strict name mapping.

Torch key `a.b.3.c.weight` names the Flax module path `a/b_3/c`; the leaf
depends on the Flax module found there: `kernel` (Linear weights transposed,
Conv2d (out, in, kh, kw) -> (kh, kw, in, out)), `scale` (LayerNorm) or
`embedding` (nn.Embedding). Both key layouts of the released checkpoints are
accepted (first release: `pre_swin`/`post_swin`, `vqs.{m}.proj_down`/`proj_up`).
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
    for name in ("scale", "embedding"):
      if name in module:
        return name, value
    raise ConversionError(f"{key}: no Flax weight at {'/'.join(flax_path(key)[:-1])}")
  return leaf, value


def state_dict_to_params(state_dict: Mapping[str, np.ndarray], template: Mapping[str, Any]) -> dict:
  """Map a torch state dict onto a Flax params tree of the same model.

  Args:
    state_dict: torch name -> array (either release layout; buffers ignored).
    template: the model's params (e.g. from `init` or `jax.eval_shape`); only
      its structure and shapes are used.
  Returns: a new params tree of float32 numpy arrays.
  Raises: ConversionError for a missing, unexpected, duplicated or mis-shaped key.
  """
  return _map_strict(state_dict, template, _convert_leaf, skip=is_derived, rename=canonical_key)


def _map_strict(state_dict, template, convert_leaf, skip=lambda key: False, rename=lambda key: key,
                torch_name=None) -> dict:
  """The strict mapping loop: every template leaf filled exactly once with its shape.

  `convert_leaf(key, leaf, module, value)` returns (Flax leaf name, array in Flax layout).
  """
  torch_name = torch_name or _torch_name
  flat_template = _flatten(template)
  filled: dict[tuple[str, ...], np.ndarray] = {}
  source: dict[tuple[str, ...], str] = {}
  for key, value in state_dict.items():
    if skip(key):
      continue
    path = flax_path(rename(key))
    module = _subtree(template, path[:-1])
    if module is None:
      raise ConversionError(f"unexpected key {key!r}: the model has no module {'/'.join(path[:-1])}")
    leaf, arr = convert_leaf(key, path[-1], module, np.asarray(value))
    full = path[:-1] + (leaf,)
    if full not in flat_template:
      raise ConversionError(f"unexpected key {key!r}: the model has no parameter {'/'.join(full)}")
    if full in filled:
      raise ConversionError(f"key {key!r} fills {'/'.join(full)} already filled by {source[full]!r}")
    want = tuple(flat_template[full].shape)
    if tuple(arr.shape) != want:
      raise ConversionError(f"shape mismatch for {key!r}: checkpoint {tuple(np.shape(value))} "
                            f"(as {tuple(arr.shape)} in Flax layout) vs model {want} at {'/'.join(full)}")
    filled[full] = np.ascontiguousarray(arr, dtype=np.float32)
    source[full] = key
  missing = [p for p in flat_template if p not in filled]
  if missing:
    raise ConversionError(f"missing key(s) in checkpoint: {', '.join(torch_name(p) for p in missing[:5])}"
                          + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
  return _unflatten(filled)


def params_to_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Inverse mapping (Flax params -> torch names and layouts); handy for export and tests."""
  out = {}
  for path, value in _flatten(params).items():
    value = np.asarray(value)
    leaf = path[-1]
    if leaf == "kernel":
      value = value.T if value.ndim == 2 else value.transpose(3, 2, 0, 1)
    out[_torch_name(path)] = value
  return out


# Module lists of the original (`nn.ModuleList` attributes): `name_i` <-> `name.i`.
_LISTS = ("blocks", "swint_blocks", "quantizers", "vqs", "down_projs", "up_projs")


def _torch_name(path: tuple[str, ...]) -> str:
  parts = []
  for p in path[:-1]:
    m = re.fullmatch(r"(.*)_(\d+)", p)
    parts.extend([m.group(1), m.group(2)] if m and m.group(1) in _LISTS else [p])
  leaf = path[-1]
  parts.append({"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf))
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
  return _map_strict(state_dict, template, _convert_disc_leaf, rename=_disc_canonical_key,
                     torch_name=discriminator_torch_name)


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
  Returns: (output path, number of parameters).
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
    template = model_template(model)["params"]
  except (TypeError, ValueError) as e:
    raise ConversionError(f"{config}: invalid model config ({e})") from None
  state_dict = unwrap_state_dict(load_pth(checkpoint), str(checkpoint))
  try:
    params = state_dict_to_params(state_dict, template)
  except ConversionError as e:
    raise ConversionError(f"{checkpoint} does not fit the model of {config}: {e}") from None
  extra = {"source": {"checkpoint": checkpoint.name, "sha256": sha256_file(checkpoint),
                      "config": pathlib.Path(config).name}}
  save_codec(output, params, model_cfg, model_name, extra=extra, overwrite=overwrite)
  return output, sum(int(v.size) for v in _flatten(params).values())
