"""The fused CPU Swin-block kernels (esc_jax.kernels): the same outputs and gradients as
the XLA block, the codec and train step actually using them, and their fallbacks."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esc_jax import kernels
from esc_jax.layers import attention as A
from helpers import two_device_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _block_and_input(c, heads, hw, shift, batch, seed=0):
  h, w = hw
  tokens = A.padded_size(h, 4) * A.padded_size(w, 4)
  x = jax.random.normal(jax.random.PRNGKey(seed), (batch, tokens, c))
  block = A.SwinBlock(c, heads, 4, shift)
  params = jax.jit(block.init, static_argnums=2)(jax.random.PRNGKey(1), x, hw)["params"]  # one compile
  # Away from the init's zero biases / unit scales, so every parameter matters.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  return block, params, x


def _real_tokens(hw, shift):
  """(Hp*Wp,) bool: the real (not padding) tokens in window order `shift`."""
  real = A.padding_mask(*hw, 4, shift)
  return np.ones(A.padded_size(hw[0], 4) * A.padded_size(hw[1], 4), bool) if real is None else real[:, 0] > 0


def _apply(block, params, x, hw, fused):
  return block.clone(fused=fused).apply({"params": params}, x, hw)


def _jitted(block, hw, fused):
  """_apply compiled (one compile, where running it eagerly compiles each operation)."""
  return jax.jit(lambda p, x: _apply(block, p, x, hw, fused))


def test_kernel_builds_here():
  assert kernels.cpu_kernels_available()


# (C, heads, (H, W), batch): ESC-Base's top two scales, the tiny model's widths
# (C < 16 lanes, one head), a width over 2 x 16 lanes with a partial tail; padding in
# time, in frequency and in both.
CASES = [(45, 3, (32, 40), 1), (72, 6, (16, 30), 2), (8, 1, (8, 30), 2), (12, 2, (30, 8), 3),
         (40, 4, (31, 30), 1)]


@pytest.mark.parametrize("shift", [0, 2])
@pytest.mark.parametrize("c,heads,hw,batch", CASES)
def test_fused_block_equals_xla_block(c, heads, hw, batch, shift):
  assert A.keeps_window_order(*hw, 4)
  block, params, x = _block_and_input(c, heads, hw, shift, batch)
  fused = _jitted(block, hw, True)
  assert kernels.SWIN_BLOCK_TARGET in fused.lower(params, x).as_text()
  got, want = np.asarray(fused(params, x)), np.asarray(_jitted(block, hw, False)(params, x))
  real = _real_tokens(hw, shift)
  np.testing.assert_allclose(got[:, real], want[:, real], rtol=1e-5, atol=1e-5 * np.abs(want).max())
  assert np.isfinite(got).all()  # padding tokens too: later blocks carry them


@pytest.mark.parametrize("c,heads,hw,batch,shift", [(12, 2, (30, 8), 2, 2), (45, 3, (32, 40), 1, 0),
                                                   (40, 4, (31, 30), 1, 2), (120, 6, (8, 8), 1, 2)])
def test_fused_block_gradient_equals_xla_gradient(c, heads, hw, batch, shift, monkeypatch):
  """The backward kernel: gradients of every parameter and of x, padding tokens excluded
  from the loss (their outputs are never read). At C = 120, put past the backward kernel's
  limit, a differentiated block is XLA's forward and backward."""
  if c == 120:
    monkeypatch.setattr(A, "kernel_weight_limits", lambda: (1 << 20, A._weight_bytes(104, 4.0)))
  block, params, x = _block_and_input(c, heads, hw, shift, batch)
  real = jnp.asarray(_real_tokens(hw, shift))
  target = jax.random.normal(jax.random.PRNGKey(5), x.shape)

  def loss(p, x, fused):
    return jnp.sum(jnp.where(real[None, :, None], _apply(block, p, x, hw, fused) * target, 0.0))

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
  hlo = grad.lower(params, x, True).as_text()
  assert (kernels.SWIN_BLOCK_GRAD_TARGET in hlo) == (c != 120)
  got, want = grad(params, x, True), grad(params, x, False)
  # Deterministic (exact resume of training): the same bits on a second call.
  jax.tree.map(np.testing.assert_array_equal, grad(params, x, True), got)
  for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * np.abs(w).max(), err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("recompute", ["env", "other_backend"])
