"""Peer benchmark: the workloads of ``workloads.py`` in Opacus 1.6 (PyTorch, CPU).

Runs in its own virtual environment, never in privjax's::

  python3 -m venv /tmp/venv-opacus
  /tmp/venv-opacus/bin/pip install torch==2.13.0 opacus   # CPU wheel; opacus 1.6
  /tmp/venv-opacus/bin/python studies/bench/peers/opacus_bench.py --out /tmp/opacus.json

(``studies/bench/bench.py --peers`` runs it for you and prints the ratios beside
privjax's.) Pin torch==2.13.0 on this machine: it is the local CPU wheel, and
any other version downloads several GB of CUDA wheels.

The models are written here in plain ``torch.nn`` with exactly the shapes,
initialisation-independent structure and losses of privjax's workloads
(``Linear``, ``Embedding`` and ``LayerNorm`` only, so every Opacus mode can
handle them; attention is parameter-free einsum code). SASRec's output item
table is an ``nn.Linear(d, num_items, bias=False)``: the same parameters and
FLOPs as privjax's separate output ``Embed.attend``, in a form Opacus's hooks
support. Losses are summed (``loss_reduction="sum"``) like privjax's.

Modes, each a fresh model and optimizer (SGD, lr 1e-3, noise multiplier 1,
max_grad_norm 1, no Poisson sampling: the batch is fixed):

* ``nonprivate``: plain forward / backward / SGD step.
* ``hooks``: ``PrivacyEngine.make_private(grad_sample_mode="hooks")``,
  Opacus's default "flat" clipping from per-sample gradients.
* ``functorch``: the same with ``grad_sample_mode="functorch"``.
* ``ghost``: ``grad_sample_mode="ghost"`` (fast gradient / ghost clipping,
  two backward passes through ``DPLossFastGradientClipping``).

Timing mirrors ``studies/bench/bench.py``: the modes that keep the weights' size
only (``nonprivate``, ``ghost``) run interleaved round-robin; the modes that
materialise per-sample gradients (``hooks``, ``functorch``) run afterwards in
their own blocks, because freeing their large buffers slows whatever step
runs next. Step time is the median over ``--steps`` steps (``--block-steps``
for hooks and functorch, which take seconds per step on BERT) after 2
warm-up steps (PyTorch has no compile step; ``compile_s`` is those two).
Peak memory: each mode in a fresh subprocess: one step, then VmHWM reset
(``malloc_trim`` + ``/proc/self/clear_refs``), then 2 steps, as privjax's.

Threads: torch's default (2 here), with ``OMP_WAIT_POLICY=PASSIVE`` unless
set: with OpenMP's default spin-waiting a torch step was ~10x slower
whenever another process used a core of this shared 2-core machine.
"""

import argparse
import json
import math
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# OpenMP's default active spin-wait made every torch step ~10x slower here
# whenever another process held one of the 2 cores (MLP plain step 218 ms vs
# 24 ms passive); passive waiting is fair to torch on a shared machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import workloads  # noqa: E402

MODES = ("nonprivate", "hooks", "functorch", "ghost")
BLOCK_MODES = ("hooks", "functorch")


class SASRecBlock(nn.Module):

  def __init__(self, d, heads, ffn, eps):
    super().__init__()
    self.heads, self.head_dim = heads, d // heads
    self.attention_norm = nn.LayerNorm(d, eps=eps)
    self.qkv = nn.Linear(d, 3 * d)
    self.attention_output = nn.Linear(d, d)
    self.ffn_norm = nn.LayerNorm(d, eps=eps)
    self.ffn_in = nn.Linear(d, ffn)
    self.ffn_out = nn.Linear(ffn, d)

  def forward(self, x, keep):
    b, length, d = x.shape
    qkv = self.qkv(self.attention_norm(x)).view(b, length, 3, self.heads, self.head_dim)
    q, k, v = qkv.unbind(2)
    logits = torch.einsum("bqhk,bthk->bhqt", q, k) * self.head_dim ** -0.5
    logits = logits.masked_fill(~keep[:, None], torch.finfo(logits.dtype).min)
    attn = torch.einsum("bhqt,bthk->bqhk", logits.softmax(-1), v).reshape(b, length, d)
    x = x + self.attention_output(attn)
    return x + self.ffn_out(F.relu(self.ffn_in(self.ffn_norm(x))))


