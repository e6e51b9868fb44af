"""The privacy-utility study: HR@10 / NDCG@10 against epsilon on MovieLens.

  python studies/privacy_utility/sweep.py --data ../shared/data/ml-100k --out runs/sweep \
      [--epsilons 1,2,4,8,inf] [--seeds 0,1,2] [--models popularity,sasrec,llm,text_seq]

Rows: popularity (DP item counts, user-level, each user in at most 20 items,
discrete Gaussian noise; epsilon = inf is the plain count), SASRec
(configs/movielens_sasrec.py), the LLM recommender (configs/movielens_llm.py)
and the text-first recommender (configs/movielens_text_seq.py), each trained
with user-level DP-SGD at every epsilon (sigma calibrated to the run) and
without privacy (inf). One delta for every row (--delta). Each cell is mean
+- sample std over the seeds (train seed = data seed = reproducible noise seed
= s: the noise and the batches are reproducible, so every cell can be
regenerated; each is distributed as the same run with secret noise). Test
metrics: leave-last-out, full ranking of the last item against every item the
user has not seen; the cold column restricts them to the test users whose
target item has at most 5 training interactions.

Writes OUT/study.md (the tables), OUT/study.json and OUT/study.png (needs
matplotlib). Runs live in OUT/<model>/eps<E>/seed<S>; finished ones are
reused, so an interrupted study resumes.
"""

import argparse
import json
import logging
import math
import pathlib
import sys
import time

import numpy as np

from privjax import config as config_lib
from privjax.data import sequences
from privjax.run import evaluate as evaluate_lib
from privjax.run import train as train_lib
from privjax.run import workload as workload_lib

logging.getLogger("absl").setLevel(logging.ERROR)

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = {"sasrec": REPO / "configs" / "movielens_sasrec.py",
           "llm": REPO / "configs" / "movielens_llm.py",
           "text_seq": REPO / "configs" / "movielens_text_seq.py"}
LABELS = {"popularity": "popularity (DP counts)", "sasrec": "SASRec (item ids)",
          "llm": "LLM recommender (MiniLM over the history text, head)",
          "text_seq": "text-first (MiniLM item text + causal transformer)"}
COLD = 5


def _eps_label(eps: float) -> str:
  return "inf" if math.isinf(eps) else f"{eps:g}"


def _cfg(name: str, eps: float, seed: int, args) -> config_lib.Config:
  cfg = config_lib.load_file(CONFIGS[name])
  over = {"data.path": args.data, "data.seed": seed, "train.seed": seed,
          "privacy.reproducible_noise_seed": seed,
          "privacy.delta": args.delta, "train.eval_every": 0,
          "name": f"{name}-eps{_eps_label(eps)}-seed{seed}"}
  if math.isinf(eps):
    over.update({"privacy.enabled": False, "privacy.target_epsilon": None})
  else:
    over["privacy.target_epsilon"] = eps
  for item in args.override:
    key, _, value = item.partition("=")
    model, _, field = key.removeprefix("--config.").partition(":")
    if field and model != name:
      continue  # "--override sasrec:train.steps=600" applies to one model only
    cfg = config_lib.override(cfg, field or model, value)
  return config_lib.replace(cfg, **over)


def run_model(name: str, eps: float, seed: int, args) -> dict:
  """One training run (or its cached result), with the cold-item metric."""
  workdir = pathlib.Path(args.out) / name / f"eps{_eps_label(eps)}" / f"seed{seed}"
  done = workdir / "study_row.json"
  if done.exists():
    return json.loads(done.read_text())
  t0 = time.time()
  r = train_lib.train_and_evaluate(_cfg(name, eps, seed, args), workdir,
                                   show_progress=False)
  w, params, _ = workload_lib.load_trained(workdir)
  cold = evaluate_lib.evaluate(w, params, w.frozen, "test",
                               users=evaluate_lib.cold_users(w.split, "test", COLD))
  result = {"model": name, "dataset": w.ds.name,
            "epsilon": eps if math.isfinite(eps) else "inf", "seed": seed,
            "hr": r["test"]["hr@10"], "ndcg": r["test"]["ndcg@10"],
            "cold_hr": cold["hr@10"], "valid_hr": r["valid"]["hr@10"],
            "sigma": r["noise_multiplier"], "steps": r["steps"],
            "epsilon_spent": r["epsilon"] if math.isfinite(r["epsilon"]) else "inf",
            "delta": r["delta"], "reproducible_noise": True,
            "seconds": time.time() - t0}
  done.write_text(json.dumps(result))
  print(f"{name} eps={_eps_label(eps)} seed={seed}: HR@10={result['hr']:.4f} "
        f"NDCG@10={result['ndcg']:.4f} cold HR@10={result['cold_hr']:.4f} "
        f"({result['seconds']:.0f} s)", flush=True)
  return result


