"""make_private: your own model and data, with the trainer's plan, sampler and noise."""

import pathlib
import re
import warnings

from flax import nnx
import numpy as np
import optax
import pytest

import privjax
from privjax.models import losses
from privjax.models import nn

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _readme_snippet() -> str:
  text = README.read_text()
  section = text[text.index("## Your own model and data"):]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_snippet_runs_as_printed(capsys):
  code = _readme_snippet()
  assert len(code.strip().splitlines()) <= 15 + 2   # the "<= 15 lines" (+ imports)
  namespace = {}
  exec(compile(code, str(README), "exec"), namespace)  # pylint: disable=exec-used
  out = capsys.readouterr().out
  assert "-DP for add/remove one user" in out
  trainer = namespace["trainer"]
  assert trainer.clipping == "ghost" and trainer.steps_done == trainer.plan.steps
  assert trainer.epsilon <= 4.0 and trainer.statement()["dp_release"] is True


class _Plain(nnx.Module):
  """Plain nnx layers: no ghost taps."""

  def __init__(self, rngs):
    self.linear = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x):
    return self.linear(x)


def _data(n=300, seed=0):
  rng = np.random.default_rng(seed)
  return ({"x": rng.normal(size=(n, 4)).astype(np.float32), "y": rng.integers(0, 3, n)},
          rng.integers(0, 60, n))


def _loss(model, ex):
  return losses.softmax_cross_entropy(model(ex["x"]), ex["y"])


def test_plain_nnx_layers_fall_back_exactly_and_say_so():
  data, users = _data()
  with pytest.warns(UserWarning, match="no ghost-norm rule for .*linear"):
    trainer = privjax.make_private(_Plain(nnx.Rngs(0)), optax.sgd(0.1), loss_fn=_loss,
                                   data=data, users=users, target_epsilon=3.0,
                                   batch_size=16, steps=3, reproducible_noise_seed=1)
  assert trainer.clipping == "vmap"
  trainer.fit(progress=False)
  assert trainer.steps_done == 3


def test_the_budget_is_enforced_and_the_statement_is_honest():
  data, users = _data()

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.linear = nn.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
      return self.linear(x)

  with warnings.catch_warnings():
    warnings.simplefilter("error")   # privjax layers: no fallback warning
    trainer = privjax.make_private(Net(nnx.Rngs(0)), optax.sgd(0.1), loss_fn=_loss,
                                   data=data, users=users, noise_multiplier=1.0,
                                   sampling_prob=0.2, epsilon_budget=3.0, batch_size=16,
                                   steps=10_000, reproducible_noise_seed=2)
  assert 0 < trainer.plan.steps < 10_000          # the budget caps the steps
  trainer.fit(trainer.plan.steps - 1, progress=False)
  with pytest.raises(ValueError, match="the plan allows"):
    trainer.fit(2, progress=False)
  trainer.fit(1, progress=False)
  assert trainer.epsilon <= 3.0
  statement = trainer.statement()
  assert statement["unit"] == "user" and statement["steps"] == trainer.plan.steps
  assert statement["dp_release"] is False   # reproducible noise: says so


def test_a_secret_run_differs_and_a_workdir_keeps_its_statement(tmp_path):
  data, users = _data()
  kwargs = dict(loss_fn=_loss, data=data, users=users, target_epsilon=3.0,
                batch_size=16, steps=2)

  def fresh():
    class Net(nnx.Module):
      def __init__(self, rngs):
        self.linear = nn.Linear(4, 3, rngs=rngs)

      def __call__(self, x):
        return self.linear(x)
    return Net(nnx.Rngs(0))

  a = privjax.make_private(fresh(), optax.sgd(0.1), workdir=tmp_path, **kwargs)
  b = privjax.make_private(fresh(), optax.sgd(0.1), **kwargs)
  ka = np.asarray(a.fit(progress=False).linear.kernel.get_value())
  kb = np.asarray(b.fit(progress=False).linear.kernel.get_value())
  assert not np.allclose(ka, kb)   # two secrets, two noise draws
  assert (tmp_path / "privacy.json").exists() and (tmp_path / "secret").exists()
  with pytest.raises(ValueError, match="must not reuse"):
    privjax.make_private(fresh(), optax.sgd(0.1), workdir=tmp_path, **kwargs)


def test_bad_data_is_named():
  data, users = _data()
  with pytest.raises(ValueError, match="leading axis"):
    privjax.make_private(_Plain(nnx.Rngs(0)), optax.sgd(0.1), loss_fn=_loss,
                         data={"x": data["x"], "y": data["y"][:10]}, target_epsilon=1.0,
                         batch_size=4, steps=1)
  with pytest.raises(ValueError, match="users.shape"):
    privjax.make_private(_Plain(nnx.Rngs(0)), optax.sgd(0.1), loss_fn=_loss, data=data,
                         users=users[:5], target_epsilon=1.0, batch_size=4, steps=1)

