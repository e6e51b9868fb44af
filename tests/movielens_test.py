"""Tests for privjax.data.movielens (raw GroupLens files) and privjax.data.tfds.

Every format gets a small fixture folder written here (never the real data);
the real ml-100k is checked only when present (``ml100k_path`` skips).
"""

import pathlib
import sys

import numpy as np
import pytest

from privjax.data import movielens
from privjax.data import tfds

_FLAGS_100K = {  # item id -> genre columns set in u.item (indices into 19)
    1: (3, 4, 5),  # Animation, Children's, Comedy
    2: (8,),  # Drama
    5: (0,),  # unknown
}

# Each fixture: {file name: lines}. Files end with a blank trailing line.
FIXTURES = {
    "ml-100k": {
        "u.genre": [f"{name}|{i}" for i, name in
                    enumerate(movielens.ML100K_GENRES)],
        "u.occupation": ["administrator", "technician", "writer", "other"],
        "u.item": [
            f"{item}|{title}|01-Jan-1995||http://us.imdb.com/x|" + "|".join(
                "1" if g in _FLAGS_100K[item] else "0" for g in range(19))
            for item, title in ((1, "Toy Story (1995)"),
                                (2, "Café au lait (1993)"),
                                (5, "Mystery Item (1997)"))],
        "u.user": ["1|24|M|technician|85711", "2|53|F|other|94043",
                   "4|33|M|writer|T8H1N"],
        "u.data": ["4\t5\t3\t881250949", "1\t1\t5\t874965758",
                   "2\t2\t1\t888551111", "1\t2\t4\t876893171",
                   "4\t1\t2\t881250950"],
    },
    "ml-1m": {
        "movies.dat": [
            "1::Toy Story (1995)::Animation|Children's|Comedy",
            "2::Jumanji (1995)::Adventure|Children's|Fantasy",
            "10::Café Society (1995)::Drama"],
        "users.dat": ["1::F::1::10::48067", "2::M::56::16::70072",
                      "6040::M::25::0::11106-3333"],
        "ratings.dat": ["1::1::5::978300760", "6040::10::3::978300761",
                        "2::2::4::978300762", "1::10::1::978300763"],
    },
    "ml-latest-small": {
        "movies.csv": [
            "movieId,title,genres",
            "1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy",
            '3,"American President, The (1995)",Comedy|Drama|Romance',
            '2,"Crazy ""Quoted"" Film, The (2000)",(no genres listed)',
            "200000,Café IMAX Tour (2011),IMAX|Documentary"],
        "ratings.csv": [
            "userId,movieId,rating,timestamp", "1,1,4.0,964982703",
            "610,200000,0.5,1493845360", "1,3,5.0,964982931",
            "20,2,3.5,1100000000"],
    },
}

_ENCODING = {"ml-100k": "latin-1", "ml-1m": "latin-1",
             "ml-latest-small": "utf-8"}


def _write(root: pathlib.Path, fmt: str, changes=None, *, name=None,
           files=None) -> pathlib.Path:
  """Writes fixture ``fmt`` to root/name (default root/fmt).

  ``changes`` maps a file to (1-based line, text) replacing that line (or
  appending past the end); ``files`` overrides whole files.
  """
  folder = root / (name or fmt)
  folder.mkdir(parents=True)
  for filename, lines in {**FIXTURES[fmt], **(files or {})}.items():
    lines = list(lines)
    if changes and filename in changes:
      line, text = changes[filename]
      if line <= len(lines):
        lines[line - 1] = text
      else:
        lines.append(text)
    content = "\n".join(lines) + "\n\n"
    (folder / filename).write_bytes(content.encode(_ENCODING[fmt]))
  return folder


