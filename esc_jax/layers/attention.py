"""Shifted-window attention (Swin) as ESC uses it.

Feature maps are (B, H, W, C) with H the frequency and W the time axis; the
PyTorch original flattens them to (B, H*W, C) row-major, which is a free
reshape of this layout. Inside a `TransformerLayer` the tokens are kept in
window order (see `window_order`), so a block's windows are a free reshape too.
Masks, relative-position indices and re-order indices are numpy constants built
at trace time, so nothing about them is recomputed per step.
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from esc_jax import kernels
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


def padded_size(n: int, window: int) -> int:
  """n rounded up to a multiple of the window."""
  return -(-n // window) * window


@functools.lru_cache(maxsize=None)
def window_order(hp: int, wp: int, window: int, shift: int) -> np.ndarray:
  """(hp*wp,) flat grid index of each token in window order.

  Window order lists the w x w windows of the (hp, wp) grid rolled by (-shift, -shift)
  row-major, and the tokens inside each window row-major, so (B, hp*wp, C) tokens in
  this order reshape for free to Swin's (B, nW, w*w, C) windows.
  """
  grid = np.arange(hp * wp, dtype=np.int32).reshape(hp, wp)
  rolled = np.roll(grid, (-shift, -shift), axis=(0, 1))
  return window_partition(rolled[None, :, :, None], window).reshape(-1)


@functools.lru_cache(maxsize=None)
def _gather_index(hp: int, wp: int, window: int, src: int | None, dst: int | None) -> np.ndarray:
  """out[:, p] = in[:, idx[p]] re-orders (B, hp*wp, C) tokens from order `src` to `dst`
  (None: the grid's row-major order; an int: window order with that shift)."""
  grid_of_dst = np.arange(hp * wp, dtype=np.int32) if dst is None else window_order(hp, wp, window, dst)
  if src is None:
    return grid_of_dst
  src_of_grid = np.argsort(window_order(hp, wp, window, src)).astype(np.int32)
  return src_of_grid[grid_of_dst]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4, 5))
def reorder_tokens(x, hp: int, wp: int, window: int, src: int | None, dst: int | None):
  """(B, hp*wp, C) tokens from order `src` to order `dst` (see `_gather_index`).

  One gather per direction: the backward pass is the inverse re-order, where autodiff
  of a gather would scatter-add. It gathers rows of the flattened (B*hp*wp, C) array:
  gathering along axis 1 makes XLA:CPU transpose the batch axis in and out around it.
  """
  b, n, c = x.shape
  idx = _gather_index(hp, wp, window, src, dst)
  rows = (np.arange(b, dtype=np.int32)[:, None] * n + idx).reshape(-1)
  return jnp.take(x.reshape(b * n, c), rows, axis=0, mode="clip").reshape(b, n, c)


def _reorder_fwd(x, hp, wp, window, src, dst):
  return reorder_tokens(x, hp, wp, window, src, dst), None


def _reorder_bwd(hp, wp, window, src, dst, _, g):
  return (reorder_tokens(g, hp, wp, window, dst, src),)


reorder_tokens.defvjp(_reorder_fwd, _reorder_bwd)


