"""The privacy-utility study: HR@10 / NDCG@10 against epsilon on MovieLens.

  python studies/privacy_utility/sweep.py --data ../shared/data/ml-100k --out runs/sweep \
      [--epsilons 1,2,4,8,inf] [--seeds 0,1,2] [--models popularity,sasrec,llm]

Rows: popularity (DP item counts, user-level, each user in at most 20 items,
discrete Gaussian noise; epsilon = inf is the plain count), SASRec
(configs/movielens_sasrec.py) and the LLM recommender
(configs/movielens_llm.py), each trained with user-level DP-SGD at every
epsilon (sigma calibrated to the run) and without privacy (inf). One delta for
every row (--delta). Each cell is mean +- sample std over the seeds (train seed
= data seed = s: initialisation, contribution bounding, Poisson sampling and
noise all change). Test metrics: leave-last-out, full ranking of the last item
against every item the user has not seen.

Writes OUT/study.md (the table), OUT/study.json and OUT/study.png (epsilon on
x, HR@10 on y; needs matplotlib: pip install -e ".[plot]"). Runs live in
OUT/<model>/eps<E>/seed<S>; finished ones are reused, so an interrupted study
resumes.
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
from privjax.run import evaluate as evaluate_lib
from privjax.run import train as train_lib
from privjax.run import workload as workload_lib

logging.getLogger("absl").setLevel(logging.ERROR)

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = {"sasrec": REPO / "configs" / "movielens_sasrec.py",
           "llm": REPO / "configs" / "movielens_llm.py"}
LABELS = {"popularity": "popularity (DP counts)", "sasrec": "SASRec",
          "llm": "LLM recommender (MiniLM, head)"}


def _eps_label(eps: float) -> str:
  return "inf" if math.isinf(eps) else f"{eps:g}"


def run_model(name: str, eps: float, seed: int, args) -> dict:
  """One training run (or its cached result)."""
  workdir = pathlib.Path(args.out) / name / f"eps{_eps_label(eps)}" / f"seed{seed}"
  done = workdir / "results.json"
  if done.exists():
    return json.loads(done.read_text())
  cfg = config_lib.load_file(CONFIGS[name])
  # Reproducible noise (seeded by the study's seed): the table can be
  # regenerated; each cell is distributed as the same run with secret noise.
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
    cfg = config_lib.override(cfg, key.removeprefix("--config."), value)
  cfg = config_lib.replace(cfg, **over)
  t0 = time.time()
  r = train_lib.train_and_evaluate(cfg, workdir, show_progress=False)
  result = {"model": name, "epsilon": eps if math.isfinite(eps) else "inf",
            "seed": seed, "hr": r["test"]["hr@10"], "ndcg": r["test"]["ndcg@10"],
            "valid_hr": r["valid"]["hr@10"], "sigma": r["noise_multiplier"],
            "epsilon_spent": r["epsilon"] if math.isfinite(r["epsilon"]) else "inf",
            "delta": r["delta"], "steps": r["steps"],
            "seconds": time.time() - t0}
  done.write_text(json.dumps(result))
  print(f"{name} eps={_eps_label(eps)} seed={seed}: HR@10={result['hr']:.4f} "
        f"NDCG@10={result['ndcg']:.4f} ({result['seconds']:.0f} s)", flush=True)
  return result


def run_popularity(eps: float, seed: int, args, cache: dict) -> dict:
  if "workload" not in cache:
    cfg = config_lib.load_file(CONFIGS["sasrec"])
    cfg = config_lib.replace(cfg, **{"data.path": args.data})
    w = workload_lib.build_workload(config_lib.replace(cfg, **{"model.name": "mlp",
                                                          "model.embed_dim": 4,
                                                          "model.hidden_dim": 4}))
    cache["workload"] = (cfg, w.split, w.ds)
  cfg, split, ds = cache["workload"]
  m = evaluate_lib.dp_popularity_metrics(
      cfg, split, ds, epsilon=eps, delta=args.delta, seed=seed,
      max_items_per_user=args.popularity_cap)
  return {"model": "popularity", "epsilon": eps if math.isfinite(eps) else "inf",
          "seed": seed, "hr": m["hr@10"], "ndcg": m["ndcg@10"]}


def table(results: list[dict], epsilons, models, args) -> str:
  head = "| model | " + " | ".join(f"ε = {_eps_label(e)}" for e in epsilons) + " |"
  lines = [f"ml-100k, user-level DP, δ = {args.delta:g}; test HR@10 / NDCG@10 "
           f"(full ranking), mean ± std over seeds {args.seeds}.", "",
           head, "|---|" + "---|" * len(epsilons)]
  for name in models:
    cells = []
    for eps in epsilons:
      rows = [r for r in results if r["model"] == name and
              str(r["epsilon"]) == (str(eps) if math.isfinite(eps) else "inf")]
      if not rows:
        cells.append("–")
        continue
      hr = np.array([r["hr"] for r in rows])
      nd = np.array([r["ndcg"] for r in rows])
      ddof = 1 if len(rows) > 1 else 0
      cells.append(f"{hr.mean():.4f} ± {hr.std(ddof=ddof):.4f} / "
                   f"{nd.mean():.4f} ± {nd.std(ddof=ddof):.4f}")
    lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
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
  fig, ax = plt.subplots(figsize=(6, 4))
  for name in models:
    xs, ms, ss = [], [], []
    for eps in epsilons:
      rows = [r["hr"] for r in results if r["model"] == name and
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
  ax.set_xlabel("epsilon (user-level)")
  ax.set_ylabel("test HR@10 (full ranking)")
  ax.set_title("ml-100k: privacy-utility trade-off")
  ax.grid(alpha=0.3)
  ax.legend()
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
  parser.add_argument("--models", default="popularity,sasrec,llm")
  parser.add_argument("--delta", type=float, default=1e-4)
  parser.add_argument("--popularity-cap", type=int, default=20)
  parser.add_argument("--override", action="append", default=[],
                      help="extra --config.a.b=V for the trained models")
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
