"""A text recommender: the user's history as text -> BERT -> scores over items.

A user's recent history is rendered as titles, most recent last
(``"Toy Story (1995); GoldenEye (1995); ..."``), tokenised keeping the most
recent tokens, encoded by a (pretrained) BERT encoder and mean-pooled into a
text embedding. A head turns it into a unit user vector and scores it against
every item. Items are represented by their titles, encoded once by the same
pretrained encoder and cached (titles are public, so the cache is too), plus an
optional learned item-ID embedding.

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

Head-only training need not run the encoder at every step: with the encoder
frozen, ``head_examples`` precomputes each example's pooled text embedding
once and a ``RecHead`` trains on those (see ``precompute_user_embeddings``
for why that is still DP). MovieLens titles take 7 word pieces on average
(27 at most) plus one for the separator, so 64 tokens hold the last 7 or 8
items of a history.
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

from privjax.models import losses
from privjax.models import nn
from privjax.data import sequences
from privjax.models import bert

TokenBatch = dict[str, Any]

SCHEMES = ("full", "last_k", "lora", "head")
_SEPARATOR = "; "


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
  see ``head_examples``), so DP training touches only these few parameters.

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
# Text: rendering and tokenisation.


def render_history(titles: Sequence[str], item_ids_0based: Sequence[int], *,
                   max_items: int) -> str:
  """Titles of the last ``max_items`` items, oldest first, ``"; "``-joined.

  >>> render_history(["Toy Story (1995)", "GoldenEye (1995)", "Heat (1995)"],
  ...                [2, 0, 1], max_items=2)
  'Toy Story (1995); GoldenEye (1995)'
  """
  if max_items <= 0:
    raise ValueError(f"max_items={max_items} must be > 0")
  recent = list(item_ids_0based)[-max_items:]
  return _SEPARATOR.join(titles[int(i)] for i in recent)


def encode_histories(tokenizer, texts: Sequence[str],
                     max_tokens: int) -> dict[str, np.ndarray]:
  """Tokenises, keeping ``[CLS]`` + the LAST ``max_tokens - 2`` tokens + ``[SEP]``.

  HF tokenizers truncate on the right by default, which would drop the most
  recent items; here the text is tokenised whole and cut on the left by hand
  (the tokenizer object is not modified). A cut may split the oldest kept
  title. Rows are right-padded with the pad token to ``max_tokens``.

  Returns:
    ``input_ids`` and ``attention_mask``, int32 ``[len(texts), max_tokens]``.

  >>> tok = bert.load_tokenizer(bert.minilm_path())  # doctest: +SKIP
  >>> encode_histories(tok, ["a b c d"], 4)["input_ids"]  # doctest: +SKIP
  array([[ 101, 1039, 1040,  102]], dtype=int32)
  """
  if max_tokens < 3:
    raise ValueError(f"max_tokens={max_tokens} must be >= 3 ([CLS], one "
                     "token, [SEP])")
  special = {"cls_token_id": tokenizer.cls_token_id,
             "sep_token_id": tokenizer.sep_token_id,
             "pad_token_id": tokenizer.pad_token_id}
  missing = [k for k, v in special.items() if v is None]
  if missing:
    raise ValueError(f"tokenizer lacks {missing}")
  texts = list(texts)
  input_ids = np.full((len(texts), max_tokens), special["pad_token_id"], np.int32)
  mask = np.zeros((len(texts), max_tokens), np.int32)
  if not texts:
    return {"input_ids": input_ids, "attention_mask": mask}
  bodies = tokenizer(texts, add_special_tokens=False)["input_ids"]
  keep = max_tokens - 2
  for row, body in enumerate(bodies):
    ids = ([special["cls_token_id"]] + list(body[-keep:])
           + [special["sep_token_id"]])
    input_ids[row, :len(ids)] = ids
    mask[row, :len(ids)] = 1
  return {"input_ids": input_ids, "attention_mask": mask}


def history_text_examples(
    train: Sequence[np.ndarray], titles: Sequence[str], tokenizer, *,
    max_tokens: int, max_items: int, max_positions_per_user: int,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Next-item training examples with the history as text.

  Like ``sequences.next_item_examples``: position ``t`` of a user's training
  sequence gives the example ``seq[:t] -> seq[t]``, but only the last
  ``max_positions_per_user`` positions of each user are kept (tokenising every
  prefix of every user would dominate the run). The choice depends on the
  user's own sequence only; contribution bounding stays with the trainer.

  Returns:
    (examples, user_of_row): ``input_ids``, ``attention_mask`` int32
    ``[N, max_tokens]``, ``target`` int32 ``[N]`` (0-based), and the user of
    each row.

  >>> tok = bert.load_tokenizer(bert.minilm_path())  # doctest: +SKIP
  >>> ex, users = history_text_examples([np.array([0, 1, 2])], ["a", "b", "c"],
  ...     tok, max_tokens=8, max_items=5, max_positions_per_user=1)  # doctest: +SKIP
  >>> ex["target"].tolist(), users.tolist()  # doctest: +SKIP
  ([2], [0])
  """
  if max_positions_per_user <= 0:
    raise ValueError(f"max_positions_per_user={max_positions_per_user} must "
                     "be > 0")
  texts, targets, users = [], [], []
  for u, seq in enumerate(train):
    for t in range(max(1, len(seq) - max_positions_per_user), len(seq)):
      texts.append(render_history(titles, seq[:t], max_items=max_items))
      targets.append(seq[t])
      users.append(u)
  if not texts:
    raise ValueError("no training examples: every user has < 2 training items")
  examples = encode_histories(tokenizer, texts, max_tokens)
  examples["target"] = np.asarray(targets, np.int32)
  return examples, np.asarray(users, np.int32)


