"""A small next-item model: item embeddings of the recent history -> MLP.

The last ``max_len`` items (0 = padding) are embedded, concatenated, passed
through a hidden layer and projected to a user vector, which is scored
against a separate output item-embedding table (untied, so every parameter is
used once). Built from ``privjax.models.nn`` layers so ghost clipping can see them.
"""

from flax import nnx
import jax
import jax.numpy as jnp

from privjax.models import nn


class NextItemMLP(nnx.Module):
  """History [..., L] of shifted item ids -> scores [..., num_items].

  >>> model = NextItemMLP(num_items=7, max_len=3, embed_dim=4, hidden_dim=8,
  ...                     rngs=nnx.Rngs(0))
  >>> model(jnp.array([[0, 2, 5]])).shape
  (1, 7)
  """

  def __init__(self, *, num_items: int, max_len: int, embed_dim: int,
               hidden_dim: int, rngs: nnx.Rngs):
    self.num_items = num_items
    self.max_len = max_len
    self.item_embed = nn.Embed(num_items + 1, embed_dim, init_stddev=0.1, rngs=rngs)
    self.hidden = nn.Linear(max_len * embed_dim, hidden_dim, rngs=rngs)
    self.project = nn.Linear(hidden_dim, embed_dim, rngs=rngs)
    self.output_embed = nn.Embed(num_items, embed_dim, init_stddev=0.1, rngs=rngs)

  def user_vector(self, history: jax.Array) -> jax.Array:
    e_xLxD = self.item_embed(history)
    e_xLxD = jnp.where((history > 0)[..., None], e_xLxD, 0.0)
    h_xH = jax.nn.gelu(self.hidden(e_xLxD.reshape(history.shape[:-1] + (-1,))))
    return self.project(h_xH)

  def __call__(self, history: jax.Array) -> jax.Array:
    return self.output_embed.attend(self.user_vector(history))
