"""MovieLens from TensorFlow Datasets (``movielens/*-ratings``), optional.

``tensorflow_datasets`` is imported only inside ``load``, so privjax works
without TensorFlow; install it with ``pip install -e ".[tfds]"``. The raw-file
loader ``privjax.data.movielens`` needs nothing extra and is preferred when
the GroupLens files are at hand.

Feature mapping (TFDS ``movielens`` builder, configs ``100k-ratings``,
``1m-ratings``, ``20m-ratings``, ``25m-ratings``, ``latest-small-ratings``):

* ``user_id``, ``movie_id`` (bytes) -> raw ids, densely numbered in raw-id
  order (numeric when every id is a number).
* ``movie_title`` (bytes, UTF-8) -> ``item_titles``.
* ``movie_genres`` (sequence of ``ClassLabel`` indices) -> ``item_genres``
  over the builder's genre names, minus ``(no genres listed)``, which leaves
  an all-false row as in the raw loader.
* ``user_rating`` (float32) -> ``rating``; ``timestamp`` -> int64.
* 100k and 1m only: ``user_gender`` (bool, True = male) -> ``"M"``/``"F"``;
  ``raw_user_age`` (100k) or else ``bucketized_user_age`` (1m, the bracket
  code) -> ``age``; ``user_occupation_text`` -> ``occupation``;
  ``user_zip_code`` -> ``zip``. Without these features ``users`` is ``None``.

Differences from the raw loader: the ``-ratings`` configs carry only rated
movies, so ``num_items`` counts rated movies (all 1682 for 100k; about 3706 of
3883 for 1m). The model's size then reveals which movies someone rated; the
item set is treated as public, and ``RecDataset.catalogue`` (repeated in
privacy.json) says so. Prefer the raw loader, whose catalogue is every movie; TFDS renames ml-100k's ``unknown`` and ``Children's`` genres to
``Unknown`` and ``Children``; titles and demographics are taken from the first
rating of each movie and user.

This module has not been run against real TFDS data (TFDS could not be
installed or downloaded where it was written); the mapping follows the TFDS
builder's documented features.
"""

import importlib

import numpy as np

from privjax.data import dataset

_INSTALL = 'pip install -e ".[tfds]"'
_NO_GENRES = "(no genres listed)"


def _import_tfds():
  try:
    return (importlib.import_module("tensorflow_datasets"),
            importlib.import_module("tensorflow"))
  except ImportError as error:
    raise ImportError(
        f"privjax.data.tfds needs tensorflow_datasets and tensorflow, which "
        f"are not installed ({error}); install them with `{_INSTALL}`, or use "
        f"privjax.data.movielens on the raw GroupLens files") from error


def _config(name: str) -> str:
  builder, _, config = name.rpartition("/")
  if builder not in ("", "movielens") or not config.endswith("-ratings"):
    raise ValueError(
        f"name={name!r} must name a MovieLens ratings config, e.g. "
        f"'movielens/100k-ratings' or 'movielens/1m-ratings'")
  return f"movielens/{config}"


