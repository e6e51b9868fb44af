"""Noisy answers from vote histograms: sensitivity, mechanisms, calibration.

A vote histogram counts, for one query, the items that m voters (PATE
teachers) proposed. ``vote_counts`` builds histograms and their sensitivity to
one user (who changes one voter); ``AnswerSpec`` names a mechanism and its
parameters; ``answer`` releases a noisy top-k charged to a
``session_lib.QuerySession`` (one ``budget.PrivacyBudget``); ``calibrate``
finds the least noisy spec for a number of answers in a budget.

>>> counts, sens = vote_counts(np.array([[[0], [2], [2]]]), num_items=3)
>>> spec = calibrate("gumbel", epsilon_budget=1.0, num_queries=1, k=1,
...                  sensitivity=sens, accounting="pure")
>>> spec.epsilon
1.0
"""

import dataclasses
import math

import dp_accounting
import numpy as np

from privjax.answers import session as session_lib
from privjax.answers import noisy_argmax

# Answer mechanisms, by the names used in papers and on the command line.
MECHANISMS = noisy_argmax.MECHANISMS


def _integer(name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
  return int(value)


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
    return noisy_argmax.cost_of(self.mechanism, epsilon=self.epsilon,
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


def answer(session: session_lib.QuerySession, counts: np.ndarray,
           sensitivity: noisy_argmax.Sensitivity, excluded: np.ndarray,
           spec: AnswerSpec) -> np.ndarray:
  """Noisy top-k of vote histograms within a session's budget.

  Args:
    session: charged for the answer BEFORE any noise is drawn; raises
      ``budget.BudgetExceededError`` (nothing drawn, earlier answers
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
  return session.top_k(scores, spec.k, mechanism=spec.mechanism,
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
