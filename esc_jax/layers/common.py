"""Torch-equivalent building blocks: Linear, Conv2d and LayerNorm with PyTorch's
defaults (initialisation, eps), so that a freshly initialised model trains like
the original and converted weights drop in unchanged.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from esc_jax import kernels

# nn.LayerNorm(eps=1e-5) in PyTorch; Flax's default is 1e-6 (SPEC).
LN_EPS = 1e-5


def torch_kernel_init():
  """`kaiming_uniform_(a=sqrt(5))` = U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int):
  """PyTorch's Linear/Conv bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class Linear(nn.Module):
  """`torch.nn.Linear(in_features, features, bias=use_bias)`; kernel is (in, out)."""
  features: int
  in_features: int
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.kernel = self.param("kernel", torch_kernel_init(), (self.in_features, self.features), jnp.float32)
    if self.use_bias:
      self.bias = self.param("bias", torch_bias_init(self.in_features), (self.features,), jnp.float32)

  def matmul(self, x):
    """x @ kernel, without the bias."""
    return dense(x.astype(self.dtype), self.kernel.astype(self.dtype))

  def add_bias(self, y):
    return y + self.bias.astype(y.dtype) if self.use_bias else y

  def __call__(self, x):
    if not self.use_bias:
      return self.matmul(x)
    return dense_bias(x.astype(self.dtype), self.kernel.astype(self.dtype), self.bias.astype(self.dtype))


def _matmul(x, kernel, bias=None, transpose: bool = False):
  """x @ kernel (+ bias), or x @ kernel.T with `transpose`: for wide layers on CPU as the
  dense kernel (`kernels.dense`: each output summed over k in order, as XLA's dot does
  there; up to 1.5x faster), else XLA's dot."""
  if kernels.dense_applies(x, kernel):
    def xla(x, kernel, *b):
      return _matmul_xla(x, kernel, *b, transpose=transpose)

    def cpu(x, kernel, *b):
      return kernels.dense(x, kernel, *b, transpose=transpose)
    return kernels.on_cpu(x, kernel, *([] if bias is None else [bias]), cpu=cpu, default=xla)
  return _matmul_xla(x, kernel, bias, transpose)


def _matmul_xla(x, kernel, bias=None, transpose: bool = False):
  y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (1 if transpose else 0,)), ((), ())))
  return y if bias is None else y + bias


@jax.custom_vjp
def dense(x, kernel):
  """x (..., in) @ kernel (in, out) -> (..., out).

  The backward pass forms the kernel gradient as x^T g when in <= out and as
  (g^T x)^T otherwise: XLA:CPU materialises the transpose of the left operand of a
  dot contracting over tokens, so this transposes the narrower of x and g (autodiff
  always transposes g, e.g. 4C channels in the MLP's first layer instead of C).
  """
  return _matmul(x, kernel)


@jax.custom_vjp
def dense_bias(x, kernel, bias):
  """`dense(x, kernel) + bias`, bias (out,). Its backward reduces the bias gradient from
  the same (tokens, out) view of g as the kernel gradient, so XLA lays g out once."""
  return _matmul(x, kernel, bias)


def _dense_fwd(x, kernel):
  return _matmul(x, kernel), (x, kernel)


def _dense_bias_fwd(x, kernel, bias):
  return _matmul(x, kernel, bias), (x, kernel)


def _dense_bwd(res, g):
  x, kernel = res
  n_in, n_out = kernel.shape
  dx = _matmul(g, kernel, transpose=True)
  x2, g2 = x.reshape(-1, n_in), g.reshape(-1, n_out)
  tokens = (((0,), (0,)), ((), ()))
  if n_in <= n_out:
    dk = jax.lax.dot_general(x2, g2, tokens)
  else:
    dk = jax.lax.dot_general(g2, x2, tokens).T
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


def _dense_bias_bwd(res, g):
  dx, dk = _dense_bwd(res, g)
  return dx, dk, jnp.sum(g.reshape(-1, g.shape[-1]), 0, dtype=jnp.float32).astype(dk.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)
dense_bias.defvjp(_dense_bias_fwd, _dense_bias_bwd)


