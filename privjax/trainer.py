"""train_and_evaluate(config, workdir): the whole DP-SGD algorithm, top to bottom.

Read this file to see what a privjax run does:

  1. Config     validate once; write (or, on resume, check) the resolved config.
  2. Data       load; leave-last-out split; the NNX model -> (graphdef,
     + model    trainable params, frozen params); training examples;
                contribution bounding (each user keeps at most K examples);
                the privacy units (users or examples).
  3. Privacy    sampling probability q, delta, sigma (given or calibrated to
                the target epsilon for exactly this run length), the budget.
  4. Step       the one jitted DP step (privjax.dp.step), data-parallel;
                clipping by vmap or ghost norms.
  5. Restore    resume from the latest checkpoint: same streams, privacy
                spent carried over.
  6. Train      Poisson-sampled padded batches -> step -> metrics.jsonl,
                checkpoints; stop before a step that would exceed the budget.
  7. Evaluate   full-ranking HR@k / NDCG@k on validation and test users.
  8. Report     privacy.json, report.md, and the printed summary.

All I/O lives here; the step itself is pure.
"""

import dataclasses
import json
import math
import pathlib
import time
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from privjax.dp import accounting
from privjax.run import checkpoint
from privjax import config as config_lib
from privjax.dp import step as dp_step
from privjax.dp import ghost
from privjax.answers import aggregates
from privjax.run import metrics as metrics_lib
from privjax.dp import noise
from privjax.compress import pruning
from privjax.dp import sampling
from privjax.models import registry
from privjax.data import dataset as dataset_lib
from privjax.data import sequences
from privjax.data import synthetic

# Changing any of these between a run and its resumption would change what the
# privacy spent so far means; resuming with a different value is refused.
_FROZEN_ON_RESUME = ("data", "model", "privacy", "train.batch_size",
                     "train.optimizer", "train.learning_rate", "train.seed")


class BudgetExhausted(RuntimeError):
  """The next step would exceed the configured epsilon budget."""


def load_dataset(cfg: config_lib.DataConfig) -> dataset_lib.RecDataset:
  if cfg.source == "synthetic":
    return synthetic.generate(num_users=cfg.num_users, num_items=cfg.num_items,
                              mean_interactions=cfg.mean_interactions, seed=cfg.seed)
  if cfg.source == "movielens":
    from privjax.data import movielens  # pylint: disable=g-import-not-at-top
    return movielens.load(cfg.path)
  from privjax.data import tfds  # pylint: disable=g-import-not-at-top
  return tfds.load(cfg.tfds_name, data_dir=cfg.path or None)


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


def build_workload(cfg: config_lib.Config) -> Workload:
  """Loads the data, splits it and builds the (initial) model for ``cfg``."""
  ds = load_dataset(cfg.data)
  split = sequences.leave_last_out(ds)
  task = registry.get(cfg.model.name)
  streams = noise.KeyStreams(cfg.train.seed)
  model = task.build_model(cfg, ds, nnx.Rngs(params=streams.params_key()))
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


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
  """The public privacy parameters of a run, fixed before training starts."""
  private: bool
  unit: str
  num_units: int
  sampling_prob: float
  expected_batch_size: float
  noise_multiplier: float
  l2_clip_norm: float
  delta: float
  accountant: str
  steps: int            # steps this run will take (<= the budget allows)
  epsilon_budget: float | None
  truncated_batch_size: int | None

  def epsilon(self, steps: int, accountant: str | None = None) -> float:
    if not self.private:
      return math.inf
    return accounting.dpsgd_epsilon(
        sampling_prob=self.sampling_prob, noise_multiplier=self.noise_multiplier,
        steps=steps, delta=self.delta, accountant=accountant or self.accountant,
        **self._truncation())

  def _truncation(self) -> dict[str, Any]:
    if self.truncated_batch_size is None:
      return {}
    return {"dataset_size": self.num_units,
            "truncated_batch_size": self.truncated_batch_size}

  def statement(self, steps_done: int, extra: dict[str, Any]) -> dict[str, Any]:
    if not self.private:
      return {"private": False, "unit": self.unit, "epsilon": "inf",
              "neighbouring_relation": "none: this run is NOT differentially private",
              "steps": steps_done, **extra}
    out = accounting.privacy_statement(
        unit=self.unit, sampling_prob=self.sampling_prob,
        noise_multiplier=self.noise_multiplier, l2_clip_norm=self.l2_clip_norm,
        steps=steps_done, delta=self.delta, accountant=self.accountant,
        extra=extra, **self._truncation())
    return {"private": True, **out}


