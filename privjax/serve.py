"""Serving recommendations with their privacy cost: DP-SGD models and PATE ensembles.

``serve_model`` answers from a DP-SGD run directory (post-processing: free
beyond the training epsilon; a non-private run is labelled as such) and
``serve_ensemble`` from a PATE ensemble (each answer a noisy top-k of the vote
histogram, charged to one budget, refused before any noise is drawn once the
budget would be exceeded). Queries are raw user ids, title lists
(``items_of_titles``, with "did you mean" suggestions) or session files.
``main(argv)`` is the command line of ``scripts/recommend.py`` (its
docstring is the user guide); answers are printed, the return value is the
exit code.
"""

import argparse
import difflib
import json
import math
import pathlib
import re
import secrets
import sys

import jax
import numpy as np

from privjax import pate
from privjax.run import ensemble as ensemble_lib
from privjax.answers import budget as budget_lib
from privjax.answers import noisy_argmax
from privjax.answers import session as session_lib
from privjax.answers import votes as votes_lib
from privjax.data import sequences
from privjax.dp import secret as secret_lib
from privjax.run import workload as workload_lib

_YEAR = re.compile(r"\s*\(\d{4}\)\s*$")


class QueryError(ValueError):
  """A query names a user or title that the catalogue does not have."""


# ----------------------------------------------------------------------------
# Queries: users and titles -> item histories.
# ----------------------------------------------------------------------------


def _title_index(titles) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
  exact, bare = {}, {}
  for item, title in enumerate(titles):
    exact.setdefault(title.strip().casefold(), []).append(item)
    bare.setdefault(_YEAR.sub("", title).strip().casefold(), []).append(item)
  return exact, bare


def items_of_titles(text: str, titles) -> list[int]:
  """Item ids of ``"title; title; ..."``; raises QueryError naming a bad title."""
  exact, bare = _title_index(titles)
  items = []
  for raw in text.split(";"):
    name = raw.strip()
    if not name:
      continue
    key = name.casefold()
    found = exact.get(key) or bare.get(_YEAR.sub("", key).strip())
    if not found:
      close = difflib.get_close_matches(name, titles, n=3, cutoff=0.6)
      hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
      raise QueryError(f"unknown title {name!r}: no catalogue title matches it "
                       f"(case-insensitively){hint}")
    if len({titles[i] for i in found}) > 1:
      raise QueryError(f"title {name!r} is ambiguous: "
                       f"{', '.join(repr(titles[i]) for i in found)}; give the year")
    # Catalogues list some films twice under one title: all count as seen.
    items.extend(found)
  if not items:
    raise QueryError(f"--history={text!r} names no title")
  return items


def user_history(raw_id: str, ds, split) -> np.ndarray:
  index = {u: i for i, u in enumerate(ds.raw_user_ids)}
  if str(raw_id) not in index:
    raise QueryError(f"unknown user {raw_id!r}: the dataset has raw user ids "
                     f"{ds.raw_user_ids[0]!r} .. {ds.raw_user_ids[-1]!r}")
  return split.sequences[index[str(raw_id)]]


def parse_queries(args, w) -> list[tuple[str, np.ndarray]]:
  ds, split = w.ds, w.split
  if args.user is not None:
    return [(f"user {args.user}", user_history(args.user, ds, split))]
  if args.history is not None:
    return [("history", np.asarray(items_of_titles(args.history, ds.item_titles)))]
  if args.queries is not None:
    rng = np.random.default_rng(args.seed if args.seed is not None else secrets.randbits(63))
    users = rng.choice(ds.num_users, size=args.queries, replace=args.queries > ds.num_users)
    return [(f"user {ds.raw_user_ids[u]}", split.sequences[u]) for u in users]
  out = []
  path = pathlib.Path(args.session)
  for number, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      query = json.loads(line)
    except json.JSONDecodeError as e:
      raise QueryError(f"{path}:{number}: not JSON ({e.msg})") from None
    if not isinstance(query, dict) or len({"user", "history"} & set(query)) != 1:
      raise QueryError(f"{path}:{number}: expected {{\"user\": ID}} or "
                       f"{{\"history\": \"title; ...\"}}, got {line.strip()!r}")
    try:
      if "user" in query:
        out.append((f"user {query['user']}", user_history(query["user"], ds, split)))
      else:
        out.append(("history", np.asarray(items_of_titles(query["history"], ds.item_titles))))
    except QueryError as e:
      raise QueryError(f"{path}:{number}: {e}") from None
  if not out:
    raise QueryError(f"{path} holds no query")
  return out


