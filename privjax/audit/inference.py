"""Many-run audits of private prediction: noisy argmax, top-k and GNMax answers.

The audited code is ``privjax.answers.noisy_argmax.noisy_top_k`` itself, called
once per side on ``runs`` identical rows (rows are independent queries, each
with its own noise). The two sides are neighbouring score vectors of
sensitivity (linf = 1, l2 = sqrt 2): either raw scores, or vote histograms
(``noisy_argmax.vote_histogram``) of teachers of which ONE changes its vote.
On both, item 0 leads by a gap; on the neighbour it loses one and the
challenger (item k) gains one. A run's score is 1 when the challenger is in
the answer. The gap is chosen on independent pilot runs (a grid in units of
the noise scale), so the bound stays valid.

Claimed epsilon: gumbel and laplace answers are k x epsilon-DP (pure); GNMax
is the Gaussian mechanism with mu = l2 / sigma, whose exact epsilon at delta
is claimed. For two items the GNMax test is exactly the Gaussian mechanism's,
so the bound approaches the claim as runs grow; the pure-DP ones approach it
as the gap grows.

>>> a = audit_answers("gnmax", sigma=2.0, runs=2000)
>>> a.flagged, 0 <= a.bound.epsilon_lower <= a.claimed_epsilon
(False, True)
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from privjax.answers import noisy_argmax
from privjax.audit import bounds

_GAP_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AnswerAudit:
  """A many-run audit of one answer mechanism.

  Attributes:
    mechanism, k, pair: what was audited ("scores" or "votes" neighbours).
    epsilon, sigma, monotonic: the mechanism's parameters as called.
    gap: the lead of item 0 (chosen on pilot runs).
    claimed_epsilon: what the mechanism's guarantee states (see module doc).
    bound: the ``bounds.DistinguishingBound`` of the answers.
    flagged: the held-out lower bound exceeds the claim.
    runs: runs per side (pilot runs not counted).
  """
  mechanism: str
  k: int
  pair: str
  epsilon: float | None
  sigma: float | None
  monotonic: bool
  gap: float
  claimed_epsilon: float
  bound: bounds.DistinguishingBound
  flagged: bool
  runs: int

  def to_dict(self) -> dict:
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    out["bound"] = self.bound.to_dict()
    return bounds._finite(out)  # pylint: disable=protected-access


def neighbours(pair: str, *, gap: float, k: int = 1, num_teachers: int = 200
               ) -> tuple[np.ndarray, np.ndarray, noisy_argmax.Sensitivity]:
  """Two neighbouring score vectors over k + 1 items, and their sensitivity.

  ``"scores"``: item 0 (and items 1..k-1) at ``gap``, item k at 0; the
  neighbour moves item 0 down by 1 and item k up by 1. ``"votes"`` (k = 1):
  vote histograms of ``num_teachers`` teachers over 2 classes with a lead of
  about ``gap`` votes; one teacher switches from class 0 to class 1.
  """
  if pair == "scores":
    s = np.zeros(k + 1, np.float32)
    s[:k] = gap
    s2 = s.copy()
    s2[0] -= 1.0
    s2[k] += 1.0
    return s, s2, noisy_argmax.Sensitivity(linf=1.0, l2=math.sqrt(2.0), l1=2.0)
  if pair != "votes":
    raise ValueError(f"pair={pair!r} must be 'scores' or 'votes'")
  if k != 1:
    raise ValueError(f"pair='votes' audits argmax answers (k=1), got k={k}")
  lead = int(min(max(round(gap), 0), num_teachers))
  lead -= (num_teachers - lead) % 2          # lead and num_teachers of equal parity
  first = (num_teachers + lead) // 2
  votes = np.array([0] * first + [1] * (num_teachers - first))
  counts, sensitivity = noisy_argmax.vote_histogram(votes, num_classes=2)
  votes[0] = 1                                # one teacher changes its vote
  counts2, _ = noisy_argmax.vote_histogram(votes, num_classes=2)
  return (np.asarray(counts, np.float32), np.asarray(counts2, np.float32),
          sensitivity)


def claimed_epsilon(mechanism: str, *, epsilon, sigma, k: int,
                    sensitivity: noisy_argmax.Sensitivity, delta: float) -> float:
  if mechanism == "gnmax":
    return bounds.gaussian_epsilon(sensitivity.l2 / sigma, delta)
  return noisy_argmax.pure_epsilon_of(mechanism, epsilon=epsilon, k=k)


def _answer_scores(scores, *, runs, k, key, call_kwargs) -> np.ndarray:
  rows = jnp.broadcast_to(jnp.asarray(scores), (runs, len(scores)))
  top, _ = noisy_argmax.noisy_top_k(rows, k, key=key, **call_kwargs)
  return np.asarray((top == len(scores) - 1).any(-1), np.float64)


def _noise_scale(mechanism: str, epsilon, sigma) -> float:
  return math.sqrt(2.0) * sigma if mechanism == "gnmax" else 2.0 / epsilon


def audit_answers(mechanism: str, *, epsilon: float | None = None,
                  sigma: float | None = None, k: int = 1, pair: str = "scores",
                  runs: int = 20_000, monotonic: bool = False,
                  gap: float | None = None, num_teachers: int = 200,
                  delta: float = 1e-5, confidence: float = 0.95,
                  seed: int = 0) -> AnswerAudit:
  """Audits ``noisy_top_k`` (k >= 1) of a mechanism on neighbouring inputs.

  Guarantee: ``flagged`` is True with probability at most 1 - ``confidence``
  when the answers are as private as claimed (``bounds.DistinguishingBound``);
  pilot runs that choose the gap are independent of the audited runs.

  Args:
    mechanism: "gumbel", "laplace" or "gnmax".
    epsilon: per-round epsilon (gumbel, laplace); sigma: GNMax noise std.
    k: answers per query.
    pair: "scores" or "votes" (one teacher changes its vote; k = 1).
    runs: runs per side.
    monotonic: passed to the mechanism (True on these non-monotone
      neighbours is a misuse the audit flags).
    gap: item 0's lead; None chooses it on pilot runs (runs // 4 per value).
    num_teachers: teachers of the "votes" pair.
    delta, confidence: of the claim and of the bound.
    seed: the noise keys and the selection split (a simulation).

  Returns:
    An ``AnswerAudit``.
  """
  call = {"mechanism": mechanism, "epsilon": epsilon, "sigma": sigma,
          "monotonic": monotonic}
  scale = _noise_scale(mechanism, epsilon, sigma)
  key = jax.random.key(seed)
  pilot_key, key = jax.random.split(key)
  if gap is None:
    best = (-1.0, 0.0)
    pilot = max(runs // 4, 200)
    for i, g in enumerate(_GAP_GRID):
      gap_i = 2.0 + g * scale if pair == "scores" else 1.0 + g * scale
      s, s2, sens = neighbours(pair, gap=gap_i, k=k, num_teachers=num_teachers)
      kd, ka = jax.random.split(jax.random.fold_in(pilot_key, i))
      null = _answer_scores(s, runs=pilot, k=k, key=kd, call_kwargs={**call, "sensitivity": sens})
      alt = _answer_scores(s2, runs=pilot, k=k, key=ka, call_kwargs={**call, "sensitivity": sens})
      eps = bounds.distinguishing_bound(null, alt, delta=delta, confidence=confidence,
                                        seed=seed).epsilon_optimistic
      best = max(best, (eps, gap_i))
    gap = best[1]
  s, s2, sens = neighbours(pair, gap=gap, k=k, num_teachers=num_teachers)
  kd, ka = jax.random.split(key)
  null = _answer_scores(s, runs=runs, k=k, key=kd, call_kwargs={**call, "sensitivity": sens})
  alt = _answer_scores(s2, runs=runs, k=k, key=ka, call_kwargs={**call, "sensitivity": sens})
  bound = bounds.distinguishing_bound(null, alt, delta=delta, confidence=confidence,
                                      seed=seed)
  claim = claimed_epsilon(mechanism, epsilon=epsilon, sigma=sigma, k=k,
                          sensitivity=sens, delta=delta)
  return AnswerAudit(mechanism=mechanism, k=k, pair=pair, epsilon=epsilon, sigma=sigma,
                     monotonic=monotonic, gap=float(gap), claimed_epsilon=claim,
                     bound=bound, flagged=bool(bound.epsilon_lower > claim), runs=runs)
