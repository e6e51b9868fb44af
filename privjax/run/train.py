"""train_and_evaluate(config, workdir): the whole DP-SGD algorithm, top to bottom.

  1. Config    validate once; write (or, on resume, check) config.json; the
               run secret (created, or read on resume).
  2. Data      the workload (data, split, model); training examples; each
               user's contribution bounded with the secret's per-user keys.
  3. Plan      q, the divisor, sigma, the steps the budget allows, the sampler
               and noise keys: one frozen ``dp.plan.Plan``.
  4. Step      the one jitted DP step, data-parallel; ghost or vmap clipping,
               decided on public probe data.
  5. Restore   the latest checkpoint, if any (same secret, same streams).
  6. Train     Poisson-sampled padded batches -> step -> metrics.jsonl,
               checkpoints; stop before a step that would exceed the budget.
  7. Evaluate  full-ranking HR@k / NDCG@k (not covered by the guarantee).
  8. Report    privacy.json; nonprivate/report.md, results.json.

All I/O lives here; the step itself is pure.
"""

import dataclasses
import json
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from privjax import config as config_lib
from privjax.compress import pruning
from privjax.data import dataset as dataset_lib
from privjax.data import sequences
from privjax.dp import ghost
from privjax.dp import plan as plan_lib
from privjax.dp import sampling
from privjax.dp import secret as secret_lib
from privjax.dp import step as dp_step
from privjax.run import checkpoint
from privjax.run import evaluate as evaluate_lib
from privjax.run import report
from privjax.run import workdir as workdir_lib
from privjax.run import workload as workload_lib

# Changing any of these between a run and its resumption would change what the
# privacy spent so far means; resuming with a different value is refused.
_FROZEN_ON_RESUME = ("data", "model", "privacy", "prune", "train.batch_size",
                     "train.optimizer", "train.learning_rate", "train.seed")


def train_and_evaluate(cfg: config_lib.Config, workdir: str | pathlib.Path, *,
                       ds: dataset_lib.RecDataset | None = None,
                       show_progress: bool = True,
                       stop_after_steps: int | None = None) -> dict[str, Any]:
  """Trains, evaluates and reports one run in ``workdir``; resumes if present.

  Args:
    cfg: the run's config (validated here).
    workdir: run directory; an existing run there is resumed exactly.
    ds: the dataset, instead of loading ``cfg.data`` (e.g. one with canary
      users inserted by an audit); a resume must pass the same data.
    show_progress: show a progress bar.
    stop_after_steps: stop this invocation after that many steps (checkpoint
      saved), as a preemption would; running again resumes.

  Returns:
    A dict with the validation and test metrics, epsilon, delta, sigma, the
    steps taken, why training stopped (``interrupted`` if by a signal), and
    the ``plan``.

  Raises:
    workdir.WorkdirBusyError: another run holds ``workdir``.
    ValueError, FileNotFoundError, ...: a bad config or data, or a resume
      that cannot be honest; nothing of a new run is left behind.
  """
  config_lib.validate(cfg)
  workdir = pathlib.Path(workdir)
  existed = {p.name for p in workdir.iterdir()} if workdir.exists() else set()
  with workdir_lib.lock(workdir), workdir_lib.Interrupts() as stop:
    progress = {"started": False}
    try:
      return _run(cfg, workdir, ds, show_progress, stop_after_steps, stop, progress)
    except BaseException:
      if not progress["started"] and "checkpoints" not in existed:
        workdir_lib.cleanup_if_new(workdir, existed)
      raise


