"""The privacy plan of a run: one frozen object from the config to the statement.

``make_plan`` turns the public privacy config, the run secret and the
(private) number of units into a ``Plan`` that owns everything private about a
run: the sampling probability q, the public divisor, the noise multiplier
sigma, the number of steps the budget allows, the sampler, the noise keys and
the privacy statement. The trainer, PATE, the audit and the export read it;
none of them rebuilds a piece of it.

What the plan may know about the data. Under ``relation="add_remove"`` (the
default) the number of units N is private: adding one user changes it. The
plan therefore sees N only through a DP count, ``N + DiscreteLaplace(1 /
count_epsilon)`` drawn from the run secret, and derives q, the divisor and
the bucket sizes from that noisy count; its cost is added to the statement
by basic composition. Under ``relation="replace_one"`` N is public (both
neighbours have it) and is used as is.

>>> from privjax.dp import secret as secret_lib
>>> p = make_plan(unit="user", relation="add_remove", target_epsilon=4.0,
...               noise_multiplier=None, sampling_prob=None, batch_size=100,
...               steps=50, num_units=2000, delta=1e-5, l2_clip_norm=1.0,
...               secret=secret_lib.RunSecret.from_seed(0))
>>> p.noisy_num_units != 2000, round(p.epsilon(p.steps), 2) <= 4.0
(True, True)
"""

import dataclasses
import math
from typing import Any

import dp_accounting

from privjax.answers import mechanisms
from privjax.dp import accounting
from privjax.dp import calibration
from privjax.dp import noise
from privjax.dp import sampling
from privjax.dp import secret as secret_lib
from privjax.dp import step as dp_step

