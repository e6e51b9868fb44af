"""End-to-end runs of the trainer on tiny synthetic data, and what they release."""

import json
import math
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from privjax import config as config_lib
from privjax.dp import accounting
from privjax.dp import calibration
from privjax.dp import clipping
from privjax.dp import noise
from privjax.dp import secret as secret_lib
from privjax.run import checkpoint
from privjax.run import evaluate as evaluate_lib
from privjax.run import train as train_lib
from privjax.run import workload as workload_lib

from conftest import TINY_USERS  # pylint: disable=g-bad-import-order


def _params(workdir):
  _, params, _ = workload_lib.load_trained(workdir)
  return params


def _released_text(workdir: pathlib.Path) -> str:
  """Every released file of a run (all but secret/), as one string."""
  out = []
  for path in sorted(workdir.rglob("*")):
    if path.is_file() and secret_lib.SECRET_DIR not in path.relative_to(workdir).parts:
      out.append(path.read_bytes().decode("utf-8", errors="replace"))
  return "\n".join(out)


def _reports(workdir: pathlib.Path) -> str:
  """The released files that describe a run (privacy.json, metrics.jsonl,
  checkpoint metadata); config.json is left out: for synthetic data it holds
  the generator's num_users, a public parameter of the built-in data."""
  names = ["privacy.json", "metrics.jsonl"]
  texts = [(workdir / n).read_text() for n in names]
  texts += [p.read_text() for p in (workdir / "checkpoints").rglob("*")
            if p.is_file() and "meta" in str(p)]
  return "\n".join(texts)


def test_run_directory_holds_the_promised_files(tmp_path, tiny_cfg):
  cfg = tiny_cfg(**{"privacy.reproducible_noise_seed": None})
  result = train_lib.train_and_evaluate(cfg, tmp_path, show_progress=False)
  for name in ("config.json", "privacy.json", "metrics.jsonl", "checkpoints",
               "secret/run_secret.json", "nonprivate/report.md", "nonprivate/results.json",
               "nonprivate/metrics.jsonl"):
    assert (tmp_path / name).exists(), name
  privacy = json.loads((tmp_path / "privacy.json").read_text())
  for key in ("unit", "unit_description", "neighbouring_relation", "accountant",
              "noise_multiplier", "l2_clip_norm", "sampling_prob", "steps", "delta",
              "epsilon", "epsilon_rdp", "epsilon_pld", "dp_event", "count_of_units",
              "noisy_num_units", "noise_secret", "item_catalogue"):
    assert key in privacy, key
  assert privacy["unit"] == "user" and privacy["accountant"] == "rdp"
  assert privacy["private"] is True and privacy["dp_release"] is True
  assert privacy["steps"] == 6 and privacy["delta"] == 1e-5
  # q comes from the DP count, and the count's epsilon is part of the total.
  assert privacy["sampling_prob"] == pytest.approx(32 / privacy["noisy_num_units"])
  assert privacy["count_of_units"]["epsilon"] == 0.05
  assert 0.99 * 3.0 <= privacy["epsilon"] <= 3.0
  assert privacy["epsilon"] == pytest.approx(privacy["epsilon_dpsgd"] + 0.05)
  assert privacy["epsilon_pld"] <= privacy["epsilon_rdp"] * 1.001
  assert privacy["epsilon"] == pytest.approx(result["epsilon"])
  public = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert public[0] == {"event": "start", "step": 0, "dp_release": True,
                       "reproducible_noise": False}
  assert [l["step"] for l in public if "epsilon" in l] == [2, 4, 6]
  # Released metrics hold public values only; the rest is in nonprivate/.
  assert {k for l in public for k in l} <= {"step", "epsilon", "noise_stddev", "event",
                                            "dp_release", "reproducible_noise"}
  nonprivate = [json.loads(l)
                for l in (tmp_path / "nonprivate" / "metrics.jsonl").read_text().splitlines()]
  assert any("nonprivate/eval/test/hr@10" in l for l in nonprivate)
  assert any("nonprivate/loss" in l for l in nonprivate)
  report = (tmp_path / "nonprivate" / "report.md").read_text()
  assert "user" in report and "Not covered" in report and "NOT for release" in report
  # evaluate.py recomputes the same numbers from the checkpoint.
  again = evaluate_lib.evaluate_workdir(tmp_path)
  assert again["test"] == pytest.approx(result["test"])


