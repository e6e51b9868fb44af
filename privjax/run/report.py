"""What a run writes for people: privacy.json, report.md, results.json, the summary.

Released: privacy.json (the plan's statement), report.md, results.json and
metrics.jsonl. None of them holds the run secret or the exact number of
private units (under add/remove-one DP); values marked ``nonprivate`` are
computed from the data without noise and are not covered by the guarantee.
"""

import json
import math
import pathlib
from typing import Any

import jax
import numpy as np

from privjax import config as config_lib
from privjax.dp import plan as plan_lib
from privjax.dp import secret as secret_lib


def json_default(x):
  if isinstance(x, np.integer):
    return int(x)
  if isinstance(x, (np.floating, jax.Array)):
    return float(x)
  raise TypeError(f"not JSON serializable: {type(x)}")


def finite_or_str(x: float) -> float | str:
  return x if math.isfinite(x) else "inf"


def write_json(path: pathlib.Path, value: Any) -> None:
  path.write_text(json.dumps(value, indent=2, default=json_default))


def privacy_line(plan: plan_lib.Plan, result: dict[str, Any],
                 workdir: pathlib.Path) -> str:
  """The privacy part of the printed summary: epsilon, and where the secret is."""
  if not plan.private:
    return "privacy: none (privacy.enabled=False): this run is NOT private"
  line = (f"privacy: epsilon={result['epsilon']:.3f} delta={plan.delta:.0e} "
          f"unit={plan.unit} sigma={plan.noise_multiplier:.4f} "
          f"steps={result['steps']} (see {workdir / 'privacy.json'})")
  if plan.secret.reproducible:
    return line + "\n" + secret_lib.REPRODUCIBLE_WARNING.format(
        seed=plan.secret.reproducible_seed)
  return (line + f"\nnoise secret: {workdir / secret_lib.SECRET_DIR}/ (fingerprint "
          f"{plan.secret.fingerprint}; keep it to resume, never release or copy it)")


def report_md(cfg: config_lib.Config, plan: plan_lib.Plan, r: dict[str, Any]) -> str:
  """report.md: the guarantee, why training stopped, and the (non-private) metrics."""
  k = cfg.eval.k
  lines = [f"# privjax run: {cfg.name}", ""]
  if plan.private:
    relation = {"add_remove": "add/remove", "replace_one": "replace"}[plan.relation]
    lines.append(
        f"- Privacy: ({r['epsilon']:.3f}, {plan.delta:.0e})-DP for {relation} one "
        f"{plan.unit} ({plan.accountant.upper()} accountant), Poisson sampling "
        f"q={plan.sampling_prob:.5f}, sigma={plan.noise_multiplier:.4f}, "
        f"C={plan.l2_clip_norm}, {r['steps']} steps"
        + (f"; includes the DP count of units (epsilon {plan.count_epsilon})"
           if plan.count_epsilon else "") + ".")
    lines.append(f"- Noise: {plan.secret_note}.")
  else:
    lines.append("- Privacy: NONE. This run is not differentially private.")
  lines += [
      f"- Stopped: {r['stop_reason']}.",
      "- Not covered by the guarantee (computed from private data without noise):",
      f"  - test, full ranking over unseen items: HR@{k}={r['test'][f'hr@{k}']:.4f}, "
      f"NDCG@{k}={r['test'][f'ndcg@{k}']:.4f};",
      f"  - validation: HR@{k}={r['valid'][f'hr@{k}']:.4f}, "
      f"NDCG@{k}={r['valid'][f'ndcg@{k}']:.4f};",
      f"  - training time {r['nonprivate/train_seconds']:.1f} s (it depends on the "
      "realised batch sizes).",
      "", "Files: config.json, privacy.json, metrics.jsonl, checkpoints/ (released); "
      "secret/ (never released).", ""]
  return "\n".join(lines)


def write_run_files(workdir: pathlib.Path, cfg: config_lib.Config, plan: plan_lib.Plan,
                    steps_done: int, extra: dict[str, Any],
                    results: dict[str, Any]) -> None:
  """privacy.json, report.md and results.json of a finished run."""
  write_json(workdir / "privacy.json", plan.statement(steps_done, extra))
  (workdir / "report.md").write_text(report_md(cfg, plan, results))
  # The number of evaluated users is (almost) the private N: not written.
  public = {k: ({m: x for m, x in v.items() if m != "num_users"}
                if k in ("valid", "test") else v) for k, v in results.items()}
  write_json(workdir / "results.json",
             {k: (finite_or_str(v) if isinstance(v, float) else v)
              for k, v in public.items()})


def summary_table(cfg: config_lib.Config, rows: dict[str, Any]) -> str:
  """The printed comparison of the DP run with its non-private twin and popularity."""
  k = cfg.eval.k
  lines = [f"{'model':<34} {'epsilon':>9} {'HR@' + str(k):>8} {'NDCG@' + str(k):>8}"]
  for name, r in rows.items():
    if name == "dp":
      label = (f"{cfg.model.name} DP-SGD ({r['unit']}-level)" if r["private"]
               else cfg.model.name)
      eps = f"{r['epsilon']:.3f}" if math.isfinite(r["epsilon"]) else "inf"
    elif name == "nonprivate":
      label, eps = f"{cfg.model.name} non-private", "inf"
    else:
      label, eps = "popularity (non-private)", "inf"
    lines.append(f"{label:<34} {eps:>9} {r['test'][f'hr@{k}']:>8.4f} "
                 f"{r['test'][f'ndcg@{k}']:>8.4f}")
  return "\n".join(lines)
