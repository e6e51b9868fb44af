"""Tests for privjax.compress.quantization: error bound, rounding table, zeros, int8 paths."""

import functools

from flax import nnx
import hypothesis
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from privjax.compress import quantization
from privjax.models import mlp

F32_MAX = float(np.finfo(np.float32).max)
# Float32 rounding of w / scale and of values * scale adds at most this factor
# to the scale / 2 bound (derivation: (0.5 + 255 * 2**-24) / 0.5 < 1 + 2**-15).
ROUNDING = 1 + 2.0 ** -15

_magnitudes = st.one_of(
    st.just(0.0),
    st.floats(0, 2.0 ** -120, width=32),           # tiny, subnormals included
    st.floats(2.0 ** -10, 2.0 ** 10, width=32),    # ordinary weights
    st.floats(2.0 ** 100, F32_MAX, width=32),      # huge, up to float32 max
    st.just(F32_MAX),
)
_values = st.tuples(_magnitudes, st.booleans()).map(lambda t: -t[0] if t[1] else t[0])


@st.composite
def _weights_and_axis(draw):
  shape = draw(hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=4))
  w = draw(hnp.arrays(np.float32, shape, elements=_values))
  axis = draw(st.sampled_from(range(-len(shape), len(shape))))
  return w, axis


def _check_invariants(w: np.ndarray, q: quantization.QTensor):
  values, scale = np.asarray(q.values), np.asarray(q.scale, np.float64)
  assert values.dtype == np.int8 and values.shape == w.shape
  assert scale.shape == (w.shape[q.channel_axis],)
  assert np.all(np.abs(values.astype(np.int32)) <= 127)   # -128 never used
  deq = np.asarray(quantization.dequantize(q))
  assert deq.dtype == np.float32 and np.all(np.isfinite(deq))
  shape = [1] * w.ndim
  shape[q.channel_axis] = -1
  err = np.abs(deq.astype(np.float64) - w.astype(np.float64))
  bound = scale.reshape(shape) / 2 * ROUNDING
  assert np.all(err <= bound), (err.max(), bound.min())
  assert np.all(deq[w == 0] == 0)
  assert np.all(np.sign(deq) * np.sign(w) >= 0)           # sign never flips


@hypothesis.settings(max_examples=150, deadline=None, derandomize=True)
@hypothesis.given(_weights_and_axis())
def test_round_trip_error_is_at_most_half_a_step(w_axis):
  w, axis = w_axis
  _check_invariants(w, quantization.quantize(w, channel_axis=axis))


def test_extremes_do_not_overflow_or_flush():
  # float32 max: 127 * fl(max / 127) would overflow to inf without MAX_SCALE.
  # Subnormals: XLA on CPU flushes them to zero, so the scale floor keeps
  # them within half a step.
  w = np.array([[F32_MAX, 1e-40], [-F32_MAX, -1e-39], [1.0, 1.1e-38]], np.float32)
  for axis in (0, 1):
    _check_invariants(w, quantization.quantize(w, channel_axis=axis))


def test_bound_is_tight_not_vacuous():
  # On random weights the worst error reaches almost exactly scale / 2.
  w = np.random.default_rng(0).normal(size=(512, 4)).astype(np.float32)
  q = quantization.quantize(w)
  err = np.abs(np.asarray(quantization.dequantize(q)) - w)
  ratio = (err / (np.asarray(q.scale) / 2)).max(axis=0)
  assert np.all(ratio > 0.98) and np.all(ratio <= ROUNDING)


def test_scale_is_max_abs_over_127_per_channel():
  w = np.array([[1.0, -8.0, 0.0], [-2.54, 4.0, 0.0]], np.float32)
  q = quantization.quantize(w, channel_axis=-1)
  np.testing.assert_allclose(q.scale[:2], [2.54 / 127, 8 / 127], rtol=1e-7)
  assert float(q.scale[2]) == quantization.MIN_SCALE   # all-zero channel
  assert q.values[:, 1].tolist() == [-127, 64] and q.values[:, 2].tolist() == [0, 0]
  q0 = quantization.quantize(w, channel_axis=0)       # per row
  np.testing.assert_allclose(q0.scale, [8 / 127, 4 / 127], rtol=1e-7)


