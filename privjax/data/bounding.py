"""Contribution bounding: which rows each user keeps, decided by that user alone.

User-level DP needs every user's influence bounded before anything is
aggregated: a user keeps at most K rows (training examples, counted rows,
histogram bins). Which K is decided by a keyed hash: each row's priority is
``mix64(unit_key ^ mix64(row_key))``, where ``unit_key`` is a secret keyed
hash of the user's stable id (``RunSecret.unit_keys`` of the raw id, never a
dense index, which shifts when users are added) and ``row_key`` is the row's
own position among that user's rows. Adding or removing one user therefore
changes no other user's kept rows, which is what lets the user-level
guarantee treat bounding as per-user preprocessing.

>>> keys = np.array([11, 22, 33], np.uint64)
>>> group_rows(np.array([1, 0, 1, 1]), unit_keys=keys, max_rows_per_unit=2,
...            order_key=np.array([5, 0, 7, 6]))
array([[ 1, -1],
       [ 3,  2],
       [-1, -1]], dtype=int32)
"""

import numbers

import numpy as np

_U64 = np.uint64
_MAX_UNITS = np.iinfo(np.int32).max  # row indices are int32 on device


def mix64(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser: a bijective, well-mixed hash of uint64 values."""
  x = np.asarray(x, _U64)
  with np.errstate(over="ignore"):
    x = x + _U64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
  return x ^ (x >> _U64(31))


def rank_within(groups: np.ndarray, priority: np.ndarray) -> np.ndarray:
  """Rank of each row inside its group when the group is sorted by priority.

  >>> rank_within(np.array([0, 1, 0, 0]), np.array([5, 1, 2, 9])).tolist()
  [1, 0, 0, 2]
  """
  groups = np.asarray(groups)
  if len(groups) == 0:
    return np.zeros(0, np.int64)
  order = np.lexsort((priority, groups))
  g = groups[order]
  index = np.arange(len(g))
  start = np.maximum.accumulate(np.where(np.r_[True, g[1:] != g[:-1]], index, 0))
  rank = np.empty(len(g), np.int64)
  rank[order] = index - start
  return rank


def row_priority(unit_key_of_row: np.ndarray, row_key: np.ndarray) -> np.ndarray:
  """uint64 priority of each row: a hash of its unit's key and its own key."""
  return mix64(np.asarray(unit_key_of_row, _U64) ^ mix64(np.asarray(row_key).astype(_U64)))


def ordinal_within(groups: np.ndarray) -> np.ndarray:
  """Position of each row among the rows of its group, in row order.

  >>> ordinal_within(np.array([3, 1, 3, 3])).tolist()
  [0, 0, 1, 2]
  """
  return rank_within(np.asarray(groups), np.arange(len(groups)))


def group_rows(unit_of_row: np.ndarray, *, unit_keys: np.ndarray,
               max_rows_per_unit: int,
               order_key: np.ndarray | None = None) -> np.ndarray:
  """Rows of each unit, at most ``max_rows_per_unit`` of them, -1 padded.

  Guarantee: the rows unit ``u`` keeps depend only on ``unit_keys[u]`` and on
  u's own rows (their number, order and ``order_key``s): adding or removing
  other units, or changing their rows, changes nothing for ``u``. With a
  secret ``unit_keys`` the choice is a uniformly random K-subset (or, with
  ``order_key``, the latest K, ties broken at random) that no outsider can
  predict.

  Args:
    unit_of_row: int [num_rows], the unit (user) of each row, in
      ``[0, len(unit_keys))``; rows of a unit appear in that unit's own order.
    unit_keys: uint64 [num_units], a keyed hash of each unit's stable id
      (``RunSecret.unit_keys(label, raw_ids)``).
    max_rows_per_unit: K >= 1.
    order_key: optional [num_rows] sort key (e.g. timestamps). None keeps a
      random subset of K rows of each unit, listed in row order; given, keeps
      the K rows with the largest keys, listed by ascending key.

  Returns:
    int32 [num_units, K]: row indices, each unit's real entries first, then -1.

  Edge cases: units without rows get a row of -1; an empty ``unit_of_row``
  gives all -1.
  """
  unit_keys = np.asarray(unit_keys)
  if unit_keys.ndim != 1 or unit_keys.dtype != _U64:
    raise ValueError(f"unit_keys must be a 1-D uint64 array, got dtype="
                     f"{unit_keys.dtype} shape={unit_keys.shape}")
  num_units = len(unit_keys)
  if num_units > _MAX_UNITS:
    raise ValueError(f"len(unit_keys)={num_units} must be <= {_MAX_UNITS}")
  k = max_rows_per_unit
  if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
    raise ValueError(f"max_rows_per_unit={k!r} must be an integer >= 1")
  k = int(k)
  units = np.asarray(unit_of_row)
  if units.ndim != 1 or not (units.size == 0 or np.issubdtype(units.dtype, np.integer)):
    raise ValueError(f"unit_of_row must be a 1-D integer array, got dtype="
                     f"{units.dtype} shape={units.shape}")
  if units.size and (units.min() < 0 or units.max() >= num_units):
    raise ValueError(f"unit_of_row values in [{units.min()}, {units.max()}] must be "
                     f"in [0, num_units={num_units})")
  units = units.astype(np.int64)
  priority = row_priority(unit_keys[units], ordinal_within(units))
  if order_key is None:
    within = rank_within(units, priority)
    keep = np.flatnonzero(within < k)
    keep = keep[np.lexsort((keep, units[keep]))]          # row order
  else:
    key = np.asarray(order_key)
    if key.shape != units.shape:
      raise ValueError(f"order_key shape={key.shape} must equal unit_of_row "
                       f"shape={units.shape}")
    # Dense ranks let any sortable dtype be negated; they keep every unit's
    # relative order, so other units' keys do not matter.
    dense = np.unique(key, return_inverse=True)[1].reshape(key.shape)
    order = np.lexsort((priority, -dense, units))        # latest first, ties by hash
    sorted_units = units[order]
    starts = np.searchsorted(sorted_units, np.arange(num_units))
    rank = np.arange(len(order)) - starts[sorted_units]
    keep = order[rank < k]
    keep = keep[np.lexsort((keep, dense[keep], units[keep]))]  # ascending key
  kept_units = units[keep]
  slot = np.arange(keep.size) - np.searchsorted(kept_units, kept_units)
  out = np.full((num_units, k), -1, np.int32)
  out[kept_units, slot] = keep
  return out
