"""Tests for privjax.models.llm_rec (tiny random BERT; MiniLM tests skip if absent)."""

import dataclasses

import numpy as np
import optax
import pytest
from flax import nnx
import jax
import jax.numpy as jnp

from privjax.models import losses
from privjax.data import sequences
from privjax.models import bert
from privjax.models import bert_hf
from privjax.models import llm_examples
from privjax.models import llm_rec

# One layer keeps compiles cheap; parameter-path tests use an abstract
# 2-layer model (nnx.eval_shape, no compute).
CONFIG = dataclasses.replace(bert.BertConfig.tiny(), num_layers=1)
CONFIG2 = bert.BertConfig.tiny()  # 2 layers, hidden 32, vocab 99.
NUM_ITEMS = 9
T = 12
WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta",
         "iota")


def _word_tokenizer():
  """A whitespace word-level HF tokenizer: one token per title and per ';'."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  vocab = {w: i for i, w in enumerate(
      ("[PAD]", "[UNK]", "[CLS]", "[SEP]", ";") + WORDS)}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, cls_token="[CLS]", sep_token="[SEP]",
      pad_token="[PAD]", unk_token="[UNK]")


def _tokens(seed, shape):
  """Random right-padded token batch with lengths in [2, T]."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, CONFIG.vocab_size, size=shape + (T,)).astype(np.int32)
  lengths = rng.integers(2, T + 1, size=shape)
  mask = (np.arange(T) < lengths[..., None]).astype(np.int32)
  return {"input_ids": ids * mask, "attention_mask": mask}


def _paths(state):
  return {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(state)}


class _Probe:
  """One jitted forward per model returning scores and intermediates.

  Everything goes through this one compile per input shape (eager calls
  compile op by op, which is what makes tiny-model tests slow).
  """

  def __init__(self, model):
    self.graphdef, self.state = nnx.split(model)
    graphdef = self.graphdef

    def fun(state, tokens):
      m = nnx.merge(graphdef, state)
      return {"scores": m(tokens), "user": m.user_vector(tokens),
              "items": m.item_vectors(), "pooled": m.pooled(tokens)}
    self._fun = jax.jit(fun)

  def __call__(self, tokens, state=None):
    return self._fun(self.state if state is None else state, tokens)


BATCH = _tokens(0, (4,))
TITLE_TOKENS = _tokens(5, (NUM_ITEMS,))


