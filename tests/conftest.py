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
