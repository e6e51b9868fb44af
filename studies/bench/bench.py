"""Benchmark: non-private vs DP-vmap vs DP-ghost steps, and the peers.

Runs each workload of ``studies/bench/peers/workloads.py`` (a: 1M-parameter
MLP, batch 256; b: SASRec at ML-100k sizes, batch 256, sequence 50; c: a
MiniLM-L6-sized BERT classifier, batch 16, sequence 64) through
``privjax.dp.step.make_step`` in three modes: ``nonprivate``
(``StepConfig(private=False)``: the plain gradient of the masked loss sum),
``vmap`` (exact per-example gradients) and ``ghost`` (ghost norms with the
book-keeping clipped sum). All modes use the same loss, data, SGD optimizer
and step function.

Timing. All modes of a workload are compiled in this process first (ahead of
time: ``lower(...).compile()``, reported apart as ``compile_s``), then run
interleaved, one step of each mode per round with the order rotated every
round, so a load spike on a shared machine hits every mode alike; the noise
draw of a DP step is timed alone in the same rounds (``noise_ms``). DP-vmap
runs after them in its own block (freeing its ~GB of per-example gradients
slowed the next step of the other modes by 1.5-2x here). The step
time is the median over ``--steps`` rounds (each step ends with
``block_until_ready``); p25 / p75 are reported as a noise measure. Ratios are
medians of a mode over the non-private median of the same run.

Memory. JAX on CPU has no ``memory_stats``. Two numbers per mode:
* ``xla_mb``: XLA's buffer assignment of the compiled step
  (``compiled.memory_analysis()``: arguments + outputs + temporaries, minus
  donated aliases): what the step needs at its peak, exactly, without the
  runtime around it.
* ``rss_mb``: peak resident set size of a fresh subprocess
  (``bench.py --child``) that builds the workload, compiles ONE mode, hands
  the compiler's freed heap back to the OS (glibc ``malloc_trim``), resets
  the kernel's high-water mark (``/proc/self/clear_refs``) and runs 2 steps;
  ``rss_mb`` is the VmHWM after those steps. It includes the Python and XLA
  runtime, the data and the compiled program, so its ratios are diluted by
  that shared base (``rss_before_steps_mb``, also reported).

Usage:
  python studies/bench/bench.py --out /tmp/bench.json              # a, b, c
  python studies/bench/bench.py --workloads a --steps 30 --no-rss
  python studies/bench/bench.py --peers --out /tmp/bench.json      # + Opacus, jax-privacy
                                                             #   (--peer-steps, 10)
  python studies/bench/bench.py --quick --out /tmp/q.json          # smoke run (compiles dominate)

Peers run in their own virtual environments (see studies/bench/README.md):
``--opacus-python`` (default /tmp/venv-opacus/bin/python) and
``--jaxprivacy-python`` (default /tmp/venv-jaxprivacy/bin/python).
"""

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, "peers"))

from flax import nnx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from privjax.dp import clipping  # noqa: E402
from privjax.dp import step as dp_step  # noqa: E402
from privjax.dp import ghost  # noqa: E402
from privjax.models import losses  # noqa: E402
from privjax.models import nn  # noqa: E402
from privjax.dp import noise  # noqa: E402
from privjax.models import bert  # noqa: E402
from privjax.models import sasrec  # noqa: E402
import workloads  # noqa: E402  (studies/bench/peers/workloads.py)

MODES = ("nonprivate", "vmap", "ghost")
# Modes that materialise per-example gradients run in their own block after
# the interleaved ones: freeing their ~GB buffers slowed the step that ran
# next here (MLP: ghost 36 -> 64 ms, non-private 23 -> 36 ms when interleaved).
BLOCK_MODES = ("vmap",)


# ---------------------------------------------------------------------------
# Models and per-example losses.


class Classifier(nnx.Module):
  """Workload a: a ReLU MLP of ``privjax.models.nn.Linear`` layers."""

  def __init__(self, sizes, *, rngs: nnx.Rngs):
    self.layers = nnx.List([nn.Linear(i, o, rngs=rngs)
                            for i, o in zip(sizes[:-1], sizes[1:])])

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = jax.nn.relu(layer(x))
    return self.layers[-1](x)