class SASRec(nn.Module):

  def __init__(self, s):
    super().__init__()
    d = s["embed_dim"]
    self.d = d
    self.item_embed = nn.Embedding(s["num_items"] + 1, d)
    self.position_embed = nn.Embedding(s["max_len"], d)
    self.blocks = nn.ModuleList([SASRecBlock(d, s["num_heads"], s["ffn_dim"], 1e-8)
                                 for _ in range(s["num_layers"])])
    self.final_norm = nn.LayerNorm(d, eps=1e-8)
    self.output = nn.Linear(d, s["num_items"], bias=False)

  def forward(self, history):
    b, length = history.shape
    real = history > 0
    pos = torch.arange(length).repeat(b, 1)  # contiguous: Opacus views it
    x = self.item_embed(history) * math.sqrt(self.d) + self.position_embed(pos)
    x = x * real[..., None]
    keep = torch.tril(torch.ones(length, length, dtype=torch.bool))[None] & real[:, None, :]
    for block in self.blocks:
      x = block(x, keep)
    return self.output(self.final_norm(x) * real[..., None])


class BertLayer(nn.Module):

  def __init__(self, s):
    super().__init__()
    d, f = s["hidden_size"], s["intermediate_size"]
    self.heads, self.head_dim = s["num_heads"], d // s["num_heads"]
    self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
    self.attention_output = nn.Linear(d, d)
    self.attention_norm = nn.LayerNorm(d, eps=1e-12)
    self.intermediate = nn.Linear(d, f)
    self.output = nn.Linear(f, d)
    self.output_norm = nn.LayerNorm(d, eps=1e-12)

  def forward(self, x, keep):
    b, length, d = x.shape
    heads = lambda t: t.view(b, length, self.heads, self.head_dim)
    q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
    logits = torch.einsum("bqhk,bthk->bhqt", q, k) * self.head_dim ** -0.5
    logits = logits.masked_fill(~keep[:, None, None, :], torch.finfo(logits.dtype).min)
    attn = torch.einsum("bhqt,bthk->bqhk", logits.softmax(-1), v).reshape(b, length, d)
    x = self.attention_norm(x + self.attention_output(attn))
    return self.output_norm(x + self.output(F.gelu(self.intermediate(x))))


class BertClassifier(nn.Module):

  def __init__(self, s):
    super().__init__()
    d = s["hidden_size"]
    self.word = nn.Embedding(s["vocab_size"], d)
    self.position = nn.Embedding(s["max_position_embeddings"], d)
    self.token_type = nn.Embedding(s["type_vocab_size"], d)
    self.norm = nn.LayerNorm(d, eps=1e-12)
    self.layers = nn.ModuleList([BertLayer(s) for _ in range(s["num_layers"])])
    self.head = nn.Linear(d, s["num_classes"])

  def forward(self, ids, mask):
    b, length = ids.shape
    pos = torch.arange(length).repeat(b, 1)  # contiguous: Opacus views it
    x = self.norm(self.word(ids) + self.token_type(torch.zeros_like(ids))
                  + self.position(pos))
    keep = mask > 0
    for layer in self.layers:
      x = layer(x, keep)
    m = mask[..., None].to(x.dtype)
    return self.head((x * m).sum(1) / m.sum(1).clamp(min=1e-9))


def build(name, s):
  """-> (model, inputs tuple, target, logits -> (flat logits, flat target, shape))."""
  data = {k: torch.from_numpy(v).long() if v.dtype.kind == "i" else torch.from_numpy(v)
          for k, v in workloads.DATA[name](s).items()}
  if name == "mlp":
    sizes = s["sizes"]
    layers = []
    for i, o in zip(sizes[:-1], sizes[1:]):
      layers += [nn.Linear(i, o), nn.ReLU()]
    return nn.Sequential(*layers[:-1]), (data["x"],), data["y"]
  if name == "sasrec":
    return SASRec(s), (data["history"],), data["target"]
  return BertClassifier(s), (data["input_ids"], data["attention_mask"]), data["label"]


def make_runner(name, mode, s):
  """A closure that runs one training step of ``mode``."""
  torch.manual_seed(0)
  model, inputs, target = build(name, s)
  criterion = nn.CrossEntropyLoss(reduction="sum", ignore_index=-1)
  optimizer = torch.optim.SGD(model.parameters(), lr=workloads.LEARNING_RATE)

  def loss_of(model, criterion):
    logits = model(*inputs)
    if logits.dim() == 3:   # SASRec: per-position logits, one window per example
      return criterion(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                       **({"shape": logits.shape} if mode == "ghost" else {}))
    return criterion(logits, target)

  if mode != "nonprivate":
    import opacus  # pylint: disable=import-outside-toplevel
    dataset = torch.utils.data.TensorDataset(*inputs, target)
    loader = torch.utils.data.DataLoader(dataset, batch_size=s["batch"])
    engine = opacus.PrivacyEngine(accountant="rdp")
    kwargs = dict(module=model, optimizer=optimizer, data_loader=loader,
                  noise_multiplier=workloads.NOISE_MULTIPLIER,
                  max_grad_norm=workloads.L2_CLIP_NORM, loss_reduction="sum",
                  poisson_sampling=False, grad_sample_mode=mode)
    if mode == "ghost":
      model, optimizer, criterion, _ = engine.make_private(criterion=criterion, **kwargs)
    else:
      model, optimizer, _ = engine.make_private(**kwargs)
  model.train()

  def step():
    optimizer.zero_grad(set_to_none=True)
    loss = loss_of(model, criterion)
    loss.backward()
    optimizer.step()
    value = float(loss.detach() if hasattr(loss, "detach") else loss)
    return value

  return step


