"""White-box gradient canaries through the real DP step, many runs at once.

A canary is a user whose rows all point along one coordinate of the model that
nobody else touches, so their group gradient is a multiple of that basis
vector, clipped to norm C. The audit builds a tiny linear model from
``privjax.models.nn`` layers (so ghost clipping runs its tapped fast path),
ordinary users whose rows touch the other coordinates, and m canaries on m
coordinates of their own. Each run then goes through exactly what a training
run goes through:

  rows -> ``data.bounding.group_rows`` (a user's rows become one unit)
       -> ``dp.sampling.PoissonSampler`` (which units are in each step)
       -> ``dp.step.make_step`` (clipping by vmap or ghost, Gaussian noise,
          the public divisor, optax SGD), ``steps`` times,

batched with ``jax.vmap`` over runs (noise keys and sampled batches). A
canary's score is the learning-rate-free update along its coordinate in units
of C: about (steps it was sampled) + sigma x noise. The scores of runs without
the canaries (D) and with them (D') go to ``bounds.distinguishing_bound``.

Canaries sit on disjoint coordinates and are sampled, clipped and noised
independently, so the m canaries of one run are m independent observations of
the mechanism for one user: ``canaries_per_run`` multiplies the observations
per run. (Noise that were correlated across coordinates, itself a bug, would
break this independence.) ``privjax.audit.planted`` builds the broken steps
that the audit must flag; ``Wiring`` is how they are substituted.

>>> spec = StepSpec(noise_multiplier=4.0)
>>> audit = audit_step(spec, runs=500, canaries_per_run=2)
>>> audit.flagged, audit.bound.epsilon_lower <= audit.accountant_epsilon
(False, True)
"""

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from privjax.audit import bounds
from privjax.audit import one_run
from privjax.data import bounding
from privjax.dp import accounting
from privjax.dp import sampling
from privjax.dp import step as dp_step
from privjax.models import nn


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepSpec:
  """The step as its privacy statement describes it: what the accountant is told.

  Attributes:
    sampling_prob: q, Poisson sampling probability of each unit per step.
    noise_multiplier: sigma; noise std sigma * C on the clipped sum.
    l2_clip_norm: C, the bound on one unit's (user's) gradient.
    steps: T steps per run (each canary's score sums its T updates).
    delta: the delta of the claim.
    clipping: "vmap" or "ghost" (both must pass the same audit).
    accountant: "pld" (tight) or "rdp", for the claimed epsilon.
  """
  sampling_prob: float = 1.0
  noise_multiplier: float = 1.0
  l2_clip_norm: float = 1.0
  steps: int = 1
  delta: float = 1e-5
  clipping: str = "vmap"
  accountant: str = "pld"

  def __post_init__(self):
    accounting.check_sampling_prob(self.sampling_prob)
    accounting.check_noise_multiplier(self.noise_multiplier)
    accounting.check_delta(self.delta)
    accounting.integer("steps", self.steps, 1)
    accounting.check_accountant(self.accountant)
    if self.clipping not in ("vmap", "ghost"):
      raise ValueError(f"clipping={self.clipping!r} must be 'vmap' or 'ghost'")

  def accountant_epsilon(self) -> float:
    """The epsilon the accountant states for T steps of this step."""
    if self.noise_multiplier == 0:
      return math.inf
    return accounting.dpsgd_epsilon(
        sampling_prob=self.sampling_prob, noise_multiplier=self.noise_multiplier,
        steps=self.steps, delta=self.delta, accountant=self.accountant)

  def exact_epsilon(self) -> float | None:
    """The exact epsilon when q = 1 (T Gaussian steps are one with mu = sqrt(T) /
    sigma); None otherwise."""
    if self.sampling_prob != 1:
      return None
    if self.noise_multiplier == 0:
      return math.inf
    return bounds.gaussian_epsilon(math.sqrt(self.steps) / self.noise_multiplier,
                                   self.delta)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Wiring:
  """What actually runs. The defaults are the real pieces, configured as the
  spec says; a planted bug substitutes one of them (``privjax.audit.planted``).

  Attributes:
    name: a label for reports.
    noise_multiplier: the sigma the step really uses (None: the spec's).
    clipped_sum_fn: replaces the clipped sum (``make_step``'s argument).
    group_by_user: False makes every row its own unit (rows clipped one by one).
    sampling_prob: the q the sampler really uses (None: the spec's).
    private: False runs the non-private twin (no clipping, no noise).
  """
  name: str = "correct"
  noise_multiplier: float | None = None
  clipped_sum_fn: Callable[..., Any] | None = None
  group_by_user: bool = True
  sampling_prob: float | None = None
  private: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class Population:
  """The audited data: ordinary users around the canaries.

  Attributes:
    num_users: ordinary users; their rows touch coordinates [0, dim) only.
    max_rows_per_user: K, rows a unit keeps (``data.max_examples_per_user``).
    dim: ordinary coordinates.
    canary_rows: rows of each canary user (<= K).
    canary_row_norm: each canary row is this x C along the canary's own
      coordinate, so an unclipped canary contributes canary_rows x this x C.
    seed: the ordinary users' rows (public, not secret: this is a simulation).
  """
  num_users: int = 6
  max_rows_per_user: int = 4
  dim: int = 8
  canary_rows: int = 4
  canary_row_norm: float = 2.0
  seed: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepAudit:
  """A many-run audit of one step.

  Attributes:
    spec, wiring: what was claimed and what ran.
    bound: the ``bounds.DistinguishingBound`` of the canary scores.
    accountant_epsilon: the epsilon the spec claims (``spec.accountant``).
    exact_epsilon: the exact epsilon when q = 1, else None.
    flagged: the held-out lower bound exceeds the claimed epsilon: at
      confidence ``bound.confidence`` the step is NOT as private as claimed.
    runs, canaries_per_run: runs per side, and observations per run.
    seconds: wall time of the simulation (compile included) and the bound.
  """
  spec: StepSpec
  wiring: Wiring
  bound: bounds.DistinguishingBound
  accountant_epsilon: float
  exact_epsilon: float | None
  flagged: bool
  runs: int
  canaries_per_run: int
  seconds: float

  def to_dict(self) -> dict:
    return bounds._finite({  # pylint: disable=protected-access
        "spec": dataclasses.asdict(self.spec), "wiring": self.wiring.name,
        "bound": self.bound.to_dict(), "accountant_epsilon": self.accountant_epsilon,
        "exact_epsilon": self.exact_epsilon, "flagged": self.flagged,
        "runs_per_side": self.runs, "canaries_per_run": self.canaries_per_run,
        "seconds": self.seconds})