def plan_privacy(cfg: config_lib.Config, num_units: int,
                 sampler_bucket_max: int) -> PrivacyPlan:
  p = cfg.privacy
  q = p.sampling_prob if p.sampling_prob is not None else cfg.train.batch_size / num_units
  if q > 1:
    raise ValueError(
        f"config.train.batch_size={cfg.train.batch_size} exceeds the number of "
        f"privacy units ({num_units} {p.unit}s): sampling probability {q:.3f} > 1")
  delta = p.delta if p.delta is not None else 1.0 / num_units ** 1.1
  truncated = sampler_bucket_max if p.overflow == "truncate" else None
  steps = cfg.train.steps
  if not p.enabled:
    return PrivacyPlan(False, p.unit, num_units, q, q * num_units, 0.0, math.inf,
                       delta, p.accountant, steps, None, None)
  trunc = ({"dataset_size": num_units, "truncated_batch_size": truncated}
           if truncated else {})
  if p.noise_multiplier is not None:
    sigma = p.noise_multiplier
  else:
    sigma = accounting.calibrate_noise_multiplier(
        target_epsilon=p.target_epsilon, sampling_prob=q, steps=max(steps, 1),
        delta=delta, accountant=p.accountant, **trunc)
  budget = p.epsilon_budget if p.epsilon_budget is not None else p.target_epsilon
  if budget is not None and sigma > 0:
    allowed = accounting.max_steps(sampling_prob=q, noise_multiplier=sigma,
                                   delta=delta, epsilon_budget=budget,
                                   accountant=p.accountant, **trunc)
    steps = min(steps, allowed)
  elif budget is not None:
    steps = 0
  return PrivacyPlan(True, p.unit, num_units, q, q * num_units, sigma,
                     p.l2_clip_norm, delta, p.accountant, steps, budget, truncated)


def choose_clipping(requested: str, loss_fun, params, frozen,
                    examples: dict[str, np.ndarray], unit_rows: np.ndarray) -> str:
  """Resolves ``vmap | ghost | auto`` to the implementation the step uses.

  Ghost needs a rule for every trainable leaf to be fast (leaves without one
  fall back to exact per-unit gradients), and must agree with the exact vmap
  path. ``verify`` checks that once, on the first few units' examples: the
  outcome is a property of the model code (a parameter read outside the
  tapped layers), not of the data, and nothing computed here is released.
  "ghost" refuses a model that fails the check; "auto" falls back to vmap.
  """
  if requested == "vmap":
    return "vmap"
  per_example = lambda p, ex, r: loss_fun(p, frozen, ex, r)
  first = {k: v[unit_rows[0, 0]] for k, v in examples.items()}
  cov = ghost.coverage(per_example, params, first)
  if requested == "auto" and not cov.complete:
    print(f"privjax: clipping=auto -> vmap (no ghost rule for {list(cov.untapped)})")
    return "vmap"
  rows = unit_rows[: min(4, len(unit_rows))]
  safe = np.where(rows >= 0, rows, 0)
  batch = {k: jnp.asarray(v[safe]) for k, v in examples.items()}
  mask = jnp.asarray((rows >= 0).astype(np.float32))
  bad = ghost.verify(per_example, params, batch, mask)
  if bad:
    if requested == "ghost":
      raise ValueError(
          "config.privacy.clipping='ghost' is not exact for this model: ghost norms "
          f"disagree with per-example gradients for {bad}. Some parameter is used "
          "outside the privjax.models.nn layers; use clipping='vmap'.")
    print(f"privjax: clipping=auto -> vmap (ghost disagrees on {bad})")
    return "vmap"
  return "ghost"


