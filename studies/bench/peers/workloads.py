"""The benchmark workloads as plain shapes and NumPy data: one source of truth.

``studies/bench/bench.py`` (privjax) and the peer scripts in this folder (Opacus,
jax-privacy) all read their shapes and batches from here, so every framework
trains the same architecture on the same numbers with the same loss. Only
NumPy is imported: each peer runs in its own virtual environment.

Workloads (``--workloads a,b,c``):

a. ``mlp``: a 784 -> 1024 -> 256 -> 10 ReLU classifier (Linear layers with
   bias, 1,068,810 parameters), softmax cross-entropy, batch 256. Inputs are
   N(0, 1) vectors, labels uniform over 10 classes.
b. ``sasrec``: SASRec at MovieLens-100k sizes (``SASRecConfig.ml100k(1682)``:
   1682 items, window 50, d = 50, 2 pre-LN blocks, 1 head, FFN width 50,
   ReLU), separate output item table, dropout off (so every framework runs the
   same deterministic function), 201,850 parameters. Loss: full-softmax
   cross-entropy over the 1682 items at every position with a target, summed
   over the window (one user's window is one example). Batch 256. Histories
   are left-padded to 50 with lengths uniform in [5, 50].
c. ``bert``: a MiniLM-L6-sized BERT encoder (``BertConfig.minilm_l6()``:
   vocab 30522, d = 384, 6 post-LN layers, 12 heads, FFN 1536, 512 positions,
   2 token types; no pooler) with random weights, plus a classification head:
   mask-mean-pooled last hidden state -> Linear(384, 10) -> softmax
   cross-entropy. 22,569,226 parameters, all trained. Batch 16, sequence 64,
   real lengths uniform in [32, 64] (the rest is padding).

``quick=True`` shrinks every workload to a smoke-test size.
"""

import numpy as np

FULL = {
    "mlp": {"batch": 256, "sizes": (784, 1024, 256, 10)},
    "sasrec": {"batch": 256, "num_items": 1682, "max_len": 50, "embed_dim": 50,
               "num_layers": 2, "num_heads": 1, "ffn_dim": 50, "min_len": 5},
    "bert": {"batch": 16, "seq_len": 64, "vocab_size": 30522, "hidden_size": 384,
             "num_layers": 6, "num_heads": 12, "intermediate_size": 1536,
             "max_position_embeddings": 512, "type_vocab_size": 2,
             "num_classes": 10, "min_len": 32},
}

QUICK = {
    "mlp": {"batch": 8, "sizes": (16, 32, 8, 4)},
    "sasrec": {"batch": 8, "num_items": 30, "max_len": 8, "embed_dim": 16,
               "num_layers": 1, "num_heads": 2, "ffn_dim": 16, "min_len": 2},
    "bert": {"batch": 4, "seq_len": 8, "vocab_size": 50, "hidden_size": 16,
             "num_layers": 1, "num_heads": 2, "intermediate_size": 32,
             "max_position_embeddings": 16, "type_vocab_size": 2,
             "num_classes": 3, "min_len": 4},
}

# Letters of the workload list -> names.
LETTERS = {"a": "mlp", "b": "sasrec", "c": "bert"}


def spec(name: str, quick: bool = False) -> dict:
  return dict((QUICK if quick else FULL)[name])


def parse_workloads(text: str) -> list[str]:
  """"a,b,c" or "mlp,bert" -> workload names, in the order given."""
  names = []
  for item in text.split(","):
    item = item.strip()
    name = LETTERS.get(item, item)
    if name not in FULL:
      raise ValueError(f"workload {item!r} must be one of "
                       f"{sorted(LETTERS) + sorted(FULL)}")
    names.append(name)
  return names


def mlp_data(s: dict, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {"x": rng.standard_normal((s["batch"], s["sizes"][0])).astype(np.float32),
          "y": rng.integers(0, s["sizes"][-1], s["batch"]).astype(np.int32)}


def sasrec_data(s: dict, seed: int = 0) -> dict:
  """``history`` [B, L] shifted ids (0 = padding, left-padded) and ``target``
  [B, L] 0-based next items, -1 where there is none."""
  rng = np.random.default_rng(seed)
  b, length = s["batch"], s["max_len"]
  history = np.zeros((b, length), np.int32)
  target = np.full((b, length), -1, np.int32)
  for i, n in enumerate(rng.integers(s["min_len"], length + 1, b)):
    seq = rng.integers(0, s["num_items"], n + 1)
    history[i, length - n:] = seq[:-1] + 1
    target[i, length - n:] = seq[1:]
  return {"history": history, "target": target}


def bert_data(s: dict, seed: int = 0) -> dict:
  """``input_ids`` and ``attention_mask`` [B, L] (0 = padding), ``label`` [B]."""
  rng = np.random.default_rng(seed)
  b, length = s["batch"], s["seq_len"]
  ids = rng.integers(1, s["vocab_size"], (b, length)).astype(np.int32)
  lengths = rng.integers(s["min_len"], length + 1, b)
  mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
  return {"input_ids": ids * mask, "attention_mask": mask,
          "label": rng.integers(0, s["num_classes"], b).astype(np.int32)}


DATA = {"mlp": mlp_data, "sasrec": sasrec_data, "bert": bert_data}

# Every mode of every framework uses these (the values barely matter for
# timing, but they keep the clip active for a realistic fraction of examples).
L2_CLIP_NORM = 1.0
NOISE_MULTIPLIER = 1.0
LEARNING_RATE = 1e-3


def _status_mb(field: str) -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) / 1024.0
  return float("nan")


def peak_rss_mb() -> float:
  """This process's peak resident set size (VmHWM) in MiB."""
  return _status_mb("VmHWM")


def current_rss_mb() -> float:
  return _status_mb("VmRSS")


def reset_peak_rss() -> bool:
  """Returns freed heap to the OS (glibc ``malloc_trim``), then resets VmHWM
  to the current RSS (Linux >= 4.0). False if the reset is not allowed.

  Without the trim the high-water mark after a reset would still include
  whatever the compiler (XLA, TorchScript, ...) freed but glibc kept.
  """
  try:
    import ctypes  # pylint: disable=import-outside-toplevel
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except OSError:
    pass
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def median(xs):
  xs = sorted(xs)
  n = len(xs)
  return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def add_rss_and_ratios(res: dict, script: str, name: str, modes, quick: bool,
                       rss: bool = True) -> dict:
  """Fills ``res["modes"][mode]`` with the peak RSS of ``script --child name
  mode`` (a fresh process per mode, when ``rss``) and ``res["ratios"]`` with
  each mode's time (and RSS) over non-private. Returns ``res``."""
  import json  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  if rss:
    for mode in modes:
      cmd = [sys.executable, script, "--child", name, mode] + (["--quick"] if quick else [])
      proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
      res["modes"][mode].update(json.loads(proc.stdout.strip().splitlines()[-1]))
  base = res["modes"]["nonprivate"]
  res["ratios"] = {
      m: {"time": v["step_ms"] / base["step_ms"],
          **({"rss": v["rss_mb"] / base["rss_mb"]} if "rss_mb" in v else {})}
      for m, v in res["modes"].items()}
  return res


def write_report(report: dict, out: str | None) -> None:
  """The peer's JSON report to ``out``, or to stdout."""
  import json  # pylint: disable=import-outside-toplevel
  if out:
    with open(out, "w") as f:
      json.dump(report, f, indent=1)
  else:
    print(json.dumps(report, indent=1))
