"""Calibration: the noise multiplier for a target epsilon, the steps for a budget.

Both search the accountants of ``privjax.dp.accounting`` and re-check their
answer with it, so they never under-deliver: the returned sigma (or number of
steps) always meets the target (or budget) under the stated accountant and
neighbouring relation.
"""

from collections.abc import Callable
import math
import warnings

import dp_accounting
from dp_accounting import mechanism_calibration
from dp_accounting import pld
from dp_accounting import rdp

from privjax.dp import accounting

# Default cap of max_steps(): a result equal to it means "at least this many".
STEP_LIMIT = 10**9

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



def calibrate_noise_multiplier(*, target_epsilon: float, sampling_prob: float,
                               steps: int, delta: float,
                               accountant: str = "rdp",
                               relation: str = "add_remove",
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
    relation: ``"add_remove"`` or ``"replace_one"`` (PLD only).
    dataset_size: number of units N; only used with truncation.
    truncated_batch_size: maximum units per step, or None.

  Returns:
    The noise multiplier sigma (noise std / L2 clip norm).

  >>> sigma = calibrate_noise_multiplier(target_epsilon=3.0,
  ...     sampling_prob=256 / 60000, steps=14063, delta=1e-5)
  >>> round(sigma, 3)
  1.014
  >>> accounting.dpsgd_epsilon(sampling_prob=256 / 60000, noise_multiplier=sigma,
  ...               steps=14063, delta=1e-5) <= 3.0
  True
  """
  target_epsilon = accounting.real("target_epsilon", target_epsilon)
  if not target_epsilon > 0:
    raise ValueError(f"target_epsilon={target_epsilon!r} must be > 0 (or inf)")
  sampling_prob = accounting.check_sampling_prob(sampling_prob)
  steps = accounting.integer("steps", steps, 0)
  delta = accounting.check_delta(delta)
  dataset_size, truncated_batch_size = accounting.check_truncation(
      dataset_size, truncated_batch_size)
  accountant = accounting.check_accountant(accountant, relation, truncated_batch_size)
  if steps == 0:
    raise ValueError("steps=0 must be >= 1 to calibrate: nothing is released")
  if target_epsilon == math.inf:
    return 0.0

  def make_event(sigma: float) -> dp_accounting.DpEvent:
    return accounting.dpsgd_event(sampling_prob=sampling_prob, noise_multiplier=sigma,
                       steps=steps, dataset_size=dataset_size,
                       truncated_batch_size=truncated_batch_size)

  # Brent's method re-evaluates its bracket and calibrate_dp_mechanism re-checks
  # its root; with PLD each evaluation costs ~0.5 s or more, so remember them.
  memo = {}

  def eps_of_event(event: dp_accounting.DpEvent) -> float:
    if event not in memo:
      memo[event] = accounting.epsilon(event, delta=delta, accountant=accountant,
                                       relation=relation)
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
      make_fresh_accountant=lambda: _MemoAccountant(eps_of_event, delta, relation),
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
               delta: float, relation: str):
    super().__init__(accounting.make_accountant("pld", relation).neighboring_relation)
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
  eps_rdp_up = accounting.dpsgd_epsilon(sampling_prob=sampling_prob,
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
                         delta: float, accountant: str, relation: str,
                         dataset_size: int | None,
                         truncated_batch_size: int | None
                         ) -> Callable[[int], float]:
  """T -> epsilon for T >= 1, sharing the per-step work across T.

  Same computation as the accountants do for a ``SelfComposedDpEvent`` (RDP
  adds T times the one-step RDP; PLD self-composes the one-step PLD), without
  rebuilding the one-step part for each T. Results agree with
  :func:`dpsgd_epsilon` to ~1e-11; max_steps re-checks with the latter.
  """
  one_step = accounting.one_step_event(sampling_prob, noise_multiplier, dataset_size,
                                       truncated_batch_size)
  if accountant == "rdp":
    acc = accounting.make_accountant("rdp", relation).compose(one_step)
    orders, rdp_one = acc.orders, acc.rdp
    return lambda t: float(rdp.compute_epsilon(orders, t * rdp_one, delta)[0])
  plds = pld.privacy_loss_distribution
  neighbours = accounting.make_accountant("pld", relation).neighboring_relation
  if truncated_batch_size is None:
    base = plds.from_gaussian_mechanism(
        standard_deviation=noise_multiplier, sampling_prob=sampling_prob,
        value_discretization_interval=accounting.PLD_VALUE_DISCRETIZATION_INTERVAL,
        neighboring_relation=neighbours)
  else:
    base = plds.from_truncated_subsampled_gaussian_mechanism(
        dataset_size=dataset_size, sampling_probability=sampling_prob,
        truncated_batch_size=truncated_batch_size,
        noise_multiplier=noise_multiplier,
        value_discretization_interval=accounting.PLD_VALUE_DISCRETIZATION_INTERVAL,
        neighboring_relation=neighbours)
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
      delta=delta, accountant="rdp", relation="add_remove", dataset_size=None,
      truncated_batch_size=None)
  e_g, e_up, e_pld = eps_rdp(g), eps_rdp(2 * g), eps_pld(g)
  if not 0 < e_g < e_up or not 0 < e_pld < math.inf:
    return g
  k = math.log(e_up / e_g) / math.log(2)
  return int(min(limit, g * (budget / e_pld) ** (1 / k)))


def max_steps(*, sampling_prob: float, noise_multiplier: float, delta: float,
              epsilon_budget: float, accountant: str = "rdp",
              relation: str = "add_remove",
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
    relation: ``"add_remove"`` or ``"replace_one"`` (PLD only).
    dataset_size: number of units N; only used with truncation.
    truncated_batch_size: maximum units per step, or None.
    step_limit: largest T searched, >= 1.

  Returns:
    The number of steps T >= 0.

  >>> max_steps(sampling_prob=256 / 60000, noise_multiplier=1.1, delta=1e-5,
  ...           epsilon_budget=3.0)
  18338
  """
  sampling_prob = accounting.check_sampling_prob(sampling_prob)
  noise_multiplier = accounting.check_noise_multiplier(noise_multiplier)
  delta = accounting.check_delta(delta)
  epsilon_budget = accounting.real("epsilon_budget", epsilon_budget)
  if not 0 <= epsilon_budget < math.inf:
    raise ValueError(f"epsilon_budget={epsilon_budget!r} must be finite and >= 0")
  dataset_size, truncated_batch_size = accounting.check_truncation(
      dataset_size, truncated_batch_size)
  accountant = accounting.check_accountant(accountant, relation, truncated_batch_size)
  step_limit = accounting.integer("step_limit", step_limit, 1)
  if noise_multiplier == 0:
    return 0

  eps_of_steps = _epsilon_of_steps_fn(
      sampling_prob=sampling_prob, noise_multiplier=noise_multiplier,
      delta=delta, accountant=accountant, relation=relation,
      dataset_size=dataset_size, truncated_batch_size=truncated_batch_size)

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
    return t == 0 or accounting.dpsgd_epsilon(
        sampling_prob=sampling_prob, noise_multiplier=noise_multiplier,
        steps=t, delta=delta, accountant=accountant, relation=relation,
        dataset_size=dataset_size,
        truncated_batch_size=truncated_batch_size) <= epsilon_budget

  # The shared computation may differ from dpsgd_epsilon in the last digits;
  # the guarantee is stated in terms of the latter.
  while not fits_exactly(lo):
    lo -= 1
  return lo

