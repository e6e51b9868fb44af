"""Tests for privjax.dp.secret: OS entropy, storage, streams, the reproducible mode."""

import os
import stat

import jax
import numpy as np
import pytest

from privjax.dp import noise
from privjax.dp import secret as secret_lib


def test_fresh_secrets_differ_and_never_print():
  a, b = secret_lib.RunSecret.fresh(), secret_lib.RunSecret.fresh()
  assert a.key != b.key and a.fingerprint != b.fingerprint
  assert a.key.hex() not in repr(a) and not a.reproducible


def test_saved_with_private_permissions_and_loaded_back(tmp_path):
  s = secret_lib.RunSecret.fresh()
  path = s.save(tmp_path)
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
  assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
  assert secret_lib.RunSecret.load(tmp_path).key == s.key
  with pytest.raises(FileExistsError):
    s.save(tmp_path)  # never overwritten
  path.write_text('{"key": "zz"}')
  with pytest.raises(ValueError, match="corrupt"):
    secret_lib.RunSecret.load(tmp_path)


def test_for_run_creates_then_reuses_and_refuses_a_missing_one(tmp_path):
  first = secret_lib.for_run(tmp_path, reproducible_seed=None, resuming=False)
  assert secret_lib.for_run(tmp_path, reproducible_seed=None, resuming=True).key == first.key
  with pytest.raises(ValueError, match="must not reuse"):   # a new run, same dir
    secret_lib.for_run(tmp_path, reproducible_seed=None, resuming=False)
  os.remove(secret_lib.RunSecret.path(tmp_path))
  with pytest.raises(secret_lib.MissingSecretError, match="missing"):
    secret_lib.for_run(tmp_path, reproducible_seed=None, resuming=True)
  repro = secret_lib.for_run(tmp_path / "r", reproducible_seed=3, resuming=True)
  assert repro.reproducible and repro.key == secret_lib.RunSecret.from_seed(3).key
  assert not (tmp_path / "r" / secret_lib.SECRET_DIR).exists()


def test_streams_are_independent_and_use_64_bits_of_key():
  s = secret_lib.RunSecret.from_seed(0)
  k = jax.random.key_data(s.jax_key("noise"))
  assert k.shape == (2,) and k[0] != 0 and k[1] != 0  # both words carry bits
  labels = ["noise", "sampling", "bounding", "streams"]
  assert len({s.derive(x) for x in labels}) == len(labels)
  assert s.integer("sampling") != s.integer("bounding")
  assert 0 <= s.integer("x", 128) < 2**128


def test_seeds_differing_above_bit_32_give_different_noise():
  # jax.random.key(seed) keeps only the low 32 bits: 0 and 2**40 alias there.
  assert np.array_equal(jax.random.key_data(jax.random.key(0)),
                        jax.random.key_data(jax.random.key(2**40)))
  for a, b in ((0, 2**40), (5, 5 + 2**32), (1, 1 + 2**63)):
    sa, sb = secret_lib.RunSecret.from_seed(a), secret_lib.RunSecret.from_seed(b)
    za = noise.normal(noise.KeyStreams(sa.jax_key("streams")).noise_key(0), (64,))
    zb = noise.normal(noise.KeyStreams(sb.jax_key("streams")).noise_key(0), (64,))
    assert not np.allclose(za, zb)
    # The public init seed too.
    assert not np.array_equal(jax.random.key_data(noise.params_key(a)),
                              jax.random.key_data(noise.params_key(b)))


def test_unit_keys_depend_on_the_id_alone():
  s = secret_lib.RunSecret.fresh()
  ids = [str(i) for i in range(100)]
  keys = dict(zip(ids, s.unit_keys("bounding", ids)))
  more = ["new"] + ids[:50] + ["other"] + ids[50:]
  assert all(keys[i] == k for i, k in zip(more, s.unit_keys("bounding", more)) if i in keys)
  assert len(set(keys.values())) == 100
  other = secret_lib.RunSecret.fresh().unit_keys("bounding", ids)
  assert not np.array_equal(other, s.unit_keys("bounding", ids))


def test_keyed_python_rng_is_deterministic_and_uniform():
  s = secret_lib.RunSecret.from_seed(1)
  r1, r2 = s.python_rng("count"), s.python_rng("count")
  draws = [r1.randrange(1000) for _ in range(2000)]
  assert draws == [r2.randrange(1000) for _ in range(2000)]
  assert 450 < np.mean(draws) < 550
  assert draws != [s.python_rng("other").randrange(1000) for _ in range(2000)]
  counts = np.bincount(np.array(draws) % 4, minlength=4)
  assert counts.min() > 400  # roughly uniform


def test_reproducible_seed_is_validated():
  with pytest.raises(ValueError, match="reproducible_noise_seed=-1"):
    secret_lib.RunSecret.from_seed(-1)
  with pytest.raises(ValueError, match="seed="):
    secret_lib.key_from_int(2**64)
