"""Noisy argmax / top-k: right choices, right laws, right scales, right costs."""

import itertools
import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from privjax.answers import budget as budget_lib
from privjax.answers import noisy_argmax as na
from privjax.answers import session as session_lib

VOTES = na.Sensitivity(linf=1.0, l2=math.sqrt(2), l1=2.0)  # single-vote histograms
PARAMS = {"gumbel": {"epsilon": 1.0}, "laplace": {"epsilon": 1.0},
          "gnmax": {"sigma": 1.0}}
DELTA = 1e-6
# Compiles dominate the run time: batch tests share one shape, [ROWS, N].
ROWS, N = 20_000, 5


def _eps(event, orders=None, delta=DELTA):
  accountant = dp_accounting.rdp.RdpAccountant(orders)
  accountant.compose(event)
  return accountant.get_epsilon(delta)


def _chi2_pvalue(choices, num_cells, expected_probs=None):
  observed = np.bincount(np.asarray(choices).ravel(), minlength=num_cells)
  probs = (np.full(num_cells, 1 / num_cells) if expected_probs is None
           else np.asarray(expected_probs))
  return stats.chisquare(observed, probs * observed.sum()).pvalue


# ----------------------------------------------------------------------------
# Choices.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", na.MECHANISMS)
def test_huge_margin_gives_the_true_argmax_and_top_k(mechanism):
  rng = np.random.default_rng(0)
  scores_bxn = rng.permuted(np.tile(np.arange(N) * 1e4, (ROWS, 1)), axis=1)
  choice, _ = na.noisy_argmax(scores_bxn, mechanism=mechanism, sensitivity=VOTES,
                              key=jax.random.key(1), **PARAMS[mechanism])
  np.testing.assert_array_equal(choice, scores_bxn.argmax(-1))
  top, _ = na.noisy_top_k(scores_bxn, 2, mechanism=mechanism, sensitivity=VOTES,
                          key=jax.random.key(2), **PARAMS[mechanism])
  np.testing.assert_array_equal(top, np.argsort(-scores_bxn, axis=-1)[:, :2])


@pytest.mark.parametrize("mechanism", na.MECHANISMS)
def test_tied_scores_give_uniform_choices_and_the_test_rejects_bias(mechanism):
  n, rows = N, ROWS
  choice, _ = na.noisy_argmax(np.zeros((rows, n)), mechanism=mechanism,
                              sensitivity=VOTES, key=jax.random.key(3),
                              **PARAMS[mechanism])
  assert _chi2_pvalue(choice, n) > 1e-3
  # Ordered top-2 pairs are uniform too (Laplace: peeling with fresh noise).
  top, _ = na.noisy_top_k(np.zeros((rows, n)), 2, mechanism=mechanism,
                          sensitivity=VOTES, key=jax.random.key(4), **PARAMS[mechanism])
  top = np.asarray(top)
  assert (top[:, 0] != top[:, 1]).all()
  pair_ids = {p: i for i, p in enumerate(itertools.permutations(range(n), 2))}
  pairs = [pair_ids[tuple(row)] for row in top.tolist()]
  assert _chi2_pvalue(pairs, len(pair_ids)) > 1e-3
  # The same test catches a noiseless argmax (first index wins ties) and a
  # chooser that prefers the first index 3% of the time.
  assert _chi2_pvalue(np.argmax(np.zeros((rows, n)), -1), n) < 1e-6
  biased = np.where(np.random.default_rng(0).random(rows) < 0.03, 0, np.asarray(choice))
  assert _chi2_pvalue(biased, n) < 1e-6


def _peeling_probs(scores, scale):
  # Exponential-mechanism peeling: P(i then j) = w_i / Z * w_j / (Z - w_i).
  w = np.exp((scores - scores.max()) / scale)
  z = w.sum()
  return {(i, j): w[i] / z * w[j] / (z - w[i])
          for i, j in itertools.permutations(range(len(scores)), 2)}


