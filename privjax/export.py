"""Export a trained run for serving: one-shot pruning, int8 weights, safetensors.

``export(workdir, out)`` writes a self-contained directory that
``load(out)`` turns back into an NNX inference model, with no checkpoint, no
data and no pretrained folder::

  model.safetensors   every model variable (see "Tensors" below)
  config.json         the run's privjax config + the architecture load() needs
  items.json          the item vocabulary: column j of the scores is item j
                      (its title and raw id in the source files)
  tokenizer/          the LLM recommender's tokenizer files (llm only)
  privacy.json        the run's privacy statement, copied byte for byte
  manifest.json       what was pruned and quantized, per-layer sparsity, the
                      encoding and size of every tensor, sizes before and
                      after, and the size and sha256 of every file

Privacy. Everything done here reads the trained parameters only (and the
public pretrained encoder, titles and tokenizer of an LLM run): magnitude
masks come from the weights, int8 scales from the weights, and nothing is
calibrated on data. Applied to DP-trained parameters this is post-processing,
so the exported model has the guarantee stated in the run's privacy.json,
which is carried unchanged. Calibrating pruning or quantization on private
activations would NOT be post-processing; no function here does so.

Order: prune (float), then quantize; a pruned weight quantizes to exactly 0,
so an int8 export keeps at least the pruned sparsity.

Tensors. A leaf with path ``p`` ("/"-joined ``nnx.to_pure_dict`` keys,
e.g. ``blocks/0/qkv/kernel``) is stored as float32 or, quantized, as int8
values plus a float32 per-channel scale ``p:scale`` (``privjax.compress.quantization``
convention: one scale per output unit of a kernel; per row of an embedding
table, or per column with ``table_scales="column"``). An int8 tensor costs
``1/4 + 1/L`` of its float32 size, L the length of a channel (e.g. 26.6% for
width-64 rows). Its values are stored in the smallest of three lossless
encodings:

* ``dense``: tensor ``p``;
* ``bitmask``: ``p:mask`` (uint8, one bit per element, ``np.packbits`` of
  ``value != 0`` in row-major order) and ``p:nz`` (the nonzero values);
* ``coo``: ``p:idx`` (flat row-major indices of the nonzeros, uint16 when the
  tensor has at most 65536 elements, else int32) and ``p:nz``.

For a float32 leaf at sparsity s the bitmask costs ``(4(1-s) + 1/8)`` bytes
per element and pays from s > 1/32; for int8, ``(1-s) + 1/8`` (s > 1/8);
indices beat the bitmask only beyond s = 15/16 (uint16) or 31/32 (int32).
A sparse encoding is used only when it saves more than ``_MIN_SAVING``
bytes (each extra tensor adds a header entry).

Int8 inference. ``load`` keeps int8 kernels and embedding tables of
``privjax.models.nn`` layers as ``QTensor`` (the layers multiply by int8 values
and scale per channel: ``quantization.qmatmul``); other quantized leaves (the
LLM's cached title embeddings) are dequantized on load. ``dequantize=True``
gives a plain float32 model with the same weights.
"""

import dataclasses
import hashlib
import json
import math
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
from privjax.models import nn
from privjax.compress import pruning
from privjax.compress import quantization
from privjax.models import registry
from privjax.run import evaluate as evaluate_lib
from privjax.run import workload as workload_lib
from privjax.data import sequences
from privjax.models import bert
from privjax.models import llm_rec
from privjax.models import mlp
from privjax.models import sasrec

FORMAT = "privjax-export"
VERSION = 1
# Weight matrices: Linear kernels and embedding tables (not the LLM's cached
# title embeddings, which are encoder outputs, not weights).
DEFAULT_PRUNE_PATTERN = ("*kernel", "*embedding")
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
ITEMS_FILE = "items.json"
PRIVACY_FILE = "privacy.json"
MANIFEST_FILE = "manifest.json"
TOKENIZER_DIR = "tokenizer"
# A sparse encoding must save at least this much over dense storage.
_MIN_SAVING = 256
# Tokenizer files copied from the pretrained folder (whichever exist); the HF
# config.json lets AutoTokenizer resolve the class if tokenizer_config.json
# does not name it.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "vocab.txt", "vocab.json",
                    "merges.txt", "added_tokens.json", "spiece.model",
                    "sentencepiece.bpe.model", "config.json")

