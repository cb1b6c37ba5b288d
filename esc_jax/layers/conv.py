"""Convolution backbone of the ablation codecs (`csvq+conv`, `rvq+conv`).

Maps are NHWC, (B, H, W, C) with H the frequency and W the time axis, as in
the transformer layers. Every convolution pads like the original
(Conv2d: (2, 1); ConvTranspose2d: (1, 0)) and crops its output back to
(H, W), (H//2, W) or (2H, W), so the kernel (5, 2) keeps the time length.

BatchNorm follows `torch.nn.BatchNorm2d`: in training the batch statistics
normalise (biased variance) and the running statistics, kept in the
"batch_stats" collection, move by momentum 0.1 towards the batch mean and
the *unbiased* batch variance; in evaluation the running statistics
normalise. Apply with `mutable=["batch_stats"]` when `train=True`.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from esc_jax.layers.common import Conv2d, torch_bias_init, torch_kernel_init

BN_EPS = 1e-5  # torch.nn.BatchNorm2d defaults
BN_MOMENTUM = 0.1


class BatchNorm2d(nn.Module):
  """`torch.nn.BatchNorm2d(C)` over the channel (last) axis of (B, H, W, C).

  Statistics are a plain mean over (B, H, W): under `jax.jit` with the batch
  sharded over a mesh this is the global-batch statistic (XLA inserts the
  cross-device reduction), as with PyTorch's SyncBatchNorm. They are computed
  in float32 whatever `dtype` is; params and running statistics are float32.
  """
  features: int
  momentum: float = BN_MOMENTUM  # PyTorch convention: weight of the new batch statistic
  eps: float = BN_EPS
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    c = self.features
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    x32 = x.astype(jnp.float32)
    if train:
      axes = tuple(range(x.ndim - 1))
      n = x32.size // c
      mean = jnp.mean(x32, axes)
      var = jnp.mean(jnp.square(x32 - mean), axes)  # biased: normalises the batch
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = (1 - m) * ra_mean.value + m * mean
        ra_var.value = (1 - m) * ra_var.value + m * var * (n / max(n - 1, 1))  # unbiased
    else:
      mean, var = ra_mean.value, ra_var.value
    # As PyTorch's CPU kernel: y = x * alpha + (bias - mean * alpha), alpha = scale / sqrt(var + eps).
    alpha = scale / jnp.sqrt(var + self.eps)
    return (x32 * alpha + (bias - mean * alpha)).astype(self.dtype)


class PReLU(nn.Module):
  """`torch.nn.PReLU()`: one learned slope (init 0.25) for x < 0; param shape (1,) as in torch."""
  init: float = 0.25

  @nn.compact
  def __call__(self, x):
    a = self.param("negative_slope", nn.initializers.constant(self.init), (1,), jnp.float32)
    return jnp.where(x > 0, x, a.astype(x.dtype) * x)


class Convolution2D(nn.Module):
  """The original's `Convolution2D`: a (transposed) convolution cropped to the input grid.

  (B, H, W, in) -> (B, H', W, out) with H' = H (scale=False), H//2 (scale, conv)
  or 2H (scale, transpose); stride (2, 1) when scaling.
  """
  in_features: int
  features: int
  kernel_size: Sequence[int] = (5, 2)
  scale: bool = True
  transpose: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h, w = x.shape[1], x.shape[2]
    k = tuple(self.kernel_size)
    stride = (2, 1) if self.scale else (1, 1)
    if self.transpose:
      # torch ConvTranspose2d(padding=(1, 0)) = conv of the stride-dilated input padded by
      # k - 1 - p with the flipped kernel; kernel (kh, kw, out, in) = torch (in, out, kh, kw)
      # transposed (2, 3, 1, 0) like Conv2d, and torch's fan_in (out * kh * kw) for the init.
      fan_in = self.features * k[0] * k[1]
      conv = nn.ConvTranspose(self.features, k, strides=stride,
                              padding=((k[0] - 2, k[0] - 2), (k[1] - 1, k[1] - 1)),
                              transpose_kernel=True, dtype=self.dtype, param_dtype=jnp.float32,
                              kernel_init=torch_kernel_init(), bias_init=torch_bias_init(fan_in),
                              name="conv")
    else:
      conv = Conv2d(self.features, self.in_features, k, stride, ((2, 2), (1, 1)), self.dtype, name="conv")
    y = conv(x.astype(self.dtype))
    out_h = (2 * h if self.transpose else h // 2) if self.scale else h
    return y[:, :out_h, :w]


class ResidualUnit(nn.Module):
  """x + (conv -> BN -> PReLU -> conv -> BN -> PReLU)(x), kernel (5, 2) (fixed in the original)."""
  dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = Convolution2D(self.dim, self.dim, (5, 2), False, dtype=self.dtype, name="block_0")(x)
    y = BatchNorm2d(self.dim, dtype=self.dtype, name="block_1")(y, train)
    y = PReLU(name="block_2")(y)
    y = Convolution2D(self.dim, self.dim, (5, 2), False, dtype=self.dtype, name="block_3")(y)
    y = BatchNorm2d(self.dim, dtype=self.dtype, name="block_4")(y, train)
    y = PReLU(name="block_5")(y)
    return x + y


class ConvolutionLayer(nn.Module):
  """`depth` residual units, then a scaling Convolution2D -> BN -> PReLU.

  (B, H, W, in_dim) -> (B, H//2 or 2H (transpose), W, out_dim). Submodules are
  `blocks_{j}` in the original's `nn.Sequential` order.
  """
  in_dim: int
  out_dim: int
  depth: int = 1
  kernel_size: Sequence[int] = (5, 2)
  transpose: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    for j in range(self.depth):
      x = ResidualUnit(self.in_dim, self.dtype, name=f"blocks_{j}")(x, train)
    d = self.depth
    x = Convolution2D(self.in_dim, self.out_dim, tuple(self.kernel_size), True, self.transpose,
                      self.dtype, name=f"blocks_{d}")(x)
    x = BatchNorm2d(self.out_dim, dtype=self.dtype, name=f"blocks_{d + 1}")(x, train)
    return PReLU(name=f"blocks_{d + 2}")(x)
