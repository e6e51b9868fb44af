"""Planted bugs: broken steps that the step audit must flag.

Each function returns a ``step.Wiring`` that swaps ONE real piece for a broken
one while the accountant is still told the original ``StepSpec``. An audit
that cannot flag them is itself broken (``tests/audit_step_test.py`` checks
that every one is flagged at the default run count, and that the correct
step is not).

* ``noise_halved``: the step adds noise with std sigma/2 x C.
* ``no_clipping``: the clipped sum does not clip, and still reports
  sensitivity C.
* ``per_row_clipping``: a user's rows are clipped one by one instead of as one
  group, so a user with k rows moves the sum by up to k x C.
* ``sampler_ignores_q``: every unit is in every step while the accountant
  assumes Poisson sampling with q < 1.

>>> noise_halved(step.StepSpec(noise_multiplier=2.0)).noise_multiplier
1.0
"""

from privjax.audit import step
from privjax.dp import clipping


def noise_halved(spec: step.StepSpec) -> step.Wiring:
  return step.Wiring(name="noise_halved", noise_multiplier=spec.noise_multiplier / 2)


def unclipped_grad_sum(loss_fun, *, l2_clip_norm, per_layer=False, microbatch_size=None):
  """A ``clipped_sum_fn`` that forgets to clip but claims sensitivity C."""
  del per_layer, microbatch_size
  plain = clipping.grad_sum(loss_fun)

  def fun(params, batch, mask, rng=None) -> clipping.ClippedSum:
    out = plain(params, batch, mask, rng)
    return out._replace(sensitivity=clipping.sensitivity_of(l2_clip_norm))

  return fun


def no_clipping(spec: step.StepSpec) -> step.Wiring:
  del spec
  return step.Wiring(name="no_clipping", clipped_sum_fn=unclipped_grad_sum)


def per_row_clipping(spec: step.StepSpec) -> step.Wiring:
  del spec
  return step.Wiring(name="per_row_clipping", group_by_user=False)


def sampler_ignores_q(spec: step.StepSpec) -> step.Wiring:
  if spec.sampling_prob >= 1:
    raise ValueError(f"sampler_ignores_q needs spec.sampling_prob < 1, got "
                     f"{spec.sampling_prob}")
  return step.Wiring(name="sampler_ignores_q", sampling_prob=1.0)


BUGS = {"noise_halved": noise_halved, "no_clipping": no_clipping,
        "per_row_clipping": per_row_clipping, "sampler_ignores_q": sampler_ignores_q}


def wiring(name: str, spec: step.StepSpec) -> step.Wiring:
  """The wiring called ``name``: "correct" or one of ``BUGS``."""
  if name == "correct":
    return step.Wiring()
  if name not in BUGS:
    raise ValueError(f"bug={name!r} must be 'correct' or one of {sorted(BUGS)}")
  return BUGS[name](spec)