def _check_or_write_config(cfg: config_lib.Config, workdir: pathlib.Path) -> bool:
  """Writes config.json; on resume, refuses privacy-relevant changes."""
  path = workdir / "config.json"
  resumed = path.exists() and (workdir / "checkpoints").exists()
  if resumed:
    saved = config_lib.from_dict(json.loads(path.read_text()))
    changed = [f for f in _FROZEN_ON_RESUME
               if config_lib.get(saved, f) != config_lib.get(cfg, f)]
    if (saved.train.steps != cfg.train.steps and cfg.privacy.enabled
        and cfg.privacy.target_epsilon is not None):
      changed.append("train.steps (sigma is calibrated to the run length; "
                     "give privacy.noise_multiplier to extend a run)")
    if changed:
      raise ValueError(
          f"workdir {str(workdir)!r} holds a run with a different config "
          f"({', '.join(changed)}); resuming would misstate the privacy spent. "
          "Use a new --workdir.")
  path.write_text(config_lib.to_json(cfg))
  return resumed


def _gather(examples: dict[str, np.ndarray], unit_rows: np.ndarray,
            batch: sampling.SampledBatch) -> tuple[dict[str, np.ndarray], np.ndarray]:
  rows = unit_rows[batch.indices]                        # [G, K]
  mask = batch.mask[:, None] & (rows >= 0)
  safe = np.where(rows >= 0, rows, 0)
  return {k: v[safe] for k, v in examples.items()}, mask.astype(np.float32)


def evaluate(w: "Workload", params, frozen, which: str) -> dict[str, float]:
  """Full-ranking HR@k / NDCG@k (plus sampled ones if configured)."""
  cfg, split, ds, model_fn = w.cfg, w.split, w.ds, w.score_fn
  es = sequences.eval_set(split, which, cfg.data.max_len)
  inputs = w.task.eval_inputs(cfg, es, ds, w.model_with(params, frozen))
  k, bs = cfg.eval.k, cfg.eval.batch_size
  all_ranks, sampled = [], []
  for start in range(0, len(es.target), bs):
    sl = slice(start, start + bs)
    chunk = {key: v[sl] for key, v in inputs.items()}
    n = len(es.target[sl])
    if n < bs:  # pad to one static shape: a single compile
      chunk = {key: np.concatenate([v, np.repeat(v[:1], bs - n, 0)]) for key, v in chunk.items()}
    scores = np.asarray(model_fn(params, frozen, chunk))[:n]
    all_ranks.append(np.asarray(metrics_lib.ranks(scores, es.target[sl], es.exclude[sl])))
    if cfg.eval.sampled_negatives:
      sampled.append(metrics_lib.sampled_ranks(
          scores, es.target[sl], es.exclude[sl], cfg.eval.sampled_negatives,
          seed=start))
  ranks = np.concatenate(all_ranks) if all_ranks else np.zeros(0, np.int32)
  hr, ndcg = metrics_lib.hit_rate_ndcg(ranks, k)
  out = {f"hr@{k}": hr, f"ndcg@{k}": ndcg, "num_users": int(len(ranks))}
  if sampled:
    shr, sndcg = metrics_lib.hit_rate_ndcg(np.concatenate(sampled), k)
    out[f"sampled{cfg.eval.sampled_negatives}/hr@{k}"] = shr
    out[f"sampled{cfg.eval.sampled_negatives}/ndcg@{k}"] = sndcg
  return out


def popularity_metrics(cfg: config_lib.Config, split: sequences.Split,
                       ds: dataset_lib.RecDataset, which: str = "test") -> dict[str, float]:
  """Non-private most-popular baseline (training counts), same protocol."""
  counts = np.bincount(np.concatenate(split.train), minlength=ds.num_items).astype(np.float32)
  es = sequences.eval_set(split, which, cfg.data.max_len)
  scores = np.broadcast_to(counts, (len(es.target), ds.num_items))
  ranks = np.asarray(metrics_lib.ranks(scores, es.target, es.exclude))
  hr, ndcg = metrics_lib.hit_rate_ndcg(ranks, cfg.eval.k)
  return {f"hr@{cfg.eval.k}": hr, f"ndcg@{cfg.eval.k}": ndcg, "num_users": int(len(ranks))}


