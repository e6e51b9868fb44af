"""SASRec: shapes, masking, dropout, loss, windows, and that it learns.

Compiling dominates the run time on CPU, so models are built once per
configuration and called through one jitted ``_apply`` (one compile per
method and input shape); shapes are checked with ``jax.eval_shape``.
"""

import dataclasses
import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from privjax.models import sasrec

NUM_ITEMS = 11
# Dropout masks from default (threefry) keys take several seconds to compile
# on CPU; "rbg" keys exercise the same model code and compile in about one.
_KEY = functools.partial(jax.random.key, impl="rbg")


@functools.cache
def _model(seed=0, **overrides):
  config = dataclasses.replace(sasrec.SASRecConfig.tiny(NUM_ITEMS), **overrides)
  return sasrec.SASRec(config, rngs=nnx.Rngs(seed))


@functools.partial(jax.jit, static_argnames=("graphdef", "method"))
def _jit_apply(graphdef, state, history, rng, method):
  return getattr(nnx.merge(graphdef, state), method)(history, *(
      () if rng is None else (rng,)))


def _apply(model, history, rng=None, method="__call__"):
  graphdef, state = nnx.split(model)
  return np.asarray(_jit_apply(graphdef, state, history, rng, method))


def _histories():
  # Left-padded shifted ids; the last row is all padding (a DP filler row).
  return jnp.array([[0, 0, 0, 3, 7, 1, 11, 4],
                    [5, 2, 9, 9, 1, 8, 6, 10],
                    [0, 0, 0, 0, 0, 0, 0, 2],
                    [0, 0, 0, 0, 0, 0, 0, 0]], jnp.int32)


def _np_forward(model, history):
  """The model written out in NumPy for one unbatched history (no dropout)."""
  cfg = model.config
  p = lambda x: np.asarray(x[...], np.float64)

  def ln(x, norm):
    x_hat = (x - x.mean(-1, keepdims=True)) / np.sqrt(
        x.var(-1, keepdims=True) + cfg.layer_norm_eps)
    return x_hat * p(norm.scale) + p(norm.bias)

  def linear(x, layer):
    return x @ p(layer.kernel) + p(layer.bias)

  history = np.asarray(history)
  length, d, h, k = len(history), cfg.embed_dim, cfg.num_heads, cfg.head_dim
  real = history > 0
  x = p(model.item_embed.embedding)[history] * np.sqrt(d)
  x = x + p(model.position_embed.embedding)[cfg.max_len - length + np.arange(length)]
  x = x * real[:, None]
  for block in model.blocks:
    qkv = linear(ln(x, block.attention_norm), block.qkv).reshape(length, 3, h, k)
    attn = np.zeros((length, h, k))
    for head in range(h):
      for q in range(length):
        visible = [t for t in range(q + 1) if real[t]]
        if not visible:            # no visible key: uniform over all keys
          visible = list(range(length))
        s = np.array([qkv[q, 0, head] @ qkv[t, 1, head] for t in visible]) / np.sqrt(k)
        w = np.exp(s - s.max())
        w /= w.sum()
        attn[q, head] = w @ qkv[visible, 2, head]
    x = x + linear(attn.reshape(length, d), block.attention_output)
    f = np.maximum(linear(ln(x, block.ffn_norm), block.ffn_in), 0.0)
    x = x + linear(f, block.ffn_out)
  x = ln(x, model.final_norm) * real[:, None]
  return x @ p(model.output_embed.embedding).T


def test_matches_numpy_reference_forward():
  model = _model()
  logits_BxLxN = _apply(model, _histories())
  for row, history in enumerate(_histories()):
    np.testing.assert_allclose(logits_BxLxN[row], _np_forward(model, history),
                               rtol=1e-4, atol=1e-4)


def test_shapes_unbatched_and_batched():
  graphdef, state = nnx.split(_model())

  def shape(method, history):
    fun = lambda s, h: getattr(nnx.merge(graphdef, s), method)(h)
    return jax.eval_shape(fun, state, history).shape

  history_BxL = _histories()
  assert shape("hidden", history_BxL[0]) == (8, 16)
  assert shape("__call__", history_BxL[0]) == (8, NUM_ITEMS)
  assert shape("score_last", history_BxL[0]) == (NUM_ITEMS,)
  assert shape("hidden", history_BxL) == (4, 8, 16)
  assert shape("__call__", history_BxL) == (4, 8, NUM_ITEMS)
  assert shape("score_last", history_BxL) == (4, NUM_ITEMS)
  assert shape("__call__", history_BxL[None]) == (1, 4, 8, NUM_ITEMS)


