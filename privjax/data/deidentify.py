"""De-identifying a user table: keyed pseudonyms, direct identifiers, generalization.

None of this is anonymity, let alone differential privacy. Anyone with the key,
or with enough side information, re-links pseudonyms, and pseudonymous data is
still personal data; generalized quasi-identifiers only lower the obvious risk.
``privjax.data.anonymize`` builds k-anonymous releases from these pieces, and
``privjax.answers.aggregates`` gives releases with a formal guarantee.

* ``pseudonymize``: keyed HMAC-SHA256 pseudonyms (``load_key`` reads the key
  from a file or an environment variable; the key is never printed).
* ``generalize``: full-domain generalization along fixed hierarchies
  (age: exact, 5-, 10-, 20-year ranges, ``*``; zip: 5, 3, 2, 1, 0 leading
  characters; occupation: job, category, ``*``; gender: exact, ``*``).
"""

import base64
import hashlib
import hmac
import os
import pathlib
import types
from collections.abc import Mapping, Sequence

import numpy as np

from privjax import _validate

MIN_KEY_BYTES = 16
KEY_ENV_VAR = "PRIVJAX_PSEUDONYM_KEY"
# Columns removed from every output by default (direct identifiers).
DIRECT_IDENTIFIERS = ("id", "user_id", "name", "email", "phone", "address", "ssn")

# =============================================================================
# Pseudonymization
# =============================================================================


class PseudonymKey:
  """A secret HMAC key. Its repr never shows the key, and it refuses to be pickled.

  >>> PseudonymKey(b"0123456789abcdef")
  PseudonymKey(<16 bytes, redacted>)
  """

  __slots__ = ("_key",)

  def __init__(self, key: bytes):
    if not isinstance(key, bytes):
      raise TypeError(f"key must be bytes, got {type(key).__name__}")
    if len(key) < MIN_KEY_BYTES:
      raise ValueError(f"pseudonym key has {len(key)} bytes; need at least "
                       f"{MIN_KEY_BYTES}")
    self._key = key

  def __repr__(self):
    return f"PseudonymKey(<{len(self._key)} bytes, redacted>)"

  __str__ = __repr__

  def __reduce__(self):
    # Keeps the key out of pickles, checkpoints and multiprocessing payloads.
    raise TypeError("a PseudonymKey is not picklable; load it where it is used")

  def mac(self, message: bytes) -> bytes:
    return hmac.new(self._key, message, hashlib.sha256).digest()


def load_key(path: str | os.PathLike | None = None,
             env_var: str = KEY_ENV_VAR) -> PseudonymKey:
  """Reads the pseudonymization key from ``path``, else from ``$env_var``.

  A file's bytes are used as they are, except that one trailing newline is
  dropped (so ``openssl rand -hex 32 > key`` works); an environment variable
  is used as its UTF-8 bytes. The key must have at least 16 bytes. Errors name
  the source, never the key.

  Args:
    path: a key file, or ``None`` to read ``$env_var``.
    env_var: the environment variable read when ``path`` is ``None``.

  Returns:
    The key, as a ``PseudonymKey`` that never prints it.

  >>> os.environ["DOCTEST_KEY"] = "a long enough secret"
  >>> load_key(env_var="DOCTEST_KEY")
  PseudonymKey(<20 bytes, redacted>)
  """
  if path is not None:
    path = pathlib.Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"pseudonym key file {str(path)!r} not found")
    key, source = path.read_bytes(), f"file {str(path)!r}"
    key = key[:-2] if key.endswith(b"\r\n") else key.removesuffix(b"\n")
  else:
    value = os.environ.get(env_var)
    if not value:
      raise ValueError(f"no pseudonym key: pass path= or set ${env_var}")
    key, source = value.encode("utf-8"), f"${env_var}"
  if len(key) < MIN_KEY_BYTES:
    raise ValueError(f"pseudonym key from {source} has {len(key)} bytes; need "
                     f"at least {MIN_KEY_BYTES}")
  return PseudonymKey(key)


