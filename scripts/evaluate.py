"""Recompute validation and test metrics of a run (latest checkpoint) or an export.

  python scripts/evaluate.py --workdir DIR [--json] [--data-path PATH]

DIR is a run directory, or an export directory written by scripts/export.py
(recognised by its manifest.json; it is loaded with privjax.export.load,
so pruned and int8 exports are scored exactly as they will be served). The
data comes from the config's data.path (for an export, --data-path overrides
it).

Full-ranking HR@k / NDCG@k over all items each user has not seen (leave-last-
out), exactly as at the end of training. Evaluation touches private data but
releases only the metrics; the run's privacy.json covers the trained model,
not these numbers (they are for the researcher).
"""

import argparse
import json
import pathlib
import sys

from privjax import cli
from privjax import export
from privjax.run import evaluate as evaluate_lib


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True,
                      help="a run directory or an export directory")
  parser.add_argument("--data-path", default=None,
                      help="read the data from here instead of config.data.path")
  parser.add_argument("--json", action="store_true", help="print JSON only")
  args = parser.parse_args(argv)
  is_export = export.is_export_dir(args.workdir)
  if is_export:
    result = export.evaluate(args.workdir, data_path=args.data_path)
  else:
    if args.data_path is not None:
      parser.error("--data-path applies to export directories only")
    result = evaluate_lib.evaluate_workdir(args.workdir)
  if args.json:
    print(json.dumps(result))
    return 0
  privacy = pathlib.Path(args.workdir) / "privacy.json"
  if privacy.exists():
    p = json.loads(privacy.read_text())
    print(f"privacy: epsilon={p.get('epsilon')} delta={p.get('delta')} "
          f"unit={p.get('unit')}")
  if is_export:
    manifest = json.loads((pathlib.Path(args.workdir) / export.MANIFEST_FILE).read_text())
    print(f"export of checkpoint step {result['step']}: pruning="
          f"{'none' if not manifest['pruning'] else manifest['pruning']['total']}, "
          f"int8={'yes' if manifest['quantization'] else 'no'}, "
          f"{manifest['sizes']['model_safetensors_bytes']:,} B")
  else:
    print(f"checkpoint step {result['step']}")
  for which in ("valid", "test"):
    print(which + ": " + ", ".join(
        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
        for k, v in result[which].items()))
  return 0


if __name__ == "__main__":
  sys.exit(cli.run(main, sys.argv[1:]))
