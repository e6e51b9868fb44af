"""DP-SGD for your own model and data in one call: ``make_private``.

``make_private(model, optimizer, loss_fn=..., data=..., users=...)`` wraps any
``flax.nnx`` module (built from ``privjax.models.nn`` layers for the
ghost-norm fast path; any other layers fall back, exactly, to per-example
gradients, and a warning names them) and a dataset given as arrays with one
row per example (``users`` tags each row with its user for user-level DP).
The returned ``PrivateTrainer`` runs the same plan, sampler, step and noise
as ``scripts/train.py``: a run secret for the noise and the sampling, Poisson
sampling of units, each user's rows bounded and clipped together, sigma
calibrated to the target epsilon, and training that stops at the budget.

>>> from privjax.models import nn
>>> class Net(nnx.Module):
...   def __init__(self, rngs):
...     self.linear = nn.Linear(3, 2, rngs=rngs)
...   def __call__(self, x):
...     return self.linear(x)
>>> rng = np.random.default_rng(0)
>>> data = {"x": rng.normal(size=(400, 3)).astype(np.float32), "y": rng.integers(0, 2, 400)}
>>> trainer = make_private(Net(nnx.Rngs(0)), optax.sgd(0.1), data=data,
...     loss_fn=lambda m, ex: losses.softmax_cross_entropy(m(ex["x"]), ex["y"]),
...     users=rng.integers(0, 100, 400), target_epsilon=2.0, batch_size=20, steps=5,
...     reproducible_noise_seed=0)
>>> model = trainer.fit(progress=False)
>>> trainer.steps_done, trainer.epsilon <= 2.0
(5, True)
"""

import json
import pathlib
import warnings
from collections.abc import Callable
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from privjax.data import bounding
from privjax.dp import ghost
from privjax.dp import plan as plan_lib
from privjax.dp import secret as secret_lib
from privjax.dp import step as dp_step
from privjax.models import losses  # noqa: F401  (used by the doctest)


class PrivateTrainer:
  """A DP-SGD run of one model on one dataset; ``fit`` trains it.

  Attributes:
    plan: the run's ``dp.plan.Plan`` (sigma, q, steps, secret, statement).
    clipping: "ghost" or "vmap", the implementation chosen.
    steps_done: steps taken so far.
  """

  def __init__(self, *, graphdef, params, frozen, optimizer, loss_fun, examples,
               unit_rows, plan: plan_lib.Plan, clipping: str,
               workdir: pathlib.Path | None):
    self.plan, self.clipping, self.steps_done = plan, clipping, 0
    self._graphdef, self._frozen = graphdef, frozen
    self._examples, self._unit_rows, self._workdir = examples, unit_rows, workdir
    self._step = dp_step.make_step(loss_fun, optimizer, plan.step_config(clipping))
    self._state = dp_step.init_state(params, optimizer)
    self._sampler, self._streams = plan.sampler(), plan.streams()

  @property
  def epsilon(self) -> float:
    """Epsilon spent so far (the DP count of units included)."""
    return self.plan.epsilon(self.steps_done) if self.steps_done else 0.0

  @property
  def model(self) -> nnx.Module:
    """The model with the current parameters (post-processing of the release)."""
    return nnx.merge(self._graphdef, nnx.State(self._state.params),
                     nnx.State(self._frozen))

  def fit(self, steps: int | None = None, *, progress: bool = True) -> nnx.Module:
    """Trains ``steps`` more steps (default: up to the plan's), returns the model.

    Raises:
      ValueError: more steps than the budget allows (nothing is run).
    """
    steps = self.plan.steps - self.steps_done if steps is None else steps
    if self.steps_done + steps > self.plan.steps:
      raise ValueError(f"steps={steps}: {self.steps_done} done, the plan allows "
                       f"{self.plan.steps} in all (epsilon budget "
                       f"{self.plan.epsilon_budget})")
    for step in tqdm.trange(self.steps_done, self.steps_done + steps, disable=not progress,
                            desc="privjax", leave=False):
      batch = self._sampler.sample(step, len(self._unit_rows))
      rows = self._unit_rows[batch.indices]
      mask = (batch.mask[:, None] & (rows >= 0)).astype(np.float32)
      safe = np.where(rows >= 0, rows, 0)
      self._state, _ = self._step(
          self._state, self._frozen, {k: v[safe] for k, v in self._examples.items()},
          mask, self._streams.noise_key(step), self._streams.dropout_key(step))
      self.steps_done = step + 1
    if self._workdir is not None:
      (self._workdir / "privacy.json").write_text(json.dumps(self.statement(), indent=2))
    return self.model

  def statement(self) -> dict[str, Any]:
    """The privacy statement of the steps done (what privacy.json holds)."""
    return self.plan.statement(self.steps_done, {"clipping": self.clipping})


