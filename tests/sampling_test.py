"""Tests for privjax.dp.sampling: the sample is Poisson, padded, masked, stateless."""

import math

import numpy as np
import pytest
from scipy import stats

from privjax.dp import sampling

# Significance level for goodness-of-fit tests: with fixed seeds they are
# deterministic, and each is paired with a wrong alternative it must reject.
ALPHA = 1e-3


def _draw(sampler, num_units, num_steps):
  return [sampler.sample(step, num_units) for step in range(num_steps)]


def _inclusion_counts(batches, num_units):
  counts = np.zeros(num_units, np.int64)
  for b in batches:
    np.add.at(counts, b.indices[b.mask], 1)
  return counts


def _binom_chisquare_pvalue(sizes, n, q):
  """Chi-square goodness of fit of integer samples to Binomial(n, q).

  Cells are merged from both tails until each expects >= 5 samples.
  """
  sizes = np.asarray(sizes)
  total = sizes.size
  k = np.arange(n + 1)
  expected = stats.binom.pmf(k, n, q) * total
  observed = np.bincount(sizes, minlength=n + 1)[:n + 1].astype(float)
  # Merge cells into consecutive groups with expected count >= 5.
  exp_cells, obs_cells, acc_e, acc_o = [], [], 0.0, 0.0
  for e, o in zip(expected, observed):
    acc_e += e
    acc_o += o
    if acc_e >= 5:
      exp_cells.append(acc_e)
      obs_cells.append(acc_o)
      acc_e = acc_o = 0.0
  exp_cells[-1] += acc_e
  obs_cells[-1] += acc_o
  # Anything outside [0, n] (impossible for a right answer) breaks the fit.
  obs_cells[-1] += np.sum(sizes > n)
  exp_cells, obs_cells = np.array(exp_cells), np.array(obs_cells)
  exp_cells *= obs_cells.sum() / exp_cells.sum()
  return stats.chisquare(obs_cells, exp_cells).pvalue


# ----------------------------------------------------------------------------
# The sample is Poisson.
# ----------------------------------------------------------------------------


def test_inclusion_rate_matches_q_and_rejects_wrong_q():
  n, q, steps = 1000, 0.05, 2000
  sampler = sampling.PoissonSampler(
      sampling_prob=q, seed=3,
      bucket_sizes=sampling.bucket_sizes(num_units=n, sampling_prob=q))
  total = int(_inclusion_counts(_draw(sampler, n, steps), n).sum())

  def within_5_sigma(rate):
    # Total inclusions over all units and steps is Binomial(n * steps, rate).
    mean = n * steps * rate
    sd = math.sqrt(n * steps * rate * (1 - rate))
    return abs(total - mean) <= 5 * sd

  assert within_5_sigma(q)
  assert not within_5_sigma(q * 1.1)
  assert not within_5_sigma(q / 1.1)


def test_per_unit_inclusion_is_uniform():
  n, q, steps = 500, 0.1, 1000
  sampler = sampling.PoissonSampler(sampling_prob=q, seed=4,
                                    bucket_sizes=(50, 100))
  counts = _inclusion_counts(_draw(sampler, n, steps), n)

  def pvalue(c):
    # Each unit's count is an independent Binomial(steps, q): the sum of
    # squared standardised deviations is ~ chi2(n) (total not fixed).
    mean, var = steps * q, steps * q * (1 - q)
    return stats.chi2.sf(np.sum((c - mean) ** 2) / var, df=n)

  assert pvalue(counts) > ALPHA
  # Power check: a sampler that favours even units by 15% must be rejected.
  rng = np.random.default_rng(0)
  bias = np.where(np.arange(n) % 2 == 0, 1.15, 0.85)
  assert pvalue(rng.binomial(steps, q * bias)) < ALPHA


def test_batch_size_is_binomial_and_rejects_wrong_q():
  n, q, steps = 200, 0.1, 3000
  sampler = sampling.PoissonSampler(sampling_prob=q, seed=5,
                                    bucket_sizes=(16, 32, 64))
  sizes = [b.size for b in _draw(sampler, n, steps)]
  assert _binom_chisquare_pvalue(sizes, n, q) > ALPHA
  assert _binom_chisquare_pvalue(sizes, n, q * 1.1) < ALPHA
  assert _binom_chisquare_pvalue(sizes, n, q / 1.1) < ALPHA
  # A fixed-size sampler with the right mean is also rejected by this test.
  assert _binom_chisquare_pvalue([int(n * q)] * steps, n, q) < ALPHA