def _run(cfg, workdir, ds, show_progress, stop_after_steps, stop, progress):
  """``train_and_evaluate`` inside its guards: the algorithm, top to bottom."""
  t_start = time.time()
  # 1. Config and secret.
  resuming = _check_or_write_config(cfg, workdir)
  secret = secret_lib.for_run(workdir, resuming=resuming,
                              reproducible_seed=cfg.privacy.reproducible_noise_seed)
  if secret.reproducible:
    print("privjax: WARNING " + secret_lib.REPRODUCIBLE_WARNING.format(
        seed=secret.reproducible_seed))

  # 2. Data and model; each user's rows bounded with the secret's keys.
  w = workload_lib.build_workload(cfg, ds)
  examples, unit_rows = workload_lib.training_units(w, secret)

  # 3. The privacy plan. len(unit_rows) is private: the plan reads it only
  #    through a DP count (or as the public N of replace-one DP).
  p = cfg.privacy
  plan = plan_lib.make_plan(
      unit=p.unit, relation=p.neighbouring, private=p.enabled,
      target_epsilon=p.target_epsilon, noise_multiplier=p.noise_multiplier,
      sampling_prob=p.sampling_prob, batch_size=cfg.train.batch_size,
      steps=cfg.train.steps, num_units=len(unit_rows), delta=p.delta,
      l2_clip_norm=p.l2_clip_norm, secret=secret, accountant=p.accountant,
      epsilon_budget=p.epsilon_budget, count_epsilon=p.count_epsilon,
      overflow=p.overflow, per_layer=p.per_layer, microbatch_size=p.microbatch_size,
      multiple_of=jax.local_device_count() * (p.microbatch_size or 1),
      unit_description=(w.task.describe_example(cfg) if p.unit == "example" else
                        "one user with all of their training examples "
                        f"(at most {cfg.data.max_examples_per_user})"))
  if plan.steps < cfg.train.steps:
    print(f"privjax: the epsilon budget {plan.epsilon_budget} allows {plan.steps} of "
          f"the {cfg.train.steps} configured steps; training stops there.")
  if plan.private and plan.noise_multiplier / plan.divisor > 0.5:
    print(f"privjax: WARNING sigma={plan.noise_multiplier:.4g} over an expected batch of "
          f"{plan.divisor:.4g} units puts noise of {plan.noise_multiplier / plan.divisor:.3g}"
          " x C on every coordinate of the mean gradient, more than the whole clipped "
          "signal: expect a model near chance. Raise train.batch_size (or q), lower "
          "train.steps, or accept a larger epsilon.")

  # 4. Step: one jitted function, data-parallel over local devices.
  frozen_loss = lambda params, ex, rng: w.loss_fun(params, w.frozen, ex, rng)
  clipping_mode = (ghost.resolve_clipping(p.clipping, frozen_loss, w.params,
                                          *workload_lib.probe_batch(w))
                   if plan.private else "vmap")
  optimizer, schedule = workload_lib.make_optimizer(cfg, w.params)
  step_fn = dp_step.make_step(w.loss_fun, optimizer, plan.step_config(clipping_mode))
  mesh = dp_step.make_mesh()
  replicated, batch_sharding = dp_step.replicated(mesh), dp_step.data_sharding(mesh)
  state = jax.device_put(dp_step.init_state(w.params, optimizer), replicated)
  frozen = jax.device_put(w.frozen, replicated)
  sampler, streams = plan.sampler(), plan.streams()

  # 5. Restore: exact resume with the same secret; privacy spent carried over.
  ckpt = checkpoint.Checkpointer(workdir, max_to_keep=cfg.train.max_checkpoints)
  start = 0
  if resuming and ckpt.latest_step() is not None:
    restored, meta = ckpt.restore_latest(state)
    _check_resume(meta, secret, plan, workdir)
    state, start = jax.device_put(restored, replicated), int(meta["steps_done"])
    print(f"privjax: resumed {workdir} at step {start} "
          f"(epsilon spent so far {meta['epsilon']})")

  dp_release = plan.private and not secret.reproducible

  def save(step: int):
    ckpt.save(step, state, {
        "steps_done": step, "epsilon": report.finite_or_str(plan.epsilon(step)),
        "secret_fingerprint": secret.fingerprint, "dp_release": dp_release,
        "reproducible_noise": secret.reproducible,
        "noisy_num_units": plan.noisy_num_units,
        "privacy": {"noise_multiplier": plan.noise_multiplier,
                    "sampling_prob": plan.sampling_prob, "delta": plan.delta,
                    "accountant": plan.accountant}})

  # 6. Train.
  writer = report.MetricsWriter(workdir, start=start, dp_release=dp_release,
                                reproducible=secret.reproducible)
  write = writer.write
  stop_reason, last_metrics, t_loop = "completed", {}, time.time()
  bar = tqdm.tqdm(total=plan.steps, initial=start, disable=not show_progress,
                  desc=cfg.name, dynamic_ncols=True)
  for step in range(start, plan.steps):
    if schedule is not None and schedule.is_due(step):
      state = jax.device_put(_update_masks(state, step, schedule), replicated)
    batch = sampler.sample(step, len(unit_rows))
    host_batch, mask = _gather(examples, unit_rows, batch)
    rng = streams.dropout_key(step) if w.task.uses_rng(cfg) else None
    state, m = step_fn(state, frozen, jax.device_put(host_batch, batch_sharding),
                       jax.device_put(mask, batch_sharding), streams.noise_key(step), rng)
    done = step + 1
    progress["started"] = True
    if done % max(cfg.train.log_every, 1) == 0 or done == plan.steps:
      last_metrics = {k: float(v) for k, v in m.items()}
      # Stop on non-finite PARAMETERS (post-processing of the DP release), not
      # on the non-private loss, whose finiteness depends on the data.
      if not all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state.params)):
        stop_reason = f"non-finite parameters at step {done}"
        break
      eps = plan.epsilon(done)
      if schedule is not None:
        masks = optax.tree_utils.tree_get(state.opt_state, "masks")
        last_metrics["sparsity"] = pruning.sparsity_report(state.params, masks)[
            "sparsity/total"]
      write({"step": done, "epsilon": report.finite_or_str(eps), **last_metrics,
             "nonprivate/batch_padded": int(len(batch.indices)),
             "nonprivate/steps_per_sec": (done - start) / max(time.time() - t_loop, 1e-9)})
      bar.set_postfix(loss=f"{last_metrics['nonprivate/loss']:.3f}", eps=f"{eps:.2f}")
    if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done < plan.steps:
      valid = evaluate_lib.evaluate(w, state.params, frozen, "valid")
      write({"step": done, **_eval_record("valid", valid)})
    if cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0:
      save(done)
    bar.update(1)
    if stop.requested and done < plan.steps:
      stop_reason = (f"interrupted by {stop.requested} after {done} steps (checkpoint "
                     "saved); run again with the same workdir to resume")
      break
    if stop_after_steps is not None and done - start >= stop_after_steps and done < plan.steps:
      stop_reason = (f"interrupted after {done} steps (stop_after_steps); run "
                     "again with the same workdir to resume")
      break
  else:
    if plan.steps < cfg.train.steps:
      stop_reason = f"epsilon budget {plan.epsilon_budget}: the next step would exceed it"
  bar.close()
  steps_done, train_time = int(state.step), time.time() - t_loop
  if steps_done > start or ckpt.latest_step() is None:
    save(steps_done)
  ckpt.close()
  if stop.requested:   # the user asked to stop: save, state, and skip the evaluation
    writer.close()
    (workdir / "privacy.json").write_text(json.dumps(
        plan.statement(steps_done, {"stop_reason": stop_reason}), indent=2,
        default=report.json_default))
    print(f"privjax: {stop_reason}")
    return {"name": cfg.name, "private": plan.private, "interrupted": True,
            "epsilon": plan.epsilon(steps_done), "steps": steps_done,
            "stop_reason": stop_reason, "plan": plan}

  # 7. Evaluate (on private users' held-out items: not covered by the guarantee).
  results = {which: evaluate_lib.evaluate(w, state.params, frozen, which)
             for which in ("valid", "test")}
  for which in ("valid", "test"):
    write({"step": steps_done, **_eval_record(which, results[which])})
  writer.close()

  # 8. Report.
  results.update({
      "name": cfg.name, "private": plan.private, "dp_release": dp_release,
      "unit": plan.unit,
      "epsilon": plan.epsilon(steps_done), "delta": plan.delta,
      "noise_multiplier": plan.noise_multiplier, "steps": steps_done,
      "stop_reason": stop_reason, "nonprivate/train_seconds": train_time,
      "nonprivate/wall_seconds": time.time() - t_start, "last_metrics": last_metrics})
  report.write_run_files(workdir, cfg, plan, steps_done, {
      "expected_batch_size": plan.divisor,
      "max_examples_per_user": cfg.data.max_examples_per_user,
      "dataset": w.ds.name, "item_catalogue": w.ds.catalogue,
      "clipping": clipping_mode, "per_layer_clipping": p.per_layer,
      "epsilon_budget": plan.epsilon_budget, "target_epsilon": p.target_epsilon,
      "stop_reason": stop_reason}, results)
  return {**results, "plan": plan}


