"""SASRec: a causal self-attention next-item model over item ids.

Kang & McAuley, "Self-Attentive Sequential Recommendation" (ICDM 2018). A
user's history of shifted item ids (0 = padding, item ``i`` is ``i + 1``,
left-padded so the most recent item is last) is embedded, passed through
pre-LN transformer blocks with a causal mask, and the hidden state at each
position scores every item as the next one. Training uses every position of a
window at once (``sequence_examples``, ``sequence_loss``).

Built only from ``privjax.models.nn`` layers, so every parameterised op calls the
trace-time tap that ghost clipping uses. Nothing mixes examples: attention
mixes positions of ONE sequence; the same code runs on one example ``[L]``
(as under the DP code's per-example ``vmap``) or on a batch ``[B, L]``.

Differences from the paper's reference code, and why:

* Blocks are standard pre-LN, ``x + MHA(LN(x))`` and ``x + FFN(LN(x))``; the
  reference code normalises only the queries and adds them as the residual.
* Masking uses a key-padding mask as well as the causal one, so a real
  position never attends to a padding slot; the reference code instead
  re-zeroes padded rows after each block. Either way real positions do not
  depend on padding.
* The output table is separate by default (``tie_embeddings=False``), so each
  parameter is used once in the forward pass; see ``SASRecConfig``.
* Dropout takes an explicit key (``rng``); ``rng=None`` is deterministic.
"""

import dataclasses
import math
from collections.abc import Callable, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from privjax.models import losses
from privjax.models import nn
from privjax.data import sequences

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
}

# Dropout call sites per block, each with its own key: attention
# probabilities, attention output, FFN hidden, FFN output.
_KEYS_PER_BLOCK = 4


@dataclasses.dataclass(frozen=True, kw_only=True)
class SASRecConfig:
  """Architecture of a SASRec model.

  Attributes:
    num_items: number of real items; ids 0..num_items-1 (inputs shift by one).
    max_len: window length L; inputs are at most this long.
    embed_dim: model width D.
    num_layers: transformer blocks.
    num_heads: attention heads; must divide ``embed_dim``.
    ffn_dim: FFN hidden width; ``None`` means ``embed_dim`` (as the paper's
      pointwise two-layer feed-forward).
    dropout_rate: applied only when a key is passed. 0 by default: under DP
      the noise already regularises and dropout adds variance.
    tie_embeddings: score items with the input item table, as in the paper.
      Then that table is used twice in one forward pass (lookup and output
      projection), so a per-layer ghost norm of it is not the norm of its
      gradient: ghost clipping must refuse tied models or add the cross term.
      The default ``False`` uses a separate output table, so every parameter
      is used once and the per-layer ghost norms are exact.
    scale_embeddings: multiply item embeddings by sqrt(D) before adding
      positions, as the paper's code does.
    activation: FFN nonlinearity, "relu" (paper) or "gelu".
    layer_norm_eps: LayerNorm epsilon (1e-8 in the paper's code).

  >>> SASRecConfig.tiny(10).head_dim
  8
  >>> SASRecConfig(num_items=5, max_len=4, embed_dim=6, num_heads=4)
  Traceback (most recent call last):
  ...
  ValueError: embed_dim=6 must be divisible by num_heads=4
  """

  num_items: int
  max_len: int
  embed_dim: int = 64
  num_layers: int = 2
  num_heads: int = 1
  ffn_dim: int | None = None
  dropout_rate: float = 0.0
  tie_embeddings: bool = False
  scale_embeddings: bool = True
  activation: str = "relu"
  layer_norm_eps: float = 1e-8

  def __post_init__(self):
    for name in ("num_items", "max_len", "embed_dim", "num_layers", "num_heads"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive int")
    if self.ffn_dim is not None and (not isinstance(self.ffn_dim, int)
                                     or self.ffn_dim <= 0):
      raise ValueError(f"ffn_dim={self.ffn_dim!r} must be a positive int or None")
    if self.embed_dim % self.num_heads:
      raise ValueError(f"embed_dim={self.embed_dim} must be divisible by "
                       f"num_heads={self.num_heads}")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"dropout_rate={self.dropout_rate} must be in [0, 1)")
    if self.activation not in _ACTIVATIONS:
      raise ValueError(f"activation={self.activation!r} must be one of "
                       f"{sorted(_ACTIVATIONS)}")
    if not self.layer_norm_eps > 0:
      raise ValueError(f"layer_norm_eps={self.layer_norm_eps} must be > 0")

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads

  @property
  def hidden_dim(self) -> int:
    """The FFN width actually used."""
    return self.embed_dim if self.ffn_dim is None else self.ffn_dim

  @classmethod
  def ml100k(cls, num_items: int) -> "SASRecConfig":
    """The paper's MovieLens setting (d=50, 2 blocks, 1 head, dropout 0.2),
    with the window shortened to 50 for ML-100k's shorter histories."""
    return cls(num_items=num_items, max_len=50, embed_dim=50, num_layers=2,
               num_heads=1, dropout_rate=0.2)

  @classmethod
  def tiny(cls, num_items: int) -> "SASRecConfig":
    """A fast configuration for tests."""
    return cls(num_items=num_items, max_len=8, embed_dim=16, num_layers=2,
               num_heads=2, ffn_dim=32)


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  # Inverted dropout; rate 0 or no key returns x itself, so the deterministic
  # path is bit-identical to a model without dropout.
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0)


