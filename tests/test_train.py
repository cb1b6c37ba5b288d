"""Training (esc_jax.train_lib, train.py): recipe, one compile, resume, devices, checkpoints.

One compiled program (`train_lib.build`) serves every in-process run. One tiny-model
run (workdir "a": steps 0-1, restart, 1-5, restart, 5-30) serves most tests; a
straight 10-step run and a 2-device train.py run are compared with it.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import subprocess
import sys

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import esc_jax
from esc_jax import checkpoint as ckpt
from esc_jax import kernels, losses, train_lib
from esc_jax.checkpoint import restore_params
from esc_jax.codec import make_model
from helpers import COMPILE_WITH_IR_EMITTERS, IR_EMITTERS, assert_trees_close, two_device_env

ROOT = pathlib.Path(__file__).absolute().parents[1]
# The test recipe: configs/smoke.py plus these overrides (also passed to train.py).
OVERRIDES = {"train.num_steps": 30, "train.pretrain_steps": 5, "optim.lr": 1e-3, "ckpt.every_steps": 10,
             "ckpt.keep": 10, "eval.every_steps": 20, "log.every_steps": 1, "log.tensorboard": False}


def _config(**extra):
  sys.path.insert(0, str(ROOT / "configs"))
  try:
    import smoke  # configs/smoke.py
  finally:
    sys.path.pop(0)
  c = smoke.get_config()
  for k, v in {**OVERRIDES, **extra}.items():
    sec, name = k.split(".")
    c[sec][name] = v
  return c


def _rows(workdir, key):
  rows = [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r for r in rows if key in r}


def _params(workdir, step):
  return restore_params(workdir, make_model(_config().model), step)


@pytest.fixture(scope="module")
def program():
  """The compiled train step of the test recipe, shared by every in-process run."""
  return train_lib.build(_config())


@pytest.fixture(scope="module")
def two_device_run(tmp_path_factory):
  """train.py for one step on 2 forced host devices, started early (it compiles alongside run_a)."""
  wd = tmp_path_factory.mktemp("two_devices")
  env = two_device_env(JAX_DEFAULT_MATMUL_PRECISION="highest")
  env["XLA_FLAGS"] = f"{env['XLA_FLAGS']} {IR_EMITTERS}".strip()  # compared with tolerances
  args = [f"--config.{k}={v}" for k, v in {**OVERRIDES, "train.num_steps": 1}.items()]
  log = open(wd.parent / f"{wd.name}.log", "w+")  # a file, not a pipe: it can never fill up
  proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'configs' / 'smoke.py'}",
                           f"--workdir={wd / 'run'}", "--compile_cache=", *args],
                          env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
  yield proc, wd / "run", log
  if proc.poll() is None:
    proc.kill()
    proc.wait()
  log.close()


@pytest.fixture(scope="module")
def run_a(two_device_run, program, tmp_path_factory):
  """30 steps with two restarts (after steps 1 and 5); returns (workdir, program)."""
  wd = tmp_path_factory.mktemp("run_a")
  for until in (1, 5, None):
    train_lib.train_and_evaluate(_config(), wd, program=program, until=until)
  return wd, program


def test_first_step_matches_fixture(tiny, golden, two_device_run):
  """loss_and_grads (the train step's loss and gradient) at the fixture weights, s = 6, no pre-training.

  The loss and its terms must match the original. Gradients: the power-law STFT loss
  has slope 0.3|s|^-0.7 at near-zero bins; the fixture's reconstruction has a bin at
  2e-7 that float32 rounding puts at -7e-9 here, which alone halves the cosine between
  the full gradient and the original's (see test_codec._grad_fn). So the gradient of
  the remaining terms (mel, commitment, codebook) is compared, per parameter, with the
  model's VJP of those terms' gradients taken at the original's activations (test_codec's
  approach, which test_codec checks against the original's own gradients).
  """
  del two_device_run  # started first: it compiles while this test does
  model, params = tiny
  x, s6, no = golden["audio"], jnp.int32(6), jnp.bool_(False)

  @jax.jit
  def both(p, x, ref_audio):
    ours = train_lib.loss_and_grads(model, p, x, s6, no, dict(stft_weight=0.0))
    def outputs(q):
      o = model.apply({"params": q}, x, s6, train=True, freeze_codebook=no)
      return o["recon_audio"], o["cm_loss"], o["cb_loss"]
    _, vjp = jax.vjp(outputs, p)
    b = x.shape[0]
    g_audio = jax.grad(lambda a: jnp.mean(0.25 * losses.mel_loss(x, a)))(ref_audio)
    return ours, vjp((g_audio, jnp.full((b,), 0.25 / b), jnp.full((b,), 1.0 / b)))[0]

  ((loss, aux), grads), ref = both(params, x, golden["train_s6_recon"])
  terms = aux["terms"]
  full = float(loss) + float(jnp.mean(terms["stft_loss"]))  # the recipe's loss (stft weight 1)
  np.testing.assert_allclose(full, golden["train_s6_loss"], rtol=1e-4)
  for k in ("mel_loss", "stft_loss", "cm_loss", "cb_loss"):
    np.testing.assert_allclose(np.asarray(terms[k]), golden[f"train_s6_{k}"], rtol=1e-4, err_msg=k)
  assert_trees_close(grads, ref, rtol=1e-3, atol=1e-6)


def test_loss_falls_both_phases_one_compile(run_a):
  wd, program = run_a
  rows = _rows(wd, "train/loss")
  assert sorted(rows) == list(range(1, 31))
  assert all(rows[s]["train/pretrain"] == 1 and rows[s]["train/cb_loss"] == 0 for s in range(1, 6))
  assert all(rows[s]["train/pretrain"] == 0 for s in range(6, 31))
  streams = {int(rows[s]["train/num_streams"]) for s in range(6, 31)}
  assert len(streams) >= 3 and streams <= set(range(1, 7))
  # Mel + STFT reconstruction terms (quantised phase) fall; as does the total loss.
  recon = [rows[s]["train/mel_loss"] * 0.25 + rows[s]["train/stft_loss"] for s in range(6, 31)]
  assert np.mean(recon[-5:]) < np.mean(recon[:5])
  loss = [rows[s]["train/loss"] for s in range(6, 31)]
  assert np.mean(loss[-5:]) < np.mean(loss[:5])
  # Three runs, every num_streams, both phases: one executable compiled ahead of time
  # for the run's shapes (a jax.stages.Compiled cannot recompile).
  assert isinstance(program.step, jax.stages.Compiled)


def test_resume_equals_straight_run(run_a, program, tmp_path):
  wd, _ = run_a
  train_lib.train_and_evaluate(_config(), tmp_path, program=program, until=10)
  assert_trees_close(_params(wd, 10), _params(tmp_path, 10), atol=1e-6)
  a, b = _rows(wd, "train/loss"), _rows(tmp_path, "train/loss")
  assert [a[s]["train/num_streams"] for s in range(1, 11)] == [b[s]["train/num_streams"] for s in range(1, 11)]
  np.testing.assert_allclose([a[s]["train/loss"] for s in range(1, 11)],
                             [b[s]["train/loss"] for s in range(1, 11)], rtol=1e-5)


def _opt_state(program, workdir, step):
  with ckpt.train_manager(workdir, keep=100) as m:
    return ckpt.restore_step(m, step, {"opt_state": program.abstract_state.opt_state})[0]["opt_state"]


def _adam(opt_state):
  return next(s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: hasattr(s, "mu")) if hasattr(s, "mu"))


def test_optimizer_renewed_like_the_original(run_a):
  """Pre-training is steps 0-4; step 5 (the first quantised one) still uses the pre-training
  moments; the optimizer is renewed before step 6, as the original (pbar.n == P + 1)."""
  wd, program = run_a
  for step, count in ((5, 5), (10, 4), (30, 24)):
    assert int(_adam(_opt_state(program, wd, step)).count) == count


def test_two_devices_equal_one(run_a, two_device_run):
  """One step of train.py on 2 forced host devices == step 1 of the 1-device run."""
  wd, program = run_a
  proc, wd2, log = two_device_run
  proc.wait(timeout=600)
  log.seek(0)
  err = log.read()
  assert proc.returncode == 0, err[-3000:]
  assert "CpuDevice(id=1)" in err  # it really ran on two devices
  r1, r2 = _rows(wd, "train/loss")[1], _rows(wd2, "train/loss")[1]
  np.testing.assert_allclose(r2["train/loss"], r1["train/loss"], rtol=1e-5)  # the forward is the same
  # Gradients (Adam's first moment after one step is 0.1 x the clipped gradient). The
  # power-law STFT loss has slope 0.3|s|^-0.7 at near-zero reconstructed bins, so float
  # rounding there moves a few gradient entries by up to ~1e-4 between any two XLA
  # programs (without that term 1 vs 2 devices agree to 1e-6 relative); compare directions.
  mu1, mu2 = _adam(_opt_state(program, wd, 1)).mu, _adam(_opt_state(program, wd2, 1)).mu
  a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(mu1)])
  b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(mu2)])
  assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.9999
  assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-2
  # Params: AdamW's first update is lr * (g / (|g| + 1e-8) + wd * p): equal where the
  # gradient is well determined, within 2 lr where it is not.
  lr = OVERRIDES["optim.lr"]
  p1, p2 = _params(wd, 1), esc_jax.load(wd2).params
  d = np.concatenate([np.ravel(np.abs(np.asarray(x) - np.asarray(y))) for x, y in zip(jax.tree.leaves(p1),
                                                                                     jax.tree.leaves(p2))])
  g = np.abs(a) / 0.1
  assert np.all(d[g > 1e-3] <= 1e-6) and np.all(d <= 2 * lr * 1.001) and np.mean(d > 1e-6) < 0.02


def test_validation_best_checkpoint_and_load(run_a):
  wd, _ = run_a
  val = _rows(wd, "val/pesq")
  assert sorted(val) == [20, 30]
  for r in val.values():
    assert 1.0 <= r["val/pesq"] <= 4.7 and 0 < r["val/utilization"] <= 1
    assert np.isfinite(r["val/mel_distance"]) and np.isfinite(r["val/si_sdr"])
  best = max(val, key=lambda s: val[s]["val/pesq"])
  assert ckpt.best_step(wd) == best
  assert_trees_close(esc_jax.load(wd).params, _params(wd, 30))  # latest step
  assert_trees_close(esc_jax.load(wd, step="best").params, _params(wd, best))
  cfg = json.loads((wd / "esc_config.json").read_text())
  assert cfg["model_name"] == "csvq+swinT" and cfg["model"]["codebook_size"] == 64


def test_validation_is_the_evaluator_on_whole_files(run_a):
  """Validation = esc_jax.evaluation with the original's protocol on every val file."""
  wd, program = run_a
  c = _config()
  clips = train_lib.load_validation_clips(c)
  assert len(clips) == 2 and all(len(x) > 40000 for x in clips.values())  # whole files, not crops
  val = train_lib.validate(program, c, _state_at(program, wd, 20), clips)
  row = _rows(wd, "val/pesq")[20]
  for k, v in val.items():
    assert row[f"val/{k}"] == pytest.approx(v, rel=1e-6), k


def _state_at(program, wd, step):
  return train_lib.TrainState(jnp.int32(step), _params(wd, step), _opt_state(program, wd, step))


def test_retention_keeps_last_and_best(program, tmp_path):
  """keep=2: the last two steps plus the best-PESQ step survive; the rest go."""
  c = _config()
  state = train_lib.init_state(program)
  with ckpt.train_manager(tmp_path, keep=2) as mngr:
    for step, pesq in ((1, None), (2, 3.0), (3, 1.5), (4, None), (5, 2.0)):
      train_lib.save(mngr, state.replace(step=jnp.int32(step)), c, None, None if pesq is None else {"pesq": pesq})
    assert mngr.all_steps() == [2, 4, 5]  # 1 and 3 went
  assert ckpt.best_step(tmp_path) == 2
  restore_params(tmp_path, program.model, step=2)


def test_nan_stops_and_keeps_last_good_checkpoint(program, tmp_path):
  good = np.random.default_rng(0).standard_normal((2, 15920)).astype(np.float32) * 0.1
  batches = iter([good] * 6 + [np.full_like(good, np.nan)])
  c = _config(**{"data.val_dir": "", "ckpt.every_steps": 5})
  with pytest.raises(train_lib.NonFiniteLossError, match="non-finite loss nan.* at step 7 .*Last good checkpoint: step 5"):
    train_lib.train_and_evaluate(c, tmp_path, program=program, data=batches)
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [5]


def test_init_from_codec_directory(program, tiny_codec_dir, tiny, tmp_path):
  """train.init_from: params of a codec directory, a fresh optimizer, step 0 (the original's --pretrain_ckp)."""
  _, fixture_params = tiny
  good = np.random.default_rng(1).standard_normal((2, 15920)).astype(np.float32) * 0.1
  c = _config(**{"train.init_from": str(tiny_codec_dir), "data.val_dir": ""})
  state = train_lib.train_and_evaluate(c, tmp_path, program=program, data=iter([good]), until=1)
  assert int(state.step) == 1
  assert int(_adam(_opt_state(program, tmp_path, 1)).count) == 1  # a fresh optimizer took one step
  # One AdamW step at lr 1e-3 moves each param by at most ~lr (1 + wd |p|) from the fixture's.
  d = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
          for a, b in zip(jax.tree.leaves(_params(tmp_path, 1)), jax.tree.leaves(fixture_params)))
  assert 0 < d <= 1.1e-3
  bad = _config()
  bad.model.codebook_size = 32
  with pytest.raises(train_lib.ConfigError, match="different model"):
    train_lib.init_from(dataclasses.replace(program, config=bad), tiny_codec_dir)
  with pytest.raises(train_lib.ConfigError, match="no such codec directory"):
    train_lib.init_from(program, tmp_path / "missing")


