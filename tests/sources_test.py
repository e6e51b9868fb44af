"""Data sources by name: the built-ins, your own, and the warnings they give."""

import dataclasses

import pytest

from privjax import config as config_lib
from privjax.data import sources
from privjax.data import synthetic
from privjax.run import workload as workload_lib


def test_a_registered_source_runs_from_a_config(tiny_cfg):
  def mine(cfg):
    ds = synthetic.generate(num_users=60, num_items=20, mean_interactions=8, seed=cfg.seed)
    return dataclasses.replace(ds, name="mine")

  sources.register("mine", mine)
  try:
    cfg = config_lib.validate(tiny_cfg(**{"data.source": "mine"}))
    assert workload_lib.build_workload(cfg).ds.name == "mine"
    with pytest.raises(ValueError, match="already registered"):
      sources.register("mine", mine)
  finally:
    sources.unregister("mine")
  with pytest.raises(ValueError, match="config.data.source='mine' must be one of"):
    config_lib.validate(tiny_cfg(**{"data.source": "mine"}))


def test_a_source_must_return_a_dataset(tiny_cfg):
  sources.register("broken", lambda cfg: [1, 2, 3])
  try:
    with pytest.raises(TypeError, match="returned list"):
      workload_lib.load_dataset(tiny_cfg(**{"data.source": "broken"}).data)
  finally:
    sources.unregister("broken")


def test_a_path_given_to_synthetic_data_is_a_warning(tiny_cfg):
  with pytest.warns(UserWarning, match="data.path='/some/files' is ignored"):
    workload_lib.load_dataset(tiny_cfg(**{"data.path": "/some/files"}).data)