def test_ml100k_fixture(tmp_path):
  folder = _write(tmp_path, "ml-100k")
  assert b"Caf\xe9" in (folder / "u.item").read_bytes()  # really latin-1
  data = movielens.load(folder)
  assert data.name == "ml-100k"
  assert (data.num_users, data.num_items, data.num_interactions) == (3, 3, 5)
  assert data.raw_item_ids == ("1", "2", "5")
  assert data.raw_user_ids == ("1", "2", "4")
  assert data.item_titles == (
      "Toy Story (1995)", "Café au lait (1993)", "Mystery Item (1997)")
  # Dense indices follow raw-id order; ratings keep the file order.
  np.testing.assert_array_equal(data.user, [2, 0, 1, 0, 2])
  np.testing.assert_array_equal(data.item, [2, 0, 1, 1, 0])
  np.testing.assert_array_equal(data.rating, [3, 5, 1, 4, 2])
  np.testing.assert_array_equal(
      data.timestamp,
      [881250949, 874965758, 888551111, 876893171, 881250950])
  assert data.user.dtype == np.int32 and data.item.dtype == np.int32
  assert data.rating.dtype == np.float32
  assert data.timestamp.dtype == np.int64
  assert data.genre_names == movielens.ML100K_GENRES
  assert data.item_genres.dtype == bool
  assert data.item_genres.shape == (3, 19)
  for row, item in enumerate((1, 2, 5)):
    assert tuple(np.flatnonzero(data.item_genres[row])) == _FLAGS_100K[item]
  users = data.users
  assert users["age"].tolist() == [24, 53, 33]
  assert users["gender"].tolist() == ["M", "F", "M"]
  assert users["occupation"].tolist() == ["technician", "other", "writer"]
  assert users["zip"].tolist() == ["85711", "94043", "T8H1N"]


def test_ml100k_genres_from_u_genre_and_default(tmp_path):
  renamed = [f"G{i}|{i}" for i in range(19)]
  folder = _write(tmp_path, "ml-100k", name="renamed",
                  files={"u.genre": renamed})
  assert movielens.load(folder).genre_names == tuple(
      f"G{i}" for i in range(19))
  folder = _write(tmp_path, "ml-100k")
  (folder / "u.genre").unlink()
  assert movielens.load(folder).genre_names == movielens.ML100K_GENRES


def test_ml1m_fixture(tmp_path):
  folder = _write(tmp_path, "ml-1m")
  assert b"Caf\xe9" in (folder / "movies.dat").read_bytes()
  data = movielens.load(folder)
  assert data.name == "ml-1m"
  assert (data.num_users, data.num_items, data.num_interactions) == (3, 3, 4)
  assert data.raw_item_ids == ("1", "2", "10")
  assert data.raw_user_ids == ("1", "2", "6040")
  assert data.item_titles == (
      "Toy Story (1995)", "Jumanji (1995)", "Café Society (1995)")
  np.testing.assert_array_equal(data.user, [0, 2, 1, 0])
  np.testing.assert_array_equal(data.item, [0, 2, 1, 2])
  np.testing.assert_array_equal(data.rating, [5, 3, 4, 1])
  np.testing.assert_array_equal(
      data.timestamp, [978300760, 978300761, 978300762, 978300763])
  assert data.genre_names == (
      "Adventure", "Animation", "Children's", "Comedy", "Drama", "Fantasy")
  np.testing.assert_array_equal(data.item_genres, [
      [0, 1, 1, 1, 0, 0], [1, 0, 1, 0, 0, 1], [0, 0, 0, 0, 1, 0]])
  users = data.users
  assert users["age"].tolist() == [1, 56, 25]  # bracket codes
  assert users["gender"].tolist() == ["F", "M", "M"]
  assert users["occupation"].tolist() == [
      "K-12 student", "self-employed", "other/not specified"]
  assert users["zip"].tolist() == ["48067", "70072", "11106-3333"]


