"""Peer benchmark: the workloads of ``workloads.py`` with jax-privacy 2.0.0.

Runs in its own virtual environment::

  python3 -m venv /tmp/venv-jaxprivacy
  /tmp/venv-jaxprivacy/bin/pip install jax-privacy==2.0.0 flax==0.12.8
  /tmp/venv-jaxprivacy/bin/python studies/bench/peers/jax_privacy_bench.py --out /tmp/jp.json

jax-privacy 2.0.0 pulls jax/jaxlib 0.10.2, optax, chex, dp-accounting 0.6.0,
pydantic, dm-tree and scipy (the same jax as privjax). ``flax`` is added
only so that this script can run privjax's own model code (it imports
``studies/bench/bench.py``'s ``build``): the models, data and per-example losses
are then identical to privjax's, and the only difference measured is the
DP machinery.

Modes:

* ``nonprivate``: ``jax.value_and_grad`` of the summed per-example loss
  (vmapped), then SGD: the same computation as privjax's non-private step.
* ``vmap``: ``jax_privacy.clipped_grad(..., keep_batch_dim=False)`` (per-
  example gradients with ``vmap``, each clipped inside the vmap by
  ``clip_pytree``, then summed), Gaussian noise from
  ``jax_privacy.noise_addition.gaussian_privatizer``, divided by the batch
  size, SGD. jax-privacy has no ghost clipping; this is its per-example
  clipping API.

Timing and memory as in ``studies/bench/bench.py``: ahead-of-time compile
reported apart, ``nonprivate`` first, then ``vmap`` in its own block (it
materialises per-example gradients); median over ``--steps``; peak RSS of
each mode in a fresh subprocess after ``malloc_trim`` + VmHWM reset.
"""

import argparse
import json
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(_HERE)))  # repo root

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax_privacy  # noqa: E402
from jax_privacy import noise_addition  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import bench  # noqa: E402  (privjax's models, data and losses)
import workloads  # noqa: E402

MODES = ("nonprivate", "vmap")


def make_step(name, mode, quick):
  """-> (jitted step(params, opt_state, batch, mask) , params, opt_state, batch, mask)."""
  loss_fun, params, batch, mask, info = bench.build(name, quick)

  def group_loss(p, group):   # group leaves [K=1, ...]
    return jnp.sum(jax.vmap(lambda ex: loss_fun(p, None, ex, None))(group))

  # Both modes divide the (noisy) SUM by the batch size, then take an SGD step.
  divide_then_sgd = [optax.scale(1.0 / info["batch"]), optax.sgd(workloads.LEARNING_RATE)]
  if mode == "nonprivate":
    optimizer = optax.chain(*divide_then_sgd)

    def grads_of(p, batch):
      total = lambda q: jnp.sum(jax.vmap(group_loss, in_axes=(None, 0))(q, batch))
      return jax.grad(total)(p)
  else:
    grads_of = jax_privacy.clipped_grad(
        group_loss, l2_clip_norm=workloads.L2_CLIP_NORM, batch_argnums=1,
        keep_batch_dim=False)
    optimizer = optax.chain(
        noise_addition.gaussian_privatizer(
            stddev=workloads.NOISE_MULTIPLIER * grads_of.sensitivity(), prng_key=0),
        *divide_then_sgd)

  def step(p, opt_state, batch):
    updates, opt_state = optimizer.update(grads_of(p, batch), opt_state, p)
    return optax.apply_updates(p, updates), opt_state

  return jax.jit(step, donate_argnums=(0, 1)), params, optimizer.init(params), batch


def run_workload(name, modes, steps, quick):
  out, info = {}, None
  for mode in modes:   # each mode in its own block (see the docstring)
    step, params, opt_state, batch = make_step(name, mode, quick)
    info = info or {"num_params": sum(int(np.prod(x.shape))
                                      for x in jax.tree.leaves(params))}
    t0 = time.perf_counter()
    compiled = step.lower(params, opt_state, batch).compile()
    compile_s = time.perf_counter() - t0
    params, opt_state = jax.block_until_ready(compiled(params, opt_state, batch))
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      params, opt_state = jax.block_until_ready(compiled(params, opt_state, batch))
      times.append(1e3 * (time.perf_counter() - t0))
    t = np.asarray(times)
    out[mode] = {"compile_s": compile_s, "times_ms": times,
                 "step_ms": float(np.median(t)), "p25_ms": float(np.percentile(t, 25)),
                 "p75_ms": float(np.percentile(t, 75)), "min_ms": float(t.min())}
    print(f"  jax-privacy {name}/{mode}: compile {compile_s:.1f} s, "
          f"{out[mode]['step_ms']:.1f} ms", file=sys.stderr, flush=True)
  return {"info": info, "modes": out}


def child(name, mode, quick, steps=2):
  step, params, opt_state, batch = make_step(name, mode, quick)
  jax.block_until_ready((params, batch))
  base = workloads.current_rss_mb()
  compiled = step.lower(params, opt_state, batch).compile()
  compile_peak = workloads.peak_rss_mb()
  workloads.reset_peak_rss()
  before = workloads.current_rss_mb()
  for _ in range(steps):
    params, opt_state = jax.block_until_ready(compiled(params, opt_state, batch))
  return {"rss_base_mb": base, "rss_compile_peak_mb": compile_peak,
          "rss_before_steps_mb": before, "rss_mb": workloads.peak_rss_mb()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workloads", default="a,b,c")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--no-rss", action="store_true")
  parser.add_argument("--out")
  parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(child(*args.child, quick=args.quick)))
    return
  results = {}
  for name in workloads.parse_workloads(args.workloads):
    res = run_workload(name, MODES, args.steps, args.quick)
    workloads.add_rss_and_ratios(res, os.path.abspath(__file__), name, MODES,
                                 args.quick, rss=not args.no_rss)
    results[name] = res
  report = {"meta": {"framework": "jax-privacy", "jax_privacy": jax_privacy.__version__,
                     "jax": jax.__version__, "steps": args.steps, "quick": args.quick},
            "results": results}
  workloads.write_report(report, args.out)


if __name__ == "__main__":
  main()
