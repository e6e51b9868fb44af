"""Ghost clipping equals the exact vmap path: norms and clipped sums to 1e-5."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from privjax.dp import clipping
from privjax.dp import ghost
from privjax.models import losses
from privjax.models import nn
from privjax.models import mlp


def _pure(model, trainable=nnx.Param):
  graphdef, params, rest = nnx.split(model, trainable, ...)
  return graphdef, nnx.to_pure_dict(params), rest


def _mlp_setup(num_items=30, max_len=4):
  model = mlp.NextItemMLP(num_items=num_items, max_len=max_len, embed_dim=8,
                          hidden_dim=16, rngs=nnx.Rngs(0))
  graphdef, params, rest = _pure(model)

  def loss(p, ex, rng):
    del rng
    m = nnx.merge(graphdef, nnx.State(p), rest)
    return losses.softmax_cross_entropy(m(ex["history"]), ex["target"])

  return loss, params


def _mlp_batch(g, k, num_items=30, max_len=4, seed=0, repeat_tokens=True):
  rng = np.random.default_rng(seed)
  hist = rng.integers(0, num_items + 1, size=(g, k, max_len))
  if repeat_tokens:
    hist[:, :, 0] = hist[:, :, 1]    # repeated ids inside an example
    hist[:, 0, :] = hist[:, -1, :]   # and across a group's examples
  return {"history": jnp.asarray(hist, jnp.int32),
          "target": jnp.asarray(rng.integers(0, num_items, size=(g, k)), jnp.int32)}


def _assert_same(fast, exact, atol=1e-5):
  np.testing.assert_allclose(fast.norms, exact.norms, rtol=1e-5, atol=atol)
  np.testing.assert_array_equal(fast.valid, exact.valid)
  for a, b in zip(jax.tree.leaves(fast.grad_sum), jax.tree.leaves(exact.grad_sum)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol)
  assert fast.sensitivity == exact.sensitivity


@pytest.mark.parametrize("k", [1, 3])
def test_mlp_ghost_equals_vmap(k):
  loss, params = _mlp_setup()
  batch = _mlp_batch(6, k)
  mask = jnp.ones((6, k)).at[2, 0].set(0.0).at[5].set(0.0)   # padding slots and a padding group
  for c in (1e6, 0.05):   # no clipping / heavy clipping
    exact = clipping.clipped_grad_sum(loss, l2_clip_norm=c)(params, batch, mask)
    fast = jax.jit(ghost.clipped_grad_sum(loss, l2_clip_norm=c))(params, batch, mask)
    _assert_same(fast, exact)


def test_ghost_non_finite_rows_and_per_layer_and_microbatches():
  loss, params = _mlp_setup()
  batch = _mlp_batch(8, 2, seed=1)
  # A non-finite example: poison one embedding row used only by group 3.
  poisoned = jax.tree.map(jnp.copy, params)
  bad_id = 30
  batch["history"] = jnp.where(batch["history"] == bad_id, 1, batch["history"])
  batch["history"] = batch["history"].at[3, 1, 0].set(bad_id)
  poisoned["item_embed"]["embedding"] = poisoned["item_embed"]["embedding"].at[bad_id].set(jnp.inf)
  mask = jnp.ones((8, 2))
  for kwargs in ({}, {"per_layer": True}, {"microbatch_size": 4}):
    exact = clipping.clipped_grad_sum(loss, l2_clip_norm=0.1, **kwargs)(poisoned, batch, mask)
    fast = ghost.clipped_grad_sum(loss, l2_clip_norm=0.1, **kwargs)(poisoned, batch, mask)
    assert float(fast.valid[3]) == 0.0
    for leaf in jax.tree.leaves(fast.grad_sum):
      assert np.all(np.isfinite(leaf))
    _assert_same(fast, exact)


def test_frozen_parameters_are_not_tapped_and_untapped_fall_back():
  model = mlp.NextItemMLP(num_items=20, max_len=3, embed_dim=4, hidden_dim=8,
                          rngs=nnx.Rngs(1))
  # Freeze the input embedding; give the model one parameter no layer taps.
  model.extra = nnx.Param(jnp.ones((20,)))
  graphdef, params, rest = nnx.split(
      model, nnx.All(nnx.Param, nnx.Not(nnx.PathContains("item_embed"))), ...)
  params = nnx.to_pure_dict(params)

  def loss(p, ex, rng):
    m = nnx.merge(graphdef, nnx.State(p), rest)
    return losses.softmax_cross_entropy(m(ex["history"]) * m.extra[...], ex["target"])

  cov = ghost.coverage(loss, params, jax.tree.map(lambda x: x[0, 0], _mlp_batch(1, 1, 20, 3)))
  assert cov.untapped == ("['extra']",)
  assert not any("item_embed" in p for p in cov.tapped)
  batch = _mlp_batch(5, 2, 20, 3, seed=2)
  exact = clipping.clipped_grad_sum(loss, l2_clip_norm=0.2)(params, batch, jnp.ones((5, 2)))
  fast = ghost.clipped_grad_sum(loss, l2_clip_norm=0.2)(params, batch, jnp.ones((5, 2)))
  _assert_same(fast, exact)


def test_tied_embedding_is_exact():
  class Tied(nnx.Module):
    def __init__(self):
      self.embed = nn.Embed(12, 6, init_stddev=0.5, rngs=nnx.Rngs(0))
      self.mid = nn.Linear(6, 6, rngs=nnx.Rngs(1))
      self.norm = nn.LayerNorm(6)

    def __call__(self, ids):
      h = self.norm(self.mid(self.embed(ids)))
      return self.embed.attend(h)            # same table in and out

  graphdef, params, rest = _pure(Tied())

  def loss(p, ex, rng):
    m = nnx.merge(graphdef, nnx.State(p), rest)
    logits = m(ex["ids"])                     # [T, 12]
    return jnp.sum(jax.vmap(losses.softmax_cross_entropy)(logits, ex["next"]))

  rng = np.random.default_rng(3)
  batch = {"ids": jnp.asarray(rng.integers(0, 12, (4, 2, 7)), jnp.int32),
           "next": jnp.asarray(rng.integers(0, 12, (4, 2, 7)), jnp.int32)}
  cov = ghost.coverage(loss, params, jax.tree.map(lambda x: x[0, 0], batch))
  assert cov.shared == ("['embed']['embedding']",)
  exact = clipping.clipped_grad_sum(loss, l2_clip_norm=0.3)(params, batch, jnp.ones((4, 2)))
  fast = ghost.clipped_grad_sum(loss, l2_clip_norm=0.3)(params, batch, jnp.ones((4, 2)))
  _assert_same(fast, exact)


def test_verify_catches_a_parameter_read_outside_the_taps():
  model = mlp.NextItemMLP(num_items=10, max_len=2, embed_dim=4, hidden_dim=4,
                          rngs=nnx.Rngs(0))
  graphdef, params, rest = _pure(model)

  def sneaky(p, ex, rng):
    m = nnx.merge(graphdef, nnx.State(p), rest)
    logits = m(ex["history"])
    # Reads the hidden kernel directly, bypassing its tap (and not as a
    # constant shift of all logits, which softmax would ignore).
    logits = logits.at[0].add(jnp.sum(m.hidden.kernel[...] ** 2))
    return losses.softmax_cross_entropy(logits, ex["target"])

  def honest(p, ex, rng):
    m = nnx.merge(graphdef, nnx.State(p), rest)
    return losses.softmax_cross_entropy(m(ex["history"]), ex["target"])

  batch = _mlp_batch(4, 1, 10, 2)
  assert ghost.verify(honest, params, batch, jnp.ones((4, 1))) == []
  bad = ghost.verify(sneaky, params, batch, jnp.ones((4, 1)))
  assert "<norms>" in bad and "['hidden']['kernel']" in bad


def test_gram_and_direct_rules_agree():
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.normal(size=(3, 5, 4)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(3, 5, 6)), jnp.float32)
  direct = jnp.sum(jnp.square(jnp.einsum("gti,gto->gio", a, b)), axis=(1, 2))
  gram = jnp.sum(jnp.einsum("gti,gsi->gts", a, a) * jnp.einsum("gto,gso->gts", b, b), (1, 2))
  np.testing.assert_allclose(ghost._outer_sq(a, b), direct, rtol=1e-5)   # pylint: disable=protected-access
  np.testing.assert_allclose(gram, direct, rtol=1e-5)


def _sasrec_setup(tied: bool):
  from privjax.models import sasrec  # pylint: disable=g-import-not-at-top
  cfg = sasrec.SASRecConfig(num_items=12, max_len=6, embed_dim=8, num_layers=1,
                            num_heads=2, tie_embeddings=tied)
  graphdef, params, rest = _pure(sasrec.SASRec(cfg, rngs=nnx.Rngs(0)))

  def loss(p, ex, rng):
    return sasrec.sequence_loss(nnx.merge(graphdef, nnx.State(p), rest), ex, rng)

  rng = np.random.default_rng(4)
  hist = rng.integers(1, 13, size=(4, 2, 6))
  hist[:, :, :2] = 0                       # left padding
  hist[:, :, 3] = hist[:, :, 4]            # repeated items
  hist[:, 1] = hist[:, 0]                  # repeated windows within a group
  target = np.where(hist > 0, rng.integers(0, 12, size=hist.shape), -1)
  batch = {"history": jnp.asarray(hist, jnp.int32), "target": jnp.asarray(target, jnp.int32)}
  return loss, params, batch


@pytest.mark.parametrize("tied", [False, True])
def test_sasrec_ghost_equals_vmap(tied):
  loss, params, batch = _sasrec_setup(tied)
  mask = jnp.ones((4, 2)).at[3, 1].set(0.0)
  exact = clipping.clipped_grad_sum(loss, l2_clip_norm=0.5)(params, batch, mask)
  fast = ghost.clipped_grad_sum(loss, l2_clip_norm=0.5)(params, batch, mask)
  cov = ghost.coverage(loss, params, jax.tree.map(lambda x: x[0, 0], batch))
  assert cov.complete
  assert bool(cov.shared) == tied
  _assert_same(fast, exact)


def test_bert_recommender_ghost_equals_vmap():
  from privjax.models import bert  # pylint: disable=g-import-not-at-top
  from privjax.models import llm_rec  # pylint: disable=g-import-not-at-top
  model = llm_rec.build_random(bert.BertConfig.tiny(), num_items=9, use_id_head=True,
                               rngs=nnx.Rngs(0))
  graphdef, params, rest = _pure(model)

  def loss(p, ex, rng):
    return llm_rec.loss(nnx.merge(graphdef, nnx.State(p), rest), ex, rng)

  rng = np.random.default_rng(5)
  ids = rng.integers(1, 99, size=(3, 2, 7))
  ids[:, :, 2] = ids[:, :, 5]                              # repeated tokens
  att = np.ones((3, 2, 7), np.int32)
  att[:, :, 5:] = 0                                        # token padding
  ids = np.where(att > 0, ids, 0)
  batch = {"input_ids": jnp.asarray(ids, jnp.int32), "attention_mask": jnp.asarray(att),
           "target": jnp.asarray(rng.integers(0, 9, (3, 2)), jnp.int32)}
  mask = jnp.ones((3, 2)).at[2, 1].set(0.0)
  assert ghost.coverage(loss, params, jax.tree.map(lambda x: x[0, 0], batch)).complete
  exact = clipping.clipped_grad_sum(loss, l2_clip_norm=0.3)(params, batch, mask)
  fast = ghost.clipped_grad_sum(loss, l2_clip_norm=0.3)(params, batch, mask)
  _assert_same(fast, exact)