def test_no_released_file_holds_the_secret_or_the_number_of_users(tmp_path, tiny_cfg):
  cfg = tiny_cfg(**{"privacy.reproducible_noise_seed": None, "train.steps": 2})
  result = train_lib.train_and_evaluate(cfg, tmp_path, show_progress=False)
  secret = secret_lib.RunSecret.load(tmp_path)
  released = _released_text(tmp_path)
  assert secret.key.hex() not in released
  for label in ("streams", "sampling", "bounding"):
    assert str(secret.integer(label)) not in released
  # Every tiny user has training examples, so N = TINY_USERS is the private
  # count; no released file states it (privacy.json has the DP count instead).
  privacy = json.loads((tmp_path / "privacy.json").read_text())
  assert "num_units" not in privacy and privacy["dataset_size"] is None
  noisy = result["plan"].noisy_num_units
  text = _reports(tmp_path)
  if noisy != TINY_USERS:  # equal with probability ~2.5%: then nothing to check
    assert not re.search(rf"(?<![\d.]){TINY_USERS}(?![\d.])", text), \
        "the exact number of users is released"
  ckpt = checkpoint.Checkpointer(tmp_path)
  meta = ckpt.meta(ckpt.latest_step())
  ckpt.close()
  assert "seed" not in json.dumps(meta) and meta["secret_fingerprint"] == secret.fingerprint


def test_the_released_count_is_noisy_and_the_exact_one_is_nowhere(tmp_path, tiny_cfg):
  # Reproducible (seed 0), so it cannot flake: this secret's count differs.
  result = train_lib.train_and_evaluate(tiny_cfg(**{"train.steps": 2}), tmp_path,
                                        show_progress=False)
  assert result["plan"].noisy_num_units != TINY_USERS
  assert not re.search(rf"(?<![\d.]){TINY_USERS}(?![\d.])", _reports(tmp_path))


def _one_step_attack(workdir: pathlib.Path, noise_key) -> tuple[float, float]:
  """Recovers the clipped gradient sum of step 0 from released files + a key.

  Returns (error of the recovered sum, norm of the noise that was added).
  """
  cfg = workload_lib.load_config(workdir)
  privacy = json.loads((workdir / "privacy.json").read_text())
  w = workload_lib.build_workload(cfg)           # public: init from train.seed
  after = _params(workdir)
  # SGD: after = before - lr * noisy_sum / divisor.
  lr, divisor = cfg.train.learning_rate, privacy["divisor"]
  noisy_sum = jax.tree.map(lambda a, b: (a - b) * divisor / lr, w.params, after)
  guess = noise.add_gaussian_noise(
      jax.tree.map(jnp.zeros_like, noisy_sum),
      stddev=privacy["noise_multiplier"] * privacy["l2_clip_norm"], key=noise_key)
  # The truth, known to the data owner: q = 1 and no user is capped, so the
  # batch is every user's every example.
  examples, unit_rows = workload_lib.training_units(w, secret_lib.RunSecret.fresh())
  assert (unit_rows >= 0).sum(1).max() < cfg.data.max_examples_per_user
  batch = {k: jnp.asarray(v[np.where(unit_rows >= 0, unit_rows, 0)])
           for k, v in examples.items()}
  mask = jnp.asarray((unit_rows >= 0).astype(np.float32))
  true = clipping.clipped_grad_sum(lambda p, ex, r: w.loss_fun(p, w.frozen, ex, r),
                                   l2_clip_norm=privacy["l2_clip_norm"])(
                                       w.params, batch, mask, None).grad_sum
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
  recovered = flat(noisy_sum) - flat(guess)
  return (float(np.linalg.norm(recovered - flat(true))),
          float(np.linalg.norm(flat(noisy_sum) - flat(true))))