def dp_popularity_metrics(cfg: config_lib.Config, split: sequences.Split,
                          ds: dataset_lib.RecDataset, *, epsilon: float,
                          delta: float | None, seed: int,
                          max_items_per_user: int = 20) -> dict[str, float]:
  """The DP popularity recommender, same protocol as ``popularity_metrics``.

  Item counts from the training sequences with each user in at most
  ``max_items_per_user`` items, released by ``aggregates.dp_item_popularity``
  (user-level (epsilon, delta)-DP; discrete Gaussian when delta is given).
  ``epsilon = inf`` gives the plain (non-private) counts. The noise is seeded:
  for simulation, not for release.
  """
  user = np.concatenate([np.full(len(s), u) for u, s in enumerate(split.train)])
  item = np.concatenate(split.train)
  if math.isinf(epsilon):
    counts = np.bincount(item, minlength=ds.num_items).astype(np.float32)
  else:
    counts, _ = aggregates.dp_item_popularity(
        user, item, num_items=ds.num_items, max_items_per_user=max_items_per_user,
        epsilon=epsilon, delta=delta, rng=seed, seed=seed)
  es = sequences.eval_set(split, "test", cfg.data.max_len)
  scores = np.broadcast_to(np.asarray(counts, np.float32), (len(es.target), ds.num_items))
  ranks = np.asarray(metrics_lib.ranks(scores, es.target, es.exclude))
  hr, ndcg = metrics_lib.hit_rate_ndcg(ranks, cfg.eval.k)
  return {f"hr@{cfg.eval.k}": hr, f"ndcg@{cfg.eval.k}": ndcg, "num_users": int(len(ranks))}


def _json_default(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating, jax.Array)):
    return float(x)
  raise TypeError(f"not JSON serializable: {type(x)}")


def _finite_or_str(x: float) -> float | str:
  return x if math.isfinite(x) else "inf"


