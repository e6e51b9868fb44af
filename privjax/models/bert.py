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
Loading HF checkpoints and tokenizers: ``privjax.models.bert_hf``.
"""

import dataclasses
import functools
import json
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from privjax.models import nn

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
  ``bert_hf.load_hf_weights``. The parameter paths are listed in the module docstring.

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


@functools.partial(jax.jit, static_argnums=0)
def _embed(graphdef, state, ids_BxT, mask_BxT):
  encoder = nnx.merge(graphdef, state)
  return mean_pool(encoder(ids_BxT, mask_BxT), mask_BxT)


def pooled_embeddings(encoder: BertEncoder, input_ids_NxT: np.ndarray,
                      attention_mask_NxT: np.ndarray, *,
                      batch_size: int, progress: str | None = None) -> np.ndarray:
  """Mean-pooled encoder outputs ``[N, hidden]`` of token rows, in batches.

  Every batch has ``batch_size`` rows (the last one is padded, and the
  padding dropped): one shape, one compile. ``progress`` names a progress bar
  (shown when there is more than one batch).

  >>> encoder = BertEncoder(BertConfig.tiny(), rngs=nnx.Rngs(0))
  >>> pooled_embeddings(encoder, np.array([[2, 5, 7, 0]]),
  ...                   np.array([[1, 1, 1, 0]]), batch_size=4).shape
  (1, 32)
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size={batch_size} must be > 0")
  graphdef, state = nnx.split(encoder)
  out = []
  starts = range(0, len(input_ids_NxT), batch_size)
  for start in tqdm.tqdm(starts, desc=progress, leave=False,
                         disable=progress is None or len(starts) < 2):
    ids = np.asarray(input_ids_NxT[start:start + batch_size])
    mask = np.asarray(attention_mask_NxT[start:start + batch_size])
    real = len(ids)
    if real < batch_size:  # Pad the last chunk: one shape, one compile.
      pad = ((0, batch_size - real), (0, 0))
      ids, mask = np.pad(ids, pad), np.pad(mask, pad)
    out.append(np.asarray(_embed(graphdef, state, ids, mask))[:real])
  hidden = encoder.config.hidden_size
  return np.concatenate(out) if out else np.zeros((0, hidden), np.float32)


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


