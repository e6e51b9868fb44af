"""The workload of a config: data, split, model, loss, optimizer, training units.

Everything here is deterministic given the config (and, for contribution
bounding, the run secret); nothing here is private-aware except
``training_units``, which bounds each user's contribution with the secret's
per-user keys.
"""

import dataclasses
import json
import pathlib
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from privjax import config as config_lib
from privjax.compress import pruning
from privjax.data import bounding
from privjax.data import dataset as dataset_lib
from privjax.data import sequences
from privjax.data import sources
from privjax.data import synthetic
from privjax.dp import noise
from privjax.dp import secret as secret_lib
from privjax.dp import step as dp_step
from privjax.models import registry
from privjax.run import checkpoint


def load_dataset(cfg: config_lib.DataConfig) -> dataset_lib.RecDataset:
  """The dataset a data config names (``privjax.data.sources``)."""
  return sources.load(cfg)


@dataclasses.dataclass
class Workload:
  """Data, task and model of a config, with the functions the loop needs.

  ``params`` are the trainable parameters and ``frozen`` the rest, both as
  plain nested dicts; ``loss_fun(params, frozen, example, rng)`` is the loss of
  ONE example and ``score_fn(params, frozen, inputs)`` scores every item.
  """
  cfg: config_lib.Config
  ds: dataset_lib.RecDataset
  split: sequences.Split
  task: registry.Task
  model: nnx.Module
  graphdef: Any
  params: Any
  frozen: Any
  loss_fun: Any
  score_fn: Any

  def model_with(self, params, frozen=None) -> nnx.Module:
    frozen = self.frozen if frozen is None else frozen
    return nnx.merge(self.graphdef, nnx.State(params), nnx.State(frozen))


def build_workload(cfg: config_lib.Config,
                   ds: dataset_lib.RecDataset | None = None) -> Workload:
  """Loads the data (unless given), splits it and builds the initial model.

  The initial parameters come from the PUBLIC ``train.seed``.
  """
  ds = load_dataset(cfg.data) if ds is None else ds
  split = sequences.leave_last_out(ds)
  task = registry.get(cfg.model.name)
  model = task.build_model(cfg, ds, nnx.Rngs(params=noise.params_key(cfg.train.seed)))
  graphdef, params, frozen = nnx.split(model, task.trainable(cfg), ...)
  params, frozen = nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)
  if not jax.tree.leaves(params):
    raise ValueError(f"config.model.trainable={cfg.model.trainable!r} selects no "
                     f"parameter of model {cfg.model.name!r}")
  loss = task.loss(cfg)

  def merged(params, frozen):
    return nnx.merge(graphdef, nnx.State(params), nnx.State(frozen))

  def loss_fun(params, frozen, example, rng):
    return loss(merged(params, frozen), example, rng)

  score_fn = jax.jit(lambda params, frozen, inputs: task.scores(merged(params, frozen), inputs))
  return Workload(cfg, ds, split, task, model, graphdef, params, frozen, loss_fun,
                  score_fn)


def training_units(w: Workload, secret: secret_lib.RunSecret
                   ) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """The training examples and the rows of each privacy unit.

  Each user keeps at most ``data.max_examples_per_user`` examples, chosen by
  ``bounding.group_rows`` with per-user keys from the secret and the raw user
  ids: the rows a user keeps depend on that user alone.

  Returns:
    ``(examples, unit_rows)``: host arrays with a leading row axis, and int32
    ``[num_units, K]`` row indices (-1 padded); a unit is a user (K =
    max_examples_per_user) or one example (K = 1).
  """
  cfg = w.cfg
  examples, user_of_row = w.task.train_examples(cfg, w.split, w.ds, w.model)
  per_user = bounding.group_rows(
      user_of_row, unit_keys=secret.unit_keys("bounding", w.ds.raw_user_ids),
      max_rows_per_unit=cfg.data.max_examples_per_user)
  if cfg.privacy.unit == "user":
    return examples, per_user[per_user[:, 0] >= 0]
  return examples, np.sort(per_user[per_user >= 0])[:, None]


def probe_batch(w: Workload, num_units: int = 4) -> tuple[dict[str, jax.Array], jax.Array]:
  """A small batch of PUBLIC synthetic examples shaped like the real ones.

  Built from synthetic users over the dataset's (public) catalogue, so a
  decision taken on it (ghost vs vmap) reveals nothing about the private data.
  """
  cfg = w.cfg
  fake = synthetic.generate(num_users=2 * num_units, num_items=max(w.ds.num_items, 10),
                            mean_interactions=max(cfg.data.max_len + 3, 8), seed=0)
  if fake.num_items == w.ds.num_items:
    fake = dataclasses.replace(fake, name="probe", item_titles=w.ds.item_titles)
  split = sequences.leave_last_out(fake)
  examples, user_of_row = w.task.train_examples(cfg, split, fake, w.model)
  rows = bounding.group_rows(
      user_of_row, unit_keys=np.arange(fake.num_users, dtype=np.uint64),
      max_rows_per_unit=cfg.data.max_examples_per_user if cfg.privacy.unit == "user" else 1)
  rows = rows[rows[:, 0] >= 0][:num_units]
  safe = np.where(rows >= 0, rows, 0)
  return ({k: jnp.asarray(v[safe]) for k, v in examples.items()},
          jnp.asarray((rows >= 0).astype(np.float32)))


def base_optimizer(t: config_lib.TrainConfig) -> optax.GradientTransformation:
  """The optax optimizer named by a train config (no pruning)."""
  if t.optimizer == "adam":
    return optax.adam(t.learning_rate)
  if t.optimizer == "adamw":
    return optax.adamw(t.learning_rate)
  return optax.sgd(t.learning_rate)


def make_optimizer(cfg: config_lib.Config, params
                   ) -> tuple[optax.GradientTransformation, pruning.GradualPruning | None]:
  """The optax optimizer of a run, and its gradual-pruning schedule if any."""
  optimizer = base_optimizer(cfg.train)
  if cfg.prune.sparsity <= 0:
    return optimizer, None
  schedule = pruning.GradualPruning(
      final_sparsity=cfg.prune.sparsity, start_step=cfg.prune.start_step,
      end_step=cfg.prune.end_step, frequency=cfg.prune.frequency,
      scope=cfg.prune.scope, pattern=cfg.prune.pattern)
  # Last in the chain: the update of a pruned weight (noise included) is 0.
  optimizer = optax.chain(optimizer, pruning.masked_updates(
      pruning.magnitude_masks(params, sparsity=0.0, pattern=cfg.prune.pattern)))
  return optimizer, schedule


def load_config(workdir: str | pathlib.Path) -> config_lib.Config:
  """The validated config of a run directory."""
  path = pathlib.Path(workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{str(workdir)!r} is not a privjax run directory "
                            "(no config.json)")
  return config_lib.validate(config_lib.from_dict(json.loads(path.read_text())))


def load_trained(workdir: str | pathlib.Path) -> tuple[Workload, Any, int]:
  """The workload of a run directory with its latest checkpointed parameters.

  Returns ``(workload, params, step)``; ``workload.model_with(params)`` is the
  trained model.
  """
  cfg = load_config(workdir)
  ckpt = checkpoint.Checkpointer(workdir)
  step = ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(f"{str(workdir)!r} has no checkpoint")
  w = build_workload(cfg)
  like = dp_step.init_state(w.params, make_optimizer(cfg, w.params)[0])
  restored, _ = ckpt.restore(step, like)
  ckpt.close()
  return w, restored.params, step