# ----------------------------------------------------------------------------
# The simulated data, model and step.


def _rows(population: Population, num_canaries: int, c: float):
  """Rows x [R, D] and the user of each row; canaries are the last users."""
  p = population
  if not 1 <= p.canary_rows <= p.max_rows_per_user:
    raise ValueError(f"canary_rows={p.canary_rows} must be in [1, "
                     f"max_rows_per_user={p.max_rows_per_user}]")
  rng = np.random.default_rng(p.seed)
  d = p.dim + num_canaries
  counts = rng.integers(1, p.max_rows_per_user + 1, p.num_users)
  x = np.zeros((counts.sum() + num_canaries * p.canary_rows, d), np.float32)
  directions = rng.normal(size=(counts.sum(), p.dim))
  norms = rng.uniform(0.25, 3.0, counts.sum()) * c
  x[:counts.sum(), :p.dim] = directions / np.linalg.norm(directions, axis=1,
                                                         keepdims=True) * norms[:, None]
  canary = np.repeat(np.arange(num_canaries), p.canary_rows)
  x[counts.sum() + np.arange(len(canary)), p.dim + canary] = p.canary_row_norm * c
  user = np.concatenate([np.repeat(np.arange(p.num_users), counts),
                         p.num_users + canary]).astype(np.int32)
  return x, user