def train_and_evaluate(cfg: config_lib.Config, workdir: str | pathlib.Path, *,
                       show_progress: bool = True,
                       stop_after_steps: int | None = None) -> dict[str, Any]:
  """Trains, evaluates and reports one run in ``workdir``; resumes if present.

  Args:
    cfg: the run's config (validated here).
    workdir: run directory; an existing run there is resumed exactly.
    show_progress: show a progress bar.
    stop_after_steps: stop this invocation after that many steps (checkpoint
      saved), as a preemption would; running again resumes.

  Returns:
    A dict with the validation and test metrics, epsilon, delta, sigma, the
    steps taken and why training stopped.
  """
  t_start = time.time()
  # ========================================================================
  # 1. Config
  # ========================================================================
  config_lib.validate(cfg)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  resuming = _check_or_write_config(cfg, workdir)

  # ========================================================================
  # 2. Data and model: split, NNX model -> (graphdef, trainable, frozen),
  #    examples, contribution bounding, privacy units
  # ========================================================================
  w = build_workload(cfg)
  task, ds, split, params, frozen = w.task, w.ds, w.split, w.params, w.frozen
  examples, user_of_row = task.train_examples(cfg, split, ds, w.model)
  per_user = sampling.group_rows(user_of_row, num_units=ds.num_users,
                                 max_rows_per_unit=cfg.data.max_examples_per_user,
                                 seed=cfg.data.seed)
  if cfg.privacy.unit == "user":
    unit_rows = per_user[per_user[:, 0] >= 0]             # [users, K]
  else:
    unit_rows = np.sort(per_user[per_user >= 0])[:, None]  # [examples, 1]
  num_units = len(unit_rows)

  # ========================================================================
  # 3. Privacy plan: q, delta, sigma, budget; the sampler we account for
  # ========================================================================
  num_devices = jax.local_device_count()
  multiple = num_devices * (cfg.privacy.microbatch_size or 1)
  q_guess = cfg.privacy.sampling_prob or min(cfg.train.batch_size / num_units, 1.0)
  buckets = sampling.bucket_sizes(num_units=num_units, sampling_prob=q_guess,
                                  multiple_of=multiple)
  plan = plan_privacy(cfg, num_units, max(buckets))
  sampler = sampling.PoissonSampler(
      sampling_prob=plan.sampling_prob, seed=cfg.train.seed, bucket_sizes=buckets,
      overflow=cfg.privacy.overflow)
  if plan.steps < cfg.train.steps:
    print(f"privjax: the epsilon budget {plan.epsilon_budget} allows {plan.steps} of "
          f"the {cfg.train.steps} configured steps; training stops there.")

  # ========================================================================
  # 4. Step: one jitted function, data-parallel over local devices
  # ========================================================================
  streams = noise.KeyStreams(cfg.train.seed)
  loss_fun, score_fn = w.loss_fun, w.score_fn
  clipping_mode = choose_clipping(cfg.privacy.clipping, loss_fun, params, frozen,
                                  examples, unit_rows) if plan.private else "vmap"
  optimizer, schedule = make_optimizer(cfg, params)
  step_fn = dp_step.make_step(loss_fun, optimizer, dp_step.StepConfig(
      private=plan.private, l2_clip_norm=cfg.privacy.l2_clip_norm,
      noise_multiplier=plan.noise_multiplier,
      expected_batch_size=plan.expected_batch_size, per_layer=cfg.privacy.per_layer,
      microbatch_size=cfg.privacy.microbatch_size, clipping=clipping_mode))
  mesh = dp_step.make_mesh()
  batch_sharding = dp_step.data_sharding(mesh)
  state = jax.device_put(dp_step.init_state(params, optimizer), dp_step.replicated(mesh))
  frozen = jax.device_put(frozen, dp_step.replicated(mesh))

  # ========================================================================
  # 5. Restore: exact resume, privacy spent carried over
  # ========================================================================
  ckpt = checkpoint.Checkpointer(workdir, max_to_keep=cfg.train.max_checkpoints)
  start = 0
  if resuming and ckpt.latest_step() is not None:
    restored, meta = ckpt.restore(ckpt.latest_step(), state)
    state = jax.device_put(restored, dp_step.replicated(mesh))
    start = int(meta["steps_done"])
    if meta["sampler"]["seed"] != cfg.train.seed:
      raise ValueError("checkpoint sampler seed differs from config.train.seed")
    print(f"privjax: resumed {workdir} at step {start} "
          f"(epsilon spent so far {meta['epsilon']})")

  # ========================================================================
  # 6. Train
  # ========================================================================
  metrics_file = (workdir / "metrics.jsonl").open("a")

  def write(record: dict[str, Any]):
    metrics_file.write(json.dumps(record, default=_json_default) + "\n")
    metrics_file.flush()

  def save(step: int):
    eps = plan.epsilon(step)
    ckpt.save(step, state, {
        "steps_done": step, "epsilon": _finite_or_str(eps),
        "sampler": {"seed": cfg.train.seed, "step": step},
        "noise_key_stream": {"seed": cfg.train.seed, "stream": "noise",
                             "next_step": step},
        "privacy": {"noise_multiplier": plan.noise_multiplier,
                    "sampling_prob": plan.sampling_prob, "delta": plan.delta,
                    "accountant": plan.accountant}})

  stop_reason = "completed"
  step = start
  last_metrics: dict[str, float] = {}
  t_loop = time.time()
  bar = tqdm.tqdm(total=plan.steps, initial=start, disable=not show_progress,
                  desc=cfg.name, dynamic_ncols=True)
  for step in range(start, plan.steps):
    if schedule is not None and schedule.is_due(step):
      # Masks from the current private parameters: post-processing.
      masks = optax.tree_utils.tree_get(state.opt_state, "masks")
      new_params, masks = pruning.update_masks_if_due(state.params, masks, step,
                                                      schedule=schedule)
      state = jax.device_put(state._replace(
          params=new_params,
          opt_state=optax.tree_utils.tree_set(state.opt_state, masks=masks)),
          dp_step.replicated(mesh))
    batch = sampler.sample(step, num_units)
    host_batch, mask = _gather(examples, unit_rows, batch)
    device_batch = jax.device_put(host_batch, batch_sharding)
    device_mask = jax.device_put(mask, batch_sharding)
    rng = streams.dropout_key(step) if task.uses_rng(cfg) else None
    state, m = step_fn(state, frozen, device_batch, device_mask,
                       streams.noise_key(step), rng)
    done = step + 1
    if done % max(cfg.train.log_every, 1) == 0 or done == plan.steps:
      last_metrics = {k: float(v) for k, v in m.items()}
      if not math.isfinite(last_metrics["nonprivate/loss"]):
        stop_reason = f"non-finite loss at step {done}"
        break
      eps = plan.epsilon(done)
      if schedule is not None:
        masks = optax.tree_utils.tree_get(state.opt_state, "masks")
        last_metrics["sparsity"] = pruning.sparsity_report(state.params, masks)[
            "sparsity/total"]
      write({"step": done, "epsilon": _finite_or_str(eps), **last_metrics,
             "nonprivate/batch_padded": int(len(batch.indices)),
             "steps_per_sec": (done - start) / max(time.time() - t_loop, 1e-9)})
      bar.set_postfix(loss=f"{last_metrics['nonprivate/loss']:.3f}",
                      eps=f"{eps:.2f}")
    if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done < plan.steps:
      valid = evaluate(w, state.params, frozen, "valid")
      write({"step": done, **{f"eval/valid/{k}": v for k, v in valid.items()}})
    if cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0:
      save(done)
    bar.update(1)
    if stop_after_steps is not None and done - start >= stop_after_steps and done < plan.steps:
      stop_reason = (f"interrupted after {done} steps (stop_after_steps); run "
                     "again with the same workdir to resume")
      break
  else:
    if plan.steps < cfg.train.steps:
      stop_reason = (f"epsilon budget {plan.epsilon_budget}: the next step would "
                     "exceed it")
  bar.close()
  steps_done = int(state.step)
  train_time = time.time() - t_loop
  if steps_done > start or ckpt.latest_step() is None:
    save(steps_done)
  ckpt.close()
  metrics_file.close()

  # ========================================================================
  # 7. Evaluate
  # ========================================================================
  results = {
      "valid": evaluate(w, state.params, frozen, "valid"),
      "test": evaluate(w, state.params, frozen, "test"),
  }
  with (workdir / "metrics.jsonl").open("a") as f:
    for which in ("valid", "test"):
      f.write(json.dumps({"step": steps_done, **{
          f"eval/{which}/{k}": v for k, v in results[which].items()}}) + "\n")

  # ========================================================================
  # 8. Report
  # ========================================================================
  extra = {
      "num_units": num_units,
      "expected_batch_size": plan.expected_batch_size,
      "max_examples_per_user": cfg.data.max_examples_per_user,
      "dataset": ds.name,
      "clipping": clipping_mode,
      "per_layer_clipping": cfg.privacy.per_layer,
      "epsilon_budget": plan.epsilon_budget,
      "target_epsilon": cfg.privacy.target_epsilon,
      "stop_reason": stop_reason,
  }
  statement = plan.statement(steps_done, extra)
  (workdir / "privacy.json").write_text(json.dumps(statement, indent=2,
                                                   default=_json_default))
  eps = plan.epsilon(steps_done)
  results.update({
      "name": cfg.name, "private": plan.private, "unit": plan.unit,
      "epsilon": eps, "delta": plan.delta,
      "noise_multiplier": plan.noise_multiplier, "steps": steps_done,
      "stop_reason": stop_reason, "train_seconds": train_time,
      "wall_seconds": time.time() - t_start, "last_metrics": last_metrics,
  })
  (workdir / "report.md").write_text(_report(cfg, plan, results))
  (workdir / "results.json").write_text(json.dumps(
      {k: (_finite_or_str(v) if isinstance(v, float) else v) for k, v in results.items()},
      indent=2, default=_json_default))
  return results