@pytest.mark.parametrize("reproducible", [False, True])
def test_released_files_do_not_let_anyone_subtract_the_noise(tmp_path, tiny_cfg, reproducible):
  seed = 7 if reproducible else None
  cfg = tiny_cfg(**{"privacy.reproducible_noise_seed": seed, "privacy.target_epsilon": None,
                    "privacy.noise_multiplier": 2.0, "privacy.sampling_prob": 1.0,
                    "data.max_examples_per_user": 64, "train.optimizer": "sgd",
                    "train.learning_rate": 0.1, "train.steps": 1})
  train_lib.train_and_evaluate(cfg, tmp_path, show_progress=False)
  config = json.loads((tmp_path / "config.json").read_text())
  # The attacker's best guesses from the released files: the old scheme (the
  # noise key from train.seed) and a secret derived from any released seed.
  guesses = [noise.KeyStreams(jax.random.key(config["train"]["seed"])).noise_key(0)]
  if config["privacy"]["reproducible_noise_seed"] is not None:
    guesses.append(secret_lib.RunSecret.from_seed(
        config["privacy"]["reproducible_noise_seed"]).jax_key("streams"))
    guesses[-1] = noise.KeyStreams(guesses[-1]).noise_key(0)
  errors = [_one_step_attack(tmp_path, key) for key in guesses]
  noise_norm = errors[0][1]
  assert noise_norm > 10  # sigma C sqrt(#params): large
  best = min(e for e, _ in errors)
  if reproducible:
    assert best < 1e-3 * noise_norm   # the run said so: not a DP release
    privacy = json.loads((tmp_path / "privacy.json").read_text())
    assert privacy["dp_release"] is False and privacy["private"] is False
    assert "NOT A DP RELEASE" in privacy["summary"]
    assert "NOT A DP RELEASE" in (tmp_path / "nonprivate" / "report.md").read_text()
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])[
        "dp_release"] is False
  else:
    assert best > 0.5 * noise_norm    # of the order of the noise: nothing recovered


def test_resume_gives_the_same_params_and_epsilon_as_an_uninterrupted_run(tmp_path, tiny_cfg):
  cfg = tiny_cfg()   # reproducible noise: two directories, the same streams
  train_lib.train_and_evaluate(cfg, tmp_path / "straight", show_progress=False)
  first = train_lib.train_and_evaluate(cfg, tmp_path / "resumed", show_progress=False,
                                       stop_after_steps=4)
  assert first["steps"] == 4 and "interrupted" in first["stop_reason"]
  second = train_lib.train_and_evaluate(cfg, tmp_path / "resumed", show_progress=False)
  assert second["steps"] == 6
  a, b = _params(tmp_path / "straight"), _params(tmp_path / "resumed")
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  pa = json.loads((tmp_path / "straight" / "privacy.json").read_text())
  pb = json.loads((tmp_path / "resumed" / "privacy.json").read_text())
  assert pa["epsilon"] == pb["epsilon"] and pb["steps"] == 6