def test_quantisation_dropout_distribution():
  keys = jax.random.split(jax.random.PRNGKey(0), 20000)
  s = np.asarray(jax.jit(jax.vmap(lambda k: train_lib.sample_num_streams(k, 0.75, 6)))(keys))
  assert set(s.tolist()) == set(range(1, 7))
  np.testing.assert_allclose(np.mean(s == 6), 0.25 + 0.75 / 6, atol=0.015)
  np.testing.assert_allclose(np.mean(s == 1), 0.75 / 6, atol=0.015)
  assert np.all(np.asarray(jax.vmap(lambda k: train_lib.sample_num_streams(k, 0.0, 6))(keys[:100])) == 6)


def test_schedules_and_optimizer():
  c = _config()
  c.optim.schedule, c.optim.warmup_steps = "warmup_cosine", 10
  f = train_lib.make_schedule(c.optim, 110)
  assert float(f(0)) == 0 and abs(float(f(10)) - 1e-3) < 1e-9 and float(f(110)) < 1e-9
  c.optim.schedule = "exponential"
  np.testing.assert_allclose(float(train_lib.make_schedule(c.optim, 1)(1000)), 1e-3 * 0.999996 ** 1000, rtol=1e-5)
  c.optim.schedule = "linear"
  with pytest.raises(train_lib.ConfigError, match="optim.schedule"):
    train_lib.make_schedule(c.optim, 1)
  # AdamW as torch: p <- p - lr * (m_hat / (sqrt(v_hat) + eps) + wd * p), after clipping to norm 0.5.
  tx = train_lib.make_optimizer(c.optim)
  p, g = {"w": jnp.array([1.0, -2.0])}, {"w": jnp.array([3.0, 4.0])}
  u, _ = tx.update(g, tx.init(p), p)
  gc = np.array([3.0, 4.0]) * 0.5 / 5.0
  np.testing.assert_allclose(np.asarray(u["w"]), -(gc / (np.abs(gc) + 1e-8) + 0.01 * np.array([1.0, -2.0])),
                             rtol=2e-5)  # optax's float32 bias correction (1 - 0.999) vs torch's float64


