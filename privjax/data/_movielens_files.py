"""Readers of the individual MovieLens files: ratings, items (catalogue), users.

Private to ``privjax.data.movielens`` (``load`` composes these readers and
documents the formats; it re-exports the constants below). Every reader raises
``DataFormatError`` naming the file and 1-based line of the first bad row. The
item and user files are small (<100k lines) and are read line by line.
"""

import csv
import dataclasses
import io
import pathlib
import warnings

import numpy as np

from privjax.data import _movielens_fields as fields

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


# ------------------------------------------------------------------- ratings


@dataclasses.dataclass(frozen=True, kw_only=True)
class RatingsFormat:
  """How one format lays out its ratings file."""

  filename: str
  separator: str
  separator_name: str
  encoding: str
  header: str | None
  half_stars: bool  # 0.5..5 in steps of 0.5; otherwise whole stars 1..5


# The ratings file of each format.
RATINGS = {
    "ml-100k": RatingsFormat(
        filename="u.data", separator="\t", separator_name="tab",
        encoding="latin-1", header=None, half_stars=False),
    "ml-1m": RatingsFormat(
        filename="ratings.dat", separator="::", separator_name="'::'",
        encoding="latin-1", header=None, half_stars=False),
    "ml-latest": RatingsFormat(
        filename="ratings.csv", separator=",", separator_name="comma",
        encoding="utf-8", header="userId,movieId,rating,timestamp",
        half_stars=True),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Ratings:
  """The parsed ratings file, one entry a row."""

  user: np.ndarray  # int64 raw user ids
  item: np.ndarray  # int32 dense item index
  rating: np.ndarray  # float32
  timestamp: np.ndarray  # int64


def lookup(ids: np.ndarray, raw: np.ndarray) -> np.ndarray:
  """Position of each ``raw`` id in sorted non-negative ``ids``, -1 if absent.

  >>> lookup(np.array([2, 5, 9]), np.array([9, 2, 3, -1, 12]))
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


def _rating_line_checker(path: pathlib.Path, fmt: RatingsFormat,
                         item_ids: np.ndarray, item_file: str):
  """Returns check(number, line), which raises DataFormatError on a bad line."""
  known = set(item_ids.tolist())

  def check(number: int, line: str) -> None:
    user, item, rating, timestamp = fields.split(
        path, number, line, fmt.separator, fmt.separator_name, 4)
    fields.integer(path, number, "user id", user)
    item = fields.integer(path, number, "item id", item)
    fields.rating(path, number, rating, fmt.half_stars)
    fields.integer(path, number, "timestamp", timestamp, hi=fields.INT64_MAX)
    if item not in known:
      raise fields.DataFormatError(
          path, number, f"item id {item} is not in {item_file}")

  return check


def read_ratings(directory: pathlib.Path, fmt: RatingsFormat,
                 item_ids: np.ndarray, item_file: str) -> Ratings:
  """The ratings file of ``directory``: a fast vectorised parse, then checks.

  Only the ratings file is large (33M rows in the full ml-latest). It is
  parsed by numpy's C ``loadtxt`` into one structured array (20 bytes a row,
  no Python object per row; ``::`` is first swapped for a tab, as ``loadtxt``
  takes a one-character delimiter), then checked with vectorised tests (id,
  rating and timestamp ranges) and mapped to dense item indices through
  ``lookup``, a direct table (``searchsorted`` over 33M random ids was the
  slowest step). Measured on a shared 2-core machine: the real ml-100k in
  ~0.1 s, a synthetic 1M-row ml-1m in ~2.5 s, a synthetic 3M-row ml-latest
  with 300k movies in ~7 s (loadtxt ~1-2.5 s of it), so the full ml-latest
  should take well under a minute. When a vectorised check
  fails, data row k is the k-th non-empty line after the header, so only
  that line is re-checked (a cheap line count). When ``loadtxt`` itself
  fails, its row numbers ignore headers and blank lines, so a careful
  line-by-line pass re-reads the file to the first bad line (~2-6 us a line;
  it runs only on failure).

  Args:
    directory: the MovieLens folder.
    fmt: its ratings format (``RATINGS``).
    item_ids: sorted raw ids of the catalogue.
    item_file: the catalogue's file name, for errors.

  Returns:
    Raw user ids, dense item indices, ratings and timestamps in file order.

  Raises:
    DataFormatError: naming the first bad line where one is to blame.
  """
  path = directory / fmt.filename
  skip = 0 if fmt.header is None else 1
  if fmt.header is not None:
    fields.check_header(path, fmt.encoding, fmt.header)
  check = _rating_line_checker(path, fmt, item_ids, item_file)

  source, delimiter = path, fmt.separator
  if len(fmt.separator) > 1:
    try:
      text = path.read_text(encoding=fmt.encoding)
    except UnicodeDecodeError as error:
      raise fields.DataFormatError(
          path, None, f"not valid {fmt.encoding}: {error}") from None
    # A stray tab would become a field separator after the swap below.
    if "\t" in text:
      line = text.count("\n", 0, text.index("\t")) + 1
      raise fields.DataFormatError(
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
    raise fields.DataFormatError(
        path, None, f"not valid {fmt.encoding}: {error}") from None
  except ValueError as error:
    # numpy's row numbers ignore headers and blank lines and differ between
    # its messages, so re-read the file line by line to name the line.
    for number, line in fields.lines(path, fmt.encoding, skip=skip):
      check(number, line)
    raise fields.DataFormatError(path, None, str(error)) from error

  del source
  user = table["user"].astype(np.int64)
  item = lookup(item_ids, table["item"])
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
    numbered = fields.lines(path, fmt.encoding, skip=skip)
    for k, (number, line) in enumerate(numbered):
      if k == row:
        check(number, line)
        raise fields.DataFormatError(path, number, "fails a range check")
  return Ratings(user=user, item=item, rating=rating.astype(np.float32),
                 timestamp=timestamp)


# ------------------------------------------------------------------- items


@dataclasses.dataclass(frozen=True, kw_only=True)
class Catalogue:
  """The item file: every movie, sorted by raw id."""

  ids: np.ndarray  # int64, sorted
  titles: tuple[str, ...]
  genres: np.ndarray  # bool [num_items, num_genres]
  genre_names: tuple[str, ...]


def _catalogue(ids: list[int], titles: list[str], flags: list[list[bool]],
               genre_names) -> Catalogue:
  order = np.argsort(np.asarray(ids, np.int64), kind="stable")
  genres = np.asarray(flags, bool).reshape(len(ids), len(genre_names))
  return Catalogue(
      ids=np.asarray(ids, np.int64)[order],
      titles=tuple(titles[i] for i in order.tolist()),
      genres=genres[order],
      genre_names=tuple(genre_names))


def _catalogue_from_lists(ids, titles, genre_lists) -> Catalogue:
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
    raise fields.DataFormatError(path, number, f"empty genre name in {text!r}")
  return genres


def _read_100k_genres(directory: pathlib.Path) -> tuple[str, ...]:
  path = directory / "u.genre"
  if not path.is_file():
    return ML100K_GENRES
  names = []
  for number, line in fields.lines(path, "latin-1"):
    name, index = fields.split(path, number, line, "|", "'|'", 2,
                               " (name|index)")
    index = fields.integer(path, number, "genre index", index)
    if index != len(names):
      raise fields.DataFormatError(
          path, number, f"genre index {index}, expected {len(names)}")
    names.append(name)
  return tuple(names)


def read_100k_items(directory: pathlib.Path) -> Catalogue:
  """``u.item`` with the genre columns of ``u.genre`` (or ``ML100K_GENRES``)."""
  genre_names = _read_100k_genres(directory)
  path = directory / "u.item"
  count = 5 + len(genre_names)
  what = (f" (id, title, release date, video release date, IMDb URL and "
          f"{len(genre_names)} genre flags)")
  ids, titles, flags, seen = [], [], [], {}
  for number, line in fields.lines(path, "latin-1"):
    parts = fields.split(path, number, line, "|", "'|'", count, what)
    item = fields.integer(path, number, "item id", parts[0])
    fields.check_unique(path, number, "item id", item, seen)
    row = []
    for name, flag in zip(genre_names, parts[5:]):
      if flag not in ("0", "1"):
        raise fields.DataFormatError(
            path, number, f"genre flag {name}={flag!r} must be 0 or 1")
      row.append(flag == "1")
    ids.append(item)
    titles.append(parts[1])
    flags.append(row)
  return _catalogue(ids, titles, flags, genre_names)


def read_1m_items(directory: pathlib.Path) -> Catalogue:
  """``movies.dat``; genres are those that occur, sorted."""
  path = directory / "movies.dat"
  ids, titles, genre_lists, seen = [], [], [], {}
  for number, line in fields.lines(path, "latin-1"):
    item, title, genres = fields.split(
        path, number, line, "::", "'::'", 3, " (MovieID::Title::Genres)")
    item = fields.integer(path, number, "item id", item)
    fields.check_unique(path, number, "item id", item, seen)
    ids.append(item)
    titles.append(title)
    genre_lists.append(_genre_list(path, number, genres))
  return _catalogue_from_lists(ids, titles, genre_lists)


def read_latest_items(directory: pathlib.Path) -> Catalogue:
  """``movies.csv`` (a header row, quoted titles); genres as in ml-1m."""
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
            raise fields.DataFormatError(
                path, 1, f"expected the header {','.join(header)!r}, "
                f"got {','.join(row)!r}")
          if number == 1 or not row:
            continue
          if len(row) != 3:
            raise fields.DataFormatError(
                path, number, f"expected 3 comma-separated fields "
                f"(movieId,title,genres), got {len(row)}")
          item = fields.integer(path, number, "item id", row[0])
          fields.check_unique(path, number, "item id", item, seen)
          ids.append(item)
          titles.append(row[1])
          genre_lists.append(_genre_list(path, number, row[2]))
      except csv.Error as error:
        raise fields.DataFormatError(
            path, reader.line_num, str(error)) from None
  except UnicodeDecodeError as error:
    raise fields.DataFormatError(
        path, None, f"not valid utf-8: {error}") from None
  return _catalogue_from_lists(ids, titles, genre_lists)


# ------------------------------------------------------------------- users


@dataclasses.dataclass(frozen=True, kw_only=True)
class Users:
  """The user file, in file order."""

  ids: list[int]
  age: list[int]
  gender: list[str]
  occupation: list[str]
  zip: list[str]


def _gender(path, number, text: str) -> str:
  if text not in ("M", "F"):
    raise fields.DataFormatError(
        path, number, f"gender={text!r} must be 'M' or 'F'")
  return text


def read_100k_users(directory: pathlib.Path) -> Users | None:
  """``u.user``, occupations checked against ``u.occupation``; None if none."""
  path = directory / "u.user"
  if not path.is_file():
    return None
  occupations = None
  if (directory / "u.occupation").is_file():
    occupations = {line.strip() for _, line in
                   fields.lines(directory / "u.occupation", "latin-1")}
  users = Users(ids=[], age=[], gender=[], occupation=[], zip=[])
  seen = {}
  for number, line in fields.lines(path, "latin-1"):
    user, age, gender, occupation, zip_code = fields.split(
        path, number, line, "|", "'|'", 5,
        " (id|age|gender|occupation|zip)")
    user = fields.integer(path, number, "user id", user)
    fields.check_unique(path, number, "user id", user, seen)
    if occupations is not None and occupation not in occupations:
      raise fields.DataFormatError(
          path, number, f"occupation={occupation!r} is not in u.occupation")
    users.ids.append(user)
    users.age.append(fields.integer(path, number, "age", age, hi=200))
    users.gender.append(_gender(path, number, gender))
    users.occupation.append(occupation)
    users.zip.append(zip_code)
  return users


def read_1m_users(directory: pathlib.Path) -> Users | None:
  """``users.dat`` (age and occupation codes checked), or None if absent."""
  path = directory / "users.dat"
  if not path.is_file():
    return None
  users = Users(ids=[], age=[], gender=[], occupation=[], zip=[])
  seen = {}
  for number, line in fields.lines(path, "latin-1"):
    user, gender, age, occupation, zip_code = fields.split(
        path, number, line, "::", "'::'", 5,
        " (UserID::Gender::Age::Occupation::Zip-code)")
    user = fields.integer(path, number, "user id", user)
    fields.check_unique(path, number, "user id", user, seen)
    age = fields.integer(path, number, "age", age)
    if age not in ML1M_AGE_BRACKETS:
      raise fields.DataFormatError(
          path, number,
          f"age={age} must be one of the codes {sorted(ML1M_AGE_BRACKETS)}")
    occupation = fields.integer(path, number, "occupation", occupation,
                      hi=len(ML1M_OCCUPATIONS) - 1)
    users.ids.append(user)
    users.age.append(age)
    users.gender.append(_gender(path, number, gender))
    users.occupation.append(ML1M_OCCUPATIONS[occupation])
    users.zip.append(zip_code)
  return users