PRIVACY_NOTE = (
    "Magnitude pruning and weight-only int8 quantization read only the trained "
    "parameters (no data, no calibration): they are post-processing of the "
    "DP-trained model, so privacy.json (copied unchanged from the run) states "
    "the guarantee of this export. Calibrating pruning or quantization on "
    "private activations would not be post-processing; privjax never does it.")


class CorruptExportError(ValueError):
  """An export directory whose files are unreadable or disagree."""


# ---------------------------------------------------------------------------
# Model families: architecture <-> JSON, and an abstract model from it.


def _architecture(family: str, model: nnx.Module) -> dict[str, Any]:
  if family == "mlp":
    return {"num_items": model.num_items, "max_len": model.max_len,
            "embed_dim": model.item_embed.features,
            "hidden_dim": model.hidden.out_features}
  if family in ("sasrec", "llm"):
    return dataclasses.asdict(model.config)
  raise ValueError(f"model family {family!r} cannot be exported; "
                   "supported: mlp, sasrec, llm")


def _build_abstract(family: str, arch: dict[str, Any]) -> nnx.Module:
  """The model's structure with shapes only (no weights are computed)."""
  if family == "mlp":
    fun = lambda: mlp.NextItemMLP(**arch, rngs=nnx.Rngs(0))
  elif family == "sasrec":
    fun = lambda: sasrec.SASRec(sasrec.SASRecConfig(**arch), rngs=nnx.Rngs(0))
  elif family == "llm":
    arch = dict(arch, bert=bert.BertConfig(**arch["bert"]),
                lora_targets=tuple(arch["lora_targets"]))
    config = llm_rec.LLMRecConfig(**arch)

    def fun():
      encoder = bert.BertEncoder(config.bert, with_pooler=False, rngs=nnx.Rngs(0))
      titles = jnp.zeros((config.num_items, config.bert.hidden_size), jnp.float32)
      return llm_rec.LLMRecommender(config, encoder=encoder,
                                    title_embeddings=titles, rngs=nnx.Rngs(0))
  else:
    raise ValueError(f"model family {family!r} is not one of mlp, sasrec, llm")
  return nnx.eval_shape(fun)


def _family_of(model: nnx.Module) -> str:
  if isinstance(model, mlp.NextItemMLP):
    return "mlp"
  if isinstance(model, sasrec.SASRec):
    return "sasrec"
  if isinstance(model, llm_rec.LLMRecommender):
    return "llm"
  raise TypeError(f"{type(model).__name__} is not an exportable model "
                  "(NextItemMLP, SASRec, LLMRecommender)")


def predict(model: nnx.Module, inputs: dict[str, Any]) -> jax.Array:
  """Scores ``[B, num_items]`` of a model, as its task scores for evaluation.

  ``inputs``: ``{"history": int [B, L]}`` (shifted item ids, 0 = padding,
  most recent last) for mlp and sasrec; tokenised histories
  ``{"input_ids", "attention_mask"}`` ``[B, T]`` for the LLM recommender
  (see ``llm_rec.eval_text_inputs``).

  >>> model = mlp.NextItemMLP(num_items=5, max_len=3, embed_dim=4,
  ...                         hidden_dim=8, rngs=nnx.Rngs(0))
  >>> predict(model, {"history": jnp.array([[0, 1, 2]])}).shape
  (1, 5)
  """
  return registry.get(_family_of(model)).scores(model, inputs)


# ---------------------------------------------------------------------------
# In memory: prune, quantize, and put a compressed state into a model.


def _flat(tree) -> dict[str, Any]:
  leaves = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, quantization.QTensor))[0]
  return {jax.tree_util.keystr(k, simple=True, separator="/"): v for k, v in leaves}


