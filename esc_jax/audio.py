"""Audio front end: torch-exact complex STFT / iSTFT for ESC.

Mirrors `torchaudio.transforms.Spectrogram(power=None)` and
`torchaudio.transforms.InverseSpectrogram` as ESC configures them
(n_fft 382, periodic Hann of 320 samples centred in the frame, hop 80,
reflect padding, `center=True`, `normalized=False`, `onesided=True`).
All functions are batched, jit-able and differentiable.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

# ESC front-end constants at 16 kHz (SPEC: in_freq 192 -> n_fft 382).
SAMPLE_RATE = 16000
N_FFT = 382
WIN_LENGTH = 320  # 20 ms
HOP_LENGTH = 80  # 5 ms


@functools.lru_cache(maxsize=None)
def hann_window(win_length: int, n_fft: int) -> np.ndarray:
  """`torch.hann_window(win_length)` (periodic), zero-padded centred to n_fft."""
  n = np.arange(win_length, dtype=np.float64)
  win = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / win_length)
  left = (n_fft - win_length) // 2
  out = np.zeros(n_fft, dtype=np.float64)
  out[left:left + win_length] = win
  return out.astype(np.float32)


def _frames(x: jnp.ndarray, n_fft: int, hop: int, num_frames: int):
  """(B, L') -> (B, T, n_fft) frames at stride `hop` (slices only, no gather)."""
  per = -(-n_fft // hop)  # hops spanned by one frame
  need = (num_frames + per - 1) * hop
  x = jnp.pad(x, ((0, 0), (0, max(0, need - x.shape[1]))))[:, :need]
  blocks = x.reshape(x.shape[0], num_frames + per - 1, hop)
  frames = jnp.concatenate([blocks[:, k:k + num_frames] for k in range(per)], axis=-1)
  return frames[..., :n_fft]


def stft(x: jnp.ndarray, n_fft: int = N_FFT, win_length: int = WIN_LENGTH,
         hop: int = HOP_LENGTH) -> jnp.ndarray:
  """Complex STFT as (real, imag) features.

  Args:
    x: (B, L) float audio.
  Returns:
    (B, 2, n_fft//2 + 1, 1 + L//hop) float32; channel 0 real, 1 imaginary.
  """
  x = jnp.asarray(x)
  pad = n_fft // 2
  if x.shape[1] <= pad:
    raise ValueError(f"audio of {x.shape[1]} samples is too short for reflect padding ({pad})")
  num_frames = 1 + x.shape[1] // hop
  xp = jnp.pad(x, ((0, 0), (pad, pad)), mode="reflect")
  frames = _frames(xp, n_fft, hop, num_frames) * hann_window(win_length, n_fft)
  spec = jnp.fft.rfft(frames, n=n_fft, axis=-1)  # (B, T, F)
  feat = jnp.stack([spec.real, spec.imag], axis=1)  # (B, 2, T, F)
  return jnp.swapaxes(feat, 2, 3).astype(jnp.float32)


@functools.lru_cache(maxsize=None)
def _istft_envelope(num_frames: int, n_fft: int, win_length: int, hop: int) -> np.ndarray:
  """1 / overlap-added squared window over the kept output samples."""
  win_sq = hann_window(win_length, n_fft).astype(np.float64) ** 2
  total = n_fft + hop * (num_frames - 1)
  env = np.zeros(total)
  for t in range(num_frames):
    env[t * hop:t * hop + n_fft] += win_sq
  kept = env[n_fft // 2:total - n_fft // 2]
  if np.any(kept < 1e-11):
    raise ValueError("window overlap-add is zero somewhere (NOLA violated)")
  return (1.0 / kept).astype(np.float32)


def istft(feat: jnp.ndarray, n_fft: int = N_FFT, win_length: int = WIN_LENGTH,
          hop: int = HOP_LENGTH) -> jnp.ndarray:
  """Inverse of `stft` (`torch.istft(center=True, length=None)`).

  Args:
    feat: (B, 2, F, T) real/imag features.
  Returns:
    (B, hop * (T - 1)) float32 audio.
  """
  b, _, _, t = feat.shape
  spec = jax_complex(feat[:, 0], feat[:, 1])  # (B, F, T)
  frames = jnp.fft.irfft(jnp.swapaxes(spec, 1, 2), n=n_fft, axis=-1)  # (B, T, n_fft)
  frames = frames * hann_window(win_length, n_fft)
  # Overlap-add: split each frame into hop-sized blocks and sum shifted copies.
  per = -(-n_fft // hop)
  frames = jnp.pad(frames, ((0, 0), (0, 0), (0, per * hop - n_fft)))
  frames = frames.reshape(b, t, per, hop)
  out = jnp.zeros((b, t + per - 1, hop), frames.dtype)
  for k in range(per):
    out = out.at[:, k:k + t].add(frames[:, :, k])
  out = out.reshape(b, -1)
  start = n_fft // 2
  length = hop * (t - 1)
  return (out[:, start:start + length] * _istft_envelope(t, n_fft, win_length, hop)).astype(jnp.float32)


def jax_complex(re: jnp.ndarray, im: jnp.ndarray) -> jnp.ndarray:
  return re.astype(jnp.float32) + 1j * im.astype(jnp.float32)
