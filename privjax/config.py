"""Typed run configuration, dotted command-line overrides and one validate().

A config file is a Python file whose ``get_config()`` returns a ``Config``
(see ``configs/quickstart.py``). ``scripts/train.py --config FILE
--config.train.steps=500`` loads the file and applies dotted overrides; every
override is parsed by the type of the field it names, and an unknown field or a
bad value is an error naming both.

>>> cfg = Config()
>>> cfg = override(cfg, "privacy.noise_multiplier", "1.1")
>>> cfg.privacy.noise_multiplier
1.1
>>> override(cfg, "privacy.sigma", "1.0")
Traceback (most recent call last):
...
ValueError: unknown config field 'privacy.sigma'; PrivacyConfig has: accountant, clipping, count_epsilon, delta, enabled, epsilon_budget, l2_clip_norm, microbatch_size, neighbouring, noise_multiplier, overflow, per_layer, reproducible_noise_seed, sampling_prob, target_epsilon, unit
"""

import dataclasses
import importlib.util
import json
import math
import pathlib
import types
import typing
from typing import Any


@dataclasses.dataclass(kw_only=True)
class DataConfig:
  """Where the interactions come from and how training examples are built."""
  # "synthetic" (built in, the default), "movielens" (raw files in `path`),
  # "tfds" (tensorflow-datasets name in `tfds_name`).
  source: str = "synthetic"
  path: str = ""
  tfds_name: str = ""
  # Synthetic generator (ignored for real data).
  num_users: int = 2000
  num_items: int = 400
  mean_interactions: float = 30.0
  seed: int = 0
  # Examples: the last `max_len` items of the history predict the next one.
  max_len: int = 10
  # Contribution bounding: a user contributes at most this many training
  # examples (which ones: a keyed hash of the user's id and the example's
  # position, keyed by the run secret; see privjax.data.bounding).
  max_examples_per_user: int = 16


@dataclasses.dataclass(kw_only=True)
class ModelConfig:
  """Which model, and its sizes."""
  # "mlp", "sasrec" or "llm".
  name: str = "mlp"
  embed_dim: int = 32
  # MLP hidden width; SASRec feed-forward width (0: embed_dim).
  hidden_dim: int = 128
  # SASRec.
  num_layers: int = 2
  num_heads: int = 1
  dropout: float = 0.0
  # Score with the input item table (fewer parameters to noise; ghost clipping
  # handles the shared table exactly).
  tie_embeddings: bool = False
  # LLM recommender: a folder with config.json + model.safetensors + tokenizer
  # ("" = the installed all-MiniLM-L6-v2).
  pretrained: str = ""
  # Which parameters train: "full", "last_k", "lora" or "head"; the others are
  # frozen (no update, no noise).
  trainable: str = "head"
  last_k: int = 1
  lora_rank: int = 8
  proj_dim: int = 0            # 0: the encoder width
  use_id_head: bool = False
  max_tokens: int = 64
  max_history_items: int = 20
  # Text-first recommender (text_seq): whitened text features kept, and
  # whether a learned item-ID embedding is added to each item's text vector.
  text_dim: int = 64
  fuse_id: bool = False
  item_bias: bool = False


