"""The benchmark scripts still run (a smoke test: no timing is asserted).

``benchmarks/run.py --smoke`` starts every target once (nginx upstream, nginx as a
CORS proxy, the aiohttp baselines, corsproxy), checks each with one real request and
loads it with wrk for a second. It needs Debian's nginx-light and wrk: missing tools
skip the test on a developer machine and fail it in CI (``CI`` set; ``.ci/run``
installs both).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"


def require_tools(*tools: str) -> None:
    missing = [t for t in tools if not (shutil.which(t) or shutil.which(t, path="/usr/sbin:/sbin"))]
    if not missing:
        return
    message = f"{', '.join(missing)} not installed: apt-get install nginx-light wrk"
    if os.environ.get("CI"):
        pytest.fail(message + " (.ci/run installs them)")
    pytest.skip(message)


def test_benchmark_smoke_run_measures_every_target_and_path(tmp_path: Path):
    require_tools("nginx", "wrk")
    raw = tmp_path / "results.json"
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "run.py"), "--smoke", "--json", str(raw)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    measured = {(r["target"], r["path"]) for r in json.loads(raw.read_text())}
    assert measured == {
        ("nginx-cors", "preflight"),
        ("aiohttp-bare", "preflight"),
        ("aiohttp-proxy", "preflight"),
        ("corsproxy", "preflight"),
        ("direct", "small"),
        ("nginx-cors", "small"),
        ("aiohttp-proxy", "small"),
        ("corsproxy", "small"),
        ("direct", "large"),
        ("nginx-cors", "large"),
        ("aiohttp-proxy", "large"),
        ("corsproxy", "large"),
    }
    for row in ("| preflight |", "| small proxied GET |", "| 1 MiB proxied GET |"):
        assert row in result.stdout
    assert "corsproxy / upstream direct" not in result.stdout  # ratio headers use target ids
    assert "| path | corsproxy / direct |" in result.stdout


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
