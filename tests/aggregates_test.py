"""Tests for privjax.answers.aggregates: samplers, calibration, sensitivities, budget."""

import fractions
import math
import random

import dp_accounting
import numpy as np
import pytest
from scipy import stats

from privjax.answers import budget as budget_lib
from privjax.answers import mechanisms
from privjax.answers import aggregates

# =============================================================================
# Float noise: KS accepts the right scale and rejects 2/3x and 3/2x.
# =============================================================================


def _noise_from_empty_histogram(mechanism, *, m, epsilon, delta, seed, n=5000):
  # With no data every true bin count is 0, so the released histogram IS the
  # noise, drawn through the public query path.
  empty = np.array([], dtype=np.int64)
  noisy, event = aggregates.histogram(
      empty, empty, num_bins=n, max_contributions_per_user=m, epsilon=epsilon,
      delta=delta, mechanism=mechanism, rng=seed)
  return noisy, event


def test_float_laplace_ks_accepts_right_scale_rejects_wrong():
  noise, event = _noise_from_empty_histogram("laplace", m=3, epsilon=0.7,
                                             delta=None, seed=1)
  scale = 3 / 0.7
  assert event == dp_accounting.LaplaceDpEvent(scale / 3)
  assert stats.kstest(noise, "laplace", args=(0, scale)).pvalue > 0.01
  for wrong in (scale * 2 / 3, scale * 3 / 2):
    assert stats.kstest(noise, "laplace", args=(0, wrong)).pvalue < 1e-6


def test_float_gaussian_ks_accepts_right_sigma_rejects_wrong():
  noise, event = _noise_from_empty_histogram("gaussian", m=3, epsilon=1.0,
                                             delta=1e-5, seed=2)
  sigma = mechanisms.gaussian_sigma(sensitivity=math.sqrt(3), epsilon=1.0,
                                    delta=1e-5)
  assert event.noise_multiplier == pytest.approx(sigma / math.sqrt(3), rel=1e-12)
  assert stats.kstest(noise, "norm", args=(0, sigma)).pvalue > 0.01
  for wrong in (sigma * 2 / 3, sigma * 3 / 2):
    assert stats.kstest(noise, "norm", args=(0, wrong)).pvalue < 1e-6


# =============================================================================
# Exact samplers: chi-square against the pmf, and against wrong pmfs.
# =============================================================================


def _chi_square_pvalue(samples, pmf_fn, cut):
  support = np.arange(-cut, cut + 1)
  pmf = pmf_fn(support)
  tail = (1.0 - pmf.sum()) / 2  # both pmfs are symmetric
  observed = np.r_[(samples < -cut).sum(),
                   [(samples == v).sum() for v in support],
                   (samples > cut).sum()]
  expected = np.r_[tail, pmf, tail] * len(samples)
  return stats.chisquare(observed, expected).pvalue


def _discrete_laplace_pmf(scale):
  return lambda x: math.tanh(1 / (2 * scale)) * np.exp(-np.abs(x) / scale)


def _discrete_gaussian_pmf(sigma2):
  grid = np.arange(-10_000, 10_001)
  norm = np.exp(-grid.astype(float)**2 / (2 * sigma2)).sum()
  return lambda x: np.exp(-x.astype(float)**2 / (2 * sigma2)) / norm


def test_bernoulli_exp_matches_exp_minus_gamma():
  rng = random.Random(3)
  n = 20_000
  for num, den in ((1, 2), (7, 3), (0, 1)):
    hits = sum(mechanisms._bernoulli_exp(num, den, rng) for _ in range(n))
    p = math.exp(-num / den)
    if p == 1:
      assert hits == n
    else:
      assert stats.binomtest(hits, n, p).pvalue > 0.001
      for wrong_gamma in (num / den * 0.8, num / den * 1.25):
        assert stats.binomtest(hits, n, math.exp(-wrong_gamma)).pvalue < 1e-6


def test_discrete_laplace_chi_square_against_pmf():
  scale = fractions.Fraction(3, 2)
  samples = mechanisms.sample_n(mechanisms.sample_discrete_laplace, scale,
                                20_000, random.Random(4))
  assert samples.dtype == np.int64
  assert _chi_square_pvalue(samples, _discrete_laplace_pmf(1.5), cut=8) > 0.001
  for wrong in (1.5 * 2 / 3, 1.5 * 3 / 2):
    assert _chi_square_pvalue(samples, _discrete_laplace_pmf(wrong), cut=8) < 1e-6


