"""PATE: disjoint shards, vmapped teachers, vote wiring, answers within a budget."""

import json
import math

import dp_accounting
import jax
import numpy as np
import pytest
from scipy import stats

from privjax import config as config_lib
from privjax.answers import budget as budget_lib
from privjax.answers import noisy_argmax
from privjax.answers import session as session_lib
from privjax import pate
from privjax.run import ensemble as ensemble_lib
from privjax.answers import votes as votes_lib
from privjax.data import bounding
from privjax.data import sequences
from privjax.dp import secret as secret_lib
from privjax.run import workload as workload_lib

DELTA = 1e-5
PUBLIC = tuple(str(u) for u in range(1, 13))   # raw ids of 12 opted-in users
TRACES = []


def _cfg(**overrides):
  cfg = config_lib.Config(
      name="tiny-pate",
      data=config_lib.DataConfig(num_users=120, num_items=30, mean_interactions=8,
                                 max_len=4, max_examples_per_user=4),
      model=config_lib.ModelConfig(embed_dim=4, hidden_dim=8),
      privacy=config_lib.PrivacyConfig(enabled=False),
      train=config_lib.TrainConfig(steps=4, batch_size=8, learning_rate=3e-2),
      eval=config_lib.EvalConfig(batch_size=64))
  return config_lib.replace(cfg, **overrides)


@pytest.fixture(scope="module")
def setup():
  """A tiny workload, 3 shards (+ 12 public users) and their unit rows.

  Its loss counts its traces in ``TRACES``: every teacher training below uses
  the same step, so the count stays at one compile for the whole module."""
  w = workload_lib.build_workload(_cfg())
  w = workload_lib.Workload(**{**w.__dict__, "loss_fun": _counting(w.loss_fun, TRACES)})
  secret = secret_lib.RunSecret.from_seed(0)
  public = np.isin(np.asarray(w.ds.raw_user_ids), PUBLIC)
  shards = pate.shard_users(secret.unit_keys("pate/shards", w.ds.raw_user_ids), 3,
                            public=public)
  examples, user_of_row = w.task.train_examples(w.cfg, w.split, w.ds, w.model)
  per_user = bounding.group_rows(user_of_row, max_rows_per_unit=4,
                                 unit_keys=secret.unit_keys("bounding", w.ds.raw_user_ids))
  return w, shards, examples, user_of_row, per_user


@pytest.fixture(scope="module")
def ensemble(setup):
  w, shards, examples, _, per_user = setup
  params = ensemble_lib.train_teachers(w, examples, [per_user[s] for s in shards.shards],
                               seeds=pate.teacher_seeds(0, 3), steps=4, batch_size=8)
  return pate.Ensemble(w, pate.PateConfig(num_teachers=3, public_users=PUBLIC), shards,
                       params)


# ----------------------------------------------------------------------------
# Shards.
# ----------------------------------------------------------------------------


def _keys(ids, seed=3):
  return secret_lib.RunSecret.from_seed(seed).unit_keys("pate/shards", ids)


@pytest.mark.parametrize("num_users,num_shards,num_public", [
    (10, 3, 0), (943, 10, 100), (500, 50, 0), (7, 1, 3)])
def test_shards_are_disjoint_by_user_and_cover_every_user(num_users, num_shards, num_public):
  public = np.arange(num_users) < num_public
  shards = pate.shard_users(_keys(range(num_users)), num_shards, public=public)
  np.testing.assert_array_equal(shards.public, np.arange(num_public))
  assert len(shards.shards) == num_shards
  everyone = np.concatenate(list(shards.shards) + [shards.public])
  # Each user exactly once: disjoint and covering.
  np.testing.assert_array_equal(np.sort(everyone), np.arange(num_users))
  owner = shards.shard_of(num_users)
  for t, users in enumerate(shards.shards):
    assert (owner[users] == t).all()
  assert (owner[shards.public] == -1).all()
  if num_users >= 500:  # about equal sizes: a uniform multinomial
    sizes = np.array([len(x) for x in shards.shards])
    assert stats.chisquare(sizes).pvalue > 1e-3
    skewed = np.linspace(0.6, 1.4, num_shards) * sizes.sum() / num_shards
    assert stats.chisquare(sizes, skewed * sizes.sum() / skewed.sum()).pvalue < 1e-3