def test_ml_latest_small_fixture(tmp_path):
  data = movielens.load(_write(tmp_path, "ml-latest-small"))
  assert data.name == "ml-latest-small"
  assert data.users is None
  assert (data.num_users, data.num_items, data.num_interactions) == (3, 4, 4)
  assert data.raw_item_ids == ("1", "2", "3", "200000")
  assert data.raw_user_ids == ("1", "20", "610")
  assert data.item_titles == (
      "Toy Story (1995)", 'Crazy "Quoted" Film, The (2000)',
      "American President, The (1995)", "Café IMAX Tour (2011)")
  np.testing.assert_array_equal(data.user, [0, 2, 0, 1])
  np.testing.assert_array_equal(data.item, [0, 3, 2, 1])
  np.testing.assert_array_equal(data.rating, [4.0, 0.5, 5.0, 3.5])
  np.testing.assert_array_equal(
      data.timestamp, [964982703, 1493845360, 964982931, 1100000000])
  assert data.genre_names == (
      "Adventure", "Animation", "Children", "Comedy", "Documentary", "Drama",
      "Fantasy", "IMAX", "Romance")
  names = np.array(data.genre_names)
  genres = [tuple(names[row]) for row in data.item_genres]
  assert genres == [
      ("Adventure", "Animation", "Children", "Comedy", "Fantasy"),
      (),  # (no genres listed)
      ("Comedy", "Drama", "Romance"),
      ("Documentary", "IMAX")]


def test_folder_name_used_only_when_it_looks_like_movielens(tmp_path):
  folder = _write(tmp_path, "ml-latest-small")
  folder = folder.rename(tmp_path / "ml-25m")
  assert movielens.load(folder).name == "ml-25m"
  folder = folder.rename(tmp_path / "data")
  assert movielens.load(folder).name == "ml-latest"


def test_user_only_in_ratings_gets_empty_demographics(tmp_path):
  folder = _write(tmp_path, "ml-100k", {"u.data": (6, "3\t2\t4\t881250951")})
  data = movielens.load(folder)
  assert data.raw_user_ids == ("1", "2", "3", "4")
  assert data.user[-1] == 2
  assert data.users["age"].tolist() == [24, 53, -1, 33]
  assert data.users["gender"].tolist() == ["M", "F", "", "M"]
  assert data.users["zip"][2] == ""


def test_blank_lines_are_skipped(tmp_path):
  folder = _write(tmp_path, "ml-1m", {"ratings.dat": (2, "")})
  assert movielens.load(folder).num_interactions == 3


