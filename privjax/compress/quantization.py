"""Weight-only int8 quantization: a ``QTensor`` pytree, quantize / dequantize.

Privacy. Quantizing weights reads parameters only: applied to DP-trained
parameters it is post-processing and costs no privacy budget. No scale is
ever calibrated on data. ``int8_matmul`` also quantizes its INPUT, but
dynamically: each row's scale is computed at inference from that row itself,
so nothing about training examples enters the released model.

Convention (symmetric, per channel). For every index ``c`` along
``channel_axis``, with ``w_c`` the slice of ``w`` at ``c``::

  scale[c] = clip(max|w_c| / 127, 2**-120, S_MAX)
  values   = clip(round(w / scale), -127, 127) as int8

``round`` is round-half-to-even (``jnp.round``): 0.5 -> 0, 1.5 -> 2, 2.5 -> 2.
-128 is never produced, so the range is symmetric and negation is exact. The
floor 2**-120 is the scale of an all-zero channel (no division by zero) and
keeps every scale a normal float32 at least twice the largest subnormal, which
matters because XLA on CPU flushes subnormals to zero. ``S_MAX`` (just below
float32 max / 127) keeps ``127 * scale`` finite. Weights must be finite.

Channel axis: a kernel [in, out] uses ``channel_axis=-1`` (one scale per
output unit, ``scale`` of shape [out]); an embedding [num, dim] uses
``channel_axis=0`` (one scale per embedding row, shape [num]), which is also
the output axis of the tied projection ``x @ embedding.T``.

Invariants (tested), per element, for finite ``w`` and computed scales:

* ``|dequantize(q) - w| <= scale / 2``, up to float32 rounding of the
  division and product (a factor ``1 + 2**-15``).
* ``w == 0`` gives exactly 0 (pruned weights stay pruned).
* the sign never flips: ``dequantize(q)`` is 0 or has the sign of ``w``.
* ``|values| <= 127``.
"""

from collections.abc import Callable, Sequence
import dataclasses
import fnmatch
import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from privjax.compress import pruning

PyTree = Any
Pattern = str | re.Pattern | Sequence[str | re.Pattern]

QMAX = 127
MIN_SCALE = 2.0 ** -120
# float32(max / 127) rounds up and 127 times it overflows; one ulp less does not.
MAX_SCALE = float(np.nextafter(np.float32(np.finfo(np.float32).max / 127),
                               np.float32(0)))
# 127 * 127 * in_features must fit in int32 for int8 x int8 -> int32.
MAX_INT8_FEATURES = (2 ** 31 - 1) // (QMAX * QMAX)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class QTensor:
  """An int8 tensor with one float32 scale per channel; a pytree.

  Attributes:
    values: int8 array, same shape as the float tensor.
    scale: float32 [values.shape[channel_axis]].
    channel_axis: non-negative axis the scales run along (static metadata).
  """
  values: jax.Array
  scale: jax.Array
  channel_axis: int = dataclasses.field(metadata=dict(static=True))

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.values.shape)

  @property
  def ndim(self) -> int:
    return len(self.values.shape)


def _expand(scale: jax.Array, ndim: int, axis: int) -> jax.Array:
  """Reshapes a [C] scale to broadcast along ``axis`` of an ndim array."""
  shape = [1] * ndim
  shape[axis] = -1
  return scale.reshape(shape)


def _scale_from_absmax(absmax: jax.Array) -> jax.Array:
  return jnp.clip(absmax / QMAX, MIN_SCALE, MAX_SCALE).astype(jnp.float32)


def _check_scale(scale) -> None:
  if isinstance(scale, jax.core.Tracer):
    return  # cannot look at traced values; the docstring states the contract
  s = np.asarray(scale)
  if not (np.all(np.isfinite(s)) and np.all(s > 0)):
    raise ValueError(f"scale={s!r} must be finite and > 0")


