"""Train (and evaluate) one run from a Python config file.

  python scripts/train.py --config configs/quickstart.py [--config.a.b=V ...] [--workdir DIR]

Running again with the same --workdir resumes exactly where the run stopped;
the privacy spent is carried over, never reset.
"""

import argparse
import logging
import os
import pathlib
import sys
import time

try:
  import privjax  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from privjax import config as config_lib
from privjax.run import report
from privjax.run import train as train_lib

logging.getLogger("absl").setLevel(logging.ERROR)  # dp_accounting convergence chatter


def parse_args(argv: list[str]) -> tuple[config_lib.Config, pathlib.Path, bool]:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="Python config file")
  parser.add_argument("--workdir", default=None,
                      help="run directory (default: runs/<config name>)")
  parser.add_argument("--no-progress", action="store_true")
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
  workdir = pathlib.Path(args.workdir or os.path.join("runs", cfg.name))
  return cfg, workdir, not args.no_progress


def main(argv: list[str]) -> int:
  cfg, workdir, progress = parse_args(argv)
  try:
    config_lib.validate(cfg)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  t0 = time.time()
  rows = train_lib.run_with_baselines(cfg, workdir, show_progress=progress)
  main_run = rows["dp"]
  print()
  print(report.summary_table(cfg, rows))
  print()
  print(report.privacy_line(main_run["plan"], main_run, workdir))
  print(f"stopped: {main_run['stop_reason']}; wall time {time.time() - t0:.1f} s; "
        f"run directory {workdir}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