def test_units_are_included_independently():
  # Poisson sampling has uncorrelated inclusions; fixed-size sampling without
  # replacement has correlation -1/(n-1) (here -0.053) between every pair.
  n, q, steps = 20, 0.3, 5000
  sampler = sampling.PoissonSampler(sampling_prob=q, seed=6, bucket_sizes=(20,))
  x = np.stack([np.isin(np.arange(n), b.indices[b.mask])
                for b in _draw(sampler, n, steps)]).astype(float)
  corr = np.corrcoef(x, rowvar=False)
  mean_offdiag = (corr.sum() - n) / (n * (n - 1))
  # Under independence the sum of the n standardised indicators has variance
  # n, whose estimate over `steps` rows has sd n sqrt(2 / steps); so the mean
  # off-diagonal correlation has sd sqrt(2 / steps) / (n - 1).
  bound = 5 * math.sqrt(2 / steps) / (n - 1)
  assert abs(mean_offdiag) < bound
  assert abs(-1 / (n - 1)) > 5 * bound  # fixed-size sampling would fail.


# ----------------------------------------------------------------------------
# Padding, masking, determinism.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("n,q", [(1000, 0.05), (37, 0.5), (10, 1.0), (10, 0.0),
                                 (0, 0.3), (100_000, 0.001)])
def test_batches_are_valid_padded_and_masked(n, q):
  sizes = sampling.bucket_sizes(num_units=n, sampling_prob=q, multiple_of=4)
  sampler = sampling.PoissonSampler(sampling_prob=q, seed=7, bucket_sizes=sizes)
  for b in _draw(sampler, n, 50):
    assert b.indices.dtype == np.int32 and b.mask.dtype == np.bool_
    assert b.indices.shape == b.mask.shape
    assert b.indices.shape[0] in sizes
    # The smallest bucket that fits.
    assert b.indices.shape[0] == min(s for s in sizes if s >= b.size)
    assert int(b.mask.sum()) == b.size and not b.truncated
    assert b.mask[:b.size].all() and not b.mask[b.size:].any()
    real = b.indices[:b.size]
    assert len(np.unique(real)) == b.size  # no unit twice
    assert np.all(np.diff(real) > 0)  # sorted
    assert np.all((real >= 0) & (real < n))
    assert np.all(b.indices[b.size:] == 0)
    if q == 1.0:
      assert b.size == n
    if q == 0.0 or n == 0:
      assert b.size == 0
    with pytest.raises(ValueError):
      b.indices[0] = 1  # read-only


def test_same_seed_and_step_give_same_batch():
  sampler = sampling.PoissonSampler(sampling_prob=0.1, seed=11,
                                    bucket_sizes=(64, 128))
  again = sampling.PoissonSampler(sampling_prob=0.1, seed=11,
                                  bucket_sizes=(64, 128))
  # Order of calls does not matter: each step is a function of (seed, step).
  late_first = [again.sample(s, 500) for s in reversed(range(10))][::-1]
  for s, b in enumerate(late_first):
    a = sampler.sample(s, 500)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.mask, b.mask)
  other_seed = sampling.PoissonSampler(sampling_prob=0.1, seed=12,
                                       bucket_sizes=(64, 128))
  assert not np.array_equal(sampler.sample(0, 500).indices,
                            other_seed.sample(0, 500).indices)
  assert not np.array_equal(sampler.sample(0, 500).indices,
                            sampler.sample(1, 500).indices)


def test_steps_are_independent_streams():
  # Consecutive steps must not share draws (e.g. shifted streams): inclusion
  # of a unit at step t and t+1 is uncorrelated.
  n, q, steps = 50, 0.4, 2000
  sampler = sampling.PoissonSampler(sampling_prob=q, seed=2, bucket_sizes=(50,))
  x = np.stack([np.isin(np.arange(n), b.indices[b.mask])
                for b in _draw(sampler, n, steps)]).astype(float)
  lag1 = np.corrcoef(x[:-1].ravel(), x[1:].ravel())[0, 1]
  assert abs(lag1) < 5 / math.sqrt(n * steps)


