"""Export a trained run for serving: one-shot pruning, int8 weights, safetensors.

``export(workdir, out)`` writes a self-contained directory that
``load(out)`` turns back into an NNX inference model, with no checkpoint, no
data and no pretrained folder::

  model.safetensors   every model variable (``privjax.compress.serialize``
                      describes the tensors and their encodings)
  config.json         the run's privjax config + the architecture load() needs
  items.json          the item vocabulary: column j of the scores is item j
                      (its title and raw id in the source files)
  tokenizer/          the LLM recommender's tokenizer files (llm only: the
                      family's ``export_files`` in ``privjax.models.registry``)
  privacy.json        the run's privacy statement, copied byte for byte
  manifest.json       what was pruned and quantized, per-layer sparsity, the
                      encoding and size of every tensor, sizes before and
                      after, and the size and sha256 of every file

What a model family exports (its architecture, how to rebuild it, extra
files, the inputs of an export) is its registry entry; nothing here names a
family.

Privacy. Everything done here (prune, then quantize) reads the trained
parameters only (and the public pretrained encoder, titles and tokenizer of
an LLM run): magnitude masks come from the weights, int8 scales from the
weights, and nothing is calibrated on data. Applied to DP-trained parameters
this is post-processing, so the exported model has the guarantee stated in
the run's privacy.json, which is carried unchanged. Calibrating pruning or
quantization on private activations would NOT be post-processing; no
function here does so.

Int8 inference. ``load`` keeps int8 kernels and embedding tables of
``privjax.models.nn`` layers as ``QTensor`` (the layers multiply by int8 values
and scale per channel: ``quantization.qmatmul``); other quantized leaves (the
LLM's cached title embeddings) are dequantized on load. ``dequantize=True``
gives a plain float32 model with the same weights.
"""

import dataclasses
import hashlib
import json
import pathlib
import shutil
import tempfile
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from privjax import config as config_lib
from privjax.compress import pruning
from privjax.compress import quantization
from privjax.compress import serialize
from privjax.data import sequences
from privjax.models import nn
from privjax.models import registry
from privjax.run import evaluate as evaluate_lib
from privjax.run import workload as workload_lib

FORMAT = "privjax-export"
VERSION = 1
DEFAULT_PRUNE_PATTERN = serialize.DEFAULT_PRUNE_PATTERN
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
ITEMS_FILE = "items.json"
PRIVACY_FILE = "privacy.json"
MANIFEST_FILE = "manifest.json"
TOKENIZER_DIR = registry.TOKENIZER_DIR
_RESERVED = (MODEL_FILE, CONFIG_FILE, ITEMS_FILE, PRIVACY_FILE, MANIFEST_FILE)

PRIVACY_NOTE = (
    "Magnitude pruning and weight-only int8 quantization read only the trained "
    "parameters (no data, no calibration): they are post-processing of the "
    "DP-trained model, so privacy.json (copied unchanged from the run) states "
    "the guarantee of this export. Calibrating pruning or quantization on "
    "private activations would not be post-processing; privjax never does it.")


class CorruptExportError(ValueError):
  """An export directory whose files are unreadable or disagree."""


# ---------------------------------------------------------------------------
# Model families (their registry entries) and the inference model.


def _build_abstract(family: str, arch: dict[str, Any]) -> nnx.Module:
  """The model's structure with shapes only (no weights are computed)."""
  if family not in registry.exportable():
    raise ValueError(f"model family {family!r} is not one of "
                     f"{', '.join(registry.exportable())}")
  task = registry.get(family)
  return nnx.eval_shape(lambda: task.from_architecture(arch, nnx.Rngs(0)))


