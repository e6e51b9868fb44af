"""The built-in dataset: a synthetic, MovieLens-shaped recommendation log.

Deterministic from a seed. Items have titles, 1-3 genres and Zipf-like
popularity; users have latent tastes (one or two favourite genres), MovieLens
style demographics (age, gender, occupation, zip) and chronological
interaction sequences in which the next item depends on the user's taste, on
the item just consumed (sequential signal) and on popularity. A next-item
model can therefore beat popularity by reading the history, as on real data.

>>> ds = generate(num_users=50, num_items=40, mean_interactions=8, seed=0)
>>> ds.num_users, ds.num_items, ds.item_genres.shape[1]
(50, 40, 18)
>>> ds2 = generate(num_users=50, num_items=40, mean_interactions=8, seed=0)
>>> bool((ds.item == ds2.item).all())
True
"""

import numpy as np

from privjax.data import dataset

GENRES = ("Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
          "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical",
          "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")
OCCUPATIONS = ("administrator", "artist", "doctor", "educator", "engineer",
               "entertainment", "executive", "healthcare", "homemaker",
               "lawyer", "librarian", "marketing", "none", "other",
               "programmer", "retired", "salesman", "scientist", "student",
               "technician", "writer")
_ADJECTIVES = ("Silent", "Crimson", "Last", "Hidden", "Broken", "Golden",
               "Lost", "Midnight", "Wild", "Frozen", "Secret", "Burning",
               "Distant", "Electric", "Quiet", "Savage", "Endless", "Paper",
               "Iron", "Lonely", "Northern", "Velvet", "Hollow", "Bright")
_NOUNS = ("River", "Empire", "Garden", "Horizon", "Witness", "Harbor",
          "Machine", "Kingdom", "Stranger", "Summer", "Frontier", "Orchestra",
          "Detective", "Island", "Shadow", "Voyage", "Canyon", "Promise",
          "Station", "Carnival", "Lighthouse", "Mirror", "Rebellion", "Comet")


def _titles(rng: np.random.Generator, num_items: int) -> tuple[str, ...]:
  seen: dict[str, int] = {}
  titles = []
  for _ in range(num_items):
    base = f"The {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}"
    n = seen.get(base, 0)
    seen[base] = n + 1
    name = base if n == 0 else f"{base} {n + 1}"
    titles.append(f"{name} ({int(rng.integers(1950, 2000))})")
  return tuple(titles)


def generate(*, num_users: int = 2000, num_items: int = 400,
             mean_interactions: float = 30.0, seed: int = 0,
             num_factors: int = 8, taste_strength: float = 5.0,
             sequential_strength: float = 2.0,
             zipf_exponent: float = 0.6) -> dataset.RecDataset:
  """Generates a synthetic recommendation dataset.

  Args:
    num_users: users (each gets at least 5 interactions).
    num_items: catalogue size.
    mean_interactions: mean sequence length (geometric-like tail).
    seed: everything is a function of it.
    num_factors: latent dimension of tastes and items.
    taste_strength: weight of the user-taste term in the choice logits.
    sequential_strength: weight of the last-item similarity term.
    zipf_exponent: popularity ~ rank^-exponent.

  Returns:
    A ``RecDataset`` named ``"synthetic"``.
  """
  if num_users <= 0 or num_items < 10:
    raise ValueError(f"num_users={num_users} must be > 0 and num_items="
                     f"{num_items} >= 10")
  if mean_interactions < 5:
    raise ValueError(f"mean_interactions={mean_interactions} must be >= 5")
  rng = np.random.default_rng(seed)
  num_genres = len(GENRES)

  # Items: 1-3 genres, latent vectors near their genres' centres.
  genre_vecs = rng.normal(size=(num_genres, num_factors))
  genre_vecs /= np.linalg.norm(genre_vecs, axis=1, keepdims=True)
  genre_weights = 1.0 / np.arange(1, num_genres + 1) ** 0.7  # some genres common
  genre_weights /= genre_weights.sum()
  item_genres = np.zeros((num_items, num_genres), bool)
  for i in range(num_items):
    k = rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15])
    item_genres[i, rng.choice(num_genres, size=k, replace=False, p=genre_weights)] = True
  item_vecs = item_genres @ genre_vecs / item_genres.sum(1, keepdims=True)
  item_vecs = item_vecs + 0.35 * rng.normal(size=item_vecs.shape)
  item_vecs /= np.linalg.norm(item_vecs, axis=1, keepdims=True)
  log_pop = -zipf_exponent * np.log(1 + rng.permutation(num_items))

  # Users: tastes from one or two favourite genres, plus noise.
  fav = rng.choice(num_genres, size=(num_users, 2), p=genre_weights)
  mix = rng.uniform(0.5, 1.0, size=(num_users, 1))
  tastes = mix * genre_vecs[fav[:, 0]] + (1 - mix) * genre_vecs[fav[:, 1]]
  tastes = tastes + 0.3 * rng.normal(size=tastes.shape)
  tastes /= np.linalg.norm(tastes, axis=1, keepdims=True)
  lengths = 5 + rng.geometric(1.0 / max(mean_interactions - 4, 1.0), size=num_users)
  lengths = np.minimum(lengths, num_items // 2)

  # Sequences, all users at once: Gumbel-max over unseen items.
  max_len = int(lengths.max())
  seqs = np.zeros((num_users, max_len), np.int64)
  seen = np.zeros((num_users, num_items), bool)
  base = taste_strength * (tastes @ item_vecs.T) + log_pop
  last = None
  for t in range(max_len):
    logits = base.copy()
    if last is not None:
      logits += sequential_strength * (item_vecs[last] @ item_vecs.T)
    logits[seen] = -np.inf
    choice = np.argmax(logits + rng.gumbel(size=logits.shape), axis=1)
    seqs[:, t] = choice
    active = t < lengths
    seen[np.arange(num_users)[active], choice[active]] = True
    last = choice

  users = np.repeat(np.arange(num_users), lengths)
  items = np.concatenate([seqs[u, :lengths[u]] for u in range(num_users)])
  start = rng.integers(874_000_000, 893_000_000, size=num_users)
  gaps = rng.exponential(3600.0 * 24, size=len(items)).astype(np.int64) + 1
  offsets = np.concatenate([np.cumsum(gaps[s:s + n]) for s, n in
                            zip(np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)])
  timestamps = np.repeat(start, lengths) + offsets
  affinity = np.sum(tastes[users] * item_vecs[items], axis=1)
  ratings = np.clip(np.round(3.2 + 2.0 * affinity + 0.7 * rng.normal(size=len(items))), 1, 5)

  demographics = {
      "age": rng.integers(7, 74, size=num_users).astype(np.int64),
      "gender": np.where(rng.random(num_users) < 0.71, "M", "F"),
      "occupation": rng.choice(np.array(OCCUPATIONS), size=num_users),
      "zip": np.array([f"{z:05d}" for z in rng.integers(1000, 99999, size=num_users)]),
  }
  return dataset.RecDataset(
      name="synthetic",
      user=users.astype(np.int32),
      item=items.astype(np.int32),
      rating=ratings.astype(np.float32),
      timestamp=timestamps.astype(np.int64),
      num_users=num_users,
      num_items=num_items,
      item_titles=_titles(rng, num_items),
      item_genres=item_genres,
      genre_names=GENRES,
      raw_user_ids=tuple(str(u + 1) for u in range(num_users)),
      raw_item_ids=tuple(str(i + 1) for i in range(num_items)),
      users=demographics,
      catalogue="generated items (public: a function of the seed)",
  )
