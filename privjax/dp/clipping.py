"""Clipped per-example (or per-group) gradient sums, with their L2 sensitivity.

``clipped_grad_sum(loss_fun, ...)`` transforms a per-example loss into a
function returning the SUM over groups of clipped group gradients. A group is
the unit of privacy: one example (example-level DP) or all the examples of one
user (user-level DP). The gradient of a group is the gradient of the summed
loss of its examples; it is clipped as a whole, so one group changes the sum by
at most ``sensitivity`` in L2 norm.

Guarantee. For any two batches that differ by adding or removing one group,
the returned sums differ by at most ``sensitivity`` in L2 norm: every clipped
group gradient has norm <= C (global clipping) or per-leaf norms <= C_l
(per-layer clipping, sensitivity sqrt(sum_l C_l^2)), padding groups (mask 0)
and groups with any non-finite value contribute exactly zero, and groups are
summed, never averaged by a data-dependent count.

Batch layout: every leaf of ``batch`` has leading axes ``[G, K]`` (G groups of
K example slots, K = 1 for example-level DP) and ``mask`` is ``[G, K]`` with 1
for real examples and 0 for padding.

Per-example gradients are materialised with ``jax.vmap`` over groups; clip
factors are contracted with them afterwards (a tensordot over the group axis),
which measured ~6x faster on CPU than scaling inside the vmap. Microbatching
runs this over slices of the group axis with ``lax.scan`` and gives the same
sum with a smaller peak memory.
"""

from collections.abc import Callable
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any
# loss_fun(params, example, rng) -> scalar loss of ONE example. `rng` is a
# per-example key (or None when the step passes none).
LossFun = Callable[[PyTree, PyTree, jax.Array | None], jax.Array]


class ClippedSum(NamedTuple):
  """What a clipping function returns.

  Attributes:
    grad_sum: sum over groups of clipped group gradients (same tree as params).
    sensitivity: public L2 sensitivity of ``grad_sum`` (a Python float).
    norms: [G] unclipped L2 norm of each group gradient (non-private; for
      metrics and tests). Per-layer clipping reports the global norm too.
    valid: [G] 1.0 for groups that contributed (real and finite), else 0.0.
    loss_sum: sum of the losses of real examples (non-private, for metrics).
  """
  grad_sum: PyTree
  sensitivity: float
  norms: jax.Array
  valid: jax.Array
  loss_sum: jax.Array


def per_layer_clip_norms(params: PyTree, l2_clip_norm: float) -> PyTree:
  """Splits a total clip norm C equally over leaves: C_l = C / sqrt(L).

  The resulting sensitivity sqrt(sum_l C_l^2) equals C.

  >>> norms = per_layer_clip_norms({"a": 0, "b": 0, "c": 0, "d": 0}, 2.0)
  >>> norms["a"]
  1.0
  """
  leaves, treedef = jax.tree.flatten(params)
  c = l2_clip_norm / math.sqrt(len(leaves))
  return jax.tree.unflatten(treedef, [c] * len(leaves))


def sensitivity_of(l2_clip_norm: float | PyTree) -> float:
  """L2 sensitivity of a clipped sum: C, or sqrt(sum C_l^2) per layer."""
  leaves = jax.tree.leaves(l2_clip_norm)
  for c in leaves:
    if not (isinstance(c, (int, float)) and c > 0 and math.isfinite(c)):
      raise ValueError(f"l2_clip_norm={c!r} must be a finite number > 0")
  if not isinstance(l2_clip_norm, (int, float)):
    return math.sqrt(sum(float(c) ** 2 for c in leaves))
  return float(l2_clip_norm)


def _sq_norms_per_row(tree: PyTree) -> PyTree:
  return jax.tree.map(
      lambda g: jnp.sum(jnp.square(g.astype(jnp.float32)),
                        axis=tuple(range(1, g.ndim))), tree)


def _group_loss(loss_fun: LossFun, params, group, mask_k, rng_k):
  """Masked sum of the losses of one group's K examples."""
  losses = jax.vmap(loss_fun, in_axes=(None, 0, 0))(params, group, rng_k)
  # `where`, not a product: a padding slot may hold a non-finite loss.
  return jnp.sum(jnp.where(mask_k > 0, losses, 0.0))


