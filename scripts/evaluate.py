"""Recompute a run's validation and test metrics from its latest checkpoint.

  python scripts/evaluate.py --workdir DIR [--json]

Full-ranking HR@k / NDCG@k over all items each user has not seen (leave-last-
out), exactly as at the end of training. Evaluation touches private data but
releases only the metrics; the run's privacy.json covers the trained model,
not these numbers (they are for the researcher).
"""

import argparse
import json
import logging
import pathlib
import sys

try:
  import privjax  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from privjax import trainer

logging.getLogger("absl").setLevel(logging.ERROR)


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="a run directory")
  parser.add_argument("--json", action="store_true", help="print JSON only")
  args = parser.parse_args(argv)
  try:
    result = trainer.evaluate_workdir(args.workdir)
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps(result))
    return 0
  privacy = pathlib.Path(args.workdir) / "privacy.json"
  if privacy.exists():
    p = json.loads(privacy.read_text())
    print(f"privacy: epsilon={p.get('epsilon')} delta={p.get('delta')} "
          f"unit={p.get('unit')}")
  print(f"checkpoint step {result['step']}")
  for which in ("valid", "test"):
    print(which + ": " + ", ".join(
        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
        for k, v in result[which].items()))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
