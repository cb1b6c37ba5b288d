"""Evaluation metrics of ESC (scripts/metrics.py).

`si_sdr` and `mel_distance` are jax.numpy (batched, jit-able) and take
optional per-item `lengths`, so padded batches give each item's exact-length
value; PESQ, STOI and bitrate utilisation run in numpy on the host.
"""
from __future__ import annotations

import math
import warnings

import jax.numpy as jnp
import numpy as np

from esc_jax.audio import SAMPLE_RATE, hann_window, mel_filterbank, safe_magnitude
from esc_jax.losses import CLAMP_EPS, MEL_BINS, MEL_WINDOWS

__all__ = ["si_sdr", "mel_distance", "pesq_wb", "stoi", "bitrate_utilization"]


def _lengths(x, lengths):
  return jnp.full((x.shape[0],), x.shape[1], jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)


def si_sdr(ref, est, lengths=None, eps: float = 1e-8):
  """Zero-mean scale-invariant SDR in dB (DAC/ESC formulation).

  Args:
    ref, est: (B, L) audio.
    lengths: (B,) valid lengths of padded batches (None = all L samples);
      samples past an item's length are ignored.
  Returns:
    (B,) 10 log10(|a r|^2 / |e - a r|^2 + eps) with a = (<e, r> + eps) / (|r|^2 + eps)
    on mean-removed r, e.
  """
  ref = jnp.asarray(ref, jnp.float32)
  est = jnp.asarray(est, jnp.float32)
  n = _lengths(ref, lengths)
  mask = jnp.arange(ref.shape[1])[None] < n[:, None]

  def centred(a):
    mean = jnp.sum(jnp.where(mask, a, 0.0), axis=1, keepdims=True) / n[:, None]
    return jnp.where(mask, a - mean, 0.0)

  r, e = centred(ref), centred(est)
  scale = (jnp.sum(e * r, axis=1, keepdims=True) + eps) / (jnp.sum(r * r, axis=1, keepdims=True) + eps)
  e_true = scale * r
  signal = jnp.sum(e_true ** 2, axis=1)
  noise = jnp.sum((e - e_true) ** 2, axis=1)
  return 10.0 * jnp.log10(signal / noise + eps)


def _reflect_gather(x, n, pad: int, size: int):
  """Item b's first n[b] samples reflect-padded by `pad` on both sides (`size` samples).

  Equals `np.pad(x[b, :n[b]], pad, "reflect")` on its first n[b] + 2 pad
  samples; what follows is filler for frames the caller masks out.
  """
  p = jnp.abs(jnp.arange(size) - pad)[None]  # reflect at the start
  last = (n - 1)[:, None]
  idx = jnp.where(p > last, 2 * last - p, p)  # reflect at the end
  return jnp.take_along_axis(x, jnp.clip(idx, 0, x.shape[1] - 1), axis=1)


def _log_mel_l1(x, y, n, w: int, n_mels: int, sr: int, clamp_eps: float):
  """Per item mean |log10 mel_x^2 - log10 mel_y^2| over the item's own frames (one mel scale)."""
  hop, pad = w // 4, w // 2
  frames = 1 + x.shape[1] // hop
  fidx = np.arange(frames)[:, None] * hop + np.arange(w)[None]  # (T, w)
  win = hann_window(w, w)
  fb = mel_filterbank(sr, w, n_mels)

  def log_mel(a):
    spec = jnp.fft.rfft(_reflect_gather(a, n, pad, (frames - 1) * hop + w)[:, fidx] * win, axis=-1)
    mel = jnp.einsum("btf,fm->btm", safe_magnitude(spec.real, spec.imag), fb, precision="highest")
    return jnp.log10(jnp.square(jnp.maximum(mel, clamp_eps)))

  t_n = 1 + n // hop  # the item's own frame count
  mask = jnp.arange(frames)[None] < t_n[:, None]
  d = jnp.sum(jnp.abs(log_mel(x) - log_mel(y)), axis=2)
  return jnp.sum(jnp.where(mask, d, 0.0), axis=1) / (t_n * n_mels)