def Conv2d(features: int, in_features: int, kernel: tuple[int, int], stride=(1, 1),
           padding=((0, 0), (0, 0)), dtype=jnp.float32, name: str | None = None) -> nn.Conv:
  """`torch.nn.Conv2d` on NHWC inputs; kernel is (kh, kw, in, out)."""
  fan_in = in_features * kernel[0] * kernel[1]
  return nn.Conv(features, kernel_size=tuple(kernel), strides=tuple(stride), padding=padding,
                 dtype=dtype, param_dtype=jnp.float32, kernel_init=torch_kernel_init(),
                 bias_init=torch_bias_init(fan_in), name=name)


class ConvParams(nn.Module):
  """The parameters of a `Conv2d` (kernel (kh, kw, in, out), bias (out,)) without applying it,
  for layers that compute with the weights in another form (same names as nn.Conv)."""
  features: int
  in_features: int
  kernel: tuple[int, int]

  @nn.compact
  def __call__(self):
    fan_in = self.in_features * self.kernel[0] * self.kernel[1]
    k = self.param("kernel", torch_kernel_init(), (*self.kernel, self.in_features, self.features),
                   jnp.float32)
    b = self.param("bias", torch_bias_init(fan_in), (self.features,), jnp.float32)
    return k, b


_NHWC = ("NHWC", "HWIO", "NHWC")  # the canonical layout of XLA:CPU's fast convolutions


@jax.custom_vjp
def conv2d_same(x, kernel, bias):
  """Stride-1 NHWC cross-correlation with odd kernel sizes and (KH // 2, KW // 2) zero
  padding, plus bias: on CPU as the conv kernel where it applies (`kernels.conv_same`,
  1.4-1.8x XLA's speed at ESC-Base's de-embedding, the same within float32 rounding),
  else `conv2d`. The backward is XLA's either way."""
  if kernels.conv_applies(x, kernel):
    return kernels.on_cpu(x, kernel, bias, cpu=kernels.conv_same, default=_conv2d_same_xla)
  return _conv2d_same_xla(x, kernel, bias)


def _conv2d_same_xla(x, kernel, bias=None):
  kh, kw = kernel.shape[:2]
  return conv2d(x, kernel, bias, ((kh // 2, kh // 2), (kw // 2, kw // 2)))


def _conv2d_same_fwd(x, kernel, bias):
  return conv2d_same(x, kernel, bias), (x, kernel)


def _conv2d_same_bwd(res, g):
  x, kernel = res
  dx, dk = jax.vjp(_conv2d_same_xla, x, kernel)[1](g)
  return dx, dk, jnp.sum(g, (0, 1, 2)).astype(kernel.dtype)


conv2d_same.defvjp(_conv2d_same_fwd, _conv2d_same_bwd)


def conv2d(x, kernel, bias=None, padding=((0, 0), (0, 0))):
  """Stride-1 NHWC cross-correlation (`torch.nn.functional.conv2d` with zero padding)."""
  y = jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), (1, 1), padding, dimension_numbers=_NHWC)
  return y if bias is None else y + bias.astype(y.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def strided_conv2d(x, kernel, stride: tuple[int, int], padding: tuple[tuple[int, int], tuple[int, int]]):
  """NHWC cross-correlation with strides and zero padding ((lo, hi) per spatial axis).

  x (B, H, W, I), kernel (kh, kw, I, O) -> (B, H', W', O). The hand-written backward
  uses only convolutions in the canonical NHWC / HWIO layout (explicit transposes
  around them): XLA:CPU rewrites autodiff's transposed convolutions into that form
  only in a program's top level, so inside a `lax.cond` branch (the adversarial
  step) they ran in a naive loop, ~90x slower. Results are bit-identical.
  """
  return jax.lax.conv_general_dilated(x, kernel, stride, padding, dimension_numbers=_NHWC)


def _strided_conv2d_fwd(x, kernel, stride, padding):
  return strided_conv2d(x, kernel, stride, padding), (x, kernel)


def _strided_conv2d_bwd(stride, padding, res, g):
  x, kernel = res
  kh, kw = kernel.shape[:2]
  (p0, q0), (p1, q1) = padding
  # Input rows the forward's last window does not reach get zero gradient (remainder).
  r0 = (x.shape[1] + p0 + q0 - kh) % stride[0]
  r1 = (x.shape[2] + p1 + q1 - kw) % stride[1]
  flipped = jnp.flip(kernel, (0, 1)).swapaxes(2, 3)  # (kh, kw, O, I)
  dx = jax.lax.conv_general_dilated(g, flipped, (1, 1), ((kh - 1 - p0, kh - 1 - q0 + r0),
                                                         (kw - 1 - p1, kw - 1 - q1 + r1)),
                                    lhs_dilation=stride, dimension_numbers=_NHWC)
  # dK[u, v, i, o] = sum_{b,y,x} x_pad[b, s0 y + u, s1 x + v, i] g[b, y, x, o]: a convolution
  # of x^T (I, H, W, B) with g^T (H', W', B, O) dilated by the stride.
  dk = jax.lax.conv_general_dilated(x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3), (1, 1), padding,
                                    rhs_dilation=stride, dimension_numbers=_NHWC)
  return dx, dk[:, :kh, :kw].transpose(1, 2, 0, 3)


strided_conv2d.defvjp(_strided_conv2d_fwd, _strided_conv2d_bwd)


class LayerNormParams(nn.Module):
  """The parameters of `LayerNorm(C)` (scale, bias) without applying it: the original's
  convolution backbone builds PatchEmbed's norm, never uses it, and saves it."""
  features: int

  @nn.compact
  def __call__(self):
    return (self.param("scale", nn.initializers.ones, (self.features,), jnp.float32),
            self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32))


