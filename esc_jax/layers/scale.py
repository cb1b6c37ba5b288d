"""Scaling layers: patch (de-)embedding and frequency merge/split by 2.

Layouts are NHWC: (B, F, T, 2) spectra and (B, H, W, C) token maps.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from esc_jax.layers.common import Conv2d, LayerNorm, Linear


def pixel_shuffle(x, factor: tuple[int, int]):
  """(B, H, W, s1*s2*C) -> (B, H*s1, W*s2, C); channel (i*s2 + j)*C + c -> (s1*h+i, s2*w+j, c)."""
  s1, s2 = factor
  b, h, w, c = x.shape
  x = x.reshape(b, h, w, s1, s2, c // (s1 * s2)).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * s1, w * s2, c // (s1 * s2))


def pixel_unshuffle(x, factor: tuple[int, int]):
  """Inverse of `pixel_shuffle`: (B, H, W, C) -> (B, H/s1, W/s2, s1*s2*C)."""
  s1, s2 = factor
  b, h, w, c = x.shape
  x = x.reshape(b, h // s1, s1, w // s2, s2, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // s1, w // s2, s1 * s2 * c)


class PatchEmbed(nn.Module):
  """Conv2d(in_chans -> embed_dim, kernel = stride = patch) then LayerNorm.

  (B, F, T, in_chans) -> (B, F//p0, T//p1, embed_dim); a trailing odd frame is dropped.
  """
  in_chans: int
  embed_dim: int
  patch_size: tuple[int, int] = (3, 2)
  norm: bool = True  # False for the convolution backbone
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    p = tuple(self.patch_size)
    x = Conv2d(self.embed_dim, self.in_chans, p, stride=p, dtype=self.dtype, name="proj")(x)
    return LayerNorm(name="norm")(x) if self.norm else x


class PatchDeEmbed(nn.Module):
  """Conv2d(k5) to patch-area channels, pixel shuffle, Conv2d(k3) to in_chans.

  (B, H, W, embed_dim) -> (B, H*p0, W*p1, in_chans).
  """
  in_chans: int
  embed_dim: int
  patch_size: tuple[int, int] = (3, 2)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    p0, p1 = self.patch_size
    c = self.embed_dim
    x = Conv2d(c * p0 * p1, c, (5, 5), padding=((2, 2), (2, 2)), dtype=self.dtype, name="de_proj1")(x)
    x = pixel_shuffle(x, (p0, p1))
    return Conv2d(self.in_chans, c, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                  name="de_proj2")(x)


class PatchMerge(nn.Module):
  """Merge row pairs (2h, 2h+1) on the channel axis: pad H to even, LN(2C), Linear(2C -> out).

  (B, H, W, C) -> (B, ceil(H/2), W, out_dim).
  """
  in_dim: int
  out_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if x.shape[1] % 2:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0)))
    x = LayerNorm(name="norm")(pixel_unshuffle(x, (2, 1))).astype(self.dtype)
    return Linear(self.out_dim, 2 * self.in_dim, use_bias=False, dtype=self.dtype, name="down")(x)


class PatchSplit(nn.Module):
  """LN(C), Linear(C -> 2*out), channels [:out] to row 2h and [out:] to row 2h+1.

  (B, H, W, C) -> (B, 2H, W, out_dim).
  """
  in_dim: int
  out_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = LayerNorm(name="norm")(x).astype(self.dtype)
    x = Linear(2 * self.out_dim, self.in_dim, use_bias=False, dtype=self.dtype, name="up")(x)
    return pixel_shuffle(x, (2, 1))
