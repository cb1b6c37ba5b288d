"""The adversarial discriminator of ESC-Base(adv) (`esc/models/discriminator.py`).

ESC uses Descript's DAC discriminator: multi-period discriminators (MPD) on the
waveform folded by a period, and multi-band complex STFT discriminators (MRD)
on the `audiotools` STFT, every convolution weight-normalised and followed by
a leaky ReLU (slope 0.1) except the output convolution. The multi-scale
waveform discriminator (MSD) of DAC is not ported: ESC's config has no `rates`.

Layout: feature maps are NHWC. An MPD map is (B, L'/period, period, C) for the
original's NCHW (B, C, L'/period, period); an MRD map is (B, T, F, C) for its
(B, C, T, F). Parameter paths mirror the PyTorch module tree
(`discriminators.5.band_convs.2.4.0.weight_v` ->
`discriminators_5/band_convs_2_4_0/weight_v`), so `convert.py` maps a torch
state dict mechanically.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from esc_jax.audio import frame_signal, hann_window
from esc_jax.layers.common import strided_conv2d, torch_bias_init, torch_kernel_init

# Fractions of the one-sided spectrum (W//2 + 1 bins) that the MRD bands cover.
BANDS = ((0.0, 0.1), (0.1, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0))
LEAKY_SLOPE = 0.1
MPD_CHANNELS = (32, 128, 512, 1024, 1024)  # the five convs of a period discriminator
MRD_CHANNELS = 32  # every conv of a multi-band STFT discriminator


def stft_match_stride(x: jnp.ndarray, window_length: int, hop_length: int) -> jnp.ndarray:
  """`audiotools.AudioSignal.stft` with `match_stride=True`, periodic Hann, reflect padding.

  The signal is reflect-padded by (W - hop)//2 on the left and that plus
  enough to reach a multiple of hop on the right, then `torch.stft(center=True)`
  reflect-pads W//2 more on both sides (unnormalised, one-sided, window of
  n_fft = W samples); the first two and last two frames are dropped, leaving
  ceil(L / hop) frames.

  Args:
    x: (B, L) float audio.
    window_length: W (= n_fft); hop_length must be W // 4.
  Returns:
    (B, ceil(L/hop), W//2 + 1, 2) float32; last axis (real, imag).
  """
  w, h = window_length, hop_length
  if h != w // 4:
    raise ValueError(f"match_stride needs hop == window_length // 4, got {h} for {w}")
  x = jnp.asarray(x, jnp.float32)
  length = x.shape[-1]
  right = -(-length // h) * h - length
  pad = (w - h) // 2
  x = jnp.pad(x, ((0, 0), (pad, pad + right)), mode="reflect")
  x = jnp.pad(x, ((0, 0), (w // 2, w // 2)), mode="reflect")  # torch.stft(center=True)
  num_frames = 1 + (x.shape[1] - w) // h - 4
  frames = frame_signal(x[:, 2 * h:], w, h, num_frames) * hann_window(w, w)
  spec = jnp.fft.rfft(frames, n=w, axis=-1)  # (B, T, F)
  return jnp.stack([spec.real, spec.imag], axis=-1).astype(jnp.float32)


def preprocess(y: jnp.ndarray) -> jnp.ndarray:
  """DC removal and peak normalisation to 0.8 (`Discriminator.preprocess`); (B, L) -> (B, L)."""
  y = y - jnp.mean(y, axis=-1, keepdims=True)
  return 0.8 * y / (jnp.max(jnp.abs(y), axis=-1, keepdims=True) + 1e-9)


class WNConv2d(nn.Module):
  """`weight_norm(nn.Conv2d(...))` on NHWC inputs, optionally + LeakyReLU(0.1).

  Params (float32): `weight_v` (kh, kw, in, out), `weight_g` (1, 1, 1, out) and
  `bias` (out,); the kernel is g * v / ||v||, the norm over all axes but `out`
  (PyTorch's weight_norm with dim=0). At init, v is PyTorch's Conv2d init and
  g = ||v||, so the kernel starts equal to v as in the original.
  """
  features: int
  in_features: int
  kernel: tuple[int, int]
  stride: tuple[int, int] = (1, 1)
  padding: tuple[int, int] = (0, 0)  # symmetric zero padding (rows, columns)
  act: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    shape = (*self.kernel, self.in_features, self.features)
    v = self.param("weight_v", torch_kernel_init(), shape, jnp.float32)
    g = self.param("weight_g", lambda _, shape, dtype: _weight_norm(v).reshape(shape).astype(dtype),
                   (1, 1, 1, self.features), jnp.float32)
    b = self.param("bias", torch_bias_init(self.in_features * self.kernel[0] * self.kernel[1]),
                   (self.features,), jnp.float32)
    w = g * v / _weight_norm(v)
    (ph, pw) = self.padding
    y = strided_conv2d(x.astype(self.dtype), w.astype(self.dtype), tuple(self.stride), ((ph, ph), (pw, pw)))
    y = y + b.astype(y.dtype)
    return nn.leaky_relu(y, LEAKY_SLOPE) if self.act else y


def _weight_norm(v: jnp.ndarray) -> jnp.ndarray:
  """||v|| over all axes but the last (output) one, (1, 1, 1, out); no eps, as in torch."""
  return jnp.sqrt(jnp.sum(jnp.square(v), axis=(0, 1, 2), keepdims=True))


class MPD(nn.Module):
  """Multi-period discriminator: the waveform folded into (L'/period, period) rows.

  The signal is reflect-padded on the right by `period - L % period` (a whole
  period when L is already a multiple, as in the original).
  """
  period: int
  channels: Sequence[int] = MPD_CHANNELS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> list[jnp.ndarray]:
    """(B, L) preprocessed audio -> 6 NHWC feature maps (B, H_j, period, C_j); last = logits (C=1)."""
    p = self.period
    x = jnp.pad(x, ((0, 0), (0, p - x.shape[-1] % p)), mode="reflect")
    x = x.reshape(x.shape[0], -1, p, 1)
    chans = (1, *self.channels)
    fmaps = []
    for i in range(5):
      stride = (3, 1) if i < 4 else (1, 1)
      x = WNConv2d(chans[i + 1], chans[i], (5, 1), stride, (2, 0), dtype=self.dtype,
                   name=f"convs_{i}_0")(x)
      fmaps.append(x)
    fmaps.append(WNConv2d(1, chans[-1], (3, 1), (1, 1), (1, 0), act=False, dtype=self.dtype,
                          name="conv_post")(x))
    return fmaps


class MRD(nn.Module):
  """Multi-band complex STFT discriminator (window W, hop W/4).

  Each band of the (real, imag) spectrogram goes through its own 5-conv stack
  (strides 2 along frequency); the band outputs are concatenated along
  frequency for the output conv.
  """
  window_length: int
  hop_factor: float = 0.25
  bands: Sequence[Sequence[float]] = BANDS
  channels: int = MRD_CHANNELS
  dtype: Any = jnp.float32

  def band_edges(self) -> list[tuple[int, int]]:
    """Bin ranges [lo, hi) of the bands, truncated as `int(fraction * (W//2 + 1))`."""
    n = self.window_length // 2 + 1
    return [(int(lo * n), int(hi * n)) for lo, hi in self.bands]

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> list[jnp.ndarray]:
    """(B, L) preprocessed audio -> 5 * len(bands) + 1 NHWC maps (B, T, F_j, C_j); last = logits."""
    spec = stft_match_stride(x, self.window_length, int(self.window_length * self.hop_factor))
    spec = spec.astype(self.dtype)  # (B, T, F, 2)
    ch = self.channels
    layers = ((2, (3, 9), (1, 1), (1, 4)), (ch, (3, 9), (1, 2), (1, 4)), (ch, (3, 9), (1, 2), (1, 4)),
              (ch, (3, 9), (1, 2), (1, 4)), (ch, (3, 3), (1, 1), (1, 1)))
    fmaps, outs = [], []
    for b, (lo, hi) in enumerate(self.band_edges()):
      y = spec[:, :, lo:hi]
      for i, (cin, k, s, pad) in enumerate(layers):
        y = WNConv2d(ch, cin, k, s, pad, dtype=self.dtype, name=f"band_convs_{b}_{i}_0")(y)
        fmaps.append(y)
      outs.append(y)
    y = jnp.concatenate(outs, axis=2)
    fmaps.append(WNConv2d(1, ch, (3, 3), (1, 1), (1, 1), act=False, dtype=self.dtype,
                          name="conv_post")(y))
    return fmaps


class Discriminator(nn.Module):
  """MPDs at `periods` then MRDs at `fft_sizes` (`discriminators_0..`), on preprocessed audio.

  `dtype` is the compute dtype of the convolutions (bf16 opt-in); params, the
  preprocessing and the STFT stay float32. `mpd_channels` / `mrd_channels`
  default to the original's widths; narrower ones make fast smoke tests.
  """
  periods: Sequence[int] = (2, 3, 5, 7, 11)
  fft_sizes: Sequence[int] = (2048, 1024, 512)
  bands: Sequence[Sequence[float]] = BANDS
  mpd_channels: Sequence[int] = MPD_CHANNELS
  mrd_channels: int = MRD_CHANNELS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> list[list[jnp.ndarray]]:
    """(B, L) or (B, 1, L) audio -> per discriminator its list of NHWC feature maps (last = logits)."""
    if x.ndim == 3:
      if x.shape[1] != 1:
        raise ValueError(f"expected mono audio (B, 1, L), got {x.shape}")
      x = x[:, 0]
    x = preprocess(jnp.asarray(x, jnp.float32))
    outs = [MPD(p, tuple(self.mpd_channels), dtype=self.dtype, name=f"discriminators_{i}")(x)
            for i, p in enumerate(self.periods)]
    n = len(self.periods)
    outs += [MRD(w, bands=tuple(map(tuple, self.bands)), channels=self.mrd_channels, dtype=self.dtype,
                 name=f"discriminators_{n + j}")(x)
             for j, w in enumerate(self.fft_sizes)]
    return outs


def make_discriminator(config: Mapping[str, Any] | None = None, dtype=jnp.float32) -> Discriminator:
  """A `Discriminator` from the original's `discriminator:` config section.

  Keys: periods, fft_sizes, bands, rates (must be empty: MSD is not ported),
  sample_rate (only the MSD uses it), and this port's mpd_channels /
  mrd_channels. Defaults are ESC-Base(adv)'s.
  """
  cfg = dict(config or {})
  if cfg.pop("rates", None):
    raise ValueError("multi-scale discriminators (rates) are not supported; ESC uses rates: []")
  cfg.pop("sample_rate", None)
  unknown = set(cfg) - {"periods", "fft_sizes", "bands", "mpd_channels", "mrd_channels"}
  if unknown:
    raise ValueError(f"unknown discriminator config keys: {sorted(unknown)}")
  kw = {k: tuple(tuple(b) for b in v) if k == "bands" else v if k == "mrd_channels" else tuple(v)
        for k, v in cfg.items()}
  return Discriminator(**kw, dtype=dtype)
