"""The built-in synthetic dataset."""

import numpy as np
import pytest

from privjax.data import synthetic


@pytest.fixture(scope="module")
def ds():
  return synthetic.generate(num_users=300, num_items=120, mean_interactions=20, seed=0)


def test_deterministic_from_seed(ds):
  again = synthetic.generate(num_users=300, num_items=120, mean_interactions=20, seed=0)
  other = synthetic.generate(num_users=300, num_items=120, mean_interactions=20, seed=1)
  for field in ("user", "item", "rating", "timestamp"):
    np.testing.assert_array_equal(getattr(ds, field), getattr(again, field))
  assert ds.item_titles == again.item_titles
  assert not np.array_equal(ds.item[:100], other.item[:100])


def test_shapes_and_side_information(ds):
  assert ds.num_users == 300 and ds.num_items == 120
  assert len(set(ds.item_titles)) == 120              # titles unique
  assert all(t.endswith(")") and "(19" in t for t in ds.item_titles)
  assert ds.item_genres.sum(1).min() >= 1 and ds.item_genres.sum(1).max() <= 3
  assert set(ds.users) == {"age", "gender", "occupation", "zip"}
  assert set(np.unique(ds.users["gender"])) <= {"M", "F"}
  assert ds.users["age"].min() >= 7 and ds.users["age"].max() <= 73
  assert all(len(z) == 5 and z.isdigit() for z in ds.users["zip"])
  assert set(np.unique(ds.rating)) <= {1.0, 2.0, 3.0, 4.0, 5.0}


def test_every_user_has_at_least_five_distinct_items(ds):
  counts = np.bincount(ds.user, minlength=ds.num_users)
  assert counts.min() >= 5
  for u in range(0, 300, 37):
    items = ds.item[ds.user == u]
    assert len(np.unique(items)) == len(items)


def test_timestamps_increase_within_each_user(ds):
  for u in range(0, 300, 29):
    ts = ds.timestamp[ds.user == u]
    assert np.all(np.diff(ts) > 0)


def _head_tail_ratio(ds):
  counts = np.sort(np.bincount(ds.item, minlength=ds.num_items))[::-1]
  return counts[:12].mean() / counts[-60:].mean()   # top 10% vs bottom half


def test_popularity_is_zipf_skewed(ds):
  # Tastes alone make some items popular (ratio ~2.1 with no Zipf term);
  # the Zipf popularity term must add to that.
  flat = synthetic.generate(num_users=300, num_items=120, mean_interactions=20,
                            seed=0, zipf_exponent=0.0)
  assert _head_tail_ratio(ds) > 2.6 > _head_tail_ratio(flat)


def test_bad_arguments():
  with pytest.raises(ValueError, match="num_items=5"):
    synthetic.generate(num_users=10, num_items=5)
  with pytest.raises(ValueError, match="mean_interactions=2"):
    synthetic.generate(num_users=10, num_items=50, mean_interactions=2)