def test_flat_optimizer_equals_per_tensor():
  """The train step's update (`_apply`: flat optimizer state) against optax's per-tensor one,
  over steps with clipping on and off and a renewal: the same params, moments and counts
  within float32 rounding (the global norm is one sum instead of per-tensor sums)."""
  c = _config()
  flat, per_tensor = train_lib.make_optimizer(c.optim), train_lib.make_optimizer(c.optim, flat=False)
  schedule = train_lib.make_schedule(c.optim, 30)
  rng = np.random.default_rng(0)
  params = {"a": {"kernel": rng.standard_normal((3, 5)), "bias": rng.standard_normal(5)},
            "b": rng.standard_normal((2, 2, 4))}
  p_flat = p_tensor = params = jax.tree.map(jnp.float32, params)
  s_flat, s_tensor = flat.init(params), per_tensor.init(params)
  assert [x.shape for x in jax.tree.leaves(s_flat)] == [(), (36,), (36,)]
  apply = jax.jit(train_lib._apply, static_argnums=(0, 1))  # pylint: disable=protected-access
  for step in range(6):
    scale = 100.0 if step == 2 else 0.1  # step 2 is clipped (clip_norm 0.5)
    g = jax.tree.map(lambda x: jnp.float32(scale * rng.standard_normal(x.shape)), params)
    renew = jnp.bool_(step == 4)
    p_flat, s_flat, n_flat = apply(flat, schedule, step, g, s_flat, p_flat, renew)
    p_tensor, s_tensor, n_tensor = apply(per_tensor, schedule, step, g, s_tensor, p_tensor, renew)
    np.testing.assert_allclose(float(n_flat), float(optax.tree.norm(g)), rtol=1e-6)
    assert_trees_close(p_flat, p_tensor, rtol=1e-6, atol=1e-7)
    adam_flat, adam_tensor = _adam(s_flat), _adam(s_tensor)
    assert int(adam_flat.count) == int(adam_tensor.count) == (step + 1 if step < 4 else step - 3)
    for m in ("mu", "nu"):
      np.testing.assert_allclose(np.asarray(getattr(adam_flat, m)),
                                 jax.flatten_util.ravel_pytree(getattr(adam_tensor, m))[0], rtol=1e-5, atol=1e-9)
  assert not np.allclose(np.asarray(p_flat["b"]), np.asarray(params["b"]))  # the steps moved the params


