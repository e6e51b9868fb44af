"""Per-example losses. Each returns the loss of ONE example (a scalar)."""

import jax
import jax.numpy as jnp


def softmax_cross_entropy(logits: jax.Array, target: jax.Array) -> jax.Array:
  """-log softmax(logits)[target], over the last axis.

  >>> float(softmax_cross_entropy(jnp.zeros(4), jnp.array(2)))  # log 4
  1.3862943649291992
  """
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
  return log_z - picked
