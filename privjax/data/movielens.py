"""Loaders for the raw MovieLens files as GroupLens distributes them.

``load(path)`` reads an unpacked GroupLens folder and returns a
``privjax.data.dataset.RecDataset``. The format is recognised from the file
names in the folder:

* **ml-100k**: ``u.data`` (tab-separated ``user item rating timestamp``),
  ``u.item`` (``|``-separated ``id|title|release date|video release date|IMDb
  URL|`` then one 0/1 flag per genre), optional ``u.user``
  (``id|age|gender|occupation|zip``), ``u.genre`` (``name|index``) and
  ``u.occupation`` (one name a line). Latin-1. Whole-star ratings 1-5.
* **ml-1m**: ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``),
  ``movies.dat`` (``MovieID::Title::Genres``, genres ``|``-separated), optional
  ``users.dat`` (``UserID::Gender::Age::Occupation::Zip-code``, age and
  occupation as the codes documented in the GroupLens README). Latin-1.
  Whole-star ratings 1-5.
* **ml-latest** (ml-latest-small, ml-latest, and the same layout of
  ml-20m/25m/32m): ``ratings.csv`` (``userId,movieId,rating,timestamp``) and
  ``movies.csv`` (``movieId,title,genres``; titles with commas are quoted), both
  with a header row. UTF-8. Half-star ratings 0.5-5. No user table.

Indexing: items are every item of the item file, densely numbered in the
order of their raw ids (the GroupLens catalogues are already in that order);
users are every user of the user file or the ratings, densely numbered in the
order of their raw ids. Users that rate but are missing from the user file get
``age=-1`` and empty strings in the demographics.

Genres: ml-100k takes its names and column order from ``u.genre`` (the
standard 19, starting with ``unknown``, when the file is absent). ml-1m and
ml-latest use the genres that occur in ``movies.dat``/``movies.csv``, sorted;
GroupLens' documented list is alphabetical, so this is also the documented
order, and genres the README does not list (``IMAX``) slot in alphabetically.
``(no genres listed)`` is not a genre: such a movie has an all-false row.

Speed: the ratings file (33M rows in the full ml-latest) is parsed by numpy's
C ``loadtxt`` and checked with vectorised tests; a careful line-by-line pass
runs only on failure, to name the line (see ``_movielens_files.read_ratings``).

Malformed rows raise ``DataFormatError`` (a ``ValueError``) naming the file,
the 1-based line and the problem. Empty lines are skipped anywhere (so
trailing blank lines are fine); a line holding only spaces is malformed.
"""

import pathlib

import numpy as np

from privjax.data import _movielens_fields as fields
from privjax.data import _movielens_files as files
from privjax.data import dataset

# Public names owned by the private reader modules (the API is this module's).
DataFormatError = fields.DataFormatError
ML100K_GENRES = files.ML100K_GENRES
ML1M_AGE_BRACKETS = files.ML1M_AGE_BRACKETS
ML1M_OCCUPATIONS = files.ML1M_OCCUPATIONS
NO_GENRES = files.NO_GENRES

# -------------------------------------------------------------------- formats

# Required files of each format, checked in this order.
_FORMATS = {
    "ml-100k": ("u.data", "u.item"),
    "ml-1m": ("ratings.dat", "movies.dat"),
    "ml-latest": ("ratings.csv", "movies.csv"),
}


def _looked_for() -> str:
  return "; ".join(f"{' + '.join(required)} ({name})"
                   for name, required in _FORMATS.items())


def _detect(directory: pathlib.Path) -> str:
  for name, required in _FORMATS.items():
    present = [f for f in required if (directory / f).is_file()]
    if len(present) == len(required):
      return name
    if present:
      missing = [f for f in required if f not in present]
      raise FileNotFoundError(
          f"{directory} has {', '.join(present)} but not "
          f"{', '.join(missing)}, which the {name} format needs")
  raise FileNotFoundError(
      f"no MovieLens files in {directory}: looked for {_looked_for()}")


