"""A text-first sequential recommender: public item text tower, private sequence model.

Every item is described by its public text (title, year, genres), encoded
ONCE by a frozen pretrained encoder (MiniLM by default), reduced by PCA and
whitened (``whiten``): a ``[num_items, text_dim]`` matrix computed from item
text alone, so it costs no privacy and is cached. The model learns:

* an adapter ``text_dim -> embed_dim`` (one Linear), optionally plus a learned
  item-ID embedding (``fuse_id``): the item table ``E = adapter(text) [+ id]``;
* a causal transformer (SASRec blocks) over the item vectors of the history;
* full-softmax scores ``h . E^T`` over every item, with the same table ``E``.

Under DP only the user side pays noise; the item tower is mostly public text,
which helps cold items (few interactions) most. Built from
``privjax.models.nn`` layers: the adapter sees the whole catalogue in every
example, and ghost clipping computes its per-example gradient directly (it is
``text_dim x embed_dim``), so every trainable leaf has a rule.

>>> text = whiten(np.random.default_rng(0).normal(size=(9, 12)), 4)
>>> cfg = TextSeqConfig(num_items=9, max_len=6, text_dim=4, embed_dim=8, num_layers=1)
>>> model = TextSeqRec(cfg, item_text=text, rngs=nnx.Rngs(0))
>>> model(jnp.array([[0, 0, 0, 3, 1, 9]])).shape
(1, 6, 9)
"""

import dataclasses
import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from privjax.models import losses
from privjax.models import nn
from privjax.models import sasrec


