"""Train (and evaluate) one run from a Python config file.

  python scripts/train.py --config configs/quickstart.py [--config.a.b=V ...] [--workdir DIR]

Running again with the same --workdir resumes exactly where the run stopped;
the privacy spent is carried over, never reset. Ctrl-C (or SIGTERM) saves a
checkpoint and stops cleanly. Errors are one line; --debug shows tracebacks.
"""

import argparse
import sys
import time

from privjax import cli
from privjax.run import report
from privjax.run import train as train_lib


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  cli.add_config_args(parser)
  parser.add_argument("--no-progress", action="store_true")
  args, cfg, workdir = cli.config_from_args(parser, argv)
  t0 = time.time()
  rows = train_lib.run_with_baselines(cfg, workdir, show_progress=not args.no_progress)
  main_run = rows["dp"]
  if main_run.get("interrupted"):
    return 130
  print()
  print(report.summary_table(cfg, rows))
  print()
  print(report.privacy_line(main_run["plan"], main_run, workdir))
  print(f"stopped: {main_run['stop_reason']}; wall time {time.time() - t0:.1f} s; "
        f"run directory {workdir}")
  return 0


if __name__ == "__main__":
  sys.exit(cli.run(main, sys.argv[1:]))
