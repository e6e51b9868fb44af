"""One audit of a config, written to its run directory: ``audit.json`` and ``audit.md``.

``run(cfg, workdir, kind, **options)`` is what ``scripts/audit.py`` calls:

* ``step``: the many-run white-box audit (``audit.step``) of this config's DP
  step (its q, sigma, C and clipping, as the plan computes them), ``steps``
  steps a run, optionally with a planted bug (``audit.planted``).
* ``canaries``: one training run with canary users, one-run bound
  (``audit.canaries.audit_canaries``).
* ``mia``: a loss-based membership attack on real users held out by the audit
  (``audit.canaries.audit_mia``).
* ``inference``: a many-run audit of noisy answers (``audit.inference``).

Every report states the epsilon lower bound with its confidence, the
accountant's epsilon for the same mechanism or run, and the verdict: an audit
can refute a privacy claim (the lower bound exceeds the claimed epsilon), it
can never prove one.
"""

import json
import math
import pathlib
from typing import Any

from privjax import config as config_lib
from privjax.audit import canaries
from privjax.audit import inference
from privjax.audit import planted
from privjax.audit import step
from privjax.dp import plan as plan_lib
from privjax.dp import secret as secret_lib
from privjax.run import workload as workload_lib

KINDS = ("step", "canaries", "mia", "inference")


def step_spec(cfg: config_lib.Config, *, steps: int = 1) -> step.StepSpec:
  """The StepSpec of this config's DP step, from the plan the trainer would build.

  The plan needs the number of units, so the data is loaded and bounded (with
  a reproducible secret: this is a simulation of the mechanism, not a run).
  """
  p = cfg.privacy
  if not p.enabled:
    raise ValueError("config.privacy.enabled=false: a non-private step has no "
                     "epsilon to audit")
  w = workload_lib.build_workload(cfg)
  _, unit_rows = workload_lib.training_units(w, secret_lib.RunSecret.from_seed(0))
  # The same call as run.train step 3 (kept in step with it).
  plan = plan_lib.make_plan(
      unit=p.unit, relation=p.neighbouring, private=True,
      target_epsilon=p.target_epsilon, noise_multiplier=p.noise_multiplier,
      sampling_prob=p.sampling_prob, batch_size=cfg.train.batch_size,
      steps=cfg.train.steps, num_units=len(unit_rows), delta=p.delta,
      l2_clip_norm=p.l2_clip_norm, secret=secret_lib.RunSecret.from_seed(0),
      accountant=p.accountant, epsilon_budget=p.epsilon_budget,
      count_epsilon=p.count_epsilon, overflow=p.overflow)
  return step.StepSpec(sampling_prob=plan.sampling_prob,
                       noise_multiplier=plan.noise_multiplier,
                       l2_clip_norm=plan.l2_clip_norm, steps=steps, delta=plan.delta,
                       clipping="vmap" if p.clipping == "vmap" else "ghost",
                       accountant="pld")


def _finite(x) -> float:
  return float(x) if not isinstance(x, str) else math.inf


def _verdict(lower: float, claimed: float, confidence: float) -> str:
  if lower > claimed:
    return (f"FLAGGED: the epsilon lower bound {lower:.3f} exceeds the claimed "
            f"epsilon {claimed:.3f} (confidence {confidence:.0%}): the mechanism "
            "leaks more than its privacy statement says")
  return (f"not flagged: lower bound {lower:.3f} <= claimed epsilon {claimed:.3f} "
          f"(confidence {confidence:.0%}); an audit can refute a claim, never prove it")