def test_discrete_laplace_with_non_integer_denominator_scale():
  # scale = 7/3: exercises the floor(X / s) step with s > 1.
  samples = mechanisms.sample_n(mechanisms.sample_discrete_laplace,
                                fractions.Fraction(7, 3), 20_000, random.Random(5))
  assert _chi_square_pvalue(samples, _discrete_laplace_pmf(7 / 3), cut=10) > 0.001
  assert _chi_square_pvalue(samples, _discrete_laplace_pmf(7 / 3 * 1.5),
                            cut=10) < 1e-6


def test_discrete_gaussian_chi_square_against_pmf():
  sigma2 = fractions.Fraction(11, 2)
  samples = mechanisms.sample_n(mechanisms.sample_discrete_gaussian, sigma2,
                                20_000, random.Random(6))
  assert _chi_square_pvalue(samples, _discrete_gaussian_pmf(5.5), cut=8) > 0.001
  for wrong in (5.5 * 2 / 3, 5.5 * 3 / 2):
    assert _chi_square_pvalue(samples, _discrete_gaussian_pmf(wrong), cut=8) < 1e-6


def test_discrete_samplers_default_to_a_secure_source_and_return_ints():
  assert isinstance(mechanisms.noise_rng("discrete_gaussian", None),
                    random.SystemRandom)
  assert isinstance(mechanisms.sample_discrete_gaussian(fractions.Fraction(2)), int)
  with pytest.raises(TypeError, match="random.Random"):
    mechanisms.noise_rng("discrete_laplace", np.random.default_rng(0))
  with pytest.raises(ValueError, match="scale"):
    mechanisms.sample_discrete_laplace(0)


# =============================================================================
# Gaussian calibration
# =============================================================================


@pytest.mark.parametrize("epsilon,delta", [(0.1, 1e-5), (0.5, 1e-6), (1.0, 1e-5),
                                           (4.0, 1e-6), (10.0, 1e-9)])
def test_analytic_gaussian_matches_dp_accounting(epsilon, delta):
  sensitivity = 2.0
  sigma = mechanisms.gaussian_sigma(sensitivity=sensitivity, epsilon=epsilon,
                                    delta=delta)
  reference = dp_accounting.get_sigma_gaussian(epsilon, delta) * sensitivity
  assert sigma == pytest.approx(reference, rel=1e-6)
  # Private at the returned sigma, and (to 1e-9) not at anything smaller.
  assert mechanisms.gaussian_delta(sigma=sigma, sensitivity=sensitivity,
                                   epsilon=epsilon) <= delta
  assert mechanisms.gaussian_delta(sigma=sigma * (1 - 1e-9),
                                   sensitivity=sensitivity, epsilon=epsilon) > delta
  # The exact delta agrees with dp_accounting's epsilon for this sigma.
  assert dp_accounting.get_epsilon_gaussian(sigma / sensitivity, delta) == \
      pytest.approx(epsilon, rel=1e-6)


@pytest.mark.parametrize("epsilon,delta", [(0.1, 1e-5), (0.5, 1e-6), (0.9, 1e-3)])
def test_analytic_sigma_below_classic(epsilon, delta):
  analytic = mechanisms.gaussian_sigma(sensitivity=1.0, epsilon=epsilon,
                                       delta=delta)
  classic = mechanisms.gaussian_sigma(sensitivity=1.0, epsilon=epsilon,
                                      delta=delta, calibration="classic")
  assert classic == pytest.approx(math.sqrt(2 * math.log(1.25 / delta)) / epsilon)
  assert analytic < classic
  # The classic sigma is private too (it is a valid, looser calibration).
  assert mechanisms.gaussian_delta(sigma=classic, sensitivity=1.0,
                                   epsilon=epsilon) <= delta


def test_classic_gaussian_refuses_epsilon_at_least_one():
  with pytest.raises(ValueError, match="epsilon=1.5"):
    mechanisms.gaussian_sigma(sensitivity=1.0, epsilon=1.5, delta=1e-5,
                              calibration="classic")
  with pytest.raises(ValueError, match="delta=0"):
    mechanisms.calibrate("gaussian", l1_sensitivity=1, l2_sensitivity=1,
                         epsilon=1.0, delta=0.0)


