"""Private prediction: noisy argmax and top-k over scores of bounded sensitivity.

Scores come with a ``Sensitivity`` that bounds how much one unit (a training
user) can change them: the largest change of one score (``linf``: gumbel,
laplace) and of the whole vector in L2 (``l2``: gnmax). ``vote_histogram``
computes it for teacher votes (PATE). Mechanisms, each with its guarantee on
the function that runs it: ``"gumbel"`` (exponential mechanism; top-k by one
Gumbel draw, k*epsilon-DP, k*epsilon^2/8-zCDP), ``"laplace"`` (report-noisy-
max, peeling, k*epsilon-DP), ``"gnmax"`` (Gaussian noise on every score, the
Gaussian mechanism with noise multiplier sigma / l2) and ``confident_gnmax``
(a noisy threshold check first). Every call returns its dp_accounting event
(zCDP or Gaussian, composed over rows). ``monotonic=True`` is the sharper
calibration for scores that only grow when a unit is added; vote histograms
are NOT monotone. Noise on the logits of a model trained without DP gives no
guarantee (no finite sensitivity exists), so there is no such API; a DP-SGD
model needs no noise at all. Noise is textbook float32 sampling and only
indices are released. Each call consumes its key; ``session.QuerySession``
charges every answer to one budget before drawing noise. The guarantees and
references: docs/serving.md.

>>> counts, sens = vote_histogram(jnp.array([2, 2, 2, 0, 2]), num_classes=3)
>>> counts.tolist(), sens.l2 == math.sqrt(2)
([1, 0, 4], True)
>>> choice, cost = noisy_argmax(counts, mechanism="gnmax", sigma=1e-3,
...                             sensitivity=sens, key=jax.random.key(0))
>>> int(choice), cost.noise_multiplier == 1e-3 / math.sqrt(2)
(2, True)
"""

import dataclasses
import functools
import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np

from privjax import _validate

MECHANISMS = ("gnmax", "gumbel", "laplace")
ACCOUNTING = ("pure", "rdp")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sensitivity:
  """How much one privacy unit can change a score vector, per norm.

  Attributes:
    linf: largest change of any single score (exponential mechanism, report
      noisy max, and the max score in confident GNMax).
    l2: L2 norm of the change of the whole vector (Gaussian mechanism);
      None when unknown, and then ``"gnmax"`` refuses it.
    l1: L1 norm of the change (informational: releasing a Laplace-noised
      histogram would be charged by it; nothing here releases one).

  >>> Sensitivity(linf=1.0, l2=math.sqrt(2), l1=2.0).linf
  1.0
  """
  linf: float
  l2: float | None = None
  l1: float | None = None

  def __post_init__(self):
    _validate.non_negative("sensitivity.linf", self.linf)
    for name in ("l2", "l1"):
      if getattr(self, name) is not None:
        _validate.non_negative(f"sensitivity.{name}", getattr(self, name))


# ----------------------------------------------------------------------------
# Vote histograms.
# ----------------------------------------------------------------------------


