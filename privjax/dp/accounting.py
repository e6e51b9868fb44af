"""Privacy accounting for DP-SGD with dp_accounting: epsilon, sigma, statement.

Formal guarantee. Let a training run take ``steps`` = T steps. At each step the
sampler includes every privacy unit (an example, or a user with all of their
examples) independently with probability ``sampling_prob`` = q (Poisson
sampling), optionally truncates the sample to at most ``truncated_batch_size``
= B units by keeping a uniformly random subset, clips each unit's gradient
contribution to L2 norm at most C, and releases the sum plus Gaussian noise of
standard deviation ``noise_multiplier`` * C (fresh noise each step). Releasing
every intermediate sum (hence every iterate) is then (epsilon, delta)-DP under
the add/remove-one-unit neighbouring relation, with epsilon as reported by
:func:`epsilon` for the event built by :func:`dpsgd_event`. Both accountants
give upper bounds on the true epsilon:

* ``"rdp"`` (default): Renyi DP with dp_accounting's default orders and the
  improved RDP-to-(epsilon, delta) conversion. Fast (~40 ms), a few percent
  loose. Cannot account for truncated Poisson sampling.
* ``"pld"``: privacy loss distributions with pessimistic discretisation,
  tighter. The discretisation interval is
  :data:`PLD_VALUE_DISCRETIZATION_INTERVAL`.

The guarantee assumes what it states: real Poisson sampling (not shuffled
fixed-size batches), sensitivity C per unit, and noise never reused.

Measured on this machine (2 CPU cores, dp-accounting 0.6.0), for
q = 256/60000, sigma = 1.1, T = 14063, delta = 1e-5: RDP gives 2.5967;
PLD gives 3.1356 / 2.4560 / 2.3906 / 2.38249 / 2.381779 / 2.381698 / 2.381691
at value_discretization_interval 1e-2 / 3e-3 / 1e-3 / 3e-4 / 1e-4 / 3e-5 / 1e-5
taking 0.03 / 0.03 / 0.06 / 0.24 / 0.52 / 2.0 / 6.0 s. The pessimistic estimate
shrinks towards the converged value as the interval shrinks; 1e-4 (also
dp_accounting's default) is within 1e-4 of it at half a second, so that is
the setting used. A truncated-Poisson PLD costs ~2-4 s to build.
"""

from collections.abc import Callable
import importlib.metadata
import json
import math
import numbers
import warnings

import dp_accounting
from dp_accounting import dp_event as dp_event_lib
from dp_accounting import mechanism_calibration
from dp_accounting import pld
from dp_accounting import rdp

from privjax import _validate

ACCOUNTANTS = ("rdp", "pld")
UNITS = ("example", "user")

# See the module docstring for the measurements behind this value.
PLD_VALUE_DISCRETIZATION_INTERVAL = 1e-4

# Default cap of max_steps(): a result equal to it means "at least this many".
STEP_LIMIT = 10**9

_NEIGHBOURS = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
# brentq tolerance on sigma, relative to the bracket. Epsilon moves by at most
# a few times the relative change of sigma, so both are far finer than the 1%
# promised on epsilon. PLD epsilon is piecewise constant on the scale of its
# discretisation, where Brent's method degrades to bisection: a finer tol there
# buys nothing but ~1 s per halving.
_RDP_SIGMA_RTOL = 1e-6
_PLD_SIGMA_RTOL = 1e-3
# See _pld_bracket.
_PLD_NUDGE = 0.001
_PLD_BRACKET_STEPS = 8
_SIGMA_MIN, _SIGMA_MAX = 1e-4, 1e6


# ---------------------------------------------------------------------------
# Argument checks. Errors name the bad value.


def _real(name: str, value) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise ValueError(f"{name}={value!r} must be a real number")
  value = float(value)
  if math.isnan(value):
    raise ValueError(f"{name}={value!r} must not be NaN")
  return value


