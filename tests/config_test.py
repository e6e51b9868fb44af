"""Config files, dotted overrides and validation errors that name the field."""

import pathlib
import subprocess
import sys

import pytest

from privjax import config as config_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def _valid():
  return config_lib.Config(privacy=config_lib.PrivacyConfig(target_epsilon=4.0))


@pytest.mark.parametrize("field,value,message", [
    ("privacy.noise_multiplier", "-1.0", "config.privacy.noise_multiplier=-1.0 must be >= 0"),
    ("privacy.sampling_prob", "1.5", "config.privacy.sampling_prob=1.5 must be in (0, 1]"),
    ("privacy.l2_clip_norm", "0", "config.privacy.l2_clip_norm=0.0 must be > 0"),
    ("privacy.l2_clip_norm", "-2", "config.privacy.l2_clip_norm=-2.0 must be > 0"),
    ("privacy.delta", "1.0", "config.privacy.delta=1.0 must be in (0, 1)"),
    ("privacy.unit", "household", "config.privacy.unit='household' must be one of"),
    ("train.steps", "-5", "config.train.steps=-5 must be >= 0"),
    ("train.learning_rate", "nan", "config.train.learning_rate=nan"),
])
def test_bad_values_name_the_field_and_value(field, value, message):
  cfg = config_lib.override(_valid(), field, value)
  if field == "privacy.noise_multiplier":
    cfg = config_lib.override(cfg, "privacy.target_epsilon", "None")
  with pytest.raises(ValueError) as err:
    config_lib.validate(cfg)
  assert message in str(err.value)


def test_unknown_field_is_an_error_listing_the_known_ones():
  with pytest.raises(ValueError, match="unknown config field 'privacy.sigma'.*noise_multiplier"):
    config_lib.override(_valid(), "privacy.sigma", "1.0")
  with pytest.raises(ValueError, match="unknown config field 'trian'"):
    config_lib.override(_valid(), "trian.steps", "1")


def test_unparseable_value_is_an_error():
  with pytest.raises(ValueError, match="config.train.steps='ten' is not a valid int"):
    config_lib.override(_valid(), "train.steps", "ten")


def test_overrides_are_typed():
  cfg = _valid()
  cfg = config_lib.override(cfg, "train.steps", "12")
  cfg = config_lib.override(cfg, "privacy.enabled", "false")
  cfg = config_lib.override(cfg, "privacy.sampling_prob", "none")
  cfg = config_lib.override(cfg, "privacy.microbatch_size", "8")
  cfg = config_lib.override(cfg, "privacy.reproducible_noise_seed", "3")
  assert cfg.train.steps == 12 and cfg.privacy.enabled is False
  assert cfg.privacy.sampling_prob is None and cfg.privacy.microbatch_size == 8
  assert cfg.privacy.reproducible_noise_seed == 3
  with pytest.raises(ValueError, match="privacy.delta='none' is not a valid float"):
    config_lib.override(cfg, "privacy.delta", "none")   # delta is always given


def test_exactly_one_of_sigma_and_target_epsilon():
  both = config_lib.replace(_valid(), **{"privacy.noise_multiplier": 1.0})
  with pytest.raises(ValueError, match="give exactly one"):
    config_lib.validate(both)
  neither = config_lib.replace(_valid(), **{"privacy.target_epsilon": None})
  with pytest.raises(ValueError, match="give exactly one"):
    config_lib.validate(neither)
  # Non-private runs need neither.
  config_lib.validate(config_lib.replace(neither, **{"privacy.enabled": False}))


def test_truncation_needs_pld():
  cfg = config_lib.replace(_valid(), **{"privacy.overflow": "truncate"})
  with pytest.raises(ValueError, match="privacy.overflow='truncate' needs"):
    config_lib.validate(cfg)
  with pytest.raises(ValueError, match="needs privacy.neighbouring='replace_one'"):
    config_lib.validate(config_lib.replace(cfg, **{"privacy.accountant": "pld"}))
  config_lib.validate(config_lib.replace(cfg, **{"privacy.accountant": "pld",
                                                 "privacy.neighbouring": "replace_one"}))


def test_json_round_trip():
  cfg = config_lib.override(_valid(), "train.steps", "7")
  assert config_lib.from_dict(config_lib.to_dict(cfg)) == cfg


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.py")))
def test_shipped_configs_load_and_validate(path):
  cfg = config_lib.load_file(path)
  config_lib.validate(cfg)
  text = path.read_text()
  assert "python scripts/" in text, f"{path.name} must say how to run it"


def test_train_script_rejects_bad_override_with_a_clear_message():
  out = subprocess.run(
      [sys.executable, str(REPO / "scripts" / "train.py"), "--config",
       str(REPO / "configs" / "quickstart.py"), "--config.privacy.l2_clip_norm=-1"],
      capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert "config.privacy.l2_clip_norm=-1.0 must be > 0" in out.stderr
  out = subprocess.run(
      [sys.executable, str(REPO / "scripts" / "train.py"), "--config",
       str(REPO / "configs" / "quickstart.py"), "--config.privacy.sigma=1"],
      capture_output=True, text=True, timeout=120)
  assert out.returncode != 0 and "unknown config field 'privacy.sigma'" in out.stderr