def vote_histogram(votes, num_classes: int) -> tuple[jax.Array, Sensitivity]:
  """Counts teacher votes per class, with the sensitivity to one user.

  Each of the ``m`` teachers votes for one class (``votes`` of shape [m]) or
  for ``k`` distinct classes (shape [m, k]). A user's data lies in one
  teacher's partition, so neighbouring histograms differ by replacing one
  teacher's vote set A by another set B of the same size: the change is
  ``1_B - 1_A``, nonzero on the ``2 * s`` classes of the symmetric difference,
  ``s = |A \\ B| <= min(k, num_classes - k)``. Hence, exactly (the worst case
  is attained): L1 = 2s, L2 = sqrt(2s), Linf = 1 (0 if s = 0).

  Args:
    votes: integer array [m] or [m, k], classes in [0, num_classes); the k
      classes of one teacher must be distinct.
    num_classes: number of classes C.

  Returns:
    (counts int32 [C], Sensitivity computed from k and C).

  >>> counts, sens = vote_histogram(np.array([[0, 1], [1, 2]]), num_classes=4)
  >>> counts.tolist(), sens.l1, sens.l2, sens.linf
  ([1, 2, 1, 0], 4.0, 2.0, 1.0)
  """
  if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"num_classes={num_classes!r} must be an integer >= 1")
  votes = np.asarray(votes)
  if votes.ndim not in (1, 2) or votes.shape[0] < 1:
    raise ValueError(f"votes.shape={votes.shape} must be [m] or [m, k] with m >= 1")
  if not np.issubdtype(votes.dtype, np.integer):
    raise ValueError(f"votes.dtype={votes.dtype} must be an integer type")
  votes_mxk = votes.reshape(votes.shape[0], -1)
  k = votes_mxk.shape[1]
  if not 1 <= k <= num_classes:
    raise ValueError(f"votes per teacher k={k} must be in [1, num_classes={num_classes}]")
  bad = (votes_mxk < 0) | (votes_mxk >= num_classes)
  if bad.any():
    row = int(np.argwhere(bad)[0, 0])
    raise ValueError(f"votes[{row}]={votes[row].tolist()} has a class outside "
                     f"[0, {num_classes})")
  repeated = (np.diff(np.sort(votes_mxk, axis=1), axis=1) == 0).any(axis=1)
  if repeated.any():
    row = int(np.argmax(repeated))
    raise ValueError(f"votes[{row}]={votes[row].tolist()} repeats a class; "
                     "a teacher's k votes must be distinct")
  counts = np.bincount(votes_mxk.ravel(), minlength=num_classes).astype(np.int32)
  moved = min(k, num_classes - k)
  sensitivity = Sensitivity(linf=float(moved > 0), l2=math.sqrt(2 * moved),
                            l1=float(2 * moved))
  return jnp.asarray(counts), sensitivity


# ----------------------------------------------------------------------------
# Costs.
# ----------------------------------------------------------------------------


def _check_params(mechanism, epsilon, sigma, sensitivity, monotonic):
  _validate.one_of("mechanism", mechanism, MECHANISMS)
  if not isinstance(sensitivity, Sensitivity):
    raise ValueError(f"sensitivity={sensitivity!r} must be a Sensitivity (which "
                     "norm a bare number bounds is ambiguous)")
  if mechanism == "gnmax":
    if epsilon is not None:
      raise ValueError(f"epsilon={epsilon!r} is not used by mechanism='gnmax'; "
                       "pass sigma")
    if monotonic:
      raise ValueError("monotonic=True has no meaning for mechanism='gnmax'")
    _validate.positive("sigma", sigma)
    if sensitivity.l2 is None:
      raise ValueError(f"sensitivity.l2=None: mechanism='gnmax' needs it ({sensitivity})")
    _validate.positive("sensitivity.l2", sensitivity.l2)
  else:
    if sigma is not None:
      raise ValueError(f"sigma={sigma!r} is not used by mechanism={mechanism!r}; "
                       "pass epsilon")
    _validate.positive("epsilon", epsilon)
    _validate.positive("sensitivity.linf", sensitivity.linf)
  if not isinstance(monotonic, bool):
    raise ValueError(f"monotonic={monotonic!r} must be a bool")