def test_one_shot_gumbel_top_k_has_the_law_of_peeling_and_rejects_wrong_scales():
  scores = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
  epsilon, linf, rows = 1.0, 1.0, ROWS
  sens = na.Sensitivity(linf=linf)
  exact = _peeling_probs(scores, 2 * linf / epsilon)  # scale 2 * Delta / epsilon
  cells = list(exact)
  ids = {pair: i for i, pair in enumerate(cells)}
  for factor, accept in ((1.0, True), (2 / 3, False), (3 / 2, False)):
    # epsilon * factor gives noise scale / factor.
    top, cost = na.noisy_top_k(np.tile(scores, (rows, 1)), 2, mechanism="gumbel",
                               epsilon=epsilon * factor, sensitivity=sens,
                               key=jax.random.key(5))
    pvalue = _chi2_pvalue([ids[tuple(r)] for r in np.asarray(top).tolist()],
                          len(cells), [exact[c] for c in cells])
    assert (pvalue > 1e-3) if accept else (pvalue < 1e-6), (factor, pvalue)
  # Monotone scores: half the scale, i.e. exp(epsilon * u / Delta).
  exact = _peeling_probs(scores, linf / epsilon)
  top, _ = na.noisy_top_k(np.tile(scores, (rows, 1)), 2, mechanism="gumbel",
                          epsilon=epsilon, sensitivity=sens, monotonic=True,
                          key=jax.random.key(6))
  pvalue = _chi2_pvalue([ids[tuple(r)] for r in np.asarray(top).tolist()],
                        len(cells), [exact[c] for c in cells])
  assert pvalue > 1e-3


# ----------------------------------------------------------------------------
# Noise scales.
# ----------------------------------------------------------------------------

SCALE_CASES = [
    # mechanism, params, monotonic, expected scale, scipy distribution
    ("gumbel", {"epsilon": 0.7}, False, 2 * 1.3 / 0.7, stats.gumbel_r),
    ("gumbel", {"epsilon": 0.7}, True, 1.3 / 0.7, stats.gumbel_r),
    ("laplace", {"epsilon": 0.7}, False, 2 * 1.3 / 0.7, stats.laplace),
    ("laplace", {"epsilon": 0.7}, True, 1.3 / 0.7, stats.laplace),
    ("gnmax", {"sigma": 2.5}, False, 2.5, stats.norm),
]
SENS = na.Sensitivity(linf=1.3, l2=1.9)


@pytest.mark.parametrize("mechanism,params,monotonic,scale,dist", SCALE_CASES)
def test_ks_accepts_the_noise_scale_and_rejects_two_thirds_and_three_halves(
    mechanism, params, monotonic, scale, dist):
  used = na._scale(mechanism, params.get("epsilon"), params.get("sigma"), SENS, monotonic)
  noise = np.asarray(na._perturb(jnp.zeros(40_000), mechanism=mechanism, scale=used,
                                 key=jax.random.key(7)))
  assert stats.kstest(noise, dist(scale=scale).cdf).pvalue > 0.01
  for wrong in (2 / 3, 3 / 2):
    assert stats.kstest(noise, dist(scale=scale * wrong).cdf).pvalue < 1e-6


@pytest.mark.parametrize("mechanism", na.MECHANISMS)
def test_argmax_is_the_argmax_of_the_tested_perturbation(mechanism):
  scores = jax.random.normal(jax.random.key(8), (ROWS, N))
  key = jax.random.key(9)
  choice, _ = na.noisy_argmax(scores, mechanism=mechanism, sensitivity=SENS, key=key,
                              **PARAMS[mechanism])
  scale = na._scale(mechanism, PARAMS[mechanism].get("epsilon"),
                    PARAMS[mechanism].get("sigma"), SENS, False)
  # Laplace peels with one split key per round; round 1 uses the first.
  used_key = jax.random.split(key, 1)[0] if mechanism == "laplace" else key
  noisy = na._perturb(scores, mechanism=mechanism, scale=scale, key=used_key)
  np.testing.assert_array_equal(choice, jnp.argmax(noisy, -1))


def _two_item_prob(mechanism, d, b):
  # P(item 1 beats item 0) when it leads by d, noise scale b on both.
  if mechanism == "gumbel":
    return 1 / (1 + math.exp(-d / b))
  if mechanism == "laplace":  # the difference of two Laplace(b) variables
    return 1 - 0.5 * math.exp(-d / b) * (1 + d / (2 * b))
  return stats.norm.cdf(d / (b * math.sqrt(2)))


@pytest.mark.parametrize("mechanism", na.MECHANISMS)
def test_public_api_calibration_rejects_wrong_scales(mechanism):
  rows, d = ROWS, 2.0
  scale = {"gumbel": 2.0, "laplace": 2.0, "gnmax": 1.0}[mechanism]
  # Items 2.. are so far behind that they never win (P < exp(-1000)).
  scores = np.tile([0.0, d] + [-1e4] * (N - 2), (rows, 1))
  choice, _ = na.noisy_argmax(scores, mechanism=mechanism, sensitivity=VOTES,
                              key=jax.random.key(10), **PARAMS[mechanism])
  wins = int(np.asarray(choice).sum())
  assert stats.binomtest(wins, rows, _two_item_prob(mechanism, d, scale)).pvalue > 1e-3
  for wrong in (2 / 3, 3 / 2):
    p = _two_item_prob(mechanism, d, scale * wrong)
    assert stats.binomtest(wins, rows, p).pvalue < 1e-6


