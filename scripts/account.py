"""DP-SGD accounting from the command line: epsilon, or sigma for a target.

  python scripts/account.py --sampling-prob 0.0042667 --noise-multiplier 1.1 \\
      --steps 14063 --delta 1e-5                      # prints epsilon=...
  python scripts/account.py --sampling-prob 0.0042667 --target-epsilon 3 \\
      --steps 14063 --delta 1e-5 --accountant pld     # prints noise_multiplier=...

Truncated Poisson sampling (``--dataset-size N --truncated-batch-size B``)
needs ``--accountant pld``. See privjax/dp/accounting.py for the guarantee.
"""

import argparse
import sys

from privjax import cli
from privjax.dp import accounting
from privjax.dp import calibration


def _parse(argv: list[str] | None
           ) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
  parser = argparse.ArgumentParser(
      description="Epsilon of DP-SGD, or the noise multiplier for a target "
      "epsilon (Poisson sampling, add/remove-one neighbours).")
  parser.add_argument("--sampling-prob", type=float, required=True,
                      help="Poisson sampling probability q in (0, 1]")
  parser.add_argument("--steps", type=int, required=True, help="steps T >= 0")
  parser.add_argument("--delta", type=float, required=True, help="delta in (0, 1)")
  parser.add_argument("--accountant", choices=accounting.ACCOUNTANTS,
                      default="rdp")
  parser.add_argument("--dataset-size", type=int, default=None)
  parser.add_argument("--truncated-batch-size", type=int, default=None)
  what = parser.add_mutually_exclusive_group(required=True)
  what.add_argument("--noise-multiplier", type=float,
                    help="sigma: print epsilon=<value>")
  what.add_argument("--target-epsilon", type=float,
                    help="print noise_multiplier=<value> reaching it")
  return parser, parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
  parser, args = _parse(argv)
  common = dict(sampling_prob=args.sampling_prob, steps=args.steps,
                delta=args.delta, accountant=args.accountant,
                dataset_size=args.dataset_size,
                truncated_batch_size=args.truncated_batch_size)
  try:
    if args.noise_multiplier is not None:
      eps = accounting.dpsgd_epsilon(noise_multiplier=args.noise_multiplier,
                                     **common)
      print(f"epsilon={eps!r}")
      if eps == float("inf"):
        print("not private: noise_multiplier=0 gives no (epsilon, delta) "
              "guarantee", file=sys.stderr)
    else:
      sigma = calibration.calibrate_noise_multiplier(
          target_epsilon=args.target_epsilon, **common)
      print(f"noise_multiplier={sigma!r}")
  except ValueError as e:
    parser.error(str(e))


if __name__ == "__main__":
  sys.exit(cli.run(main, sys.argv[1:]))