def run_popularity(eps: float, seed: int, args, cache: dict) -> dict:
  if "workload" not in cache:
    ds = workload_lib.load_dataset(config_lib.DataConfig(source="movielens", path=args.data))
    cfg = config_lib.Config()
    split = sequences.leave_last_out(ds)
    cache["workload"] = (cfg, split, ds)
  cfg, split, ds = cache["workload"]
  counts = evaluate_lib.dp_popularity_counts(
      split, ds, epsilon=eps, delta=args.delta, seed=seed,
      max_items_per_user=args.popularity_cap)
  m = evaluate_lib.item_scores_metrics(cfg, split, counts, "test")
  es = sequences.eval_set(split, "test", 1)
  cold = evaluate_lib.rank_metrics(
      lambda a, b: np.broadcast_to(np.asarray(counts, np.float32), (b - a, len(counts))),
      evaluate_lib.restrict(es, evaluate_lib.cold_users(split, "test", COLD)),
      k=10, batch_size=len(es.target))
  return {"model": "popularity", "dataset": ds.name,
          "epsilon": eps if math.isfinite(eps) else "inf", "seed": seed,
          "hr": m["hr@10"], "ndcg": m["ndcg@10"], "cold_hr": cold["hr@10"]}


def _cells(results, name, eps, keys):
  rows = [r for r in results if r["model"] == name and
          str(r["epsilon"]) == (str(eps) if math.isfinite(eps) else "inf")]
  if not rows:
    return "–"
  ddof = 1 if len(rows) > 1 else 0
  parts = []
  for key in keys:
    x = np.array([r[key] for r in rows])
    parts.append(f"{x.mean():.4f} ± {x.std(ddof=ddof):.4f}")
  return " / ".join(parts)


def table(results: list[dict], epsilons, models, args) -> str:
  dataset = results[0]["dataset"] if results else "?"
  head = "| model | " + " | ".join(f"ε = {_eps_label(e)}" for e in epsilons) + " |"
  rule = "|---|" + "---|" * len(epsilons)
  lines = [f"{dataset}, user-level DP, δ = {args.delta:g}; test HR@10 / NDCG@10 (full "
           f"ranking), mean ± std over seeds {args.seeds}; reproducible noise (seeded by "
           "the seed).", "", head, rule]
  for name in models:
    lines.append(f"| {LABELS[name]} | " + " | ".join(
        _cells(results, name, e, ("hr", "ndcg")) for e in epsilons) + " |")
  lines += ["", f"Cold items: test HR@10 of the users whose target item has at most "
            f"{COLD} training interactions.", "", head, rule]
  for name in models:
    lines.append(f"| {LABELS[name]} | " + " | ".join(
        _cells(results, name, e, ("cold_hr",)) for e in epsilons) + " |")
  return "\n".join(lines) + "\n"


def plot(results: list[dict], epsilons, models, path: pathlib.Path) -> bool:
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    print("matplotlib not installed (pip install -e '.[plot]'): no PNG written")
    return False
  finite = [e for e in epsilons if math.isfinite(e)]
  x_inf = (max(finite) * 2) if finite else 1.0
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, key, title in ((axes[0], "hr", "all test users"),
                         (axes[1], "cold_hr", f"cold items (<= {COLD} interactions)")):
    for name in models:
      xs, ms, ss = [], [], []
      for eps in epsilons:
        rows = [r[key] for r in results if r["model"] == name and
                str(r["epsilon"]) == (str(eps) if math.isfinite(eps) else "inf")]
        if rows:
          xs.append(eps if math.isfinite(eps) else x_inf)
          ms.append(np.mean(rows))
          ss.append(np.std(rows, ddof=1) if len(rows) > 1 else 0.0)
      ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=LABELS[name])
    ax.set_xscale("log")
    ticks = finite + ([x_inf] if any(math.isinf(e) for e in epsilons) else [])
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in finite] + (["∞"] if len(ticks) > len(finite) else []))
    ax.set(xlabel="epsilon (user-level)", ylabel="test HR@10 (full ranking)", title=title)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.suptitle(f"{results[0]['dataset'] if results else ''}: privacy-utility frontier")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return True


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "ml-100k"))
  parser.add_argument("--out", default="runs/sweep")
  parser.add_argument("--epsilons", default="1,2,4,8,inf")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--models", default="popularity,sasrec,llm,text_seq")
  parser.add_argument("--delta", type=float, default=1e-4)
  parser.add_argument("--popularity-cap", type=int, default=20)
  parser.add_argument("--override", action="append", default=[],
                      help="extra a.b=V for the trained models, or model:a.b=V for one")
  args = parser.parse_args(argv)
  epsilons = [float(e) for e in args.epsilons.split(",")]
  args.seeds = [int(s) for s in args.seeds.split(",")]
  models = args.models.split(",")
  for m in models:
    if m not in LABELS:
      parser.error(f"--models: unknown model {m!r} (choose from {sorted(LABELS)})")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  results, cache = [], {}
  for name in models:
    for eps in epsilons:
      for seed in args.seeds:
        if name == "popularity":
          results.append(run_popularity(eps, seed, args, cache))
        else:
          results.append(run_model(name, eps, seed, args))
  md = table(results, epsilons, models, args)
  (out / "study.md").write_text(md)
  (out / "study.json").write_text(json.dumps(results, indent=1))
  plot(results, epsilons, models, out / "study.png")
  print(md)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