def run(cfg: config_lib.Config, workdir: str | pathlib.Path, kind: str, *,
        bug: str = "correct", runs: int = 20_000, canaries_per_run: int = 16,
        steps: int = 1, num_canaries: int = 500, canary_length: int | None = None,
        holdout: float = 0.5, mechanism: str = "gnmax", epsilon: float | None = None,
        sigma: float | None = None, k: int = 1, pair: str = "scores",
        confidence: float = 0.95, seed: int = 0,
        show_progress: bool = True) -> dict[str, Any]:
  """Runs one audit of ``cfg`` and writes ``audit.json`` and ``audit.md`` to ``workdir``.

  Args:
    cfg: the config (validated here).
    workdir: the run directory; ``canaries`` and ``mia`` train a run there.
    kind: one of ``KINDS``.
    bug, runs, canaries_per_run, steps: the step audit (``bug``: "correct" or
      a name in ``planted.BUGS``).
    num_canaries, canary_length: the canary audit.
    holdout: the share of real users the mia audit holds out.
    mechanism, epsilon, sigma, k, pair: the inference audit (delta from cfg).
    confidence: 1 - beta of every bound.
    seed: the audit's own randomness (a simulation).
    show_progress: the trainer's progress bar.

  Returns:
    The dict written to audit.json: ``epsilon_lower``, ``confidence``,
    ``accountant_epsilon``, ``flagged``, ``verdict`` and the details.
  """
  config_lib.validate(cfg)
  if kind not in KINDS:
    raise ValueError(f"kind={kind!r} must be one of {list(KINDS)}")
  workdir = pathlib.Path(workdir)
  if kind == "step":
    spec = step_spec(cfg, steps=steps)
    rows = 1 if cfg.privacy.unit == "example" else min(cfg.data.max_examples_per_user, 4)
    population = step.Population(max_rows_per_user=rows, canary_rows=rows)
    result = step.audit_step(spec, runs=runs, canaries_per_run=canaries_per_run,
                             wiring=planted.wiring(bug, spec), population=population,
                             confidence=confidence, seed=seed)
    out = {"kind": kind, "epsilon_lower": result.bound.epsilon_lower,
           "epsilon_optimistic": result.bound.epsilon_optimistic,
           "accountant_epsilon": result.accountant_epsilon, **result.to_dict()}
  elif kind == "canaries":
    out = canaries.audit_canaries(cfg, workdir, num_canaries=num_canaries,
                                  length=canary_length, seed=seed,
                                  confidence=confidence, show_progress=show_progress)
  elif kind == "mia":
    out = canaries.audit_mia(cfg, workdir, holdout=holdout, seed=seed,
                             confidence=confidence, show_progress=show_progress)
  else:
    result = inference.audit_answers(mechanism, epsilon=epsilon, sigma=sigma, k=k,
                                     pair=pair, runs=runs, delta=cfg.privacy.delta,
                                     confidence=confidence, seed=seed)
    out = {"kind": kind, "epsilon_lower": result.bound.epsilon_lower,
           "epsilon_optimistic": result.bound.epsilon_optimistic,
           "accountant_epsilon": result.claimed_epsilon, **result.to_dict()}
  lower = _finite(out.get("epsilon_lower", 0.0))
  claimed = _finite(out["accountant_epsilon"])
  out.update(config=cfg.name, confidence=confidence, flagged=bool(lower > claimed),
             verdict=_verdict(lower, claimed, confidence))
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "audit.json").write_text(json.dumps(out, indent=2, sort_keys=True))
  (workdir / "audit.md").write_text(markdown(out))
  return out


def markdown(out: dict[str, Any]) -> str:
  """The short audit.md of an audit.json dict."""
  lines = [f"# Privacy audit ({out['kind']}) of {out.get('config', '')}", "",
           f"- epsilon lower bound: **{_finite(out.get('epsilon_lower', 0.0)):.3f}** "
           f"at confidence {out['confidence']:.0%}"]
  if "epsilon_optimistic" in out:
    lines.append(f"- optimistic (test chosen on the same runs, not a bound): "
                 f"{_finite(out['epsilon_optimistic']):.3f}")
  lines.append(f"- accountant's epsilon for the same mechanism or run: "
               f"{_finite(out['accountant_epsilon']):.3f}")
  if out.get("exact_epsilon") not in (None, "inf"):
    lines.append(f"- exact epsilon (q = 1): {_finite(out['exact_epsilon']):.3f}")
  if "membership" in out or "canary_membership" in out:
    m = out.get("membership") or out["canary_membership"]
    who = "real users" if "membership" in out else "canaries"
    lines.append(f"- membership attack on {who}: AUC {m['auc']:.3f}, TPR@1%FPR "
                 f"{m['tpr@1%fpr']:.3f}, TPR@0.1%FPR {m['tpr@0.1%fpr']:.3f} "
                 f"({m['num_members']} members, {m['num_nonmembers']} non-members)")
  if out["kind"] == "step":
    lines.append(f"- {out['runs_per_side']} runs per side x {out['canaries_per_run']} "
                 f"canaries per run; wiring: {out['wiring']}")
  lines += ["", f"Verdict: {out['verdict']}.", ""]
  return "\n".join(lines)
