"""Layer-level properties of the fast paths (exact rewrites of the original's ops)."""
from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from esc_jax.layers.attention import relative_position_index, shift_mask
from esc_jax.layers.scale import PatchDeEmbed


@pytest.mark.parametrize("shape", [(2, 8, 10, 6), (1, 3, 3, 5)])  # general, and the smallest fused
def test_fused_deembed_equals_two_convolutions(shape):
  key = jax.random.PRNGKey(sum(shape))
  x = jax.random.normal(key, shape)
  fused = PatchDeEmbed(2, shape[-1])
  params = jax.jit(fused.init)(key, x)
  params = jax.tree_util.tree_map(lambda a: a + 0.1 * jax.random.normal(key, a.shape), params)
  ours = np.asarray(jax.jit(fused.apply)(params, x))
  ref = np.asarray(jax.jit(PatchDeEmbed(2, shape[-1], fused=False).apply)(params, x))
  assert ours.shape == (shape[0], 3 * shape[1], 2 * shape[2], 2)
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_relative_position_index_is_swin():
  idx = relative_position_index(4)
  assert idx.shape == (16, 16) and idx.min() == 0 and idx.max() == 48
  assert np.all(np.diag(idx) == 24)  # zero offset sits at the table centre
  assert idx[0, 15] == (0 - 3 + 3) * 7 + (0 - 3 + 3) and idx[15, 0] == 48


def test_shift_mask_regions():
  m = shift_mask(8, 8, 4, 2)
  assert m.shape == (4, 16, 16)
  assert np.all(m[0] == 0)  # the top-left window lies in a single region
  assert set(np.unique(m[3])) == {0.0, -100.0}
  np.testing.assert_array_equal(m, np.transpose(m, (0, 2, 1)))


@pytest.mark.parametrize("shift", [0, 2])
def test_window_attention_bf16_stays_bf16(shift):
  """bf16 compute: bf16 outputs and cotangents, close to float32."""
  import jax.numpy as jnp
  from esc_jax.layers.attention import window_attention
  k1, k3, k4 = jax.random.split(jax.random.PRNGKey(shift), 3)
  heads, c = 3, 12
  qkv = jax.random.normal(k1, (2, 4, 16, 3 * c))  # 4 windows of an (8, 8) map
  pos = 0.1 * jax.random.normal(k3, (heads, 16, 16))
  g = jax.random.normal(k4, (2, 4, 16, c))

  def run(dtype):
    f = lambda q, p: window_attention(q, p, heads, (8, 8, 4, shift) if shift else None)  # noqa: E731
    out, vjp = jax.vjp(f, qkv.astype(dtype), pos)
    return out, vjp(g.astype(dtype))

  out16, (dq16, dp16) = run(jnp.bfloat16)
  out32, (dq32, dp32) = run(jnp.float32)
  assert out16.dtype == dq16.dtype == jnp.bfloat16 and dp16.dtype == jnp.float32
  for a, b in ((out16, out32), (dq16, dq32), (dp16, dp32)):
    a, b = np.asarray(a, np.float32), np.asarray(b)
    assert np.abs(a - b).max() <= 0.05 * np.abs(b).max() + 1e-3


@pytest.mark.parametrize("shift", [0, 2])
def test_window_attention_paths_equal_reference(shift):
  """The inference path (einsums) and the training forward (explicit head split) both
  equal softmax(q k^T / sqrt(d) + bias + mask) v, per window and head."""
  import jax.numpy as jnp
  from esc_jax.layers.attention import window_attention
  k1, k2 = jax.random.split(jax.random.PRNGKey(10 + shift))
  heads, c = 3, 12
  qkv = jax.random.normal(k1, (2, 4, 16, 3 * c))
  pos = jax.random.normal(k2, (heads, 16, 16))
  mask = (8, 8, 4, shift) if shift else None
  q, k, v = (qkv[..., i * c:(i + 1) * c].reshape(2, 4, 16, heads, 4) for i in range(3))
  with jax.default_matmul_precision("highest"):
    logits = jnp.einsum("bwihd,bwjhd->bwhij", q, k) / 2.0 + pos
    if shift:
      logits = logits + shift_mask(8, 8, 4, shift)[:, None]
    ref = jnp.einsum("bwhij,bwjhd->bwihd", jax.nn.softmax(logits, -1), v).reshape(2, 4, 16, c)
    infer = jax.jit(window_attention, static_argnums=(2, 3))(qkv, pos, heads, mask)
    train, _ = jax.vjp(lambda t: window_attention(t, pos, heads, mask), qkv)
  for out in (infer, train):
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=0, atol=1e-5)


