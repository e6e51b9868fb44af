"""End-to-end on the real MovieLens 100k (slow; skipped when the files are absent)."""

import pathlib

import pytest

from privjax import config as config_lib
from privjax.run import evaluate as evaluate_lib
from privjax.run import train as train_lib
from privjax.run import workload as workload_lib

pytestmark = pytest.mark.slow


def test_sasrec_on_ml100k_beats_popularity(ml100k_path, tmp_path):
  cfg = config_lib.load_file(
      pathlib.Path(__file__).resolve().parents[1] / "configs" / "movielens_sasrec.py")
  cfg = config_lib.replace(cfg, **{
      "data.path": str(ml100k_path), "privacy.enabled": False,
      "privacy.target_epsilon": None, "data.max_examples_per_user": 1,
      "model.dropout": 0.3, "train.learning_rate": 1e-3, "train.steps": 300,
      "model.embed_dim": 64, "model.hidden_dim": 64, "model.tie_embeddings": False,
      "train.eval_every": 0})
  result = train_lib.train_and_evaluate(cfg, tmp_path, show_progress=False)
  w = workload_lib.build_workload(config_lib.replace(cfg, **{"model.name": "mlp"}))
  pop = evaluate_lib.popularity_metrics(cfg, w.split, w.ds)
  assert result["test"]["num_users"] == 943
  assert result["test"]["hr@10"] > 1.5 * pop["hr@10"], (result["test"], pop)
