"""Losses, metrics and the mel front end vs. the PyTorch ESC golden fixture."""
from __future__ import annotations

import os
from pathlib import Path

import jax

jax.config.update("jax_default_matmul_precision", "highest")

import jax.numpy as jnp  # noqa: E402
import librosa  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from esc_jax import audio, audio_io, losses, metrics  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "esc_tiny" / "golden.npz"
ASSETS = Path(audio.__file__).parent / "assets"
RTOL = 1e-4


@pytest.fixture(scope="module")
def golden():
  return dict(np.load(FIXTURE))


_mel_loss = jax.jit(losses.mel_loss)
_mel_distance = jax.jit(metrics.mel_distance)
_si_sdr = jax.jit(metrics.si_sdr)


@pytest.mark.parametrize("tag", ["s6", "s2", "freeze"])
def test_training_losses(golden, tag):
  mel = _mel_loss(golden["audio"], golden[f"train_{tag}_recon"])
  np.testing.assert_allclose(mel, golden[f"train_{tag}_mel_loss"], rtol=RTOL)
  stft = losses.stft_loss(golden["spec"], golden[f"train_{tag}_recon_feat"])
  np.testing.assert_allclose(stft, golden[f"train_{tag}_stft_loss"], rtol=RTOL)


@pytest.mark.parametrize("s", range(1, 7))
def test_eval_metrics(golden, s):
  x, y = golden["audio"], golden[f"eval_recon_s{s}"]
  np.testing.assert_allclose(_mel_distance(x, y), golden[f"metric_meldist_s{s}"], rtol=RTOL)
  np.testing.assert_allclose(_si_sdr(x, y), golden[f"metric_sisdr_s{s}"], rtol=RTOL)
  util = metrics.bitrate_utilization(golden[f"codes_s{s}"], 64, decimals=4)  # original rounds
  np.testing.assert_allclose(util, golden[f"metric_utilization_s{s}"], rtol=1e-6)
  exact = metrics.bitrate_utilization(golden[f"codes_s{s}"], 64)
  assert abs(exact - golden[f"metric_utilization_s{s}"]) <= 5e-5


def test_noisy_metrics(golden):
  x, y = golden["audio"], golden["metric_noisy_audio"]
  np.testing.assert_allclose(_mel_distance(x, y), golden["metric_noisy_meldist"], rtol=RTOL)
  np.testing.assert_allclose(_si_sdr(x, y), golden["metric_noisy_sisdr"], rtol=RTOL)


def test_utilization_extremes():
  uniform = np.tile(np.arange(64), 2).reshape(1, 1, 1, 128)
  assert metrics.bitrate_utilization(uniform, 64) == pytest.approx(1.0, abs=1e-8)
  assert metrics.bitrate_utilization(np.zeros((2, 3, 3, 10), np.int32), 64) == pytest.approx(0.0, abs=1e-8)
  with pytest.raises(ValueError):
    metrics.bitrate_utilization(np.full((1, 1, 1, 4), 64), 64)


def test_power_law_sign():
  s = jnp.array([-8.0, 0.0, 8.0])
  np.testing.assert_allclose(losses.power_law(s, 1 / 3, eps=0.0), [-2.0, 0.0, 2.0], rtol=1e-6)


# torchaudio's bins are linspace(0, sr // 2, n_fft // 2 + 1) and librosa's are
# rfftfreq(n_fft, 1 / sr): identical for even n_fft and even sr (the only case
# ESC uses); for odd n_fft or odd sr the two filterbanks differ slightly.
@pytest.mark.parametrize("sr,n_fft,n_mels,f_min,f_max", [
    (16000, 32, 5, 0.0, None), (16000, 512, 40, 0.0, None), (16000, 2048, 320, 0.0, None),
    (22050, 1024, 80, 0.0, None), (24000, 1024, 100, 50.0, 11000.0)])
def test_mel_filterbank_vs_librosa(sr, n_fft, n_mels, f_min, f_max):
  fb = audio.mel_filterbank(sr, n_fft, n_mels, f_min, f_max)
  ref = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=f_min, fmax=f_max,
                            htk=True, norm=None).T
  assert fb.shape == (n_fft // 2 + 1, n_mels)
  np.testing.assert_allclose(fb, ref, atol=1e-6)


def test_mel_spectrogram_shape_and_value():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 4000)).astype(np.float32)
  m = audio.mel_spectrogram(x, n_fft=256, win_length=256, hop=64, n_mels=40)
  assert m.shape == (2, 40, 1 + 4000 // 64)
  # Reference: numpy STFT with a periodic Hann window and reflect padding.
  xp = np.pad(x[0].astype(np.float64), 128, mode="reflect")
  win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(256) / 256)
  frames = np.stack([xp[t * 64:t * 64 + 256] for t in range(m.shape[-1])])
  mag = np.abs(np.fft.rfft(frames * win, axis=-1))  # (T, F)
  ref = (mag @ audio.mel_filterbank(16000, 256, 40).astype(np.float64)).T
  np.testing.assert_allclose(m[0], ref, rtol=1e-4, atol=1e-4)


def test_mel_loss_grad_finite_on_silence(golden):
  x = jnp.asarray(golden["audio"][:, :4000])
  y = jnp.zeros_like(x).at[0, 1000:2000].set(x[0, 1000:2000])  # mostly exact zeros
  grad_fn = jax.jit(jax.grad(lambda y, x: losses.mel_loss(x, y).sum()))
  grad = grad_fn(y, x)
  assert bool(jnp.all(jnp.isfinite(grad)))
  assert float(jnp.abs(grad).max()) > 0
  grad0 = grad_fn(jnp.zeros_like(x), jnp.zeros_like(x))  # both silent
  assert bool(jnp.all(jnp.isfinite(grad0)))


@pytest.fixture(scope="module")
def speech():
  return [audio_io.load_audio(ASSETS / f"speech_{i}.wav") for i in range(2)]


def test_bundled_assets(speech):
  assert sum(os.path.getsize(ASSETS / f"speech_{i}.wav") for i in range(2)) < 200_000
  for x in speech:
    assert x.dtype == np.float32 and x.ndim == 1 and len(x) > 40000


def test_pesq_stoi(speech):
  x = speech[0]
  noisy = x + 0.005 * np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
  clean = metrics.pesq_wb(x, x)
  assert clean.shape == (1,) and clean[0] == pytest.approx(4.64, abs=0.01)
  batch = metrics.pesq_wb(np.stack([x, x]), np.stack([x, noisy]))
  assert batch[0] == pytest.approx(clean[0]) and batch[1] < clean[0] - 0.5
  assert metrics.stoi(x, x)[0] == pytest.approx(1.0, abs=1e-6)
  with pytest.warns(RuntimeWarning, match="PESQ undefined"):
    silent = metrics.pesq_wb(np.zeros((1, 16000)), np.zeros((1, 16000)))
  assert np.isnan(silent[0])
