"""Tests for privjax.data.bounding: at most K rows per user, chosen by that user alone."""

import dataclasses

import numpy as np
import pytest
from scipy import stats

from privjax.data import bounding
from privjax.data import sequences
from privjax.data import synthetic
from privjax.dp import secret as secret_lib

ALPHA = 1e-3


def _keys(n, seed=1):
  return secret_lib.RunSecret.from_seed(seed).unit_keys("bounding", range(n))


def test_group_rows_bounds_contributions():
  rng = np.random.default_rng(0)
  num_units, k = 50, 5
  unit_of_row = rng.integers(0, num_units - 5, size=1000)  # last 5 have none
  out = bounding.group_rows(unit_of_row, unit_keys=_keys(num_units), max_rows_per_unit=k)
  assert out.shape == (num_units, k) and out.dtype == np.int32
  rows_per_unit = np.bincount(unit_of_row, minlength=num_units)
  for u in range(num_units):
    kept = out[u][out[u] >= 0]
    assert np.all(out[u][len(kept):] == -1)  # real entries first
    assert len(kept) == min(k, rows_per_unit[u])
    assert np.all(unit_of_row[kept] == u)
    assert np.all(np.diff(kept) > 0)  # row order
  assert np.all(out[-5:] == -1)
  empty = bounding.group_rows(np.array([], np.int64), unit_keys=_keys(3), max_rows_per_unit=2)
  np.testing.assert_array_equal(empty, np.full((3, 2), -1))
  np.testing.assert_array_equal(
      out, bounding.group_rows(unit_of_row, unit_keys=_keys(num_units), max_rows_per_unit=k))
  assert not np.array_equal(out, bounding.group_rows(
      unit_of_row, unit_keys=_keys(num_units, seed=2), max_rows_per_unit=k))


def test_group_rows_keeps_uniform_subset():
  # One unit with 10 rows, K=3: over many keys each row is kept w.p. 0.3.
  unit_of_row = np.zeros(10, np.int64)
  trials = 3000
  counts = np.zeros(10)
  for t in range(trials):
    out = bounding.group_rows(unit_of_row, unit_keys=_keys(1, seed=t), max_rows_per_unit=3)
    counts[out[0]] += 1
  assert counts.sum() == 3 * trials
  expected = np.full(10, 0.3 * trials)
  assert stats.chisquare(counts, expected).pvalue > ALPHA
  # The test rejects keeping the first rows more often.
  skewed = expected * np.linspace(1.15, 0.85, 10)
  assert stats.chisquare(counts, skewed * 3 * trials / skewed.sum()).pvalue < ALPHA


def test_group_rows_latest_by_order_key():
  unit_of_row = np.array([0, 1, 0, 0, 1, 0, 2])
  time = np.array([10, 5, 30, 20, 1, 40, 7])
  out = bounding.group_rows(unit_of_row, unit_keys=_keys(4), max_rows_per_unit=2,
                            order_key=time)
  # Unit 0: latest two are t=30 (row 2), t=40 (row 5), in ascending time.
  np.testing.assert_array_equal(out, [[2, 5], [4, 1], [6, -1], [-1, -1]])
  # Ties are broken by the key, but only among the tied rows.
  picks = {tuple(bounding.group_rows(np.zeros(4, np.int64), unit_keys=_keys(1, seed=s),
                                     max_rows_per_unit=1,
                                     order_key=np.array([1, 2, 2, 0]))[0])
           for s in range(40)}
  assert picks == {(1,), (2,)}


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="max_rows_per_unit=0"):
    bounding.group_rows(np.zeros(3, int), unit_keys=_keys(1), max_rows_per_unit=0)
  with pytest.raises(ValueError, match="num_units=2"):
    bounding.group_rows(np.array([0, 2]), unit_keys=_keys(2), max_rows_per_unit=1)
  with pytest.raises(ValueError, match="uint64"):
    bounding.group_rows(np.array([0]), unit_keys=np.zeros(1, np.int64), max_rows_per_unit=1)


# ----------------------------------------------------------------------------
# Neighbouring datasets: add one user, nothing else moves.
# ----------------------------------------------------------------------------


def _insert_user(ds, at: int, raw_id: str, items: np.ndarray):
  """``ds`` with a new user at dense index ``at`` (later users shift by one),
  as a loader that numbers users in sorted raw-id order would do."""
  user = np.where(ds.user >= at, ds.user + 1, ds.user)
  raw = ds.raw_user_ids[:at] + (raw_id,) + ds.raw_user_ids[at:]
  return dataclasses.replace(
      ds, user=np.concatenate([user, np.full(len(items), at, np.int32)]).astype(np.int32),
      item=np.concatenate([ds.item, items]).astype(np.int32),
      rating=np.concatenate([ds.rating, np.ones(len(items), np.float32)]),
      timestamp=np.concatenate([ds.timestamp, np.arange(len(items)) + 10**9]),
      num_users=ds.num_users + 1, raw_user_ids=raw, users=None)


def _kept_by_raw_id(ds, secret, k, time_ordered, global_permutation=False):
  split = sequences.leave_last_out(ds)
  examples, user_of_row = sequences.next_item_examples(split.train, max_len=5)
  keys = secret.unit_keys("bounding", ds.raw_user_ids)
  # The time-ordered variant: latest examples first, with many ties (the
  # target position, coarsened) so that tie-breaking matters.
  order_key = bounding.ordinal_within(user_of_row) // 4 if time_ordered else None
  if global_permutation:  # the old tie-breaker: one permutation of ALL rows
    keys = np.zeros(ds.num_users, np.uint64)
    order_key = np.random.default_rng(0).permutation(len(user_of_row))
  rows = bounding.group_rows(user_of_row, unit_keys=keys, max_rows_per_unit=k,
                             order_key=order_key)
  out = {}
  for u, raw in enumerate(ds.raw_user_ids):
    kept = rows[u][rows[u] >= 0]
    out[raw] = sorted((tuple(examples["history"][r]), int(examples["target"][r]))
                      for r in kept)
  return out


def _neighbours():
  ds = synthetic.generate(num_users=300, num_items=60, mean_interactions=25, seed=4)
  new_items = np.random.default_rng(9).integers(0, 60, size=40)
  return ds, _insert_user(ds, at=17, raw_id="new-user", items=new_items)


@pytest.mark.parametrize("time_ordered", [False, True])
def test_adding_one_user_changes_no_other_users_rows(time_ordered):
  ds, bigger = _neighbours()
  secret = secret_lib.RunSecret.fresh()
  before = _kept_by_raw_id(ds, secret, 6, time_ordered)
  after = _kept_by_raw_id(bigger, secret, 6, time_ordered)
  capped = [raw for raw, kept in before.items() if len(kept) == 6]
  assert len(capped) > 200  # the bounding actually chose among rows
  assert [raw for raw in before if before[raw] != after[raw]] == []
  assert len(after["new-user"]) == 6


def test_the_neighbour_check_catches_a_global_tiebreak():
  # The check above can fail: ranking rows by one permutation of all rows
  # (what the landed code did) moves other users' rows when one is added.
  ds, bigger = _neighbours()
  secret = secret_lib.RunSecret.fresh()
  before = _kept_by_raw_id(ds, secret, 6, False, global_permutation=True)
  after = _kept_by_raw_id(bigger, secret, 6, False, global_permutation=True)
  assert sum(before[raw] != after[raw] for raw in before) > 100
