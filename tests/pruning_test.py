"""Tests for privjax.compress.pruning: exact counts, N:M blocks, masked DP updates, schedule."""

import math
import re

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from privjax.compress import pruning
from privjax.models import mlp


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "embed": {"embedding": jnp.asarray(rng.normal(size=(11, 8)), jnp.float32)},
      "encoder": {"layers": {
          0: {"attention": {"query": {
              "kernel": jnp.asarray(rng.normal(size=(8, 12)), jnp.float32),
              "bias": jnp.zeros(12)}}},
          1: {"dense": {
              "kernel": jnp.asarray(0.01 * rng.normal(size=(12, 8)), jnp.float32),
              "bias": jnp.zeros(8)}}}},
      "norm": {"scale": jnp.ones(8)},
  }


# ------------------------------------------------------------------ selection

def test_default_selects_2d_kernels_only():
  assert pruning.selected_paths(_params()) == [
      "encoder/layers/0/attention/query/kernel", "encoder/layers/1/dense/kernel"]


def test_patterns_exclude_and_regex():
  params = _params()
  assert pruning.selected_paths(params, pattern="*", exclude="*embed*") == [
      "encoder/layers/0/attention/query/kernel", "encoder/layers/1/dense/kernel"]
  assert pruning.selected_paths(params, pattern=re.compile(r".*/1/.*kernel")) == [
      "encoder/layers/1/dense/kernel"]
  # a regex must match the whole path, as a glob does
  with pytest.raises(ValueError, match="selects no"):
    pruning.selected_paths(params, pattern=re.compile("kernel"))


def test_pattern_selecting_nothing_names_the_pattern():
  with pytest.raises(ValueError, match=r"pattern='\*kernal'"):
    pruning.magnitude_masks(_params(), sparsity=0.5, pattern="*kernal")


def test_unselected_leaves_get_none():
  masks = pruning.magnitude_masks(_params(), sparsity=0.5)
  assert masks["embed"]["embedding"] is None
  assert masks["encoder"]["layers"][0]["attention"]["query"]["bias"] is None
  kernel_mask = masks["encoder"]["layers"][0]["attention"]["query"]["kernel"]
  assert kernel_mask.dtype == jnp.bool_ and kernel_mask.shape == (8, 12)


# --------------------------------------------------------------- exact counts

@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.29, 0.5, 0.9, 0.999, 1.0])
def test_per_layer_prunes_exact_count_of_smallest(sparsity):
  params = _params()
  masks = pruning.magnitude_masks(params, sparsity=sparsity)
  for path in pruning.selected_paths(params):
    keys = [int(k) if k.isdigit() else k for k in path.split("/")]
    w, m = params, masks
    for k in keys:
      w, m = w[k], m[k]
    w, m = np.abs(np.asarray(w)), np.asarray(m)
    assert (~m).sum() == math.floor(round(sparsity * w.size, 6))
    if 0 < (~m).sum() < w.size:
      assert w[~m].max() <= w[m].min()


def test_count_is_robust_to_float_representation():
  # 0.29 * 100 == 28.999999999999996 in floating point; 29 must be pruned.
  w = jnp.arange(1.0, 101.0).reshape(10, 10)
  masks = pruning.magnitude_masks({"kernel": w}, sparsity=0.29)
  assert int((~masks["kernel"]).sum()) == 29


def test_ties_are_broken_by_lower_index_first():
  masks = pruning.magnitude_masks({"kernel": jnp.ones((2, 3))}, sparsity=0.5)
  assert masks["kernel"].tolist() == [[False, False, False], [True, True, True]]
  w = jnp.array([[1.0, 0.0], [0.0, 0.0]])
  keep = pruning.magnitude_masks({"kernel": w}, sparsity=0.5)["kernel"]
  assert keep.tolist() == [[True, False], [False, True]]


def test_global_scope_uses_one_threshold():
  params = _params()
  masks = pruning.magnitude_masks(params, sparsity=0.5, scope="global")
  w = [params["encoder"]["layers"][0]["attention"]["query"]["kernel"],
       params["encoder"]["layers"][1]["dense"]["kernel"]]
  m = [masks["encoder"]["layers"][0]["attention"]["query"]["kernel"],
       masks["encoder"]["layers"][1]["dense"]["kernel"]]
  all_w = np.abs(np.concatenate([np.ravel(x) for x in w]))
  all_m = np.concatenate([np.ravel(x) for x in m])
  assert (~all_m).sum() == all_w.size // 2
  assert all_w[~all_m].max() <= all_w[all_m].min()
  # one threshold: the 100x smaller layer takes (almost) all the pruning
  assert np.asarray(m[1]).mean() < 0.1 and np.asarray(m[0]).mean() > 0.9
  per_layer = pruning.magnitude_masks(params, sparsity=0.5, scope="per_layer")
  assert np.asarray(per_layer["encoder"]["layers"][1]["dense"]["kernel"]).mean() == 0.5