def test_resume_from_a_per_tensor_optimizer_checkpoint(run_a, tmp_path):
  """A checkpoint written before the flat optimizer (per-tensor Adam moments) resumes with
  the same numbers, flattened."""
  wd, program = run_a
  state = _state_at(program, wd, 5)
  params = jax.tree.map(np.asarray, state.params)
  per_tensor = train_lib.make_optimizer(program.config.optim, flat=False)
  is_adam = lambda s: isinstance(s, optax.ScaleByAdamState)  # noqa: E731
  opt_state = jax.tree.map(  # as after one step: count 1, distinct moments per element
      lambda s: s._replace(count=np.int32(1), mu=jax.tree.map(lambda p: 0.5 * p + 0.01, params),
                           nu=jax.tree.map(lambda p: p * p, params)) if is_adam(s) else s,
      jax.eval_shape(per_tensor.init, params), is_leaf=is_adam)
  with ckpt.train_manager(tmp_path, keep=2) as m:
    train_lib.save(m, state.replace(step=jnp.int32(3), opt_state=opt_state), program.config)
  with ckpt.train_manager(tmp_path, keep=2) as m:
    restored = train_lib.restore(m, program, program.config)
  assert int(restored.step) == 3
  assert jax.tree.structure(restored.opt_state) == jax.tree.structure(program.abstract_state.opt_state)
  flat, old = _adam(restored.opt_state), _adam(opt_state)
  assert int(flat.count) == 1
  for name in ("mu", "nu"):
    np.testing.assert_array_equal(np.asarray(getattr(flat, name)),
                                  np.concatenate([np.ravel(x) for x in jax.tree.leaves(getattr(old, name))]))
  state, _ = program.step(restored, train_lib.global_batch(program, np.zeros(
      (int(program.config.train.batch_size), int(program.config.data.clip_samples)), np.float32)))
  assert int(_adam(state.opt_state).count) == 2  # the step runs on it


