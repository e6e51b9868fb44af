"""End-to-end runs of the trainer on tiny synthetic data."""

import json
import math

import jax
import numpy as np
import pytest

from privjax.dp import accounting
from privjax import config as config_lib
from privjax import trainer


def _cfg(**overrides):
  cfg = config_lib.Config(
      name="tiny",
      data=config_lib.DataConfig(num_users=200, num_items=50, mean_interactions=10,
                                 max_len=4, max_examples_per_user=4),
      model=config_lib.ModelConfig(embed_dim=8, hidden_dim=16),
      privacy=config_lib.PrivacyConfig(target_epsilon=3.0),
      train=config_lib.TrainConfig(steps=6, batch_size=32, learning_rate=1e-2,
                                   log_every=2, checkpoint_every=3),
      eval=config_lib.EvalConfig(batch_size=64))
  return config_lib.replace(cfg, **overrides)


def _params(workdir):
  _, params, _ = trainer.load_trained(workdir)
  return params


def test_run_directory_holds_the_promised_files(tmp_path):
  result = trainer.train_and_evaluate(_cfg(), tmp_path, show_progress=False)
  for name in ("config.json", "privacy.json", "metrics.jsonl", "report.md", "checkpoints"):
    assert (tmp_path / name).exists(), name
  privacy = json.loads((tmp_path / "privacy.json").read_text())
  for key in ("unit", "neighbouring_relation", "accountant", "noise_multiplier",
              "l2_clip_norm", "sampling_prob", "steps", "delta", "epsilon",
              "epsilon_rdp", "epsilon_pld", "dp_event"):
    assert key in privacy, key
  assert privacy["unit"] == "user" and privacy["accountant"] == "rdp"
  assert privacy["steps"] == 6
  assert privacy["sampling_prob"] == pytest.approx(32 / privacy["num_units"])
  # Calibrated to exactly this run: epsilon <= target, within 1%.
  assert 0.99 * 3.0 <= privacy["epsilon"] <= 3.0
  assert privacy["epsilon_pld"] <= privacy["epsilon_rdp"] * 1.001
  assert privacy["epsilon"] == pytest.approx(result["epsilon"])
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines if "epsilon" in l] == [2, 4, 6]
  assert any("eval/test/hr@10" in l for l in lines)
  assert "user" in (tmp_path / "report.md").read_text()
  # evaluate.py recomputes the same numbers from the checkpoint.
  again = trainer.evaluate_workdir(tmp_path)
  assert again["test"] == pytest.approx(result["test"])


def test_resume_gives_the_same_params_and_epsilon_as_an_uninterrupted_run(tmp_path):
  cfg = _cfg()
  trainer.train_and_evaluate(cfg, tmp_path / "straight", show_progress=False)
  first = trainer.train_and_evaluate(cfg, tmp_path / "resumed", show_progress=False,
                                     stop_after_steps=4)
  assert first["steps"] == 4 and "interrupted" in first["stop_reason"]
  second = trainer.train_and_evaluate(cfg, tmp_path / "resumed", show_progress=False)
  assert second["steps"] == 6
  a, b = _params(tmp_path / "straight"), _params(tmp_path / "resumed")
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  pa = json.loads((tmp_path / "straight" / "privacy.json").read_text())
  pb = json.loads((tmp_path / "resumed" / "privacy.json").read_text())
  assert pa["epsilon"] == pb["epsilon"] and pb["steps"] == 6


def test_resume_refuses_a_changed_privacy_config(tmp_path):
  trainer.train_and_evaluate(_cfg(), tmp_path, show_progress=False, stop_after_steps=3)
  with pytest.raises(ValueError, match="privacy"):
    trainer.train_and_evaluate(_cfg(**{"privacy.l2_clip_norm": 5.0}), tmp_path,
                               show_progress=False)
  with pytest.raises(ValueError, match="train.steps"):
    trainer.train_and_evaluate(_cfg(**{"train.steps": 12}), tmp_path, show_progress=False)


