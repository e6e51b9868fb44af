"""Canary users through the real trainer, and a membership attack on real users.

Application layer: this module runs ``privjax.run.train.train_and_evaluate``.

``audit_canaries`` is the one-run audit (Steinke, Nasr & Jagielski 2023) of a
whole training run of a config: m synthetic users with unique random item
sequences, each inserted into the config's real training data independently
with probability 1/2, ONE training run, and each canary scored by the trained
model's likelihood of its own sequence (minus its mean per-target loss). The
guessing rule and the bound are ``one_run.best_guesses``.

``audit_mia`` is a loss-based membership attack on REAL users: each user is
held out of training independently with probability ``holdout`` (the
non-members), the config trains on the rest (the members), and every user is
scored by the model's loss on their own training examples. It reports ROC AUC
and TPR at 1% and 0.1% FPR and, because membership was randomised per user,
the one-run lower bound with real users as the canaries.

Both run in their own run directory; its ``privacy.json`` states the epsilon
of that very run (on the data with canaries, or without the held-out users).

The canaries and the held-out users are drawn from ``seed``: an audit is a
simulation, and the auditor knows who is in.
"""

import dataclasses
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from privjax import config as config_lib
from privjax.audit import bounds
from privjax.audit import one_run
from privjax.data import dataset as dataset_lib
from privjax.data import sequences
from privjax.dp import step as dp_step
from privjax.run import checkpoint
from privjax.run import train as train_lib
from privjax.run import workload as workload_lib


# ----------------------------------------------------------------------------
# Dataset surgery (host-side, on RecDataset).


def random_sequences(num_items: int, *, count: int, length: int,
                     rng: np.random.Generator) -> list[np.ndarray]:
  """``count`` distinct random sequences of ``length`` distinct items each.

  >>> seqs = random_sequences(50, count=3, length=5, rng=np.random.default_rng(0))
  >>> [len(set(s.tolist())) for s in seqs]
  [5, 5, 5]
  """
  if not 3 <= length <= num_items:
    raise ValueError(f"canary length={length} must be in [3, num_items={num_items}]")
  seen, out = set(), []
  while len(out) < count:
    seq = rng.choice(num_items, size=length, replace=False).astype(np.int32)
    if tuple(seq) not in seen:
      seen.add(tuple(seq))
      out.append(seq)
  return out


def _empty_like(column: np.ndarray, n: int) -> np.ndarray:
  fill = 0 if np.issubdtype(column.dtype, np.number) else ""
  return np.full(n, fill, dtype=column.dtype)


def with_users(ds: dataset_lib.RecDataset, seqs: list[np.ndarray], *,
               raw_ids: list[str] | None = None) -> dataset_lib.RecDataset:
  """``ds`` plus one new user per sequence, in order (raw ids ``canary-i``
  unless given), with timestamps after every existing one."""
  if not seqs:
    return ds
  raw = tuple(raw_ids) if raw_ids is not None else tuple(
      f"canary-{i}" for i in range(len(seqs)))
  if len(raw) != len(seqs) or set(raw) & set(ds.raw_user_ids):
    raise ValueError(f"raw_ids must be {len(seqs)} ids new to the dataset")
  users = np.concatenate([np.full(len(s), ds.num_users + i, np.int32)
                          for i, s in enumerate(seqs)])
  items = np.concatenate(seqs).astype(np.int32)
  start = (int(ds.timestamp.max()) + 1) if ds.num_interactions else 0
  times = np.concatenate([start + np.arange(len(s)) for s in seqs]).astype(np.int64)
  demographics = None
  if ds.users is not None:
    demographics = {k: np.concatenate([v, _empty_like(v, len(seqs))])
                    for k, v in ds.users.items()}
  return dataclasses.replace(
      ds, user=np.concatenate([ds.user, users]), item=np.concatenate([ds.item, items]),
      rating=np.concatenate([ds.rating, np.ones(len(items), np.float32)]),
      timestamp=np.concatenate([ds.timestamp.astype(np.int64), times]),
      num_users=ds.num_users + len(seqs), raw_user_ids=ds.raw_user_ids + raw,
      users=demographics)


