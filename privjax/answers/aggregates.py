"""Differentially private aggregate queries with secure noise and a budget.

Formal guarantee. Every query here is (epsilon, delta)-differentially private
with respect to one *user*: the unit of privacy is all rows that carry the same
user id, and neighbouring datasets differ by adding or removing one user
(dp_accounting's ``ADD_OR_REMOVE_ONE``). This holds for any input because each
user's influence is bounded *before* aggregation: a user keeps at most
``max_contributions_per_user`` rows (or distinct histogram bins), values are
clamped to public bounds ``[lo, hi]``, and the histogram domain ``num_bins`` is
public. Sensitivities are computed from those bounds, never assumed. Which rows
a user keeps is a keyed hash of (seed, user id, row key), so it depends on that
user's own rows only; adding or removing one user never changes what the others
contribute. Assumed: the bounds, the bin domain, epsilon and delta are chosen
without looking at the data.

Noise. ``"discrete_laplace"`` and ``"discrete_gaussian"`` are sampled *exactly*
(Canonne, Kamath & Steinke 2020, "The discrete Gaussian for differential
privacy", Algorithms 1-3) with integer and ``fractions.Fraction`` arithmetic from
a cryptographically secure source (``secrets.SystemRandom``): no floating point
touches the sampling path. They are the default. ``"laplace"`` and
``"gaussian"`` draw floats from a NumPy ``Generator``: fast, and fine for
simulation, but textbook floating-point Laplace noise is attackable because the
set of representable outputs depends on the secret (Mironov 2012, "On
significance of the least significant bits for differential privacy"); do not
release their outputs against an adversary.

Accounting. Each query returns its noisy answer and a dp_accounting
``DpEvent``. A ``PrivacyBudget`` composes events and refuses (before any noise
is drawn) a query that would exceed it.

>>> budget = PrivacyBudget(epsilon=1.0)
>>> user = np.array([0, 0, 1, 2, 2, 2])
>>> answer, event = count(user, max_contributions_per_user=2, epsilon=0.5,
...                       budget=budget, rng=0)   # rng=0: seeded, NOT secure
>>> event
DiscreteLaplaceDpEvent(noise_parameter=0.25, sensitivity=2)
>>> budget.spent_epsilon
0.5
"""

import copy
import dataclasses
import fractions
import hashlib
import math
import random
import secrets
from collections.abc import Callable, Sequence

import dp_accounting
import numpy as np

from privjax import _validate

MECHANISMS = ("laplace", "gaussian", "discrete_laplace", "discrete_gaussian")
_DISCRETE = ("discrete_laplace", "discrete_gaussian")
# Relative slack when comparing spent epsilon to the limit: guards round-off
# such as epsilon -> scale = 1/epsilon -> 1/scale, nothing more.
_BUDGET_RTOL = 1e-9
# Rational noise parameters are rounded UP to this grid (more noise, never less).
_GRID = 2**32

# =============================================================================
# Calibration
# =============================================================================


def _std_normal_cdf(x: float) -> float:
  # erfc keeps relative precision in the lower tail, where the deltas live.
  return 0.5 * math.erfc(-x / math.sqrt(2.0))


def gaussian_delta(*, sigma: float, sensitivity: float, epsilon: float) -> float:
  """The exact delta of the Gaussian mechanism at ``epsilon``.

  Balle & Wang 2018 ("Improving the Gaussian mechanism", Thm 8): N(0, sigma^2)
  noise on a query of L2 sensitivity Delta is (epsilon, delta)-DP iff
  ``delta >= Phi(Delta/(2 sigma) - epsilon sigma/Delta)
  - exp(epsilon) Phi(-Delta/(2 sigma) - epsilon sigma/Delta)``.

  >>> round(gaussian_delta(sigma=1.0, sensitivity=1.0, epsilon=1.0), 4)
  0.1269
  """
  _validate.positive("sigma", sigma)
  _validate.positive("sensitivity", sensitivity)
  _validate.non_negative("epsilon", epsilon)
  a = sensitivity / (2.0 * sigma)
  b = epsilon * sigma / sensitivity
  lower = _std_normal_cdf(-a - b)
  # exp(epsilon) * lower <= 1 always; multiply in log space so that a large
  # epsilon cannot overflow.
  second = math.exp(epsilon + math.log(lower)) if lower > 0 else 0.0
  return max(_std_normal_cdf(a - b) - second, 0.0)


def gaussian_sigma(*, sensitivity: float, epsilon: float, delta: float,
                   calibration: str = "analytic") -> float:
  """Noise std for (epsilon, delta)-DP Gaussian noise on an L2-``sensitivity`` query.

  ``"analytic"`` solves Balle & Wang's exact condition (``gaussian_delta``) by
  bisection and returns the smallest sigma found whose delta is <= ``delta``
  (relative tolerance 1e-12). ``"classic"`` is Dwork & Roth's
  ``sqrt(2 ln(1.25/delta)) Delta / epsilon``, proven only for epsilon < 1 and
  refused otherwise; it is never smaller than the analytic sigma.

  >>> analytic = gaussian_sigma(sensitivity=1.0, epsilon=0.5, delta=1e-5)
  >>> classic = gaussian_sigma(sensitivity=1.0, epsilon=0.5, delta=1e-5,
  ...                          calibration="classic")
  >>> round(analytic, 3), round(classic, 3)
  (7.032, 9.69)
  """
  _validate.positive("sensitivity", sensitivity)
  _validate.positive("epsilon", epsilon)
  _validate.one_of("calibration", calibration, {"analytic", "classic"})
  if not 0 < delta < 1:
    raise ValueError(f"delta={delta!r} must be in (0, 1) for Gaussian noise")
  if calibration == "classic":
    if epsilon >= 1:
      raise ValueError(
          f"epsilon={epsilon!r}: the classic Gaussian calibration is proven only "
          "for epsilon < 1 (Dwork & Roth 2014, Thm A.1); use 'analytic'")
    return math.sqrt(2.0 * math.log(1.25 / delta)) * sensitivity / epsilon

  def too_small(sigma):
    return gaussian_delta(sigma=sigma, sensitivity=sensitivity,
                          epsilon=epsilon) > delta

  lo = hi = sensitivity
  while too_small(hi):
    hi *= 2.0
  while not too_small(lo):
    lo /= 2.0
  while hi - lo > 1e-12 * hi:
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if too_small(mid) else (lo, mid)
  return hi


