"""Checked lines and fields of MovieLens text files, and the error that names them.

Private to ``privjax.data.movielens``, which re-exports ``DataFormatError``.
Every check raises ``DataFormatError`` naming the file, the 1-based line and
the problem.
"""

import math
import pathlib

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1


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


def lines(path: pathlib.Path, encoding: str, skip: int = 0):
  """Yields (1-based number, line without newline), skipping empty lines.

  The first ``skip`` lines (a header) are skipped too.
  """
  try:
    with open(path, encoding=encoding) as f:
      for number, line in enumerate(f, start=1):
        line = line.rstrip("\n")
        if number > skip and line:
          yield number, line
  except UnicodeDecodeError as error:
    raise DataFormatError(
        path, None, f"not valid {encoding}: {error}") from None


def split(path, number, line, separator, separator_name, count, what=""):
  """``line`` split at ``separator`` into exactly ``count`` fields.

  >>> split("u.item", 3, "1|Toy Story (1995)", "|", "'|'", 2)
  ['1', 'Toy Story (1995)']
  """
  fields = line.split(separator)
  if len(fields) != count:
    raise DataFormatError(
        path, number,
        f"expected {count} {separator_name}-separated fields{what}, "
        f"got {len(fields)}")
  return fields


def integer(path, number, what: str, text: str, *, lo: int = 0,
            hi: int = INT32_MAX) -> int:
  """``text`` as an int in [lo, hi]; ``what`` names the field in errors.

  >>> integer("f", 1, "age", "42", hi=200)
  42
  """
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


def rating(path, number, text: str, half_stars: bool) -> float:
  """A rating: whole stars 1-5, or with ``half_stars`` 0.5, 1.0, ..., 5.0.

  >>> rating("f", 1, "3.5", half_stars=True), rating("f", 1, "4", half_stars=False)
  (3.5, 4.0)
  """
  if not half_stars:
    return float(integer(path, number, "rating", text, lo=1, hi=5))
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


def check_unique(path, number, what: str, value: int, seen: dict[int, int]):
  """Records ``value`` at line ``number`` in ``seen``; raises if already there."""
  if value in seen:
    raise DataFormatError(
        path, number, f"{what} {value} already appears on line {seen[value]}")
  seen[value] = number


def check_header(path: pathlib.Path, encoding: str, header: str) -> None:
  """Raises unless the first line of ``path`` is exactly ``header``."""
  try:
    with open(path, encoding=encoding) as f:
      first = f.readline().rstrip("\n")
  except UnicodeDecodeError as error:
    raise DataFormatError(path, 1, f"not valid {encoding}: {error}") from None
  if first != header:
    raise DataFormatError(
        path, 1, f"expected the header {header!r}, got {first!r}")
