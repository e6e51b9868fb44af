"""User-level DP item popularity and rating histogram, and the DP popularity baseline.

``release`` answers the queries under one ``budget.PrivacyBudget``;
``evaluate`` scores the recommender that ranks items by DP popularity counts.
What ``scripts/dp_stats.py`` runs.
"""

import pathlib
from collections.abc import Sequence

import numpy as np

from privjax.answers import aggregates
from privjax.answers import budget as budget_lib
from privjax.data import dataset as dataset_lib

QUERIES = ("popularity", "rating_histogram")
DEFAULT_MAX_ITEMS = 20


def _noise_rng(seed: int | None, index: int):
  # Each query gets its own stream; the same seed for both would repeat noise.
  if seed is None:
    return None  # secure default of privjax.answers.aggregates
  return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def default_mechanism(mechanism: str | None, delta: float | None) -> str:
  """The mechanism ``aggregates`` uses for ``mechanism=None``: exact and discrete.

  >>> default_mechanism(None, None), default_mechanism(None, 1e-6)
  ('discrete_laplace', 'discrete_gaussian')
  """
  return mechanism or ("discrete_gaussian" if delta else "discrete_laplace")


def half_stars(data: str | pathlib.Path) -> bool:
  """Whether the folder's format rates in half stars (the ml-latest layout)."""
  return (pathlib.Path(data) / "ratings.csv").is_file()


def rating_bins(rating: np.ndarray, half: bool) -> tuple[np.ndarray, list[str]]:
  """(bin of each rating, bin labels) over the public star domain.

  The domain comes from the file format (``half``), never from the data.

  >>> rating_bins(np.array([1.0, 5.0]), half=False)
  (array([0, 4]), ['1', '2', '3', '4', '5'])
  """
  if half:
    labels = [f"{v / 2:g}" for v in range(1, 11)]
    return np.round(np.asarray(rating) * 2).astype(np.int64) - 1, labels
  return np.round(np.asarray(rating)).astype(np.int64) - 1, [str(v) for v in range(1, 6)]


def release(ds: dataset_lib.RecDataset, *, epsilon: float, delta: float | None,
            queries: Sequence[str], max_items: int, max_ratings: int,
            mechanism: str | None, seed: int | None, half: bool,
            top: int = 10) -> dict:
  """Answers ``queries`` on ``ds`` under one budget; returns JSON-ready results.

  Queries (``QUERIES``), which split epsilon (and delta) equally:

  * ``"popularity"``: distinct users per item, each user counted in at most
    ``max_items`` items (L1 = M, L2 = sqrt(M)), and the ``top`` items;
  * ``"rating_histogram"``: ratings per star value, each user keeping at most
    ``max_ratings`` ratings (L1 = L2 = R), over the public star domain of
    ``rating_bins``.

  Guarantee: (epsilon, delta)-DP for one user (all their ratings);
  neighbouring datasets differ by adding or removing one user. The item
  catalogue (titles, number of items) is treated as public. Only noisy values
  are returned (no true counts, not even the number of users). Noise is the
  exact discrete Laplace (``delta`` unset) or discrete Gaussian (``delta``
  set) from ``secrets.SystemRandom``, unless ``mechanism`` asks for
  floating-point noise (NOT safe for release, Mironov 2012). An int ``seed``
  makes the noise reproducible and therefore NOT secure: tests and simulation
  only; the result says so in ``"noise"``.

  Args:
    ds: the dataset.
    epsilon: the total epsilon (> 0).
    delta: the total delta, or ``None``/0 for pure DP.
    queries: names from ``QUERIES``, answered in this order.
    max_items: M, items a user counts in (popularity).
    max_ratings: R, ratings a user counts in (rating histogram).
    mechanism: one of ``aggregates.MECHANISMS``, or ``None`` for the default.
    seed: ``None`` (secure noise) or a seed (NOT secure).
    half: whether ratings are half stars (``half_stars``).
    top: how many top items the popularity answer lists.

  Returns:
    {"dataset", "num_items", "unit_of_privacy", "neighbouring", "mechanism",
    "noise", "budget": {"epsilon", "delta", "spent_epsilon", "accountant"},
    "queries": [one dict per query with its noisy counts, epsilon, delta and
    DP event]}.

  Raises:
    ValueError: a bad parameter (named).
    budget.BudgetExceededError: the queries would spend more than the budget.
  """
  budget = budget_lib.PrivacyBudget(epsilon=epsilon, delta=delta or 0.0)
  session = budget_lib.Session(budget)
  share_eps = epsilon / len(queries)
  share_delta = None if not delta else delta / len(queries)
  # Contribution bounding is keyed by the raw user id, never the dense index
  # (which shifts when a user is added).
  user = np.asarray(ds.raw_user_ids)[ds.user]
  results = []
  for index, query in enumerate(queries):
    rng = _noise_rng(seed, index)
    if query == "popularity":
      counts = session.run_query(
          aggregates.dp_item_popularity, name="item_popularity", user=user,
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
          aggregates.histogram, name="rating_histogram", user=user, bins=bins,
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
  mech = default_mechanism(mechanism, delta)
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
  """A ``release`` result as text: the noisy top items and histogram, the budget."""
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
