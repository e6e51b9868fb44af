"""Tests for privjax.data.anonymize: Mondrian k-anonymity and l-diversity."""

import pickle

from hypothesis import given, settings, strategies as st
import numpy as np
import pytest

from privjax.data import anonymize
from privjax.data import deidentify

OCCUPATIONS = sorted(deidentify.OCCUPATION_HIERARCHY)
QI_NAMES = [qi.name for qi in anonymize.MOVIELENS_QUASI_IDENTIFIERS]

# =============================================================================
# Pseudonyms in the release
# =============================================================================

KEY_A = b"first secret key, 32 bytes long!"


def test_key_never_appears_in_outputs(tmp_path):
  path = tmp_path / "key"
  path.write_bytes(KEY_A)
  key = deidentify.load_key(path)
  table = _random_table(np.random.default_rng(0), 60)
  out, report = anonymize.k_anonymize(table, k=3, pseudonym_key=key)
  assert "id" not in out and len(out["pseudonym"]) == report.num_kept
  secret_forms = {KEY_A.decode(), KEY_A.hex(), repr(KEY_A)}
  texts = [repr(key), str(key), repr(report), repr(out)]
  texts += [str(v) for column in out.values() for v in column]
  assert not any(s in t for s in secret_forms for t in texts)
  with pytest.raises(TypeError, match="not picklable"):
    pickle.dumps(key)


# =============================================================================
# Quasi-identifier hierarchies
# =============================================================================


def test_bad_hierarchy_is_rejected():
  with pytest.raises(ValueError, match="two places"):
    anonymize.QuasiIdentifier(name="x", kind="hierarchy", hierarchy={
        "a": ("*", "g", "a"), "b": ("*", "a", "b")})
  with pytest.raises(ValueError, match="one length"):
    anonymize.QuasiIdentifier(name="x", kind="hierarchy", hierarchy={
        "a": ("*", "a"), "b": ("*", "g", "b")})


# =============================================================================
# Mondrian: properties
# =============================================================================

ZIP_POOL = ["85711", "85702", "85001", "94043", "94110", "02139", "02140",
            "T8H1N", "T8H2X", "L9G2B", "10003", "10025"]


def _random_table(rng, n, *, with_sensitive=True):
  table = {
      "id": np.array([str(i) for i in range(n)]),
      "age": rng.integers(7, 74, size=n),
      "gender": rng.choice(["F", "M"], size=n),
      "occupation": rng.choice(OCCUPATIONS, size=n),
      "zip": rng.choice(ZIP_POOL, size=n),
  }
  if with_sensitive:
    table["disease"] = rng.choice(["flu", "cold", "none", "asthma", "covid"],
                                  size=n, p=[0.1, 0.1, 0.6, 0.1, 0.1])
  return table


def _check_release(table, out, report, *, k, l=None, sensitive=None):
  n = len(table["age"])
  assert report.num_kept + report.num_suppressed == n
  assert all(len(column) == report.num_kept for column in out.values())
  assert "id" not in out
  if report.num_kept == 0:
    assert report.num_classes == 0
    return
  index, sizes = deidentify.equivalence_classes(out, QI_NAMES)
  assert sizes.min() >= k
  assert report.num_classes == len(sizes)
  assert report.min_class_size == sizes.min() and report.max_class_size == sizes.max()
  if l is not None:
    for c in range(len(sizes)):
      assert len(set(out[sensitive][index == c])) >= l
  # Truthfulness: each released value holds for the record it replaces.
  # Kept rows keep their "row" column (added by the tests), which maps them back.
  for row, age, zip_, gender, occupation in zip(
      out["row"], out["age"], out["zip"], out["gender"], out["occupation"]):
    lo, _, hi = age.partition("-")
    assert int(lo) <= table["age"][row] <= int(hi or lo)
    assert table["zip"][row].startswith(zip_.rstrip("*"))
    assert gender in ("*", table["gender"][row])
    assert occupation in deidentify.OCCUPATION_HIERARCHY[table["occupation"][row]]
  assert 0.0 <= report.ncp <= 1.0


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(0, 120),
       k=st.integers(1, 8), l=st.sampled_from([None, 2, 3]))
def test_mondrian_classes_have_k_records_and_l_values(seed, n, k, l):
  table = _random_table(np.random.default_rng(seed), n)
  table["row"] = np.arange(n)
  sensitive = "disease" if l else None
  out, report = anonymize.k_anonymize(table, k=k, sensitive=sensitive, l=l)
  _check_release(table, out, report, k=k, l=l, sensitive=sensitive)
  enough = n >= k and (l is None or len(set(table["disease"])) >= l)
  assert report.num_suppressed == (0 if enough else n)