def test_discrete_gaussian_is_accounted_through_zcdp():
  noise = mechanisms.calibrate("discrete_gaussian", l1_sensitivity=4,
                               l2_sensitivity=2.0, epsilon=1.0, delta=1e-6)
  assert isinstance(noise.event, dp_accounting.ZCDpEvent)
  assert noise.event.rho == pytest.approx(2.0**2 / (2 * float(noise.param)))
  accountant = dp_accounting.rdp.RdpAccountant()
  accountant.compose(noise.event)
  eps = accountant.get_epsilon(1e-6)
  # Within the request, and the sigma is not wastefully large.
  assert 1.0 * (1 - 1e-6) <= eps <= 1.0
  assert noise.epsilon == pytest.approx(eps)


# =============================================================================
# Sensitivity from the bounds
# =============================================================================


def test_events_carry_sensitivities_computed_from_bounds():
  user = np.array([0, 0, 0, 0, 1])
  bins = np.array([0, 1, 2, 3, 0])
  _, event = aggregates.histogram(user, bins, num_bins=4,
                                  max_contributions_per_user=3, epsilon=0.5, rng=0)
  assert event.sensitivity == 3  # L1 = cap
  assert event.noise_parameter == pytest.approx(0.5 / 3)
  _, event = aggregates.histogram(user, bins, num_bins=4,
                                  max_contributions_per_user=3, epsilon=0.5,
                                  mechanism="laplace", rng=0)
  assert event.noise_multiplier == pytest.approx((3 / 0.5) / 3)
  _, event = aggregates.histogram(user, bins, num_bins=4,
                                  max_contributions_per_user=3, epsilon=0.5,
                                  delta=1e-5, mechanism="gaussian", rng=0)
  sigma = mechanisms.gaussian_sigma(sensitivity=math.sqrt(3), epsilon=0.5,
                                    delta=1e-5)
  assert event.noise_multiplier == pytest.approx(sigma / math.sqrt(3))  # L2 = sqrt(cap)
  _, event = aggregates.count(user, max_contributions_per_user=4, epsilon=1.0, rng=0)
  assert event.sensitivity == 4
  _, event = aggregates.bounded_sum(user, np.ones(5), lo=-2, hi=5,
                                    max_contributions_per_user=2, epsilon=1.0,
                                    rng=0)
  assert event.sensitivity == 10  # m * max(|lo|, |hi|)


def _random_interactions(seed, num_users=30, max_rows=12, num_bins=15):
  rng = np.random.default_rng(seed)
  rows = rng.integers(1, max_rows, size=num_users)
  user = np.repeat(rng.permutation(10_000)[:num_users], rows)
  bins = rng.integers(0, num_bins, size=len(user))
  return user, bins, num_bins


@pytest.mark.parametrize("m", [1, 3])
def test_removing_a_user_changes_only_that_users_bounded_contribution(m):
  user, bins, num_bins = _random_interactions(7)
  full = aggregates._bounded_histogram(user, bins, num_bins, m, seed=11)
  full_rows = aggregates._bounded_rows(user, m, seed=11).sum()
  for u in np.unique(user):
    mine = user == u
    without = aggregates._bounded_histogram(user[~mine], bins[~mine], num_bins,
                                            m, seed=11)
    diff = full - without
    # Each bin moves by 0 or 1, and exactly min(m, distinct bins of u) move:
    # L1 <= m and L2 <= sqrt(m), and nobody else's contribution changed.
    assert set(np.unique(diff)) <= {0, 1}
    assert diff.sum() == min(m, len(np.unique(bins[mine])))
    assert set(np.flatnonzero(diff)) <= set(bins[mine])
    rows_without = aggregates._bounded_rows(user[~mine], m, seed=11).sum()
    assert full_rows - rows_without == min(m, mine.sum())


def test_bounding_is_independent_of_row_order_across_users():
  user, bins, num_bins = _random_interactions(8)
  order = np.random.default_rng(0).permutation(len(user))
  a = aggregates._bounded_histogram(user, bins, num_bins, 2, seed=3)
  b = aggregates._bounded_histogram(user[order], bins[order], num_bins, 2, seed=3)
  np.testing.assert_array_equal(a, b)
  strings = np.array([f"user-{u}" for u in user])
  assert aggregates._bounded_histogram(strings, bins, num_bins, 2, 3).sum() == a.sum()


# =============================================================================
# Queries
# =============================================================================


def test_bounding_key_is_secret_by_default():
  # Without a seed, which bins a capped user keeps is unpredictable: two
  # calls keep different subsets (a public default key would keep the same).
  user, item, num_items = _random_interactions(9)
  runs = {tuple(aggregates._bounded_histogram(user, item, num_items, 1, None))
          for _ in range(4)}
  assert len(runs) > 1
  fixed = {tuple(aggregates._bounded_histogram(user, item, num_items, 1, 5))
           for _ in range(4)}
  assert len(fixed) == 1