def eval_text_inputs(eval_set: sequences.EvalSet, titles: Sequence[str],
                     tokenizer, *, max_tokens: int,
                     max_items: int) -> dict[str, np.ndarray]:
  """Tokenised histories ``[B, max_tokens]`` for an ``EvalSet``.

  The items come from ``eval_set.history`` (shifted ids, 0 = padding), so it
  must be at least ``max_items`` wide, or evaluation would see shorter
  histories than training.

  >>> tok = bert.load_tokenizer(bert.minilm_path())  # doctest: +SKIP
  """
  width = eval_set.history.shape[1]
  if max_items > width:
    raise ValueError(f"max_items={max_items} exceeds the eval history width "
                     f"{width}; build the EvalSet with max_len >= max_items")
  texts = [render_history(titles, row[row != sequences.PAD] - 1,
                          max_items=max_items) for row in eval_set.history]
  return encode_histories(tokenizer, texts, max_tokens)


# ----------------------------------------------------------------------------
# Encoding in batches (titles, and user histories for head-only training).


@functools.partial(jax.jit, static_argnums=0)
def _embed(graphdef, state, ids_BxT, mask_BxT):
  encoder = nnx.merge(graphdef, state)
  return bert.mean_pool(encoder(ids_BxT, mask_BxT), mask_BxT)


def _pooled_embeddings(encoder: bert.BertEncoder, input_ids: np.ndarray,
                       attention_mask: np.ndarray,
                       batch_size: int) -> np.ndarray:
  if batch_size <= 0:
    raise ValueError(f"batch_size={batch_size} must be > 0")
  graphdef, state = nnx.split(encoder)
  out = []
  for start in range(0, len(input_ids), batch_size):
    ids = np.asarray(input_ids[start:start + batch_size])
    mask = np.asarray(attention_mask[start:start + batch_size])
    real = len(ids)
    if real < batch_size:  # Pad the last chunk: one shape, one compile.
      pad = ((0, batch_size - real), (0, 0))
      ids, mask = np.pad(ids, pad), np.pad(mask, pad)
    out.append(np.asarray(_embed(graphdef, state, ids, mask))[:real])
  hidden = encoder.config.hidden_size
  return np.concatenate(out) if out else np.zeros((0, hidden), np.float32)


def encode_titles(encoder: bert.BertEncoder, tokens: TokenBatch, *,
                  batch_size: int = 64) -> np.ndarray:
  """Mean-pooled encoder outputs ``[N, hidden]`` of tokenised titles.

  >>> encoder = bert.BertEncoder(bert.BertConfig.tiny(), rngs=nnx.Rngs(0))
  >>> tokens = {"input_ids": np.array([[2, 5, 7, 0]]),
  ...           "attention_mask": np.array([[1, 1, 1, 0]])}
  >>> encode_titles(encoder, tokens).shape
  (1, 32)
  """
  return _pooled_embeddings(encoder, tokens["input_ids"],
                            tokens["attention_mask"], batch_size)


def precompute_user_embeddings(model: LLMRecommender, tokens: TokenBatch, *,
                               batch_size: int = 64) -> np.ndarray:
  """Pooled text embeddings ``[N, hidden]`` of tokenised histories.

  Privacy: with the encoder frozen, ``pooled_i`` is a fixed function of
  example ``i`` alone (the encoder is public pretrained weights, or a
  DP-trained release accounted for separately). DP-SGD on the head over
  ``(pooled_i, target_i)`` therefore gives the same (epsilon, delta)
  guarantee, for the same unit of privacy, as over the raw examples:
  neighbouring datasets map to neighbouring datasets. Only valid when
  nothing but the head trains on them. The embeddings are as private as the
  histories: never release or log them.

  >>> model = build_random(bert.BertConfig.tiny(), num_items=7, rngs=nnx.Rngs(0))
  >>> tokens = {"input_ids": np.array([[2, 5, 7, 0]]),
  ...           "attention_mask": np.array([[1, 1, 1, 0]])}
  >>> precompute_user_embeddings(model, tokens).shape
  (1, 32)
  """
  return _pooled_embeddings(model.encoder, tokens["input_ids"],
                            tokens["attention_mask"], batch_size)


def head_examples(model: LLMRecommender, examples: dict[str, np.ndarray], *,
                  batch_size: int = 64) -> dict[str, np.ndarray]:
  """``{"pooled": float32 [N, hidden], "target": [N]}`` for training ``model.head``.

  See ``precompute_user_embeddings`` for why this is private when only the
  head trains. After training, ``model.head`` (shared, not copied) scores
  tokenised histories with the full model.

  >>> model = build_random(bert.BertConfig.tiny(), num_items=7, rngs=nnx.Rngs(0))
  >>> ex = {"input_ids": np.array([[2, 5, 7, 0]]),
  ...       "attention_mask": np.array([[1, 1, 1, 0]]), "target": np.array([3])}
  >>> sorted(head_examples(model, ex))
  ['pooled', 'target']
  """
  pooled = precompute_user_embeddings(model, examples, batch_size=batch_size)
  return {"pooled": pooled.astype(np.float32),
          "target": np.asarray(examples["target"], np.int32)}


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
  tokenizer for the histories is ``bert.load_tokenizer(model_dir)``.

  >>> model = build(bert.minilm_path(), titles=["Heat (1995)"],
  ...               rngs=nnx.Rngs(0))  # doctest: +SKIP
  """
  bert_config, encoder = bert.load_hf_weights(model_dir, with_pooler=False)
  tokenizer = bert.load_tokenizer(model_dir)
  title_tokens = bert.encode_texts(tokenizer, titles, title_max_tokens)
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
