"""The one in-memory dataset type every loader returns.

A ``RecDataset`` holds user-item interactions with dense integer ids plus the
side information that text models (titles, genres) and the anonymization work
(demographics) need. Loaders (synthetic, MovieLens, TFDS) all return it, so the
split, the models and the trainer never care where the data came from.
"""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True, kw_only=True)
class RecDataset:
  """User-item interactions with side information.

  Attributes:
    name: human-readable name, e.g. ``"synthetic"`` or ``"ml-100k"``.
    user: int32 [N] dense user index in ``[0, num_users)``.
    item: int32 [N] dense item index in ``[0, num_items)``.
    rating: float32 [N] explicit rating (1.0 where the source has none).
    timestamp: int64 [N] seconds since the epoch (or any monotone clock).
    num_users: number of users.
    num_items: number of items.
    item_titles: ``num_items`` titles (text models render histories from them).
    item_genres: bool [num_items, num_genres] genre flags.
    genre_names: ``num_genres`` genre names.
    raw_user_ids: ``num_users`` ids as they appear in the source files.
    raw_item_ids: ``num_items`` ids as they appear in the source files.
    users: optional demographics, a dict of equal-length columns indexed by the
      dense user index: ``age`` (int), ``gender`` (str), ``occupation`` (str),
      ``zip`` (str). ``None`` when the source has no user table.
    catalogue: where the item set comes from, in words. The item set sizes the
      model, so it must be public; privacy.json repeats this sentence.
  """

  name: str
  user: np.ndarray
  item: np.ndarray
  rating: np.ndarray
  timestamp: np.ndarray
  num_users: int
  num_items: int
  item_titles: tuple[str, ...]
  item_genres: np.ndarray
  genre_names: tuple[str, ...]
  raw_user_ids: tuple[str, ...]
  raw_item_ids: tuple[str, ...]
  users: dict[str, np.ndarray] | None = None
  catalogue: str = "the source's item catalogue (assumed public)"

  def __post_init__(self):
    n = len(self.user)
    for field in ("item", "rating", "timestamp"):
      if len(getattr(self, field)) != n:
        raise ValueError(
            f"RecDataset.{field} has length {len(getattr(self, field))}, "
            f"expected {n} (the length of RecDataset.user)")
    if n and (self.user.min() < 0 or self.user.max() >= self.num_users):
      raise ValueError(f"user ids must lie in [0, num_users={self.num_users})")
    if n and (self.item.min() < 0 or self.item.max() >= self.num_items):
      raise ValueError(f"item ids must lie in [0, num_items={self.num_items})")
    if len(self.item_titles) != self.num_items:
      raise ValueError(
          f"item_titles has {len(self.item_titles)} entries, expected "
          f"num_items={self.num_items}")
    if self.item_genres.shape[0] != self.num_items:
      raise ValueError(
          f"item_genres has {self.item_genres.shape[0]} rows, expected "
          f"num_items={self.num_items}")
    if self.users is not None:
      for key, column in self.users.items():
        if len(column) != self.num_users:
          raise ValueError(
              f"users[{key!r}] has {len(column)} rows, expected "
              f"num_users={self.num_users}")

  @property
  def num_interactions(self) -> int:
    return len(self.user)
