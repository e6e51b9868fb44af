"""Shared test fixtures. Tests run on CPU; data from ../shared is optional."""

import os
import pathlib

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