def model_inputs(w, histories: list[np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Task inputs [Q, ...] and seen masks [Q, items] for item histories."""
  max_len = w.cfg.data.max_len
  width = max(len(h) for h in histories)
  exclude = np.full((len(histories), width), -1, np.int32)
  for row, h in enumerate(histories):
    exclude[row, :len(h)] = h
  es = sequences.EvalSet(
      users=np.zeros(len(histories), np.int32),
      history=np.stack([sequences.left_pad(np.asarray(h), max_len) for h in histories]),
      target=np.zeros(len(histories), np.int32), exclude=exclude)
  inputs = w.task.eval_inputs(w.cfg, es, w.ds, w.model_with(w.params))
  return inputs, ensemble_lib.seen_mask(exclude, w.ds.num_items)


# ----------------------------------------------------------------------------
# Answers.
# ----------------------------------------------------------------------------


def _print_answer(number: int, label: str, history: np.ndarray, items, titles):
  print(f"query {number}: {label} ({len(set(history.tolist()))} items seen)")
  for rank, item in enumerate(items, 1):
    print(f"  {rank:2d}. {titles[item]}")


def serve_model(args, workdir: pathlib.Path) -> int:
  w, params, step = workload_lib.load_trained(workdir)
  privacy_file = workdir / "privacy.json"
  privacy = json.loads(privacy_file.read_text()) if privacy_file.exists() else {}
  queries = parse_queries(args, w)
  inputs, seen = model_inputs(w, [h for _, h in queries])
  top = ensemble_lib.top_unseen(w, params, inputs, seen, args.k, stacked=False)
  if privacy.get("private"):
    cost = (f"0 beyond training: the model is ({privacy['epsilon']:.4g}, "
            f"{privacy['delta']:.3g})-DP for one {privacy['unit']} (DP-SGD, "
            f"{privacy['accountant'].upper()}), and its recommendations are "
            "post-processing of it")
    print(f"privjax recommend: DP-SGD model {workdir} (step {step}). No extra noise "
          "is needed: any number of answers costs nothing beyond the training epsilon.")
    if args.mechanism or args.epsilon or args.budget:
      print("note: --mechanism/--epsilon/--budget are ignored for a DP-trained model "
            "(noise would buy no privacy).")
  else:
    cost = ("NONE: this model was trained WITHOUT differential privacy; its answers "
            "carry no guarantee")
    print(f"privjax recommend: NON-PRIVATE model {workdir} (step {step}). WARNING: "
          "no privacy guarantee. Adding noise to this model's scores would not give "
          "one either: one user can change them without bound. Train with DP-SGD "
          "or use a PATE ensemble.")
  for number, ((label, history), items) in enumerate(zip(queries, top), 1):
    _print_answer(number, label, history, items, w.ds.item_titles)
    print(f"  privacy cost of this answer: {cost}.")
  if len(queries) > 1:
    print(f"session: {len(queries)} answers; cumulative privacy cost: {cost}.")
  return 0


def _noise_key(seed: int | None) -> jax.Array:
  if seed is not None:   # reproducible: NOT secure (simulation and tests only)
    return secret_lib.RunSecret.from_seed(seed).jax_key("recommend")
  return secret_lib.RunSecret.fresh().jax_key("recommend")


def serve_ensemble(args, workdir: pathlib.Path) -> int:
  ensemble = pate.load_ensemble(workdir)
  w = ensemble.w
  mechanism = args.mechanism or "gumbel"
  epsilon = args.epsilon if args.epsilon is not None else 1.0
  accounting = args.accounting or ("rdp" if mechanism == "gnmax" else "pure")
  votes_per_teacher = args.votes_per_teacher or args.k
  queries = parse_queries(args, w)
  inputs, seen = model_inputs(w, [h for _, h in queries])
  counts, sensitivity = ensemble.histograms(inputs, seen, votes_per_teacher)
  spec = votes_lib.per_answer(mechanism, epsilon=epsilon, sensitivity=sensitivity,
                         k=args.k, delta=args.delta)
  budget = args.budget if args.budget is not None else math.inf
  session = session_lib.QuerySession(
      epsilon_budget=budget, key=_noise_key(args.seed), accounting=accounting,
      delta=args.delta if accounting == "rdp" else None)
  detail = (f"sigma={spec.sigma:.4g} on each count" if mechanism == "gnmax" else
            f"per-round epsilon {spec.epsilon:.4g} x {args.k} rounds")
  one = (f"epsilon={epsilon:g} (pure DP)" if spec.pure_epsilon() is not None else
         f"(epsilon={epsilon:g}, delta={args.delta:g})-DP")
  print(f"privjax recommend: PATE ensemble of {ensemble.num_teachers} teachers ({workdir}); "
        f"{mechanism} noisy top-{args.k} of the vote histogram ({votes_per_teacher} "
        f"vote(s) per teacher, {detail}). The teachers are not private and are never "
        "shown; only this noisy answer is.")
  print(f"Each answer costs {one} for one training user (all their interactions); "
        f"the session composes them ({accounting} accounting"
        f"{', delta=%g' % args.delta if accounting == 'rdp' else ''}) within "
        f"budget epsilon={budget:g}.")
  for number, (label, history) in enumerate(queries, 1):
    try:
      items = votes_lib.answer(session, counts[number - 1], sensitivity, seen[number - 1], spec)
    except budget_lib.BudgetExceededError as e:
      print(f"query {number}: {label}: REFUSED: {e}")
      print(f"session: answered {number - 1} of {len(queries)} queries; the remaining "
            f"{len(queries) - number + 1} are refused (budget epsilon={budget:g} spent "
            f"down to {session.epsilon:.4g}). The answers above stand.")
      return 0
    _print_answer(number, label, history, items, w.ds.item_titles)
    print(f"  privacy cost of this answer: {one}; session total epsilon="
          f"{session.epsilon:.4g} of budget {budget:g}.")
  print(f"session: answered {len(queries)} of {len(queries)} queries; cumulative "
        f"epsilon={session.epsilon:.4g} ({accounting}"
        f"{', delta=%g' % args.delta if accounting == 'rdp' else ''}).")
  return 0


# Command line (scripts/recommend.py).


def _parse(argv, description: str = __doc__):
  parser = argparse.ArgumentParser(
      description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True,
                      help="a DP-SGD run directory or a PATE ensemble directory")
  query = parser.add_mutually_exclusive_group(required=True)
  query.add_argument("--user", help="raw user id; the query is their whole history")
  query.add_argument("--history", help='"title; title; ..." (case-insensitive)')
  query.add_argument("--session", help="JSON-lines file of queries (session mode)")
  query.add_argument("--queries", type=int, help="N random users (session mode)")
  parser.add_argument("--k", type=int, default=10, help="items per answer")
  parser.add_argument("--mechanism", choices=votes_lib.MECHANISMS, default=None,
                      help="PATE: noisy top-k mechanism (default gumbel)")
  parser.add_argument("--epsilon", type=float, default=None,
                      help="PATE: epsilon of ONE answer (default 1)")
  parser.add_argument("--budget", type=float, default=None,
                      help="PATE: total epsilon of the session (default: no limit)")
  parser.add_argument("--delta", type=float, default=1e-5,
                      help="PATE: delta for gnmax and rdp accounting")
  parser.add_argument("--accounting", choices=("pure", "rdp"), default=None,
                      help="PATE: pure (basic composition; gumbel/laplace default) "
                      "or rdp (gnmax, and tighter over many answers)")
  parser.add_argument("--votes-per-teacher", type=int, default=None,
                      help="PATE: items each teacher votes for (default k)")
  parser.add_argument("--seed", type=int, default=None,
                      help="noise and --queries seed (NOT secure; simulation only)")
  args = parser.parse_args(argv)
  if args.k < 1:
    parser.error(f"--k={args.k} must be >= 1")
  if args.queries is not None and args.queries < 1:
    parser.error(f"--queries={args.queries} must be >= 1")
  for name in ("epsilon", "budget"):
    value = getattr(args, name)
    if value is not None and not value > 0:
      parser.error(f"--{name}={value} must be > 0")
  if not 0 < args.delta < 1:
    parser.error(f"--delta={args.delta} must be in (0, 1)")
  if args.accounting == "pure" and args.mechanism == "gnmax":
    parser.error("--accounting=pure: gnmax has no pure-DP bound; use rdp")
  return args


def main(argv: list[str], description: str = __doc__) -> int:
  """Runs the ``scripts/recommend.py`` command line; returns the exit code."""
  args = _parse(argv, description)
  workdir = pathlib.Path(args.workdir)
  try:
    if pate.is_ensemble_dir(workdir):
      return serve_ensemble(args, workdir)
    return serve_model(args, workdir)
  except (QueryError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
