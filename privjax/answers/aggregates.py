"""Differentially private aggregate queries: count, sum, mean, histogram, popularity.

Formal guarantee. Every query here is (epsilon, delta)-differentially private
with respect to one *user*: the unit of privacy is all rows that carry the same
user id, and neighbouring datasets differ by adding or removing one user
(dp_accounting's ``ADD_OR_REMOVE_ONE``). This holds for any input because each
user's influence is bounded *before* aggregation: a user keeps at most
``max_contributions_per_user`` rows (or distinct histogram bins), values are
clamped to public bounds ``[lo, hi]``, and the histogram domain ``num_bins`` is
public. Sensitivities are computed from those bounds, never assumed. Which rows
a user keeps is a keyed hash of (bounding key, user id, row key)
(``privjax.data.bounding``), so it depends on that user's own rows only;
adding or removing one user never changes what the others contribute. The
bounding key is drawn from the OS unless a seed is given. Assumed: the
bounds, the bin domain, epsilon and delta are chosen without looking at the
data.

Noise: ``privjax.answers.mechanisms`` (exact discrete samplers by default).

Accounting. Each query returns its noisy answer and a dp_accounting
``DpEvent``. A ``budget.PrivacyBudget`` composes events and refuses (before any
noise is drawn) a query that would exceed it.

>>> budget = budget_lib.PrivacyBudget(epsilon=1.0)
>>> user = np.array([0, 0, 1, 2, 2, 2])
>>> answer, event = count(user, max_contributions_per_user=2, epsilon=0.5,
...                       budget=budget, rng=0)   # rng=0: seeded, NOT secure
>>> event
DiscreteLaplaceDpEvent(noise_parameter=0.25, sensitivity=2)
>>> budget.spent_epsilon
0.5
"""

import hashlib
import math
import secrets
from collections.abc import Sequence

import dp_accounting
import numpy as np

from privjax import _validate
from privjax.answers import budget as budget_lib
from privjax.answers import mechanisms
from privjax.data import bounding

MECHANISMS = mechanisms.MECHANISMS
_U64 = np.uint64


# Contribution bounding (the keyed hash lives in privjax.data.bounding).


def _unit_keys(user, seed: int) -> np.ndarray:
  """A 64-bit key per row from that row's user id and the bounding key only."""
  user = np.asarray(user)
  if user.dtype.kind in "iub":
    ids = user.astype(np.int64).view(_U64)
  else:
    unique, inverse = np.unique(user.astype(str), return_inverse=True)
    hashed = np.array([int.from_bytes(hashlib.blake2b(u.encode(), digest_size=8).digest(),
                                      "little") for u in unique], dtype=_U64)
    ids = hashed[inverse.reshape(-1)]
  return bounding.mix64(ids ^ bounding.mix64(np.full(ids.shape, seed % 2**64, _U64)))


def _bounding_seed(seed: int | None) -> int:
  # None: a fresh 64-bit key from the OS, so nobody can predict which rows stay.
  return secrets.randbits(64) if seed is None else int(seed)


def _keep_per_user(unit_keys, row_keys, max_per_user: int) -> np.ndarray:
  """Mask keeping at most ``max_per_user`` rows per user, chosen by a keyed hash."""
  priority = bounding.row_priority(unit_keys, row_keys)
  return bounding.rank_within(unit_keys, priority) < max_per_user


def _bounded_rows(user, max_per_user: int, seed: int | None) -> np.ndarray:
  keys = _unit_keys(user, _bounding_seed(seed))
  # A row's key is its position among its user's rows: the user's own data.
  return _keep_per_user(keys, bounding.ordinal_within(keys), max_per_user)


def _check_bins(bins, num_bins: int) -> np.ndarray:
  bins = np.asarray(bins)
  if bins.size and (bins.min() < 0 or bins.max() >= num_bins):
    raise ValueError(f"bins must lie in [0, num_bins={num_bins}); got "
                     f"[{bins.min()}, {bins.max()}]")
  return bins


def _bounded_histogram(user, bins, num_bins: int, max_per_user: int,
                       seed: int | None) -> np.ndarray:
  """Distinct users per bin, each in at most ``max_per_user`` bins (NOT private)."""
  bins = _check_bins(bins, num_bins)
  keys = _unit_keys(user, _bounding_seed(seed))
  pairs = np.unique(np.stack([keys, bins.astype(_U64)], axis=1), axis=0)
  keep = _keep_per_user(pairs[:, 0], pairs[:, 1], max_per_user)
  return np.bincount(pairs[keep, 1].astype(np.int64), minlength=num_bins)


def _bounded_row_histogram(user, bins, num_bins: int, max_per_user: int,
                           seed: int | None) -> np.ndarray:
  """Rows per bin, each user keeping at most ``max_per_user`` rows (NOT private)."""
  bins = _check_bins(bins, num_bins)
  keep = _bounded_rows(user, max_per_user, seed)
  return np.bincount(bins[keep].astype(np.int64), minlength=num_bins)


# Queries.


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


def _spend(budget, noise: mechanisms.Noise, name: str):
  if budget is not None:
    budget.spend(noise.event, epsilon=noise.epsilon, delta=noise.delta, name=name)


