"""Gaussian noise: the right scale, fresh per step and per leaf, reproducible."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from privjax.dp import noise

SIGMA, C = 1.3, 0.7


def _sample(stddev, key, n=40_000):
  out = noise.add_gaussian_noise({"a": jnp.zeros((n // 2,)), "b": jnp.zeros((n // 4, 2))},
                                 stddev=stddev, key=key)
  return np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(out)])


def test_ks_accepts_right_scale_and_rejects_wrong_ones():
  x = _sample(SIGMA * C, jax.random.key(0))
  assert stats.kstest(x / (SIGMA * C), "norm").pvalue > 0.01
  for wrong in (2 / 3, 3 / 2):
    assert stats.kstest(x / (SIGMA * C * wrong), "norm").pvalue < 1e-6


def test_noise_is_added_to_the_sum_not_replacing_it():
  tree = {"w": jnp.arange(6.0).reshape(2, 3)}
  out = noise.add_gaussian_noise(tree, stddev=1e-3, key=jax.random.key(1))
  np.testing.assert_allclose(out["w"], tree["w"], atol=1e-2)
  assert not np.array_equal(np.asarray(out["w"]), np.asarray(tree["w"]))


def test_same_key_same_noise_and_fresh_noise_per_step_and_leaf():
  streams = noise.KeyStreams(jax.random.key(7))
  zeros = {"a": jnp.zeros(1000), "b": jnp.zeros(1000)}
  s1 = noise.add_gaussian_noise(zeros, stddev=1.0, key=streams.noise_key(1))
  s1_again = noise.add_gaussian_noise(zeros, stddev=1.0, key=streams.noise_key(1))
  s2 = noise.add_gaussian_noise(zeros, stddev=1.0, key=streams.noise_key(2))
  np.testing.assert_array_equal(s1["a"], s1_again["a"])
  # Independent across steps and across leaves: correlations near zero.
  for x, y in ((s1["a"], s2["a"]), (s1["a"], s1["b"])):
    assert abs(np.corrcoef(x, y)[0, 1]) < 0.12
    assert not np.allclose(x, y)


def test_streams_are_distinct():
  streams = noise.KeyStreams(jax.random.key(0))
  keys = [streams.noise_key(0), streams.dropout_key(0), noise.params_key(0),
          noise.KeyStreams(jax.random.key(1)).noise_key(0)]
  data = {tuple(np.asarray(jax.random.key_data(k)).ravel().tolist()) for k in keys}
  assert len(data) == len(keys)


def test_noise_is_at_least_float32():
  out = noise.add_gaussian_noise({"w": jnp.zeros(8, jnp.bfloat16)}, stddev=1.0,
                                 key=jax.random.key(0))
  assert out["w"].dtype == jnp.float32
  out64 = noise.add_gaussian_noise({"w": jnp.zeros(8, jnp.float16)}, stddev=1.0,
                                   key=jax.random.key(0))
  assert out64["w"].dtype == jnp.float32


@pytest.mark.parametrize("stddev", [0.5, 2.0])
def test_scale_is_linear_in_stddev(stddev):
  x = _sample(stddev, jax.random.key(3), n=20_000)
  assert stats.kstest(x / stddev, "norm").pvalue > 0.01


@pytest.mark.parametrize("shape", [(), (1,), (7,), (3, 5), (64, 33, 2), (0, 4)])
@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_fused_normal_is_jax_normal_bit_for_bit(shape, seed):
  """The fused sampler is an implementation detail: the same bits as jax."""
  key = jax.random.fold_in(jax.random.key(seed), 7)
  ours = noise.normal(key, shape)
  ref = jax.random.normal(key, shape)
  assert ours.shape == ref.shape and ours.dtype == ref.dtype
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
  np.testing.assert_array_equal(np.asarray(jax.jit(noise.normal, static_argnums=1)(key, shape)),
                                np.asarray(ref))


def test_other_keys_and_dtypes_take_jax_normal():
  rbg = jax.random.key(0, impl="rbg")
  np.testing.assert_array_equal(np.asarray(noise.normal(rbg, (9,))),
                                np.asarray(jax.random.normal(rbg, (9,))))
  key = jax.random.key(2)
  assert noise.normal(key, (4,), jnp.bfloat16).dtype == jnp.bfloat16
