"""Data sources by name: ``data.source`` in a config, and ``register`` for your own.

A source is a function ``(data_config) -> RecDataset``. Built in: synthetic
(generated from ``data.seed``), movielens (raw GroupLens files in
``data.path``) and tfds (``data.tfds_name``). ``register("mine", fn)`` makes
``--config.data.source=mine`` load through ``fn`` in every script.

>>> "movielens" in names()
True
"""

import warnings
from collections.abc import Callable
from typing import Any

from privjax.data import dataset as dataset_lib
from privjax.data import synthetic

Loader = Callable[[Any], dataset_lib.RecDataset]


def _synthetic(cfg) -> dataset_lib.RecDataset:
  if cfg.path:
    warnings.warn(f"config.data.path={cfg.path!r} is ignored: data.source='synthetic' "
                  "generates its data (set data.source='movielens' to read files)",
                  stacklevel=3)
  return synthetic.generate(num_users=cfg.num_users, num_items=cfg.num_items,
                            mean_interactions=cfg.mean_interactions, seed=cfg.seed)


def _movielens(cfg) -> dataset_lib.RecDataset:
  from privjax.data import movielens  # pylint: disable=g-import-not-at-top
  return movielens.load(cfg.path)


def _tfds(cfg) -> dataset_lib.RecDataset:
  from privjax.data import tfds  # pylint: disable=g-import-not-at-top
  return tfds.load(cfg.tfds_name, data_dir=cfg.path or None)


_SOURCES: dict[str, Loader] = {"synthetic": _synthetic, "movielens": _movielens,
                               "tfds": _tfds}


def register(name: str, loader: Loader, *, replace: bool = False) -> None:
  """Adds the data source ``name``: ``loader(data_config) -> RecDataset``."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"name={name!r} must be a non-empty str")
  if name in _SOURCES and not replace:
    raise ValueError(f"data source {name!r} is already registered (pass replace=True)")
  _SOURCES[name] = loader


def unregister(name: str) -> None:
  del _SOURCES[name]


def names() -> tuple[str, ...]:
  return tuple(_SOURCES)


def load(cfg) -> dataset_lib.RecDataset:
  """The dataset of a ``privjax.config.DataConfig``."""
  if cfg.source not in _SOURCES:
    raise ValueError(f"config.data.source={cfg.source!r} must be one of {list(_SOURCES)}")
  ds = _SOURCES[cfg.source](cfg)
  if not isinstance(ds, dataset_lib.RecDataset):
    raise TypeError(f"data source {cfg.source!r} returned {type(ds).__name__}, not a "
                    "privjax.data.dataset.RecDataset")
  return ds
