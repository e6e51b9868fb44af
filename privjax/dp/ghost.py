"""Ghost clipping: per-group gradient norms without per-example gradients.

The fast path of ``privjax.dp.clipping``: same signature, same output
(``ClippedSum``), same guarantee, at close to the cost of one ordinary
forward and backward pass.

How. Every ``privjax.models.nn`` layer taps its input ``a`` and output ``y``. One
batched forward/backward pass records, for each tapped layer, ``a`` and the
gradient ``b = dL/dy`` of the masked loss sum (obtained as the gradient with
respect to a zero perturbation added to ``y``; weight gradients are never
formed). Because no layer mixes examples, the rows of ``b`` belonging to a
group are exactly that group's output gradients. From them:

* Linear kernel (grad ``a^T b``): ``||a^T b||^2 = <a a^T, b b^T>`` (Gram form,
  cost T^2 (in + out) per group) or the direct per-group gradient (cost
  T in out), whichever is cheaper for the layer; T = 1 gives ``|a|^2 |b|^2``.
* Embedding lookup: the gradient is a scatter of ``b`` at the token ids; its
  norm sums ``b`` over equal ids first (exact for repeated tokens).
* Tied output projection ``x E^T`` (``Embed.attend``): the Linear rule.
* LayerNorm scale / bias and all biases: direct per-group sums (cheap).
* A leaf used by several taps (shared or tied parameters) is handled
  exactly: its per-group gradients are materialised for the norm only.
* Trainable leaves that no tap covers fall back to exact per-group
  gradients (``vmap``) for those leaves only.

The clipped sum then reuses the same recorded ``a`` and ``b``
(book-keeping): ``sum_g c_g a_g^T b_g`` is one matmul per layer, so there is
no second backward pass.

Groups. The K examples of a group (one user) simply extend the "time" axis:
a group's gradient is ``sum_{k,t} a_{kt} b_{kt}^T``, so user-level clipping
costs the same as example-level clipping of sequences K times longer.

Trust but verify. A parameter read outside the tapped layers (e.g. a raw
``embedding[...] @ x`` in model code) would make the ghost norm too small.
``verify`` compares ghost norms and sums with the exact vmap path on a small
batch; the trainer calls it once before training, and ``auto`` falls back to
vmap when it fails.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from privjax.dp import clipping
from privjax.models import nn

PyTree = Any

_ROLES = {"linear": ("kernel", "bias"), "embed": ("embedding",),
          "attend": ("embedding",), "layernorm": ("scale", "bias")}


@dataclasses.dataclass(frozen=True)
class _Tap:
  kind: str
  leaves: tuple[tuple[str, int], ...]   # (role, index of the params leaf)


def _value(var) -> Any:
  return var.get_value() if hasattr(var, "get_value") else var.value


class _Recorder:
  """The tap function: records inputs, adds zero perturbations to outputs."""

  def __init__(self, params: PyTree, zs: list[jax.Array] | None):
    self.index = {id(leaf): i for i, leaf in enumerate(jax.tree.leaves(params))}
    self.zs = zs
    self.taps: list[_Tap] = []
    self.inputs: list[jax.Array] = []
    self.out_shapes: list[jax.ShapeDtypeStruct] = []

  def __call__(self, layer, kind: str, x: jax.Array, y: jax.Array) -> jax.Array:
    leaves = []
    for role in _ROLES[kind]:
      var = getattr(layer, role, None)
      if var is not None and id(_value(var)) in self.index:
        leaves.append((role, self.index[id(_value(var))]))
    if not leaves:        # frozen layer: no gradient needed
      return y
    i = len(self.taps)
    self.taps.append(_Tap(kind, tuple(leaves)))
    self.inputs.append(x)
    self.out_shapes.append(jax.ShapeDtypeStruct(y.shape, y.dtype))
    return y if self.zs is None else y + self.zs[i]


def _run_tapped(loss_fun, params, zs, example, rng):
  rec = _Recorder(params, zs)
  with nn.tapping(rec):
    loss = loss_fun(params, example, rng)
  return loss, rec


def discover(loss_fun, params: PyTree, example: PyTree, rng=None
             ) -> tuple[list[_Tap], list[jax.ShapeDtypeStruct]]:
  """Traces one example abstractly; returns its taps and output shapes."""
  found = {}

  def fun(params, example, rng):
    loss, rec = _run_tapped(loss_fun, params, None, example, rng)
    found["taps"], found["shapes"] = rec.taps, rec.out_shapes
    return loss

  jax.eval_shape(fun, params, example, rng)
  return found["taps"], found["shapes"]


@dataclasses.dataclass(frozen=True)
class Coverage:
  """Which trainable leaves ghost clipping handles, by path."""
  tapped: tuple[str, ...]
  shared: tuple[str, ...]     # used by several taps: exact, materialised for norms
  untapped: tuple[str, ...]   # no rule: exact per-group gradients (vmap)

  @property
  def complete(self) -> bool:
    return not self.untapped


def coverage(loss_fun, params: PyTree, example: PyTree, rng=None) -> Coverage:
  """Which leaves of ``params`` have a ghost rule, for one example."""
  taps, _ = discover(loss_fun, params, example, rng)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  uses: dict[int, int] = {}
  for tap in taps:
    for _, i in tap.leaves:
      uses[i] = uses.get(i, 0) + 1
  return Coverage(tuple(paths[i] for i in sorted(uses)),
                  tuple(paths[i] for i in sorted(uses) if uses[i] > 1),
                  tuple(p for i, p in enumerate(paths) if i not in uses))


# ---------------------------------------------------------------------------
# Per-tap rules. a: [G, T, in] (ids [G, T] for embed), b: [G, T, out].


def _use_gram(t: int, n_in: int, n_out: int) -> bool:
  return t * (n_in + n_out) <= n_in * n_out


def _outer_sq(a, b):
  """Squared Frobenius norm of a_g^T b_g per group, Gram or direct by cost."""
  g, t, n_in = a.shape
  n_out = b.shape[-1]
  if t == 1:
    return jnp.sum(jnp.square(a[:, 0]), -1) * jnp.sum(jnp.square(b[:, 0]), -1)
  if _use_gram(t, n_in, n_out):
    aa = jnp.einsum("gti,gsi->gts", a, a)
    bb = jnp.einsum("gto,gso->gts", b, b)
    return jnp.sum(aa * bb, axis=(1, 2))
  return jnp.sum(jnp.square(jnp.einsum("gti,gto->gio", a, b)), axis=(1, 2))


def _embed_sq(ids, b):
  """||scatter(b at ids)||^2 per group: sum b over equal ids, then square."""
  t = ids.shape[1]
  if t == 1:
    return jnp.sum(jnp.square(b[:, 0]), -1)

  def one(ids_t, b_td):
    order = jnp.argsort(ids_t)
    s = ids_t[order]
    seg = jnp.concatenate([jnp.zeros((1,), jnp.int32),
                           jnp.cumsum(s[1:] != s[:-1]).astype(jnp.int32)])
    summed = jax.ops.segment_sum(b_td[order], seg, num_segments=t)
    return jnp.sum(jnp.square(summed))

  return jax.vmap(one)(ids, b)


def _sq_norm(tap: _Tap, role: str, a, b, num_rows: int | None):
  if tap.kind == "linear":
    return _outer_sq(a, b) if role == "kernel" else jnp.sum(jnp.square(jnp.sum(b, 1)), -1)
  if tap.kind == "attend":
    return _outer_sq(a, b)
  if tap.kind == "embed":
    return _embed_sq(a, b)
  # layernorm
  if role == "scale":
    return jnp.sum(jnp.square(jnp.sum(a * b, 1)), -1)
  return jnp.sum(jnp.square(jnp.sum(b, 1)), -1)


def _per_group(tap: _Tap, role: str, a, b, leaf_shape):
  """The per-group gradient of this tap for ``role`` (shared leaves only)."""
  if tap.kind == "linear":
    return jnp.einsum("gti,gto->gio", a, b) if role == "kernel" else jnp.sum(b, 1)
  if tap.kind == "attend":
    return jnp.einsum("gto,gti->goi", b, a)
  if tap.kind == "embed":
    g = a.shape[0]
    out = jnp.zeros((g,) + tuple(leaf_shape), b.dtype)
    return out.at[jnp.arange(g)[:, None], a].add(b)
  return jnp.sum(a * b, 1) if role == "scale" else jnp.sum(b, 1)


def _weighted_sum(tap: _Tap, role: str, a, b, f, leaf_shape):
  """sum_g f_g * (per-group gradient): the book-keeping clipped sum."""
  bf = b * f[:, None, None].astype(b.dtype)
  if tap.kind == "linear":
    if role == "kernel":
      return jnp.einsum("gti,gto->io", a, bf)
    return jnp.sum(bf, (0, 1))
  if tap.kind == "attend":
    return jnp.einsum("gto,gti->oi", bf, a)
  if tap.kind == "embed":
    flat_ids = a.reshape(-1)
    return jnp.zeros(tuple(leaf_shape), b.dtype).at[flat_ids].add(
        bf.reshape(-1, bf.shape[-1]))
  return jnp.sum(a * bf, (0, 1)) if role == "scale" else jnp.sum(bf, (0, 1))


def _group_view(x, g: int, is_ids: bool):
  """[N, ..., d] -> [G, T, d] (ids: [N, ...] -> [G, T])."""
  if is_ids:
    return x.reshape(g, -1)
  return x.reshape(g, -1, x.shape[-1])


def clipped_grad_sum(
    loss_fun: clipping.LossFun,
    *,
    l2_clip_norm: float | PyTree,
    per_layer: bool = False,
    microbatch_size: int | None = None,
) -> Callable[..., clipping.ClippedSum]:
  """Ghost-norm version of ``privjax.dp.clipping.clipped_grad_sum``.

  Same arguments, same returned function and the same guarantee: each
  group's gradient is clipped to norm C (or per-leaf C_l), padding and
  non-finite groups contribute exactly zero, and the result is the SUM with
  its L2 sensitivity. The model must be built from ``privjax.models.nn`` layers for
  the fast path; other trainable leaves fall back to exact per-group grads.

  >>> from flax import nnx
  >>> graphdef, state = nnx.split(nn.Linear(3, 2, rngs=nnx.Rngs(0)))
  >>> params = nnx.to_pure_dict(state)
  >>> def loss(p, ex, rng):
  ...   layer = nnx.merge(graphdef, nnx.State(p))
  ...   return jnp.sum(layer(ex["x"]) ** 2)
  >>> batch = {"x": jnp.ones((4, 1, 3))}
  >>> fast = clipped_grad_sum(loss, l2_clip_norm=0.1)(params, batch, jnp.ones((4, 1)))
  >>> exact = clipping.clipped_grad_sum(loss, l2_clip_norm=0.1)(params, batch, jnp.ones((4, 1)))
  >>> bool(jnp.allclose(fast.norms, exact.norms, rtol=1e-5))
  True
  """
  rule = clipping.clip_rule(l2_clip_norm, per_layer)
  if microbatch_size is not None and microbatch_size <= 0:
    raise ValueError(f"microbatch_size={microbatch_size} must be > 0")

  def one_slice(params, batch, mask, rngs):
    g, k = mask.shape
    n = g * k
    flat = lambda x: x.reshape((n,) + x.shape[2:])
    flat_batch = jax.tree.map(flat, batch)
    flat_rngs = jax.tree.map(flat, rngs)
    flat_mask = mask.reshape(n)
    leaves, treedef = jax.tree.flatten(params)
    taps, shapes = discover(loss_fun, params, jax.tree.map(lambda x: x[0], flat_batch),
                            jax.tree.map(lambda x: x[0], flat_rngs))

    # Pass 1: batched forward/backward to the tapped outputs only.
    zs = [jnp.zeros((n,) + s.shape, s.dtype) for s in shapes]

    def total(zs):
      def one(z, ex, r):
        loss, rec = _run_tapped(loss_fun, params, z, ex, r)
        return loss, rec.inputs
      losses, inputs = jax.vmap(one)(zs, flat_batch, flat_rngs)
      return jnp.sum(jnp.where(flat_mask > 0, losses, 0.0)), (losses, inputs)

    (_, (losses, inputs)), out_grads = jax.value_and_grad(total, has_aux=True)(zs)

    group_losses = jnp.sum(jnp.where(mask > 0, losses.reshape(g, k), 0.0), axis=1)
    real = jnp.sum(mask, axis=1) > 0
    views = []
    for tap, a, b in zip(taps, inputs, out_grads):
      views.append((tap, _group_view(a, g, tap.kind == "embed"), _group_view(b, g, False)))

    # Per-leaf squared norms of the per-group gradients.
    users: dict[int, list] = {}
    for tap, a, b in views:
      for role, i in tap.leaves:
        users.setdefault(i, []).append((tap, role, a, b))
    sq = [None] * len(leaves)
    for i, uses in users.items():
      if len(uses) == 1:
        tap, role, a, b = uses[0]
        sq[i] = _sq_norm(tap, role, a, b, None)
      else:  # shared leaf: exact, materialised for the norm only
        summed = sum(_per_group(t, r, a, b, leaves[i].shape) for t, r, a, b in uses)
        sq[i] = jnp.sum(jnp.square(summed).reshape(g, -1), axis=1)
    untapped = [i for i in range(len(leaves)) if i not in users]
    sub_grads = None
    if untapped:
      def group_loss_sub(sub, b, m, r):
        full = list(leaves)
        for j, i in enumerate(untapped):
          full[i] = sub[j]
        return clipping._group_loss(loss_fun, jax.tree.unflatten(treedef, full), b, m, r)  # pylint: disable=protected-access

      sub_grads = jax.vmap(jax.grad(group_loss_sub), in_axes=(None, 0, 0, 0))(
          [leaves[i] for i in untapped], batch, mask, rngs)
      for j, i in enumerate(untapped):
        sq[i] = jnp.sum(jnp.square(sub_grads[j].astype(jnp.float32)).reshape(g, -1), axis=1)

    sq = [s.astype(jnp.float32) for s in sq]
    norms = jnp.sqrt(sum(sq))
    valid = real & jnp.isfinite(norms) & jnp.isfinite(group_losses)
    factors = jax.tree.leaves(rule.factors(jax.tree.unflatten(treedef, sq), valid, params))

    # Book-keeping clipped sum from the same a and b, invalid groups zeroed.
    keep = lambda x: jnp.where(valid.reshape((g,) + (1,) * (x.ndim - 1)), x, 0)
    clipped = [jnp.zeros(leaf.shape, jnp.promote_types(leaf.dtype, jnp.float32))
               for leaf in leaves]
    for i, uses in users.items():
      for tap, role, a, b in uses:
        a_ok = a if tap.kind == "embed" else keep(a)
        clipped[i] = clipped[i] + _weighted_sum(tap, role, a_ok, keep(b), factors[i],
                                                leaves[i].shape)
    if untapped:
      for j, i in enumerate(untapped):
        clipped[i] = clipping.contract(factors[i], sub_grads[j], valid)
    clipped = [c.astype(leaf.dtype) for c, leaf in zip(clipped, leaves)]
    loss_sum = jnp.sum(jnp.where(real & jnp.isfinite(group_losses), group_losses, 0.0))
    return (jax.tree.unflatten(treedef, clipped), norms, valid.astype(jnp.float32),
            loss_sum)

  def fun(params, batch, mask, rng: jax.Array | None = None) -> clipping.ClippedSum:
    mask = jnp.asarray(mask)
    rngs = clipping.example_keys(rng, *mask.shape)
    grad_sum, norms, valid, loss_sum = clipping.accumulate(
        one_slice, params, batch, mask, rngs, microbatch_size)
    return clipping.ClippedSum(grad_sum, rule.sensitivity(params), norms, valid, loss_sum)

  return fun


def verify(loss_fun: clipping.LossFun, params: PyTree, batch: PyTree, mask,
           rng: jax.Array | None = None, *, rtol: float = 1e-3) -> list[str]:
  """Checks ghost against the exact vmap path on one batch.

  Returns the paths of leaves whose clipped sums disagree and, if the group
  norms disagree, the entry ``"<norms>"``. An empty list means ghost clipping
  is exact for this model (up to ``rtol``); anything else means some
  parameter is used outside the tapped layers, and ghost must not be used.
  """
  c = 1e-3  # clip everything hard, so that norm errors show up in the sums too
  exact = clipping.clipped_grad_sum(loss_fun, l2_clip_norm=c)(params, batch, mask, rng)
  fast = jax.jit(clipped_grad_sum(loss_fun, l2_clip_norm=c))(params, batch, mask, rng)
  bad = []
  if not jnp.allclose(fast.norms, exact.norms, rtol=rtol, atol=1e-6, equal_nan=True):
    bad.append("<norms>")
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(exact.grad_sum)[0],
                          jax.tree.leaves(fast.grad_sum)):
    scale = float(jnp.max(jnp.abs(x))) + 1e-12
    if not float(jnp.max(jnp.abs(x - y))) <= rtol * scale + 1e-7:
      bad.append(jax.tree_util.keystr(path))
  return bad


def resolve_clipping(requested: str, loss_fun: clipping.LossFun, params: PyTree,
                     probe_batch: PyTree, probe_mask) -> str:
  """Resolves ``vmap | ghost | auto`` to the implementation a step uses.

  Ghost needs a rule for every trainable leaf to be fast (leaves without one
  fall back to exact per-unit gradients) and must agree with the exact vmap
  path. Both are checked once on ``probe_batch``, which must be PUBLIC data
  of the real shapes (``run.workload.probe_batch``: synthetic users): the
  decision is then a property of the model code, not of anyone's data, and
  may be written to privacy.json. ``"ghost"`` refuses a model that fails the
  check; ``"auto"`` falls back to vmap and says why.
  """
  if requested == "vmap":
    return "vmap"
  first = jax.tree.map(lambda x: x[0, 0], probe_batch)
  cov = coverage(loss_fun, params, first)
  if requested == "auto" and not cov.complete:
    print(f"privjax: clipping=auto -> vmap (no ghost rule for {list(cov.untapped)})")
    return "vmap"
  bad = verify(loss_fun, params, probe_batch, probe_mask)
  if bad:
    if requested == "ghost":
      raise ValueError(
          "config.privacy.clipping='ghost' is not exact for this model: ghost norms "
          f"disagree with per-example gradients for {bad}. Some parameter is used "
          "outside the privjax.models.nn layers; use clipping='vmap'.")
    print(f"privjax: clipping=auto -> vmap (ghost disagrees on {bad})")
    return "vmap"
  return "ghost"