def _integer(name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
  if value < minimum:
    raise ValueError(f"{name}={value!r} must be >= {minimum}")
  return int(value)


def _sampling_prob(value) -> float:
  value = _real("sampling_prob", value)
  if not 0 < value <= 1:
    raise ValueError(f"sampling_prob={value!r} must be in (0, 1]")
  return value


def _noise_multiplier(value) -> float:
  value = _real("noise_multiplier", value)
  if not math.isfinite(value):
    raise ValueError(f"noise_multiplier={value!r} must be finite")
  return _validate.non_negative("noise_multiplier", value)


def _delta(value) -> float:
  value = _real("delta", value)
  if not 0 < value < 1:
    raise ValueError(f"delta={value!r} must be in (0, 1)")
  return value


def _accountant(value) -> str:
  return _validate.one_of("accountant", value, ACCOUNTANTS)


def _truncation(dataset_size, truncated_batch_size
                ) -> tuple[int | None, int | None]:
  if dataset_size is not None:
    dataset_size = _integer("dataset_size", dataset_size, 1)
  if truncated_batch_size is not None:
    truncated_batch_size = _integer("truncated_batch_size", truncated_batch_size, 1)
    if dataset_size is None:
      raise ValueError(
          f"truncated_batch_size={truncated_batch_size} needs dataset_size: "
          "truncated Poisson accounting depends on the dataset size")
  return dataset_size, truncated_batch_size


def _check_supported(accountant: str, truncated_batch_size: int | None) -> None:
  # Refuse up front, before any expensive search, rather than ignore truncation.
  if accountant == "rdp" and truncated_batch_size is not None:
    raise ValueError(
        f"accountant='rdp' cannot account for truncated Poisson sampling "
        f"(truncated_batch_size={truncated_batch_size}); use accountant='pld'")


# ---------------------------------------------------------------------------
# Events and epsilon.


def dpsgd_event(*, sampling_prob: float, noise_multiplier: float, steps: int,
                dataset_size: int | None = None,
                truncated_batch_size: int | None = None
                ) -> dp_accounting.DpEvent:
  """The dp_accounting event of ``steps`` DP-SGD steps (see module docstring).

  Each step is a Poisson-subsampled Gaussian mechanism with sensitivity 1 and
  noise ``noise_multiplier``; with ``truncated_batch_size`` (which needs
  ``dataset_size``) each Poisson sample is truncated to at most that many units
  (``TruncatedSubsampledGaussianDpEvent``, PLD accountant only). ``steps == 0``
  gives ``NoOpDpEvent`` (nothing released, epsilon 0); otherwise
  ``noise_multiplier == 0`` gives ``NonPrivateDpEvent`` (epsilon = inf).

  Args:
    sampling_prob: probability q in (0, 1] that a unit is in a step's sample.
    noise_multiplier: noise std divided by the L2 clip norm, >= 0.
    steps: number of steps T >= 0.
    dataset_size: number of units N; only used with truncation.
    truncated_batch_size: maximum units per step B, or None for no truncation.

  Returns:
    The composed ``DpEvent``.

  >>> event = dpsgd_event(sampling_prob=0.01, noise_multiplier=1.0, steps=100)
  >>> type(event).__name__, event.count, event.event.sampling_probability
  ('SelfComposedDpEvent', 100, 0.01)
  """
  sampling_prob = _sampling_prob(sampling_prob)
  noise_multiplier = _noise_multiplier(noise_multiplier)
  steps = _integer("steps", steps, 0)
  dataset_size, truncated_batch_size = _truncation(dataset_size,
                                                   truncated_batch_size)
  if steps == 0:
    return dp_accounting.NoOpDpEvent()
  if noise_multiplier == 0:
    return dp_accounting.NonPrivateDpEvent()
  return dp_accounting.SelfComposedDpEvent(
      _one_step_event(sampling_prob, noise_multiplier, dataset_size,
                      truncated_batch_size), steps)


def _one_step_event(sampling_prob: float, noise_multiplier: float,
                    dataset_size: int | None,
                    truncated_batch_size: int | None) -> dp_accounting.DpEvent:
  if truncated_batch_size is None:
    return dp_accounting.PoissonSampledDpEvent(
        sampling_prob, dp_accounting.GaussianDpEvent(noise_multiplier))
  return dp_accounting.TruncatedSubsampledGaussianDpEvent(
      dataset_size=dataset_size, sampling_probability=sampling_prob,
      truncated_batch_size=truncated_batch_size,
      noise_multiplier=noise_multiplier)


def _make_accountant(accountant: str) -> dp_accounting.PrivacyAccountant:
  if accountant == "rdp":
    return rdp.RdpAccountant(neighboring_relation=_NEIGHBOURS)
  return pld.PLDAccountant(
      neighboring_relation=_NEIGHBOURS,
      value_discretization_interval=PLD_VALUE_DISCRETIZATION_INTERVAL)


def _contains(event, event_type) -> bool:
  if isinstance(event, event_type):
    return True
  if isinstance(event, dp_accounting.ComposedDpEvent):
    return any(_contains(e, event_type) for e in event.events)
  inner = getattr(event, "event", None)
  return isinstance(inner, dp_accounting.DpEvent) and _contains(inner, event_type)


def epsilon(event: dp_accounting.DpEvent, *, delta: float,
            accountant: str = "rdp") -> float:
  """Epsilon such that ``event`` is (epsilon, delta)-DP (add/remove one unit).

  The result is an upper bound on the true epsilon (see module docstring);
  ``math.inf`` for a non-private event.

  Args:
    event: a ``dp_accounting.DpEvent``, e.g. from :func:`dpsgd_event`.
    delta: target delta in (0, 1).
    accountant: ``"rdp"`` or ``"pld"``.

  Returns:
    Epsilon as a Python float.

  Raises:
    ValueError: bad arguments, or an event the accountant cannot handle.

  >>> event = dpsgd_event(sampling_prob=256 / 60000, noise_multiplier=1.1,
  ...                     steps=14063)
  >>> round(epsilon(event, delta=1e-5), 3)
  2.597
  """
  delta = _delta(delta)
  accountant = _accountant(accountant)
  if not isinstance(event, dp_accounting.DpEvent):
    raise ValueError(f"event={event!r} must be a dp_accounting.DpEvent")
  acc = _make_accountant(accountant)
  if not acc.supports(event):
    if _contains(event, dp_accounting.TruncatedSubsampledGaussianDpEvent):
      raise ValueError(
          f"accountant={accountant!r} cannot account for truncated Poisson "
          "sampling (TruncatedSubsampledGaussianDpEvent); use accountant='pld'")
    raise ValueError(
        f"accountant={accountant!r} cannot account for event={event!r}")
  return float(acc.compose(event).get_epsilon(delta))


def dpsgd_epsilon(*, sampling_prob: float, noise_multiplier: float, steps: int,
                  delta: float, accountant: str = "rdp",
                  dataset_size: int | None = None,
                  truncated_batch_size: int | None = None) -> float:
  """Epsilon of ``steps`` DP-SGD steps: :func:`epsilon` of :func:`dpsgd_event`.

  The guarantee is the one in the module docstring; 0.0 for ``steps == 0``,
  ``math.inf`` for ``noise_multiplier == 0``.

  >>> round(dpsgd_epsilon(sampling_prob=256 / 60000, noise_multiplier=1.1,
  ...                     steps=14063, delta=1e-5, accountant="pld"), 3)
  2.382
  """
  accountant = _accountant(accountant)
  dataset_size, truncated_batch_size = _truncation(dataset_size,
                                                   truncated_batch_size)
  _check_supported(accountant, truncated_batch_size)
  event = dpsgd_event(sampling_prob=sampling_prob,
                      noise_multiplier=noise_multiplier, steps=steps,
                      dataset_size=dataset_size,
                      truncated_batch_size=truncated_batch_size)
  return epsilon(event, delta=delta, accountant=accountant)


# ---------------------------------------------------------------------------
# Calibration and budgets.


def calibrate_noise_multiplier(*, target_epsilon: float, sampling_prob: float,
                               steps: int, delta: float,
                               accountant: str = "rdp",
                               dataset_size: int | None = None,
                               truncated_batch_size: int | None = None) -> float:
  """The smallest noise multiplier whose DP-SGD epsilon is <= ``target_epsilon``.

  Uses ``dp_accounting.mechanism_calibration`` (Brent's method) in a bracket
  found here, then re-checks with :func:`dpsgd_epsilon` and raises sigma if
  needed, so the result never spends more than the target:
  ``dpsgd_epsilon(result) <= target_epsilon``. It is also tight: the result
  is within 1e-6 (RDP) or 1e-3 (PLD) relative of the exact solution, so its
  epsilon is within ~0.3% of the target (a warning is issued in the unlikely
  case it is below 99% of it, e.g. a target close to the PLD discretisation).
  Cost here: RDP ~0.3-1 s; PLD ~6 PLD evaluations, ~1-5 s for DP-SGD-like
  settings, ~10-15 s for a few steps at sigma ~0.5.

  ``target_epsilon == inf`` returns 0.0: no noise, a non-private run.

  Args:
    target_epsilon: epsilon budget, > 0 (or inf).
    sampling_prob: Poisson sampling probability q in (0, 1].
    steps: number of steps T >= 1.
    delta: target delta in (0, 1).
    accountant: ``"rdp"`` or ``"pld"`` (with truncation, only ``"pld"``).
    dataset_size: number of units N; only used with truncation.
    truncated_batch_size: maximum units per step, or None.

  Returns:
    The noise multiplier sigma (noise std / L2 clip norm).

  >>> sigma = calibrate_noise_multiplier(target_epsilon=3.0,
  ...     sampling_prob=256 / 60000, steps=14063, delta=1e-5)
  >>> round(sigma, 3)
  1.014
  >>> dpsgd_epsilon(sampling_prob=256 / 60000, noise_multiplier=sigma,
  ...               steps=14063, delta=1e-5) <= 3.0
  True
  """
  target_epsilon = _real("target_epsilon", target_epsilon)
  if not target_epsilon > 0:
    raise ValueError(f"target_epsilon={target_epsilon!r} must be > 0 (or inf)")
  sampling_prob = _sampling_prob(sampling_prob)
  steps = _integer("steps", steps, 0)
  delta = _delta(delta)
  accountant = _accountant(accountant)
  dataset_size, truncated_batch_size = _truncation(dataset_size,
                                                   truncated_batch_size)
  _check_supported(accountant, truncated_batch_size)
  if steps == 0:
    raise ValueError("steps=0 must be >= 1 to calibrate: nothing is released")
  if target_epsilon == math.inf:
    return 0.0

  def make_event(sigma: float) -> dp_accounting.DpEvent:
    return dpsgd_event(sampling_prob=sampling_prob, noise_multiplier=sigma,
                       steps=steps, dataset_size=dataset_size,
                       truncated_batch_size=truncated_batch_size)

  # Brent's method re-evaluates its bracket and calibrate_dp_mechanism re-checks
  # its root; with PLD each evaluation costs ~0.5 s or more, so remember them.
  memo = {}

  def eps_of_event(event: dp_accounting.DpEvent) -> float:
    if event not in memo:
      memo[event] = epsilon(event, delta=delta, accountant=accountant)
    return memo[event]

  def eps_of(sigma: float) -> float:
    return eps_of_event(make_event(sigma))

  if accountant == "pld":
    lo, hi = _pld_bracket(eps_of, target_epsilon, sampling_prob, steps, delta)
    tol = _PLD_SIGMA_RTOL * lo
  else:
    lo, hi = _bracket(eps_of, target_epsilon, 1.0, 2.0, accountant)
    tol = _RDP_SIGMA_RTOL * lo
  sigma = mechanism_calibration.calibrate_dp_mechanism(
      make_fresh_accountant=lambda: _MemoAccountant(eps_of_event, delta),
      make_event_from_param=make_event,
      target_epsilon=target_epsilon, target_delta=delta,
      bracket_interval=mechanism_calibration.ExplicitBracketInterval(lo, hi),
      tol=tol)
  # Never under-deliver privacy, whatever the calibration returned; hi is
  # known to be within budget, so this ends.
  eps = eps_of(sigma)
  while eps > target_epsilon:
    sigma = min(sigma + tol, hi)
    tol *= 2
    eps = eps_of(sigma)
  if eps < 0.99 * target_epsilon:
    warnings.warn(
        f"calibrated noise_multiplier={sigma} gives epsilon={eps}, below 99% "
        f"of target_epsilon={target_epsilon} (accountant={accountant!r})")
  return float(sigma)


class _MemoAccountant(dp_accounting.PrivacyAccountant):
  """An accountant for one event at one delta, whose epsilon is looked up.

  Lets ``calibrate_dp_mechanism`` share :func:`calibrate_noise_multiplier`'s
  memo of already computed epsilons (same accountant, same delta).
  """

  def __init__(self, epsilon_fn: Callable[[dp_accounting.DpEvent], float],
               delta: float):
    super().__init__(_NEIGHBOURS)
    self._epsilon_fn = epsilon_fn
    self._delta = delta
    self._event = None

  def _maybe_compose(self, event, count, do_compose):
    if self._event is not None or count != 1:
      return self.CompositionErrorDetails(event, "composes one event, once")
    if do_compose:
      self._event = event
    return None

  def get_epsilon(self, target_delta: float) -> float:
    if target_delta != self._delta:
      raise ValueError(f"target_delta={target_delta} must be {self._delta}")
    return self._epsilon_fn(self._event)


def _pld_bracket(eps_of: Callable[[float], float], target: float,
                 sampling_prob: float, steps: int, delta: float
                 ) -> tuple[float, float]:
  """(lo, hi) with eps_pld(lo) > target >= eps_pld(hi), usually hi/lo < 1.004.

  A PLD evaluation costs ~0.3-5 s (more as sigma shrinks), so the search
  starts from the cheap RDP answer g (a little too large: RDP is looser) and
  takes secant steps in log-log space, where eps(sigma) is nearly a straight
  line (eps ~ sigma**-k). Each estimate is nudged just past the root so that
  the next point closes a tight bracket. Usually 3 PLD evaluations.
  """
  g = calibrate_noise_multiplier(target_epsilon=target,
                                 sampling_prob=sampling_prob, steps=steps,
                                 delta=delta)
  eps_rdp_up = dpsgd_epsilon(sampling_prob=sampling_prob,
                             noise_multiplier=1.01 * g, steps=steps,
                             delta=delta)
  # Slope of log eps in log sigma, measured on RDP at g; -1 if degenerate.
  slope = (math.log(eps_rdp_up / target) / math.log(1.01)
           if 0 < eps_rdp_up < target else -1.0)
  above, below = [], []  # sigmas with eps > target, and eps <= target.
  s = g
  for _ in range(_PLD_BRACKET_STEPS):
    e = eps_of(s)
    (above if e > target else below).append(s)
    if above and below:
      lo, hi = max(above), min(below)
      if hi / lo <= 1 + 4 * _PLD_NUDGE:
        return lo, hi
      e_lo, e_hi = eps_of(lo), eps_of(hi)  # Memoised.
      if 0 < e_hi < e_lo < math.inf:
        slope = math.log(e_hi / e_lo) / math.log(hi / lo)
      s_root = s * (target / e) ** (1 / slope)
      # Land just past the root, on the side of the farther bound.
      nudge = 1 + _PLD_NUDGE if s_root / lo < hi / s_root else 1 - _PLD_NUDGE
      s = min(max(s_root * nudge, lo * (1 + _PLD_NUDGE)), hi / (1 + _PLD_NUDGE))
    else:
      s_root = s * (target / e) ** (1 / slope) if 0 < e < math.inf else s / 2
      s = min(max(s_root * (1 - _PLD_NUDGE if below else 1 + _PLD_NUDGE),
                  s / 4), s * 4)
  if above and below:
    return max(above), min(below)
  return _bracket(eps_of, target, s, 2.0, "pld")


def _bracket(eps_of: Callable[[float], float], target: float, guess: float,
             factor: float, accountant: str) -> tuple[float, float]:
  """Returns (lo, hi) with eps_of(lo) > target >= eps_of(hi), 0 < lo < hi.

  Steps geometrically away from guess, squaring the step factor each time, so
  a good guess costs two evaluations and a poor one only a few more.
  """
  lo = hi = guess
  if eps_of(guess) <= target:
    while True:
      hi, lo, factor = lo, max(lo / factor, _SIGMA_MIN), factor**2
      if eps_of(lo) > target:
        return lo, hi
      if lo == _SIGMA_MIN:
        raise ValueError(
            f"target_epsilon={target} is met by any noise_multiplier >= "
            f"{_SIGMA_MIN}; check sampling_prob and steps")
  while True:
    lo, hi, factor = hi, min(hi * factor, _SIGMA_MAX), factor**2
    if eps_of(hi) <= target:
      return lo, hi
    if hi == _SIGMA_MAX:
      raise ValueError(
          f"target_epsilon={target} cannot be met with noise_multiplier <= "
          f"{_SIGMA_MAX} (accountant={accountant!r})")


def _epsilon_of_steps_fn(*, sampling_prob: float, noise_multiplier: float,
                         delta: float, accountant: str,
                         dataset_size: int | None,
                         truncated_batch_size: int | None
                         ) -> Callable[[int], float]:
  """T -> epsilon for T >= 1, sharing the per-step work across T.

  Same computation as the accountants do for a ``SelfComposedDpEvent`` (RDP
  adds T times the one-step RDP; PLD self-composes the one-step PLD), without
  rebuilding the one-step part for each T. Results agree with
  :func:`dpsgd_epsilon` to ~1e-11; max_steps re-checks with the latter.
  """
  one_step = _one_step_event(sampling_prob, noise_multiplier, dataset_size,
                             truncated_batch_size)
  if accountant == "rdp":
    acc = _make_accountant("rdp").compose(one_step)
    orders, rdp_one = acc.orders, acc.rdp
    return lambda t: float(rdp.compute_epsilon(orders, t * rdp_one, delta)[0])
  plds = pld.privacy_loss_distribution
  if truncated_batch_size is None:
    base = plds.from_gaussian_mechanism(
        standard_deviation=noise_multiplier, sampling_prob=sampling_prob,
        value_discretization_interval=PLD_VALUE_DISCRETIZATION_INTERVAL,
        neighboring_relation=_NEIGHBOURS)
  else:
    base = plds.from_truncated_subsampled_gaussian_mechanism(
        dataset_size=dataset_size, sampling_probability=sampling_prob,
        truncated_batch_size=truncated_batch_size,
        noise_multiplier=noise_multiplier,
        value_discretization_interval=PLD_VALUE_DISCRETIZATION_INTERVAL,
        neighboring_relation=_NEIGHBOURS)
  return lambda t: float(base.self_compose(t).get_epsilon_for_delta(delta))


def _bracket_steps(eps: Callable[[int], float], budget: float, guess: int,
                   factor: float, limit: int) -> tuple[int, int]:
  """(lo, hi) with eps(lo) <= budget < eps(hi), or (limit, limit) if it fits.

  Steps geometrically away from guess, squaring the step factor each time.
  """
  lo = hi = min(max(guess, 1), limit)
  if eps(hi) <= budget:
    while True:
      if hi == limit:
        return limit, limit
      lo, hi = hi, min(limit, max(hi + 1, math.ceil(hi * factor)))
      factor = factor**2
      if eps(hi) > budget:
        return lo, hi
  while True:
    hi, lo = lo, min(lo - 1, math.floor(lo / factor))
    factor = factor**2
    if eps(lo) <= budget:  # eps(0) == 0, so this ends.
      return lo, hi


def _pld_steps_guess(eps_pld: Callable[[int], float], budget: float,
                     sampling_prob: float, noise_multiplier: float,
                     delta: float, limit: int) -> int:
  """A guess of the PLD max_steps within ~1%, from one PLD evaluation.

  RDP is looser, so its (cheap) answer g is a little small; locally
  eps ~ T**k, with k measured on RDP, so eps_pld(g) says how far up to go.
  """
  g = max_steps(sampling_prob=sampling_prob, noise_multiplier=noise_multiplier,
                delta=delta, epsilon_budget=budget, step_limit=limit)
  if g < 16:
    return max(g, 1)
  eps_rdp = _epsilon_of_steps_fn(
      sampling_prob=sampling_prob, noise_multiplier=noise_multiplier,
      delta=delta, accountant="rdp", dataset_size=None,
      truncated_batch_size=None)
  e_g, e_up, e_pld = eps_rdp(g), eps_rdp(2 * g), eps_pld(g)
  if not 0 < e_g < e_up or not 0 < e_pld < math.inf:
    return g
  k = math.log(e_up / e_g) / math.log(2)
  return int(min(limit, g * (budget / e_pld) ** (1 / k)))


def max_steps(*, sampling_prob: float, noise_multiplier: float, delta: float,
              epsilon_budget: float, accountant: str = "rdp",
              dataset_size: int | None = None,
              truncated_batch_size: int | None = None,
              step_limit: int = STEP_LIMIT) -> int:
  """The largest T with ``dpsgd_epsilon(steps=T) <= epsilon_budget``.

  Epsilon is non-decreasing in T (composition only adds loss), so an
  exponential search then an interpolation search (with bisection steps that
  keep it O(log T)) finds T. Evaluations share the one-step computation (RDP:
  well under a millisecond each; PLD: ~0.2 s each plus one build, started
  near the answer from the RDP result). The returned T is re-checked with
  :func:`dpsgd_epsilon`, so ``dpsgd_epsilon(steps=T) <= epsilon_budget``
  always holds.

  ``noise_multiplier == 0`` returns 0: a non-private step has epsilon = inf, so
  no step fits any finite budget (0 steps release nothing). A result equal to
  ``step_limit`` means "at least ``step_limit``".

  Args:
    sampling_prob: Poisson sampling probability q in (0, 1].
    noise_multiplier: sigma >= 0.
    delta: target delta in (0, 1).
    epsilon_budget: finite epsilon budget >= 0.
    accountant: ``"rdp"`` or ``"pld"`` (with truncation, only ``"pld"``).
    dataset_size: number of units N; only used with truncation.
    truncated_batch_size: maximum units per step, or None.
    step_limit: largest T searched, >= 1.

  Returns:
    The number of steps T >= 0.

  >>> max_steps(sampling_prob=256 / 60000, noise_multiplier=1.1, delta=1e-5,
  ...           epsilon_budget=3.0)
  18338
  """
  sampling_prob = _sampling_prob(sampling_prob)
  noise_multiplier = _noise_multiplier(noise_multiplier)
  delta = _delta(delta)
  epsilon_budget = _real("epsilon_budget", epsilon_budget)
  if not 0 <= epsilon_budget < math.inf:
    raise ValueError(f"epsilon_budget={epsilon_budget!r} must be finite and >= 0")
  accountant = _accountant(accountant)
  dataset_size, truncated_batch_size = _truncation(dataset_size,
                                                   truncated_batch_size)
  _check_supported(accountant, truncated_batch_size)
  step_limit = _integer("step_limit", step_limit, 1)
  if noise_multiplier == 0:
    return 0

  eps_of_steps = _epsilon_of_steps_fn(
      sampling_prob=sampling_prob, noise_multiplier=noise_multiplier,
      delta=delta, accountant=accountant, dataset_size=dataset_size,
      truncated_batch_size=truncated_batch_size)

  memo = {0: 0.0}

  def eps(t: int) -> float:
    if t not in memo:
      memo[t] = eps_of_steps(t)
    return memo[t]

  guess, factor = 1, 2.0
  if accountant == "pld":
    guess = _pld_steps_guess(eps, epsilon_budget, sampling_prob,
                             noise_multiplier, delta, step_limit)
    factor = 1.01
  lo, hi = _bracket_steps(eps, epsilon_budget, guess, factor, step_limit)
  if lo == step_limit:
    hi = lo + 1
  # eps(T) is smooth in T: interpolate, probing the neighbour so that an exact
  # hit ends the search; a bisection step whenever the interval did not halve
  # keeps the worst case logarithmic.
  bisect = False
  while hi - lo > 1:
    width = hi - lo
    if bisect:
      mid = (lo + hi) // 2
    else:
      e_lo, e_hi = eps(lo), eps(hi)
      mid = lo + int((epsilon_budget - e_lo) / (e_hi - e_lo) * width)
      mid = min(max(mid, lo + 1), hi - 1)
    if eps(mid) <= epsilon_budget:
      lo = mid
      if mid + 1 < hi:
        if eps(mid + 1) <= epsilon_budget:
          lo = mid + 1
        else:
          hi = mid + 1
    else:
      hi = mid
      if mid - 1 > lo:
        if eps(mid - 1) > epsilon_budget:
          hi = mid - 1
        else:
          lo = mid - 1
    bisect = not bisect and hi - lo > width // 2

  def fits_exactly(t: int) -> bool:
    return t == 0 or dpsgd_epsilon(
        sampling_prob=sampling_prob, noise_multiplier=noise_multiplier,
        steps=t, delta=delta, accountant=accountant, dataset_size=dataset_size,
        truncated_batch_size=truncated_batch_size) <= epsilon_budget

  # The shared computation may differ from dpsgd_epsilon in the last digits;
  # the guarantee is stated in terms of the latter.
  while not fits_exactly(lo):
    lo -= 1
  return lo


# ---------------------------------------------------------------------------
# Serialisation and the privacy statement.


def _jsonable(value):
  if hasattr(value, "_asdict"):  # A DpEvent as a NamedTuple.
    return {k: _jsonable(v) for k, v in value._asdict().items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, bool) or value is None or isinstance(value, str):
    return value
  if isinstance(value, numbers.Integral):
    return int(value)
  if isinstance(value, numbers.Real):
    return float(value)
  raise ValueError(f"value={value!r} in a DpEvent is not JSON-serialisable")


def event_to_dict(event: dp_accounting.DpEvent) -> dict:
  """A JSON-serialisable dict of ``event`` (dp_accounting's NamedTuple form).

  Every event becomes ``{"module_name", "class_name", **fields}``; nested
  events become nested dicts, lists stay lists.

  >>> event_to_dict(dpsgd_event(sampling_prob=0.5, noise_multiplier=2.0,
  ...                           steps=3))["event"]["class_name"]
  'PoissonSampledDpEvent'
  """
  if not isinstance(event, dp_accounting.DpEvent):
    raise ValueError(f"event={event!r} must be a dp_accounting.DpEvent")
  return _jsonable(event.to_named_tuple())


def event_from_dict(d: dict) -> dp_accounting.DpEvent:
  """Inverse of :func:`event_to_dict` (also after a JSON round trip).

  Only classes of ``dp_accounting.dp_event`` are built: a file never chooses
  which module gets imported.

  >>> event = dpsgd_event(sampling_prob=0.5, noise_multiplier=2.0, steps=3)
  >>> event_from_dict(event_to_dict(event)) == event
  True
  """
  if not isinstance(d, dict) or "class_name" not in d:
    raise ValueError(f"d={d!r} must be a dict from event_to_dict")
  module_name = d.get("module_name")
  if module_name != dp_event_lib.__name__:
    raise ValueError(
        f"module_name={module_name!r} must be {dp_event_lib.__name__!r}")
  cls = getattr(dp_event_lib, d["class_name"], None)
  if not (isinstance(cls, type) and issubclass(cls, dp_accounting.DpEvent)):
    raise ValueError(
        f"class_name={d['class_name']!r} is not a dp_accounting DpEvent")

  def build(value):
    if isinstance(value, dict):
      return event_from_dict(value)
    if isinstance(value, list):
      return [build(v) for v in value]
    return value

  fields = {k: build(v) for k, v in d.items()
            if k not in ("module_name", "class_name")}
  return cls(**fields)


def _json_epsilon(eps: float | None) -> float | str | None:
  # JSON has no infinity: privacy.json says "inf" (a non-private run).
  return "inf" if eps == math.inf else eps


def privacy_statement(*, unit: str, sampling_prob: float,
                      noise_multiplier: float, l2_clip_norm: float, steps: int,
                      delta: float, accountant: str = "rdp",
                      dataset_size: int | None = None,
                      truncated_batch_size: int | None = None,
                      extra: dict | None = None) -> dict:
  """Everything ``privacy.json`` states about a DP-SGD run, JSON-serialisable.

  Guarantee: with the assumptions of the module docstring, the run is
  (``epsilon``, ``delta``)-DP where neighbouring datasets differ by adding or
  removing one ``unit``: one example, or (``unit="user"``) one user together
  with all of their examples. For ``unit="user"`` the sampler must sample users
  (``sampling_prob`` is per user, ``dataset_size`` counts users) and
  ``l2_clip_norm`` bounds each user's whole gradient contribution.

  ``epsilon`` is under ``accountant``; ``epsilon_rdp`` and ``epsilon_pld``
  report both (``epsilon_rdp`` is None with truncation, which RDP cannot
  handle). An infinite epsilon (``noise_multiplier == 0``: not private) is the
  string ``"inf"``, since JSON has no infinity. ``extra`` entries are added at
  the top level and may not overwrite the statement's own keys.

  >>> s = privacy_statement(unit="example", sampling_prob=256 / 60000,
  ...     noise_multiplier=1.1, l2_clip_norm=1.0, steps=14063, delta=1e-5)
  >>> s["private"], round(s["epsilon"], 3), round(s["epsilon_pld"], 3)
  (True, 2.597, 2.382)
  """
  unit = _validate.one_of("unit", unit, UNITS)
  l2_clip_norm = _real("l2_clip_norm", l2_clip_norm)
  if not 0 < l2_clip_norm < math.inf:
    raise ValueError(f"l2_clip_norm={l2_clip_norm!r} must be finite and > 0")
  accountant = _accountant(accountant)
  dataset_size, truncated_batch_size = _truncation(dataset_size,
                                                   truncated_batch_size)
  _check_supported(accountant, truncated_batch_size)
  event = dpsgd_event(sampling_prob=sampling_prob,
                      noise_multiplier=noise_multiplier, steps=steps,
                      dataset_size=dataset_size,
                      truncated_batch_size=truncated_batch_size)
  delta = _delta(delta)
  truncated = truncated_batch_size is not None
  eps_rdp = None if truncated else epsilon(event, delta=delta, accountant="rdp")
  eps_pld = epsilon(event, delta=delta, accountant="pld")
  eps = eps_rdp if accountant == "rdp" else eps_pld
  private = eps != math.inf
  relation_text = {
      "example": ("Datasets are neighbours if one is the other with a single "
                  "example added or removed."),
      "user": ("Datasets are neighbours if one is the other with a single "
               "user added or removed, together with all of that user's "
               "examples."),
  }[unit]
  sampling = "truncated_poisson" if truncated else "poisson"
  if private:
    summary = (f"({eps:.4g}, {delta:g})-DP for add/remove one {unit} "
               f"({accountant.upper()} accountant, {sampling} sampling "
               f"q={sampling_prob:g}, noise_multiplier={noise_multiplier:g}, "
               f"steps={steps}).")
  else:
    summary = ("NOT PRIVATE: noise_multiplier=0, so no (epsilon, delta)-DP "
               "guarantee holds (epsilon = inf).")
  notes = []
  if truncated:
    notes.append("epsilon_rdp is null: RDP cannot account for truncated "
                 "Poisson sampling.")
  if dataset_size is not None and delta >= 1 / dataset_size:
    notes.append(f"delta={delta:g} >= 1/dataset_size: a mechanism releasing "
                 "one random unit in the clear meets this delta.")
  statement = {
      "private": private,
      "summary": summary,
      "unit": unit,
      "neighbouring_relation": f"add_or_remove_one_{unit}",
      "neighbouring_relation_description": relation_text,
      "accountant": accountant,
      "epsilon": _json_epsilon(eps),
      "delta": delta,
      "epsilon_rdp": _json_epsilon(eps_rdp),
      "epsilon_pld": _json_epsilon(eps_pld),
      "noise_multiplier": float(noise_multiplier),
      "l2_clip_norm": l2_clip_norm,
      "sampling": sampling,
      "sampling_prob": float(sampling_prob),
      "steps": int(steps),
      "dataset_size": dataset_size,
      "truncated_batch_size": truncated_batch_size,
      "pld_value_discretization_interval": PLD_VALUE_DISCRETIZATION_INTERVAL,
      "dp_event": event_to_dict(event),
      "dp_accounting_version": importlib.metadata.version("dp-accounting"),
      "notes": notes,
  }
  for key, value in (extra or {}).items():
    if key in statement:
      raise ValueError(f"extra key {key!r} would overwrite the statement's own")
    statement[key] = value
  try:
    json.dumps(statement, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise ValueError(f"extra={extra!r} is not JSON-serialisable: {e}") from e
  return statement
