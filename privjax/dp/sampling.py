"""Host-side Poisson sampling of privacy units into padded, masked batches.

A *unit* is whatever the privacy guarantee protects: an example for
example-level DP, a user for user-level DP. The sampler only sees unit indices
``0 .. num_units - 1``; mapping units to rows is the caller's business (see
``privjax.dp.bounding.group_rows`` for bounding each user's contribution).

Guarantee. At every step the set of real (unmasked) indices in a
``SampledBatch`` is exactly a Poisson sample: each unit is included
independently with probability ``sampling_prob``, independently of the other
units and of the other steps. This is the sampling that the privacy accountant
(``dp_accounting.PoissonSampledDpEvent``) assumes, under the add/remove-one-unit
neighbouring relation. The one exception is ``overflow="truncate"``: a sample
larger than the largest bucket is cut down to a uniformly random subset of that
size, and the accountant must then use
``dp_accounting.TruncatedSubsampledGaussianDpEvent`` with
``PoissonSampler.truncated_batch_size``.

Padding rows carry no data: they point at index 0 (any valid index would do,
so that a gather stays in bounds) and are masked out; the step must give them
zero weight. The padded size depends only on the number of sampled units,
never on which units were sampled.

Randomness comes from NumPy only, derived from ``(seed, step)`` alone, so a
run that resumes at step ``t`` draws exactly the batches it would have drawn
had it never stopped, and the sampler has no state to checkpoint beyond the
step counter.

>>> sizes = bucket_sizes(num_units=1000, sampling_prob=0.1, multiple_of=8)
>>> sampler = PoissonSampler(sampling_prob=0.1, seed=0, bucket_sizes=sizes)
>>> batch = sampler.sample(step=0, num_units=1000)
>>> batch.indices.shape[0] in sizes, int(batch.mask.sum()) == batch.size
(True, True)
"""

import dataclasses
import math
import numbers

import numpy as np

from privjax import _validate

OVERFLOW_POLICIES = ("grow", "truncate", "refuse")

_SAMPLING_STREAM = 0

# SeedSequence pads entropy to 4 uint32 words before appending the spawn key,
# so (seed, spawn_key) maps to distinct streams only while seed < 2**128: the
# run secret gives 128 bits (``RunSecret.integer("sampling")``).
_MAX_SEED = 2**128 - 1
_MAX_UNITS = np.iinfo(np.int32).max  # indices are int32 on device.


def _integer(name: str, value, minimum: int, maximum: int | None = None) -> int:
  if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
      or value < minimum or (maximum is not None and value > maximum)):
    bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    raise ValueError(f"{name}={value!r} must be an integer {bound}")
  return int(value)


def _rng(seed: int, stream: int, counter: int) -> np.random.Generator:
  # spawn_key is NumPy's documented way to derive independent child streams
  # (it is what SeedSequence.spawn sets). A plain entropy list [seed, step]
  # would alias, e.g. [2**32 + a, b] and [a, 1 + 2**32 * b] give the same words.
  seq = np.random.SeedSequence(seed, spawn_key=(stream, counter))
  return np.random.Generator(np.random.PCG64(seq))


# ----------------------------------------------------------------------------
# Bucket sizes.
# ----------------------------------------------------------------------------


def _log_chernoff_tail(num_units: int, q: float, n: int) -> float:
  """Upper bound on log P[Binomial(num_units, q) > n] (Chernoff-Hoeffding)."""
  if n >= num_units:
    return -math.inf
  a = (n + 1) / num_units
  if a <= q:
    return 0.0
  # P[X >= N a] <= exp(-N KL(a || q)) for a > q, with 0 log 0 = 0.
  kl = a * math.log(a / q)
  if a < 1:
    kl += (1 - a) * math.log((1 - a) / (1 - q))
  return -num_units * kl


def _chernoff_quantile(num_units: int, q: float, log_tail: float) -> int:
  """Smallest n whose Chernoff bound on P[X > n] is <= exp(log_tail)."""
  lo, hi = max(0, math.floor(num_units * q)), num_units  # hi always qualifies.
  while lo < hi:
    mid = (lo + hi) // 2
    if _log_chernoff_tail(num_units, q, mid) <= log_tail:
      hi = mid
    else:
      lo = mid + 1
  return lo