def only_users(ds: dataset_lib.RecDataset, keep) -> dataset_lib.RecDataset:
  """``ds`` restricted to the users where ``keep`` [num_users] is True (renumbered)."""
  keep = np.asarray(keep, bool)
  if keep.shape != (ds.num_users,):
    raise ValueError(f"keep.shape={keep.shape} must be ({ds.num_users},)")
  new_id = np.cumsum(keep) - 1
  rows = keep[ds.user]
  return dataclasses.replace(
      ds, user=new_id[ds.user[rows]].astype(np.int32), item=ds.item[rows],
      rating=ds.rating[rows], timestamp=ds.timestamp[rows], num_users=int(keep.sum()),
      raw_user_ids=tuple(r for r, k in zip(ds.raw_user_ids, keep) if k),
      users=None if ds.users is None else {k: v[keep] for k, v in ds.users.items()})


# ----------------------------------------------------------------------------
# Scoring users by a trained model.


def trained_params(cfg: config_lib.Config, workdir, ds: dataset_lib.RecDataset
                   ) -> tuple[workload_lib.Workload, Any]:
  """The workload on ``ds`` and the latest checkpointed parameters of ``workdir``."""
  w = workload_lib.build_workload(cfg, ds)
  ckpt = checkpoint.Checkpointer(workdir)
  like = dp_step.init_state(w.params, workload_lib.make_optimizer(cfg, w.params)[0])
  restored, _ = ckpt.restore(ckpt.latest_step(), like)
  ckpt.close()
  return w, restored.params


def user_losses(w: workload_lib.Workload, params, split: sequences.Split,
                ds: dataset_lib.RecDataset, batch_size: int = 256) -> np.ndarray:
  """Each user's mean loss per target over their training examples ([num_users],
  NaN for a user without examples): minus the log-likelihood of their sequence."""
  examples, user_of_row = w.task.train_examples(w.cfg, split, ds, w.model)

  def per_target(ex):
    loss = w.loss_fun(params, w.frozen, ex, None)
    target = ex.get("target")
    count = 1.0 if target is None or target.ndim == 0 else jnp.maximum(
        jnp.sum(target >= 0), 1)
    return loss / count

  fun = jax.jit(jax.vmap(per_target))
  n = len(user_of_row)
  losses = []
  for start in range(0, n, batch_size):
    chunk = {k: v[start:start + batch_size] for k, v in examples.items()}
    m = len(user_of_row[start:start + batch_size])
    if m < batch_size:  # one shape, one compile
      chunk = {k: np.concatenate([v, np.repeat(v[:1], batch_size - m, 0)])
               for k, v in chunk.items()}
    losses.append(np.asarray(fun(chunk))[:m])
  losses = np.concatenate(losses).astype(np.float64)
  total = np.bincount(user_of_row, losses, minlength=split.num_users)
  count = np.bincount(user_of_row, minlength=split.num_users)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(count > 0, total / count, np.nan)


def _epsilon(result: dict) -> float:
  eps = result["epsilon"]
  return float(eps) if not isinstance(eps, str) else float("inf")


# ----------------------------------------------------------------------------
# The two audits.


