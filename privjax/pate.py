"""PATE for recommendation: teachers on disjoint user shards, noisy vote answers, a student.

This is the second place (besides ``run/train.py``) where privjax composes its
primitives, because PATE (Papernot et al. 2017, 2018) is a different algorithm
from DP-SGD: the models are trained WITHOUT privacy, and privacy comes from
how their outputs are aggregated and released.

  1. Shards    every training user goes to one of ``m`` disjoint shards by a
               keyed hash of their raw id, keyed by the run secret
               (``shard_users``): a user's whole history lies in exactly one
               shard, and adding or removing a user moves nobody else.
               Optionally a fraction of users (by the same hash) is held out
               of every shard as *public* users (their histories are assumed
               public, e.g. users who opted in; they feed the student).
  2. Teachers  ``m`` models of one architecture, one per shard, trained
               together: parameters stacked on a leading teacher axis and the
               non-private ``dp_step`` step ``jax.vmap``-ed over it, each
               teacher's batch Poisson-sampled from its own shard's users
               (``train_teachers``; one compile for all teachers).
  3. Votes     for a query (one user's history), every teacher votes its top-1
               (or top-k) items among those the querying user has not seen;
               ``noisy_argmax.vote_histogram`` counts the votes and computes
               their sensitivity to one user (``Ensemble.votes``,
               ``vote_counts``).
  4. Answers   the histogram goes through GNMax, Gumbel (exponential
               mechanism) or Laplace report-noisy-max, argmax or top-k, or
               Confident GNMax; every answer is charged to a
               ``noisy_argmax.QuerySession``, which refuses a query that would
               exceed its budget before drawing any noise (``answer``).
  5. Student   a fresh model trained (non-privately) on public queries
               labelled by noisy ensemble answers (``public_queries``,
               ``label_queries``, ``train_student``).

Guarantee. The unit of privacy is a *training user*: neighbouring datasets
differ by adding or removing one user with all their interactions. That user
lies in one shard, so only one teacher changes, arbitrarily; every other
teacher is unchanged. Each teacher votes a fixed number ``k`` of distinct
items, hence neighbouring vote histograms differ by moving one teacher's
votes, whose sensitivity ``vote_histogram`` computes exactly (Linf = 1,
L2 = sqrt(2 s), L1 = 2 s, s = min(k, items - k)). The released answer is a
noisy argmax / top-k of that histogram, with the guarantee and cost stated in
``privjax.answers.noisy_argmax`` (data-independent accounting: every answered query
pays its mechanism; under Confident GNMax every query also pays the threshold
check). A session of answers is ``(epsilon_budget, delta)``-DP for each
training user, whatever the queries. A user's shard depends only on that
user's raw id and the secret key, so adding or removing one user changes
exactly one teacher (tested); the key stays secret so that nobody can aim a
user at a chosen teacher. Items a query has already seen
(and, optionally, items outside a public candidate pool) are excluded from
votes and answers: they come from the query and public data, not from the
training users, and no teacher votes for them, so the sensitivity is unchanged.

What this does NOT protect. The teachers themselves are NOT private: each is
an ordinary model fitted to its shard and can memorise it. Teacher parameters,
their raw votes and the noiseless histogram must never be released; an
ensemble directory written by ``train_ensemble`` says so in ``pate.json`` and
must stay with the operator. Only noisy aggregated answers are released. The
query (the querying user's own history) is an input, not protected: the
answer is returned to whoever asked. A student trained on public queries and
noisy labels is post-processing of those labels: its guarantee is the
labels' cost, and it then answers any number of queries for free.

>>> keys = secret_lib.RunSecret.from_seed(0).unit_keys("pate/shards", range(10))
>>> shards = shard_users(keys, 3, public_fraction=0.1)
>>> sorted(np.concatenate(shards.shards).tolist() + shards.public.tolist())
[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
"""

import dataclasses
import functools
import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import dp_accounting
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from privjax import config as config_lib
from privjax.answers import noisy_argmax
from privjax.data import bounding
from privjax.data import sequences
from privjax.dp import noise
from privjax.dp import sampling
from privjax.dp import secret as secret_lib
from privjax.dp import step as dp_step
from privjax.run import checkpoint
from privjax.run import workload as workload_lib

