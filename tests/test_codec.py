"""Parity of the Flax ESC with the original PyTorch model (tests/fixtures/esc_tiny).

Tolerances: codes must be identical; audio from decoding reference codes within
1e-5 absolute; hidden states within 1e-4 absolute (LayerNorm outputs of O(1));
training losses within 1e-4 relative; gradients rtol 1e-3 / atol 1e-6.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esc_jax import audio
from esc_jax.api import Codec
from esc_jax.codec import ESC, make_model
from esc_jax.config_lib import ESC_BASE
from esc_jax.convert import params_to_state_dict
from esc_jax.objective import codec_loss
from esc_jax import losses

STREAMS = range(1, 7)
TRAIN_CASES = [("s6", 6, False), ("s2", 2, False), ("freeze", 6, True)]


@functools.lru_cache(maxsize=None)
def _jitted(model, name):
  if name == "decode":
    return jax.jit(lambda p, c: model.apply({"params": p}, c, method=ESC.decode_features))
  if name == "eval":
    return jax.jit(lambda p, x, s: model.apply({"params": p}, x, s), static_argnums=2)
  if name == "train":
    return jax.jit(lambda p, x, s, f: model.apply({"params": p}, x, s, train=True, freeze_codebook=f))
  raise KeyError(name)


def test_stft_matches_torch(golden):
  spec = np.asarray(audio.stft(golden["audio"]))
  assert spec.shape == (2, 2, 192, 200)
  np.testing.assert_allclose(spec, golden["spec"], rtol=0, atol=2e-5)  # |spec| up to 36
  np.testing.assert_allclose(np.asarray(audio.istft(golden["spec"])), golden["audio"], atol=1e-6)


def test_encoder_every_scale(tiny, golden):
  model, params = tiny
  out = _jitted(model, "eval")(params, golden["audio"], 6)
  for i in range(6):
    np.testing.assert_allclose(np.asarray(out["enc_hs"][i]), golden[f"enc_h{i}"], rtol=0, atol=1e-4,
                               err_msg=f"enc_h{i}")


@pytest.fixture(scope="module")
def codec(tiny):
  return Codec(*tiny)


@pytest.mark.parametrize("s", STREAMS)
def test_encode_codes_identical(codec, golden, s):
  codes = codec.encode(golden["audio"], s)
  assert codes.dtype == np.int32 and codes.shape == (2, s, 3, 50)
  np.testing.assert_array_equal(codes, golden[f"codes_s{s}"])


@pytest.mark.parametrize("s", STREAMS)
def test_decode_reference_codes(codec, golden, s):
  wav = codec.decode(golden[f"codes_s{s}"])
  assert np.abs(wav - golden[f"decoded_s{s}"]).max() <= 1e-5


def test_decoder_states(tiny, golden):
  model, params = tiny
  dec_hs, feat = _jitted(model, "decode")(params, golden["codes_s6"])
  for k in range(6):
    np.testing.assert_allclose(np.asarray(dec_hs[k]), golden[f"dec_h{k}_s6"], rtol=0, atol=1e-4,
                               err_msg=f"dec_h{k}")
  np.testing.assert_allclose(np.asarray(feat), golden["dec_h6_s6"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("s", [1, 3, 6])  # eval mode skips streams >= s: ends and middle
def test_eval_forward(tiny, golden, s):
  model, params = tiny
  out = _jitted(model, "eval")(params, golden["audio"], s)
  assert np.abs(np.asarray(out["recon_audio"]) - golden[f"eval_recon_s{s}"]).max() <= 1e-5
  np.testing.assert_allclose(np.asarray(out["cm_loss"]), golden[f"eval_cm_s{s}"], rtol=1e-4)
  np.testing.assert_array_equal(np.asarray(out["codes"]), golden[f"codes_s{s}"])


@pytest.mark.parametrize("tag,s,freeze", TRAIN_CASES)
def test_train_forward(tiny, golden, tag, s, freeze):
  model, params = tiny
  x = golden["audio"]
  out = _jitted(model, "train")(params, x, jnp.int32(s), jnp.bool_(freeze))
  loss, terms = codec_loss(out, x)
  assert np.abs(np.asarray(out["recon_audio"]) - golden[f"train_{tag}_recon"]).max() <= 1e-5
  np.testing.assert_allclose(np.asarray(out["recon_feat"]), golden[f"train_{tag}_recon_feat"], atol=1e-4)
  np.testing.assert_array_equal(np.asarray(out["codes"]), golden[f"train_{tag}_codes"])
  for k, v in terms.items():
    np.testing.assert_allclose(np.asarray(v), golden[f"train_{tag}_{k}"], rtol=1e-4, err_msg=k)
  np.testing.assert_allclose(float(loss), golden[f"train_{tag}_loss"], rtol=1e-4)
  if freeze:
    assert np.all(np.asarray(out["cm_loss"]) == 0) and np.all(np.asarray(out["cb_loss"]) == 0)


def test_train_forward_one_program_all_bitrates(tiny, golden):
  """One compiled executable (AOT: it cannot recompile) serves every bitrate and pre-training."""
  model, params = tiny
  x = golden["audio"]
  fn = _jitted(model, "train").lower(params, x, jnp.int32(6), jnp.bool_(False)).compile()
  seen = set()
  for s in STREAMS:
    for f in (False, True):
      seen.add(tuple(np.round(np.asarray(fn(params, x, jnp.int32(s), jnp.bool_(f))["cm_loss"]), 4)))
  assert len(seen) == 7  # 6 bitrates + pre-training (all-zero losses) give distinct results


def test_round_trip_equals_encode_then_decode(codec, golden):
  """The traced-bitrate round trip (one program) is bit-identical to encode + decode, and
  so is decoding the first s streams of all six streams' codes with a traced s: a
  stream's codes do not depend on the streams after it."""
  model, params = codec.model, codec.params
  fn = jax.jit(lambda p, x, s: model.apply({"params": p}, x, s, method=ESC.round_trip))
  decode_first = jax.jit(lambda p, c, s: model.apply({"params": p}, c, s, method=ESC.decode))
  x = golden["audio"]
  all_codes = codec.encode(x, 6)
  for s in STREAMS:
    codes, audio_rt = jax.device_get(fn(params, x, jnp.int32(s)))
    ref_codes = codec.encode(x, s)
    np.testing.assert_array_equal(codes[:, :s], ref_codes)
    np.testing.assert_array_equal(all_codes[:, :s], ref_codes)
    ref_audio = codec.decode(ref_codes)
    np.testing.assert_array_equal(audio_rt, ref_audio)
    np.testing.assert_array_equal(decode_first(params, all_codes, jnp.int32(s)), ref_audio)


