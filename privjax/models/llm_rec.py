"""A text recommender: the user's history as text -> BERT -> scores over items.

A user's recent history is rendered as titles, most recent last
(``"Toy Story (1995); GoldenEye (1995); ..."``, see ``llm_examples``),
tokenised keeping the most recent tokens, encoded by a (pretrained) BERT
encoder and mean-pooled into a text embedding. A head turns it into a unit
user vector and scores it against every item. Items are represented by their
titles, encoded once by the same pretrained encoder and cached (titles are
public, so the cache is too), plus an optional learned item-ID embedding.

Scoring. With ``u = normalize(user_proj(pooled))`` (unit length), ``c_j`` the
L2-normalised cached title embedding of item ``j`` and ``K`` the
``item_proj`` kernel (``proj -> hidden``)::

  score_j = logit_scale * < u, K c_j + id_embed_j >

We chose cosine-style scoring with a fixed, public ``logit_scale`` (default
20) over raw dot products: the pretrained embeddings are compared by cosine
similarity, and a fixed temperature keeps the logits in a sane range from step
one (a learnable scale would be one more noised coordinate, easy to blow up
under DP noise). Item vectors are not re-normalised after projection, so the
model can still learn how strongly each item is preferred through their norms.

``item_proj`` is a ``Linear(proj -> hidden)`` applied to the *user* vector,
``score = <item_proj(u), c_j>``, which equals projecting every title
embedding by the transposed kernel. Written this way a per-example gradient
costs ``O(num_items x hidden)`` instead of ``O(num_items x hidden x proj)``
(projecting 1682 titles inside each per-example backward pass would dominate a
head-only DP step), and its input is per-example, so ghost clipping sees it
like any other ``Linear``. At initialisation the two projections are the
identity when ``proj_dim == hidden_size`` (the default), so an untrained model
ranks items by the pretrained cosine similarity between history text and
title; otherwise ``item_proj`` starts as the transpose of ``user_proj``, one
shared random projection that roughly preserves those similarities.

Parameter paths of ``LLMRecommender`` (``nnx.state(model, nnx.Param)``)::

  encoder/...                     the BertEncoder (see privjax.models.bert;
                                  built without pooler: mean pooling needs none)
  head/user_proj/{kernel,bias}    hidden -> proj
  head/item_proj/kernel           proj -> hidden (applied to the user vector)
  head/id_embed/embedding         [num_items, proj], only if use_id_head

``head/title_embeddings`` is a ``Cache`` variable, not an ``nnx.Param``: no
parameter filter ever selects it, so it gets neither gradient nor noise. A
``RecHead`` alone (head-only training on precomputed text embeddings) has the
same paths without the ``head/`` prefix.

Everything acts on the last axes: one unbatched example (``input_ids`` of shape
``(T,)``) and a batch ``(B, T)`` give the same per-row scores, so the DP code
can ``vmap`` over examples. No op mixes examples.

Training and evaluation examples (histories as text, and the precomputed
pooled embeddings of head-only training): ``privjax.models.llm_examples``.
"""

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from privjax.models import bert
from privjax.models import bert_hf
from privjax.models import losses
from privjax.models import nn

TokenBatch = dict[str, Any]

SCHEMES = ("full", "last_k", "lora", "head")