# (format, file, 1-based line, replacement text, words the message must hold)
MALFORMED = [
    ("ml-100k", "u.data", 3, "2\t2\t1",
     "expected 4 tab-separated fields, got 3"),
    ("ml-100k", "u.data", 2, "1\t1\t5\t874965758\t9", "got 5"),
    ("ml-100k", "u.data", 4, "1\tx\t4\t876893171",
     "item id='x' is not an integer"),
    ("ml-100k", "u.data", 1, "-4\t5\t3\t881250949",
     "user id=-4 is out of range"),
    ("ml-100k", "u.data", 5, "4\t1\t6\t881250950", "rating=6 is out of range"),
    ("ml-100k", "u.data", 5, "4\t1\t3.0\t881250950",
     "rating='3.0' is not an integer"),
    ("ml-100k", "u.data", 2, "1\t1\t5\t87496575x", "timestamp='87496575x'"),
    ("ml-100k", "u.data", 2, "1\t1\t5\t-1", "timestamp=-1 is out of range"),
    ("ml-100k", "u.data", 3, "2\t3\t1\t888551111",
     "item id 3 is not in u.item"),
    ("ml-100k", "u.data", 6, " ", "expected 4 tab-separated fields, got 1"),
    ("ml-100k", "u.item", 2, "2|Café au lait (1993)|01-Jan-1995||url|0|0",
     "expected 24 '|'-separated fields"),
    ("ml-100k", "u.item", 3, "5|X|d||u|" + "|".join(["0"] * 18 + ["2"]),
     "genre flag Western='2' must be 0 or 1"),
    ("ml-100k", "u.item", 3, "1|Dup|d||u|" + "|".join(["0"] * 19),
     "item id 1 already appears on line 1"),
    ("ml-100k", "u.user", 2, "2|fifty|F|other|94043", "age='fifty'"),
    ("ml-100k", "u.user", 3, "4|33|X|writer|T8H1N", "gender='X'"),
    ("ml-100k", "u.user", 1, "1|24|M|astronaut|85711", "not in u.occupation"),
    ("ml-100k", "u.genre", 2, "Action|7", "genre index 7, expected 1"),
    ("ml-1m", "ratings.dat", 2, "6040::10::3",
     "expected 4 '::'-separated fields, got 3"),
    ("ml-1m", "ratings.dat", 3, "2:::2::4::978300762", "item id=':2'"),
    ("ml-1m", "ratings.dat", 3, "2::2::4.5::978300762", "rating='4.5'"),
    ("ml-1m", "ratings.dat", 4, "1::11::1::978300763",
     "item id 11 is not in movies.dat"),
    ("ml-1m", "ratings.dat", 4, "1::10::1::97830\t0763", "tab character"),
    ("ml-1m", "movies.dat", 2, "2::Jumanji (1995)",
     "expected 3 '::'-separated fields"),
    ("ml-1m", "movies.dat", 3, "10::X::Drama||War", "empty genre name"),
    ("ml-1m", "users.dat", 2, "2::M::20::16::70072", "age=20 must be one of"),
    ("ml-1m", "users.dat", 3, "6040::M::25::21::11106",
     "occupation=21 is out of range"),
    ("ml-1m", "users.dat", 1, "1::F::1::10",
     "expected 5 '::'-separated fields"),
    ("ml-latest-small", "ratings.csv", 1, "user,movie,rating,timestamp",
     "expected the header"),
    ("ml-latest-small", "ratings.csv", 3, "610,200000,5.5,1493845360",
     "rating='5.5' must be one of 0.5"),
    ("ml-latest-small", "ratings.csv", 3, "610,200000,3.25,1493845360",
     "rating='3.25'"),
    ("ml-latest-small", "ratings.csv", 3, "610,200000,nan,1493845360",
     "rating='nan'"),
    ("ml-latest-small", "ratings.csv", 4, "1,3,5.0",
     "expected 4 comma-separated fields, got 3"),
    ("ml-latest-small", "ratings.csv", 5, "20,4,3.5,1100000000",
     "item id 4 is not in movies.csv"),
    ("ml-latest-small", "ratings.csv", 5, "20,2,3.5,11e8", "timestamp='11e8'"),
    ("ml-latest-small", "movies.csv", 3, "3,American President",
     "expected 3 comma-separated fields"),
    ("ml-latest-small", "movies.csv", 5, "x,Title (2011),Drama", "item id='x'"),
    ("ml-latest-small", "movies.csv", 1, "id,title,genres",
     "expected the header"),
]


@pytest.mark.parametrize(
    "fmt,filename,line,text,words", MALFORMED,
    ids=[f"{m[0]}-{m[1]}-{m[4][:30]}" for m in MALFORMED])
def test_malformed_row_names_file_and_line(tmp_path, fmt, filename, line, text,
                                           words):
  folder = _write(tmp_path, fmt, {filename: (line, text)})
  with pytest.raises(movielens.DataFormatError) as error:
    movielens.load(folder)
  assert isinstance(error.value, ValueError)
  message = str(error.value)
  assert message.startswith(f"{folder / filename}:{line}: "), message
  assert words in message, message
  assert error.value.line == line
  assert error.value.path == folder / filename


def _big_ratings(n: int):
  rng = np.random.default_rng(0)
  user = rng.integers(1, 500, n)
  item = rng.choice([1, 2, 3, 200000], n)
  rating = rng.integers(1, 11, n) / 2
  timestamp = rng.integers(800_000_000, 1_700_000_000, n)
  rows = [f"{u},{i},{r},{t}" for u, i, r, t in zip(
      user.tolist(), item.tolist(), rating.tolist(), timestamp.tolist())]
  return rows, user, item, rating, timestamp


def test_large_ratings_file_round_trips(tmp_path):
  rows, user, item, rating, timestamp = _big_ratings(30_000)
  files = {"ratings.csv": ["userId,movieId,rating,timestamp"] + rows}
  data = movielens.load(_write(tmp_path, "ml-latest-small", files=files))
  np.testing.assert_array_equal(data.rating, rating.astype(np.float32))
  np.testing.assert_array_equal(data.timestamp, timestamp)
  np.testing.assert_array_equal(np.array(data.raw_user_ids, int)[data.user],
                                user)
  np.testing.assert_array_equal(np.array(data.raw_item_ids, int)[data.item],
                                item)
  assert data.raw_user_ids == tuple(str(u) for u in np.unique(user))


