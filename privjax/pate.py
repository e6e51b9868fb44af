"""PATE for recommendation: teachers on disjoint user shards, noisy vote answers.

PATE (Papernot et al. 2017, 2018) trains m models WITHOUT privacy, one per
disjoint shard of the users, and gets its privacy from how their outputs are
released: every teacher votes for a query, and only a noisy top-k of the vote
histogram is released (``privjax.answers.votes``), charged to one budget.
Steps: ``shard_users`` (a keyed hash of each raw user id), ``train_teachers``
(vmapped over a stacked teacher axis, one compile), ``Ensemble.votes`` /
``histograms``, ``votes.answer``, and a student trained on public queries
labelled by noisy answers (``public_queries``, ``label_queries``,
``train_student``). The guarantee is stated on ``Ensemble``.

>>> keys = secret_lib.RunSecret.from_seed(0).unit_keys("pate/shards", range(10))
>>> shards = shard_users(keys, 3, public=np.arange(10) < 2)
>>> sorted(np.concatenate(shards.shards).tolist() + shards.public.tolist())
[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
"""

import dataclasses
import json
import pathlib
from typing import Any

import numpy as np

from privjax import config as config_lib
from privjax.answers import noisy_argmax
from privjax.answers import session as session_lib
from privjax.answers import votes as votes_lib
from privjax.data import bounding
from privjax.data import sequences
from privjax.dp import secret as secret_lib
from privjax.run import checkpoint
from privjax.run import ensemble as ensemble_lib
from privjax.run import workload as workload_lib