def test_argument_errors_name_the_value():
  with pytest.raises(ValueError, match="sparsity=1.5"):
    pruning.magnitude_masks(_params(), sparsity=1.5)
  with pytest.raises(ValueError, match="exactly one"):
    pruning.magnitude_masks(_params(), sparsity=0.5, n_m=(2, 4))
  with pytest.raises(ValueError, match="scope='layer'"):
    pruning.magnitude_masks(_params(), sparsity=0.5, scope="layer")
  with pytest.raises(ValueError, match=r"n_m=\(4, 2\)"):
    pruning.magnitude_masks(_params(), n_m=(4, 2))


# ---------------------------------------------------------------------- N:M

@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (1, 2), (3, 4)])
def test_n_m_keeps_n_largest_in_every_input_axis_block(n, m):
  w = jnp.asarray(np.random.default_rng(1).normal(size=(16, 6)), jnp.float32)
  keep = np.asarray(pruning.magnitude_masks({"kernel": w}, n_m=(n, m))["kernel"])
  # blocks of m consecutive rows (input axis), separately per output column
  blocks_keep = keep.reshape(16 // m, m, 6)
  blocks_w = np.abs(np.asarray(w)).reshape(16 // m, m, 6)
  assert (blocks_keep.sum(axis=1) == n).all()
  kept_min = np.where(blocks_keep, blocks_w, np.inf).min(axis=1)
  pruned_max = np.where(blocks_keep, -np.inf, blocks_w).max(axis=1)
  assert (pruned_max <= kept_min).all()


def test_n_m_block_axis_1_and_ties():
  keep = pruning.magnitude_masks({"kernel": jnp.ones((3, 8))}, n_m=(2, 4),
                                 block_axis=1)["kernel"]
  assert np.asarray(keep).reshape(3, 2, 4).sum(-1).tolist() == [[2, 2]] * 3
  # equal magnitudes: the lower indices of each block are pruned first
  assert keep[0].tolist() == [False, False, True, True] * 2


def test_n_m_requires_divisible_axis():
  with pytest.raises(ValueError, match=r"length 6 .* not divisible by M=4"):
    pruning.magnitude_masks({"kernel": jnp.ones((6, 8))}, n_m=(2, 4))


# --------------------------------------------------- apply, report, one-shot

def test_prune_zeroes_exactly_and_reports():
  params = _params()
  pruned, masks = pruning.prune(params, sparsity=0.75)
  q = pruned["encoder"]["layers"][0]["attention"]["query"]["kernel"]
  assert int((q == 0).sum()) == 72 and q.dtype == jnp.float32
  np.testing.assert_array_equal(pruned["embed"]["embedding"],
                                params["embed"]["embedding"])
  report = pruning.sparsity_report(pruned, masks)
  assert report["sparsity/encoder/layers/0/attention/query/kernel"] == 0.75
  assert report["sparsity/total"] == 0.75
  n_all = sum(x.size for x in jax.tree.leaves(params))
  assert report["sparsity/all_params"] == pytest.approx(0.75 * 192 / n_all)


def test_prune_nnx_model_params():
  model = mlp.NextItemMLP(num_items=20, max_len=4, embed_dim=8, hidden_dim=16,
                          rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  pruned, masks = pruning.prune(params, n_m=(2, 4))
  assert masks["item_embed"]["embedding"] is None
  hidden = np.asarray(pruned["hidden"]["kernel"])
  assert ((hidden != 0).reshape(8, 4, 16).sum(axis=1) == 2).all()
  nnx.update(model, pruned)  # the pruned dict loads back into the model
  np.testing.assert_array_equal(model.hidden.kernel[...], hidden)


# ---------------------------------------------------- DP training integration

def _noisy_adam_run(tx, params, steps=6, sigma=1.0, opt_state=None):
  """Adam-like steps on gradients plus Gaussian noise, as a DP step adds."""
  def loss(p):
    return sum(jnp.sum(jnp.sin(x) ** 2) for x in jax.tree.leaves(p))

  @jax.jit
  def step(params, opt_state, noise):
    grads = jax.tree.map(lambda g, z: g + sigma * z, jax.grad(loss)(params), noise)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  # NumPy noise keeps threefry out of the compiled step (faster tests).
  rng = np.random.default_rng(0)
  opt_state = tx.init(params) if opt_state is None else opt_state
  for _ in range(steps):
    noise = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
    params, opt_state = step(params, opt_state, noise)
  return params, opt_state


def test_masked_updates_keep_pruned_weights_exactly_zero_under_noisy_adam():
  params, masks = pruning.prune(_params(), sparsity=0.5)
  tx = optax.chain(optax.adamw(1e-2, weight_decay=0.1),
                   pruning.masked_updates(masks))
  trained, _ = _noisy_adam_run(tx, params)
  for w0, w, m in zip(jax.tree.leaves(params), jax.tree.leaves(trained),
                      jax.tree.leaves(masks, is_leaf=lambda x: x is None)):
    if m is None:
      assert (np.asarray(w) != np.asarray(w0)).all()  # unpruned leaves train
    else:
      m = np.asarray(m)
      assert (np.asarray(w)[~m] == 0.0).all()
      assert (np.asarray(w)[m] != np.asarray(w0)[m]).all()


def test_without_masking_pruned_weights_become_nonzero():
  params, masks = pruning.prune(_params(), sparsity=0.5)
  trained, _ = _noisy_adam_run(optax.adam(1e-2), params)
  m = np.asarray(masks["encoder"]["layers"][1]["dense"]["kernel"])
  w = np.asarray(trained["encoder"]["layers"][1]["dense"]["kernel"])
  assert (w[~m] != 0.0).all()


def test_mid_training_pruning_needs_masking_after_adam_not_before():
  # Adam trains unpruned for a while, so its moments hold past gradients.
  params, adam_state = _noisy_adam_run(optax.adam(1e-2), _params(), steps=3)
  params, masks = pruning.prune(params, sparsity=0.5)
  keep = np.asarray(masks["encoder"]["layers"][0]["attention"]["query"]["kernel"])

  def pruned_weights(tx, opt_state):
    trained, _ = _noisy_adam_run(tx, params, steps=2, opt_state=opt_state)
    return np.asarray(trained["encoder"]["layers"][0]["attention"]["query"]["kernel"])[~keep]

  mask_state = pruning.MaskedUpdatesState(masks=masks)
  after = optax.chain(optax.adam(1e-2), pruning.masked_updates(masks))
  assert (pruned_weights(after, (adam_state, mask_state)) == 0.0).all()
  # masking the (noisy) gradients before Adam leaves the stale moments active
  before = optax.chain(pruning.masked_updates(masks), optax.adam(1e-2))
  assert (pruned_weights(before, (mask_state, adam_state)) != 0.0).all()


def test_masks_in_optimizer_state_can_be_replaced_without_retracing():
  params = _params()
  tx = optax.chain(optax.sgd(0.1), pruning.masked_updates(
      lambda p: pruning.magnitude_masks(p, sparsity=0.25)))
  update = jax.jit(chex.assert_max_traces(tx.update, n=1))
  grads = jax.tree.map(jnp.ones_like, params)
  opt_state = tx.init(params)
  updates, _ = update(grads, opt_state, params)
  u = updates["encoder"]["layers"][1]["dense"]["kernel"]
  assert float((u == 0).mean()) == 0.25

  params, masks = pruning.update_masks_if_due(
      params, None, 10, schedule=pruning.GradualPruning(
          final_sparsity=0.5, start_step=0, end_step=10, frequency=5))
  opt_state = optax.tree_utils.tree_set(opt_state, masks=masks)
  updates, _ = update(grads, opt_state, params)  # same shapes: no retrace
  keep = masks["encoder"]["layers"][1]["dense"]["kernel"]
  u = updates["encoder"]["layers"][1]["dense"]["kernel"]
  assert (u[~keep] == 0).all() and (u[keep] == -0.1).all()
  assert float((~keep).mean()) == 0.5


def test_mask_updates_turns_nan_into_zero():
  out = pruning.mask_updates({"k": jnp.array([jnp.nan, jnp.inf, 2.0])},
                             {"k": jnp.array([False, False, True])})
  assert out["k"].tolist() == [0.0, 0.0, 2.0]


# ------------------------------------------------------------------ schedule

SCHEDULE = dict(final_sparsity=0.9, start_step=100, end_step=1000, frequency=100)


def test_schedule_endpoints():
  assert pruning.sparsity_at(0, **SCHEDULE) == 0.0
  assert pruning.sparsity_at(99, **SCHEDULE) == 0.0
  assert pruning.sparsity_at(100, **SCHEDULE) == 0.0
  assert pruning.sparsity_at(100, **SCHEDULE, initial_sparsity=0.2) == 0.2
  assert pruning.sparsity_at(1000, **SCHEDULE) == 0.9
  assert pruning.sparsity_at(10 ** 6, **SCHEDULE) == 0.9


def test_schedule_is_cubic_at_pruning_steps_and_flat_between():
  for t in range(100, 1000, 100):
    frac = (t - 100) / 900
    expected = 0.9 * (1 - (1 - frac) ** 3)
    assert pruning.sparsity_at(t, **SCHEDULE) == pytest.approx(expected, abs=1e-12)
    assert pruning.sparsity_at(t + 99, **SCHEDULE) == pruning.sparsity_at(t, **SCHEDULE)
  # cubic, not linear: half-way it is 0.9 * (1 - 1/8)
  assert pruning.sparsity_at(550, final_sparsity=0.8, start_step=100, end_step=1000,
                             frequency=450) == pytest.approx(0.7)


def test_schedule_is_monotone_and_reaches_final_off_grid():
  kwargs = dict(final_sparsity=0.8, start_step=3, end_step=50, frequency=7,
                initial_sparsity=0.1)
  values = [pruning.sparsity_at(t, **kwargs) for t in range(0, 60)]
  assert all(a <= b for a, b in zip(values, values[1:]))
  assert values[49] < 0.8 and values[50] == 0.8
  schedule = pruning.GradualPruning(**kwargs)
  due = [t for t in range(60) if schedule.is_due(t)]
  assert due == [3, 10, 17, 24, 31, 38, 45, 50]


def test_schedule_validation():
  with pytest.raises(ValueError, match="end_step=5 must be >= start_step=10"):
    pruning.GradualPruning(final_sparsity=0.5, start_step=10, end_step=5)
  with pytest.raises(ValueError, match="frequency=0"):
    pruning.sparsity_at(3, final_sparsity=0.5, start_step=0, end_step=9, frequency=0)
  with pytest.raises(ValueError, match="initial_sparsity=0.6"):
    pruning.GradualPruning(final_sparsity=0.5, start_step=0, end_step=9,
                           initial_sparsity=0.6)


def test_gradual_pruning_masks_only_shrink_and_hit_exact_counts():
  schedule = pruning.GradualPruning(final_sparsity=0.8, start_step=2, end_step=10,
                                    frequency=2)
  params, masks = _params(), None
  rng = np.random.default_rng(0)
  previous_keep = None
  for step in range(12):
    new_params, new_masks = pruning.update_masks_if_due(params, masks, step,
                                                        schedule=schedule)
    if not schedule.is_due(step):
      assert new_params is params and new_masks is masks
    else:
      keep = np.asarray(new_masks["encoder"]["layers"][0]["attention"]["query"]["kernel"])
      assert (~keep).sum() == math.floor(round(schedule.sparsity_at(step) * 96, 6))
      if previous_keep is not None:
        assert not (keep & ~previous_keep).any()  # nothing revived
      previous_keep = keep
    params, masks = new_params, new_masks
    # a "training step" that moves unpruned weights; pruned ones stay zero
    noise = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype),
                         params)
    if masks is not None:
      noise = pruning.mask_updates(noise, masks)
    params = jax.tree.map(lambda p, n: p + 0.5 * n, params, noise)
  assert pruning.sparsity_report(params, masks)["sparsity/total"] == 76 / 96


def test_mismatched_masks_are_rejected():
  masks = pruning.magnitude_masks(_params(), sparsity=0.5)
  with pytest.raises(ValueError, match="does not match"):
    pruning.sparsity_report({"kernel": jnp.ones((2, 2))}, masks)
  with pytest.raises(ValueError, match="does not match"):
    pruning.magnitude_masks({"kernel": jnp.ones((2, 2))}, sparsity=0.5,
                            previous_masks=masks)


def test_magnitude_masks_under_jit():
  params = _params()
  eager = pruning.magnitude_masks(params, sparsity=0.3, scope="global")
  jitted = jax.jit(lambda p: pruning.magnitude_masks(p, sparsity=0.3,
                                                     scope="global"))(params)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    np.testing.assert_array_equal(a, b)