def _check_resume(meta: dict[str, Any], secret: secret_lib.RunSecret,
                  plan: plan_lib.Plan, workdir: pathlib.Path) -> None:
  """Refuses a resume that would not continue the same release."""
  if meta.get("secret_fingerprint") != secret.fingerprint:
    raise ValueError(f"the checkpoints in {str(workdir)!r} were made with another "
                     "run secret than the one found; resuming would mix two noise "
                     "streams. Restore the original secret/ or use a new --workdir.")
  if meta.get("noisy_num_units") != plan.noisy_num_units:
    raise ValueError(
        f"the data changed since the run in {str(workdir)!r} started: its released "
        "DP count of units no longer matches; resuming would train on other data "
        "under the old statement. Use a new --workdir.")


def _eval_record(which: str, metrics: dict[str, float]) -> dict[str, float]:
  # The number of evaluated users is (almost) the private N: never written.
  return {f"nonprivate/eval/{which}/{k}": v for k, v in metrics.items()
          if k != "num_users"}


def _update_masks(state: dp_step.TrainState, step: int, schedule) -> dp_step.TrainState:
  # Masks from the current (already private) parameters: post-processing.
  masks = optax.tree_utils.tree_get(state.opt_state, "masks")
  params, masks = pruning.update_masks_if_due(state.params, masks, step, schedule=schedule)
  return state._replace(params=params,
                        opt_state=optax.tree_utils.tree_set(state.opt_state, masks=masks))


