"""Pruning x int8 on ml-100k: export size and HR@10 / NDCG@10, as one table.

  python studies/compression/compress_study.py --data-path ../shared/data/ml-100k \\
      [--sasrec-run DIR] [--llm-run DIR] [--runs-dir runs/compress_study]

For a trained SASRec run and a trained LLM-recommender run (trained here
first, with configs/movielens_sasrec.py and configs/movielens_llm.py as they
are, if no run directory is given),
exports every combination of one-shot magnitude sparsity {0, 0.5, 0.8, 0.9}
(per layer, every kernel and embedding table) and {float32, int8}, evaluates
each export on the test users (full ranking, leave-last-out) and prints a
markdown table. Results go to RUNS_DIR/compress_study.{json,md}.

Every export carries its run's privacy.json unchanged: pruning and weight-only
int8 read the weights only (post-processing). The evaluation reads the test
users' data and is for the researcher, not for release.
"""

import argparse
import json
import logging
import pathlib
import sys
import time

from flax import nnx
import jax
import numpy as np

from privjax import config as config_lib
from privjax import export
from privjax.run import metrics as metrics_lib
from privjax.run import train as train_lib
from privjax.run import workload as workload_lib
from privjax.data import sequences

logging.getLogger("absl").setLevel(logging.ERROR)

REPO = pathlib.Path(__file__).resolve().parents[2]
SPARSITIES = (0.0, 0.5, 0.8, 0.9)


def run_config(name: str, data_path: str) -> config_lib.Config:
  """configs/movielens_<name>.py on the data at ``data_path``."""
  cfg = config_lib.load_file(REPO / "configs" / f"movielens_{name}.py")
  return config_lib.replace(cfg, **{"data.path": data_path, "train.eval_every": 0})


def ensure_run(name: str, run: str | None, cfg: config_lib.Config,
               runs_dir: pathlib.Path) -> pathlib.Path:
  if run is not None:
    return pathlib.Path(run)
  workdir = runs_dir / name
  if not (workdir / "privacy.json").exists():
    print(f"[{name}] training {cfg.name} in {workdir} ...", flush=True)
    train_lib.train_and_evaluate(cfg, workdir, show_progress=True)
  return workdir


def _groups(manifest) -> dict[str, int]:
  """Stored bytes by part of the model (LLM: encoder, head, title cache)."""
  out: dict[str, int] = {}
  for path, entry in manifest["tensors"].items():
    if path.startswith("encoder/"):
      key = "encoder"
    elif path.endswith("title_embeddings"):
      key = "title cache"
    elif path.startswith("head/"):
      key = "head"
    else:
      key = "model"
    out[key] = out.get(key, 0) + entry["bytes"]
  return out


def study(name: str, workdir: pathlib.Path, exports_dir: pathlib.Path,
          data_path: str, sparsities) -> list[dict]:
  rows = []
  # The grid, plus int8 with per-column embedding-table scales (smaller: see
  # privjax.compress.serialize.compress) at sparsity 0.
  variants = [(s, int8, "row") for s in sparsities for int8 in (False, True)]
  variants.append((0.0, True, "column"))
  for sparsity, int8, table_scales in variants:
    fmt = ("int8" + ("" if table_scales == "row" else " (column scales)")
           if int8 else "float32")
    tag = f"{name}-s{sparsity:g}-{'fp32' if not int8 else 'int8-' + table_scales}"
    t0 = time.time()
    manifest = export.export(workdir, exports_dir / tag, sparsity=sparsity,
                             int8=int8, table_scales=table_scales,
                             overwrite=True)
    metrics = export.evaluate(exports_dir / tag, which=("test",),
                              data_path=data_path)["test"]
    k = "hr@10", "ndcg@10"
    row = {"model": name, "sparsity": sparsity, "format": fmt,
           "bytes": manifest["sizes"]["model_safetensors_bytes"],
           "float32_bytes": manifest["sizes"]["float32_safetensors_bytes"],
           "total_bytes": manifest["sizes"]["total_bytes"],
           "zero_fraction": (manifest["pruning"] or {}).get("all_params", 0.0),
           "parts": _groups(manifest), "hr@10": metrics[k[0]],
           "ndcg@10": metrics[k[1]], "num_users": metrics["num_users"],
           "seconds": time.time() - t0}
    rows.append(row)
    print(f"[{name}] sparsity {sparsity:g} {row['format']}: {row['bytes']:,} B, "
          f"HR@10 {row['hr@10']:.4f}, NDCG@10 {row['ndcg@10']:.4f} "
          f"({row['seconds']:.0f} s)", flush=True)
  return rows


