"""Private inference on ml-100k: PATE ensemble answers vs one model vs DP-SGD, one command.

  python studies/private_inference/study.py --config configs/movielens_pate.py \\
      [--data ../shared/data/ml-100k] [--workdir runs/private_inference]

What it does (everything on the same leave-last-out split; every row is scored
on the same queries: each test user's history, the held-out target being their
last item, answers ranked among the items that user has not seen):

1. Trains the PATE teachers (``privjax.pate.train_ensemble``: m teachers on
   disjoint user shards, vmapped, non-private) into ``WORKDIR/ensemble``.
2. Trains the same model once without privacy and once with user-level DP-SGD
   per epsilon (``privjax.run.train.train_and_evaluate``) into
   ``WORKDIR/nonprivate`` and ``WORKDIR/dpsgd_eps{E}``.
3. Answers every test query with the ensemble's noisy top-k of the teacher
   vote histogram, for each mechanism, total epsilon E and session length Q:
   the noise is calibrated so that a session of Q answers costs exactly E
   (RDP, delta), and the queries are answered in sessions of Q (each a
   ``QuerySession`` with budget E), so the accuracy is what one answer of a
   Q-answer session gets. The DP-SGD model at epsilon E answers any number of
   queries for free (post-processing); the ensemble spends its E over its Q.
4. Trains a PATE student on public queries labelled by the noisy ensemble.
5. Writes ``WORKDIR/results.json`` and ``WORKDIR/table.md`` and prints the table.

Existing run directories in WORKDIR are reused (the trainer resumes a finished
run and only re-evaluates); ``--fresh`` retrains the ensemble. The answers'
noise is seeded (simulation): mean +- std over ``--noise-seeds``.
"""

import argparse
import dataclasses
import importlib.util
import json
import logging
import math
import pathlib
import sys
import time

import jax
import numpy as np

from privjax import config as config_lib
from privjax.answers import noisy_argmax
from privjax.answers import session as session_lib
from privjax import pate
from privjax.run import ensemble as ensemble_lib
from privjax.answers import votes as votes_lib
from privjax.dp import secret as secret_lib
from privjax.run import evaluate as evaluate_lib
from privjax.run import train as train_lib
from privjax.run import workload as workload_lib
from privjax.data import sequences

logging.getLogger("absl").setLevel(logging.ERROR)


def _floats(text: str) -> list[float]:
  return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x.strip()]


def _parse(argv):
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True,
                      help="config file with get_config() and get_pate_config()")
  parser.add_argument("--data", default=None, help="override config.data.path")
  parser.add_argument("--workdir", default="runs/private_inference")
  parser.add_argument("--epsilons", type=_floats, default=[1.0, 4.0, 8.0])
  parser.add_argument("--queries", type=_ints, default=[10, 100, 1000],
                      help="session lengths Q")
  parser.add_argument("--mechanisms", default="gnmax,gumbel")
  parser.add_argument("--k", type=int, default=10, help="items per answer (HR@k)")
  parser.add_argument("--votes-per-teacher", type=int, default=10)
  parser.add_argument("--pool", type=int, default=100,
                      help="public candidate pool: the P items most popular among the "
                      "public users that the querying user has not seen (0: off)")
  parser.add_argument("--delta", type=float, default=1e-5)
  parser.add_argument("--noise-seeds", type=int, default=3)
  parser.add_argument("--student-queries", type=int, default=500)
  parser.add_argument("--student-epsilon", type=float, default=8.0)
  parser.add_argument("--student-mechanism", choices=votes_lib.MECHANISMS, default="gumbel")
  parser.add_argument("--student-steps", type=int, default=100)
  parser.add_argument("--student-batch-size", type=int, default=64)
  parser.add_argument("--fresh", action="store_true", help="retrain the ensemble")
  return parser.parse_args(argv)


