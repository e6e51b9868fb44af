"""Differentially private statistics of a MovieLens folder, and the DP popularity baseline.

  python scripts/dp_stats.py --data ../shared/data/ml-100k --epsilon 1
  python scripts/dp_stats.py --data ../shared/data/ml-100k --epsilon 1 \\
      --delta 1e-6 --query all --out stats.json          # discrete Gaussian
  python scripts/dp_stats.py --data ../shared/data/ml-100k --evaluate \\
      --epsilons 0.1,1,10 --seeds 5                      # markdown table

Release mode answers DP queries under one ``PrivacyBudget(epsilon, delta)``;
``--query all`` splits epsilon (and delta) equally between them:

* ``popularity``: distinct users per item, each user counted in at most
  ``--max-items-per-user`` items (L1 = M, L2 = sqrt(M));
* ``rating_histogram``: ratings per star value, each user keeping at most
  ``--max-ratings-per-user`` ratings (L1 = L2 = R). Whole stars 1-5, or half
  stars 0.5-5 for the ml-latest layout (``ratings.csv``); the domain comes
  from the file format, never from the data.

Guarantee: (epsilon, delta)-DP for one user (all their ratings), neighbouring
datasets differ by adding or removing one user; see privjax/aggregates.py. The
item catalogue (titles, number of items) is treated as public. Only noisy
values are printed or written (no true counts, not even the number of users).
Noise is the exact discrete Laplace (``--delta`` unset) or discrete Gaussian
(``--delta`` set) from ``secrets.SystemRandom``. ``--seed`` makes the noise
reproducible and therefore NOT secure: for tests and simulation only.

Evaluate mode ranks items by DP popularity counts computed on the training
part of the leave-last-out split only, and reports HR@k / NDCG@k of the test
items (full ranking over the items each user has not seen, ties pessimistic:
the protocol of ``privjax.trainer.popularity_metrics``) as mean +- sample std
over seeds, next to the non-private popularity. Its noise is seeded
(simulation).
"""

import argparse
import json
import logging
import math
import pathlib
import sys

try:
  import privjax  # noqa: F401
except ImportError:
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import numpy as np

from privjax.answers import budget as budget_lib
from privjax.answers import aggregates
from privjax.data import movielens
from privjax.data import sequences

QUERIES = ("popularity", "rating_histogram")
DEFAULT_MAX_ITEMS = 20


def _floats(text: str) -> list[float]:
  try:
    values = [float(part) for part in text.split(",")]
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"{text!r} must be a comma-separated list of numbers") from None
  for v in values:
    if not (v > 0 and math.isfinite(v)):
      raise argparse.ArgumentTypeError(f"epsilon={v} must be finite and > 0")
  return values


def _parse(argv):
  parser = argparse.ArgumentParser(
      description="User-level DP item popularity and rating histogram of a "
      "MovieLens folder, or (--evaluate) the DP popularity recommender.")
  parser.add_argument("--data", required=True, help="MovieLens folder")
  parser.add_argument("--epsilon", type=float, default=None,
                      help="total epsilon of the release (not with --evaluate)")
  parser.add_argument("--delta", type=float, default=None,
                      help="total delta; unset: pure DP (discrete Laplace)")
  parser.add_argument("--max-items-per-user", type=int, default=DEFAULT_MAX_ITEMS,
                      help="M: items a user counts in (popularity)")
  parser.add_argument("--max-ratings-per-user", type=int, default=None,
                      help="R: ratings a user counts in (rating histogram); "
                      "default M")
  parser.add_argument("--mechanism", choices=aggregates.MECHANISMS, default=None,
                      help="default: discrete_laplace, or discrete_gaussian "
                      "with --delta (exact, secure)")
  parser.add_argument("--query", choices=QUERIES + ("all",), default="all")
  parser.add_argument("--top", type=int, default=10, help="top items to print")
  parser.add_argument("--out", default=None, help="write the answers as JSON")
  parser.add_argument("--seed", type=int, default=None,
                      help="release: seeded noise, reproducible and NOT secure")
  parser.add_argument("--evaluate", action="store_true",
                      help="HR/NDCG of the DP popularity recommender")
  parser.add_argument("--epsilons", type=_floats, default=[0.1, 1.0, 10.0],
                      help="with --evaluate: e.g. 0.1,1,10")
  parser.add_argument("--seeds", type=int, default=5,
                      help="with --evaluate: number of seeds (0..S-1)")
  parser.add_argument("--k", type=int, default=10, help="with --evaluate: HR@k")
  args = parser.parse_args(argv)
  if args.max_ratings_per_user is None:
    args.max_ratings_per_user = args.max_items_per_user
  for flag, value in (("--max-items-per-user", args.max_items_per_user),
                      ("--max-ratings-per-user", args.max_ratings_per_user),
                      ("--seeds", args.seeds), ("--k", args.k), ("--top", args.top)):
    if value < 1:
      parser.error(f"{flag}={value} must be >= 1")
  if args.delta is not None and not 0 <= args.delta < 1:
    parser.error(f"--delta={args.delta} must be in [0, 1)")
  if args.evaluate:
    if args.epsilon is not None:
      parser.error("--epsilon is for a release; with --evaluate use --epsilons")
    if args.seed is not None:
      parser.error("--seed is for a release; --evaluate uses seeds 0..S-1 "
                   "(--seeds S)")
  elif args.epsilon is None:
    parser.error("--epsilon is required (or --evaluate)")
  elif not (args.epsilon > 0 and math.isfinite(args.epsilon)):
    parser.error(f"--epsilon={args.epsilon} must be finite and > 0")
  return parser, args


