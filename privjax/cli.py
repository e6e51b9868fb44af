"""What every script shares: config arguments, and expected errors as one line.

``run(main, argv)`` calls ``main(argv)`` and turns the library's expected
errors (a bad config or data row, an unreachable epsilon, an exhausted
budget, a corrupt file, a busy run directory) into ``error: ...`` on stderr
and exit code 2; ``--debug`` shows the traceback instead. Ctrl-C exits 130.
"""

import argparse
import logging
import os
import pathlib
import sys
from collections.abc import Callable

from privjax import config as config_lib
from privjax.answers import budget as budget_lib
from privjax.run import checkpoint
from privjax.run import workdir as workdir_lib

# Expected: the user can fix them; a traceback would hide the message.
EXPECTED = (ValueError, OSError, budget_lib.BudgetExceededError,
            workdir_lib.WorkdirBusyError, checkpoint.CorruptCheckpointError)


def run(main: Callable[[list[str]], int | None], argv: list[str]) -> int:
  """Runs a script's ``main``; returns its exit code."""
  logging.getLogger("absl").setLevel(logging.ERROR)   # dp_accounting chatter
  debug = "--debug" in argv
  argv = [a for a in argv if a != "--debug"]
  try:
    return int(main(argv) or 0)
  except EXPECTED as e:
    if debug:
      raise
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    if debug:
      raise
    print("interrupted", file=sys.stderr)
    return 130


def add_config_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--config", required=True, help="Python config file")
  parser.add_argument("--workdir", default=None,
                      help="run directory (default: runs/<config name>)")
  parser.add_argument("--debug", action="store_true",
                      help="show tracebacks instead of one-line errors")


def config_from_args(parser: argparse.ArgumentParser, argv: list[str]
                     ) -> tuple[argparse.Namespace, config_lib.Config, pathlib.Path]:
  """Parses ``--config FILE`` and ``--config.a.b=V`` overrides (validated once)."""
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
  try:
    config_lib.validate(cfg)
  except ValueError as e:
    parser.error(str(e))
  return args, cfg, pathlib.Path(args.workdir or os.path.join("runs", cfg.name))