def _load_configs(path: str, data: str | None):
  spec = importlib.util.spec_from_file_location("_privjax_study_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  if data:
    cfg = config_lib.replace(cfg, **{"data.path": data})
  single = config_lib.replace(cfg, **getattr(module, "single_model_overrides", dict)())
  return config_lib.validate(cfg), single, module.get_pate_config()


def _mean_std(values: list[float]) -> tuple[float, float]:
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


# ----------------------------------------------------------------------------
# Pieces.
# ----------------------------------------------------------------------------


def _public_popularity(w, public_users: np.ndarray) -> np.ndarray:
  # Training parts only: the public users' own test items are evaluation targets.
  items = [w.split.train[u] for u in public_users]
  return np.bincount(np.concatenate(items), minlength=w.ds.num_items)


def _pool(public_counts: np.ndarray, seen: np.ndarray, size: int) -> np.ndarray:
  """bool [Q, I]: the ``size`` most publicly popular items each query has not seen."""
  order = np.argsort(-public_counts, kind="stable")            # ties: lower id first
  unseen_in_order = ~seen[:, order]
  keep = np.cumsum(unseen_in_order, axis=1) <= size
  allowed = np.zeros_like(seen)
  allowed[:, order] = unseen_in_order & keep
  return allowed


def _noiseless_top_k(counts: np.ndarray, excluded: np.ndarray, k: int) -> np.ndarray:
  scores = np.where(excluded, -1, counts)
  return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def _sessions(counts, sensitivity, excluded, spec, *, budget, delta, num_queries, seed):
  """Answers every row, in consecutive sessions of ``num_queries`` answers."""
  key = jax.random.key(seed)
  out = []
  for index, start in enumerate(range(0, len(counts), num_queries)):
    session = session_lib.QuerySession(epsilon_budget=budget, delta=delta,
                                        key=jax.random.fold_in(key, index))
    rows = slice(start, start + num_queries)
    out.append(votes_lib.answer(session, counts[rows], sensitivity, excluded[rows], spec))
    assert session.epsilon <= budget
  return np.concatenate(out)


def _single_model(cfg, workdir, inputs, seen, targets, k):
  result = train_lib.train_and_evaluate(cfg, workdir, show_progress=False)
  w, params, _ = workload_lib.load_trained(workdir)
  top = ensemble_lib.top_unseen(w, params, inputs, seen, k, stacked=False)
  return {**votes_lib.hits(top, targets), "epsilon": result["epsilon"],
          "trainer_test": result["test"], "steps": result["steps"],
          "noise_multiplier": result["noise_multiplier"]}


def _fmt(cell) -> str:
  if cell is None:
    return ""
  hr, top1 = cell["hr"], cell["top1"]
  if "hr_std" in cell:
    return f"{hr[0]:.4f} ± {hr[1]:.4f} / {top1[0]:.4f}"
  return f"{hr:.4f} / {top1:.4f}"


# ----------------------------------------------------------------------------
# The study.
# ----------------------------------------------------------------------------


def main(argv: list[str]) -> int:
  args = _parse(argv)
  t0 = time.time()
  cfg, single_cfg, pate_cfg = _load_configs(args.config, args.data)
  workdir = pathlib.Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mechanisms = [m for m in args.mechanisms.split(",") if m]
  k, votes_per_teacher = args.k, args.votes_per_teacher
  timings = {}

  # 1. Teachers.
  t = time.time()
  ens_dir = workdir / "ensemble"
  if pate.is_ensemble_dir(ens_dir) and not args.fresh:
    ensemble = pate.load_ensemble(ens_dir)
  else:
    print(f"== training {pate_cfg.num_teachers} teachers (vmapped)")
    ensemble = pate.train_ensemble(cfg, pate_cfg, ens_dir, log_every=25)
  timings["teachers"] = time.time() - t
  w = ensemble.w
  es = sequences.eval_set(w.split, "test", cfg.data.max_len)
  inputs = w.task.eval_inputs(w.cfg, es, w.ds, w.model)
  seen = ensemble_lib.seen_mask(es.exclude, w.ds.num_items)
  targets = es.target
  rows: dict[str, dict] = {}

  # 2. Single models: non-private, and DP-SGD at each epsilon.
  t = time.time()
  print("== single models (trainer)")
  nonprivate = config_lib.replace(single_cfg, **{"privacy.enabled": False,
                                          "privacy.target_epsilon": None,
                                          "name": cfg.name + "-nonprivate"})
  rows["nonprivate"] = _single_model(nonprivate, workdir / "nonprivate", inputs, seen,
                                     targets, k)
  for eps in args.epsilons:
    dp_cfg = config_lib.replace(single_cfg, **{"privacy.enabled": True,
                                        "privacy.target_epsilon": eps,
                                        "privacy.noise_multiplier": None,
                                        "privacy.delta": args.delta,
                                        "name": f"{cfg.name}-dpsgd-eps{eps:g}"})
    rows[f"dpsgd/{eps:g}"] = _single_model(dp_cfg, workdir / f"dpsgd_eps{eps:g}", inputs,
                                           seen, targets, k)
    print(f"   DP-SGD eps={eps:g}: {rows[f'dpsgd/{eps:g}']}")
  timings["single_models"] = time.time() - t
  rows["popularity"] = evaluate_lib.popularity_metrics(cfg, w.split, w.ds, "test")

  # 3. Ensemble answers.
  t = time.time()
  print("== ensemble answers")
  public_counts = _public_popularity(w, ensemble.shards.public)
  variants = {"all": seen}
  if args.pool:
    allowed = _pool(public_counts, seen, args.pool)
    variants["pool"] = ~allowed
    top_public = _noiseless_top_k(public_counts[None].repeat(len(seen), 0), ~allowed, k)
    rows["public_popularity"] = votes_lib.hits(top_public, targets)
  for variant, excluded in variants.items():
    counts, sensitivity = ensemble.histograms(inputs, excluded, votes_per_teacher)
    rows[f"ensemble_noiseless/{variant}"] = votes_lib.hits(
        _noiseless_top_k(counts, excluded, k), targets)
    for mechanism in mechanisms:
      for eps in args.epsilons:
        for num_queries in args.queries:
          spec = votes_lib.calibrate(mechanism, epsilon_budget=eps, num_queries=num_queries,
                                sensitivity=sensitivity, k=k, delta=args.delta)
          # Fresh noise for every row (shared keys would make rows whose noise
          # swamps the votes return the very same answers).
          runs = [votes_lib.hits(_sessions(counts, sensitivity, excluded, spec, budget=eps,
                                      delta=args.delta, num_queries=num_queries,
                                      seed=1000 * len(rows) + seed), targets)
                  for seed in range(args.noise_seeds)]
          hr = _mean_std([r[f"hr@{k}"] for r in runs])
          top1 = _mean_std([r["top1"] for r in runs])
          rows[f"ensemble/{variant}/{mechanism}/{eps:g}/{num_queries}"] = {
              "hr": hr, "top1": top1, "hr_std": True,
              "sigma": spec.sigma, "epsilon_per_round": spec.epsilon}
          print(f"   {variant} {mechanism} eps={eps:g} Q={num_queries}: "
                f"HR@{k}={hr[0]:.4f}±{hr[1]:.4f} top1={top1[0]:.4f}")
  timings["answers"] = time.time() - t

  # 4. Student on public queries, and the public users alone.
  t = time.time()
  print("== student")
  queries = pate.public_queries(w, ensemble.shards.public,
                                num_queries=args.student_queries, seed=0)
  label_excluded = queries.seen
  if args.pool:
    label_excluded = ~_pool(public_counts, queries.seen, args.pool)
  label_queries = pate.Queries(queries.inputs, label_excluded, queries.users)
  counts, sensitivity = ensemble.histograms(label_queries.inputs, label_queries.seen,
                                            votes_per_teacher)
  spec = votes_lib.calibrate(args.student_mechanism, epsilon_budget=args.student_epsilon,
                        num_queries=len(queries.users), sensitivity=sensitivity, k=1,
                        delta=args.delta)
  session = session_lib.QuerySession(epsilon_budget=args.student_epsilon,
                                      delta=args.delta, key=jax.random.key(12345))
  labels = votes_lib.answer(session, counts, sensitivity, label_queries.seen, spec)[:, 0]
  student = pate.train_student(w, queries, labels, seed=cfg.train.seed,
                               steps=args.student_steps, batch_size=args.student_batch_size)
  rows["student"] = {**votes_lib.hits(ensemble_lib.top_unseen(w, student, inputs, seen, k,
                                                 stacked=False), targets),
                     "epsilon": session.epsilon, "labels": int(len(labels)),
                     "label_agreement_with_noiseless": float(
                         (labels == _noiseless_top_k(counts, label_queries.seen, 1)[:, 0]).mean())}
  # The same model trained on the public users' own next items: what the
  # public data gives without any private user (cost 0).
  # The public users' data is public: a public bounding key will do.
  examples, per_user = pate.bounded_examples(w, secret_lib.RunSecret.from_seed(cfg.train.seed))
  public_model = ensemble_lib.unstack(ensemble_lib.train_teachers(
      w, examples, [per_user[ensemble.shards.public]], seeds=[cfg.train.seed],
      steps=args.student_steps,
      batch_size=min(args.student_batch_size, len(ensemble.shards.public))), 0)
  rows["public_model"] = votes_lib.hits(ensemble_lib.top_unseen(w, public_model, inputs, seen, k,
                                                   stacked=False), targets)
  timings["student"] = time.time() - t
  timings["total"] = time.time() - t0

  # 5. Report.
  meta = {
      "config": config_lib.to_dict(cfg), "pate": dataclasses.asdict(pate_cfg),
      "single_model": config_lib.to_dict(single_cfg)["train"],
      "shard_sizes": [len(s) for s in ensemble.shards.shards],
      "num_public_users": int(len(ensemble.shards.public)),
      "num_test_queries": int(len(targets)), "k": k,
      "votes_per_teacher": votes_per_teacher, "pool": args.pool, "delta": args.delta,
      "noise_seeds": args.noise_seeds, "student_queries": int(len(queries.users)),
      "student_epsilon": args.student_epsilon,
      "student_mechanism": args.student_mechanism, "timings_s": timings,
  }
  (workdir / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2,
                                                   default=float))
  table = _table(rows, args, mechanisms, meta)
  (workdir / "table.md").write_text(table + "\n")
  print()
  print(table)
  print(f"\ntimings (s): " + ", ".join(f"{k_}={v:.0f}" for k_, v in timings.items()))
  return 0