@pytest.mark.parametrize("bad,words", [
    ("7,2,4.5,-3", "timestamp=-3 is out of range"),  # vectorised check fails
    ("7,2,4.5", "expected 4 comma-separated fields, got 3"),  # loadtxt fails
])
def test_error_deep_in_a_large_file_after_blank_lines(tmp_path, bad, words):
  """Blank lines shift data rows against file lines; both failure paths of
  the fast reader must still name the file line."""
  rows, *_ = _big_ratings(30_000)
  lines = ["userId,movieId,rating,timestamp"] + rows
  lines[100:100] = ["", ""]
  lines[500:500] = [""]
  lines[29_000] = bad
  files = {"ratings.csv": lines}
  folder = _write(tmp_path, "ml-latest-small", files=files)
  with pytest.raises(movielens.DataFormatError,
                     match=f"ratings.csv:29001: {words}"):
    movielens.load(folder)


def test_windows_line_endings(tmp_path):
  folder = _write(tmp_path, "ml-latest-small")
  expected = movielens.load(folder)
  for name in ("ratings.csv", "movies.csv"):
    path = folder / name
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
  data = movielens.load(folder)
  assert data.item_titles == expected.item_titles
  np.testing.assert_array_equal(data.rating, expected.rating)
  np.testing.assert_array_equal(data.item_genres, expected.item_genres)


def test_missing_folder(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(FileNotFoundError, match="nowhere") as error:
    movielens.load(missing)
  assert "u.data" in str(error.value) and "ratings.csv" in str(error.value)


def test_unknown_format(tmp_path):
  (tmp_path / "notes.txt").write_text("not movielens\n")
  with pytest.raises(FileNotFoundError) as error:
    movielens.load(tmp_path)
  message = str(error.value)
  assert str(tmp_path) in message
  for name in ("u.data", "u.item", "ratings.dat", "movies.dat", "ratings.csv",
               "movies.csv"):
    assert name in message


def test_incomplete_format_names_the_missing_file(tmp_path):
  folder = _write(tmp_path, "ml-100k")
  (folder / "u.item").unlink()
  with pytest.raises(FileNotFoundError, match="not u.item"):
    movielens.load(folder)


def test_real_ml100k(ml100k_path):
  data = movielens.load(ml100k_path)
  assert data.name == "ml-100k"
  assert (data.num_users, data.num_items, data.num_interactions) == (
      943, 1682, 100_000)
  assert data.item_titles[0] == "Toy Story (1995)"
  assert data.raw_item_ids[0] == "1"
  assert data.genre_names == movielens.ML100K_GENRES
  toy_story = [data.genre_names[j] for j in np.flatnonzero(data.item_genres[0])]
  assert toy_story == ["Animation", "Children's", "Comedy"]
  user = data.raw_user_ids.index("1")
  assert data.users["age"][user] == 24
  assert data.users["gender"][user] == "M"
  assert data.users["occupation"][user] == "technician"
  assert data.users["zip"][user] == "85711"
  # The first line of u.data is "196 242 3 881250949".
  assert data.raw_user_ids[data.user[0]] == "196"
  assert data.raw_item_ids[data.item[0]] == "242"
  assert (data.rating[0], data.timestamp[0]) == (3.0, 881250949)
  assert set(np.unique(data.rating).tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}
  assert len(np.unique(data.user)) == 943


# --------------------------------------------------------------------- tfds


def test_tfds_missing_raises_import_error_naming_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(ImportError, match=r'pip install -e "\.\[tfds\]"'):
    tfds.load("movielens/100k-ratings")


@pytest.mark.parametrize("name", ["mnist", "movielens/100k-movies", ""])
def test_tfds_rejects_names_that_are_not_movielens_ratings(name):
  with pytest.raises(ValueError, match="ratings"):
    tfds.load(name)
