"""MovieLens users -> a k-anonymous user table (CSV) and its report.

  python scripts/anonymize.py --data ../shared/data/ml-100k --k 5 \\
      --out users_k5.csv --report users_k5.json
  PRIVJAX_PSEUDONYM_KEY="$(cat key)" python scripts/anonymize.py \\
      --data ../shared/data/ml-100k --k 5 --l 3 --sensitive occupation --out users.csv
  python scripts/anonymize.py --data ../shared/data/ml-100k --k 2,5,10 \\
      --out /tmp/users_k{k}.csv        # one table per k, then a markdown summary

Guarantee: syntactic k-anonymity (and distinct l-diversity with ``--l``) of
the released demographics, by Mondrian partitioning; NOT differential privacy.
The ratings still link users (Narayanan & Shmatikov 2008); see
privjax/data/anonymize.py. User ids are replaced by keyed HMAC-SHA256 pseudonyms
when a key is given (``--key-file`` or ``$PRIVJAX_PSEUDONYM_KEY``), and dropped
otherwise. The key is never written anywhere. Rows are written sorted by their
released values, not in user-id order, so that row positions do not re-link
them to the ids.
"""

import argparse
import csv
import json
import os
import pathlib
import sys

try:
  import privjax  # noqa: F401
except ImportError:
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import numpy as np

from privjax.data import anonymize
from privjax.data import movielens


def _ks(text: str) -> list[int]:
  try:
    ks = [int(part) for part in text.split(",")]
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"--k={text!r} must be an int or a comma-separated list of ints") from None
  for k in ks:
    if k < 1:
      raise argparse.ArgumentTypeError(f"--k={k} must be >= 1")
  return ks


def _parse(argv):
  parser = argparse.ArgumentParser(
      description="k-anonymize the MovieLens user table (Mondrian; NOT "
      "differential privacy).")
  parser.add_argument("--data", required=True,
                      help="MovieLens folder with a user table (ml-100k)")
  parser.add_argument("--k", type=_ks, required=True,
                      help="k >= 1, or a list such as 2,5,10")
  parser.add_argument("--l", type=int, default=None,
                      help="distinct l-diversity of --sensitive")
  parser.add_argument("--sensitive", default=None,
                      help="sensitive column (released exactly, then not a "
                      "quasi-identifier), e.g. occupation")
  parser.add_argument("--key-file", default=None,
                      help=f"pseudonym key file (else ${anonymize.KEY_ENV_VAR}; "
                      "with neither, ids are dropped)")
  parser.add_argument("--out", required=True,
                      help="output CSV; must contain {k} when --k lists several")
  parser.add_argument("--report", default=None,
                      help="report JSON; must contain {k} when --k lists several")
  args = parser.parse_args(argv)
  if args.l is not None and args.l < 1:
    parser.error(f"--l={args.l} must be >= 1")
  if args.l is not None and args.sensitive is None:
    parser.error(f"--l={args.l} needs --sensitive (e.g. --sensitive occupation)")
  if len(args.k) > 1:
    for flag, value in (("--out", args.out), ("--report", args.report)):
      if value is not None and "{k}" not in value:
        parser.error(f"{flag}={value!r} must contain {{k}} when --k lists "
                     f"several values ({args.k})")
  return parser, args


def user_table(ds) -> dict[str, np.ndarray]:
  """The dataset's demographics plus an ``id`` column (the raw user ids)."""
  if ds.users is None:
    raise ValueError(f"dataset {ds.name!r} has no user table (ml-latest has "
                     "none; use ml-100k)")
  return {"id": np.asarray(ds.raw_user_ids), **ds.users}


def quasi_identifiers(sensitive: str | None):
  """The MovieLens quasi-identifiers, minus the sensitive column if it is one."""
  return tuple(qi for qi in anonymize.MOVIELENS_QUASI_IDENTIFIERS
               if qi.name != sensitive)


def sorted_rows(table: dict[str, np.ndarray], first: list[str]) -> dict[str, np.ndarray]:
  """``table`` with its rows sorted by the ``first`` columns, then all others.

  k_anonymize keeps the input (user-id) order; written as is, row i would
  still point at the i-th kept user id. Sorted by the released
  quasi-identifiers first, each class is a run of rows.
  """
  columns = list(table)
  if not columns or len(table[columns[0]]) == 0:
    return dict(table)
  keys = list(first) + [c for c in columns if c not in first]
  order = np.lexsort([np.asarray(table[c]).astype(str) for c in reversed(keys)])
  return {c: np.asarray(table[c])[order] for c in columns}


def class_size_counts(table, names) -> dict[int, int]:
  """{class size: number of classes of that size} over the released ``names``."""
  _, sizes = anonymize.equivalence_classes(table, names)
  values, counts = np.unique(sizes, return_counts=True)
  return {int(v): int(c) for v, c in zip(values, counts)}


