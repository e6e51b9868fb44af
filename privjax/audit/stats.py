"""Exact small-sample statistics for audits, in float64, without scipy.

``beta_ppf`` (quantiles of the Beta distribution) gives Clopper-Pearson
bounds on a binomial proportion; ``binomial_log_tail`` gives exact binomial
tail probabilities for the one-run bound; ``normal_cdf`` / ``normal_ppf`` wrap
the standard library. Everything is vectorised over numpy arrays where a caller
needs it (many thresholds at once).

>>> round(float(clopper_pearson_upper(0, 100, 0.05)), 6)   # 1 - 0.05 ** (1 / 100)
0.029513
>>> round(float(beta_ppf(0.5, 2.0, 2.0)), 12)
0.5
"""

import math
import statistics

import numpy as np

_TINY = 1e-300
_EPS = 1e-15
_MAX_ITER = 20_000
_lgamma = np.vectorize(math.lgamma, otypes=[np.float64])
_STD_NORMAL = statistics.NormalDist()


def _log_beta(a, b):
  return _lgamma(a) + _lgamma(b) - _lgamma(a + b)


def _continued_fraction(a, b, x):
  """Lentz's evaluation of the continued fraction of I_x(a, b) (converges
  fast for x < (a + 1) / (a + b + 2); callers use the symmetry otherwise)."""
  qab, qap, qam = a + b, a + 1.0, a - 1.0
  guard = lambda v: np.where(np.abs(v) < _TINY, _TINY, v)
  c = np.ones_like(x)
  d = 1.0 / guard(1.0 - qab * x / qap)
  h = d.copy()
  done = np.zeros(x.shape, bool)
  for m in range(1, _MAX_ITER + 1):
    m2 = 2.0 * m
    aa = m * (b - m) * x / ((qam + m2) * (a + m2))
    d = 1.0 / guard(1.0 + aa * d)
    c = guard(1.0 + aa / c)
    h = np.where(done, h, h * d * c)
    aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
    d = 1.0 / guard(1.0 + aa * d)
    c = guard(1.0 + aa / c)
    step = d * c
    h = np.where(done, h, h * step)
    done |= np.abs(step - 1.0) < _EPS
    if done.all():
      return h
  raise RuntimeError(f"incomplete beta did not converge for a={a}, b={b}, x={x}")


def _betainc_pair(a, b, x) -> tuple[np.ndarray, np.ndarray]:
  """(I_x(a, b), 1 - I_x(a, b)), each without cancellation."""
  a, b, x = np.broadcast_arrays(*(np.asarray(v, np.float64) for v in (a, b, x)))
  if (a <= 0).any() or (b <= 0).any():
    raise ValueError(f"betainc needs a > 0 and b > 0, got a={a}, b={b}")
  if ((x < 0) | (x > 1)).any():
    raise ValueError(f"betainc needs x in [0, 1], got {x}")
  low, high = np.where(x >= 1, 1.0, 0.0), np.where(x >= 1, 0.0, 1.0)
  inner = (x > 0) & (x < 1)
  if not inner.any():
    return low, high
  a_, b_, x_ = a[inner], b[inner], x[inner]
  flip = x_ > (a_ + 1.0) / (a_ + b_ + 2.0)
  aa, bb, xx = np.where(flip, b_, a_), np.where(flip, a_, b_), np.where(flip, 1 - x_, x_)
  log_front = aa * np.log(xx) + bb * np.log1p(-xx) - _log_beta(aa, bb)
  value = np.clip(np.exp(log_front) * _continued_fraction(aa, bb, xx) / aa, 0.0, 1.0)
  low[inner] = np.where(flip, 1.0 - value, value)
  high[inner] = np.where(flip, value, 1.0 - value)
  return low, high


def betainc(a, b, x) -> np.ndarray:
  """The regularised incomplete beta function I_x(a, b), a, b > 0, x in [0, 1].

  >>> round(float(betainc(2.0, 3.0, 0.4)), 10)   # 1 - 3 (0.6)^4 + ... = 0.5248
  0.5248
  """
  return _betainc_pair(a, b, x)[0]


