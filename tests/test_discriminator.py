"""Parity of the adversarial discriminator and the GAN losses with the original.

Golden values: tests/fixtures/discriminator (README there), produced by the
original `esc/models/discriminator.py` (DAC's, with the real `audiotools` STFT)
and `esc/modules/loss/gan_loss.py` at ESC-Base(adv)'s config. Tolerances are
relative; where one is looser than 1e-4 a comment says why.
"""
from __future__ import annotations

import json
import pathlib
import zlib

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esc_jax import losses
from esc_jax.convert import (ConversionError, discriminator_params_to_state_dict,
                             discriminator_state_dict_to_params, discriminator_torch_name)
from esc_jax.discriminator import Discriminator, WNConv2d, make_discriminator, stft_match_stride

FIX = pathlib.Path(__file__).parent / "fixtures" / "discriminator"
NUM_PARAMS = 42_519_760  # the fixture README's count for the original


def param_value(name: str, shape) -> np.ndarray:
  """The fixture's deterministic parameter values (README formula), PyTorch layout."""
  n = int(np.prod(shape))
  k = 1.0 + (zlib.crc32(name.encode()) % 97) / 97.0
  base = np.sin(0.1 * k * (np.arange(n, dtype=np.float64) + 1.0))
  if name.endswith("weight_g"):
    v = 1.0 + 0.5 * base
  elif name.endswith("bias"):
    v = 0.01 * base
  else:
    v = base
  return v.reshape(shape).astype(np.float32)


