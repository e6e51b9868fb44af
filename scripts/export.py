"""Export a trained run for serving: optional pruning and int8, with its privacy statement.

  python scripts/export.py --workdir DIR --out OUT [--sparsity S | --n-m 2:4] [--int8]

Writes OUT/model.safetensors, config.json, items.json, the tokenizer (LLM
recommender), the run's privacy.json byte for byte, and manifest.json (what
was pruned and quantized, per-layer sparsity, sizes). Load it with
``privjax.export.load(OUT)``; evaluate it with ``scripts/evaluate.py --workdir OUT``.

Pruning (magnitude, one shot) and int8 (weight-only, per channel) read the
trained weights only, never data: post-processing, no privacy cost. The
export's guarantee is the run's.
"""

import argparse
import json
import pathlib
import sys

from privjax import cli
from privjax import export


def _n_m(text: str) -> tuple[int, int]:
  try:
    n, m = (int(v) for v in text.split(":"))
  except ValueError:
    raise argparse.ArgumentTypeError(f"--n-m={text!r} must look like 2:4") from None
  return n, m


def privacy_line(statement: dict) -> str:
  """One line stating the guarantee carried by the export."""
  if not statement.get("private", True) or statement.get("epsilon") == "inf":
    return "privacy: NONE - the run is not differentially private (privacy.json says so)"
  eps, delta = statement.get("epsilon"), statement.get("delta")
  eps_s = f"{eps:.3f}" if isinstance(eps, (int, float)) else str(eps)
  delta_s = f"{delta:.2e}" if isinstance(delta, (int, float)) else str(delta)
  return (f"privacy: ({eps_s}, {delta_s})-DP at the level of one "
          f"{statement.get('unit')} ({statement.get('accountant', '?')} accountant, "
          f"{statement.get('steps')} steps); carried unchanged in privacy.json")


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="a finished run directory")
  parser.add_argument("--out", required=True, help="the export directory to write")
  group = parser.add_mutually_exclusive_group()
  group.add_argument("--sparsity", type=float, default=0.0,
                     help="one-shot magnitude pruning: fraction of each weight "
                          "matrix (kernels and embedding tables) set to zero")
  group.add_argument("--n-m", type=_n_m, default=None,
                     help="structured N:M pruning instead, e.g. 2:4")
  parser.add_argument("--scope", choices=("per_layer", "global"), default="per_layer")
  parser.add_argument("--pattern", action="append", default=None,
                      help="glob of parameter paths to prune (repeatable; "
                           f"default {' '.join(export.DEFAULT_PRUNE_PATTERN)})")
  parser.add_argument("--int8", action="store_true",
                      help="int8 weights with per-channel float32 scales")
  parser.add_argument("--table-scales", choices=("row", "column"), default="row",
                      help="int8 scales of embedding tables: one per row (item, "
                           "default) or per column (dimension; smaller file)")
  parser.add_argument("--overwrite", action="store_true")
  args = parser.parse_args(argv)
  manifest = export.export(
      args.workdir, args.out, sparsity=args.sparsity, n_m=args.n_m,
      int8=args.int8, pattern=tuple(args.pattern or export.DEFAULT_PRUNE_PATTERN),
      scope=args.scope, table_scales=args.table_scales, overwrite=args.overwrite)
  sizes = manifest["sizes"]
  print(f"exported {manifest['source']['model_family']} (checkpoint step "
        f"{manifest['source']['checkpoint_step']}) to {args.out}")
  if manifest["pruning"]:
    p = manifest["pruning"]
    what = (f"{p['sparsity']:.0%} ({p['scope']})" if p["sparsity"]
            else f"{p['n_m'][0]}:{p['n_m'][1]}")
    print(f"pruned: {what} of {len(p['per_layer'])} weight matrices; "
          f"{p['all_params']:.1%} of all parameters are zero")
  if manifest["quantization"]:
    print(f"int8: {len(manifest['quantization']['channel_axis'])} matrices, "
          "per-channel float32 scales, weight-only")
  print(f"size: float32 safetensors {sizes['float32_safetensors_bytes']:,} B -> "
        f"model.safetensors {sizes['model_safetensors_bytes']:,} B "
        f"({sizes['ratio']:.1%}); whole export {sizes['total_bytes']:,} B")
  statement = json.loads((pathlib.Path(args.out) / export.PRIVACY_FILE).read_text())
  print(privacy_line(statement))
  print("pruning and weight-only int8 are post-processing of the trained "
        "parameters (no data read): the guarantee above holds for the export.")
  return 0


if __name__ == "__main__":
  sys.exit(cli.run(main, sys.argv[1:]))
