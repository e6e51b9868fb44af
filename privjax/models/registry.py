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
position), ``llm`` (the history as text through a pretrained BERT encoder,
scored against cached title embeddings; ``llm_family``) and ``text_seq`` (a
causal transformer over item vectors built from public item text;
``text_seq_family``).
"""

import dataclasses
import pathlib
from collections.abc import Callable
from typing import Any

from flax import nnx
import jax
import numpy as np

from privjax import config as config_lib
from privjax.data import sequences
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
    public_state: ``{state path prefix: why it is public}`` for non-trained
      tensors computed from public data only (cached text embeddings); the
      export manifest lists them.
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
  public_state: dict[str, str] = dataclasses.field(default_factory=dict)

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
# The registry.

_TASKS: dict[str, Task] = {"mlp": MLP, "sasrec": SASREC}


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


# The families with their own module register themselves on import (they
# need Task and register, defined above).
from privjax.models import llm_family  # pylint: disable=g-import-not-at-top,wrong-import-position
from privjax.models import text_seq_family  # pylint: disable=g-import-not-at-top,wrong-import-position
