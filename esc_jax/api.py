"""The user-facing codec: `esc_jax.load(DIR)` -> `Codec` with numpy in, numpy out.

  codec = esc_jax.load("esc_base_jax")          # converted release or train.py workdir
  codes = codec.encode(audio_16k, num_streams=6)  # (B, 6, 3, T') int32, 9 kbps
  audio = codec.decode(codes, length=len(audio_16k))

Inputs of any length are zero-padded to the model's next valid length and
outputs trimmed back; for inputs of a valid length the results are exactly
those of the original model. Frame geometry and bitrates come from the model
(`esc_jax.codec`).
"""
from __future__ import annotations

import functools
import hashlib
import json
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from esc_jax import audio, bitstream
from esc_jax import checkpoint as ckpt
from esc_jax.codec import check_num_streams, make_model


@functools.lru_cache(maxsize=8)
def _compiled(model):
  """Jitted (encode, decode, round trip) of a model definition, shared by every Codec of
  that model."""
  encode = jax.jit(lambda v, x, s: model.apply(v, x, s, method="encode"), static_argnums=2)
  decode = jax.jit(lambda v, c: model.apply(v, c, method="decode"))
  round_trip = jax.jit(lambda v, x, s: model.apply(v, x, s, method="round_trip")[1], static_argnums=2)
  return encode, decode, round_trip


class Codec:
  """A loaded codec: `encode` audio to codes and `decode` codes to audio.

  Args:
    model: the Flax module (`esc_jax.make_model`).
    params: its params tree.
    config: the codec directory's esc_config.json content (optional).
    state: other variable collections (e.g. {"batch_stats": ...} of the
      convolution variants), or None.
  """

  sample_rate = audio.SAMPLE_RATE

  def __init__(self, model, params, config: Mapping[str, Any] | None = None,
               state: Mapping[str, Any] | None = None):
    self.model = model
    self.params = jax.tree_util.tree_map(jnp.asarray, params)
    self.state = {k: jax.tree_util.tree_map(jnp.asarray, v) for k, v in (state or {}).items()}
    self.config = dict(config or {})
    self._encode, self._decode, self._round_trip = _compiled(model)

  @property
  def variables(self) -> dict:
    """{"params": ..., **state}: what `model.apply` takes."""
    return {"params": self.params, **self.state}

  # ---- geometry and bitrate (the model's) ----
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
    return self.model.samples_per_frame

  def valid_length(self, n: int) -> int:
    return self.model.valid_length(n)

  def num_frames(self, n: int) -> int:
    return self.model.num_frames(n)

  def frames_to_samples(self, frames: int) -> int:
    """The valid length that `frames` code frames decode to."""
    return self.model.frames_to_samples(frames)

  def kbps(self, num_streams: int) -> float:
    return float(self.model.kbps(num_streams))

  def streams_for_kbps(self, kbps) -> int:
    """Number of streams of bitrate `kbps` (1.5 .. 9 for ESC); ValueError names the valid rates."""
    return bitstream.streams_for_kbps(kbps, self.model.kbps_per_stream, self.max_streams)

  @property
  def fingerprint(self) -> bytes:
    """8-byte digest of the model config and variables (identifies a codec in `.esc` files)."""
    if not hasattr(self, "_fingerprint"):
      h = hashlib.sha256(json.dumps(self.config.get("model", {}), sort_keys=True).encode())
      for leaf in jax.tree_util.tree_leaves(self.variables):
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

  def check_streams(self, num_streams) -> int:
    """num_streams as an int; ValueError unless it is an integer in 1..max_streams."""
    return check_num_streams(num_streams, self.max_streams)

  def encode(self, audio, num_streams: int = 6) -> np.ndarray:
    """(L,) or (B, L) audio at 16 kHz -> int32 codes (B, num_streams, group_size, T')."""
    num_streams = self.check_streams(num_streams)
    x, _ = self.pad(audio)
    return np.asarray(self._encode(self.variables, x, num_streams))

  def decode(self, codes, length: int | None = None) -> np.ndarray:
    """int codes (B, s, group_size, T') or (s, group_size, T') -> float32 audio (B, L).

    L = the valid length of T' frames, or `length` when given (trimmed; <= L).
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
    wav = np.asarray(self._decode(self.variables, c.astype(np.int32)))
    if length is not None:
      if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or not 0 < length <= wav.shape[1]:
        raise ValueError(f"length must be an integer in 1..{wav.shape[1]} (the decoded length), got {length!r}")
      wav = wav[:, :length]
    return wav

  def reconstruct(self, audio, num_streams: int = 6) -> np.ndarray:
    """encode then decode, trimmed to the input length: (B, L).

    One program (`round_trip`), bit-identical to `decode(encode(audio))`; for ESC
    ~20% faster, as the decoder states that encoding computes are not computed again.
    """
    num_streams = self.check_streams(num_streams)
    x, n = self.pad(audio)
    return np.asarray(self._round_trip(self.variables, x, num_streams))[:, :n]


def load(directory, step: int | str | None = None, dtype=jnp.float32) -> Codec:
  """Loads a codec directory written by `convert_torch_weights.py` or `train.py`.

  Args:
    directory: the codec directory (esc_jax/checkpoint.py describes the layout).
    step: checkpoint step; None = latest, "best" = best validation PESQ.
    dtype: compute dtype (float32 reproduces the original exactly).
  """
  cfg = ckpt.read_codec_config(directory)
  try:
    model = make_model(cfg["model"], cfg.get("model_name", "csvq+swinT"), dtype=dtype)
  except (TypeError, ValueError) as e:
    raise ckpt.CheckpointError(f"{directory}/{ckpt.CONFIG_FILE}: invalid model config ({e})") from None
  variables = ckpt.restore_variables(directory, model, step)
  params = variables.pop(ckpt.PARAMS_ITEM)
  return Codec(model, params, cfg, state=variables)
