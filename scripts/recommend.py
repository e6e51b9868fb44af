"""Recommend items with titles, and state the privacy cost of every answer.

  python scripts/recommend.py --workdir RUN --user 42 [--k 10]
  python scripts/recommend.py --workdir RUN --history "Star Wars (1977); Fargo (1996)"
  python scripts/recommend.py --workdir ENSEMBLE --user 42 --mechanism gumbel --epsilon 1
  python scripts/recommend.py --workdir ENSEMBLE --queries 50 --epsilon 0.5 --budget 10
  python scripts/recommend.py --workdir ENSEMBLE --session queries.jsonl --budget 10

``--workdir`` is either

* a DP-SGD run directory (``scripts/train.py``): the model's parameters are
  (epsilon, delta)-DP, so its recommendations are post-processing and cost
  nothing beyond the training epsilon; no noise is added (it would buy
  nothing), and any number of queries may be answered. A run trained without
  DP is served too, labelled NOT private: noise on such a model's scores would
  give no guarantee, since one user can change them without bound.
* a PATE ensemble directory (``privjax.pate.train_ensemble``, e.g. written by
  ``studies/private_inference/study.py``): every teacher votes its top
  ``--votes-per-teacher`` items the querying user has not seen, and the answer
  is the noisy top-k of the vote histogram under ``--mechanism`` (gnmax,
  gumbel or laplace). Each answer costs ``--epsilon``: pure epsilon-DP for the
  whole top-k (gumbel, laplace), or (epsilon, ``--delta``)-DP on its own
  (gnmax), for one training user. The teachers are never shown.

A query is ``--user ID`` (a raw user id of the dataset; their whole history is
the query), ``--history "title; title; ..."`` (catalogue titles, matched
case-insensitively; the year may be left out when that leaves one match), a
session file ``--session FILE`` (one JSON object a line: ``{"user": "42"}`` or
``{"history": "title; ..."}``) or ``--queries N`` random users. Sessions track
the cumulative epsilon and refuse, before drawing any noise, the first answer
that would take it past ``--budget``; earlier answers stay printed. Sessions
live in this process: a real service must persist its odometer.

Noise comes from a fresh secret from the OS unless ``--seed`` is given
(reproducible, for tests and simulation only: NOT secure).
"""

import logging
import sys

from privjax import cli
from privjax import serve

logging.getLogger("absl").setLevel(logging.ERROR)

if __name__ == "__main__":
  sys.exit(cli.run(lambda argv: serve.main(argv, description=__doc__), sys.argv[1:]))