def _count(name: str, value, minimum: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
  return int(value)


def _repeat(event: dp_accounting.DpEvent, count: int) -> dp_accounting.DpEvent:
  return event if count == 1 else dp_accounting.SelfComposedDpEvent(event, count)


def cost_of(mechanism: str, *, epsilon: float | None = None,
            sigma: float | None = None, sensitivity: Sensitivity, k: int = 1,
            num_queries: int = 1, monotonic: bool = False) -> dp_accounting.DpEvent:
  """The privacy cost of ``num_queries`` noisy top-k answers, before drawing any.

  Args:
    mechanism: "gumbel", "laplace" or "gnmax".
    epsilon: per-round epsilon (gumbel, laplace).
    sigma: noise standard deviation on the scores (gaussian).
    sensitivity: the bounds of one unit's influence on the scores.
    k: answers per query (1 for argmax).
    num_queries: independent queries (rows of a batch).
    monotonic: scores only grow when a unit is added (gumbel, laplace).

  Returns:
    ``ZCDpEvent(k * epsilon**2 / 8)`` (gumbel), ``ZCDpEvent(k * epsilon**2 / 2)``
    (laplace) or ``GaussianDpEvent(sigma / sensitivity.l2)`` (gaussian, any k),
    self-composed ``num_queries`` times.

  >>> sens = Sensitivity(linf=1.0, l2=math.sqrt(2))
  >>> cost_of("gumbel", epsilon=2.0, sensitivity=sens, k=3)
  ZCDpEvent(rho=1.5, xi=0.0)
  """
  _check_params(mechanism, epsilon, sigma, sensitivity, monotonic)
  k = _count("k", k)
  num_queries = _count("num_queries", num_queries)
  if mechanism == "gnmax":
    event = dp_accounting.GaussianDpEvent(sigma / sensitivity.l2)
  elif mechanism == "gumbel":
    event = dp_accounting.ZCDpEvent(rho=k * epsilon**2 / 8)
  else:
    event = dp_accounting.ZCDpEvent(rho=k * epsilon**2 / 2)
  return _repeat(event, num_queries)


def pure_epsilon_of(mechanism: str, *, epsilon: float, k: int = 1,
                    num_queries: int = 1) -> float:
  """The pure-DP (basic composition) epsilon of gumbel/laplace top-k queries.

  >>> pure_epsilon_of("laplace", epsilon=0.5, k=2, num_queries=3)
  3.0
  """
  _validate.one_of("mechanism", mechanism, ("gumbel", "laplace"))
  _validate.positive("epsilon", epsilon)
  return _count("k", k) * _count("num_queries", num_queries) * epsilon


def confident_cost_of(*, sigma_threshold: float, sigma: float,
                      sensitivity: Sensitivity, num_queries: int = 1,
                      num_answered: int) -> dp_accounting.DpEvent:
  """The data-independent cost of confident GNMax (Papernot et al. 2018).

  Every query pays the threshold check, the Gaussian mechanism on the max
  score (sensitivity ``linf``); each answered query also pays GNMax.

  >>> sens = Sensitivity(linf=1.0, l2=math.sqrt(2))
  >>> confident_cost_of(sigma_threshold=2.0, sigma=1.0, sensitivity=sens,
  ...                   num_queries=3, num_answered=0)
  SelfComposedDpEvent(event=GaussianDpEvent(noise_multiplier=2.0), count=3)
  """
  _validate.positive("sigma_threshold", sigma_threshold)
  _check_params("gnmax", None, sigma, sensitivity, False)
  _validate.positive("sensitivity.linf", sensitivity.linf)
  num_queries = _count("num_queries", num_queries)
  num_answered = _count("num_answered", num_answered, minimum=0)
  if num_answered > num_queries:
    raise ValueError(f"num_answered={num_answered} exceeds num_queries={num_queries}")
  check = _repeat(dp_accounting.GaussianDpEvent(sigma_threshold / sensitivity.linf),
                  num_queries)
  if num_answered == 0:
    return check
  answer = _repeat(dp_accounting.GaussianDpEvent(sigma / sensitivity.l2), num_answered)
  return dp_accounting.ComposedDpEvent([check, answer])


# ----------------------------------------------------------------------------
# Sampling.
# ----------------------------------------------------------------------------


def _scale(mechanism, epsilon, sigma, sensitivity, monotonic) -> float:
  if mechanism == "gnmax":
    return float(sigma)
  # Non-monotone scores can move in opposite directions for two items, which
  # doubles the shift in their difference; monotone ones cannot.
  return (1.0 if monotonic else 2.0) * sensitivity.linf / epsilon


def _scores_array(scores) -> jax.Array:
  scores = jnp.asarray(scores)
  if scores.ndim < 1 or scores.shape[-1] < 1:
    raise ValueError(f"scores.shape={scores.shape} must be [..., n] with n >= 1")
  if not (jnp.issubdtype(scores.dtype, jnp.floating)
          or jnp.issubdtype(scores.dtype, jnp.integer)):
    raise ValueError(f"scores.dtype={scores.dtype} must be integer or floating")
  return scores


def _as_float(scores):
  """Scores in float32 or wider, and whether they are all finite."""
  scores = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))
  return scores, jnp.all(jnp.isfinite(scores))


def _check_finite(finite):
  # An infinite or NaN score makes the choice deterministic whatever the
  # noise: no bounded sensitivity covers it. Raised before anything is returned.
  if not bool(finite):
    raise ValueError("scores must all be finite")


def _noise(mechanism: str, key, shape, dtype):
  if mechanism == "gumbel":
    return jax.random.gumbel(key, shape, dtype)
  if mechanism == "laplace":
    return jax.random.laplace(key, shape, dtype)
  return jax.random.normal(key, shape, dtype)


