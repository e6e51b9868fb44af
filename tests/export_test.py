"""Export -> load round trips on tiny synthetic runs (mlp, sasrec; llm with a
tiny random BERT and the MiniLM tokenizer)."""

import dataclasses
import functools
import json
import math
import pathlib
import shutil
import struct

from flax import nnx
import jax
import numpy as np
import pytest
import safetensors.numpy

from privjax.dp import secret as secret_lib

from privjax import config as config_lib
from privjax import export
from privjax.compress import quantization
from privjax.compress import serialize
from privjax.run import train as train_lib
from privjax.run import workload as workload_lib
from privjax.data import sequences
from privjax.models import bert
from privjax.models import bert_hf
from privjax.models import llm_examples
from privjax.models import llm_rec

FAMILIES = ("mlp", "sasrec")


def _cfg(family):
  # The sasrec run is not private: it costs less to compile, and its export
  # must carry a statement saying so just as faithfully.
  return config_lib.Config(
      name=f"tiny-{family}",
      data=config_lib.DataConfig(num_users=120, num_items=40, mean_interactions=8,
                                 max_len=4, max_examples_per_user=2),
      model=config_lib.ModelConfig(name=family, embed_dim=8, hidden_dim=16,
                                   num_layers=1, num_heads=1),
      # A fixed sigma: no calibration, the run is as fast as it gets.
      privacy=config_lib.PrivacyConfig(enabled=family == "mlp", noise_multiplier=1.0,
                                       sampling_prob=0.15),
      train=config_lib.TrainConfig(steps=2, batch_size=16, learning_rate=1e-2,
                                   log_every=2, checkpoint_every=0),
      eval=config_lib.EvalConfig(batch_size=128))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """family -> (run dir, trained model, eval inputs, test metrics)."""
  out = {}
  for family in FAMILIES:
    workdir = tmp_path_factory.mktemp(f"run-{family}")
    result = train_lib.train_and_evaluate(_cfg(family), workdir, show_progress=False)
    w, params, _ = workload_lib.load_trained(workdir)
    es = sequences.eval_set(w.split, "test", w.cfg.data.max_len)
    out[family] = (workdir, w.model_with(params), {"history": es.history},
                   result["test"])
  return out


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory):
  """(family, variant) -> (export dir, manifest); exported once per module."""
  variants = {"float": {}, "int8": {"int8": True}, "sparse": {"sparsity": 0.8},
              "sparse-int8": {"sparsity": 0.8, "int8": True}, "2:4": {"n_m": (2, 4)}}
  root = tmp_path_factory.mktemp("exports")
  out = {}
  for family in FAMILIES:
    for name, kwargs in variants.items():
      if family == "sasrec" and name not in ("float", "int8"):
        continue
      path = root / f"{family}-{name.replace(':', '_')}"
      out[family, name] = (path, export.export(runs[family][0], path, **kwargs))
  return out


@functools.partial(jax.jit, static_argnums=0)
def _predict_jit(graphdef, state, inputs):
  return export.predict(nnx.merge(graphdef, state), inputs, exclude=None)


def _scores(model, inputs):
  """``export.predict``, compiled once per model structure (eager dispatch of
  every op is what made these tests slow)."""
  return np.asarray(_predict_jit(*nnx.split(model), inputs))


def _state(model):
  return nnx.to_pure_dict(nnx.state(model))


def _flat(model):
  return serialize.flat(_state(model))


