"""Trainable subsets: frozen parameters get neither updates nor noise."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from privjax.dp import step as dp_step
from privjax.dp import noise
from privjax.models import bert
from privjax.models import llm_rec


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("scheme", ["lora", "last_k", "head"])
def test_dp_step_moves_only_the_trainable_subset(scheme):
  model = llm_rec.build_random(bert.BertConfig.tiny(), num_items=9,
                               lora_rank=2 if scheme == "lora" else 0,
                               rngs=nnx.Rngs(0))
  before = _flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  filt = llm_rec.trainable_filter(scheme, num_layers=model.config.bert.num_layers,
                                  last_k=1)
  graphdef, params, frozen = nnx.split(model, filt, ...)
  params, frozen = nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)

  def loss_fun(p, f, ex, rng):
    return llm_rec.loss(nnx.merge(graphdef, nnx.State(p), nnx.State(f)), ex, rng)

  rng = np.random.default_rng(0)
  batch = {"input_ids": jnp.asarray(rng.integers(1, 99, (4, 1, 6)), jnp.int32),
           "attention_mask": jnp.ones((4, 1, 6), jnp.int32),
           "target": jnp.asarray(rng.integers(0, 9, (4, 1)), jnp.int32)}
  opt = optax.sgd(0.5)
  step = dp_step.make_step(loss_fun, opt, dp_step.StepConfig(
      l2_clip_norm=1.0, noise_multiplier=2.0, expected_batch_size=4.0))
  state, _ = step(dp_step.init_state(params, opt), frozen, batch, jnp.ones((4, 1)),
                  noise.KeyStreams(jax.random.key(0)).noise_key(0))
  trained = {**_flat(frozen), **_flat(state.params)}
  trainable_paths = set(_flat(params))
  assert trainable_paths, scheme
  moved = {p for p in before if not np.array_equal(before[p], trained[p])}
  # Every trainable leaf moves (noise alone guarantees it); nothing else does.
  assert moved == trainable_paths
  if scheme == "lora":
    assert all("lora" in p or "head" in p for p in trainable_paths)
    assert any("base" in p for p in before if p not in trainable_paths)
  if scheme == "head":
    assert all(p.startswith("['head']") for p in trainable_paths)
  if scheme == "last_k":
    enc = [p for p in trainable_paths if p.startswith("['encoder']")]
    assert enc and all("['layers'][1]" in p for p in enc)
