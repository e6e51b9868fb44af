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
privjax/data/anonymize.py. User ids are replaced by keyed HMAC-SHA256
pseudonyms when a key is given (``--key-file`` or ``$PRIVJAX_PSEUDONYM_KEY``),
and dropped otherwise. The key is never written anywhere. Rows are written
sorted by their released values, not in user-id order, so that row positions
do not re-link them to the ids. The work is
``privjax.data.user_release.write_releases``.
"""

import argparse
import sys

from privjax import cli
from privjax.data import deidentify
from privjax.data import movielens
from privjax.data import user_release


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
                      help=f"pseudonym key file (else ${deidentify.KEY_ENV_VAR}; "
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


def main(argv: list[str] | None = None) -> None:
  parser, args = _parse(argv)
  try:
    key = user_release.pseudonym_key(args.key_file)
    ds = movielens.load(args.data)
    table = user_release.user_table(ds)
  except (OSError, ValueError) as e:
    parser.error(str(e))
  if key is None:
    print(f"note: no pseudonym key (--key-file or ${deidentify.KEY_ENV_VAR}): "
          "user ids are dropped, so released rows cannot be joined back to "
          "ratings", file=sys.stderr)
  try:
    reports = user_release.write_releases(
        table, dataset=ds.name, ks=args.k, out=args.out, report=args.report,
        sensitive=args.sensitive, l=args.l, key=key)
  except ValueError as e:
    parser.error(str(e))
  print()
  print(user_release.markdown_table(reports))


if __name__ == "__main__":
  sys.exit(cli.run(main, sys.argv[1:]))