PATE_FILE = "pate.json"
NOT_FOR_RELEASE = (
    "The teachers in this directory are NOT differentially private: each was "
    "trained without noise on one shard of the private users. Never release "
    "this directory, the teachers' parameters, their votes or vote counts; only "
    "noisy aggregated answers (privjax.answers.votes.answer) are private.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PateConfig:
  """Public parameters of a PATE ensemble (the model comes from a ``Config``).

  Attributes:
    num_teachers: m, the number of disjoint user shards (and teachers).
    public_users: raw ids of users whose histories are public (e.g. they
      opted in); they are held out of every shard, feed the student queries,
      and are outside the guarantee. The list must not be chosen by looking
      at the data. Empty: every user is private.

  Teacher training uses the model config's ``train`` section: ``steps``,
  ``batch_size`` (expected users per teacher per step), ``optimizer``,
  ``learning_rate`` and ``seed`` (initial parameters); teacher sampling, the
  shards and contribution bounding come from the run secret. The ``privacy``
  section gives only ``reproducible_noise_seed``.

  >>> PateConfig(num_teachers=10).num_teachers
  10
  """
  num_teachers: int = 10
  public_users: tuple[str, ...] = ()

  def __post_init__(self):
    _integer("num_teachers", self.num_teachers, 1)
    object.__setattr__(self, "public_users", tuple(str(u) for u in self.public_users))


def _integer(name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
  return int(value)


# ----------------------------------------------------------------------------
# 1. Shards.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UserShards:
  """A partition of users ``0 .. num_users - 1``.

  Attributes:
    public: users held out of every shard (sorted).
    shards: the m disjoint shards (each sorted); with ``public`` they cover
      every user exactly once.
  """
  public: np.ndarray
  shards: tuple[np.ndarray, ...]

  def shard_of(self, num_users: int) -> np.ndarray:
    """[num_users] the shard of each user, -1 for public users."""
    out = np.full(num_users, -1, np.int32)
    for t, users in enumerate(self.shards):
      out[users] = t
    return out


def shard_users(unit_keys: np.ndarray, num_shards: int, *,
                public: np.ndarray | None = None) -> UserShards:
  """Assigns every private user to one of ``num_shards`` shards by its key.

  User ``i`` goes to shard ``floor(unit_keys[i] / 2**64 * m)``; users with
  ``public[i]`` are held out of every shard.

  Guarantee: a user's shard depends on that user's key alone; with keys from
  ``RunSecret.unit_keys(label, raw_user_ids)`` adding or removing one private
  user changes that user's shard membership and no other (which is what the
  one-teacher sensitivity of the votes needs). Shard sizes are random (about
  equal); a shard may be empty for tiny datasets.

  Args:
    unit_keys: uint64 [num_users], keyed hashes of the raw user ids.
    num_shards: m >= 1.
    public: optional bool [num_users], users whose data is public (from a
      list fixed without looking at the data, e.g. ``PateConfig.public_users``).
  """
  keys = np.asarray(unit_keys)
  if keys.ndim != 1 or keys.dtype != np.uint64:
    raise ValueError(f"unit_keys must be a 1-D uint64 array, got {keys.dtype} {keys.shape}")
  num_shards = _integer("num_shards", num_shards, 1)
  public = np.zeros(len(keys), bool) if public is None else np.asarray(public, bool)
  if public.shape != keys.shape:
    raise ValueError(f"public.shape={public.shape} must equal unit_keys.shape={keys.shape}")
  u = (keys >> np.uint64(11)).astype(np.float64) * 2.0**-53    # uniform [0, 1)
  shard = np.minimum((u * num_shards).astype(np.int64), num_shards - 1)
  users = np.arange(len(keys))
  return UserShards(users[public],
                    tuple(users[~public & (shard == t)] for t in range(num_shards)))


def teacher_seeds(seed: int, num_teachers: int) -> list[int]:
  """Independent per-teacher seeds (model init, sampling) derived from one seed.

  >>> len(set(teacher_seeds(0, 5)))
  5
  """
  return [int(np.random.SeedSequence(seed, spawn_key=(1, t)).generate_state(1)[0] >> 1)
          for t in range(num_teachers)]


# ----------------------------------------------------------------------------
# The ensemble: training, saving and loading a PATE directory.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Ensemble:
  """m trained teachers over user shards. NOT private: never release it.

  ``params`` are the stacked teachers' trainable params ``[m, ...]``.

  Guarantee (of the answers, not of the ensemble). The unit is a training
  user; neighbours add or remove one user with all their interactions. That
  user lies in one shard (``shard_users``: a keyed hash of the raw id), so one
  teacher changes, arbitrarily, and no other. Each teacher votes k distinct
  items, so neighbouring histograms differ by one teacher's votes, whose
  sensitivity ``vote_histogram`` computes exactly (Linf = 1, L2 = sqrt(2 s),
  L1 = 2 s, s = min(k, items - k)). Released answers are noisy top-k of the
  histogram (``votes.answer``), each charged to the session's budget before
  any noise is drawn (data-independent accounting). Items a query has seen,
  or outside a public pool, are excluded: that comes from the query and
  public data, so the sensitivity is unchanged. NOT protected: the teachers,
  their votes and the noiseless histograms (never release them; ``pate.json``
  says so), and the query itself. A student trained on public queries and
  noisy labels is post-processing: its cost is the labels'.
  """
  w: workload_lib.Workload
  pate: PateConfig
  shards: UserShards
  params: Any

  @property
  def num_teachers(self) -> int:
    return self.pate.num_teachers

  def votes(self, inputs: dict[str, np.ndarray], excluded: np.ndarray,
            votes_per_teacher: int = 1) -> np.ndarray:
    """int32 [Q, m, votes_per_teacher]: each teacher's top items per query
    among those not ``excluded`` (bool [Q, items]: seen, or outside a public
    pool). NOT private."""
    return ensemble_lib.top_unseen(self.w, self.params, inputs, excluded, votes_per_teacher,
                      stacked=True)

  def histograms(self, inputs: dict[str, np.ndarray], excluded: np.ndarray,
                 votes_per_teacher: int = 1
                 ) -> tuple[np.ndarray, noisy_argmax.Sensitivity]:
    """Vote histograms [Q, num_items] and their sensitivity. NOT private."""
    return votes_lib.vote_counts(self.votes(inputs, excluded, votes_per_teacher),
                       self.w.ds.num_items)


def teacher_config(cfg: config_lib.Config) -> config_lib.Config:
  """``cfg`` with DP-SGD switched off: teachers train without noise."""
  return config_lib.replace(cfg, **{"privacy.enabled": False,
                                    "privacy.noise_multiplier": None,
                                    "privacy.target_epsilon": None})


def train_ensemble(cfg: config_lib.Config, pate_cfg: PateConfig,
                   workdir: str | pathlib.Path | None = None, *,
                   log_every: int = 0) -> Ensemble:
  """Shards the users, trains the teachers (vmapped) and saves them in ``workdir``.

  ``workdir`` (optional) receives ``config.json``, ``pate.json`` (the PATE
  config, shard sizes, the public users, and the warning that the directory
  is NOT private), ``checkpoints/`` (stacked teacher params) and ``secret/``
  (the run secret that keys the shards; ``load_ensemble`` needs it). Without
  a workdir the secret lives in memory only. With
  ``privacy.reproducible_noise_seed`` the secret is derived from it.
  """
  cfg = config_lib.validate(teacher_config(cfg))
  seed = cfg.privacy.reproducible_noise_seed
  if workdir is not None:
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    secret = secret_lib.for_run(workdir, reproducible_seed=seed, resuming=False)
  else:
    secret = (secret_lib.RunSecret.fresh() if seed is None
              else secret_lib.RunSecret.from_seed(seed))
  w = workload_lib.build_workload(cfg)
  shards = _shards(w, pate_cfg, secret)
  examples, per_user = bounded_examples(w, secret)
  params = ensemble_lib.train_teachers(
      w, examples, [per_user[users] for users in shards.shards],
      seeds=teacher_seeds(cfg.train.seed, pate_cfg.num_teachers),
      sampling_seeds=[secret.integer(f"pate/teacher/{t}")
                      for t in range(pate_cfg.num_teachers)],
      steps=cfg.train.steps, batch_size=cfg.train.batch_size, log_every=log_every)
  ensemble = Ensemble(w, pate_cfg, shards, params)
  if workdir is not None:
    (workdir / "config.json").write_text(config_lib.to_json(cfg))
    (workdir / PATE_FILE).write_text(json.dumps({
        "kind": "pate-ensemble",
        "warning": NOT_FOR_RELEASE,
        "pate": dataclasses.asdict(pate_cfg),
        "unit": "user",
        "neighbouring_relation": "add or remove one training user (all their "
                                 "interactions); that user changes one teacher",
        "shard_sizes": [int(len(s)) for s in shards.shards],
        "public_users": [w.ds.raw_user_ids[u] for u in shards.public],
        "steps": cfg.train.steps,
    }, indent=2))
    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=1)
    ckpt.save(cfg.train.steps, params, {"kind": "pate-ensemble", "warning": NOT_FOR_RELEASE})
    ckpt.close()
  return ensemble


def _shards(w: workload_lib.Workload, pate_cfg: PateConfig,
            secret: secret_lib.RunSecret) -> UserShards:
  return shard_users(secret.unit_keys("pate/shards", w.ds.raw_user_ids),
                     pate_cfg.num_teachers,
                     public=np.isin(np.asarray(w.ds.raw_user_ids), pate_cfg.public_users))


def bounded_examples(w: workload_lib.Workload, secret: secret_lib.RunSecret):
  """Training examples and each user's bounded rows ``[num_users, K]``."""
  examples, user_of_row = w.task.train_examples(w.cfg, w.split, w.ds, w.model)
  return examples, bounding.group_rows(
      user_of_row, unit_keys=secret.unit_keys("bounding", w.ds.raw_user_ids),
      max_rows_per_unit=w.cfg.data.max_examples_per_user)


def is_ensemble_dir(workdir: str | pathlib.Path) -> bool:
  return (pathlib.Path(workdir) / PATE_FILE).exists()


def load_ensemble(workdir: str | pathlib.Path) -> Ensemble:
  """The ensemble saved by ``train_ensemble`` in ``workdir``."""
  workdir = pathlib.Path(workdir)
  if not is_ensemble_dir(workdir):
    raise FileNotFoundError(f"{str(workdir)!r} is not a PATE ensemble directory "
                            f"(no {PATE_FILE})")
  cfg = config_lib.validate(config_lib.from_dict(
      json.loads((workdir / "config.json").read_text())))
  meta = json.loads((workdir / PATE_FILE).read_text())
  pate_cfg = PateConfig(**meta["pate"])
  secret = secret_lib.for_run(workdir, resuming=True,
                              reproducible_seed=cfg.privacy.reproducible_noise_seed)
  w = workload_lib.build_workload(cfg)
  shards = _shards(w, pate_cfg, secret)
  like = ensemble_lib.stack([w.params] * pate_cfg.num_teachers)
  ckpt = checkpoint.Checkpointer(workdir)
  params, _ = ckpt.restore(ckpt.latest_step(), like)
  ckpt.close()
  return Ensemble(w, pate_cfg, shards, params)


# ----------------------------------------------------------------------------
# 5. Student: public queries, noisy labels, a model trained on them.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Queries:
  """Model inputs of public queries and the items each has seen."""
  inputs: dict[str, np.ndarray]
  seen: np.ndarray
  users: np.ndarray


def public_queries(w: workload_lib.Workload, users: np.ndarray, *, num_queries: int,
                   seed: int) -> Queries:
  """Up to ``num_queries`` prefixes of the public users' training sequences.

  Each query is a prefix ``train[u][:t]`` (t >= 1) of a public user ``u``,
  drawn uniformly without replacement (seeded) from all such prefixes; its
  seen items are the prefix. Only inputs are used: the next items of these
  prefixes are never read (the labels come from the ensemble).
  """
  max_len = w.cfg.data.max_len
  pairs = [(u, t) for u in users for t in range(1, len(w.split.train[u]))]
  if not pairs:
    raise ValueError("the public users have no training prefixes")
  rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2,)))
  pick = np.sort(rng.choice(len(pairs), size=min(num_queries, len(pairs)), replace=False))
  prefixes = [w.split.train[pairs[i][0]][:pairs[i][1]] for i in pick]
  history = np.stack([sequences.left_pad(p, max_len) for p in prefixes])
  seen = np.zeros((len(pick), w.ds.num_items), bool)
  for row, p in enumerate(prefixes):
    seen[row, p] = True
  return Queries({"history": history}, seen, np.asarray([pairs[i][0] for i in pick]))


