"""Leave-last-out evaluation: full-ranking HR@k / NDCG@k, one loop for everyone.

The trainer, ``scripts/evaluate.py``, the export, PATE and the studies all
score users through ``evaluate`` (a model) or ``rank_metrics`` (any score
matrix), so every number in a table comes from the same protocol.

Not private. These metrics are computed from the private users' held-out
items without noise; a run's privacy statement does not cover them (they are
written as ``nonprivate/eval/...`` in metrics.jsonl).
"""

import math
import pathlib
from collections.abc import Iterable
from typing import Any

import numpy as np

from privjax import config as config_lib
from privjax.answers import aggregates
from privjax.data import dataset as dataset_lib
from privjax.data import sequences
from privjax.run import metrics as metrics_lib
from privjax.run import workload as workload_lib


def rank_metrics(scores_fn, es: sequences.EvalSet, *, k: int, batch_size: int,
                 sampled_negatives: int = 0) -> dict[str, float]:
  """HR@k / NDCG@k of ``scores_fn(start, stop) -> [n, items]`` over ``es``.

  Users are scored in chunks of ``batch_size`` rows; the metrics rank each
  target against every item the user has not seen (plus, if
  ``sampled_negatives``, against that many sampled negatives, labelled so).
  """
  all_ranks, sampled = [], []
  for start in range(0, len(es.target), batch_size):
    sl = slice(start, start + batch_size)
    scores = np.asarray(scores_fn(start, min(start + batch_size, len(es.target))))
    all_ranks.append(np.asarray(metrics_lib.ranks(scores, es.target[sl], es.exclude[sl])))
    if sampled_negatives:
      sampled.append(metrics_lib.sampled_ranks(
          scores, es.target[sl], es.exclude[sl], sampled_negatives, seed=start))
  ranks = np.concatenate(all_ranks) if all_ranks else np.zeros(0, np.int32)
  hr, ndcg = metrics_lib.hit_rate_ndcg(ranks, k)
  out = {f"hr@{k}": hr, f"ndcg@{k}": ndcg, "num_users": int(len(ranks))}
  if sampled:
    shr, sndcg = metrics_lib.hit_rate_ndcg(np.concatenate(sampled), k)
    out[f"sampled{sampled_negatives}/hr@{k}"] = shr
    out[f"sampled{sampled_negatives}/ndcg@{k}"] = sndcg
  return out


def cold_users(split: sequences.Split, which: str = "test", max_count: int = 5
               ) -> np.ndarray:
  """Evaluated users whose ``which`` target has at most ``max_count`` training
  interactions in all (a cold item: where item text should help most)."""
  counts = np.bincount(np.concatenate(split.train), minlength=1)
  users = split.eval_users()
  target = (split.test_target if which == "test" else split.valid_target)[users]
  seen = np.where(target < len(counts), counts[np.minimum(target, len(counts) - 1)], 0)
  return users[seen <= max_count]


def restrict(es: sequences.EvalSet, users: np.ndarray) -> sequences.EvalSet:
  """The rows of ``es`` of the given users."""
  keep = np.isin(es.users, users)
  return sequences.EvalSet(es.users[keep], es.history[keep], es.target[keep],
                           es.exclude[keep])


def evaluate(w: workload_lib.Workload, params, frozen, which: str,
             users: np.ndarray | None = None) -> dict[str, float]:
  """Full-ranking HR@k / NDCG@k of a model on ``which`` in {"valid", "test"}
  (of the evaluated ``users`` only, if given: e.g. ``cold_users``)."""
  cfg = w.cfg
  es = sequences.eval_set(w.split, which, cfg.data.max_len)
  if users is not None:
    es = restrict(es, users)
  inputs = w.task.eval_inputs(cfg, es, w.ds, w.model_with(params, frozen))
  bs = cfg.eval.batch_size

  def scores(start, stop):
    chunk = {key: v[start:stop] for key, v in inputs.items()}
    n = stop - start
    if n < bs:  # pad to one static shape: a single compile
      chunk = {key: np.concatenate([v, np.repeat(v[:1], bs - n, 0)])
               for key, v in chunk.items()}
    return np.asarray(w.score_fn(params, frozen, chunk))[:n]

  return rank_metrics(scores, es, k=cfg.eval.k, batch_size=bs,
                      sampled_negatives=cfg.eval.sampled_negatives)


def item_scores_metrics(cfg: config_lib.Config, split: sequences.Split,
                        item_scores: np.ndarray, which: str = "test") -> dict[str, float]:
  """The metrics of one score per item shared by every user (popularity)."""
  es = sequences.eval_set(split, which, cfg.data.max_len)
  scores = np.asarray(item_scores, np.float32)
  return rank_metrics(lambda a, b: np.broadcast_to(scores, (b - a, len(scores))), es,
                      k=cfg.eval.k, batch_size=max(len(es.target), 1))


def popularity_metrics(cfg: config_lib.Config, split: sequences.Split,
                       ds: dataset_lib.RecDataset, which: str = "test") -> dict[str, float]:
  """Non-private most-popular baseline (training counts), same protocol."""
  counts = np.bincount(np.concatenate(split.train), minlength=ds.num_items)
  return item_scores_metrics(cfg, split, counts, which)