def count(user, *, max_contributions_per_user: int, epsilon: float,
          delta: float | None = None, mechanism: str | None = None,
          calibration: str = "analytic", rng=None,
          budget: budget_lib.PrivacyBudget | None = None,
          seed: int | None = None,
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
    seed: key of the contribution bounding; None (default) draws one from the
      OS; an int makes the choice reproducible, and predictable to anyone who
      knows it.
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
  noise = mechanisms.calibrate(mechanism, l1_sensitivity=m, l2_sensitivity=m,
                    epsilon=epsilon, delta=delta, calibration=calibration)
  _spend(budget, noise, name)
  true = int(_bounded_rows(user, m, seed).sum())
  return float(mechanisms.add_noise(noise, np.array([true]), rng)[0]), noise.event


def _clamped_values(values, lo, hi, mechanism):
  if not lo < hi:
    raise ValueError(f"lo={lo!r} must be < hi={hi!r}")
  values = np.clip(np.asarray(values, dtype=np.float64), lo, hi)
  if mechanism in mechanisms.DISCRETE and not (
      lo == int(lo) and hi == int(hi) and np.all(values == np.round(values))):
    raise ValueError(
        f"mechanism={mechanism!r} needs integer values and bounds (lo={lo!r}, "
        f"hi={hi!r}); use mechanism='laplace' or 'gaussian' for real values")
  return values


def bounded_sum(user, values, *, lo: float, hi: float,
                max_contributions_per_user: int, epsilon: float,
                delta: float | None = None, mechanism: str | None = None,
                calibration: str = "analytic", rng=None,
                budget: budget_lib.PrivacyBudget | None = None,
                seed: int | None = None,
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
  noise = mechanisms.calibrate(mechanism, l1_sensitivity=sensitivity,
                    l2_sensitivity=sensitivity, epsilon=epsilon, delta=delta,
                    calibration=calibration)
  _spend(budget, noise, name)
  true = values[_bounded_rows(user, m, seed)].sum()
  return float(mechanisms.add_noise(noise, np.array([true]), rng)[0]), noise.event


def bounded_mean(user, values, *, lo: float, hi: float,
                 max_contributions_per_user: int, epsilon: float,
                 delta: float | None = None, mechanism: str | None = None,
                 calibration: str = "analytic", rng=None,
                 budget: budget_lib.PrivacyBudget | None = None,
                 seed: int | None = None,
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
  doubled = mechanism in mechanisms.DISCRETE
  sum_sensitivity = m * (hi - lo) if doubled else m * (hi - lo) / 2
  count_noise = mechanisms.calibrate(mechanism, l1_sensitivity=m, l2_sensitivity=m,
                          epsilon=half_eps, delta=half_delta,
                          calibration=calibration)
  sum_noise = mechanisms.calibrate(mechanism, l1_sensitivity=sum_sensitivity,
                        l2_sensitivity=sum_sensitivity, epsilon=half_eps,
                        delta=half_delta, calibration=calibration)
  event = dp_accounting.ComposedDpEvent([count_noise.event, sum_noise.event])
  if budget is not None:
    budget.spend(event, epsilon=count_noise.epsilon + sum_noise.epsilon,
                 delta=count_noise.delta + sum_noise.delta, name=name)
  kept = values[_bounded_rows(user, m, seed)]
  centred = (2 * kept - lo - hi) if doubled else (kept - (lo + hi) / 2)
  rng = mechanisms.noise_rng(mechanism, rng)
  noisy_count = mechanisms.add_noise(count_noise, np.array([kept.size]), rng)[0]
  noisy_sum = mechanisms.add_noise(sum_noise, np.array([centred.sum()]), rng)[0]
  noisy_sum = noisy_sum / 2 if doubled else noisy_sum
  mean = (lo + hi) / 2 + noisy_sum / max(noisy_count, 1.0)
  return float(np.clip(mean, lo, hi)), event


def histogram(user, bins, *, num_bins: int, max_contributions_per_user: int,
              epsilon: float, delta: float | None = None,
              mechanism: str | None = None, calibration: str = "analytic",
              rng=None, budget: budget_lib.PrivacyBudget | None = None,
              seed: int | None = None,
              count_rows: bool = False, name: str = "histogram"
              ) -> tuple[np.ndarray, dp_accounting.DpEvent]:
  """(epsilon, delta)-DP histogram of distinct users per bin over a public domain.

  A user counts at most once per bin and in at most m =
  ``max_contributions_per_user`` distinct bins (chosen by a keyed hash of
  ``seed``, the user and the bin, so data-independently of everyone else).
  Adding or removing a user changes at most m bins by 1 each: L1 = m,
  L2 = sqrt(m). mechanisms.Noise goes on every one of the ``num_bins`` bins, empty ones
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
  ...            epsilon=1e9, count_rows=rows, rng=0, seed=0)[0].tolist()
  ...  for rows in (False, True)]
  [[0.0, 0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0, 2.0]]
  """
  mechanism, delta = _prepare(mechanism, epsilon, delta,
                              max_contributions_per_user, user, ("bins", bins))
  if not (isinstance(num_bins, (int, np.integer)) and num_bins >= 1):
    raise ValueError(f"num_bins={num_bins!r} must be an int >= 1")
  m = int(max_contributions_per_user)
  noise = mechanisms.calibrate(mechanism, l1_sensitivity=m,
                    l2_sensitivity=m if count_rows else math.sqrt(m),
                    epsilon=epsilon, delta=delta, calibration=calibration)
  _spend(budget, noise, name)
  if count_rows:
    true = _bounded_row_histogram(user, bins, num_bins, m, seed)
  else:
    true = _bounded_histogram(user, bins, num_bins, m, seed)
  return mechanisms.add_noise(noise, true, rng), noise.event


def dp_item_popularity(user, item, *, num_items: int, max_items_per_user: int,
                       epsilon: float, delta: float | None = None,
                       mechanism: str | None = None, rng=None,
                       budget: budget_lib.PrivacyBudget | None = None,
                       seed: int | None = None,
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
