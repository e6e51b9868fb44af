"""The ``text_seq`` model family: public item text tower, private sequence model.

The item text (title with year, genres) is encoded once by the frozen
pretrained encoder (``model.pretrained``, default MiniLM), mean-pooled, then
PCA-whitened to ``model.text_dim`` components (``text_seq.whiten``). That
matrix depends on the public catalogue only, so it is cached, in memory and
on disk (``~/.cache/privjax/text_embeddings``, or ``$PRIVJAX_CACHE``), and
exported as a public tensor. Training examples are SASRec windows.
"""

import dataclasses
import functools
import hashlib
import os
import pathlib
from typing import Any

from flax import nnx
import jax.numpy as jnp
import numpy as np

from privjax.models import bert
from privjax.models import bert_hf
from privjax.models import llm_family
from privjax.models import registry
from privjax.models import sasrec
from privjax.models import text_seq

_TEXT_TOKENS = 48
_CACHE_VERSION = "v1"


def cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("PRIVJAX_CACHE", pathlib.Path.home() / ".cache"
                                     / "privjax")) / "text_embeddings"


@functools.lru_cache(maxsize=4)
def _encode(path: str, texts: tuple[str, ...], progress: bool = True) -> np.ndarray:
  """Mean-pooled embeddings ``[len(texts), hidden]`` of public texts, cached."""
  digest = hashlib.sha256("\n".join((_CACHE_VERSION, path, *texts)).encode()).hexdigest()
  file = cache_dir() / f"{digest[:32]}.npy"
  if file.exists():
    return np.load(file)
  _, encoder = bert_hf.load_hf_weights(path, with_pooler=False)
  tokens = bert_hf.encode_texts(bert_hf.load_tokenizer(path), list(texts), _TEXT_TOKENS)
  out = bert.pooled_embeddings(
      encoder, tokens["input_ids"], tokens["attention_mask"], batch_size=64,
      progress="privjax: encoding item text" if progress else None).astype(np.float32)
  try:
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, out)
    os.replace(tmp, file)
  except OSError:
    pass  # a read-only home: the in-memory cache still holds it
  return out


def item_features(cfg, ds) -> np.ndarray:
  """The whitened text features ``[num_items, text_dim]`` of ``ds``'s catalogue."""
  texts = text_seq.item_texts(ds.item_titles, ds.item_genres, ds.genre_names)
  embeddings = _encode(str(llm_family.pretrained_dir(cfg)), tuple(texts))
  return text_seq.whiten(embeddings, cfg.model.text_dim)


def _config(cfg, num_items: int, text_dim: int) -> text_seq.TextSeqConfig:
  m = cfg.model
  return text_seq.TextSeqConfig(
      num_items=num_items, max_len=cfg.data.max_len, text_dim=text_dim,
      embed_dim=m.embed_dim, num_layers=m.num_layers, num_heads=m.num_heads,
      ffn_dim=m.hidden_dim or None, dropout_rate=m.dropout, fuse_id=m.fuse_id,
      item_bias=m.item_bias)


def _build(cfg, ds, rngs):
  features = item_features(cfg, ds)
  return text_seq.TextSeqRec(_config(cfg, ds.num_items, features.shape[1]),
                             item_text=features, rngs=rngs)


def _from_architecture(arch: dict[str, Any], rngs: nnx.Rngs) -> nnx.Module:
  config = text_seq.TextSeqConfig(**arch)
  # The text features are exported as a (public) tensor and replace these.
  zeros = jnp.zeros((config.num_items, config.text_dim), jnp.float32)
  return text_seq.TextSeqRec(config, item_text=zeros, rngs=rngs)


def _examples(cfg, split, ds, model):
  del ds, model
  return sasrec.sequence_examples(split.train, cfg.data.max_len,
                                  max_windows_per_user=cfg.data.max_examples_per_user)


TEXT_SEQ = registry.Task(
    build_model=_build, train_examples=_examples,
    loss=lambda cfg: text_seq.sequence_loss,
    eval_inputs=lambda cfg, es, ds, model: {"history": es.history},
    scores=lambda model, inputs: model.score_last(inputs["history"]),
    uses_rng=lambda cfg: cfg.model.dropout > 0,
    describe_example=registry.SASREC.describe_example,
    model_type=text_seq.TextSeqRec,
    architecture=lambda model: dataclasses.asdict(model.config),
    from_architecture=_from_architecture,
    public_state={"item_text": "whitened embeddings of the public item text (title, "
                               "year, genres) by the frozen pretrained encoder: "
                               "computed from the catalogue alone, no user data"})

registry.register("text_seq", TEXT_SEQ)