def quantize(w: jax.Array, *, channel_axis: int = -1,
             scale: jax.Array | None = None) -> QTensor:
  """Symmetric per-channel int8 quantization (see the module docstring).

  Args:
    w: a finite float array, ndim >= 1.
    channel_axis: axis with one scale per index: -1 for a kernel [in, out],
      0 for an embedding [num, dim].
    scale: optional float32 [w.shape[channel_axis]], > 0, to use instead of
      ``max|w| / 127`` (values beyond ``127 * scale`` then saturate at +-127).

  Returns:
    A ``QTensor`` with int8 ``values`` and float32 ``scale``.

  >>> q = quantize(jnp.array([[0.0, 254.0], [127.0, -3.0], [-0.5, 1.0]]))
  >>> q.values.tolist(), q.scale.tolist()
  ([[0, 127], [127, -2], [0, 0]], [1.0, 2.0])
  >>> w = jnp.array([[0.5], [1.5], [2.5], [-300.0]])
  >>> quantize(w, scale=jnp.array([1.0])).values.ravel().tolist()
  [0, 2, 2, -127]
  """
  w = jnp.asarray(w)
  if w.ndim < 1:
    raise ValueError(f"w.shape={w.shape} must have at least one axis")
  if not -w.ndim <= channel_axis < w.ndim:
    raise ValueError(f"channel_axis={channel_axis} is out of range for "
                     f"w.shape={w.shape}")
  axis = channel_axis % w.ndim
  if scale is not None:
    _check_scale(scale)
    scale = jnp.asarray(scale, jnp.float32)
    if scale.shape != (w.shape[axis],):
      raise ValueError(f"scale.shape={scale.shape} must be ({w.shape[axis]},) "
                       f"for w.shape={w.shape}, channel_axis={channel_axis}")
  values, scale = _quantize_arrays(w, scale, axis)
  return QTensor(values=values, scale=scale, channel_axis=axis)


# Jitted so a call compiles once per shape rather than once per eager op.
@functools.partial(jax.jit, static_argnums=2)
def _quantize_arrays(w: jax.Array, scale: jax.Array | None,
                     axis: int) -> tuple[jax.Array, jax.Array]:
  w32 = w.astype(jnp.float32)
  if scale is None:
    reduce_axes = tuple(i for i in range(w.ndim) if i != axis)
    scale = _scale_from_absmax(jnp.max(jnp.abs(w32), axis=reduce_axes))
  values = jnp.clip(jnp.round(w32 / _expand(scale, w.ndim, axis)), -QMAX, QMAX)
  return values.astype(jnp.int8), scale


def dequantize(q: QTensor) -> jax.Array:
  """``values * scale`` as float32.

  >>> dequantize(quantize(jnp.array([[0.0, 254.0], [127.0, -3.0]]))).tolist()
  [[0.0, 254.0], [127.0, -4.0]]
  """
  return _dequantize_arrays(q.values, q.scale, q.channel_axis)


@functools.partial(jax.jit, static_argnums=2)
def _dequantize_arrays(values: jax.Array, scale: jax.Array, axis: int) -> jax.Array:
  return values.astype(jnp.float32) * _expand(scale, values.ndim, axis)


def transpose(q: QTensor) -> QTensor:
  """The transpose of a 2-D QTensor (e.g. an embedding for ``x @ emb.T``).

  >>> q = transpose(quantize(jnp.ones((5, 3)), channel_axis=0))
  >>> q.shape, q.channel_axis
  ((3, 5), 1)
  """
  _check_2d(q)
  return QTensor(values=q.values.T, scale=q.scale, channel_axis=1 - q.channel_axis)


def _check_2d(q: QTensor) -> None:
  if q.ndim != 2:
    raise ValueError(f"q.shape={q.shape} must be 2-D")


def qmatmul(x: jax.Array, q: QTensor) -> jax.Array:
  """``x @ dequantize(q)`` without materialising the float weights.

  The int8 values are cast to the activation dtype and the per-channel scale
  is applied outside the matmul: on the output, ``(x @ values) * scale``, for
  a kernel (channel axis 1); on the input, ``(x * scale) @ values``, for a
  channel axis 0. Equal to dequantize-then-matmul up to float rounding.

  Args:
    x: float activations [..., in].
    q: a 2-D QTensor [in, out].

  >>> q = quantize(jnp.array([[127.0, -254.0], [3.0, 8.0]]))
  >>> qmatmul(jnp.array([[1.0, 0.5]]), q).tolist()
  [[128.5, -250.0]]
  """
  _check_2d(q)
  x = jnp.asarray(x)
  dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
  x = x.astype(dtype)
  values, scale = q.values.astype(dtype), q.scale.astype(dtype)
  if q.channel_axis == 1:
    return jnp.matmul(x, values) * scale
  return jnp.matmul(x * scale, values)