def _units(user: np.ndarray, num_users: int, k: int, group_by_user: bool):
  """Rows of each unit [N, K'] (-1 padded) and each unit's user."""
  if group_by_user:
    keys = bounding.mix64(np.arange(num_users, dtype=np.uint64) + np.uint64(7))
    rows = bounding.group_rows(user, unit_keys=keys, max_rows_per_unit=k)
    return rows, np.arange(num_users)
  return np.arange(len(user), dtype=np.int32)[:, None], user


def _model(d: int):
  layer = nn.Linear(d, 1, use_bias=False, rngs=nnx.Rngs(0))
  graphdef, params, _ = nnx.split(layer, nnx.Param, ...)
  params = jax.tree.map(jnp.zeros_like, nnx.to_pure_dict(params))

  def loss_fun(params, frozen, example, rng):
    del frozen, rng
    return nnx.merge(graphdef, nnx.State(params))(example["x"])[0]

  return params, loss_fun


def _sample_rows(units, unit_user, present_user, *, q, steps, runs_seed, padded):
  """Per run and step, the rows of the sampled units [runs, T, padded, K]."""
  runs = present_user.shape[0]
  out = np.full((runs, steps, padded, units.shape[1]), -1, np.int32)
  sampler = sampling.PoissonSampler(sampling_prob=q, seed=runs_seed,
                                    bucket_sizes=(padded,))
  for r in range(runs):
    present = np.flatnonzero(present_user[r][unit_user])
    for t in range(steps):
      # One sampler; (run, step) pairs are distinct "steps" of its stream.
      batch = sampler.sample(r * steps + t, len(present))
      out[r, t, :batch.size] = units[present[batch.indices[:batch.size]]]
  return out


def canary_scores(spec: StepSpec, inclusion, *, wiring: Wiring = Wiring(),
                  population: Population = Population(), seed: int = 0,
                  chunk_size: int = 4096) -> np.ndarray:
  """Runs the step ``len(inclusion)`` times and scores each canary in each run.

  Args:
    spec: the claimed step (C, q, sigma, T, clipping).
    inclusion: bool [runs, m]: which of the m canaries are in each run's data.
    wiring: what really runs (default: the real pieces, as specified).
    population: the ordinary users and the canaries' shape.
    seed: the noise keys and the sampler's stream (a simulation, not a secret).
    chunk_size: runs per vmapped call (memory).

  Returns:
    float [runs, m]: each canary's update along its coordinate, in units of C
    and free of the learning rate and divisor: sampled steps x (its clipped
    contribution / C) + noise with std sigma per step.
  """
  inclusion = np.asarray(inclusion, bool)
  runs, m = inclusion.shape
  c = spec.l2_clip_norm
  x, user = _rows(population, m, c)
  num_users = population.num_users + m
  units, unit_user = _units(user, num_users, population.max_rows_per_user,
                            wiring.group_by_user)
  present_user = np.concatenate([np.ones((runs, population.num_users), bool),
                                 inclusion], axis=1)
  q = spec.sampling_prob if wiring.sampling_prob is None else wiring.sampling_prob
  rows = _sample_rows(units, unit_user, present_user, q=q, steps=spec.steps,
                      runs_seed=seed, padded=len(units))
  params, loss_fun = _model(population.dim + m)
  divisor = spec.sampling_prob * population.num_users  # public, the same on D and D'
  config = dp_step.StepConfig(
      private=wiring.private, l2_clip_norm=c, clipping=spec.clipping,
      noise_multiplier=(spec.noise_multiplier if wiring.noise_multiplier is None
                        else wiring.noise_multiplier),
      expected_batch_size=divisor)
  optimizer = optax.sgd(1.0)
  step_fn = dp_step.make_step(loss_fun, optimizer, config,
                              clipped_sum_fn=wiring.clipped_sum_fn)
  table = jnp.asarray(x)

  def one_run(rows_TxNxK, keys_T):
    def body(state, xs):
      rows_NxK, key = xs
      batch = {"x": table[jnp.maximum(rows_NxK, 0)]}
      state, _ = step_fn(state, {}, batch, (rows_NxK >= 0).astype(jnp.float32), key)
      return state, None
    state, _ = jax.lax.scan(body, dp_step.init_state(params, optimizer),
                            (rows_TxNxK, keys_T))
    return -state.params["kernel"][population.dim:, 0] * divisor / c

  run_chunk = jax.jit(jax.vmap(one_run))
  keys = jax.random.split(jax.random.key(seed), runs * spec.steps).reshape(
      runs, spec.steps)
  chunk = min(chunk_size, runs)
  out = []
  for start in range(0, runs, chunk):
    part, part_keys = rows[start:start + chunk], keys[start:start + chunk]
    n = len(part)
    if n < chunk:  # one shape, one compile
      part = np.concatenate([part, np.repeat(part[:1], chunk - n, 0)])
      part_keys = jnp.concatenate([part_keys, jnp.repeat(part_keys[:1], chunk - n, 0)])
    out.append(np.asarray(run_chunk(jnp.asarray(part), part_keys))[:n])
  return np.concatenate(out).astype(np.float64)


