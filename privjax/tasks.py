"""Model families as tasks: examples, per-example loss, eval scores. No DP here.

A ``Task`` tells the trainer how one model family turns the leave-last-out
split into training examples (each tagged with its user, for contribution
bounding and user-level DP), what the loss of ONE example is, and how to
score every item for evaluation. The trainer does everything private.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

from flax import nnx
import jax
import numpy as np

from privjax import config as config_lib
from privjax import losses
from privjax.data import dataset
from privjax.data import sequences
from privjax.models import mlp

Example = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Task:
  """The pieces of one model family.

  Attributes:
    build_model: ``(cfg, ds, rngs) -> nnx.Module``.
    train_examples: ``(cfg, split, ds) -> (examples, user_of_row)``; examples
      is a dict of host arrays with a leading row axis.
    loss: ``(model, example, rng) -> scalar`` for ONE example.
    eval_inputs: ``(cfg, eval_set, ds) -> dict`` of host arrays [B, ...].
    scores: ``(model, inputs) -> [B, num_items]``.
    trainable: ``cfg -> nnx filter`` selecting the trainable parameters.
    uses_rng: whether ``loss`` needs a key (e.g. dropout).
  """
  build_model: Callable[..., nnx.Module]
  train_examples: Callable[..., tuple[dict[str, np.ndarray], np.ndarray]]
  loss: Callable[[nnx.Module, Example, jax.Array | None], jax.Array]
  eval_inputs: Callable[..., dict[str, np.ndarray]]
  scores: Callable[[nnx.Module, Example], jax.Array]
  trainable: Callable[[config_lib.Config], Any] = lambda cfg: nnx.Param
  uses_rng: bool = False


def _mlp_build(cfg: config_lib.Config, ds: dataset.RecDataset,
               rngs: nnx.Rngs) -> nnx.Module:
  return mlp.NextItemMLP(num_items=ds.num_items, max_len=cfg.data.max_len,
                         embed_dim=cfg.model.embed_dim,
                         hidden_dim=cfg.model.hidden_dim, rngs=rngs)


def _history_examples(cfg, split, ds):
  del ds
  return sequences.next_item_examples(split.train, cfg.data.max_len)


def _history_loss(model, example, rng):
  del rng
  return losses.softmax_cross_entropy(model(example["history"]), example["target"])


def _history_eval_inputs(cfg, eval_set, ds):
  del cfg, ds
  return {"history": eval_set.history}


def _history_scores(model, inputs):
  return model(inputs["history"])


MLP = Task(build_model=_mlp_build, train_examples=_history_examples,
           loss=_history_loss, eval_inputs=_history_eval_inputs,
           scores=_history_scores)

_TASKS: dict[str, Task] = {"mlp": MLP}


def register(name: str, task: Task) -> None:
  _TASKS[name] = task


def get(name: str) -> Task:
  if name not in _TASKS:
    raise ValueError(f"config.model.name={name!r} must be one of {sorted(_TASKS)}")
  return _TASKS[name]
