"""The step: noise on the sum, public divisor, one trace per bucket, sharding."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from privjax.dp import clipping
from privjax.dp import step as dp_step
from privjax.dp import noise

REPO = pathlib.Path(__file__).resolve().parents[1]


def _loss(params, frozen, ex, rng):
  del rng
  h = jnp.tanh(ex["x"] @ params["w"] + frozen["b"])
  return jnp.sum(jnp.square(h - ex["y"]))


def _setup(g=8, k=1, seed=0):
  rng = np.random.default_rng(seed)
  params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}
  frozen = {"b": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
  batch = {"x": jnp.asarray(rng.normal(size=(g, k, 4)), jnp.float32),
           "y": jnp.asarray(rng.normal(size=(g, k, 3)), jnp.float32)}
  return params, frozen, batch


def test_private_step_is_sgd_on_noisy_clipped_sum_over_public_constant():
  params, frozen, batch = _setup()
  mask = jnp.ones((8, 1))
  cfg = dp_step.StepConfig(private=True, l2_clip_norm=0.5, noise_multiplier=1.1,
                           expected_batch_size=10.0)
  opt = optax.sgd(1.0)
  step = dp_step.make_step(_loss, opt, cfg)
  key = noise.KeyStreams(jax.random.key(0)).noise_key(0)
  state, metrics = step(dp_step.init_state(jax.tree.map(jnp.copy, params), opt), frozen, batch, mask, key)
  # Reference, composed by hand from the primitives.
  per_ex = lambda p, ex, r: _loss(p, frozen, ex, r)
  out = clipping.clipped_grad_sum(per_ex, l2_clip_norm=0.5)(params, batch, mask)
  noisy = noise.add_gaussian_noise(out.grad_sum, stddev=1.1 * 0.5, key=key)
  expected = params["w"] - noisy["w"] / 10.0   # 10 = expected, not realised (8)
  np.testing.assert_allclose(state.params["w"], expected, atol=1e-6)
  assert int(state.step) == 1
  assert float(metrics["noise_stddev"]) == pytest.approx(0.55)


def test_update_noise_has_std_sigma_c_over_expected_batch():
  # Zero gradients (x = 0, y = tanh(b)): the update is pure noise.
  params, frozen, _ = _setup()
  g = 4
  batch = {"x": jnp.zeros((g, 1, 4)),
           "y": jnp.broadcast_to(jnp.tanh(frozen["b"]), (g, 1, 3))}
  params = {"w": jnp.zeros((200, 3))}
  batch["x"] = jnp.zeros((g, 1, 200))
  cfg = dp_step.StepConfig(private=True, l2_clip_norm=2.0, noise_multiplier=0.8,
                           expected_batch_size=4.0)
  opt = optax.sgd(1.0)
  step = dp_step.make_step(_loss, opt, cfg)
  samples = []
  for s in range(20):
    state, _ = step(dp_step.init_state(jax.tree.map(jnp.copy, params), opt), frozen, batch, jnp.ones((g, 1)),
                    noise.KeyStreams(jax.random.key(0)).noise_key(s))
    samples.append(np.asarray(state.params["w"]).ravel())
  x = -np.concatenate(samples)
  std = 0.8 * 2.0 / 4.0
  assert stats.kstest(x / std, "norm").pvalue > 0.01
  assert stats.kstest(x / (std * 2 / 3), "norm").pvalue < 1e-6
  assert stats.kstest(x / (std * 3 / 2), "norm").pvalue < 1e-6


def test_nonprivate_twin_is_the_plain_gradient_over_the_same_divisor():
  params, frozen, batch = _setup()
  mask = jnp.ones((8, 1)).at[3].set(0.0)
  cfg = dp_step.StepConfig(private=False, expected_batch_size=10.0)
  opt = optax.sgd(0.1)
  state, metrics = dp_step.make_step(_loss, opt, cfg)(
      dp_step.init_state(jax.tree.map(jnp.copy, params), opt), frozen, batch, mask, jax.random.key(0))

  def total(p):
    losses = [_loss(p, frozen, jax.tree.map(lambda v: v[i, 0], batch), None)
              for i in range(8) if i != 3]
    return sum(losses)

  g = jax.grad(total)(params)
  np.testing.assert_allclose(state.params["w"], params["w"] - 0.1 * g["w"] / 10.0,
                             atol=1e-6)
  assert float(metrics["noise_stddev"]) == 0.0


def test_frozen_parameters_get_no_update_and_no_noise():
  params, frozen, batch = _setup()
  cfg = dp_step.StepConfig(private=True, l2_clip_norm=1.0, noise_multiplier=5.0,
                           expected_batch_size=8.0)
  opt = optax.adam(0.1)
  frozen_before = jax.tree.map(np.asarray, frozen)
  state, _ = dp_step.make_step(_loss, opt, cfg)(
      dp_step.init_state(jax.tree.map(jnp.copy, params), opt), frozen, batch, jnp.ones((8, 1)), jax.random.key(0))
  assert set(state.params) == {"w"}
  np.testing.assert_array_equal(np.asarray(frozen["b"]), frozen_before["b"])


def test_step_traces_once_per_bucket():
  traces = []

  def loss(params, frozen, ex, rng):
    traces.append(1)  # Python side effect: runs at trace time only
    return _loss(params, frozen, ex, rng)

  params, frozen, _ = _setup()
  cfg = dp_step.StepConfig(private=True, l2_clip_norm=1.0, noise_multiplier=1.0,
                           expected_batch_size=8.0)
  opt = optax.sgd(0.1)
  step = dp_step.make_step(loss, opt, cfg)
  state = dp_step.init_state(jax.tree.map(jnp.copy, params), opt)
  for i, g in enumerate([8, 16, 8, 16, 8, 8, 16]):
    _, _, batch = _setup(g=g, seed=i)
    state, _ = step(state, frozen, batch, jnp.ones((g, 1)), jax.random.key(i))
  first = len(traces)
  assert first > 0
  for i, g in enumerate([8, 16]):
    _, _, batch = _setup(g=g, seed=10 + i)
    state, _ = step(state, frozen, batch, jnp.ones((g, 1)), jax.random.key(10 + i))
  assert len(traces) == first, "the step re-traced for a bucket it had seen"
  # Two buckets -> two traces of the step (each calls the loss a fixed number of times).
  assert step._cache_size() == 2


def test_invalid_step_config_is_refused():
  with pytest.raises(ValueError, match="noise_multiplier=-1"):
    dp_step.StepConfig(noise_multiplier=-1.0)
  with pytest.raises(ValueError, match="expected_batch_size=0"):
    dp_step.StepConfig(expected_batch_size=0.0)
  with pytest.raises(ValueError, match="clipping='magic'"):
    dp_step.StepConfig(clipping="magic")
  with pytest.raises(ValueError, match="resolve 'auto' first"):
    dp_step.StepConfig(clipping="auto")


_SHARDED_SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np, optax
sys.path.insert(0, sys.argv[1])
from privjax.dp import noise
from privjax.dp import step as dp_step
rng = np.random.default_rng(0)
params = {"w": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)}
batch = {"x": rng.normal(size=(16, 2, 6)).astype(np.float32),
         "y": rng.normal(size=(16, 2, 5)).astype(np.float32)}
mask = (rng.random((16, 2)) > 0.3).astype(np.float32)
def loss(p, frozen, ex, r):
  return jnp.sum(jnp.square(jnp.tanh(ex["x"] @ p["w"]) - ex["y"]))
opt = optax.adam(0.05)
step = dp_step.make_step(loss, opt, dp_step.StepConfig(
    l2_clip_norm=0.5, noise_multiplier=1.0, expected_batch_size=12.0))
mesh = dp_step.make_mesh()
state = jax.device_put(dp_step.init_state(jax.tree.map(jnp.copy, params), opt), dp_step.replicated(mesh))
sh = dp_step.data_sharding(mesh)
streams = noise.KeyStreams(jax.random.key(3))
for s in range(3):
  state, m = step(state, {}, jax.device_put(batch, sh), jax.device_put(mask, sh),
                  streams.noise_key(s))
print(json.dumps({"devices": jax.device_count(),
                  "w": np.asarray(state.params["w"]).tolist()}))
"""


def _run_sharded(num_devices: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}")
  out = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT, str(REPO)], env=env,
                       capture_output=True, text=True, timeout=300, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_four_devices_give_the_same_result_as_one():
  one, four = _run_sharded(1), _run_sharded(4)
  assert one["devices"] == 1 and four["devices"] == 4
  np.testing.assert_allclose(np.array(four["w"]), np.array(one["w"]), atol=1e-5)
