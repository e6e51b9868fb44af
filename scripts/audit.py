"""Audit the privacy of a config empirically: an epsilon lower bound beside the claim.

  python scripts/audit.py --config configs/movielens_sasrec.py --kind mia [--config.a.b=V ...]
      [--workdir DIR] [kind options]

Kinds (privjax/audit/report.py):
  step       many runs of this config's DP step with white-box gradient canaries
             (--runs, --canaries-per-run, --steps, --bug correct|noise_halved|...)
  canaries   ONE training run with canary users inserted with probability 1/2,
             the one-run bound of Steinke, Nasr & Jagielski 2023 (--num-canaries)
  mia        a loss-based membership attack on real users held out of training
             (--holdout): AUC, TPR at 1% and 0.1% FPR
  inference  many runs of noisy answers on neighbouring scores or vote histograms
             (--mechanism, --epsilon | --sigma, --k, --pair)

Writes audit.json and audit.md into the run directory (default
runs/<config name>-audit-<kind>); canaries and mia train a fresh run there.
"""

import argparse
import logging
import os
import pathlib
import sys

from privjax import config as config_lib
from privjax.audit import planted
from privjax.audit import report

logging.getLogger("absl").setLevel(logging.ERROR)  # dp_accounting convergence chatter


def parse_args(argv: list[str]):
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="Python config file")
  parser.add_argument("--kind", required=True, choices=report.KINDS)
  parser.add_argument("--workdir", default=None)
  parser.add_argument("--confidence", type=float, default=0.95)
  parser.add_argument("--seed", type=int, default=0, help="the audit's own randomness")
  parser.add_argument("--no-progress", action="store_true")
  step = parser.add_argument_group("step")
  step.add_argument("--bug", default="correct", choices=("correct", *planted.BUGS))
  step.add_argument("--runs", type=int, default=20_000, help="runs per side (also inference)")
  step.add_argument("--canaries-per-run", type=int, default=16)
  step.add_argument("--steps", type=int, default=1, help="steps per run")
  canary = parser.add_argument_group("canaries, mia")
  canary.add_argument("--num-canaries", type=int, default=500)
  canary.add_argument("--canary-length", type=int, default=None)
  canary.add_argument("--holdout", type=float, default=0.5)
  answers = parser.add_argument_group("inference")
  answers.add_argument("--mechanism", default="gnmax", choices=("gnmax", "gumbel", "laplace"))
  answers.add_argument("--epsilon", type=float, default=None)
  answers.add_argument("--sigma", type=float, default=None)
  answers.add_argument("--k", type=int, default=1)
  answers.add_argument("--pair", default="scores", choices=("scores", "votes"))
  args, rest = parser.parse_known_args(argv)
  cfg = config_lib.load_file(args.config)
  for item in rest:
    if not item.startswith("--config."):
      parser.error(f"unrecognized argument {item!r} (overrides look like "
                   "--config.train.steps=100)")
    key, sep, value = item[len("--config."):].partition("=")
    if not sep:
      parser.error(f"override {item!r} needs a value: --config.{key}=VALUE")
    try:
      cfg = config_lib.override(cfg, key, value)
    except ValueError as e:
      parser.error(str(e))
  if args.kind == "inference" and (args.epsilon is None) == (args.sigma is None):
    parser.error("--kind inference needs exactly one of --epsilon (gumbel, laplace) "
                 "or --sigma (gnmax)")
  return cfg, args


def main(argv: list[str]) -> int:
  cfg, a = parse_args(argv)
  workdir = pathlib.Path(a.workdir or os.path.join("runs", f"{cfg.name}-audit-{a.kind}"))
  try:
    out = report.run(
        cfg, workdir, a.kind, bug=a.bug, runs=a.runs, canaries_per_run=a.canaries_per_run,
        steps=a.steps, num_canaries=a.num_canaries, canary_length=a.canary_length,
        holdout=a.holdout, mechanism=a.mechanism, epsilon=a.epsilon, sigma=a.sigma,
        k=a.k, pair=a.pair, confidence=a.confidence, seed=a.seed,
        show_progress=not a.no_progress)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(report.markdown(out))
  print(f"wrote {workdir / 'audit.json'} and {workdir / 'audit.md'}")
  return 1 if out["flagged"] else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
