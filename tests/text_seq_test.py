"""The text-first recommender: ghost == vmap, a frozen public text tower, its cache."""

import dataclasses
import json

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from privjax import config as config_lib
from privjax.dp import clipping
from privjax.dp import ghost
from privjax.dp import noise
from privjax.dp import step as dp_step
from privjax.models import text_seq
from privjax.models import text_seq_family
from privjax.run import train as train_lib
from privjax.run import workload as workload_lib

NUM_ITEMS, MAX_LEN = 11, 6


def _setup(fuse_id, item_bias=False):
  text = text_seq.whiten(np.random.default_rng(0).normal(size=(NUM_ITEMS, 20)), 5)
  cfg = text_seq.TextSeqConfig(num_items=NUM_ITEMS, max_len=MAX_LEN, text_dim=5,
                               embed_dim=8, num_layers=1, num_heads=2, fuse_id=fuse_id,
                               item_bias=item_bias)
  model = text_seq.TextSeqRec(cfg, item_text=text, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = nnx.to_pure_dict(params)

  def loss(p, ex, rng):
    return text_seq.sequence_loss(nnx.merge(graphdef, nnx.State(p), rest), ex, rng)

  rng = np.random.default_rng(1)
  hist = rng.integers(1, NUM_ITEMS + 1, size=(4, 2, MAX_LEN))
  hist[:, :, :2] = 0                           # left padding
  hist[:, :, 3] = hist[:, :, 4]                # repeated items in a window
  target = np.where(hist > 0, rng.integers(0, NUM_ITEMS, hist.shape), -1)
  batch = {"history": jnp.asarray(hist, jnp.int32), "target": jnp.asarray(target, jnp.int32)}
  return loss, params, rest, batch


@pytest.mark.parametrize("fuse_id,item_bias", [(False, False), (True, True)])
def test_ghost_equals_vmap(fuse_id, item_bias):
  loss, params, _, batch = _setup(fuse_id, item_bias)
  if item_bias:   # the bias starts at zero: give it a value so its gradient matters
    params["bias"]["embedding"] = params["bias"]["embedding"] + 0.3
  mask = jnp.ones((4, 2)).at[3, 1].set(0.0)
  cov = ghost.coverage(loss, params, jax.tree.map(lambda x: x[0, 0], batch))
  assert cov.complete, cov.untapped         # every trainable leaf has a rule
  exact = clipping.clipped_grad_sum(loss, l2_clip_norm=0.5)(params, batch, mask)
  fast = ghost.clipped_grad_sum(loss, l2_clip_norm=0.5)(params, batch, mask)
  np.testing.assert_allclose(fast.norms, exact.norms, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(fast.grad_sum), jax.tree.leaves(exact.grad_sum)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert ghost.verify(loss, params, batch, mask) == []


def test_the_text_tower_gets_neither_updates_nor_noise():
  loss, params, rest, batch = _setup(True)
  assert "item_text" not in params and "adapter" in params
  text_before = np.asarray(rest["item_text"].get_value()).copy()
  kernel_before = np.asarray(params["adapter"]["kernel"]).copy()   # the step donates
  step = dp_step.make_step(lambda p, f, ex, r: loss(p, ex, r), optax.sgd(1.0),
                           dp_step.StepConfig(l2_clip_norm=1.0, noise_multiplier=5.0,
                                              expected_batch_size=4.0, clipping="ghost"))
  state = dp_step.init_state(params, optax.sgd(1.0))
  state, _ = step(state, {}, batch, jnp.ones((4, 2)),
                  noise.KeyStreams(jax.random.key(0)).noise_key(0), None)
  np.testing.assert_array_equal(np.asarray(rest["item_text"].get_value()), text_before)
  assert "item_text" not in state.params
  # The adapter does get noise: sigma C = 5 on every coordinate, a large move.
  moved = np.abs(np.asarray(state.params["adapter"]["kernel"]) - kernel_before)
  assert moved.mean() > 0.5


def _cfg(tiny_cfg, pretrained, **over):
  return tiny_cfg(**{"model.name": "text_seq", "model.pretrained": str(pretrained),
                     "model.text_dim": 6, "model.embed_dim": 8, "model.hidden_dim": 8,
                     "data.max_examples_per_user": 1, "train.steps": 2,
                     "privacy.clipping": "ghost", **over})


def test_the_cache_is_a_function_of_item_text_only(tiny_cfg, tiny_pretrained, tmp_path,
                                                   monkeypatch):
  monkeypatch.setenv("PRIVJAX_CACHE", str(tmp_path / "cache"))
  text_seq_family._encode.cache_clear()  # pylint: disable=protected-access
  cfg = _cfg(tiny_cfg, tiny_pretrained)
  ds = workload_lib.load_dataset(cfg.data)
  a = text_seq_family.item_features(cfg, ds)
  # Other users, other interactions, same catalogue: the same features.
  other = workload_lib.load_dataset(config_lib.replace(cfg, **{"data.seed": 9,
                                                               "data.num_users": 50}).data)
  other = dataclasses.replace(other, item_titles=ds.item_titles, item_genres=ds.item_genres)
  text_seq_family._encode.cache_clear()  # pylint: disable=protected-access
  np.testing.assert_array_equal(a, text_seq_family.item_features(cfg, other))
  assert list((tmp_path / "cache" / "text_embeddings").glob("*.npy"))
  # A different catalogue text changes them.
  renamed = dataclasses.replace(ds, item_titles=tuple(t + "!" for t in ds.item_titles))
  assert not np.allclose(a, text_seq_family.item_features(cfg, renamed))


def test_trains_with_dp_and_states_the_public_tensor(tiny_cfg, tiny_pretrained, tmp_path,
                                                     monkeypatch):
  monkeypatch.setenv("PRIVJAX_CACHE", str(tmp_path / "cache"))
  from privjax import export  # pylint: disable=g-import-not-at-top
  result = train_lib.train_and_evaluate(_cfg(tiny_cfg, tiny_pretrained), tmp_path / "run",
                                        show_progress=False)
  privacy = json.loads((tmp_path / "run" / "privacy.json").read_text())
  assert privacy["clipping"] == "ghost" and result["steps"] == 2
  manifest = export.export(tmp_path / "run", tmp_path / "export", int8=True)
  assert "item_text" in manifest["public_tensors"]
  got = export.evaluate(tmp_path / "export", which=("test",), dequantize=True)
  assert 0 <= got["test"]["hr@10"] <= 1
