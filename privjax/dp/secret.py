"""The run secret: the one source of every random choice that touches private data.

A ``RunSecret`` is 256 bits from the operating system's entropy pool
(``os.urandom``). Everything random that a private release depends on is
derived from it by HMAC-SHA256 under a fixed label: the DP noise keys, the
Poisson sampling, dropout, the per-user keys of contribution bounding and of
PATE shard assignment, and the DP count of privacy units. The secret lives in
``<workdir>/secret/run_secret.json`` (directory 0700, file 0600), is read on
resume, and is never written to a released file (config.json, privacy.json,
report.md, metrics.jsonl, checkpoint metadata, exports): those carry only its
``fingerprint``, a one-way hash that lets a resume check it has the right
secret without revealing it. A public seed may still set initial parameters.

``RunSecret.from_seed(n)`` is the reproducible-noise mode: the secret is a
hash of the public integer ``n``, so anyone holding the configuration can
regenerate every noise draw and every batch. Such a run is NOT a
differentially private release, and every report of it says so.

>>> s = RunSecret.from_seed(0)
>>> s.reproducible, len(s.fingerprint)
(True, 16)
>>> bool((s.unit_keys("grouping", ["7", "8"]) == s.unit_keys("grouping", ["7", "8"])).all())
True
"""

import dataclasses
import hashlib
import hmac
import json
import os
import pathlib
import random
from collections.abc import Sequence

import jax
import numpy as np

SECRET_DIR = "secret"
SECRET_FILE = "run_secret.json"
_VERSION = 1
_REPRODUCIBLE_PREFIX = b"privjax/reproducible-noise/v1:"

REPRODUCIBLE_WARNING = (
    "REPRODUCIBLE NOISE: privacy.reproducible_noise_seed={seed} derives the noise and "
    "the sampling from the configuration. Anyone with config.json can regenerate them, "
    "so this run is NOT a differentially private release (research and tests only).")


class MissingSecretError(FileNotFoundError):
  """A run that must continue from its secret cannot find it."""