def predict(model: nnx.Module, inputs: dict[str, Any], *,
            exclude: Any = "history") -> jax.Array:
  """Scores ``[B, num_items]`` of a model; items a user has seen score -inf.

  Args:
    model: a loaded (or trained) model of any registered family.
    inputs: ``{"history": int [B, L]}`` for mlp, sasrec and text_seq: item
      ids SHIFTED BY ONE (0 = padding, item ``i`` is ``i + 1``), left-padded,
      most recent last; tokenised histories ``{"input_ids",
      "attention_mask"}`` ``[B, T]`` for the LLM recommender (see
      ``llm_examples.eval_text_inputs``). ``eval_inputs`` makes them.
    exclude: which items never to recommend: ``"history"`` (default: the
      items in ``inputs["history"]``, as evaluation does), a bool
      ``[B, num_items]`` mask, or None (raw scores, seen items included).

  Returns:
    float32 ``[B, num_items]`` scores of 0-based item ids.

  >>> import jax.numpy as jnp
  >>> from privjax.models import mlp
  >>> model = mlp.NextItemMLP(num_items=5, max_len=3, embed_dim=4,
  ...                         hidden_dim=8, rngs=nnx.Rngs(0))
  >>> scores = predict(model, {"history": jnp.array([[0, 1, 2]])})   # items 0 and 1
  >>> scores.shape, bool(jnp.isinf(scores[0, :2]).all())
  ((1, 5), True)
  """
  scores = registry.get(registry.family_of(model)).scores(model, inputs)
  if exclude is None:
    return scores
  if isinstance(exclude, str):
    if exclude != "history":
      raise ValueError(f"exclude={exclude!r} must be 'history', a mask or None")
    if "history" not in inputs:
      raise ValueError("exclude='history' needs inputs['history']; pass a "
                       "[B, num_items] mask (or None) for this model")
    history = jnp.asarray(inputs["history"])
    seen = jnp.zeros(scores.shape, bool).at[
        jnp.arange(scores.shape[0])[:, None], jnp.maximum(history - 1, 0)].max(history > 0)
  else:
    seen = jnp.asarray(exclude, bool)
  return jnp.where(seen, -jnp.inf, scores)


def _int8_paths(model: nnx.Module) -> set[str]:
  """Paths whose layer has an int8 path (privjax.models.nn Linear / Embed weights)."""
  out = set()
  for path, node in nnx.iter_graph(model):
    prefix = "/".join(map(str, path))
    if isinstance(node, nn.Linear):
      out.add(f"{prefix}/kernel")
    elif isinstance(node, nn.Embed):
      out.add(f"{prefix}/embedding")
  return out


def inference_model(model: nnx.Module, tree: dict[str, Any], *,
                    dequantize: bool = False) -> nnx.Module:
  """``model``'s structure with the variables of ``tree`` (e.g. from
  ``serialize.compress``).

  ``QTensor`` leaves stay int8 in ``privjax.models.nn`` Linear kernels and Embed
  tables (the int8 inference path) and are dequantized elsewhere, or
  everywhere with ``dequantize=True``. ``model`` may be abstract
  (``nnx.eval_shape``); it is not modified.

  >>> from privjax.models import mlp
  >>> model = mlp.NextItemMLP(num_items=5, max_len=3, embed_dim=4,
  ...                         hidden_dim=8, rngs=nnx.Rngs(0))
  >>> tree, _ = serialize.compress(nnx.to_pure_dict(nnx.state(model)), int8=True)
  >>> type(inference_model(model, tree).hidden.kernel.get_value()).__name__
  'QTensor'
  """
  keep_int8 = set() if dequantize else _int8_paths(model)
  flat = {p: (v if not isinstance(v, quantization.QTensor) or p in keep_int8
              else quantization.dequantize(v))
          for p, v in serialize.flat(tree).items()}
  graphdef, state = nnx.split(model)
  expected = set(serialize.flat(nnx.to_pure_dict(state)))
  if set(flat) != expected:
    raise ValueError(f"tree does not match the model's variables: missing "
                     f"{sorted(expected - set(flat))[:5]}, unexpected "
                     f"{sorted(set(flat) - expected)[:5]}")
  nnx.replace_by_pure_dict(state, serialize.unflat(flat))
  return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------------
# Export.