def rel(a, b) -> float:
  """max|a - b| / max|b| in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def meta():
  return json.loads((FIX / "discriminator.json").read_text())


@pytest.fixture(scope="module")
def gold():
  return dict(np.load(FIX / "golden.npz"))


@pytest.fixture(scope="module")
def disc(meta):
  return make_discriminator(meta["config"])


@pytest.fixture(scope="module")
def template(disc):
  return jax.eval_shape(disc.init, jax.random.PRNGKey(0), jnp.zeros((1, 16000)))["params"]


@pytest.fixture(scope="module")
def torch_state(meta):
  return {name: param_value(name, shape) for name, shape in meta["parameters"]}


@pytest.fixture(scope="module")
def params(torch_state, template):
  return discriminator_state_dict_to_params(torch_state, template)


@pytest.fixture(scope="module")
def outputs(disc, params, gold):
  """One jitted discriminator step on the fixture: real feature maps (NCHW), the three
  per-item losses and the gradients of mean(loss_d) wrt the listed params (torch names)."""
  listed = {k[len("grad_d/"):] for k in gold if k.startswith("grad_d/")}
  flat = tu.flatten_dict(params)
  # Differentiate only the listed leaves (the others are closed over), so XLA does
  # not build the weight gradients nobody checks.
  wrt = {p: v for p, v in flat.items() if discriminator_torch_name(p) in listed}
  rest = {p: v for p, v in flat.items() if discriminator_torch_name(p) not in listed}
  assert len(wrt) == len(listed)

  @jax.jit
  def step(wrt, rest, real, fake):
    def loss_fn(wrt):
      p = tu.unflatten_dict({**rest, **wrt})
      d_fake = disc.apply({"params": p}, jax.lax.stop_gradient(fake))
      d_real = disc.apply({"params": p}, real)
      loss_d = losses.discriminator_adv_loss(d_fake, d_real)
      return jnp.mean(loss_d), (d_fake, d_real, loss_d)

    grads, (d_fake, d_real, loss_d) = jax.grad(loss_fn, has_aux=True)(wrt)
    return dict(real=d_real, loss_d=loss_d, loss_g=losses.generator_adv_loss(d_fake),
                loss_feat=losses.feature_matching_loss(d_fake, d_real), grads=grads)

  # (B, 1, L) input as the original takes it.
  out = jax.device_get(step(wrt, rest, gold["real"], gold["fake"]))
  out["real"] = [[np.asarray(f).transpose(0, 3, 1, 2) for f in fm] for fm in out["real"]]
  out["grads"] = discriminator_params_to_state_dict(tu.unflatten_dict(out["grads"]))
  return out


def test_param_count_and_names(meta, template, params, torch_state):
  shapes = {n: tuple(s) for n, s in meta["parameters"]}
  assert sum(int(np.prod(s)) for s in shapes.values()) == NUM_PARAMS
  assert sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(template)) == NUM_PARAMS
  back = discriminator_params_to_state_dict(params)  # the inverse mapping, torch layout
  assert {n: v.shape for n, v in back.items()} == shapes
  for n in ("discriminators.0.convs.0.0.weight_v", "discriminators.7.band_convs.4.2.0.weight_g",
            "discriminators.5.conv_post.bias"):
    np.testing.assert_array_equal(back[n], torch_state[n])
  assert params["discriminators_5"]["band_convs_2_4_0"]["weight_v"].shape == (3, 3, 32, 32)  # HWIO


def test_converter_is_strict(template, torch_state):
  sd = dict(torch_state)
  key = "discriminators.2.convs.3.0.weight_v"
  with pytest.raises(ConversionError, match="missing"):
    discriminator_state_dict_to_params({k: v for k, v in sd.items() if k != key}, template)
  with pytest.raises(ConversionError, match="unexpected"):
    discriminator_state_dict_to_params({**sd, "discriminators.8.conv_post.bias": np.zeros(1)}, template)
  with pytest.raises(ConversionError, match="shape"):
    discriminator_state_dict_to_params({**sd, key: sd[key][:, :-1]}, template)
  # torch.nn.utils.parametrizations.weight_norm names are accepted as aliases.
  alias = {k.replace(".weight_g", ".parametrizations.weight.original0")
           .replace(".weight_v", ".parametrizations.weight.original1"): v for k, v in sd.items()}
  p = discriminator_state_dict_to_params(alias, template)
  np.testing.assert_array_equal(p["discriminators_2"]["convs_3_0"]["weight_v"],
                                sd[key].transpose(2, 3, 1, 0))


def test_feature_maps(outputs, gold):
  for i, fmaps in enumerate(outputs["real"]):
    assert len(fmaps) == int(gold[f"d{i}_num_fmaps"]), i
    for j, f in enumerate(fmaps):
      g = f"d{i}_f{j}"
      assert f.shape == tuple(gold[f"{g}_shape"]), g
      std = float(gold[f"{g}_std"])
      # A mean near 0 has no relative precision of its own: compare it on the map's scale.
      assert abs(f.mean(dtype=np.float64) - gold[f"{g}_mean"]) <= 1e-4 * std, g
      assert abs(f.std(dtype=np.float64) - std) <= 1e-4 * std, g
      # 2e-4: the fixture is float32 PyTorch; this port evaluated in float64 differs from
      # it by up to 7.6e-5 (relative to the largest sampled value) in the deepest maps,
      # where 1024-channel sums cancel, so float32 here lands on either side of 1e-4.
      assert rel(f.reshape(-1)[gold[f"{g}_idx"]], gold[f"{g}_vals"]) <= 2e-4, g
    assert rel(fmaps[-1], gold[f"d{i}_logits"]) <= 2e-4, i  # as the sampled values


def test_gan_losses(outputs, gold):
  for k in ("loss_d", "loss_g", "loss_feat"):
    assert outputs[k].shape == (2,)
    assert rel(outputs[k], gold[k]) <= 1e-4, k


def test_discriminator_grads(outputs, gold):
  for k in (k for k in gold if k.startswith("grad_d/")):
    name = k[len("grad_d/"):]
    g, ref = outputs["grads"][name], gold[k]
    assert g.shape == ref.shape, name
    if ".convs.0.0." in name:
      # The MPDs' first convs get a gradient back-propagated through 5 leaky ReLUs
      # whose derivative (1 or 0.1) flips at pre-activations within float32 rounding
      # of 0: the fixture itself differs from a float64 evaluation of the same
      # function by up to 8e-3 here (periods 3, 5, 7), float32 JAX by ~3e-3.
      assert rel(g, ref) <= 3e-2, name
      cos = float(np.sum(g * ref, dtype=np.float64) / np.linalg.norm(g) / np.linalg.norm(ref))
      assert cos >= 0.9999, name
    else:
      assert rel(g, ref) <= 1e-4, name


def _conv_len(n, k, s, p):
  return (n + 2 * p - k) // s + 1


@pytest.mark.parametrize("seconds", [1, 3])
def test_output_shapes(disc, template, seconds):
  """Feature-map counts and NHWC shapes from the conv and STFT arithmetic (B = 3)."""
  length = 16000 * seconds
  out = jax.eval_shape(disc.apply, {"params": template}, jax.ShapeDtypeStruct((3, 1, length), jnp.float32))
  assert [len(f) for f in out] == [6] * 5 + [26] * 3
  for f, p in zip(out[:5], (2, 3, 5, 7, 11)):
    h = (length + p - length % p) // p
    chans = (32, 128, 512, 1024, 1024)
    for j, c in enumerate(chans):
      h = _conv_len(h, 5, 3 if j < 4 else 1, 2)
      assert f[j].shape == (3, h, p, c)
    assert f[5].shape == (3, h, p, 1)
  for f, w in zip(out[5:], (2048, 1024, 512)):
    t = -(-length // (w // 4))
    n = w // 2 + 1
    edges = [(int(lo * n), int(hi * n)) for lo, hi in ((0, .1), (.1, .25), (.25, .5), (.5, .75), (.75, 1))]
    total = 0
    for b, (lo, hi) in enumerate(edges):
      width = hi - lo
      for j, s in enumerate((1, 2, 2, 2, 1)):
        width = _conv_len(width, 9 if j < 4 else 3, s, 4 if j < 4 else 1)
        assert f[5 * b + j].shape == (3, t, width, 32)
      total += width
    assert f[25].shape == (3, t, total, 1)
    assert f[25].dtype == jnp.float32


def test_stft_frames():
  """match_stride: ceil(L / hop) frames; frame k's window starts (W - hop)/2 before k*hop."""
  x = np.random.RandomState(0).randn(1, 5000).astype(np.float32)
  w, h = 512, 128
  spec = np.asarray(stft_match_stride(x, w, h))
  assert spec.shape == (1, -(-5000 // h), w // 2 + 1, 2)
  k = 10  # an interior frame: no padding involved
  start = k * h - (w - h) // 2
  win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(w) / w)
  ref = np.fft.rfft(x[0, start:start + w].astype(np.float64) * win)
  got = spec[0, k, :, 0].astype(np.float64) + 1j * spec[0, k, :, 1]
  assert np.max(np.abs(got - ref)) <= 1e-5 * np.max(np.abs(ref))


def test_weight_norm_init():
  """At init g = ||v|| (so the kernel equals v) and v has PyTorch's Conv2d init bound."""
  m = WNConv2d(8, 4, (3, 5), act=False)
  p = jax.jit(m.init)(jax.random.PRNGKey(1), jnp.zeros((1, 6, 6, 4)))["params"]
  v, g = np.asarray(p["weight_v"]), np.asarray(p["weight_g"])
  assert v.shape == (3, 5, 4, 8) and g.shape == (1, 1, 1, 8)
  np.testing.assert_allclose(g, np.sqrt((v.astype(np.float64) ** 2).sum((0, 1, 2), keepdims=True)), rtol=1e-6)
  assert np.abs(v).max() <= 1 / np.sqrt(4 * 3 * 5)
  x = jax.random.normal(jax.random.PRNGKey(2), (1, 6, 6, 4))
  y = jax.jit(m.apply)({"params": p}, x)
  ref = jax.lax.conv_general_dilated(x, v, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(y, ref + p["bias"], rtol=1e-5, atol=1e-6)


def test_bf16_compute(gold):
  """dtype=bf16 keeps float32 params and float32 losses, close to the float32 result
  (random weights like PyTorch's init: the fixture's sinusoidal ones cancel too much for bf16)."""
  x = gold["real"][:, 0, :2000]
  rng = np.random.RandomState(0)

  def torch_like(path, leaf):  # numpy draws: much faster than threefry for 9M weights on CPU
    if path[-1].key == "weight_v":
      return rng.uniform(-1, 1, leaf.shape).astype(np.float32) / np.sqrt(np.prod(leaf.shape[:3]))
    return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32) if path[-1].key == "weight_g" else \
        rng.uniform(-0.05, 0.05, leaf.shape).astype(np.float32)

  out = {}
  for dt in (jnp.float32, jnp.bfloat16):
    d = Discriminator(periods=(3,), fft_sizes=(512,), dtype=dt)
    shapes = jax.eval_shape(d.init, jax.random.PRNGKey(0), x)
    assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(shapes))
    if dt == jnp.float32:
      p = jax.tree_util.tree_map_with_path(torch_like, shapes)
    fm = jax.jit(d.apply)(p, x)
    assert fm[0][0].dtype == dt and fm[1][-1].dtype == dt and len(fm) == 2
    out[dt] = (fm, losses.generator_adv_loss(fm))
  assert out[jnp.bfloat16][1].dtype == jnp.float32
  # bf16 keeps 8 mantissa bits: a few percent of the logits' scale.
  for a, b in zip(out[jnp.bfloat16][0], out[jnp.float32][0]):
    assert float(jnp.max(jnp.abs(a[-1].astype(jnp.float32) - b[-1])) / jnp.std(b[-1])) < 0.1
  assert rel(out[jnp.bfloat16][1], out[jnp.float32][1]) < 0.02


def test_feature_matching_detaches_real():
  """Feature matching differentiates the fake maps only (the original detaches real)."""
  fake = [[jnp.ones((2, 3, 4, 1)), jnp.zeros((2, 3, 4, 1))]]
  real = [[jnp.full((2, 3, 4, 1), 3.0), jnp.zeros((2, 3, 4, 1))]]
  g_fake, g_real = jax.grad(lambda f, r: jnp.sum(losses.feature_matching_loss(f, r)), (0, 1))(fake, real)
  assert float(jnp.abs(g_real[0][0]).max()) == 0.0
  np.testing.assert_allclose(g_fake[0][0], -np.ones((2, 3, 4, 1)) / 12)
  np.testing.assert_allclose(losses.feature_matching_loss(fake, real), [2.0, 2.0])