def test_batched_rows_equal_unbatched_and_vmap():
  model = _model()
  history_BxL = _histories()
  batched = _apply(model, history_BxL)
  for row, history in enumerate(history_BxL):
    np.testing.assert_allclose(batched[row], _apply(model, history),
                               rtol=1e-5, atol=1e-5)
  graphdef, state = nnx.split(model)
  vmapped = jax.jit(jax.vmap(lambda h: nnx.merge(graphdef, state)(h)))(history_BxL)
  np.testing.assert_allclose(batched, vmapped, rtol=1e-5, atol=1e-5)
  last = _apply(model, history_BxL, method="score_last")
  np.testing.assert_allclose(last, batched[:, -1], rtol=1e-5, atol=1e-5)


def test_causal_future_item_changes_only_later_positions():
  model = _model()
  history = _histories()[1]
  changed = history.at[5].set(3)
  # Logits are per-position functions of the hidden state, so they show it.
  before, after = _apply(model, history), _apply(model, changed)
  np.testing.assert_array_equal(before[:5], after[:5])
  assert np.all(np.abs(before[5:] - after[5:]).max(-1) > 1e-3)


def test_left_padding_and_window_alignment():
  model = _model()
  padded = _histories()[0]                     # 3 padding slots then 5 items
  real = np.asarray(padded) > 0
  logits = _apply(model, padded)
  # An input shorter than max_len is the right end of the window: trimming
  # the padding changes nothing at the real positions. (Without the
  # key-padding mask, real positions would attend to the padding slots,
  # whose hidden states are non-zero after the first block.)
  np.testing.assert_allclose(_apply(model, padded[3:]), logits[3:],
                             rtol=1e-5, atol=1e-5)
  # Padding positions have zero hidden state, hence zero logits; real ones not.
  np.testing.assert_array_equal(logits[~real], 0.0)
  assert np.all(np.abs(logits[real]).max(-1) > 0)
  # Positions are absolute in the window: the same items one slot further
  # left (one padding slot less, one more item on the right) differ.
  shifted = _apply(model, jnp.concatenate([padded[1:], jnp.array([5])]))
  assert not np.allclose(shifted[2:7], logits[3:8], atol=1e-3)


@functools.cache
def _loss_and_grad(model):
  graphdef, params = nnx.split(model)
  traces = []

  @jax.jit
  def fun(params, example, rng):
    traces.append(1)
    loss = lambda p: sasrec.sequence_loss(nnx.merge(graphdef, p), example, rng)
    return jax.value_and_grad(loss)(params)

  return functools.partial(fun, params), traces


def test_all_padding_example_has_zero_loss_and_gradient():
  # Its forward pass is finite: see the last row of the reference test.
  model = _model(dropout_rate=0.3)
  empty = {"history": jnp.zeros(8, jnp.int32), "target": jnp.full(8, -1, jnp.int32)}
  loss, grads = _loss_and_grad(model)[0](empty, _KEY(0))
  assert float(loss) == 0.0
  assert all(np.all(g == 0) for g in jax.tree.leaves(grads))


def _hand_loss(logits, target):
  logits = np.asarray(logits, np.float64)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return -sum(log_probs[t, int(target[t])] for t in range(len(target))
              if target[t] >= 0)


def test_jit_traces_once_and_follows_the_dropout_key():
  model = _model(dropout_rate=0.3)
  loss_and_grad, traces = _loss_and_grad(model)
  example = {"history": _histories()[0],
             "target": jnp.array([-1, -1, -1, 6, 0, 10, 3, 8], jnp.int32)}
  losses = [float(loss_and_grad(example, _KEY(seed))[0])
            for seed in range(3)]
  assert len(traces) == 1
  assert np.all(np.isfinite(losses)) and len(set(losses)) == 3  # dropout differs


def test_too_long_history_and_bad_config_raise():
  with pytest.raises(ValueError, match="max_len=8"):
    jax.eval_shape(_model(), jnp.ones(9, jnp.int32))
  with pytest.raises(ValueError, match="dropout_rate=1.0"):
    sasrec.SASRecConfig(num_items=3, max_len=4, dropout_rate=1.0)
  with pytest.raises(ValueError, match="activation='tanh'"):
    sasrec.SASRecConfig(num_items=3, max_len=4, activation="tanh")
  with pytest.raises(ValueError, match="num_items=0"):
    sasrec.SASRecConfig(num_items=0, max_len=4)


