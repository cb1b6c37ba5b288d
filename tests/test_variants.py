"""The ablation codecs of the original's `make_model` (csvq+conv, rvq+swinT, rvq+conv)
against the original PyTorch models (tests/fixtures/variants), plus their
BatchNorm, converter, configs and API.

Tolerances as tests/test_codec.py: codes identical; audio 1e-5 absolute; losses
rtol 1e-4; gradients rtol 1e-3 / atol 1e-6 (looser only where commented).
Every model is compiled once per program kind (AOT executables, which cannot
recompile) and reused across bitrates and cases.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import pathlib
import subprocess
import sys
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esc_jax import losses
from esc_jax.codec import ESC, CodecBase, RVQCodec, make_model
from esc_jax.config_lib import ABLATIONS
from esc_jax.convert import (ConversionError, is_derived, state_dict_to_params,
                             state_dict_to_variables, unwrap_state_dict, variables_to_state_dict)
from esc_jax.layers.conv import BatchNorm2d, ConvolutionLayer, PReLU
from esc_jax.objective import codec_loss
from esc_jax.torch_pickle import load_pth
from helpers import two_device_env

ROOT = pathlib.Path(__file__).parent.parent
FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "variants"
VARIANTS = ("tiny_csvq_conv", "tiny_rvq_swint", "tiny_rvq_conv")
CONV = ("tiny_csvq_conv", "tiny_rvq_conv")
STREAMS = range(1, 7)
TRAIN_CASES = [("s6", 6, False), ("s2", 2, False), ("freeze", 6, True)]
UNUSED = ("encoder.patch_embed.norm.weight", "encoder.patch_embed.norm.bias")  # built, never applied (conv)


class Variant(NamedTuple):
  config: dict
  model: ESC | RVQCodec
  variables: dict  # {"params", and "batch_stats" for the convolution backbone}
  state_dict: dict
  golden: dict
  vjp_ref: dict


@functools.lru_cache(maxsize=None)
def _variant(name: str) -> Variant:
  d = FIXTURES / name
  cfg = json.loads((d / "config.json").read_text())
  model = make_model(cfg["model"], cfg["model_name"])
  template = jax.eval_shape(model.init, jax.random.PRNGKey(0), np.zeros((1, 15920), np.float32))
  sd = dict(np.load(d / "state_dict.npz"))
  variables = jax.tree_util.tree_map(jnp.asarray, state_dict_to_variables(sd, template))
  return Variant(cfg, model, variables, sd, dict(np.load(d / "golden.npz")), dict(np.load(d / "vjp_reference.npz")))


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request):
  return request.param


# ---- compiled programs, one per model and kind ----

# LLVM optimisation level 0 for the test programs: a third of the compile time
# at these sizes (compiling dominates this file); XLA's HLO passes are the usual
# ones and every tolerance below holds with either level.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _compile(fn, *args):
  """AOT executable of fn for args: it cannot recompile, so one program serves every call."""
  return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)


@functools.lru_cache(maxsize=None)
def _traced(name):
  """{s: (round_trip codes (B, 6, 3, 50), round_trip audio, eval-mode forward outputs)}
  for s = 1..6 from ONE program with a traced bitrate."""
  v = _variant(name)
  x = v.golden["audio"]

  def fn(var, x, s):
    ev = v.model.apply(var, x, s)  # eval mode: BatchNorm on the running statistics, nothing mutated
    return v.model.apply(var, x, s, method="round_trip"), {k: ev[k] for k in ("recon_audio", "cm_loss", "codes")}
  exe = _compile(fn, v.variables, x, jnp.int32(1))
  return {s: jax.device_get(exe(v.variables, x, jnp.int32(s))) for s in STREAMS}


@jax.jit
def _loss_cotangent(x, spec, feat, audio):
  """dL/d(recon_feat), dL/d(recon_audio) of the training loss (shared by every variant)."""
  g_feat = jax.grad(lambda f: jnp.mean(losses.stft_loss(spec, f)))(feat)
  g_audio = jax.grad(lambda a: jnp.mean(0.25 * losses.mel_loss(x, a)))(audio)
  return g_feat, g_audio


@jax.jit
def _loss(x, out):
  return codec_loss(out, x)


def _prelu_kinks(flip, counts):
  """Interceptor for every PReLU that numbers, in call order, the inputs within
  float32 noise of the kink at 0 (|x| <= 2e-7 of the call's largest |x|, a few
  ulps of it), appends each call's count to `counts`, and gives input number
  `flip` (traced int; -1: none) the other side's slope. Everything else is the
  library's PReLU."""
  def intercept(next_fun, args, kwargs, context):
    if not (isinstance(context.module, PReLU) and context.method_name == "__call__"):
      return next_fun(*args, **kwargs)
    x, = args
    a = context.module.get_variable("params", "negative_slope").astype(x.dtype)
    near = jnp.abs(x) <= 2e-7 * jnp.max(jnp.abs(x))
    number = sum(counts, 0) + jnp.cumsum(near.ravel()).reshape(x.shape) - 1
    counts.append(jnp.sum(near, dtype=jnp.int32))
    return jnp.where(near & (number == flip), jnp.where(x > 0, a * x, x), next_fun(*args, **kwargs))
  return intercept


