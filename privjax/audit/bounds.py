"""Many-run audits: an epsilon lower bound, a Gaussian-DP estimate, MIA metrics.

An audit runs a mechanism many times on two neighbouring inputs D and D' (for
example: a training step without and with a canary user) and records one score
per run; ``null`` are the scores on D, ``alt`` those on D'. A threshold test
"say D' when the score is above t" has a false-positive rate FPR (on D) and a
false-negative rate FNR (on D'). (epsilon, delta)-DP forces, for EVERY test,

    FPR + e^eps FNR >= 1 - delta   and   FNR + e^eps FPR >= 1 - delta,

so Clopper-Pearson upper bounds on FPR and FNR turn one test into a lower
bound on epsilon (Jagielski, Ullman & Oprea 2020; Nasr et al. 2021):

    eps >= max(log((1 - delta - FPR_up) / FNR_up), log((1 - delta - FNR_up) / FPR_up)).

``distinguishing_bound`` reports two such bounds. The *held-out* one chooses
the test on a share of the runs (30%) and evaluates it on the rest: it is a
valid lower bound at confidence 1 - beta. The *optimistic* one chooses and
evaluates on the same runs: it is what an auditor who peeks would report, and
it is NOT a valid bound (the choice over many tests inflates it).

The same tests estimate Gaussian DP (Dong, Roth & Su 2019): a mu-GDP mechanism
has FNR >= Phi(Phi^{-1}(1 - FPR) - mu) for every test, so
mu >= Phi^{-1}(1 - FPR) - Phi^{-1}(FNR).

>>> rng = np.random.default_rng(0)
>>> b = distinguishing_bound(rng.normal(0, 1, 4000), rng.normal(3, 1, 4000),
...                          delta=1e-5, seed=0)
>>> 0 < b.epsilon_lower < gaussian_epsilon(3.0, 1e-5)
True
"""

import dataclasses
import math

import numpy as np

from privjax.answers import mechanisms
from privjax.audit import stats


@dataclasses.dataclass(frozen=True, kw_only=True)
class Test:
  """A threshold test: ``direction=+1`` says D' when score > threshold,
  ``-1`` when score < threshold."""
  threshold: float
  direction: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class TestResult:
  """One test evaluated on scores.

  Attributes:
    test: the threshold test.
    false_positives, false_negatives: counts on D (null) and D' (alt).
    num_null, num_alt: the number of scores on each side.
    fpr_upper, fnr_upper: Clopper-Pearson upper bounds, each at beta / 2.
    epsilon: the epsilon lower bound these bounds give (>= 0).
    mu_lower: the GDP lower bound they give (may be negative: no evidence).
  """
  test: Test
  false_positives: int
  false_negatives: int
  num_null: int
  num_alt: int
  fpr_upper: float
  fnr_upper: float
  epsilon: float
  mu_lower: float

  @property
  def fpr(self) -> float:
    return self.false_positives / self.num_null

  @property
  def fnr(self) -> float:
    return self.false_negatives / self.num_alt

  @property
  def mu(self) -> float:
    """The point estimate Phi^{-1}(1 - FPR) - Phi^{-1}(FNR) (inf at 0 counts)."""
    return stats.normal_ppf(1 - self.fpr) - stats.normal_ppf(self.fnr)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistinguishingBound:
  """What a many-run audit of two neighbouring inputs shows.

  Guarantee: ``epsilon_lower`` is a lower bound on the epsilon of the audited
  mechanism at ``delta``, at confidence ``confidence``: if the mechanism is
  (eps, delta)-DP then P[epsilon_lower > eps] <= 1 - confidence, over the
  randomness of the runs and of the split. It assumes the runs are
  independent. ``mu_lower`` is likewise a lower bound on mu for a mechanism
  that is mu-GDP. ``epsilon_optimistic`` (test chosen on the same runs) and
  ``epsilon_gdp`` (eps of mu-GDP at the point estimate of mu: exact only if
  the scores' trade-off curve is Gaussian) are estimates, not bounds.

  Attributes:
    epsilon_lower: the held-out bound (valid).
    epsilon_optimistic: the bound with the test chosen on all runs.
    held_out: the held-out test and its counts on the evaluation half.
    optimistic: the optimistic test and its counts on all runs.
    mu, mu_lower: GDP estimate and lower bound (held-out, from the test
      chosen for mu); epsilon_gdp: eps at delta of mu-GDP with that mu.
    delta, confidence, num_null, num_alt: the audit's parameters.
  """
  epsilon_lower: float
  epsilon_optimistic: float
  held_out: TestResult
  optimistic: TestResult
  mu: float
  mu_lower: float
  epsilon_gdp: float
  delta: float
  confidence: float
  num_null: int
  num_alt: int

  def to_dict(self) -> dict:
    out = dataclasses.asdict(self)
    for key in ("held_out", "optimistic"):
      result = getattr(self, key)
      out[key].update(fpr=result.fpr, fnr=result.fnr)
    return _finite(out)