class BertClassifier(nnx.Module):
  """Workload c: BERT encoder -> masked mean pool -> Linear -> logits."""

  def __init__(self, config: bert.BertConfig, num_classes: int, *, rngs: nnx.Rngs):
    self.encoder = bert.BertEncoder(config, with_pooler=False, rngs=rngs)
    self.head = nn.Linear(config.hidden_size, num_classes, rngs=rngs)

  def __call__(self, ids, mask):
    return self.head(bert.mean_pool(self.encoder(ids, mask), mask))


def sasrec_config(s: dict) -> sasrec.SASRecConfig:
  return sasrec.SASRecConfig(
      num_items=s["num_items"], max_len=s["max_len"], embed_dim=s["embed_dim"],
      num_layers=s["num_layers"], num_heads=s["num_heads"], ffn_dim=s["ffn_dim"],
      dropout_rate=0.0)


def bert_config(s: dict) -> bert.BertConfig:
  return bert.BertConfig(
      vocab_size=s["vocab_size"], hidden_size=s["hidden_size"],
      num_layers=s["num_layers"], num_heads=s["num_heads"],
      intermediate_size=s["intermediate_size"],
      max_position_embeddings=s["max_position_embeddings"],
      type_vocab_size=s["type_vocab_size"])


def build(name: str, quick: bool):
  """-> (loss_fun, params, batch [G=B, K=1, ...], mask [B, 1], info)."""
  s = workloads.spec(name, quick)
  data = workloads.DATA[name](s)
  rngs = nnx.Rngs(0)
  if name == "mlp":
    model = Classifier(s["sizes"], rngs=rngs)
    forward = lambda m, ex: losses.softmax_cross_entropy(m(ex["x"]), ex["y"])
  elif name == "sasrec":
    config = sasrec_config(s)
    if not quick:   # the documented workload is exactly ml100k without dropout
      assert dataclasses.replace(config, ffn_dim=None) == dataclasses.replace(
          sasrec.SASRecConfig.ml100k(1682), dropout_rate=0.0), config
    model = sasrec.SASRec(config, rngs=rngs)
    forward = lambda m, ex: sasrec.sequence_loss(m, ex, None)
  else:
    config = bert_config(s)
    if not quick:
      assert config == bert.BertConfig.minilm_l6(), config
    model = BertClassifier(config, s["num_classes"], rngs=rngs)
    forward = lambda m, ex: losses.softmax_cross_entropy(
        m(ex["input_ids"], ex["attention_mask"]), ex["label"])
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = nnx.to_pure_dict(params)

  def loss_fun(p, frozen, example, rng):
    del frozen, rng
    return forward(nnx.merge(graphdef, nnx.State(p), rest), example)

  batch = {k: jnp.asarray(v)[:, None] for k, v in data.items()}
  mask = jnp.ones((s["batch"], 1), jnp.float32)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  info = {"batch": s["batch"], "num_params": num_params, "spec": s}
  return loss_fun, params, batch, mask, info


def make(mode: str, loss_fun, batch_size: int):
  """The jitted ``dp_step`` step of one mode (SGD; sigma 1, C 1)."""
  config = dp_step.StepConfig(
      private=mode != "nonprivate", l2_clip_norm=workloads.L2_CLIP_NORM,
      noise_multiplier=workloads.NOISE_MULTIPLIER,
      expected_batch_size=float(batch_size),
      clipping="ghost" if mode == "ghost" else "vmap")
  return dp_step.make_step(loss_fun, optax.sgd(workloads.LEARNING_RATE), config)


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


def _compile(step, state, batch, mask, key):
  t0 = time.perf_counter()
  compiled = step.lower(state, None, batch, mask, key).compile()
  seconds = time.perf_counter() - t0
  stats = compiled.memory_analysis()
  xla = None
  if stats is not None:
    xla = (stats.argument_size_in_bytes + stats.output_size_in_bytes
           + stats.temp_size_in_bytes - stats.alias_size_in_bytes) / 2**20
  return compiled, seconds, xla


def _block(x):
  return jax.block_until_ready(x)


def _timed(compiled, state, batch, mask, key, times):
  t0 = time.perf_counter()
  state, metrics = compiled(state, None, batch, mask, key)
  _block((state, metrics))
  times.append(1e3 * (time.perf_counter() - t0))
  return state