# ----------------------------------------------------------------------------
# Costs.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [1.5, 2.0, 8.0, 32.0])
def test_gnmax_rdp_is_alpha_over_sigma_squared_for_vote_histograms(alpha):
  sigma = 3.0
  _, sens = na.vote_histogram(np.array([0, 1, 2, 2]), num_classes=N)
  _, cost = na.noisy_argmax(np.zeros(N), mechanism="gnmax", sigma=sigma,
                            sensitivity=sens, key=jax.random.key(0))
  assert cost == dp_accounting.GaussianDpEvent(sigma / math.sqrt(2))
  want = dp_accounting.rdp.compute_epsilon([alpha], [alpha / sigma**2], DELTA)[0]
  assert _eps(cost, [alpha]) == pytest.approx(want, rel=1e-9)
  # Not alpha / (2 sigma^2), which is what sensitivity 1 would give.
  wrong = dp_accounting.rdp.compute_epsilon([alpha], [alpha / (2 * sigma**2)], DELTA)[0]
  assert _eps(cost, [alpha]) > wrong * (1 + 1e-3)
  # Top-k votes: l2 = sqrt(2k), so alpha * k / sigma^2; top-k answers cost the same.
  _, sens3 = na.vote_histogram(np.array([[0, 1, 2], [3, 4, 5]]), num_classes=8)
  cost3 = na.cost_of("gnmax", sigma=sigma, sensitivity=sens3, k=4)
  want3 = dp_accounting.rdp.compute_epsilon([alpha], [3 * alpha / sigma**2], DELTA)[0]
  assert _eps(cost3, [alpha]) == pytest.approx(want3, rel=1e-9)


