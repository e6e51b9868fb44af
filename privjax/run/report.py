"""What a run writes: the released files, the researcher's files, the summary.

A run directory has two halves. Released (covered by the guarantee):
config.json, privacy.json, metrics.jsonl (step, epsilon, noise std, sparsity:
public values only) and checkpoints/. Never to be released: secret/ (the run
secret) and nonprivate/ (metrics.jsonl with the training loss, clipped
fraction, realised batch sizes and timings; results.json and report.md with
the evaluation on the private users' held-out items). Everything in
nonprivate/ is computed from the data without noise: it is for the
researcher, and publishing it would break the guarantee (an evaluation
metric like HR@10 = hits / users even reveals the number of users).
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


NONPRIVATE_DIR = "nonprivate"
# Keys of public metrics: functions of the plan and of the (private) parameters.
_PUBLIC_METRICS = ("step", "epsilon", "noise_stddev", "sparsity")


def _tensorboard(logdir: pathlib.Path):
  """A tensorboardX writer, or None when the optional extra is not installed."""
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return tensorboardX.SummaryWriter(str(logdir))


class MetricsWriter:
  """Appends records to metrics.jsonl (public) and nonprivate/metrics.jsonl.

  On resume at ``start`` it drops records of steps after ``start`` (an
  interrupted attempt's, which the resumed run logs again) and writes a
  ``{"event": "resume"}`` marker; a fresh run starts with a header saying
  whether it is a DP release. With ``pip install -e ".[logs]"`` the same
  scalars also go to TensorBoard event files, split the same way:
  ``<workdir>/tensorboard`` (public) and ``<workdir>/nonprivate/tensorboard``.
  """

  def __init__(self, workdir: pathlib.Path, *, start: int, dp_release: bool,
               reproducible: bool):
    (workdir / NONPRIVATE_DIR).mkdir(exist_ok=True)
    self._files = {}
    for kind, path in (("public", workdir / "metrics.jsonl"),
                       ("nonprivate", workdir / NONPRIVATE_DIR / "metrics.jsonl")):
      kept = []
      if start and path.exists():
        kept = [line for line in path.read_text().splitlines()
                if json.loads(line).get("step", 0) <= start]
      path.write_text("".join(line + "\n" for line in kept))
      self._files[kind] = path.open("a")
    self._boards = {"public": _tensorboard(workdir / "tensorboard"),
                    "nonprivate": _tensorboard(workdir / NONPRIVATE_DIR / "tensorboard")}
    marker = ({"event": "resume", "step": start} if start else
              {"event": "start", "step": 0, "dp_release": dp_release,
               "reproducible_noise": reproducible})
    self.write(marker, public=True)

  def write(self, record: dict[str, Any], *, public: bool = False) -> None:
    """Public keys go to metrics.jsonl; every other key to nonprivate/."""
    pub = {k: v for k, v in record.items() if public or k in _PUBLIC_METRICS}
    rest = {k: v for k, v in record.items() if k not in pub or k == "step"}
    for kind, rec in (("public", pub), ("nonprivate", rest)):
      if set(rec) - {"step"}:
        self._files[kind].write(json.dumps(rec, default=json_default) + "\n")
        self._files[kind].flush()
        board = self._boards[kind]
        if board is not None and "event" not in record:
          for key, value in rec.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
              board.add_scalar(key, value, global_step=int(record.get("step", 0)))

  def close(self) -> None:
    for f in self._files.values():
      f.close()
    for board in self._boards.values():
      if board is not None:
        board.close()


def plot_curves(workdir: pathlib.Path) -> pathlib.Path | None:
  """nonprivate/curves.png: training loss and epsilon against steps (matplotlib)."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  def records(path):
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
  eps = [(r["step"], r["epsilon"]) for r in records(workdir / "metrics.jsonl")
         if isinstance(r.get("epsilon"), (int, float))]
  loss = [(r["step"], r["nonprivate/loss"])
          for r in records(workdir / NONPRIVATE_DIR / "metrics.jsonl")
          if "nonprivate/loss" in r]
  if not eps and not loss:
    return None
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
  if loss:
    ax1.plot(*zip(*loss))
  ax1.set(xlabel="step", ylabel="training loss (non-private)", title="loss")
  if eps:
    ax2.plot(*zip(*eps), color="C1")
  ax2.set(xlabel="step", ylabel="epsilon spent", title="privacy")
  for ax in (ax1, ax2):
    ax.grid(alpha=0.3)
  fig.tight_layout()
  out = workdir / NONPRIVATE_DIR / "curves.png"
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out


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
    if plan.secret.reproducible:
      lines.append("- NOT A DP RELEASE: " + secret_lib.REPRODUCIBLE_WARNING.format(
          seed=plan.secret.reproducible_seed) + " Were its noise secret:")
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
      "- This file is in nonprivate/: it is for the researcher, NOT for release.",
      "- Not covered by the guarantee (computed from private data without noise):",
      f"  - test, full ranking over unseen items: HR@{k}={r['test'][f'hr@{k}']:.4f}, "
      f"NDCG@{k}={r['test'][f'ndcg@{k}']:.4f};",
      f"  - validation: HR@{k}={r['valid'][f'hr@{k}']:.4f}, "
      f"NDCG@{k}={r['valid'][f'ndcg@{k}']:.4f};",
      f"  - training time {r['nonprivate/train_seconds']:.1f} s (it depends on the "
      "realised batch sizes).",
      "", "Released: config.json, privacy.json, metrics.jsonl, checkpoints/. "
      "Never released: secret/, nonprivate/.", ""]
  return "\n".join(lines)


def write_run_files(workdir: pathlib.Path, cfg: config_lib.Config, plan: plan_lib.Plan,
                    steps_done: int, extra: dict[str, Any],
                    results: dict[str, Any]) -> None:
  """privacy.json (released); nonprivate/report.md and results.json."""
  write_json(workdir / "privacy.json", plan.statement(steps_done, extra))
  (workdir / NONPRIVATE_DIR).mkdir(exist_ok=True)
  text = report_md(cfg, plan, results)
  if plot_curves(workdir) is not None:
    text += "\n![loss and epsilon against steps](curves.png)\n"
  (workdir / NONPRIVATE_DIR / "report.md").write_text(text)
  # The number of evaluated users is (almost) the private N: not written.
  public = {k: ({m: x for m, x in v.items() if m != "num_users"}
                if k in ("valid", "test") else v) for k, v in results.items()}
  write_json(workdir / NONPRIVATE_DIR / "results.json",
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
      if r["private"] and not r["dp_release"]:
        label = f"{cfg.model.name} DP-SGD, REPRODUCIBLE noise"
      eps = f"{r['epsilon']:.3f}" if math.isfinite(r["epsilon"]) else "inf"
    elif name == "nonprivate":
      label, eps = f"{cfg.model.name} non-private", "inf"
    else:
      label, eps = "popularity (non-private)", "inf"
    lines.append(f"{label:<34} {eps:>9} {r['test'][f'hr@{k}']:>8.4f} "
                 f"{r['test'][f'ndcg@{k}']:>8.4f}")
  return "\n".join(lines)