@pytest.mark.parametrize("family", FAMILIES)
def test_float_export_loads_to_the_trained_model(runs, exports, family):
  _, model, inputs, _ = runs[family]
  loaded, meta = export.load(exports[family, "float"][0])
  assert type(loaded) is type(model)
  assert meta["family"] == family and meta["num_items"] == 40
  np.testing.assert_allclose(_scores(loaded, inputs),
                             _scores(model, inputs), rtol=1e-5, atol=1e-5)
  for path, value in _flat(model).items():
    np.testing.assert_array_equal(np.asarray(_flat(loaded)[path]), np.asarray(value),
                                  err_msg=path)


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_export_predicts_as_the_in_memory_quantized_model(runs, exports, family):
  _, model, inputs, _ = runs[family]
  tree, report = serialize.compress(_state(model), int8=True)
  in_memory = export.inference_model(model, tree)
  loaded, _ = export.load(exports[family, "int8"][0])
  # The int8 path is what runs: the layers hold QTensors, not float weights.
  kernels = [v for p, v in _flat(loaded).items() if p.endswith(("kernel", "embedding"))]
  assert kernels and all(isinstance(v, quantization.QTensor) for v in kernels)
  assert set(report["quantized"]) == {p for p, v in _flat(model).items()
                                      if np.ndim(v) == 2}
  got, want = _scores(loaded, inputs), _scores(in_memory, inputs)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # ...a different model from the float one (the scores move)...
  assert np.max(np.abs(np.asarray(got) - np.asarray(_scores(model, inputs)))) > 0
  # ...whose weights are the float ones rounded: within scale / 2 per element.
  plain, _ = export.load(exports[family, "int8"][0], dequantize=True)
  trained = _flat(model)
  for path, q in _flat(loaded).items():
    if isinstance(q, quantization.QTensor):
      half = np.expand_dims(np.asarray(q.scale) / 2, 1 - q.channel_axis)
      err = np.abs(np.asarray(_flat(plain)[path]) - np.asarray(trained[path]))
      assert np.all(err <= half * (1 + 2 ** -15)), path
  # dequantize=True: the same weights as float32 arrays, the same scores.
  assert not any(isinstance(v, quantization.QTensor) for v in _flat(plain).values())
  np.testing.assert_allclose(_scores(plain, inputs), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,variant", [
    ("mlp", "float"), ("mlp", "int8"), ("mlp", "sparse-int8"), ("mlp", "2:4"),
    ("sasrec", "int8")])
def test_privacy_json_is_carried_byte_for_byte(runs, exports, family, variant):
  run_dir = runs[family][0]
  path, manifest = exports[family, variant]
  assert (path / "privacy.json").read_bytes() == (run_dir / "privacy.json").read_bytes()
  statement = json.loads((run_dir / "privacy.json").read_text())
  assert statement["private"] == (family == "mlp")
  assert manifest["privacy"]["private"] == statement["private"]
  assert manifest["privacy"]["epsilon"] == statement["epsilon"]
  assert "post-processing" in manifest["privacy"]["note"]


def test_an_export_never_carries_the_run_secret(runs, exports):
  run_dir = runs["mlp"][0]
  key = secret_lib.RunSecret.load(run_dir).key.hex()
  for (family, _), (path, _) in exports.items():
    assert not (path / secret_lib.SECRET_DIR).exists()
    for f in path.rglob("*"):
      if f.is_file():
        assert key not in f.read_bytes().decode("utf-8", errors="replace"), f


def _header_bytes(path):
  with open(path, "rb") as f:
    return 8 + struct.unpack("<Q", f.read(8))[0]


@pytest.mark.parametrize("variant", ["float", "int8", "sparse", "sparse-int8", "2:4"])
def test_manifest_sizes_are_the_file_sizes(exports, variant):
  path, manifest = exports["mlp", variant]
  sizes, model_file = manifest["sizes"], path / "model.safetensors"
  assert sizes["model_safetensors_bytes"] == model_file.stat().st_size
  assert sum(e["bytes"] for e in manifest["tensors"].values()) == (
      model_file.stat().st_size - _header_bytes(model_file))
  # "before" is exactly what the uncompressed float export weighs.
  assert sizes["float32_safetensors_bytes"] == (
      exports["mlp", "float"][0] / "model.safetensors").stat().st_size
  assert sizes["total_bytes"] == sum(
      p.stat().st_size for p in path.rglob("*") if p.is_file()
      and p.name != "manifest.json")
  for name, record in manifest["files"].items():
    assert (path / name).stat().st_size == record["bytes"], name


def test_int8_tensors_cost_one_byte_per_weight_plus_a_scale_per_channel(exports):
  _, manifest = exports["mlp", "int8"]
  float_bytes = int8_bytes = 0
  for path, entry in manifest["tensors"].items():
    if entry["channel_axis"] is None:
      assert entry["bytes"] == entry["float32_bytes"], path  # biases stay float32
      continue
    shape = entry["shape"]
    channels = shape[entry["channel_axis"]]
    assert entry["dtype"] == "int8" and entry["storage"] == "dense"
    assert entry["bytes"] == math.prod(shape) + 4 * channels, path
    float_bytes += entry["float32_bytes"]
    int8_bytes += entry["bytes"]
  # 1/4 plus one float32 per channel; the channels here hold >= 8 weights, so
  # at most 1/4 + 1/8 (a width-64 model gives <= 26.6%: see docs_deployment.md).
  # (The whole file of this tiny model is ~46%: its safetensors header, one
  # JSON entry per tensor, is as large as the weights.)
  assert int8_bytes / float_bytes <= 0.25 + 1 / 8


