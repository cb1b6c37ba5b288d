"""Shifted-window attention (Swin) as ESC uses it.

Feature maps are (B, H, W, C) with H the frequency and W the time axis; the
PyTorch original flattens them to (B, H*W, C) row-major, which is a free
reshape of this layout. Masks and relative-position indices are numpy
constants built at trace time, so nothing about them is recomputed per step.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from esc_jax.layers.common import LayerNorm, Linear, gelu
from esc_jax.layers.scale import PatchMerge, PatchSplit


@functools.lru_cache(maxsize=None)
def relative_position_index(window: int) -> np.ndarray:
  """Swin's (w*w, w*w) index into the ((2w-1)^2, heads) bias table."""
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij"))
  flat = coords.reshape(2, -1)
  rel = (flat[:, :, None] - flat[:, None, :]).transpose(1, 2, 0) + (window - 1)
  return (rel[..., 0] * (2 * window - 1) + rel[..., 1]).astype(np.int32)


@functools.lru_cache(maxsize=None)
def shift_mask(hp: int, wp: int, window: int, shift: int) -> np.ndarray:
  """(nW, w*w, w*w) additive mask (0 / -100) of the shifted block on the padded grid.

  Regions use Swin's slices (0:-w), (-w:-shift), (-shift:) along each axis.
  """
  img = np.zeros((hp, wp), np.float32)
  bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
  cnt = 0
  for hs in bounds:
    for ws in bounds:
      img[hs, ws] = cnt
      cnt += 1
  win = window_partition(img[None, :, :, None], window).reshape(-1, window * window)
  diff = win[:, None, :] - win[:, :, None]
  return np.where(diff != 0, -100.0, 0.0).astype(np.float32)


def window_partition(x, window: int):
  """(B, Hp, Wp, C) -> (B, nW, w*w, C) with windows in row-major order."""
  b, hp, wp, c = x.shape
  x = x.reshape(b, hp // window, window, wp // window, window, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (hp // window) * (wp // window), window * window, c)


def window_reverse(x, window: int, hp: int, wp: int):
  """(B, nW, w*w, C) -> (B, Hp, Wp, C); inverse of `window_partition`."""
  b, _, _, c = x.shape
  x = x.reshape(b, hp // window, wp // window, window, window, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)


class WindowAttention(nn.Module):
  """Multi-head self-attention inside w x w windows with relative position bias.

  Split in two so the per-token projections skip the window padding: `qkv`
  maps real tokens (its bias is added after padding, so padded tokens get
  exactly the bias, as zero vectors would), `attend` mixes tokens within
  windows, and `proj` runs after the padding is cropped again.
  """
  dim: int
  num_heads: int
  window: int = 4
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    c = self.dim
    self.relative_position_bias_table = self.param(
        "relative_position_bias_table", nn.initializers.truncated_normal(0.02),
        ((2 * self.window - 1) ** 2, self.num_heads), jnp.float32)
    self.qkv = Linear(3 * c, c, dtype=self.dtype)
    self.proj = Linear(c, c, dtype=self.dtype)

  def qkv_unbiased(self, x):
    """(..., C) -> (..., 3C) without the bias (added by `attend`)."""
    return self.qkv.matmul(x)

  def attend(self, qkv, mask=None):
    """qkv: (B, nW, N, 3C) unbiased projections; mask: (nW, N, N) or None -> (B, nW, N, C)."""
    b, nw, n, _ = qkv.shape
    c, h = self.dim, self.num_heads
    qkv = self.qkv.add_bias(qkv)
    qkv = qkv.reshape(b, nw, n, 3, h, c // h).transpose(3, 0, 1, 4, 2, 5)  # (3, B, nW, h, N, d)
    q, k, v = qkv[0] * ((c // h) ** -0.5), qkv[1], qkv[2]
    logits = (q @ k.swapaxes(-1, -2)).astype(jnp.float32)  # (B, nW, h, N, N)
    bias = self.relative_position_bias_table[relative_position_index(self.window).reshape(-1)]
    logits = logits + bias.reshape(n, n, h).transpose(2, 0, 1)
    if mask is not None:
      logits = logits + mask[:, None]
    attn = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    return (attn @ v).transpose(0, 1, 3, 2, 4).reshape(b, nw, n, c)


class FeedForward(nn.Module):
  """Linear -> exact GELU -> Linear."""
  dim: int
  hidden: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = gelu(Linear(self.hidden, self.dim, dtype=self.dtype, name="linear_1")(x))
    return Linear(self.dim, self.hidden, dtype=self.dtype, name="linear_2")(x)


class SwinBlock(nn.Module):
  """(Shifted) window attention block with pre-norm residuals.

  Zero padding to multiples of the window happens after `norm1`; in unshifted
  blocks the padded tokens are not masked (they attend as zero vectors).
  """
  dim: int
  num_heads: int
  window: int = 4
  shift: int = 0
  mlp_ratio: float = 4.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x: (B, H, W, C) -> (B, H, W, C)."""
    b, h, w, c = x.shape
    ws = self.window
    hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
    attn = WindowAttention(c, self.num_heads, ws, self.dtype, name="attn")
    y = attn.qkv_unbiased(LayerNorm(name="norm1")(x))
    y = jnp.pad(y, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))  # padded tokens: zero after norm1
    mask = None
    if self.shift > 0:
      y = jnp.roll(y, (-self.shift, -self.shift), axis=(1, 2))
      mask = jnp.asarray(shift_mask(hp, wp, ws, self.shift))
    y = window_reverse(attn.attend(window_partition(y, ws), mask), ws, hp, wp)
    if self.shift > 0:
      y = jnp.roll(y, (self.shift, self.shift), axis=(1, 2))
    x = x + attn.proj(y[:, :h, :w]).astype(x.dtype)
    y = FeedForward(c, int(c * self.mlp_ratio), self.dtype, name="mlp")(
        LayerNorm(name="norm2")(x).astype(self.dtype))
    return x + y.astype(x.dtype)


class TransformerLayer(nn.Module):
  """`depth` Swin blocks (shift 0, w/2, 0, ...) then optional patch merge/split.

  scale: None, "down" (PatchMerge, H -> ceil(H/2)) or "up" (PatchSplit, H -> 2H).
  """
  in_dim: int
  out_dim: int
  num_heads: int
  depth: int = 2
  window: int = 4
  mlp_ratio: float = 4.0
  scale: str | None = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x: (B, H, W, in_dim) -> (B, H', W, out_dim)."""
    for i in range(self.depth):
      x = SwinBlock(self.in_dim, self.num_heads, self.window, 0 if i % 2 == 0 else self.window // 2,
                    self.mlp_ratio, self.dtype, name=f"swint_blocks_{i}")(x)
    if self.scale == "down":
      x = PatchMerge(self.in_dim, self.out_dim, self.dtype, name="subsample")(x)
    elif self.scale == "up":
      x = PatchSplit(self.in_dim, self.out_dim, self.dtype, name="subsample")(x)
    elif self.scale is not None:
      raise ValueError(f"scale must be None, 'down' or 'up', got {self.scale!r}")
    return x
