"""privjax: differentially private recommendation with language models in JAX.

The package is a flat set of privacy primitives (``clipping``, ``noise``,
``sampling``, ``accounting``, ...) composed in exactly one step function
(``dp_step``) and driven by one trainer (``trainer``). Import modules, not names:

>>> from privjax.dp import accounting  # doctest: +SKIP
"""

__version__ = "0.1.0"