def _zcdp_epsilon(rho: float, delta: float) -> float:
  accountant = dp_accounting.rdp.RdpAccountant()
  accountant.compose(dp_accounting.ZCDpEvent(rho))
  return float(accountant.get_epsilon(delta))


def _zcdp_rho(epsilon: float, delta: float) -> float:
  # The largest rho whose RDP -> (epsilon, delta) conversion (the accountant's
  # own) stays within epsilon, so the budget sees no more than was asked for.
  lo, hi = 1e-12, epsilon
  while _zcdp_epsilon(lo, delta) > epsilon:
    lo /= 10.0
  for _ in range(100):
    mid = math.sqrt(lo * hi)
    lo, hi = (mid, hi) if _zcdp_epsilon(mid, delta) <= epsilon else (lo, mid)
    if hi - lo <= 1e-12 * hi:
      break
  return lo


def _round_up(x: float) -> fractions.Fraction:
  return fractions.Fraction(math.ceil(x * _GRID), _GRID)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Noise:
  """Calibrated noise for one query: what to draw and what it costs.

  Attributes:
    mechanism: one of ``MECHANISMS``.
    param: Laplace scale b (``"laplace"``), sigma (``"gaussian"``), the
      discrete Laplace scale t with pmf ~ exp(-|x|/t) (``"discrete_laplace"``,
      a Fraction), or sigma^2 (``"discrete_gaussian"``, a Fraction).
    event: the dp_accounting event describing this noise on this query.
    epsilon: the epsilon this noise guarantees on its own.
    delta: the delta that goes with ``epsilon``.
  """

  mechanism: str
  param: float | fractions.Fraction
  event: dp_accounting.DpEvent
  epsilon: float
  delta: float


def calibrate(mechanism: str, *, l1_sensitivity: float, l2_sensitivity: float,
              epsilon: float, delta: float = 0.0,
              calibration: str = "analytic") -> Noise:
  """Noise for an (epsilon, delta)-DP release of a query with these sensitivities.

  Laplace noise uses the L1 sensitivity, Gaussian noise the L2 one. The events
  follow dp_accounting's parametrization: ``LaplaceDpEvent(scale / L1)``,
  ``GaussianDpEvent(sigma / L2)``, ``DiscreteLaplaceDpEvent(1 / t, L1)``. The
  discrete Gaussian has no dp_accounting event; it is accounted through its
  zero-concentrated DP, ``ZCDpEvent(rho = L2^2 / (2 sigma^2))``, which the
  discrete Gaussian satisfies exactly as the continuous one does (Canonne,
  Kamath & Steinke 2020, Thm 4 and its multivariate form), and its sigma is
  chosen so that dp_accounting's RDP conversion of that rho gives ``epsilon``
  at ``delta``. Discrete mechanisms need an integer-valued query and an integer
  L1 sensitivity; their rational parameters are rounded up (more noise).

  >>> calibrate("laplace", l1_sensitivity=2.0, l2_sensitivity=2.0, epsilon=0.5)
  Noise(mechanism='laplace', param=4.0, event=LaplaceDpEvent(noise_multiplier=2.0), epsilon=0.5, delta=0.0)
  """
  _validate.one_of("mechanism", mechanism, set(MECHANISMS))
  _validate.positive("l1_sensitivity", l1_sensitivity)
  _validate.positive("l2_sensitivity", l2_sensitivity)
  _validate.positive("epsilon", epsilon)
  _validate.probability("delta", delta)
  if mechanism in ("gaussian", "discrete_gaussian") and not delta > 0:
    raise ValueError(f"delta={delta!r} must be > 0 for mechanism={mechanism!r}")
  if mechanism == "laplace":
    scale = l1_sensitivity / epsilon
    return Noise(mechanism=mechanism, param=scale,
                 event=dp_accounting.LaplaceDpEvent(scale / l1_sensitivity),
                 epsilon=l1_sensitivity / scale, delta=0.0)
  if mechanism == "gaussian":
    sigma = gaussian_sigma(sensitivity=l2_sensitivity, epsilon=epsilon,
                           delta=delta, calibration=calibration)
    return Noise(mechanism=mechanism, param=sigma,
                 event=dp_accounting.GaussianDpEvent(sigma / l2_sensitivity),
                 epsilon=epsilon, delta=delta)
  if mechanism == "discrete_laplace":
    if l1_sensitivity != int(l1_sensitivity):
      raise ValueError(f"l1_sensitivity={l1_sensitivity!r} must be an integer "
                       "for the discrete Laplace mechanism")
    scale = _round_up(l1_sensitivity / epsilon)
    event = dp_accounting.dp_event.DiscreteLaplaceDpEvent(
        noise_parameter=float(1 / scale), sensitivity=int(l1_sensitivity))
    return Noise(mechanism=mechanism, param=scale, event=event,
                 epsilon=float(int(l1_sensitivity) / scale), delta=0.0)
  sigma2 = _round_up(l2_sensitivity**2 / (2.0 * _zcdp_rho(epsilon, delta)))
  rho = l2_sensitivity**2 / (2.0 * float(sigma2))
  return Noise(mechanism=mechanism, param=sigma2,
               event=dp_accounting.ZCDpEvent(rho),
               epsilon=_zcdp_epsilon(rho, delta), delta=delta)