def test_resume_with_the_secret_is_bit_exact(tmp_path, tiny_cfg):
  # A secret run interrupted after step 4 (checkpoints at 3 and 4), copied;
  # one copy resumes from 4, the other from 3: the secret streams replay the
  # same steps, so both end with the same parameters.
  cfg = tiny_cfg(**{"privacy.reproducible_noise_seed": None})
  train_lib.train_and_evaluate(cfg, tmp_path / "a", show_progress=False, stop_after_steps=4)
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  shutil.rmtree(tmp_path / "b" / "checkpoints" / "4")
  for name in ("a", "b"):
    assert train_lib.train_and_evaluate(cfg, tmp_path / name, show_progress=False)["steps"] == 6
  for x, y in zip(jax.tree.leaves(_params(tmp_path / "a")),
                  jax.tree.leaves(_params(tmp_path / "b"))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_marks_the_log_and_keeps_no_duplicate_steps(tmp_path, tiny_cfg):
  cfg = tiny_cfg(**{"train.log_every": 1, "train.checkpoint_every": 2})
  train_lib.train_and_evaluate(cfg, tmp_path, show_progress=False, stop_after_steps=3)
  # Cut what the interrupted attempt logged after its last checkpoint (step
  # 2), as a crash would have left it: the resumed run logs steps 3.. again.
  ckpt = checkpoint.Checkpointer(tmp_path)
  ckpt._manager.delete(3)  # pylint: disable=protected-access
  ckpt.close()
  train_lib.train_and_evaluate(cfg, tmp_path, show_progress=False)
  nonprivate = [json.loads(l) for l in
                (tmp_path / "nonprivate" / "metrics.jsonl").read_text().splitlines()]
  train_steps = [r["step"] for r in nonprivate if "nonprivate/loss" in r]
  assert train_steps == [1, 2, 3, 4, 5, 6]   # step 3 once, not twice
  public = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["event"] for r in public if "event" in r] == ["start", "resume"]
  assert [r["step"] for r in public if "epsilon" in r] == [1, 2, 3, 4, 5, 6]


def test_resume_on_changed_data_is_refused(tmp_path, tiny_cfg):
  train_lib.train_and_evaluate(tiny_cfg(), tmp_path, show_progress=False, stop_after_steps=3)
  # One more user: a new training set under the old statement. (The config
  # check does not see it: the data section is the same but the data are not.)
  from privjax.run import workload  # pylint: disable=g-import-not-at-top
  real = workload.load_dataset
  try:
    workload.load_dataset = lambda c: real(config_lib.replace(
        tiny_cfg(), **{"data.num_users": TINY_USERS + 40}).data)
    with pytest.raises(ValueError, match="data changed"):
      train_lib.train_and_evaluate(tiny_cfg(), tmp_path, show_progress=False)
  finally:
    workload.load_dataset = real


def test_resume_without_the_secret_is_refused(tmp_path, tiny_cfg):
  cfg = tiny_cfg(**{"privacy.reproducible_noise_seed": None})
  train_lib.train_and_evaluate(cfg, tmp_path, show_progress=False, stop_after_steps=3)
  shutil.rmtree(tmp_path / "secret")
  with pytest.raises(secret_lib.MissingSecretError, match="secret"):
    train_lib.train_and_evaluate(cfg, tmp_path, show_progress=False)
  secret_lib.RunSecret.fresh().save(tmp_path)   # another secret: refused too
  with pytest.raises(ValueError, match="another run secret"):
    train_lib.train_and_evaluate(cfg, tmp_path, show_progress=False)


def test_resume_refuses_a_changed_privacy_config(tmp_path, tiny_cfg):
  train_lib.train_and_evaluate(tiny_cfg(), tmp_path, show_progress=False, stop_after_steps=3)
  with pytest.raises(ValueError, match="privacy"):
    train_lib.train_and_evaluate(tiny_cfg(**{"privacy.l2_clip_norm": 5.0}), tmp_path,
                                 show_progress=False)
  with pytest.raises(ValueError, match="train.steps"):
    train_lib.train_and_evaluate(tiny_cfg(**{"train.steps": 12}), tmp_path,
                                 show_progress=False)