def _grad_step(model):
  """Training forward, BatchNorm updates and the gradient of the loss.

  The gradient is jax.vjp of the model's outputs pulled back from dL/d(outputs),
  with dL/d(outputs) evaluated at the reference activations of vjp_reference.npz,
  as tests/test_codec.py::_grad_fn does and for the same reason: the power-law
  STFT loss has slope 0.3|s|^-0.7, so at the few near-zero output bins a 1e-6
  float32 difference in the features (two PyTorch builds differ this much)
  moves the gradient by O(1). golden.npz has the loss gradients but not the
  features they were taken at (two builds of the original itself disagree with
  its gradients by up to 1e5x the tolerance, see make_vjp_reference.py), so
  vjp_reference.npz holds the original's features, audio and torch.autograd's
  pull-back of this same cotangent.

  PReLU has a kink at 0 as well: an input within float32 rounding of 0 takes
  slope 1 or 0.25 depending on the summation order of the CPU (and of jit or
  eager code), and where its cotangent is large that one element moves every
  gradient below it by up to 1%. Measured: rvq+conv s2 has such an input in
  decoder.blocks.2 (4.3e-7 in float64 arithmetic, -1.1e-6 in XLA's float32 on
  an AVX2 CPU); there the gradients of everything below it miss the original's
  by up to 600x the tolerance, and with that slope flipped they match within
  0.3x. So the step also returns how many PReLU inputs are that close to 0, and
  with `flip` = k >= 0 it gives the k-th of them the other slope.
  """
  def step(variables, x, s, freeze, g_feat, g_audio, flip):
    def outputs(p):
      counts = []
      with nn.intercept_methods(_prelu_kinks(flip, counts)):
        o, upd = model.apply({**variables, "params": p}, x, s, train=True, freeze_codebook=freeze,
                             mutable=["batch_stats"])
      kinks = sum(counts, jnp.int32(0))
      return (o["recon_feat"], o["recon_audio"], o["cm_loss"], o["cb_loss"]), (o, upd, kinks)
    _, vjp, (o, upd, kinks) = jax.vjp(outputs, variables["params"], has_aux=True)
    b = x.shape[0]
    grads = vjp((g_feat, g_audio, jnp.full((b,), 0.25 / b), jnp.full((b,), 1.0 / b)))[0]
    out = {k: o[k] for k in ("raw_feat", "recon_feat", "recon_audio", "cm_loss", "cb_loss", "codes")}
    return out, upd.get("batch_stats", {}), grads, kinks
  return step


@functools.lru_cache(maxsize=None)
def _train_exe(name):
  """The training step compiled once: every bitrate and pre-training run on it."""
  v = _variant(name)
  g, r = v.golden, v.vjp_ref
  cot = _loss_cotangent(g["audio"], g["spec"], r["train_s6_recon_feat"], r["train_s6_recon"])
  return _compile(_grad_step(v.model), v.variables, g["audio"], jnp.int32(6), jnp.bool_(False), *cot,
                  jnp.int32(-1))


@functools.lru_cache(maxsize=None)
def _train(name, tag, flip=-1):
  """(forward outputs and losses, BatchNorm statistics, gradients, PReLU inputs at the kink)."""
  v = _variant(name)
  g, r = v.golden, v.vjp_ref
  s, freeze = {t: (s, f) for t, s, f in TRAIN_CASES}[tag]
  cot = _loss_cotangent(g["audio"], g["spec"], r[f"train_{tag}_recon_feat"], r[f"train_{tag}_recon"])
  out, stats, grads, kinks = _train_exe(name)(v.variables, g["audio"], jnp.int32(s), jnp.bool_(freeze), *cot,
                                              jnp.int32(flip))
  loss, terms = _loss(g["audio"], out)
  return (jax.device_get(dict(terms, loss=loss, recon=out["recon_audio"], codes=out["codes"])),
          variables_to_state_dict({"batch_stats": stats}), variables_to_state_dict({"params": grads}),
          int(kinks))


