"""Privacy accounting for DP-SGD with dp_accounting: epsilon, sigma, statement.

Formal guarantee. Let a training run take ``steps`` = T steps. At each step the
sampler includes every privacy unit (an example, or a user with all of their
examples) independently with probability ``sampling_prob`` = q (Poisson
sampling), optionally truncates the sample to at most ``truncated_batch_size``
= B units by keeping a uniformly random subset, clips each unit's gradient
contribution to L2 norm at most C, and releases the sum plus Gaussian noise of
standard deviation ``noise_multiplier`` * C (fresh noise each step). Releasing
every intermediate sum (hence every iterate) is then (epsilon, delta)-DP under
the neighbouring relation ``relation``, with epsilon as reported by
:func:`epsilon` for the event built by :func:`dpsgd_event`:

* ``"add_remove"`` (default): neighbours differ by adding or removing one
  unit. The number of units N is then itself private.
* ``"replace_one"``: neighbours have the same N and differ in one unit's data;
  N is public. Only the PLD accountant supports it for Poisson sampling.

Both accountants give upper bounds on the true epsilon:

* ``"rdp"`` (default): Renyi DP with dp_accounting's default orders and the
  improved RDP-to-(epsilon, delta) conversion. Fast (~40 ms), a few percent
  loose. Cannot account for truncated Poisson sampling or ``replace_one``.
* ``"pld"``: privacy loss distributions with pessimistic discretisation,
  tighter. The discretisation interval is
  :data:`PLD_VALUE_DISCRETIZATION_INTERVAL`.

The guarantee assumes what it states: real Poisson sampling (not shuffled
fixed-size batches), sensitivity C per unit, and noise never reused.

PLD's discretisation interval 1e-4 (also dp_accounting's default) is within
1e-4 of the converged epsilon (q = 256/60000, sigma = 1.1, T = 14063,
delta = 1e-5: 2.381779 against 2.381691 at 1e-5) at about half a second.

Calibration (sigma for a target epsilon, steps for a budget) lives in
``privjax.dp.calibration``.
"""

import importlib.metadata
import json
import math
import numbers

import dp_accounting
from dp_accounting import dp_event as dp_event_lib
from dp_accounting import pld
from dp_accounting import rdp

from privjax import _validate

ACCOUNTANTS = ("rdp", "pld")
UNITS = ("example", "user")
RELATIONS = ("add_remove", "replace_one")

# See the module docstring for the measurements behind this value.
PLD_VALUE_DISCRETIZATION_INTERVAL = 1e-4

_DP_RELATION = {
    "add_remove": dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    "replace_one": dp_accounting.NeighboringRelation.REPLACE_ONE,
}


# ---------------------------------------------------------------------------
# Argument checks. Errors name the bad value.


def real(name: str, value) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise ValueError(f"{name}={value!r} must be a real number")
  value = float(value)
  if math.isnan(value):
    raise ValueError(f"{name}={value!r} must not be NaN")
  return value


