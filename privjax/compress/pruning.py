"""Magnitude pruning masks on parameter pytrees, and keeping pruned weights zero.

Privacy. Nothing here reads data: masks are computed from parameters only.
Every parameter vector a DP training run produces (each iterate as well as the
released one) is the output of a DP mechanism, so masks computed from it, and
pruning the model with them, are post-processing and cost no privacy budget.
This holds for one-shot pruning after training and for gradual pruning during
training alike. Choosing masks from activations or gradients of private
examples would NOT be post-processing; no function here does so.

Selecting leaves. A leaf is named by its "/"-joined path in the pytree, e.g.
``encoder/layers/0/attention/query/kernel`` (``nnx.to_pure_dict`` keys). A
pattern is a glob (``fnmatch.fnmatchcase``; ``*`` also matches "/"), a
compiled regex (``re.Pattern``, must match the whole path), or a sequence of
these (any may match). A leaf is selected when it is 2-D, matches ``pattern``
and matches no ``exclude`` pattern. The default selects every 2-D ``kernel``
([in, out] in ``privjax.models.nn.Linear``); embeddings are not pruned unless asked.

Masks. A mask pytree has the structure of the parameters: a bool array of the
leaf's shape for every selected leaf (True = keep) and ``None`` for every other
leaf, meaning "not pruned" (no memory spent on all-True arrays).

Exact counts and ties. Unstructured pruning of ``n`` weights at sparsity ``s``
zeroes exactly ``floor(s * n)`` of them (the product is first rounded to 6
decimals so that 0.29 * 100 prunes 29, not 28): achieved sparsity falls
short of the target by less than 1 / n and never exceeds it (beyond 1e-6 / n). Weights are ranked by
|w|; among equal magnitudes the one with the lower flat (row-major) index is
pruned first, so the count is exact even with ties. Under ``scope="global"``
the flat index runs over the selected leaves in pytree-flatten order.

Keeping pruned weights at zero during (DP) training. Noise is added to every
coordinate, and Adam's moments of a weight pruned mid-training still hold its
past gradients, so masking only the gradients is not enough.
``masked_updates`` zeroes the FINAL updates after the optimizer (put it last
in ``optax.chain``); with params already masked, pruned weights then stay
exactly 0.0 at every step whatever the optimizer state holds.
"""

from collections.abc import Callable, Sequence
import dataclasses
import fnmatch
import functools
import math
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from privjax import _validate

PyTree = Any
Pattern = str | re.Pattern | Sequence[str | re.Pattern]

DEFAULT_PATTERN = "*kernel"
SCOPES = ("per_layer", "global")


# ------------------------------------------------------------------ selection

def as_patterns(pattern: Pattern) -> tuple[str | re.Pattern, ...]:
  if isinstance(pattern, (str, re.Pattern)):
    return (pattern,)
  return tuple(pattern)


def matches(path: str, patterns: tuple[str | re.Pattern, ...]) -> bool:
  return any(p.fullmatch(path) if isinstance(p, re.Pattern)
             else fnmatch.fnmatchcase(path, p) for p in patterns)


def _flatten(params: PyTree) -> tuple[list[str], list[Any], Any]:
  with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [jax.tree_util.keystr(k, simple=True, separator="/") for k, _ in with_path]
  return paths, [leaf for _, leaf in with_path], treedef


def _selected(paths, leaves, pattern: Pattern, exclude: Pattern) -> list[bool]:
  include, excl = as_patterns(pattern), as_patterns(exclude)
  chosen = [jnp.ndim(leaf) == 2 and matches(path, include)
            and not matches(path, excl) for path, leaf in zip(paths, leaves)]
  if not any(chosen):
    shown = ", ".join(paths[:10]) + (", ..." if len(paths) > 10 else "")
    raise ValueError(f"pattern={pattern!r} with exclude={exclude!r} selects no "
                     f"2-D leaf; the leaves are: {shown}")
  return chosen


def selected_paths(params: PyTree, *, pattern: Pattern = DEFAULT_PATTERN,
                   exclude: Pattern = ()) -> list[str]:
  """Paths of the leaves a pattern selects (2-D, matching, not excluded).

  >>> params = {"embed": {"embedding": jnp.zeros((5, 2))},
  ...           "out": {"kernel": jnp.zeros((2, 3)), "bias": jnp.zeros(3)}}
  >>> selected_paths(params)
  ['out/kernel']
  >>> selected_paths(params, pattern=("*kernel", "*embedding"))
  ['embed/embedding', 'out/kernel']
  """
  paths, leaves, _ = _flatten(params)
  chosen = _selected(paths, leaves, pattern, exclude)
  return [p for p, c in zip(paths, chosen) if c]