# =============================================================================
# Exact samplers (Canonne, Kamath & Steinke 2020)
# =============================================================================


def _bernoulli(num: int, den: int, rng: random.Random) -> bool:
  return rng.randrange(den) < num


def _bernoulli_exp(num: int, den: int, rng: random.Random) -> bool:
  """Bernoulli(exp(-num/den)) with integers only (CKS20 Algorithm 1)."""
  while num > den:  # exp(-g) = exp(-1)^floor(g) * exp(-(g - floor g))
    if not _bernoulli_exp(1, 1, rng):
      return False
    num -= den
  k = 1
  while _bernoulli(num, den * k, rng):  # P[K odd] = exp(-num/den)
    k += 1
  return k % 2 == 1


def sample_discrete_laplace(scale: fractions.Fraction | int,
                            rng: random.Random | None = None) -> int:
  """One exact draw from the discrete Laplace, P[x] ~ exp(-|x| / scale), x in Z.

  CKS20 Algorithm 2: a geometric from Bernoulli(exp(-1)) trials, no floats.
  ``rng`` defaults to ``secrets.SystemRandom()``; a seeded ``random.Random``
  gives reproducible draws for tests and is NOT secure.

  >>> isinstance(sample_discrete_laplace(fractions.Fraction(3, 2)), int)
  True
  """
  scale = fractions.Fraction(scale)
  if scale <= 0:
    raise ValueError(f"scale={scale} must be > 0")
  rng = secrets.SystemRandom() if rng is None else rng
  t, s = scale.numerator, scale.denominator  # scale = t / s
  while True:
    u = rng.randrange(t)
    if not _bernoulli_exp(u, t, rng):
      continue
    v = 0
    while _bernoulli_exp(1, 1, rng):
      v += 1
    y = (u + t * v) // s  # geometric with P[y] ~ exp(-y s / t)
    negative = rng.randrange(2) == 1
    if negative and y == 0:
      continue  # otherwise zero would be counted twice
    return -y if negative else y