def test_popularity_and_recommendation_with_negligible_noise():
  user, item, num_items = _random_interactions(9)
  counts, event = aggregates.dp_item_popularity(
      user, item, num_items=num_items, max_items_per_user=3, epsilon=1e5,
      mechanism="laplace", rng=0, seed=0)
  exact = aggregates._bounded_histogram(user, item, num_items, 3, seed=0)
  np.testing.assert_allclose(counts, exact, atol=0.01)
  assert event == dp_accounting.LaplaceDpEvent(1e-5)
  seen = [int(np.argmax(exact))]
  top = aggregates.recommend_popular(counts, 4, seen=seen)
  assert seen[0] not in top and len(top) == 4
  remaining = np.delete(np.arange(num_items), seen)
  expected = remaining[np.argsort(-exact[remaining], kind="stable")][:4]
  np.testing.assert_array_equal(np.sort(exact[top]), np.sort(exact[expected]))


def test_discrete_queries_give_integers_and_reject_real_values():
  user, item, num_items = _random_interactions(10)
  counts, _ = aggregates.histogram(user, item, num_bins=num_items,
                                   max_contributions_per_user=2, epsilon=1.0,
                                   delta=1e-6, rng=0)  # discrete Gaussian
  np.testing.assert_array_equal(counts, np.round(counts))
  with pytest.raises(ValueError, match="integer values"):
    aggregates.bounded_sum(user, np.full(len(user), 0.5), lo=0, hi=1,
                           max_contributions_per_user=1, epsilon=1.0)
  with pytest.raises(ValueError, match="num_bins=15"):
    aggregates.histogram(user, item + 1, num_bins=num_items,
                         max_contributions_per_user=1, epsilon=1.0)


@pytest.mark.parametrize("mechanism,delta", [("discrete_laplace", None),
                                             ("laplace", None),
                                             ("gaussian", 1e-6)])
def test_bounded_mean_is_close_on_large_data(mechanism, delta):
  rng = np.random.default_rng(12)
  user = np.repeat(np.arange(3000), 2)
  values = rng.integers(1, 6, size=len(user))
  mean, event = aggregates.bounded_mean(
      user, values, lo=1, hi=5, max_contributions_per_user=2, epsilon=1.0,
      delta=delta, mechanism=mechanism, rng=1)
  assert isinstance(event, dp_accounting.ComposedDpEvent)
  assert len(event.events) == 2
  assert abs(mean - values.mean()) < 0.05


# =============================================================================
# Budget
# =============================================================================


def test_query_past_the_budget_is_refused_and_earlier_answers_remain():
  user, item, num_items = _random_interactions(13)
  budget = budget_lib.PrivacyBudget(epsilon=1.0)
  session = budget_lib.Session(budget)
  rng = random.Random(0)
  first = session.run_query(aggregates.histogram, name="h1", user=user,
                            bins=item, num_bins=num_items,
                            max_contributions_per_user=2, epsilon=0.6, rng=rng)
  state, spent, ledger = rng.getstate(), budget.spent_epsilon, budget.ledger
  with pytest.raises(budget_lib.BudgetExceededError, match="'h2'"):
    session.run_query(aggregates.histogram, name="h2", user=user, bins=item,
                      num_bins=num_items, max_contributions_per_user=2,
                      epsilon=0.6, rng=rng)
  assert rng.getstate() == state  # no noise was drawn for the refused query
  assert budget.spent_epsilon == spent == pytest.approx(0.6)
  assert budget.ledger == ledger
  assert [a.name for a in session.answers] == ["h1"]
  np.testing.assert_array_equal(session.answers[0].value, first)
  assert isinstance(budget_lib.BudgetExceededError("x"), RuntimeError)
  # What is left can still be spent, exactly up to the limit.
  session.run_query(aggregates.count, name="c", user=user,
                    max_contributions_per_user=1, epsilon=0.4, rng=rng)
  assert budget.spent_epsilon == pytest.approx(1.0)
  assert [q.name for q in budget.queries] == ["h1", "c"]


def test_pure_budget_refuses_gaussian_noise():
  budget = budget_lib.PrivacyBudget(epsilon=10.0)
  with pytest.raises(budget_lib.BudgetExceededError):
    aggregates.count(np.arange(5), max_contributions_per_user=1, epsilon=0.1,
                     delta=1e-6, budget=budget)
  assert budget.queries == ()