def make_private(model: nnx.Module, optimizer: optax.GradientTransformation, *,
                 loss_fn: Callable[[nnx.Module, dict[str, jax.Array]], jax.Array],
                 data: dict[str, np.ndarray], users: np.ndarray | None = None,
                 target_epsilon: float | None = None,
                 noise_multiplier: float | None = None, sampling_prob: float | None = None,
                 delta: float = 1e-5, batch_size: int, steps: int,
                 l2_clip_norm: float = 1.0, max_examples_per_user: int = 16,
                 clipping: str = "auto", accountant: str = "rdp",
                 epsilon_budget: float | None = None,
                 reproducible_noise_seed: int | None = None,
                 workdir: str | pathlib.Path | None = None) -> PrivateTrainer:
  """A DP-SGD trainer for ``model`` on ``data``.

  Guarantee: ``fit`` releases parameters that are (epsilon, delta)-DP for one
  user (``users`` given: all of that user's rows, at most
  ``max_examples_per_user`` of them kept, chosen by a keyed hash of the user
  id) or one row (``users=None``), under add/remove-one neighbours; the number
  of units is read only through a DP count; ``statement()`` says it all.

  Args:
    model: an ``nnx.Module``; its ``nnx.Param`` leaves train, the rest is frozen.
    optimizer: an optax transformation of the privatised mean gradient.
    loss_fn: ``(model, example) -> scalar``, the loss of ONE example (a dict of
      arrays without the leading row axis).
    data: arrays with a leading row axis, one row per example.
    users: optional [rows] user id of each row (ints or strings).
    target_epsilon / noise_multiplier: exactly one (a fixed sigma needs a
      public ``sampling_prob``).
    sampling_prob: a public q; default ``batch_size`` / (DP count of units).
    delta, batch_size, steps, l2_clip_norm, accountant, epsilon_budget: as in
      ``privjax.config.PrivacyConfig`` / ``TrainConfig``.
    max_examples_per_user: K, rows a user keeps (user-level only).
    clipping: "auto" (ghost if every trainable leaf has a rule), "ghost", "vmap".
    reproducible_noise_seed: RESEARCH ONLY: derive the secret from this seed
      (then NOT a DP release).
    workdir: optional directory for the run secret and privacy.json; without
      it the secret lives in memory only.
  """
  rows = {k: np.asarray(v) for k, v in data.items()}
  sizes = {len(v) for v in rows.values()}
  if len(sizes) != 1:
    raise ValueError(f"data arrays must share their leading axis, got lengths {sorted(sizes)}")
  (num_rows,) = sizes
  graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
  params, frozen = nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)

  def loss_fun(p, f, example, rng):
    del rng
    return loss_fn(nnx.merge(graphdef, nnx.State(p), nnx.State(f)), example)

  workdir = None if workdir is None else pathlib.Path(workdir)
  if workdir is not None:
    workdir.mkdir(parents=True, exist_ok=True)
    secret = secret_lib.for_run(workdir, reproducible_seed=reproducible_noise_seed,
                                resuming=False)
  else:
    secret = (secret_lib.RunSecret.fresh() if reproducible_noise_seed is None
              else secret_lib.RunSecret.from_seed(reproducible_noise_seed))
  if users is None:
    unit, unit_rows = "example", np.arange(num_rows, dtype=np.int32)[:, None]
    description = "one row of data"
  else:
    users = np.asarray(users)
    if users.shape != (num_rows,):
      raise ValueError(f"users.shape={users.shape} must be ({num_rows},): one id per row")
    ids, dense = np.unique(users.astype(str), return_inverse=True)
    unit_rows = bounding.group_rows(dense.reshape(-1), max_rows_per_unit=max_examples_per_user,
                                    unit_keys=secret.unit_keys("bounding", ids))
    unit, description = "user", (f"one user with all of their rows (at most "
                                 f"{max_examples_per_user})")
  plan = plan_lib.make_plan(
      unit=unit, relation="add_remove", target_epsilon=target_epsilon,
      noise_multiplier=noise_multiplier, sampling_prob=sampling_prob,
      batch_size=batch_size, steps=steps, num_units=len(unit_rows), delta=delta,
      l2_clip_norm=l2_clip_norm, secret=secret, accountant=accountant,
      epsilon_budget=epsilon_budget, multiple_of=jax.local_device_count(),
      unit_description=description)
  frozen_loss = lambda p, ex, rng: loss_fun(p, frozen, ex, rng)
  # A data-independent probe of the real shapes (zeros): the decision reads
  # nobody's data.
  probe = {k: jnp.zeros((2, unit_rows.shape[1], *v.shape[1:]),
                       jax.dtypes.canonicalize_dtype(v.dtype))
           for k, v in rows.items()}
  probe_mask = jnp.ones((2, unit_rows.shape[1]), jnp.float32)
  cov = ghost.coverage(frozen_loss, params, jax.tree.map(lambda x: x[0, 0], probe))
  if clipping != "vmap" and not cov.complete:
    warnings.warn(f"privjax: no ghost-norm rule for {list(cov.untapped)} (layers not "
                  "from privjax.models.nn): those leaves use exact per-example "
                  "gradients, which is correct but slower", stacklevel=2)
  chosen = ghost.resolve_clipping(clipping, frozen_loss, params, probe, probe_mask)
  return PrivateTrainer(graphdef=graphdef, params=params, frozen=frozen,
                        optimizer=optimizer, loss_fun=loss_fun, examples=rows,
                        unit_rows=unit_rows, plan=plan, clipping=chosen, workdir=workdir)
