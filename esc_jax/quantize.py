"""Vector quantisation: L2-normalised codebooks, ESC's product VQ and the
product residual VQ of the `rvq+*` ablation codecs.

A product VQ quantises a (B, H, W, C) map as W/overlap vectors of
overlap*C*H features (channel-major, `c*H + h`), split into `num_vqs`
contiguous groups, each down-projected, looked up in its own codebook and
projected back up. The product residual VQ splits the same vectors into
groups, and quantises each group's down-projection with a residual stack of
codebooks (one per stream).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from esc_jax.layers.common import Linear

_HIGHEST = jax.lax.Precision.HIGHEST


def normalize(x, eps: float = 1e-12):
  """`torch.nn.functional.normalize(x, dim=-1)`: x / max(||x||_2, eps)."""
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


def split_dimension(total: int, num: int) -> list[int]:
  """Group sizes of a product VQ: equal, the last takes the remainder."""
  dims = [total // num] * (num - 1)
  return dims + [total - sum(dims)]


def to_vectors(x, overlap: int):
  """(B, H, W, C) -> (B, W/overlap, overlap*C*H), features channel-major, frame 2t first."""
  b, h, w, c = x.shape
  if w % overlap:
    raise ValueError(f"time patches W={w} must be a multiple of overlap={overlap}")
  x = x.transpose(0, 2, 3, 1).reshape(b, w, c * h)
  return x.reshape(b, w // overlap, overlap * c * h)


def from_vectors(z, h: int, c: int, overlap: int):
  """Inverse of `to_vectors`: (B, W/overlap, overlap*C*H) -> (B, H, W, C)."""
  b, t, _ = z.shape
  z = z.reshape(b, t * overlap, c, h)
  return z.transpose(0, 3, 1, 2)


def _mse(a, b):
  """Per-item mean squared error over all but the batch axis."""
  return jnp.mean(jnp.square(a - b), axis=tuple(range(1, a.ndim)))


class Codebook(nn.Module):
  """`num_embeddings` x `dim` codebook with (optionally L2-normalised) nearest lookup."""
  dim: int
  num_embeddings: int
  l2norm: bool = True

  def setup(self):
    # torch: nn.init.kaiming_normal_ on the (num_embeddings, dim) weight -> std sqrt(2/dim).
    self.embedding = nn.Embed(self.num_embeddings, self.dim, param_dtype=jnp.float32,
                              embedding_init=nn.initializers.variance_scaling(2.0, "fan_in", "normal",
                                                                              in_axis=1, out_axis=0))

  def encode(self, z):
    """(B, T, dim) -> int32 codes (B, T): argmin of |z|^2 - 2 z.c + |c|^2, first on ties."""
    cb = self.embedding.embedding
    z = z.astype(jnp.float32)
    if self.l2norm:
      cb, z = normalize(cb), normalize(z)
    dist = (jnp.sum(z * z, -1, keepdims=True)
            - 2.0 * jnp.einsum("btd,kd->btk", z, cb, precision=_HIGHEST)
            + jnp.sum(cb * cb, -1)[None, None])
    return jnp.argmin(dist, axis=-1).astype(jnp.int32)

  def decode(self, code):
    """(B, T) codes -> (B, T, dim) un-normalised codebook rows."""
    return jnp.take(self.embedding.embedding, code, axis=0)

  def __call__(self, z, train: bool = False):
    """Quantise z (B, T, dim). Returns (z_q, code, cm_loss (B,), cb_loss (B,)).

    In training z_q uses the straight-through estimator and cm/cb losses stop
    gradients on opposite sides; in eval both losses are mse(z_q, z).
    """
    code = self.encode(z)
    z_q = self.decode(code)
    if train:
      cm = _mse(jax.lax.stop_gradient(z_q), z)
      cb = _mse(z_q, jax.lax.stop_gradient(z))
      z_q = z + jax.lax.stop_gradient(z_q - z)
    else:
      cm = cb = _mse(z_q, z)
    return z_q, code, cm, cb


def check_map(x, in_freq: int, in_dim: int) -> None:
  """ValueError unless x is a (B, in_freq, W, in_dim) map."""
  if x.shape[1] != in_freq or x.shape[3] != in_dim:
    raise ValueError(f"quantizer expects (B, {in_freq}, W, {in_dim}), got {x.shape}")


def split_groups(z, dims):
  """(..., sum(dims)) -> the product groups [(..., dims[0]), (..., dims[1]), ...]."""
  bounds = np.cumsum([0, *dims])
  return [z[..., a:b] for a, b in zip(bounds[:-1], bounds[1:])]


class ProductVQ(nn.Module):
  """ESC's ProductVectorQuantize on (B, H, W, C) maps with H = in_freq, C = in_dim."""
  in_dim: int
  in_freq: int
  overlap: int = 2
  num_vqs: int = 3
  codebook_dim: int = 8
  codebook_size: int = 1024
  l2norm: bool = True

  def setup(self):
    self.vq_dims = split_dimension(self.overlap * self.in_freq * self.in_dim, self.num_vqs)
    self.vqs = [Codebook(self.codebook_dim, self.codebook_size, self.l2norm) for _ in self.vq_dims]
    self.down_projs = [Linear(self.codebook_dim, d, use_bias=False) for d in self.vq_dims]
    self.up_projs = [Linear(d, self.codebook_dim, use_bias=False) for d in self.vq_dims]

  def _groups(self, z):
    return split_groups(z, self.vq_dims)

  def _check(self, x):
    check_map(x, self.in_freq, self.in_dim)

  def __call__(self, x, train: bool = False, freeze=False):
    """Quantise x (B, H, W, C).

    freeze: (traced) bool; pre-training bypass: each group's output is
      up_proj(down_proj(z)) and both losses are 0 (codes are still computed).
    Returns dict z_q (B, H, W, C), codes (B, num_vqs, W/overlap) int32,
      cm_loss, cb_loss (B,) averaged over groups.
    """
    self._check(x)
    z = to_vectors(x, self.overlap)
    outs, codes, cm, cb = [], [], 0.0, 0.0
    for z_m, down, up, vq in zip(self._groups(z), self.down_projs, self.up_projs, self.vqs):
      z_e = down(z_m)
      z_q, code, cm_m, cb_m = vq(z_e, train)
      if train:
        keep = 1.0 - jnp.asarray(freeze, jnp.float32)
        z_q = jnp.where(freeze, z_e, z_q)
        cm_m, cb_m = cm_m * keep, cb_m * keep
      outs.append(up(z_q))
      codes.append(code)
      cm, cb = cm + cm_m, cb + cb_m
    z_q = from_vectors(jnp.concatenate(outs, -1), self.in_freq, self.in_dim, self.overlap)
    return dict(z_q=z_q, codes=jnp.stack(codes, 1), cm_loss=cm / self.num_vqs,
                cb_loss=cb / self.num_vqs)

  def encode(self, x):
    """(B, H, W, C) -> int32 codes (B, num_vqs, W/overlap)."""
    self._check(x)
    z = to_vectors(x, self.overlap)
    return jnp.stack([vq.encode(down(z_m)) for z_m, down, vq in
                      zip(self._groups(z), self.down_projs, self.vqs)], 1)

  def decode(self, codes):
    """int codes (B, num_vqs, T') -> (B, H, 2T', C)."""
    z = jnp.concatenate([up(vq.decode(codes[:, m])) for m, (up, vq) in
                         enumerate(zip(self.up_projs, self.vqs))], -1)
    return from_vectors(z, self.in_freq, self.in_dim, self.overlap)