@functools.lru_cache(maxsize=None)
def _grad_fn(model):
  """Gradient of the training loss through the model (jax.vjp of the model's
  outputs, pulled back from dL/d(outputs)), with the loss's own gradient
  evaluated at the reference activations.

  The power-law STFT loss has slope 0.3|s|^-0.7 near s = 0, so a 1e-7 float32
  difference in a near-zero STFT bin moves dL/ds by O(1) (the fixture has a bin
  at 2e-7). Evaluating dL/d(outputs) at the reference outputs and pulling it back
  with our VJP tests every backward rule of the model exactly; the loss's own
  gradients are tested separately at those same points.
  """
  @jax.jit
  def fn(params, x, s, freeze, ref_feat, ref_audio, raw_feat):
    """Gradient of the loss; dL/d(outputs) is evaluated at (ref_feat, ref_audio)."""
    def outputs(p):
      o = model.apply({"params": p}, x, s, train=True, freeze_codebook=freeze)
      return o["recon_feat"], o["recon_audio"], o["cm_loss"], o["cb_loss"]
    _, vjp = jax.vjp(outputs, params)
    b = x.shape[0]
    g_feat = jax.grad(lambda f: jnp.mean(losses.stft_loss(raw_feat, f)))(ref_feat)
    g_audio = jax.grad(lambda a: jnp.mean(0.25 * losses.mel_loss(x, a)))(ref_audio)
    cot = (g_feat, g_audio, jnp.full((b,), 0.25 / b), jnp.full((b,), 1.0 / b))
    return vjp(cot)[0]
  return fn


