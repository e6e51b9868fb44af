"""NNX layers that expose what ghost clipping needs.

Every layer with trainable parameters calls ``_tap(layer, kind, inputs, outputs)``
on its way out. Outside a ``tapping`` context this returns ``outputs`` untouched
(no cost). Inside one, the tap function sees the layer object, the input that
multiplies its parameters and the output, and may return a modified output
(ghost clipping adds a zero perturbation whose gradient is the per-example
output gradient, and records the input). The tap runs at trace time only.

All layers act on the last axis and accept any number of leading axes, so the
same module serves a single example, a batch, or a batch of sequences. None of
them mixes examples (no BatchNorm): under ``vmap`` that would silently become a
per-example statistic, and in a batch it would leak between examples.
"""

import contextlib
import contextvars
from collections.abc import Callable
import math

from flax import nnx
import jax
import jax.numpy as jnp

from privjax.compress import quantization

# kind is one of "linear", "embed", "attend", "layernorm".
TapFn = Callable[[nnx.Module, str, jax.Array, jax.Array], jax.Array]

_TAP: contextvars.ContextVar[TapFn | None] = contextvars.ContextVar(
    "privjax_nn_tap", default=None)


@contextlib.contextmanager
def tapping(tap_fn: TapFn):
  """Calls ``tap_fn(layer, kind, inputs, outputs)`` in every layer while active."""
  token = _TAP.set(tap_fn)
  try:
    yield
  finally:
    _TAP.reset(token)


def _tap(layer: nnx.Module, kind: str, inputs: jax.Array,
         outputs: jax.Array) -> jax.Array:
  tap_fn = _TAP.get()
  return outputs if tap_fn is None else tap_fn(layer, kind, inputs, outputs)


def _matmul(x: jax.Array, kernel) -> jax.Array:
  """``x @ kernel`` for a float kernel or an int8 ``QTensor`` [in, out]."""
  if isinstance(kernel, quantization.QTensor):
    return quantization.qmatmul(x, kernel)
  return jnp.matmul(x, kernel)


def _take_rows(table, ids: jax.Array) -> jax.Array:
  """``table[ids]`` for a float table or an int8 ``QTensor`` (rows dequantized)."""
  if not isinstance(table, quantization.QTensor):
    return jnp.take(table, ids, axis=0)
  rows = jnp.take(table.values, ids, axis=0).astype(jnp.float32)
  if table.channel_axis == 0:  # one scale per row: gather it with the row
    return rows * jnp.take(table.scale, ids, axis=0)[..., None]
  return rows * table.scale


def _normal_init(key: jax.Array, shape: tuple[int, ...], stddev: float,
                 dtype) -> jax.Array:
  return stddev * jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype)


class Linear(nnx.Module):
  """y = x @ kernel + bias over the last axis.

  >>> layer = Linear(3, 2, rngs=nnx.Rngs(0))
  >>> layer(jnp.ones((4, 5, 3))).shape
  (4, 5, 2)

  An int8 kernel (inference only) gives the float result up to rounding:

  >>> y = layer(jnp.ones((1, 3)))
  >>> layer.kernel.set_value(quantization.quantize(layer.kernel[...]))
  >>> bool(jnp.allclose(layer(jnp.ones((1, 3))), y, atol=0.02))
  True
  """

  def __init__(self, in_features: int, out_features: int, *,
               use_bias: bool = True, init_stddev: float | None = None,
               dtype=jnp.float32, rngs: nnx.Rngs):
    stddev = (1.0 / math.sqrt(in_features)) if init_stddev is None else init_stddev
    self.in_features = in_features
    self.out_features = out_features
    self.kernel = nnx.Param(
        _normal_init(rngs.params(), (in_features, out_features), stddev, dtype))
    self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = _matmul(x, self.kernel.get_value())
    if self.bias is not None:
      y = y + self.bias[...]
    return _tap(self, "linear", x, y)


class Embed(nnx.Module):
  """Embedding table; ``attend`` reuses it as an output projection (tying).

  >>> embed = Embed(10, 4, rngs=nnx.Rngs(0))
  >>> embed(jnp.array([[1, 2, 2]])).shape
  (1, 3, 4)
  >>> table = embed.embedding[...]
  >>> embed.embedding.set_value(quantization.quantize(table, channel_axis=0))
  >>> bool(jnp.allclose(embed(jnp.array([3])), table[3:4], atol=1e-3))
  True
  """

  def __init__(self, num_embeddings: int, features: int, *,
               init_stddev: float = 0.02, dtype=jnp.float32, rngs: nnx.Rngs):
    self.num_embeddings = num_embeddings
    self.features = features
    self.embedding = nnx.Param(
        _normal_init(rngs.params(), (num_embeddings, features), init_stddev, dtype))

  def __call__(self, ids: jax.Array) -> jax.Array:
    y = _take_rows(self.embedding.get_value(), ids)
    return _tap(self, "embed", ids, y)

  def attend(self, x: jax.Array) -> jax.Array:
    """Scores ``x @ embedding.T``: the tied output projection."""
    table = self.embedding.get_value()
    if isinstance(table, quantization.QTensor):
      y = quantization.qmatmul(x, quantization.transpose(table))
    else:
      y = jnp.matmul(x, table.T)
    return _tap(self, "attend", x, y)


class LayerNorm(nnx.Module):
  """Per-position layer normalisation over the last axis (never over examples).

  >>> ln = LayerNorm(4)
  >>> bool(jnp.allclose(ln(jnp.arange(8.0).reshape(2, 4)).mean(-1), 0, atol=1e-6))
  True
  """

  def __init__(self, features: int, *, epsilon: float = 1e-12,
               use_bias: bool = True, dtype=jnp.float32):
    self.features = features
    self.epsilon = epsilon
    self.scale = nnx.Param(jnp.ones((features,), dtype))
    self.bias = nnx.Param(jnp.zeros((features,), dtype)) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    x_hat = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
    y = x_hat * self.scale[...]
    if self.bias is not None:
      y = y + self.bias[...]
    return _tap(self, "layernorm", x_hat, y)


class LoRALinear(nnx.Module):
  """A frozen-by-config base ``Linear`` plus a low-rank adapter ``B(A x)``.

  ``up`` starts at zero, so a fresh adapter leaves the base model unchanged.
  Which parameters train is chosen by the trainer's parameter filter (e.g.
  only paths containing ``lora``); this module only defines the computation.

  >>> layer = LoRALinear(Linear(3, 2, rngs=nnx.Rngs(0)), rank=1, rngs=nnx.Rngs(1))
  >>> x = jnp.ones((5, 3))
  >>> bool(jnp.allclose(layer(x), layer.base(x)))
  True
  """

  def __init__(self, base: Linear, *, rank: int, alpha: float | None = None,
               rngs: nnx.Rngs):
    if rank <= 0:
      raise ValueError(f"rank={rank} must be > 0")
    self.base = base
    self.scaling = (alpha if alpha is not None else rank) / rank
    self.lora_down = Linear(base.in_features, rank, use_bias=False, rngs=rngs)
    self.lora_up = Linear(rank, base.out_features, use_bias=False,
                          init_stddev=0.0, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.base(x) + self.scaling * self.lora_up(self.lora_down(x))
