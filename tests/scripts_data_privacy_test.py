"""scripts/anonymize.py and scripts/dp_stats.py on small MovieLens files written here.

The scripts run as subprocesses (exit codes, stdout, files) where that is what
is tested, and in-process through their ``main``/functions otherwise (a
subprocess that imports dp_accounting costs ~3 s).
"""

import csv
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from privjax.data import anonymize
from privjax.answers import mechanisms
from privjax.answers import aggregates
from privjax.data import dataset
from privjax.data import movielens
from privjax.data import sequences

REPO = pathlib.Path(__file__).resolve().parents[1]
ANONYMIZE = REPO / "scripts" / "anonymize.py"
DP_STATS = REPO / "scripts" / "dp_stats.py"
KEY = "test-secret-key-7f3a9c1e5b"  # distinctive, to search outputs for
QI_NAMES = ("age", "zip", "gender", "occupation")
NUM_USERS, NUM_ITEMS = 80, 120


def _load_script(path: pathlib.Path, name: str):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


dp_stats = _load_script(DP_STATS, "dp_stats_script")


def _write_movielens(folder: pathlib.Path, seed: int = 0) -> pathlib.Path:
  """A small ml-100k folder: Zipf item popularity, 10-25 distinct items a user."""
  rng = np.random.default_rng(seed)
  folder.mkdir(parents=True, exist_ok=True)
  weights = 1.0 / np.arange(1, NUM_ITEMS + 1) ** 1.1
  weights /= weights.sum()
  lines = []
  for user in range(1, NUM_USERS + 1):
    items = rng.choice(NUM_ITEMS, size=rng.integers(10, 26), replace=False,
                       p=weights)
    for t, item in enumerate(items):
      rating = rng.integers(1, 6)
      lines.append(f"{user}\t{item + 1}\t{rating}\t{880000000 + 1000 * t + user}")
  (folder / "u.data").write_text("\n".join(lines) + "\n", encoding="latin-1")
  flags = "|".join(["0"] * 19)
  (folder / "u.item").write_text("".join(
      f"{i}|Movie {i} (1995)|01-Jan-1995||http://example.org/{i}|{flags}\n"
      for i in range(1, NUM_ITEMS + 1)), encoding="latin-1")
  jobs = sorted(anonymize.OCCUPATION_HIERARCHY)
  (folder / "u.user").write_text("".join(
      f"{u}|{rng.integers(15, 70)}|{'MF'[rng.integers(2)]}|"
      f"{jobs[rng.integers(len(jobs))]}|{rng.integers(10000, 99999):05d}\n"
      for u in range(1, NUM_USERS + 1)), encoding="latin-1")
  return folder


@pytest.fixture(scope="module")
def ml_folder(tmp_path_factory) -> pathlib.Path:
  return _write_movielens(tmp_path_factory.mktemp("data") / "ml-fixture")


@pytest.fixture(scope="module")
def ml_dataset(ml_folder) -> dataset.RecDataset:
  return movielens.load(ml_folder)


def _run(script, *args, env=None):
  full_env = {k: v for k, v in os.environ.items()
              if k != anonymize.KEY_ENV_VAR}
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


def test_anonymize_pseudonyms_are_keyed_stable_and_never_show_the_key(
    ml_folder, tmp_path):
  key_file = tmp_path / "key"
  key_file.write_text(KEY + "\n")
  runs = {}
  for name, args, env in [
      ("file", ["--key-file", key_file], None),
      ("file_again", ["--key-file", key_file], None),
      ("env", [], {anonymize.KEY_ENV_VAR: KEY}),
      ("other_key", [], {anonymize.KEY_ENV_VAR: KEY[::-1]})]:
    out = _run(ANONYMIZE, "--data", ml_folder, "--k", 3, "--l", 2,
               "--sensitive", "occupation", *args,
               "--out", tmp_path / f"{name}.csv",
               "--report", tmp_path / f"{name}.json", env=env)
    assert out.returncode == 0, out.stderr
    written = ((tmp_path / f"{name}.csv").read_text()
               + (tmp_path / f"{name}.json").read_text())
    for text in (written, out.stdout, out.stderr):
      assert KEY not in text and KEY.encode().hex() not in text
    runs[name] = _read_csv(tmp_path / f"{name}.csv")
  pseudonyms = {name: sorted(r["pseudonym"] for r in rows)
                for name, rows in runs.items()}
  ds = movielens.load(ml_folder)
  expected = anonymize.pseudonymize(np.asarray(ds.raw_user_ids),
                                    anonymize.PseudonymKey(KEY.encode()))
  assert pseudonyms["file"] == sorted(expected.tolist())
  assert pseudonyms["file"] == pseudonyms["file_again"] == pseudonyms["env"]
  assert not set(pseudonyms["file"]) & set(pseudonyms["other_key"])
  # l-diversity: occupation is released exactly and varies within each class.
  classes = _classes(runs["file"], ("age", "zip", "gender"))
  assert min(len(c) for c in classes.values()) >= 3
  assert min(len({r["occupation"] for r in c}) for c in classes.values()) >= 2