# ---- parity with the original ----

@pytest.mark.parametrize("s", STREAMS)
def test_codes_identical_and_audio(variant, s):
  """round_trip (one program for all bitrates) gives the reference codes, and audio
  within 1e-5 of the original's decode of them."""
  g = _variant(variant).golden
  (codes, audio), _ = _traced(variant)[s]
  assert codes.dtype == np.int32 and codes.shape == (2, 6, 3, 50)
  np.testing.assert_array_equal(codes[:, :s], g[f"codes_s{s}"])
  assert np.abs(audio - g[f"decoded_s{s}"]).max() <= 1e-5


def test_decoding_the_first_streams_equals_round_trip(variant):
  """Decoding the first s of all six streams' codes (s traced) gives round_trip's audio."""
  v = _variant(variant)
  codes = _traced(variant)[6][0][0]
  np.testing.assert_array_equal(codes[:, :3], v.golden["codes_s3"])  # a stream's codes ignore later ones
  decode_first = jax.jit(lambda var, c, s: v.model.apply(var, c, s, method="decode"))
  for s in STREAMS:
    np.testing.assert_array_equal(decode_first(v.variables, codes, jnp.int32(s)), _traced(variant)[s][0][1])


@pytest.mark.parametrize("s", STREAMS)
def test_eval_forward(variant, s):
  """Evaluation mode (BatchNorm on the running statistics; nothing is mutated)."""
  g = _variant(variant).golden
  _, out = _traced(variant)[s]
  assert np.abs(out["recon_audio"] - g[f"eval_recon_s{s}"]).max() <= 1e-5
  np.testing.assert_allclose(out["cm_loss"], g[f"eval_cm_s{s}"], rtol=1e-4)
  np.testing.assert_array_equal(out["codes"][:, :s], g[f"codes_s{s}"])


def test_static_bitrate_programs(variant):
  """With a Python-int bitrate (streams >= s skipped): encode, decode and the eval
  forward match the reference, and round_trip equals encode + decode bit for bit."""
  v = _variant(variant)
  s, x, ref_codes = 3, v.golden["audio"], v.golden["codes_s3"]

  def fn(var, x, c):
    ev = v.model.apply(var, x, s)
    return (v.model.apply(var, x, s, method="encode"), v.model.apply(var, c, method="decode"),
            {k: ev[k] for k in ("recon_audio", "cm_loss", "codes")})
  codes, audio, out = jax.device_get(_compile(fn, v.variables, x, ref_codes)(v.variables, x, ref_codes))
  np.testing.assert_array_equal(codes, ref_codes)
  (rt_codes, rt_audio), _ = _traced(variant)[s]  # another program
  np.testing.assert_array_equal(rt_codes[:, :s], codes)
  np.testing.assert_array_equal(rt_audio, audio)
  assert out["codes"].shape == (2, s, 3, 50)
  np.testing.assert_array_equal(out["codes"], ref_codes)
  assert np.abs(out["recon_audio"] - v.golden[f"eval_recon_s{s}"]).max() <= 1e-5
  np.testing.assert_allclose(out["cm_loss"], v.golden[f"eval_cm_s{s}"], rtol=1e-4)


@pytest.mark.parametrize("tag", [t for t, _, _ in TRAIN_CASES])
def test_train_forward(variant, tag):
  g = _variant(variant).golden
  out, _, _, _ = _train(variant, tag)
  assert np.abs(out["recon"] - g[f"train_{tag}_recon"]).max() <= 1e-5
  np.testing.assert_array_equal(out["codes"], g[f"train_{tag}_codes"])
  assert out["codes"].shape == (2, 6, 3, 50)  # every stream's codes in training mode
  for k in ("cm_loss", "cb_loss", "mel_loss", "stft_loss", "loss"):
    np.testing.assert_allclose(out[k], g[f"train_{tag}_{k}"], rtol=1e-4, err_msg=k)
  if tag == "freeze":
    assert np.all(out["cm_loss"] == 0) and np.all(out["cb_loss"] == 0)


