"""The model-family registry: a family registered from outside trains,
evaluates and exports; trainable subsets get updates and noise, nothing else."""

import dataclasses
import json
import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from privjax import config as config_lib
from privjax import export
from privjax.compress import quantization
from privjax.compress import serialize
from privjax.data import sequences
from privjax.dp import step as dp_step
from privjax.dp import noise
from privjax.models import bert
from privjax.models import llm_rec
from privjax.models import losses
from privjax.models import mlp
from privjax.models import nn
from privjax.models import registry
from privjax.models import sasrec
from privjax.run import train as train_lib
from privjax.run import workload as workload_lib


class _BagOfItems(nnx.Module):
  """A family the library does not know: mean item embedding -> scores."""

  def __init__(self, *, num_items: int, embed_dim: int, rngs: nnx.Rngs):
    self.embed = nn.Embed(num_items + 1, embed_dim, rngs=rngs)
    self.out = nn.Linear(embed_dim, num_items, rngs=rngs)

  def __call__(self, history):
    real = (history > 0)[..., None]
    e = jnp.where(real, self.embed(history), 0.0)
    return self.out(e.sum(-2) / jnp.maximum(real.sum(-2), 1))


BAG = registry.Task(
    build_model=lambda cfg, ds, rngs: _BagOfItems(
        num_items=ds.num_items, embed_dim=cfg.model.embed_dim, rngs=rngs),
    train_examples=lambda cfg, split, ds, model: sequences.next_item_examples(
        split.train, cfg.data.max_len),
    loss=lambda cfg: lambda model, ex, rng: losses.softmax_cross_entropy(
        model(ex["history"]), ex["target"]),
    eval_inputs=lambda cfg, es, ds, model: {"history": es.history},
    scores=lambda model, inputs: model(inputs["history"]),
    describe_example=lambda cfg: "one (history, next item) pair of the bag family",
    model_type=_BagOfItems,
    architecture=lambda model: {"num_items": model.out.out_features,
                                "embed_dim": model.embed.features},
    from_architecture=lambda arch, rngs: _BagOfItems(**arch, rngs=rngs))


@pytest.fixture
def bag():
  registry.register("bag", BAG)
  yield "bag"
  registry.unregister("bag")


def test_a_registered_family_trains_evaluates_and_exports(bag, tiny_cfg, tmp_path):
  cfg = tiny_cfg(**{"model.name": bag, "privacy.unit": "example"})
  result = train_lib.train_and_evaluate(cfg, tmp_path / "run", show_progress=False)
  assert result["steps"] == 6 and math.isfinite(result["epsilon"])
  privacy = json.loads((tmp_path / "run" / "privacy.json").read_text())
  assert privacy["unit_description"] == "one (history, next item) pair of the bag family"
  w, params, step = workload_lib.load_trained(tmp_path / "run")
  trained = w.model_with(params)
  assert type(trained) is _BagOfItems and step == 6
  initial = serialize.flat(w.params)
  assert any(not np.array_equal(np.asarray(v), np.asarray(initial[p]))
             for p, v in serialize.flat(params).items())  # it trained

  manifest = export.export(tmp_path / "run", tmp_path / "out", int8=True)
  assert manifest["source"]["model_family"] == bag
  loaded, meta = export.load(tmp_path / "out")
  assert type(loaded) is _BagOfItems and meta["family"] == bag
  assert isinstance(loaded.out.kernel.get_value(), quantization.QTensor)
  es = sequences.eval_set(w.split, "test", cfg.data.max_len)
  inputs = export.eval_inputs(meta, es)
  np.testing.assert_array_equal(inputs["history"], es.history)
  in_memory = export.inference_model(trained, serialize.compress(
      nnx.to_pure_dict(nnx.state(trained)), int8=True)[0])
  np.testing.assert_allclose(np.asarray(export.predict(loaded, inputs, exclude=None)),
                             np.asarray(in_memory(inputs["history"])),
                             rtol=1e-5, atol=1e-5)
  # A float export evaluates to the run's own numbers, from the export alone.
  export.export(tmp_path / "run", tmp_path / "float")
  got = export.evaluate(tmp_path / "float", which=("test",))
  assert got["test"] == pytest.approx(result["test"])


def test_validation_consults_the_registry(tiny_cfg):
  cfg = tiny_cfg(**{"model.name": "bag"})
  with pytest.raises(ValueError, match=r"config.model.name='bag' must be one of "
                     r"\['mlp', 'sasrec', 'llm'"):
    config_lib.validate(cfg)
  registry.register("bag", BAG)
  try:
    config_lib.validate(cfg)
    assert registry.names()[-1] == "bag" and "bag" in registry.exportable()
  finally:
    registry.unregister("bag")
  with pytest.raises(ValueError, match="model.name='bag'"):
    config_lib.validate(cfg)