def test_training_stops_before_exceeding_the_budget(tmp_path):
  cfg = _cfg(**{"privacy.target_epsilon": None, "privacy.noise_multiplier": 0.8,
                "privacy.epsilon_budget": 2.0, "train.steps": 50})
  result = trainer.train_and_evaluate(cfg, tmp_path, show_progress=False)
  privacy = json.loads((tmp_path / "privacy.json").read_text())
  allowed = accounting.max_steps(sampling_prob=privacy["sampling_prob"],
                                 noise_multiplier=0.8, delta=privacy["delta"],
                                 epsilon_budget=2.0)
  assert 0 < result["steps"] == allowed < 50
  assert privacy["epsilon"] <= 2.0
  assert accounting.dpsgd_epsilon(sampling_prob=privacy["sampling_prob"],
                                  noise_multiplier=0.8, steps=allowed + 1,
                                  delta=privacy["delta"]) > 2.0
  assert "budget" in result["stop_reason"]
  # Resuming cannot spend more: the budget is still exhausted.
  again = trainer.train_and_evaluate(cfg, tmp_path, show_progress=False)
  assert again["steps"] == allowed


def test_sigma_is_calibrated_to_the_run_length(tmp_path):
  short = trainer.train_and_evaluate(_cfg(**{"train.steps": 3}), tmp_path / "a",
                                     show_progress=False)
  long = trainer.train_and_evaluate(_cfg(**{"train.steps": 12}), tmp_path / "b",
                                    show_progress=False)
  assert long["noise_multiplier"] > short["noise_multiplier"]
  for r in (short, long):
    assert 0.99 * 3.0 <= r["epsilon"] <= 3.0


def test_example_level_and_non_private_runs_say_so(tmp_path):
  ex = trainer.train_and_evaluate(_cfg(**{"privacy.unit": "example", "train.steps": 2}),
                                  tmp_path / "ex", show_progress=False)
  privacy = json.loads((tmp_path / "ex" / "privacy.json").read_text())
  assert privacy["unit"] == "example" and ex["unit"] == "example"
  assert "example" in privacy["neighbouring_relation"]
  trainer.train_and_evaluate(_cfg(**{"privacy.enabled": False, "privacy.target_epsilon": None,
                                     "train.steps": 2}),
                             tmp_path / "np", show_progress=False)
  privacy = json.loads((tmp_path / "np" / "privacy.json").read_text())
  assert privacy["private"] is False and privacy["epsilon"] == "inf"
  assert "NOT" in privacy["neighbouring_relation"]


def test_ghost_and_vmap_runs_train_the_same_model(tmp_path):
  a = _cfg(**{"privacy.clipping": "vmap", "train.steps": 3})
  b = _cfg(**{"privacy.clipping": "ghost", "train.steps": 3})
  trainer.train_and_evaluate(a, tmp_path / "vmap", show_progress=False)
  trainer.train_and_evaluate(b, tmp_path / "ghost", show_progress=False)
  assert json.loads((tmp_path / "ghost" / "privacy.json").read_text())["clipping"] == "ghost"
  for x, y in zip(jax.tree.leaves(_params(tmp_path / "vmap")),
                  jax.tree.leaves(_params(tmp_path / "ghost"))):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=1e-4)


def test_batch_larger_than_the_population_is_refused(tmp_path):
  with pytest.raises(ValueError, match="train.batch_size=5000 exceeds"):
    trainer.train_and_evaluate(_cfg(**{"train.batch_size": 5000}), tmp_path,
                               show_progress=False)


def test_dp_beats_nothing_but_runs_and_popularity_is_sane(tmp_path):
  cfg = _cfg()
  w = trainer.build_workload(cfg)
  pop = trainer.popularity_metrics(cfg, w.split, w.ds)
  assert 0 < pop["hr@10"] < 1 and pop["num_users"] == 200
  assert math.isfinite(pop["ndcg@10"])


def test_gradual_pruning_keeps_pruned_weights_exactly_zero_through_dp_steps(tmp_path):
  from privjax.compress import pruning  # pylint: disable=g-import-not-at-top
  cfg = _cfg(**{"prune.sparsity": 0.5, "prune.start_step": 0, "prune.end_step": 2,
                "prune.frequency": 1, "train.steps": 6})
  trainer.train_and_evaluate(cfg, tmp_path, show_progress=False)
  params = _params(tmp_path)
  for path in pruning.selected_paths(params, pattern="*kernel"):
    leaf = np.asarray(params[path.split("/")[0]][path.split("/")[1]])
    # Exactly half of each kernel is zero after 4 more noisy DP steps.
    assert np.sum(leaf == 0.0) == leaf.size // 2, path
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [l["sparsity"] for l in lines if "sparsity" in l][-1] == pytest.approx(0.5, abs=0.01)