@pytest.fixture(scope="module")
def model():
  return llm_rec.build_random(CONFIG, num_items=NUM_ITEMS, batch_size=NUM_ITEMS,
                              title_tokens=TITLE_TOKENS, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def lora_model():
  """As ``model`` (same seed) plus LoRA adapters on query and output."""
  return llm_rec.build_random(CONFIG, num_items=NUM_ITEMS, lora_rank=2,
                              title_tokens=TITLE_TOKENS, batch_size=NUM_ITEMS,
                              lora_targets=("query", "output"), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def id_model():
  """proj_dim != hidden and an ID head: the non-identity code path."""
  return llm_rec.build_random(CONFIG, num_items=NUM_ITEMS, proj_dim=16,
                              use_id_head=True, title_tokens=TITLE_TOKENS,
                              batch_size=NUM_ITEMS, rngs=nnx.Rngs(1))


@pytest.fixture(scope="module")
def probe(model):
  return _Probe(model)


@pytest.fixture(scope="module")
def id_probe(id_model):
  return _Probe(id_model)


# ----------------------------------------------------------------------------
# Text.


def test_render_keeps_most_recent_in_order():
  titles = [f"T{i}" for i in range(6)]
  assert llm_examples.render_history(titles, [5, 0, 3, 1], max_items=3) == "T0; T3; T1"
  assert llm_examples.render_history(titles, [4, 2], max_items=10) == "T4; T2"
  assert llm_examples.render_history(titles, np.array([2]), max_items=1) == "T2"
  with pytest.raises(ValueError, match="max_items=0"):
    llm_examples.render_history(titles, [1], max_items=0)


def test_encode_histories_truncates_left_and_pads_right():
  tok = _word_tokenizer()
  ids = {w: tok.convert_tokens_to_ids(w) for w in ("[CLS]", "[SEP]", "[PAD]", ";")}
  text = "; ".join(WORDS[:5])  # 9 body tokens: a ; b ; c ; d ; e
  out = llm_examples.encode_histories(tok, [text, "beta"], max_tokens=6)
  row = out["input_ids"][0].tolist()
  # [CLS] + the last 4 body tokens + [SEP].
  assert row == [ids["[CLS]"], ids[";"], tok.convert_tokens_to_ids("delta"),
                 ids[";"], tok.convert_tokens_to_ids("epsilon"), ids["[SEP]"]]
  assert out["attention_mask"][0].tolist() == [1] * 6
  assert out["input_ids"][1].tolist() == [
      ids["[CLS]"], tok.convert_tokens_to_ids("beta"), ids["[SEP]"]] + [ids["[PAD]"]] * 3
  assert out["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0]
  assert out["input_ids"].dtype == np.int32
  with pytest.raises(ValueError, match="max_tokens=2"):
    llm_examples.encode_histories(tok, ["beta"], max_tokens=2)


def test_encode_histories_minilm_keeps_most_recent_tokens():
  path = bert_hf.minilm_path()
  if path is None:
    pytest.skip("all-MiniLM-L6-v2 not installed")
  tok = bert_hf.load_tokenizer(path)
  titles = ["Toy Story (1995)", "GoldenEye (1995)", "Four Rooms (1995)",
            "Get Shorty (1995)", "Copycat (1995)"]
  text = llm_examples.render_history(titles, range(5), max_items=5)
  full = tok(text, add_special_tokens=False)["input_ids"]
  out = llm_examples.encode_histories(tok, [text], max_tokens=10)
  row = out["input_ids"][0].tolist()
  assert row[0] == tok.cls_token_id and row[-1] == tok.sep_token_id
  assert row[1:-1] == full[-8:]
  assert "copycat" in tok.decode(row) and "toy" not in tok.decode(row)


def test_history_text_examples_bounded_positions():
  tok = _word_tokenizer()
  train = [np.array([0, 1, 2, 3, 4]), np.array([5]), np.array([6, 7])]
  ex, users = llm_examples.history_text_examples(
      train, WORDS, tok, max_tokens=8, max_items=2, max_positions_per_user=2)
  # User 0: positions 3, 4; user 1: none; user 2: position 1.
  assert users.tolist() == [0, 0, 2]
  assert ex["target"].tolist() == [3, 4, 7]
  assert ex["input_ids"].shape == ex["attention_mask"].shape == (3, 8)
  decoded = [tok.decode(r, skip_special_tokens=True) for r in ex["input_ids"]]
  assert decoded == ["beta ; gamma", "gamma ; delta", "eta"]


def test_eval_text_inputs_uses_history_and_checks_width():
  tok = _word_tokenizer()
  ev = sequences.EvalSet(
      users=np.array([0, 1], np.int32),
      history=np.array([[0, 3, 1], [2, 5, 6]], np.int32),  # shifted ids
      target=np.array([4, 0], np.int32),
      exclude=np.full((2, 3), -1, np.int32))
  out = llm_examples.eval_text_inputs(ev, WORDS, tok, max_tokens=8, max_items=3)
  decoded = [tok.decode(r, skip_special_tokens=True) for r in out["input_ids"]]
  assert decoded == ["gamma ; alpha", "beta ; epsilon ; zeta"]
  with pytest.raises(ValueError, match="max_items=4"):
    llm_examples.eval_text_inputs(ev, WORDS, tok, max_tokens=8, max_items=4)


# ----------------------------------------------------------------------------
# Model.


def test_batched_rows_equal_unbatched(id_probe):
  batched = id_probe(BATCH)["scores"]
  assert batched.shape == (4, NUM_ITEMS)
  for i in range(4):
    single = id_probe(jax.tree.map(lambda x: x[i], BATCH))["scores"]
    assert single.shape == (NUM_ITEMS,)
    np.testing.assert_allclose(batched[i], single, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("which", ["probe", "id_probe"])
def test_scores_are_scaled_user_item_products(which, request):
  out = request.getfixturevalue(which)(BATCH)
  np.testing.assert_allclose(jnp.linalg.norm(out["user"], axis=-1), 1.0, atol=1e-5)
  expected = 20.0 * out["user"] @ out["items"].T
  np.testing.assert_allclose(out["scores"], expected, atol=1e-4)
  assert np.ptp(np.asarray(out["scores"])) > 1e-3  # Not a constant.


def test_untrained_identity_head_is_pretrained_cosine(model, probe):
  out = probe(BATCH)
  pooled, titles = out["pooled"], model.head.title_embeddings[...]
  cos = (pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)) @ (
      titles / jnp.linalg.norm(titles, axis=-1, keepdims=True)).T
  np.testing.assert_allclose(out["scores"], 20.0 * cos, atol=1e-4)


def test_cache_is_not_a_param(model):
  _, params, rest = nnx.split(model, nnx.Param, ...)
  assert not any("title_embeddings" in p for p in _paths(params))
  assert _paths(rest) == {"head/title_embeddings"}
  assert isinstance(model.head.title_embeddings, llm_rec.Cache)
  for scheme in llm_rec.SCHEMES:
    state = nnx.state(model, llm_rec.trainable_filter(scheme, num_layers=2))
    assert "head/title_embeddings" not in _paths(state)


def test_title_cache_is_mean_pooled_encoder_output(model, probe):
  # The cache is encode_titles of the title tokens (here in 3 chunks of 4,
  # the last one padded; the fixture encoded them in one chunk) ...
  np.testing.assert_allclose(
      model.head.title_embeddings[...],
      llm_rec.encode_titles(model.encoder, TITLE_TOKENS, batch_size=4),
      atol=1e-5)
  # ... and encode_titles is the model's own pooling.
  np.testing.assert_allclose(
      llm_rec.encode_titles(model.encoder, BATCH, batch_size=4),
      probe(BATCH)["pooled"], atol=1e-5)


def test_trainer_split_roundtrip(id_model, id_probe):
  """The trainer's split -> pure dicts -> merge gives the same scores."""
  graphdef, params, frozen = nnx.split(
      id_model, llm_rec.trainable_filter("head"), ...)
  params, frozen = nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)
  merged = nnx.merge(graphdef, nnx.State(params), nnx.State(frozen))
  assert isinstance(merged.head.title_embeddings, llm_rec.Cache)
  np.testing.assert_allclose(id_probe(BATCH, nnx.state(merged))["scores"],
                             id_probe(BATCH)["scores"], atol=1e-6)


def _layer_paths(layers, leaves_per_layer):
  return {f"encoder/layers/{i}/{leaf}" for i in layers for leaf in leaves_per_layer}


_LINEARS = ("query", "key", "value", "attention_output", "intermediate", "output")
_NORMS = ("attention_norm", "output_norm")
_LAYER_LEAVES = tuple(f"{l}/{w}" for l in _LINEARS for w in ("kernel", "bias")) + tuple(
    f"{n}/{w}" for n in _NORMS for w in ("scale", "bias"))
_EMBEDDINGS = {"encoder/embeddings/word/embedding",
               "encoder/embeddings/position/embedding",
               "encoder/embeddings/token_type/embedding",
               "encoder/embeddings/norm/scale", "encoder/embeddings/norm/bias"}
_HEAD = {"head/user_proj/kernel", "head/user_proj/bias", "head/item_proj/kernel"}


def _abstract_model(**fields):
  """A 2-layer LLMRecommender as shapes only: paths without compute."""
  config = llm_rec.LLMRecConfig(bert=CONFIG2, num_items=NUM_ITEMS, **fields)
  return nnx.eval_shape(lambda: llm_rec.LLMRecommender(
      config, encoder=bert.BertEncoder(CONFIG2, with_pooler=False,
                                       rngs=nnx.Rngs(0)),
      title_embeddings=jnp.zeros((NUM_ITEMS, CONFIG2.hidden_size)),
      rngs=nnx.Rngs(1)))


def _selected(m, scheme, **kw):
  return _paths(nnx.state(m, llm_rec.trainable_filter(scheme, **kw)))


def test_trainable_filter_paths():
  model, id_model = _abstract_model(), _abstract_model(use_id_head=True)
  full = _EMBEDDINGS | _layer_paths([0, 1], _LAYER_LEAVES) | _HEAD
  assert _selected(model, "full") == full
  assert _selected(model, "head") == _HEAD
  assert _selected(id_model, "head") == _HEAD | {"head/id_embed/embedding"}
  assert _selected(model, "last_k", num_layers=2, last_k=1) == (
      _layer_paths([1], _LAYER_LEAVES) | _HEAD)
  assert _selected(model, "last_k", num_layers=2, last_k=2) == (
      _layer_paths([0, 1], _LAYER_LEAVES) | _HEAD)
  # Without adapters, "lora" trains the head only.
  assert _selected(model, "lora") == _HEAD
  # A RecHead alone: everything trains (paths without the head/ prefix).
  assert _selected(model.head, "head") == {p.removeprefix("head/") for p in _HEAD}
  with pytest.raises(ValueError, match="scheme='bogus'"):
    llm_rec.trainable_filter("bogus")
  with pytest.raises(ValueError, match="last_k=3"):
    llm_rec.trainable_filter("last_k", num_layers=2, last_k=3)


def test_lora_paths():
  model = _abstract_model(lora_rank=2, lora_targets=("query", "output"))
  adapters = _layer_paths([0, 1], [f"{t}/{a}/kernel" for t in ("query", "output")
                                   for a in ("lora_down", "lora_up")])
  assert _selected(model, "lora") == adapters | _HEAD
  # The frozen bases: selected by "full" and by "last_k", never by "lora".
  bases = _layer_paths([0, 1], [f"{t}/base/{w}" for t in ("query", "output")
                                for w in ("kernel", "bias")])
  last = {p for p in _selected(model, "full") if p.startswith("encoder/layers/1/")}
  assert adapters | bases <= _selected(model, "full")
  assert _selected(model, "last_k", num_layers=2, last_k=1) == last | _HEAD


def test_lora_init_leaves_scores_unchanged(lora_model, probe):
  lora_probe = _Probe(lora_model)
  np.testing.assert_allclose(lora_probe(BATCH)["scores"], probe(BATCH)["scores"],
                             atol=1e-5)
  # The comparison can fail: a non-zero adapter changes the scores.
  pure = nnx.to_pure_dict(lora_probe.state)
  up = pure["encoder"]["layers"][0]["output"]["lora_up"]["kernel"]
  pure["encoder"]["layers"][0]["output"]["lora_up"]["kernel"] = (
      jax.random.normal(jax.random.key(0), up.shape))
  assert not np.allclose(lora_probe(BATCH, nnx.State(pure))["scores"],
                         probe(BATCH)["scores"], atol=1e-3)


TARGET = np.array([0, 3, 5, 8], np.int32)


def _train(m, scheme, steps):
  """A few Adam steps on the scheme's trainable params on BATCH."""
  graphdef, params, frozen = nnx.split(
      m, llm_rec.trainable_filter(scheme, num_layers=2), ...)
  batch = {**BATCH, "target": TARGET}

  def batch_loss(params):
    return jnp.mean(llm_rec.loss(nnx.merge(graphdef, params, frozen), batch))

  optimizer = optax.adam(1e-2)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state):
    value, grads = jax.value_and_grad(batch_loss)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  losses = []
  for _ in range(steps):
    params, opt_state, value = step(params, opt_state)
    losses.append(float(value))
  after = nnx.state(nnx.merge(graphdef, params, frozen))
  changed = {
      "/".join(map(str, path))
      for (path, b), (_, a) in zip(nnx.to_flat_state(nnx.state(m)),
                                   nnx.to_flat_state(after))
      if not np.array_equal(b[...], a[...])}
  return changed, losses


def test_head_scheme_changes_only_head(id_model):
  changed, losses = _train(id_model, "head", steps=3)
  assert losses[-1] < losses[0]
  assert changed == _HEAD | {"head/id_embed/embedding"}


def test_vmapped_per_example_grads_and_padding(model, probe):
  """Per-example grads as the DP code takes them; a padding row gives zero."""
  graphdef, params, frozen = nnx.split(
      model, llm_rec.trainable_filter("last_k", num_layers=2, last_k=1), ...)
  # Rows 0-2 real, row 3 an all-padding example as the DP code pads batches.
  batch = {"input_ids": BATCH["input_ids"].copy(),
           "attention_mask": BATCH["attention_mask"].copy(), "target": TARGET}
  batch["input_ids"][3] = 0
  batch["attention_mask"][3] = 0

  def loss_fun(params, example):
    return llm_rec.loss(nnx.merge(graphdef, params, frozen), example)

  values, grads = jax.jit(jax.vmap(jax.value_and_grad(loss_fun),
                                   in_axes=(None, 0)))(params, batch)
  assert np.all(np.isfinite(values))
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  np.testing.assert_allclose(values[3], np.log(NUM_ITEMS), rtol=1e-6)
  assert all(np.all(g[3] == 0) for g in jax.tree.leaves(grads))
  assert all(np.any(g[i] != 0) for g in jax.tree.leaves(grads) for i in range(3))
  # Per-example losses are the rows of the batched forward.
  np.testing.assert_allclose(
      values, losses.softmax_cross_entropy(probe(batch)["scores"], TARGET),
      atol=1e-5)


def test_head_examples_feed_rec_head(id_model, id_probe):
  head_ex = llm_examples.head_examples(id_model, {**BATCH, "target": TARGET},
                                       batch_size=4)
  assert head_ex["pooled"].shape == (4, CONFIG.hidden_size)
  assert head_ex["target"].tolist() == TARGET.tolist()
  scores = id_probe(BATCH)["scores"]
  np.testing.assert_allclose(id_model.head(head_ex), scores, atol=1e-4)
  np.testing.assert_allclose(llm_rec.loss(id_model.head, head_ex),
                             losses.softmax_cross_entropy(scores, TARGET),
                             atol=1e-4)


def test_config_validation():
  with pytest.raises(ValueError, match="num_items=0"):
    llm_rec.LLMRecConfig(bert=CONFIG, num_items=0)
  with pytest.raises(ValueError, match="lora_targets"):
    llm_rec.LLMRecConfig(bert=CONFIG, num_items=3, lora_targets=("pooler",))
  with pytest.raises(ValueError, match="title_embeddings has shape"):
    llm_rec.RecHead(llm_rec.LLMRecConfig(bert=CONFIG, num_items=3),
                    jnp.zeros((4, 32)), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="got 3 titles for num_items=4"):
    llm_rec.build_random(CONFIG, num_items=4, title_tokens=_tokens(0, (3,)),
                         rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------
# Pretrained MiniLM.


@pytest.mark.slow
def test_build_from_minilm():
  path = bert_hf.minilm_path()
  if path is None:
    pytest.skip("all-MiniLM-L6-v2 not installed")
  rng = np.random.default_rng(0)
  genres = ["Story", "Night", "Love", "War", "Return", "Shadow", "City", "Dream"]
  titles = [f"The {rng.choice(genres)} of {rng.choice(genres)} ({1950 + i})"
            for i in range(50)]
  m = llm_rec.build(path, titles=titles, num_items=50, use_id_head=True,
                    lora_rank=2, batch_size=16, rngs=nnx.Rngs(0))
  tok = bert_hf.load_tokenizer(path)
  title_tokens = bert_hf.encode_texts(tok, titles, 32)
  _, encoder = bert_hf.load_hf_weights(path, with_pooler=False)
  expected = bert.mean_pool(
      encoder(title_tokens["input_ids"], title_tokens["attention_mask"]),
      title_tokens["attention_mask"])
  np.testing.assert_allclose(m.head.title_embeddings[...], expected, atol=1e-4)
  texts = [llm_examples.render_history(titles, [3, 7, 1], max_items=8),
           llm_examples.render_history(titles, [10], max_items=8)]
  tokens = llm_examples.encode_histories(tok, texts, 64)
  scores = _Probe(m)(tokens)["scores"]
  assert scores.shape == (2, 50) and np.all(np.isfinite(scores))