def _noise_fun(params):
  """The step's noise draw alone (``noise.add_gaussian_noise`` on a tree shaped
  like ``params``, jitted), timed beside the steps to split a DP step's cost."""
  fun = jax.jit(lambda tree, key: noise.add_gaussian_noise(tree, stddev=1.0, key=key))
  key = jax.random.key(2)
  _block(fun(params, key))

  def timed(times):
    t0 = time.perf_counter()
    _block(fun(params, key))
    times.append(1e3 * (time.perf_counter() - t0))

  return timed


# ---------------------------------------------------------------------------
# One workload, all modes, one process.


def run_workload(name: str, modes, steps: int, quick: bool) -> dict:
  loss_fun, params, batch, mask, info = build(name, quick)
  keys = jax.random.split(jax.random.key(1), steps + 1)
  compiled, states, out = {}, {}, {}
  for mode in modes:
    step = make(mode, loss_fun, info["batch"])
    state = dp_step.init_state(_copy(params), optax.sgd(workloads.LEARNING_RATE))
    compiled[mode], compile_s, xla = _compile(step, state, batch, mask, keys[0])
    t0 = time.perf_counter()
    state, metrics = compiled[mode](state, None, batch, mask, keys[0])
    _block((state, metrics))
    first = time.perf_counter() - t0
    if not np.isfinite(float(metrics["nonprivate/loss"])):
      raise RuntimeError(f"{name}/{mode}: non-finite loss {metrics}")
    states[mode] = state
    out[mode] = {"compile_s": compile_s, "first_step_ms": 1e3 * first,
                 "xla_mb": xla, "times_ms": []}
    print(f"  {name}/{mode}: compiled in {compile_s:.1f} s, first step "
          f"{1e3 * first:.0f} ms", file=sys.stderr, flush=True)
  fast = [m for m in modes if m not in BLOCK_MODES]
  for mode in fast:   # one untimed step each, after the other modes' first steps
    states[mode] = _timed(compiled[mode], states[mode], batch, mask, keys[0], [])
  noise_timed, noise_times = _noise_fun(params), []
  for r in range(steps):
    for mode in fast[r % len(fast):] + fast[:r % len(fast)]:
      states[mode] = _timed(compiled[mode], states[mode], batch, mask, keys[r + 1],
                            out[mode]["times_ms"])
    noise_timed(noise_times)
  for mode in [m for m in modes if m in BLOCK_MODES]:
    for r in range(steps):
      states[mode] = _timed(compiled[mode], states[mode], batch, mask, keys[r + 1],
                            out[mode]["times_ms"])
  for mode in modes:
    t = np.asarray(out[mode]["times_ms"])
    out[mode].update(step_ms=float(np.median(t)), p25_ms=float(np.percentile(t, 25)),
                     p75_ms=float(np.percentile(t, 75)), min_ms=float(t.min()))
  info["noise_ms"] = float(np.median(noise_times))
  live = None
  if "ghost" in modes:   # kept (not in the JSON) for the head-to-head rounds
    live = (compiled["ghost"], states["ghost"], batch, mask, keys)
  return {"info": info, "modes": out, "_live": live}


def child(name: str, mode: str, steps: int, quick: bool) -> dict:
  """Peak RSS of one mode in a fresh process (see the module docstring)."""
  loss_fun, params, batch, mask, info = build(name, quick)
  step = make(mode, loss_fun, info["batch"])
  state = dp_step.init_state(params, optax.sgd(workloads.LEARNING_RATE))
  key = jax.random.key(1)
  _block((state, batch))
  base = workloads.current_rss_mb()
  compiled, _, _ = _compile(step, state, batch, mask, key)
  compile_peak = workloads.peak_rss_mb()
  reset = workloads.reset_peak_rss()
  before_steps = workloads.current_rss_mb()
  for _ in range(steps):
    state, metrics = compiled(state, None, batch, mask, key)
    _block((state, metrics))
  return {"rss_base_mb": base, "rss_compile_peak_mb": compile_peak,
          "rss_before_steps_mb": before_steps, "rss_mb": workloads.peak_rss_mb(),
          "hwm_reset": reset}


