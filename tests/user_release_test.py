"""Tests for privjax.data.user_release and its CLI, scripts/anonymize.py.

The library is tested in-process on small MovieLens files written here; the
script runs as a subprocess where its command-line behaviour (exit codes,
messages, files) is what is tested.
"""

import csv
import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import conftest  # pylint: disable=g-bad-import-order
from privjax.data import anonymize
from privjax.data import deidentify
from privjax.data import movielens
from privjax.data import user_release

REPO = pathlib.Path(__file__).resolve().parents[1]
ANONYMIZE = REPO / "scripts" / "anonymize.py"
KEY = "test-secret-key-7f3a9c1e5b"  # distinctive, to search outputs for
QI_NAMES = ("age", "zip", "gender", "occupation")
NUM_USERS, NUM_ITEMS = conftest.SMALL_ML_USERS, conftest.SMALL_ML_ITEMS


def _run(script, *args, env=None):
  full_env = {k: v for k, v in os.environ.items()
              if k != deidentify.KEY_ENV_VAR}
  full_env.update(env or {})
  return subprocess.run([sys.executable, str(script), *map(str, args)],
                        capture_output=True, text=True, timeout=120,
                        cwd=REPO, env=full_env)


def _read_csv(path) -> list[dict[str, str]]:
  with open(path, newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


def _classes(rows, names) -> dict[tuple, list[dict]]:
  classes = {}
  for row in rows:
    classes.setdefault(tuple(row[n] for n in names), []).append(row)
  return classes


# =============================================================================
# scripts/anonymize.py
# =============================================================================


def test_anonymize_writes_a_k_anonymous_table_and_its_report(ml_folder, tmp_path):
  out = _run(ANONYMIZE, "--data", ml_folder, "--k", 4, "--out",
             tmp_path / "users.csv", "--report", tmp_path / "report.json")
  assert out.returncode == 0, out.stderr
  assert "ids are dropped" in out.stderr
  rows = _read_csv(tmp_path / "users.csv")
  assert set(rows[0]) == set(QI_NAMES)  # no id, no pseudonym without a key
  report = json.loads((tmp_path / "report.json").read_text())
  classes = _classes(rows, QI_NAMES)
  assert min(len(c) for c in classes.values()) >= 4
  assert report["num_classes"] == len(classes)
  assert report["num_kept"] == len(rows)
  assert report["num_kept"] + report["num_suppressed"] == NUM_USERS
  assert sum(int(s) * c for s, c in report["class_size_counts"].items()) == len(rows)
  assert "NOT differential privacy" in report["guarantee"]
  # The script is thin: the same numbers as the library call.
  ds = movielens.load(ml_folder)
  _, expected = anonymize.k_anonymize({"id": np.asarray(ds.raw_user_ids),
                                       **ds.users}, k=4)
  for field in ("num_classes", "num_suppressed", "min_class_size",
                "discernibility", "ncp"):
    assert report[field] == getattr(expected, field), field
  # Rows are sorted by released values, so row i no longer means user id i.
  keys = [tuple(r[n] for n in QI_NAMES) for r in rows]
  assert keys == sorted(keys)
  assert f"classes {report['num_classes']}" in out.stdout
  assert "| 4 |" in out.stdout  # the markdown summary row


@pytest.mark.parametrize("args, env, message", [
    (["--data", "{missing}", "--k", "5"], None, "does not exist"),
    (["--data", "{data}", "--k", "0"], None, "--k=0 must be >= 1"),
    (["--data", "{data}", "--k", "five"], None, "--k='five'"),
    (["--data", "{data}", "--k", "5", "--key-file", "{missing}"], None,
     "pseudonym key file"),
    (["--data", "{data}", "--k", "5"], {deidentify.KEY_ENV_VAR: "tiny9"},
     "need at least 16"),
    (["--data", "{data}", "--k", "5", "--l", "2"], None, "needs --sensitive"),
    (["--data", "{data}", "--k", "2,5"], None, "must contain {k}"),
    (["--data", "{data}", "--k", "5", "--sensitive", "salary"], None,
     "'salary' not in table"),
])
def test_anonymize_rejects_bad_input_clearly(ml_folder, tmp_path, args, env,
                                             message):
  args = [a.format(data=ml_folder, missing=tmp_path / "missing") for a in args]
  out = _run(ANONYMIZE, *args, "--out", tmp_path / "out.csv", env=env)
  assert out.returncode != 0
  assert message in out.stderr
  assert "Traceback" not in out.stderr
  assert "tiny9" not in out.stderr + out.stdout
  assert not (tmp_path / "out.csv").exists()


# =============================================================================
# The library: keys, pseudonyms, releases
# =============================================================================


def test_pseudonym_key_from_file_else_env_else_none(tmp_path, monkeypatch):
  key_file = tmp_path / "key"
  key_file.write_text(KEY + "\n")
  monkeypatch.setenv(deidentify.KEY_ENV_VAR, KEY[::-1])
  ids = np.arange(4)
  from_file = user_release.pseudonym_key(key_file)
  from_env = user_release.pseudonym_key()
  expected = deidentify.pseudonymize(ids, deidentify.PseudonymKey(KEY.encode()))
  np.testing.assert_array_equal(deidentify.pseudonymize(ids, from_file), expected)
  assert not set(deidentify.pseudonymize(ids, from_env)) & set(expected)
  monkeypatch.setenv(deidentify.KEY_ENV_VAR, "")
  assert user_release.pseudonym_key() is None
  monkeypatch.delenv(deidentify.KEY_ENV_VAR)
  assert user_release.pseudonym_key() is None


def test_pseudonyms_are_keyed_stable_and_never_show_the_key(
    ml_folder, tmp_path, monkeypatch, capsys):
  key_file = tmp_path / "key"
  key_file.write_text(KEY + "\n")
  ds = movielens.load(ml_folder)
  table = user_release.user_table(ds)
  runs = {}
  for name, key_path, env in [
      ("file", key_file, None),
      ("file_again", key_file, None),
      ("env", None, KEY),
      ("other_key", None, KEY[::-1])]:
    monkeypatch.delenv(deidentify.KEY_ENV_VAR, raising=False)
    if env is not None:
      monkeypatch.setenv(deidentify.KEY_ENV_VAR, env)
    echoed = []
    user_release.write_releases(
        table, dataset=ds.name, ks=[3], l=2, sensitive="occupation",
        key=user_release.pseudonym_key(key_path),
        out=str(tmp_path / f"{name}.csv"), report=str(tmp_path / f"{name}.json"),
        echo=echoed.append)
    written = ((tmp_path / f"{name}.csv").read_text()
               + (tmp_path / f"{name}.json").read_text())
    captured = capsys.readouterr()
    for text in (written, "\n".join(echoed), captured.out, captured.err):
      assert KEY not in text and KEY.encode().hex() not in text
    runs[name] = _read_csv(tmp_path / f"{name}.csv")
  pseudonyms = {name: sorted(r["pseudonym"] for r in rows)
                for name, rows in runs.items()}
  expected = deidentify.pseudonymize(np.asarray(ds.raw_user_ids),
                                     deidentify.PseudonymKey(KEY.encode()))
  assert pseudonyms["file"] == sorted(expected.tolist())
  assert pseudonyms["file"] == pseudonyms["file_again"] == pseudonyms["env"]
  assert not set(pseudonyms["file"]) & set(pseudonyms["other_key"])
  # l-diversity: occupation is released exactly and varies within each class.
  classes = _classes(runs["file"], ("age", "zip", "gender"))
  assert min(len(c) for c in classes.values()) >= 3
  assert min(len({r["occupation"] for r in c}) for c in classes.values()) >= 2


def test_write_releases_one_file_per_k_and_a_summary(ml_folder, tmp_path):
  ds = movielens.load(ml_folder)
  echoed = []
  reports = user_release.write_releases(
      user_release.user_table(ds), dataset=ds.name, ks=[2, 5],
      out=str(tmp_path / "users_k{k}.csv"), echo=echoed.append)
  assert [r["k"] for r in reports] == [2, 5]
  assert [line for line in echoed if "wrote" in line] == [
      f"  wrote {tmp_path / 'users_k2.csv'}", f"  wrote {tmp_path / 'users_k5.csv'}"]
  for r in reports:
    rows = _read_csv(tmp_path / f"users_k{r['k']}.csv")
    assert len(rows) == r["num_kept"]
    assert user_release.format_report(r) in echoed
  table = user_release.markdown_table(reports)
  assert "| 2 |" in table and "| 5 |" in table


def test_user_table_needs_demographics(ml_folder):
  ds = movielens.load(ml_folder)
  assert set(user_release.user_table(ds)) == {"id", *QI_NAMES}
  with pytest.raises(ValueError, match="has no user table"):
    user_release.user_table(dataclasses.replace(ds, users=None))


def test_anonymize_ml100k_k5(ml100k_path, tmp_path):
  ds = movielens.load(ml100k_path)
  (report,) = user_release.write_releases(
      user_release.user_table(ds), dataset=ds.name, ks=[5],
      out=str(tmp_path / "users.csv"), report=str(tmp_path / "report.json"),
      echo=lambda line: None)
  assert report == json.loads((tmp_path / "report.json").read_text())
  rows = _read_csv(tmp_path / "users.csv")
  classes = _classes(rows, QI_NAMES)
  assert report["num_records"] == 943
  assert report["num_kept"] == len(rows) == 943 - report["num_suppressed"]
  assert report["num_classes"] == len(classes)
  assert min(len(c) for c in classes.values()) == report["min_class_size"] >= 5
  assert 0 < report["ncp"] < 1