@dataclasses.dataclass(kw_only=True)
class PrivacyConfig:
  """DP-SGD parameters. Everything here is public: it is written to config.json."""
  enabled: bool = True
  # "user": neighbouring datasets differ in all examples of one user (group
  # clipping); "example": they differ in one training example.
  unit: str = "user"
  # "add_remove": neighbours differ by one unit added or removed; the number of
  # units N is then private and is released only as a DP count (count_epsilon,
  # added to epsilon). "replace_one": neighbours have the same N and differ in
  # one unit's data; N is public and printed (PLD accountant only).
  neighbouring: str = "add_remove"
  # Give exactly one of noise_multiplier / target_epsilon when enabled.
  noise_multiplier: float | None = None
  target_epsilon: float | None = None
  # Training stops before a step that would exceed this (defaults to
  # target_epsilon). Both include count_epsilon.
  epsilon_budget: float | None = None
  # Epsilon of the DP count of units that q = batch_size / N is derived from
  # (add_remove only).
  count_epsilon: float = 0.05
  # A public choice, well below 1 / N (privacy.json states delta x N-estimate).
  delta: float = 1e-5
  l2_clip_norm: float = 1.0
  per_layer: bool = False
  clipping: str = "vmap"
  accountant: str = "rdp"
  # None: train.batch_size / N (N from the DP count under add_remove).
  sampling_prob: float | None = None
  microbatch_size: int | None = None
  # Batches larger than the largest static bucket: "grow" (pad further, a rare
  # recompile), "truncate" (needs the PLD accountant and a public N) or
  # "refuse" (needs a public N).
  overflow: str = "grow"
  # RESEARCH ONLY. An integer derives the run secret (noise, sampling,
  # bounding) from this public seed: the run is reproducible and is NOT a DP
  # release, and every report says so. None (default): a secret from OS
  # entropy, kept in <workdir>/secret/.
  reproducible_noise_seed: int | None = None


@dataclasses.dataclass(kw_only=True)
class TrainConfig:
  """Optimisation and bookkeeping."""
  steps: int = 300
  # Expected number of units (users or examples) per step: q * num_units.
  batch_size: int = 256
  optimizer: str = "adam"
  learning_rate: float = 1e-3
  # Public: sets the initial parameters only (noise and sampling come from the
  # run secret).
  seed: int = 0
  log_every: int = 25
  eval_every: int = 0
  checkpoint_every: int = 100
  max_checkpoints: int = 2


@dataclasses.dataclass(kw_only=True)
class PruneConfig:
  """Gradual magnitude pruning during training (Zhu & Gupta 2017 schedule).

  Masks are computed from the current (already private) parameters, never
  from data: post-processing, no privacy cost. Pruned weights stay exactly
  zero: their updates, noise included, are masked after the optimizer.
  """
  sparsity: float = 0.0       # final sparsity; 0 turns pruning off
  start_step: int = 0
  end_step: int = 0
  frequency: int = 50
  scope: str = "per_layer"    # or "global"
  pattern: str = "*kernel"    # which leaves (2-D only), "/"-joined paths


@dataclasses.dataclass(kw_only=True)
class EvalConfig:
  """Leave-last-out evaluation."""
  k: int = 10
  batch_size: int = 512
  # 0: full ranking over every item the user has not seen (the default and
  # the standard). >0: rank against this many sampled negatives (labelled
  # "sampled" in the metrics, optional).
  sampled_negatives: int = 0