def _unflat(flat: dict[str, Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for path, value in flat.items():
    node = out
    parts = path.split("/")
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = value
  return out


TABLE_SCALES = ("row", "column")


def _is_table(path: str) -> bool:
  """An embedding table or the LLM's cached title embeddings: [num, dim]."""
  return path.rsplit("/", 1)[-1] in ("embedding", "title_embeddings")


def _channel_axis_fn(table_scales: str):
  """One scale per output unit of a kernel; per row (item) or per column
  (dimension) of a table."""
  if table_scales not in TABLE_SCALES:
    raise ValueError(f"table_scales={table_scales!r} must be one of {TABLE_SCALES}")
  table_axis = 0 if table_scales == "row" else 1
  return lambda path: table_axis if _is_table(path) else -1


def compress(state: dict[str, Any], *, sparsity: float = 0.0,
             n_m: tuple[int, int] | None = None, int8: bool = False,
             pattern: pruning.Pattern = DEFAULT_PRUNE_PATTERN,
             scope: str = "per_layer", table_scales: str = "row"
             ) -> tuple[dict[str, Any], dict[str, Any]]:
  """One-shot magnitude pruning, then int8 weight-only quantization.

  Post-processing of (DP-trained) parameters: reads the weights only, so it
  costs no privacy budget.

  Args:
    state: the model's variables as a nested dict of arrays
      (``nnx.to_pure_dict(nnx.state(model))``).
    sparsity: fraction of each selected leaf to prune (``scope`` as in
      ``pruning.magnitude_masks``); 0 prunes nothing.
    n_m: ``(N, M)`` structured pruning instead (keep N of every M along the
      input axis); excludes ``sparsity > 0``.
    int8: quantize every 2-D float leaf (kernels, embedding tables, the LLM's
      title cache) to int8 with per-channel scales.
    pattern: leaves to prune (globs / regexes on "/"-joined paths).
    scope: "per_layer" or "global" sparsity.
    table_scales: int8 scales of embedding tables [num, dim]: "row" (one per
      item, the more accurate; costs 4 bytes per row, 1/dim of the float32
      size: 1.6 points for dim 64) or "column" (one per dimension, negligible
      size). Kernels always get one scale per output unit.

  Returns:
    ``(tree, report)``: ``tree`` like ``state`` with ``QTensor`` leaves if
    ``int8``; ``report`` with ``pruned`` (sparsity per pruned leaf, total) and
    ``quantized`` (path -> channel axis).

  >>> state = {"dense": {"kernel": jnp.array([[1.0, -2.0], [0.5, 3.0]]),
  ...                    "bias": jnp.ones(2)}}
  >>> tree, report = compress(state, sparsity=0.5, int8=True)
  >>> tree["dense"]["kernel"].values.tolist(), report["pruned"]["sparsity/total"]
  ([[0, -85], [0, 127]], 0.5)
  """
  _channel_axis_fn(table_scales)  # validates it
  if n_m is not None and sparsity:
    raise ValueError(f"give sparsity={sparsity} or n_m={n_m}, not both")
  if not 0.0 <= sparsity <= 1.0:
    raise ValueError(f"sparsity={sparsity} must be in [0, 1]")
  report: dict[str, Any] = {"pruned": None, "quantized": None}
  tree = state
  if n_m is not None:
    masks = _n_m_masks(tree, tuple(n_m), pattern)
    tree = pruning.apply_masks(tree, masks)
    report["pruned"] = pruning.sparsity_report(tree, masks)
  elif sparsity:
    tree, masks = pruning.prune(tree, sparsity=sparsity, scope=scope,
                                pattern=pattern)
    report["pruned"] = pruning.sparsity_report(tree, masks)
  if int8:
    tree = quantization.quantize_params(tree, pattern="*",
                                        channel_axis=_channel_axis_fn(table_scales))
    report["quantized"] = {p: v.channel_axis for p, v in _flat(tree).items()
                           if isinstance(v, quantization.QTensor)}
  return tree, report


def _n_m_masks(tree, n_m: tuple[int, int], pattern) -> Any:
  """N:M masks with blocks along each leaf's contracted (input) axis: axis 0
  of a kernel [in, out], axis 1 of an embedding table [num, dim] (its tied
  projection ``x @ table.T`` contracts the dim axis)."""
  chosen = set(pruning.selected_paths(tree, pattern=pattern))

  def mask(keys, leaf):
    path = jax.tree_util.keystr(keys, simple=True, separator="/")
    if path not in chosen:
      return None
    block_axis = 1 if _is_table(path) else 0
    return pruning.magnitude_masks({path: leaf}, n_m=n_m, pattern="*",
                                   block_axis=block_axis)[path]
  return jax.tree_util.tree_map_with_path(mask, tree)


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
  """``model``'s structure with the variables of ``tree`` (e.g. from ``compress``).

  ``QTensor`` leaves stay int8 in ``privjax.models.nn`` Linear kernels and Embed
  tables (the int8 inference path) and are dequantized elsewhere, or
  everywhere with ``dequantize=True``. ``model`` may be abstract
  (``nnx.eval_shape``); it is not modified.

  >>> model = mlp.NextItemMLP(num_items=5, max_len=3, embed_dim=4,
  ...                         hidden_dim=8, rngs=nnx.Rngs(0))
  >>> tree, _ = compress(nnx.to_pure_dict(nnx.state(model)), int8=True)
  >>> type(inference_model(model, tree).hidden.kernel.get_value()).__name__
  'QTensor'
  """
  keep_int8 = set() if dequantize else _int8_paths(model)
  flat = {p: (v if not isinstance(v, quantization.QTensor) or p in keep_int8
              else quantization.dequantize(v))
          for p, v in _flat(tree).items()}
  graphdef, state = nnx.split(model)
  expected = set(_flat(nnx.to_pure_dict(state)))
  if set(flat) != expected:
    raise ValueError(f"tree does not match the model's variables: missing "
                     f"{sorted(expected - set(flat))[:5]}, unexpected "
                     f"{sorted(set(flat) - expected)[:5]}")
  nnx.replace_by_pure_dict(state, _unflat(flat))
  return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------------
# Tensor encodings.


def _values_of(leaf) -> tuple[np.ndarray, np.ndarray | None, int | None]:
  if isinstance(leaf, quantization.QTensor):
    return (np.asarray(leaf.values), np.asarray(leaf.scale, np.float32),
            leaf.channel_axis)
  return np.asarray(leaf, np.float32), None, None


def _encode(path: str, values: np.ndarray) -> tuple[str, dict[str, np.ndarray]]:
  """The smallest lossless encoding of ``values`` (see module docstring)."""
  flat = values.ravel()
  nonzero = flat != 0
  nnz = int(nonzero.sum())
  item = values.dtype.itemsize
  idx_dtype = np.uint16 if flat.size <= 2 ** 16 else np.int32
  sizes = {"dense": flat.size * item,
           "bitmask": nnz * item + (flat.size + 7) // 8,
           "coo": nnz * (item + np.dtype(idx_dtype).itemsize)}
  best = min(sizes, key=sizes.get)
  if best == "dense" or sizes["dense"] - sizes[best] <= _MIN_SAVING:
    return "dense", {path: values}
  nz = np.ascontiguousarray(flat[nonzero])
  if best == "bitmask":
    return "bitmask", {f"{path}:mask": np.packbits(nonzero), f"{path}:nz": nz}
  return "coo", {f"{path}:idx": np.flatnonzero(nonzero).astype(idx_dtype),
                 f"{path}:nz": nz}


def _decode(path: str, entry: dict[str, Any], tensors: dict[str, np.ndarray],
            file: pathlib.Path) -> np.ndarray:
  shape, dtype = tuple(entry["shape"]), np.dtype(entry["dtype"])
  size = math.prod(shape)

  def get(name):
    if name not in tensors:
      raise CorruptExportError(f"{file}: tensor {name!r} is missing (listed in "
                               f"{MANIFEST_FILE} for {path!r})")
    array = tensors[name]
    allowed = ((np.dtype(np.uint8),) if name.endswith(":mask") else
               (np.dtype(np.uint16), np.dtype(np.int32)) if name.endswith(":idx")
               else (dtype,))
    if array.dtype not in allowed:
      raise CorruptExportError(f"{file}: tensor {name!r} has dtype {array.dtype}, "
                               f"expected {' or '.join(map(str, allowed))} "
                               f"({MANIFEST_FILE})")
    return array

  storage = entry["storage"]
  if storage == "dense":
    array = get(path)
    if array.shape != shape:
      raise CorruptExportError(f"{file}: tensor {path!r} has shape {array.shape}; "
                               f"{MANIFEST_FILE} says {shape}")
    return array
  nz = get(f"{path}:nz")
  out = np.zeros(size, dtype)
  if storage == "bitmask":
    mask = get(f"{path}:mask")
    if mask.shape != ((size + 7) // 8,):
      raise CorruptExportError(f"{file}: tensor {path + ':mask'!r} has shape "
                               f"{mask.shape}, expected {((size + 7) // 8,)} for "
                               f"shape {shape} in {MANIFEST_FILE}")
    where = np.unpackbits(mask, count=size).astype(bool)
  elif storage == "coo":
    where = get(f"{path}:idx").astype(np.int64)
    if where.size and (where.min() < 0 or where.max() >= size):
      raise CorruptExportError(f"{file}: tensor {path + ':idx'!r} has indices "
                               f"outside [0, {size}) for shape {shape}")
  else:
    raise CorruptExportError(f"{MANIFEST_FILE}: tensor {path!r} has unknown "
                             f"storage {storage!r}")
  count = int(where.sum()) if where.dtype == bool else where.size
  if nz.shape != (count,):
    raise CorruptExportError(f"{file}: tensor {path + ':nz'!r} holds {nz.size} "
                             f"values for {count} nonzero positions")
  out[where] = nz
  return out.reshape(shape)


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
    sparsity, n_m, int8, pattern, scope, table_scales: as in ``compress``.
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
  arch = _architecture(family, model)
  state = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
  tree, report = compress(state, sparsity=sparsity, n_m=n_m, int8=int8,
                          pattern=pattern, scope=scope, table_scales=table_scales)

  tensors: dict[str, np.ndarray] = {}
  entries: dict[str, dict[str, Any]] = {}
  float_tensors = {p: np.asarray(v, np.float32) for p, v in _flat(state).items()}
  for path, leaf in _flat(tree).items():
    values, scale, axis = _values_of(leaf)
    storage, encoded = _encode(path, values)
    if scale is not None:
      encoded[f"{path}:scale"] = scale
    tensors.update(encoded)
    entries[path] = {
        "shape": list(values.shape), "dtype": str(values.dtype),
        "storage": storage, "channel_axis": axis,
        "bytes": int(sum(a.nbytes for a in encoded.values())),
        "float32_bytes": int(float_tensors[path].nbytes),
        "zero_fraction": float(np.mean(values == 0)) if values.size else 0.0}

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
    if family == "llm":
      (tmp / TOKENIZER_DIR).mkdir()
      src = registry.pretrained_dir(w.cfg)
      for name in _TOKENIZER_FILES:
        if (src / name).is_file():
          shutil.copyfile(src / name, tmp / TOKENIZER_DIR / name)
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
    (privacy.json), ``manifest`` and, for the LLM, ``tokenizer_dir``.

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
              _flat(nnx.to_pure_dict(nnx.state(abstract))).items()}
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
    values = _decode(path, entry, tensors, model_file)
    if entry["channel_axis"] is None:
      flat[path] = jnp.asarray(values)
      continue
    scale_name = f"{path}:scale"
    scale = tensors.get(scale_name)
    axis = entry["channel_axis"]
    if scale is None or scale.shape != (values.shape[axis],):
      raise CorruptExportError(
          f"{model_file}: tensor {scale_name!r} is missing or has the wrong shape "
          f"(expected ({values.shape[axis]},))")
    flat[path] = quantization.QTensor(values=jnp.asarray(values),
                                      scale=jnp.asarray(scale), channel_axis=axis)
  model = inference_model(abstract, _unflat(flat), dequantize=dequantize)
  metadata = {
      "config": run_config,
      "family": family, "num_items": config["model"]["num_items"],
      "items": _read_json(out / ITEMS_FILE),
      "privacy": _read_json(out / PRIVACY_FILE), "manifest": manifest}
  if family == "llm":
    metadata["tokenizer_dir"] = out / TOKENIZER_DIR
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
  family = meta["family"]
  eval_inputs = _eval_inputs_fn(meta)
  task = dataclasses.replace(registry.get(family), eval_inputs=eval_inputs)
  score_fn = jax.jit(lambda params, frozen, inputs: predict(
      nnx.merge(graphdef, params), inputs))
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
  (``tokenizer`` reuses one already loaded).
  """
  if metadata["family"] != "llm":
    return {"history": eval_set.history}
  if tokenizer is None:
    tokenizer = bert.load_tokenizer(metadata["tokenizer_dir"])
  m = metadata["config"].model
  return llm_rec.eval_text_inputs(eval_set, metadata["items"]["titles"], tokenizer,
                                  max_tokens=m.max_tokens,
                                  max_items=m.max_history_items)


def _eval_inputs_fn(metadata: dict[str, Any]):
  tokenizer = (bert.load_tokenizer(metadata["tokenizer_dir"])
               if metadata["family"] == "llm" else None)
  return lambda cfg, es, ds, model: eval_inputs(metadata, es, tokenizer)