# Answer mechanisms, by the name used in papers and on the command line.
MECHANISMS = ("gnmax", "gumbel", "laplace")
_PRIMITIVE = {"gnmax": "gaussian", "gumbel": "gumbel", "laplace": "laplace"}
PATE_FILE = "pate.json"
NOT_FOR_RELEASE = (
    "The teachers in this directory are NOT differentially private: each was "
    "trained without noise on one shard of the private users. Never release "
    "this directory, the teachers' parameters, their votes or vote counts; only "
    "noisy aggregated answers (privjax.pate.answer) are private.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PateConfig:
  """Public parameters of a PATE ensemble (the model comes from a ``Config``).

  Attributes:
    num_teachers: m, the number of disjoint user shards (and teachers).
    public_fraction: each user is held out of every shard with this
      probability (by the keyed hash); their histories are treated as public
      (student queries). 0: every user is private.

  Teacher training uses the model config's ``train`` section: ``steps``,
  ``batch_size`` (expected users per teacher per step), ``optimizer``,
  ``learning_rate`` and ``seed`` (initial parameters); teacher sampling, the
  shards and contribution bounding come from the run secret. The ``privacy``
  section gives only ``reproducible_noise_seed``.

  >>> PateConfig(num_teachers=10).num_teachers
  10
  """
  num_teachers: int = 10
  public_fraction: float = 0.0

  def __post_init__(self):
    _integer("num_teachers", self.num_teachers, 1)
    if not 0 <= self.public_fraction < 1:
      raise ValueError(f"public_fraction={self.public_fraction!r} must be in [0, 1)")


def _integer(name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
  return int(value)


# ----------------------------------------------------------------------------
# 1. Shards.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UserShards:
  """A partition of users ``0 .. num_users - 1``.

  Attributes:
    public: users held out of every shard (sorted).
    shards: the m disjoint shards (each sorted); with ``public`` they cover
      every user exactly once.
  """
  public: np.ndarray
  shards: tuple[np.ndarray, ...]

  def shard_of(self, num_users: int) -> np.ndarray:
    """[num_users] the shard of each user, -1 for public users."""
    out = np.full(num_users, -1, np.int32)
    for t, users in enumerate(self.shards):
      out[users] = t
    return out


def shard_users(unit_keys: np.ndarray, num_shards: int, *,
                public_fraction: float = 0.0) -> UserShards:
  """Assigns every user to one of ``num_shards`` shards by its key.

  With ``u = unit_keys[i] / 2**64`` uniform in [0, 1), user ``i`` is public if
  ``u < public_fraction``, else in shard ``floor((u - f) / (1 - f) * m)``.

  Guarantee: a user's shard depends on that user's key alone; with keys from
  ``RunSecret.unit_keys(label, raw_user_ids)`` adding or removing one user
  changes that user's shard membership and no other (which is what the
  one-teacher sensitivity of the votes needs). Shard sizes are random (about
  equal); a shard may be empty for tiny datasets.

  Args:
    unit_keys: uint64 [num_users], keyed hashes of the raw user ids.
    num_shards: m >= 1.
    public_fraction: in [0, 1).
  """
  keys = np.asarray(unit_keys)
  if keys.ndim != 1 or keys.dtype != np.uint64:
    raise ValueError(f"unit_keys must be a 1-D uint64 array, got {keys.dtype} {keys.shape}")
  num_shards = _integer("num_shards", num_shards, 1)
  if not 0 <= public_fraction < 1:
    raise ValueError(f"public_fraction={public_fraction!r} must be in [0, 1)")
  u = (keys >> np.uint64(11)).astype(np.float64) * 2.0**-53    # uniform [0, 1)
  public = u < public_fraction
  shard = np.minimum(((u - public_fraction) / (1 - public_fraction) * num_shards)
                     .astype(np.int64), num_shards - 1)
  users = np.arange(len(keys))
  return UserShards(users[public],
                    tuple(users[~public & (shard == t)] for t in range(num_shards)))


def teacher_seeds(seed: int, num_teachers: int) -> list[int]:
  """Independent per-teacher seeds (model init, sampling) derived from one seed.

  >>> len(set(teacher_seeds(0, 5)))
  5
  """
  return [int(np.random.SeedSequence(seed, spawn_key=(1, t)).generate_state(1)[0] >> 1)
          for t in range(num_teachers)]


# ----------------------------------------------------------------------------
# 2. Teachers: trained together with jax.vmap over a stacked teacher axis.
# ----------------------------------------------------------------------------


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
  # Teachers are not private: truncating a (vanishingly rare) oversized sample
  # costs nothing here, and keeps that shape fixed.
  probs = [min(batch_size / max(len(rows), 1), 1.0) for rows in unit_rows]
  size = max(max(sampling.bucket_sizes(num_units=len(rows), sampling_prob=q))
             for rows, q in zip(unit_rows, probs))
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


# ----------------------------------------------------------------------------
# 3. Votes.
# ----------------------------------------------------------------------------


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


def vote_counts(votes_QxMxK: np.ndarray, num_items: int
                ) -> tuple[np.ndarray, noisy_argmax.Sensitivity]:
  """Per-query vote histograms [Q, num_items] and their sensitivity to one user.

  Each histogram is ``noisy_argmax.vote_histogram`` of that query's teacher
  votes (which also checks them); the sensitivity depends only on the votes
  per teacher and the number of items, so it is the same for every query.

  >>> counts, sens = vote_counts(np.array([[[0], [2], [2]]]), num_items=3)
  >>> counts.tolist(), sens.linf
  ([[1, 0, 2]], 1.0)
  """
  votes = np.asarray(votes_QxMxK)
  if votes.ndim != 3 or votes.shape[0] < 1:
    raise ValueError(f"votes.shape={votes.shape} must be [queries >= 1, teachers, k]")
  counts = np.zeros((votes.shape[0], num_items), np.int32)
  sensitivities = set()
  for q in range(votes.shape[0]):
    histogram, sensitivity = noisy_argmax.vote_histogram(votes[q], num_classes=num_items)
    counts[q] = np.asarray(histogram)
    sensitivities.add(sensitivity)
  # A function of (k, num_items) only: one value for every query.
  (sensitivity,) = sensitivities
  return counts, sensitivity


# ----------------------------------------------------------------------------
# 4. Answers.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class AnswerSpec:
  """Public parameters of one noisy answer.

  Attributes:
    mechanism: "gnmax" (Gaussian noise, ``sigma``), "gumbel" (exponential
      mechanism, per-round ``epsilon``) or "laplace" (report-noisy-max,
      per-round ``epsilon``).
    k: items per answer (the noisy top-k of the vote histogram).
    epsilon: per-round epsilon (gumbel, laplace): an answer is k*epsilon-DP.
    sigma: noise std on each vote count (gnmax).
    threshold: Confident GNMax (gnmax, k = 1): answer only if the largest
      count plus N(0, sigma_threshold^2) reaches it.
    sigma_threshold: the check's noise std.

  >>> AnswerSpec(mechanism="gnmax", k=1, sigma=5.0).sigma
  5.0
  """
  mechanism: str
  k: int = 1
  epsilon: float | None = None
  sigma: float | None = None
  threshold: float | None = None
  sigma_threshold: float | None = None

  def __post_init__(self):
    if self.mechanism not in MECHANISMS:
      raise ValueError(f"mechanism={self.mechanism!r} must be one of {list(MECHANISMS)}")
    _integer("k", self.k, 1)
    if (self.threshold is None) != (self.sigma_threshold is None):
      raise ValueError(f"threshold={self.threshold!r} and sigma_threshold="
                       f"{self.sigma_threshold!r}: give both (Confident GNMax) or neither")
    if self.confident and (self.mechanism != "gnmax" or self.k != 1):
      raise ValueError(f"Confident GNMax needs mechanism='gnmax' and k=1, got "
                       f"mechanism={self.mechanism!r}, k={self.k}")

  @property
  def confident(self) -> bool:
    return self.threshold is not None

  def cost(self, sensitivity: noisy_argmax.Sensitivity,
           num_queries: int = 1) -> dp_accounting.DpEvent:
    """The worst-case cost of ``num_queries`` answers (every query answered)."""
    if self.confident:
      return noisy_argmax.confident_cost_of(
          sigma_threshold=self.sigma_threshold, sigma=self.sigma,
          sensitivity=sensitivity, num_queries=num_queries, num_answered=num_queries)
    return noisy_argmax.cost_of(_PRIMITIVE[self.mechanism], epsilon=self.epsilon,
                                sigma=self.sigma, sensitivity=sensitivity, k=self.k,
                                num_queries=num_queries)

  def pure_epsilon(self) -> float | None:
    """The pure-DP epsilon of one answer (gumbel, laplace), else None."""
    if self.mechanism == "gnmax":
      return None
    return noisy_argmax.pure_epsilon_of(self.mechanism, epsilon=self.epsilon, k=self.k)

  def noise_scale(self, sensitivity: noisy_argmax.Sensitivity) -> float:
    scales = [self.sigma or 0.0, self.sigma_threshold or 0.0]
    if self.epsilon is not None:
      scales.append(2.0 * sensitivity.linf / self.epsilon)
    return max(scales)


def _floor_excluded(counts: np.ndarray, excluded: np.ndarray, spec: AnswerSpec,
                    sensitivity: noisy_argmax.Sensitivity) -> np.ndarray:
  # Excluded items get a public constant (it depends on the spec only, never
  # on the counts) so far below any count that noise of this scale lifts one
  # above an allowed item with probability < exp(-1000). The excluded set
  # comes from the query and public data, not from the training users, and
  # teachers never vote for those items, so this changes no sensitivity.
  floor = -(1e9 + 2000.0 * spec.noise_scale(sensitivity))
  return np.where(excluded, floor, counts.astype(np.float64)).astype(np.float32)


def answer(session: noisy_argmax.QuerySession, counts: np.ndarray,
           sensitivity: noisy_argmax.Sensitivity, excluded: np.ndarray,
           spec: AnswerSpec) -> np.ndarray:
  """Noisy top-k of vote histograms within a session's budget.

  Args:
    session: charged for the answer BEFORE any noise is drawn; raises
      ``noisy_argmax.BudgetExceededError`` (nothing drawn, earlier answers
      kept) if the answer would exceed its budget.
    counts: int [num_items] or [Q, num_items] vote histograms (``vote_counts``).
    sensitivity: their sensitivity to one user (``vote_counts``).
    excluded: bool, same shape: items never answered, e.g. those the query
      has seen, or those outside a public candidate pool. It must not depend
      on the training users (the guarantee treats it as public).
    spec: mechanism and its parameters.

  Returns:
    int [..., k] item ids, best first; with Confident GNMax [..., 1] and -1
    where the query was not answered.

  Guarantee: each row is one answer of ``spec``'s mechanism on a histogram of
  the given sensitivity (see ``privjax.answers.noisy_argmax``); the session composes
  them and stays within its (epsilon, delta) budget.
  """
  counts = np.asarray(counts)
  excluded = np.asarray(excluded, bool)
  if counts.shape != excluded.shape:
    raise ValueError(f"counts.shape={counts.shape} must equal "
                     f"excluded.shape={excluded.shape}")
  if ((~excluded).sum(-1) < spec.k).any():
    raise ValueError(f"a query has fewer than k={spec.k} items left to answer")
  scores = _floor_excluded(counts, excluded, spec, sensitivity)
  if spec.confident:
    answered, choice = session.confident_argmax(
        scores, threshold=spec.threshold, sigma_threshold=spec.sigma_threshold,
        sigma=spec.sigma, sensitivity=sensitivity)
    return np.where(answered, choice, -1)[..., None]
  return session.top_k(scores, spec.k, mechanism=_PRIMITIVE[spec.mechanism],
                       epsilon=spec.epsilon, sigma=spec.sigma, sensitivity=sensitivity)


def _epsilon_of(event: dp_accounting.DpEvent, delta: float) -> float:
  accountant = dp_accounting.rdp.RdpAccountant()
  accountant.compose(event)
  return float(accountant.get_epsilon(delta))


def calibrate(mechanism: str, *, epsilon_budget: float, num_queries: int,
              sensitivity: noisy_argmax.Sensitivity, k: int = 1,
              delta: float | None = None, accounting: str = "rdp") -> AnswerSpec:
  """The least noisy ``AnswerSpec`` of which ``num_queries`` answers fit the budget.

  With ``accounting="rdp"`` (any mechanism): the largest per-round epsilon
  (gumbel, laplace) or smallest sigma (gnmax) such that the ``RdpAccountant``
  epsilon at ``delta`` of ``num_queries`` composed answers is <= the budget,
  found by bisection and rounded to the safe side. With ``accounting="pure"``
  (gumbel, laplace): per-round epsilon = budget / (k * num_queries).

  >>> spec = calibrate("gumbel", epsilon_budget=2.0, num_queries=4, k=1,
  ...                  sensitivity=noisy_argmax.Sensitivity(linf=1.0), accounting="pure")
  >>> spec.epsilon
  0.5
  """
  if mechanism not in MECHANISMS:
    raise ValueError(f"mechanism={mechanism!r} must be one of {list(MECHANISMS)}")
  if not (epsilon_budget > 0 and math.isfinite(epsilon_budget)):
    raise ValueError(f"epsilon_budget={epsilon_budget!r} must be finite and > 0")
  num_queries = _integer("num_queries", num_queries, 1)
  k = _integer("k", k, 1)
  if accounting == "pure":
    if mechanism == "gnmax":
      raise ValueError("mechanism='gnmax' has no pure-DP bound; use accounting='rdp'")
    return AnswerSpec(mechanism=mechanism, k=k, epsilon=epsilon_budget / (k * num_queries))
  if accounting != "rdp":
    raise ValueError(f"accounting={accounting!r} must be 'rdp' or 'pure'")
  if delta is None or not 0 < delta < 1:
    raise ValueError(f"delta={delta!r} must be in (0, 1) for accounting='rdp'")

  def spec_for(x: float) -> AnswerSpec:
    if mechanism == "gnmax":
      return AnswerSpec(mechanism=mechanism, k=k, sigma=1.0 / x)
    return AnswerSpec(mechanism=mechanism, k=k, epsilon=x)

  def fits(x: float) -> bool:
    # A hair under the budget: a session charging the answers one by one sums
    # the same RDP curve in another order of floating-point additions.
    epsilon = _epsilon_of(spec_for(x).cost(sensitivity, num_queries), delta)
    return epsilon <= epsilon_budget * (1 - 1e-9)

  # x is the per-round epsilon or 1 / sigma: the cost grows with x.
  lo, hi = 1e-9, 1.0
  while fits(hi):
    lo, hi = hi, hi * 2.0
    if hi > 1e9:
      raise ValueError(f"epsilon_budget={epsilon_budget} is not reached by any noise level")
  for _ in range(80):
    mid = math.sqrt(lo * hi)
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    if hi / lo < 1 + 1e-9:
      break
  if not fits(lo):
    raise ValueError(f"epsilon_budget={epsilon_budget} is too small for "
                     f"num_queries={num_queries}")
  return spec_for(lo)


def per_answer(mechanism: str, *, epsilon: float, sensitivity: noisy_argmax.Sensitivity,
               k: int = 1, delta: float | None = None) -> AnswerSpec:
  """The ``AnswerSpec`` of one answer that costs ``epsilon`` on its own.

  gumbel, laplace: pure epsilon-DP for the whole top-k (per-round epsilon / k).
  gnmax: (epsilon, delta)-DP of that single answer (RDP conversion).

  >>> per_answer("laplace", epsilon=1.0, k=4,
  ...            sensitivity=noisy_argmax.Sensitivity(linf=1.0)).epsilon
  0.25
  """
  if mechanism == "gnmax":
    return calibrate(mechanism, epsilon_budget=epsilon, num_queries=1,
                     sensitivity=sensitivity, k=k, delta=delta)
  return calibrate(mechanism, epsilon_budget=epsilon, num_queries=1,
                   sensitivity=sensitivity, k=k, accounting="pure")


# ----------------------------------------------------------------------------
# The ensemble: training, saving and loading a PATE directory.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Ensemble:
  """m trained teachers over user shards. NOT private: never release it.

  ``params`` are the stacked teachers' trainable params ``[m, ...]``.
  """
  w: workload_lib.Workload
  pate: PateConfig
  shards: UserShards
  params: Any

  @property
  def num_teachers(self) -> int:
    return self.pate.num_teachers

  def votes(self, inputs: dict[str, np.ndarray], excluded: np.ndarray,
            votes_per_teacher: int = 1) -> np.ndarray:
    """int32 [Q, m, votes_per_teacher]: each teacher's top items per query
    among those not ``excluded`` (bool [Q, items]: seen, or outside a public
    pool). NOT private."""
    return top_unseen(self.w, self.params, inputs, excluded, votes_per_teacher,
                      stacked=True)

  def histograms(self, inputs: dict[str, np.ndarray], excluded: np.ndarray,
                 votes_per_teacher: int = 1
                 ) -> tuple[np.ndarray, noisy_argmax.Sensitivity]:
    """Vote histograms [Q, num_items] and their sensitivity. NOT private."""
    return vote_counts(self.votes(inputs, excluded, votes_per_teacher),
                       self.w.ds.num_items)


def teacher_config(cfg: config_lib.Config) -> config_lib.Config:
  """``cfg`` with DP-SGD switched off: teachers train without noise."""
  return config_lib.replace(cfg, **{"privacy.enabled": False,
                                    "privacy.noise_multiplier": None,
                                    "privacy.target_epsilon": None})


def train_ensemble(cfg: config_lib.Config, pate_cfg: PateConfig,
                   workdir: str | pathlib.Path | None = None, *,
                   log_every: int = 0) -> Ensemble:
  """Shards the users, trains the teachers (vmapped) and saves them in ``workdir``.

  ``workdir`` (optional) receives ``config.json``, ``pate.json`` (the PATE
  config, shard sizes, the public users, and the warning that the directory
  is NOT private), ``checkpoints/`` (stacked teacher params) and ``secret/``
  (the run secret that keys the shards; ``load_ensemble`` needs it). Without
  a workdir the secret lives in memory only. With
  ``privacy.reproducible_noise_seed`` the secret is derived from it.
  """
  cfg = config_lib.validate(teacher_config(cfg))
  seed = cfg.privacy.reproducible_noise_seed
  if workdir is not None:
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    secret = secret_lib.for_run(workdir, reproducible_seed=seed, resuming=False)
  else:
    secret = (secret_lib.RunSecret.fresh() if seed is None
              else secret_lib.RunSecret.from_seed(seed))
  w = workload_lib.build_workload(cfg)
  shards = _shards(w, pate_cfg, secret)
  examples, per_user = bounded_examples(w, secret)
  params = train_teachers(
      w, examples, [per_user[users] for users in shards.shards],
      seeds=teacher_seeds(cfg.train.seed, pate_cfg.num_teachers),
      sampling_seeds=[secret.integer(f"pate/teacher/{t}")
                      for t in range(pate_cfg.num_teachers)],
      steps=cfg.train.steps, batch_size=cfg.train.batch_size, log_every=log_every)
  ensemble = Ensemble(w, pate_cfg, shards, params)
  if workdir is not None:
    (workdir / "config.json").write_text(config_lib.to_json(cfg))
    (workdir / PATE_FILE).write_text(json.dumps({
        "kind": "pate-ensemble",
        "warning": NOT_FOR_RELEASE,
        "pate": dataclasses.asdict(pate_cfg),
        "unit": "user",
        "neighbouring_relation": "add or remove one training user (all their "
                                 "interactions); that user changes one teacher",
        "shard_sizes": [int(len(s)) for s in shards.shards],
        "public_users": [w.ds.raw_user_ids[u] for u in shards.public],
        "steps": cfg.train.steps,
    }, indent=2))
    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=1)
    ckpt.save(cfg.train.steps, params, {"kind": "pate-ensemble", "warning": NOT_FOR_RELEASE})
    ckpt.close()
  return ensemble


def _shards(w: workload_lib.Workload, pate_cfg: PateConfig,
            secret: secret_lib.RunSecret) -> UserShards:
  return shard_users(secret.unit_keys("pate/shards", w.ds.raw_user_ids),
                     pate_cfg.num_teachers, public_fraction=pate_cfg.public_fraction)


def bounded_examples(w: workload_lib.Workload, secret: secret_lib.RunSecret):
  """Training examples and each user's bounded rows ``[num_users, K]``."""
  examples, user_of_row = w.task.train_examples(w.cfg, w.split, w.ds, w.model)
  return examples, bounding.group_rows(
      user_of_row, unit_keys=secret.unit_keys("bounding", w.ds.raw_user_ids),
      max_rows_per_unit=w.cfg.data.max_examples_per_user)


def is_ensemble_dir(workdir: str | pathlib.Path) -> bool:
  return (pathlib.Path(workdir) / PATE_FILE).exists()


def load_ensemble(workdir: str | pathlib.Path) -> Ensemble:
  """The ensemble saved by ``train_ensemble`` in ``workdir``."""
  workdir = pathlib.Path(workdir)
  if not is_ensemble_dir(workdir):
    raise FileNotFoundError(f"{str(workdir)!r} is not a PATE ensemble directory "
                            f"(no {PATE_FILE})")
  cfg = config_lib.validate(config_lib.from_dict(
      json.loads((workdir / "config.json").read_text())))
  meta = json.loads((workdir / PATE_FILE).read_text())
  pate_cfg = PateConfig(**meta["pate"])
  secret = secret_lib.for_run(workdir, resuming=True,
                              reproducible_seed=cfg.privacy.reproducible_noise_seed)
  w = workload_lib.build_workload(cfg)
  shards = _shards(w, pate_cfg, secret)
  like = stack([w.params] * pate_cfg.num_teachers)
  ckpt = checkpoint.Checkpointer(workdir)
  params, _ = ckpt.restore(ckpt.latest_step(), like)
  ckpt.close()
  return Ensemble(w, pate_cfg, shards, params)


# ----------------------------------------------------------------------------
# 5. Student: public queries, noisy labels, a model trained on them.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Queries:
  """Model inputs of public queries and the items each has seen."""
  inputs: dict[str, np.ndarray]
  seen: np.ndarray
  users: np.ndarray


def public_queries(w: workload_lib.Workload, users: np.ndarray, *, num_queries: int,
                   seed: int) -> Queries:
  """Up to ``num_queries`` prefixes of the public users' training sequences.

  Each query is a prefix ``train[u][:t]`` (t >= 1) of a public user ``u``,
  drawn uniformly without replacement (seeded) from all such prefixes; its
  seen items are the prefix. Only inputs are used: the next items of these
  prefixes are never read (the labels come from the ensemble).
  """
  max_len = w.cfg.data.max_len
  pairs = [(u, t) for u in users for t in range(1, len(w.split.train[u]))]
  if not pairs:
    raise ValueError("the public users have no training prefixes")
  rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2,)))
  pick = np.sort(rng.choice(len(pairs), size=min(num_queries, len(pairs)), replace=False))
  prefixes = [w.split.train[pairs[i][0]][:pairs[i][1]] for i in pick]
  history = np.stack([sequences.left_pad(p, max_len) for p in prefixes])
  seen = np.zeros((len(pick), w.ds.num_items), bool)
  for row, p in enumerate(prefixes):
    seen[row, p] = True
  return Queries({"history": history}, seen, np.asarray([pairs[i][0] for i in pick]))


