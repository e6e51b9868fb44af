"""Orbax checkpoints of a run: arrays (step, params, optimizer state) + JSON meta.

The meta holds what makes a resume exact and honest: the steps taken, the
privacy spent so far, and the fingerprint of the run secret (never the secret
or a seed of the noise: checkpoints are released). A resumed run continues
the same noise-key and sampling streams, derived from the same secret, and
adds to, never resets, the privacy spent.
"""

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


class CorruptCheckpointError(RuntimeError):
  """No checkpoint of a run directory can be read back."""


class Checkpointer:
  """Saves and restores ``(arrays pytree, meta dict)`` under ``workdir/checkpoints``."""

  def __init__(self, workdir: str | pathlib.Path, *, max_to_keep: int = 2):
    self.directory = pathlib.Path(workdir).resolve() / "checkpoints"
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, arrays: Any, meta: dict[str, Any]) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)))
    self._manager.wait_until_finished()

  def restore(self, step: int, like: Any) -> tuple[Any, dict[str, Any]]:
    """Restores into the structure (and shapes, dtypes) of ``like``."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return out.state, out.meta

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def restore_latest(self, like: Any) -> tuple[Any, dict[str, Any]]:
    """The newest checkpoint that reads back, falling back to older ones.

    A checkpoint that fails to restore (truncated, corrupted, written half
    way by a crash) is reported in one line and skipped.

    Raises:
      CorruptCheckpointError: no checkpoint reads back.
    """
    problems, broken = [], []
    for step in reversed(self.all_steps()):
      try:
        out = self.restore(step, like)
      except Exception as e:  # pylint: disable=broad-except  (orbax raises many kinds)
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        problems.append(f"step {step}: {type(e).__name__}: {reason}")
        broken.append(step)
        continue
      if broken:
        # The run continues from here and will write those steps again.
        for bad in broken:
          self._manager.delete(bad)
        print(f"privjax: checkpoint step(s) {broken} in {self.directory} unreadable "
              f"({problems[0].split(': ', 1)[1][:80]}); resuming from step {step}, the "
              "newest readable one (the unreadable ones are removed)")
      return out
    raise CorruptCheckpointError(
        f"no readable checkpoint in {self.directory} ({'; '.join(problems) or 'none'}); "
        "delete the broken step folders to restart from an older one, or use a new "
        "--workdir")

  def meta(self, step: int) -> dict[str, Any]:
    """The JSON metadata saved with ``step``."""
    return self._manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore())).meta

  def close(self) -> None:
    self._manager.close()