def mel_distance(ref, est, lengths=None, sr: int = SAMPLE_RATE, clamp_eps: float = CLAMP_EPS):
  """Mel distance (scripts/metrics.py MelSpectrogramDistance): the log term of the mel loss.

  Sum over the 7 scales of mean |log10 mel(ref)^2 - log10 mel(est)^2| (torchaudio
  MelSpectrogram framing: centre reflect padding, periodic Hann, HTK mel).

  Args:
    ref, est: (B, L) audio.
    lengths: (B,) valid lengths of padded batches (None = all L samples, > 1024):
      each item is framed, reflect-padded and averaged over its own length only.
  Returns:
    (B,) float32.
  """
  ref = jnp.asarray(ref, jnp.float32)
  est = jnp.asarray(est, jnp.float32)
  n = _lengths(ref, lengths)
  return sum(_log_mel_l1(ref, est, n, w, m, sr, clamp_eps) for w, m in zip(MEL_WINDOWS, MEL_BINS))


def _as_batch(a) -> np.ndarray:
  a = np.asarray(a, dtype=np.float64)
  return a[None] if a.ndim == 1 else a


def pesq_wb(ref, est, sr: int = 16000) -> np.ndarray:
  """Wide-band PESQ per item (`pesq(16000, ref, deg, 'wb')`).

  Items the pesq package rejects (e.g. no utterance detected, too short)
  give NaN with a warning.

  Args:
    ref, est: (B, L) or (L,) audio at 16 kHz.
  Returns:
    (B,) float64 MOS-LQO in [1.04, 4.64] (NaN where undefined).
  """
  from pesq import PesqError, pesq

  if sr != 16000:
    raise ValueError(f"wide-band PESQ needs 16 kHz audio, got sr={sr}")
  ref, est = _as_batch(ref), _as_batch(est)
  if ref.shape != est.shape:
    raise ValueError(f"ref and est shapes differ: {ref.shape} vs {est.shape}")
  out = np.full(ref.shape[0], np.nan)
  for b in range(ref.shape[0]):
    try:
      with np.errstate(divide="ignore", invalid="ignore"):  # pesq divides by max|x|
        out[b] = pesq(sr, ref[b], est[b], "wb")
    except PesqError as e:
      warnings.warn(f"PESQ undefined for item {b} ({type(e).__name__}: {e}); using NaN", RuntimeWarning)
  return out


def stoi(ref, est, sr: int = 16000, extended: bool = False) -> np.ndarray:
  """Short-time objective intelligibility per item (pystoi).

  Args:
    ref, est: (B, L) or (L,) audio at `sr`.
  Returns:
    (B,) float64.
  """
  from pystoi import stoi as _stoi

  ref, est = _as_batch(ref), _as_batch(est)
  if ref.shape != est.shape:
    raise ValueError(f"ref and est shapes differ: {ref.shape} vs {est.shape}")
  return np.array([_stoi(ref[b], est[b], sr, extended=extended) for b in range(ref.shape[0])])


def bitrate_utilization(codes, codebook_size: int, decimals: int | None = None) -> float:
  """Bitrate utilisation (EntropyCounter.compute_utilization's total).

  For each codebook (stream, group) the code histogram over the whole set
  (all items and time steps) gives p; its entropy -sum p log2(p + 1e-10) is
  summed over streams x groups and divided by streams * groups * log2(K).

  Args:
    codes: (N, streams, groups, T...) int code indices in [0, codebook_size).
    decimals: round the result like the original (which uses 4); None = exact.
  Returns:
    utilisation in [0, 1].
  """
  codes = np.asarray(codes)
  if codes.ndim < 3:
    raise ValueError(f"codes must be (N, streams, groups, T...), got shape {codes.shape}")
  if not np.issubdtype(codes.dtype, np.integer):
    raise ValueError(f"codes must be integers, got {codes.dtype}")
  if codes.size == 0:
    raise ValueError("no codes to count")
  if codes.min() < 0 or codes.max() >= codebook_size:
    raise ValueError(f"codes outside [0, {codebook_size})")
  n, s, g = codes.shape[:3]
  per_book = np.moveaxis(codes.reshape(n, s, g, -1), 0, 2).reshape(s * g, -1)  # (S*G, N*T)
  total = 0.0
  for book in per_book:
    p = np.bincount(book, minlength=codebook_size) / book.size
    total += float(-np.sum(p * np.log2(p + 1e-10)))
  util = total / (s * g * math.log2(codebook_size))
  return round(util, decimals) if decimals is not None else util
