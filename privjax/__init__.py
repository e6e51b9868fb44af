"""privjax: differentially private recommendation with language models in JAX.

Small privacy primitives (``privjax.dp``, ``privjax.answers``) composed by one
plan (``dp.plan``) and one step (``dp.step``), driven by one loop
(``run.train``); ``make_private`` runs the same machinery on your own model
and data. Import modules, not names:

>>> from privjax.dp import accounting  # doctest: +SKIP
"""

__version__ = "0.1.0"


def make_private(*args, **kwargs):
  """``privjax.private.make_private`` (imported on first use: it pulls in jax)."""
  from privjax import private  # pylint: disable=g-import-not-at-top
  return private.make_private(*args, **kwargs)
