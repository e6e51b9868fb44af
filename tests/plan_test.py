"""Tests for privjax.dp.plan: the DP count, q and the divisor, refusals, statements."""

import math

import jax
import numpy as np
import pytest
from scipy import stats

from privjax.dp import accounting
from privjax.dp import plan as plan_lib
from privjax.dp import secret as secret_lib

ALPHA = 1e-3


def _plan(**kw):
  args = dict(unit="user", relation="add_remove", target_epsilon=4.0,
              noise_multiplier=None, sampling_prob=None, batch_size=100, steps=50,
              num_units=2000, delta=1e-5, l2_clip_norm=1.0,
              secret=secret_lib.RunSecret.from_seed(0))
  args.update(kw)
  return plan_lib.make_plan(**args)


def _discrete_laplace_pmf(eps, x):
  return (1 - math.exp(-eps)) / (1 + math.exp(-eps)) * np.exp(-eps * np.abs(x))


def _chi2(noise, eps):
  bins = np.arange(-12, 13)
  observed = np.array([(noise == b).sum() for b in bins] + [(np.abs(noise) > 12).sum()])
  p = _discrete_laplace_pmf(eps, bins)
  expected = np.append(p, 1 - p.sum()) * len(noise)
  return stats.chisquare(observed, expected).pvalue


def test_the_count_is_discrete_laplace_of_the_stated_epsilon():
  eps = 0.5
  noise = np.array([plan_lib.noisy_count(10_000, epsilon=eps,
                                         secret=secret_lib.RunSecret.from_seed(i)) - 10_000
                    for i in range(3000)])
  assert _chi2(noise, eps) > ALPHA
  assert _chi2(noise, 2 * eps) < ALPHA and _chi2(noise, eps / 2) < ALPHA


def test_q_and_divisor_come_from_the_dp_count_and_its_cost_is_added():
  p = _plan()
  assert p.noisy_num_units != 2000 and p.public_num_units is None
  assert p.sampling_prob == pytest.approx(100 / p.noisy_num_units)
  assert p.divisor == pytest.approx(100.0)          # q x noisy count: public
  assert p.count_epsilon == 0.05
  sgd = accounting.dpsgd_epsilon(sampling_prob=p.sampling_prob,
                                 noise_multiplier=p.noise_multiplier, steps=50, delta=1e-5)
  assert p.epsilon(50) == pytest.approx(0.05 + sgd)
  assert 0.99 * 4.0 <= p.epsilon(50) <= 4.0
  s = p.statement(50, {})
  assert s["count_of_units"]["epsilon"] == 0.05 and s["noisy_num_units"] == p.noisy_num_units
  assert s["epsilon"] == pytest.approx(p.epsilon(50))


def test_neighbours_share_every_public_parameter_but_the_count():
  # D and D + one user: the plans differ only through the released count,
  # whose distribution shifts by one (that is what count_epsilon pays for).
  secret = secret_lib.RunSecret.fresh()
  a, b = _plan(secret=secret, num_units=2000), _plan(secret=secret, num_units=2001)
  assert b.noisy_num_units - a.noisy_num_units == 1   # same noise draw
  assert a.divisor == b.divisor and a.steps == b.steps and a.delta == b.delta


def test_replace_one_uses_the_public_n_and_pays_no_count():
  p = _plan(relation="replace_one", accountant="pld")
  assert p.public_num_units == 2000 and p.noisy_num_units is None and p.count_epsilon == 0
  assert p.sampling_prob == pytest.approx(100 / 2000)
  assert p.statement(50, {})["neighbouring_relation"] == "replace_one_user"
  assert p.epsilon(50) <= 4.0


@pytest.mark.parametrize("kw,match", [
    (dict(target_epsilon=None, noise_multiplier=1.0), "sampling_prob"),
    (dict(overflow="truncate", accountant="pld"), "public dataset size"),
    (dict(count_epsilon=4.0), "count_epsilon=4.0"),
    (dict(relation="replace_one"), "accountant='pld'"),
    (dict(batch_size=5000), "exceeds the DP count"),
])
def test_what_cannot_be_accounted_for_is_refused(kw, match):
  with pytest.raises(ValueError, match=match):
    _plan(**kw)


def test_a_fixed_sigma_with_a_public_q_is_accounted_exactly():
  p = _plan(target_epsilon=None, noise_multiplier=1.2, sampling_prob=0.05, steps=20)
  assert p.noise_multiplier == 1.2 and p.sampling_prob == 0.05
  assert p.divisor == pytest.approx(0.05 * p.noisy_num_units)
  assert p.epsilon(20) == pytest.approx(0.05 + accounting.dpsgd_epsilon(
      sampling_prob=0.05, noise_multiplier=1.2, steps=20, delta=1e-5))


def test_reproducible_and_non_private_plans_say_what_they_are():
  s = _plan().statement(50, {})
  assert s["private"] is False and s["dp_release"] is False and s["reproducible_noise"]
  assert "REPRODUCIBLE" in s["noise_secret"]
  secret = secret_lib.RunSecret.fresh()
  s = _plan(secret=secret).statement(50, {})
  assert s["private"] is True and s["dp_release"] is True
  assert secret.fingerprint in s["noise_secret"] and secret.key.hex() not in str(s)
  off = _plan(private=False, target_epsilon=None).statement(3, {})
  assert off["private"] is False and off["epsilon"] == "inf"
  assert "noisy_num_units" not in off and "num_units" not in off


def test_the_sampler_and_the_noise_keys_come_from_the_secret():
  a, b = _plan(secret=secret_lib.RunSecret.fresh()), _plan(secret=secret_lib.RunSecret.fresh())
  n = min(a.noisy_num_units, b.noisy_num_units)
  assert not np.array_equal(a.sampler().sample(0, n).indices, b.sampler().sample(0, n).indices)
  assert not np.array_equal(jax.random.key_data(a.streams().noise_key(0)),
                            jax.random.key_data(b.streams().noise_key(0)))
