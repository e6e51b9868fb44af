"""Chronological sequences, leave-last-out split and model inputs."""

import numpy as np

from privjax.data import dataset
from privjax.data import sequences


def _ds(users, items, times, num_users, num_items=6):
  return dataset.RecDataset(
      name="t", user=np.asarray(users, np.int32), item=np.asarray(items, np.int32),
      rating=np.ones(len(users), np.float32), timestamp=np.asarray(times, np.int64),
      num_users=num_users, num_items=num_items,
      item_titles=tuple(f"i{i}" for i in range(num_items)),
      item_genres=np.zeros((num_items, 1), bool), genre_names=("g",),
      raw_user_ids=tuple(str(u) for u in range(num_users)),
      raw_item_ids=tuple(str(i) for i in range(num_items)))


def test_chronological_sort_is_stable_for_ties():
  ds = _ds([1, 0, 0, 0, 1], [5, 2, 3, 1, 4], [9, 5, 5, 1, 3], num_users=2)
  seqs = sequences.chronological(ds)
  assert seqs[0].tolist() == [1, 2, 3]   # t=1, then the two t=5 in file order
  assert seqs[1].tolist() == [4, 5]


def test_leave_last_out_and_short_users():
  ds = _ds([0, 0, 0, 0, 0, 1, 1], [0, 1, 2, 3, 4, 5, 1], [1, 2, 3, 4, 5, 1, 2], num_users=2)
  split = sequences.leave_last_out(ds)
  assert split.train[0].tolist() == [0, 1, 2]
  assert int(split.valid_target[0]) == 3 and int(split.test_target[0]) == 4
  # User 1 has 2 interactions: training only, never evaluated.
  assert split.train[1].tolist() == [5, 1] and split.test_target[1] == -1
  assert split.eval_users().tolist() == [0]


def test_left_pad_and_next_item_examples():
  assert sequences.left_pad(np.array([3, 4, 5]), 5).tolist() == [0, 0, 4, 5, 6]
  assert sequences.left_pad(np.array([3, 4, 5]), 2).tolist() == [5, 6]
  examples, users = sequences.next_item_examples([np.array([0, 1, 2]), np.array([3, 4])], 2)
  assert examples["history"].tolist() == [[0, 1], [1, 2], [0, 4]]
  assert examples["target"].tolist() == [1, 2, 4]
  assert users.tolist() == [0, 0, 1]


def test_eval_set_excludes_history_not_target():
  ds = _ds([0] * 5, [0, 1, 2, 3, 4], [1, 2, 3, 4, 5], num_users=1)
  split = sequences.leave_last_out(ds)
  test = sequences.eval_set(split, "test", max_len=3)
  assert test.target.tolist() == [4]
  assert test.history.tolist() == [[2, 3, 4]]           # items 1..3 shifted by one
  assert sorted(test.exclude[0][test.exclude[0] >= 0].tolist()) == [0, 1, 2, 3]
  valid = sequences.eval_set(split, "valid", max_len=3)
  assert valid.target.tolist() == [3]
  assert sorted(valid.exclude[0][valid.exclude[0] >= 0].tolist()) == [0, 1, 2]
