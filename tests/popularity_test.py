"""Tests for privjax.answers.popularity and its CLI, scripts/dp_stats.py.

The library is tested in-process on small MovieLens files written here; the
script runs as a subprocess where its command-line behaviour (exit codes,
messages, files) is what is tested.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

import conftest  # pylint: disable=g-bad-import-order
from privjax.answers import aggregates
from privjax.answers import popularity
from privjax.data import dataset
from privjax.data import deidentify
from privjax.data import movielens
from privjax.data import sequences
from privjax.run import evaluate as evaluate_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
DP_STATS = REPO / "scripts" / "dp_stats.py"
NUM_USERS, NUM_ITEMS = conftest.SMALL_ML_USERS, conftest.SMALL_ML_ITEMS


@pytest.fixture(scope="module")
def ml_dataset(ml_folder) -> dataset.RecDataset:
  return movielens.load(ml_folder)


def _run(script, *args):
  return subprocess.run([sys.executable, str(script), *map(str, args)],
                        capture_output=True, text=True, timeout=120,
                        cwd=REPO, env=dict(os.environ))


# =============================================================================
# scripts/dp_stats.py
# =============================================================================


def test_dp_stats_release_parses_and_spends_the_budget(ml_folder, ml_dataset,
                                                       tmp_path):
  out = _run(DP_STATS, "--data", ml_folder, "--epsilon", 1.0, "--seed", 3,
             "--max-items-per-user", 5, "--out", tmp_path / "stats.json")
  assert out.returncode == 0, out.stderr
  assert "NOT secure" in out.stderr
  first = json.loads((tmp_path / "stats.json").read_text())
  # --seed: reproducible; and the script is thin: the library call's answer.
  second = popularity.release(
      ml_dataset, epsilon=1.0, delta=None, queries=popularity.QUERIES,
      max_items=5, max_ratings=5, mechanism=None, seed=3, half=False)
  assert first == json.loads(json.dumps(second))
  assert first["mechanism"] == "discrete_laplace"
  assert "NOT secure" in first["noise"]
  popularity_answer, ratings = first["queries"]
  assert popularity_answer["query"] == "item_popularity"
  assert len(popularity_answer["counts"]) == NUM_ITEMS
  assert all(c == round(c) for c in popularity_answer["counts"])  # discrete noise
  assert popularity_answer["epsilon"] == pytest.approx(0.5, rel=1e-9)
  assert ratings["bins"] == ["1", "2", "3", "4", "5"]
  assert ratings["epsilon"] == pytest.approx(0.5, rel=1e-9)
  assert first["budget"]["spent_epsilon"] == pytest.approx(1.0, rel=1e-9)
  assert first["budget"]["spent_epsilon"] <= 1.0 * (1 + 1e-9)
  top = popularity_answer["top"]
  assert [t["noisy_users"] for t in top] == sorted(
      (t["noisy_users"] for t in top), reverse=True)
  assert top[0]["noisy_users"] == max(popularity_answer["counts"])
  assert top[0]["title"] == f"Movie {top[0]['item']} (1995)"
  assert "total epsilon spent: 1 of 1" in out.stdout
  assert top[0]["title"] in out.stdout
  assert popularity.format_release(second) in out.stdout


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
def test_dp_stats_rejects_bad_input(ml_folder, args, message):
  out = _run(DP_STATS, "--data", ml_folder, *args)
  assert out.returncode != 0
  assert message in out.stderr
  assert "Traceback" not in out.stderr


# =============================================================================
# The release
# =============================================================================


def test_release_at_huge_epsilon_gives_the_true_capped_counts(ml_dataset):
  # At epsilon=1e9 the noise is 0, so the wiring (bins, caps, items) shows.
  out = popularity.release(ml_dataset, epsilon=2e9, delta=None,
                           queries=popularity.QUERIES, max_items=1000,
                           max_ratings=1000, mechanism=None, seed=0, half=False)
  popularity_answer, ratings = out["queries"]
  distinct = np.unique(np.stack([ml_dataset.user, ml_dataset.item]), axis=1)
  assert popularity_answer["counts"] == np.bincount(
      distinct[1], minlength=NUM_ITEMS).tolist()
  assert ratings["counts"] == np.bincount(
      ml_dataset.rating.astype(int) - 1, minlength=5).tolist()
  # With a cap of 3 ratings each user gives exactly 3 (all have >= 10).
  capped = popularity.release(ml_dataset, epsilon=1e9, delta=None,
                              queries=("rating_histogram",), max_items=3,
                              max_ratings=3, mechanism=None, seed=0, half=False)
  assert sum(capped["queries"][0]["counts"]) == 3 * NUM_USERS


def test_release_with_delta_uses_the_discrete_gaussian(ml_dataset):
  out = popularity.release(ml_dataset, epsilon=1.0, delta=1e-6,
                           queries=popularity.QUERIES, max_items=5, max_ratings=5,
                           mechanism=None, seed=1, half=False)
  assert out["mechanism"] == "discrete_gaussian"
  assert all("ZCDpEvent" in q["event"] for q in out["queries"])
  assert all(q["delta"] == pytest.approx(5e-7) for q in out["queries"])
  assert 0 < out["budget"]["spent_epsilon"] <= 1.0


def test_release_refuses_a_bad_mechanism_and_never_overspends(ml_dataset):
  with pytest.raises(ValueError, match="delta"):
    popularity.release(ml_dataset, epsilon=1.0, delta=None,
                       queries=popularity.QUERIES, max_items=5, max_ratings=5,
                       mechanism="gaussian", seed=0, half=False)
  out = popularity.release(ml_dataset, epsilon=1.0, delta=None,
                           queries=("popularity",), max_items=5, max_ratings=5,
                           mechanism=None, seed=None, half=False)
  assert out["noise"] == "exact, secure (secrets.SystemRandom)"
  assert out["budget"]["spent_epsilon"] <= 1.0 * (1 + 1e-9)


def test_rating_bins_follow_the_public_star_domain():
  bins, labels = popularity.rating_bins(np.array([0.5, 1.0, 3.5, 5.0]), half=True)
  assert bins.tolist() == [0, 1, 6, 9] and len(labels) == 10
  assert labels[0] == "0.5" and labels[-1] == "5"
  bins, labels = popularity.rating_bins(np.array([1.0, 5.0]), half=False)
  assert bins.tolist() == [0, 4] and labels == ["1", "2", "3", "4", "5"]


def test_half_stars_follow_the_file_format(ml_folder, tmp_path):
  assert not popularity.half_stars(ml_folder)
  (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n")
  assert popularity.half_stars(tmp_path)


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
  result = evaluate_lib.popularity_study(
      ml_dataset, epsilons=[1e9], seeds=[0, 1], max_items_per_user=1000)
  counts = np.bincount(np.concatenate(split.train), minlength=NUM_ITEMS)
  hr, ndcg = _oracle_metrics(split, counts, 10)
  assert result["nonprivate"]["hr"] == pytest.approx(hr, abs=1e-6)
  assert result["nonprivate"]["ndcg"] == pytest.approx(ndcg, abs=1e-6)
  assert "num_users" not in result   # the (private) count is never reported
  (row,) = result["dp"]
  assert row["hr"] == [result["nonprivate"]["hr"]] * 2
  assert row["ndcg"] == [result["nonprivate"]["ndcg"]] * 2
  assert row["hr_std"] == 0.0


def test_dp_popularity_degrades_with_noise(ml_dataset):
  result = evaluate_lib.popularity_study(
      ml_dataset, epsilons=[1e-3, 2.0], seeds=range(5), max_items_per_user=5)
  nonprivate = result["nonprivate"]["hr"]
  assert nonprivate > 0.3  # the fixture has a strong popularity signal
  tiny, moderate = result["dp"]
  assert tiny["hr_mean"] < nonprivate / 2  # noise swamps the counts
  assert moderate["hr_mean"] > tiny["hr_mean"]
  assert all(0 <= v <= 1 for r in result["dp"] for v in r["hr"] + r["ndcg"])
  assert tiny["hr_std"] > 0 and tiny["hr_std"] == pytest.approx(
      np.std(tiny["hr"], ddof=1))
  table = evaluate_lib.popularity_table(result)
  assert "M=5" in table and "discrete_laplace" in table
  assert f"| 0.001 | {tiny['hr_mean']:.4f} +- {tiny['hr_std']:.4f} |" in table


def test_the_study_labels_its_result(ml_dataset):
  out = evaluate_lib.popularity_study(ml_dataset, epsilons=[1e9], seeds=[0],
                                      max_items_per_user=1000)
  assert list(out)[:5] == ["dataset", "max_items_per_user", "delta", "mechanism", "k"]
  assert out["dataset"] == ml_dataset.name and out["delta"] == 0.0


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
  result = evaluate_lib.popularity_study(ds, epsilons=[1e9], seeds=[0],
                                         max_items_per_user=100)
  assert result["nonprivate"]["hr"] == 0.0
  assert result["dp"][0]["hr"] == [0.0]