@pytest.mark.parametrize("c,heads,hw,batch,shift", [(12, 2, (30, 8), 2, 2), (40, 4, (31, 30), 1, 2)])
def test_backward_reading_the_saved_activations_equals_recomputing_them(c, heads, hw, batch, shift, recompute,
                                                                        monkeypatch):
  """Where the CPU is the only backend, a differentiated block's forward kernel keeps qkv and
  fc1's output for the backward kernel, which reads them instead of recomputing them: the
  same bits as the backward that recomputes them, with ESC_JAX_CPU_KERNEL_KEEP=0 or where
  another backend may run the program (`kernels.cpu_only()` false)."""
  block, params, x = _block_and_input(c, heads, hw, shift, batch)
  g = jax.random.normal(jax.random.PRNGKey(5), x.shape)

  def grads():  # a fresh function per call: traced again
    return jax.jit(lambda p, x: jax.vjp(lambda p, x: _apply(block, p, x, hw, True), p, x)[1](g))

  saving = grads()
  assert "save = true" in saving.lower(params, x).as_text()
  kept = saving(params, x)
  if recompute == "env":
    monkeypatch.setenv("ESC_JAX_CPU_KERNEL_KEEP", "0")
  else:
    monkeypatch.setattr(kernels, "cpu_only", lambda: False)
  recomputing = grads()
  text = recomputing.lower(params, x).as_text()
  assert "save = true" not in text and kernels.SWIN_BLOCK_GRAD_TARGET in text
  jax.tree.map(np.testing.assert_array_equal, kept, recomputing(params, x))


def test_nan_propagates_as_in_xla():
  """A NaN parameter gives NaN outputs and gradients, as the XLA block does (the kernels'
  clamps in exp / erf must not turn NaN into a finite value)."""
  hw = (8, 8)
  block, params, x = _block_and_input(8, 1, hw, 2, 1)
  params["attn"]["relative_position_bias_table"] = params["attn"]["relative_position_bias_table"].at[0, 0].set(np.nan)
  for fused in (True, False):
    y = _jitted(block, hw, fused)(params, x)
    g = jax.jit(jax.grad(lambda p: jnp.sum(_apply(block, p, x, hw, fused))))(params)
    assert np.isnan(np.asarray(y)).any() and np.isnan(np.asarray(g["mlp"]["linear_2"]["kernel"])).any()


def test_codec_programs_use_the_kernel(tiny):
  model, params = tiny
  from esc_jax.codec import ESC
  x = np.zeros((1, 15920), np.float32)
  hlo = jax.jit(lambda p, x: model.apply({"params": p}, x, 3, method=ESC.encode)).lower(params, x).as_text()
  assert hlo.count(kernels.SWIN_BLOCK_TARGET) >= 2


def test_on_cpu_traces_one_branch_where_the_cpu_is_the_only_backend(monkeypatch):
  traced = []

  def branch(name, add):
    return lambda x: (traced.append(name), x + add)[1]

  def run():
    traced.clear()  # a new function each time: jit would reuse an earlier trace
    return float(jax.jit(lambda x: kernels.on_cpu(x, cpu=branch("cpu", 1), default=branch("default", 2)))(1.0))

  assert run() == 2 and traced == ["cpu"]
  with kernels.disabled():  # e.g. to lower for another platform: platform_dependent as such
    assert run() == 2 and sorted(traced) == ["cpu", "default"]
  monkeypatch.setattr(jax.extend.backend, "backends", lambda: {"cpu": None, "cuda": None})
  assert run() == 2 and sorted(traced) == ["cpu", "default"]


# (x shape, w shape as the layer holds it (K, N)): a partial last tile of 16 rows and
# panels with a tail (N not a multiple of the 6 or 16 outputs per pass), batch dims, N < 6.
DENSE_CASES = [((37, 300), (300, 70)), ((2, 33, 64), (64, 13)), ((16, 5), (5, 3)), ((1, 1, 130), (130, 200))]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("x_shape,w_shape", DENSE_CASES)
def test_dense_kernel_equals_a_float64_matmul(x_shape, w_shape, transpose, bias):
  rng = np.random.default_rng(0)
  x = rng.standard_normal(x_shape).astype(np.float32)
  w = rng.standard_normal(w_shape).astype(np.float32)
  b = rng.standard_normal(w_shape[1]).astype(np.float32) if bias else None
  want = x.astype(np.float64) @ w + (0 if b is None else b)
  arg = np.ascontiguousarray(w.T) if transpose else w  # transpose: the kernel gets w as (N, K)
  got = np.asarray(jax.jit(lambda x, w, b: kernels.dense(x, w, b, transpose=transpose))(x, arg, b))
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())