def test_pruned_export_has_exact_sparsity_and_is_stored_compactly(runs, exports):
  _, model, _, _ = runs["mlp"]
  path, manifest = exports["mlp", "sparse"]
  loaded, _ = export.load(path)
  trained, got = _flat(model), _flat(loaded)
  per_layer = manifest["pruning"]["per_layer"]
  assert sorted(per_layer) == sorted(p for p in trained if p.endswith(
      ("kernel", "embedding")))
  for leaf, value in got.items():
    value, n = np.asarray(value), np.size(value)
    if leaf in per_layer:
      zeros = int(np.sum(value == 0))
      assert zeros == math.floor(round(0.8 * n, 6)), leaf
      assert per_layer[leaf] == zeros / n
      kept = value != 0
      np.testing.assert_array_equal(value[kept], np.asarray(trained[leaf])[kept])
      # The smallest magnitudes went: every kept weight >= every pruned one.
      assert np.abs(np.asarray(trained[leaf])[kept]).min() >= np.abs(
          np.asarray(trained[leaf])[~kept]).max()
      assert manifest["tensors"][leaf]["storage"] == "bitmask"
      assert manifest["tensors"][leaf]["bytes"] == (n - zeros) * 4 + (n + 7) // 8
    else:
      np.testing.assert_array_equal(value, np.asarray(trained[leaf]), err_msg=leaf)
  assert manifest["sizes"]["ratio"] < 0.5
  # int8 after pruning keeps every pruned weight at exactly zero.
  loaded_q, _ = export.load(exports["mlp", "sparse-int8"][0], dequantize=True)
  for leaf in per_layer:
    assert np.all(np.asarray(_flat(loaded_q)[leaf])[np.asarray(got[leaf]) == 0] == 0)


def test_n_m_export_keeps_n_of_every_m_along_the_input_axis(exports):
  loaded, _ = export.load(exports["mlp", "2:4"][0])
  for leaf, value in _flat(loaded).items():
    value = np.asarray(value)
    if leaf.endswith("kernel"):      # [in, out]: blocks of 4 input rows
      blocks = value.reshape(-1, 4, value.shape[1])
      assert np.all(np.sum(blocks != 0, axis=1) == 2), leaf
    elif leaf.endswith("embedding"):  # [num, dim]: blocks of 4 dims in a row
      blocks = value.reshape(value.shape[0], -1, 4)
      assert np.all(np.sum(blocks != 0, axis=2) == 2), leaf


def test_evaluating_the_float_export_reproduces_the_run(runs, exports):
  for family in FAMILIES:
    got = export.evaluate(exports[family, "float"][0], which=("test",))
    assert got["test"] == pytest.approx(runs[family][3]), family


def test_an_llm_export_carries_its_tokenizer_and_reproduces_the_run(tmp_path,
                                                                   tiny_pretrained):
  pretrained = tiny_pretrained
  cfg = config_lib.replace(
      _cfg("sasrec"), name="tiny-llm",
      **{"model.name": "llm", "model.pretrained": str(pretrained),
         "model.trainable": "lora", "model.lora_rank": 2, "model.max_tokens": 24,
         "model.max_history_items": 4})
  result = train_lib.train_and_evaluate(cfg, tmp_path / "run", show_progress=False)
  manifest = export.export(tmp_path / "run", tmp_path / "float")
  tokenizer_files = sorted(n for n in manifest["files"] if n.startswith("tokenizer/"))
  # The tokenizer files the pretrained folder has (its HF config.json included).
  assert tokenizer_files == [
      "tokenizer/config.json", "tokenizer/special_tokens_map.json",
      "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.txt"]
  for name in tokenizer_files:
    assert ((tmp_path / "float" / name).read_bytes()
            == (pretrained / name.removeprefix("tokenizer/")).read_bytes())
  loaded, meta = export.load(tmp_path / "float")
  assert isinstance(loaded, llm_rec.LLMRecommender) and meta["family"] == "llm"
  assert loaded.config.lora_rank == 2
  assert meta["tokenizer_dir"] == tmp_path / "float" / "tokenizer"
  w, _, _ = workload_lib.load_trained(tmp_path / "run")
  es = sequences.eval_set(w.split, "test", cfg.data.max_len)
  want = llm_examples.eval_text_inputs(
      es, w.ds.item_titles, bert_hf.load_tokenizer(pretrained), max_tokens=24, max_items=4)
  got = export.eval_inputs(meta, es)
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)
  assert export.evaluate(tmp_path / "float", which=("test",))["test"] == pytest.approx(
      result["test"])
  # int8: Linear kernels stay int8, the cached title embeddings are dequantized.
  export.export(tmp_path / "run", tmp_path / "int8", int8=True)
  loaded_q, _ = export.load(tmp_path / "int8")
  assert isinstance(loaded_q.head.item_proj.kernel.get_value(), quantization.QTensor)
  assert not isinstance(loaded_q.head.title_embeddings.get_value(), quantization.QTensor)