def row_mean(t):
  """(..., C) -> (..., 1): the mean over the last axis.

  On CPU it is a matrix-vector product with 1/C: XLA:CPU's library (YNN) fusions
  run a reduction over a narrow minor axis (C = 45..384) at a fraction of memory
  speed and write out every broadcast around it (the mean, 1/std and the scale
  as full (..., C) arrays); as a dot, what surrounds it fuses into plain loops.
  In-process A/Bs: the ESC-Base train step ~3% faster, encode + decode 2-9%. Other
  platforms reduce.
  """
  def by_dot(t):
    c = t.shape[-1]
    return jnp.dot(t, jnp.full((c, 1), 1.0 / c, t.dtype), precision=jax.lax.Precision.HIGHEST)
  return kernels.on_cpu(t, cpu=by_dot, default=lambda t: jnp.mean(t, -1, keepdims=True))


@jax.custom_vjp
def layer_norm(x, scale, bias):
  """`torch.nn.functional.layer_norm` over the last axis, float32 statistics.

  x: (..., C); scale, bias: (C,) -> float32 (..., C). Two-pass statistics (mean,
  then the mean squared deviation) as torch computes them; the hand-written
  backward needs two passes over x instead of autodiff's chain of broadcasts.
  Per-token means are `row_mean`s.
  """
  return _layer_norm_fwd(x, scale, bias)[0]


def _layer_norm_fwd(x, scale, bias):
  x32 = x.astype(jnp.float32)
  xc = x32 - row_mean(x32)
  rstd = jax.lax.rsqrt(row_mean(xc * xc) + LN_EPS)
  return xc * rstd * scale + bias, (x, scale, rstd)


def _layer_norm_bwd(res, dy):
  x, scale, rstd = res
  x32 = x.astype(jnp.float32)
  xhat = (x32 - row_mean(x32)) * rstd
  g = dy * scale
  dx = rstd * (g - row_mean(g) - xhat * row_mean(g * xhat))
  axes = tuple(range(dy.ndim - 1))
  return dx.astype(x.dtype), jnp.sum(dy * xhat, axes), jnp.sum(dy, axes)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
  """`torch.nn.LayerNorm(C)`: eps 1e-5, float32 statistics, params `scale` / `bias`
  (the names of `flax.linen.LayerNorm`, which the converter maps onto)."""
  dtype: jnp.dtype = jnp.float32  # output dtype

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    return layer_norm(x, scale, bias).astype(self.dtype)


def gelu(x: jnp.ndarray) -> jnp.ndarray:
  """`torch.nn.GELU()`: the exact form 0.5 x (1 + erf(x / sqrt 2)) (Flax defaults to tanh).

  Written with `erf`, as torch computes it: `jax.nn.gelu(approximate=False)` uses
  `erfc`, whose two-branch XLA expansion costs ~5x more on CPU; the two agree
  within float32 rounding (max abs difference ~1e-6 for |x| <= 10).
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * np.sqrt(0.5).astype(x.dtype)))
