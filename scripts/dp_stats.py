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
datasets differ by adding or removing one user (``popularity.release``, which
this runs, says the rest). Only noisy values are printed or written. Noise is
the exact discrete Laplace (``--delta`` unset) or discrete Gaussian (``--delta``
set) from ``secrets.SystemRandom``. ``--seed`` makes the noise reproducible and
therefore NOT secure: for tests and simulation only.

Evaluate mode (``privjax.run.evaluate.popularity_study``) ranks items by DP popularity counts of
the training part of the leave-last-out split only, and reports test HR@k /
NDCG@k (full ranking over unseen items, ties pessimistic) as mean +- sample std
over seeds, next to the non-private popularity. Its noise is seeded.
"""

import argparse
import json
import logging
import math
import pathlib
import sys

from privjax import cli
from privjax.answers import aggregates
from privjax.answers import budget as budget_lib
from privjax.answers import popularity
from privjax.run import evaluate as evaluate_lib
from privjax.data import movielens


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
  parser.add_argument("--max-items-per-user", type=int,
                      default=popularity.DEFAULT_MAX_ITEMS,
                      help="M: items a user counts in (popularity)")
  parser.add_argument("--max-ratings-per-user", type=int, default=None,
                      help="R: ratings a user counts in (rating histogram); "
                      "default M")
  parser.add_argument("--mechanism", choices=aggregates.MECHANISMS, default=None,
                      help="default: discrete_laplace, or discrete_gaussian "
                      "with --delta (exact, secure)")
  parser.add_argument("--query", choices=popularity.QUERIES + ("all",),
                      default="all")
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
      out = evaluate_lib.popularity_study(
          ds, epsilons=args.epsilons, seeds=range(args.seeds),
          max_items_per_user=args.max_items_per_user, delta=args.delta,
          mechanism=args.mechanism, k=args.k)
      print(evaluate_lib.popularity_table(out))
    else:
      queries = popularity.QUERIES if args.query == "all" else (args.query,)
      out = popularity.release(
          ds, epsilon=args.epsilon, delta=args.delta, queries=queries,
          max_items=args.max_items_per_user,
          max_ratings=args.max_ratings_per_user, mechanism=args.mechanism,
          seed=args.seed, half=popularity.half_stars(args.data), top=args.top)
      print(popularity.format_release(out))
  except (ValueError, budget_lib.BudgetExceededError) as e:
    parser.error(str(e))
  if args.out is not None:
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
  sys.exit(cli.run(main, sys.argv[1:]))