def sample_discrete_gaussian(sigma2: fractions.Fraction | int,
                             rng: random.Random | None = None) -> int:
  """One exact draw from the discrete Gaussian, P[x] ~ exp(-x^2 / (2 sigma2)), x in Z.

  CKS20 Algorithm 3: rejection from a discrete Laplace of integer scale
  ``floor(sigma) + 1``, all in rational arithmetic. ``rng`` as in
  ``sample_discrete_laplace``.

  >>> isinstance(sample_discrete_gaussian(fractions.Fraction(9, 4)), int)
  True
  """
  sigma2 = fractions.Fraction(sigma2)
  if sigma2 <= 0:
    raise ValueError(f"sigma2={sigma2} must be > 0")
  rng = secrets.SystemRandom() if rng is None else rng
  n, d = sigma2.numerator, sigma2.denominator
  t = math.isqrt(n // d) + 1  # floor(sigma) + 1
  while True:
    y = sample_discrete_laplace(t, rng)
    # (|y| - sigma2/t)^2 / (2 sigma2) = (|y| d t - n)^2 / (2 n d t^2)
    if _bernoulli_exp((abs(y) * d * t - n)**2, 2 * n * d * t * t, rng):
      return y


def sample_n(sampler: Callable[..., int], param: fractions.Fraction | int,
             n: int, rng: random.Random | None = None) -> np.ndarray:
  """``n`` independent draws of ``sampler(param, rng)`` as an int64 array.

  A Python loop (tens of microseconds a draw): fine for histograms over
  thousands of bins, slow for millions.

  >>> sample_n(sample_discrete_laplace, 2, 4, random.Random(0)).shape
  (4,)
  """
  rng = secrets.SystemRandom() if rng is None else rng
  return np.array([sampler(param, rng) for _ in range(n)], dtype=np.int64)


def laplace_noise(scale: float, shape, rng: np.random.Generator) -> np.ndarray:
  """Floating-point Laplace noise: fast, NOT safe for release (Mironov 2012).

  >>> laplace_noise(2.0, (3,), np.random.default_rng(0)).shape
  (3,)
  """
  return rng.laplace(0.0, scale, shape)


def gaussian_noise(sigma: float, shape, rng: np.random.Generator) -> np.ndarray:
  """Floating-point Gaussian noise: fast, NOT safe for release (Mironov 2012).

  >>> gaussian_noise(2.0, (3,), np.random.default_rng(0)).shape
  (3,)
  """
  return rng.normal(0.0, sigma, shape)


def add_noise(noise: Noise, values, rng=None) -> np.ndarray:
  """``values`` plus independent noise per coordinate, as float64.

  ``rng``: for the discrete mechanisms a ``random.Random`` (default
  ``secrets.SystemRandom()``); for the float ones a ``np.random.Generator``
  (default: freshly seeded from the OS). An int seeds either kind, for
  reproducible tests only: seeded noise is NOT secure.

  >>> noise = calibrate("discrete_laplace", l1_sensitivity=1, l2_sensitivity=1,
  ...                   epsilon=1.0)
  >>> noisy = add_noise(noise, np.array([10, 20]))   # secure draws
  >>> noisy.dtype, bool(np.all(noisy == np.round(noisy)))
  (dtype('float64'), True)
  """
  values = np.asarray(values)
  rng = _noise_rng(noise.mechanism, rng)
  if noise.mechanism == "laplace":
    return values + laplace_noise(noise.param, values.shape, rng)
  if noise.mechanism == "gaussian":
    return values + gaussian_noise(noise.param, values.shape, rng)
  if not np.all(values == np.round(values)):
    raise ValueError(
        f"mechanism={noise.mechanism!r} needs integer-valued query answers")
  sampler = (sample_discrete_laplace if noise.mechanism == "discrete_laplace"
             else sample_discrete_gaussian)
  draws = sample_n(sampler, noise.param, values.size, rng)
  # Exact integers; float64 holds them exactly below 2**53.
  return (np.round(values).astype(np.int64) + draws.reshape(values.shape)).astype(
      np.float64)


def _noise_rng(mechanism, rng):
  if mechanism in _DISCRETE:
    if rng is None:
      return secrets.SystemRandom()
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
      return random.Random(int(rng))
    if not isinstance(rng, random.Random):
      raise TypeError(f"rng={rng!r}: mechanism={mechanism!r} needs a "
                      "random.Random (default secrets.SystemRandom())")
    return rng
  if rng is None or isinstance(rng, (int, np.integer)):
    return np.random.default_rng(rng)
  if not isinstance(rng, np.random.Generator):
    raise TypeError(f"rng={rng!r}: mechanism={mechanism!r} needs a "
                    "np.random.Generator")
  return rng


# =============================================================================
# Budget
# =============================================================================


class BudgetExceededError(RuntimeError):
  """A query would take the composed privacy loss past the budget."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpentQuery:
  """One answered query in a ``PrivacyBudget``'s ledger."""

  name: str
  event: dp_accounting.DpEvent
  epsilon: float  # the query's own guarantee (inf when only the event is known)
  delta: float


def _pure_epsilon(event: dp_accounting.DpEvent) -> float:
  """Epsilon of a pure-DP event by basic composition; inf when not pure."""
  if isinstance(event, dp_accounting.NoOpDpEvent):
    return 0.0
  if isinstance(event, dp_accounting.LaplaceDpEvent):
    return 1.0 / event.noise_multiplier if event.noise_multiplier > 0 else math.inf
  if isinstance(event, dp_accounting.dp_event.DiscreteLaplaceDpEvent):
    return event.noise_parameter * event.sensitivity
  if isinstance(event, dp_accounting.SelfComposedDpEvent):
    return event.count * _pure_epsilon(event.event)
  if isinstance(event, dp_accounting.ComposedDpEvent):
    return math.fsum(_pure_epsilon(e) for e in event.events)
  return math.inf


def _for_rdp(event: dp_accounting.DpEvent) -> dp_accounting.DpEvent:
  # The RDP accountant has no discrete Laplace; epsilon-DP implies
  # (epsilon^2 / 2)-zCDP (Bun & Steinke 2016, Prop 1.4), a valid upper bound.
  if isinstance(event, dp_accounting.dp_event.DiscreteLaplaceDpEvent):
    return dp_accounting.ZCDpEvent((event.noise_parameter * event.sensitivity)**2 / 2)
  if isinstance(event, dp_accounting.SelfComposedDpEvent):
    return dp_accounting.SelfComposedDpEvent(_for_rdp(event.event), event.count)
  if isinstance(event, dp_accounting.ComposedDpEvent):
    return dp_accounting.ComposedDpEvent([_for_rdp(e) for e in event.events])
  return event


class PrivacyBudget:
  """A privacy filter: answers queries until the loss would pass (epsilon, delta).

  The spent epsilon is the smaller of two valid bounds on the composed loss at
  this budget's ``delta``:

  * basic composition of the queries' own guarantees (sum of epsilons, valid
    when the sum of their deltas is <= ``delta``); exact for pure DP, and the
    only bound used when ``delta == 0``;
  * a dp_accounting accountant over the events (``"rdp"``: RdpAccountant,
    which takes Laplace, Gaussian and zCDP events, the discrete Laplace via
    its zCDP bound; or ``"pld"``: PLDAccountant, which takes Laplace,
    discrete Laplace and Gaussian but not zCDP, i.e. not the discrete
    Gaussian). An event the accountant cannot take makes this bound infinite
    from then on.

  ``spend`` refuses, by raising ``BudgetExceededError``, any event that would
  take the spent epsilon past ``epsilon`` (relative slack 1e-9 for round-off);
  a refused event leaves the ledger exactly as it was. Adaptivity: queries may
  depend on earlier answers (composition theorems); if the *privacy
  parameters* are chosen adaptively too, the basic-composition path is a valid
  filter (Rogers et al. 2016) and the RDP path is one at each fixed order
  (Feldman & Zrnic 2021); picking the best order afterwards is the usual
  practice and an assumption here.

  >>> budget = PrivacyBudget(epsilon=1.0)
  >>> budget.spend(dp_accounting.LaplaceDpEvent(2.0), name="q1")
  0.5
  >>> budget.spend(dp_accounting.LaplaceDpEvent(1.0), name="q2")
  Traceback (most recent call last):
  ...
  privjax.answers.aggregates.BudgetExceededError: query 'q2' would spend epsilon=1.5 > budget epsilon=1.0 (delta=0.0); refused, nothing spent
  >>> [q.name for q in budget.queries], budget.spent_epsilon
  (['q1'], 0.5)
  """

  def __init__(self, *, epsilon: float, delta: float = 0.0,
               accountant: str = "rdp"):
    self._epsilon = _validate.positive("epsilon", epsilon)
    self._delta = _validate.probability("delta", delta)
    self._kind = _validate.one_of("accountant", accountant, {"rdp", "pld"})
    self._accountant = (dp_accounting.rdp.RdpAccountant() if accountant == "rdp"
                        else dp_accounting.pld.PLDAccountant())
    self._queries: list[SpentQuery] = []
    self._accountant_epsilon = 0.0

  def __repr__(self):
    return (f"PrivacyBudget(epsilon={self._epsilon}, delta={self._delta}, "
            f"accountant={self._kind!r}, spent_epsilon={self.spent_epsilon:.6g}, "
            f"queries={len(self._queries)})")

  @property
  def epsilon(self) -> float:
    return self._epsilon

  @property
  def delta(self) -> float:
    return self._delta

  @property
  def queries(self) -> tuple[SpentQuery, ...]:
    """The answered queries, in order."""
    return tuple(self._queries)

  @property
  def ledger(self) -> dp_accounting.DpEvent:
    """All answered events as one ``ComposedDpEvent``."""
    return dp_accounting.ComposedDpEvent([q.event for q in self._queries])

  @property
  def basic_epsilon(self) -> float:
    """Sum of the queries' own epsilons (inf if their deltas exceed ``delta``)."""
    return self._basic(self._queries)

  @property
  def accountant_epsilon(self) -> float:
    """The accountant's epsilon at ``delta`` (inf when ``delta == 0``)."""
    return self._accountant_epsilon

  @property
  def spent_epsilon(self) -> float:
    return min(self.basic_epsilon, self._accountant_epsilon)

  @property
  def remaining_epsilon(self) -> float:
    return max(self._epsilon - self.spent_epsilon, 0.0)

  def _basic(self, queries) -> float:
    eps = math.fsum(q.epsilon for q in queries)
    delta = math.fsum(q.delta for q in queries)
    return eps if delta <= self._delta * (1 + _BUDGET_RTOL) else math.inf

  def _compose(self, event):
    """(accountant after ``event``, its epsilon); the ledger is not touched."""
    if self._accountant is None:
      return None, math.inf
    event = _for_rdp(event) if self._kind == "rdp" else event
    if not self._accountant.supports(event):
      return None, math.inf
    accountant = copy.deepcopy(self._accountant)
    accountant.compose(event)
    if self._delta == 0:
      return accountant, math.inf
    return accountant, float(accountant.get_epsilon(self._delta))

  def check(self, event: dp_accounting.DpEvent, *, epsilon: float | None = None,
            delta: float = 0.0, name: str = "query") -> float:
    """The spent epsilon if ``event`` were answered; raises if that exceeds the budget.

    Args:
      event: the query's event.
      epsilon: the query's own guarantee, if known (the queries in this module
        pass the one they were calibrated to); by default the pure-DP epsilon
        of ``event`` (inf for a non-pure event, which then counts through the
        accountant only).
      delta: the delta that goes with ``epsilon``.
      name: a label for the ledger and error messages.
    """
    return self._check(event, epsilon, delta, name)[0]

  def _check(self, event, epsilon, delta, name):
    if epsilon is None:
      epsilon, delta = _pure_epsilon(event), 0.0
    query = SpentQuery(name=name, event=event, epsilon=float(epsilon),
                       delta=float(delta))
    accountant, accountant_eps = self._compose(event)
    total = min(self._basic(self._queries + [query]), accountant_eps)
    if not total <= self._epsilon * (1 + _BUDGET_RTOL):
      raise BudgetExceededError(
          f"query {name!r} would spend epsilon={total:.6g} > budget "
          f"epsilon={self._epsilon} (delta={self._delta}); refused, nothing spent")
    return total, query, accountant, accountant_eps

  def spend(self, event: dp_accounting.DpEvent, *, epsilon: float | None = None,
            delta: float = 0.0, name: str = "query") -> float:
    """Adds ``event`` to the ledger and returns the new spent epsilon.

    Arguments as in ``check``. Raises ``BudgetExceededError`` (and changes
    nothing) if the event would take the spent epsilon past the budget.
    """
    total, query, accountant, accountant_eps = self._check(
        event, epsilon, delta, name)
    self._queries.append(query)
    self._accountant, self._accountant_epsilon = accountant, accountant_eps
    return total


@dataclasses.dataclass(frozen=True, kw_only=True)
class Answer:
  name: str
  value: object
  event: dp_accounting.DpEvent


class Session:
  """Runs the queries of this module against one budget and keeps the answers.

  ``run_query(query_fn, name=..., **kwargs)`` calls ``query_fn(**kwargs,
  budget=..., name=...)``; every query here spends its event on the budget
  before it draws any noise, so a refused query (``BudgetExceededError``)
  draws nothing and leaves the ledger and earlier answers untouched.

  >>> session = Session(PrivacyBudget(epsilon=1.0))
  >>> user = np.arange(10)
  >>> n = session.run_query(count, name="n", user=user,
  ...                       max_contributions_per_user=1, epsilon=0.5)
  >>> [a.name for a in session.answers], session.budget.spent_epsilon
  (['n'], 0.5)
  """

  def __init__(self, budget: PrivacyBudget):
    self.budget = budget
    self._answers: list[Answer] = []

  @property
  def answers(self) -> tuple[Answer, ...]:
    return tuple(self._answers)

  def run_query(self, query_fn: Callable, /, *, name: str, **kwargs):
    value, event = query_fn(**kwargs, budget=self.budget, name=name)
    self._answers.append(Answer(name=name, value=value, event=event))
    return value


# =============================================================================
# Contribution bounding
# =============================================================================

_U64 = np.uint64


def _mix64(x: np.ndarray) -> np.ndarray:
  # splitmix64's finalizer: a bijective, well-mixed 64-bit hash.
  x = (x + _U64(0x9E3779B97F4A7C15)) & _U64(0xFFFFFFFFFFFFFFFF)
  x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
  return x ^ (x >> _U64(31))


def _user_keys(user) -> np.ndarray:
  """A 64-bit key per row that depends on that row's user id only."""
  user = np.asarray(user)
  if user.dtype.kind in "iub":
    return user.astype(np.int64).view(_U64)
  unique, inverse = np.unique(user.astype(str), return_inverse=True)
  keys = np.array([int.from_bytes(hashlib.blake2b(u.encode(), digest_size=8).digest(),
                                  "little") for u in unique], dtype=_U64)
  return keys[inverse.reshape(-1)]


def _rank_within(groups: np.ndarray, priority: np.ndarray) -> np.ndarray:
  """Rank of each row inside its group when the group is sorted by priority."""
  if len(groups) == 0:
    return np.zeros(0, np.int64)
  order = np.lexsort((priority, groups))
  g = groups[order]
  index = np.arange(len(g))
  start = np.maximum.accumulate(np.where(np.r_[True, g[1:] != g[:-1]], index, 0))
  rank = np.empty(len(g), np.int64)
  rank[order] = index - start
  return rank


def _keep_per_user(user_keys, row_keys, max_per_user: int, seed: int) -> np.ndarray:
  """Mask keeping at most ``max_per_user`` rows per user, chosen by a keyed hash."""
  with np.errstate(over="ignore"):
    priority = _mix64(_mix64(user_keys ^ _mix64(np.full_like(user_keys, seed % 2**64)))
                      ^ row_keys.astype(_U64))
  return _rank_within(user_keys, priority) < max_per_user


def _bounded_rows(user, max_per_user: int, seed: int) -> np.ndarray:
  keys = _user_keys(user)
  # A row's key is its position among its user's rows: the user's own data.
  ordinal = _rank_within(keys, np.arange(len(keys)))
  return _keep_per_user(keys, ordinal, max_per_user, seed)


def _bounded_histogram(user, bins, num_bins: int, max_per_user: int,
                       seed: int) -> np.ndarray:
  """Distinct users per bin, each in at most ``max_per_user`` bins (NOT private)."""
  bins = np.asarray(bins)
  if bins.size and (bins.min() < 0 or bins.max() >= num_bins):
    raise ValueError(f"bins must lie in [0, num_bins={num_bins}); got "
                     f"[{bins.min()}, {bins.max()}]")
  keys = _user_keys(user)
  pairs = np.unique(np.stack([keys, bins.astype(_U64)], axis=1), axis=0)
  keep = _keep_per_user(pairs[:, 0], pairs[:, 1], max_per_user, seed)
  return np.bincount(pairs[keep, 1].astype(np.int64), minlength=num_bins)


def _bounded_row_histogram(user, bins, num_bins: int, max_per_user: int,
                           seed: int) -> np.ndarray:
  """Rows per bin, each user keeping at most ``max_per_user`` rows (NOT private)."""
  bins = np.asarray(bins)
  if bins.size and (bins.min() < 0 or bins.max() >= num_bins):
    raise ValueError(f"bins must lie in [0, num_bins={num_bins}); got "
                     f"[{bins.min()}, {bins.max()}]")
  keep = _bounded_rows(user, max_per_user, seed)
  return np.bincount(bins[keep].astype(np.int64), minlength=num_bins)


# =============================================================================
# Queries
# =============================================================================


def _prepare(mechanism, epsilon, delta, max_per_user, user, *others):
  delta = 0.0 if delta is None else delta
  _validate.probability("delta", delta)
  if mechanism is None:
    mechanism = "discrete_gaussian" if delta > 0 else "discrete_laplace"
  _validate.one_of("mechanism", mechanism, set(MECHANISMS))
  if not (isinstance(max_per_user, (int, np.integer)) and max_per_user >= 1):
    raise ValueError(f"max_contributions_per_user={max_per_user!r} must be an int >= 1")
  n = len(user)
  for name, column in others:
    if len(column) != n:
      raise ValueError(f"{name} has length {len(column)}, expected {n} (len(user))")
  return mechanism, delta


def _spend(budget, noise: Noise, name: str):
  if budget is not None:
    budget.spend(noise.event, epsilon=noise.epsilon, delta=noise.delta, name=name)


def count(user, *, max_contributions_per_user: int, epsilon: float,
          delta: float | None = None, mechanism: str | None = None,
          calibration: str = "analytic", rng=None,
          budget: PrivacyBudget | None = None, seed: int = 0,
          name: str = "count") -> tuple[float, dp_accounting.DpEvent]:
  """(epsilon, delta)-DP number of rows, each user counted at most m times.

  Sensitivity (add/remove one user): L1 = L2 = ``max_contributions_per_user``.

  Args:
    user: [N] user id of each row (ints or strings).
    max_contributions_per_user: m, the most rows kept per user (chosen by a
      keyed hash of ``seed`` and the user's own rows).
    epsilon, delta: the guarantee; ``delta=None`` means pure DP.
    mechanism: one of ``MECHANISMS``; default ``"discrete_laplace"``
      (``"discrete_gaussian"`` when ``delta > 0``), both exact and secure.
    calibration: ``"analytic"`` or ``"classic"`` sigma for ``"gaussian"``.
    rng: noise randomness, see ``add_noise``. Default: secure.
    budget: if given, the event is spent on it before any noise is drawn.
    seed: public seed of the contribution bounding.
    name: label in the budget's ledger.

  Returns:
    (noisy count, the DpEvent).

  >>> noisy, event = count(np.array([7, 7, 7, 8]), max_contributions_per_user=2,
  ...                       epsilon=1.0)   # bounded count 3, secure noise
  >>> event
  DiscreteLaplaceDpEvent(noise_parameter=0.5, sensitivity=2)
  """
  mechanism, delta = _prepare(mechanism, epsilon, delta,
                              max_contributions_per_user, user)
  m = int(max_contributions_per_user)
  noise = calibrate(mechanism, l1_sensitivity=m, l2_sensitivity=m,
                    epsilon=epsilon, delta=delta, calibration=calibration)
  _spend(budget, noise, name)
  true = int(_bounded_rows(user, m, seed).sum())
  return float(add_noise(noise, np.array([true]), rng)[0]), noise.event


def _clamped_values(values, lo, hi, mechanism):
  if not lo < hi:
    raise ValueError(f"lo={lo!r} must be < hi={hi!r}")
  values = np.clip(np.asarray(values, dtype=np.float64), lo, hi)
  if mechanism in _DISCRETE and not (
      lo == int(lo) and hi == int(hi) and np.all(values == np.round(values))):
    raise ValueError(
        f"mechanism={mechanism!r} needs integer values and bounds (lo={lo!r}, "
        f"hi={hi!r}); use mechanism='laplace' or 'gaussian' for real values")
  return values


def bounded_sum(user, values, *, lo: float, hi: float,
                max_contributions_per_user: int, epsilon: float,
                delta: float | None = None, mechanism: str | None = None,
                calibration: str = "analytic", rng=None,
                budget: PrivacyBudget | None = None, seed: int = 0,
                name: str = "sum") -> tuple[float, dp_accounting.DpEvent]:
  """(epsilon, delta)-DP sum of ``values`` clamped to the public ``[lo, hi]``.

  Each user keeps at most m rows. Sensitivity (add/remove one user): L1 = L2 =
  ``m * max(|lo|, |hi|)``. Discrete mechanisms need integer values and bounds
  (e.g. ratings 1..5). Other arguments as in ``count``.

  >>> bounded_sum(np.array([0, 0, 1]), np.array([5, 9, 2]), lo=0, hi=5,
  ...             max_contributions_per_user=2, epsilon=1.0, rng=0)[1]
  DiscreteLaplaceDpEvent(noise_parameter=0.1, sensitivity=10)
  """
  mechanism, delta = _prepare(mechanism, epsilon, delta,
                              max_contributions_per_user, user, ("values", values))
  values = _clamped_values(values, lo, hi, mechanism)
  m = int(max_contributions_per_user)
  sensitivity = m * max(abs(lo), abs(hi))
  noise = calibrate(mechanism, l1_sensitivity=sensitivity,
                    l2_sensitivity=sensitivity, epsilon=epsilon, delta=delta,
                    calibration=calibration)
  _spend(budget, noise, name)
  true = values[_bounded_rows(user, m, seed)].sum()
  return float(add_noise(noise, np.array([true]), rng)[0]), noise.event


def bounded_mean(user, values, *, lo: float, hi: float,
                 max_contributions_per_user: int, epsilon: float,
                 delta: float | None = None, mechanism: str | None = None,
                 calibration: str = "analytic", rng=None,
                 budget: PrivacyBudget | None = None, seed: int = 0,
                 name: str = "mean") -> tuple[float, dp_accounting.DpEvent]:
  """(epsilon, delta)-DP mean of ``values`` clamped to ``[lo, hi]``.

  The budget is split in halves: (epsilon/2, delta/2) for a noisy count of the
  kept rows (sensitivity m) and (epsilon/2, delta/2) for a noisy sum of the
  values centred at ``mid = (lo + hi)/2`` (sensitivity ``m (hi - lo)/2``,
  smaller than an uncentred sum's). The answer ``mid + noisy_sum /
  max(noisy_count, 1)`` clipped to ``[lo, hi]`` is post-processing. For the
  discrete mechanisms the centred sum is taken doubled, ``2 v - lo - hi``, so
  that it stays an integer. The event is the composition of the two.
  Other arguments as in ``count``.

  >>> user = np.repeat(np.arange(200), 2)
  >>> mean, event = bounded_mean(user, np.full(400, 4), lo=1, hi=5,
  ...                            max_contributions_per_user=2, epsilon=2.0,
  ...                            rng=0)   # NOT secure
  >>> 3.5 < mean < 4.5
  True
  """
  mechanism, delta = _prepare(mechanism, epsilon, delta,
                              max_contributions_per_user, user, ("values", values))
  values = _clamped_values(values, lo, hi, mechanism)
  m = int(max_contributions_per_user)
  half_eps, half_delta = epsilon / 2, delta / 2
  doubled = mechanism in _DISCRETE
  sum_sensitivity = m * (hi - lo) if doubled else m * (hi - lo) / 2
  count_noise = calibrate(mechanism, l1_sensitivity=m, l2_sensitivity=m,
                          epsilon=half_eps, delta=half_delta,
                          calibration=calibration)
  sum_noise = calibrate(mechanism, l1_sensitivity=sum_sensitivity,
                        l2_sensitivity=sum_sensitivity, epsilon=half_eps,
                        delta=half_delta, calibration=calibration)
  event = dp_accounting.ComposedDpEvent([count_noise.event, sum_noise.event])
  if budget is not None:
    budget.spend(event, epsilon=count_noise.epsilon + sum_noise.epsilon,
                 delta=count_noise.delta + sum_noise.delta, name=name)
  kept = values[_bounded_rows(user, m, seed)]
  centred = (2 * kept - lo - hi) if doubled else (kept - (lo + hi) / 2)
  rng = _noise_rng(mechanism, rng)
  noisy_count = add_noise(count_noise, np.array([kept.size]), rng)[0]
  noisy_sum = add_noise(sum_noise, np.array([centred.sum()]), rng)[0]
  noisy_sum = noisy_sum / 2 if doubled else noisy_sum
  mean = (lo + hi) / 2 + noisy_sum / max(noisy_count, 1.0)
  return float(np.clip(mean, lo, hi)), event


def histogram(user, bins, *, num_bins: int, max_contributions_per_user: int,
              epsilon: float, delta: float | None = None,
              mechanism: str | None = None, calibration: str = "analytic",
              rng=None, budget: PrivacyBudget | None = None, seed: int = 0,
              count_rows: bool = False, name: str = "histogram"
              ) -> tuple[np.ndarray, dp_accounting.DpEvent]:
  """(epsilon, delta)-DP histogram of distinct users per bin over a public domain.

  A user counts at most once per bin and in at most m =
  ``max_contributions_per_user`` distinct bins (chosen by a keyed hash of
  ``seed``, the user and the bin, so data-independently of everyone else).
  Adding or removing a user changes at most m bins by 1 each: L1 = m,
  L2 = sqrt(m). Noise goes on every one of the ``num_bins`` bins, empty ones
  included (releasing only non-empty bins would leak). Other arguments as in
  ``count``.

  ``count_rows=True`` counts rows instead of distinct users (e.g. ratings per
  star value): a user keeps at most m rows, chosen as in ``count``, wherever
  they fall. All m may land in one bin, so L1 = L2 = m.

  Returns:
    (float64 [num_bins] noisy counts, the DpEvent).

  >>> user = np.array([0, 0, 0, 0, 1])
  >>> bins = np.array([0, 1, 2, 3, 0])
  >>> histogram(user, bins, num_bins=4, max_contributions_per_user=3,
  ...           epsilon=1.0, rng=0)[1]
  DiscreteLaplaceDpEvent(noise_parameter=0.3333333333333333, sensitivity=3)
  >>> ratings = np.array([5, 5, 5, 4, 3])   # a huge epsilon shows the true counts
  >>> [histogram(user, ratings - 1, num_bins=5, max_contributions_per_user=3,
  ...            epsilon=1e9, count_rows=rows, rng=0)[0].tolist()
  ...  for rows in (False, True)]
  [[0.0, 0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0, 2.0]]
  """
  mechanism, delta = _prepare(mechanism, epsilon, delta,
                              max_contributions_per_user, user, ("bins", bins))
  if not (isinstance(num_bins, (int, np.integer)) and num_bins >= 1):
    raise ValueError(f"num_bins={num_bins!r} must be an int >= 1")
  m = int(max_contributions_per_user)
  noise = calibrate(mechanism, l1_sensitivity=m,
                    l2_sensitivity=m if count_rows else math.sqrt(m),
                    epsilon=epsilon, delta=delta, calibration=calibration)
  _spend(budget, noise, name)
  if count_rows:
    true = _bounded_row_histogram(user, bins, num_bins, m, seed)
  else:
    true = _bounded_histogram(user, bins, num_bins, m, seed)
  return add_noise(noise, true, rng), noise.event


def dp_item_popularity(user, item, *, num_items: int, max_items_per_user: int,
                       epsilon: float, delta: float | None = None,
                       mechanism: str | None = None, rng=None,
                       budget: PrivacyBudget | None = None, seed: int = 0,
                       name: str = "item_popularity"
                       ) -> tuple[np.ndarray, dp_accounting.DpEvent]:
  """(epsilon, delta)-DP number of distinct users per item: a popularity model.

  ``histogram`` over items with at most ``max_items_per_user`` items per user;
  same guarantee. Feed the result to ``recommend_popular``.

  >>> user = np.array([0, 0, 1, 1, 2])
  >>> item = np.array([3, 1, 3, 0, 3])
  >>> counts, event = dp_item_popularity(user, item, num_items=5,
  ...     max_items_per_user=2, epsilon=1.0, rng=0)   # NOT secure
  >>> counts.shape
  (5,)
  """
  return histogram(user, item, num_bins=num_items,
                   max_contributions_per_user=max_items_per_user,
                   epsilon=epsilon, delta=delta, mechanism=mechanism, rng=rng,
                   budget=budget, seed=seed, name=name)


def recommend_popular(noisy_counts, k: int, *, seen: Sequence[int] | None = None
                      ) -> np.ndarray:
  """The ``k`` items with the highest noisy counts, best first, skipping ``seen``.

  Pure post-processing of the DP counts. Removing the items a user has seen
  uses that user's own data, which is fine when the list is shown to that
  user alone (it reveals nothing about anyone else); it must not be published.
  Ties go to the lower item index.

  >>> recommend_popular(np.array([1.0, 5.0, 3.0, 5.0]), 2, seen=[1])
  array([3, 2])
  """
  noisy_counts = np.asarray(noisy_counts, dtype=np.float64)
  scores = noisy_counts.copy()
  if seen is not None and len(seen):
    scores[np.asarray(seen, dtype=np.int64)] = -np.inf
  order = np.argsort(-scores, kind="stable")
  order = order[np.isfinite(scores[order])]
  return order[:k]
