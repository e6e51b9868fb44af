"""A session of noisy answers charged to one privacy budget.

>>> import numpy as np
>>> session = QuerySession(epsilon_budget=1.0, delta=1e-5, key=jax.random.key(0))
>>> counts, sens = noisy_argmax.vote_histogram(np.array([0, 1, 1, 1]), num_classes=2)
>>> int(session.argmax(counts, mechanism="gnmax", sigma=40.0, sensitivity=sens)) in (0, 1)
True
"""

import math

import dp_accounting
import jax
import numpy as np

from privjax import _validate
from privjax.answers import budget as budget_lib
from privjax.answers import noisy_argmax

class QuerySession:
  """Noisy argmax / top-k answers charged to one ``budget.PrivacyBudget``.

  Guarantee. Every answer is charged to the budget BEFORE any noise is drawn;
  an answer the budget cannot afford raises ``budget.BudgetExceededError``
  and changes nothing (earlier answers stay in ``answers``). With
  ``accounting="rdp"`` (default) the session is (epsilon_budget, delta)-DP for
  the unit of privacy of the scores: every cost here is zCDP (an RDP curve
  ``rho * alpha``), so the budget's RDP bound is a Renyi filter (Feldman &
  Zrnic 2021), valid even when queries, parameters and, in confident GNMax,
  the number of answers depend on earlier outputs. With ``accounting="pure"``
  the budget adds pure epsilons (basic composition, a valid pure-DP filter,
  Rogers et al. 2016) and only gumbel and laplace are allowed. The i-th
  answered call uses key ``fold_in(key, i)``, so no key is used twice.

  Pass ``budget`` to share one filter with other releases (DP statistics,
  PATE labels); otherwise the session makes its own from ``epsilon_budget``,
  ``delta`` and ``accounting``.

  >>> session = QuerySession(epsilon_budget=1.0, delta=1e-5, key=jax.random.key(0))
  >>> counts, sens = noisy_argmax.vote_histogram(np.array([0, 1, 1, 1]), num_classes=2)
  >>> int(session.argmax(counts, mechanism="gnmax", sigma=40.0, sensitivity=sens)) in (0, 1)
  True
  >>> len(session.answers), round(session.epsilon, 3)
  (1, 0.125)
  """

  def __init__(self, *, key: jax.Array, epsilon_budget: float | None = None,
               delta: float | None = None, accounting: str = "rdp",
               budget: budget_lib.PrivacyBudget | None = None):
    _validate.one_of("accounting", accounting, noisy_argmax.ACCOUNTING)
    if budget is None:
      _validate.positive("epsilon_budget", epsilon_budget)
      if accounting == "rdp":
        if delta is None or not 0 < delta < 1:
          raise ValueError(f"delta={delta!r} must be in (0, 1) for accounting='rdp'")
      elif delta not in (None, 0, 0.0):
        raise ValueError(f"delta={delta!r} must be None or 0 for accounting='pure'")
      budget = budget_lib.PrivacyBudget(
          epsilon=epsilon_budget, delta=delta or 0.0,
          composition="basic" if accounting == "pure" else "accountant")
    elif epsilon_budget is not None or delta is not None:
      raise ValueError("give either budget or epsilon_budget/delta, not both")
    self.budget = budget
    self.accounting = "pure" if budget.delta == 0 else accounting
    self.answers: list[budget_lib.Answer] = []
    self._key = key

  @property
  def epsilon_budget(self) -> float:
    return self.budget.epsilon

  @property
  def delta(self) -> float:
    return self.budget.delta

  @property
  def events(self) -> list[dp_accounting.DpEvent]:
    return [answer.event for answer in self.answers]

  @property
  def epsilon(self) -> float:
    """Epsilon spent so far on the budget (at ``delta`` for rdp accounting)."""
    return self.budget.spent_epsilon

  def _check(self, event, pure_epsilon, mechanism) -> None:
    if self.accounting == "pure" and pure_epsilon is None:
      raise ValueError(f"mechanism={mechanism!r} has no pure-DP bound; use "
                       "accounting='rdp'")
    self.budget.check(event, epsilon=pure_epsilon, name=mechanism)

  def can_afford(self, event: dp_accounting.DpEvent, *,
                 pure_epsilon: float | None = None) -> bool:
    try:
      self.budget.check(event, epsilon=pure_epsilon)
    except budget_lib.BudgetExceededError:
      return False
    return True

  def _key_for(self, index: int) -> jax.Array:
    return jax.random.fold_in(self._key, index)

  def _next_key(self) -> jax.Array:
    # One index per answered call; refused calls draw nothing and take none.
    return self._key_for(len(self.answers))

  def _record(self, mechanism, value, event, pure_epsilon):
    self.budget.spend(event, epsilon=pure_epsilon, name=mechanism)
    self.answers.append(budget_lib.Answer(name=mechanism, value=value, event=event))

  def top_k(self, scores, k: int, *, mechanism: str, epsilon: float | None = None,
            sigma: float | None = None, sensitivity: noisy_argmax.Sensitivity,
            monotonic: bool = False) -> np.ndarray:
    """``noisy_top_k`` within the budget; raises BudgetExceededError first."""
    num_queries = max(math.prod(np.shape(scores)[:-1]), 1)
    event = noisy_argmax.cost_of(mechanism, epsilon=epsilon, sigma=sigma, sensitivity=sensitivity,
                    k=k, num_queries=num_queries, monotonic=monotonic)
    pure = (None if mechanism == "gnmax" else
            noisy_argmax.pure_epsilon_of(mechanism, epsilon=epsilon, k=k, num_queries=num_queries))
    self._check(event, pure, mechanism)
    top, realised = noisy_argmax.noisy_top_k(scores, k, mechanism=mechanism, epsilon=epsilon,
                                sigma=sigma, sensitivity=sensitivity,
                                key=self._next_key(), monotonic=monotonic)
    assert realised == event
    top = np.asarray(top)
    self._record(mechanism, top, event, pure)
    return top

  def argmax(self, scores, **kwargs) -> np.ndarray:
    """``noisy_argmax`` within the budget (same keywords as ``top_k``)."""
    return self.top_k(scores, 1, **kwargs)[..., 0]

  def confident_argmax(self, scores, *, threshold: float, sigma_threshold: float,
                       sigma: float, sensitivity: noisy_argmax.Sensitivity
                       ) -> tuple[np.ndarray, np.ndarray]:
    """``confident_gnmax`` within the budget, checked for the worst case
    (every query answered) before anything is drawn; charged as realised.

    Returns:
      (answered, choice) with choice -1 where not answered.
    """
    if self.accounting == "pure":
      raise ValueError("confident GNMax is Gaussian: it needs accounting='rdp'")
    num_queries = max(math.prod(np.shape(scores)[:-1]), 1)
    worst = noisy_argmax.confident_cost_of(sigma_threshold=sigma_threshold, sigma=sigma,
                              sensitivity=sensitivity, num_queries=num_queries,
                              num_answered=num_queries)
    self._check(worst, None, "confident_gnmax")
    answered, choice, event = noisy_argmax.confident_gnmax(
        scores, threshold=threshold, sigma_threshold=sigma_threshold, sigma=sigma,
        sensitivity=sensitivity, key=self._next_key())
    answered, choice = np.asarray(answered), np.asarray(choice)
    self._record("confident_gnmax", choice, event, None)
    return answered, choice