def test_wide_linear_layers_run_as_the_dense_kernel_with_the_same_gradients(monkeypatch):
  """Linear layers from DENSE_MIN_WEIGHT_BYTES up run as the kernel, forward and the input
  gradient of the backward (x @ w.T), with XLA's results within float32 rounding; narrower
  ones stay XLA's dot."""
  from esc_jax.layers.common import Linear
  layer = Linear(70, 300)
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 37, 300))
  params = layer.init(jax.random.PRNGKey(1), x)["params"]

  def loss(p, x):
    return jnp.sum(jnp.sin(layer.apply({"params": p}, x)))

  def program():  # a new function each time: jit would reuse an earlier trace
    return jax.jit(jax.value_and_grad(lambda p, x: loss(p, x), argnums=(0, 1)))

  assert 4 * 300 * 70 < kernels.DENSE_MIN_WEIGHT_BYTES
  xla = program()
  assert kernels.DENSE_TARGET not in xla.lower(params, x).as_text()
  monkeypatch.setattr(kernels, "DENSE_MIN_WEIGHT_BYTES", 4 * 300 * 70)
  fused = program()
  assert fused.lower(params, x).as_text().count(kernels.DENSE_TARGET) == 2  # y, and dL/dx
  (lx, (gpx, gx)), (lk, (gpk, gk)) = xla(params, x), fused(params, x)
  np.testing.assert_allclose(lk, lx, rtol=1e-6)
  np.testing.assert_allclose(gk, gx, rtol=0, atol=1e-6 * float(np.abs(gx).max()))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * float(np.abs(b).max())), gpk, gpx)
  with kernels.disabled():
    assert kernels.DENSE_TARGET not in program().lower(params, x).as_text()


# (x (B, H, W, C), kernel (KH, KW, C, N)): ESC-Base's de-embedding taps and outputs on a small
# map with a partial last tile of 16 columns, fewer rows and columns than taps, a 3 x 5 kernel
# with N < 6, and a map narrower than one tile.
CONV_CASES = [((2, 5, 37, 45), (7, 7, 45, 12)), ((1, 2, 3, 4), (7, 7, 4, 7)), ((3, 6, 40, 5), (3, 5, 5, 3)),
              ((1, 4, 9, 2), (1, 1, 2, 13))]


def _conv_reference(x, k, b):
  """conv_same's result in float64: x (B, H, W, C) by k (KH, KW, C, N), "same" zero padding, plus b."""
  kh, kw = k.shape[:2]
  h, w = x.shape[1:3]
  xp = np.pad(np.asarray(x, np.float64), ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  return b + sum(np.einsum("bhwc,cn->bhwn", xp[:, dy:dy + h, dx:dx + w], k[dy, dx]) for dy in range(kh) for dx in range(kw))


@pytest.mark.parametrize("x_shape,k_shape", CONV_CASES)
def test_conv_kernel_equals_a_float64_convolution(x_shape, k_shape):
  rng = np.random.default_rng(0)
  x = rng.standard_normal(x_shape).astype(np.float32)
  k = rng.standard_normal(k_shape).astype(np.float32)
  b = rng.standard_normal(k_shape[-1]).astype(np.float32)
  want = _conv_reference(x, k, b)
  got = np.asarray(jax.jit(kernels.conv_same)(x, k, b))
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())


def test_deembedding_runs_its_convolution_as_the_kernel_with_the_same_gradients(monkeypatch):
  """conv2d_same (PatchDeEmbed's fused convolution) runs as the conv kernel from
  CONV_MIN_WEIGHT_BYTES up, within float32 rounding of XLA's convolution, with XLA's
  backward; the tiny model's de-embedding stays XLA."""
  from esc_jax.layers.common import conv2d_same
  from esc_jax.layers.scale import PatchDeEmbed
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 21, 10))
  k = 0.1 * jax.random.normal(jax.random.PRNGKey(1), (7, 7, 10, 12))
  b = jax.random.normal(jax.random.PRNGKey(2), (12,))

  def program():  # a new function each time: jit would reuse an earlier trace
    return jax.jit(jax.value_and_grad(lambda x, k, b: jnp.sum(jnp.sin(conv2d_same(x, k, b))), argnums=(0, 1, 2)))

  assert 4 * k.size < kernels.CONV_MIN_WEIGHT_BYTES
  xla = program()
  assert kernels.CONV_TARGET not in xla.lower(x, k, b).as_text()
  monkeypatch.setattr(kernels, "CONV_MIN_WEIGHT_BYTES", 4 * k.size)
  fused = program()
  assert fused.lower(x, k, b).as_text().count(kernels.CONV_TARGET) == 1
  (lx, gx), (lk, gk) = xla(x, k, b), fused(x, k, b)
  np.testing.assert_allclose(lk, lx, rtol=1e-5)  # a sum of 3,024 values
  for a, want in zip(gk, gx):
    np.testing.assert_allclose(a, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))
  monkeypatch.undo()
  layer = PatchDeEmbed(2, 8)  # the tiny model's width
  z = jnp.zeros((1, 4, 10, 8))
  params = layer.init(jax.random.PRNGKey(0), z)
  assert kernels.CONV_TARGET not in jax.jit(layer.apply).lower(params, z).as_text()


