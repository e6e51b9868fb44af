"""Ranking metrics for next-item recommendation: HR@k and NDCG@k.

Full ranking (the default): the target is ranked against every item the user
has not interacted with before. Ties count against the model (a constant
scorer gets the worst rank, not a lucky one). With a single relevant item,
HR@k = 1[rank < k] and NDCG@k = 1 / log2(rank + 2) if rank < k else 0
(rank is 0-based).

>>> import numpy as np
>>> scores = np.array([[0.1, 0.9, 0.5, 0.3]])
>>> rank = ranks(scores, np.array([2]), np.array([[1]]))   # item 1 excluded
>>> int(rank[0])
0
>>> hr, ndcg = hit_rate_ndcg(np.array([0, 1, 10]), k=10)
>>> round(float(hr), 4), round(float(ndcg), 4)
(0.6667, 0.5436)
"""

import jax
import jax.numpy as jnp
import numpy as np


@jax.jit
def ranks(scores: jax.Array, target: jax.Array, exclude: jax.Array) -> jax.Array:
  """0-based rank of ``target`` among non-excluded items, ties pessimistic.

  Args:
    scores: [B, I] item scores.
    target: [B] target item per row.
    exclude: [B, S] items to drop from the ranking, -1 padded. The target is
      never dropped.

  Returns:
    [B] int32 ranks.
  """
  scores = jnp.asarray(scores, jnp.float32)
  rows = jnp.arange(scores.shape[0])[:, None]
  excluded = jnp.zeros(scores.shape, bool).at[
      rows, jnp.where(exclude >= 0, exclude, scores.shape[1])].set(True, mode="drop")
  excluded = excluded.at[jnp.arange(scores.shape[0]), target].set(False)
  t = jnp.take_along_axis(scores, target[:, None], axis=1)
  better = (scores > t) | (scores == t) | jnp.isnan(scores)
  better = better & ~excluded
  # The target itself is counted once by `scores == t`.
  return (jnp.sum(better, axis=1) - 1).astype(jnp.int32)


def sampled_ranks(scores: np.ndarray, target: np.ndarray, exclude: np.ndarray,
                  num_negatives: int, seed: int) -> np.ndarray:
  """Rank against ``num_negatives`` items sampled uniformly from unseen items.

  Sampled metrics overstate quality and are only an option, labelled
  ``sampled`` wherever they are reported.
  """
  rng = np.random.default_rng(seed)
  scores = np.asarray(scores)
  out = np.empty(len(target), np.int32)
  num_items = scores.shape[1]
  for b in range(len(target)):
    banned = set(exclude[b][exclude[b] >= 0].tolist()) | {int(target[b])}
    pool = np.setdiff1d(np.arange(num_items), np.fromiter(banned, np.int64))
    neg = rng.choice(pool, size=min(num_negatives, len(pool)), replace=False)
    t = scores[b, target[b]]
    out[b] = int(np.sum(scores[b, neg] >= t))
  return out


def hit_rate_ndcg(rank: np.ndarray, k: int) -> tuple[float, float]:
  rank = np.asarray(rank)
  hit = rank < k
  ndcg = np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0)
  return float(hit.mean()) if len(rank) else float("nan"), (
      float(ndcg.mean()) if len(rank) else float("nan"))