@dataclasses.dataclass(frozen=True, eq=False)
class RunSecret:
  """256 secret bits and the streams derived from them.

  Attributes:
    key: the 32 secret bytes (never printed: ``repr`` hides them).
    reproducible_seed: the public seed it was derived from, or None for a
      secret drawn from OS entropy.
  """
  key: bytes = dataclasses.field(repr=False)
  reproducible_seed: int | None = None

  def __post_init__(self):
    if not isinstance(self.key, bytes) or len(self.key) != 32:
      raise ValueError("RunSecret.key must be 32 bytes")

  @classmethod
  def fresh(cls) -> "RunSecret":
    """A new secret from OS entropy."""
    return cls(os.urandom(32))

  @classmethod
  def from_seed(cls, seed: int) -> "RunSecret":
    """The reproducible (NOT private) secret of a public integer seed.

    Every bit of ``seed`` matters: seeds that differ only above bit 32 (or
    64) give different secrets.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
      raise ValueError(f"reproducible_noise_seed={seed!r} must be an integer >= 0")
    return cls(hashlib.sha256(_REPRODUCIBLE_PREFIX + str(int(seed)).encode()).digest(),
               reproducible_seed=int(seed))

  @property
  def reproducible(self) -> bool:
    return self.reproducible_seed is not None

  @property
  def fingerprint(self) -> str:
    """16 hex digits of a one-way hash: names the secret without revealing it."""
    return hashlib.sha256(b"privjax/fingerprint/v1:" + self.key).hexdigest()[:16]

  def derive(self, label: str) -> bytes:
    """32 bytes for ``label``; distinct labels give independent streams."""
    return hmac.new(self.key, label.encode(), hashlib.sha256).digest()

  def integer(self, label: str, bits: int = 128) -> int:
    """A uniform integer in ``[0, 2**bits)`` (bits <= 256) for ``label``."""
    if not 1 <= bits <= 256:
      raise ValueError(f"bits={bits} must be in [1, 256]")
    return int.from_bytes(self.derive(label), "little") >> (256 - bits)

  def jax_key(self, label: str) -> jax.Array:
    """A threefry key holding 64 secret bits (both 32-bit words) for ``label``."""
    words = np.frombuffer(self.derive(label)[:8], dtype="<u4").astype(np.uint32)
    return jax.random.wrap_key_data(words, impl="threefry2x32")

  def numpy_rng(self, label: str) -> np.random.Generator:
    """A PCG64 generator seeded with 128 secret bits for ``label``."""
    return np.random.Generator(np.random.PCG64(self.integer(label, 128)))

  def python_rng(self, label: str) -> random.Random:
    """A ``random.Random`` whose bits are a keyed hash stream (for the exact
    discrete samplers of ``privjax.answers``)."""
    return _KeyedRandom(self.derive(label))

  def unit_keys(self, label: str, ids: Sequence) -> np.ndarray:
    """uint64 [len(ids)]: a keyed hash of each id (e.g. a raw user id).

    The key of a unit depends only on its own id and the secret, so adding or
    removing a unit changes no other unit's key.
    """
    key = self.derive(label)
    return np.array([int.from_bytes(hashlib.blake2b(str(i).encode(), key=key,
                                                    digest_size=8).digest(), "little")
                     for i in ids], dtype=np.uint64)

  # --------------------------------------------------------------------------
  # Storage.

  @staticmethod
  def path(workdir: str | pathlib.Path) -> pathlib.Path:
    return pathlib.Path(workdir) / SECRET_DIR / SECRET_FILE

  def save(self, workdir: str | pathlib.Path) -> pathlib.Path:
    """Writes the secret to ``<workdir>/secret/run_secret.json`` (0600) once."""
    path = self.path(workdir)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
      json.dump({"version": _VERSION, "key": self.key.hex(),
                 "fingerprint": self.fingerprint,
                 "warning": "privjax run secret: never release or copy this file; "
                            "it determines the DP noise and the sampling."}, f)
    return path

  @classmethod
  def load(cls, workdir: str | pathlib.Path) -> "RunSecret":
    path = cls.path(workdir)
    if not path.exists():
      raise MissingSecretError(f"no run secret at {str(path)!r}")
    try:
      data = json.loads(path.read_text())
      secret = cls(bytes.fromhex(data["key"]))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"run secret {str(path)!r} is corrupt ({e})") from None
    if data.get("fingerprint") not in (None, secret.fingerprint):
      raise ValueError(f"run secret {str(path)!r} is corrupt (fingerprint mismatch)")
    return secret


def for_run(workdir: str | pathlib.Path, *, reproducible_seed: int | None,
            resuming: bool) -> RunSecret:
  """The secret of the run in ``workdir``: loaded on resume, else created.

  Args:
    workdir: the run directory.
    reproducible_seed: ``privacy.reproducible_noise_seed`` (None: a real secret).
    resuming: the run continues from a checkpoint; its secret must exist.

  Raises:
    MissingSecretError: resuming a secret run whose secret file is gone (fresh
      noise would silently change what the released checkpoints mean).
    ValueError: a secret exists but there is nothing to resume: a new run
      must never reuse another's noise (two runs with the same noise on
      different data would let anyone subtract it).
  """
  if reproducible_seed is not None:
    return RunSecret.from_seed(reproducible_seed)
  path = RunSecret.path(workdir)
  if path.exists():
    if not resuming:
      raise ValueError(
          f"{str(workdir)!r} holds a run secret but no checkpoint to resume: an "
          "earlier run started here. A new run must not reuse its noise; delete "
          f"{str(workdir)!r} (nothing of that attempt was released) or use a new "
          "--workdir.")
    return RunSecret.load(workdir)
  if resuming:
    raise MissingSecretError(
        f"{str(workdir)!r} holds checkpoints but its run secret {str(path)!r} is "
        "missing: resuming would draw fresh noise and batches and misstate what the "
        "released checkpoints reveal. Restore the secret file, or train into a new "
        "--workdir.")
  secret = RunSecret.fresh()
  secret.save(workdir)
  return secret


def key_from_int(seed: int) -> jax.Array:
  """The threefry key of an integer seed, all 64 bits used.

  Equal to ``jax.random.key(seed)`` for seeds below 2**32; unlike it, seeds
  that differ only above bit 32 give different keys.

  >>> bool((jax.random.key_data(key_from_int(5)) == jax.random.key_data(jax.random.key(5))).all())
  True
  """
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**64:
    raise ValueError(f"seed={seed!r} must be an integer in [0, 2**64)")
  seed = int(seed)
  return jax.random.wrap_key_data(np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32),
                                  impl="threefry2x32")


class _KeyedRandom(random.Random):
  """``random.Random`` over BLAKE2b(key, counter): a deterministic keyed stream."""

  def __init__(self, key: bytes):
    self._key = key
    self._counter = 0
    super().__init__()

  def seed(self, *args, **kwargs):  # the stream is fixed by the key
    del args, kwargs

  def getrandbits(self, k: int) -> int:
    if k < 0:
      raise ValueError("number of bits must be non-negative")
    out, have = 0, 0
    while have < k:
      block = hashlib.blake2b(self._counter.to_bytes(16, "little"), key=self._key).digest()
      self._counter += 1
      out |= int.from_bytes(block, "little") << have
      have += 8 * len(block)
    return out & ((1 << k) - 1)

  def random(self) -> float:
    return self.getrandbits(53) * 2.0**-53

  def getstate(self):
    raise NotImplementedError("a keyed stream has no state to save")

  def setstate(self, state):
    raise NotImplementedError("a keyed stream has no state to restore")
