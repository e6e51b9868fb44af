"""The one-run audit of Steinke, Nasr & Jagielski (NeurIPS 2023).

One training run with m canaries, each included independently with
probability 1/2. The auditor ranks the canaries by a score (e.g. the trained
model's likelihood of the canary) and guesses "included" for the k+ highest
and "excluded" for the k- lowest, abstaining on the rest: r = k+ + k- guesses,
v of them correct. If the run is (eps, delta)-DP for one canary, the number of
correct guesses is stochastically dominated, up to a delta term, by
Binomial(r, e^eps / (1 + e^eps)) (their Theorem 3):

    P[V >= v] <= f(v) + 2 m delta max_{1 <= i <= v} (f(v - i) - f(v)) / i,
    f(u) = P[Binomial(r, e^eps / (1 + e^eps)) >= u].

The right side is a p-value for the claim "(eps, delta)-DP"; it grows with
eps, so the largest eps it rejects at level beta is a lower bound on the true
epsilon at confidence 1 - beta. Random guessing gets v ~ r / 2 and a bound of
about 0; r correct guesses out of r get a bound that grows like log(r).

>>> round(epsilon_lower_bound(num_canaries=1000, num_guesses=500, num_correct=500,
...                           delta=0.0), 2)
5.11
>>> epsilon_lower_bound(num_canaries=1000, num_guesses=100, num_correct=50, delta=1e-5)
0.0
"""

import dataclasses
import math

import numpy as np

from privjax.audit import stats


def p_value(*, num_canaries: int, num_guesses: int, num_correct: int,
            epsilon: float, delta: float) -> float:
  """Upper bound on P[V >= num_correct] for an (epsilon, delta)-DP run.

  Args:
    num_canaries: m, canaries each included with probability 1/2.
    num_guesses: r <= m, guesses made (the rest abstain).
    num_correct: v <= r, correct guesses.
    epsilon, delta: the claim being tested.

  Returns:
    The bound of Theorem 3 (capped at 1): small values reject the claim.
  """
  m, r, v = _check(num_canaries, num_guesses, num_correct)
  p = 1.0 / (1.0 + math.exp(-epsilon))          # e^eps / (1 + e^eps), stably
  tail = np.exp(stats.binomial_log_tail(r, p))   # tail[u] = P[W >= u], u = 0..r+1
  f_v = tail[v]
  if delta == 0 or v == 0:
    return float(min(f_v, 1.0))
  # For i >= v, f(v - i) = 1 and (1 - f(v)) / i decreases: i <= v suffices.
  i = np.arange(1, v + 1)
  gain = np.max((tail[v - i] - f_v) / i)
  return float(min(f_v + 2 * m * delta * gain, 1.0))