def _table(rows, args, mechanisms, meta) -> str:
  k = meta["k"]
  eps_cols = [f"ε = {e:g}" for e in args.epsilons]
  lines = [f"| answers from | queries Q | {' | '.join(eps_cols)} |",
           "|---|---:|" + "---:|" * len(eps_cols)]
  lines.append("| DP-SGD mlp (user-level, δ = {:g}) | any (free) | {} |".format(
      args.delta, " | ".join(_fmt({"hr": rows[f"dpsgd/{e:g}"][f"hr@{k}"],
                                   "top1": rows[f"dpsgd/{e:g}"]["top1"]})
                             for e in args.epsilons)))
  for variant in (["all", "pool"] if args.pool else ["all"]):
    where = ("all unseen items" if variant == "all"
             else f"public pool of {args.pool}")
    for mechanism in mechanisms:
      for q in args.queries:
        cells = [_fmt(rows[f"ensemble/{variant}/{mechanism}/{e:g}/{q}"])
                 for e in args.epsilons]
        lines.append(f"| ensemble, {mechanism}, {where} | {q} | {' | '.join(cells)} |")
  student = rows["student"]
  cells = [(_fmt({"hr": student[f"hr@{k}"], "top1": student["top1"]})
            if abs(e - args.student_epsilon) < 1e-12 else "") for e in args.epsilons]
  lines.append(f"| PATE student ({meta['student_mechanism']} labels of "
               f"{meta['student_queries']} public queries) | any (free) | "
               f"{' | '.join(cells)} |")
  lines += ["", f"| reference (not comparable privacy) | HR@{k} / top-1 |", "|---|---:|"]
  ref = [("mlp non-private (single model; no guarantee)", rows["nonprivate"]),
         ("ensemble vote counts without noise, all items (NOT private)",
          rows["ensemble_noiseless/all"])]
  if args.pool:
    ref += [("ensemble vote counts without noise, public pool (NOT private)",
             rows["ensemble_noiseless/pool"]),
            ("public-user popularity, top of the pool (ε = 0 for private users)",
             rows["public_popularity"])]
  ref += [("mlp trained on the public users only (ε = 0 for private users)",
           rows["public_model"])]
  for label, r in ref:
    lines.append(f"| {label} | {_fmt({'hr': r[f'hr@{k}'], 'top1': r['top1']})} |")
  pop = rows["popularity"]
  lines.append(f"| popularity, all training users (non-private; HR@{k} only) | "
               f"{pop[f'hr@{k}']:.4f} / – |")
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