def test_training_stops_before_exceeding_the_budget(tmp_path, tiny_cfg):
  q = 0.15
  cfg = tiny_cfg(**{"privacy.target_epsilon": None, "privacy.noise_multiplier": 2.0,
                    "privacy.sampling_prob": q, "privacy.epsilon_budget": 2.0,
                    "train.steps": 50})
  result = train_lib.train_and_evaluate(cfg, tmp_path, show_progress=False)
  privacy = json.loads((tmp_path / "privacy.json").read_text())
  allowed = calibration.max_steps(sampling_prob=q, noise_multiplier=2.0,
                                  delta=privacy["delta"], epsilon_budget=2.0 - 0.05)
  assert 0 < result["steps"] == allowed < 50
  assert privacy["epsilon"] <= 2.0
  assert 0.05 + accounting.dpsgd_epsilon(sampling_prob=q, noise_multiplier=2.0,
                                         steps=allowed + 1, delta=privacy["delta"]) > 2.0
  assert "budget" in result["stop_reason"]
  # Resuming cannot spend more: the budget is still exhausted.
  again = train_lib.train_and_evaluate(cfg, tmp_path, show_progress=False)
  assert again["steps"] == allowed


def test_sigma_is_calibrated_to_the_run_length(tmp_path, tiny_cfg):
  short = train_lib.train_and_evaluate(tiny_cfg(**{"train.steps": 3}), tmp_path / "a",
                                       show_progress=False)
  long = train_lib.train_and_evaluate(tiny_cfg(**{"train.steps": 12}), tmp_path / "b",
                                      show_progress=False)
  assert long["noise_multiplier"] > short["noise_multiplier"]
  for r in (short, long):
    assert 0.99 * 3.0 <= r["epsilon"] <= 3.0


def test_example_level_and_non_private_runs_say_so(tmp_path, tiny_cfg):
  ex = train_lib.train_and_evaluate(tiny_cfg(**{"privacy.unit": "example", "train.steps": 2}),
                                    tmp_path / "ex", show_progress=False)
  privacy = json.loads((tmp_path / "ex" / "privacy.json").read_text())
  assert privacy["unit"] == "example" and ex["unit"] == "example"
  assert "example" in privacy["neighbouring_relation"]
  # What one example is, and that it does not protect one interaction.
  assert "up to 5 examples" in privacy["unit_description"]
  train_lib.train_and_evaluate(
      tiny_cfg(**{"privacy.enabled": False, "privacy.target_epsilon": None,
                  "train.steps": 2}), tmp_path / "np", show_progress=False)
  privacy = json.loads((tmp_path / "np" / "privacy.json").read_text())
  assert privacy["private"] is False and privacy["epsilon"] == "inf"
  assert "NOT" in privacy["neighbouring_relation"]


def test_replace_one_states_a_public_number_of_units(tmp_path, tiny_cfg):
  cfg = tiny_cfg(**{"privacy.neighbouring": "replace_one", "privacy.accountant": "pld",
                    "train.steps": 2})
  train_lib.train_and_evaluate(cfg, tmp_path, show_progress=False)
  privacy = json.loads((tmp_path / "privacy.json").read_text())
  assert privacy["neighbouring_relation"] == "replace_one_user"
  assert privacy["num_units"] == TINY_USERS and "count_of_units" not in privacy
  assert privacy["sampling_prob"] == pytest.approx(32 / TINY_USERS)
  assert privacy["epsilon_rdp"] is None and privacy["epsilon"] <= 3.0


def test_configurations_that_cannot_be_accounted_for_are_refused(tmp_path, tiny_cfg):
  with pytest.raises(ValueError, match="sampling_prob"):
    train_lib.train_and_evaluate(tiny_cfg(**{"privacy.target_epsilon": None,
                                             "privacy.noise_multiplier": 1.0}),
                                 tmp_path, show_progress=False)
  with pytest.raises(ValueError, match="replace_one"):
    train_lib.train_and_evaluate(tiny_cfg(**{"privacy.overflow": "truncate",
                                             "privacy.accountant": "pld"}),
                                 tmp_path, show_progress=False)
  with pytest.raises(ValueError, match="accountant='pld'"):
    train_lib.train_and_evaluate(tiny_cfg(**{"privacy.neighbouring": "replace_one"}),
                                 tmp_path, show_progress=False)