def _solve(target, a, b, upper: bool) -> np.ndarray:
  """x with I_x(a, b) = target (upper=False) or 1 - I_x(a, b) = target (True).

  Safeguarded Newton on the log of the tail (bracketed, falling back to
  bisection, geometric while the bracket spans decades), each element until
  its tail matches the target to 1e-11 (relative) or x reaches float64's
  resolution. Solving on the requested tail keeps tiny tail probabilities exact.
  """
  target, a, b = np.broadcast_arrays(*(np.asarray(v, np.float64) for v in (target, a, b)))
  if ((target < 0) | (target > 1)).any():
    raise ValueError(f"probabilities must be in [0, 1], got {target}")
  shape = target.shape
  t, a, b = target.ravel(), a.ravel(), b.ravel()
  edge_one = (t <= 0) if upper else (t >= 1)
  out = np.where(edge_one, 1.0, 0.0)
  active = np.flatnonzero((t > 0) & (t < 1))
  lo, hi = np.zeros(len(active)), np.ones(len(active))
  ta, aa, ba = t[active], a[active], b[active]
  x = np.clip(aa / (aa + ba), 1e-300, 1 - 1e-16)
  log_b = _log_beta(aa, ba)
  sign = -1.0 if upper else 1.0           # the solved function grows (ppf) or falls
  for _ in range(400):
    if not len(active):
      break
    value = _betainc_pair(aa, ba, x)[1 if upper else 0]
    f = value - ta
    below = sign * f < 0                  # the root lies above x
    lo, hi = np.where(below, x, lo), np.where(below, hi, x)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
      # Newton on log(value): fast on exponentially thin tails too.
      log_pdf = (aa - 1) * np.log(x) + (ba - 1) * np.log1p(-x) - log_b
      newton = x - sign * (np.log(value) - np.log(ta)) * np.exp(np.log(value) - log_pdf)
    wide = (lo <= 0) | (hi > 1e3 * lo)
    bisect = np.where(wide, np.where(lo > 0, np.sqrt(lo * hi), hi * 1e-4), 0.5 * (lo + hi))
    inside = np.isfinite(newton) & (newton > lo) & (newton < hi)
    new = np.where(inside, newton, bisect)
    with np.errstate(divide="ignore", invalid="ignore"):
      hit = np.abs(np.log(value) - np.log(ta)) <= 1e-11   # the tail matches: x is it
    # At float64's resolution in x, the bracket end on the conservative side
    # of a confidence bound: the upper end for an upper tail, else the lower.
    stuck = (hi - lo <= 1e-15 * np.maximum(hi, 1e-300)) | (np.abs(new - x) <= 4e-16 * x)
    result = np.where(hit, x, hi if upper else lo)
    done = hit | stuck
    out[active[done]] = result[done]
    keep = ~done
    active, lo, hi, x = active[keep], lo[keep], hi[keep], new[keep]
    ta, aa, ba, log_b = ta[keep], aa[keep], ba[keep], log_b[keep]
  if len(active):
    raise RuntimeError(f"beta quantile did not converge for {ta}, a={aa}, b={ba}")
  return out.reshape(shape)


def _quantile(lower_tail, a, b) -> np.ndarray:
  """x with I_x(a, b) = lower_tail, solved on whichever tail is the smaller."""
  lower_tail, a, b = np.broadcast_arrays(
      *(np.asarray(v, np.float64) for v in (lower_tail, a, b)))
  small = lower_tail <= 0.5
  out = np.empty(lower_tail.shape)
  out[small] = _solve(lower_tail[small], a[small], b[small], upper=False)
  out[~small] = _solve(1.0 - lower_tail[~small], a[~small], b[~small], upper=True)
  return out


def beta_ppf(p, a, b) -> np.ndarray:
  """The p-quantile of Beta(a, b): the x with I_x(a, b) = p (``scipy.stats.beta.ppf``).

  Args:
    p: probabilities in [0, 1].
    a, b: shape parameters > 0 (broadcast with ``p``).

  Returns:
    float64 quantiles, the shape of the broadcast inputs.
  """
  return _quantile(p, a, b)