def to_window_order(x, window: int, shift: int):
  """(B, H, W, C) -> (B, Hp*Wp, C): zero-pad bottom/right to multiples of the window,
  then window order (shift `shift`)."""
  b, h, w, c = x.shape
  hp, wp = padded_size(h, window), padded_size(w, window)
  if (hp, wp) != (h, w):
    x = jnp.pad(x, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
  return reorder_tokens(x.reshape(b, hp * wp, c), hp, wp, window, None, shift)


def from_window_order(x, h: int, w: int, window: int, shift: int):
  """Inverse of `to_window_order`, padding cropped: (B, Hp*Wp, C) -> (B, H, W, C)."""
  b, _, c = x.shape
  hp, wp = padded_size(h, window), padded_size(w, window)
  x = reorder_tokens(x, hp, wp, window, shift, None).reshape(b, hp, wp, c)
  return x[:, :h, :w] if (hp, wp) != (h, w) else x


def keeps_window_order(h: int, w: int, window: int) -> bool:
  """Whether a layer runs its blocks on tokens in window order: unless padding to whole
  windows adds more than 1/8 of the tokens (H < w at the bottleneck), where the
  token-wise layers would spend much of their work on padding."""
  return 8 * padded_size(h, window) * padded_size(w, window) <= 9 * h * w


@functools.lru_cache(maxsize=None)
def padding_mask(h: int, w: int, window: int, shift: int) -> np.ndarray | None:
  """(Hp*Wp, 1) 1/0 mask of the real tokens in window order `shift`; None without padding."""
  hp, wp = padded_size(h, window), padded_size(w, window)
  if (hp, wp) == (h, w):
    return None
  real = np.zeros((hp, wp), np.float32)
  real[:h, :w] = 1.0
  return real.reshape(-1)[window_order(hp, wp, window, shift)][:, None]


def _split_heads(t, k: int, heads: int):
  """(B, nW, N, k*heads*d) -> k arrays (B, nW, heads, N, d), from one transposing copy."""
  b, nw, n, c = t.shape
  d = c // (k * heads)
  t = t.reshape(b, nw, n, k, heads, d).transpose(3, 0, 1, 4, 2, 5)
  return [t[i] for i in range(k)]


def _merge_heads(*ts):
  """k arrays (B, nW, heads, N, d) -> (B, nW, N, k*heads*d), with one transposing copy:
  concatenating along the heads axis first lets XLA fuse the concatenation into it."""
  b, nw, heads, n, d = ts[0].shape
  t = ts[0] if len(ts) == 1 else jnp.concatenate(ts, axis=2)
  return t.transpose(0, 1, 3, 2, 4).reshape(b, nw, n, len(ts) * heads * d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def window_attention(qkv, pos_bias, heads: int, mask: tuple[int, int, int, int] | None):
  """Multi-head self-attention inside each window.

  qkv: (B, nW, N, 3C) projections of the windowed tokens, N = w*w; pos_bias:
  (heads, N, N) relative position bias; mask: None, or (hp, wp, window, shift)
  naming Swin's shift mask of the rolled (hp, wp) grid. Returns (B, nW, N, C),
  the attention output before the output projection.

  Without differentiation this runs as einsums on the (B*nW, N, 3, heads, d) view of
  qkv and lets XLA place the head transposes (~6% faster encode + decode on CPU);
  the batch is folded into the windows, as XLA:CPU lays out the einsums of a
  separate batch axis ~1.5x slower. The training forward splits the heads
  explicitly and keeps q, k, v for the backward.
  """
  b, nw, n, c3 = qkv.shape
  d = c3 // 3 // heads
  t = qkv.reshape(1, b * nw, n, 3, heads, d)
  q, k, v = t[:, :, :, 0] * (d ** -0.5), t[:, :, :, 1], t[:, :, :, 2]
  logits = jnp.einsum("bwihc,bwjhc->bwhij", q, k).astype(jnp.float32) + pos_bias
  attn = _softmax(logits.reshape(b, nw, heads, n, n), mask).astype(qkv.dtype)
  attn = attn.reshape(1, b * nw, heads, n, n)
  return jnp.einsum("bwhij,bwjhc->bwihc", attn, v).reshape(b, nw, n, heads * d)


def _softmax(logits, mask):
  """Softmax over the last axis of (B, nW, heads, N, N) logits, after Swin's shift mask."""
  if mask is not None:
    logits = logits + shift_mask(*mask)[:, None]
  return jax.nn.softmax(logits, axis=-1)


def _window_attention_fwd(qkv, pos_bias, heads, mask):
  q, k, v = _split_heads(qkv, 3, heads)
  q = q * ((qkv.shape[-1] // 3 // heads) ** -0.5)
  logits = (q @ k.swapaxes(-1, -2)).astype(jnp.float32) + pos_bias  # (B, nW, heads, N, N)
  attn = _softmax(logits, mask).astype(qkv.dtype)
  return _merge_heads(attn @ v), (q, k, v, attn)


def _window_attention_bwd(heads, mask, res, g):
  q, k, v, attn = res  # (B, nW, heads, N, d); q scaled; attn (B, nW, heads, N, N)
  (g,) = _split_heads(g.astype(q.dtype), 1, heads)
  # attn^T and dlogits^T are materialised (the barrier stops XLA folding the transpose
  # back into the dot): XLA:CPU runs a batched dot whose lhs contracts over its rows
  # as a slow per-window loop.
  dv = jax.lax.optimization_barrier(attn.swapaxes(-1, -2)) @ g
  da = (g @ v.swapaxes(-1, -2)).astype(jnp.float32)
  attn32 = attn.astype(jnp.float32)
  dlogits = attn32 * (da - jnp.sum(da * attn32, axis=-1, keepdims=True))  # softmax VJP
  dpos = jnp.sum(dlogits, axis=(0, 1))
  dlogits = dlogits.astype(q.dtype)
  dq = (dlogits @ k) * (q.shape[-1] ** -0.5)
  dk = jax.lax.optimization_barrier(dlogits.swapaxes(-1, -2)) @ q
  return _merge_heads(dq, dk, dv), dpos  # cotangents in the inputs' dtypes


window_attention.defvjp(_window_attention_fwd, _window_attention_bwd)


class WindowAttention(nn.Module):
  """Swin's window attention: `qkv`, per-window attention with the relative position
  bias table, `proj` (token layouts: see `__call__`)."""
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

  def __call__(self, x, hw: tuple[int, int], shift: int = 0):
    """x: (B, L, C) normed tokens of an (H, W) = `hw` map -> (B, L, C) after `proj`.

    If `keeps_window_order(H, W)`, x is in window order `shift` with the padding
    tokens zero (L = Hp*Wp). Otherwise x is in row-major grid order (L = H*W); the
    projections (bias not yet added) are zero-padded and re-ordered here, since a
    zero token projects to the bias alone.
    """
    b, _, c = x.shape
    h, w = hw
    hp, wp = padded_size(h, self.window), padded_size(w, self.window)
    n = self.window * self.window
    bias = self.relative_position_bias_table[relative_position_index(self.window).reshape(-1)]
    bias = bias.reshape(n, n, self.num_heads).transpose(2, 0, 1)
    windowed = keeps_window_order(h, w, self.window)
    if windowed:
      qkv = self.qkv(x)
    else:
      qkv = self.qkv.matmul(x).reshape(b, h, w, 3 * c)
      qkv = self.qkv.add_bias(to_window_order(qkv, self.window, shift))
    mask = (hp, wp, self.window, shift) if shift else None
    y = window_attention(qkv.reshape(b, hp * wp // n, n, 3 * c), bias, self.num_heads, mask)
    y = y.reshape(b, hp * wp, c)
    if not windowed:
      y = from_window_order(y, h, w, self.window, shift).reshape(b, h * w, c)
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
  With `fused` (the default), a float32 block in window order runs on CPU as fused
  kernels (`esc_jax.kernels`) up to a width that depends on the CPU (forward up to
  C = 147 or 209, backward up to 104 or 209; `kernel_weight_limits`). Wider blocks,
  other platforms and other dtypes take the XLA path, which computes the same within
  float32 rounding.
  The kernels define reverse-mode gradients only (a custom VJP): forward-mode
  autodiff (`jax.jvp`, `jacfwd`) of a CPU model needs `fused=False`.
  """
  dim: int
  num_heads: int
  window: int = 4
  shift: int = 0
  mlp_ratio: float = 4.0
  dtype: jnp.dtype = jnp.float32
  fused: bool = True

  @nn.compact
  def __call__(self, x, hw: tuple[int, int]):
    """x: (B, L, C) tokens of an (H, W) = `hw` map -> same: in window order `shift`
    (L = Hp*Wp) if `keeps_window_order(H, W)`, else in grid order (L = H*W).

    In window order the padding tokens are carried along; `norm1`'s output is zeroed
    on them, which is the original's zero padding after the norm. What the block
    computes on them otherwise is never read.
    """
    if (self.fused and not self.is_initializing() and self.window == 4
        and jnp.dtype(self.dtype) == jnp.float32 and x.dtype == jnp.float32
        and _weight_bytes(self.dim, self.mlp_ratio) <= kernel_weight_limits()[0]
        and keeps_window_order(*hw, self.window) and kernels.cpu_kernels_available()):
      spec = (self.dim, self.num_heads, self.window, self.shift, self.mlp_ratio, tuple(hw))
      return _fused_block(self.variables["params"], x, spec)
    c = x.shape[-1]
    xn = LayerNorm(name="norm1")(x).astype(self.dtype)
    real = padding_mask(*hw, self.window, self.shift) if keeps_window_order(*hw, self.window) else None
    if real is not None:
      xn = xn * jnp.asarray(real, xn.dtype)
    attn = WindowAttention(c, self.num_heads, self.window, self.dtype, name="attn")
    x = x + attn(xn, hw, self.shift).astype(x.dtype)
    y = FeedForward(c, int(c * self.mlp_ratio), self.dtype, name="mlp")(
        LayerNorm(name="norm2")(x).astype(self.dtype))
    return x + y.astype(x.dtype)


# The fused kernels stream every weight once per 16-token window, so how wide a block
# they win on depends on the CPU: measured on ESC-Base's widths (2 cores, batch 4 x 3 s,
# ms per block, ours vs XLA's):
# - AVX-512 (2 MiB L2 per core): forward 20 vs 56 at C = 45, 21 vs 33 at C = 144, but 30
#   vs 24 at C = 192; forward + backward 70 vs 190 at C = 45, 72 vs 116 at C = 96, but
#   139 vs 123 at C = 144.
# - AVX2 (Zen 3, 512 KiB L2): forward 40 vs 59 at C = 144, 42 vs 51 at C = 192; forward
#   + backward 174 vs 271 at C = 45, 152 vs 186 at C = 96, 172 vs 196 at C = 144, 148 vs
#   137 at C = 192; since the backward sums 4 windows' weight gradients per pass, 132 vs
#   193 at C = 144 and 106 vs 124 at C = 192.
# (forward, backward) limits on a block's weight bytes (`_weight_bytes`):
_KERNEL_LIMITS = {"avx512": (1 << 20, 1 << 19),  # C <= 147, C <= 104 at mlp_ratio 4
                  "avx2": (1 << 21, 1 << 21)}  # C <= 209 both ways


def kernel_weight_limits() -> tuple[int, int]:
  """(forward, backward): the weight bytes up to which a block runs as the fused kernels
  on this CPU."""
  return _KERNEL_LIMITS["avx512" if kernels.has_avx512() else "avx2"]


def _weight_bytes(dim: int, mlp_ratio: float) -> int:
  """float32 bytes of a block's qkv, proj, fc1 and fc2 weights."""
  return 4 * (4 * dim * dim + 2 * dim * int(dim * mlp_ratio))


def _xla_block(params, x, spec):
  """`SwinBlock` through XLA; spec = (dim, heads, window, shift, mlp_ratio, hw)."""
  dim, heads, window, shift, mlp_ratio, hw = spec
  block = SwinBlock(dim, heads, window, shift, mlp_ratio, fused=False)
  return block.apply({"params": params}, x, hw)


_ABSENT = np.zeros((1,), np.float32)  # a kernel argument that is not there (its has_* attribute false)


def _kernel_inputs(params, x, spec):
  """(arrays after x, attributes) of the fused block kernels: the padding and shift
  masks, then the parameters in `_KERNEL_PARAMS` order, the position bias as
  (heads, key, query)."""
  _, heads, window, shift, _, (h, w) = spec
  hp, wp = padded_size(h, window), padded_size(w, window)
  real = padding_mask(h, w, window, shift)
  mask = shift_mask(hp, wp, window, shift).transpose(0, 2, 1) if shift else None
  table = params["attn"]["relative_position_bias_table"]
  args = [_ABSENT if real is None else real.reshape(-1), _ABSENT if mask is None else mask]
  for path in _KERNEL_PARAMS:
    args.append(_position_bias(table, window) if path is None else _at(params, path))
  return args, dict(heads=np.int64(heads), has_real=real is not None, has_mask=mask is not None)


# The kernels' parameter arguments (paths in a SwinBlock's params; None: the position bias).
_KERNEL_PARAMS = (("norm1", "scale"), ("norm1", "bias"), ("attn", "qkv", "kernel"), ("attn", "qkv", "bias"),
                  None, ("attn", "proj", "kernel"), ("attn", "proj", "bias"), ("norm2", "scale"),
                  ("norm2", "bias"), ("mlp", "linear_1", "kernel"), ("mlp", "linear_1", "bias"),
                  ("mlp", "linear_2", "kernel"), ("mlp", "linear_2", "bias"))


def _at(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _position_bias(table, window: int):
  """((2w-1)^2, heads) table -> (heads, key, query) bias, as the kernels read it."""
  n = window * window
  bias = table[relative_position_index(window).reshape(-1)]
  return bias.reshape(n, n, -1).transpose(2, 1, 0)


def _saved_size(x, spec) -> int:
  """float32 values a training forward keeps for the backward kernel: per token the
  scaled qkv (3 C) and fc1's output (hidden)."""
  dim, _, _, _, mlp_ratio, _ = spec
  return math.prod(x.shape[:-1]) * (3 * dim + int(dim * mlp_ratio))


def _ffi_block(params, x, spec, save: bool = False):
  """`SwinBlock` as the fused CPU kernel (window 4, float32, window order): y, or with
  `save` (y, the activations `_ffi_block_vjp` reads instead of recomputing them)."""
  args, attrs = _kernel_inputs(params, x, spec)
  shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((_saved_size(x, spec) if save else 1,),
                                                                         jnp.float32)]
  call = jax.ffi.ffi_call(kernels.SWIN_BLOCK_TARGET, shapes, vmap_method="sequential")
  y, saved = call(x, *args, save=save, **attrs)
  return (y, saved) if save else y


def _ffi_block_vjp(params, x, g, spec, saved=None):
  """(d params, dx) of `SwinBlock` from the fused CPU backward kernel, which recomputes
  the block's activations per window, except those a forward with `save` kept (`saved`)."""
  args, attrs = _kernel_inputs(params, x, spec)
  shapes = [jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in (x, *args[2:])]
  call = jax.ffi.ffi_call(kernels.SWIN_BLOCK_GRAD_TARGET, shapes, vmap_method="sequential")
  dx, *grads = call(x, g, _ABSENT if saved is None else saved, *args, has_saved=saved is not None, **attrs)
  by_path = {}
  for path, grad in zip(_KERNEL_PARAMS, grads):
    if path is None:
      path = ("attn", "relative_position_bias_table")
      grad = jax.vjp(functools.partial(_position_bias, window=spec[2]), _at(params, path))[1](grad)[0]
    by_path[path] = grad
  leaves, tree = jax.tree_util.tree_flatten_with_path(params)
  dparams = [by_path[tuple(k.key for k in path)] for path, _ in leaves]
  return jax.tree.unflatten(tree, dparams), dx


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fused_block(params, x, spec):
  """A `SwinBlock`: the fused kernels on CPU (forward, and a backward that recomputes
  the forward per window), XLA elsewhere."""
  return kernels.on_cpu(params, x, cpu=functools.partial(_ffi_block, spec=spec),
                        default=functools.partial(_xla_block, spec=spec))


def _grad_by_kernel(spec) -> bool:
  return _weight_bytes(spec[0], spec[4]) <= kernel_weight_limits()[1]


def _fused_block_fwd(params, x, spec):
  if not _grad_by_kernel(spec):  # XLA's forward and backward (it keeps its activations)
    return jax.vjp(functools.partial(_xla_block, spec=spec), params, x)
  if kernels.keeps_activations():  # the kernels both ways: the forward keeps qkv and fc1's output
    y, saved = _ffi_block(params, x, spec, save=True)
    return y, (params, x, saved)
  return _fused_block(params, x, spec), (params, x, None)


def _fused_block_bwd(spec, res, g):
  if not _grad_by_kernel(spec):
    return res(g)
  params, x, saved = res
  if saved is not None:
    return _ffi_block_vjp(params, x, g, spec, saved)

  def xla_vjp(params, x, g):
    return jax.vjp(functools.partial(_xla_block, spec=spec), params, x)[1](g)
  return kernels.on_cpu(params, x, g, cpu=functools.partial(_ffi_block_vjp, spec=spec), default=xla_vjp)


_fused_block.defvjp(_fused_block_fwd, _fused_block_bwd)


class TransformerLayer(nn.Module):
  """`depth` Swin blocks (shift 0, w/2, 0, ...) then optional patch merge/split.

  The blocks run on tokens in window order (padding included): one re-order into
  it, one between consecutive blocks, one back, each a single gather, instead of a
  pad / roll / partition and its inverse per block. Maps where padding would add
  more than 1/8 of the tokens (H < w at the bottleneck) keep grid order, so the
  token-wise layers do not run on it; their attention re-orders after `qkv`.
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
    b, h, w, c = x.shape
    windowed = keeps_window_order(h, w, self.window)
    hp, wp = padded_size(h, self.window), padded_size(w, self.window)
    order = 0
    x = to_window_order(x, self.window, order) if windowed else x.reshape(b, h * w, c)
    for i in range(self.depth):
      shift = 0 if i % 2 == 0 else self.window // 2
      if windowed and shift != order:
        x, order = reorder_tokens(x, hp, wp, self.window, order, shift), shift
      x = SwinBlock(self.in_dim, self.num_heads, self.window, shift, self.mlp_ratio, self.dtype,
                    name=f"swint_blocks_{i}")(x, (h, w))
    x = from_window_order(x, h, w, self.window, order) if windowed else x.reshape(b, h, w, c)
    if self.scale == "down":
      x = PatchMerge(self.in_dim, self.out_dim, self.dtype, name="subsample")(x)
    elif self.scale == "up":
      x = PatchSplit(self.in_dim, self.out_dim, self.dtype, name="subsample")(x)
    elif self.scale is not None:
      raise ValueError(f"scale must be None, 'down' or 'up', got {self.scale!r}")
    return x