@dataclasses.dataclass(kw_only=True)
class Config:
  """A whole run."""
  name: str = "run"
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  privacy: PrivacyConfig = dataclasses.field(default_factory=PrivacyConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
  prune: PruneConfig = dataclasses.field(default_factory=PruneConfig)
  # Also train the same model without privacy, and a popularity baseline,
  # and print the three side by side.
  compare_baselines: bool = False


def _model_names() -> tuple[str, ...]:
  # Imported here: the registry imports this module (its tasks read configs).
  from privjax.models import registry  # pylint: disable=g-import-not-at-top
  return registry.names()


def _source_names() -> tuple[str, ...]:
  from privjax.data import sources  # pylint: disable=g-import-not-at-top
  return sources.names()


# A callable gives choices known only at validation time.
_CHOICES = {
    "data.source": _source_names,  # the registered data sources
    "model.name": _model_names,  # the registered model families
    "model.trainable": ("full", "last_k", "lora", "head"),
    "privacy.unit": ("user", "example"),
    "privacy.neighbouring": ("add_remove", "replace_one"),
    "privacy.clipping": ("vmap", "ghost", "auto"),
    "privacy.accountant": ("rdp", "pld"),
    "privacy.overflow": ("grow", "truncate", "refuse"),
    "train.optimizer": ("adam", "sgd", "adamw"),
    "prune.scope": ("per_layer", "global"),
}


def validate(cfg: Config) -> Config:
  """Checks every field once; raises ValueError naming the field and value."""

  def bad(field: str, value: Any, why: str):
    raise ValueError(f"config.{field}={value!r} {why}")

  for field, choices in _CHOICES.items():
    choices = choices() if callable(choices) else choices
    value = get(cfg, field)
    if value not in choices:
      bad(field, value, f"must be one of {list(choices)}")
  for field in ("data.num_users", "data.num_items", "data.max_len",
                "data.max_examples_per_user", "model.embed_dim",
                "model.num_layers", "model.num_heads", "model.last_k",
                "model.lora_rank", "model.max_tokens", "model.max_history_items",
                "model.text_dim",
                "train.batch_size", "eval.k",
                "eval.batch_size"):
    if get(cfg, field) <= 0:
      bad(field, get(cfg, field), "must be > 0")
  for field in ("train.steps", "train.log_every", "train.eval_every",
                "train.checkpoint_every", "eval.sampled_negatives"):
    if get(cfg, field) < 0:
      bad(field, get(cfg, field), "must be >= 0")
  if cfg.train.max_checkpoints < 1:
    bad("train.max_checkpoints", cfg.train.max_checkpoints, "must be >= 1")
  if not cfg.data.mean_interactions >= 3:
    bad("data.mean_interactions", cfg.data.mean_interactions,
        "must be >= 3 (leave-last-out needs 3 interactions per user)")
  if cfg.model.hidden_dim < 0 or cfg.model.proj_dim < 0:
    bad("model.hidden_dim" if cfg.model.hidden_dim < 0 else "model.proj_dim",
        min(cfg.model.hidden_dim, cfg.model.proj_dim), "must be >= 0")
  if not 0 <= cfg.model.dropout < 1:
    bad("model.dropout", cfg.model.dropout, "must be in [0, 1)")
  if cfg.model.name in ("sasrec", "text_seq") and cfg.model.embed_dim % cfg.model.num_heads:
    bad("model.num_heads", cfg.model.num_heads,
        f"must divide model.embed_dim={cfg.model.embed_dim}")
  if cfg.model.name == "llm" and cfg.data.max_len < cfg.model.max_history_items:
    bad("data.max_len", cfg.data.max_len, "must be >= model.max_history_items="
        f"{cfg.model.max_history_items} (evaluation histories are that long)")
  if not (cfg.train.learning_rate > 0 and math.isfinite(cfg.train.learning_rate)):
    bad("train.learning_rate", cfg.train.learning_rate, "must be > 0 and finite")
  if cfg.data.source == "movielens" and not cfg.data.path:
    bad("data.path", cfg.data.path, "must name a MovieLens folder when "
        "data.source='movielens'")
  if cfg.data.source == "tfds" and not cfg.data.tfds_name:
    bad("data.tfds_name", cfg.data.tfds_name, "must be set when data.source='tfds'")

  pr = cfg.prune
  if not 0 <= pr.sparsity < 1:
    bad("prune.sparsity", pr.sparsity, "must be in [0, 1)")
  if pr.sparsity > 0:
    if not 0 <= pr.start_step <= pr.end_step <= cfg.train.steps:
      bad("prune.end_step", pr.end_step, f"must satisfy 0 <= prune.start_step="
          f"{pr.start_step} <= prune.end_step <= train.steps={cfg.train.steps}")
    if pr.frequency <= 0:
      bad("prune.frequency", pr.frequency, "must be > 0")

  p = cfg.privacy
  if not (p.l2_clip_norm > 0 and math.isfinite(p.l2_clip_norm)):
    bad("privacy.l2_clip_norm", p.l2_clip_norm, "must be > 0 and finite")
  if p.noise_multiplier is not None and not p.noise_multiplier >= 0:
    bad("privacy.noise_multiplier", p.noise_multiplier, "must be >= 0")
  for field in ("target_epsilon", "epsilon_budget"):
    value = getattr(p, field)
    if value is not None and not value > 0:
      bad(f"privacy.{field}", value, "must be > 0")
  if not 0 < p.delta < 1:
    bad("privacy.delta", p.delta, "must be in (0, 1)")
  if not (p.count_epsilon > 0 and math.isfinite(p.count_epsilon)):
    bad("privacy.count_epsilon", p.count_epsilon, "must be > 0 and finite")
  if p.reproducible_noise_seed is not None and p.reproducible_noise_seed < 0:
    bad("privacy.reproducible_noise_seed", p.reproducible_noise_seed, "must be >= 0")
  if not 0 <= cfg.train.seed < 2**64:
    bad("train.seed", cfg.train.seed, "must be in [0, 2**64)")
  if p.neighbouring == "replace_one" and p.accountant != "pld":
    bad("privacy.neighbouring", p.neighbouring, "needs privacy.accountant='pld' "
        "(RDP cannot account for Poisson sampling under replace-one)")
  if p.sampling_prob is not None and not 0 < p.sampling_prob <= 1:
    bad("privacy.sampling_prob", p.sampling_prob, "must be in (0, 1]")
  if p.microbatch_size is not None and p.microbatch_size <= 0:
    bad("privacy.microbatch_size", p.microbatch_size, "must be > 0 or None")
  if p.enabled:
    if (p.noise_multiplier is None) == (p.target_epsilon is None):
      bad("privacy.noise_multiplier", p.noise_multiplier,
          "and privacy.target_epsilon="
          f"{p.target_epsilon!r}: give exactly one of the two when "
          "privacy.enabled=True")
    if p.overflow == "truncate" and p.accountant != "pld":
      bad("privacy.overflow", p.overflow, "needs privacy.accountant='pld' "
          "(only PLD accounts for truncated Poisson sampling)")
    if p.overflow == "refuse" and p.neighbouring == "add_remove":
      bad("privacy.overflow", p.overflow, "needs privacy.neighbouring='replace_one' "
          "(a run that stops on a large batch reveals something the accountant does "
          "not count, and under add/remove-one DP its chance depends on the private N)")
    if p.overflow == "truncate" and p.neighbouring == "add_remove":
      bad("privacy.overflow", p.overflow, "needs privacy.neighbouring='replace_one' "
          "(truncated Poisson accounting depends on N, which add/remove-one DP "
          "keeps private)")
    if (p.neighbouring == "add_remove" and p.noise_multiplier is not None
        and p.sampling_prob is None):
      bad("privacy.noise_multiplier", p.noise_multiplier,
          "needs a public privacy.sampling_prob under privacy.neighbouring="
          "'add_remove' (q = batch_size / N would make epsilon depend on the "
          "private N); or give privacy.target_epsilon instead")
    limits = [x for x in (p.target_epsilon, p.epsilon_budget) if x is not None]
    if p.neighbouring == "add_remove" and limits and p.count_epsilon >= min(limits):
      bad("privacy.count_epsilon", p.count_epsilon,
          f"must be below the target epsilon / budget ({min(limits)}): it is part "
          "of it")
  return cfg


# ---------------------------------------------------------------------------
# Dotted access and overrides.


def get(cfg: Any, dotted: str) -> Any:
  obj = cfg
  for part in dotted.split("."):
    obj = getattr(obj, part)
  return obj


def _field_type(obj: Any, name: str):
  hints = typing.get_type_hints(type(obj))
  return hints[name]


def _parse(text: str, typ, dotted: str) -> Any:
  origin = typing.get_origin(typ)
  args = typing.get_args(typ)
  if origin in (typing.Union, types.UnionType):
    if text.lower() in ("none", "null") and type(None) in args:
      return None
    inner = [a for a in args if a is not type(None)]
    return _parse(text, inner[0], dotted)
  try:
    if typ is bool:
      if text.lower() in ("true", "1", "yes"):
        return True
      if text.lower() in ("false", "0", "no"):
        return False
      raise ValueError(text)
    if typ is int:
      return int(text)
    if typ is float:
      return float(text)
    if typ is str:
      return text
    if origin is tuple:
      items = [t.strip() for t in text.strip("()[]").split(",") if t.strip()]
      return tuple(_parse(t, args[0], dotted) for t in items)
  except ValueError:
    raise ValueError(
        f"config.{dotted}={text!r} is not a valid {getattr(typ, '__name__', typ)}"
    ) from None
  raise ValueError(f"config.{dotted} has unsupported type {typ}")


def override(cfg: Config, dotted: str, text: str) -> Config:
  """Returns a copy of ``cfg`` with ``dotted`` set from its string ``text``."""
  parts = dotted.split(".")

  def _set(obj, parts, prefix):
    name = parts[0]
    fields = {f.name for f in dataclasses.fields(obj)}
    if name not in fields:
      where = ".".join(prefix + [name])
      raise ValueError(
          f"unknown config field {where!r}; {type(obj).__name__} has: "
          f"{', '.join(sorted(fields))}")
    if len(parts) == 1:
      value = _parse(text, _field_type(obj, name), ".".join(prefix + [name]))
      return dataclasses.replace(obj, **{name: value})
    child = getattr(obj, name)
    if not dataclasses.is_dataclass(child):
      raise ValueError(f"config field {'.'.join(prefix + [name])!r} has no "
                       f"sub-field {parts[1]!r}")
    return dataclasses.replace(obj, **{name: _set(child, parts[1:], prefix + [name])})

  return _set(cfg, parts, [])


def replace(cfg: Config, **dotted_values: Any) -> Config:
  """Typed replacement by dotted names: ``replace(cfg, **{"train.steps": 5})``."""
  for dotted, value in dotted_values.items():
    parts = dotted.split(".")
    objs = [cfg]
    for part in parts[:-1]:
      objs.append(getattr(objs[-1], part))
    new = dataclasses.replace(objs[-1], **{parts[-1]: value})
    for obj, part in zip(reversed(objs[:-1]), reversed(parts[:-1])):
      new = dataclasses.replace(obj, **{part: new})
    cfg = new
  return cfg


def load_file(path: str | pathlib.Path) -> Config:
  """Runs ``get_config()`` from a Python config file."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"config file {str(path)!r} does not exist")
  spec = importlib.util.spec_from_file_location(f"_privjax_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"config file {str(path)!r} has no get_config() function")
  cfg = module.get_config()
  if not isinstance(cfg, Config):
    raise ValueError(f"get_config() in {str(path)!r} returned "
                     f"{type(cfg).__name__}, expected privjax.config.Config")
  return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
  return dataclasses.asdict(cfg)


def from_dict(d: dict[str, Any]) -> Config:
  sections = {f.name: f for f in dataclasses.fields(Config)}
  kwargs = {}
  for key, value in d.items():
    if key not in sections:
      raise ValueError(f"unknown config field {key!r}")
    typ = typing.get_type_hints(Config)[key]
    if dataclasses.is_dataclass(typ):
      known = {f.name for f in dataclasses.fields(typ)}
      unknown = set(value) - known
      if unknown:
        raise ValueError(f"unknown config fields {sorted(unknown)} in {key!r}")
      hints = typing.get_type_hints(typ)
      value = typ(**{k: (tuple(v) if isinstance(v, list) and
                         typing.get_origin(hints[k]) is tuple else v)
                     for k, v in value.items()})
    kwargs[key] = value
  return Config(**kwargs)


def to_json(cfg: Config) -> str:
  return json.dumps(to_dict(cfg), indent=2, sort_keys=True)