def report_dict(report: anonymize.AnonymizationReport, *, dataset: str,
                sensitive: str | None, names, pseudonymized: bool,
                size_counts: dict[int, int]) -> dict:
  """The report as JSON-ready values, with what was done and what it is not."""
  out = {"dataset": dataset,
         "guarantee": ("k-anonymity of the released quasi-identifiers (Mondrian)"
                       + (", distinct l-diversity" if report.l else "")
                       + "; NOT differential privacy"),
         "quasi_identifiers": list(names), "sensitive": sensitive,
         "ids": "HMAC-SHA256 pseudonyms" if pseudonymized else "dropped"}
  for field, value in vars(report).items():
    out[field] = dict(value) if hasattr(value, "items") else value
  out["class_size_counts"] = {str(s): c for s, c in size_counts.items()}
  return out


def format_report(r: dict) -> str:
  ncp = ", ".join(f"{name} {v:.3f}" for name, v in r["ncp_by_attribute"].items())
  reasons = ", ".join(f"{why}: {n}" for why, n in r["suppressed_by_reason"].items())
  sizes = " ".join(f"{s}x{c}" for s, c in r["class_size_counts"].items())
  lines = [
      f"{r['dataset']}: k={r['k']}" + (f", l={r['l']} on {r['sensitive']!r}"
                                       if r["l"] else "")
      + f" over {', '.join(r['quasi_identifiers'])}",
      f"  records {r['num_records']}, released {r['num_kept']}, suppressed "
      f"{r['num_suppressed']}" + (f" ({reasons})" if reasons else ""),
      f"  classes {r['num_classes']}, size min {r['min_class_size']} / mean "
      f"{r['mean_class_size']:.2f} / max {r['max_class_size']}",
      f"  class sizes (size x classes): {sizes}",
      f"  information loss: NCP {r['ncp']:.3f} ({ncp}); discernibility "
      f"{r['discernibility']}; normalized avg class size "
      f"{r['normalized_avg_class_size']:.2f}",
      f"  ids: {r['ids']}",
  ]
  return "\n".join(lines)


def write_csv(path: pathlib.Path, table: dict[str, np.ndarray]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(list(table))
    for row in zip(*(np.asarray(c).astype(str).tolist() for c in table.values())):
      writer.writerow(row)


def markdown_table(reports: list[dict]) -> str:
  lines = ["| k | classes | class size min / mean / max | suppressed | NCP "
           "| NCP age / zip / gender / occupation | discernibility |",
           "|---:|---:|---|---:|---:|---|---:|"]
  for r in reports:
    by = r["ncp_by_attribute"]
    per = " / ".join(f"{by[n]:.3f}" if n in by else "-"
                     for n in ("age", "zip", "gender", "occupation"))
    lines.append(
        f"| {r['k']} | {r['num_classes']} | {r['min_class_size']} / "
        f"{r['mean_class_size']:.2f} / {r['max_class_size']} | "
        f"{r['num_suppressed']} of {r['num_records']} | {r['ncp']:.3f} | {per} | "
        f"{r['discernibility']} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  parser, args = _parse(argv)
  try:
    if args.key_file is not None:
      key = anonymize.load_key(args.key_file)
    elif os.environ.get(anonymize.KEY_ENV_VAR):
      key = anonymize.load_key()
    else:
      key = None
    ds = movielens.load(args.data)
    table = user_table(ds)
  except (OSError, ValueError) as e:
    parser.error(str(e))
  if key is None:
    print(f"note: no pseudonym key (--key-file or ${anonymize.KEY_ENV_VAR}): "
          "user ids are dropped, so released rows cannot be joined back to "
          "ratings", file=sys.stderr)
  qis = quasi_identifiers(args.sensitive)
  names = [qi.name for qi in qis]
  reports = []
  for k in args.k:
    try:
      out, report = anonymize.k_anonymize(
          table, k=k, quasi_identifiers=qis, sensitive=args.sensitive, l=args.l,
          pseudonym_key=key)
    except ValueError as e:
      parser.error(str(e))
    out = sorted_rows(out, names)
    r = report_dict(report, dataset=ds.name, sensitive=args.sensitive,
                    names=names, pseudonymized=key is not None,
                    size_counts=class_size_counts(out, names))
    reports.append(r)
    print(format_report(r))
    out_path = pathlib.Path(args.out.replace("{k}", str(k)))
    write_csv(out_path, out)
    print(f"  wrote {out_path}")
    if args.report is not None:
      report_path = pathlib.Path(args.report.replace("{k}", str(k)))
      report_path.parent.mkdir(parents=True, exist_ok=True)
      report_path.write_text(json.dumps(r, indent=2) + "\n")
      print(f"  wrote {report_path}")
  print()
  print(markdown_table(reports))


if __name__ == "__main__":
  main()