def measure_rss(name: str, modes, quick: bool, steps: int = 2) -> dict:
  out = {}
  for mode in modes:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, mode,
           "--steps", str(steps)] + (["--quick"] if quick else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
      raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
  return out


def pieces(name: str, steps: int, quick: bool) -> dict:
  """Where a DP step's time goes: the plain gradient sum, the ghost and vmap
  clipped sums and the noise draw, each jitted alone, interleaved per round."""
  loss_fun, params, batch, mask, _ = build(name, quick)
  per_example = lambda p, ex, r: loss_fun(p, None, ex, r)
  key = jax.random.key(2)
  funs = {
      "grad_sum": lambda p: clipping.grad_sum(per_example)(p, batch, mask).grad_sum,
      "ghost_clipped_sum": lambda p: ghost.clipped_grad_sum(
          per_example, l2_clip_norm=1.0)(p, batch, mask).grad_sum,
      "noise": lambda p: noise.add_gaussian_noise(p, stddev=1.0, key=key),
  }
  compiled = {k: jax.jit(f).lower(params).compile() for k, f in funs.items()}
  times = {k: [] for k in funs}
  for k, f in compiled.items():
    _block(f(params))
  for _ in range(steps):
    for k, f in compiled.items():
      t0 = time.perf_counter()
      _block(f(params))
      times[k].append(1e3 * (time.perf_counter() - t0))
  out = {k: float(np.median(v)) for k, v in times.items()}
  print(f"  pieces {name}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in out.items())
        + f"; ghost/plain sums {out['ghost_clipped_sum'] / out['grad_sum']:.2f}x",
        file=sys.stderr, flush=True)
  return out


# ---------------------------------------------------------------------------
# Peers.


def run_peer(python: str, script: str, names, steps: int, quick: bool,
             extra=()) -> dict | None:
  if not os.path.exists(python):
    print(f"peer skipped: {python} does not exist (see studies/bench/README.md)",
          file=sys.stderr)
    return None
  with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
    path = f.name
  cmd = [python, os.path.join(_HERE, "peers", script), "--workloads",
         ",".join(names), "--steps", str(steps), "--out", path] + list(extra) + (
             ["--quick"] if quick else [])
  print(f"running {' '.join(cmd)}", file=sys.stderr, flush=True)
  proc = subprocess.run(cmd, check=False)
  if proc.returncode:
    print(f"peer {script} failed with exit code {proc.returncode}", file=sys.stderr)
    return None
  with open(path) as f:
    result = json.load(f)
  os.unlink(path)
  return result


def head_to_head(python: str, name: str, opacus_mode: str, live, steps: int,
                 quick: bool) -> dict:
  """privjax's DP-ghost step and Opacus's ``opacus_mode`` step, alternating.

  Opacus runs as a step server in its own venv (``opacus_bench.py --serve``);
  each process times its own step while the other waits, so both see the
  same machine load: the fair absolute comparison on a shared machine.
  """
  compiled, state, batch, mask, keys = live
  cmd = [python, os.path.join(_HERE, "peers", "opacus_bench.py"), "--serve",
         name, opacus_mode] + (["--quick"] if quick else [])
  proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  try:
    if proc.stdout.readline().strip() != "ready":
      raise RuntimeError(f"{' '.join(cmd)} did not start")
    ours, theirs = [], []
    for r in range(steps):
      state = _timed(compiled, state, batch, mask, keys[r % len(keys)], ours)
      proc.stdin.write("step\n")
      proc.stdin.flush()
      theirs.append(float(proc.stdout.readline()))
  finally:
    proc.stdin.close()
    proc.wait()
  out = {"opacus_mode": opacus_mode, "privjax_ghost_ms": float(np.median(ours)),
         "opacus_ms": float(np.median(theirs)), "privjax_times_ms": ours,
         "opacus_times_ms": theirs}
  out["speedup"] = out["opacus_ms"] / out["privjax_ghost_ms"]
  print(f"  head-to-head {name}: privjax ghost {out['privjax_ghost_ms']:.0f} ms, "
        f"Opacus {opacus_mode} {out['opacus_ms']:.0f} ms", file=sys.stderr, flush=True)
  return out


# ---------------------------------------------------------------------------
# Tables.


def ratios(modes: dict, base: str = "nonprivate") -> dict:
  out = {}
  b = modes[base]
  for mode, m in modes.items():
    r = {"time": m["step_ms"] / b["step_ms"]}
    if m.get("xla_mb") and b.get("xla_mb"):
      r["xla_mem"] = m["xla_mb"] / b["xla_mb"]
    if m.get("rss_mb") and b.get("rss_mb"):
      r["rss"] = m["rss_mb"] / b["rss_mb"]
    out[mode] = r
  return out


def _fmt(x, spec=".2f"):
  return "n/a" if x is None else format(x, spec)


def privjax_table(results: dict) -> str:
  lines = ["| workload | mode | step ms (median) | p25-p75 ms | x non-private | "
           "compile s | XLA MiB | x | peak RSS MiB | x |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for name, res in results.items():
    rat = res["ratios"]
    for mode, m in res["modes"].items():
      lines.append(
          f"| {name} | {mode} | {m['step_ms']:.1f} | {m['p25_ms']:.1f}-{m['p75_ms']:.1f} "
          f"| **{rat[mode]['time']:.2f}** | {m['compile_s']:.1f} | {_fmt(m.get('xla_mb'), '.0f')} "
          f"| {_fmt(rat[mode].get('xla_mem'))} | {_fmt(m.get('rss_mb'), '.0f')} "
          f"| {_fmt(rat[mode].get('rss'))} |")
  lines.append("")
  lines.append("Noise draw alone, jitted apart (threefry normals, one per parameter): " + ", ".join(
      f"{name} {res['info']['noise_ms']:.1f} ms" for name, res in results.items()))
  return "\n".join(lines)


def peer_table(results: dict, peers: dict) -> str:
  """Ratios vs each framework's own non-private step, side by side, and the
  absolute ghost-vs-best-Opacus speedup from the alternating head-to-head
  rounds (absolute times of separate runs are not comparable on a shared
  machine whose load changes by minutes)."""
  opacus = peers.get("opacus") or {}
  jaxp = peers.get("jax_privacy") or {}
  head = ("| workload | privjax vmap | privjax ghost | Opacus hooks | Opacus functorch "
          "| Opacus ghost | jax-privacy clipped_grad | non-private ms: privjax / torch "
          "/ jax-privacy | head-to-head DP ms: privjax ghost / Opacus best "
          "| speedup |")
  lines = [head, "|" + "---|" * 10]
  for name, res in results.items():
    pm = res["modes"]
    cell = lambda r, mode: (f"{r[mode]['time']:.2f}x" if r and mode in r else "n/a")
    o = opacus.get("results", {}).get(name)
    j = jaxp.get("results", {}).get(name)
    orat = o["ratios"] if o else None
    jrat = j["ratios"] if j else None
    np_ms = [f"{pm['nonprivate']['step_ms']:.0f}" if "nonprivate" in pm else "n/a",
             f"{o['modes']['nonprivate']['step_ms']:.0f}" if o else "n/a",
             f"{j['modes']['nonprivate']['step_ms']:.0f}" if j else "n/a"]
    h2h = (peers.get("head_to_head") or {}).get(name)
    if h2h:
      dp_cell = (f"{h2h['privjax_ghost_ms']:.0f} / {h2h['opacus_ms']:.0f} "
                 f"({h2h['opacus_mode']})")
      speed = f"**{h2h['speedup']:.2f}x**"
    else:
      dp_cell, speed = "n/a", "n/a"
    lines.append(
        f"| {name} | {cell(res['ratios'], 'vmap')} | {cell(res['ratios'], 'ghost')} "
        f"| {cell(orat, 'hooks')} | {cell(orat, 'functorch')} | {cell(orat, 'ghost')} "
        f"| {cell(jrat, 'vmap')} | {' / '.join(np_ms)} | {dp_cell} | {speed} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workloads", default="a,b,c",
                      help="comma list of a|mlp, b|sasrec, c|bert")
  parser.add_argument("--modes", default=",".join(MODES),
                      help="comma list of nonprivate,vmap,ghost "
                           "(nonprivate is always added: ratios need it)")
  parser.add_argument("--steps", type=int, default=20,
                      help="timed steps per mode after compilation (>= 20 for reports)")
  parser.add_argument("--out", help="write the results as JSON here")
  parser.add_argument("--quick", action="store_true",
                      help="tiny shapes and 3 steps: a smoke run")
  parser.add_argument("--no-rss", action="store_true",
                      help="skip the per-mode subprocesses that measure peak RSS")
  parser.add_argument("--pieces", action="store_true",
                      help="only time the parts of a step (plain and ghost gradient "
                           "sums, noise draw), jitted apart, interleaved")
  parser.add_argument("--peers", action="store_true",
                      help="also run Opacus and jax-privacy in their own venvs")
  parser.add_argument("--peer-frameworks", default="opacus,jax_privacy",
                      help="which peers --peers runs")
  parser.add_argument("--peer-steps", type=int, default=10,
                      help="timed steps per peer mode (Opacus's per-sample-gradient "
                           "modes get half): peers take seconds per BERT step")
  parser.add_argument("--opacus-python", default="/tmp/venv-opacus/bin/python")
  parser.add_argument("--jaxprivacy-python", default="/tmp/venv-jaxprivacy/bin/python")
  parser.add_argument("--child", nargs=2, metavar=("WORKLOAD", "MODE"),
                      help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    print(json.dumps(child(*args.child, steps=args.steps, quick=args.quick)))
    return None

  names = workloads.parse_workloads(args.workloads)
  modes = [m.strip() for m in args.modes.split(",") if m.strip()]
  for m in modes:
    if m not in MODES:
      raise ValueError(f"mode {m!r} must be one of {MODES}")
  modes = ["nonprivate"] + [m for m in modes if m != "nonprivate"]
  steps = 3 if args.quick and args.steps == 20 else args.steps
  peer_steps = min(steps, args.peer_steps)
  if steps < 1:
    raise ValueError(f"--steps={steps} must be >= 1")

  if args.pieces:
    report = {name: pieces(name, steps, args.quick) for name in names}
    print(json.dumps(report, indent=1))
    if args.out:
      with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    return report
  started = time.time()
  load_before = os.getloadavg()
  results = {}
  for name in names:
    print(f"workload {name}", file=sys.stderr, flush=True)
    res = run_workload(name, modes, steps, args.quick)
    if not args.no_rss:
      for mode, r in measure_rss(name, modes, args.quick).items():
        res["modes"][mode].update(r)
    res["ratios"] = ratios(res["modes"])
    results[name] = res
  report = {
      "meta": {
          "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
          "date": datetime.datetime.now().isoformat(timespec="seconds"),
          "jax": jax.__version__, "backend": jax.default_backend(),
          "device": str(jax.devices()[0]), "cpu_count": os.cpu_count(),
          "platform": platform.platform(), "steps": steps, "quick": args.quick,
          "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
          "seconds": None,
      },
      "results": results,
  }
  print("\n## privjax (ratios vs non-private, same process)\n")
  print(privjax_table(results))
  if args.peers:
    frameworks = args.peer_frameworks.split(",")
    report["peers"] = {
        "opacus": run_peer(args.opacus_python, "opacus_bench.py", names, peer_steps,
                           args.quick, ["--block-steps", str(max(peer_steps // 2, 3))])
                  if "opacus" in frameworks else None,
        "jax_privacy": run_peer(args.jaxprivacy_python, "jax_privacy_bench.py",
                                names, peer_steps, args.quick)
                       if "jax_privacy" in frameworks else None,
        "head_to_head": {},
    }
    opacus = report["peers"]["opacus"]
    for name in names:
      o = (opacus or {}).get("results", {}).get(name)
      live = results[name].get("_live")
      if not o or live is None:
        continue
      dp = {k: v["step_ms"] for k, v in o["modes"].items() if k != "nonprivate"}
      best = min(dp, key=dp.get)   # Opacus's fastest DP mode in its own run
      report["peers"]["head_to_head"][name] = head_to_head(
          args.opacus_python, name, best, live, max(peer_steps, 10), args.quick)
    print("\n## Peers (each DP mode / its own non-private step)\n")
    print(peer_table(results, report["peers"]))
  report["meta"]["seconds"] = time.time() - started
  report["meta"]["loadavg_after"] = os.getloadavg()
  for res in results.values():
    res.pop("_live", None)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=1)
    print(f"\nwrote {args.out}", file=sys.stderr)
  return report


if __name__ == "__main__":
  main()