@pytest.mark.parametrize("hw,shift", [((8, 12), 0), ((8, 12), 2), ((2, 7), 2)])
def test_window_order_is_pad_roll_partition(hw, shift):
  """to/from_window_order equal Swin's pad -> roll -> partition and its inverse, and the
  re-order's VJP is the inverse re-order (the gradient of the gather it replaces)."""
  import jax.numpy as jnp
  from esc_jax.layers.attention import (from_window_order, padded_size, reorder_tokens,
                                        to_window_order, window_partition)
  h, w = hw
  hp, wp = padded_size(h, 4), padded_size(w, 4)
  x = jax.random.normal(jax.random.PRNGKey(h * w + shift), (2, h, w, 3))
  ref = jnp.roll(jnp.pad(x, ((0, 0), (0, hp - h), (0, wp - w), (0, 0))), (-shift, -shift), (1, 2))
  ref = window_partition(ref, 4).reshape(2, hp * wp, 3)
  ours = to_window_order(x, 4, shift)
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
  np.testing.assert_array_equal(np.asarray(from_window_order(ours, h, w, 4, shift)), np.asarray(x))
  other = reorder_tokens(to_window_order(x, 4, 0), hp, wp, 4, 0, shift)
  np.testing.assert_array_equal(np.asarray(other), np.asarray(ref))
  g = jax.random.normal(jax.random.PRNGKey(7), ours.shape)
  _, vjp = jax.vjp(lambda t: reorder_tokens(t, hp, wp, 4, None, shift), ours)
  _, vjp_ref = jax.vjp(lambda t: t[:, np.asarray(window_partition(
      np.roll(np.arange(hp * wp).reshape(1, hp, wp, 1), (-shift, -shift), (1, 2)), 4)).reshape(-1)], ours)
  np.testing.assert_array_equal(np.asarray(vjp(g)[0]), np.asarray(vjp_ref(g)[0]))


