"""k-anonymous releases of a MovieLens user table as files: CSV, report JSON, summary.

What ``scripts/anonymize.py`` runs. Syntactic k-anonymity only, NOT
differential privacy: see ``privjax.data.anonymize``.
"""

import csv
import json
import os
import pathlib
from collections.abc import Callable, Sequence

import numpy as np

from privjax.data import anonymize
from privjax.data import dataset as dataset_lib
from privjax.data import deidentify


def pseudonym_key(key_file: str | os.PathLike | None = None,
                  env_var: str = deidentify.KEY_ENV_VAR
                  ) -> deidentify.PseudonymKey | None:
  """The key from ``key_file``, else from a non-empty ``$env_var``, else ``None``.

  >>> os.environ.pop("DOCTEST_NO_KEY", None) is None
  True
  >>> pseudonym_key(env_var="DOCTEST_NO_KEY") is None
  True
  """
  if key_file is not None:
    return deidentify.load_key(key_file)
  if os.environ.get(env_var):
    return deidentify.load_key(env_var=env_var)
  return None


def user_table(ds: dataset_lib.RecDataset) -> dict[str, np.ndarray]:
  """The dataset's demographics plus an ``id`` column (the raw user ids)."""
  if ds.users is None:
    raise ValueError(f"dataset {ds.name!r} has no user table (ml-latest has "
                     "none; use ml-100k)")
  return {"id": np.asarray(ds.raw_user_ids), **ds.users}


def quasi_identifiers(sensitive: str | None
                      ) -> tuple[anonymize.QuasiIdentifier, ...]:
  """The MovieLens quasi-identifiers, minus the sensitive column if it is one.

  >>> [qi.name for qi in quasi_identifiers("occupation")]
  ['age', 'zip', 'gender']
  """
  return tuple(qi for qi in anonymize.MOVIELENS_QUASI_IDENTIFIERS
               if qi.name != sensitive)


def sorted_rows(table: dict[str, np.ndarray], first: Sequence[str]
                ) -> dict[str, np.ndarray]:
  """``table`` with its rows sorted by the ``first`` columns, then all others.

  k_anonymize keeps the input (user-id) order; written as is, row i would
  still point at the i-th kept user id. Sorted by the released
  quasi-identifiers first, each class is a run of rows.

  >>> sorted_rows({"a": np.array(["y", "x"]), "b": np.array([1, 2])}, ["a"])["b"]
  array([2, 1])
  """
  columns = list(table)
  if not columns or len(table[columns[0]]) == 0:
    return dict(table)
  keys = list(first) + [c for c in columns if c not in first]
  order = np.lexsort([np.asarray(table[c]).astype(str) for c in reversed(keys)])
  return {c: np.asarray(table[c])[order] for c in columns}


def class_size_counts(table: dict[str, np.ndarray], names: Sequence[str]
                      ) -> dict[int, int]:
  """{class size: number of classes of that size} over the released ``names``.

  >>> class_size_counts({"a": np.array(["x", "y", "x", "z"])}, ["a"])
  {1: 2, 2: 1}
  """
  _, sizes = deidentify.equivalence_classes(table, names)
  values, counts = np.unique(sizes, return_counts=True)
  return {int(v): int(c) for v, c in zip(values, counts)}


def report_dict(report: anonymize.AnonymizationReport, *, dataset: str,
                sensitive: str | None, names: Sequence[str], pseudonymized: bool,
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
  """A ``report_dict`` as a few indented lines of text."""
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
  """Writes ``table`` as UTF-8 CSV with a header row (parent folders created)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(list(table))
    for row in zip(*(np.asarray(c).astype(str).tolist() for c in table.values())):
      writer.writerow(row)


def markdown_table(reports: Sequence[dict]) -> str:
  """One markdown row per ``report_dict``: classes, suppression, information loss."""
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


def write_releases(table: dict[str, np.ndarray], *, dataset: str,
                   ks: Sequence[int], out: str, report: str | None = None,
                   sensitive: str | None = None, l: int | None = None,
                   key: deidentify.PseudonymKey | None = None,
                   echo: Callable[[str], None] = print) -> list[dict]:
  """One k-anonymous table (CSV) and report (JSON) of ``table`` per k in ``ks``.

  Guarantee (syntactic, NOT differential privacy): each CSV is
  ``anonymize.k_anonymize`` of ``table`` over the MovieLens quasi-identifiers
  (minus ``sensitive``): every combination of released values is shared by at
  least k rows, and with ``l`` those rows hold at least ``l`` distinct
  ``sensitive`` values. Ids are replaced by ``key``'s pseudonyms, or dropped
  without a key; the key is written nowhere. Rows are sorted by their released
  values, not in id order, so that row positions do not re-link them to ids.

  Args:
    table: ``user_table`` of a dataset.
    dataset: its name, for the reports.
    ks: the k of each release.
    out: the CSV path; ``{k}`` in it is replaced by k.
    report: the report JSON path (``{k}`` likewise), or ``None`` for none.
    sensitive: the sensitive column (released exactly, not a quasi-identifier).
    l: distinct l-diversity of ``sensitive``.
    key: the pseudonym key, or ``None`` to drop the ids.
    echo: receives each report (``format_report``) and each written path.

  Returns:
    The ``report_dict`` of each release, in the order of ``ks``.
  """
  qis = quasi_identifiers(sensitive)
  names = [qi.name for qi in qis]
  reports = []
  for k in ks:
    released, result = anonymize.k_anonymize(
        table, k=k, quasi_identifiers=qis, sensitive=sensitive, l=l,
        pseudonym_key=key)
    released = sorted_rows(released, names)
    r = report_dict(result, dataset=dataset, sensitive=sensitive, names=names,
                    pseudonymized=key is not None,
                    size_counts=class_size_counts(released, names))
    reports.append(r)
    echo(format_report(r))
    out_path = pathlib.Path(out.replace("{k}", str(k)))
    write_csv(out_path, released)
    echo(f"  wrote {out_path}")
    if report is not None:
      report_path = pathlib.Path(report.replace("{k}", str(k)))
      report_path.parent.mkdir(parents=True, exist_ok=True)
      report_path.write_text(json.dumps(r, indent=2) + "\n")
      echo(f"  wrote {report_path}")
  return reports