class SASRecBlock(nnx.Module):
  """Pre-LN block: x + MHA(LN(x)) under causal and key-padding masks, then
  x + FFN(LN(x))."""

  def __init__(self, config: SASRecConfig, *, rngs: nnx.Rngs):
    d = config.embed_dim
    self.num_heads = config.num_heads
    self.head_dim = config.head_dim
    self.dropout_rate = config.dropout_rate
    self.activation = config.activation
    self.attention_norm = nn.LayerNorm(d, epsilon=config.layer_norm_eps)
    # One fused projection: a single larger matmul is faster than three here,
    # and it is still one Linear for the ghost-clipping tap.
    self.qkv = nn.Linear(d, 3 * d, rngs=rngs)
    self.attention_output = nn.Linear(d, d, rngs=rngs)
    self.ffn_norm = nn.LayerNorm(d, epsilon=config.layer_norm_eps)
    self.ffn_in = nn.Linear(d, config.hidden_dim, rngs=rngs)
    self.ffn_out = nn.Linear(config.hidden_dim, d, rngs=rngs)

  def __call__(self, x_xLxD: jax.Array, keep_xLxL: jax.Array,
               keys: Sequence[jax.Array | None]) -> jax.Array:
    """``keep_xLxL[..., q, t]`` says whether query q may attend to key t."""
    key_probs, key_attn, key_hidden, key_out = keys
    qkv_xLx3D = self.qkv(self.attention_norm(x_xLxD))
    qkv_xLx3xHxK = qkv_xLx3D.reshape(*qkv_xLx3D.shape[:-1], 3, self.num_heads,
                                     self.head_dim)
    q_xLxHxK = qkv_xLx3xHxK[..., 0, :, :]
    k_xLxHxK = qkv_xLx3xHxK[..., 1, :, :]
    v_xLxHxK = qkv_xLx3xHxK[..., 2, :, :]
    logits_xHxLxL = jnp.einsum("...qhk,...thk->...hqt", q_xLxHxK, k_xLxHxK)
    logits_xHxLxL = logits_xHxLxL * (self.head_dim ** -0.5)
    # finfo.min, not -inf: a query with no visible key (a padding position, or
    # an all-padding DP filler example) attends uniformly instead of giving NaN.
    logits_xHxLxL = jnp.where(keep_xLxL[..., None, :, :], logits_xHxLxL,
                              jnp.finfo(logits_xHxLxL.dtype).min)
    probs_xHxLxL = jax.nn.softmax(logits_xHxLxL, axis=-1)
    probs_xHxLxL = _dropout(probs_xHxLxL, self.dropout_rate, key_probs)
    attn_xLxHxK = jnp.einsum("...hqt,...thk->...qhk", probs_xHxLxL, v_xLxHxK)
    attn_xLxD = attn_xLxHxK.reshape(*attn_xLxHxK.shape[:-2], -1)
    x_xLxD = x_xLxD + _dropout(self.attention_output(attn_xLxD),
                               self.dropout_rate, key_attn)
    h_xLxF = _ACTIVATIONS[self.activation](self.ffn_in(self.ffn_norm(x_xLxD)))
    h_xLxF = _dropout(h_xLxF, self.dropout_rate, key_hidden)
    return x_xLxD + _dropout(self.ffn_out(h_xLxF), self.dropout_rate, key_out)