def beta_isf(q, a, b) -> np.ndarray:
  """The x with P[Beta(a, b) > x] = q (``scipy.stats.beta.isf``), exact for tiny q."""
  q, a, b = np.broadcast_arrays(*(np.asarray(v, np.float64) for v in (q, a, b)))
  small = q <= 0.5
  out = np.empty(q.shape)
  out[small] = _solve(q[small], a[small], b[small], upper=True)
  out[~small] = _solve(1.0 - q[~small], a[~small], b[~small], upper=False)
  return out


def clopper_pearson_upper(k, n, beta: float) -> np.ndarray:
  """One-sided upper confidence bound on a binomial proportion.

  Guarantee: for k ~ Binomial(n, p), P[p <= upper(k)] >= 1 - beta, for every
  p (exact, not asymptotic: Clopper & Pearson 1934).

  Args:
    k: observed successes (array), 0 <= k <= n.
    n: trials >= 1.
    beta: allowed failure probability in (0, 1).

  Returns:
    The (1 - beta)-quantile of Beta(k + 1, n - k), 1 where k = n.
  """
  k = np.asarray(k, np.float64)
  if not 0 < beta < 1:
    raise ValueError(f"beta={beta!r} must be in (0, 1)")
  if n < 1 or ((k < 0) | (k > n)).any():
    raise ValueError(f"need 0 <= k <= n with n >= 1, got k={k}, n={n}")
  full = k >= n
  safe = np.where(full, n - 1.0, k)
  return np.where(full, 1.0, beta_isf(beta, safe + 1.0, n - safe))


def clopper_pearson_lower(k, n, beta: float) -> np.ndarray:
  """One-sided lower confidence bound: P[p >= lower(k)] >= 1 - beta.

  The beta-quantile of Beta(k, n - k + 1), 0 where k = 0 (computed directly,
  not as 1 - upper, which would lose the relative precision of small bounds).
  """
  k = np.asarray(k, np.float64)
  if not 0 < beta < 1:
    raise ValueError(f"beta={beta!r} must be in (0, 1)")
  if n < 1 or ((k < 0) | (k > n)).any():
    raise ValueError(f"need 0 <= k <= n with n >= 1, got k={k}, n={n}")
  safe = np.maximum(k, 1.0)
  return np.where(k <= 0, 0.0, beta_ppf(beta, safe, n - safe + 1.0))


def binomial_log_tail(n: int, p: float) -> np.ndarray:
  """log P[Binomial(n, p) >= j] for j = 0 .. n + 1 (the last is -inf).

  Exact up to float64 rounding: log binomial coefficients are cumulative sums
  of log((n - i + 1) / i), and the tail is a log-sum-exp from the right.

  >>> np.round(np.exp(binomial_log_tail(2, 0.5)), 6).tolist()
  [1.0, 0.75, 0.25, 0.0]
  """
  if n < 0 or not 0 <= p <= 1:
    raise ValueError(f"need n >= 0 and p in [0, 1], got n={n}, p={p}")
  j = np.arange(n + 1, dtype=np.float64)
  log_choose = np.concatenate([[0.0], np.cumsum(np.log((n - j[1:] + 1) / j[1:]))])
  if p == 0:
    log_pmf = np.where(j == 0, 0.0, -np.inf)
  elif p == 1:
    log_pmf = np.where(j == n, 0.0, -np.inf)
  else:
    log_pmf = log_choose + j * math.log(p) + (n - j) * math.log1p(-p)
  tail = np.logaddexp.accumulate(log_pmf[::-1])[::-1]
  return np.minimum(np.append(tail, -np.inf), 0.0)


def normal_cdf(x: float) -> float:
  return _STD_NORMAL.cdf(x)


def normal_ppf(p: float) -> float:
  """Phi^{-1}(p); +-inf at 0 and 1."""
  if p <= 0:
    return -math.inf
  if p >= 1:
    return math.inf
  return _STD_NORMAL.inv_cdf(p)
