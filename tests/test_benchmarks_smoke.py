"""The benchmark and experiment scripts still run (tiny sizes; the numbers are not checked here)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str) -> str:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_bench_layers_runs():
    doc = json.loads(run_script("benchmarks/bench_layers.py", "--d", "16", "--h", "32", "--batches", "2",
                                "--alphas", "2", "--repeat", "1", "--json"))
    assert {r["config"] for r in doc["rows"]} >= {"paper, masked dense", "structured, FPELinear grouped"}
    assert all(r["forward_vs_dense"] > 0 for r in doc["rows"])


def test_bench_expand_runs():
    doc = json.loads(run_script("benchmarks/bench_expand.py", "--size", "16x64", "--repeat", "1", "--json"))
    assert doc["packed_over_input"] > 0 and doc["peak_rss_bytes"] >= doc["import_rss_bytes"] > 0
    assert set(doc["required_s"]) == {"read_sha256", "drift_two_dense_forwards"}  # the lower bound's parts
    assert doc["lower_bound_over_floor"] == (doc["floor_s"] + sum(doc["required_s"].values())) / doc["floor_s"] > 1


def test_run_all_prints_one_table_of_every_benchmark():
    out = run_script("benchmarks/run_all.py", "--quick")
    lines = out.strip().splitlines()
    assert lines[0].split()[:3] == ["benchmark", "measure", "ratio"]
    names = {line.split()[0] for line in lines[1:]}
    assert names >= {"layers", "expand", "finetune", "analyze"}
    assert all(line.rstrip().endswith("x") for line in lines[1:])  # every row is a ratio
