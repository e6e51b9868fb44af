"""Many models of one architecture trained at once, and their top unseen items.

``train_teachers`` trains m models (PATE teachers, or one student) together:
parameters stacked on a leading axis and the non-private twin of the DP step
``jax.vmap``-ed over it, one compile for all. ``top_unseen`` ranks every item
for each model and query and keeps the best ``k`` the query has not seen.
Nothing here is private: the models are fitted without noise.
"""

import functools
from collections.abc import Sequence
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from privjax import config as config_lib
from privjax.dp import noise
from privjax.dp import sampling
from privjax.dp import secret as secret_lib
from privjax.dp import step as dp_step
from privjax.run import workload as workload_lib


def _integer(name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
  return int(value)




def init_params(w: workload_lib.Workload, seed: int):
  """Fresh trainable parameters of ``w``'s architecture, initialised from ``seed``."""
  model = w.task.build_model(w.cfg, w.ds, nnx.Rngs(params=noise.params_key(seed)))
  _, params, _ = nnx.split(model, w.task.trainable(w.cfg), ...)
  return nnx.to_pure_dict(params)


def stack(trees: Sequence[Any]) -> Any:
  """Stacks pytrees of equal structure on a new leading (teacher) axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: Any, index: int) -> Any:
  return jax.tree.map(lambda x: x[index], tree)


def _samplers(unit_rows: Sequence[np.ndarray], seeds: Sequence[int],
              batch_size: int) -> list[sampling.PoissonSampler]:
  # Every teacher pads to one static size, so the vmapped step compiles once.
  # The size is PUBLIC (a Poisson(batch_size) tail bound, which dominates every
  # teacher's Binomial): derived from a shard's size, one user could change
  # every teacher's shapes. Teachers are not private: truncating a
  # (vanishingly rare) oversized sample costs nothing here.
  probs = [min(batch_size / max(len(rows), 1), 1.0) for rows in unit_rows]
  big = np.iinfo(np.int32).max
  size = sampling.bucket_sizes(num_units=big, sampling_prob=batch_size / big)[-1]
  return [sampling.PoissonSampler(sampling_prob=q, seed=s, bucket_sizes=(size,),
                                  overflow="truncate")
          for q, s in zip(probs, seeds)]


def _teacher_batch(examples, rows_uxk, sampler, step):
  batch = sampler.sample(step, len(rows_uxk))
  rows = rows_uxk[batch.indices]                         # [G, K]
  mask = batch.mask[:, None] & (rows >= 0)
  safe = np.where(rows >= 0, rows, 0)
  return {k: v[safe] for k, v in examples.items()}, mask.astype(np.float32)


@functools.lru_cache(maxsize=16)
def _steps(loss_fun, optimizer: str, learning_rate: float, batch_size: int,
           uses_rng: bool):
  """The optimizer, the plain step and its vmapped twin, built once per setting
  (a new jitted function would be traced and compiled again)."""
  optimizer = workload_lib.base_optimizer(config_lib.TrainConfig(
      optimizer=optimizer, learning_rate=learning_rate))
  step_fn = dp_step.make_step(loss_fun, optimizer, dp_step.StepConfig(
      private=False, expected_batch_size=float(batch_size)))
  # Teacher axis 0 for the state, batch, mask (and dropout keys); the frozen
  # params and the (unused) noise key are shared.
  vmapped = jax.jit(jax.vmap(step_fn, in_axes=(0, None, 0, 0, None, 0 if uses_rng else None)),
                    donate_argnums=0)
  return optimizer, step_fn, vmapped


def train_teachers(w: workload_lib.Workload, examples: dict[str, np.ndarray],
                   unit_rows: Sequence[np.ndarray], *, seeds: Sequence[int],
                   steps: int, batch_size: int,
                   sampling_seeds: Sequence[int] | None = None, vmap: bool = True,
                   log_every: int = 0) -> Any:
  """Trains one model per entry of ``unit_rows``, non-privately; stacked params.

  Teacher ``t`` starts from ``init_params(w, seeds[t])`` (public) and at
  every step takes a Poisson sample (expected size ``batch_size``, sampler and
  dropout seeded by ``sampling_seeds[t]``: secret ones for private data, see
  ``train_ensemble``; default ``seeds``) of the units in ``unit_rows[t]``
  (int [n_t, K] row indices into ``examples``, -1 padded, as
  ``bounding.group_rows`` returns), through
  the non-private twin of ``dp_step.make_step`` (plain gradient of the masked
  loss sum divided by ``batch_size``; optimizer from ``w.cfg.train``).

  With ``vmap=True`` (default) all teachers train together: the step is
  ``jax.vmap``-ed over the stacked teacher axis and jitted once. ``vmap=False``
  trains them one after another with the plain step (the reference the tests
  compare against; same seeds, same batches).

  Returns:
    The trained trainable params, stacked: every leaf ``[m, ...]``.
  """
  if len(unit_rows) != len(seeds) or not unit_rows:
    raise ValueError(f"len(unit_rows)={len(unit_rows)} must equal len(seeds)="
                     f"{len(seeds)} and be >= 1")
  _integer("steps", steps, 0)
  _integer("batch_size", batch_size, 1)
  uses_rng = w.task.uses_rng(w.cfg)
  optimizer, step_fn, vmapped = _steps(w.loss_fun, w.cfg.train.optimizer,
                                       w.cfg.train.learning_rate, batch_size, uses_rng)
  sampling_seeds = list(seeds if sampling_seeds is None else sampling_seeds)
  samplers = _samplers(unit_rows, sampling_seeds, batch_size)
  # The non-private step draws no noise; its key argument is a placeholder.
  unused_noise_key = jax.random.key(0)
  streams = [noise.KeyStreams(secret_lib.key_from_int(s % 2**64)) for s in sampling_seeds]

  def rng(t, step):
    return streams[t].dropout_key(step) if uses_rng else None

  teachers = range(len(unit_rows))
  if not vmap:
    trained = []
    for t in teachers:
      state = dp_step.init_state(init_params(w, seeds[t]), optimizer)
      for step in range(steps):
        batch, mask = _teacher_batch(examples, unit_rows[t], samplers[t], step)
        state, _ = step_fn(state, w.frozen, batch, mask, unused_noise_key, rng(t, step))
      trained.append(state.params)
    return stack(trained)

  state = stack([dp_step.init_state(init_params(w, s), optimizer) for s in seeds])
  for step in range(steps):
    pairs = [_teacher_batch(examples, unit_rows[t], samplers[t], step) for t in teachers]
    batch = {k: np.stack([b[k] for b, _ in pairs]) for k in examples}
    mask = np.stack([m for _, m in pairs])
    keys = jnp.stack([rng(t, step) for t in teachers]) if uses_rng else None
    state, metrics = vmapped(state, w.frozen, batch, mask, unused_noise_key, keys)
    if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
      loss = np.asarray(metrics["nonprivate/loss"])
      print(f"privjax.pate: step {step + 1}/{steps} teacher loss "
            f"mean {loss.mean():.3f} (min {loss.min():.3f}, max {loss.max():.3f})")
  return state.params




@functools.partial(jax.jit, static_argnames=("k",))
def _top_unseen(scores_TxQxI, seen_QxI, *, k: int):
  scores = jnp.where(seen_QxI[None], -jnp.inf, scores_TxQxI.astype(jnp.float32))
  return jnp.moveaxis(jax.lax.top_k(scores, k)[1], 0, 1).astype(jnp.int32)


def seen_mask(exclude: np.ndarray, num_items: int) -> np.ndarray:
  """bool [Q, num_items] from -1-padded item lists [Q, S] (e.g. ``EvalSet.exclude``)."""
  exclude = np.asarray(exclude)
  seen = np.zeros((exclude.shape[0], num_items), bool)
  rows, cols = np.nonzero(exclude >= 0)
  seen[rows, exclude[rows, cols]] = True
  return seen


def top_unseen(w: workload_lib.Workload, params, inputs: dict[str, np.ndarray],
               seen: np.ndarray, k: int, *, stacked: bool,
               chunk: int = 256) -> np.ndarray:
  """Each model's top-``k`` items among those the query has not seen.

  Args:
    w: the workload (its ``score_fn`` scores every item).
    params: one model's params, or ``stacked`` teachers' params ``[m, ...]``.
    inputs: model inputs with a leading query axis ``[Q, ...]``.
    seen: bool [Q, num_items], items never proposed (those each query has
      already seen, or any other public exclusion).
    k: items per model and query.
    stacked: whether ``params`` has a leading teacher axis.

  Returns:
    int32 [Q, m, k] (stacked) or [Q, k]: item ids, best first.
  """
  seen = np.asarray(seen, bool)
  num_unseen = (~seen).sum(-1)
  if num_unseen.size and num_unseen.min() < k:
    q = int(np.argmin(num_unseen))
    raise ValueError(f"query {q} has only {num_unseen[q]} unseen items, fewer than k={k}")
  score_fn = w.score_fn
  if stacked:
    score_fn = jax.vmap(score_fn, in_axes=(0, None, None))
  else:
    score_fn = lambda p, f, x, fun=score_fn: fun(p, f, x)[None]
  out = []
  num_queries = len(seen)
  for start in range(0, num_queries, chunk):
    n = min(chunk, num_queries - start)
    sl = slice(start, start + n)
    part = {key: v[sl] for key, v in inputs.items()}
    mask = seen[sl]
    if n < chunk:  # pad to one static shape: a single compile
      part = {key: np.concatenate([v, np.repeat(v[:1], chunk - n, 0)]) for key, v in part.items()}
      mask = np.concatenate([mask, np.repeat(mask[:1], chunk - n, 0)])
    scores = score_fn(params, w.frozen, part)
    out.append(np.asarray(_top_unseen(scores, jnp.asarray(mask), k=k))[:n])
  votes = np.concatenate(out) if out else np.zeros((0, 1, k), np.int32)
  return votes if stacked else votes[:, 0]
