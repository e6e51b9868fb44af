"""Chronological user sequences, the leave-last-out split, and model inputs.

The standard protocol for sequential recommendation: each user's interactions
sorted by time (ties kept in file order); the last item is the test target,
the one before it the validation target, the rest is training data. Users with
fewer than 3 interactions are kept for training only and never evaluated.

Item ids in model inputs are shifted by one: 0 is padding, item ``i`` is
``i + 1``. Histories are left-padded so the most recent item is last.

>>> import numpy as np
>>> from privjax.data import dataset
>>> ds = dataset.RecDataset(name="t", user=np.array([0, 0, 0, 0], np.int32),
...     item=np.array([3, 1, 2, 0], np.int32), rating=np.ones(4, np.float32),
...     timestamp=np.array([4, 1, 2, 3]), num_users=1, num_items=4,
...     item_titles=("a", "b", "c", "d"), item_genres=np.zeros((4, 1), bool),
...     genre_names=("g",), raw_user_ids=("1",), raw_item_ids=tuple("1234"))
>>> split = leave_last_out(ds)
>>> split.train[0].tolist(), int(split.valid_target[0]), int(split.test_target[0])
([1, 2], 0, 3)
"""

import dataclasses

import numpy as np

from privjax.data import dataset

PAD = 0


@dataclasses.dataclass(frozen=True)
class Split:
  """Leave-last-out split; all item ids 0-based.

  Attributes:
    sequences: per-user full chronological sequences.
    train: per-user training sequences (all but the last two items).
    valid_target: [num_users] second-to-last item, -1 if not evaluated.
    test_target: [num_users] last item, -1 if not evaluated.
  """
  sequences: list[np.ndarray]
  train: list[np.ndarray]
  valid_target: np.ndarray
  test_target: np.ndarray

  @property
  def num_users(self) -> int:
    return len(self.sequences)

  def eval_users(self) -> np.ndarray:
    return np.flatnonzero(self.test_target >= 0)


def chronological(ds: dataset.RecDataset) -> list[np.ndarray]:
  """Per-user item sequences sorted by timestamp (stable: ties in file order)."""
  order = np.lexsort((np.arange(ds.num_interactions), ds.timestamp, ds.user))
  users = ds.user[order]
  items = ds.item[order]
  bounds = np.searchsorted(users, np.arange(ds.num_users + 1))
  return [items[bounds[u]:bounds[u + 1]] for u in range(ds.num_users)]


def leave_last_out(ds: dataset.RecDataset) -> Split:
  seqs = chronological(ds)
  valid = np.full(ds.num_users, -1, np.int32)
  test = np.full(ds.num_users, -1, np.int32)
  train = []
  for u, seq in enumerate(seqs):
    if len(seq) >= 3:
      valid[u], test[u] = seq[-2], seq[-1]
      train.append(seq[:-2])
    else:
      train.append(seq)
  return Split(seqs, train, valid, test)


def left_pad(seq: np.ndarray, length: int) -> np.ndarray:
  """The last ``length`` items of ``seq`` shifted by one, left-padded with 0."""
  out = np.zeros(length, np.int32)
  tail = seq[-length:] if length else seq[:0]
  if len(tail):
    out[length - len(tail):] = tail + 1
  return out


def next_item_examples(train: list[np.ndarray], max_len: int
                       ) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """One example per training position t >= 1: history[:t] -> item t.

  Returns:
    (examples, user_of_row): ``examples["history"]`` int32 [N, max_len]
    (shifted ids, left-padded), ``examples["target"]`` int32 [N] (0-based),
    and the user of each row.
  """
  histories, targets, users = [], [], []
  for u, seq in enumerate(train):
    for t in range(1, len(seq)):
      histories.append(left_pad(seq[:t], max_len))
      targets.append(seq[t])
      users.append(u)
  if not histories:
    raise ValueError("no training examples: every user has < 2 training items")
  return ({"history": np.stack(histories).astype(np.int32),
           "target": np.asarray(targets, np.int32)},
          np.asarray(users, np.int32))


@dataclasses.dataclass(frozen=True)
class EvalSet:
  """Inputs for full-ranking evaluation of one split side.

  Attributes:
    users: [B] evaluated users.
    history: [B, max_len] shifted, left-padded histories.
    target: [B] 0-based target items.
    exclude: [B, S] 0-based items to exclude from the ranking (items the user
      has seen in the history), padded with -1.
  """
  users: np.ndarray
  history: np.ndarray
  target: np.ndarray
  exclude: np.ndarray


def eval_set(split: Split, which: str, max_len: int) -> EvalSet:
  """Histories and targets for ``which`` in {"valid", "test"}."""
  if which not in ("valid", "test"):
    raise ValueError(f"which={which!r} must be 'valid' or 'test'")
  users = split.eval_users()
  cut = 2 if which == "valid" else 1
  targets = (split.valid_target if which == "valid" else split.test_target)[users]
  prefixes = [split.sequences[u][:-cut] for u in users]
  width = max([len(p) for p in prefixes] + [1])
  exclude = np.full((len(users), width), -1, np.int32)
  for row, p in enumerate(prefixes):
    exclude[row, :len(p)] = p
  history = np.stack([left_pad(p, max_len) for p in prefixes]) if len(users) else (
      np.zeros((0, max_len), np.int32))
  return EvalSet(users.astype(np.int32), history, targets.astype(np.int32), exclude)
