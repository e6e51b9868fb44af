"""Runs that survive faults: one writer, bad checkpoints, signals, extensions, errors."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from privjax.run import checkpoint
from privjax.run import train as train_lib
from privjax.run import workdir as workdir_lib
from privjax.run import workload as workload_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def _params(workdir):
  return workload_lib.load_trained(workdir)[1]


def test_a_second_run_into_the_same_workdir_is_refused_naming_the_holder(tmp_path, tiny_cfg):
  with workdir_lib.lock(tmp_path):
    with pytest.raises(workdir_lib.WorkdirBusyError, match=f"pid.*{os.getpid()}"):
      train_lib.train_and_evaluate(tiny_cfg(), tmp_path, show_progress=False)
  # Released: the run now goes ahead.
  assert train_lib.train_and_evaluate(tiny_cfg(**{"train.steps": 1}), tmp_path,
                                      show_progress=False)["steps"] == 1


def _corrupt(step_dir: pathlib.Path):
  for f in step_dir.rglob("*"):
    if f.is_file() and f.stat().st_size > 0 and "state" in str(f):
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])


def test_a_corrupt_checkpoint_falls_back_to_the_last_good_one(tmp_path, tiny_cfg, capsys):
  cfg = tiny_cfg(**{"train.checkpoint_every": 2})
  train_lib.train_and_evaluate(cfg, tmp_path / "straight", show_progress=False)
  run = tmp_path / "run"
  train_lib.train_and_evaluate(cfg, run, show_progress=False, stop_after_steps=4)
  _corrupt(run / "checkpoints" / "4")
  capsys.readouterr()
  result = train_lib.train_and_evaluate(cfg, run, show_progress=False)
  out = capsys.readouterr().out
  assert "checkpoint step(s) [4]" in out and "unreadable" in out
  assert "resuming from step 2" in out
  assert len([l for l in out.splitlines() if "unreadable" in l]) == 1   # one line
  assert result["steps"] == 6
  for x, y in zip(jax.tree.leaves(_params(tmp_path / "straight")), jax.tree.leaves(_params(run))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))   # still exact


def test_no_readable_checkpoint_is_one_clear_error(tmp_path, tiny_cfg):
  cfg = tiny_cfg(**{"train.checkpoint_every": 2})
  train_lib.train_and_evaluate(cfg, tmp_path, show_progress=False, stop_after_steps=4)
  for step in (2, 4):
    _corrupt(tmp_path / "checkpoints" / str(step))
  with pytest.raises(checkpoint.CorruptCheckpointError, match="no readable checkpoint"):
    train_lib.train_and_evaluate(cfg, tmp_path, show_progress=False)


def test_a_resume_refusal_names_the_field_and_both_values(tmp_path, tiny_cfg):
  train_lib.train_and_evaluate(tiny_cfg(), tmp_path, show_progress=False, stop_after_steps=2)
  with pytest.raises(ValueError, match=r"privacy\.l2_clip_norm: 1\.0 -> 5\.0"):
    train_lib.train_and_evaluate(tiny_cfg(**{"privacy.l2_clip_norm": 5.0}), tmp_path,
                                 show_progress=False)
  with pytest.raises(ValueError, match=r"model\.embed_dim: 8 -> 16"):
    train_lib.train_and_evaluate(tiny_cfg(**{"model.embed_dim": 16}), tmp_path,
                                 show_progress=False)


def test_a_calibrated_run_extends_only_as_the_message_says(tmp_path, tiny_cfg):
  first = train_lib.train_and_evaluate(tiny_cfg(), tmp_path, show_progress=False)
  sigma, q = first["plan"].noise_multiplier, first["plan"].sampling_prob
  with pytest.raises(ValueError, match="noise_multiplier=") as refusal:
    train_lib.train_and_evaluate(tiny_cfg(**{"train.steps": 9}), tmp_path, show_progress=False)
  assert f"--config.privacy.sampling_prob={q!r}" in str(refusal.value)
  # Doing what the message says works, and epsilon is for the new total.
  extended = train_lib.train_and_evaluate(
      tiny_cfg(**{"train.steps": 9, "privacy.target_epsilon": None,
                  "privacy.noise_multiplier": sigma, "privacy.sampling_prob": q}),
      tmp_path, show_progress=False)
  assert extended["steps"] == 9 and extended["epsilon"] > first["epsilon"]
  assert extended["epsilon"] == pytest.approx(extended["plan"].epsilon(9))
  privacy = json.loads((tmp_path / "privacy.json").read_text())
  assert privacy["steps"] == 9 and privacy["epsilon"] == pytest.approx(extended["epsilon"])


def test_a_failing_new_run_leaves_nothing_behind(tmp_path, tiny_cfg):
  with pytest.raises(ValueError, match="exceeds the DP count"):
    train_lib.train_and_evaluate(tiny_cfg(**{"train.batch_size": 10_000}),
                                 tmp_path / "new", show_progress=False)
  assert not (tmp_path / "new").exists()
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("keep me")
  with pytest.raises(ValueError):
    train_lib.train_and_evaluate(tiny_cfg(**{"train.batch_size": 10_000}),
                                 tmp_path / "mine", show_progress=False)
  assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]


_CONFIG = '''
from privjax import config as config_lib
def get_config():
  return config_lib.Config(
      name="sig", data=config_lib.DataConfig(num_users=203, num_items=40,
                                             mean_interactions=8, max_len=4,
                                             max_examples_per_user=4),
      model=config_lib.ModelConfig(embed_dim=8, hidden_dim=16),
      privacy=config_lib.PrivacyConfig(target_epsilon=3.0, reproducible_noise_seed=0),
      train=config_lib.TrainConfig(steps=100000, batch_size=32, log_every=1,
                                   checkpoint_every=0))
'''


def test_sigint_saves_a_checkpoint_and_exits_cleanly(tmp_path):
  config = tmp_path / "sig.py"
  config.write_text(_CONFIG)
  workdir = tmp_path / "run"
  proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "train.py"), "--config",
                           str(config), "--workdir", str(workdir), "--no-progress"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and not (
      metrics.exists() and metrics.read_text().count('"epsilon"') >= 3):
    time.sleep(0.5)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=240)
  assert proc.returncode == 130, err
  assert "interrupted by SIGINT" in out and "Traceback" not in err
  steps = checkpoint.Checkpointer(workdir).latest_step()
  assert steps is not None and steps >= 3
  privacy = json.loads((workdir / "privacy.json").read_text())
  assert privacy["steps"] == steps


def test_scripts_print_one_line_errors_and_exit_2(tmp_path):
  run = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "--config",
                        str(REPO / "configs" / "quickstart.py"), "--workdir",
                        str(tmp_path / "w"), "--config.data.source=movielens",
                        f"--config.data.path={tmp_path / 'missing'}"],
                       capture_output=True, text=True, timeout=240)
  assert run.returncode == 2
  assert run.stderr.startswith("error: ") and "missing" in run.stderr
  assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr
  assert not (tmp_path / "w").exists()