def test_config_errors(tmp_path):
  with pytest.raises(train_lib.ConfigError, match="compute_dtype"):
    train_lib.build(_config(**{"train.compute_dtype": "float16"}))
  with pytest.raises(train_lib.ConfigError, match="clip_samples 16000 is not a valid length.*15920"):
    train_lib.build(_config(**{"data.clip_samples": 16000}))
  with pytest.raises(train_lib.ConfigError, match="ckpt.every_steps must be >= 1, got 0"):
    train_lib.build(_config(**{"ckpt.every_steps": 0}))
  with pytest.raises(train_lib.ConfigError, match="config.model: swin_heads has 2 entries"):
    train_lib.build(_config(**{"model.swin_heads": [1, 1]}))
  train_lib.write_run_config(tmp_path, _config())
  c = _config()
  c.model.codebook_size = 32
  with pytest.raises(train_lib.ConfigError, match="different model"):
    train_lib.write_run_config(tmp_path, c)


def test_program_must_match_config(program, tmp_path):
  with pytest.raises(train_lib.ConfigError, match="built for another"):
    train_lib.train_and_evaluate(_config(**{"optim.lr": 1e-4}), tmp_path, program=program)


def test_step_flops_counts_the_whole_step(program):
  """Program.step_flops (the count before optimisation, the same on every platform, traced
  without the CPU kernels) agrees with the count of that program compiled, and grows with
  the batch. (Within 8%: before optimisation LayerNorm's means sit in `platform_dependent`
  conditionals, which the count weighs differently; the tiny test model is ~3% LayerNorm
  means. And the compiled count weighs an op fused into a slice at its full shape: the
  optimizer's update of the flat parameter vector, fused into each tensor's slice, adds ~4%
  that is not computed.) The real step runs the Swin blocks as custom calls, which XLA
  counts as nothing."""
  reference = program.lower_reference()
  compiled = train_lib.xla_cost(reference.compile(compiler_options=COMPILE_WITH_IR_EMITTERS))  # only counted
  assert compiled > 0
  flops = program.step_flops
  assert flops == train_lib.xla_cost(reference)  # (a cached property: traced once)
  assert flops == pytest.approx(compiled, rel=0.08)
  assert train_lib.xla_cost(program.step) < 0.8 * compiled
  half = _config(**{"train.batch_size": program.config.train.batch_size // 2})
  state = program.abstract_state
  batch = jax.ShapeDtypeStruct((half.train.batch_size, half.data.clip_samples), jnp.float32)

  def lower_half():
    with kernels.disabled():
      step = train_lib.make_train_step(program.model, program.tx, train_lib.make_schedule(half.optim, 30), half)
      return jax.jit(step).lower(state, batch)

  small = dataclasses.replace(program, lower_reference=lower_half).step_flops
  assert 0.4 * flops < small < 0.6 * flops


def test_step_flops_where_the_backend_has_no_lowered_cost_analysis(program, monkeypatch):
  """Behind the PJRT C API (jax's CUDA plugin) `Lowered.cost_analysis` is None; the count
  then comes from XLA:CPU's analysis of the same HLO and equals the direct one."""
  direct = program.step_flops
  monkeypatch.setattr(jax.stages.Lowered, "cost_analysis", lambda self: None)
  assert dataclasses.replace(program).step_flops == direct > 0  # a fresh Program: counted again


def test_wandb_project_and_epoch_validation_interval(tmp_path, monkeypatch):
  """--config.log.wandb_project=NAME reaches wandb.init; eval.every_steps=0 means once per epoch."""
  import types
  from esc_jax import data, metric_writer
  seen = {}
  fake = types.SimpleNamespace(init=lambda **kw: seen.update(kw) or types.SimpleNamespace(
      log=lambda *a, **k: None, finish=lambda: None))
  monkeypatch.setitem(sys.modules, "wandb", fake)
  c = _config(**{"log.wandb": True})
  c.log.wandb_project = "my_project"  # a locked ConfigDict: the key must exist
  w = metric_writer.open_writer(tmp_path, c.log, 0, True, {})
  w.write(1, {"loss": 1.0})
  w.close()
  assert seen["project"] == "my_project" and (tmp_path / "wandb_id.txt").exists()
  from esc_jax.config_lib import base_config, ESC_TINY
  assert base_config(ESC_TINY).eval.every_steps == 0 and base_config(ESC_TINY).data.val_max_files == 0
  assert data.steps_per_epoch(40, 36) == 1 and data.steps_per_epoch(1000, 36) == 27