def load_trained(workdir: str | pathlib.Path) -> tuple[Workload, Any, int]:
  """The workload of a run directory with its latest checkpointed parameters.

  Returns ``(workload, params, step)``; ``workload.model_with(params)`` is the
  trained model.
  """
  workdir = pathlib.Path(workdir)
  path = workdir / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{str(workdir)!r} is not a privjax run directory "
                            "(no config.json)")
  cfg = config_lib.validate(config_lib.from_dict(json.loads(path.read_text())))
  ckpt = checkpoint.Checkpointer(workdir)
  step = ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(f"{str(workdir)!r} has no checkpoint")
  w = build_workload(cfg)
  like = dp_step.init_state(w.params, make_optimizer(cfg, w.params)[0])
  restored, _ = ckpt.restore(step, like)
  ckpt.close()
  return w, restored.params, step


def evaluate_workdir(workdir: str | pathlib.Path) -> dict[str, Any]:
  """Recomputes validation and test metrics from a run's latest checkpoint."""
  w, params, step = load_trained(workdir)
  return {"step": step,
          "valid": evaluate(w, params, w.frozen, "valid"),
          "test": evaluate(w, params, w.frozen, "test")}


def _report(cfg, plan: PrivacyPlan, r: dict[str, Any]) -> str:
  k = cfg.eval.k
  lines = [f"# privjax run: {cfg.name}", ""]
  if plan.private:
    lines += [
        f"- Privacy: ({r['epsilon']:.3f}, {plan.delta:.2e})-DP at the level of one "
        f"{plan.unit} ({plan.accountant.upper()} accountant), Poisson sampling "
        f"q={plan.sampling_prob:.5f} over {plan.num_units} {plan.unit}s, "
        f"sigma={plan.noise_multiplier:.4f}, C={plan.l2_clip_norm}, "
        f"{r['steps']} steps.",
    ]
  else:
    lines += ["- Privacy: NONE. This run is not differentially private."]
  lines += [
      f"- Stopped: {r['stop_reason']}.",
      f"- Test (full ranking over unseen items, {r['test']['num_users']} users): "
      f"HR@{k}={r['test'][f'hr@{k}']:.4f}, NDCG@{k}={r['test'][f'ndcg@{k}']:.4f}.",
      f"- Validation: HR@{k}={r['valid'][f'hr@{k}']:.4f}, "
      f"NDCG@{k}={r['valid'][f'ndcg@{k}']:.4f}.",
      f"- Training time {r['train_seconds']:.1f} s; wall time {r['wall_seconds']:.1f} s.",
      "", "Files: config.json, privacy.json, metrics.jsonl, checkpoints/.", ""]
  return "\n".join(lines)