def _noise_rng(seed: int | None, index: int):
  # Each query gets its own stream; the same seed for both would repeat noise.
  if seed is None:
    return None  # secure default of privjax.answers.aggregates
  return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def half_stars(data: pathlib.Path) -> bool:
  """Whether the folder's format rates in half stars (the ml-latest layout)."""
  return (pathlib.Path(data) / "ratings.csv").is_file()


def rating_bins(rating: np.ndarray, half: bool) -> tuple[np.ndarray, list[str]]:
  """(bin of each rating, bin labels) over the public star domain."""
  if half:
    labels = [f"{v / 2:g}" for v in range(1, 11)]
    return np.round(np.asarray(rating) * 2).astype(np.int64) - 1, labels
  return np.round(np.asarray(rating)).astype(np.int64) - 1, [str(v) for v in range(1, 6)]


def release(ds, *, epsilon: float, delta: float | None, queries, max_items: int,
            max_ratings: int, mechanism: str | None, seed: int | None,
            half: bool, top: int = 10) -> dict:
  """Answers ``queries`` on ``ds`` under one budget; returns JSON-ready results."""
  budget = budget_lib.PrivacyBudget(epsilon=epsilon, delta=delta or 0.0)
  session = budget_lib.Session(budget)
  share_eps = epsilon / len(queries)
  share_delta = None if not delta else delta / len(queries)
  results = []
  for index, query in enumerate(queries):
    rng = _noise_rng(seed, index)
    if query == "popularity":
      counts = session.run_query(
          aggregates.dp_item_popularity, name="item_popularity", user=ds.user,
          item=ds.item, num_items=ds.num_items, max_items_per_user=max_items,
          epsilon=share_eps, delta=share_delta, mechanism=mechanism, rng=rng,
          seed=seed)
      best = aggregates.recommend_popular(counts, top)
      result = {"query": "item_popularity", "max_items_per_user": max_items,
                "counts": counts.tolist(),
                "top": [{"item": ds.raw_item_ids[i], "title": ds.item_titles[i],
                         "noisy_users": float(counts[i])} for i in best]}
    else:
      bins, labels = rating_bins(ds.rating, half)
      counts = session.run_query(
          aggregates.histogram, name="rating_histogram", user=ds.user, bins=bins,
          num_bins=len(labels), max_contributions_per_user=max_ratings,
          count_rows=True, epsilon=share_eps, delta=share_delta,
          mechanism=mechanism, rng=rng, seed=seed)
      clipped = np.maximum(counts, 0.0)  # post-processing
      total = clipped.sum()
      result = {"query": "rating_histogram", "max_ratings_per_user": max_ratings,
                "bins": labels, "counts": counts.tolist(),
                "fractions": (clipped / total).tolist() if total > 0
                else [None] * len(labels)}
    spent = budget.queries[-1]
    result.update(epsilon=spent.epsilon, delta=spent.delta,
                  event=repr(spent.event))
    results.append(result)
  mech = mechanism or ("discrete_gaussian" if delta else "discrete_laplace")
  if seed is not None:
    noise = f"seeded (seed={seed}), NOT secure: simulation only"
  elif mech in ("discrete_laplace", "discrete_gaussian"):
    noise = "exact, secure (secrets.SystemRandom)"
  else:
    noise = "floating point, NOT safe for release (Mironov 2012)"
  return {
      "dataset": ds.name,
      "num_items": ds.num_items,
      "unit_of_privacy": "user (all of a user's ratings)",
      "neighbouring": "add or remove one user",
      "mechanism": mech,
      "noise": noise,
      "budget": {"epsilon": epsilon, "delta": delta or 0.0,
                 "spent_epsilon": budget.spent_epsilon,
                 "accountant": "basic composition / rdp, the smaller"},
      "queries": results,
  }