def test_resume_at_any_step_draws_the_same_batches():
  # The sampler has no state: step t's batch is a function of (seed, t).
  sampler = sampling.PoissonSampler(sampling_prob=0.2, seed=21, bucket_sizes=(16, 32))
  again = sampling.PoissonSampler(sampling_prob=0.2, seed=21, bucket_sizes=(16, 32))
  for step in (0, 5, 11):
    np.testing.assert_array_equal(sampler.sample(step, 100).indices,
                                  again.sample(step, 100).indices)


def test_seeds_use_all_128_bits():
  a = sampling.PoissonSampler(sampling_prob=0.5, seed=7, bucket_sizes=(64,))
  b = sampling.PoissonSampler(sampling_prob=0.5, seed=7 + 2**100, bucket_sizes=(64,))
  assert not np.array_equal(a.sample(0, 100).indices, b.sample(0, 100).indices)
  with pytest.raises(ValueError, match="seed="):
    sampling.PoissonSampler(sampling_prob=0.5, seed=2**128, bucket_sizes=(64,))


# ----------------------------------------------------------------------------
# Bucket sizes.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("n,q,m,tp", [
    (60_000, 256 / 60_000, 1, 1e-10), (60_000, 256 / 60_000, 8, 1e-10),
    (1000, 0.1, 4, 1e-6), (943, 0.05, 2, 1e-10), (10**6, 1e-5, 1, 1e-12),
    (50, 0.9, 1, 1e-3), (10**9, 0.5, 16, 1e-10)])
def test_bucket_sizes_static_and_tail_bounded(n, q, m, tp):
  sizes = sampling.bucket_sizes(num_units=n, sampling_prob=q, multiple_of=m,
                                tail_prob=tp)
  assert sizes == sampling.bucket_sizes(num_units=n, sampling_prob=q,
                                        multiple_of=m, tail_prob=tp)
  assert 1 <= len(sizes) <= 3
  assert all(isinstance(s, int) for s in sizes)
  assert all(s % m == 0 and s >= m for s in sizes)
  assert all(a < b for a, b in zip(sizes, sizes[1:]))
  largest = sizes[-1]
  assert stats.binom.sf(largest, n, q) <= tp
  # Not wastefully large: one multiple smaller would exceed the tail.
  assert stats.binom.sf(largest - m, n, q) > tp
  # The smallest bucket sits near the mean.
  assert sizes[0] <= _round_up(math.ceil(n * q), m)


def test_bucket_sizes_exact_threshold_without_rounding():
  # With multiple_of=1 the largest bucket is exactly the minimal n.
  for n, q in [(100, 0.2), (10_000, 0.003), (5000, 0.5)]:
    largest = sampling.bucket_sizes(num_units=n, sampling_prob=q,
                                    tail_prob=1e-8)[-1]
    assert stats.binom.sf(largest, n, q) <= 1e-8 < stats.binom.sf(
        largest - 1, n, q)


def test_bucket_sizes_edge_cases():
  assert sampling.bucket_sizes(num_units=10, sampling_prob=0.0,
                               multiple_of=4) == (4,)
  assert sampling.bucket_sizes(num_units=0, sampling_prob=0.5) == (1,)
  assert sampling.bucket_sizes(num_units=10, sampling_prob=1.0,
                               multiple_of=4) == (12,)
  assert len(sampling.bucket_sizes(num_units=10_000, sampling_prob=0.01,
                                   num_buckets=5)) == 5
  assert len(sampling.bucket_sizes(num_units=10_000, sampling_prob=0.01,
                                   num_buckets=1)) == 1


