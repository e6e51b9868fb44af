"""What the LLM recommender trains and is evaluated on: histories as text.

A user's recent history is rendered as titles, most recent last
(``"Toy Story (1995); GoldenEye (1995); ..."``) and tokenised keeping the
most recent tokens (``encode_histories``). MovieLens titles take 7 word
pieces on average (27 at most) plus one for the separator, so 64 tokens hold
the last 7 or 8 items of a history.

Head-only training need not run the encoder at every step: with the encoder
frozen, ``head_examples`` precomputes each example's pooled text embedding
once and a ``RecHead`` trains on those (see ``precompute_user_embeddings``
for why that is still DP). The model itself: ``privjax.models.llm_rec``.
"""

from collections.abc import Sequence

import numpy as np

from privjax.data import sequences
from privjax.models import bert
from privjax.models import llm_rec

_SEPARATOR = "; "


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

  >>> tok = bert_hf.load_tokenizer(bert_hf.minilm_path())  # doctest: +SKIP
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

  >>> tok = bert_hf.load_tokenizer(bert_hf.minilm_path())  # doctest: +SKIP
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

  >>> tok = bert_hf.load_tokenizer(bert_hf.minilm_path())  # doctest: +SKIP
  """
  width = eval_set.history.shape[1]
  if max_items > width:
    raise ValueError(f"max_items={max_items} exceeds the eval history width "
                     f"{width}; build the EvalSet with max_len >= max_items")
  texts = [render_history(titles, row[row != sequences.PAD] - 1,
                          max_items=max_items) for row in eval_set.history]
  return encode_histories(tokenizer, texts, max_tokens)


# ----------------------------------------------------------------------------
# Head-only training: pooled embeddings of the histories.


def precompute_user_embeddings(model: llm_rec.LLMRecommender,
                               tokens: llm_rec.TokenBatch, *,
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

  >>> from flax import nnx
  >>> model = llm_rec.build_random(bert.BertConfig.tiny(), num_items=7,
  ...                              rngs=nnx.Rngs(0))
  >>> tokens = {"input_ids": np.array([[2, 5, 7, 0]]),
  ...           "attention_mask": np.array([[1, 1, 1, 0]])}
  >>> precompute_user_embeddings(model, tokens).shape
  (1, 32)
  """
  return bert.pooled_embeddings(model.encoder, tokens["input_ids"],
                                tokens["attention_mask"], batch_size=batch_size,
                                progress="privjax: encoding histories")


def head_examples(model: llm_rec.LLMRecommender,
                  examples: dict[str, np.ndarray], *,
                  batch_size: int = 64) -> dict[str, np.ndarray]:
  """``{"pooled": float32 [N, hidden], "target": [N]}`` for training ``model.head``.

  See ``precompute_user_embeddings`` for why this is private when only the
  head trains. After training, ``model.head`` (shared, not copied) scores
  tokenised histories with the full model.

  >>> from flax import nnx
  >>> model = llm_rec.build_random(bert.BertConfig.tiny(), num_items=7,
  ...                              rngs=nnx.Rngs(0))
  >>> ex = {"input_ids": np.array([[2, 5, 7, 0]]),
  ...       "attention_mask": np.array([[1, 1, 1, 0]]), "target": np.array([3])}
  >>> sorted(head_examples(model, ex))
  ['pooled', 'target']
  """
  pooled = precompute_user_embeddings(model, examples, batch_size=batch_size)
  return {"pooled": pooled.astype(np.float32),
          "target": np.asarray(examples["target"], np.int32)}