def test_register_refuses_what_it_cannot_run():
  with pytest.raises(ValueError, match="'mlp' is already registered"):
    registry.register("mlp", BAG)
  with pytest.raises(TypeError, match="registry.Task"):
    registry.register("bag", object())
  with pytest.raises(ValueError, match="non-empty str"):
    registry.register("", BAG)
  assert "bag" not in registry.names()
  with pytest.raises(ValueError, match="together"):
    registry.Task(build_model=BAG.build_model, train_examples=BAG.train_examples,
                  loss=BAG.loss, eval_inputs=BAG.eval_inputs, scores=BAG.scores,
                  model_type=_BagOfItems)
  # A family without the export fields trains but does not export.
  plain = registry.Task(build_model=BAG.build_model, train_examples=BAG.train_examples,
                        loss=BAG.loss, eval_inputs=BAG.eval_inputs, scores=BAG.scores)
  assert not plain.exportable and registry.MLP.exportable


def test_family_of_finds_the_family_by_model_class(bag):
  llm_arch = {"bert": dataclasses.asdict(bert.BertConfig.tiny()), "num_items": 5,
              "lora_targets": ["query", "value"]}
  builds = {
      "mlp": lambda: mlp.NextItemMLP(num_items=5, max_len=3, embed_dim=4,
                                     hidden_dim=8, rngs=nnx.Rngs(0)),
      "sasrec": lambda: sasrec.SASRec(sasrec.SASRecConfig.tiny(num_items=5),
                                      rngs=nnx.Rngs(0)),
      "llm": lambda: registry.get("llm").from_architecture(llm_arch, nnx.Rngs(0)),
      bag: lambda: _BagOfItems(num_items=5, embed_dim=4, rngs=nnx.Rngs(0)),
  }
  models = {family: nnx.eval_shape(build) for family, build in builds.items()}
  for family, model in models.items():
    assert registry.family_of(model) == family
  with pytest.raises(TypeError, match="RecHead is not an exportable model"):
    registry.family_of(models["llm"].head)


def test_architecture_round_trips_through_json():
  """What export writes in config.json rebuilds the same structure."""
  for family, model in [
      ("mlp", mlp.NextItemMLP(num_items=5, max_len=3, embed_dim=4, hidden_dim=8,
                              rngs=nnx.Rngs(0))),
      ("sasrec", sasrec.SASRec(sasrec.SASRecConfig.tiny(num_items=5), rngs=nnx.Rngs(0))),
      ("llm", llm_rec.build_random(bert.BertConfig.tiny(), num_items=5, lora_rank=2,
                                   use_id_head=True, rngs=nnx.Rngs(0)))]:
    task = registry.get(family)
    arch = json.loads(json.dumps(task.architecture(model)))
    rebuilt = nnx.eval_shape(lambda: task.from_architecture(arch, nnx.Rngs(0)))
    shapes = lambda m: {p: v.shape for p, v in
                        serialize.flat(nnx.to_pure_dict(nnx.state(m))).items()}
    assert shapes(rebuilt) == shapes(model), family
    assert type(rebuilt) is type(model)


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("scheme", ["lora", "last_k", "head"])
def test_dp_step_moves_only_the_trainable_subset(scheme):
  model = llm_rec.build_random(bert.BertConfig.tiny(), num_items=9,
                               lora_rank=2 if scheme == "lora" else 0,
                               rngs=nnx.Rngs(0))
  before = _flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  filt = llm_rec.trainable_filter(scheme, num_layers=model.config.bert.num_layers,
                                  last_k=1)
  graphdef, params, frozen = nnx.split(model, filt, ...)
  params, frozen = nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)

  def loss_fun(p, f, ex, rng):
    return llm_rec.loss(nnx.merge(graphdef, nnx.State(p), nnx.State(f)), ex, rng)

  rng = np.random.default_rng(0)
  batch = {"input_ids": jnp.asarray(rng.integers(1, 99, (4, 1, 6)), jnp.int32),
           "attention_mask": jnp.ones((4, 1, 6), jnp.int32),
           "target": jnp.asarray(rng.integers(0, 9, (4, 1)), jnp.int32)}
  opt = optax.sgd(0.5)
  step = dp_step.make_step(loss_fun, opt, dp_step.StepConfig(
      l2_clip_norm=1.0, noise_multiplier=2.0, expected_batch_size=4.0))
  state, _ = step(dp_step.init_state(params, opt), frozen, batch, jnp.ones((4, 1)),
                  noise.KeyStreams(jax.random.key(0)).noise_key(0))
  trained = {**_flat(frozen), **_flat(state.params)}
  trainable_paths = set(_flat(params))
  assert trainable_paths, scheme
  moved = {p for p in before if not np.array_equal(before[p], trained[p])}
  # Every trainable leaf moves (noise alone guarantees it); nothing else does.
  assert moved == trainable_paths
  if scheme == "lora":
    assert all("lora" in p or "head" in p for p in trainable_paths)
    assert any("base" in p for p in before if p not in trainable_paths)
  if scheme == "head":
    assert all(p.startswith("['head']") for p in trainable_paths)
  if scheme == "last_k":
    enc = [p for p in trainable_paths if p.startswith("['encoder']")]
    assert enc and all("['layers'][1]" in p for p in enc)