def format_release(r: dict) -> str:
  lines = [f"{r['dataset']}: user-level DP statistics ({r['neighbouring']}); "
           f"mechanism {r['mechanism']}, noise {r['noise']}"]
  for q in r["queries"]:
    eps = f"epsilon={q['epsilon']:.6g}" + (f", delta={q['delta']:.3g}"
                                           if q["delta"] else "")
    if q["query"] == "item_popularity":
      lines.append(f"item popularity ({eps}; each user in at most "
                   f"{q['max_items_per_user']} items), top {len(q['top'])}:")
      for rank, t in enumerate(q["top"], start=1):
        lines.append(f"  {rank:3d}. {t['noisy_users']:9.1f}  {t['title']} "
                     f"(id {t['item']})")
    else:
      lines.append(f"rating histogram ({eps}; each user at most "
                   f"{q['max_ratings_per_user']} ratings):")
      for label, c, f in zip(q["bins"], q["counts"], q["fractions"]):
        share = "" if f is None else f"  ({100 * f:.1f}%)"
        lines.append(f"  {label:>4} stars: {c:9.1f}{share}")
  b = r["budget"]
  lines.append(f"total epsilon spent: {b['spent_epsilon']:.6g} of "
               f"{b['epsilon']:.6g} (delta {b['delta']:.3g})")
  return "\n".join(lines)


# =============================================================================
# The DP popularity baseline
# =============================================================================


def ranking_metrics(counts: np.ndarray, es: sequences.EvalSet, k: int
                    ) -> tuple[float, float]:
  """HR@k, NDCG@k of ranking every user's unseen items by ``counts``.

  The code of ``privjax.trainer.popularity_metrics``, given the counts.
  """
  from privjax.run import metrics  # jax: only evaluation needs it
  scores = np.broadcast_to(np.asarray(counts, np.float32),
                           (len(es.target), len(counts)))
  ranks = np.asarray(metrics.ranks(scores, es.target, es.exclude))
  return metrics.hit_rate_ndcg(ranks, k)


def training_rows(split: sequences.Split) -> tuple[np.ndarray, np.ndarray]:
  """(user, item) of every training interaction of the leave-last-out split."""
  lengths = [len(t) for t in split.train]
  user = np.repeat(np.arange(len(lengths)), lengths).astype(np.int64)
  item = (np.concatenate(split.train) if sum(lengths) else np.zeros(0)).astype(np.int64)
  return user, item