def _sha256(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _file_record(path: pathlib.Path) -> dict[str, Any]:
  return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def export(workdir: str | pathlib.Path, out: str | pathlib.Path, *,
           sparsity: float = 0.0, n_m: tuple[int, int] | None = None,
           int8: bool = False, pattern: pruning.Pattern = DEFAULT_PRUNE_PATTERN,
           scope: str = "per_layer", table_scales: str = "row",
           overwrite: bool = False) -> dict[str, Any]:
  """Exports a finished run's latest checkpoint to ``out`` (see module docstring).

  Privacy: post-processing of the run's released parameters; the export
  carries the run's privacy.json unchanged, and it states the guarantee of
  the exported model (pruned and/or quantized or not). The run's privacy.json
  must describe the checkpoint exported (same number of steps), else this
  refuses.

  Args:
    workdir: a privjax run directory (config.json, privacy.json, checkpoints/).
    out: the export directory to create.
    sparsity, n_m, int8, pattern, scope, table_scales: as in
      ``serialize.compress``.
    overwrite: replace an existing ``out``.

  Returns:
    The manifest (also written to ``out/manifest.json``).

  >>> export("runs/quickstart", "exports/quickstart-int8", int8=True)  # doctest: +SKIP
  """
  workdir, out = pathlib.Path(workdir), pathlib.Path(out)
  privacy_src = workdir / PRIVACY_FILE
  if not privacy_src.exists():
    raise FileNotFoundError(
        f"{privacy_src} does not exist: the run has not finished, and an export "
        "must carry the privacy statement of the parameters it holds")
  if out.exists() and any(out.iterdir()) and not overwrite:
    raise FileExistsError(f"export directory {out} exists and is not empty "
                          "(pass overwrite=True / --overwrite)")
  w, params, step = workload_lib.load_trained(workdir)
  statement = json.loads(privacy_src.read_text())
  if statement.get("steps") != step:
    raise ValueError(f"{privacy_src} states steps={statement.get('steps')} but the "
                     f"latest checkpoint is step {step}: the statement would not "
                     "describe the exported parameters")
  model = w.model_with(params)
  family = w.cfg.model.name
  task = registry.get(family)
  if not task.exportable:
    raise ValueError(f"model family {family!r} cannot be exported; "
                     f"supported: {', '.join(registry.exportable())}")
  arch = task.architecture(model)
  extra_files = task.export_files(w.cfg)
  for name in extra_files:
    parts = pathlib.PurePosixPath(name).parts
    if not parts or name in _RESERVED or ".." in parts or parts[0] == "/":
      raise ValueError(f"export file name {name!r} of model family {family!r} must "
                       f"be a relative path other than {_RESERVED}")
  state = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
  tree, report = serialize.compress(state, sparsity=sparsity, n_m=n_m, int8=int8,
                                    pattern=pattern, scope=scope,
                                    table_scales=table_scales)
  tensors, entries = serialize.encode(tree)
  float_tensors = {p: np.asarray(v, np.float32)
                   for p, v in serialize.flat(state).items()}

  # Written next to ``out`` and renamed at the end: a failed export leaves
  # no half-written directory behind.
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
  try:
    safetensors.numpy.save_file(tensors, str(tmp / MODEL_FILE),
                                metadata={"format": FORMAT, "version": str(VERSION)})
    float_bytes = len(safetensors.numpy.save(
        float_tensors, metadata={"format": FORMAT, "version": str(VERSION)}))
    (tmp / CONFIG_FILE).write_text(json.dumps({
        "format": FORMAT, "version": VERSION,
        "model": {"family": family, "num_items": int(w.ds.num_items),
                  "architecture": arch},
        "privjax_config": config_lib.to_dict(w.cfg)}, indent=2, sort_keys=True))
    (tmp / ITEMS_FILE).write_text(json.dumps({
        "dataset": w.ds.name, "num_items": int(w.ds.num_items),
        "titles": list(w.ds.item_titles),
        "raw_item_ids": list(w.ds.raw_item_ids)}, ensure_ascii=False))
    shutil.copyfile(privacy_src, tmp / PRIVACY_FILE)
    for name, src in extra_files.items():
      (tmp / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copyfile(src, tmp / name)
    files = {str(p.relative_to(tmp)): _file_record(p)
             for p in sorted(tmp.rglob("*")) if p.is_file()}
    model_bytes = files[MODEL_FILE]["bytes"]
    manifest = {
        "format": FORMAT, "version": VERSION,
        "source": {"workdir": str(workdir.resolve()), "checkpoint_step": int(step),
                   "model_family": family},
        "privacy": {"statement": PRIVACY_FILE, "private": statement.get("private"),
                    "epsilon": statement.get("epsilon"),
                    "delta": statement.get("delta"), "unit": statement.get("unit"),
                    "note": PRIVACY_NOTE},
        "pruning": None if report["pruned"] is None else {
            "sparsity": sparsity or None, "n_m": list(n_m) if n_m else None,
            "scope": scope, "pattern": _pattern_json(pattern),
            "per_layer": {k.removeprefix("sparsity/"): v
                          for k, v in report["pruned"].items()
                          if k not in ("sparsity/total", "sparsity/all_params")},
            "total": report["pruned"]["sparsity/total"],
            "all_params": report["pruned"]["sparsity/all_params"]},
        "quantization": None if report["quantized"] is None else {
            "scheme": "int8 symmetric, per channel, weight-only "
                      "(privjax.compress.quantization); scales from the weights, no "
                      "calibration data",
            "table_scales": table_scales,
            "channel_axis": report["quantized"]},
        "public_tensors": registry.get(family).public_state,
        "tensors": entries,
        "sizes": {"float32_safetensors_bytes": float_bytes,
                  "model_safetensors_bytes": model_bytes,
                  "ratio": model_bytes / float_bytes,
                  "total_bytes": sum(f["bytes"] for f in files.values())},
        "files": files,
    }
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    if out.exists():
      shutil.rmtree(out)
    tmp.rename(out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return manifest


def _pattern_json(pattern) -> list[str]:
  patterns = (pattern,) if isinstance(pattern, str) or hasattr(pattern, "pattern") else pattern
  return [p.pattern if hasattr(p, "pattern") else str(p) for p in patterns]


# ---------------------------------------------------------------------------
# Load.


def _read_json(path: pathlib.Path) -> dict[str, Any]:
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing: not a complete privjax export")
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CorruptExportError(f"{path}: not valid JSON ({e})") from None


def is_export_dir(path: str | pathlib.Path) -> bool:
  """Whether ``path`` looks like an export (has a manifest.json), not a run."""
  return (pathlib.Path(path) / MANIFEST_FILE).is_file()


def load(out: str | pathlib.Path, *, dequantize: bool = False
         ) -> tuple[nnx.Module, dict[str, Any]]:
  """Rebuilds the inference model of an export, from the export alone.

  Every file the manifest lists is checked (present, size, sha256) before
  anything is read, then every tensor against the manifest and the model that
  config.json describes. Any disagreement raises ``FileNotFoundError`` or
  ``CorruptExportError`` naming the file.

  Args:
    out: an export directory.
    dequantize: float32 weights everywhere instead of int8 in the layers.

  Returns:
    ``(model, metadata)``; metadata holds ``config`` (the privjax Config),
    ``family``, ``num_items``, ``items`` (items.json), ``privacy``
    (privacy.json), ``manifest`` and the family's ``export_metadata`` (for
    the LLM, ``tokenizer_dir``).

  >>> model, meta = load("exports/quickstart-int8")  # doctest: +SKIP
  """
  out = pathlib.Path(out)
  if not out.is_dir():
    raise FileNotFoundError(f"export directory {out} does not exist")
  manifest = _read_json(out / MANIFEST_FILE)
  if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
    raise CorruptExportError(f"{out / MANIFEST_FILE}: format "
                             f"{manifest.get('format')!r} version "
                             f"{manifest.get('version')!r}, expected {FORMAT!r} "
                             f"version {VERSION}")
  for name, record in manifest["files"].items():
    path = out / name
    if not path.is_file():
      raise FileNotFoundError(f"{path} is missing (listed in {MANIFEST_FILE})")
    size = path.stat().st_size
    if size != record["bytes"]:
      raise CorruptExportError(f"{path} has {size} bytes; {MANIFEST_FILE} "
                               f"records {record['bytes']} (truncated or modified)")
    if _sha256(path) != record["sha256"]:
      raise CorruptExportError(f"{path}: sha256 differs from {MANIFEST_FILE} "
                               "(corrupt or modified)")
  config = _read_json(out / CONFIG_FILE)
  try:
    family = config["model"]["family"]
    abstract = _build_abstract(family, config["model"]["architecture"])
    run_config = config_lib.from_dict(config["privjax_config"])
  except (KeyError, TypeError, ValueError) as e:
    raise CorruptExportError(f"{out / CONFIG_FILE}: does not describe a model "
                             f"({type(e).__name__}: {e})") from None
  expected = {p: tuple(v.shape) for p, v in
              serialize.flat(nnx.to_pure_dict(nnx.state(abstract))).items()}
  entries = manifest["tensors"]
  if set(entries) != set(expected):
    raise CorruptExportError(
        f"{out / MANIFEST_FILE} lists tensors that do not match the model "
        f"{out / CONFIG_FILE} describes: missing "
        f"{sorted(set(expected) - set(entries))[:5]}, unexpected "
        f"{sorted(set(entries) - set(expected))[:5]}")
  model_file = out / MODEL_FILE
  try:
    tensors = safetensors.numpy.load_file(str(model_file))
  except (safetensors.SafetensorError, OSError, ValueError) as e:
    raise CorruptExportError(f"{model_file}: not a readable safetensors file "
                             f"({e})") from None
  flat = {}
  for path, entry in entries.items():
    if tuple(entry["shape"]) != expected[path]:
      raise CorruptExportError(
          f"{out / MANIFEST_FILE}: tensor {path!r} has shape {tuple(entry['shape'])}"
          f" but the model in {out / CONFIG_FILE} needs {expected[path]}")
    try:
      flat[path] = serialize.decode(path, entry, tensors, file=model_file,
                                    entries_file=MANIFEST_FILE)
    except serialize.DecodeError as e:
      raise CorruptExportError(str(e)) from None
  model = inference_model(abstract, serialize.unflat(flat), dequantize=dequantize)
  metadata = {
      "config": run_config,
      "family": family, "num_items": config["model"]["num_items"],
      "items": _read_json(out / ITEMS_FILE),
      "privacy": _read_json(out / PRIVACY_FILE), "manifest": manifest,
      **registry.get(family).export_metadata(out)}
  return model, metadata


# ---------------------------------------------------------------------------
# Evaluation of an export (for the researcher: touches the private data).


def evaluate(out: str | pathlib.Path, *, which: tuple[str, ...] = ("valid", "test"),
             data_path: str | None = None, dequantize: bool = False
             ) -> dict[str, Any]:
  """Full-ranking HR@k / NDCG@k of an export, with the trainer's protocol.

  Loads the data from the export's config (``data_path`` overrides
  ``config.data.path``), splits it leave-last-out and scores each user with
  ``predict``. Like ``scripts/evaluate.py`` on a run, this reads private data
  and releases only the metrics, which privacy.json does not cover.
  """
  model, meta = load(out, dequantize=dequantize)
  cfg = meta["config"]
  if data_path is not None:
    cfg = config_lib.replace(cfg, **{"data.path": str(data_path)})
  ds = workload_lib.load_dataset(cfg.data)
  if ds.num_items != meta["num_items"] or (
      tuple(ds.item_titles) != tuple(meta["items"]["titles"])):
    raise ValueError(f"the data at config.data.path={cfg.data.path!r} has "
                     f"{ds.num_items} items whose titles differ from "
                     f"{pathlib.Path(out) / ITEMS_FILE} ({meta['num_items']} items)")
  graphdef, state = nnx.split(model)
  task = registry.get(meta["family"])
  inputs_fn = task.export_inputs(meta, None)  # loads a tokenizer once, if any
  task = dataclasses.replace(
      task, eval_inputs=lambda cfg, es, ds, model: inputs_fn(es))
  # Raw scores: the ranking protocol excludes seen items itself.
  score_fn = jax.jit(lambda params, frozen, inputs: predict(
      nnx.merge(graphdef, params), inputs, exclude=None))
  w = workload_lib.Workload(cfg, ds, sequences.leave_last_out(ds), task, model,
                       graphdef, state, nnx.State({}), None, score_fn)
  return {"step": meta["manifest"]["source"]["checkpoint_step"],
          **{split: evaluate_lib.evaluate(w, state, nnx.State({}), split)
             for split in which}}


def eval_inputs(metadata: dict[str, Any], eval_set: sequences.EvalSet,
                tokenizer=None) -> dict[str, np.ndarray]:
  """The ``predict`` inputs of an ``EvalSet`` for a loaded export.

  Histories for mlp / sasrec; for the LLM recommender, the histories rendered
  as titles (items.json) and tokenised with the export's tokenizer
  (``tokenizer`` reuses one already loaded). The family's ``export_inputs``.
  """
  return registry.get(metadata["family"]).export_inputs(metadata, tokenizer)(eval_set)
