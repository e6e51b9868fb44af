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

Speed: only the ratings file is large (33M rows in the full ml-latest). It is
parsed by numpy's C ``loadtxt`` into one structured array (20 bytes a row, no
Python object per row; ``::`` is first swapped for a tab, as ``loadtxt`` takes
a one-character delimiter), then checked with vectorised tests (id, rating and
timestamp ranges) and mapped to dense indices through a direct lookup table
(``searchsorted`` over 33M random ids was the slowest step). Measured here on a
shared 2-core machine: the real ml-100k in ~0.1 s, a synthetic 1M-row ml-1m in
~2.5 s, a synthetic 3M-row ml-latest with 300k movies in ~7 s (loadtxt ~1-2.5 s
of it), so the full ml-latest should take well under a minute. When a
vectorised check fails, data row k is the k-th non-empty line after the
header, so only that line is re-checked (a cheap line count). When ``loadtxt``
itself fails, its row numbers ignore headers and blank lines, so a careful
line-by-line pass re-reads the file to the first bad line (~2-6 us a line; it
runs only on failure). The item and user files are small (<100k lines) and are
read line by line.

Malformed rows raise ``DataFormatError`` (a ``ValueError``) naming the file,
the 1-based line and the problem. Empty lines are skipped anywhere (so
trailing blank lines are fine); a line holding only spaces is malformed.
"""

import csv
import dataclasses
import io
import math
import pathlib
import warnings

import numpy as np

from privjax.data import dataset

# The 19 genres of ml-100k in u.item column order (used when u.genre is absent).
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy",
    "Crime", "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror",
    "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")

# ml-1m users.dat age codes: the code is the lower end of the bracket.
ML1M_AGE_BRACKETS = {
    1: "Under 18", 18: "18-24", 25: "25-34", 35: "35-44", 45: "45-49",
    50: "50-55", 56: "56+"}

# ml-1m users.dat occupation codes 0-20. Code 0 is documented as '"other" or
# not specified'; it is spelled as TFDS spells it so that both loaders agree.
ML1M_OCCUPATIONS = (
    "other/not specified", "academic/educator", "artist", "clerical/admin",
    "college/grad student", "customer service", "doctor/health care",
    "executive/managerial", "farmer", "homemaker", "K-12 student", "lawyer",
    "programmer", "retired", "sales/marketing", "scientist", "self-employed",
    "technician/engineer", "tradesman/craftsman", "unemployed", "writer")

NO_GENRES = "(no genres listed)"

_INT32_MAX = 2**31 - 1
_INT64_MAX = 2**63 - 1


class DataFormatError(ValueError):
  """A malformed MovieLens file; the message reads ``path:line: problem``.

  Attributes:
    path: the offending file.
    line: 1-based line number, or ``None`` when no single line is to blame.
    problem: what is wrong, without the location.

  >>> str(DataFormatError("ml-100k/u.data", 17, "expected 4 fields, got 3"))
  'ml-100k/u.data:17: expected 4 fields, got 3'
  """

  def __init__(self, path, line: int | None, problem: str):
    self.path = pathlib.Path(path)
    self.line = line
    self.problem = problem
    where = str(path) if line is None else f"{path}:{line}"
    super().__init__(f"{where}: {problem}")


# -------------------------------------------------------------------- formats

# Required files of each format, checked in this order.
_FORMATS = {
    "ml-100k": ("u.data", "u.item"),
    "ml-1m": ("ratings.dat", "movies.dat"),
    "ml-latest": ("ratings.csv", "movies.csv"),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class _RatingsFormat:
  filename: str
  separator: str
  separator_name: str
  encoding: str
  header: str | None
  half_stars: bool  # 0.5..5 in steps of 0.5; otherwise whole stars 1..5


_RATINGS = {
    "ml-100k": _RatingsFormat(
        filename="u.data", separator="\t", separator_name="tab",
        encoding="latin-1", header=None, half_stars=False),
    "ml-1m": _RatingsFormat(
        filename="ratings.dat", separator="::", separator_name="'::'",
        encoding="latin-1", header=None, half_stars=False),
    "ml-latest": _RatingsFormat(
        filename="ratings.csv", separator=",", separator_name="comma",
        encoding="utf-8", header="userId,movieId,rating,timestamp",
        half_stars=True),
}


def _looked_for() -> str:
  return "; ".join(f"{' + '.join(files)} ({name})"
                   for name, files in _FORMATS.items())


def _detect(directory: pathlib.Path) -> str:
  for name, files in _FORMATS.items():
    present = [f for f in files if (directory / f).is_file()]
    if len(present) == len(files):
      return name
    if present:
      missing = [f for f in files if f not in present]
      raise FileNotFoundError(
          f"{directory} has {', '.join(present)} but not "
          f"{', '.join(missing)}, which the {name} format needs")
  raise FileNotFoundError(
      f"no MovieLens files in {directory}: looked for {_looked_for()}")


# --------------------------------------------------------------- field parsing


def _lines(path: pathlib.Path, encoding: str, skip: int = 0):
  """Yields (1-based number, line without newline), skipping empty lines."""
  try:
    with open(path, encoding=encoding) as f:
      for number, line in enumerate(f, start=1):
        line = line.rstrip("\n")
        if number > skip and line:
          yield number, line
  except UnicodeDecodeError as error:
    raise DataFormatError(
        path, None, f"not valid {encoding}: {error}") from None


def _split(path, number, line, separator, separator_name, count, what=""):
  fields = line.split(separator)
  if len(fields) != count:
    raise DataFormatError(
        path, number,
        f"expected {count} {separator_name}-separated fields{what}, "
        f"got {len(fields)}")
  return fields


def _int(path, number, what: str, text: str, *, lo: int = 0,
         hi: int = _INT32_MAX) -> int:
  # "_" is rejected because int() accepts "1_000" but loadtxt does not.
  try:
    if "_" in text:
      raise ValueError(text)
    value = int(text)
  except ValueError:
    raise DataFormatError(
        path, number, f"{what}={text!r} is not an integer") from None
  if not lo <= value <= hi:
    raise DataFormatError(
        path, number, f"{what}={value} is out of range [{lo}, {hi}]")
  return value


def _rating(path, number, text: str, half_stars: bool) -> float:
  if not half_stars:
    return float(_int(path, number, "rating", text, lo=1, hi=5))
  try:
    if "_" in text:
      raise ValueError(text)
    value = float(text)
  except ValueError:
    raise DataFormatError(
        path, number, f"rating={text!r} is not a number") from None
  if not (0.5 <= value <= 5.0 and (2 * value) == math.floor(2 * value)):
    raise DataFormatError(
        path, number, f"rating={text!r} must be one of 0.5, 1.0, ..., 5.0")
  return value


def _check_unique(path, number, what: str, value: int, seen: dict[int, int]):
  if value in seen:
    raise DataFormatError(
        path, number, f"{what} {value} already appears on line {seen[value]}")
  seen[value] = number


# ------------------------------------------------------------------- ratings


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Ratings:
  user: np.ndarray  # int64 raw user ids
  item: np.ndarray  # int32 dense item index
  rating: np.ndarray  # float32
  timestamp: np.ndarray  # int64


def _lookup(ids: np.ndarray, raw: np.ndarray) -> np.ndarray:
  """Position of each ``raw`` id in sorted non-negative ``ids``, -1 if absent.

  >>> _lookup(np.array([2, 5, 9]), np.array([9, 2, 3, -1, 12]))
  array([ 2,  0, -1, -1, -1], dtype=int32)
  """
  if len(ids) == 0:
    return np.full(len(raw), -1, np.int32)
  top = int(ids[-1])
  if top < max(1 << 22, 4 * len(raw)):
    # A direct table: searchsorted's random probes cost ~0.5 us a row on 33M
    # ratings. The extra last slot stays -1 and catches ids out of range.
    table = np.full(top + 2, -1, np.int32)
    table[ids] = np.arange(len(ids), dtype=np.int32)
    return table[np.clip(raw, -1, top + 1)]
  position = np.minimum(np.searchsorted(ids, raw), len(ids) - 1)
  return np.where(ids[position] == raw, position, -1).astype(np.int32)


def _union(first: np.ndarray, second: np.ndarray) -> np.ndarray:
  """Sorted unique non-negative ids of both (a bitmap when ids are small)."""
  both = np.concatenate([first, second]).astype(np.int64)
  if len(both) and both.min() >= 0 and both.max() < max(1 << 22, 4 * len(both)):
    present = np.zeros(int(both.max()) + 1, bool)
    present[both] = True
    return np.flatnonzero(present)
  return np.unique(both)


def _check_header(path: pathlib.Path, encoding: str, header: str) -> None:
  try:
    with open(path, encoding=encoding) as f:
      first = f.readline().rstrip("\n")
  except UnicodeDecodeError as error:
    raise DataFormatError(path, 1, f"not valid {encoding}: {error}") from None
  if first != header:
    raise DataFormatError(
        path, 1, f"expected the header {header!r}, got {first!r}")


def _rating_line_checker(path: pathlib.Path, fmt: _RatingsFormat,
                         item_ids: np.ndarray, item_file: str):
  """Returns check(number, line), which raises DataFormatError on a bad line."""
  known = set(item_ids.tolist())

  def check(number: int, line: str) -> None:
    user, item, rating, timestamp = _split(
        path, number, line, fmt.separator, fmt.separator_name, 4)
    _int(path, number, "user id", user)
    item = _int(path, number, "item id", item)
    _rating(path, number, rating, fmt.half_stars)
    _int(path, number, "timestamp", timestamp, hi=_INT64_MAX)
    if item not in known:
      raise DataFormatError(
          path, number, f"item id {item} is not in {item_file}")

  return check


def _read_ratings(directory: pathlib.Path, fmt: _RatingsFormat,
                  item_ids: np.ndarray, item_file: str) -> _Ratings:
  """Fast vectorised parse; on failure a careful pass names the bad line."""
  path = directory / fmt.filename
  skip = 0 if fmt.header is None else 1
  if fmt.header is not None:
    _check_header(path, fmt.encoding, fmt.header)
  check = _rating_line_checker(path, fmt, item_ids, item_file)

  source, delimiter = path, fmt.separator
  if len(fmt.separator) > 1:
    try:
      text = path.read_text(encoding=fmt.encoding)
    except UnicodeDecodeError as error:
      raise DataFormatError(
          path, None, f"not valid {fmt.encoding}: {error}") from None
    # A stray tab would become a field separator after the swap below.
    if "\t" in text:
      line = text.count("\n", 0, text.index("\t")) + 1
      raise DataFormatError(
          path, line, f"tab character in a {fmt.separator_name}-separated file")
    source, delimiter = io.StringIO(text.replace(fmt.separator, "\t")), "\t"
    del text
  rating_type = np.float64 if fmt.half_stars else np.int32
  columns = np.dtype([("user", np.int32), ("item", np.int32),
                      ("rating", rating_type), ("timestamp", np.int64)])
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", UserWarning)  # "input contained no data"
      table = np.loadtxt(
          source, dtype=columns, delimiter=delimiter, comments=None,
          quotechar=None, skiprows=skip, encoding=fmt.encoding, ndmin=1)
  except UnicodeDecodeError as error:
    raise DataFormatError(
        path, None, f"not valid {fmt.encoding}: {error}") from None
  except ValueError as error:
    # numpy's row numbers ignore headers and blank lines and differ between
    # its messages, so re-read the file line by line to name the line.
    for number, line in _lines(path, fmt.encoding, skip=skip):
      check(number, line)
    raise DataFormatError(path, None, str(error)) from error

  del source
  user = table["user"].astype(np.int64)
  item = _lookup(item_ids, table["item"])
  rating = table["rating"]
  timestamp = table["timestamp"]
  del table
  if fmt.half_stars:
    good = ((rating >= 0.5) & (rating <= 5.0)
            & (2 * rating == np.floor(2 * rating)))
  else:
    good = (rating >= 1) & (rating <= 5)
  good &= (item >= 0) & (user >= 0) & (timestamp >= 0)
  if not good.all():
    # Every row parsed, so data row k is the k-th non-empty line after the
    # header; only that line needs the careful check.
    row = int(np.argmin(good))
    for k, (number, line) in enumerate(_lines(path, fmt.encoding, skip=skip)):
      if k == row:
        check(number, line)
        raise DataFormatError(path, number, "fails a range check")
  return _Ratings(user=user, item=item, rating=rating.astype(np.float32),
                  timestamp=timestamp)


# ------------------------------------------------------------------- items


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Catalogue:
  ids: np.ndarray  # int64, sorted
  titles: tuple[str, ...]
  genres: np.ndarray  # bool [num_items, num_genres]
  genre_names: tuple[str, ...]


def _catalogue(ids: list[int], titles: list[str], flags: list[list[bool]],
               genre_names) -> _Catalogue:
  order = np.argsort(np.asarray(ids, np.int64), kind="stable")
  genres = np.asarray(flags, bool).reshape(len(ids), len(genre_names))
  return _Catalogue(
      ids=np.asarray(ids, np.int64)[order],
      titles=tuple(titles[i] for i in order.tolist()),
      genres=genres[order],
      genre_names=tuple(genre_names))


def _catalogue_from_lists(ids, titles, genre_lists) -> _Catalogue:
  names = sorted({g for genres in genre_lists for g in genres})
  column = {name: j for j, name in enumerate(names)}
  rows = [r for r, genres in enumerate(genre_lists) for _ in genres]
  columns = [column[g] for genres in genre_lists for g in genres]
  flags = np.zeros((len(ids), len(names)), bool)
  flags[rows, columns] = True
  return _catalogue(ids, titles, flags, names)


def _genre_list(path, number, text: str) -> list[str]:
  if text in (NO_GENRES, ""):
    return []
  genres = text.split("|")
  if "" in genres:
    raise DataFormatError(path, number, f"empty genre name in {text!r}")
  return genres


def _read_100k_genres(directory: pathlib.Path) -> tuple[str, ...]:
  path = directory / "u.genre"
  if not path.is_file():
    return ML100K_GENRES
  names = []
  for number, line in _lines(path, "latin-1"):
    name, index = _split(path, number, line, "|", "'|'", 2, " (name|index)")
    index = _int(path, number, "genre index", index)
    if index != len(names):
      raise DataFormatError(
          path, number, f"genre index {index}, expected {len(names)}")
    names.append(name)
  return tuple(names)


def _read_100k_items(directory: pathlib.Path) -> _Catalogue:
  genre_names = _read_100k_genres(directory)
  path = directory / "u.item"
  count = 5 + len(genre_names)
  what = (f" (id, title, release date, video release date, IMDb URL and "
          f"{len(genre_names)} genre flags)")
  ids, titles, flags, seen = [], [], [], {}
  for number, line in _lines(path, "latin-1"):
    fields = _split(path, number, line, "|", "'|'", count, what)
    item = _int(path, number, "item id", fields[0])
    _check_unique(path, number, "item id", item, seen)
    row = []
    for name, flag in zip(genre_names, fields[5:]):
      if flag not in ("0", "1"):
        raise DataFormatError(
            path, number, f"genre flag {name}={flag!r} must be 0 or 1")
      row.append(flag == "1")
    ids.append(item)
    titles.append(fields[1])
    flags.append(row)
  return _catalogue(ids, titles, flags, genre_names)


def _read_1m_items(directory: pathlib.Path) -> _Catalogue:
  path = directory / "movies.dat"
  ids, titles, genre_lists, seen = [], [], [], {}
  for number, line in _lines(path, "latin-1"):
    item, title, genres = _split(
        path, number, line, "::", "'::'", 3, " (MovieID::Title::Genres)")
    item = _int(path, number, "item id", item)
    _check_unique(path, number, "item id", item, seen)
    ids.append(item)
    titles.append(title)
    genre_lists.append(_genre_list(path, number, genres))
  return _catalogue_from_lists(ids, titles, genre_lists)


def _read_latest_items(directory: pathlib.Path) -> _Catalogue:
  path = directory / "movies.csv"
  ids, titles, genre_lists, seen = [], [], [], {}
  header = ["movieId", "title", "genres"]
  try:
    with open(path, encoding="utf-8", newline="") as f:
      reader = csv.reader(f, strict=True)
      try:
        for row in reader:
          number = reader.line_num
          if number == 1 and row != header:
            raise DataFormatError(
                path, 1, f"expected the header {','.join(header)!r}, "
                f"got {','.join(row)!r}")
          if number == 1 or not row:
            continue
          if len(row) != 3:
            raise DataFormatError(
                path, number, f"expected 3 comma-separated fields "
                f"(movieId,title,genres), got {len(row)}")
          item = _int(path, number, "item id", row[0])
          _check_unique(path, number, "item id", item, seen)
          ids.append(item)
          titles.append(row[1])
          genre_lists.append(_genre_list(path, number, row[2]))
      except csv.Error as error:
        raise DataFormatError(path, reader.line_num, str(error)) from None
  except UnicodeDecodeError as error:
    raise DataFormatError(path, None, f"not valid utf-8: {error}") from None
  return _catalogue_from_lists(ids, titles, genre_lists)


# ------------------------------------------------------------------- users


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Users:
  ids: list[int]
  age: list[int]
  gender: list[str]
  occupation: list[str]
  zip: list[str]


def _gender(path, number, text: str) -> str:
  if text not in ("M", "F"):
    raise DataFormatError(path, number, f"gender={text!r} must be 'M' or 'F'")
  return text


def _read_100k_users(directory: pathlib.Path) -> _Users | None:
  path = directory / "u.user"
  if not path.is_file():
    return None
  occupations = None
  if (directory / "u.occupation").is_file():
    occupations = {line.strip() for _, line in
                   _lines(directory / "u.occupation", "latin-1")}
  users = _Users(ids=[], age=[], gender=[], occupation=[], zip=[])
  seen = {}
  for number, line in _lines(path, "latin-1"):
    user, age, gender, occupation, zip_code = _split(
        path, number, line, "|", "'|'", 5,
        " (id|age|gender|occupation|zip)")
    user = _int(path, number, "user id", user)
    _check_unique(path, number, "user id", user, seen)
    if occupations is not None and occupation not in occupations:
      raise DataFormatError(
          path, number, f"occupation={occupation!r} is not in u.occupation")
    users.ids.append(user)
    users.age.append(_int(path, number, "age", age, hi=200))
    users.gender.append(_gender(path, number, gender))
    users.occupation.append(occupation)
    users.zip.append(zip_code)
  return users


def _read_1m_users(directory: pathlib.Path) -> _Users | None:
  path = directory / "users.dat"
  if not path.is_file():
    return None
  users = _Users(ids=[], age=[], gender=[], occupation=[], zip=[])
  seen = {}
  for number, line in _lines(path, "latin-1"):
    user, gender, age, occupation, zip_code = _split(
        path, number, line, "::", "'::'", 5,
        " (UserID::Gender::Age::Occupation::Zip-code)")
    user = _int(path, number, "user id", user)
    _check_unique(path, number, "user id", user, seen)
    age = _int(path, number, "age", age)
    if age not in ML1M_AGE_BRACKETS:
      raise DataFormatError(
          path, number,
          f"age={age} must be one of the codes {sorted(ML1M_AGE_BRACKETS)}")
    occupation = _int(path, number, "occupation", occupation,
                      hi=len(ML1M_OCCUPATIONS) - 1)
    users.ids.append(user)
    users.age.append(age)
    users.gender.append(_gender(path, number, gender))
    users.occupation.append(ML1M_OCCUPATIONS[occupation])
    users.zip.append(zip_code)
  return users


def _demographics(user_ids: np.ndarray, users: _Users) -> dict[str, np.ndarray]:
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
    "ml-100k": (_read_100k_items, "u.item", _read_100k_users),
    "ml-1m": (_read_1m_items, "movies.dat", _read_1m_users),
    "ml-latest": (_read_latest_items, "movies.csv", lambda directory: None),
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
  ratings = _read_ratings(directory, _RATINGS[fmt], catalogue.ids, item_file)

  known_users = np.asarray([] if users is None else users.ids, np.int64)
  user_ids = _union(known_users, ratings.user)
  folder_name = directory.resolve().name
  return dataset.RecDataset(
      name=folder_name if folder_name.startswith("ml-") else fmt,
      user=_lookup(user_ids, ratings.user),
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
