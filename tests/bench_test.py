"""Smoke tests of studies/bench/bench.py: it runs and writes JSON with every mode."""

import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
MODES = ("nonprivate", "vmap", "ghost")


BENCH = REPO / "studies" / "bench" / "bench.py"


def _bench(*args) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(BENCH), *map(str, args)],
                        capture_output=True, text=True, check=False)


def _check(report: dict, workloads: tuple[str, ...], rss: bool):
  assert tuple(report["results"]) == workloads
  for name in workloads:
    res = report["results"][name]
    assert set(res["modes"]) == set(MODES)
    for mode in MODES:
      m = res["modes"][mode]
      assert len(m["times_ms"]) == report["meta"]["steps"]
      assert 0 < m["p25_ms"] <= m["step_ms"] <= m["p75_ms"]
      assert m["compile_s"] > 0 and m["xla_mb"] > 0
      if rss:
        assert m["rss_mb"] > 0
    assert res["ratios"]["nonprivate"]["time"] == 1.0
    # Ratios are consistent with the absolute medians they come from.
    assert res["ratios"]["ghost"]["time"] == pytest.approx(
        res["modes"]["ghost"]["step_ms"] / res["modes"]["nonprivate"]["step_ms"])
    # Per-example gradients cost memory: vmap's XLA working set must exceed
    # ghost's (which keeps only activations and output gradients).
    assert res["modes"]["vmap"]["xla_mb"] > res["modes"]["ghost"]["xla_mb"]


def test_quick_mlp_writes_json_with_all_modes(tmp_path):
  out = tmp_path / "bench.json"
  run = _bench("--quick", "--workloads", "a", "--no-rss", "--out", out)
  assert run.returncode == 0, run.stderr
  report = json.loads(out.read_text())
  _check(report, ("mlp",), rss=False)
  assert "| mlp | ghost |" in run.stdout and "| mlp | vmap |" in run.stdout


def test_unknown_workload_and_mode_are_refused():
  run = _bench("--quick", "--workloads", "d")
  assert run.returncode != 0 and "workload 'd'" in run.stderr
  run = _bench("--quick", "--modes", "fast")
  assert run.returncode != 0 and "mode 'fast'" in run.stderr


@pytest.mark.slow
def test_quick_all_workloads_with_rss_subprocesses(tmp_path):
  out = tmp_path / "bench.json"
  subprocess.run([sys.executable, str(BENCH), "--quick",
                  "--out", str(out)], check=True, cwd=REPO, timeout=900)
  _check(json.loads(out.read_text()), ("mlp", "sasrec", "bert"), rss=True)