# (w / scale) -> value with a supplied scale: round-half-to-even, saturation at
# +-127 (never -128).
ROUNDING_TABLE = [
    (0.0, 0), (-0.0, 0), (0.49, 0), (0.5, 0), (0.51, 1), (1.5, 2), (2.5, 2),
    (3.5, 4), (-0.5, 0), (-1.5, -2), (-2.5, -2), (-3.5, -4), (126.5, 126),
    (126.51, 127), (127.0, 127), (127.4, 127), (127.5, 127), (128.0, 127),
    (1e9, 127), (-127.5, -127), (-128.0, -127), (-129.0, -127), (-1e30, -127),
]


@pytest.mark.parametrize("step", [1.0, 0.25, 3.0])
def test_rounding_and_saturation_table(step):
  ratios = np.array([r for r, _ in ROUNDING_TABLE], np.float32)
  expected = [v for _, v in ROUNDING_TABLE]
  # the products are exact in float32 and dividing by step recovers the ratios
  w = (ratios * np.float32(step)).reshape(-1, 1)
  q = quantization.quantize(w, scale=np.array([step], np.float32))
  assert q.values.ravel().tolist() == expected


def test_zeros_stay_exactly_zero_after_pruning():
  w = np.random.default_rng(1).normal(size=(64, 16)).astype(np.float32)
  w[np.random.default_rng(2).random(w.shape) < 0.5] = 0.0
  w[:, 3] = 0.0
  deq = np.asarray(quantization.dequantize(quantization.quantize(w)))
  assert np.all(deq[w == 0] == 0.0) and not np.any(np.isnan(deq))
  # nonzeros above half a step never become zero
  q = quantization.quantize(w)
  big = np.abs(w) > np.asarray(q.scale) / 2
  assert np.all(deq[big] != 0)


def test_supplied_scale_is_checked():
  with pytest.raises(ValueError, match=r"scale.shape=\(3,\) must be \(2,\)"):
    quantization.quantize(np.ones((4, 2)), scale=np.ones(3))
  with pytest.raises(ValueError, match="must be finite and > 0"):
    quantization.quantize(np.ones((4, 2)), scale=np.array([1.0, 0.0]))
  with pytest.raises(ValueError, match="channel_axis=2"):
    quantization.quantize(np.ones((4, 2)), channel_axis=2)


def test_bfloat16_input_and_jit():
  w = jnp.asarray(np.random.default_rng(3).normal(size=(8, 4)), jnp.bfloat16)
  q = jax.jit(quantization.quantize)(w)
  assert q.values.dtype == jnp.int8 and q.scale.dtype == jnp.float32
  _check_invariants(np.asarray(w, np.float32), q)


def test_qtensor_is_a_pytree_with_static_axis():
  q = quantization.quantize(np.ones((3, 2), np.float32), channel_axis=0)
  leaves, treedef = jax.tree.flatten(q)
  assert [x.dtype for x in leaves] == [jnp.int8, jnp.float32]
  assert jax.tree.unflatten(treedef, leaves).channel_axis == 0
  np.testing.assert_array_equal(jax.jit(quantization.dequantize)(q), np.ones((3, 2)))


# ------------------------------------------------------------- matmul paths

def _matmul_bound(x, w):
  # float32 rounding error scale of a matmul: |x| @ |w| times a few ulps
  return 1e-5 * (np.abs(x) @ np.abs(w)) + 1e-30


@pytest.mark.parametrize("channel_axis", [1, 0])
def test_qmatmul_equals_dequantize_then_matmul(channel_axis):
  rng = np.random.default_rng(4)
  w = rng.normal(size=(48, 24)).astype(np.float32) * rng.uniform(0.01, 10, size=24)
  x = rng.normal(size=(2, 3, 48)).astype(np.float32)
  q = quantization.quantize(w, channel_axis=channel_axis)
  w_deq = np.asarray(quantization.dequantize(q))
  expected = x @ w_deq
  got = np.asarray(quantization.qmatmul(jnp.asarray(x), q))
  assert got.shape == (2, 3, 24)
  assert np.all(np.abs(got - expected) <= _matmul_bound(x, w_deq))


def test_qmatmul_of_transposed_embedding_is_tied_projection():
  rng = np.random.default_rng(5)
  emb = rng.normal(size=(30, 16)).astype(np.float32)
  q = quantization.quantize(emb, channel_axis=0)          # per embedding row
  x = rng.normal(size=(5, 16)).astype(np.float32)
  deq = np.asarray(quantization.dequantize(q))
  got = np.asarray(quantization.qmatmul(x, quantization.transpose(q)))
  assert np.all(np.abs(got - x @ deq.T) <= _matmul_bound(x, deq.T))


