"""Tests for privjax.data.deidentify: keyed pseudonyms, keys, generalization hierarchies."""

import hashlib

import numpy as np
import pytest

from privjax.data import deidentify

OCCUPATIONS = sorted(deidentify.OCCUPATION_HIERARCHY)

# =============================================================================
# Pseudonyms and keys
# =============================================================================

KEY_A = b"first secret key, 32 bytes long!"
KEY_B = b"second secret key, also 32 bytes"


def test_pseudonyms_stable_per_key_and_different_across_keys():
  ids = np.array(["1", "2", "3", "1", "943"])
  key_a, key_b = deidentify.PseudonymKey(KEY_A), deidentify.PseudonymKey(KEY_B)
  a1, a2 = deidentify.pseudonymize(ids, key_a), deidentify.pseudonymize(ids, key_a)
  b = deidentify.pseudonymize(ids, key_b)
  np.testing.assert_array_equal(a1, a2)
  assert a1[0] == a1[3] and len(set(a1)) == 4
  assert not set(a1) & set(b)
  assert all(len(p) == 16 and set(p) <= set("0123456789abcdef") for p in a1)
  short = deidentify.pseudonymize(ids, key_a, length=10, alphabet="base32")
  assert all(len(p) == 10 and set(p) <= set("abcdefghijklmnopqrstuvwxyz234567")
             for p in short)
  # A pseudonym is not a plain hash of the id: it needs the key.
  assert a1[0] != hashlib.sha256(b"1").hexdigest()[:16]


def test_load_key_from_file_and_env(tmp_path, monkeypatch):
  path = tmp_path / "key"
  path.write_bytes(KEY_A + b"\n")
  from_file = deidentify.load_key(path)
  monkeypatch.setenv("MY_KEY", KEY_A.decode())
  from_env = deidentify.load_key(env_var="MY_KEY")
  ids = np.arange(5)
  np.testing.assert_array_equal(deidentify.pseudonymize(ids, from_file),
                                deidentify.pseudonymize(ids, from_env))


def test_load_key_errors_are_clear_and_do_not_leak(tmp_path, monkeypatch):
  monkeypatch.delenv("MISSING_KEY", raising=False)
  with pytest.raises(ValueError, match=r"set \$MISSING_KEY"):
    deidentify.load_key(env_var="MISSING_KEY")
  with pytest.raises(FileNotFoundError, match="nope"):
    deidentify.load_key(tmp_path / "nope")
  short = tmp_path / "short"
  short.write_bytes(b"tooshort-secret")  # 15 bytes
  with pytest.raises(ValueError, match="15 bytes") as error:
    deidentify.load_key(short)
  assert "tooshort" not in str(error.value)


# =============================================================================
# Hierarchies
# =============================================================================


def test_generalization_hierarchies():
  age = np.array([0, 24, 37, 99])
  assert deidentify.generalize_age(age, 0).tolist() == ["0", "24", "37", "99"]
  assert deidentify.generalize_age(age, 1).tolist() == ["0-4", "20-24", "35-39", "95-99"]
  assert deidentify.generalize_age(age, 3).tolist() == ["0-19", "20-39", "20-39", "80-99"]
  assert deidentify.generalize_age(age, 4).tolist() == ["*"] * 4
  zips = np.array(["85711", "T8H1N"])
  assert [deidentify.generalize_zip(zips, level).tolist() for level in range(5)] == [
      ["85711", "T8H1N"], ["857**", "T8H**"], ["85***", "T8***"],
      ["8****", "T****"], ["*****", "*****"]]
  occupations = np.array(OCCUPATIONS)
  assert set(deidentify.generalize_categorical(occupations,
                                              deidentify.OCCUPATION_HIERARCHY, 1)) \
      == set(deidentify.OCCUPATION_CATEGORIES)
  assert set(deidentify.generalize_categorical(
      occupations, deidentify.OCCUPATION_HIERARCHY, 2)) == {"*"}
  assert len(OCCUPATIONS) == 21  # every MovieLens occupation has a place