def test_zcdp_events_compose_like_the_session_total():
  rho, k = 0.03, 7
  assert _eps(dp_accounting.SelfComposedDpEvent(dp_accounting.ZCDpEvent(rho), k)) == (
      pytest.approx(_eps(dp_accounting.ZCDpEvent(k * rho)), rel=1e-12))
  # One-shot Gumbel top-k = k exponential mechanisms; laplace peeling likewise.
  for mechanism in ("gumbel", "laplace"):
    single = na.cost_of(mechanism, epsilon=0.4, sensitivity=VOTES)
    top_k = na.cost_of(mechanism, epsilon=0.4, sensitivity=VOTES, k=k)
    assert _eps(top_k) == pytest.approx(_eps(dp_accounting.ComposedDpEvent([single] * k)),
                                        rel=1e-12)
  assert na.cost_of("gumbel", epsilon=0.4, sensitivity=VOTES).rho == pytest.approx(0.4**2 / 8)
  assert na.cost_of("laplace", epsilon=0.4, sensitivity=VOTES).rho == pytest.approx(0.4**2 / 2)
  # A batch of B rows costs B single queries.
  _, batch_cost = na.noisy_argmax(np.zeros((4, ROWS // 4, N)), mechanism="gnmax",
                                  sigma=2.0, sensitivity=VOTES, key=jax.random.key(0))
  single = dp_accounting.GaussianDpEvent(2.0 / math.sqrt(2))
  assert batch_cost == dp_accounting.SelfComposedDpEvent(single, ROWS)


def test_q_session_queries_equal_the_composed_event():
  q, sigma, epsilon = 9, 20.0, 0.3
  session = session_lib.QuerySession(epsilon_budget=100.0, delta=DELTA, key=jax.random.key(0))
  counts, sens = na.vote_histogram(np.array([0, 1, 1, 2, 1]), num_classes=N)
  for _ in range(q):
    session.argmax(counts, mechanism="gnmax", sigma=sigma, sensitivity=sens)
  gaussian = dp_accounting.GaussianDpEvent(sigma / math.sqrt(2))
  assert session.epsilon == pytest.approx(
      _eps(dp_accounting.SelfComposedDpEvent(gaussian, q)), rel=1e-12)
  for _ in range(q):
    session.top_k(counts, 2, mechanism="gumbel", epsilon=epsilon, sensitivity=sens)
  total = dp_accounting.ComposedDpEvent(
      [dp_accounting.SelfComposedDpEvent(gaussian, q),
       dp_accounting.ZCDpEvent(q * 2 * epsilon**2 / 8)])
  assert session.epsilon == pytest.approx(_eps(total), rel=1e-12)
  assert len(session.answers) == 2 * q


# ----------------------------------------------------------------------------
# Sessions.
# ----------------------------------------------------------------------------


def test_session_refuses_past_budget_before_drawing_and_keeps_answers(monkeypatch):
  counts, sens = na.vote_histogram(np.array([0, 1, 1, 2, 1]), num_classes=N)
  sigma = 4.0
  one = dp_accounting.GaussianDpEvent(sigma / math.sqrt(2))
  budget = (_eps(dp_accounting.SelfComposedDpEvent(one, 3))
            + _eps(dp_accounting.SelfComposedDpEvent(one, 4))) / 2
  session = session_lib.QuerySession(epsilon_budget=budget, delta=DELTA, key=jax.random.key(0))
  answers = [session.argmax(np.zeros(N), mechanism="gnmax", sigma=sigma,
                            sensitivity=sens) for _ in range(3)]
  keys = [jax.random.key_data(session._key_for(i)).tolist() for i in range(3)]
  assert not session.can_afford(one)
  spent = session.epsilon

  def no_noise(*args, **kwargs):
    raise AssertionError("noise was drawn for a refused query")

  monkeypatch.setattr(na, "_noise", no_noise)
  with pytest.raises(budget_lib.BudgetExceededError, match="budget"):
    session.argmax(counts, mechanism="gnmax", sigma=sigma, sensitivity=sens)
  with pytest.raises(RuntimeError):  # a subclass of RuntimeError
    session.confident_argmax(counts, threshold=1e9, sigma_threshold=100.0, sigma=sigma,
                             sensitivity=sens)
  monkeypatch.undo()
  assert session.epsilon == spent and len(session.answers) == 3
  for kept, answer in zip(answers, session.answers):
    np.testing.assert_array_equal(kept, answer.value[..., 0])
  # A fresh key per answered query.
  assert len({str(k) for k in keys}) == 3
  # A cheaper query still fits.
  session.argmax(counts, mechanism="gnmax", sigma=100 * sigma, sensitivity=sens)
  assert len(session.answers) == 4 and session.epsilon <= budget


def test_pure_session_adds_epsilons_and_refuses_gnmax():
  session = session_lib.QuerySession(epsilon_budget=1.0, key=jax.random.key(0), accounting="pure")
  counts, sens = na.vote_histogram(np.array([0, 1, 1]), num_classes=N)
  session.argmax(counts, mechanism="laplace", epsilon=0.5, sensitivity=sens)
  session.argmax(counts, mechanism="gumbel", epsilon=0.5, sensitivity=sens)
  assert session.epsilon == 1.0
  with pytest.raises(budget_lib.BudgetExceededError):
    session.argmax(counts, mechanism="laplace", epsilon=1e-3, sensitivity=sens)
  with pytest.raises(ValueError, match="pure-DP"):
    session.argmax(counts, mechanism="gnmax", sigma=10.0, sensitivity=sens)
  assert len(session.answers) == 2


# ----------------------------------------------------------------------------
# Confident GNMax.
# ----------------------------------------------------------------------------


def test_confident_gnmax_charges_every_threshold_check():
  sigma1, sigma2, q = 6.0, 3.0, 5
  counts, sens = na.vote_histogram(np.array([2] * 30 + [1] * 5), num_classes=N)
  check = dp_accounting.GaussianDpEvent(sigma1 / 1.0)  # the max moves by <= linf = 1
  answer = dp_accounting.GaussianDpEvent(sigma2 / math.sqrt(2))
  never = session_lib.QuerySession(epsilon_budget=100.0, delta=DELTA, key=jax.random.key(0))
  for _ in range(q):
    answered, choice = never.confident_argmax(counts, threshold=1e9, sigma_threshold=sigma1,
                                              sigma=sigma2, sensitivity=sens)
    assert not answered and choice == -1
  assert never.epsilon == pytest.approx(
      _eps(dp_accounting.SelfComposedDpEvent(check, q)), rel=1e-12)
  always = session_lib.QuerySession(epsilon_budget=100.0, delta=DELTA, key=jax.random.key(1))
  for _ in range(q):
    answered, choice = always.confident_argmax(counts, threshold=-1e9,
                                               sigma_threshold=sigma1, sigma=sigma2,
                                               sensitivity=sens)
    assert answered and choice == 2
  both = dp_accounting.ComposedDpEvent([dp_accounting.SelfComposedDpEvent(check, q),
                                        dp_accounting.SelfComposedDpEvent(answer, q)])
  assert always.epsilon == pytest.approx(_eps(both), rel=1e-12)
  assert always.epsilon > never.epsilon


def test_confident_gnmax_answers_at_the_rate_of_its_threshold_noise():
  rows, sigma1, threshold = ROWS, 4.0, 32.0
  counts, sens = na.vote_histogram(np.array([2] * 30 + [1] * 5), num_classes=N)  # max 30
  answered, choice, cost = na.confident_gnmax(
      np.tile(counts, (rows, 1)), threshold=threshold, sigma_threshold=sigma1, sigma=1.0,
      sensitivity=sens, key=jax.random.key(11))
  answered, choice = np.asarray(answered), np.asarray(choice)
  np.testing.assert_array_equal(choice == -1, ~answered)
  assert (choice[answered] == 2).all()
  n = int(answered.sum())
  assert cost == na.confident_cost_of(sigma_threshold=sigma1, sigma=1.0, sensitivity=sens,
                                      num_queries=rows, num_answered=n)
  def rate(s):
    return stats.norm.sf((threshold - 30) / s)
  assert stats.binomtest(n, rows, rate(sigma1)).pvalue > 1e-3
  for wrong in (2 / 3, 3 / 2):
    assert stats.binomtest(n, rows, rate(sigma1 * wrong)).pvalue < 1e-6


def test_session_checks_confident_gnmax_for_the_worst_case():
  counts, sens = na.vote_histogram(np.array([0, 1, 1]), num_classes=N)
  check_only = _eps(dp_accounting.GaussianDpEvent(5.0))
  session = session_lib.QuerySession(epsilon_budget=check_only * 1.01, delta=DELTA,
                            key=jax.random.key(0))
  # Even a query that would surely abstain could have answered: refused.
  with pytest.raises(budget_lib.BudgetExceededError):
    session.confident_argmax(counts, threshold=1e9, sigma_threshold=5.0, sigma=5.0,
                             sensitivity=sens)
  assert session.answers == []


# ----------------------------------------------------------------------------
# Vote histograms.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes,k", [(5, 1), (5, 2), (4, 3), (6, 3), (3, 3)])
def test_vote_histogram_sensitivity_is_the_brute_force_worst_case(num_classes, k):
  rng = np.random.default_rng(num_classes * 10 + k)
  votes = np.stack([rng.choice(num_classes, k, replace=False) for _ in range(4)])
  counts, sens = na.vote_histogram(votes if k > 1 else votes[:, 0], num_classes)
  np.testing.assert_array_equal(counts, np.bincount(votes.ravel(), minlength=num_classes))
  norms = []
  for teacher in range(len(votes)):
    for new in itertools.combinations(range(num_classes), k):
      changed = votes.copy()
      changed[teacher] = new
      diff = np.bincount(changed.ravel(), minlength=num_classes) - np.asarray(counts)
      norms.append((np.abs(diff).sum(), np.sqrt((diff**2).sum()), np.abs(diff).max()))
  l1, l2, linf = np.max(norms, axis=0)
  assert (sens.l1, sens.linf) == (l1, linf)
  assert sens.l2 == pytest.approx(l2, rel=1e-12)


def test_vote_histogram_and_mechanisms_name_bad_values():
  with pytest.raises(ValueError, match=r"votes\[1\]=\[1, 1\] repeats"):
    na.vote_histogram(np.array([[0, 1], [1, 1]]), num_classes=3)
  with pytest.raises(ValueError, match=r"votes\[0\]=3"):
    na.vote_histogram(np.array([3, 0]), num_classes=3)
  with pytest.raises(ValueError, match="sigma=None"):
    na.noisy_argmax(np.zeros(3), mechanism="gnmax", sensitivity=VOTES,
                    key=jax.random.key(0))
  with pytest.raises(ValueError, match="epsilon=1.0 is not used"):
    na.noisy_argmax(np.zeros(3), mechanism="gnmax", epsilon=1.0, sigma=1.0,
                    sensitivity=VOTES, key=jax.random.key(0))
  with pytest.raises(ValueError, match="must be a Sensitivity"):
    na.noisy_argmax(np.zeros(3), mechanism="gumbel", epsilon=1.0, sensitivity=1.0,
                    key=jax.random.key(0))
  with pytest.raises(ValueError, match="sensitivity.l2=None"):
    na.noisy_argmax(np.zeros(3), mechanism="gnmax", sigma=1.0,
                    sensitivity=na.Sensitivity(linf=1.0), key=jax.random.key(0))
  with pytest.raises(ValueError, match="finite"):
    na.noisy_argmax(np.array([0.0, np.inf]), mechanism="gumbel", epsilon=1.0,
                    sensitivity=VOTES, key=jax.random.key(0))
  with pytest.raises(ValueError, match="k=4 exceeds"):
    na.noisy_top_k(np.zeros(3), 4, mechanism="gumbel", epsilon=1.0, sensitivity=VOTES,
                   key=jax.random.key(0))
