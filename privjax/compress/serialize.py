"""One-shot compression of a model state, and its lossless tensor encodings.

``compress`` prunes (float), then quantizes a state: a pruned weight
quantizes to exactly 0, so an int8 state keeps at least the pruned sparsity.
``encode`` turns the result into named numpy arrays for a safetensors file
plus one JSON-able entry per leaf, and ``decode`` turns them back, checking
every array against its entry. ``privjax.export`` writes and reads the files.

Privacy. Everything here reads the parameters only: masks and int8 scales
come from the weights, and nothing is calibrated on data. Applied to
DP-trained parameters this is post-processing.

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
A sparse encoding is used only when it saves more than ``MIN_SAVING``
bytes (each extra tensor adds a header entry).
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from privjax.compress import pruning
from privjax.compress import quantization

# Weight matrices: Linear kernels and embedding tables (not the LLM's cached
# title embeddings, which are encoder outputs, not weights).
DEFAULT_PRUNE_PATTERN = ("*kernel", "*embedding")
TABLE_SCALES = ("row", "column")
# A sparse encoding must save at least this much over dense storage.
MIN_SAVING = 256


class DecodeError(ValueError):
  """Arrays that disagree with their entries (the message names both files)."""


def flat(tree) -> dict[str, Any]:
  """``{"a/b/kernel": leaf}`` of a nested dict; ``QTensor``s are leaves.

  >>> flat({"a": {"kernel": 1, "bias": 2}})
  {'a/bias': 2, 'a/kernel': 1}
  """
  leaves = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, quantization.QTensor))[0]
  return {jax.tree_util.keystr(k, simple=True, separator="/"): v for k, v in leaves}


def unflat(flat_tree: dict[str, Any]) -> dict[str, Any]:
  """The nested dict of ``flat``'s output.

  >>> unflat({"a/kernel": 1, "a/bias": 2})
  {'a': {'kernel': 1, 'bias': 2}}
  """
  out: dict[str, Any] = {}
  for path, value in flat_tree.items():
    node = out
    parts = path.split("/")
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = value
  return out


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
    report["quantized"] = {p: v.channel_axis for p, v in flat(tree).items()
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


# ---------------------------------------------------------------------------
# Tensor encodings.


def _values_of(leaf) -> tuple[np.ndarray, np.ndarray | None, int | None]:
  if isinstance(leaf, quantization.QTensor):
    return (np.asarray(leaf.values), np.asarray(leaf.scale, np.float32),
            leaf.channel_axis)
  return np.asarray(leaf, np.float32), None, None


def _encode_values(path: str, values: np.ndarray) -> tuple[str, dict[str, np.ndarray]]:
  """The smallest lossless encoding of ``values`` (see module docstring)."""
  flat_values = values.ravel()
  nonzero = flat_values != 0
  nnz = int(nonzero.sum())
  item = values.dtype.itemsize
  idx_dtype = np.uint16 if flat_values.size <= 2 ** 16 else np.int32
  sizes = {"dense": flat_values.size * item,
           "bitmask": nnz * item + (flat_values.size + 7) // 8,
           "coo": nnz * (item + np.dtype(idx_dtype).itemsize)}
  best = min(sizes, key=sizes.get)
  if best == "dense" or sizes["dense"] - sizes[best] <= MIN_SAVING:
    return "dense", {path: values}
  nz = np.ascontiguousarray(flat_values[nonzero])
  if best == "bitmask":
    return "bitmask", {f"{path}:mask": np.packbits(nonzero), f"{path}:nz": nz}
  return "coo", {f"{path}:idx": np.flatnonzero(nonzero).astype(idx_dtype),
                 f"{path}:nz": nz}


def encode(tree: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
  """The arrays of a (compressed) state and one entry per leaf.

  Float leaves are stored as float32, ``QTensor`` leaves as their int8 values
  plus ``p:scale``, each in its smallest encoding.

  Returns:
    ``(tensors, entries)``: the named arrays of a safetensors file, and per
    leaf path ``shape``, ``dtype``, ``storage``, ``channel_axis`` (None unless
    quantized), ``bytes`` (of its arrays), ``float32_bytes`` and
    ``zero_fraction``.

  >>> tensors, entries = encode({"w": np.zeros((32, 32))})
  >>> sorted(tensors), entries["w"]["storage"], entries["w"]["bytes"]
  (['w:idx', 'w:nz'], 'coo', 0)
  """
  tensors: dict[str, np.ndarray] = {}
  entries: dict[str, dict[str, Any]] = {}
  for path, leaf in flat(tree).items():
    values, scale, axis = _values_of(leaf)
    storage, encoded = _encode_values(path, values)
    if scale is not None:
      encoded[f"{path}:scale"] = scale
    tensors.update(encoded)
    entries[path] = {
        "shape": list(values.shape), "dtype": str(values.dtype),
        "storage": storage, "channel_axis": axis,
        "bytes": int(sum(a.nbytes for a in encoded.values())),
        "float32_bytes": int(values.size * np.dtype(np.float32).itemsize),
        "zero_fraction": float(np.mean(values == 0)) if values.size else 0.0}
  return tensors, entries


def decode(path: str, entry: dict[str, Any], tensors: dict[str, np.ndarray], *,
           file: Any, entries_file: str) -> jax.Array | quantization.QTensor:
  """Leaf ``path`` from the arrays ``encode`` made and its entry.

  Args:
    path: the leaf's path.
    entry: its entry (as ``encode`` returns it).
    tensors: the arrays read back.
    file, entries_file: where ``tensors`` and ``entry`` were read; named in
      errors.

  Returns:
    A float array, or a ``QTensor`` when the entry has a channel axis.

  Raises:
    DecodeError: an array is missing or disagrees with the entry.

  >>> tensors, entries = encode({"w": np.eye(40)})
  >>> decode("w", entries["w"], tensors, file="f", entries_file="e").shape
  (40, 40)
  """
  values = _decode_values(path, entry, tensors, file, entries_file)
  if entry["channel_axis"] is None:
    return jnp.asarray(values)
  scale_name = f"{path}:scale"
  scale = tensors.get(scale_name)
  axis = entry["channel_axis"]
  if scale is None or scale.shape != (values.shape[axis],):
    raise DecodeError(
        f"{file}: tensor {scale_name!r} is missing or has the wrong shape "
        f"(expected ({values.shape[axis]},))")
  return quantization.QTensor(values=jnp.asarray(values),
                              scale=jnp.asarray(scale), channel_axis=axis)


def _decode_values(path: str, entry: dict[str, Any], tensors: dict[str, np.ndarray],
                   file: Any, entries_file: str) -> np.ndarray:
  shape, dtype = tuple(entry["shape"]), np.dtype(entry["dtype"])
  size = math.prod(shape)

  def get(name):
    if name not in tensors:
      raise DecodeError(f"{file}: tensor {name!r} is missing (listed in "
                        f"{entries_file} for {path!r})")
    array = tensors[name]
    allowed = ((np.dtype(np.uint8),) if name.endswith(":mask") else
               (np.dtype(np.uint16), np.dtype(np.int32)) if name.endswith(":idx")
               else (dtype,))
    if array.dtype not in allowed:
      raise DecodeError(f"{file}: tensor {name!r} has dtype {array.dtype}, "
                        f"expected {' or '.join(map(str, allowed))} "
                        f"({entries_file})")
    return array

  storage = entry["storage"]
  if storage == "dense":
    array = get(path)
    if array.shape != shape:
      raise DecodeError(f"{file}: tensor {path!r} has shape {array.shape}; "
                        f"{entries_file} says {shape}")
    return array
  nz = get(f"{path}:nz")
  out = np.zeros(size, dtype)
  if storage == "bitmask":
    mask = get(f"{path}:mask")
    if mask.shape != ((size + 7) // 8,):
      raise DecodeError(f"{file}: tensor {path + ':mask'!r} has shape "
                        f"{mask.shape}, expected {((size + 7) // 8,)} for "
                        f"shape {shape} in {entries_file}")
    where = np.unpackbits(mask, count=size).astype(bool)
  elif storage == "coo":
    where = get(f"{path}:idx").astype(np.int64)
    if where.size and (where.min() < 0 or where.max() >= size):
      raise DecodeError(f"{file}: tensor {path + ':idx'!r} has indices "
                        f"outside [0, {size}) for shape {shape}")
  else:
    raise DecodeError(f"{entries_file}: tensor {path!r} has unknown "
                      f"storage {storage!r}")
  count = int(where.sum()) if where.dtype == bool else where.size
  if nz.shape != (count,):
    raise DecodeError(f"{file}: tensor {path + ':nz'!r} holds {nz.size} "
                      f"values for {count} nonzero positions")
  out[where] = nz
  return out.reshape(shape)
