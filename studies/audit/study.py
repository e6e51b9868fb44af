"""Privacy audits, measured: the step audit, private prediction, and SASRec on ml-100k.

  python studies/audit/study.py --config configs/movielens_sasrec.py \\
      [--workdir runs/audit_study] [--parts step,inference,ml100k]

Parts (each writes WORKDIR/<part>.json; the tables are rebuilt from whatever
parts exist into WORKDIR/table.md and printed):

* ``step``: the many-run white-box step audit (privjax.audit.step) at q = 1,
  T = 1, sigma = 1, delta = 1e-5, 20,000 runs a side, against the exact
  Gaussian epsilon (vmap and ghost clipping; 16 and 1 canaries per run); and
  every planted bug (privjax.audit.planted) beside the correct step.
* ``inference``: many-run audits of noisy argmax / top-k / GNMax answers.
* ``ml100k``: SASRec (the config) non-private and DP at epsilon 1 and 8: a
  loss-based membership attack on real users (half held out by the audit) and
  the one-run canary audit (500 canary users, about 250 inserted), each ONE
  training run through scripts/audit.py's library call, in
  WORKDIR/<setting>-<kind>. Existing finished runs are resumed (evaluated
  again, not retrained).
"""

import argparse
import dataclasses
import json
import logging
import pathlib
import time

from privjax import config as config_lib
from privjax.audit import inference
from privjax.audit import planted
from privjax.audit import report
from privjax.audit import step

logging.getLogger("absl").setLevel(logging.ERROR)

SETTINGS = {"nonprivate": {"privacy.enabled": False},
            "eps1": {"privacy.target_epsilon": 1.0},
            "eps8": {"privacy.target_epsilon": 8.0}}


def step_part() -> dict:
  rows = []
  exact = step.StepSpec(sampling_prob=1.0, noise_multiplier=1.0, steps=1, delta=1e-5)
  for clipping in ("vmap", "ghost"):
    for per_run in (16, 1):
      spec = dataclasses.replace(exact, clipping=clipping)
      rows.append(step.audit_step(spec, runs=20_000, canaries_per_run=per_run).to_dict())
  bug_specs = {"noise_halved": step.StepSpec(noise_multiplier=4.0),
               "no_clipping": step.StepSpec(noise_multiplier=4.0),
               "per_row_clipping": step.StepSpec(noise_multiplier=4.0),
               "sampler_ignores_q": step.StepSpec(noise_multiplier=2.0, sampling_prob=0.1)}
  for name, spec in bug_specs.items():
    for wiring in ("correct", name):
      if wiring == "correct" and name in ("no_clipping", "per_row_clipping"):
        continue  # same spec as noise_halved's correct row
      rows.append(step.audit_step(spec, wiring=planted.wiring(wiring, spec)).to_dict())
  return {"rows": rows}


def inference_part() -> dict:
  cases = [("gnmax", {"sigma": 2.0}), ("gnmax", {"sigma": 2.0, "pair": "votes"}),
           ("gnmax", {"sigma": 1.0}), ("gumbel", {"epsilon": 1.0}),
           ("gumbel", {"epsilon": 0.5, "k": 2}), ("laplace", {"epsilon": 1.0}),
           ("laplace", {"epsilon": 1.0, "pair": "votes"}),
           ("laplace", {"epsilon": 1.0, "monotonic": True}),
           ("gumbel", {"epsilon": 1.0, "monotonic": True})]
  return {"rows": [inference.audit_answers(m, **kw).to_dict() for m, kw in cases]}


def ml100k_part(cfg: config_lib.Config, workdir: pathlib.Path) -> dict:
  rows = []
  for setting, overrides in SETTINGS.items():
    run_cfg = config_lib.replace(cfg, **overrides, name=f"{cfg.name}-{setting}")
    for kind in ("mia", "canaries"):
      t0 = time.time()
      out = report.run(run_cfg, workdir / f"{setting}-{kind}", kind, num_canaries=500,
                       holdout=0.5)
      rows.append({"setting": setting, "kind": kind, "wall_seconds": time.time() - t0,
                   **out})
      print(f"{setting} {kind}: {out['verdict']}", flush=True)
  return {"rows": rows}


