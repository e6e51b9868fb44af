"""Noise for released statistics: calibration and exact discrete samplers.

``calibrate`` turns a query's L1 / L2 sensitivity and a target (epsilon,
delta) into a ``Noise`` (what to draw, and its dp_accounting event);
``add_noise`` draws it.

``"discrete_laplace"`` and ``"discrete_gaussian"`` are sampled *exactly*
(Canonne, Kamath & Steinke 2020, "The discrete Gaussian for differential
privacy", Algorithms 1-3) with integer and ``fractions.Fraction`` arithmetic from
a cryptographically secure source (``secrets.SystemRandom``, or a run secret's
keyed stream): no floating point touches the sampling path. They are the
default. ``"laplace"`` and ``"gaussian"`` draw floats from a NumPy
``Generator``: fast, and fine for simulation, but textbook floating-point
Laplace noise is attackable because the set of representable outputs depends
on the secret (Mironov 2012, "On significance of the least significant bits
for differential privacy"); do not release their outputs against an adversary.

>>> noise = calibrate("discrete_laplace", l1_sensitivity=1, l2_sensitivity=1, epsilon=0.5)
>>> noise.event, noise.epsilon
(DiscreteLaplaceDpEvent(noise_parameter=0.5, sensitivity=1), 0.5)
"""

import dataclasses
import fractions
import math
import random
import secrets
from collections.abc import Callable

import dp_accounting
import numpy as np

from privjax import _validate

MECHANISMS = ("laplace", "gaussian", "discrete_laplace", "discrete_gaussian")
DISCRETE = ("discrete_laplace", "discrete_gaussian")
# Rational noise parameters are rounded UP to this grid (more noise, never less).
_GRID = 2**32


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


# Exact samplers (Canonne, Kamath & Steinke 2020).


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
  rng = noise_rng(noise.mechanism, rng)
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


def noise_rng(mechanism, rng):
  """The generator a mechanism draws from: secure by default, seeded if asked."""
  if mechanism in DISCRETE:
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