class ResidualVQ(nn.Module):
  """The original's `ResidualVectorQuantize` (one product group of `ProductResidualVQ`).

  Projects (B, T, hidden_dim) down to codebook_dim once (unless equal), then
  codebook i quantises what codebooks 0..i-1 left over.
  """
  hidden_dim: int
  num_vqs: int = 6  # residual depth = number of streams
  codebook_dim: int = 8
  codebook_size: int = 1024
  l2norm: bool = True

  def setup(self):
    if self.hidden_dim != self.codebook_dim:
      self.proj_down = Linear(self.codebook_dim, self.hidden_dim, use_bias=False)
      self.proj_up = Linear(self.hidden_dim, self.codebook_dim, use_bias=False)
    self.vqs = [Codebook(self.codebook_dim, self.codebook_size, self.l2norm) for _ in range(self.num_vqs)]

  def down(self, z):
    return self.proj_down(z) if self.hidden_dim != self.codebook_dim else z

  def up(self, z):
    return self.proj_up(z) if self.hidden_dim != self.codebook_dim else z

  def __call__(self, z, num_streams, train: bool = False):
    """Residual quantisation of the down-projected z (B, T, codebook_dim).

    Eval with a Python int: codebooks >= num_streams are skipped. Otherwise
    (training, or a traced num_streams) all run, and the quantised residuals
    and losses of codebooks >= num_streams are multiplied by 0 (equal values),
    their codes still emitted.
    Returns (z_q (B, T, codebook_dim), codes (B, depth, T), cm (B,), cb (B,)),
    losses summed over the codebooks.
    """
    static = isinstance(num_streams, int)
    z_q, codes, cm, cb = 0.0, [], 0.0, 0.0
    residual = z
    for i, vq in enumerate(self.vqs):
      if static and not train and i >= num_streams:
        break
      z_q_i, code, cm_i, cb_i = vq(residual, train)
      residual = residual - z_q_i  # with the straight-through z_q_i, as in the original
      if train or not static:
        on = jnp.asarray(i < num_streams, jnp.float32)
        z_q_i, cm_i, cb_i = z_q_i * on, cm_i * on, cb_i * on
      z_q = z_q + z_q_i
      codes.append(code)
      cm, cb = cm + cm_i, cb + cb_i
    return z_q, jnp.stack(codes, 1), cm, cb

  def encode(self, z, num_streams: int):
    """Down-projected z (B, T, codebook_dim) -> int32 codes (B, num_streams, T)."""
    codes, residual = [], z
    for vq in self.vqs[:num_streams]:
      codes.append(vq.encode(residual))
      residual = residual - vq.decode(codes[-1])
    return jnp.stack(codes, 1)

  def decode(self, codes, num_streams=None):
    """codes (B, s, T) -> sum of the first s codebook rows (B, T, codebook_dim).

    num_streams: None (s = all given), or a traced int: rows of codes >= it are
    left out through `jnp.where`, with values equal to the Python-int path.
    """
    z_q = 0.0
    for i in range(codes.shape[1]):
      z_i = z_q + self.vqs[i].decode(codes[:, i])
      z_q = z_i if num_streams is None else jnp.where(i < num_streams, z_i, z_q)
    return z_q