@pytest.mark.parametrize("tag", [t for t, _, _ in TRAIN_CASES])
def test_batchnorm_running_stats_after_training_step(variant, tag):
  """Running mean/var after one training forward: momentum 0.1, unbiased variance."""
  g = _variant(variant).golden
  _, stats, _, _ = _train(variant, tag)
  ref = {k.split("/", 1)[1]: a for k, a in g.items() if k.startswith(f"bn_after_{tag}/")}
  assert set(stats) == set(ref)
  assert bool(ref) == (variant in CONV)
  for k, a in ref.items():
    np.testing.assert_allclose(stats[k], a, rtol=1e-4, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("tag", [t for t, _, _ in TRAIN_CASES])
def test_gradients_every_parameter(variant, tag):
  """Every parameter's gradient against the original's. At a PReLU input within
  float32 rounding of 0 (see _grad_step) the original may have taken the other
  slope: the gradients must match with our slopes, or with one such input's flipped."""
  v = _variant(variant)
  _, _, grads, kinks = _train(variant, tag)
  ref = {k.split("/", 1)[1]: a for k, a in v.vjp_ref.items() if k.startswith(f"grad_{tag}/")}
  unused = set(UNUSED) if variant in CONV else set()
  assert set(grads) == set(ref) | unused  # torch gives no gradient to unused parameters ...
  for k in unused:
    assert np.all(grads[k] == 0)  # ... and ours is exactly zero
  assert ref.keys() == {k.split("/", 1)[1] for k in v.golden if k.startswith(f"grad_{tag}/")}

  def atol(a):
    # Convolution backbone: train-mode BatchNorm's backward subtracts batch means of
    # the incoming gradient at each of its ~25 layers, so float32 cancellation noise
    # reaches ~1e-5 of a tensor's largest entry (measured: relative Frobenius error
    # ~1e-5 in every tensor); entries far below that are compared at that level.
    return max(1e-6, 1e-5 * float(np.abs(a).max())) if variant in CONV else 1e-6

  def matches(grads):
    return all(np.allclose(grads[k], a, rtol=1e-3, atol=atol(a)) for k, a in ref.items())

  if not matches(grads) and any(matches(_train(variant, tag, k)[2]) for k in range(kinks)):
    return  # the original took the other slope at one kink
  for k, a in ref.items():
    np.testing.assert_allclose(grads[k], a, rtol=1e-3, atol=atol(a), err_msg=f"{k} (PReLU inputs at the kink: {kinks})")


def test_vjp_reference_is_the_fixture_forward(variant):
  """vjp_reference.npz comes from the same original forward as golden.npz (to float32 noise)."""
  v = _variant(variant)
  for tag, _, _ in TRAIN_CASES:
    assert np.abs(v.vjp_ref[f"train_{tag}_recon"] - v.golden[f"train_{tag}_recon"]).max() <= 1e-6


# ---- converter ----

def test_state_dict_roundtrip_and_pth(variant):
  v = _variant(variant)
  back = variables_to_state_dict(jax.device_get(v.variables))
  kept = {k for k in v.state_dict if not is_derived(k) and not k.endswith("num_batches_tracked")}
  assert set(back) == kept
  for k in kept:
    np.testing.assert_array_equal(back[k], v.state_dict[k], err_msg=k)
  assert ("batch_stats" in v.variables) == (variant in CONV)
  pth = unwrap_state_dict(load_pth(FIXTURES / variant / "model.pth"), variant)
  assert set(pth) == set(v.state_dict)
  for k, a in pth.items():
    np.testing.assert_array_equal(a, v.state_dict[k], err_msg=k)


def _convert(name, sd):
  v = _variant(name)
  return state_dict_to_variables(sd, jax.eval_shape(lambda: v.variables))


@pytest.mark.parametrize("case,words", [
    ("missing", ["missing", "decoder.blocks.4.blocks.2.running_var"]),
    ("extra", ["unexpected", "encoder.pre_nn.running_mean"]),
    ("prelu", ["shape mismatch", "encoder.blocks.0.blocks.3.weight", "(2,)"]),
    ("transpose", ["shape mismatch", "decoder.blocks.0.blocks.1.conv.weight"]),
])
def test_strict_conversion_errors(case, words):
  sd = dict(_variant("tiny_csvq_conv").state_dict)
  if case == "missing":
    del sd["decoder.blocks.4.blocks.2.running_var"]
  elif case == "extra":
    sd["encoder.pre_nn.running_mean"] = np.zeros(8, np.float32)
  elif case == "prelu":
    sd["encoder.blocks.0.blocks.3.weight"] = np.zeros(2, np.float32)
  else:  # a ConvTranspose2d weight in Conv2d layout (out, in, kh, kw) is caught
    sd["decoder.blocks.0.blocks.1.conv.weight"] = sd["decoder.blocks.0.blocks.1.conv.weight"].transpose(1, 0, 2, 3)
  with pytest.raises(ConversionError) as e:
    _convert("tiny_csvq_conv", sd)
  msg = str(e.value)
  assert "\n" not in msg and all(w in msg for w in words), msg


def test_params_only_conversion_points_to_variables(tmp_path):
  v = _variant("tiny_rvq_conv")
  with pytest.raises(ConversionError, match="state_dict_to_variables"):
    state_dict_to_params(v.state_dict, jax.eval_shape(lambda: v.variables["params"]))
  # Without BatchNorm the existing function serves the RVQ codec unchanged.
  w = _variant("tiny_rvq_swint")
  params = state_dict_to_params(w.state_dict, jax.eval_shape(lambda: w.variables["params"]))
  np.testing.assert_array_equal(params["quantizers"]["vqs_2"]["vqs_5"]["embedding"]["embedding"],
                                w.state_dict["quantizers.vqs.2.vqs.5.embedding.weight"])


# ---- BatchNorm and the convolution layers ----

def test_batchnorm_is_torch_batchnorm2d():
  """Training: batch statistics (biased var) normalise, running stats move 0.1 towards
  mean and the unbiased var; evaluation: running stats normalise."""
  rng = np.random.default_rng(0)
  x = rng.normal(1.5, 2.0, (3, 5, 4, 6)).astype(np.float32)
  bn = BatchNorm2d(6)
  var = {"params": {"scale": rng.uniform(0.5, 1.5, 6).astype(np.float32), "bias": rng.normal(0, 0.1, 6).astype(np.float32)},
         "batch_stats": {"mean": rng.normal(0, 0.1, 6).astype(np.float32), "var": rng.uniform(0.5, 1.5, 6).astype(np.float32)}}
  y, upd = bn.apply(var, x, True, mutable=["batch_stats"])
  x64 = x.astype(np.float64)
  m, v = x64.mean((0, 1, 2)), x64.var((0, 1, 2))
  p, s = var["params"], var["batch_stats"]
  np.testing.assert_allclose(np.asarray(y), (x64 - m) / np.sqrt(v + 1e-5) * p["scale"] + p["bias"], atol=1e-5)
  n = x.size // 6
  np.testing.assert_allclose(np.asarray(upd["batch_stats"]["mean"]), 0.9 * s["mean"] + 0.1 * m, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(upd["batch_stats"]["var"]), 0.9 * s["var"] + 0.1 * v * n / (n - 1), rtol=1e-6)
  y_eval = bn.apply(var, x, False)  # no mutable collection needed
  np.testing.assert_allclose(np.asarray(y_eval), (x64 - s["mean"]) / np.sqrt(s["var"] + 1e-5) * p["scale"] + p["bias"],
                             atol=1e-5)


def test_convolution_layer_bfloat16():
  """dtype=bfloat16 computes in bf16; params and running statistics stay float32."""
  x = np.random.default_rng(1).normal(size=(2, 8, 6, 4)).astype(np.float32)
  layers = [ConvolutionLayer(4, 6, transpose=True, dtype=dt) for dt in (jnp.float32, jnp.bfloat16)]
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(layers[0].init, jax.random.PRNGKey(0), x)
  var = {"params": jax.tree_util.tree_map(lambda a: rng.normal(0, 0.3, a.shape).astype(np.float32), shapes["params"]),
         "batch_stats": jax.tree_util.tree_map(lambda a: rng.uniform(0.5, 1.5, a.shape).astype(np.float32),
                                               shapes["batch_stats"])}
  run = jax.jit(lambda var, x: [m.apply(var, x, True, mutable=["batch_stats"]) for m in layers])
  (y32, s32), (y16, s16) = run(var, x)
  assert y16.dtype == jnp.bfloat16 and y32.shape == y16.shape == (2, 16, 6, 6)
  assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves((var, s16)))
  np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(y32), atol=0.1)
  for a, b in zip(jax.tree_util.tree_leaves(s16), jax.tree_util.tree_leaves(s32)):
    np.testing.assert_allclose(a, b, rtol=0.05, atol=0.02)