def _max_batch_size(num_units: int, q: float, tail_prob: float) -> int:
  """Smallest n with P[Binomial(num_units, q) > n] <= tail_prob (upper bound)."""
  if num_units == 0 or q == 0:
    return 0
  if q == 1:
    return num_units
  log_tp = math.log(tail_prob)
  # Sum the pmf exactly over a window [k_lo + 1, k_hi] and bound what lies
  # beyond k_hi by Chernoff, chosen so that the remainder is <= 1e-9 tail_prob.
  # For tail_prob < 1/2 the answer is >= floor(N q), since the median is.
  k_lo = math.floor(num_units * q)
  k_hi = _chernoff_quantile(num_units, q, log_tp + math.log(1e-9))
  log_rest = _log_chernoff_tail(num_units, q, k_hi)
  if k_hi <= k_lo:
    return k_hi
  k = np.arange(k_lo + 1, k_hi + 1, dtype=np.float64)
  first = k_lo + 1
  log_pmf_first = (math.lgamma(num_units + 1) - math.lgamma(first + 1)
                   - math.lgamma(num_units - first + 1) + first * math.log(q)
                   + (num_units - first) * math.log1p(-q))
  # pmf(k + 1) / pmf(k) = (N - k) / (k + 1) * q / (1 - q).
  log_ratio = (np.log(num_units - k[:-1]) - np.log(k[:-1] + 1)
               + math.log(q) - math.log1p(-q))
  log_pmf = log_pmf_first + np.concatenate([[0.0], np.cumsum(log_ratio)])
  # log_tail[i] bounds log P[X > k_lo + i] for i = 0 .. len(k).
  log_sums = np.logaddexp.accumulate(log_pmf[::-1])[::-1]
  log_tail = np.logaddexp(np.append(log_sums, -np.inf), log_rest)
  # A relative margin of 1e-6 absorbs the rounding of lgamma for large N.
  ok = np.flatnonzero(log_tail <= log_tp - 1e-6)
  return k_lo + int(ok[0]) if ok.size else k_hi