@pytest.mark.parametrize("tag,s,freeze", TRAIN_CASES)
def test_gradients_every_parameter(tiny, golden, tag, s, freeze):
  model, params = tiny
  fn = _grad_fn(model)
  grads = params_to_state_dict(fn(params, golden["audio"], jnp.int32(s), jnp.bool_(freeze),
                                  golden[f"train_{tag}_recon_feat"], golden[f"train_{tag}_recon"],
                                  golden["spec"]))
  ref_keys = {k.split("/", 1)[1] for k in golden if k.startswith(f"grad_{tag}/")}
  assert set(grads) == ref_keys
  for name, g in grads.items():
    np.testing.assert_allclose(g, golden[f"grad_{tag}/{name}"], rtol=1e-3, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("batch", [1, 4])
def test_shapes_three_seconds(codec, batch):
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(batch), (batch, 47920))) * 0.1
  codes = codec.encode(x, 6)
  assert codes.shape == (batch, 6, 3, 150)
  wav = codec.decode(codes[:, :3])
  assert wav.shape == (batch, 47920) and np.all(np.isfinite(wav))


def test_esc_base_size_and_shapes():
  model = make_model(ESC_BASE)
  x = jax.ShapeDtypeStruct((4, 47920), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
  assert sum(p.size for p in jax.tree_util.tree_leaves(params)) == 8_736_581  # the original's count
  codes = jax.eval_shape(lambda p, x: model.apply({"params": p}, x, 6, method=ESC.encode), params, x)
  assert codes.shape == (4, 6, 3, 150) and codes.dtype == jnp.int32
  wav = jax.eval_shape(lambda p, c: model.apply({"params": p}, c, method=ESC.decode), params, codes)
  assert wav.shape == (4, 47920)


def test_invalid_arguments(tiny, golden):
  model, params = tiny
  encode = lambda x, s: jax.eval_shape(lambda p, x: model.apply({"params": p}, x, s, method=ESC.encode),
                                       params, x)
  with pytest.raises(ValueError, match="num_streams"):
    encode(golden["audio"], 7)
  with pytest.raises(ValueError, match="multiple of overlap"):
    encode(golden["audio"][:, :15760], 6)
  decode = lambda c, s: jax.eval_shape(lambda p, c: model.apply({"params": p}, c, s, method=ESC.decode), params, c)
  assert decode(np.zeros((1, 6, 3, 50), np.int32), 2).shape == (1, 15920)
  with pytest.raises(ValueError, match="needs codes of all 6 streams, got 3"):
    decode(np.zeros((1, 3, 3, 50), np.int32), 2)
  with pytest.raises(ValueError, match="num_streams"):
    decode(np.zeros((1, 6, 3, 50), np.int32), 7)
  with pytest.raises(ValueError, match="unknown ESC model keyword"):
    make_model(dict(ESC_BASE, bogus=1))
  # Lengths are checked when the model is made, before any tracing.
  with pytest.raises(ValueError, match="swin_heads has 4 entries; expected len\\(h_dims\\) - 1 = 5"):
    make_model(dict(ESC_BASE, swin_heads=[3, 6, 12, 24]))
  with pytest.raises(ValueError, match="codebook_dims has 5 entries but max_streams=6"):
    make_model(dict(ESC_BASE, codebook_dims=[8] * 5))
  with pytest.raises(ValueError, match="h_dims has 5 scales"):
    make_model(dict(ESC_BASE, h_dims=[45, 72, 96, 144, 192]))


def test_numpy_stream_counts_are_concrete(codec, golden):
  """A numpy integer stream count is a Python one: range-checked, and encode returns that many streams."""
  model, params, x = codec.model, codec.params, golden["audio"]
  codes = jax.eval_shape(lambda p, x: model.apply({"params": p}, x, np.int64(3), method=ESC.encode), params, x)
  assert codes.shape[1] == 3
  with pytest.raises(ValueError, match="num_streams must be an integer in 1..6, got 7"):
    jax.eval_shape(lambda p, x: model.apply({"params": p}, x, np.int32(7), method=ESC.encode), params, x)
  with pytest.raises(ValueError, match="length must be an integer"):
    codec.decode(np.zeros((1, 3, 2), np.int32), length=-80)
