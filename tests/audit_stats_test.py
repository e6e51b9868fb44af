"""privjax.audit.stats against scipy (a test-only dependency)."""

import numpy as np
import pytest
import scipy.special
import scipy.stats

from privjax.audit import stats


def test_betainc_matches_scipy():
  rng = np.random.default_rng(0)
  a = np.concatenate([rng.uniform(0.1, 5, 100), rng.uniform(1, 3e5, 100)])
  b = np.concatenate([rng.uniform(0.1, 5, 100), rng.uniform(1, 3e5, 100)])
  x = np.concatenate([rng.random(100), a[100:] / (a[100:] + b[100:]) * rng.uniform(0.5, 1.5, 100)])
  x = np.clip(x, 0, 1)
  np.testing.assert_allclose(stats.betainc(a, b, x), scipy.special.betainc(a, b, x),
                             rtol=1e-9, atol=1e-13)
  assert stats.betainc(2.0, 3.0, 0.0) == 0.0 and stats.betainc(2.0, 3.0, 1.0) == 1.0


@pytest.mark.parametrize("n", [1, 7, 100, 20_000, 320_000])
@pytest.mark.parametrize("beta", [0.5, 0.025, 1e-6])
def test_clopper_pearson_matches_scipy_beta_ppf(n, beta):
  k = np.unique(np.r_[np.arange(min(n, 12) + 1), np.linspace(0, n, 9).astype(int)])
  upper = stats.clopper_pearson_upper(k, n, beta)
  safe = np.minimum(k, n - 1)
  expected = np.where(k < n, scipy.stats.beta.ppf(1 - beta, safe + 1, n - safe), 1.0)
  np.testing.assert_allclose(upper, expected, rtol=1e-8)
  lower = stats.clopper_pearson_lower(k, n, beta)
  safe = np.maximum(k, 1)
  expected = np.where(k > 0, scipy.stats.beta.ppf(beta, safe, n - safe + 1), 0.0)
  np.testing.assert_allclose(lower, expected, rtol=1e-8, atol=1e-300)
  assert (lower <= k / n).all() and (k / n <= upper).all()


def test_beta_ppf_matches_scipy_on_small_shapes():
  p = np.array([1e-12, 1e-4, 0.3, 0.5, 0.9, 1 - 1e-9])
  for a, b in [(0.5, 0.5), (1.0, 3.0), (2.5, 0.7), (40.0, 2.0)]:
    np.testing.assert_allclose(stats.beta_ppf(p, a, b), scipy.stats.beta.ppf(p, a, b),
                               rtol=1e-8)


def test_clopper_pearson_covers():
  # Exactness: the coverage of the upper bound is >= 1 - beta for every p.
  n, beta = 50, 0.1
  upper = stats.clopper_pearson_upper(np.arange(n + 1), n, beta)
  for p in np.linspace(0.001, 0.999, 97):
    coverage = scipy.stats.binom.pmf(np.arange(n + 1), n, p)[upper >= p].sum()
    assert coverage >= 1 - beta - 1e-12


@pytest.mark.parametrize("n,p", [(0, 0.3), (1, 0.5), (40, 0.73), (2000, 0.99), (10, 0.0),
                                 (10, 1.0)])
def test_binomial_log_tail_matches_scipy(n, p):
  tail = np.exp(stats.binomial_log_tail(n, p))
  expected = scipy.stats.binom.sf(np.arange(n + 2) - 1, n, p)
  np.testing.assert_allclose(tail, expected, rtol=1e-9, atol=1e-300)


def test_normal_ppf():
  for p in (1e-10, 0.01, 0.5, 0.975):
    assert stats.normal_ppf(p) == pytest.approx(scipy.stats.norm.ppf(p), rel=1e-12)
  assert stats.normal_ppf(0.0) == -np.inf and stats.normal_ppf(1.0) == np.inf


def test_bad_arguments_name_the_value():
  with pytest.raises(ValueError, match="beta=0"):
    stats.clopper_pearson_upper(1, 10, 0)
  with pytest.raises(ValueError, match="k <= n"):
    stats.clopper_pearson_upper(11, 10, 0.05)
  with pytest.raises(ValueError, match="a > 0"):
    stats.betainc(0.0, 1.0, 0.5)


def test_beta_isf_matches_scipy_in_the_far_tail():
  q = np.array([1e-30, 1e-9, 1e-3, 0.2, 0.7])
  for a, b in [(1.0, 2e4), (13.0, 3e5), (3.0, 0.5)]:
    np.testing.assert_allclose(stats.beta_isf(q, a, b), scipy.stats.beta.isf(q, a, b),
                               rtol=1e-9)
  # Where scipy's isf gives up (it returns 0.00242 for (13, 3e5)), its sf agrees.
  for a, b in [(1.0, 2e4), (13.0, 3e5)]:
    x = float(stats.beta_isf(1e-300, a, b))
    assert scipy.stats.beta.sf(x, a, b) == pytest.approx(1e-300, rel=1e-8)
  assert float(stats.beta_isf(1e-300, 3.0, 0.5)) == 1.0   # beyond float64: 1