def _round_up(n: int, multiple_of: int) -> int:
  return max(multiple_of, -(-n // multiple_of) * multiple_of)


def bucket_sizes(*, num_units: int, sampling_prob: float, num_buckets: int = 3,
                 multiple_of: int = 1,
                 tail_prob: float = 1e-10) -> tuple[int, ...]:
  """A few static padded batch sizes for Poisson samples of ``num_units``.

  The jitted step compiles once per distinct batch shape; padding every sample
  up to the smallest of these buckets that fits keeps that to a few compiles.

  The largest bucket is the smallest ``n`` (rounded up to ``multiple_of``) with
  ``P[Binomial(num_units, sampling_prob) > n] <= tail_prob``: the binomial tail
  is summed exactly in log space beyond a window it is bounded by Chernoff, so
  the returned size errs only on the large side. The other buckets are spaced
  geometrically from the mean ``num_units * sampling_prob`` up to the largest.
  The buckets affect speed and memory only, never privacy (what happens on the
  rare overflow is ``PoissonSampler.overflow``).

  Args:
    num_units: number of privacy units (examples or users), >= 0.
    sampling_prob: Poisson sampling probability q in [0, 1].
    num_buckets: how many sizes at most (fewer after de-duplication).
    multiple_of: every size is a positive multiple of it (e.g. device count).
    tail_prob: probability, in (0, 1/2), that a sample exceeds the largest size.

  Returns:
    Strictly increasing sizes, each a multiple of ``multiple_of``.

  >>> bucket_sizes(num_units=10_000, sampling_prob=0.01, multiple_of=8)
  (104, 136, 176)
  >>> bucket_sizes(num_units=10, sampling_prob=0.0, multiple_of=4)
  (4,)
  """
  num_units = _integer("num_units", num_units, 0, _MAX_UNITS)
  _validate.probability("sampling_prob", sampling_prob)
  num_buckets = _integer("num_buckets", num_buckets, 1)
  multiple_of = _integer("multiple_of", multiple_of, 1)
  if not (isinstance(tail_prob, (int, float)) and 0 < tail_prob < 0.5):
    raise ValueError(f"tail_prob={tail_prob!r} must be in (0, 0.5)")
  largest = _max_batch_size(num_units, float(sampling_prob), float(tail_prob))
  low = min(largest, max(1, math.ceil(num_units * sampling_prob)))
  sizes = {_round_up(largest, multiple_of)}
  for i in range(num_buckets - 1):
    # Geometric spacing: relative padding waste is the same in every bucket.
    size = low * (largest / low) ** (i / (num_buckets - 1)) if largest else 0
    sizes.add(_round_up(math.ceil(size), multiple_of))
  return tuple(sorted(sizes))


# ----------------------------------------------------------------------------
# Poisson sampler.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class SampledBatch:
  """One step's sample, padded to a bucket size ``B``.

  Attributes:
    indices: int32 [B] unit indices; rows ``size ..`` are padding and point at
      unit 0. The real rows are distinct and sorted ascending.
    mask: bool [B], True exactly on the first ``size`` (real) rows.
    size: number of real rows (the realised Poisson batch size, or the
      truncated size).
    truncated: True if a larger Poisson sample was cut down to ``size``.
  """
  indices: np.ndarray
  mask: np.ndarray
  size: int
  truncated: bool


@dataclasses.dataclass(frozen=True, kw_only=True)
class PoissonSampler:
  """Poisson sampling of units, deterministic from ``(seed, step)``.

  Guarantee: for each step, the real rows of ``sample(step, num_units)`` are a
  Poisson sample, each unit included independently with probability
  ``sampling_prob``, independently across steps; unless ``overflow="truncate"``
  fires, in which case they are a uniformly random subset of
  ``truncated_batch_size`` units of such a sample. The randomness is NumPy's
  PCG64 seeded from ``(seed, step)`` and is independent of the data, so the
  accountant may treat steps as independent Poisson-subsampled mechanisms.
  Anyone who learns ``seed`` learns every batch: it must come from the run
  secret (``RunSecret.integer("sampling")``), never from a released file.

  Attributes:
    sampling_prob: q in [0, 1].
    seed: integer in [0, 2**128), secret.
    bucket_sizes: strictly increasing positive padded sizes (``bucket_sizes()``).
    overflow: what to do with a sample larger than the largest bucket.
      ``"grow"`` pads to the next multiple of the largest bucket (one more
      compile, nothing dropped, privacy unaffected). ``"truncate"`` keeps a
      uniformly random subset of largest-bucket size; account with
      ``truncated_batch_size``. ``"refuse"`` raises RuntimeError; note that a
      run that stops reveals that it stopped, which with buckets from
      ``bucket_sizes`` happens with probability <= ``tail_prob`` per step.

  >>> sampler = PoissonSampler(sampling_prob=0.5, seed=1, bucket_sizes=(4, 8))
  >>> batch = sampler.sample(step=0, num_units=10)
  >>> batch.size, batch.indices.tolist(), batch.mask.tolist()
  (7, [0, 1, 3, 4, 5, 7, 9, 0], [True, True, True, True, True, True, True, False])
  """
  sampling_prob: float
  seed: int
  bucket_sizes: tuple[int, ...]
  overflow: str = "grow"

  def __post_init__(self):
    _validate.probability("sampling_prob", self.sampling_prob)
    _integer("seed", self.seed, 0, _MAX_SEED)
    _validate.one_of("overflow", self.overflow, OVERFLOW_POLICIES)
    sizes = tuple(self.bucket_sizes)
    if (not sizes or any(isinstance(s, bool) or not isinstance(s, numbers.Integral)
                         or s < 1 for s in sizes)
        or any(a >= b for a, b in zip(sizes, sizes[1:]))):
      raise ValueError(f"bucket_sizes={self.bucket_sizes!r} must be a non-empty, "
                       "strictly increasing sequence of positive integers")
    object.__setattr__(self, "bucket_sizes", tuple(int(s) for s in sizes))

  @property
  def truncated_batch_size(self) -> int | None:
    """The cap to pass to the accountant, or None if samples are never cut."""
    return self.bucket_sizes[-1] if self.overflow == "truncate" else None

  def padded_size(self, size: int) -> int:
    """The padded batch size for ``size`` real rows (under ``"grow"``)."""
    for bucket in self.bucket_sizes:
      if size <= bucket:
        return bucket
    largest = self.bucket_sizes[-1]
    return -(-size // largest) * largest

  def sample(self, step: int, num_units: int) -> SampledBatch:
    """The padded Poisson sample of ``range(num_units)`` for ``step``.

    Raises:
      RuntimeError: if ``overflow="refuse"`` and the sample is larger than the
        largest bucket.
    """
    step = _integer("step", step, 0)
    num_units = _integer("num_units", num_units, 0, _MAX_UNITS)
    rng = _rng(self.seed, _SAMPLING_STREAM, step)
    # Including each unit independently with probability q gives every subset
    # S the probability q^|S| (1 - q)^(N - |S|): the size is Binomial(N, q) and,
    # given the size, all subsets of that size are equally likely. So drawing
    # the size, then that many distinct units uniformly, is the same
    # distribution at O(size) cost (O(N) for small N) instead of N coin flips.
    count = int(rng.binomial(num_units, self.sampling_prob))
    largest = self.bucket_sizes[-1]
    truncated = count > largest and self.overflow == "truncate"
    if count > largest and self.overflow == "refuse":
      raise RuntimeError(
          f"Poisson sample at step={step} has {count} units, more than the "
          f"largest bucket size {largest} (overflow='refuse'); use larger "
          "bucket_sizes (smaller tail_prob) or overflow='grow'")
    # A uniform subset of `largest` units of a uniform subset is a uniform
    # subset, so truncation draws its survivors directly.
    size = largest if truncated else count
    chosen = rng.choice(num_units, size=size, replace=False, shuffle=False)
    # Sorted: the clipped-gradient sum ignores order, and sorted gathers are
    # friendlier to memory.
    chosen.sort()
    padded = self.padded_size(size)
    indices = np.zeros(padded, np.int32)
    indices[:size] = chosen
    mask = np.arange(padded) < size
    indices.flags.writeable = False
    mask.flags.writeable = False
    return SampledBatch(indices=indices, mask=mask, size=size,
                        truncated=truncated)