def evaluate_dp_popularity(split: sequences.Split, num_items: int, *,
                           epsilons, seeds, max_items_per_user: int,
                           delta: float | None = None,
                           mechanism: str | None = None, k: int = 10) -> dict:
  """Test HR@k / NDCG@k of the DP popularity recommender, and of the non-private one.

  The counts are ``aggregates.dp_item_popularity`` on ``split.train`` only
  (user-level (epsilon, delta)-DP, each user in at most
  ``max_items_per_user`` items); seed s fixes both the contribution bounding
  and the (NOT secure, simulation) noise.

  Returns:
    {"nonprivate": {"hr", "ndcg"}, "num_users": evaluated users,
     "dp": [{"epsilon", "hr", "ndcg" (lists over seeds), "hr_mean", "hr_std",
     "ndcg_mean", "ndcg_std"}]}; std is the sample std (ddof=1).
  """
  es = sequences.eval_set(split, "test", max_len=1)
  user, item = training_rows(split)
  hr, ndcg = ranking_metrics(np.bincount(item, minlength=num_items), es, k)
  out = {"k": k, "num_users": int(len(es.target)),
         "nonprivate": {"hr": hr, "ndcg": ndcg}, "dp": []}
  seeds = list(seeds)
  for epsilon in epsilons:
    hrs, ndcgs = [], []
    for seed in seeds:
      counts, _ = aggregates.dp_item_popularity(
          user, item, num_items=num_items, max_items_per_user=max_items_per_user,
          epsilon=epsilon, delta=delta, mechanism=mechanism, rng=seed, seed=seed)
      hr, ndcg = ranking_metrics(counts, es, k)
      hrs.append(hr)
      ndcgs.append(ndcg)
    ddof = 1 if len(seeds) > 1 else 0
    out["dp"].append({"epsilon": epsilon, "hr": hrs, "ndcg": ndcgs,
                      "hr_mean": float(np.mean(hrs)),
                      "hr_std": float(np.std(hrs, ddof=ddof)),
                      "ndcg_mean": float(np.mean(ndcgs)),
                      "ndcg_std": float(np.std(ndcgs, ddof=ddof))})
  return out


def evaluation_table(result: dict, *, dataset: str, max_items: int,
                     delta: float | None, mechanism: str | None) -> str:
  k = result["k"]
  mech = mechanism or ("discrete_gaussian" if delta else "discrete_laplace")
  seeds = len(result["dp"][0]["hr"]) if result["dp"] else 0
  lines = [
      f"DP popularity on {dataset}: user-level, each user in at most "
      f"M={max_items} training items, {mech}, delta={delta or 0:g}; "
      f"leave-last-out test, full ranking over unseen items, "
      f"{result['num_users']} users; mean +- std over {seeds} seeds",
      "",
      f"| model | epsilon | HR@{k} | NDCG@{k} |",
      "|---|---:|---:|---:|",
      f"| popularity (non-private) | inf | {result['nonprivate']['hr']:.4f} | "
      f"{result['nonprivate']['ndcg']:.4f} |"]
  for row in result["dp"]:
    lines.append(
        f"| DP popularity (M={max_items}) | {row['epsilon']:g} | "
        f"{row['hr_mean']:.4f} +- {row['hr_std']:.4f} | "
        f"{row['ndcg_mean']:.4f} +- {row['ndcg_std']:.4f} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  parser, args = _parse(argv)
  logging.getLogger("absl").setLevel(logging.ERROR)
  try:
    ds = movielens.load(args.data)
  except (OSError, ValueError) as e:
    parser.error(str(e))
  if args.mechanism in ("laplace", "gaussian") and not args.evaluate:
    print(f"warning: mechanism={args.mechanism!r} draws floating-point noise, "
          "which is NOT safe for release (Mironov 2012)", file=sys.stderr)
  if args.seed is not None and not args.evaluate:
    print(f"warning: --seed={args.seed} makes the noise reproducible and NOT "
          "secure; use it for tests and simulation only", file=sys.stderr)
  try:
    if args.evaluate:
      split = sequences.leave_last_out(ds)
      result = evaluate_dp_popularity(
          split, ds.num_items, epsilons=args.epsilons, seeds=range(args.seeds),
          max_items_per_user=args.max_items_per_user, delta=args.delta,
          mechanism=args.mechanism, k=args.k)
      print(evaluation_table(result, dataset=ds.name,
                             max_items=args.max_items_per_user,
                             delta=args.delta, mechanism=args.mechanism))
      out = {"dataset": ds.name, "max_items_per_user": args.max_items_per_user,
             "delta": args.delta or 0.0, "mechanism": args.mechanism, **result}
    else:
      queries = QUERIES if args.query == "all" else (args.query,)
      out = release(ds, epsilon=args.epsilon, delta=args.delta, queries=queries,
                    max_items=args.max_items_per_user,
                    max_ratings=args.max_ratings_per_user,
                    mechanism=args.mechanism, seed=args.seed,
                    half=half_stars(args.data), top=args.top)
      print(format_release(out))
  except (ValueError, budget_lib.BudgetExceededError) as e:
    parser.error(str(e))
  if args.out is not None:
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
  main()