class SASRec(nnx.Module):
  """History ``[..., L]`` of shifted item ids -> next-item scores per position.

  ``L <= max_len``. Positions are absolute within the fixed ``max_len``
  window, as in the paper: an input shorter than ``max_len`` is taken to be
  the right end of that window, so it gives the same outputs as the same
  input left-padded to ``max_len``.

  >>> model = SASRec(SASRecConfig.tiny(num_items=7), rngs=nnx.Rngs(0))
  >>> history_BxL = jnp.array([[0, 0, 0, 0, 0, 3, 1, 6],
  ...                          [0, 0, 0, 0, 0, 0, 0, 2]])
  >>> model(history_BxL).shape          # logits at every position
  (2, 8, 7)
  >>> model.score_last(history_BxL[0]).shape
  (7,)
  >>> model.hidden(history_BxL, rng=jax.random.key(1)).shape
  (2, 8, 16)
  """

  def __init__(self, config: SASRecConfig, *, rngs: nnx.Rngs):
    self.config = config
    d = config.embed_dim
    self.item_embed = nn.Embed(config.num_items + 1, d, rngs=rngs)
    self.position_embed = nn.Embed(config.max_len, d, rngs=rngs)
    self.blocks = nnx.List(
        [SASRecBlock(config, rngs=rngs) for _ in range(config.num_layers)])
    self.final_norm = nn.LayerNorm(d, epsilon=config.layer_norm_eps)
    self.output_embed = (None if config.tie_embeddings
                         else nn.Embed(config.num_items, d, rngs=rngs))

  def hidden(self, history: jax.Array, rng: jax.Array | None = None
             ) -> jax.Array:
    """Final hidden states ``[..., L, D]``; rows at padding positions are 0.

    Args:
      history: int ``[..., L]`` shifted item ids, 0 = padding.
      rng: dropout key. ``None`` (evaluation) is deterministic. Each dropout
        site gets its own key split from ``rng`` (one for the embeddings,
        four per block), so masks are independent across sites; within one
        call the mask is drawn for the whole input, so under ``vmap`` pass a
        different key per example.
    """
    cfg = self.config
    length = history.shape[-1]
    if length > cfg.max_len:
      raise ValueError(f"history length {length} exceeds max_len={cfg.max_len}")
    if rng is None:
      keys = [None] * (1 + _KEYS_PER_BLOCK * cfg.num_layers)
    else:
      keys = list(jax.random.split(rng, 1 + _KEYS_PER_BLOCK * cfg.num_layers))
    real_xL = history > 0
    # Broadcast to the batch shape so the position embedding's tap sees one
    # row per example, like every other layer (ghost clipping needs that).
    position_ids_xL = jnp.broadcast_to(
        cfg.max_len - length + jnp.arange(length), history.shape)
    x_xLxD = self.item_embed(history)
    if cfg.scale_embeddings:
      x_xLxD = x_xLxD * math.sqrt(cfg.embed_dim)
    x_xLxD = x_xLxD + self.position_embed(position_ids_xL)
    x_xLxD = jnp.where(real_xL[..., None], x_xLxD, 0.0)
    x_xLxD = _dropout(x_xLxD, cfg.dropout_rate, keys[0])
    causal_LxL = jnp.tril(jnp.ones((length, length), bool))
    keep_xLxL = causal_LxL & real_xL[..., None, :]
    for i, block in enumerate(self.blocks):
      first = 1 + _KEYS_PER_BLOCK * i
      x_xLxD = block(x_xLxD, keep_xLxL, keys[first:first + _KEYS_PER_BLOCK])
    x_xLxD = self.final_norm(x_xLxD)
    return jnp.where(real_xL[..., None], x_xLxD, 0.0)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Scores ``[..., num_items]`` of real items 0..num_items-1 for hidden
    states ``[..., D]`` (any leading axes, e.g. ``[..., L, D]``)."""
    if self.output_embed is None:
      return self.item_embed.attend(hidden)[..., 1:]   # drop the padding row
    return self.output_embed.attend(hidden)

  def __call__(self, history: jax.Array, rng: jax.Array | None = None
               ) -> jax.Array:
    """Next-item logits ``[..., L, num_items]`` at every position."""
    return self.logits(self.hidden(history, rng))

  def score_last(self, history: jax.Array) -> jax.Array:
    """Deterministic next-item scores ``[..., num_items]`` after the whole
    history (its last position: histories are left-padded, most recent last)."""
    return self.logits(self.hidden(history)[..., -1, :])


def sequence_examples(train_seqs: Sequence[np.ndarray], max_len: int,
                      max_windows_per_user: int = 1
                      ) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Windows of each user's training sequence with a target at every position.

  For a sequence ``s`` the inputs are ``s[:-1]`` and the targets ``s[1:]``;
  a window is the last ``max_len`` of both, left-padded. With
  ``max_windows_per_user > 1`` earlier non-overlapping windows follow (most
  recent first); each earlier window starts without the context before it.
  Users with fewer than 2 training items give no example.

  Args:
    train_seqs: per-user chronological 0-based item ids.
    max_len: window length L.
    max_windows_per_user: at most this many windows per user.

  Returns:
    ``(examples, user_of_row)``: ``examples["history"]`` int32 ``[N, L]``
    shifted ids, 0 = padding; ``examples["target"]`` int32 ``[N, L]`` 0-based
    next item, -1 where there is none; ``user_of_row`` int32 ``[N]``.

  >>> ex, users = sequence_examples([np.array([4, 5, 6]), np.array([1])], 4)
  >>> ex["history"].tolist(), ex["target"].tolist(), users.tolist()
  ([[0, 0, 5, 6]], [[-1, -1, 5, 6]], [0])
  """
  if not isinstance(max_len, int) or max_len <= 0:
    raise ValueError(f"max_len={max_len!r} must be a positive int")
  if not isinstance(max_windows_per_user, int) or max_windows_per_user <= 0:
    raise ValueError(
        f"max_windows_per_user={max_windows_per_user!r} must be a positive int")
  histories, targets, users = [], [], []
  for u, seq in enumerate(train_seqs):
    seq = np.asarray(seq)
    inputs, nexts = seq[:-1], seq[1:]
    for w in range(max_windows_per_user):
      end = len(inputs) - w * max_len
      if end <= 0:
        break
      start = max(0, end - max_len)
      histories.append(sequences.left_pad(inputs[start:end], max_len))
      # left_pad shifts by one; undo it so 0-based targets pad with -1.
      targets.append(sequences.left_pad(nexts[start:end], max_len) - 1)
      users.append(u)
  if not histories:
    raise ValueError("no training examples: every user has < 2 training items")
  return ({"history": np.stack(histories).astype(np.int32),
           "target": np.stack(targets).astype(np.int32)},
          np.asarray(users, np.int32))


