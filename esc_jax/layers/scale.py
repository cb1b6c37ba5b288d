"""Scaling layers: patch (de-)embedding and frequency merge/split by 2.

Layouts are NHWC: (B, F, T, 2) spectra and (B, H, W, C) token maps.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


from esc_jax.layers.common import Conv2d, ConvParams, LayerNorm, LayerNormParams, Linear, conv2d, conv2d_same


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
  With norm=False (convolution backbone) the LayerNorm is skipped but its
  parameters exist, as in the original's checkpoints.
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
    if self.norm:
      return LayerNorm(name="norm")(x)
    LayerNormParams(self.embed_dim, name="norm")()
    return x


class PatchDeEmbed(nn.Module):
  """Conv2d(k5) to patch-area channels, pixel shuffle, Conv2d(k3) to in_chans.

  (B, H, W, embed_dim) -> (B, H*p0, W*p1, in_chans).

  The two convolutions have no nonlinearity between them, so (with `fused`)
  they are applied as one 7x7 convolution to p0*p1*in_chans channels followed by
  the pixel shuffle: the same linear map at ~1/11 of the FLOPs for ESC (the k5
  conv to 6C channels is the largest single op of the decoder). The composite
  differs from the original only where the k3 conv reads its zero padding (the
  outermost output rows and columns); those are recomputed with the original
  two-conv path on thin strips. `fused=False` runs the original path everywhere.
  """
  in_chans: int
  embed_dim: int
  patch_size: tuple[int, int] = (3, 2)
  dtype: jnp.dtype = jnp.float32
  fused: bool = True

  @nn.compact
  def __call__(self, x):
    p0, p1 = self.patch_size
    c = self.embed_dim
    k1, b1 = ConvParams(c * p0 * p1, c, (5, 5), name="de_proj1")()
    k2, b2 = ConvParams(self.in_chans, c, (3, 3), name="de_proj2")()
    x = x.astype(self.dtype)
    if not self.fused or x.shape[1] < 3 or x.shape[2] < 3:
      return self._reference(x, k1, b1, k2, b2)
    kc, bc = self._composite(k1, b1, k2, b2)
    y = pixel_shuffle(conv2d_same(x, kc, bc), (p0, p1))
    # Outermost output rows/columns read the k3 conv's zero padding: take them from
    # the original path on 3-patch strips (enough context for both convs).
    top = self._reference(x[:, :3], k1, b1, k2, b2)[:, :1]
    bot = self._reference(x[:, -3:], k1, b1, k2, b2)[:, -1:]
    lef = self._reference(x[:, :, :3], k1, b1, k2, b2)[:, :, :1]
    rig = self._reference(x[:, :, -3:], k1, b1, k2, b2)[:, :, -1:]
    y = y.at[:, :, :1].set(lef).at[:, :, -1:].set(rig)
    return y.at[:, :1].set(top).at[:, -1:].set(bot)

  def _reference(self, x, k1, b1, k2, b2):
    z = pixel_shuffle(conv2d(x, k1, b1, ((2, 2), (2, 2))), tuple(self.patch_size))
    return conv2d(z, k2, b2, ((1, 1), (1, 1)))

  def _composite(self, k1, b1, k2, b2):
    """7x7 kernel (7, 7, C, p0*p1*out) and bias of conv2(shuffle(conv1(.))) away from borders.

    Output channel ((i*p1 + j)*out + o) is fine pixel (p0*h + i, p1*w + j), channel o.
    Fine offset i + dy lands in coarse row h + a, sub-row i' (a = floor((i+dy)/p0)).
    """
    p0, p1 = self.patch_size
    c, out = self.embed_dim, self.in_chans
    # Every (sub-pixel, k3 tap) product in one dot: (p0*p1*25*c, c) @ (c, 9*out).
    k1 = k1.reshape(5, 5, c, p0 * p1, c).transpose(3, 0, 1, 2, 4)  # (sub-pixel, u, v, c_in, c_mid)
    w2 = k2.reshape(9, c, out).transpose(1, 0, 2).reshape(c, 9 * out)  # (c_mid, (tap, out))
    blocks = jnp.dot(k1.reshape(-1, c), w2).reshape(p0 * p1, 5, 5, c, 9, out)
    bias_blocks = jnp.dot(b1.reshape(p0 * p1, c), w2).reshape(p0 * p1, 9, out)
    kc = jnp.zeros((7, 7, c, p0, p1, out), jnp.float32)
    bc = jnp.zeros((p0, p1, out), jnp.float32) + b2
    for i in range(p0):
      for j in range(p1):
        for dy in (-1, 0, 1):
          a, si = divmod(i + dy, p0)
          for dx in (-1, 0, 1):
            b, sj = divmod(j + dx, p1)
            sub, tap = si * p1 + sj, (dy + 1) * 3 + dx + 1
            kc = kc.at[a + 1:a + 6, b + 1:b + 6, :, i, j].add(blocks[sub, :, :, :, tap])
            bc = bc.at[i, j].add(bias_blocks[sub, tap])
    return kc.reshape(7, 7, c, p0 * p1 * out), bc.reshape(-1)


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