@pytest.mark.parametrize("n_in,n_out", [(6, 24), (24, 6)])  # both kernel-gradient forms
def test_dense_vjp_equals_autodiff(n_in, n_out):
  """dense and dense_bias: values and every cotangent equal autodiff of x @ w (+ b)."""
  import jax.numpy as jnp
  from esc_jax.layers.common import dense, dense_bias
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(n_in), 3)
  x, w = jax.random.normal(k1, (2, 5, 7, n_in)), jax.random.normal(k2, (n_in, n_out))
  g = jax.random.normal(k3, (2, 5, 7, n_out))
  with jax.default_matmul_precision("highest"):
    y, vjp = jax.vjp(dense, x, w)
    y_ref, vjp_ref = jax.vjp(jnp.dot, x, w)
    (dx, dw), (dx_ref, dw_ref) = vjp(g), vjp_ref(g)
  assert dw.shape == (n_in, n_out) and dx.shape == x.shape
  for a, b in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * np.abs(b).max())
  _, vjp16 = jax.vjp(dense, x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
  dx16, dw16 = vjp16(g.astype(jnp.bfloat16))
  assert dx16.dtype == dw16.dtype == jnp.bfloat16
  assert np.abs(np.asarray(dw16, np.float32) - np.asarray(dw_ref)).max() <= 0.05 * np.abs(dw_ref).max()
  b = jax.random.normal(k3, (n_out,))
  with jax.default_matmul_precision("highest"):
    yb, vjpb = jax.vjp(dense_bias, x, w, b)
    yb_ref, vjpb_ref = jax.vjp(lambda x, w, b: jnp.dot(x, w) + b, x, w, b)
    grads, grads_ref = vjpb(g), vjpb_ref(g)
  for a, r in ((yb, yb_ref), *zip(grads, grads_ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=0, atol=1e-5 * np.abs(r).max())


def _layer_norm_reference(x, scale, bias, dy):
  """float64 numpy LayerNorm (eps 1e-5) over the last axis and its VJP."""
  x, scale, bias, dy = (np.asarray(a, np.float64) for a in (x, scale, bias, dy))
  xc = x - x.mean(-1, keepdims=True)
  rstd = 1.0 / np.sqrt((xc * xc).mean(-1, keepdims=True) + 1e-5)
  xhat = xc * rstd
  g = dy * scale
  dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
  axes = tuple(range(x.ndim - 1))
  return xhat * scale + bias, (dx, (dy * xhat).sum(axes), dy.sum(axes))


@pytest.mark.parametrize("c", [45, 384])
def test_layer_norm_and_vjp_equal_float64_reference(c):
  """layer_norm (its CPU statistics are matrix-vector products) and its hand-written VJP
  against float64; far-from-zero means check the two-pass variance; bf16 in, float32 out."""
  import jax.numpy as jnp
  from esc_jax.layers.common import layer_norm
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(c), 4)
  x = 3.0 + 2.0 * jax.random.normal(k1, (2, 50, c))
  scale, bias = 1.0 + jax.random.normal(k2, (c,)), jax.random.normal(k3, (c,))
  dy = jax.random.normal(k4, (2, 50, c))
  y, vjp = jax.jit(lambda *a: jax.vjp(layer_norm, *a))(x, scale, bias)
  y_ref, grads_ref = _layer_norm_reference(x, scale, bias, dy)
  for a, r in ((y, y_ref), *zip(vjp(dy), grads_ref)):
    assert a.dtype == jnp.float32 and a.shape == r.shape
    np.testing.assert_allclose(np.asarray(a), r, rtol=0, atol=2e-6 * np.abs(r).max())
  y16, vjp16 = jax.vjp(layer_norm, x.astype(jnp.bfloat16), scale, bias)
  (dx16, _, _) = vjp16(dy)
  assert y16.dtype == jnp.float32 and dx16.dtype == jnp.bfloat16
  y_ref16, _ = _layer_norm_reference(np.asarray(x.astype(jnp.bfloat16), np.float32), scale, bias, dy)
  np.testing.assert_allclose(np.asarray(y16), y_ref16, rtol=0, atol=2e-6 * np.abs(y_ref16).max())


def test_layer_norm_statistics_are_dots_on_cpu():
  """On CPU the per-token means lower to dots, with no reduction left in the forward."""
  from esc_jax.layers.common import layer_norm
  x, p = np.ones((4, 100, 45), np.float32), np.ones((45,), np.float32)
  hlo = jax.jit(layer_norm).lower(x, p, p).as_text()
  assert hlo.count("dot_general") == 2 and "reduce" not in hlo


@pytest.mark.parametrize("hw", [(8, 30), (31, 30)])  # W padded; H and W padded
def test_window_order_with_padding_equals_grid_order(hw, monkeypatch):
  """A map with padding run in window order (padding carried, norm1 masked) gives the
  outputs and gradients of the grid-order path (zero padding after norm1, per block)."""
  import jax.numpy as jnp
  from esc_jax.layers import attention
  assert attention.keeps_window_order(*hw, 4)
  layer = attention.TransformerLayer(12, 12, 3, depth=4)
  x = jax.random.normal(jax.random.PRNGKey(hw[1]), (2, *hw, 12))
  params = jax.jit(layer.init)(jax.random.PRNGKey(0), x)
  params = jax.tree_util.tree_map(lambda a: a + 0.1 * jax.random.normal(jax.random.PRNGKey(1), a.shape), params)

  def run():  # jitted: one compile instead of one per operation
    f = lambda p, x: jnp.sum(jnp.sin(layer.apply(p, x)))  # noqa: E731
    with jax.default_matmul_precision("highest"):
      return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(params, x)

  (v, (gp, gx)) = run()
  monkeypatch.setattr(attention, "keeps_window_order", lambda h, w, window: False)
  (v_ref, (gp_ref, gx_ref)) = run()
  np.testing.assert_allclose(float(v), float(v_ref), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(gx), np.asarray(gx_ref), rtol=0, atol=1e-5 * np.abs(gx_ref).max())
  for a, b in zip(jax.tree_util.tree_leaves(gp), jax.tree_util.tree_leaves(gp_ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * np.abs(b).max() + 1e-7)


@pytest.mark.parametrize("hw", [(2, 7), (8, 30)])  # grid order (H=2 padded to 4); window order with padding
def test_transformer_layer_bf16_close_to_float32(hw):
  """bf16 compute through both token layouts: outputs and float32 parameter gradients
  close to the float32 layer's."""
  import jax.numpy as jnp
  from esc_jax.layers.attention import TransformerLayer
  x = jax.random.normal(jax.random.PRNGKey(3), (2, *hw, 12))
  layers = {dt: TransformerLayer(12, 12, 3, dtype=dt) for dt in (jnp.float32, jnp.bfloat16)}
  params = jax.jit(layers[jnp.float32].init)(jax.random.PRNGKey(0), x)
  out = {}
  for dt, layer in layers.items():
    def value_and_vjp(p, layer=layer):  # jitted: one compile instead of one per operation
      y, vjp = jax.vjp(lambda q: layer.apply(q, x), p)
      return y, vjp(jnp.ones_like(y))[0]
    out[dt] = jax.jit(value_and_vjp)(params)
  (y16, g16), (y32, g32) = out[jnp.bfloat16], out[jnp.float32]
  assert y16.shape == y32.shape == x.shape
  assert np.abs(np.asarray(y16, np.float32) - np.asarray(y32)).max() <= 0.05 * np.abs(np.asarray(y32)).max()
  for a, b in zip(jax.tree_util.tree_leaves(g16), jax.tree_util.tree_leaves(g32)):
    assert a.dtype == jnp.float32
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 0.05 * np.abs(np.asarray(b)).max() + 1e-3


@pytest.mark.parametrize("kernel,stride,padding,hw", [
    ((5, 1), (3, 1), ((2, 2), (0, 0)), (17, 3)),  # MPD conv, H with a stride remainder
    ((3, 9), (1, 2), ((1, 1), (4, 4)), (6, 21)),  # MRD band conv, odd W
    ((3, 3), (1, 1), ((1, 1), (1, 1)), (5, 7)),   # output conv
    ((4, 3), (2, 3), ((0, 1), (2, 0)), (9, 11)),  # uneven padding, both remainders
])
def test_strided_conv_vjp_equals_autodiff(kernel, stride, padding, hw):
  """The discriminator's convolution: value and both cotangents equal autodiff's."""
  import jax.numpy as jnp
  from esc_jax.layers.common import strided_conv2d
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(hw[0] * hw[1]), 3)
  x = jax.random.normal(k1, (2, *hw, 3))
  w = jax.random.normal(k2, (*kernel, 3, 4))
  ref = lambda x, w: jax.lax.conv_general_dilated(x, w, stride, padding,  # noqa: E731
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
  ours = lambda x, w: strided_conv2d(x, w, stride, padding)  # noqa: E731

  @functools.partial(jax.jit, static_argnums=0)  # one compile, not one per operation
  def value_and_cotangents(f, x, w, g):
    y, vjp = jax.vjp(f, x, w)
    return y, vjp(g)

  g = jax.random.normal(k3, jax.eval_shape(ours, x, w).shape)
  with jax.default_matmul_precision("highest"):
    y, grads = value_and_cotangents(ours, x, w, g)
    y_ref, grads_ref = value_and_cotangents(ref, x, w, g)
  for a, b in ((y, y_ref), *zip(grads, grads_ref)):
    assert a.shape == b.shape
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * np.abs(b).max())
  _, grads16 = value_and_cotangents(ours, x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), g.astype(jnp.bfloat16))
  assert all(t.dtype == jnp.bfloat16 for t in grads16)


