"""privjax.run.checkpoint: a pytree and its JSON meta survive save -> restore."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from privjax.run import checkpoint


def _tree(seed):
  rng = np.random.default_rng(seed)
  return {"step": jnp.asarray(seed, jnp.int32),
          "params": {"dense": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
                               "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32)},
                     "embed": jnp.asarray(rng.integers(-5, 5, (6, 2)), jnp.int32)}}


META = {"steps": 7, "epsilon_spent": 1.25, "secret_fingerprint": "ab12",
        "nested": {"units": [1, 2, 3], "note": "privacy spent so far"}}


def test_save_restore_round_trips_the_arrays_and_meta(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path)
  assert ckpt.directory == (tmp_path / "checkpoints").resolve()
  saved = _tree(1)
  ckpt.save(7, saved, META)
  like = jax.tree.map(jnp.zeros_like, saved)  # structure, shapes, dtypes only
  restored, meta = ckpt.restore(7, like)
  ckpt.close()
  assert meta == META
  assert jax.tree.structure(restored) == jax.tree.structure(saved)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(saved)):
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_latest_step_and_meta_of_each_step_survive_reopening(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=2)
  assert ckpt.latest_step() is None
  for step in (2, 4, 6):
    ckpt.save(step, _tree(step), {**META, "steps": step})
  assert ckpt.latest_step() == 6
  ckpt.close()
  again = checkpoint.Checkpointer(tmp_path, max_to_keep=2)
  assert again.latest_step() == 6
  assert again.meta(4) == {**META, "steps": 4}
  assert again.meta(6)["steps"] == 6
  restored, _ = again.restore(4, _tree(0))
  np.testing.assert_array_equal(np.asarray(restored["params"]["dense"]["kernel"]),
                                np.asarray(_tree(4)["params"]["dense"]["kernel"]))
  with pytest.raises(Exception):  # max_to_keep=2: step 2 was deleted
    again.meta(2)
  again.close()