def _perturb(scores, *, mechanism: str, scale, key) -> jax.Array:
  """The scores plus i.i.d. noise of the mechanism's family and ``scale``."""
  return scores + jnp.asarray(scale, scores.dtype) * _noise(
      mechanism, key, scores.shape, scores.dtype)


@functools.partial(jax.jit, static_argnames=("mechanism", "k"))
def _top_k_kernel(scores, scale, key, *, mechanism: str, k: int):
  scores, finite = _as_float(scores)
  if mechanism != "laplace":
    # One noisy vector: GNMax top-k is its post-processing, and for Gumbel
    # noise it has the law of k rounds of exponential-mechanism peeling.
    noisy = _perturb(scores, mechanism=mechanism, scale=scale, key=key)
    return jax.lax.top_k(noisy, k)[1].astype(jnp.int32), finite
  # Report-noisy-max with Laplace noise peels: k rounds with fresh noise over
  # the items not yet chosen, so each round is one epsilon-DP argmax.
  chosen = []
  taken = jnp.zeros(scores.shape, bool)
  for round_key in jax.random.split(key, k):
    noisy = _perturb(scores, mechanism=mechanism, scale=scale, key=round_key)
    choice = jnp.argmax(jnp.where(taken, -jnp.inf, noisy), axis=-1)
    taken = taken | jax.nn.one_hot(choice, scores.shape[-1], dtype=bool)
    chosen.append(choice)
  return jnp.stack(chosen, axis=-1).astype(jnp.int32), finite


@jax.jit
def _confident_kernel(scores, threshold, sigma_threshold, sigma, key):
  scores, finite = _as_float(scores)
  check_key, answer_key = jax.random.split(key)
  noisy_max = _perturb(scores.max(axis=-1), mechanism="gnmax",
                       scale=sigma_threshold, key=check_key)
  answered = noisy_max >= threshold
  noisy = _perturb(scores, mechanism="gnmax", scale=sigma, key=answer_key)
  choice = jnp.where(answered, jnp.argmax(noisy, axis=-1), -1).astype(jnp.int32)
  return answered, choice, finite


def noisy_top_k(scores, k: int, *, mechanism: str, epsilon: float | None = None,
                sigma: float | None = None, sensitivity: Sensitivity, key: jax.Array,
                monotonic: bool = False) -> tuple[jax.Array, dp_accounting.DpEvent]:
  """The k highest scores, in order, chosen privately.

  Guarantee (per row of ``scores``, for one unit's change bounded by
  ``sensitivity``): gumbel k*epsilon-DP and k*epsilon^2/8-zCDP; laplace
  k*epsilon-DP (peeling); gaussian the Gaussian mechanism with noise
  multiplier sigma / l2, whatever k. Rows are separate queries and compose.

  Args:
    scores: [..., n] scores; leading axes are independent queries.
    k: how many items to report, 1 <= k <= n.
    mechanism: "gumbel", "laplace" or "gnmax".
    epsilon: per-round epsilon (gumbel, laplace).
    sigma: noise standard deviation on the scores (gaussian).
    sensitivity: the bounds of one unit's influence on the scores.
    key: a fresh key, used for this call only.
    monotonic: scores only grow when a unit is added (gumbel, laplace).

  Returns:
    (int32 indices [..., k], best first; the ``cost_of`` this call).

  >>> sens = Sensitivity(linf=1.0)
  >>> top, cost = noisy_top_k(jnp.array([0.0, 900.0, 0.0, 1000.0]), 2,
  ...                         mechanism="gumbel", epsilon=1.0, sensitivity=sens,
  ...                         key=jax.random.key(0))
  >>> top.tolist(), cost
  ([3, 1], ZCDpEvent(rho=0.25, xi=0.0))
  """
  scores = _scores_array(scores)
  k = _count("k", k)
  if k > scores.shape[-1]:
    raise ValueError(f"k={k} exceeds the number of items {scores.shape[-1]}")
  num_queries = math.prod(scores.shape[:-1])
  cost = cost_of(mechanism, epsilon=epsilon, sigma=sigma, sensitivity=sensitivity,
                 k=k, num_queries=max(num_queries, 1), monotonic=monotonic)
  scale = _scale(mechanism, epsilon, sigma, sensitivity, monotonic)
  # One compile per (mechanism, k, rows, n), whatever the leading axes.
  top, finite = _top_k_kernel(scores.reshape(-1, scores.shape[-1]), scale, key,
                              mechanism=mechanism, k=k)
  _check_finite(finite)
  return top.reshape(*scores.shape[:-1], k), cost