def test_unplaceable_records_are_suppressed_and_counted():
  rng = np.random.default_rng(1)
  table = _random_table(rng, 80)
  table["row"] = np.arange(80)
  table["occupation"] = table["occupation"].astype("<U20")
  table["occupation"][:3] = "astronaut"
  table["zip"][5] = "  "
  out, report = anonymize.k_anonymize(table, k=4)
  assert report.num_suppressed == 4
  assert dict(report.suppressed_by_reason) == {
      "missing or unknown occupation": 3, "missing or unknown zip": 1}
  assert not set(out["row"]) & {0, 1, 2, 5}
  _check_release(table, out, report, k=4)
  few = {name: column[:3] for name, column in table.items()}
  _, report = anonymize.k_anonymize(few, k=4)
  assert report.num_suppressed == 3 and report.num_classes == 0


def test_mondrian_splits_and_reports_information_loss():
  table = _random_table(np.random.default_rng(2), 400)
  table["row"] = np.arange(400)
  loose, loose_report = anonymize.k_anonymize(table, k=2)
  tight, tight_report = anonymize.k_anonymize(table, k=20)
  _check_release(table, loose, loose_report, k=2)
  _check_release(table, tight, tight_report, k=20)
  # Larger k: fewer, larger classes and more information lost.
  assert loose_report.num_classes > tight_report.num_classes > 1
  assert loose_report.ncp < tight_report.ncp
  assert loose_report.discernibility < tight_report.discernibility
  # Discernibility is the sum of squared class sizes.
  _, sizes = deidentify.equivalence_classes(tight, QI_NAMES)
  assert tight_report.discernibility == (sizes**2).sum()


def test_k_one_releases_each_distinct_record_exactly():
  table = _random_table(np.random.default_rng(3), 50)
  table["row"] = np.arange(50)
  out, report = anonymize.k_anonymize(table, k=1)
  np.testing.assert_array_equal(out["age"], table["age"].astype(str))
  np.testing.assert_array_equal(out["zip"], table["zip"])
  assert report.ncp == 0.0


def test_errors_name_the_bad_value():
  table = _random_table(np.random.default_rng(4), 10)
  with pytest.raises(ValueError, match="k=0"):
    anonymize.k_anonymize(table, k=0)
  with pytest.raises(ValueError, match="l=2 needs a sensitive column"):
    anonymize.k_anonymize(table, k=2, l=2)
  with pytest.raises(ValueError, match="'postcode' not in table"):
    anonymize.k_anonymize(table, k=2, quasi_identifiers=[
        anonymize.QuasiIdentifier(name="postcode", kind="prefix")])


# =============================================================================
# Real MovieLens 100k users
# =============================================================================


def _load_ml100k_users(path):
  rows = [line.split("|") for line in
          (path / "u.user").read_text(encoding="latin-1").splitlines() if line]
  return {
      "id": np.array([r[0] for r in rows]),
      "age": np.array([int(r[1]) for r in rows]),
      "gender": np.array([r[2] for r in rows]),
      "occupation": np.array([r[3] for r in rows]),
      "zip": np.array([r[4] for r in rows]),
      "row": np.arange(len(rows)),
  }


def test_ml100k_users_k5(ml100k_path, tmp_path):
  users = _load_ml100k_users(ml100k_path)
  assert len(users["id"]) == 943
  assert any(not z.isdigit() for z in users["zip"])  # e.g. "T8H1N"
  key_path = tmp_path / "key"
  key_path.write_bytes(KEY_A)
  out, report = anonymize.k_anonymize(
      users, k=5, pseudonym_key=deidentify.load_key(key_path))
  _check_release(users, out, report, k=5)
  assert report.num_suppressed == 0  # every MovieLens value has a place
  assert len(set(out["pseudonym"])) == 943
  print(f"\nml-100k users, k=5: {report.num_classes} classes, sizes "
        f"{report.min_class_size}/{report.mean_class_size:.2f}/"
        f"{report.max_class_size}, suppressed {report.num_suppressed}, "
        f"NCP {report.ncp:.3f} {dict(report.ncp_by_attribute)}, "
        f"DM {report.discernibility}")
  # Occupation as the sensitive attribute with 3-diversity.
  out, report = anonymize.k_anonymize(
      users, k=5, quasi_identifiers=anonymize.MOVIELENS_QUASI_IDENTIFIERS[:3],
      sensitive="occupation", l=3)
  index, sizes = deidentify.equivalence_classes(out, ["age", "zip", "gender"])
  assert sizes.min() >= 5
  assert min(len(set(out["occupation"][index == c])) for c in range(len(sizes))) >= 3