def label_queries(ensemble: Ensemble, session: session_lib.QuerySession,
                  queries: Queries, spec: votes_lib.AnswerSpec,
                  votes_per_teacher: int = 1) -> np.ndarray:
  """The noisy ensemble's top-1 label of each query (-1 where Confident GNMax
  abstained), all charged to ``session`` as one batch of answers."""
  if spec.k != 1:
    raise ValueError(f"labels are top-1 answers: spec.k={spec.k} must be 1")
  counts, sensitivity = ensemble.histograms(queries.inputs, queries.seen, votes_per_teacher)
  return votes_lib.answer(session, counts, sensitivity, queries.seen, spec)[:, 0]


def train_student(w: workload_lib.Workload, queries: Queries, labels: np.ndarray, *,
                  seed: int, steps: int, batch_size: int) -> Any:
  """A fresh model trained non-privately on (public query, noisy label) pairs.

  Its guarantee is the labels' cost: it sees only public inputs and the
  released labels. Queries labelled -1 (unanswered) are dropped. Works for
  tasks whose examples are ``{"history", "target"}`` (the mlp).
  """
  labels = np.asarray(labels)
  keep = labels >= 0
  if not keep.any():
    raise ValueError("no labelled queries to train the student on")
  examples = {"history": queries.inputs["history"][keep], "target": labels[keep].astype(np.int32)}
  unit_rows = np.arange(int(keep.sum()), dtype=np.int32)[:, None]
  params = ensemble_lib.train_teachers(w, examples, [unit_rows], seeds=[seed], steps=steps,
                          batch_size=min(batch_size, len(unit_rows)))
  return ensemble_lib.unstack(params, 0)