def test_adding_one_user_changes_that_users_teacher_and_no_other():
  # Raw ids in sorted order, as the loaders number users; the new id lands in
  # the middle, so every later dense index shifts by one.
  raw = [str(u) for u in range(1000, 1943)]
  bigger = raw[:400] + ["1399x"] + raw[400:]
  for m in (10, 50):
    before = pate.shard_users(_keys(raw), m, public=np.isin(raw, ["1000", "1001"]))
    after = pate.shard_users(_keys(bigger), m, public=np.isin(bigger, ["1000", "1001"]))
    members = lambda shards, ids: [{ids[u] for u in users} for users in shards.shards]
    a, b = members(before, raw), members(after, bigger)
    changed = [t for t in range(m) if a[t] != b[t]]
    assert len(changed) <= 1 and all(b[t] - a[t] == {"1399x"} for t in changed)
    assert {raw[u] for u in before.public} <= {bigger[u] for u in after.public}


def test_a_permutation_of_dense_indices_would_fail_that_check():
  # What the landed code did: permute range(num_users). One more user moves
  # almost every teacher, so the check above is not vacuous.
  def shards(n, m):
    order = np.random.default_rng(0).permutation(n)
    return [set(part.tolist()) for part in np.array_split(order, m)]
  a, b = shards(943, 10), shards(944, 10)
  assert sum(x != y for x, y in zip(a, b)) >= 9


def test_shards_depend_on_the_secret():
  a = pate.shard_users(_keys(range(100), seed=1), 4)
  b = pate.shard_users(_keys(range(100), seed=1), 4)
  c = pate.shard_users(_keys(range(100), seed=2), 4)
  for x, y in zip(a.shards, b.shards):
    np.testing.assert_array_equal(x, y)
  assert any(not np.array_equal(x, y) for x, y in zip(a.shards, c.shards))


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_shards=0), "num_shards=0"), (dict(public=np.ones(2, bool)), "public.shape"),
    (dict(unit_keys=np.zeros(3, np.int64)), "uint64")])
def test_bad_shards_are_refused_naming_the_value(kwargs, match):
  args = dict(unit_keys=_keys(range(5)), num_shards=2)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    pate.shard_users(**args)


# ----------------------------------------------------------------------------
# Teachers.
# ----------------------------------------------------------------------------


def test_vmapped_teachers_equal_teachers_trained_one_by_one(setup, ensemble):
  w, shards, examples, _, per_user = setup
  rows = [per_user[s] for s in shards.shards]
  seeds = pate.teacher_seeds(0, 3)
  together = ensemble_lib.train_teachers(w, examples, rows, seeds=seeds, steps=4, batch_size=8)
  # One trace (one compile) for all teachers and all steps, here and in the
  # `ensemble` fixture, which trained the same way.
  assert len(TRACES) == 1
  alone = ensemble_lib.train_teachers(w, examples, rows, seeds=seeds, steps=4, batch_size=8,
                              vmap=False)
  initial = ensemble_lib.stack([ensemble_lib.init_params(w, s) for s in seeds])
  for x, y, x0 in zip(jax.tree.leaves(together), jax.tree.leaves(alone),
                      jax.tree.leaves(initial)):
    assert x.shape[0] == 3
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=1e-5)
    # Not vacuous: training moved every teacher.
    assert all(np.abs(np.asarray(x[t] - x0[t])).max() > 1e-3 for t in range(3))
  # Teachers differ from one another (own seeds, own shards).
  leaf = np.asarray(jax.tree.leaves(together)[0])
  assert np.abs(leaf[0] - leaf[1]).max() > 1e-3


def _counting(fun, traces):
  def counted(*args):
    traces.append(1)
    return fun(*args)
  return counted


