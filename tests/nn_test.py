"""privjax.models.nn: shapes, the ghost taps each layer exposes, the int8 path."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from privjax.compress import quantization
from privjax.models import nn


def _x(*shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


class _Recorder:
  """A tap that records every call and returns ``outputs + offset``."""

  def __init__(self, offset=0.0):
    self.calls, self.offset = [], offset

  def __call__(self, layer, kind, inputs, outputs):
    self.calls.append((layer, kind, inputs, outputs))
    return outputs + self.offset


# ---------------------------------------------------------------- shapes


def test_every_layer_takes_any_leading_axes():
  linear = nn.Linear(3, 2, rngs=nnx.Rngs(0))
  embed = nn.Embed(10, 4, rngs=nnx.Rngs(1))
  norm = nn.LayerNorm(4)
  lora = nn.LoRALinear(nn.Linear(3, 2, rngs=nnx.Rngs(2)), rank=2, rngs=nnx.Rngs(3))
  for lead in [(), (5,), (4, 5)]:
    assert linear(_x(*lead, 3)).shape == lead + (2,)
    assert lora(_x(*lead, 3)).shape == lead + (2,)
    assert embed(jnp.zeros(lead + (7,), jnp.int32)).shape == lead + (7, 4)
    assert embed.attend(_x(*lead, 4)).shape == lead + (10,)
    assert norm(_x(*lead, 4)).shape == lead + (4,)
  assert linear.kernel.shape == (3, 2) and linear.bias.shape == (2,)
  assert nn.Linear(3, 2, use_bias=False, rngs=nnx.Rngs(0)).bias is None
  assert embed.embedding.shape == (10, 4)


def test_rows_of_a_batch_equal_the_unbatched_layer():
  """No layer mixes examples: row i of a batch is the layer on example i."""
  linear = nn.Linear(3, 2, rngs=nnx.Rngs(0))
  norm = nn.LayerNorm(3)
  x = _x(4, 3) * jnp.arange(1.0, 5.0)[:, None]  # rows of different scales
  for layer in (linear, norm):
    batched = layer(x)
    for i in range(4):
      np.testing.assert_allclose(batched[i], layer(x[i]), rtol=1e-6, atol=1e-6)


def test_layernorm_normalises_each_position_and_lora_starts_at_the_base():
  norm = nn.LayerNorm(6, epsilon=1e-6)
  y = norm(_x(3, 6) * 5 + 2)
  np.testing.assert_allclose(y.mean(-1), 0, atol=1e-5)
  np.testing.assert_allclose(y.var(-1), 1, atol=1e-3)
  lora = nn.LoRALinear(nn.Linear(3, 2, rngs=nnx.Rngs(0)), rank=1, alpha=4.0,
                       rngs=nnx.Rngs(1))
  x = _x(5, 3)
  np.testing.assert_array_equal(lora(x), lora.base(x))
  assert lora.scaling == 4.0
  lora.lora_up.kernel.set_value(jnp.ones((1, 2)))
  assert np.abs(np.asarray(lora(x) - lora.base(x))).max() > 0
  with pytest.raises(ValueError, match="rank=0"):
    nn.LoRALinear(nn.Linear(3, 2, rngs=nnx.Rngs(0)), rank=0, rngs=nnx.Rngs(1))


# ---------------------------------------------------------------- taps


def test_no_tap_outside_a_tapping_context():
  record = _Recorder()
  linear = nn.Linear(3, 2, rngs=nnx.Rngs(0))
  with nn.tapping(record):
    linear(_x(3))
  linear(_x(3))
  assert len(record.calls) == 1
  with pytest.raises(RuntimeError):
    with nn.tapping(record):
      raise RuntimeError("boom")
  linear(_x(3))  # the context was reset despite the error
  assert len(record.calls) == 1


def test_each_layer_taps_the_input_that_multiplies_its_parameters():
  linear = nn.Linear(3, 2, rngs=nnx.Rngs(0))
  embed = nn.Embed(10, 4, rngs=nnx.Rngs(1))
  norm = nn.LayerNorm(4)
  x, ids, h = _x(5, 3), jnp.array([[1, 2, 9]]), _x(2, 4, seed=1) * 3 + 1
  plain = {"linear": linear(x), "embed": embed(ids), "attend": embed.attend(h),
           "layernorm": norm(h)}
  record = _Recorder()
  with nn.tapping(record):
    linear(x), embed(ids), embed.attend(h), norm(h)
  assert [(layer, kind) for layer, kind, _, _ in record.calls] == [
      (linear, "linear"), (embed, "embed"), (embed, "attend"), (norm, "layernorm")]
  inputs = {kind: i for _, kind, i, _ in record.calls}
  outputs = {kind: o for _, kind, _, o in record.calls}
  np.testing.assert_array_equal(inputs["linear"], x)
  np.testing.assert_array_equal(inputs["embed"], ids)
  np.testing.assert_array_equal(inputs["attend"], h)
  # LayerNorm's parameters multiply the normalised input: y = x_hat * scale + bias.
  x_hat = (h - h.mean(-1, keepdims=True)) / jnp.sqrt(h.var(-1, keepdims=True) + 1e-12)
  np.testing.assert_allclose(inputs["layernorm"], x_hat, rtol=1e-5, atol=1e-5)
  for kind, y in plain.items():
    np.testing.assert_array_equal(outputs[kind], y, err_msg=kind)


def test_a_lora_layer_taps_its_three_linears():
  lora = nn.LoRALinear(nn.Linear(3, 2, rngs=nnx.Rngs(0)), rank=2, rngs=nnx.Rngs(1))
  record = _Recorder()
  x = _x(4, 3)
  with nn.tapping(record):
    lora(x)
  assert [(layer, kind) for layer, kind, _, _ in record.calls] == [
      (lora.base, "linear"), (lora.lora_down, "linear"), (lora.lora_up, "linear")]
  np.testing.assert_array_equal(record.calls[2][2], lora.lora_down(x))


def test_the_tap_output_replaces_the_layer_output_and_carries_gradients():
  """What ghost clipping relies on: a zero perturbation added by the tap has
  the gradient of the layer's output."""
  linear = nn.Linear(3, 2, rngs=nnx.Rngs(0))
  x, cotangent = _x(4, 3), _x(4, 2, seed=1)
  with nn.tapping(_Recorder(offset=1.5)):
    shifted = linear(x)
  np.testing.assert_allclose(shifted, linear(x) + 1.5, rtol=1e-6)

  def loss(z):
    with nn.tapping(lambda layer, kind, inputs, outputs: outputs + z):
      return jnp.sum(linear(x) * cotangent)
  np.testing.assert_allclose(jax.grad(loss)(jnp.zeros((4, 2))), cotangent, rtol=1e-6)