class ProductResidualVQ(nn.Module):
  """The original's `ProductResidualVectorQuantize` on (B, H, W, C) maps (H = in_freq, C = in_dim).

  Codes are (B, streams, num_pvqs, W/overlap): residual depth on axis 1.
  """
  in_dim: int
  in_freq: int
  overlap: int = 2
  num_pvqs: int = 3
  num_rvqs: int = 6
  codebook_dim: int = 8
  codebook_size: int = 1024
  l2norm: bool = True

  def setup(self):
    self.vq_dims = split_dimension(self.overlap * self.in_freq * self.in_dim, self.num_pvqs)
    self.vqs = [ResidualVQ(d, self.num_rvqs, self.codebook_dim, self.codebook_size, self.l2norm)
                for d in self.vq_dims]

  def _groups(self, x):
    check_map(x, self.in_freq, self.in_dim)
    return split_groups(to_vectors(x, self.overlap), self.vq_dims)

  def _map(self, parts):
    return from_vectors(jnp.concatenate(parts, -1), self.in_freq, self.in_dim, self.overlap)

  def __call__(self, x, num_streams, train: bool = False, freeze=False):
    """Quantise x (B, H, W, C) with `num_streams` residual codebooks per group.

    freeze: (traced) bool, train only; pre-training bypass: each group's output
      is up(down(z)) and both losses are 0 (codes are still computed).
    Returns dict z_q (B, H, W, C), codes (B, depth, num_pvqs, W/overlap) int32 with
      depth = num_rvqs in training and num_streams in eval, cm_loss, cb_loss (B,)
      averaged over groups.
    """
    outs, codes, cm, cb = [], [], 0.0, 0.0
    for z_m, rvq in zip(self._groups(x), self.vqs):
      z_e = rvq.down(z_m)
      z_q, code, cm_m, cb_m = rvq(z_e, num_streams, train)
      if train:
        keep = 1.0 - jnp.asarray(freeze, jnp.float32)
        z_q = jnp.where(freeze, z_e, z_q)
        cm_m, cb_m = cm_m * keep, cb_m * keep
      outs.append(rvq.up(z_q))
      codes.append(code)
      cm, cb = cm + cm_m, cb + cb_m
    return dict(z_q=self._map(outs), codes=jnp.stack(codes, 2), cm_loss=cm / self.num_pvqs,
                cb_loss=cb / self.num_pvqs)

  def encode(self, x, num_streams: int):
    """(B, H, W, C) -> int32 codes (B, num_streams, num_pvqs, W/overlap)."""
    return jnp.stack([rvq.encode(rvq.down(z_m), num_streams)
                      for z_m, rvq in zip(self._groups(x), self.vqs)], 2)

  def decode(self, codes, num_streams=None):
    """int codes (B, s, num_pvqs, T') -> (B, H, 2T', C); num_streams: see `ResidualVQ.decode`."""
    return self._map([rvq.up(rvq.decode(codes[:, :, m], num_streams)) for m, rvq in enumerate(self.vqs)])