def _finite(value):
  """JSON-safe: non-finite floats as strings."""
  if isinstance(value, dict):
    return {k: _finite(v) for k, v in value.items()}
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


def epsilon_from_rates(fpr_upper, fnr_upper, delta: float) -> np.ndarray:
  """max(log((1 - delta - FPR_up) / FNR_up), log((1 - delta - FNR_up) / FPR_up), 0).

  >>> round(float(epsilon_from_rates(0.01, 0.5, 0.0)), 4)   # log(0.5 / 0.01)
  3.912
  """
  fpr_upper = np.asarray(fpr_upper, np.float64)
  fnr_upper = np.asarray(fnr_upper, np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    a = np.log(np.maximum(1 - delta - fpr_upper, 0) / fnr_upper)
    b = np.log(np.maximum(1 - delta - fnr_upper, 0) / fpr_upper)
  out = np.maximum(np.maximum(np.nan_to_num(a, nan=0.0, neginf=0.0),
                              np.nan_to_num(b, nan=0.0, neginf=0.0)), 0.0)
  return out


def _mu_from_rates(fpr_upper, fnr_upper) -> np.ndarray:
  ppf = np.vectorize(stats.normal_ppf, otypes=[np.float64])
  return ppf(1 - np.asarray(fpr_upper)) - ppf(np.asarray(fnr_upper))


def _counts(null_sorted, alt_sorted, thresholds, directions):
  """False positives and negatives of many tests, by binary search."""
  above_null = len(null_sorted) - np.searchsorted(null_sorted, thresholds, "right")
  above_alt = len(alt_sorted) - np.searchsorted(alt_sorted, thresholds, "right")
  below_null = np.searchsorted(null_sorted, thresholds, "left")
  below_alt = np.searchsorted(alt_sorted, thresholds, "left")
  up = directions > 0
  fp = np.where(up, above_null, below_null)
  fn = np.where(up, len(alt_sorted) - above_alt, len(alt_sorted) - below_alt)
  return fp, fn


def _rank_grid(n: int) -> np.ndarray:
  """0..31 then geometric to n: where the useful thresholds of a tail lie."""
  geometric = np.unique(np.round(np.geomspace(32, max(n, 33), 48)).astype(np.int64))
  return np.unique(np.concatenate([np.arange(min(32, n)), geometric]))
  

def _candidates(null_sorted, alt_sorted) -> tuple[np.ndarray, np.ndarray]:
  """Thresholds at order statistics of both tails of both samples, both ways."""
  ts = []
  for s in (null_sorted, alt_sorted):
    ranks = _rank_grid(len(s))
    ranks = ranks[ranks < len(s)]
    ts += [s[ranks], s[len(s) - 1 - ranks]]
  t = np.unique(np.concatenate(ts))
  return np.concatenate([t, t]), np.concatenate([np.ones(len(t)), -np.ones(len(t))])


def _evaluate(null_sorted, alt_sorted, thresholds, directions, delta, beta):
  fp, fn = _counts(null_sorted, alt_sorted, thresholds, directions)
  fpr_up = stats.clopper_pearson_upper(fp, len(null_sorted), beta / 2)
  fnr_up = stats.clopper_pearson_upper(fn, len(alt_sorted), beta / 2)
  return fp, fn, fpr_up, fnr_up, epsilon_from_rates(fpr_up, fnr_up, delta), \
      _mu_from_rates(fpr_up, fnr_up)


def _result(null_sorted, alt_sorted, test: Test, delta, beta) -> TestResult:
  fp, fn, fpr_up, fnr_up, eps, mu = _evaluate(
      null_sorted, alt_sorted, np.array([test.threshold]),
      np.array([test.direction]), delta, beta)
  return TestResult(test=test, false_positives=int(fp[0]), false_negatives=int(fn[0]),
                    num_null=len(null_sorted), num_alt=len(alt_sorted),
                    fpr_upper=float(fpr_up[0]), fnr_upper=float(fnr_up[0]),
                    epsilon=float(eps[0]), mu_lower=float(mu[0]))


def _choose(null_sorted, alt_sorted, delta, beta, eval_sizes, pseudo=1) -> tuple[Test, Test]:
  """The tests with the largest predicted epsilon and mu bounds on the evaluation set.

  Each candidate's counts on the selection set, plus ``pseudo`` (one, against
  the winner's curse of a lucky empty tail), are scaled to the size of the
  evaluation set and bounded there: the choice aims at the bound it will be
  judged by. Any rule is valid here; only the evaluation set is bounded.
  """
  thresholds, directions = _candidates(null_sorted, alt_sorted)
  fp, fn = _counts(null_sorted, alt_sorted, thresholds, directions)
  n_null, n_alt = eval_sizes
  fp = np.minimum(np.round((fp + pseudo) * n_null / len(null_sorted)), n_null)
  fn = np.minimum(np.round((fn + pseudo) * n_alt / len(alt_sorted)), n_alt)
  fpr_up = stats.clopper_pearson_upper(fp, n_null, beta / 2)
  fnr_up = stats.clopper_pearson_upper(fn, n_alt, beta / 2)
  eps = epsilon_from_rates(fpr_up, fnr_up, delta)
  mu = _mu_from_rates(fpr_up, fnr_up)
  i, j = int(np.argmax(eps)), int(np.argmax(mu))
  return (Test(threshold=float(thresholds[i]), direction=int(directions[i])),
          Test(threshold=float(thresholds[j]), direction=int(directions[j])))


def _scores(name: str, values) -> np.ndarray:
  values = np.asarray(values, np.float64).ravel()
  if values.size < 2 or not np.isfinite(values).all():
    raise ValueError(f"{name} needs >= 2 finite scores, got {values.size} "
                     f"({np.sum(~np.isfinite(values))} non-finite)")
  return values


def distinguishing_bound(null, alt, *, delta: float, confidence: float = 0.95,
                         seed: int = 0, selection_fraction: float = 0.3
                         ) -> DistinguishingBound:
  """Epsilon lower bound (held-out and optimistic) and GDP estimate from scores.

  Args:
    null: scores of runs on D (any shape; flattened).
    alt: scores of runs on D' (a neighbour of D).
    delta: the delta of the (eps, delta) claim being audited.
    confidence: 1 - beta; the held-out bound holds with this probability.
    seed: the random split of the runs into a selection and an evaluation set.
    selection_fraction: the share of each side's runs that chooses the tests
      (0.3 measured best for Gaussian scores at 20k-160k runs a side).

  Returns:
    A ``DistinguishingBound`` (see its Guarantee).

  Edge cases: identical score distributions give bounds near 0; perfectly
  separated scores give a bound limited by the number of runs
  (about log(n / log(2 / beta))); constant scores give 0.
  """
  null, alt = _scores("null", null), _scores("alt", alt)
  if not 0 < confidence < 1:
    raise ValueError(f"confidence={confidence!r} must be in (0, 1)")
  if not 0 <= delta < 1:
    raise ValueError(f"delta={delta!r} must be in [0, 1)")
  if not 0 < selection_fraction < 1:
    raise ValueError(f"selection_fraction={selection_fraction!r} must be in (0, 1)")
  beta = 1 - confidence
  rng = np.random.default_rng(seed)
  null_p, alt_p = rng.permutation(null), rng.permutation(alt)
  k_null = min(max(1, round(len(null) * selection_fraction)), len(null) - 1)
  k_alt = min(max(1, round(len(alt) * selection_fraction)), len(alt) - 1)
  select = (np.sort(null_p[:k_null]), np.sort(alt_p[:k_alt]))
  evaluate = (np.sort(null_p[k_null:]), np.sort(alt_p[k_alt:]))
  eps_test, mu_test = _choose(*select, delta, beta, (len(evaluate[0]), len(evaluate[1])))
  held_out = _result(*evaluate, eps_test, delta, beta)
  mu_result = _result(*evaluate, mu_test, delta, beta)
  everything = (np.sort(null), np.sort(alt))
  optimistic = _result(*everything, _choose(*everything, delta, beta,
                                            (len(null), len(alt)), pseudo=0)[0],
                       delta, beta)
  mu = mu_result.mu
  return DistinguishingBound(
      epsilon_lower=held_out.epsilon, epsilon_optimistic=optimistic.epsilon,
      held_out=held_out, optimistic=optimistic, mu=mu, mu_lower=mu_result.mu_lower,
      epsilon_gdp=gaussian_epsilon(abs(mu), delta) if delta > 0 else math.inf,
      delta=delta, confidence=confidence, num_null=len(null), num_alt=len(alt))


def gaussian_epsilon(mu: float, delta: float) -> float:
  """The exact epsilon at ``delta`` of mu-GDP (the Gaussian mechanism with
  sensitivity / sigma = mu; Balle & Wang 2018), by bisection.

  >>> round(gaussian_epsilon(1.0, 1e-5), 3)   # sigma = 1, one step at q = 1
  4.377
  """
  if not 0 < delta < 1:
    raise ValueError(f"delta={delta!r} must be in (0, 1)")
  if math.isnan(mu) or mu <= 0:
    return 0.0
  if math.isinf(mu):
    return math.inf
  fails = lambda eps: mechanisms.gaussian_delta(sigma=1 / mu, sensitivity=1.0,
                                                epsilon=eps) > delta
  if not fails(0.0):
    return 0.0
  lo, hi = 0.0, 1.0
  while fails(hi):
    lo, hi = hi, 2 * hi
  for _ in range(100):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if fails(mid) else (lo, mid)
  return hi


# ----------------------------------------------------------------------------
# Membership inference metrics (members should score higher).


def roc_auc(members, nonmembers) -> float:
  """Area under the ROC curve, ties counted one half (Mann-Whitney U).

  >>> roc_auc([3.0, 2.0], [1.0, 2.0])
  0.875
  """
  pos, neg = _scores("members", members), _scores("nonmembers", nonmembers)
  both = np.concatenate([pos, neg])
  values, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
  ends = np.cumsum(counts)
  average_rank = ends - (counts - 1) / 2.0          # 1-based mean rank of each value
  rank_sum = average_rank[inverse[:len(pos)]].sum()
  return float((rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def tpr_at_fpr(members, nonmembers, fpr: float) -> float:
  """The largest TPR of "member if score > t" over t with FPR(t) <= ``fpr``.

  No interpolation between thresholds: with n non-members the smallest
  non-zero FPR is 1 / n, and a target below it is met only at FPR = 0.

  >>> tpr_at_fpr([5.0, 4.0, 1.0], [0.0, 2.0, 3.0, 4.5], 0.25)
  0.6666666666666666
  """
  pos, neg = _scores("members", members), _scores("nonmembers", nonmembers)
  if not 0 <= fpr <= 1:
    raise ValueError(f"fpr={fpr!r} must be in [0, 1]")
  allowed = int(math.floor(fpr * len(neg) + 1e-9))
  if allowed >= len(neg):
    return 1.0
  threshold = np.sort(neg)[::-1][allowed]   # at most `allowed` non-members above it
  return float(np.mean(pos > threshold))


def membership_metrics(members, nonmembers) -> dict:
  """AUC, TPR at 1% and 0.1% FPR, and the sample sizes."""
  return {"auc": roc_auc(members, nonmembers),
          "tpr@1%fpr": tpr_at_fpr(members, nonmembers, 0.01),
          "tpr@0.1%fpr": tpr_at_fpr(members, nonmembers, 0.001),
          "num_members": int(np.size(members)),
          "num_nonmembers": int(np.size(nonmembers))}