def label_queries(ensemble: Ensemble, session: noisy_argmax.QuerySession,
                  queries: Queries, spec: AnswerSpec,
                  votes_per_teacher: int = 1) -> np.ndarray:
  """The noisy ensemble's top-1 label of each query (-1 where Confident GNMax
  abstained), all charged to ``session`` as one batch of answers."""
  if spec.k != 1:
    raise ValueError(f"labels are top-1 answers: spec.k={spec.k} must be 1")
  counts, sensitivity = ensemble.histograms(queries.inputs, queries.seen, votes_per_teacher)
  return answer(session, counts, sensitivity, queries.seen, spec)[:, 0]


def train_student(w: workload_lib.Workload, queries: Queries, labels: np.ndarray, *,
                  seed: int, steps: int, batch_size: int) -> Any:
  """A fresh model trained non-privately on (public query, noisy label) pairs.

  Its guarantee is the labels' cost: it sees only public inputs and the
  released labels. Queries labelled -1 (unanswered) are dropped. Works for
  tasks whose examples are ``{"history", "target"}`` (the mlp).
  """
  labels = np.asarray(labels)
  keep = labels >= 0
  if not keep.any():
    raise ValueError("no labelled queries to train the student on")
  examples = {"history": queries.inputs["history"][keep], "target": labels[keep].astype(np.int32)}
  unit_rows = np.arange(int(keep.sum()), dtype=np.int32)[:, None]
  params = train_teachers(w, examples, [unit_rows], seeds=[seed], steps=steps,
                          batch_size=min(batch_size, len(unit_rows)))
  return unstack(params, 0)


# ----------------------------------------------------------------------------
# Metrics of answers.
# ----------------------------------------------------------------------------


def hits(answers_QxK: np.ndarray, targets: np.ndarray) -> dict[str, float]:
  """Top-1 hit rate and HR@k of answers (item lists, best first) on targets.

  >>> hits(np.array([[3, 1], [2, 0]]), np.array([3, 0]))
  {'top1': 0.5, 'hr@2': 1.0, 'num_queries': 2}
  """
  answers = np.asarray(answers_QxK)
  targets = np.asarray(targets)[:, None]
  return {"top1": float((answers[:, :1] == targets).mean()),
          f"hr@{answers.shape[1]}": float((answers == targets).any(-1).mean()),
          "num_queries": int(len(answers))}
