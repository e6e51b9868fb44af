"""A run directory's guards: one writer at a time, clean interrupts, no half-made runs.

``lock`` holds an exclusive ``fcntl`` lock on ``<workdir>/.lock`` for the
whole run; a second run into the same directory is refused naming the
holder. ``Interrupts`` turns SIGINT / SIGTERM into a flag the loop polls, so
the run saves a checkpoint and stops cleanly instead of dying mid-step.
``cleanup_if_new`` removes what a run created if it fails before its first
step, so a bad config or bad data leaves no half-made directory behind.
"""

import contextlib
import fcntl
import json
import os
import pathlib
import shutil
import signal
import socket
import time
from collections.abc import Iterator

LOCK_FILE = ".lock"


class WorkdirBusyError(RuntimeError):
  """Another run holds the run directory."""


@contextlib.contextmanager
def lock(workdir: pathlib.Path) -> Iterator[None]:
  """Holds ``<workdir>/.lock`` exclusively; raises WorkdirBusyError if taken."""
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / LOCK_FILE
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
      raise WorkdirBusyError(f"{str(workdir)!r} is in use by another run ({holder}); "
                             "wait for it to finish or use another --workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                              "since": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode(), 0)
    yield
  finally:
    os.close(fd)   # closing releases the lock


class Interrupts:
  """Records SIGINT / SIGTERM while active (``with Interrupts() as stop:``).

  ``stop.requested`` names the signal once one arrived; a second signal
  falls through to the default behaviour (so two Ctrl-C still kill).
  """

  def __init__(self):
    self.requested: str | None = None
    self._old = {}

  def _handle(self, signum, frame):
    del frame
    if self.requested is not None:   # the second one: give up cleanly saving
      signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
      os.kill(os.getpid(), signum)
      return
    self.requested = signal.Signals(signum).name

  def __enter__(self) -> "Interrupts":
    for sig in (signal.SIGINT, signal.SIGTERM):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:   # not the main thread: signals stay as they are
        pass
    return self

  def __exit__(self, *exc) -> None:
    for sig, old in self._old.items():
      signal.signal(sig, old)


def cleanup_if_new(workdir: pathlib.Path, existed_before: set[str]) -> None:
  """Removes what a failed run created in ``workdir`` (nothing that was there)."""
  for entry in workdir.iterdir():
    if entry.name in existed_before:
      continue
    if entry.is_dir():
      shutil.rmtree(entry, ignore_errors=True)
    else:
      entry.unlink(missing_ok=True)   # the lock too (unlinking an open file is fine)
  if not existed_before:
    with contextlib.suppress(OSError):
      workdir.rmdir()
