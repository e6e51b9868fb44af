"""Exactness of clipped per-example / per-group gradient sums."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from privjax.dp import clipping


def _params(seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return {"w1": jax.random.normal(k1, (5, 7)), "b1": jax.random.normal(k2, (7,)),
          "w2": jax.random.normal(k3, (7, 3))}


def _loss(params, ex, rng):
  del rng
  h = jnp.tanh(ex["x"] @ params["w1"] + params["b1"])
  logits = h @ params["w2"]
  return jax.nn.logsumexp(logits) - logits[ex["y"]]


def _batch(g, k, seed=1, scale=3.0):
  rng = np.random.default_rng(seed)
  return {"x": jnp.asarray(scale * rng.normal(size=(g, k, 5)), jnp.float32),
          "y": jnp.asarray(rng.integers(0, 3, size=(g, k)), jnp.int32)}


_example_grad = jax.jit(jax.grad(_loss))


def _loop_group_grads(params, batch, mask):
  """Reference: a Python loop over groups and examples, no vmap."""
  out = []
  for gi in range(mask.shape[0]):
    total = jax.tree.map(jnp.zeros_like, params)
    for ki in range(mask.shape[1]):
      if mask[gi, ki] > 0:
        ex = jax.tree.map(lambda v: v[gi, ki], batch)
        total = jax.tree.map(jnp.add, total, _example_grad(params, ex, None))
    out.append(total)
  return out


def _norm(tree):
  return math.sqrt(sum(float(jnp.sum(jnp.square(x))) for x in jax.tree.leaves(tree)))


def _assert_tree_close(a, b, atol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 3])
def test_vmapped_grads_equal_python_loop(k):
  params, batch = _params(), _batch(6, k)
  mask = np.ones((6, k), np.float32)
  mask[2, 0] = 0.0  # a partially padded group when k > 1
  fun = jax.jit(clipping.clipped_grad_sum(_loss, l2_clip_norm=1e6))
  out = fun(params, batch, jnp.asarray(mask))
  ref = _loop_group_grads(params, batch, mask)
  _assert_tree_close(out.grad_sum, jax.tree.map(lambda *g: sum(g), *ref))
  np.testing.assert_allclose(out.norms, [_norm(g) for g in ref], rtol=1e-5)


def test_clipped_sum_equals_loop_of_clipped_grads():
  params, batch = _params(), _batch(8, 2)
  mask = np.ones((8, 2), np.float32)
  c = 0.5
  out = clipping.clipped_grad_sum(_loss, l2_clip_norm=c)(params, batch, jnp.asarray(mask))
  ref = _loop_group_grads(params, batch, mask)
  clipped = [jax.tree.map(lambda x, n=_norm(g): x * min(1.0, c / n), g) for g in ref]
  _assert_tree_close(out.grad_sum, jax.tree.map(lambda *g: sum(g), *clipped))
  assert out.sensitivity == c
  # The clipping is real here: most groups exceed C.
  assert sum(_norm(g) > c for g in ref) >= 6


def test_every_clipped_contribution_is_at_most_c():
  params, batch = _params(), _batch(16, 4, scale=10.0)
  fun = jax.jit(clipping.clipped_grad_sum(_loss, l2_clip_norm=0.3))
  for g in range(16):
    one = jax.tree.map(lambda v: v[g:g + 1], batch)
    out = fun(params, one, jnp.ones((1, 4)))
    assert _norm(out.grad_sum) <= 0.3 * (1 + 1e-6)
    assert float(out.norms[0]) > 0.3  # unclipped norm was larger: the test bites


def test_padding_rows_contribute_exactly_zero():
  params, batch = _params(), _batch(4, 2)
  fun = clipping.clipped_grad_sum(_loss, l2_clip_norm=1.0)
  base = fun(params, batch, jnp.ones((4, 2)))
  # Append 3 padding groups full of garbage, including NaN and inf.
  garbage = {"x": jnp.full((3, 2, 5), jnp.nan).at[0].set(jnp.inf).at[1].set(1e30),
             "y": jnp.zeros((3, 2), jnp.int32)}
  padded = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), batch, garbage)
  mask = jnp.concatenate([jnp.ones((4, 2)), jnp.zeros((3, 2))])
  out = fun(params, padded, mask)
  for a, b in zip(jax.tree.leaves(out.grad_sum), jax.tree.leaves(base.grad_sum)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert np.asarray(out.valid).tolist() == [1, 1, 1, 1, 0, 0, 0]


def test_nonfinite_rows_contribute_exactly_zero():
  params, batch = _params(), _batch(5, 1)
  fun = clipping.clipped_grad_sum(_loss, l2_clip_norm=1.0)
  bad = {"x": batch["x"].at[2, 0, 0].set(jnp.inf), "y": batch["y"]}
  out = fun(params, bad, jnp.ones((5, 1)))
  keep = np.array([0, 1, 3, 4])
  ref = fun(params, jax.tree.map(lambda v: v[keep], batch), jnp.ones((4, 1)))
  for a, b in zip(jax.tree.leaves(out.grad_sum), jax.tree.leaves(ref.grad_sum)):
    assert np.all(np.isfinite(np.asarray(a)))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert np.asarray(out.valid).tolist() == [1, 1, 0, 1, 1]


@pytest.mark.parametrize("per_layer", [False, True])
def test_microbatched_sum_equals_plain_sum(per_layer):
  params, batch = _params(), _batch(12, 2)
  mask = jnp.asarray(np.random.default_rng(0).random((12, 2)) > 0.2, jnp.float32)
  plain = clipping.clipped_grad_sum(_loss, l2_clip_norm=0.7, per_layer=per_layer)
  micro = clipping.clipped_grad_sum(_loss, l2_clip_norm=0.7, per_layer=per_layer,
                                    microbatch_size=4)
  a, b = plain(params, batch, mask), jax.jit(micro)(params, batch, mask)
  _assert_tree_close(a.grad_sum, b.grad_sum)
  np.testing.assert_allclose(a.norms, b.norms, rtol=1e-6)
  with pytest.raises(ValueError, match="microbatch_size=5 must divide"):
    clipping.clipped_grad_sum(_loss, l2_clip_norm=1.0, microbatch_size=5)(
        params, batch, mask)


def test_group_clipping_bounds_each_groups_contribution():
  """A user with many examples moves the sum by at most C, however many."""
  params = _params()
  few, many = _batch(1, 1, seed=3), _batch(1, 16, seed=4, scale=10.0)
  fun = clipping.clipped_grad_sum(_loss, l2_clip_norm=0.25)
  others = _batch(5, 16, seed=5)
  mask = jnp.ones((5, 16))
  without = fun(params, others, mask)
  with_user = fun(params, jax.tree.map(lambda a, b: jnp.concatenate([a, b]), others, many),
                  jnp.ones((6, 16)))
  diff = jax.tree.map(jnp.subtract, with_user.grad_sum, without.grad_sum)
  assert _norm(diff) <= 0.25 * (1 + 1e-5)
  # The group gradient is the sum over its examples, clipped once.
  ref = _loop_group_grads(params, many, np.ones((1, 16)))[0]
  np.testing.assert_allclose(float(with_user.norms[-1]), _norm(ref), rtol=1e-5)
  assert _norm(ref) > 0.25
  del few


def test_per_layer_clipping_bounds_each_leaf():
  params, batch = _params(), _batch(1, 1, scale=10.0)
  clip = {"w1": 0.1, "b1": 0.2, "w2": 0.3}
  out = clipping.clipped_grad_sum(_loss, l2_clip_norm=clip)(params, batch, jnp.ones((1, 1)))
  assert out.sensitivity == pytest.approx(math.sqrt(0.01 + 0.04 + 0.09))
  for name, c in clip.items():
    assert _norm(out.grad_sum[name]) <= c * (1 + 1e-6)
  equal = clipping.clipped_grad_sum(_loss, l2_clip_norm=1.0, per_layer=True)(
      params, batch, jnp.ones((1, 1)))
  assert equal.sensitivity == pytest.approx(1.0)
  for leaf in jax.tree.leaves(equal.grad_sum):
    assert _norm(leaf) <= 1.0 / math.sqrt(3) * (1 + 1e-6)


def test_non_private_grad_sum_is_the_plain_gradient_of_the_masked_sum():
  params, batch = _params(), _batch(6, 2)
  mask = jnp.asarray(np.array([[1, 1], [1, 0], [0, 0], [1, 1], [1, 1], [0, 1]], np.float32))
  out = clipping.grad_sum(_loss)(params, batch, mask)
  ref = _loop_group_grads(params, batch, np.asarray(mask))
  _assert_tree_close(out.grad_sum, jax.tree.map(lambda *g: sum(g), *ref))
  assert math.isinf(out.sensitivity)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_bad_clip_norm_is_refused(bad):
  with pytest.raises(ValueError, match="l2_clip_norm"):
    clipping.clipped_grad_sum(_loss, l2_clip_norm=bad)


def test_per_example_rngs_are_distinct_and_deterministic():
  seen = []

  def loss(params, ex, rng):
    return jnp.sum(params * ex["x"]) * jax.random.uniform(rng)

  fun = clipping.clipped_grad_sum(loss, l2_clip_norm=1e6)
  batch = {"x": jnp.ones((3, 2, 1))}
  a = fun(jnp.ones(1), batch, jnp.ones((3, 2)), jax.random.key(0))
  b = fun(jnp.ones(1), batch, jnp.ones((3, 2)), jax.random.key(0))
  c = fun(jnp.ones(1), batch, jnp.ones((3, 2)), jax.random.key(1))
  np.testing.assert_array_equal(a.norms, b.norms)
  assert len(set(np.asarray(a.norms).round(6).tolist())) == 3  # distinct per group
  assert not np.allclose(a.norms, c.norms)
  del seen