def _gather(examples: dict[str, np.ndarray], unit_rows: np.ndarray,
            batch: sampling.SampledBatch) -> tuple[dict[str, np.ndarray], np.ndarray]:
  rows = unit_rows[batch.indices]                        # [G, K]
  mask = batch.mask[:, None] & (rows >= 0)
  safe = np.where(rows >= 0, rows, 0)
  return {k: v[safe] for k, v in examples.items()}, mask.astype(np.float32)


def _check_or_write_config(cfg: config_lib.Config, workdir: pathlib.Path) -> bool:
  """Writes config.json; on resume, refuses privacy-relevant changes, naming them.

  Changing ``train.steps`` extends (or shortens) a run honestly when sigma was
  given: epsilon is then accounted for the new total. A run whose sigma was
  calibrated to its length cannot be extended as it is; the message says how
  (give that sigma and q explicitly, which this check accepts).
  """
  path = workdir / "config.json"
  resumed = path.exists() and (workdir / "checkpoints").exists()
  if resumed:
    saved = config_lib.from_dict(json.loads(path.read_text()))
    changed = _changed_fields(saved, cfg)
    plan_json = _saved_plan(workdir)
    if _is_explicit_extension(saved, cfg, changed, plan_json):
      changed = [c for c in changed if not c.startswith("privacy.")]
    if (saved.train.steps != cfg.train.steps and cfg.privacy.enabled
        and cfg.privacy.target_epsilon is not None):
      how = ""
      if plan_json:
        how = (f" To extend it with epsilon accounted for the new total, resume with "
               f"--config.privacy.target_epsilon=none --config.privacy.noise_multiplier="
               f"{plan_json['noise_multiplier']!r} --config.privacy.sampling_prob="
               f"{plan_json['sampling_prob']!r} (and privacy.epsilon_budget to cap it).")
      raise ValueError(
          f"train.steps: {saved.train.steps} -> {cfg.train.steps}: this run's sigma was "
          f"calibrated to {saved.train.steps} steps for target_epsilon="
          f"{saved.privacy.target_epsilon}.{how} Or start a new --workdir.")
    if changed:
      raise ValueError(
          f"workdir {str(workdir)!r} holds a run with a different config ("
          + "; ".join(changed) + "); resuming would misstate the privacy spent. "
          "Use a new --workdir.")
  path.write_text(config_lib.to_json(cfg))
  return resumed