_MAX_LENGTH = {"hex": 64, "base32": 52}


def pseudonymize(ids, key: PseudonymKey, *, length: int = 16,
                 alphabet: str = "hex") -> np.ndarray:
  """Keyed pseudonyms: HMAC-SHA256(key, str(id)) truncated to ``length`` characters.

  The same id and key always give the same pseudonym; another key gives an
  unrelated one. Ids are taken as ``str(id)`` (so 7 and "7" collide on
  purpose). ``alphabet`` is ``"hex"`` (4 bits a character, up to 64) or
  lower-case ``"base32"`` (5 bits, up to 52). The default 16 hex characters are
  64 bits: among n ids the chance of any collision is about n^2 / 2^65. Use a
  fresh key per release that must not be linkable to others.

  Guarantee: without the key, a pseudonym does not reveal its id (HMAC-SHA256
  as a pseudorandom function). NOT anonymity: the same key links every release
  that uses it, and the rest of a record can re-identify it.

  Args:
    ids: any array of ids.
    key: the secret key (see ``load_key``).
    length: characters kept, at least 8.
    alphabet: ``"hex"`` or ``"base32"``.

  Returns:
    A string array of the shape of ``ids``.

  >>> key = PseudonymKey(b"0123456789abcdef")
  >>> p = pseudonymize(np.array([1, 2, 1]), key)
  >>> len(p[0]), bool(p[0] == p[2]), bool(p[0] == p[1])
  (16, True, False)
  """
  _validate.one_of("alphabet", alphabet, set(_MAX_LENGTH))
  if not (isinstance(length, int) and 8 <= length <= _MAX_LENGTH[alphabet]):
    raise ValueError(f"length={length!r} must be an int in [8, "
                     f"{_MAX_LENGTH[alphabet]}] for alphabet={alphabet!r}")
  if not isinstance(key, PseudonymKey):
    raise TypeError("key must be a PseudonymKey (see load_key)")
  ids = np.asarray(ids)
  unique, inverse = np.unique(ids.astype(str), return_inverse=True)
  out = []
  for u in unique:
    digest = key.mac(u.encode("utf-8"))
    text = (digest.hex() if alphabet == "hex"
            else base64.b32encode(digest).decode("ascii").rstrip("=").lower())
    out.append(text[:length])
  return np.array(out, dtype=f"<U{length}")[inverse.reshape(ids.shape)]


def remove_direct_identifiers(table: Mapping[str, np.ndarray],
                              columns: Sequence[str] = DIRECT_IDENTIFIERS
                              ) -> dict[str, np.ndarray]:
  """``table`` without the listed columns (those absent are ignored).

  >>> sorted(remove_direct_identifiers({"id": np.arange(2), "age": np.arange(2)}))
  ['age']
  """
  return {name: col for name, col in table.items() if name not in set(columns)}


# =============================================================================
# Generalization hierarchies
# =============================================================================

AGE_WIDTHS = (1, 5, 10, 20, None)  # level 0..4; None is "*"
ZIP_DIGITS = (5, 3, 2, 1, 0)  # leading characters kept at level 0..4

OCCUPATION_CATEGORIES = types.MappingProxyType({
    "technical": ("engineer", "programmer", "scientist", "technician"),
    "health": ("doctor", "healthcare"),
    "education": ("educator", "librarian"),
    "arts": ("artist", "entertainment", "writer"),
    "business": ("administrator", "executive", "lawyer", "marketing",
                 "salesman"),
    "students": ("student",),
    "misc": ("homemaker", "none", "other", "retired"),
})
# leaf -> path from the root "*" down to the leaf, one entry per level.
OCCUPATION_HIERARCHY = types.MappingProxyType({
    job: ("*", category, job)
    for category, jobs in OCCUPATION_CATEGORIES.items() for job in jobs})
GENDER_HIERARCHY = types.MappingProxyType({"F": ("*", "F"), "M": ("*", "M")})


