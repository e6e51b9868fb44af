"""k-anonymity and distinct l-diversity of a user table by Mondrian partitioning.

What this is NOT. k-anonymity is not differential privacy. It is a property of
one released table (every combination of quasi-identifier values is shared by
at least k records); it says nothing about what an adversary with other data
learns, it does not compose across releases, and it does not protect the
*interactions*: a handful of a user's ratings with approximate dates identifies
them in a public rating table (Narayanan & Shmatikov 2008, "Robust
de-anonymization of large sparse datasets", the Netflix Prize attack), whatever
was done to their demographics. Use ``privjax.answers.aggregates`` for releases
that need a formal guarantee; pseudonyms and hierarchies are in
``privjax.data.deidentify``.

``k_anonymize`` (LeFevre, DeWitt & Ramakrishnan 2006) returns the anonymized
table of e.g. ``RecDataset.users`` (columns ``age`` int, ``gender``,
``occupation``, ``zip`` str, plus an ``id``) and an ``AnonymizationReport``:

>>> users = {"id": np.array(["1", "2", "3", "4"]), "age": np.array([24, 27, 51, 53]),
...          "gender": np.array(["M", "F", "M", "M"]),
...          "occupation": np.array(["engineer", "programmer", "writer", "artist"]),
...          "zip": np.array(["85711", "85702", "94043", "94110"])}
>>> table, report = k_anonymize(users, k=2)
>>> sorted(table)
['age', 'gender', 'occupation', 'zip']
>>> [str(v) for v in table["age"]], [str(v) for v in table["zip"]]
(['24-27', '24-27', '51-53', '51-53'], ['857**', '857**', '94***', '94***'])
>>> report.num_classes, report.num_suppressed
(2, 0)
"""

import collections
import dataclasses
import math
import types
from collections.abc import Mapping, Sequence

import numpy as np

from privjax import _validate
from privjax.data import deidentify


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuasiIdentifier:
  """How one quasi-identifier column is partitioned and released.

  Attributes:
    name: the column.
    kind: ``"range"`` (integers; released as "lo-hi" of the class, e.g.
      "21-27"), ``"prefix"`` (strings in lexicographic order; released as the
      class's longest common prefix padded with "*", e.g. "857**"), or
      ``"hierarchy"`` (categorical; split top-down along ``hierarchy`` and
      released as the class's node, e.g. "technical" or "*").
    hierarchy: for ``"hierarchy"``: leaf -> path from "*" to the leaf, all
      paths the same length; every label sits at one place in the tree.
  """

  name: str
  kind: str
  hierarchy: Mapping[str, tuple[str, ...]] | None = None

  def __post_init__(self):
    _validate.one_of("kind", self.kind, {"range", "prefix", "hierarchy"})
    if (self.kind == "hierarchy") != (self.hierarchy is not None):
      raise ValueError(f"quasi-identifier {self.name!r}: a hierarchy is needed "
                       "for kind='hierarchy' and only for it")
    if self.hierarchy is not None:
      depths = {len(p) for p in self.hierarchy.values()}
      where = {}
      for leaf, path in self.hierarchy.items():
        if len(depths) != 1 or path[0] != "*" or path[-1] != leaf:
          raise ValueError(f"hierarchy of {self.name!r}: path {path!r} of "
                           f"{leaf!r} must run from '*' to the leaf, all paths "
                           "of one length")
        for depth, label in enumerate(path):
          if where.setdefault(label, path[:depth]) != path[:depth]:
            raise ValueError(f"hierarchy of {self.name!r}: label {label!r} "
                             "appears at two places")