def test_pure_budget_composes_discrete_laplace_exactly():
  budget = budget_lib.PrivacyBudget(epsilon=1.0)
  for _ in range(4):
    aggregates.count(np.arange(5), max_contributions_per_user=1, epsilon=0.25,
                     budget=budget, rng=0)
  assert budget.spent_epsilon == 1.0
  with pytest.raises(budget_lib.BudgetExceededError):
    aggregates.count(np.arange(5), max_contributions_per_user=1, epsilon=1e-3,
                     budget=budget, rng=0)


def test_k_gaussian_queries_compose_like_dp_accounting():
  k, delta = 6, 1e-6
  user, item, num_items = _random_interactions(14)
  budget = budget_lib.PrivacyBudget(epsilon=5.0, delta=delta)
  for i in range(k):
    _, event = aggregates.histogram(user, item, num_bins=num_items,
                                    max_contributions_per_user=3, epsilon=0.5,
                                    delta=1e-7, mechanism="gaussian", rng=i,
                                    budget=budget)
  reference = dp_accounting.rdp.RdpAccountant()
  reference.compose(dp_accounting.SelfComposedDpEvent(event, k))
  assert budget.accountant_epsilon == pytest.approx(
      reference.get_epsilon(delta), rel=1e-9)
  assert budget.basic_epsilon == pytest.approx(k * 0.5)
  assert budget.spent_epsilon == min(budget.basic_epsilon, budget.accountant_epsilon)
  assert budget.spent_epsilon < k * 0.5  # RDP beats basic composition here


def test_k_laplace_queries_compose_like_pld():
  k, delta = 5, 1e-5
  budget = budget_lib.PrivacyBudget(epsilon=3.0, delta=delta, accountant="pld")
  for i in range(k):
    _, event = aggregates.count(np.arange(50), max_contributions_per_user=1,
                                epsilon=0.5, mechanism="laplace", rng=i,
                                budget=budget)
  reference = dp_accounting.pld.PLDAccountant()
  reference.compose(dp_accounting.ComposedDpEvent([event] * k))
  assert budget.accountant_epsilon == pytest.approx(
      reference.get_epsilon(delta), rel=1e-9)
  assert budget.spent_epsilon <= k * 0.5


def test_pld_budget_cannot_account_discrete_gaussian_by_accountant():
  budget = budget_lib.PrivacyBudget(epsilon=1.0, delta=1e-5, accountant="pld")
  aggregates.count(np.arange(5), max_contributions_per_user=1, epsilon=0.5,
                   delta=1e-6, budget=budget, rng=0)
  assert budget.accountant_epsilon == math.inf
  assert budget.spent_epsilon == pytest.approx(0.5, rel=1e-6)  # basic path


# Row histograms (count_rows=True), which the rating histogram uses.

def test_row_histogram_caps_rows_per_user():
  user = np.array([0] * 7 + [1] * 2)
  bins = np.array([4, 4, 4, 4, 3, 3, 2, 0, 1])
  m = 3
  full, _ = aggregates.histogram(user, bins, num_bins=5,
                                 max_contributions_per_user=m, count_rows=True,
                                 epsilon=1e9, rng=0)
  assert full.sum() == m + 2  # user 0 keeps 3 of 7 rows, user 1 both
  without, _ = aggregates.histogram(user[7:], bins[7:], num_bins=5,
                                    max_contributions_per_user=m,
                                    count_rows=True, epsilon=1e9, rng=0)
  assert np.abs(full - without).sum() == m  # L1 sensitivity m, reached


def test_row_histogram_gaussian_noise_uses_l2_sensitivity_m():
  # No data: the release is pure noise, N(0, sigma(L2 = m)). The distinct-user
  # histogram's L2 is sqrt(m): a KS test must tell the two apart.
  m, epsilon, delta = 4, 1.0, 1e-5
  noise, event = aggregates.histogram(
      np.zeros(0, np.int64), np.zeros(0, np.int64), num_bins=4000,
      max_contributions_per_user=m, count_rows=True, epsilon=epsilon,
      delta=delta, mechanism="gaussian", rng=0)
  sigma = mechanisms.gaussian_sigma(sensitivity=m, epsilon=epsilon, delta=delta)
  assert stats.kstest(noise / sigma, "norm").pvalue > 0.01
  for wrong in (mechanisms.gaussian_sigma(sensitivity=np.sqrt(m),
                                          epsilon=epsilon, delta=delta),
                sigma * 2 / 3, sigma * 3 / 2):
    assert stats.kstest(noise / wrong, "norm").pvalue < 1e-6
  assert event.noise_multiplier == pytest.approx(sigma / m)