def _f(x, digits=3) -> str:
  if x is None:
    return "-"
  if isinstance(x, str):
    return x
  return f"{x:.{digits}f}"


def tables(parts: dict) -> str:
  out = []
  if "step" in parts:
    out += ["Step audit (20,000 runs a side; lower bound held-out at 95%; exact = Gaussian "
            "epsilon when q = 1; claimed = PLD accountant)", "",
            "| wiring | q | sigma | clipping | canaries/run | lower bound | optimistic | "
            "mu | claimed eps | exact eps | lower/exact | flagged | seconds |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in parts["step"]["rows"]:
      s, b = r["spec"], r["bound"]
      ratio = (b["epsilon_lower"] / r["exact_epsilon"]
               if isinstance(r["exact_epsilon"], float) else None)
      out.append(f"| {r['wiring']} | {s['sampling_prob']:g} | {s['noise_multiplier']:g} | "
                 f"{s['clipping']} | {r['canaries_per_run']} | {_f(b['epsilon_lower'])} | "
                 f"{_f(b['epsilon_optimistic'])} | {_f(b['mu'])} | "
                 f"{_f(r['accountant_epsilon'])} | {_f(r['exact_epsilon'])} | "
                 f"{_f(ratio, 2)} | {r['flagged']} | {r['seconds']:.1f} |")
    out.append("")
  if "inference" in parts:
    out += ["Private prediction (20,000 runs a side; lower bound held-out at 95%)", "",
            "| mechanism | k | pair | epsilon | sigma | monotonic | gap | lower bound | "
            "claimed eps | flagged |", "|---|---:|---|---:|---:|---|---:|---:|---:|---|"]
    for r in parts["inference"]["rows"]:
      out.append(f"| {r['mechanism']} | {r['k']} | {r['pair']} | {_f(r['epsilon'], 2)} | "
                 f"{_f(r['sigma'], 2)} | {r['monotonic']} | {r['gap']:.2f} | "
                 f"{_f(r['bound']['epsilon_lower'])} | {_f(r['claimed_epsilon'])} | "
                 f"{r['flagged']} |")
    out.append("")
  if "ml100k" in parts:
    out += ["SASRec on ml-100k (one training run per cell)", "",
            "| setting | kind | accountant eps | lower bound (95%) | AUC | TPR@1%FPR | "
            "TPR@0.1%FPR | test HR@10 | train s | score s |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in parts["ml100k"]["rows"]:
      m = r.get("membership") or r.get("canary_membership")
      out.append(f"| {r['setting']} | {r['kind']} | {_f(r['accountant_epsilon'], 2)} | "
                 f"{_f(r.get('epsilon_lower'))} | {m['auc']:.3f} | {m['tpr@1%fpr']:.3f} | "
                 f"{m['tpr@0.1%fpr']:.3f} | {r['test']['hr@10']:.4f} | "
                 f"{r['train_seconds']:.0f} | {r['score_seconds']:.0f} |")
  return "\n".join(out)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/movielens_sasrec.py")
  parser.add_argument("--workdir", default="runs/audit_study")
  parser.add_argument("--parts", default="step,inference,ml100k")
  args = parser.parse_args()
  workdir = pathlib.Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  cfg = config_lib.load_file(args.config)
  for part in args.parts.split(","):
    t0 = time.time()
    result = {"step": step_part, "inference": inference_part,
              "ml100k": lambda: ml100k_part(cfg, workdir)}[part]()
    result["seconds"] = time.time() - t0
    (workdir / f"{part}.json").write_text(json.dumps(result, indent=2, sort_keys=True))
  parts = {p: json.loads((workdir / f"{p}.json").read_text())
           for p in ("step", "inference", "ml100k") if (workdir / f"{p}.json").exists()}
  table = tables(parts)
  (workdir / "table.md").write_text(table + "\n")
  print(table)


if __name__ == "__main__":
  main()