# ---------------------------------------------------------------- mask making

def _num_pruned(sparsity: float, n: int) -> int:
  # round() first: 0.29 * 100 is 28.999999999999996 in binary floating point.
  return math.floor(round(sparsity * n, 6))


# Jitted with static counts: one compile per leaf shape instead of one per op
# (eager op-by-op dispatch dominated the cost of small calls).
@functools.partial(jax.jit, static_argnums=1)
def _prune_smallest(scores: jax.Array, k: int) -> jax.Array:
  """Keep-mask (flat) pruning the k lowest scores; ties: lower index first."""
  order = jnp.argsort(scores, stable=True)
  return jnp.ones(scores.shape, bool).at[order[:k]].set(False)


def _nm_keep(scores: jax.Array, n: int, m: int, axis: int, path: str) -> jax.Array:
  length = scores.shape[axis]
  if length % m:
    raise ValueError(f"n_m={(n, m)}: leaf {path} has length {length} along "
                     f"block_axis={axis}, which is not divisible by M={m}")
  return _nm_keep_jit(scores, n, m, axis)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _nm_keep_jit(scores: jax.Array, n: int, m: int, axis: int) -> jax.Array:
  moved = jnp.moveaxis(scores, axis, 0)
  length = moved.shape[0]
  blocks = moved.reshape(length // m, m, -1)
  # rank of each weight within its block by |w|, ties: lower index ranks lower
  rank = jnp.argsort(jnp.argsort(blocks, axis=1, stable=True), axis=1, stable=True)
  keep = (rank >= m - n).reshape(moved.shape)
  return jnp.moveaxis(keep, 0, axis)


@jax.jit
def _scores(leaf: jax.Array, keep: jax.Array | None) -> jax.Array:
  """|w| in float32; weights pruned before (keep False) rank below all: -1."""
  s = jnp.abs(leaf).astype(jnp.float32)
  return s if keep is None else jnp.where(keep, s, -1.0)


def _check_n_m(n_m) -> tuple[int, int]:
  if (not isinstance(n_m, (tuple, list)) or len(n_m) != 2
      or not all(isinstance(v, int) for v in n_m) or not 1 <= n_m[0] <= n_m[1]):
    raise ValueError(f"n_m={n_m!r} must be a pair of ints (N, M) with 1 <= N <= M")
  return n_m[0], n_m[1]


def magnitude_masks(params: PyTree, *, sparsity: float | None = None,
                    n_m: tuple[int, int] | None = None, scope: str = "per_layer",
                    pattern: Pattern = DEFAULT_PATTERN, exclude: Pattern = (),
                    block_axis: int = 0,
                    previous_masks: PyTree | None = None) -> PyTree:
  """Keep-masks that prune the smallest-magnitude weights of selected leaves.

  Give exactly one of ``sparsity`` (unstructured) or ``n_m`` (structured).
  Both are Python numbers (they fix static counts), so the function can run
  under ``jit`` with ``params`` traced.

  Args:
    params: parameter pytree (arrays; reads parameters only, never data).
    sparsity: fraction in [0, 1] to prune; exactly ``floor(sparsity * n)``
      weights are pruned per leaf (``scope="per_layer"``) or over all
      selected leaves together (``scope="global"``: one magnitude threshold).
    n_m: ``(N, M)``, e.g. ``(2, 4)``: in every block of M consecutive weights
      along ``block_axis``, keep the N of largest magnitude. For a kernel
      [in, out] and the default ``block_axis=0`` the blocks run along the
      input axis, separately for each output column (NVIDIA 2:4 layout).
      The leaf's length along that axis must be divisible by M.
    scope: "per_layer" (default: every leaf at the same sparsity, so no layer
      can be wiped out; magnitudes of layers with different init scales are
      not comparable) or "global". Ignored with ``n_m``.
    pattern: glob(s)/regex(es) of leaves to prune (see module docstring).
    exclude: glob(s)/regex(es) of leaves never to prune.
    block_axis: the axis N:M blocks run along (0 or 1 of a 2-D leaf).
    previous_masks: earlier masks; weights they pruned rank below all others,
      so with a sparsity at least the earlier one the masks only shrink.

  Returns:
    A pytree like ``params``: bool keep-masks for selected leaves, ``None``
    for the others.

  >>> w = jnp.array([[3.0, -2.0], [2.5, 0.1], [-0.2, 1.0], [0.3, 0.4]])
  >>> magnitude_masks({"kernel": w}, sparsity=0.5)["kernel"].astype(int).tolist()
  [[1, 1], [1, 0], [0, 1], [0, 0]]
  >>> masks = magnitude_masks({"kernel": w}, n_m=(1, 2))  # 1 of 2 rows per column
  >>> masks["kernel"].astype(int).tolist()
  [[1, 1], [0, 0], [0, 1], [1, 0]]
  """
  if (sparsity is None) == (n_m is None):
    raise ValueError(f"give exactly one of sparsity={sparsity!r} and n_m={n_m!r}")
  _validate.one_of("scope", scope, SCOPES)
  if block_axis not in (0, 1, -1, -2):
    raise ValueError(f"block_axis={block_axis!r} must be 0 or 1 (2-D leaves)")
  paths, leaves, treedef = _flatten(params)
  chosen = _selected(paths, leaves, pattern, exclude)
  previous = ([None] * len(leaves) if previous_masks is None
              else _mask_leaves(previous_masks, treedef))
  scores = {i: _scores(leaf, keep)
            for i, (leaf, keep) in enumerate(zip(leaves, previous)) if chosen[i]}

  masks = [None] * len(leaves)
  if n_m is not None:
    n, m = _check_n_m(n_m)
    for i, s in scores.items():
      masks[i] = _nm_keep(s, n, m, block_axis % 2, paths[i])
  else:
    _validate.probability("sparsity", sparsity)
    if scope == "per_layer":
      for i, s in scores.items():
        masks[i] = _prune_smallest(s.ravel(), _num_pruned(sparsity, s.size)
                                   ).reshape(s.shape)
    else:
      flat = jnp.concatenate([s.ravel() for s in scores.values()])
      keep = _prune_smallest(flat, _num_pruned(sparsity, flat.size))
      offset = 0
      for i, s in scores.items():
        masks[i] = keep[offset:offset + s.size].reshape(s.shape)
        offset += s.size
  return jax.tree.unflatten(treedef, masks)


def _mask_leaves(masks: PyTree, params_treedef) -> list[jax.Array | None]:
  """Mask leaves (None included) aligned with the params leaves, or an error."""
  leaves, treedef = jax.tree.flatten(masks, is_leaf=lambda x: x is None)
  if treedef != params_treedef:
    raise ValueError(f"masks structure {treedef} does not match the "
                     f"params structure {params_treedef}")
  return leaves


def _map_masked(fun: Callable, masks: PyTree, tree: PyTree) -> PyTree:
  """fun(mask, leaf) on masked leaves; other leaves pass through."""
  return jax.tree.map(lambda m, x: x if m is None else fun(m, x), masks, tree,
                      is_leaf=lambda m: m is None)


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
  """Sets pruned weights (mask False) to exactly zero; other leaves unchanged.

  >>> apply_masks({"k": jnp.array([1.0, 2.0]), "b": jnp.ones(1)},
  ...             {"k": jnp.array([True, False]), "b": None})["k"].tolist()
  [1.0, 0.0]
  """
  return _map_masked(lambda m, w: jnp.where(m, w, jnp.zeros_like(w)), masks, params)


def prune(params: PyTree, *, sparsity: float | None = None,
          n_m: tuple[int, int] | None = None, scope: str = "per_layer",
          pattern: Pattern = DEFAULT_PATTERN, exclude: Pattern = (),
          block_axis: int = 0) -> tuple[PyTree, PyTree]:
  """One-shot magnitude pruning of (released) parameters: ``(params, masks)``.

  Post-processing of DP parameters: no privacy cost. Arguments as in
  ``magnitude_masks``.

  >>> params = {"dense": {"kernel": jnp.array([[1.0, -2.0], [0.5, 3.0]]),
  ...                     "bias": jnp.ones(2)}}
  >>> pruned, masks = prune(params, sparsity=0.5)
  >>> pruned["dense"]["kernel"].tolist(), masks["dense"]["bias"] is None
  ([[0.0, -2.0], [0.0, 3.0]], True)
  """
  masks = magnitude_masks(params, sparsity=sparsity, n_m=n_m, scope=scope,
                          pattern=pattern, exclude=exclude, block_axis=block_axis)
  return apply_masks(params, masks), masks


def sparsity_report(params: PyTree, masks: PyTree) -> dict[str, float]:
  """Fraction pruned per masked leaf, over masked leaves, and over all params.

  Keys: ``sparsity/<path>`` for each masked leaf, ``sparsity/total`` (pruned /
  size of masked leaves) and ``sparsity/all_params`` (pruned / every
  parameter, biases and unpruned leaves included). Host-side; reads masks.

  >>> report = sparsity_report({"k": jnp.zeros((2, 2)), "b": jnp.zeros(4)},
  ...                          {"k": jnp.array([[True, False], [True, True]]),
  ...                           "b": None})
  >>> report
  {'sparsity/k': 0.25, 'sparsity/total': 0.25, 'sparsity/all_params': 0.125}
  """
  paths, leaves, treedef = _flatten(params)
  mask_leaves = _mask_leaves(masks, treedef)
  report, pruned, masked_size, all_size = {}, 0, 0, 0
  for path, leaf, mask in zip(paths, leaves, mask_leaves):
    size = math.prod(jnp.shape(leaf))
    all_size += size
    if mask is not None:
      n_pruned = size - int(jnp.count_nonzero(mask))
      report[f"sparsity/{path}"] = n_pruned / size if size else 0.0
      pruned += n_pruned
      masked_size += size
  report["sparsity/total"] = pruned / masked_size if masked_size else 0.0
  report["sparsity/all_params"] = pruned / all_size if all_size else 0.0
  return report


# ------------------------------------------------------- training integration

def mask_updates(updates: PyTree, masks: PyTree) -> PyTree:
  """Zeroes the updates of pruned weights (``where``, so even NaN becomes 0).

  >>> mask_updates({"k": jnp.array([0.3, jnp.nan])},
  ...              {"k": jnp.array([True, False])})["k"].tolist()
  [0.30000001192092896, 0.0]
  """
  return _map_masked(lambda m, u: jnp.where(m, u, jnp.zeros_like(u)), masks, updates)


class MaskedUpdatesState(NamedTuple):
  """Optimizer state of ``masked_updates``: the current keep-masks."""
  masks: PyTree


def masked_updates(
    masks: PyTree | Callable[[PyTree], PyTree]) -> optax.GradientTransformation:
  """An optax transformation zeroing the updates of pruned weights.

  Put it LAST in ``optax.chain`` so that everything before it (noise already
  in the gradient, Adam moments, weight decay) is masked: with params masked
  once, pruned weights then stay exactly 0.0 through every step. The masks
  live in the optimizer state (so they can change under ``jit`` without
  retracing); replace them after a gradual-pruning update with
  ``optax.tree_utils.tree_set(opt_state, masks=new_masks)``.

  Args:
    masks: a mask pytree (see module docstring), or a function
      ``params -> masks`` called once by ``init``.

  >>> import optax
  >>> params = {"k": jnp.array([1.0, 0.0])}
  >>> keep = {"k": jnp.array([True, False])}
  >>> tx = optax.chain(optax.adam(0.1), masked_updates(keep))
  >>> updates, _ = tx.update({"k": jnp.ones(2)}, tx.init(params), params)
  >>> [round(u, 4) for u in updates["k"].tolist()]
  [-0.1, 0.0]
  """
  def init_fn(params):
    return MaskedUpdatesState(masks=masks(params) if callable(masks) else masks)

  def update_fn(updates, state, params=None):
    del params
    return mask_updates(updates, state.masks), state

  return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------- gradual schedule

def sparsity_at(step: int, *, final_sparsity: float, start_step: int,
                end_step: int, frequency: int,
                initial_sparsity: float = 0.0) -> float:
  """Target sparsity at ``step`` of the cubic schedule of Zhu & Gupta (2017).

  ``s(t) = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0))**3`` evaluated at the
  last pruning step ``t <= step``: pruning steps are ``t0, t0 + frequency, ...``
  below ``t1 = end_step``, and ``t1`` itself (so ``final_sparsity`` is always
  reached at ``end_step``). Before ``start_step`` it is 0 (nothing pruned);
  from ``end_step`` on it is ``final_sparsity``. Non-decreasing in ``step``.

  >>> [round(sparsity_at(t, final_sparsity=0.8, start_step=10, end_step=40,
  ...                    frequency=10), 4) for t in (0, 10, 15, 20, 30, 40, 99)]
  [0.0, 0.0, 0.0, 0.563, 0.7704, 0.8, 0.8]
  """
  _check_schedule(final_sparsity, start_step, end_step, frequency, initial_sparsity)
  if step < start_step:
    return 0.0
  if step >= end_step:
    return float(final_sparsity)
  t = start_step + ((step - start_step) // frequency) * frequency
  remaining = 1.0 - (t - start_step) / (end_step - start_step)
  # this form is exact at both ends: initial at t0, final at t1
  return initial_sparsity + (final_sparsity - initial_sparsity) * (1 - remaining ** 3)


def _check_schedule(final_sparsity, start_step, end_step, frequency,
                    initial_sparsity) -> None:
  _validate.probability("final_sparsity", final_sparsity)
  _validate.probability("initial_sparsity", initial_sparsity)
  if initial_sparsity > final_sparsity:
    raise ValueError(f"initial_sparsity={initial_sparsity} must be <= "
                     f"final_sparsity={final_sparsity}")
  _validate.non_negative("start_step", start_step)
  if not end_step >= start_step:
    raise ValueError(f"end_step={end_step} must be >= start_step={start_step}")
  if not (isinstance(frequency, int) and frequency >= 1):
    raise ValueError(f"frequency={frequency!r} must be an int >= 1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GradualPruning:
  """Public parameters of gradual magnitude pruning during training.

  Attributes:
    final_sparsity: sparsity reached at ``end_step``.
    start_step: first pruning step.
    end_step: last pruning step.
    frequency: steps between mask updates.
    initial_sparsity: sparsity applied at ``start_step``.
    scope: "per_layer" or "global" (see ``magnitude_masks``).
    pattern: leaves to prune; exclude: leaves never to prune.
  """
  final_sparsity: float
  start_step: int
  end_step: int
  frequency: int = 100
  initial_sparsity: float = 0.0
  scope: str = "per_layer"
  pattern: Pattern = DEFAULT_PATTERN
  exclude: Pattern = ()

  def __post_init__(self):
    _check_schedule(self.final_sparsity, self.start_step, self.end_step,
                    self.frequency, self.initial_sparsity)
    _validate.one_of("scope", self.scope, SCOPES)

  def sparsity_at(self, step: int) -> float:
    return sparsity_at(step, final_sparsity=self.final_sparsity,
                       start_step=self.start_step, end_step=self.end_step,
                       frequency=self.frequency,
                       initial_sparsity=self.initial_sparsity)

  def is_due(self, step: int) -> bool:
    """Whether masks are recomputed at ``step``."""
    return (self.start_step <= step <= self.end_step
            and ((step - self.start_step) % self.frequency == 0
                 or step == self.end_step))


def update_masks_if_due(params: PyTree, masks: PyTree | None, step: int, *,
                        schedule: GradualPruning) -> tuple[PyTree, PyTree | None]:
  """At a pruning step, recomputes masks and zeroes the newly pruned weights.

  Host-side (call it from the training loop with a Python int step). Returns
  ``(params, masks)`` unchanged when ``step`` is not a pruning step. Weights
  pruned before stay pruned (masks only shrink). Post-processing of DP
  iterates: no privacy cost. Hand new masks to ``masked_updates`` with
  ``optax.tree_utils.tree_set(opt_state, masks=masks)``.

  >>> schedule = GradualPruning(final_sparsity=0.5, start_step=0, end_step=2,
  ...                           frequency=1)
  >>> params = {"kernel": jnp.array([[1.0, 2.0], [3.0, 4.0]])}
  >>> params, masks = update_masks_if_due(params, None, 2, schedule=schedule)
  >>> params["kernel"].tolist()
  [[0.0, 0.0], [3.0, 4.0]]
  """
  if not schedule.is_due(step):
    return params, masks
  masks = magnitude_masks(params, sparsity=schedule.sparsity_at(step),
                          scope=schedule.scope, pattern=schedule.pattern,
                          exclude=schedule.exclude, previous_masks=masks)
  return apply_masks(params, masks), masks