_SHARDED_BN = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from esc_jax.layers.conv import BatchNorm2d
assert jax.device_count() == 2
x = np.random.default_rng(0).normal(size=(4, 6, 5, 3)).astype(np.float32)
x[2:] += 3.0  # the two devices' halves have different statistics
bn = BatchNorm2d(3)
var = bn.init(jax.random.PRNGKey(0), x)
step = jax.jit(lambda v, x: bn.apply(v, x, True, mutable=["batch_stats"]))
mesh = Mesh(np.array(jax.devices()), ("data",))
xs = jax.device_put(x, NamedSharding(mesh, P("data")))
vs = jax.device_put(var, NamedSharding(mesh, P()))
(y1, s1), (y2, s2) = step(var, x), step(vs, xs)
assert len(xs.sharding.device_set) == 2
np.testing.assert_allclose(np.asarray(y2), np.asarray(y1), atol=1e-5)
for a, b in zip(jax.tree_util.tree_leaves(s2), jax.tree_util.tree_leaves(s1)):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5)
print("ok")
"""


def test_batchnorm_statistics_are_global_under_sharding():
  """A batch sharded over two devices gives the statistics of the whole batch."""
  env = two_device_env(PYTHONPATH=str(ROOT))
  res = subprocess.run([sys.executable, "-c", _SHARDED_BN], capture_output=True, text=True, env=env, cwd=ROOT)
  assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


# ---- make_model, configs, shared geometry ----

def _ablation_config(stem):
  spec = importlib.util.spec_from_file_location(stem, ROOT / "configs" / "ablations" / f"{stem}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


@pytest.mark.parametrize("stem,name,n_params,n_stats", [  # sizes of the original's models
    ("csvq_swinT", "csvq+swinT", 8_386_373, 0), ("csvq_conv", "csvq+conv", 9_116_648, 8_622),
    ("rvq_swinT", "rvq+swinT", 8_177_477, 0), ("rvq_conv", "rvq+conv", 8_907_752, 8_622)])
def test_ablation_configs_build_the_original_sizes(stem, name, n_params, n_stats):
  c = _ablation_config(stem)
  assert c.model_name == name and dict(c.model) == ABLATIONS[name]
  model = make_model(c.model, c.model_name)
  assert isinstance(model, RVQCodec if name.startswith("rvq") else ESC)
  x = jax.ShapeDtypeStruct((2, 47920), jnp.float32)
  var = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  size = lambda t: sum(a.size for a in jax.tree_util.tree_leaves(t))
  assert size(var["params"]) == n_params and size(var.get("batch_stats", {})) == n_stats
  codes = jax.eval_shape(lambda v, x: model.apply(v, x, 6, method="encode"), var, x)
  assert codes.shape == (2, 6, 3, 150) and codes.dtype == jnp.int32
  assert model.kbps(6) == 9.0 and model.valid_length(47920) == 47920


def test_geometry_defined_once():
  for member in ("valid_length", "num_frames", "frames_to_samples", "kbps", "samples_per_frame", "kbps_per_stream"):
    assert member not in vars(ESC) and member not in vars(RVQCodec) and member in vars(CodecBase)
  rvq = make_model(ABLATIONS["rvq+swinT"], "rvq+swinT")
  esc = make_model(ABLATIONS["csvq+swinT"], "csvq+swinT")
  assert rvq.samples_per_frame == esc.samples_per_frame == 320
  assert rvq.num_frames(12345) == esc.num_frames(12345) == 39 and rvq.kbps_per_stream == 1.5


@pytest.mark.parametrize("name,change,match", [
    ("bogus+conv", {}, "not supported"),
    ("rvq+conv", {"codebook_dims": [8] * 6}, "unknown RVQCodec model keyword"),
    ("csvq+conv", {"num_rvqs": 6}, "unknown ESC model keyword"),
    ("rvq+conv", {"backbone": "transformer"}, "needs backbone='convolution'"),
    ("rvq+conv", {"codebook_dim": [8] * 6}, "codebook_dim must be one integer"),
])
def test_make_model_errors(name, change, match):
  base = ABLATIONS.get(name, ABLATIONS["rvq+conv"])
  with pytest.raises(ValueError, match=match):
    make_model(dict(base, **change), name)


def test_make_model_fills_backbone_and_checks_depth():
  cfg = {k: v for k, v in ABLATIONS["csvq+conv"].items() if k != "backbone"}
  assert make_model(cfg, "csvq+conv").backbone == "convolution"
  with pytest.raises(ValueError, match="num_rvqs=4 must equal max_streams=6"):  # when made, before tracing
    make_model(dict(ABLATIONS["rvq+swinT"], num_rvqs=4), "rvq+swinT")