def test_ghost_and_vmap_runs_train_the_same_model(tmp_path, tiny_cfg):
  a = tiny_cfg(**{"privacy.clipping": "vmap", "train.steps": 3})
  b = tiny_cfg(**{"privacy.clipping": "ghost", "train.steps": 3})
  train_lib.train_and_evaluate(a, tmp_path / "vmap", show_progress=False)
  train_lib.train_and_evaluate(b, tmp_path / "ghost", show_progress=False)
  assert json.loads((tmp_path / "ghost" / "privacy.json").read_text())["clipping"] == "ghost"
  for x, y in zip(jax.tree.leaves(_params(tmp_path / "vmap")),
                  jax.tree.leaves(_params(tmp_path / "ghost"))):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=1e-4)


def test_clipping_auto_is_decided_on_public_probe_data_only(tiny_cfg):
  # The probe batch is the same whatever the private data: a function of the
  # config's shapes and the public catalogue.
  cfg = tiny_cfg(**{"privacy.clipping": "auto"})
  a = workload_lib.build_workload(cfg)
  b = workload_lib.build_workload(tiny_cfg(**{"privacy.clipping": "auto", "data.seed": 5}))
  for x, y in zip(jax.tree.leaves(workload_lib.probe_batch(a)),
                  jax.tree.leaves(workload_lib.probe_batch(b))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_batch_larger_than_the_population_is_refused(tmp_path, tiny_cfg):
  with pytest.raises(ValueError, match="train.batch_size=5000 exceeds the DP count"):
    train_lib.train_and_evaluate(tiny_cfg(**{"train.batch_size": 5000}), tmp_path,
                                 show_progress=False)


def test_popularity_is_sane(tiny_cfg):
  cfg = tiny_cfg()
  w = workload_lib.build_workload(cfg)
  pop = evaluate_lib.popularity_metrics(cfg, w.split, w.ds)
  assert 0 < pop["hr@10"] < 1 and pop["num_users"] == TINY_USERS
  assert math.isfinite(pop["ndcg@10"])


def test_gradual_pruning_keeps_pruned_weights_exactly_zero_through_dp_steps(tmp_path, tiny_cfg):
  from privjax.compress import pruning  # pylint: disable=g-import-not-at-top
  cfg = tiny_cfg(**{"prune.sparsity": 0.5, "prune.start_step": 0, "prune.end_step": 2,
                    "prune.frequency": 1, "train.steps": 6})
  train_lib.train_and_evaluate(cfg, tmp_path, show_progress=False)
  params = _params(tmp_path)
  for path in pruning.selected_paths(params, pattern="*kernel"):
    leaf = np.asarray(params[path.split("/")[0]][path.split("/")[1]])
    # Exactly half of each kernel is zero after 4 more noisy DP steps.
    assert np.sum(leaf == 0.0) == leaf.size // 2, path
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [l["sparsity"] for l in lines if "sparsity" in l][-1] == pytest.approx(0.5, abs=0.01)


def test_a_useless_epsilon_says_so(tmp_path, tiny_cfg, capsys):
  train_lib.train_and_evaluate(tiny_cfg(**{"privacy.target_epsilon": None,
                                           "privacy.noise_multiplier": 50.0,
                                           "privacy.sampling_prob": 0.15, "train.steps": 2}),
                               tmp_path, show_progress=False)
  out = capsys.readouterr().out
  assert "WARNING sigma=" in out and "near chance" in out
  train_lib.train_and_evaluate(tiny_cfg(**{"train.steps": 2}), tmp_path / "fine",
                               show_progress=False)
  assert "near chance" not in capsys.readouterr().out