class Cache(nnx.Variable):
  """A non-trainable array held by a module (not an ``nnx.Param``)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class LLMRecConfig:
  """Public architecture of an ``LLMRecommender``.

  Attributes:
    bert: the encoder's architecture.
    num_items: number of items scored.
    proj_dim: width of user and item vectors; ``None`` means
      ``bert.hidden_size`` (and identity-initialised projections).
    use_id_head: add a learned ``[num_items, proj_dim]`` ID embedding to the
      title-based item vectors.
    lora_rank: rank of LoRA adapters added to the encoder (0: none).
    lora_alpha: LoRA scaling numerator (``None``: the rank, i.e. scale 1).
    lora_targets: which Linears of each encoder layer get adapters.
    logit_scale: fixed inverse temperature multiplying the cosine-style scores.

  >>> LLMRecConfig(bert=bert.BertConfig.tiny(), num_items=5).projection_dim
  32
  >>> LLMRecConfig(bert=bert.BertConfig.tiny(), num_items=5, logit_scale=0.0)
  Traceback (most recent call last):
  ...
  ValueError: logit_scale=0.0 must be > 0
  """

  bert: bert.BertConfig
  num_items: int
  proj_dim: int | None = None
  use_id_head: bool = False
  lora_rank: int = 0
  lora_alpha: float | None = None
  lora_targets: tuple[str, ...] = ("query", "value")
  logit_scale: float = 20.0

  def __post_init__(self):
    if not isinstance(self.num_items, int) or self.num_items <= 0:
      raise ValueError(f"num_items={self.num_items!r} must be a positive int")
    if self.proj_dim is not None and (
        not isinstance(self.proj_dim, int) or self.proj_dim <= 0):
      raise ValueError(f"proj_dim={self.proj_dim!r} must be a positive int "
                       "or None")
    if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
      raise ValueError(f"lora_rank={self.lora_rank!r} must be an int >= 0")
    unknown = [t for t in self.lora_targets if t not in bert.LORA_TARGETS]
    if unknown or not self.lora_targets:
      raise ValueError(f"lora_targets={tuple(self.lora_targets)} must be a "
                       f"non-empty subset of {bert.LORA_TARGETS}")
    if not self.logit_scale > 0:
      raise ValueError(f"logit_scale={self.logit_scale} must be > 0")

  @property
  def projection_dim(self) -> int:
    return self.bert.hidden_size if self.proj_dim is None else self.proj_dim


def _l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  # Clamped: a zero vector stays zero, with finite gradients, never NaN.
  sq_norm = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq_norm, eps * eps))


class RecHead(nnx.Module):
  """Text embedding of a history ``[..., hidden]`` -> scores ``[..., num_items]``.

  On its own it is the head-only recommender: an example carries the
  precomputed pooled text embedding (``{"pooled": [hidden], "target": ...}``,
  see ``llm_examples.head_examples``), so DP training touches only these few
  parameters.

  >>> config = LLMRecConfig(bert=bert.BertConfig.tiny(), num_items=6)
  >>> head = RecHead(config, jnp.ones((6, 32)), rngs=nnx.Rngs(0))
  >>> head({"pooled": jnp.ones((3, 32))}).shape
  (3, 6)
  """

  def __init__(self, config: LLMRecConfig, title_embeddings_NxH: jax.Array, *,
               rngs: nnx.Rngs):
    hidden, proj = config.bert.hidden_size, config.projection_dim
    expected = (config.num_items, hidden)
    if tuple(np.shape(title_embeddings_NxH)) != expected:
      raise ValueError(f"title_embeddings has shape "
                       f"{tuple(np.shape(title_embeddings_NxH))}; expected "
                       f"(num_items, hidden_size)={expected}")
    self.logit_scale = float(config.logit_scale)
    self.user_proj = nn.Linear(hidden, proj, rngs=rngs)
    self.item_proj = nn.Linear(proj, hidden, use_bias=False, rngs=rngs)
    if proj == hidden:
      self.user_proj.kernel.set_value(jnp.eye(hidden, dtype=jnp.float32))
      self.item_proj.kernel.set_value(jnp.eye(hidden, dtype=jnp.float32))
    else:
      self.item_proj.kernel.set_value(self.user_proj.kernel[...].T)
    self.id_embed = (nn.Embed(config.num_items, proj, rngs=rngs)
                     if config.use_id_head else None)
    self.title_embeddings = Cache(
        jnp.asarray(title_embeddings_NxH, dtype=jnp.float32))

  def user_vector(self, pooled_xH: jax.Array) -> jax.Array:
    """Unit-length user vector ``[..., proj]`` from a pooled text embedding.

    An all-zero embedding (mean pooling of an all-padding example, as the DP
    code pads batches) gives a zero vector: uniform scores and an exactly
    zero gradient, instead of normalising a near-zero vector (gradient ~1/eps).
    """
    has_text_x1 = jnp.any(pooled_xH != 0, axis=-1, keepdims=True)
    return jnp.where(has_text_x1, _l2_normalize(self.user_proj(pooled_xH)), 0.0)

  def scores_from_user(self, user_xP: jax.Array) -> jax.Array:
    """``logit_scale * <user, item_vectors()>`` for every item: ``[..., N]``."""
    titles_NxH = _l2_normalize(self.title_embeddings[...])
    # Project the user into title space rather than every title into user
    # space: same scores, per-example gradient O(N*H) instead of O(N*H*P).
    query_xH = self.item_proj(user_xP)
    scores_xN = jnp.matmul(query_xH, titles_NxH.T)
    if self.id_embed is not None:
      scores_xN = scores_xN + self.id_embed.attend(user_xP)
    return self.logit_scale * scores_xN

  def item_vectors(self) -> jax.Array:
    """Item vectors ``[num_items, proj]`` (scores = scale * user @ items.T)."""
    titles_NxH = _l2_normalize(self.title_embeddings[...])
    items_NxP = jnp.matmul(titles_NxH, self.item_proj.kernel[...].T)
    if self.id_embed is not None:
      items_NxP = items_NxP + self.id_embed.embedding[...]
    return items_NxP

  def __call__(self, inputs: dict[str, jax.Array]) -> jax.Array:
    """Scores ``[..., num_items]`` from ``inputs["pooled"]`` ``[..., hidden]``."""
    return self.scores_from_user(self.user_vector(inputs["pooled"]))


class LLMRecommender(nnx.Module):
  """History tokens ``[..., T]`` -> scores ``[..., num_items]``.

  Adds LoRA adapters to ``encoder`` (in place) when ``config.lora_rank > 0``.

  >>> model = build_random(bert.BertConfig.tiny(), num_items=7, rngs=nnx.Rngs(0))
  >>> tokens = {"input_ids": jnp.array([2, 5, 7, 0]),
  ...           "attention_mask": jnp.array([1, 1, 1, 0])}
  >>> model(tokens).shape, model.user_vector(tokens).shape
  ((7,), (32,))
  >>> model.item_vectors().shape
  (7, 32)
  """

  def __init__(self, config: LLMRecConfig, *, encoder: bert.BertEncoder,
               title_embeddings: jax.Array, rngs: nnx.Rngs):
    if encoder.config != config.bert:
      raise ValueError(f"encoder.config={encoder.config} differs from "
                       f"config.bert={config.bert}")
    self.config = config
    if config.lora_rank:
      bert.add_lora(encoder, rank=config.lora_rank, alpha=config.lora_alpha,
                    targets=config.lora_targets, rngs=rngs)
    self.encoder = encoder
    self.head = RecHead(config, title_embeddings, rngs=rngs)

  def pooled(self, tokens: TokenBatch) -> jax.Array:
    """Mean-pooled encoder output ``[..., hidden]`` (the text embedding)."""
    mask_xT = tokens["attention_mask"]
    hidden_xTxH = self.encoder(tokens["input_ids"], mask_xT)
    return bert.mean_pool(hidden_xTxH, mask_xT)

  def user_vector(self, tokens: TokenBatch) -> jax.Array:
    """Unit-length user vector ``[..., proj]``."""
    return self.head.user_vector(self.pooled(tokens))

  def item_vectors(self) -> jax.Array:
    """Item vectors ``[num_items, proj]``."""
    return self.head.item_vectors()

  def __call__(self, tokens: TokenBatch) -> jax.Array:
    """Scores ``[..., num_items]``; extra keys in ``tokens`` are ignored."""
    return self.head.scores_from_user(self.user_vector(tokens))


def loss(model: LLMRecommender | RecHead, example: dict[str, jax.Array],
         rng: jax.Array | None = None) -> jax.Array:
  """Softmax cross-entropy over all items for ONE example (or a batch).

  Works for both the full model (example with ``input_ids``,
  ``attention_mask``) and a ``RecHead`` (example with ``pooled``).

  >>> model = build_random(bert.BertConfig.tiny(), num_items=7, rngs=nnx.Rngs(0))
  >>> example = {"input_ids": jnp.array([2, 5, 7, 0]),
  ...            "attention_mask": jnp.array([1, 1, 1, 0]), "target": jnp.array(3)}
  >>> loss(model, example).shape
  ()
  """
  del rng  # Deterministic model: no dropout.
  return losses.softmax_cross_entropy(model(example), example["target"])


# ----------------------------------------------------------------------------
# Trainable subsets.


def trainable_filter(scheme: str, *, num_layers: int | None = None,
                     last_k: int = 1) -> nnx.filterlib.Filter:
  """An NNX filter selecting the trainable ``nnx.Param``s of a scheme.

  The head (``head/user_proj``, ``head/item_proj``, ``head/id_embed``)
  always trains. Encoder paths (``encoder/...``):

  - ``"full"``: every encoder parameter.
  - ``"last_k"``: ``encoder/layers/<i>/...`` for ``i >= num_layers - last_k``.
  - ``"lora"``: only LoRA adapters (``.../lora_down/kernel``,
    ``.../lora_up/kernel``); use with ``config.lora_rank > 0``.
  - ``"head"``: none.

  The result is ``nnx.All(nnx.Param, ...)``, so the ``Cache`` of title
  embeddings is never selected; everything not selected is frozen (no update,
  no noise).

  >>> model = build_random(bert.BertConfig.tiny(), num_items=7, rngs=nnx.Rngs(0))
  >>> state = nnx.state(model, trainable_filter("head"))
  >>> sorted("/".join(map(str, p)) for p, _ in nnx.to_flat_state(state))
  ['head/item_proj/kernel', 'head/user_proj/bias', 'head/user_proj/kernel']
  """
  if scheme not in SCHEMES:
    raise ValueError(f"scheme={scheme!r} must be one of {list(SCHEMES)}")
  if scheme == "full":
    return nnx.Param
  encoder_filter = (
      (lambda path, value: False) if scheme == "head" else
      bert.param_filter(scheme, num_layers=num_layers, last_k=last_k))

  def _trainable(path, value):
    if path and path[0] == "encoder":
      return encoder_filter(path[1:], value)
    return True  # The head, or a RecHead on its own.
  return nnx.All(nnx.Param, _trainable)


# ----------------------------------------------------------------------------
# Encoding titles in batches.


def encode_titles(encoder: bert.BertEncoder, tokens: TokenBatch, *,
                  batch_size: int = 64) -> np.ndarray:
  """Mean-pooled encoder outputs ``[N, hidden]`` of tokenised titles.

  >>> encoder = bert.BertEncoder(bert.BertConfig.tiny(), rngs=nnx.Rngs(0))
  >>> tokens = {"input_ids": np.array([[2, 5, 7, 0]]),
  ...           "attention_mask": np.array([[1, 1, 1, 0]])}
  >>> encode_titles(encoder, tokens).shape
  (1, 32)
  """
  return bert.pooled_embeddings(encoder, tokens["input_ids"],
                                tokens["attention_mask"], batch_size=batch_size,
                                progress="privjax: encoding titles")


# ----------------------------------------------------------------------------
# Construction.


def build(model_dir: str | os.PathLike, *, titles: Sequence[str],
          num_items: int | None = None, proj_dim: int | None = None,
          use_id_head: bool = False, lora_rank: int = 0,
          lora_alpha: float | None = None,
          lora_targets: tuple[str, ...] = ("query", "value"),
          logit_scale: float = 20.0, title_max_tokens: int = 32,
          batch_size: int = 64, rngs: nnx.Rngs) -> LLMRecommender:
  """An ``LLMRecommender`` from a pretrained HF BERT folder.

  Loads the weights (without pooler) and tokenizer from ``model_dir``,
  encodes every title once with the pretrained encoder (before any LoRA
  adapter, which starts at zero anyway) and caches the embeddings. The
  tokenizer for the histories is ``bert_hf.load_tokenizer(model_dir)``.

  >>> model = build(bert_hf.minilm_path(), titles=["Heat (1995)"],
  ...               rngs=nnx.Rngs(0))  # doctest: +SKIP
  """
  bert_config, encoder = bert_hf.load_hf_weights(model_dir, with_pooler=False)
  tokenizer = bert_hf.load_tokenizer(model_dir)
  title_tokens = bert_hf.encode_texts(tokenizer, titles, title_max_tokens)
  return _assemble(
      bert_config, encoder, title_tokens, titles_count=len(titles),
      num_items=num_items, proj_dim=proj_dim, use_id_head=use_id_head,
      lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=lora_targets,
      logit_scale=logit_scale, batch_size=batch_size, rngs=rngs)


def build_random(bert_config: bert.BertConfig, *, num_items: int,
                 title_tokens: TokenBatch | None = None,
                 title_length: int = 8, proj_dim: int | None = None,
                 use_id_head: bool = False, lora_rank: int = 0,
                 lora_alpha: float | None = None,
                 lora_targets: tuple[str, ...] = ("query", "value"),
                 logit_scale: float = 20.0, batch_size: int = 64,
                 rngs: nnx.Rngs) -> LLMRecommender:
  """A randomly initialised model (for tests): no files needed.

  Titles are ``title_tokens`` if given, else random token ids of length
  ``title_length`` drawn from ``rngs``; they are encoded by the random
  encoder exactly as ``build`` encodes real titles.

  >>> model = build_random(bert.BertConfig.tiny(), num_items=7, rngs=nnx.Rngs(0))
  >>> model.head.title_embeddings.shape
  (7, 32)
  """
  encoder = _random_encoder(bert_config, rngs.params())
  if title_tokens is None:
    ids = jax.random.randint(rngs.params(), (num_items, title_length), 1,
                             bert_config.vocab_size)
    title_tokens = {"input_ids": np.asarray(ids, np.int32),
                    "attention_mask": np.ones((num_items, title_length),
                                              np.int32)}
  return _assemble(
      bert_config, encoder, title_tokens,
      titles_count=len(title_tokens["input_ids"]), num_items=num_items,
      proj_dim=proj_dim, use_id_head=use_id_head, lora_rank=lora_rank,
      lora_alpha=lora_alpha, lora_targets=lora_targets,
      logit_scale=logit_scale, batch_size=batch_size, rngs=rngs)


def _random_encoder(config: bert.BertConfig,
                    key: jax.Array) -> bert.BertEncoder:
  # Initialised in one jitted call: eagerly, every init op compiles on its
  # own, which made building even a tiny model take seconds.
  abstract = nnx.eval_shape(
      lambda: bert.BertEncoder(config, with_pooler=False, rngs=nnx.Rngs(0)))
  state = _random_encoder_state(config, key)
  return nnx.merge(nnx.graphdef(abstract), state)


@functools.partial(jax.jit, static_argnums=0)
def _random_encoder_state(config, key):
  return nnx.state(bert.BertEncoder(config, with_pooler=False,
                                    rngs=nnx.Rngs(key)))


def _assemble(bert_config, encoder, title_tokens, *, titles_count, num_items,
              batch_size, rngs, **fields) -> LLMRecommender:
  if num_items is None:
    num_items = titles_count
  if titles_count != num_items:
    raise ValueError(f"got {titles_count} titles for num_items={num_items}")
  config = LLMRecConfig(bert=bert_config, num_items=num_items, **fields)
  cache = encode_titles(encoder, title_tokens, batch_size=batch_size)
  return LLMRecommender(config, encoder=encoder, title_embeddings=cache,
                        rngs=rngs)
