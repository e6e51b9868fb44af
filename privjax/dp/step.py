"""THE training step: clipped sum -> noise -> divide by a public constant -> optax.

``make_step`` composes the primitives into one pure function
``(state, frozen, batch, mask, noise_key, rng) -> (state, metrics)`` and jits
it with the state donated. Private and non-private training run through this
same function; the non-private twin only swaps the clipped sum for the plain
gradient sum and adds no noise, so baselines see the same data pipeline, the
same normalisation and the same optimizer.

Guarantee (private mode). The update depends on the private batch only through
``noisy_sum = sum_g clip(grad_g) + N(0, (sigma * sensitivity)^2 I)``, which is
divided by ``expected_batch_size`` (a public constant: q times the number of
units), never by the realised batch size. Everything after the noise is
post-processing. The returned metrics under ``nonprivate/`` are computed from
the batch without noise: they are for the researcher, not for release.

Sharding. With a ``jax.sharding.Mesh`` the batch is split over its ``data``
axis and parameters are replicated; XLA all-reduces the clipped sum, and the
noise is drawn once, from a replicated key, on the replicated sum.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from privjax.dp import clipping
from privjax.dp import ghost
from privjax.dp import noise

PyTree = Any


class TrainState(NamedTuple):
  """Everything the step changes. ``params`` holds trainable parameters only."""
  step: jax.Array
  params: PyTree
  opt_state: PyTree


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepConfig:
  """Public parameters of the step.

  Attributes:
    private: False runs the non-private twin (no clipping, no noise).
    l2_clip_norm: C (total, for per-layer clipping too).
    noise_multiplier: sigma; the noise std is sigma * sensitivity.
    expected_batch_size: the public divisor, q * num_units.
    per_layer: clip each parameter leaf with C / sqrt(num_leaves).
    microbatch_size: groups per microbatch inside the step (None: all).
    clipping: "vmap" (exact per-example gradients) or "ghost" (the ghost-norm
      fast path, ``privjax.dp.ghost``; same result). The trainer resolves
      "auto" to one of the two before building the step.
  """
  private: bool = True
  l2_clip_norm: float = 1.0
  noise_multiplier: float = 1.0
  expected_batch_size: float = 1.0
  per_layer: bool = False
  microbatch_size: int | None = None
  clipping: str = "vmap"

  def __post_init__(self):
    if not self.expected_batch_size > 0:
      raise ValueError(
          f"expected_batch_size={self.expected_batch_size} must be > 0")
    if self.private:
      if not (self.l2_clip_norm > 0 and math.isfinite(self.l2_clip_norm)):
        raise ValueError(f"l2_clip_norm={self.l2_clip_norm} must be finite > 0")
      if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
        raise ValueError(f"noise_multiplier={self.noise_multiplier} must be >= 0")
    if self.clipping not in ("vmap", "ghost"):
      raise ValueError(f"clipping={self.clipping!r} must be 'vmap' or 'ghost' "
                       "(resolve 'auto' first)")


def init_state(params: PyTree, optimizer: optax.GradientTransformation) -> TrainState:
  return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


def make_step(
    loss_fun: Callable[[PyTree, PyTree, PyTree, jax.Array | None], jax.Array],
    optimizer: optax.GradientTransformation,
    config: StepConfig,
    *,
    clipped_sum_fn: Callable[..., Callable[..., clipping.ClippedSum]] | None = None,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """Builds the jitted step.

  Args:
    loss_fun: ``loss_fun(params, frozen, example, rng) -> scalar``, the loss of
      ONE example; ``frozen`` are parameters that get no gradient and no noise.
    optimizer: an optax transformation applied to the privatised mean gradient.
    config: the public step parameters.
    clipped_sum_fn: optional replacement for ``clipping.clipped_grad_sum``
      with the same signature (the ghost-clipping fast path).

  Returns:
    ``step(state, frozen, batch, mask, noise_key, rng=None) -> (state,
    metrics)``, jitted, with ``state`` donated. ``batch`` leaves are
    ``[G, K, ...]`` and ``mask`` is ``[G, K]`` (see ``privjax.dp.clipping``).
  """
  make_sum = clipped_sum_fn or {"vmap": clipping.clipped_grad_sum,
                                "ghost": ghost.clipped_grad_sum}[config.clipping]

  def step(state: TrainState, frozen, batch, mask, noise_key, rng=None):
    per_example = lambda p, ex, r: loss_fun(p, frozen, ex, r)
    if config.private:
      sum_fun = make_sum(per_example, l2_clip_norm=config.l2_clip_norm,
                         per_layer=config.per_layer,
                         microbatch_size=config.microbatch_size)
    else:
      sum_fun = clipping.grad_sum(per_example)
    out = sum_fun(state.params, batch, mask, rng)
    if config.private:
      stddev = config.noise_multiplier * out.sensitivity
      noisy_sum = noise.add_gaussian_noise(out.grad_sum, stddev=stddev, key=noise_key)
    else:
      stddev = 0.0
      noisy_sum = out.grad_sum
    # Divide by a public constant only: the expected number of units.
    grads = jax.tree.map(
        lambda g, p: (g / config.expected_batch_size).astype(p.dtype),
        noisy_sum, state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    num_examples = jnp.sum(mask)
    real = jnp.sum(out.valid)
    metrics = {
        "noise_stddev": jnp.asarray(stddev, jnp.float32),
        "nonprivate/loss": out.loss_sum / jnp.maximum(num_examples, 1),
        "nonprivate/num_units": jnp.sum(jnp.sum(mask, axis=1) > 0).astype(jnp.float32),
        "nonprivate/num_examples": num_examples.astype(jnp.float32),
        "nonprivate/dropped_nonfinite": (
            jnp.sum(jnp.sum(mask, axis=1) > 0) - real).astype(jnp.float32),
    }
    if config.private:
      clipped = (out.norms > out.sensitivity) & (out.valid > 0)
      metrics["nonprivate/clipped_fraction"] = (
          jnp.sum(clipped) / jnp.maximum(real, 1)).astype(jnp.float32)
      metrics["nonprivate/grad_norm_mean"] = (
          jnp.sum(jnp.where(out.valid > 0, out.norms, 0.0)) / jnp.maximum(real, 1))
    return TrainState(state.step + 1, params, opt_state), metrics

  return jax.jit(step, donate_argnums=0)


def data_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Shards the leading (group) axis of batch arrays over ``mesh``'s ``data`` axis."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D ``data`` mesh over all local devices."""
  devices = jax.local_devices() if devices is None else devices
  return jax.sharding.Mesh(devices, ("data",))