def run_with_baselines(cfg: config_lib.Config, workdir: str | pathlib.Path, *,
                       show_progress: bool = True) -> dict[str, Any]:
  """The main run, plus (if ``cfg.compare_baselines``) its non-private twin and
  popularity, evaluated with the same protocol. Returns rows for a table."""
  workdir = pathlib.Path(workdir)
  rows = {"dp": train_and_evaluate(cfg, workdir, show_progress=show_progress)}
  if cfg.compare_baselines:
    twin = config_lib.replace(cfg, **{"privacy.enabled": False,
                                      "name": cfg.name + "-nonprivate"})
    rows["nonprivate"] = train_and_evaluate(twin, workdir / "nonprivate",
                                            show_progress=show_progress)
    ds = load_dataset(cfg.data)
    split = sequences.leave_last_out(ds)
    rows["popularity"] = {"test": popularity_metrics(cfg, split, ds, "test"),
                          "valid": popularity_metrics(cfg, split, ds, "valid")}
  return rows


def summary_table(cfg: config_lib.Config, rows: dict[str, Any]) -> str:
  k = cfg.eval.k
  lines = [f"{'model':<34} {'epsilon':>9} {'HR@' + str(k):>8} {'NDCG@' + str(k):>8}"]
  for name, r in rows.items():
    if name == "dp":
      label = f"{cfg.model.name} DP-SGD ({r['unit']}-level)" if r["private"] else cfg.model.name
      eps = f"{r['epsilon']:.3f}" if math.isfinite(r["epsilon"]) else "inf"
    elif name == "nonprivate":
      label, eps = f"{cfg.model.name} non-private", "inf"
    else:
      label, eps = "popularity (non-private)", "inf"
    lines.append(f"{label:<34} {eps:>9} {r['test'][f'hr@{k}']:>8.4f} "
                 f"{r['test'][f'ndcg@{k}']:>8.4f}")
  return "\n".join(lines)