def test_int8_matmul_is_exact_on_the_grid():
  rng = np.random.default_rng(6)
  w = rng.integers(-127, 128, size=(40, 8)).astype(np.float32)
  w[0] = 127.0                                   # scale exactly 1 per column
  x = rng.integers(-127, 128, size=(6, 40)).astype(np.float32)
  x[:, 0] = -127.0                               # row scale exactly 1
  q = quantization.quantize(w)
  got = np.asarray(quantization.int8_matmul(jnp.asarray(x), q))
  np.testing.assert_array_equal(got, x @ w)


def test_int8_matmul_error_within_activation_quantization_bound():
  rng = np.random.default_rng(7)
  w = rng.normal(size=(64, 10)).astype(np.float32)
  x = (rng.normal(size=(3, 4, 64)) * rng.uniform(0.1, 100, size=(3, 4, 1))
       ).astype(np.float32)
  q = quantization.quantize(w)
  w_deq = np.asarray(quantization.dequantize(q), np.float64)
  got = np.asarray(quantization.int8_matmul(jnp.asarray(x), q), np.float64)
  scale_x = np.abs(x).max(-1, keepdims=True) / 127
  bound = scale_x / 2 * np.abs(w_deq).sum(0) * (1 + 1e-4) + 1e-5 * np.abs(x) @ np.abs(w_deq)
  err = np.abs(got - x @ w_deq)
  assert np.all(err <= bound)
  assert err.max() > 0.1 * bound.max()   # the activation rounding is really there


def test_int8_matmul_rejects_scales_on_the_contracted_axis():
  q = quantization.quantize(np.ones((4, 3), np.float32), channel_axis=0)
  with pytest.raises(ValueError, match="q.channel_axis=0 must be 1"):
    quantization.int8_matmul(np.ones((2, 4), np.float32), q)
  out = quantization.int8_matmul(np.ones((2, 3), np.float32), quantization.transpose(q))
  np.testing.assert_array_equal(out, np.full((2, 4), 3.0))


# ----------------------------------------------------------------- pytrees

@functools.cache
def _model_params():
  model = mlp.NextItemMLP(num_items=50, max_len=4, embed_dim=16, hidden_dim=32,
                          rngs=nnx.Rngs(0))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_quantize_params_selects_kernels_and_embeddings():
  params = _model_params()
  qparams = quantization.quantize_params(params)
  hidden, embed = qparams["hidden"]["kernel"], qparams["item_embed"]["embedding"]
  assert isinstance(hidden, quantization.QTensor) and hidden.scale.shape == (32,)
  assert hidden.channel_axis == 1
  assert isinstance(embed, quantization.QTensor) and embed.scale.shape == (51,)
  assert embed.channel_axis == 0
  assert qparams["hidden"]["bias"].dtype == jnp.float32
  deq = quantization.dequantize_params(qparams)
  assert jax.tree.structure(deq) == jax.tree.structure(params)
  for w, w_deq, q in zip(jax.tree.leaves(params), jax.tree.leaves(deq),
                         jax.tree.leaves(qparams, is_leaf=lambda x: isinstance(
                             x, quantization.QTensor))):
    if isinstance(q, quantization.QTensor):
      _check_invariants(np.asarray(w), q)
    else:
      np.testing.assert_array_equal(w_deq, w)


def test_quantize_params_pattern_and_errors():
  params = _model_params()
  qparams = quantization.quantize_params(params, exclude="*embed*")
  assert not isinstance(qparams["output_embed"]["embedding"], quantization.QTensor)
  with pytest.raises(ValueError, match=r"pattern='\*kernal'"):
    quantization.quantize_params(params, pattern="*kernal")


def test_size_bytes_int8_kernels_are_a_quarter_plus_scales():
  params = {"dense": {"kernel": jnp.zeros((256, 64)), "bias": jnp.zeros(64)}}
  assert quantization.size_bytes(params) == 4 * 256 * 64 + 4 * 64
  qparams = quantization.quantize_params(params)
  assert quantization.size_bytes(qparams["dense"]["kernel"]) == 256 * 64 + 4 * 64
  ratio = (quantization.size_bytes(qparams["dense"]["kernel"])
           / quantization.size_bytes(params["dense"]["kernel"]))
  assert ratio == pytest.approx(0.25 + 1 / 256)
  whole = _model_params()
  ratio = quantization.size_bytes(quantization.quantize_params(whole)) / \
      quantization.size_bytes(whole)
  assert 0.25 < ratio < 0.3