@pytest.mark.parametrize("args, env, message", [
    (["--data", "{missing}", "--k", "5"], None, "does not exist"),
    (["--data", "{data}", "--k", "0"], None, "--k=0 must be >= 1"),
    (["--data", "{data}", "--k", "five"], None, "--k='five'"),
    (["--data", "{data}", "--k", "5", "--key-file", "{missing}"], None,
     "pseudonym key file"),
    (["--data", "{data}", "--k", "5"], {anonymize.KEY_ENV_VAR: "tiny9"},
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


def test_anonymize_ml100k_k5(ml100k_path, tmp_path):
  out = _run(ANONYMIZE, "--data", ml100k_path, "--k", 5, "--out",
             tmp_path / "users.csv", "--report", tmp_path / "report.json")
  assert out.returncode == 0, out.stderr
  report = json.loads((tmp_path / "report.json").read_text())
  rows = _read_csv(tmp_path / "users.csv")
  classes = _classes(rows, QI_NAMES)
  assert report["num_records"] == 943
  assert report["num_kept"] == len(rows) == 943 - report["num_suppressed"]
  assert report["num_classes"] == len(classes)
  assert min(len(c) for c in classes.values()) == report["min_class_size"] >= 5
  assert 0 < report["ncp"] < 1


# =============================================================================
# scripts/dp_stats.py: release
# =============================================================================


def test_dp_stats_release_parses_and_spends_the_budget(ml_folder, tmp_path):
  runs = []
  for _ in range(2):
    out = _run(DP_STATS, "--data", ml_folder, "--epsilon", 1.0, "--seed", 3,
               "--max-items-per-user", 5, "--out", tmp_path / "stats.json")
    assert out.returncode == 0, out.stderr
    assert "NOT secure" in out.stderr
    runs.append(json.loads((tmp_path / "stats.json").read_text()))
  first, second = runs
  assert first == second  # --seed: reproducible
  assert first["mechanism"] == "discrete_laplace"
  popularity, ratings = first["queries"]
  assert popularity["query"] == "item_popularity"
  assert len(popularity["counts"]) == NUM_ITEMS
  assert all(c == round(c) for c in popularity["counts"])  # discrete noise
  assert popularity["epsilon"] == pytest.approx(0.5, rel=1e-9)
  assert ratings["bins"] == ["1", "2", "3", "4", "5"]
  assert ratings["epsilon"] == pytest.approx(0.5, rel=1e-9)
  assert first["budget"]["spent_epsilon"] == pytest.approx(1.0, rel=1e-9)
  assert first["budget"]["spent_epsilon"] <= 1.0 * (1 + 1e-9)
  top = popularity["top"]
  assert [t["noisy_users"] for t in top] == sorted(
      (t["noisy_users"] for t in top), reverse=True)
  assert top[0]["noisy_users"] == max(popularity["counts"])
  assert top[0]["title"] == f"Movie {top[0]['item']} (1995)"
  assert "total epsilon spent: 1 of 1" in out.stdout
  assert top[0]["title"] in out.stdout


def test_dp_stats_huge_epsilon_releases_the_true_capped_counts(ml_dataset,
                                                               ml_folder):
  # At epsilon=1e9 the noise is 0, so the wiring (bins, caps, items) shows.
  out = dp_stats.release(ml_dataset, epsilon=2e9, delta=None,
                         queries=dp_stats.QUERIES, max_items=1000,
                         max_ratings=1000, mechanism=None, seed=0, half=False)
  popularity, ratings = out["queries"]
  distinct = np.unique(np.stack([ml_dataset.user, ml_dataset.item]), axis=1)
  assert popularity["counts"] == np.bincount(
      distinct[1], minlength=NUM_ITEMS).tolist()
  assert ratings["counts"] == np.bincount(
      ml_dataset.rating.astype(int) - 1, minlength=5).tolist()
  # With a cap of 3 ratings each user gives exactly 3 (all have >= 10).
  capped = dp_stats.release(ml_dataset, epsilon=1e9, delta=None,
                            queries=("rating_histogram",), max_items=3,
                            max_ratings=3, mechanism=None, seed=0, half=False)
  assert sum(capped["queries"][0]["counts"]) == 3 * NUM_USERS


def test_dp_stats_with_delta_uses_the_discrete_gaussian(ml_dataset):
  out = dp_stats.release(ml_dataset, epsilon=1.0, delta=1e-6,
                         queries=dp_stats.QUERIES, max_items=5, max_ratings=5,
                         mechanism=None, seed=1, half=False)
  assert out["mechanism"] == "discrete_gaussian"
  assert all("ZCDpEvent" in q["event"] for q in out["queries"])
  assert all(q["delta"] == pytest.approx(5e-7) for q in out["queries"])
  assert 0 < out["budget"]["spent_epsilon"] <= 1.0


def test_rating_bins_follow_the_public_star_domain():
  bins, labels = dp_stats.rating_bins(np.array([0.5, 1.0, 3.5, 5.0]), half=True)
  assert bins.tolist() == [0, 1, 6, 9] and len(labels) == 10
  assert labels[0] == "0.5" and labels[-1] == "5"
  bins, labels = dp_stats.rating_bins(np.array([1.0, 5.0]), half=False)
  assert bins.tolist() == [0, 4] and labels == ["1", "2", "3", "4", "5"]


def test_dp_stats_rejects_bad_input_in_a_subprocess(tmp_path):
  out = _run(DP_STATS, "--data", tmp_path / "missing", "--epsilon", 1)
  assert out.returncode != 0
  assert "does not exist" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("args, message", [
    (["--epsilon", "0"], "--epsilon=0.0 must be finite and > 0"),
    (["--epsilon", "-1"], "--epsilon=-1.0 must be finite and > 0"),
    ([], "--epsilon is required"),
    (["--epsilon", "1", "--max-items-per-user", "0"],
     "--max-items-per-user=0 must be >= 1"),
    (["--epsilon", "1", "--delta", "1.5"], "--delta=1.5 must be in [0, 1)"),
    (["--epsilon", "1", "--mechanism", "gaussian"], "delta"),
    (["--evaluate", "--epsilons", "0.1,0"], "epsilon=0.0 must be finite"),
    (["--evaluate", "--epsilon", "1"], "--epsilons"),
    (["--evaluate", "--seed", "1"], "--seeds S"),
])
def test_dp_stats_rejects_bad_input(ml_folder, args, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    dp_stats.main(["--data", str(ml_folder), *args])
  assert exit_info.value.code != 0
  assert message in capsys.readouterr().err


# =============================================================================
# The DP popularity baseline
# =============================================================================


def _oracle_metrics(split, counts, k):
  """Full-ranking HR/NDCG by a plain loop: unseen items, ties pessimistic."""
  hits, gains = [], []
  for u in split.eval_users():
    target = split.test_target[u]
    seen = set(split.sequences[u][:-1].tolist()) - {int(target)}
    rank = sum(1 for i in range(len(counts)) if i not in seen and i != target
               and counts[i] >= counts[target])
    hits.append(rank < k)
    gains.append(1 / np.log2(rank + 2) if rank < k else 0.0)
  return float(np.mean(hits)), float(np.mean(gains))


def test_dp_popularity_at_huge_epsilon_equals_the_nonprivate_popularity(
    ml_dataset):
  split = sequences.leave_last_out(ml_dataset)
  result = dp_stats.evaluate_dp_popularity(
      split, NUM_ITEMS, epsilons=[1e9], seeds=[0, 1], max_items_per_user=1000)
  counts = np.bincount(np.concatenate(split.train), minlength=NUM_ITEMS)
  hr, ndcg = _oracle_metrics(split, counts, 10)
  assert result["nonprivate"]["hr"] == pytest.approx(hr, abs=1e-6)
  assert result["nonprivate"]["ndcg"] == pytest.approx(ndcg, abs=1e-6)
  assert result["num_users"] == NUM_USERS
  (row,) = result["dp"]
  assert row["hr"] == [result["nonprivate"]["hr"]] * 2
  assert row["ndcg"] == [result["nonprivate"]["ndcg"]] * 2
  assert row["hr_std"] == 0.0


def test_dp_popularity_degrades_with_noise(ml_dataset):
  split = sequences.leave_last_out(ml_dataset)
  result = dp_stats.evaluate_dp_popularity(
      split, NUM_ITEMS, epsilons=[1e-3, 2.0], seeds=range(5),
      max_items_per_user=5)
  nonprivate = result["nonprivate"]["hr"]
  assert nonprivate > 0.3  # the fixture has a strong popularity signal
  tiny, moderate = result["dp"]
  assert tiny["hr_mean"] < nonprivate / 2  # noise swamps the counts
  assert moderate["hr_mean"] > tiny["hr_mean"]
  assert all(0 <= v <= 1 for r in result["dp"] for v in r["hr"] + r["ndcg"])
  assert tiny["hr_std"] > 0 and tiny["hr_std"] == pytest.approx(
      np.std(tiny["hr"], ddof=1))
  table = dp_stats.evaluation_table(result, dataset="fixture", max_items=5,
                                    delta=None, mechanism=None)
  assert "M=5" in table and "discrete_laplace" in table
  assert f"| 0.001 | {tiny['hr_mean']:.4f} +- {tiny['hr_std']:.4f} |" in table


def test_dp_popularity_counts_the_training_part_only():
  # Every user's test item is item 49, which appears in no training sequence:
  # counted on train it ranks last (HR 0); had the test part leaked, first.
  num_users, num_items = 30, 50
  rng = np.random.default_rng(0)
  user, item = [], []
  for u in range(num_users):
    history = rng.choice(10, size=5, replace=False).tolist() + [48, 49]
    user += [u] * len(history)
    item += history
  ds = dataset.RecDataset(
      name="leak", user=np.array(user, np.int32), item=np.array(item, np.int32),
      rating=np.ones(len(user), np.float32), timestamp=np.arange(len(user)),
      num_users=num_users, num_items=num_items,
      item_titles=tuple(map(str, range(num_items))),
      item_genres=np.zeros((num_items, 1), bool), genre_names=("g",),
      raw_user_ids=tuple(map(str, range(num_users))),
      raw_item_ids=tuple(map(str, range(num_items))))
  split = sequences.leave_last_out(ds)
  assert set(split.test_target.tolist()) == {49}
  result = dp_stats.evaluate_dp_popularity(
      split, num_items, epsilons=[1e9], seeds=[0], max_items_per_user=100)
  assert result["nonprivate"]["hr"] == 0.0
  assert result["dp"][0]["hr"] == [0.0]


# =============================================================================
# aggregates.histogram(count_rows=True), which the rating histogram uses
# =============================================================================


def test_row_histogram_caps_rows_per_user():
  user = np.array([0] * 7 + [1] * 2)
  bins = np.array([4, 4, 4, 4, 3, 3, 2, 0, 1])
  m = 3
  full, _ = aggregates.histogram(user, bins, num_bins=5,
                                 max_contributions_per_user=m, count_rows=True,
                                 epsilon=1e9, rng=0)
  assert full.sum() == m + 2  # user 0 keeps 3 of 7 rows, user 1 both
  without, _ = aggregates.histogram(user[7:], bins[7:], num_bins=5,
                                    max_contributions_per_user=m,
                                    count_rows=True, epsilon=1e9, rng=0)
  assert np.abs(full - without).sum() == m  # L1 sensitivity m, reached


def test_row_histogram_gaussian_noise_uses_l2_sensitivity_m():
  # No data: the release is pure noise, N(0, sigma(L2 = m)). The distinct-user
  # histogram's L2 is sqrt(m): a KS test must tell the two apart.
  m, epsilon, delta = 4, 1.0, 1e-5
  noise, event = aggregates.histogram(
      np.zeros(0, np.int64), np.zeros(0, np.int64), num_bins=4000,
      max_contributions_per_user=m, count_rows=True, epsilon=epsilon,
      delta=delta, mechanism="gaussian", rng=0)
  sigma = mechanisms.gaussian_sigma(sensitivity=m, epsilon=epsilon, delta=delta)
  assert stats.kstest(noise / sigma, "norm").pvalue > 0.01
  for wrong in (mechanisms.gaussian_sigma(sensitivity=np.sqrt(m),
                                          epsilon=epsilon, delta=delta),
                sigma * 2 / 3, sigma * 3 / 2):
    assert stats.kstest(noise / wrong, "norm").pvalue < 1e-6
  assert event.noise_multiplier == pytest.approx(sigma / m)
