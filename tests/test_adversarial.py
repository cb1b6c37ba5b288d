"""The adversarial recipe (ESC-Base(adv)) in training: configs/smoke_adv.py's tiny codec and narrow
discriminator; the discriminator itself is checked against the original in test_discriminator.py.

One compiled program serves every run here: a run resumed after a restart (steps 0-3, 3-6)
and a straight run (0-6); pre-training is steps 0-2.
"""
from __future__ import annotations

import json
import pathlib
import sys

import jax
import numpy as np
import pytest

from esc_jax import checkpoint as ckpt
from esc_jax import train_lib
from helpers import assert_trees_close

ROOT = pathlib.Path(__file__).absolute().parents[1]
OVERRIDES = {"train.num_steps": 6, "train.pretrain_steps": 3, "ckpt.every_steps": 3, "ckpt.keep": 10,
             "log.every_steps": 1, "log.tensorboard": False, "data.val_dir": "", "optim.lr": 1e-3,
             # One period and one STFT discriminator: the recipe's mechanics are what this file
             # tests (test_discriminator checks the full discriminator against the original), and
             # the step compiles in a fraction of the time.
             "discriminator.periods": [2], "discriminator.fft_sizes": [512]}


def _get_config(name):
  sys.path.insert(0, str(ROOT / "configs"))
  try:
    return __import__(name).get_config()
  finally:
    sys.path.pop(0)


def _config(**extra):
  """configs/smoke_adv.py with the test overrides."""
  c = _get_config("smoke_adv")
  for k, v in {**OVERRIDES, **extra}.items():
    sec, key = k.split(".")
    c[sec][key] = v
  return c


@pytest.fixture(scope="module")
def program():
  return train_lib.build(_config())


@pytest.fixture(scope="module")
def runs(program, tmp_path_factory):
  """(resumed workdir, straight workdir, initial state)."""
  resumed, straight = tmp_path_factory.mktemp("resumed"), tmp_path_factory.mktemp("straight")
  for until in (3, None):
    train_lib.train_and_evaluate(_config(), resumed, program=program, until=until)
  train_lib.train_and_evaluate(_config(), straight, program=program)
  return resumed, straight, jax.device_get(train_lib.init_state(program))


def _rows(wd):
  return {r["step"]: r for r in map(json.loads, (wd / "metrics.jsonl").read_text().splitlines())
          if "train/loss" in r}


def _items(program, wd, step):
  a = program.abstract_state
  with ckpt.train_manager(wd, keep=100) as m:
    return ckpt.restore_step(m, step, {"params": a.params, "disc_params": a.disc_params,
                                       "disc_opt_state": a.disc_opt_state})[0]


def _changed(a, b) -> bool:
  return any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_nothing_adversarial_during_pretraining(program, runs):
  resumed, _, init = runs
  rows = _rows(resumed)
  for s in (1, 2, 3):  # steps 0-2: pre-training
    r = rows[s]
    assert r["train/pretrain"] == 1
    assert r["train/gen_loss"] == r["train/feat_loss"] == r["train/disc_loss"] == r["train/disc_grad_norm"] == 0
  at3 = _items(program, resumed, 3)
  assert_trees_close(at3["disc_params"], init.disc_params)  # the discriminator has not moved
  assert int(jax.tree.leaves(at3["disc_opt_state"])[0]) == 0  # nor counted a step
  assert _changed(at3["params"], init.params)  # while the generator trained


def test_adversarial_steps_train_both(program, runs):
  resumed, _, init = runs
  rows = _rows(resumed)
  for s in (4, 5, 6):
    r = rows[s]
    assert r["train/pretrain"] == 0
    for k in ("gen_loss", "feat_loss", "disc_loss", "disc_grad_norm", "loss", "mel_loss"):
      assert np.isfinite(r[f"train/{k}"]) and r[f"train/{k}"] > 0, k
    assert r["train/stft_loss"] > 0  # computed and logged, weighted 0 in this recipe
  at3, at6 = _items(program, resumed, 3), _items(program, resumed, 6)
  assert _changed(at6["params"], at3["params"]) and _changed(at6["disc_params"], at3["disc_params"])
  # The logged total is the recipe's weighted sum (mel 15, cm .25, cb 1, gen 1, feat 2; stft 0).
  r = rows[5]
  total = (15 * r["train/mel_loss"] + 0.25 * r["train/cm_loss"] + r["train/cb_loss"]
           + r["train/gen_loss"] + 2 * r["train/feat_loss"])
  assert r["train/loss"] == pytest.approx(total, rel=1e-5)


def test_resume_equals_straight_run(program, runs):
  resumed, straight, _ = runs
  a, b = _items(program, resumed, 6), _items(program, straight, 6)
  assert_trees_close(a["params"], b["params"], atol=1e-6)
  assert_trees_close(a["disc_params"], b["disc_params"], atol=1e-6)
  ra, rb = _rows(resumed), _rows(straight)
  np.testing.assert_allclose([ra[s]["train/disc_loss"] for s in range(1, 7)],
                             [rb[s]["train/disc_loss"] for s in range(1, 7)], rtol=1e-5)


def test_configs():
  base = _get_config("9kbps_adv")
  assert list(base.model.codebook_dims) == [8] * 6 and base.optim.clip_norm == 1e3
  assert base.disc_optim.clip_norm == 10 and base.disc_optim.lr == base.optim.lr == 1e-4
  assert dict(base.loss) == dict(cm_weight=0.25, cb_weight=1.0, mel_weight=15.0, stft_weight=0.0,
                                 gen_weight=1.0, feat_weight=2.0)
  ft = _get_config("9kbps_adv_finetune")
  assert ft.optim.lr == pytest.approx(1e-5) and ft.disc_optim.lr == 1e-4 and ft.train.pretrain_steps == 0
  with pytest.raises(train_lib.ConfigError, match="init_from"):
    train_lib.train_and_evaluate(ft, "/nonexistent/never_written")