def test_taps_run_at_trace_time_only():
  linear = nn.Linear(3, 2, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(linear)
  record = _Recorder()

  @jax.jit
  def fun(state, x):
    with nn.tapping(record):
      return nnx.merge(graphdef, state)(x)
  for seed in range(3):
    fun(state, _x(5, 3, seed=seed))
  assert len(record.calls) == 1  # one trace for one shape


# ---------------------------------------------------------------- int8


def _max_err(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def test_an_int8_kernel_computes_the_dequantized_float_layer():
  linear = nn.Linear(16, 8, rngs=nnx.Rngs(0))
  x = _x(6, 16)
  original = linear(x)
  q = quantization.quantize(linear.kernel[...])
  linear.kernel.set_value(q)
  int8_out = linear(x)
  linear.kernel.set_value(quantization.dequantize(q))
  float_out = linear(x)
  # Equal up to float rounding (scale applied after the matmul)...
  np.testing.assert_allclose(int8_out, float_out, rtol=1e-5, atol=1e-6)
  # ...and genuinely the rounded weights, not the original ones.
  assert _max_err(int8_out, original) > 100 * _max_err(int8_out, float_out)


@pytest.mark.parametrize("channel_axis", [0, 1])
def test_an_int8_table_looks_up_and_attends_as_the_dequantized_table(channel_axis):
  embed = nn.Embed(12, 8, init_stddev=1.0, rngs=nnx.Rngs(0))
  ids, h = jnp.array([[0, 3, 11], [5, 5, 2]]), _x(3, 8)
  original = embed.attend(h)
  q = quantization.quantize(embed.embedding[...], channel_axis=channel_axis)
  embed.embedding.set_value(q)
  rows, scores = embed(ids), embed.attend(h)
  record = _Recorder()
  with nn.tapping(record):
    embed(ids)
  assert [kind for _, kind, _, _ in record.calls] == ["embed"]  # int8 is tapped too
  embed.embedding.set_value(quantization.dequantize(q))
  np.testing.assert_array_equal(rows, embed(ids))  # the same products, exactly
  np.testing.assert_allclose(scores, embed.attend(h), rtol=1e-5, atol=1e-5)
  assert _max_err(scores, original) > 100 * _max_err(scores, embed.attend(h))