def int8_matmul(x: jax.Array, q: QTensor) -> jax.Array:
  """``x @ dequantize(q)`` as an int8 x int8 -> int32 matmul.

  Each row of ``x`` (each example or token: the vector along the last axis)
  is quantized symmetrically with its own scale ``max|row| / 127``, computed
  from that row at inference time: dynamic quantization, no calibration data.
  The int32 accumulator is rescaled by the row scale and the weight scale.
  Error per output: at most ``scale_x / 2 * sum_k |dequantize(q)[k, j]|``
  beyond the weight quantization itself (up to float rounding).

  Args:
    x: float activations [..., in].
    q: a 2-D QTensor [in, out] with ``channel_axis == 1`` (a kernel, or an
      embedding passed through ``transpose``); ``in`` <= MAX_INT8_FEATURES so
      the int32 accumulator cannot overflow.

  Returns:
    float32 [..., out].

  >>> q = quantize(jnp.array([[127.0, -254.0], [3.0, 8.0]]))
  >>> int8_matmul(jnp.array([[127.0, 2.0]]), q).tolist()
  [[16135.0, -32242.0]]
  """
  _check_2d(q)
  if q.channel_axis != 1:
    raise ValueError(f"q.channel_axis={q.channel_axis} must be 1 (output axis) "
                     "for int8_matmul; scales on the contracted axis do not "
                     "factor out of the int32 sum (use transpose or qmatmul)")
  if q.shape[0] > MAX_INT8_FEATURES:
    raise ValueError(f"in_features={q.shape[0]} must be <= {MAX_INT8_FEATURES} "
                     "for an int32 accumulator")
  x = jnp.asarray(x, jnp.float32)
  scale_x = _scale_from_absmax(jnp.max(jnp.abs(x), axis=-1, keepdims=True))
  x_q = jnp.clip(jnp.round(x / scale_x), -QMAX, QMAX).astype(jnp.int8)
  acc = jax.lax.dot_general(x_q, q.values, (((x.ndim - 1,), (0,)), ((), ())),
                            preferred_element_type=jnp.int32)
  return acc.astype(jnp.float32) * scale_x * q.scale


# ------------------------------------------------------------------ pytrees


def default_channel_axis(path: str) -> int:
  """0 (per row) for an ``embedding`` leaf, else -1 (per output unit).

  >>> default_channel_axis("item_embed/embedding"), default_channel_axis("out/kernel")
  (0, -1)
  """
  return 0 if path.rsplit("/", 1)[-1] == "embedding" else -1


def quantize_params(params: PyTree, *,
                    pattern: Pattern = ("*kernel", "*embedding"),
                    exclude: Pattern = (),
                    channel_axis: Callable[[str], int] = default_channel_axis
                    ) -> PyTree:
  """Replaces selected 2-D float leaves by ``QTensor``s; the rest stay float.

  A leaf is selected when it is a 2-D floating array whose "/"-joined path
  matches ``pattern`` and not ``exclude`` (globs via ``fnmatch.fnmatchcase``,
  ``*`` also matching "/", or compiled regexes matching the whole path), so
  biases and LayerNorm scales stay float by default. Post-processing of the
  (DP) parameters: no privacy cost.

  Args:
    params: parameter pytree (e.g. ``nnx.to_pure_dict`` of a model).
    pattern: glob(s)/regex(es) of leaves to quantize.
    exclude: glob(s)/regex(es) of leaves to keep float.
    channel_axis: ``path -> axis`` for each selected leaf.

  >>> params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
  >>> qparams = quantize_params(params)
  >>> type(qparams["dense"]["kernel"]).__name__, qparams["dense"]["bias"].dtype
  ('QTensor', dtype('float32'))
  """
  with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
  include, excl = pruning.as_patterns(pattern), pruning.as_patterns(exclude)
  out, paths, any_selected = [], [], False
  for keys, leaf in with_path:
    path = jax.tree_util.keystr(keys, simple=True, separator="/")
    paths.append(path)
    if (jnp.ndim(leaf) == 2 and jnp.issubdtype(jnp.result_type(leaf), jnp.floating)
        and pruning.matches(path, include) and not pruning.matches(path, excl)):
      out.append(quantize(leaf, channel_axis=channel_axis(path)))
      any_selected = True
    else:
      out.append(leaf)
  if not any_selected:
    shown = ", ".join(paths[:10]) + (", ..." if len(paths) > 10 else "")
    raise ValueError(f"pattern={pattern!r} with exclude={exclude!r} selects no "
                     f"2-D float leaf; the leaves are: {shown}")
  return jax.tree.unflatten(treedef, out)


def _is_qtensor(x) -> bool:
  return isinstance(x, QTensor)


def dequantize_params(qparams: PyTree) -> PyTree:
  """Replaces every ``QTensor`` leaf by its float32 ``dequantize``.

  >>> params = {"kernel": jnp.array([[0.5, -1.0]]), "bias": jnp.zeros(2)}
  >>> dequantize_params(quantize_params(params))["kernel"].tolist()
  [[0.5, -1.0]]
  """
  return jax.tree.map(lambda x: dequantize(x) if _is_qtensor(x) else x,
                      qparams, is_leaf=_is_qtensor)


def size_bytes(tree: PyTree) -> int:
  """Bytes of all array leaves (a QTensor counts its int8 values and scales).

  >>> size_bytes({"kernel": jnp.zeros((64, 8))})
  2048
  >>> size_bytes(quantize_params({"kernel": jnp.zeros((64, 8))}))  # 512 + 8 * 4
  544
  """
  return sum(int(np.prod(np.shape(x))) * np.dtype(jnp.result_type(x)).itemsize
             for x in jax.tree.leaves(tree))