def _dense(raw: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
  """Dense indices of byte-string ids, numbered in raw-id order.

  >>> _dense(np.array([b"10", b"9", b"10"], dtype=object))
  (array([1, 0, 1], dtype=int32), ('9', '10'))
  """
  ids, inverse = np.unique(np.asarray(raw).astype(bytes), return_inverse=True)
  texts = [i.decode("utf-8") for i in ids.tolist()]
  rank = np.arange(len(ids))
  if all(t.isdigit() for t in texts):  # "9" before "10", as in the raw files
    order = np.argsort(np.asarray(texts, np.int64), kind="stable")
    rank[order] = np.arange(len(ids))
    texts = [texts[i] for i in order.tolist()]
  return rank[inverse.reshape(-1)].astype(np.int32), tuple(texts)


def _first_of(index: np.ndarray, count: int) -> np.ndarray:
  """Row of the first occurrence of each of ``count`` dense indices."""
  first = np.full(count, len(index), np.int64)
  np.minimum.at(first, index, np.arange(len(index)))
  return first


def load(name: str, data_dir: str | None = None) -> dataset.RecDataset:
  """Loads a TFDS MovieLens ratings config as a ``RecDataset``.

  Args:
    name: ``"movielens/100k-ratings"``, ``"movielens/1m-ratings"``,
      ``"movielens/latest-small-ratings"``, ... (the ``movielens/`` prefix is
      optional). The ``-movies`` configs hold no ratings and are refused.
    data_dir: TFDS data directory; ``None`` uses the TFDS default.

  Returns:
    A ``RecDataset`` named like ``"tfds:movielens/100k-ratings"``; see the
    module docstring for how features map to fields.

  Raises:
    ValueError: ``name`` is not a MovieLens ratings config.
    ImportError: tensorflow_datasets is missing; install ``.[tfds]``.

  >>> data = load("movielens/100k-ratings")  # doctest: +SKIP
  >>> data.num_users, data.num_items, data.num_interactions  # doctest: +SKIP
  (943, 1682, 100000)
  """
  full_name = _config(name)
  tensorflow_datasets, tf = _import_tfds()
  source, info = tensorflow_datasets.load(
      full_name, split="train", data_dir=data_dir, with_info=True)
  genre_feature = info.features["movie_genres"].feature
  num_genres = genre_feature.num_classes
  demographic = "user_gender" in info.features
  age_key = ("raw_user_age" if "raw_user_age" in info.features
             else "bucketized_user_age")

  def flatten(x):
    # Genres are ragged; a fixed multi-hot row lets tf.data batch them.
    out = {
        "user_id": x["user_id"],
        "movie_id": x["movie_id"],
        "movie_title": x["movie_title"],
        "movie_genres": tf.reduce_sum(
            tf.one_hot(x["movie_genres"], num_genres, dtype=tf.int32),
            axis=0) > 0,
        "user_rating": x["user_rating"],
        "timestamp": tf.cast(x["timestamp"], tf.int64),
    }
    if demographic:
      out.update(
          user_gender=x["user_gender"], age=x[age_key],
          user_occupation_text=x["user_occupation_text"],
          user_zip_code=x["user_zip_code"])
    return out

  batches = list(tensorflow_datasets.as_numpy(
      source.map(flatten).batch(1 << 16)))
  if not batches:
    raise ValueError(f"{full_name} has no ratings")
  columns = {key: np.concatenate([b[key] for b in batches])
             for key in batches[0]}

  user, raw_user_ids = _dense(columns["user_id"])
  item, raw_item_ids = _dense(columns["movie_id"])
  first_item = _first_of(item, len(raw_item_ids))
  keep = [j for j, g in enumerate(genre_feature.names) if g != _NO_GENRES]
  users = None
  if demographic:
    first_user = _first_of(user, len(raw_user_ids))

    def text(key):
      return np.asarray([v.decode("utf-8") for v in
                         columns[key][first_user].tolist()], dtype=str)

    users = {
        "age": np.rint(columns["age"][first_user]).astype(np.int32),
        "gender": np.where(columns["user_gender"][first_user], "M", "F"),
        "occupation": text("user_occupation_text"),
        "zip": text("user_zip_code"),
    }
  return dataset.RecDataset(
      name=f"tfds:{full_name}",
      user=user,
      item=item,
      rating=columns["user_rating"].astype(np.float32),
      timestamp=columns["timestamp"].astype(np.int64),
      num_users=len(raw_user_ids),
      num_items=len(raw_item_ids),
      item_titles=tuple(t.decode("utf-8") for t in
                        columns["movie_title"][first_item].tolist()),
      item_genres=columns["movie_genres"][first_item][:, keep],
      genre_names=tuple(genre_feature.names[j] for j in keep),
      raw_user_ids=raw_user_ids,
      raw_item_ids=raw_item_ids,
      users=users,
      catalogue=("the movies that appear in the TFDS ratings (the -ratings configs "
                 "carry no catalogue): ASSUMED PUBLIC, since the model's item count "
                 "reveals that each of these movies was rated by someone"))