def _script(name, *args):
  import subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  return subprocess.run([sys.executable, str(pathlib.Path(__file__).parents[1] / "scripts"
                                             / f"{name}.py"), *map(str, args)],
                        capture_output=True, text=True, check=False)


def test_scripts_export_and_evaluate_an_export(runs, tmp_path):
  out = tmp_path / "e"
  run = _script("export", "--workdir", runs["mlp"][0], "--out", out, "--sparsity", "0.5",
                "--int8")
  assert run.returncode == 0, run.stderr
  assert "model.safetensors" in run.stdout and "-DP at the level of one user" in run.stdout
  assert "post-processing" in run.stdout
  run = _script("export", "--workdir", runs["mlp"][0], "--out", out)
  assert run.returncode == 2 and "exists" in run.stderr
  run = _script("evaluate", "--workdir", out, "--json")
  assert run.returncode == 0, run.stderr
  result = json.loads(run.stdout)
  assert set(result) == {"step", "valid", "test"} and result["step"] == 2
  # A non-private run's export says so.
  run = _script("export", "--workdir", runs["sasrec"][0], "--out", tmp_path / "s")
  assert run.returncode == 0 and "privacy: NONE" in run.stdout


# ---------------------------------------------------------------- bad inputs


@pytest.fixture
def broken(exports, tmp_path):
  """A fresh copy of the mlp float export to break."""
  path = tmp_path / "copy"
  shutil.copytree(exports["mlp", "float"][0], path)
  return path


def _rewrite_manifest(path, edit):
  manifest = json.loads((path / "manifest.json").read_text())
  edit(manifest)
  (path / "manifest.json").write_text(json.dumps(manifest))


def _record(path, name):
  def edit(manifest):
    manifest["files"][name]["bytes"] = (path / name).stat().st_size
    manifest["files"][name]["sha256"] = export._sha256(path / name)  # pylint: disable=protected-access
  return edit


@pytest.mark.parametrize("name", ["manifest.json", "model.safetensors", "config.json",
                                  "privacy.json", "items.json"])
def test_a_missing_file_is_named(broken, name):
  (broken / name).unlink()
  with pytest.raises(FileNotFoundError, match=name):
    export.load(broken)


def test_a_missing_directory_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    export.load(tmp_path / "nowhere")


def test_a_truncated_or_altered_model_file_is_named(broken):
  model_file = broken / "model.safetensors"
  data = model_file.read_bytes()
  model_file.write_bytes(data[:len(data) // 2])
  with pytest.raises(export.CorruptExportError, match="model.safetensors.*truncated"):
    export.load(broken)
  # Even with a manifest that agrees, the safetensors reader's error is named.
  _rewrite_manifest(broken, _record(broken, "model.safetensors"))
  with pytest.raises(export.CorruptExportError,
                     match="model.safetensors: not a readable safetensors"):
    export.load(broken)
  model_file.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
  _rewrite_manifest(broken, lambda m: m["files"]["model.safetensors"].update(
      bytes=len(data)))
  with pytest.raises(export.CorruptExportError, match="model.safetensors: sha256"):
    export.load(broken)


def test_manifest_and_model_disagreeing_are_named(broken):
  def bad_shape(manifest):
    manifest["tensors"]["hidden/kernel"]["shape"] = [3, 3]
  _rewrite_manifest(broken, bad_shape)
  with pytest.raises(export.CorruptExportError, match="manifest.json.*hidden/kernel"):
    export.load(broken)


def test_config_and_tensors_disagreeing_are_named(broken):
  config = json.loads((broken / "config.json").read_text())
  config["model"]["architecture"]["hidden_dim"] = 17
  (broken / "config.json").write_text(json.dumps(config))
  _rewrite_manifest(broken, _record(broken, "config.json"))
  with pytest.raises(export.CorruptExportError, match="hidden/.*config.json"):
    export.load(broken)


def test_export_refuses_a_run_without_its_privacy_statement(runs, tmp_path):
  run = tmp_path / "run"
  shutil.copytree(runs["mlp"][0], run)
  statement = json.loads((run / "privacy.json").read_text())
  (run / "privacy.json").write_text(json.dumps(dict(statement, steps=1)))
  with pytest.raises(ValueError, match="privacy.json states steps=1"):
    export.export(run, tmp_path / "out")
  (run / "privacy.json").unlink()
  with pytest.raises(FileNotFoundError, match="privacy.json"):
    export.export(run, tmp_path / "out")
  assert not (tmp_path / "out").exists()