def noisy_argmax(scores, *, mechanism: str, epsilon: float | None = None,
                 sigma: float | None = None, sensitivity: Sensitivity,
                 key: jax.Array, monotonic: bool = False
                 ) -> tuple[jax.Array, dp_accounting.DpEvent]:
  """The index of the highest score, chosen privately (``noisy_top_k`` with k=1).

  Guarantee per row: gumbel and laplace epsilon-DP (charged as zCDP,
  epsilon^2/8 and epsilon^2/2); gaussian GaussianDpEvent(sigma / l2).

  Returns:
    (int32 indices [...], the cost of the call).

  >>> counts, sens = vote_histogram(np.array([1, 1, 1, 0]), num_classes=2)
  >>> choice, cost = noisy_argmax(counts, mechanism="laplace", epsilon=40.0,
  ...                             sensitivity=sens, key=jax.random.key(1))
  >>> int(choice), cost
  (1, ZCDpEvent(rho=800.0, xi=0.0))
  """
  top, cost = noisy_top_k(scores, 1, mechanism=mechanism, epsilon=epsilon,
                          sigma=sigma, sensitivity=sensitivity, key=key,
                          monotonic=monotonic)
  return top[..., 0], cost


def confident_gnmax(scores, *, threshold: float, sigma_threshold: float,
                    sigma: float, sensitivity: Sensitivity, key: jax.Array
                    ) -> tuple[jax.Array, jax.Array, dp_accounting.DpEvent]:
  """Confident GNMax: answer only when the noisy top score clears a threshold.

  For each query (row), answer iff ``max(scores) + N(0, sigma_threshold^2) >=
  threshold``, and then report the GNMax argmax with N(0, sigma^2) noise
  drawn independently. Guarantee (data-independent, Papernot et al. 2018): the
  check is the Gaussian mechanism on the max score, whose sensitivity is at
  most ``sensitivity.linf``, charged for every query; each answered query also
  pays ``GaussianDpEvent(sigma / sensitivity.l2)``. Whether a query was
  answered is itself a released output of the (paid) check.

  Args:
    scores: [..., n] scores, e.g. vote counts; leading axes are queries.
    threshold: public threshold T on the max score.
    sigma_threshold: noise std of the check (sigma1).
    sigma: noise std of the answer (sigma2).
    sensitivity: the bounds of one unit's influence on the scores.
    key: a fresh key, used for this call only.

  Returns:
    (answered bool [...], choice int32 [...] with -1 where not answered,
    ``confident_cost_of`` the realised answers).

  >>> counts, sens = vote_histogram(np.array([2] * 50 + [0] * 3), num_classes=3)
  >>> answered, choice, cost = confident_gnmax(
  ...     counts, threshold=40.0, sigma_threshold=2.0, sigma=1.0,
  ...     sensitivity=sens, key=jax.random.key(0))
  >>> bool(answered), int(choice)
  (True, 2)
  """
  scores = _scores_array(scores)
  if not (isinstance(threshold, (int, float)) and not math.isnan(threshold)):
    raise ValueError(f"threshold={threshold!r} must be a number")
  num_queries = max(math.prod(scores.shape[:-1]), 1)
  # Validates everything before any noise is drawn.
  confident_cost_of(sigma_threshold=sigma_threshold, sigma=sigma,
                    sensitivity=sensitivity, num_queries=num_queries, num_answered=0)
  answered, choice, finite = _confident_kernel(
      scores.reshape(-1, scores.shape[-1]), float(threshold), float(sigma_threshold),
      float(sigma), key)
  _check_finite(finite)
  answered = answered.reshape(scores.shape[:-1])
  choice = choice.reshape(scores.shape[:-1])
  cost = confident_cost_of(sigma_threshold=sigma_threshold, sigma=sigma,
                           sensitivity=sensitivity, num_queries=num_queries,
                           num_answered=int(answered.sum()))
  return answered, choice, cost
