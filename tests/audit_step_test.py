"""The white-box step audit: it flags every planted bug and never the correct step.

Every audit here runs at the default size (20,000 runs a side, 16 canaries a
run), a few seconds each on CPU.
"""

import dataclasses

import numpy as np
import pytest

from privjax.audit import planted
from privjax.audit import step

# sigma = 4 at q = 1: the claimed epsilon is 0.93, so a bug that leaks more is visible.
SPEC = step.StepSpec(noise_multiplier=4.0)
# A subsampled step: the claimed epsilon is 0.37 at q = 0.1, 2.0 without the subsampling.
SUBSAMPLED = step.StepSpec(noise_multiplier=2.0, sampling_prob=0.1)


@pytest.mark.parametrize("spec,clipping", [(SPEC, "vmap"), (SPEC, "ghost"),
                                           (SUBSAMPLED, "vmap")])
def test_correct_step_is_not_flagged(spec, clipping):
  spec = dataclasses.replace(spec, clipping=clipping)
  audit = step.audit_step(spec)
  assert not audit.flagged
  assert audit.bound.epsilon_lower <= audit.accountant_epsilon
  assert audit.wiring.name == "correct"


@pytest.mark.parametrize("bug,spec,clipping", [
    ("noise_halved", SPEC, "vmap"), ("no_clipping", SPEC, "vmap"),
    ("per_row_clipping", SPEC, "vmap"), ("per_row_clipping", SPEC, "ghost"),
    ("sampler_ignores_q", SUBSAMPLED, "vmap")])
def test_planted_bug_is_flagged(bug, spec, clipping):
  spec = dataclasses.replace(spec, clipping=clipping)
  audit = step.audit_step(spec, wiring=planted.wiring(bug, spec))
  assert audit.flagged, (bug, audit.bound.epsilon_lower, audit.accountant_epsilon)
  assert audit.wiring.name == bug


def test_target_at_q1_t1_sigma1():
  # The target: >= 0.6 of the exact Gaussian epsilon, never above it.
  spec = step.StepSpec(noise_multiplier=1.0, sampling_prob=1.0, steps=1, delta=1e-5)
  audit = step.audit_step(spec)
  exact = audit.exact_epsilon
  assert exact == pytest.approx(4.377, abs=1e-3)
  assert 0.6 * exact <= audit.bound.epsilon_lower <= exact
  assert audit.accountant_epsilon == pytest.approx(exact, rel=1e-3)   # PLD is tight here
  assert audit.bound.mu == pytest.approx(1.0, abs=0.05)


def test_scores_are_the_canary_coordinate_in_units_of_c():
  # D: noise only (std sigma); D': +1 per step (each canary clipped to C,
  # nothing else touches its coordinate), whatever C and the divisor are.
  spec = step.StepSpec(noise_multiplier=0.5, l2_clip_norm=3.0, steps=2)
  inclusion = np.r_[np.zeros((1000, 4), bool), np.ones((1000, 4), bool)]
  scores = step.canary_scores(spec, inclusion)
  null, alt = scores[:1000], scores[1000:]
  assert abs(null.mean()) < 0.05 and null.std() == pytest.approx(0.5 * np.sqrt(2), rel=0.05)
  assert alt.mean() == pytest.approx(2.0, abs=0.05)
  exact = step.canary_scores(dataclasses.replace(spec, noise_multiplier=0.0), inclusion)
  np.testing.assert_allclose(exact, np.where(inclusion, 2.0, 0.0), atol=1e-5)


def test_ghost_and_vmap_give_the_same_scores():
  inclusion = np.r_[np.zeros((200, 3), bool), np.ones((200, 3), bool)]
  vmap = step.canary_scores(step.StepSpec(clipping="vmap"), inclusion)
  ghost = step.canary_scores(step.StepSpec(clipping="ghost"), inclusion)
  np.testing.assert_allclose(vmap, ghost, atol=1e-5)


def test_subsampled_scores_follow_the_sampler():
  # q = 0.25, no noise: a canary's score is the number of steps it was sampled.
  spec = step.StepSpec(noise_multiplier=0.0, sampling_prob=0.25, steps=4)
  scores = step.canary_scores(spec, np.ones((3000, 2), bool))
  counts = np.bincount(np.round(scores).astype(int).ravel(), minlength=5)
  expected = np.array([0.75**4, 4 * 0.25 * 0.75**3, 6 * 0.25**2 * 0.75**2,
                       4 * 0.25**3 * 0.75, 0.25**4]) * scores.size
  assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected) + 5)


def test_one_run_bound_is_large_without_privacy_and_within_the_claim_with_it():
  nonprivate, _ = step.one_run_step_audit(SPEC, wiring=step.Wiring(private=False))
  private, claimed = step.one_run_step_audit(SPEC)
  assert nonprivate.epsilon_lower > 4.0 > claimed
  assert nonprivate.num_correct == nonprivate.num_positive + nonprivate.num_negative
  assert private.epsilon_lower <= claimed


def test_spec_validation_names_the_value():
  with pytest.raises(ValueError, match="sampling_prob=0"):
    step.StepSpec(sampling_prob=0.0)
  with pytest.raises(ValueError, match="clipping='auto'"):
    step.StepSpec(clipping="auto")
  with pytest.raises(ValueError, match="sampling_prob < 1"):
    planted.wiring("sampler_ignores_q", SPEC)
  with pytest.raises(ValueError, match="bug='typo'"):
    planted.wiring("typo", SPEC)