def dp_popularity_counts(split: sequences.Split, ds: dataset_lib.RecDataset, *,
                         epsilon: float, delta: float | None, seed: int | None,
                         max_items_per_user: int = 20,
                         mechanism: str | None = None) -> np.ndarray:
  """DP item popularity of the training sequences (``aggregates.dp_item_popularity``).

  User-level (epsilon, delta)-DP, each user in at most ``max_items_per_user``
  items chosen by a keyed hash of the raw user id; discrete Gaussian when
  ``delta`` is given. ``epsilon = inf`` gives the plain counts. ``seed=None``
  draws the noise and the bounding key from the OS; an int makes them
  reproducible (a simulation, NOT a release).
  """
  lengths = [len(t) for t in split.train]
  dense = np.repeat(np.arange(len(lengths)), lengths)
  item = (np.concatenate(split.train) if sum(lengths) else np.zeros(0)).astype(np.int64)
  if math.isinf(epsilon):
    return np.bincount(item, minlength=ds.num_items).astype(np.float32)
  user = np.asarray(ds.raw_user_ids)[dense]
  counts, _ = aggregates.dp_item_popularity(
      user, item, num_items=ds.num_items, max_items_per_user=max_items_per_user,
      epsilon=epsilon, delta=delta, mechanism=mechanism, rng=seed, seed=seed)
  return counts


def dp_popularity_metrics(cfg: config_lib.Config, split: sequences.Split,
                          ds: dataset_lib.RecDataset, *, epsilon: float,
                          delta: float | None, seed: int | None,
                          max_items_per_user: int = 20) -> dict[str, float]:
  """The DP popularity recommender (``dp_popularity_counts``), test metrics."""
  counts = dp_popularity_counts(split, ds, epsilon=epsilon, delta=delta, seed=seed,
                                max_items_per_user=max_items_per_user)
  return item_scores_metrics(cfg, split, counts, "test")


def popularity_study(ds: dataset_lib.RecDataset, *, epsilons: Iterable[float],
                     seeds: Iterable[int], max_items_per_user: int,
                     delta: float | None = None, mechanism: str | None = None,
                     k: int = 10) -> dict:
  """Test HR@k / NDCG@k of DP popularity at each epsilon, over seeds.

  Seed s fixes the bounding key and the noise (a simulation). The metrics
  are computed from the users' test items without noise (not private).

  Returns:
    {"dataset", "max_items_per_user", "delta", "mechanism", "k",
     "nonprivate": {"hr", "ndcg"}, "dp": [{"epsilon", "hr", "ndcg" (lists over
     seeds), "hr_mean", "hr_std", "ndcg_mean", "ndcg_std"}]}; std has ddof=1.
  """
  cfg = config_lib.Config(eval=config_lib.EvalConfig(k=k))
  split = sequences.leave_last_out(ds)

  def metrics(counts):
    m = item_scores_metrics(cfg, split, counts, "test")
    return m[f"hr@{k}"], m[f"ndcg@{k}"]

  hr, ndcg = metrics(dp_popularity_counts(split, ds, epsilon=math.inf, delta=None,
                                          seed=None))
  out = {"dataset": ds.name, "max_items_per_user": max_items_per_user,
         "delta": delta or 0.0, "mechanism": mechanism, "k": k,
         "nonprivate": {"hr": hr, "ndcg": ndcg}, "dp": []}
  seeds = list(seeds)
  for epsilon in epsilons:
    pairs = [metrics(dp_popularity_counts(
        split, ds, epsilon=epsilon, delta=delta, seed=seed, mechanism=mechanism,
        max_items_per_user=max_items_per_user)) for seed in seeds]
    hrs, ndcgs = [h for h, _ in pairs], [n for _, n in pairs]
    ddof = 1 if len(seeds) > 1 else 0
    out["dp"].append({"epsilon": epsilon, "hr": hrs, "ndcg": ndcgs,
                      "hr_mean": float(np.mean(hrs)), "hr_std": float(np.std(hrs, ddof=ddof)),
                      "ndcg_mean": float(np.mean(ndcgs)),
                      "ndcg_std": float(np.std(ndcgs, ddof=ddof))})
  return out


def popularity_table(result: dict) -> str:
  """A ``popularity_study`` result as a markdown table, with its protocol."""
  k, m, delta = result["k"], result["max_items_per_user"], result["delta"]
  mech = result["mechanism"] or ("discrete_gaussian" if delta else "discrete_laplace")
  seeds = len(result["dp"][0]["hr"]) if result["dp"] else 0
  lines = [
      f"DP popularity on {result['dataset']}: user-level, each user in at most "
      f"M={m} training items, {mech}, delta={delta:g}; leave-last-out test, full "
      f"ranking over unseen items; mean +- std over {seeds} seeds (seeded noise: "
      "a simulation)", "",
      f"| model | epsilon | HR@{k} | NDCG@{k} |", "|---|---:|---:|---:|",
      f"| popularity (non-private) | inf | {result['nonprivate']['hr']:.4f} | "
      f"{result['nonprivate']['ndcg']:.4f} |"]
  for row in result["dp"]:
    lines.append(f"| DP popularity (M={m}) | {row['epsilon']:g} | "
                 f"{row['hr_mean']:.4f} +- {row['hr_std']:.4f} | "
                 f"{row['ndcg_mean']:.4f} +- {row['ndcg_std']:.4f} |")
  return "\n".join(lines)


def evaluate_workdir(workdir: str | pathlib.Path) -> dict[str, Any]:
  """Recomputes validation and test metrics from a run's latest checkpoint."""
  w, params, step = workload_lib.load_trained(workdir)
  return {"step": step,
          "valid": evaluate(w, params, w.frozen, "valid"),
          "test": evaluate(w, params, w.frozen, "test")}