def test_one_users_data_changes_only_their_teacher(setup):
  """The PATE premise: a user's data reaches exactly one teacher."""
  w, shards, examples, user_of_row, per_user = setup
  rows = [per_user[s] for s in shards.shards]
  seeds = pate.teacher_seeds(0, 3)
  victim = int(shards.shards[1][0])
  changed = dict(examples)
  changed["target"] = examples["target"].copy()
  victim_rows = user_of_row == victim
  changed["target"][victim_rows] = (examples["target"][victim_rows] + 1) % w.ds.num_items
  a = ensemble_lib.train_teachers(w, examples, rows, seeds=seeds, steps=4, batch_size=8)
  b = ensemble_lib.train_teachers(w, changed, rows, seeds=seeds, steps=4, batch_size=8)
  differs = [any(not np.array_equal(np.asarray(x[t]), np.asarray(y[t]))
                 for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
             for t in range(3)]
  assert differs == [False, True, False]
  assert len(TRACES) <= 2  # the vmapped step once, the plain one at most once


@pytest.mark.slow  # a second workload and compile; recommend_test loads ensembles too
def test_ensemble_round_trips_through_its_directory_and_warns(tmp_path):
  cfg = _cfg(**{"train.steps": 2})
  trained = pate.train_ensemble(cfg, pate.PateConfig(num_teachers=2, public_users=("1", "2", "3")),
                                tmp_path)
  meta = json.loads((tmp_path / pate.PATE_FILE).read_text())
  assert "NOT differentially private" in meta["warning"]
  assert sum(meta["shard_sizes"]) + len(meta["public_users"]) == 120
  assert (tmp_path / "secret" / "run_secret.json").exists()
  loaded = pate.load_ensemble(tmp_path)
  assert pate.is_ensemble_dir(tmp_path) and not pate.is_ensemble_dir(tmp_path / "x")
  for x, y in zip(jax.tree.leaves(trained.params), jax.tree.leaves(loaded.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  np.testing.assert_array_equal(trained.shards.public, loaded.shards.public)


# ----------------------------------------------------------------------------
# Votes.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("votes_per_teacher", [1, 3])
def test_votes_are_unseen_items_and_histograms_count_them(ensemble, votes_per_teacher):
  w = ensemble.w
  es = sequences.eval_set(w.split, "test", w.cfg.data.max_len)
  seen = ensemble_lib.seen_mask(es.exclude, w.ds.num_items)
  votes = ensemble.votes({"history": es.history}, seen, votes_per_teacher)
  assert votes.shape == (len(es.target), 3, votes_per_teacher)
  rows = np.arange(len(votes))[:, None, None]
  assert not seen[rows, votes].any()
  # Each teacher's votes are its own top scores among unseen items.
  scores = np.asarray(w.score_fn(ensemble_lib.unstack(ensemble.params, 1), w.frozen,
                                 {"history": es.history}))
  expected = np.argsort(-np.where(seen, -np.inf, scores), axis=1, kind="stable")
  np.testing.assert_array_equal(votes[:, 1], expected[:, :votes_per_teacher])
  counts, sens = ensemble.histograms({"history": es.history}, seen, votes_per_teacher)
  for q in (0, 7, len(votes) - 1):
    np.testing.assert_array_equal(counts[q], np.bincount(votes[q].ravel(),
                                                         minlength=w.ds.num_items))
  assert (counts.sum(1) == 3 * votes_per_teacher).all() and not counts[seen].any()
  # The sensitivity is vote_histogram's: one user moves one teacher's k votes.
  assert sens == noisy_argmax.vote_histogram(votes[0], num_classes=w.ds.num_items)[1]
  assert sens.linf == 1.0 and sens.l2 == pytest.approx(math.sqrt(2 * votes_per_teacher))


def test_vote_counts_refuses_repeated_votes_of_a_teacher():
  with pytest.raises(ValueError, match="repeats a class"):
    votes_lib.vote_counts(np.array([[[1, 1]]]), num_items=4)


# ----------------------------------------------------------------------------
# Answers.
# ----------------------------------------------------------------------------

SENS = noisy_argmax.Sensitivity(linf=1.0, l2=math.sqrt(2), l1=2.0)


@pytest.mark.parametrize("mechanism,param", [("gnmax", {"sigma": 1e-3}),
                                             ("gumbel", {"epsilon": 1e3}),
                                             ("laplace", {"epsilon": 1e3})])
def test_a_clear_vote_wins_and_seen_items_are_never_answered(mechanism, param):
  # One shape for both calls (one compile): 1000 copies of two queries.
  counts = np.tile([[0, 9, 0, 5, 1, 0], [7, 2, 3, 0, 0, 0]], (1000, 1))
  seen = np.tile([[1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]], (1000, 1)).astype(bool)
  session = session_lib.QuerySession(epsilon_budget=1e12, delta=DELTA,
                                      key=jax.random.key(0))
  spec = votes_lib.AnswerSpec(mechanism=mechanism, k=2, **param)
  top = votes_lib.answer(session, counts, SENS, seen, spec)
  # Item 0 has the most votes in query 2 but that user has seen it.
  np.testing.assert_array_equal(top, np.tile([[1, 3], [2, 1]], (1000, 1)))
  # With noise that swamps the counts, a seen item still never comes out,
  # while every unseen item does.
  noisy = votes_lib.AnswerSpec(mechanism=mechanism, k=2,
                          **{key: (1e4 if key == "sigma" else 1e-4) for key in param})
  out = votes_lib.answer(session, counts, SENS, seen, noisy)
  assert not (out == 0).any()
  assert set(out[:, 0].tolist()) == {1, 2, 3, 4, 5}


def test_answers_are_charged_as_cost_of_per_query():
  counts = np.zeros((4, 6), np.int32)
  seen = np.zeros((4, 6), bool)
  session = session_lib.QuerySession(epsilon_budget=100.0, delta=DELTA,
                                      key=jax.random.key(0))
  spec = votes_lib.AnswerSpec(mechanism="gumbel", k=3, epsilon=0.5)
  votes_lib.answer(session, counts, SENS, seen, spec)
  assert session.events == [noisy_argmax.cost_of("gumbel", epsilon=0.5, sensitivity=SENS,
                                                 k=3, num_queries=4)]
  assert spec.cost(SENS, 4) == session.events[0]


def test_a_session_of_answers_stops_at_its_budget_keeping_earlier_ones():
  counts = np.array([0, 4, 1, 0, 0])
  seen = np.zeros(5, bool)
  spec = votes_lib.AnswerSpec(mechanism="gnmax", k=2, sigma=20.0)
  budget = 2.0
  session = session_lib.QuerySession(epsilon_budget=budget, delta=DELTA,
                                      key=jax.random.key(0))
  answers = []
  with pytest.raises(budget_lib.BudgetExceededError):
    for _ in range(1000):
      answers.append(votes_lib.answer(session, counts, SENS, seen, spec).tolist())
  # Exactly as many answers as the budget affords, all kept, none past it.
  affordable = max(q for q in range(1, 1000) if votes_lib._epsilon_of(spec.cost(SENS, q), DELTA)
                   <= budget)
  assert len(answers) == len(session.answers) == affordable
  assert [a.value.tolist() for a in session.answers] == answers
  assert session.epsilon <= budget < votes_lib._epsilon_of(spec.cost(SENS, affordable + 1), DELTA)


def test_confident_gnmax_abstains_below_the_threshold_and_pays_every_check():
  counts = np.array([[0, 10, 0, 0], [1, 1, 1, 0]])
  seen = np.zeros((2, 4), bool)
  session = session_lib.QuerySession(epsilon_budget=1e12, delta=DELTA,
                                      key=jax.random.key(0))
  spec = votes_lib.AnswerSpec(mechanism="gnmax", sigma=1e-3, threshold=5.0,
                         sigma_threshold=1e-3)
  labels = votes_lib.answer(session, counts, SENS, seen, spec)
  assert labels.tolist() == [[1], [-1]]
  assert session.events == [noisy_argmax.confident_cost_of(
      sigma_threshold=1e-3, sigma=1e-3, sensitivity=SENS, num_queries=2, num_answered=1)]
  with pytest.raises(ValueError, match="Confident GNMax needs"):
    votes_lib.AnswerSpec(mechanism="gumbel", epsilon=1.0, threshold=1.0, sigma_threshold=1.0)


@pytest.mark.parametrize("mechanism", votes_lib.MECHANISMS)
@pytest.mark.parametrize("num_queries", [1, 100])
def test_calibration_fits_exactly_q_answers_in_the_budget(mechanism, num_queries):
  sens = noisy_argmax.Sensitivity(linf=1.0, l2=math.sqrt(6), l1=6.0)
  spec = votes_lib.calibrate(mechanism, epsilon_budget=4.0, num_queries=num_queries,
                        sensitivity=sens, k=3, delta=DELTA)
  eps = votes_lib._epsilon_of(spec.cost(sens, num_queries), DELTA)
  assert 4.0 * (1 - 1e-6) <= eps <= 4.0
  # Less noise would not fit: the calibration is tight, not merely safe.
  x = spec.sigma if mechanism == "gnmax" else spec.epsilon
  tighter = votes_lib.AnswerSpec(mechanism=mechanism, k=3,
                            **({"sigma": x * 0.999} if mechanism == "gnmax"
                               else {"epsilon": x * 1.001}))
  assert votes_lib._epsilon_of(tighter.cost(sens, num_queries), DELTA) > 4.0
  # A session with that budget answers exactly num_queries of them, one by one.
  session = session_lib.QuerySession(epsilon_budget=4.0, delta=DELTA,
                                      key=jax.random.key(1))
  counts, seen = np.zeros(12, np.int32), np.zeros(12, bool)
  for _ in range(num_queries):
    votes_lib.answer(session, counts, sens, seen, spec)
  with pytest.raises(budget_lib.BudgetExceededError):
    votes_lib.answer(session, counts, sens, seen, spec)


def test_pure_calibration_and_per_answer_epsilon():
  sens = noisy_argmax.Sensitivity(linf=1.0, l2=math.sqrt(2))
  assert votes_lib.calibrate("laplace", epsilon_budget=6.0, num_queries=3, sensitivity=sens,
                        k=2, accounting="pure").epsilon == 1.0
  spec = votes_lib.per_answer("gumbel", epsilon=2.0, sensitivity=sens, k=4)
  assert spec.epsilon == 0.5 and spec.pure_epsilon() == 2.0
  gn = votes_lib.per_answer("gnmax", epsilon=2.0, sensitivity=sens, k=4, delta=DELTA)
  assert votes_lib._epsilon_of(gn.cost(sens), DELTA) == pytest.approx(2.0, rel=1e-6)
  assert isinstance(gn.cost(sens), dp_accounting.GaussianDpEvent)
  with pytest.raises(ValueError, match="no pure-DP bound"):
    votes_lib.calibrate("gnmax", epsilon_budget=1.0, num_queries=1, sensitivity=sens,
                   accounting="pure")


# ----------------------------------------------------------------------------
# Student.
# ----------------------------------------------------------------------------


def test_student_learns_from_public_queries_and_noisy_labels_only(ensemble):
  w = ensemble.w
  public = ensemble.shards.public
  queries = pate.public_queries(w, public, num_queries=40, seed=0)
  assert len(queries.users) == 40 and set(queries.users.tolist()) <= set(public.tolist())
  # Each query is a strict prefix of its user's training sequence.
  for row in (0, 39):
    seen_items = np.flatnonzero(queries.seen[row])
    assert set(seen_items) <= set(w.split.train[queries.users[row]].tolist())
  session = session_lib.QuerySession(epsilon_budget=8.0, delta=DELTA,
                                      key=jax.random.key(0))
  spec = votes_lib.calibrate("gnmax", epsilon_budget=8.0, num_queries=40, k=1, delta=DELTA,
                        sensitivity=noisy_argmax.Sensitivity(linf=1.0, l2=math.sqrt(2)))
  labels = pate.label_queries(ensemble, session, queries, spec)
  assert labels.shape == (40,) and not queries.seen[np.arange(40), labels].any()
  assert len(session.answers) == 1 and session.epsilon <= 8.0
  student = pate.train_student(w, queries, labels, seed=0, steps=3, batch_size=8)
  assert jax.tree.structure(student) == jax.tree.structure(w.params)
  with pytest.raises(ValueError, match="no labelled queries"):
    pate.train_student(w, queries, np.full(40, -1), seed=0, steps=1, batch_size=8)