def generalize_age(age, level: int) -> np.ndarray:
  """Ages as ranges of ``AGE_WIDTHS[level]`` years aligned at multiples ("20-29").

  >>> generalize_age(np.array([24, 37]), 2).tolist()
  ['20-29', '30-39']
  """
  age = np.asarray(age, dtype=np.int64)
  width = AGE_WIDTHS[level]
  if width is None:
    return np.full(age.shape, "*")
  if width == 1:
    return age.astype(str)
  lo = age // width * width
  return np.char.add(np.char.add(lo.astype(str), "-"), (lo + width - 1).astype(str))


def generalize_zip(zips, level: int) -> np.ndarray:
  """Zip codes with only the first ``ZIP_DIGITS[level]`` characters kept ("857**").

  Works on any string, so non-numeric (e.g. Canadian) codes generalize too.

  >>> generalize_zip(np.array(["85711", "T8H1N"]), 1).tolist()
  ['857**', 'T8H**']
  """
  keep = ZIP_DIGITS[level]
  return np.array([z[:keep] + "*" * (len(z) - keep) if len(z) > keep else z
                   for z in np.asarray(zips).astype(str)])


def generalize_categorical(values, hierarchy: Mapping[str, tuple[str, ...]],
                           level: int) -> np.ndarray:
  """Each value replaced by its ancestor ``level`` steps up ``hierarchy``.

  >>> generalize_categorical(np.array(["doctor", "writer"]), OCCUPATION_HIERARCHY,
  ...                        1).tolist()
  ['health', 'arts']
  """
  out = []
  for v in np.asarray(values).astype(str):
    if v not in hierarchy:
      raise ValueError(f"value {v!r} is not in the hierarchy")
    path = hierarchy[v]
    out.append(path[max(len(path) - 1 - level, 0)])
  return np.array(out)


def generalize(table: Mapping[str, np.ndarray], levels: Mapping[str, int],
               *, drop: Sequence[str] = DIRECT_IDENTIFIERS) -> dict[str, np.ndarray]:
  """Full-domain generalization of the MovieLens quasi-identifiers.

  ``levels`` maps ``age``/``zip``/``gender``/``occupation`` to a level of its
  hierarchy (0 = exact). Direct identifiers are removed. Check the result
  with ``equivalence_classes``.

  Args:
    table: equal-length columns.
    levels: column -> level of its hierarchy.
    drop: direct identifiers removed from the output.

  Returns:
    ``table`` without ``drop``, the ``levels`` columns generalized.

  >>> out = generalize({"age": np.array([24]), "zip": np.array(["85711"])},
  ...                  {"age": 2, "zip": 2})
  >>> out["age"].tolist(), out["zip"].tolist()
  (['20-29'], ['85***'])
  """
  out = remove_direct_identifiers(table, drop)
  for name, level in levels.items():
    if name == "age":
      out[name] = generalize_age(table[name], level)
    elif name == "zip":
      out[name] = generalize_zip(table[name], level)
    elif name in ("gender", "occupation"):
      hierarchy = GENDER_HIERARCHY if name == "gender" else OCCUPATION_HIERARCHY
      out[name] = generalize_categorical(table[name], hierarchy, level)
    else:
      raise ValueError(f"levels has {name!r}; known: age, zip, gender, occupation")
  return out


def equivalence_classes(table: Mapping[str, np.ndarray], columns: Sequence[str]
                        ) -> tuple[np.ndarray, np.ndarray]:
  """(class index of every row, size of every class) over the released ``columns``.

  >>> equivalence_classes({"a": np.array(["x", "y", "x"])}, ["a"])
  (array([0, 1, 0]), array([2, 1]))
  """
  keys = np.stack([np.asarray(table[c]).astype(str) for c in columns], axis=1)
  if len(keys) == 0:
    return np.zeros(0, np.int64), np.zeros(0, np.int64)
  _, index, sizes = np.unique(keys, axis=0, return_inverse=True,
                              return_counts=True)
  return index.reshape(-1), sizes