def _test_ranks(export_dir: pathlib.Path, data_path: str):
  """Per-user 0-based target ranks and top-10 lists (full ranking, test)."""
  model, meta = export.load(export_dir)
  cfg = config_lib.replace(meta["config"], **{"data.path": data_path})
  ds = workload_lib.load_dataset(cfg.data)
  es = sequences.eval_set(sequences.leave_last_out(ds), "test", cfg.data.max_len)
  inputs = export.eval_inputs(meta, es)
  graphdef, state = nnx.split(model)
  score = jax.jit(lambda state, chunk: export.predict(nnx.merge(graphdef, state), chunk, exclude=None))
  bs, ranks, top = cfg.eval.batch_size, [], []
  for start in range(0, len(es.target), bs):
    sl = slice(start, start + bs)
    chunk = {key: v[sl] for key, v in inputs.items()}
    n = len(es.target[sl])
    if n < bs:  # one static shape
      chunk = {key: np.concatenate([v, np.repeat(v[:1], bs - n, 0)])
               for key, v in chunk.items()}
    scores = np.array(score(state, chunk))[:n]
    ranks.append(np.asarray(metrics_lib.ranks(scores, es.target[sl], es.exclude[sl])))
    rows = np.arange(n)[:, None]
    seen = es.exclude[sl]
    scores[np.broadcast_to(rows, seen.shape)[seen >= 0], seen[seen >= 0]] = -np.inf
    top.append(np.argsort(-scores, axis=1)[:, :10])
  return np.concatenate(ranks), np.concatenate(top)


def agreement(float_dir, int8_dir, data_path: str) -> dict:
  """How int8 changes the test ranking of each user (vs float32, sparsity 0)."""
  rank_f, top_f = _test_ranks(float_dir, data_path)
  rank_q, top_q = _test_ranks(int8_dir, data_path)
  hit_f, hit_q = rank_f < 10, rank_q < 10
  overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top_f, top_q)])
  return {"users": int(len(rank_f)), "hits_float32": int(hit_f.sum()),
          "hits_int8": int(hit_q.sum()), "gained": int(np.sum(hit_q & ~hit_f)),
          "lost": int(np.sum(hit_f & ~hit_q)),
          "same_rank": float(np.mean(rank_f == rank_q)),
          "median_abs_rank_change": float(np.median(np.abs(rank_f - rank_q))),
          "top10_overlap": float(overlap)}


def table(rows: list[dict]) -> str:
  lines = ["| model | sparsity | weights | model.safetensors | vs float32 | HR@10 | "
           "NDCG@10 | HR@10 vs float32, sparsity 0 |",
           "|---|---|---|---:|---:|---:|---:|---:|"]
  base = {(r["model"]): r for r in rows if r["sparsity"] == 0 and r["format"] == "float32"}
  for r in rows:
    b = base[r["model"]]
    rel = (r["hr@10"] - b["hr@10"]) / b["hr@10"] if b["hr@10"] else float("nan")
    lines.append(
        f"| {r['model']} | {r['sparsity']:g} | {r['format']} | "
        f"{r['bytes'] / 1e6:.3f} MB | {r['bytes'] / b['bytes']:.1%} | "
        f"{r['hr@10']:.4f} | {r['ndcg@10']:.4f} | {rel:+.1%} |")
  return "\n".join(lines)


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data-path", default="../shared/data/ml-100k",
                      help="the ml-100k folder (u.data, u.item)")
  parser.add_argument("--sasrec-run", default=None, help="a trained SASRec run")
  parser.add_argument("--llm-run", default=None, help="a trained LLM-recommender run")
  parser.add_argument("--runs-dir", default="runs/compress_study")
  parser.add_argument("--models", default="sasrec,llm")
  parser.add_argument("--sparsities", default=",".join(f"{s:g}" for s in SPARSITIES))
  args = parser.parse_args(argv)
  data_path = str(pathlib.Path(args.data_path).resolve())
  if not (pathlib.Path(data_path) / "u.data").exists():
    print(f"error: no ml-100k at {data_path} (--data-path)", file=sys.stderr)
    return 2
  runs_dir = pathlib.Path(args.runs_dir)
  sparsities = [float(s) for s in args.sparsities.split(",")]
  given = {"sasrec": args.sasrec_run, "llm": args.llm_run}
  rows, agree = [], {}
  for name in args.models.split(","):
    workdir = ensure_run(name, given[name], run_config(name, data_path), runs_dir)
    rows += study(name, workdir, runs_dir / "exports", data_path, sparsities)
    if 0.0 in sparsities:
      agree[name] = agreement(runs_dir / "exports" / f"{name}-s0-fp32",
                              runs_dir / "exports" / f"{name}-s0-int8-row", data_path)
      print(f"[{name}] int8 vs float32 (sparsity 0), test users: {agree[name]}",
            flush=True)
    statement = json.loads((workdir / "privacy.json").read_text())
    print(f"[{name}] privacy carried by every export: epsilon="
          f"{statement.get('epsilon')}, delta={statement.get('delta')}, "
          f"unit={statement.get('unit')}", flush=True)
  md = table(rows)
  print()
  print(md)
  for name, a in agree.items():
    print(f"\n{name}: int8 vs float32 at sparsity 0 on {a['users']} test users: "
          f"hits {a['hits_float32']} -> {a['hits_int8']} ({a['gained']} gained, "
          f"{a['lost']} lost); target rank unchanged for {a['same_rank']:.1%} "
          f"(median change {a['median_abs_rank_change']:g}); "
          f"top-10 lists overlap {a['top10_overlap']:.1%}")
  (runs_dir / "compress_study.json").write_text(
      json.dumps({"rows": rows, "int8_agreement": agree}, indent=2))
  (runs_dir / "compress_study.md").write_text(md + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