DEFAULT_COUNT_EPSILON = 0.05


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
  """The public privacy parameters of one run, fixed before its first step.

  Attributes:
    private: False for a non-private run (no clipping, no noise).
    unit: ``"user"`` or ``"example"``.
    unit_description: what one unit is, in words (privacy.json says it).
    relation: ``"add_remove"`` (N private) or ``"replace_one"`` (N public).
    sampling_prob: Poisson sampling probability q.
    divisor: the public constant the noisy sum is divided by (the expected
      batch size, q times the released or public N).
    noise_multiplier: sigma; noise std = sigma * l2_clip_norm.
    l2_clip_norm: C, the L2 bound of one unit's gradient contribution.
    delta: the delta of the statement (a public choice).
    accountant: ``"rdp"`` or ``"pld"``.
    steps: the steps this run takes (<= what the budget allows).
    epsilon_budget: training stops before a step that would exceed it.
    count_epsilon: epsilon spent on the DP count of units (0 if none).
    noisy_num_units: the released DP count of units (add_remove), else None.
    public_num_units: N itself when it is public (replace_one), else None.
    truncated_batch_size: the truncation cap the accountant uses, or None.
    bucket_sizes: static padded batch sizes of the sampler.
    overflow: the sampler's overflow policy.
    per_layer, microbatch_size: clipping options passed to the step.
    secret: the run secret (never printed, never in the statement).
  """
  private: bool
  unit: str
  unit_description: str
  relation: str
  sampling_prob: float
  divisor: float
  noise_multiplier: float
  l2_clip_norm: float
  delta: float
  accountant: str
  steps: int
  epsilon_budget: float | None
  count_epsilon: float
  noisy_num_units: int | None
  public_num_units: int | None
  truncated_batch_size: int | None
  bucket_sizes: tuple[int, ...]
  overflow: str
  per_layer: bool = False
  microbatch_size: int | None = None
  secret: secret_lib.RunSecret = dataclasses.field(repr=False, compare=False)

  # ---------------------------------------------------------------- accounting

  @property
  def count_event(self) -> dp_accounting.DpEvent | None:
    if not self.count_epsilon:
      return None
    return dp_accounting.dp_event.DiscreteLaplaceDpEvent(
        noise_parameter=self.count_epsilon, sensitivity=1)

  def _accounting_args(self) -> dict[str, Any]:
    out = {"relation": self.relation}
    if self.truncated_batch_size is not None:
      out.update(dataset_size=self.public_num_units,
                 truncated_batch_size=self.truncated_batch_size)
    return out

  def epsilon(self, steps: int, accountant: str | None = None) -> float:
    """Epsilon after ``steps`` steps, the DP count included."""
    if not self.private:
      return math.inf
    return self.count_epsilon + accounting.dpsgd_epsilon(
        sampling_prob=self.sampling_prob, noise_multiplier=self.noise_multiplier,
        steps=steps, delta=self.delta, accountant=accountant or self.accountant,
        **self._accounting_args())

  def statement(self, steps_done: int, extra: dict[str, Any]) -> dict[str, Any]:
    """What privacy.json says about a run that took ``steps_done`` steps."""
    about = {"unit_description": self.unit_description,
             "noise_secret": self.secret_note, **extra}
    if not self.private:
      return {"private": False, "dp_release": False, "unit": self.unit,
              "epsilon": "inf", "steps": steps_done,
              "neighbouring_relation": "none: this run is NOT differentially private",
              **about}
    if self.noisy_num_units is not None:
      about["noisy_num_units"] = self.noisy_num_units
    if self.public_num_units is not None:
      about["num_units"] = self.public_num_units
    about["delta_note"] = self.delta_note
    out = accounting.privacy_statement(
        unit=self.unit, sampling_prob=self.sampling_prob,
        noise_multiplier=self.noise_multiplier, l2_clip_norm=self.l2_clip_norm,
        steps=steps_done, delta=self.delta, accountant=self.accountant,
        count_event=self.count_event, count_epsilon=self.count_epsilon,
        extra={**about, "divisor": self.divisor}, **self._accounting_args())
    out["reproducible_noise"] = self.secret.reproducible
    out["dp_release"] = not self.secret.reproducible
    if self.secret.reproducible:
      # The mechanism is DP-SGD, but its noise is public: not a DP release.
      out["private"] = False
      out["summary"] = ("NOT A DP RELEASE (reproducible noise; epsilon is what the "
                        "same run with secret noise would have). " + out["summary"])
    return out

  @property
  def secret_note(self) -> str:
    if self.secret.reproducible:
      return secret_lib.REPRODUCIBLE_WARNING.format(seed=self.secret.reproducible_seed)
    return (f"secret: noise and sampling come from a run secret drawn from OS entropy "
            f"(fingerprint {self.secret.fingerprint}), stored apart in secret/ and "
            f"never released")

  @property
  def delta_note(self) -> str:
    n = self.public_num_units or self.noisy_num_units
    if not n:
      return f"delta={self.delta:g} is a public choice"
    which = "N" if self.public_num_units else "the DP count of units"
    return (f"delta={self.delta:g} is a public choice; delta x {which} = "
            f"{self.delta * n:.2g} (well below 1 is the usual requirement)")

  # ------------------------------------------------------------ the machinery

  def sampler(self) -> sampling.PoissonSampler:
    """The Poisson sampler of this run, seeded from the secret."""
    return sampling.PoissonSampler(
        sampling_prob=self.sampling_prob, seed=self.secret.integer("sampling"),
        bucket_sizes=self.bucket_sizes, overflow=self.overflow)

  def streams(self) -> noise.KeyStreams:
    """The noise and dropout keys of this run, from the secret."""
    return noise.KeyStreams(self.secret.jax_key("streams"))

  def step_config(self, clipping: str) -> dp_step.StepConfig:
    return dp_step.StepConfig(
        private=self.private, l2_clip_norm=self.l2_clip_norm,
        noise_multiplier=self.noise_multiplier, expected_batch_size=self.divisor,
        per_layer=self.per_layer, microbatch_size=self.microbatch_size,
        clipping=clipping)


def noisy_count(num_units: int, *, epsilon: float,
                secret: secret_lib.RunSecret) -> int:
  """``num_units`` + exact discrete Laplace noise of parameter ``epsilon``.

  Guarantee: epsilon-DP under add/remove one unit (sensitivity 1); the noise
  comes from the run secret's keyed stream, so a resume draws the same value
  and the count is released once. Clamped below at 1 (post-processing).
  """
  noise_spec = mechanisms.calibrate("discrete_laplace", l1_sensitivity=1,
                                    l2_sensitivity=1, epsilon=epsilon)
  value = mechanisms.add_noise(noise_spec, [num_units],
                               secret.python_rng("count_of_units"))[0]
  return max(1, int(value))


