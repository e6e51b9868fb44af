"""privjax.audit.bounds: the many-run epsilon bound, GDP, membership metrics."""

import itertools
import math

import numpy as np
import pytest

from privjax.answers import mechanisms
from privjax.audit import bounds
from privjax.dp import accounting


def test_gaussian_epsilon_is_the_exact_epsilon():
  for mu, delta in [(1.0, 1e-5), (0.25, 1e-5), (2.0, 1e-3)]:
    eps = bounds.gaussian_epsilon(mu, delta)
    assert mechanisms.gaussian_delta(sigma=1 / mu, sensitivity=1, epsilon=eps) <= delta
    assert mechanisms.gaussian_delta(sigma=1 / mu, sensitivity=1,
                                     epsilon=eps - 1e-6) > delta
  # The PLD accountant agrees at q = 1, T = 1 (it is tight there).
  pld = accounting.dpsgd_epsilon(sampling_prob=1.0, noise_multiplier=1.0, steps=1,
                                 delta=1e-5, accountant="pld")
  assert pld == pytest.approx(bounds.gaussian_epsilon(1.0, 1e-5), rel=1e-3)
  assert bounds.gaussian_epsilon(0.0, 1e-5) == 0.0
  assert bounds.gaussian_epsilon(math.inf, 1e-5) == math.inf


def test_epsilon_from_rates_is_the_dp_inequality():
  fpr, fnr, delta = 0.02, 0.3, 1e-3
  eps = float(bounds.epsilon_from_rates(fpr, fnr, delta))
  # At this eps one of the two DP inequalities is tight, and both hold.
  assert min(fpr + math.exp(eps) * fnr, fnr + math.exp(eps) * fpr) == pytest.approx(
      1 - delta)
  assert float(bounds.epsilon_from_rates(0.5, 0.5, 0.0)) == 0.0
  assert float(bounds.epsilon_from_rates(0.99, 0.99, 0.0)) == 0.0


@pytest.mark.parametrize("mu", [0.5, 1.0, 2.0])
def test_bound_never_exceeds_the_true_epsilon_of_a_gaussian(mu):
  delta = 1e-5
  exact = bounds.gaussian_epsilon(mu, delta)
  for seed in range(6):
    rng = np.random.default_rng(seed)
    b = bounds.distinguishing_bound(rng.normal(0, 1, 3000), rng.normal(mu, 1, 3000),
                                    delta=delta, seed=seed)
    assert 0 < b.epsilon_lower <= exact
    assert b.mu_lower <= mu
    assert b.held_out.num_null + b.held_out.num_alt < 6000   # evaluated on a share


def test_identical_distributions_give_no_evidence():
  rng = np.random.default_rng(1)
  b = bounds.distinguishing_bound(rng.normal(size=5000), rng.normal(size=5000),
                                  delta=1e-5)
  assert b.epsilon_lower < 0.2 and b.mu_lower < 0.1
  const = bounds.distinguishing_bound(np.zeros(100), np.zeros(100), delta=1e-5)
  assert const.epsilon_lower == 0.0 and const.epsilon_optimistic == 0.0


def test_separated_scores_are_bounded_by_the_number_of_runs():
  b = bounds.distinguishing_bound(np.zeros(1000), np.ones(1000), delta=0.0)
  # About log(n / log(2 / beta)) for n = 700 evaluated runs: 5.3.
  assert 4.5 < b.epsilon_lower < 6.5 and b.epsilon_optimistic > b.epsilon_lower
  # Reversed roles (D' scores LOWER) are found too.
  r = bounds.distinguishing_bound(np.ones(1000), np.zeros(1000), delta=0.0)
  assert r.epsilon_lower == pytest.approx(b.epsilon_lower, rel=1e-6)
  assert r.held_out.test.direction == -1


def test_gdp_estimate_recovers_mu():
  rng = np.random.default_rng(2)
  b = bounds.distinguishing_bound(rng.normal(0, 1, 40_000), rng.normal(1, 1, 40_000),
                                  delta=1e-5)
  assert b.mu == pytest.approx(1.0, abs=0.08)
  assert b.mu_lower < 1.0
  assert b.epsilon_gdp == pytest.approx(bounds.gaussian_epsilon(1.0, 1e-5), rel=0.15)


def test_to_dict_is_json_safe():
  import json  # pylint: disable=g-import-not-at-top
  b = bounds.distinguishing_bound(np.zeros(50), np.ones(50), delta=1e-5)
  json.dumps(b.to_dict())


def test_roc_auc_and_tpr_match_brute_force():
  rng = np.random.default_rng(3)
  pos = np.round(rng.normal(1, 1, 57), 1)   # rounding makes ties
  neg = np.round(rng.normal(0, 1, 83), 1)
  pairs = [(p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg)]
  assert bounds.roc_auc(pos, neg) == pytest.approx(np.mean(pairs))
  for fpr in (0.0, 0.01, 0.05, 0.3, 1.0):
    best = max([np.mean(pos > t) for t in np.r_[neg, -np.inf, np.inf]
                if np.mean(neg > t) <= fpr])
    assert bounds.tpr_at_fpr(pos, neg, fpr) == pytest.approx(best)
  m = bounds.membership_metrics(pos, neg)
  assert set(m) == {"auc", "tpr@1%fpr", "tpr@0.1%fpr", "num_members", "num_nonmembers"}


def test_bad_scores_are_refused():
  with pytest.raises(ValueError, match="non-finite"):
    bounds.distinguishing_bound([0.0, np.nan], [1.0, 2.0], delta=1e-5)
  with pytest.raises(ValueError, match="confidence"):
    bounds.distinguishing_bound([0.0, 1.0], [1.0, 2.0], delta=1e-5, confidence=1.0)