def test_strided_conv_gradient_inside_cond_uses_canonical_convolutions():
  """The adversarial step differentiates the discriminator inside a lax.cond branch,
  where XLA:CPU leaves non-canonical convolutions in a naive loop: every convolution
  of the compiled gradient must be in the NHWC/HWIO form (autodiff's are not)."""
  import re
  import jax.numpy as jnp
  from esc_jax.layers.common import strided_conv2d
  x, w = jnp.ones((2, 12, 3, 2)), jnp.ones((5, 1, 2, 4))

  def labels(conv):
    grad = jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1))
    f = lambda p, x, w: jax.lax.cond(p, lambda: grad(x, w), lambda: (x, w))  # noqa: E731
    return set(re.findall(r"dim_labels=(\S+?),", jax.jit(f).lower(True, x, w).compile().as_text()))

  ours = labels(lambda x, w: strided_conv2d(x, w, (3, 1), ((2, 2), (0, 0))))
  assert ours == {"b01f_01io->b01f"}
  autodiff = labels(lambda x, w: jax.lax.conv_general_dilated(
      x, w, (3, 1), ((2, 2), (0, 0)), dimension_numbers=("NHWC", "HWIO", "NHWC")))
  assert autodiff != {"b01f_01io->b01f"}  # what the custom backward avoids