def _check(m, r, v):
  for name, value in (("num_canaries", m), ("num_guesses", r), ("num_correct", v)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
      raise ValueError(f"{name}={value!r} must be an integer >= 0")
  if not v <= r <= m:
    raise ValueError(f"need num_correct={v} <= num_guesses={r} <= num_canaries={m}")
  return int(m), int(r), int(v)


def epsilon_lower_bound(*, num_canaries: int, num_guesses: int, num_correct: int,
                        delta: float, confidence: float = 0.95) -> float:
  """The largest epsilon that ``p_value`` rejects at level 1 - ``confidence``.

  Guarantee: if the run is (eps, delta)-DP with respect to each canary (add
  or remove it), the returned bound exceeds eps with probability at most
  1 - ``confidence``, over the canaries' inclusion and the run (Steinke, Nasr
  & Jagielski 2023, Thm 3), provided the guesses were fixed by a rule chosen
  before looking at which canaries were included. Several (k+, k-) rules
  need a union bound: ``best_guesses`` does it.

  Returns:
    A bound >= 0 (0 when even eps = 0 is not rejected), to 1e-6.
  """
  _check(num_canaries, num_guesses, num_correct)
  if not 0 < confidence < 1:
    raise ValueError(f"confidence={confidence!r} must be in (0, 1)")
  if not 0 <= delta < 1:
    raise ValueError(f"delta={delta!r} must be in [0, 1)")
  beta = 1 - confidence
  rejects = lambda eps: p_value(num_canaries=num_canaries, num_guesses=num_guesses,
                                num_correct=num_correct, epsilon=eps,
                                delta=delta) <= beta
  if num_guesses == 0 or not rejects(0.0):
    return 0.0
  lo, hi = 0.0, 1.0
  while rejects(hi):
    lo, hi = hi, 2 * hi
    if hi > 1e3:
      return math.inf
  while hi - lo > 1e-6:
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if rejects(mid) else (lo, mid)
  return lo


@dataclasses.dataclass(frozen=True, kw_only=True)
class OneRunResult:
  """A one-run audit.

  Attributes:
    epsilon_lower: the bound (see ``epsilon_lower_bound``), Bonferroni-corrected
      over the rules tried.
    num_canaries, num_positive, num_negative, num_correct: m, k+, k- and v of
      the best rule.
    delta, confidence: of the claim and of the bound.
    rules_tried: how many (k+, k-) rules the correction covers.
  """
  epsilon_lower: float
  num_canaries: int
  num_positive: int
  num_negative: int
  num_correct: int
  delta: float
  confidence: float
  rules_tried: int


def guess_counts(scores, included, num_positive: int, num_negative: int) -> int:
  """Correct guesses when the k+ highest scores guess "in", the k- lowest "out"."""
  scores, included = np.asarray(scores, np.float64), np.asarray(included, bool)
  if scores.shape != included.shape or scores.ndim != 1:
    raise ValueError(f"scores.shape={scores.shape} and included.shape="
                     f"{included.shape} must be equal and 1-D")
  if num_positive + num_negative > len(scores):
    raise ValueError(f"k+={num_positive} + k-={num_negative} guesses exceed "
                     f"{len(scores)} canaries")
  order = np.argsort(-scores, kind="stable")
  top, bottom = order[:num_positive], order[len(order) - num_negative:]
  return int(included[top].sum() + (~included[bottom]).sum())


def best_guesses(scores, included, *, delta: float, confidence: float = 0.95,
                 rules: list[tuple[int, int]] | None = None) -> OneRunResult:
  """The one-run bound of the best of a few guessing rules, union-bounded.

  Each rule (k+, k-) is tested at level beta / len(rules), so the reported
  maximum is a valid lower bound at confidence 1 - beta (Bonferroni). The
  default rules guess for 1%, 2%, 5%, 10%, 20% and 50% of the canaries,
  either all "in" for the highest scores (membership signals are often
  one-sided: an included canary scores high, an excluded one looks like any
  random sequence) or half "in" for the highest, half "out" for the lowest.

  Args:
    scores: [m] canary scores, higher = more likely included.
    included: [m] bool, the canaries that were in the run's data.
    delta: the delta of the claim.
    confidence: 1 - beta.
    rules: (k+, k-) pairs; None for the default.

  Returns:
    A ``OneRunResult``.
  """
  scores = np.asarray(scores, np.float64)
  m = len(scores)
  if rules is None:
    sizes = {max(2, round(f * m)) for f in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)}
    rules = sorted({(r, 0) for r in sizes} | {(r - r // 2, r // 2) for r in sizes})
    rules = [(a, b) for a, b in rules if a + b <= m]
  if not rules:
    raise ValueError("rules must not be empty")
  beta = (1 - confidence) / len(rules)
  best = None
  for k_pos, k_neg in rules:
    v = guess_counts(scores, included, k_pos, k_neg)
    eps = epsilon_lower_bound(num_canaries=m, num_guesses=k_pos + k_neg,
                              num_correct=v, delta=delta, confidence=1 - beta)
    if best is None or eps > best[0]:
      best = (eps, k_pos, k_neg, v)
  eps, k_pos, k_neg, v = best
  return OneRunResult(epsilon_lower=eps, num_canaries=m, num_positive=k_pos,
                      num_negative=k_neg, num_correct=v, delta=delta,
                      confidence=confidence, rules_tried=len(rules))