MOVIELENS_QUASI_IDENTIFIERS = (
    QuasiIdentifier(name="age", kind="range"),
    QuasiIdentifier(name="zip", kind="prefix"),
    QuasiIdentifier(name="gender", kind="hierarchy",
                    hierarchy=deidentify.GENDER_HIERARCHY),
    QuasiIdentifier(name="occupation", kind="hierarchy",
                    hierarchy=deidentify.OCCUPATION_HIERARCHY),
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AnonymizationReport:
  """What ``k_anonymize`` did, and what it cost.

  Equivalence classes are counted on the *released* quasi-identifier values
  (what an adversary sees), so two Mondrian partitions that happen to release
  the same values count as one class.

  Information loss:
    ncp: normalized certainty penalty (Xu et al. 2006), the mean over records
      and quasi-identifiers of: for a range, (hi - lo) / (range of the
      column); for a prefix or hierarchy node covering c distinct values of
      the domain (zip: the distinct zips in the table; categorical: the
      hierarchy's leaves) out of |A|, 0 if c == 1 else c / |A|. A suppressed
      record counts 1 on every attribute. 0 = released as is, 1 = all
      released as "*".
    ncp_by_attribute: the same per quasi-identifier.
    discernibility: sum over classes of |E|^2, plus |suppressed| * N
      (Bayardo & Agrawal 2005); N * k at best for N kept records.
    normalized_avg_class_size: (kept / classes) / k (LeFevre et al. 2006); 1 is
      ideal.
  """

  k: int
  l: int | None
  num_records: int
  num_kept: int
  num_suppressed: int
  suppressed_by_reason: Mapping[str, int]
  num_classes: int
  min_class_size: int
  mean_class_size: float
  max_class_size: int
  ncp: float
  ncp_by_attribute: Mapping[str, float]
  discernibility: int
  normalized_avg_class_size: float


class _Encoded:
  """Per quasi-identifier codes for Mondrian plus what release and NCP need."""

  def __init__(self, qi: QuasiIdentifier, column: np.ndarray):
    self.qi = qi
    n = len(column)
    self.valid = np.ones(n, bool)
    if qi.kind == "range":
      values = np.asarray(column)
      if values.dtype.kind not in "iu":
        numeric = np.array([_as_int(v) for v in values], dtype=object)
        self.valid = np.array([v is not None for v in numeric])
        values = np.array([v if v is not None else 0 for v in numeric], np.int64)
      self.codes = values.astype(np.int64)
    elif qi.kind == "prefix":
      text = np.char.upper(np.char.strip(np.asarray(column).astype(str)))
      self.valid = np.char.str_len(text) > 0
      self.domain, self.codes = np.unique(text, return_inverse=True)
      self.codes = self.codes.reshape(-1)
      self.text = text
    else:
      text = np.asarray(column).astype(str)
      self.valid = np.array([t in qi.hierarchy for t in text], bool)
      self.depth = len(next(iter(qi.hierarchy.values())))
      # paths[level][row]: the row's ancestor label at that level.
      self.paths = np.array([qi.hierarchy.get(t, ("*",) * self.depth)
                             for t in text], dtype=str).reshape(n, self.depth).T
      self.leaves_under = collections.Counter(
          label for path in qi.hierarchy.values() for label in set(path))
      self.codes = np.unique(text, return_inverse=True)[1].reshape(-1)

  def width(self, rows, valid_rows) -> float:
    """Normalized spread of the partition on this attribute (0 = one value)."""
    codes = self.codes[rows]
    full = self.codes[valid_rows]
    if self.qi.kind == "hierarchy":
      total = len(np.unique(full))
      return (len(np.unique(codes)) - 1) / max(total - 1, 1)
    return (codes.max() - codes.min()) / max(full.max() - full.min(), 1)


def _as_int(value):
  try:
    f = float(value)
  except (TypeError, ValueError):
    return None
  return int(f) if math.isfinite(f) and f == int(f) else None


def _common_prefix(a: str, b: str) -> str:
  i = 0
  while i < min(len(a), len(b)) and a[i] == b[i]:
    i += 1
  return a[:i]


def k_anonymize(table: Mapping[str, np.ndarray], *, k: int,
                quasi_identifiers: Sequence[QuasiIdentifier] = (
                    MOVIELENS_QUASI_IDENTIFIERS),
                sensitive: str | None = None, l: int | None = None,
                drop: Sequence[str] = deidentify.DIRECT_IDENTIFIERS,
                pseudonym_key: deidentify.PseudonymKey | None = None,
                id_column: str = "id",
                ) -> tuple[dict[str, np.ndarray], AnonymizationReport]:
  """A k-anonymous (optionally distinct l-diverse) release of ``table`` by Mondrian.

  Guarantee (syntactic, NOT differential privacy; see the module docstring):
  in the returned table every combination of released quasi-identifier values
  is shared by at least ``k`` records, and, with ``l``, those records hold at
  least ``l`` distinct values of ``sensitive``. Each released value is true of
  the record (its age lies in the range, its zip starts with the prefix, its
  occupation lies under the node).

  Algorithm: Mondrian (LeFevre et al. 2006), top down, with partitions that
  never overlap. A partition is split on the quasi-identifier with the widest
  normalized spread that admits an allowable split (every part keeps >= k
  records and >= l distinct sensitive values):

  * range: at the most balanced allowable cut between distinct values (the
    median when that is allowable);
  * prefix: likewise, but only at cuts between different next characters after
    the partition's common prefix, so that classes keep long common prefixes;
  * hierarchy: into the children of the partition's node; children too small
    to stand alone stay together at the parent node (if that leftover group is
    allowable), so one rare category does not block the others. A partition
    whose records all sit under one child moves down to it.

  Partitions that admit no split are the classes.

  Suppression: records whose quasi-identifier cannot be placed (missing age,
  empty zip, a category not in the hierarchy) are removed and counted by
  reason; if the remaining records cannot form even one allowable class (fewer
  than k, or fewer than l distinct sensitive values), all are suppressed.

  Args:
    table: equal-length columns, e.g. ``RecDataset.users`` plus an id column.
    k: the anonymity parameter (>= 1).
    quasi_identifiers: how to treat each quasi-identifier column.
    sensitive: the sensitive column for l-diversity (kept as is in the output).
    l: distinct l-diversity parameter; needs ``sensitive``.
    drop: direct identifiers removed from the output.
    pseudonym_key: if given, the output gets a ``pseudonym`` column computed
      from ``id_column`` with ``deidentify.pseudonymize`` (before
      ``id_column`` is dropped).
    id_column: the id column for pseudonyms.

  Returns:
    (the anonymized table: kept rows in input order, quasi-identifiers as
    released strings, other non-dropped columns unchanged; the report).

  >>> users = {"age": np.array([30, 31, 32, 33]), "gender": np.array(["F"] * 4),
  ...          "occupation": np.array(["doctor", "healthcare"] * 2),
  ...          "zip": np.array(["02139", "02140", "02141", "02142"])}
  >>> out, report = k_anonymize(users, k=4)
  >>> [str(out[c][0]) for c in ("age", "zip", "gender", "occupation")]
  ['30-33', '021**', 'F', 'health']
  >>> report.num_classes, report.min_class_size
  (1, 4)
  """
  if not (isinstance(k, (int, np.integer)) and k >= 1):
    raise ValueError(f"k={k!r} must be an int >= 1")
  if l is not None:
    if not (isinstance(l, (int, np.integer)) and l >= 1):
      raise ValueError(f"l={l!r} must be an int >= 1")
    if sensitive is None or sensitive not in table:
      raise ValueError(f"l={l} needs a sensitive column; got sensitive={sensitive!r}")
  names = [qi.name for qi in quasi_identifiers]
  for name in names + ([sensitive] if sensitive else []):
    if name not in table:
      raise ValueError(f"column {name!r} not in table (columns: {sorted(table)})")
  if sensitive in names:
    raise ValueError(f"sensitive={sensitive!r} cannot also be a quasi-identifier")
  n = len(table[names[0]])
  for name, column in table.items():
    if len(column) != n:
      raise ValueError(f"column {name!r} has {len(column)} rows, expected {n}")

  encoded = [_Encoded(qi, np.asarray(table[qi.name])) for qi in quasi_identifiers]
  reasons = collections.Counter()
  valid = np.ones(n, bool)
  for enc in encoded:
    bad = ~enc.valid & valid
    if bad.any():
      reasons[f"missing or unknown {enc.qi.name}"] += int(bad.sum())
    valid &= enc.valid
  sens_codes = (np.unique(np.asarray(table[sensitive]).astype(str),
                          return_inverse=True)[1].reshape(-1)
                if sensitive else None)

  def allowable(rows) -> bool:
    if len(rows) < k:
      return False
    return l is None or len(np.unique(sens_codes[rows])) >= l

  valid_rows = np.flatnonzero(valid)
  classes = []  # (rows, {hierarchy qi index: node level})
  if len(valid_rows) and allowable(valid_rows):
    stack = [(valid_rows, {i: 0 for i, e in enumerate(encoded)
                           if e.qi.kind == "hierarchy"})]
    while stack:
      rows, levels = stack.pop()
      levels = dict(levels)
      for i, level in levels.items():  # free moves down a one-child node
        while (level + 1 < encoded[i].depth and
               len(np.unique(encoded[i].paths[level + 1][rows])) == 1):
          level += 1
        levels[i] = level
      widths = [enc.width(rows, valid_rows) for enc in encoded]
      for i in sorted(range(len(encoded)), key=lambda i: -widths[i]):
        parts = (_split(encoded[i], rows, levels.get(i), allowable)
                 if widths[i] > 0 else None)
        if parts is not None:
          for part, level in parts:
            stack.append((part, levels if level is None else {**levels, i: level}))
          break
      else:  # no quasi-identifier admits a split: this is a class
        classes.append((rows, levels))
  elif len(valid_rows):
    reasons["no allowable class"] += len(valid_rows)

  kept = np.zeros(n, bool)
  released = {name: np.empty(n, dtype=object) for name in names}
  ncp = np.zeros((n, len(encoded)))
  for rows, levels in classes:
    kept[rows] = True
    for i, enc in enumerate(encoded):
      value, penalty = _release(enc, rows, levels.get(i), valid_rows)
      released[enc.qi.name][rows] = value
      ncp[rows, i] = penalty
  ncp[~kept] = 1.0

  out = {}
  if pseudonym_key is not None:
    if id_column not in table:
      raise ValueError(f"id_column={id_column!r} not in table")
    out["pseudonym"] = deidentify.pseudonymize(
        np.asarray(table[id_column])[kept], pseudonym_key)
  for name, column in table.items():
    if name in set(drop):
      continue
    out[name] = (released[name][kept].astype(str) if name in released
                 else np.asarray(column)[kept])

  _, sizes = deidentify.equivalence_classes(out, names)
  num_kept = int(kept.sum())
  report = AnonymizationReport(
      k=int(k), l=None if l is None else int(l), num_records=n,
      num_kept=num_kept, num_suppressed=n - num_kept,
      suppressed_by_reason=types.MappingProxyType(dict(reasons)),
      num_classes=len(sizes),
      min_class_size=int(sizes.min()) if len(sizes) else 0,
      mean_class_size=float(sizes.mean()) if len(sizes) else 0.0,
      max_class_size=int(sizes.max()) if len(sizes) else 0,
      ncp=float(ncp.mean()) if n else 0.0,
      ncp_by_attribute=types.MappingProxyType(
          {name: float(ncp[:, i].mean()) if n else 0.0
           for i, name in enumerate(names)}),
      discernibility=int((sizes.astype(np.int64)**2).sum() + (n - num_kept) * n),
      normalized_avg_class_size=(num_kept / len(sizes) / k) if len(sizes) else 0.0)
  return out, report


def _split(enc: _Encoded, rows, level, allowable):
  """An allowable split of ``rows`` on ``enc`` as [(rows, node level)], or None."""
  if enc.qi.kind == "hierarchy":
    if level + 1 >= enc.depth:
      return None
    children = enc.paths[level + 1][rows]
    groups = [rows[children == c] for c in np.unique(children)]
    alone = [g for g in groups if allowable(g)]
    rest = [g for g in groups if not allowable(g)]
    parts = [(g, level + 1) for g in alone]
    if rest:
      leftover = np.concatenate(rest)
      if not allowable(leftover):
        return None
      parts.append((leftover, level))
    return parts if alone and len(parts) > 1 else None
  rows = rows[np.argsort(enc.codes[rows], kind="stable")]
  if enc.qi.kind == "range":
    group = enc.codes[rows]
  else:
    texts = enc.text[rows]
    p = len(_common_prefix(texts[0], texts[-1]))
    group = np.array([t[p:p + 1] for t in texts])
  cuts = np.flatnonzero(group[1:] != group[:-1]) + 1
  for cut in sorted(cuts, key=lambda c: abs(2 * c - len(rows))):
    if allowable(rows[:cut]) and allowable(rows[cut:]):
      return [(rows[:cut], None), (rows[cut:], None)]
  return None


def _release(enc: _Encoded, rows, level, valid_rows):
  """(released value, NCP) of the class ``rows`` on ``enc``."""
  if enc.qi.kind == "range":
    lo, hi = int(enc.codes[rows].min()), int(enc.codes[rows].max())
    full = enc.codes[valid_rows]
    span = max(int(full.max()) - int(full.min()), 1)
    return (str(lo) if lo == hi else f"{lo}-{hi}"), (hi - lo) / span
  if enc.qi.kind == "prefix":
    first, last = enc.domain[enc.codes[rows].min()], enc.domain[enc.codes[rows].max()]
    prefix = _common_prefix(first, last)
    width = max(len(z) for z in enc.text[rows])
    value = prefix + "*" * (width - len(prefix))
    present = np.unique(enc.codes[valid_rows])
    covered = sum(1 for c in present if enc.domain[c].startswith(prefix))
    return value, (0.0 if covered == 1 else covered / len(present))
  label = enc.paths[level][rows[0]]
  covered = enc.leaves_under[label]
  return label, (0.0 if covered == 1 else covered / len(enc.qi.hierarchy))
