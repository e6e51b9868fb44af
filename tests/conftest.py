"""Shared test fixtures. Tests run on CPU; data from ../shared is optional."""

import os
import pathlib

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from privjax import config as config_lib  # pylint: disable=g-import-not-at-top

# The number of users of the tiny config: odd, so that a test can look for it
# in released files (it must not appear there).
TINY_USERS = 203


def tiny_config(**overrides) -> config_lib.Config:
  """A run small enough for a unit test: 203 synthetic users, an mlp, 6 steps.

  Reproducible noise (``privacy.reproducible_noise_seed=0``) keeps tests
  deterministic; tests of the secret path set it to None.
  """
  cfg = config_lib.Config(
      name="tiny",
      data=config_lib.DataConfig(num_users=TINY_USERS, num_items=40, mean_interactions=8,
                                 max_len=4, max_examples_per_user=4),
      model=config_lib.ModelConfig(embed_dim=8, hidden_dim=16, num_layers=1, num_heads=1),
      privacy=config_lib.PrivacyConfig(target_epsilon=3.0, reproducible_noise_seed=0),
      train=config_lib.TrainConfig(steps=6, batch_size=32, learning_rate=1e-2,
                                   log_every=2, checkpoint_every=3),
      eval=config_lib.EvalConfig(batch_size=64))
  return config_lib.replace(cfg, **overrides)


@pytest.fixture
def tiny_cfg():
  """``tiny_config``: call it with dotted overrides, e.g. ``tiny_cfg(**{"train.steps": 2})``."""
  return tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]
ML100K = pathlib.Path(
    os.environ.get("PRIVJAX_ML100K", REPO.parent / "shared" / "data" / "ml-100k"))


@pytest.fixture
def ml100k_path() -> pathlib.Path:
  """The real MovieLens 100k folder; tests that need it skip when absent."""
  if not (ML100K / "u.data").exists():
    pytest.skip(f"MovieLens 100k not found at {ML100K}")
  return ML100K

# Fixture generators need torch; they are scripts, not tests.
collect_ignore_glob = ["fixtures/*"]


def pytest_configure(config):
  """Share compiled XLA programs between tests of one run (many tests build the
  same step for the same shapes); a fresh directory per run keeps runs honest."""
  import tempfile  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  cache = tempfile.mkdtemp(prefix="privjax-xla-cache-")
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