def test_dropout_needs_a_key_and_follows_it():
  model = _model(dropout_rate=0.3)
  history = _histories()[:3]
  deterministic = _apply(model, history)
  key_a, key_b = _KEY(1), _KEY(2)
  dropped_a = _apply(model, history, key_a)
  np.testing.assert_array_equal(_apply(model, history, key_a), dropped_a)
  assert not np.allclose(dropped_a, _apply(model, history, key_b), atol=1e-3)
  assert not np.allclose(dropped_a, deterministic, atol=1e-3)
  # rate 0 with a key is exactly the deterministic model (same parameters).
  no_dropout = _model(dropout_rate=0.0)
  np.testing.assert_array_equal(_apply(no_dropout, history, key_a), deterministic)
  np.testing.assert_array_equal(_apply(no_dropout, history), deterministic)


def test_tied_embeddings_score_with_input_table():
  model = _model(tie_embeddings=True)
  assert model.output_embed is None
  hidden = _apply(model, _histories(), method="hidden")
  expected = hidden @ np.asarray(model.item_embed.embedding[...])[1:].T
  np.testing.assert_allclose(model.logits(jnp.asarray(hidden)), expected,
                             rtol=1e-5, atol=1e-5)


def test_sequence_loss_matches_hand_computation():
  model = _model()
  history = _histories()[0]
  target = jnp.array([-1, -1, -1, 6, 0, 10, 3, 8], jnp.int32)
  expected = _hand_loss(_apply(model, history), target)
  graphdef, state = nnx.split(model)
  example = {"history": history, "target": target}
  total, mean = jax.jit(lambda ex: [sasrec.sequence_loss(
      nnx.merge(graphdef, state), ex, None, reduction=r) for r in ("sum", "mean")]
                        )(example)
  np.testing.assert_allclose(float(total), expected, rtol=1e-5)
  np.testing.assert_allclose(float(mean), expected / 5, rtol=1e-5)   # 5 targets
  with pytest.raises(ValueError, match="reduction='max'"):
    sasrec.sequence_loss(model, example, None, reduction="max")


def test_sequence_examples_windows():
  seqs = [np.arange(7), np.array([3]), np.array([2, 4])]
  examples, users = sasrec.sequence_examples(seqs, max_len=3, max_windows_per_user=3)
  # User 0: inputs 0..5, targets 1..6, split from the right into windows of 3.
  assert examples["history"].tolist() == [[4, 5, 6], [1, 2, 3], [0, 0, 3]]
  assert examples["target"].tolist() == [[4, 5, 6], [1, 2, 3], [-1, -1, 4]]
  assert users.tolist() == [0, 0, 2]
  one, users_one = sasrec.sequence_examples(seqs, max_len=3)
  assert one["history"].tolist() == [[4, 5, 6], [0, 0, 3]]
  assert one["target"].tolist() == [[4, 5, 6], [-1, -1, 4]]
  assert users_one.tolist() == [0, 2]
  assert one["history"].dtype == one["target"].dtype == np.int32
  with pytest.raises(ValueError, match="< 2 training items"):
    sasrec.sequence_examples([np.array([1])], max_len=3)
  with pytest.raises(ValueError, match="max_windows_per_user=0"):
    sasrec.sequence_examples(seqs, max_len=3, max_windows_per_user=0)


def test_tiny_model_overfits_tiny_dataset():
  rng = np.random.default_rng(0)
  seqs = [rng.integers(0, NUM_ITEMS, size=int(n)) for n in rng.integers(4, 10, size=8)]
  examples, _ = sasrec.sequence_examples(seqs, max_len=8)
  batch = jax.tree.map(jnp.asarray, examples)
  graphdef, params = nnx.split(_model())
  optimizer = optax.adam(1e-2)

  def loss_fn(p):
    model = nnx.merge(graphdef, p)
    return jnp.mean(jax.vmap(lambda ex: sasrec.sequence_loss(model, ex, None))(batch))

  def step(carry, _):
    p, opt_state = carry
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, opt_state = optimizer.update(grads, opt_state, p)
    return (optax.apply_updates(p, updates), opt_state), loss

  # One compiled scan over 100 steps; the last loss is before the last update.
  _, step_losses = jax.jit(lambda p: jax.lax.scan(
      step, (p, optimizer.init(p)), length=100))(params)
  assert float(step_losses[-1]) < 0.5 * float(step_losses[0])