def _changed_fields(saved: config_lib.Config, cfg: config_lib.Config) -> list[str]:
  """``field: old -> new`` for every frozen field that differs."""
  out = []
  for section in _FROZEN_ON_RESUME:
    old, new = config_lib.get(saved, section), config_lib.get(cfg, section)
    if dataclasses.is_dataclass(old):
      for f in dataclasses.fields(old):
        a, b = getattr(old, f.name), getattr(new, f.name)
        if a != b:
          out.append(f"{section}.{f.name}: {a!r} -> {b!r}")
    elif old != new:
      out.append(f"{section}: {old!r} -> {new!r}")
  return out


def _saved_plan(workdir: pathlib.Path) -> dict[str, Any] | None:
  ckpt = checkpoint.Checkpointer(workdir)
  try:
    step = ckpt.latest_step()
    return None if step is None else ckpt.meta(step).get("privacy")
  except Exception:  # pylint: disable=broad-except
    return None   # the restore reports unreadable checkpoints itself
  finally:
    ckpt.close()


def _is_explicit_extension(saved, cfg, changed, plan_json) -> bool:
  """A calibrated run resumed with its own sigma and q given explicitly."""
  if not plan_json or saved.privacy.target_epsilon is None:
    return False
  p = cfg.privacy
  allowed = {"privacy.target_epsilon", "privacy.noise_multiplier",
             "privacy.sampling_prob", "privacy.epsilon_budget"}
  return (p.target_epsilon is None and p.noise_multiplier == plan_json["noise_multiplier"]
          and p.sampling_prob == plan_json["sampling_prob"]
          and all(c.split(":")[0] in allowed for c in changed
                  if c.startswith("privacy.")))


def run_with_baselines(cfg: config_lib.Config, workdir: str | pathlib.Path, *,
                       show_progress: bool = True) -> dict[str, Any]:
  """The main run, plus (if ``cfg.compare_baselines``) its non-private twin and
  popularity, evaluated with the same protocol. Returns rows for a table.

  The twin trains in ``<workdir>-nonprivate``, beside the run and never inside
  it: a run directory holds only what its privacy statement covers.
  """
  workdir = pathlib.Path(workdir)
  rows = {"dp": train_and_evaluate(cfg, workdir, show_progress=show_progress)}
  if cfg.compare_baselines and not rows["dp"].get("interrupted"):
    twin = config_lib.replace(cfg, **{"privacy.enabled": False,
                                      "name": cfg.name + "-nonprivate"})
    rows["nonprivate"] = train_and_evaluate(
        twin, workdir.with_name(workdir.name + "-nonprivate"), show_progress=show_progress)
    ds = workload_lib.load_dataset(cfg.data)
    split = sequences.leave_last_out(ds)
    rows["popularity"] = {which: evaluate_lib.popularity_metrics(cfg, split, ds, which)
                          for which in ("test", "valid")}
  return rows