def _row_mask(mask_g, like: jax.Array) -> jax.Array:
  return mask_g.reshape(mask_g.shape + (1,) * (like.ndim - 1))


class ClipRule(NamedTuple):
  """Global or per-layer clipping: turns per-leaf squared norms into factors.

  ``factors(sq_norms, valid, params)`` maps a tree of [G] squared norms (one
  per parameter leaf) to a tree of [G] clip factors (0 for invalid groups);
  ``sensitivity(params)`` is the L2 sensitivity of the clipped sum.
  """
  factors: Callable[[PyTree, jax.Array, PyTree], PyTree]
  sensitivity: Callable[[PyTree], float]


def clip_rule(l2_clip_norm: float | PyTree, per_layer: bool = False) -> ClipRule:
  """The clipping rule for a total clip norm C or a pytree of per-leaf C_l."""
  if per_layer or not isinstance(l2_clip_norm, (int, float)):
    if isinstance(l2_clip_norm, (int, float)):
      sensitivity_of(l2_clip_norm)  # validates C
      clip_tree = lambda params: per_layer_clip_norms(params, l2_clip_norm)
    else:
      sensitivity_of(l2_clip_norm)
      clip_tree = lambda params: l2_clip_norm

    def factors(sq, valid, params):
      return jax.tree.map(
          lambda c, s: jnp.where(valid, c / jnp.maximum(jnp.sqrt(s), c), 0.0),
          clip_tree(params), sq)

    return ClipRule(factors, lambda params: sensitivity_of(clip_tree(params)))

  c = sensitivity_of(l2_clip_norm)

  def global_factors(sq, valid, params):
    del params
    norms = jnp.sqrt(sum(jax.tree.leaves(sq)))
    f = jnp.where(valid, c / jnp.maximum(norms, c), 0.0)
    return jax.tree.map(lambda _: f, sq)

  return ClipRule(global_factors, lambda params: c)


def example_keys(rng: jax.Array | None, num_groups: int, k: int):
  """One key per example slot, [G, K]; None stays None (an empty pytree)."""
  if rng is None:
    return None
  keys = jax.random.split(rng, num_groups * k)
  return keys.reshape((num_groups, k) + keys.shape[1:])


def accumulate(slice_fun, params, batch, mask, rngs,
               microbatch_size: int | None):
  """Runs ``slice_fun(params, batch, mask, rngs) -> (sum, norms, valid,
  loss_sum)`` on the whole batch or over microbatches of groups (lax.scan),
  summing the clipped sums and loss sums and concatenating norms and valid."""
  num_groups = mask.shape[0]
  if microbatch_size is None or microbatch_size >= num_groups:
    return slice_fun(params, batch, mask, rngs)
  if num_groups % microbatch_size:
    raise ValueError(
        f"microbatch_size={microbatch_size} must divide the number of "
        f"groups {num_groups}")
  n = num_groups // microbatch_size
  split = lambda x: x.reshape((n, microbatch_size) + x.shape[1:])
  xs = (jax.tree.map(split, batch), split(mask), jax.tree.map(split, rngs))
  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, p.dtype), params)

  def body(acc, x):
    s, norms, valid, loss_sum = slice_fun(params, *x)
    return (jax.tree.map(jnp.add, acc[0], s), acc[1] + loss_sum), (norms, valid)

  (total, loss_sum), (norms, valid) = jax.lax.scan(
      body, (zeros, jnp.zeros((), jnp.float32)), xs)
  return total, norms.reshape(-1), valid.reshape(-1), loss_sum


def contract(factors: PyTree, per_group: PyTree, valid: jax.Array) -> PyTree:
  """sum_g factor_g * grad_g, with invalid rows zeroed first (0 * nan = nan)."""
  return jax.tree.map(
      lambda f, g: jnp.tensordot(
          f.astype(g.dtype), jnp.where(_row_mask(valid, g), g, 0), axes=1),
      factors, per_group)


