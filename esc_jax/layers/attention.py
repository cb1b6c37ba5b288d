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


def _to_windows(t, window: int, shift: int, hp: int, wp: int):
  """(B, H, W, K) -> (B, nW, w*w, K): zero-pad to (hp, wp), roll by -shift, partition."""
  _, h, w, _ = t.shape
  if (hp, wp) != (h, w):
    t = jnp.pad(t, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
  if shift:
    t = jnp.roll(t, (-shift, -shift), axis=(1, 2))
  return window_partition(t, window)


def _from_windows(t, window: int, shift: int, h: int, w: int):
  """Inverse of `_to_windows` (padding cropped): (B, nW, w*w, K) -> (B, H, W, K)."""
  hp, wp = -(-h // window) * window, -(-w // window) * window
  t = window_reverse(t, window, hp, wp)
  if shift:
    t = jnp.roll(t, (shift, shift), axis=(1, 2))
  return t[:, :h, :w]


def _split_heads(t, k: int, heads: int):
  """(B, nW, N, k*heads*d) -> (k, B, nW, heads, N, d)."""
  b, nw, n, c = t.shape
  return t.reshape(b, nw, n, k, heads, c // (k * heads)).transpose(3, 0, 1, 4, 2, 5)


def _merge_heads(t):
  """(K, B, nW, heads, N, d) -> (B, nW, N, K*heads*d)."""
  k, b, nw, heads, n, d = t.shape
  return t.transpose(1, 2, 4, 0, 3, 5).reshape(b, nw, n, k * heads * d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def window_attention(qkv, qkv_bias, pos_bias, heads: int, window: int, shift: int):
  """Multi-head self-attention in (shifted) w x w windows of a token map.

  qkv: (B, H, W, 3C) projections of the normed tokens, bias included; the
  zero-padded tokens (up to multiples of the window, bottom/right) project to
  `qkv_bias` (3C,) alone. pos_bias: (heads, N, N) relative position bias, N = w*w.
  shift > 0: windows of the map rolled by (-shift, -shift) with Swin's mask.
  Returns (B, H, W, C), the per-token attention output before the output projection.

  One custom op so that the backward pass moves data once per direction: the
  autodiff transposes of pad / roll / partition are chains of pads and adds.
  """
  return _window_attention_fwd(qkv, qkv_bias, pos_bias, heads, window, shift)[0]


def _window_attention_fwd(qkv, qkv_bias, pos_bias, heads, window, shift):
  _, h, w, c3 = qkv.shape
  hp, wp = -(-h // window) * window, -(-w // window) * window
  if (hp, wp) != (h, w):  # padded tokens are zero after norm1: their projections are the bias
    pad = np.ones((hp, wp, 1), np.float32)
    pad[:h, :w] = 0.0
    qkv = (jnp.pad(qkv, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
           + jnp.asarray(pad, qkv.dtype) * qkv_bias.astype(qkv.dtype))
  q, k, v = _split_heads(_to_windows(qkv, window, shift, hp, wp), 3, heads)
  q = q * ((c3 // 3 // heads) ** -0.5)
  logits = (q @ k.swapaxes(-1, -2)).astype(jnp.float32) + pos_bias  # (B, nW, heads, N, N)
  if shift:
    logits = logits + shift_mask(hp, wp, window, shift)[:, None]
  attn = jax.nn.softmax(logits, axis=-1).astype(qkv.dtype)
  out = _from_windows(_merge_heads((attn @ v)[None]), window, shift, h, w)
  return out, (q, k, v, attn)


def _window_attention_bwd(heads, window, shift, res, g):
  q, k, v, attn = res  # windowed (B, nW, heads, N, d); q scaled; attn (B, nW, heads, N, N)
  b, h, w, c = g.shape
  hp, wp = -(-h // window) * window, -(-w // window) * window
  (g,) = _split_heads(_to_windows(g.astype(q.dtype), window, shift, hp, wp), 1, heads)
  dv = attn.swapaxes(-1, -2) @ g
  da = (g @ v.swapaxes(-1, -2)).astype(jnp.float32)
  attn32 = attn.astype(jnp.float32)
  dlogits = attn32 * (da - jnp.sum(da * attn32, axis=-1, keepdims=True))  # softmax VJP
  dpos = jnp.sum(dlogits, axis=(0, 1))
  dlogits = dlogits.astype(q.dtype)
  dq = (dlogits @ k) * ((c // heads) ** -0.5)
  dk = dlogits.swapaxes(-1, -2) @ q
  dqkv = _merge_heads(jnp.stack([dq, dk, dv]))  # (B, nW, N, 3C)
  if (hp, wp) == (h, w):
    return _from_windows(dqkv, window, shift, h, w), jnp.zeros((3 * c,), q.dtype), dpos
  full = window_reverse(dqkv, window, hp, wp)
  if shift:
    full = jnp.roll(full, (shift, shift), axis=(1, 2))
  dbias = jnp.sum(full[:, h:], (0, 1, 2), jnp.float32) + jnp.sum(full[:, :h, w:], (0, 1, 2), jnp.float32)
  return full[:, :h, :w], dbias.astype(q.dtype), dpos  # cotangents in the inputs' dtypes


window_attention.defvjp(_window_attention_fwd, _window_attention_bwd)


class WindowAttention(nn.Module):
  """Parameters of Swin's window attention: `qkv`, `proj` and the relative position bias table.

  The block applies them around `window_attention`: `qkv` and `proj` act on the
  real tokens only (padding is handled inside the attention op).
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

  def __call__(self, x, shift: int = 0):
    """x: (B, H, W, C) normed tokens -> (B, H, W, C) attention output after `proj`."""
    n = self.window * self.window
    bias = self.relative_position_bias_table[relative_position_index(self.window).reshape(-1)]
    bias = bias.reshape(n, n, self.num_heads).transpose(2, 0, 1)
    y = window_attention(self.qkv(x), self.qkv.bias.astype(self.dtype), bias, self.num_heads,
                         self.window, shift)
    return self.proj(y)


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
    c = x.shape[-1]
    attn = WindowAttention(c, self.num_heads, self.window, self.dtype, name="attn")
    x = x + attn(LayerNorm(name="norm1")(x), self.shift).astype(x.dtype)
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