def _run(code: str, env=None, **extra) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                        env={**(env or os.environ), "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]), **extra}, timeout=600)


def test_train_step_on_two_devices_is_plain_xla():
  """With the batch sharded over 2 devices the step traces without the kernels (a custom
  call would make XLA all-gather the batch). On one device it uses them: see
  test_train.py::test_step_flops_counts_the_whole_step. (Checked on the lowered step:
  compiling it would only cost time.)"""
  code = """
    import sys; sys.path.insert(0, "configs")
    import jax, smoke
    from esc_jax import kernels, train_lib
    jax.stages.Lowered.compile = lambda self, *a, **k: self  # build() keeps the lowered step
    c = smoke.get_config()
    c.train.batch_size = 2
    hlo = train_lib.build(c).step.as_text()
    print(len(jax.devices()), kernels.cpu_kernels_available(), kernels.SWIN_BLOCK_TARGET in hlo,
          kernels.SWIN_BLOCK_GRAD_TARGET in hlo)
  """
  r = _run(code, env=two_device_env())
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.split() == ["2", "True", "False", "False"], r.stdout


_COMPARE = """
  import numpy as np, jax
  from esc_jax import kernels
  from tests.test_kernels import _apply, _block_and_input, _conv_reference, _real_tokens
  print("available", kernels.cpu_kernels_available())
  for c, heads, hw, shift in [(45, 3, (16, 20), 2), (8, 1, (8, 30), 0)]:
    block, params, x = _block_and_input(c, heads, hw, shift, 2)
    got, want = (np.asarray(jax.jit(lambda p, x: _apply(block, p, x, hw, f))(params, x)) for f in (True, False))
    real = _real_tokens(hw, shift)
    print("max rel err", float(np.abs(got - want)[:, real].max() / np.abs(want).max()))
  if kernels.cpu_kernels_available():  # the dense and convolution kernels against float64
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((37, 300)), rng.standard_normal((300, 70)), rng.standard_normal(70)
    got = np.asarray(jax.jit(kernels.dense)(*(a.astype(np.float32) for a in (x, w, b))))
    print("max rel err", float(np.abs(got - (x @ w + b)).max() / np.abs(x @ w + b).max()))
    x, k = rng.standard_normal((1, 3, 37, 45)), rng.standard_normal((1, 3, 45, 12))
    want = _conv_reference(x, k, np.zeros(12))
    got = np.asarray(jax.jit(kernels.conv_same)(x.astype(np.float32), k.astype(np.float32), np.zeros(12, np.float32)))
    print("max rel err", float(np.abs(got - want).max() / np.abs(want).max()))
"""


def test_avx2_build_gives_the_same_results(tmp_path):
  """The AVX2 code path (two 8-lane halves per vector), as on CPUs without AVX-512, gives
  the same results (the Swin block as XLA's; the dense and convolution kernels as float64). With AVX-512 it is a separate build (-mno-avx512f); without, it is the
  default build, which every other test runs too, so the library is reused rather than
  compiled a second time (~30 s)."""
  separate = kernels.has_avx512()
  build = dict(ESC_JAX_KERNEL_CACHE=str(tmp_path), ESC_JAX_KERNEL_CXXFLAGS="-mno-avx512f") if separate else {}
  r = _run(_COMPARE, **build)  # without: this process's cache and flags, so its library
  assert r.returncode == 0, r.stderr[-2000:]
  assert "available True" in r.stdout
  errs = [float(line.split()[-1]) for line in r.stdout.splitlines() if line.startswith("max rel err")]
  assert len(errs) == 4 and max(errs) < 1e-5, r.stdout  # two blocks, dense, convolution
  if separate:
    assert len(list(tmp_path.glob("kernels-*.so"))) == 1


def test_kernels_need_avx2_and_fma():
  x86 = platform.machine().lower() in ("x86_64", "amd64")
  assert kernels.isa_supported("sse2 avx avx2 fma") == x86
  assert kernels.isa_supported("sse2 avx512f") == x86
  assert not kernels.isa_supported("sse2 avx avx2")  # no FMA
  assert not kernels.isa_supported("fp asimd")  # ARM


def test_disabled_and_failed_builds_fall_back_to_xla(tmp_path):
  off = _run(_COMPARE, ESC_JAX_CPU_KERNELS="0", ESC_JAX_KERNEL_CACHE=str(tmp_path / "off"))
  assert off.returncode == 0, off.stderr[-2000:]
  assert "available False" in off.stdout and "max rel err 0.0" in off.stdout
  assert not (tmp_path / "off").exists()
  broken = _run(_COMPARE, CXX="false", ESC_JAX_KERNEL_CACHE=str(tmp_path / "broken"))
  assert broken.returncode == 0, broken.stderr[-2000:]
  assert "available False" in broken.stdout and "max rel err 0.0" in broken.stdout
  assert "fused CPU kernels unavailable, using plain XLA" in broken.stderr
  assert not list((tmp_path / "broken").glob("*"))  # no half-written library left behind