def clipped_grad_sum(
    loss_fun: LossFun,
    *,
    l2_clip_norm: float | PyTree,
    per_layer: bool = False,
    microbatch_size: int | None = None,
) -> Callable[..., ClippedSum]:
  """Returns ``fun(params, batch, mask, rng=None) -> ClippedSum``.

  Args:
    loss_fun: ``loss_fun(params, example, rng) -> scalar`` for one example.
    l2_clip_norm: C for global clipping; with ``per_layer=True`` either C
      (split equally over leaves, total sensitivity C) or a pytree of C_l
      matching ``params``.
    per_layer: clip each parameter leaf separately.
    microbatch_size: process this many groups at a time (must divide G).

  Returns:
    A function of ``(params, batch, mask, rng=None)``; ``rng`` (if given) is
    split into one key per example slot.

  >>> loss = lambda w, ex, rng: jnp.sum(w * ex["x"])
  >>> fun = clipped_grad_sum(loss, l2_clip_norm=1.0)
  >>> batch = {"x": jnp.array([[[3.0, 4.0]], [[0.3, 0.4]]])}   # G=2, K=1
  >>> out = fun(jnp.zeros(2), batch, jnp.ones((2, 1)))
  >>> out.grad_sum.tolist(), out.sensitivity   # [0.6, 0.8] + [0.3, 0.4]
  ([0.9000000357627869, 1.2000000476837158], 1.0)
  """
  rule = clip_rule(l2_clip_norm, per_layer)
  if microbatch_size is not None and microbatch_size <= 0:
    raise ValueError(f"microbatch_size={microbatch_size} must be > 0")

  def one_slice(params, batch, mask, rngs):
    grad_fn = jax.value_and_grad(lambda p, b, m, r: _group_loss(loss_fun, p, b, m, r))
    losses, grads = jax.vmap(grad_fn, in_axes=(None, 0, 0, 0))(
        params, batch, mask, rngs)
    real = jnp.sum(mask, axis=1) > 0
    sq = _sq_norms_per_row(grads)
    norms = jnp.sqrt(sum(jax.tree.leaves(sq)))
    valid = real & jnp.isfinite(norms) & jnp.isfinite(losses)
    clipped = contract(rule.factors(sq, valid, params), grads, valid)
    loss_sum = jnp.sum(jnp.where(real & jnp.isfinite(losses), losses, 0.0))
    return clipped, norms, valid.astype(jnp.float32), loss_sum

  def fun(params, batch, mask, rng: jax.Array | None = None) -> ClippedSum:
    mask = jnp.asarray(mask)
    rngs = example_keys(rng, *mask.shape)
    grad_sum, norms, valid, loss_sum = accumulate(
        one_slice, params, batch, mask, rngs, microbatch_size)
    return ClippedSum(grad_sum, rule.sensitivity(params), norms, valid, loss_sum)

  return fun


def grad_sum(loss_fun: LossFun) -> Callable[..., ClippedSum]:
  """The non-private twin: the plain gradient of the masked loss SUM.

  Same signature and output as ``clipped_grad_sum``'s function, with no
  clipping (``sensitivity`` is ``inf``) and no per-example gradients, so a
  non-private baseline runs through the same step at full speed.
  """

  def fun(params, batch, mask, rng: jax.Array | None = None) -> ClippedSum:
    mask = jnp.asarray(mask)
    num_groups, k = mask.shape
    flat = lambda x: x.reshape((num_groups * k,) + x.shape[2:])
    keys = example_keys(rng, num_groups, k)
    rngs = None if keys is None else keys.reshape((num_groups * k,) + keys.shape[2:])

    def total(p):
      if rngs is None:
        losses = jax.vmap(lambda ex: loss_fun(p, ex, None))(jax.tree.map(flat, batch))
      else:
        losses = jax.vmap(lambda ex, r: loss_fun(p, ex, r))(
            jax.tree.map(flat, batch), rngs)
      return jnp.sum(jnp.where(flat(mask) > 0, losses, 0.0))

    loss_sum, g = jax.value_and_grad(total)(params)
    real = (jnp.sum(mask, axis=1) > 0).astype(jnp.float32)
    return ClippedSum(g, math.inf, jnp.full((num_groups,), jnp.nan), real, loss_sum)

  return fun