def _round_up(n, m):
  return max(m, -(-n // m) * m)


# ----------------------------------------------------------------------------
# Overflow.
# ----------------------------------------------------------------------------


def test_overflow_grow_pads_to_multiple_of_largest():
  sampler = sampling.PoissonSampler(sampling_prob=0.5, seed=0,
                                    bucket_sizes=(2, 4), overflow="grow")
  assert sampler.truncated_batch_size is None
  for b in _draw(sampler, 100, 20):
    assert b.size > 4 and not b.truncated  # forced overflow
    assert b.indices.shape[0] % 4 == 0
    assert b.size <= b.indices.shape[0] < b.size + 4
    assert int(b.mask.sum()) == b.size
    assert len(np.unique(b.indices[b.mask])) == b.size


def test_overflow_truncate_keeps_uniform_subset_of_largest_size():
  n, q, steps = 100, 0.5, 2000
  sampler = sampling.PoissonSampler(sampling_prob=q, seed=0,
                                    bucket_sizes=(2, 4), overflow="truncate")
  assert sampler.truncated_batch_size == 4
  batches = _draw(sampler, n, steps)
  for b in batches[:50]:
    assert b.truncated and b.size == 4 and b.indices.shape == (4,)
    assert b.mask.all() and len(np.unique(b.indices)) == 4
  # Survivors are uniform over units: counts ~ Binomial(steps, 4 / n) each.
  counts = _inclusion_counts(batches, n)
  p = 4 / n
  stat = np.sum((counts - steps * p) ** 2) / (steps * p * (1 - p))
  assert stats.chi2.sf(stat, df=n) > ALPHA
  # Without overflow, truncate gives the same batch as grow.
  roomy = dict(sampling_prob=q, seed=0, bucket_sizes=(64, 128))
  a = sampling.PoissonSampler(overflow="truncate", **roomy).sample(3, n)
  b = sampling.PoissonSampler(overflow="grow", **roomy).sample(3, n)
  np.testing.assert_array_equal(a.indices, b.indices)
  assert not a.truncated


def test_overflow_refuse_raises():
  sampler = sampling.PoissonSampler(sampling_prob=0.5, seed=0,
                                    bucket_sizes=(2, 4), overflow="refuse")
  assert sampler.truncated_batch_size is None
  with pytest.raises(RuntimeError, match="largest bucket size 4"):
    sampler.sample(0, 100)
  assert sampler.sample(0, 3).size <= 3  # fits: no error


# ----------------------------------------------------------------------------
# Invalid arguments name the value.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(sampling_prob=1.5), "sampling_prob=1.5"),
    (dict(sampling_prob=-0.1), "sampling_prob=-0.1"),
    (dict(sampling_prob=float("nan")), "sampling_prob=nan"),
    (dict(seed=-1), "seed=-1"),
    (dict(seed=1.5), "seed=1.5"),
    (dict(overflow="drop"), "overflow='drop'"),
    (dict(bucket_sizes=(8, 4)), r"bucket_sizes=\(8, 4\)"),
    (dict(bucket_sizes=()), r"bucket_sizes=\(\)"),
    (dict(bucket_sizes=(0, 4)), r"bucket_sizes=\(0, 4\)"),
])
def test_sampler_rejects_bad_params(kwargs, match):
  params = dict(sampling_prob=0.1, seed=0, bucket_sizes=(4, 8))
  params.update(kwargs)
  with pytest.raises(ValueError, match=match):
    sampling.PoissonSampler(**params)


def test_bad_call_args_are_named():
  sampler = sampling.PoissonSampler(sampling_prob=0.1, seed=0, bucket_sizes=(4,))
  with pytest.raises(ValueError, match="num_units=-1"):
    sampler.sample(0, -1)
  with pytest.raises(ValueError, match="step=-3"):
    sampler.sample(-3, 10)
  with pytest.raises(ValueError, match="num_units=-5"):
    sampling.bucket_sizes(num_units=-5, sampling_prob=0.1)
  with pytest.raises(ValueError, match="sampling_prob=1.1"):
    sampling.bucket_sizes(num_units=5, sampling_prob=1.1)
  with pytest.raises(ValueError, match="multiple_of=0"):
    sampling.bucket_sizes(num_units=5, sampling_prob=0.1, multiple_of=0)
  with pytest.raises(ValueError, match="tail_prob=0.7"):
    sampling.bucket_sizes(num_units=5, sampling_prob=0.1, tail_prob=0.7)