def audit_step(spec: StepSpec, *, runs: int = 20_000, canaries_per_run: int = 16,
               wiring: Wiring = Wiring(), population: Population = Population(),
               confidence: float = 0.95, seed: int = 0) -> StepAudit:
  """Many-run audit: ``runs`` runs without the canaries, ``runs`` with them.

  Guarantee: ``result.flagged`` is True with probability at most 1 -
  ``confidence`` when the step that runs is as private as ``spec`` claims
  (see ``bounds.DistinguishingBound``): a flag is evidence of a bug, at that
  confidence. Not being flagged proves nothing: a bound below the claim is
  what a correct step AND a subtly broken one both give.

  Args:
    spec: the claimed step; the accountant's epsilon is computed from it.
    runs: runs per side (D, D').
    canaries_per_run: canaries per run, each an independent observation.
    wiring: what really runs (``planted`` has broken ones).
    population: the ordinary users and the canaries' shape.
    confidence: 1 - beta of the bound.
    seed: noise, sampling and the selection split (a simulation).

  Returns:
    A ``StepAudit``.
  """
  t0 = time.time()
  inclusion = np.concatenate([np.zeros((runs, canaries_per_run), bool),
                              np.ones((runs, canaries_per_run), bool)])
  scores = canary_scores(spec, inclusion, wiring=wiring, population=population,
                         seed=seed)
  bound = bounds.distinguishing_bound(scores[:runs], scores[runs:], delta=spec.delta,
                                      confidence=confidence, seed=seed)
  claimed = spec.accountant_epsilon()
  return StepAudit(spec=spec, wiring=wiring, bound=bound, accountant_epsilon=claimed,
                   exact_epsilon=spec.exact_epsilon(),
                   flagged=bool(bound.epsilon_lower > claimed), runs=runs,
                   canaries_per_run=canaries_per_run, seconds=time.time() - t0)


def one_run_step_audit(spec: StepSpec, *, num_canaries: int = 1000,
                       wiring: Wiring = Wiring(), population: Population = Population(),
                       confidence: float = 0.95, seed: int = 0
                       ) -> tuple[one_run.OneRunResult, float]:
  """The one-run audit of one run of the step: m canaries, each in with prob 1/2.

  Guarantee: as ``one_run.best_guesses``: the bound exceeds the run's true
  epsilon with probability at most 1 - ``confidence``.

  Returns:
    (the ``OneRunResult``, the accountant's epsilon of the spec).
  """
  rng = np.random.default_rng(seed)
  included = rng.random(num_canaries) < 0.5
  scores = canary_scores(spec, included[None], wiring=wiring, population=population,
                         seed=seed)[0]
  result = one_run.best_guesses(scores, included, delta=spec.delta,
                                confidence=confidence)
  return result, spec.accountant_epsilon()