def audit_canaries(cfg: config_lib.Config, workdir: str | pathlib.Path, *,
                   num_canaries: int = 500, length: int | None = None,
                   seed: int = 0, confidence: float = 0.95,
                   show_progress: bool = True) -> dict[str, Any]:
  """One training run of ``cfg`` with canary users, and its one-run bound.

  Guarantee: ``one_run.epsilon_lower`` exceeds the run's true user-level
  epsilon (at the config's delta) with probability at most 1 - ``confidence``
  (``one_run.best_guesses``); it is compared with ``accountant_epsilon``, the
  epsilon the run's own privacy.json states.

  Args:
    cfg: the config; its data is loaded and the canaries are added.
    workdir: the run directory (a fresh one: the canaries change the data).
    num_canaries: m; about m / 2 are inserted.
    length: items per canary (default ``data.max_len + 2``: one full window
      after the two held-out items).
    seed: the canaries and their inclusion.
    confidence: 1 - beta.
    show_progress: the trainer's progress bar.

  Returns:
    A JSON-able dict: the bound, the canaries' membership metrics, the
    accountant's epsilon, the run's metrics and timings.
  """
  t0 = time.time()
  ds = workload_lib.load_dataset(cfg.data)
  length = length or min(cfg.data.max_len + 2, ds.num_items)
  rng = np.random.default_rng(seed)
  seqs = random_sequences(ds.num_items, count=num_canaries, length=length, rng=rng)
  included = rng.random(num_canaries) < 0.5
  inserted = np.flatnonzero(included)
  train_ds = with_users(ds, [seqs[i] for i in inserted],
                        raw_ids=[f"canary-{i}" for i in inserted])
  result = train_lib.train_and_evaluate(cfg, workdir, ds=train_ds,
                                        show_progress=show_progress)
  t_train = time.time() - t0
  w, params = trained_params(cfg, workdir, train_ds)
  canary_ds = with_users(dataclasses.replace(
      ds, user=ds.user[:0], item=ds.item[:0], rating=ds.rating[:0],
      timestamp=ds.timestamp[:0], num_users=0, raw_user_ids=(), users=None), seqs)
  scores = -user_losses(w, params, sequences.leave_last_out(canary_ds), canary_ds)
  bound = one_run.best_guesses(scores, included, delta=cfg.privacy.delta,
                               confidence=confidence)
  claimed = _epsilon(result)
  return bounds._finite({  # pylint: disable=protected-access
      "kind": "canaries", "num_canaries": num_canaries, "canary_length": length,
      "num_inserted": int(included.sum()), "one_run": dataclasses.asdict(bound),
      "epsilon_lower": bound.epsilon_lower, "confidence": confidence,
      "accountant_epsilon": claimed, "delta": cfg.privacy.delta,
      "flagged": bool(bound.epsilon_lower > claimed),
      "canary_membership": bounds.membership_metrics(scores[included], scores[~included]),
      "test": result["test"], "private": result["private"],
      "train_seconds": t_train, "score_seconds": time.time() - t0 - t_train})


def audit_mia(cfg: config_lib.Config, workdir: str | pathlib.Path, *,
              holdout: float = 0.5, seed: int = 0, confidence: float = 0.95,
              show_progress: bool = True) -> dict[str, Any]:
  """A loss-based membership attack on real users, and its one-run bound.

  Guarantee: the users held out are chosen independently with probability
  ``holdout`` from ``seed``; with ``holdout = 0.5`` membership is exactly the
  one-run audit's coin, and ``epsilon_lower`` is a valid lower bound at
  ``confidence``. AUC and TPR at low FPR are descriptive (no confidence).

  Returns:
    A JSON-able dict with ``membership`` (auc, tpr@1%fpr, tpr@0.1%fpr,
    counts), the one-run bound, the accountant's epsilon and the run's
    test metrics.
  """
  t0 = time.time()
  if not 0 < holdout < 1:
    raise ValueError(f"holdout={holdout!r} must be in (0, 1)")
  ds = workload_lib.load_dataset(cfg.data)
  member = np.random.default_rng(seed).random(ds.num_users) >= holdout
  result = train_lib.train_and_evaluate(cfg, workdir, ds=only_users(ds, member),
                                        show_progress=show_progress)
  t_train = time.time() - t0
  w, params = trained_params(cfg, workdir, only_users(ds, member))
  scores = -user_losses(w, params, sequences.leave_last_out(ds), ds)
  scored = np.isfinite(scores)
  s, m = scores[scored], member[scored]
  claimed = _epsilon(result)
  out = {"kind": "mia", "holdout": holdout, "membership": bounds.membership_metrics(s[m], s[~m]),
         "accountant_epsilon": claimed, "delta": cfg.privacy.delta,
         "confidence": confidence, "test": result["test"], "private": result["private"],
         "train_seconds": t_train, "score_seconds": time.time() - t0 - t_train}
  if holdout == 0.5:
    bound = one_run.best_guesses(s, m, delta=cfg.privacy.delta, confidence=confidence)
    out.update(one_run=dataclasses.asdict(bound), epsilon_lower=bound.epsilon_lower,
               flagged=bool(bound.epsilon_lower > claimed))
  return bounds._finite(out)  # pylint: disable=protected-access
