"""Shared test fixtures. Tests run on CPU; data from ../shared is optional."""

import os
import pathlib

import numpy as np
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


# A small MovieLens-format folder (ml-100k files) for the data tests.
SMALL_ML_USERS, SMALL_ML_ITEMS = 80, 120


def _write_movielens(folder: pathlib.Path, seed: int = 0) -> pathlib.Path:
  """A small ml-100k folder: Zipf item popularity, 10-25 distinct items a user."""
  rng = np.random.default_rng(seed)
  folder.mkdir(parents=True, exist_ok=True)
  weights = 1.0 / np.arange(1, SMALL_ML_ITEMS + 1) ** 1.1
  weights /= weights.sum()
  lines = []
  for user in range(1, SMALL_ML_USERS + 1):
    items = rng.choice(SMALL_ML_ITEMS, size=rng.integers(10, 26), replace=False,
                       p=weights)
    for t, item in enumerate(items):
      rating = rng.integers(1, 6)
      lines.append(f"{user}\t{item + 1}\t{rating}\t{880000000 + 1000 * t + user}")
  (folder / "u.data").write_text("\n".join(lines) + "\n", encoding="latin-1")
  flags = "|".join(["0"] * 19)
  (folder / "u.item").write_text("".join(
      f"{i}|Movie {i} (1995)|01-Jan-1995||http://example.org/{i}|{flags}\n"
      for i in range(1, SMALL_ML_ITEMS + 1)), encoding="latin-1")
  from privjax.data import deidentify  # pylint: disable=g-import-not-at-top
  jobs = sorted(deidentify.OCCUPATION_HIERARCHY)
  (folder / "u.user").write_text("".join(
      f"{u}|{rng.integers(15, 70)}|{'MF'[rng.integers(2)]}|"
      f"{jobs[rng.integers(len(jobs))]}|{rng.integers(10000, 99999):05d}\n"
      for u in range(1, SMALL_ML_USERS + 1)), encoding="latin-1")
  return folder


@pytest.fixture(scope="module")
def ml_folder(tmp_path_factory) -> pathlib.Path:
  """A small ml-100k-format folder written by ``_write_movielens``."""
  return _write_movielens(tmp_path_factory.mktemp("data") / "ml-fixture")


def _write_tiny_pretrained(path):
  """A random 1-layer, 32-wide BERT saved as HF files, with the MiniLM tokenizer."""
  import dataclasses, json, shutil  # pylint: disable=g-import-not-at-top,multiple-imports
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from privjax.models import bert, bert_hf  # pylint: disable=g-import-not-at-top,multiple-imports
  src = bert_hf.minilm_path()
  if src is None:
    pytest.skip("all-MiniLM-L6-v2 is not installed (its tokenizer is needed)")
  config = dataclasses.replace(bert.BertConfig.tiny(), vocab_size=30522, num_layers=1)
  encoder = bert.BertEncoder(config, with_pooler=False, rngs=nnx.Rngs(0))
  tensors = {}
  for keys, variable in nnx.iter_graph(encoder):
    if isinstance(variable, nnx.Param):
      name = (bert_hf._hf_module(keys[:-1]) + "."  # pylint: disable=protected-access
              + bert_hf._LEAVES[keys[-1]][0])  # pylint: disable=protected-access
      array = np.asarray(variable.get_value())
      tensors[name] = array.T if keys[-1] == "kernel" else array
  path.mkdir()
  safetensors.numpy.save_file(tensors, str(path / "model.safetensors"))
  (path / "config.json").write_text(json.dumps({
      "model_type": "bert", "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size, "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "intermediate_size": config.intermediate_size,
      "max_position_embeddings": config.max_position_embeddings}))
  for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json"):
    shutil.copyfile(src / name, path / name)
  return path


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory) -> pathlib.Path:
  """A random 1-layer BERT folder in HF format (MiniLM's tokenizer), or a skip."""
  return _write_tiny_pretrained(tmp_path_factory.mktemp("bert") / "pretrained")
