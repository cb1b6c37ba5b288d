"""Audio front end: torch-exact complex STFT / iSTFT and mel spectrogram for ESC.

(Reading and writing audio files: `esc_jax.audio_io`.)

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


def frame_signal(x: jnp.ndarray, n_fft: int, hop: int, num_frames: int):
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
  frames = frame_signal(xp, n_fft, hop, num_frames) * hann_window(win_length, n_fft)
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


# ---------------------------------------------------------------------------
# Mel spectrogram (torchaudio.transforms.MelSpectrogram as ESC's losses use it)
# ---------------------------------------------------------------------------


def _hz_to_mel_htk(f):
  return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)


def _mel_to_hz_htk(m):
  return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


@functools.lru_cache(maxsize=None)
def mel_filterbank(sr: int, n_fft: int, n_mels: int, f_min: float = 0.0,
                   f_max: float | None = None) -> np.ndarray:
  """`torchaudio.functional.melscale_fbanks(norm=None, mel_scale="htk")`.

  Triangular filters by linear interpolation in Hz between `n_mels + 2`
  HTK-mel-spaced points. As in torchaudio the bin frequencies are
  `linspace(0, sr // 2, n_fft // 2 + 1)` (librosa uses `rfftfreq`, which
  differs for odd `n_fft`; for the even sizes of the losses this equals
  `librosa.filters.mel(htk=True, norm=None)` exactly; tests check it). Computed in float64, returned as float32.
  The returned array is cached: treat it as read-only.

  Returns:
    (n_fft // 2 + 1, n_mels) float32 filterbank.
  """
  f_max = float(sr // 2) if f_max is None else float(f_max)
  n_freqs = n_fft // 2 + 1
  all_freqs = np.linspace(0.0, float(sr // 2), n_freqs)
  m_pts = np.linspace(_hz_to_mel_htk(f_min), _hz_to_mel_htk(f_max), n_mels + 2)
  f_pts = _mel_to_hz_htk(m_pts)
  f_diff = np.diff(f_pts)  # (n_mels + 1,)
  slopes = f_pts[None, :] - all_freqs[:, None]  # (n_freqs, n_mels + 2)
  down = -slopes[:, :-2] / f_diff[:-1]
  up = slopes[:, 2:] / f_diff[1:]
  fb = np.maximum(0.0, np.minimum(down, up)).astype(np.float32)
  fb.setflags(write=False)
  return fb


def safe_magnitude(re: jnp.ndarray, im: jnp.ndarray) -> jnp.ndarray:
  """|re + i im| with a zero (not NaN) gradient at the origin, like torch."""
  p = re * re + im * im
  nz = p > 0
  return jnp.where(nz, jnp.sqrt(jnp.where(nz, p, 1.0)), 0.0)


def mel_spectrogram(x: jnp.ndarray, sr: int = SAMPLE_RATE, n_fft: int = 1024,
                    win_length: int | None = None, hop: int | None = None,
                    n_mels: int = 80, power: float = 1.0, f_min: float = 0.0,
                    f_max: float | None = None) -> jnp.ndarray:
  """`torchaudio.transforms.MelSpectrogram` (centre reflect padding, periodic
  Hann of `win_length` centred in `n_fft`, onesided, HTK mel, no filter norm).

  Jit-able and differentiable (finite gradients on silence).

  Args:
    x: (B, L) float audio.
    win_length / hop: default `n_fft` / `win_length // 2` (torchaudio defaults).
    power: exponent of the magnitude (1 = magnitude, 2 = power).
  Returns:
    (B, n_mels, 1 + L // hop) float32.
  """
  win_length = n_fft if win_length is None else win_length
  hop = win_length // 2 if hop is None else hop
  feat = stft(x, n_fft=n_fft, win_length=win_length, hop=hop)  # (B, 2, F, T)
  spec = safe_magnitude(feat[:, 0], feat[:, 1])
  if power != 1.0:
    spec = spec ** power
  fb = mel_filterbank(sr, n_fft, n_mels, f_min, f_max)
  mel = jnp.einsum("bft,fm->bmt", spec, fb, precision="highest")
  return mel.astype(jnp.float32)