def sequence_loss(model: SASRec, example: dict[str, jax.Array],
                  rng: jax.Array | None, *, reduction: str = "sum"
                  ) -> jax.Array:
  """Full-softmax cross-entropy of ONE window over its positions with a target.

  ``reduction="sum"`` (default) adds the per-position losses: one window's
  (one user's) loss, the quantity the trainer clips per group; normalising is
  left to the trainer, which divides the noisy sum by the public expected
  batch size, never by data-dependent counts. ``"mean"`` divides by the
  number of targets, which gives a user with a short history as much weight
  as one with a full window (each position of a short history counts more).
  An example without targets (a DP padding row) has loss 0 either way.

  Args:
    model: a ``SASRec``.
    example: ``{"history": [L], "target": [L]}`` as from ``sequence_examples``
      (with a leading batch axis the result sums or averages over it too).
    rng: dropout key, or ``None`` for a deterministic pass.
    reduction: "sum" or "mean".

  >>> model = SASRec(SASRecConfig.tiny(num_items=5), rngs=nnx.Rngs(0))
  >>> ex = {"history": jnp.array([0, 0, 0, 0, 0, 0, 2, 3]),
  ...       "target": jnp.array([-1, -1, -1, -1, -1, -1, 2, 4])}
  >>> float(sequence_loss(model, ex, None)) > 0
  True
  """
  if reduction not in ("sum", "mean"):
    raise ValueError(f"reduction={reduction!r} must be 'sum' or 'mean'")
  target = example["target"]
  valid = target >= 0
  per_position = losses.softmax_cross_entropy(
      model(example["history"], rng), jnp.where(valid, target, 0))
  total = jnp.sum(jnp.where(valid, per_position, 0.0))
  if reduction == "mean":
    total = total / jnp.maximum(jnp.sum(valid), 1)
  return total