class ItemText(nnx.Variable):
  """Public, frozen item text features: neither trained nor noised."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextSeqConfig:
  """Architecture of a ``TextSeqRec``.

  Attributes:
    num_items: real items 0..num_items-1 (inputs shift by one, 0 = padding).
    max_len: window length L.
    text_dim: width of the whitened text features (PCA components kept).
    embed_dim: model width D.
    num_layers, num_heads, ffn_dim, dropout_rate: the SASRec blocks.
    fuse_id: add a learned item-ID embedding to the text vector of each item.
    item_bias: add a learned score per item (a popularity prior: one
      coordinate per item, cheap under DP).
  """
  num_items: int
  max_len: int
  text_dim: int = 64
  embed_dim: int = 64
  num_layers: int = 2
  num_heads: int = 1
  ffn_dim: int | None = None
  dropout_rate: float = 0.0
  fuse_id: bool = False
  item_bias: bool = False

  def __post_init__(self):
    for name in ("num_items", "max_len", "text_dim", "embed_dim", "num_layers",
                 "num_heads"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive int")

  def blocks(self) -> sasrec.SASRecConfig:
    return sasrec.SASRecConfig(num_items=self.num_items, max_len=self.max_len,
                               embed_dim=self.embed_dim, num_layers=self.num_layers,
                               num_heads=self.num_heads, ffn_dim=self.ffn_dim,
                               dropout_rate=self.dropout_rate)


def item_texts(titles, genres_IxG: np.ndarray, genre_names) -> list[str]:
  """The public text of each item: its title (with the year) and its genres.

  >>> item_texts(["Heat (1995)"], np.array([[True, False]]), ["Action", "Drama"])
  ['Heat (1995). Genres: Action.']
  """
  out = []
  for title, flags in zip(titles, np.asarray(genres_IxG, bool)):
    names = [g for g, on in zip(genre_names, flags) if on]
    out.append(f"{title}. Genres: {', '.join(names)}." if names else f"{title}.")
  return out


def whiten(embeddings_IxH: np.ndarray, dim: int) -> np.ndarray:
  """PCA to ``dim`` components, each scaled to unit variance (float32 [I, dim]).

  A function of the item embeddings only (public), so it may be computed from
  the whole catalogue. Components beyond the rank are dropped.
  """
  x = np.asarray(embeddings_IxH, np.float64)
  x = x - x.mean(axis=0)
  u, s, _ = np.linalg.svd(x, full_matrices=False)
  keep = min(dim, int((s > 1e-8 * max(s.max(), 1e-30)).sum()))
  # u * s are the principal coordinates; / (s / sqrt(I)) makes each unit variance.
  return (u[:, :keep] * math.sqrt(len(x))).astype(np.float32)


class TextSeqRec(nnx.Module):
  """History ``[..., L]`` of shifted item ids -> next-item scores per position."""

  def __init__(self, config: TextSeqConfig, *, item_text: np.ndarray, rngs: nnx.Rngs):
    item_text = jnp.asarray(item_text, jnp.float32)
    if item_text.shape[0] != config.num_items:
      raise ValueError(f"item_text has {item_text.shape[0]} rows, expected "
                       f"num_items={config.num_items}")
    self.config = dataclasses.replace(config, text_dim=int(item_text.shape[1]))
    d = config.embed_dim
    self.item_text = ItemText(item_text)
    # Item vectors start as small as a SASRec item table's (std 0.02 per
    # coordinate; the whitened text has unit variance per component), so that
    # the scores h . E start near uniform instead of saturating the softmax.
    self.adapter = nn.Linear(self.config.text_dim, d, use_bias=False,
                             init_stddev=0.02 / math.sqrt(self.config.text_dim),
                             rngs=rngs)
    self.item_id = (nn.Embed(config.num_items, d, rngs=rngs) if config.fuse_id else None)
    self.bias = (nn.Embed(config.num_items, 1, init_stddev=0.0, rngs=rngs)
                 if config.item_bias else None)
    blocks = config.blocks()
    self.position_embed = nn.Embed(config.max_len, d, rngs=rngs)
    self.blocks = nnx.List([sasrec.SASRecBlock(blocks, rngs=rngs)
                            for _ in range(config.num_layers)])
    self.final_norm = nn.LayerNorm(d, epsilon=blocks.layer_norm_eps)

  def item_table(self, batch_shape: tuple[int, ...] = ()) -> jax.Array:
    """The item vectors ``[..., num_items, D]`` (one table per leading index).

    The catalogue is broadcast to the batch shape so that, as every other
    layer, the adapter's tap sees one row per example.
    """
    text = jnp.broadcast_to(self.item_text[...], (*batch_shape, *self.item_text.shape))
    table = self.adapter(text)
    if self.item_id is not None:
      ids = jnp.broadcast_to(jnp.arange(self.config.num_items), (*batch_shape,
                                                                 self.config.num_items))
      table = table + self.item_id(ids)
    return table

  def _hidden(self, history, table, rng):
    cfg = self.config
    length = history.shape[-1]
    if length > cfg.max_len:
      raise ValueError(f"history length {length} exceeds max_len={cfg.max_len}")
    num_keys = 1 + sasrec._KEYS_PER_BLOCK * cfg.num_layers  # pylint: disable=protected-access
    keys = [None] * num_keys if rng is None else list(jax.random.split(rng, num_keys))
    real_xL = history > 0
    idx = jnp.maximum(history - 1, 0)
    x_xLxD = jnp.take_along_axis(table, idx[..., None], axis=-2)
    positions = jnp.broadcast_to(cfg.max_len - length + jnp.arange(length), history.shape)
    x_xLxD = x_xLxD * math.sqrt(cfg.embed_dim) + self.position_embed(positions)
    x_xLxD = jnp.where(real_xL[..., None], x_xLxD, 0.0)
    x_xLxD = sasrec._dropout(x_xLxD, cfg.dropout_rate, keys[0])  # pylint: disable=protected-access
    keep_xLxL = jnp.tril(jnp.ones((length, length), bool)) & real_xL[..., None, :]
    for i, block in enumerate(self.blocks):
      first = 1 + sasrec._KEYS_PER_BLOCK * i  # pylint: disable=protected-access
      x_xLxD = block(x_xLxD, keep_xLxL,
                     keys[first:first + sasrec._KEYS_PER_BLOCK])  # pylint: disable=protected-access
    x_xLxD = self.final_norm(x_xLxD)
    return jnp.where(real_xL[..., None], x_xLxD, 0.0)

  def _item_bias(self, batch_shape) -> jax.Array | float:
    if self.bias is None:
      return 0.0
    ids = jnp.broadcast_to(jnp.arange(self.config.num_items),
                           (*batch_shape, self.config.num_items))
    return self.bias(ids)[..., 0]                       # [..., num_items]

  def __call__(self, history: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """Next-item logits ``[..., L, num_items]`` at every position."""
    batch = history.shape[:-1]
    table = self.item_table(batch)
    hidden = self._hidden(history, table, rng)
    bias = self._item_bias(batch)
    if not isinstance(bias, float):
      bias = bias[..., None, :]
    return jnp.einsum("...ld,...id->...li", hidden, table) + bias

  def score_last(self, history: jax.Array) -> jax.Array:
    """Deterministic next-item scores ``[..., num_items]`` after the history."""
    batch = history.shape[:-1]
    table = self.item_table(batch)
    hidden = self._hidden(history, table, None)[..., -1, :]
    return jnp.einsum("...d,...id->...i", hidden, table) + self._item_bias(batch)


def sequence_loss(model: TextSeqRec, example: dict[str, jax.Array],
                  rng: jax.Array | None) -> jax.Array:
  """Summed full-softmax cross-entropy of ONE window (as ``sasrec.sequence_loss``)."""
  target = example["target"]
  valid = target >= 0
  per_position = losses.softmax_cross_entropy(model(example["history"], rng),
                                              jnp.where(valid, target, 0))
  return jnp.sum(jnp.where(valid, per_position, 0.0))