def _union(first: np.ndarray, second: np.ndarray) -> np.ndarray:
  """Sorted unique non-negative ids of both (a bitmap when ids are small)."""
  both = np.concatenate([first, second]).astype(np.int64)
  if len(both) and both.min() >= 0 and both.max() < max(1 << 22, 4 * len(both)):
    present = np.zeros(int(both.max()) + 1, bool)
    present[both] = True
    return np.flatnonzero(present)
  return np.unique(both)


def _demographics(user_ids: np.ndarray, users: files.Users
                  ) -> dict[str, np.ndarray]:
  rows = np.searchsorted(user_ids, np.asarray(users.ids, np.int64))
  columns = {"age": np.full(len(user_ids), -1, np.int32)}
  columns["age"][rows] = users.age
  for name in ("gender", "occupation", "zip"):
    values = np.asarray(getattr(users, name), dtype=str)
    columns[name] = np.full(len(user_ids), "", dtype=values.dtype)
    columns[name][rows] = values
  return columns


# --------------------------------------------------------------------- load

_READERS = {
    "ml-100k": (files.read_100k_items, "u.item", files.read_100k_users),
    "ml-1m": (files.read_1m_items, "movies.dat", files.read_1m_users),
    "ml-latest": (files.read_latest_items, "movies.csv",
                  lambda directory: None),
}


def load(path) -> dataset.RecDataset:
  """Loads an unpacked GroupLens MovieLens folder (ml-100k, ml-1m, ml-latest).

  Args:
    path: the folder, e.g. ``"data/ml-100k"``; its format is detected from
      the file names (see the module docstring).

  Returns:
    A ``RecDataset`` named after the folder when that starts with ``ml-``
    (``"ml-100k"``, ``"ml-latest-small"``), else after the format. Ratings
    keep the file order; ``users`` holds demographics for ml-100k and ml-1m
    (``age`` is the exact age for ml-100k and the bracket code for ml-1m, see
    ``ML1M_AGE_BRACKETS``) and is ``None`` for ml-latest.

  Raises:
    FileNotFoundError: the folder is missing or holds no known format.
    DataFormatError: a malformed row; the message names file and line.

  >>> import pathlib, shutil, tempfile
  >>> folder = pathlib.Path(tempfile.mkdtemp()) / "ml-latest-small"
  >>> folder.mkdir()
  >>> _ = (folder / "movies.csv").write_text(
  ...     'movieId,title,genres\\n1,"Dinner, The (1995)",Comedy|Drama\\n')
  >>> _ = (folder / "ratings.csv").write_text(
  ...     "userId,movieId,rating,timestamp\\n7,1,4.5,964982703\\n")
  >>> data = load(folder)
  >>> data.name, data.num_users, data.item_titles, data.genre_names
  ('ml-latest-small', 1, ('Dinner, The (1995)',), ('Comedy', 'Drama'))
  >>> data.rating, data.raw_user_ids
  (array([4.5], dtype=float32), ('7',))
  >>> shutil.rmtree(folder.parent)
  """
  directory = pathlib.Path(path)
  if not directory.is_dir():
    raise FileNotFoundError(
        f"MovieLens folder {directory} does not exist or is not a folder "
        f"(looked for {_looked_for()})")
  fmt = _detect(directory)
  read_items, item_file, read_users = _READERS[fmt]
  catalogue = read_items(directory)
  users = read_users(directory)
  ratings = files.read_ratings(directory, files.RATINGS[fmt], catalogue.ids,
                               item_file)

  known_users = np.asarray([] if users is None else users.ids, np.int64)
  user_ids = _union(known_users, ratings.user)
  folder_name = directory.resolve().name
  return dataset.RecDataset(
      name=folder_name if folder_name.startswith("ml-") else fmt,
      user=files.lookup(user_ids, ratings.user),
      item=ratings.item,
      rating=ratings.rating,
      timestamp=ratings.timestamp,
      num_users=len(user_ids),
      num_items=len(catalogue.ids),
      item_titles=catalogue.titles,
      item_genres=catalogue.genres,
      genre_names=catalogue.genre_names,
      raw_user_ids=tuple(map(str, user_ids.tolist())),
      raw_item_ids=tuple(map(str, catalogue.ids.tolist())),
      users=None if users is None else _demographics(user_ids, users),
      catalogue=f"every movie of {item_file}: the public MovieLens catalogue, "
                "rated or not")