def make_plan(*, unit: str, relation: str, target_epsilon: float | None,
              noise_multiplier: float | None, sampling_prob: float | None,
              batch_size: int, steps: int, num_units: int, delta: float,
              l2_clip_norm: float, secret: secret_lib.RunSecret,
              private: bool = True, accountant: str = "rdp",
              epsilon_budget: float | None = None,
              count_epsilon: float = DEFAULT_COUNT_EPSILON,
              overflow: str = "grow", per_layer: bool = False,
              microbatch_size: int | None = None, multiple_of: int = 1,
              unit_description: str = "") -> Plan:
  """The plan of a run (see the module docstring).

  Args:
    unit, relation: the unit of privacy and the neighbouring relation.
    target_epsilon / noise_multiplier: exactly one when ``private``.
    sampling_prob: a public q, or None to take ``batch_size`` / N (noisy N
      under add_remove).
    batch_size: expected units per step when q is derived.
    steps: configured steps; the budget may allow fewer.
    num_units: the true number of units. PRIVATE under add_remove: read only
      through ``noisy_count``.
    delta, l2_clip_norm, accountant, epsilon_budget, overflow, per_layer,
      microbatch_size: as in ``PrivacyConfig``.
    secret: the run secret.
    private: False plans a non-private run (same sampling, no noise).
    count_epsilon: epsilon of the DP count of units (add_remove, private).
    multiple_of: bucket sizes are multiples of it (devices x microbatch).
    unit_description: what one unit is, for the statement.

  Raises:
    ValueError: a configuration that cannot be accounted for honestly, with
      the field and value named.
  """
  if relation == "replace_one" and accountant != "pld":
    raise ValueError("config.privacy.neighbouring='replace_one' needs "
                     "privacy.accountant='pld' (RDP cannot account for Poisson "
                     "sampling under replace-one)")
  accounting.check_accountant(accountant, relation)
  dp_count = private and relation == "add_remove"
  if dp_count:
    if overflow == "truncate":
      raise ValueError(
          "config.privacy.overflow='truncate' needs a public dataset size (truncated "
          "Poisson accounting depends on N), which add/remove-one DP keeps private; "
          "use privacy.neighbouring='replace_one' with accountant='pld', or "
          "overflow='grow'")
    if noise_multiplier is not None and sampling_prob is None:
      raise ValueError(
          f"config.privacy.noise_multiplier={noise_multiplier} with q derived from "
          "the number of units: under add/remove-one DP that number is private, and "
          "q = batch_size / (noisy count) would make epsilon depend on the data. "
          "Give privacy.target_epsilon (sigma is then calibrated for whatever q "
          "is), or a public privacy.sampling_prob, or privacy.neighbouring="
          "'replace_one'")
    limits = [x for x in (target_epsilon, epsilon_budget) if x is not None]
    limit = min(limits) if limits else None
    if not 0 < count_epsilon or (limit is not None and count_epsilon >= limit):
      raise ValueError(
          f"config.privacy.count_epsilon={count_epsilon} must be > 0 and below the "
          f"target epsilon / budget {limit}")
    released = noisy_count(num_units, epsilon=count_epsilon, secret=secret)
  else:
    count_epsilon = 0.0
    released = num_units
  q = sampling_prob if sampling_prob is not None else batch_size / released
  if q > 1:
    what = "the DP count of" if dp_count else "the number of"
    raise ValueError(
        f"config.train.batch_size={batch_size} exceeds {what} privacy units "
        f"({released} {unit}s): sampling probability {q:.3f} > 1")
  buckets = sampling.bucket_sizes(num_units=released, sampling_prob=q,
                                  multiple_of=multiple_of)
  truncated = buckets[-1] if overflow == "truncate" else None
  public_n = num_units if relation == "replace_one" else None
  common = dict(
      unit=unit, unit_description=unit_description, relation=relation,
      sampling_prob=q, divisor=q * released, l2_clip_norm=l2_clip_norm, delta=delta,
      accountant=accountant, count_epsilon=count_epsilon,
      noisy_num_units=released if dp_count else None, public_num_units=public_n,
      truncated_batch_size=truncated, bucket_sizes=buckets, overflow=overflow,
      per_layer=per_layer, microbatch_size=microbatch_size, secret=secret)
  if not private:
    return Plan(private=False, noise_multiplier=0.0, steps=steps,
                epsilon_budget=None, **{**common, "l2_clip_norm": math.inf})
  trunc = ({"dataset_size": public_n, "truncated_batch_size": truncated}
           if truncated else {})
  if noise_multiplier is not None:
    sigma = noise_multiplier
  else:
    sigma = calibration.calibrate_noise_multiplier(
        target_epsilon=target_epsilon - count_epsilon, sampling_prob=q,
        steps=max(steps, 1), delta=delta, accountant=accountant, relation=relation,
        **trunc)
  budget = epsilon_budget if epsilon_budget is not None else target_epsilon
  allowed = steps
  if budget is not None and sigma > 0:
    allowed = min(steps, calibration.max_steps(
        sampling_prob=q, noise_multiplier=sigma, delta=delta,
        epsilon_budget=budget - count_epsilon, accountant=accountant,
        relation=relation, **trunc))
  elif budget is not None:
    allowed = 0
  return Plan(private=True, noise_multiplier=sigma, steps=allowed,
              epsilon_budget=budget, **common)