def integer(name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
  if value < minimum:
    raise ValueError(f"{name}={value!r} must be >= {minimum}")
  return int(value)


def check_sampling_prob(value) -> float:
  value = real("sampling_prob", value)
  if not 0 < value <= 1:
    raise ValueError(f"sampling_prob={value!r} must be in (0, 1]")
  return value


def check_noise_multiplier(value) -> float:
  value = real("noise_multiplier", value)
  if not math.isfinite(value):
    raise ValueError(f"noise_multiplier={value!r} must be finite")
  return _validate.non_negative("noise_multiplier", value)


def check_delta(value) -> float:
  value = real("delta", value)
  if not 0 < value < 1:
    raise ValueError(f"delta={value!r} must be in (0, 1)")
  return value


def check_accountant(accountant, relation: str = "add_remove",
                     truncated_batch_size: int | None = None) -> str:
  """Validates ``accountant`` and refuses, up front, what it cannot account for."""
  _validate.one_of("accountant", accountant, ACCOUNTANTS)
  _validate.one_of("relation", relation, RELATIONS)
  if accountant == "rdp" and truncated_batch_size is not None:
    raise ValueError(
        f"accountant='rdp' cannot account for truncated Poisson sampling "
        f"(truncated_batch_size={truncated_batch_size}); use accountant='pld'")
  if accountant == "rdp" and relation == "replace_one":
    raise ValueError("accountant='rdp' cannot account for Poisson sampling under "
                     "relation='replace_one'; use accountant='pld'")
  return accountant


def check_truncation(dataset_size, truncated_batch_size
                     ) -> tuple[int | None, int | None]:
  if dataset_size is not None:
    dataset_size = integer("dataset_size", dataset_size, 1)
  if truncated_batch_size is not None:
    truncated_batch_size = integer("truncated_batch_size", truncated_batch_size, 1)
    if dataset_size is None:
      raise ValueError(
          f"truncated_batch_size={truncated_batch_size} needs dataset_size: "
          "truncated Poisson accounting depends on the dataset size")
  return dataset_size, truncated_batch_size


# ---------------------------------------------------------------------------
# Events and epsilon.


def dpsgd_event(*, sampling_prob: float, noise_multiplier: float, steps: int,
                dataset_size: int | None = None,
                truncated_batch_size: int | None = None
                ) -> dp_accounting.DpEvent:
  """The dp_accounting event of ``steps`` DP-SGD steps (see module docstring).

  Each step is a Poisson-subsampled Gaussian mechanism with sensitivity 1 and
  noise ``noise_multiplier``; with ``truncated_batch_size`` (which needs
  ``dataset_size``) each Poisson sample is truncated to at most that many units
  (``TruncatedSubsampledGaussianDpEvent``, PLD accountant only). ``steps == 0``
  gives ``NoOpDpEvent`` (nothing released, epsilon 0); otherwise
  ``noise_multiplier == 0`` gives ``NonPrivateDpEvent`` (epsilon = inf).

  Args:
    sampling_prob: probability q in (0, 1] that a unit is in a step's sample.
    noise_multiplier: noise std divided by the L2 clip norm, >= 0.
    steps: number of steps T >= 0.
    dataset_size: number of units N; only used with truncation.
    truncated_batch_size: maximum units per step B, or None for no truncation.

  Returns:
    The composed ``DpEvent``.

  >>> event = dpsgd_event(sampling_prob=0.01, noise_multiplier=1.0, steps=100)
  >>> type(event).__name__, event.count, event.event.sampling_probability
  ('SelfComposedDpEvent', 100, 0.01)
  """
  sampling_prob = check_sampling_prob(sampling_prob)
  noise_multiplier = check_noise_multiplier(noise_multiplier)
  steps = integer("steps", steps, 0)
  dataset_size, truncated_batch_size = check_truncation(dataset_size,
                                                        truncated_batch_size)
  if steps == 0:
    return dp_accounting.NoOpDpEvent()
  if noise_multiplier == 0:
    return dp_accounting.NonPrivateDpEvent()
  return dp_accounting.SelfComposedDpEvent(
      one_step_event(sampling_prob, noise_multiplier, dataset_size,
                     truncated_batch_size), steps)


def one_step_event(sampling_prob: float, noise_multiplier: float,
                   dataset_size: int | None,
                   truncated_batch_size: int | None) -> dp_accounting.DpEvent:
  """One Poisson-subsampled (optionally truncated) Gaussian step."""
  if truncated_batch_size is None:
    return dp_accounting.PoissonSampledDpEvent(
        sampling_prob, dp_accounting.GaussianDpEvent(noise_multiplier))
  return dp_accounting.TruncatedSubsampledGaussianDpEvent(
      dataset_size=dataset_size, sampling_probability=sampling_prob,
      truncated_batch_size=truncated_batch_size,
      noise_multiplier=noise_multiplier)


def make_accountant(accountant: str, relation: str = "add_remove"
                    ) -> dp_accounting.PrivacyAccountant:
  """A fresh dp_accounting accountant of this kind for this relation."""
  if accountant == "rdp":
    return rdp.RdpAccountant(neighboring_relation=_DP_RELATION[relation])
  return pld.PLDAccountant(
      neighboring_relation=_DP_RELATION[relation],
      value_discretization_interval=PLD_VALUE_DISCRETIZATION_INTERVAL)


def _contains(event, event_type) -> bool:
  if isinstance(event, event_type):
    return True
  if isinstance(event, dp_accounting.ComposedDpEvent):
    return any(_contains(e, event_type) for e in event.events)
  inner = getattr(event, "event", None)
  return isinstance(inner, dp_accounting.DpEvent) and _contains(inner, event_type)


def epsilon(event: dp_accounting.DpEvent, *, delta: float,
            accountant: str = "rdp", relation: str = "add_remove") -> float:
  """Epsilon such that ``event`` is (epsilon, delta)-DP under ``relation``.

  The result is an upper bound on the true epsilon (see module docstring);
  ``math.inf`` for a non-private event.

  Args:
    event: a ``dp_accounting.DpEvent``, e.g. from :func:`dpsgd_event`.
    delta: target delta in (0, 1).
    accountant: ``"rdp"`` or ``"pld"``.
    relation: ``"add_remove"`` or ``"replace_one"``.

  Returns:
    Epsilon as a Python float.

  Raises:
    ValueError: bad arguments, or an event the accountant cannot handle.

  >>> event = dpsgd_event(sampling_prob=256 / 60000, noise_multiplier=1.1,
  ...                     steps=14063)
  >>> round(epsilon(event, delta=1e-5), 3)
  2.597
  """
  delta = check_delta(delta)
  _validate.one_of("accountant", accountant, ACCOUNTANTS)
  _validate.one_of("relation", relation, RELATIONS)
  if not isinstance(event, dp_accounting.DpEvent):
    raise ValueError(f"event={event!r} must be a dp_accounting.DpEvent")
  acc = make_accountant(accountant, relation)
  if not acc.supports(event):
    if _contains(event, dp_accounting.TruncatedSubsampledGaussianDpEvent):
      raise ValueError(
          f"accountant={accountant!r} cannot account for truncated Poisson "
          "sampling (TruncatedSubsampledGaussianDpEvent); use accountant='pld'")
    raise ValueError(
        f"accountant={accountant!r} cannot account for event={event!r} under "
        f"relation={relation!r}")
  return float(acc.compose(event).get_epsilon(delta))


def dpsgd_epsilon(*, sampling_prob: float, noise_multiplier: float, steps: int,
                  delta: float, accountant: str = "rdp",
                  relation: str = "add_remove",
                  dataset_size: int | None = None,
                  truncated_batch_size: int | None = None) -> float:
  """Epsilon of ``steps`` DP-SGD steps: :func:`epsilon` of :func:`dpsgd_event`.

  The guarantee is the one in the module docstring; 0.0 for ``steps == 0``,
  ``math.inf`` for ``noise_multiplier == 0``.

  >>> round(dpsgd_epsilon(sampling_prob=256 / 60000, noise_multiplier=1.1,
  ...                     steps=14063, delta=1e-5, accountant="pld"), 3)
  2.382
  """
  dataset_size, truncated_batch_size = check_truncation(dataset_size,
                                                        truncated_batch_size)
  check_accountant(accountant, relation, truncated_batch_size)
  event = dpsgd_event(sampling_prob=sampling_prob,
                      noise_multiplier=noise_multiplier, steps=steps,
                      dataset_size=dataset_size,
                      truncated_batch_size=truncated_batch_size)
  return epsilon(event, delta=delta, accountant=accountant, relation=relation)

# ---------------------------------------------------------------------------
# Serialisation and the privacy statement.


def _jsonable(value):
  if hasattr(value, "_asdict"):  # A DpEvent as a NamedTuple.
    return {k: _jsonable(v) for k, v in value._asdict().items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, bool) or value is None or isinstance(value, str):
    return value
  if isinstance(value, numbers.Integral):
    return int(value)
  if isinstance(value, numbers.Real):
    return float(value)
  raise ValueError(f"value={value!r} in a DpEvent is not JSON-serialisable")


def event_to_dict(event: dp_accounting.DpEvent) -> dict:
  """A JSON-serialisable dict of ``event`` (dp_accounting's NamedTuple form).

  Every event becomes ``{"module_name", "class_name", **fields}``; nested
  events become nested dicts, lists stay lists.

  >>> event_to_dict(dpsgd_event(sampling_prob=0.5, noise_multiplier=2.0,
  ...                           steps=3))["event"]["class_name"]
  'PoissonSampledDpEvent'
  """
  if not isinstance(event, dp_accounting.DpEvent):
    raise ValueError(f"event={event!r} must be a dp_accounting.DpEvent")
  return _jsonable(event.to_named_tuple())


def event_from_dict(d: dict) -> dp_accounting.DpEvent:
  """Inverse of :func:`event_to_dict` (also after a JSON round trip).

  Only classes of ``dp_accounting.dp_event`` are built: a file never chooses
  which module gets imported.

  >>> event = dpsgd_event(sampling_prob=0.5, noise_multiplier=2.0, steps=3)
  >>> event_from_dict(event_to_dict(event)) == event
  True
  """
  if not isinstance(d, dict) or "class_name" not in d:
    raise ValueError(f"d={d!r} must be a dict from event_to_dict")
  module_name = d.get("module_name")
  if module_name != dp_event_lib.__name__:
    raise ValueError(
        f"module_name={module_name!r} must be {dp_event_lib.__name__!r}")
  cls = getattr(dp_event_lib, d["class_name"], None)
  if not (isinstance(cls, type) and issubclass(cls, dp_accounting.DpEvent)):
    raise ValueError(
        f"class_name={d['class_name']!r} is not a dp_accounting DpEvent")

  def build(value):
    if isinstance(value, dict):
      return event_from_dict(value)
    if isinstance(value, list):
      return [build(v) for v in value]
    return value

  fields = {k: build(v) for k, v in d.items()
            if k not in ("module_name", "class_name")}
  return cls(**fields)


def _json_epsilon(eps: float | None) -> float | str | None:
  # JSON has no infinity: privacy.json says "inf" (a non-private run).
  return "inf" if eps == math.inf else eps


def privacy_statement(*, unit: str, sampling_prob: float,
                      noise_multiplier: float, l2_clip_norm: float, steps: int,
                      delta: float, accountant: str = "rdp",
                      relation: str = "add_remove",
                      dataset_size: int | None = None,
                      truncated_batch_size: int | None = None,
                      count_event: dp_accounting.DpEvent | None = None,
                      count_epsilon: float = 0.0,
                      extra: dict | None = None) -> dict:
  """Everything ``privacy.json`` states about a DP-SGD run, JSON-serialisable.

  Guarantee: with the assumptions of the module docstring, the run is
  (``epsilon``, ``delta``)-DP under ``relation`` for one ``unit``: one
  example, or (``unit="user"``) one user together with all of their examples.
  For ``unit="user"`` the sampler must sample users (``sampling_prob`` is per
  user) and ``l2_clip_norm`` bounds each user's whole gradient contribution.

  ``count_event`` is a release made before training whose output chose the
  training parameters (the DP count of units from which q is derived, under
  ``add_remove``); it is pure ``count_epsilon``-DP, and the statement adds it
  by basic (adaptive) composition: epsilon = count_epsilon + epsilon of the
  DP-SGD steps, which is valid because the DP-SGD part meets its epsilon for
  every value the count could have taken.

  ``epsilon`` is under ``accountant``; ``epsilon_rdp`` and ``epsilon_pld``
  report both (``epsilon_rdp`` is None where RDP cannot account: truncation,
  ``replace_one``). An infinite epsilon (``noise_multiplier == 0``: not
  private) is the string ``"inf"``, since JSON has no infinity. ``extra``
  entries are added at the top level and may not overwrite the statement's
  own keys.

  >>> s = privacy_statement(unit="example", sampling_prob=256 / 60000,
  ...     noise_multiplier=1.1, l2_clip_norm=1.0, steps=14063, delta=1e-5)
  >>> s["private"], round(s["epsilon"], 3), round(s["epsilon_pld"], 3)
  (True, 2.597, 2.382)
  """
  unit = _validate.one_of("unit", unit, UNITS)
  l2_clip_norm = real("l2_clip_norm", l2_clip_norm)
  if not 0 < l2_clip_norm < math.inf:
    raise ValueError(f"l2_clip_norm={l2_clip_norm!r} must be finite and > 0")
  dataset_size, truncated_batch_size = check_truncation(dataset_size,
                                                        truncated_batch_size)
  check_accountant(accountant, relation, truncated_batch_size)
  count_epsilon = _validate.non_negative("count_epsilon", real("count_epsilon",
                                                               count_epsilon))
  if (count_event is None) != (count_epsilon == 0):
    raise ValueError("count_event and count_epsilon > 0 go together")
  event = dpsgd_event(sampling_prob=sampling_prob,
                      noise_multiplier=noise_multiplier, steps=steps,
                      dataset_size=dataset_size,
                      truncated_batch_size=truncated_batch_size)
  delta = check_delta(delta)
  truncated = truncated_batch_size is not None
  rdp_ok = not truncated and relation == "add_remove"
  sgd_rdp = epsilon(event, delta=delta, accountant="rdp") if rdp_ok else None
  sgd_pld = epsilon(event, delta=delta, accountant="pld", relation=relation)
  sgd = sgd_rdp if accountant == "rdp" else sgd_pld
  eps_rdp = None if sgd_rdp is None else sgd_rdp + count_epsilon
  eps_pld = sgd_pld + count_epsilon
  eps = sgd + count_epsilon
  private = eps != math.inf
  relation_text = {
      "add_remove": (f"Datasets are neighbours if one is the other with a single "
                     f"{unit} added or removed"
                     + (", together with all of that user's examples." if unit == "user"
                        else ".") + " The number of units is private."),
      "replace_one": (f"Datasets are neighbours if they have the same number of "
                      f"{unit}s and differ in the data of one {unit}"
                      + (" (all of that user's examples)." if unit == "user" else ".")
                      + " The number of units is public."),
  }[relation]
  sampling = "truncated_poisson" if truncated else "poisson"
  words = {"add_remove": "add/remove", "replace_one": "replace"}[relation]
  if private:
    summary = (f"({eps:.4g}, {delta:g})-DP for {words} one {unit} "
               f"({accountant.upper()} accountant, {sampling} sampling "
               f"q={sampling_prob:g}, noise_multiplier={noise_multiplier:g}, "
               f"steps={steps}"
               + (f", plus the DP count of units at epsilon={count_epsilon:g}"
                  if count_event is not None else "") + ").")
  else:
    summary = ("NOT PRIVATE: noise_multiplier=0, so no (epsilon, delta)-DP "
               "guarantee holds (epsilon = inf).")
  notes = []
  if not rdp_ok:
    notes.append("epsilon_rdp is null: RDP cannot account for "
                 + ("truncated Poisson sampling." if truncated else
                    "Poisson sampling under replace-one."))
  if dataset_size is not None and delta >= 1 / dataset_size:
    notes.append(f"delta={delta:g} >= 1/dataset_size: a mechanism releasing "
                 "one random unit in the clear meets this delta.")
  statement = {
      "private": private,
      "summary": summary,
      "unit": unit,
      "neighbouring_relation": {"add_remove": f"add_or_remove_one_{unit}",
                                "replace_one": f"replace_one_{unit}"}[relation],
      "neighbouring_relation_description": relation_text,
      "accountant": accountant,
      "epsilon": _json_epsilon(eps),
      "delta": delta,
      "epsilon_rdp": _json_epsilon(eps_rdp),
      "epsilon_pld": _json_epsilon(eps_pld),
      "epsilon_dpsgd": _json_epsilon(sgd),
      "noise_multiplier": float(noise_multiplier),
      "l2_clip_norm": l2_clip_norm,
      "sampling": sampling,
      "sampling_prob": float(sampling_prob),
      "steps": int(steps),
      "dataset_size": dataset_size,
      "truncated_batch_size": truncated_batch_size,
      "pld_value_discretization_interval": PLD_VALUE_DISCRETIZATION_INTERVAL,
      "dp_event": event_to_dict(event),
      "dp_accounting_version": importlib.metadata.version("dp-accounting"),
      "notes": notes,
  }
  if count_event is not None:
    statement["count_of_units"] = {
        "epsilon": count_epsilon, "dp_event": event_to_dict(count_event),
        "composition": "basic (adaptive): the sampling probability is derived "
                       "from this count, and the DP-SGD part meets its epsilon "
                       "for every value of it"}
  for key, value in (extra or {}).items():
    if key in statement:
      raise ValueError(f"extra key {key!r} would overwrite the statement's own")
    statement[key] = value
  try:
    json.dumps(statement, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise ValueError(f"extra={extra!r} is not JSON-serialisable: {e}") from e
  return statement
