"""Gaussian noise on pytrees, and the key discipline that keeps it fresh.

Guarantee. ``add_gaussian_noise(tree, stddev=sigma * sensitivity, key=k)``
adds independent N(0, stddev^2) noise to every coordinate of every leaf, in
float32 or wider, so the Gaussian mechanism on a sum of L2 sensitivity
``sensitivity`` with noise multiplier ``sigma`` is what runs. The result has
the noised dtype (at least float32), never a narrower one.

Key discipline. One root key per run. ``KeyStreams`` derives independent
named streams from it (``params``, ``dropout``, ``noise``, ...); the noise key
for step ``t`` is ``fold_in(noise_stream, t)`` and is split once per leaf.
Since a run never repeats a step index (resuming restores the step counter),
no noise key is ever used twice, and noise keys are never shared with data
or dropout randomness.
"""

import dataclasses
import hashlib
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def add_gaussian_noise(tree: PyTree, *, stddev: float | jax.Array,
                       key: jax.Array) -> PyTree:
  """Adds i.i.d. N(0, stddev^2) to each coordinate of each leaf.

  Args:
    tree: a pytree of arrays (e.g. a clipped gradient sum).
    stddev: noise standard deviation, ``noise_multiplier * sensitivity``.
    key: a fresh key (e.g. ``KeyStreams.noise_key(step)``), split per leaf.

  Returns:
    The noised tree, each leaf in ``promote_types(dtype, float32)``.

  >>> key = jax.random.key(0)
  >>> out = add_gaussian_noise({"w": jnp.zeros(3)}, stddev=0.0, key=key)
  >>> out["w"].tolist()
  [0.0, 0.0, 0.0]
  """
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  noised = []
  for leaf, leaf_key in zip(leaves, keys):
    dtype = jnp.promote_types(leaf.dtype, jnp.float32)
    z = jax.random.normal(leaf_key, leaf.shape, dtype)
    noised.append(leaf.astype(dtype) + jnp.asarray(stddev, dtype) * z)
  return jax.tree.unflatten(treedef, noised)


def _stream_id(name: str) -> int:
  # A stable 31-bit id per stream name (Python's hash() is salted per process).
  return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little") >> 1


@dataclasses.dataclass(frozen=True)
class KeyStreams:
  """Named, independent key streams derived from one root seed.

  >>> streams = KeyStreams(seed=0)
  >>> k1, k2 = streams.noise_key(1), streams.noise_key(2)
  >>> bool((jax.random.key_data(k1) != jax.random.key_data(k2)).any())
  True
  """
  seed: int

  def stream(self, name: str) -> jax.Array:
    return jax.random.fold_in(jax.random.key(self.seed), _stream_id(name))

  def noise_key(self, step: int | jax.Array) -> jax.Array:
    """The key for the DP noise of ``step``; used for that step only."""
    return jax.random.fold_in(self.stream("noise"), step)

  def dropout_key(self, step: int | jax.Array) -> jax.Array:
    return jax.random.fold_in(self.stream("dropout"), step)

  def params_key(self) -> jax.Array:
    return self.stream("params")
