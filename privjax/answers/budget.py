"""The privacy budget: one filter that every released answer is charged to.

A ``PrivacyBudget`` composes the dp_accounting events of released answers and
refuses, before any noise is drawn, an answer that would take the spent
epsilon past its limit (``BudgetExceededError``); a refused answer changes
nothing.

>>> budget = PrivacyBudget(epsilon=1.0)
>>> budget.spend(dp_accounting.LaplaceDpEvent(2.0), name="q1")
0.5
"""

import copy
import dataclasses
import math
from collections.abc import Callable

import dp_accounting

from privjax import _validate

# Relative slack when comparing spent epsilon to the limit: guards round-off
# such as epsilon -> scale = 1/epsilon -> 1/scale, nothing more.
_BUDGET_RTOL = 1e-9


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

  The spent epsilon is, with ``composition="best"`` (default), the smaller of
  two valid bounds on the composed loss at this budget's ``delta``
  (``"basic"`` or ``"accountant"`` uses only one of them):

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
  practice and an assumption here. Taking the smaller of the two bounds is
  valid for a sequence of queries fixed in advance; a session whose privacy
  parameters adapt to earlier answers uses one path only (``"basic"`` or
  ``"accountant"``), as ``session.QuerySession`` does.

  >>> budget = PrivacyBudget(epsilon=1.0)
  >>> budget.spend(dp_accounting.LaplaceDpEvent(2.0), name="q1")
  0.5
  >>> budget.spend(dp_accounting.LaplaceDpEvent(1.0), name="q2")
  Traceback (most recent call last):
  ...
  privjax.answers.budget.BudgetExceededError: query 'q2' would spend epsilon=1.5 > budget epsilon=1.0 (delta=0.0); refused, nothing spent
  >>> [q.name for q in budget.queries], budget.spent_epsilon
  (['q1'], 0.5)
  """

  def __init__(self, *, epsilon: float, delta: float = 0.0,
               accountant: str = "rdp", composition: str = "best"):
    self._epsilon = _validate.positive("epsilon", epsilon)
    self._delta = _validate.probability("delta", delta)
    self._kind = _validate.one_of("accountant", accountant, {"rdp", "pld"})
    self._composition = _validate.one_of("composition", composition,
                                         {"best", "basic", "accountant"})
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
    return self._combine(self.basic_epsilon, self._accountant_epsilon)

  def _combine(self, basic: float, accountant: float) -> float:
    if self._composition == "basic":
      return basic
    if self._composition == "accountant":
      return accountant
    return min(basic, accountant)

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
    total = self._combine(self._basic(self._queries + [query]), accountant_eps)
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

  >>> import numpy as np
  >>> from privjax.answers import aggregates
  >>> session = Session(PrivacyBudget(epsilon=1.0))
  >>> n = session.run_query(aggregates.count, name="n", user=np.arange(10),
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