def run_workload(name, modes, steps, quick, block_steps=None):
  s = workloads.spec(name, quick)
  runners, out = {}, {}
  for mode in modes:
    runners[mode] = make_runner(name, mode, s)
    t0 = time.perf_counter()
    loss = runners[mode]()
    runners[mode]()
    out[mode] = {"compile_s": time.perf_counter() - t0, "times_ms": []}
    if not math.isfinite(loss):
      raise RuntimeError(f"{name}/{mode}: loss {loss}")
    print(f"  opacus {name}/{mode}: warm-up {out[mode]['compile_s']:.1f} s",
          file=sys.stderr, flush=True)

  def timed(mode):
    t0 = time.perf_counter()
    runners[mode]()
    out[mode]["times_ms"].append(1e3 * (time.perf_counter() - t0))

  fast = [m for m in modes if m not in BLOCK_MODES]
  for r in range(steps):
    for mode in fast[r % len(fast):] + fast[:r % len(fast)]:
      timed(mode)
  for mode in [m for m in modes if m in BLOCK_MODES]:
    for _ in range(block_steps or steps):
      timed(mode)
  for mode in modes:
    t = np.asarray(out[mode]["times_ms"])
    out[mode].update(step_ms=float(np.median(t)), p25_ms=float(np.percentile(t, 25)),
                     p75_ms=float(np.percentile(t, 75)), min_ms=float(t.min()))
  params = sum(p.numel() for p in build(name, s)[0].parameters())
  return {"info": {"batch": s["batch"], "num_params": params}, "modes": out}


def child(name, mode, quick, steps=2):
  s = workloads.spec(name, quick)
  run = make_runner(name, mode, s)
  base = workloads.current_rss_mb()
  run()   # the first step allocates Opacus's buffers: measure the steps after it
  first_peak = workloads.peak_rss_mb()
  workloads.reset_peak_rss()
  before = workloads.current_rss_mb()
  for _ in range(steps):
    run()
  return {"rss_base_mb": base, "rss_compile_peak_mb": first_peak,
          "rss_before_steps_mb": before, "rss_mb": workloads.peak_rss_mb()}


def serve(name, mode, quick):
  """Step server for ``bench.py``'s head-to-head timing: one step per stdin
  line, its time in ms on stdout, so privjax and Opacus steps can alternate
  while the other process waits (a load change on a shared machine then hits
  both alike)."""
  run = make_runner(name, mode, workloads.spec(name, quick))
  run()
  run()
  print("ready", flush=True)
  for _ in sys.stdin:
    t0 = time.perf_counter()
    run()
    print(f"{1e3 * (time.perf_counter() - t0):.3f}", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workloads", default="a,b,c")
  parser.add_argument("--modes", default=",".join(MODES))
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--block-steps", type=int, default=None,
                      help="steps of the per-sample-gradient modes (hooks, "
                           "functorch; default: --steps)")
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--no-rss", action="store_true")
  parser.add_argument("--threads", type=int, default=None,
                      help="torch intra-op threads (default: torch's choice)")
  parser.add_argument("--out")
  parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
  parser.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
  args = parser.parse_args()
  warnings.filterwarnings("ignore")
  if args.threads:
    torch.set_num_threads(args.threads)
  if args.serve:
    serve(*args.serve, quick=args.quick)
    return
  if args.child:
    print(json.dumps(child(*args.child, quick=args.quick)))
    return
  import opacus  # pylint: disable=import-outside-toplevel
  modes = [m for m in args.modes.split(",") if m]
  modes = ["nonprivate"] + [m for m in modes if m != "nonprivate"]
  results = {}
  for name in workloads.parse_workloads(args.workloads):
    res = run_workload(name, modes, args.steps, args.quick, args.block_steps)
    workloads.add_rss_and_ratios(res, os.path.abspath(__file__), name, modes,
                                 args.quick, rss=not args.no_rss)
    results[name] = res
    for m, v in res["modes"].items():
      print(f"opacus {name}/{m}: {v['step_ms']:.1f} ms "
            f"({res['ratios'][m]['time']:.2f}x)", file=sys.stderr, flush=True)
  report = {"meta": {"framework": "opacus", "opacus": opacus.__version__,
                     "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                     "torch": torch.__version__, "threads": torch.get_num_threads(),
                     "steps": args.steps, "block_steps": args.block_steps or args.steps,
                     "quick": args.quick},
            "results": results}
  workloads.write_report(report, args.out)


if __name__ == "__main__":
  main()
