"""``corsproxy demo``: it starts, its printed curl commands work, SIGTERM stops it.

The demo reads the packaged copy of the policy (``corsproxy/demo.yaml``) so it
works from a wheel too; the first test keeps that copy identical to
``config/demo.yaml``.
"""

from __future__ import annotations

import asyncio
import shlex
import shutil
import signal
import sys
from pathlib import Path

import pytest
from conftest import free_port

from corsproxy.demo import demo_config, demo_policy_text

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 20.0


def test_packaged_demo_policy_is_identical_to_config_demo_yaml():
    packaged = (ROOT / "corsproxy" / "demo.yaml").read_bytes()
    assert packaged == (ROOT / "config" / "demo.yaml").read_bytes(), (
        "corsproxy/demo.yaml must be a copy of config/demo.yaml: "
        "cp config/demo.yaml corsproxy/demo.yaml"
    )
    assert demo_policy_text().encode() == packaged


def test_the_demo_policy_is_package_data():
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "demo.yaml" in pyproject["tool"]["setuptools"]["package-data"]["corsproxy"]


def test_demo_policy_loads_with_the_ports_filled_in():
    config = demo_config("127.0.0.1", 9999, "http://127.0.0.1:9998")
    assert config.listen.port == 9999
    assert config.upstream.url == "http://127.0.0.1:9998"
    assert config.warnings == ()


async def _curl(command: str) -> tuple[int, dict[str, str], str]:
    args = shlex.split(command)
    assert args[0] == "curl"
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "10", *args[1:],
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(TIMEOUT):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err
    head, _, body = out.decode().partition("\r\n\r\n")
    lines = head.split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        assert name.lower() not in headers, f"{name} sent twice"
        headers[name.lower()] = value.strip()
    return status, headers, body


def _cors(headers: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.startswith("access-control-")}


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_demo_starts_and_its_curl_commands_work():
    port, upstream_port = free_port(), free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "corsproxy", "demo", "--port", str(port),
        "--upstream-port", str(upstream_port),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        printed: list[str] = []
        async with asyncio.timeout(TIMEOUT):
            assert proc.stdout is not None
            async for raw in proc.stdout:
                printed.append(raw.decode().rstrip("\n"))
                if printed[-1].startswith("Press Ctrl-C"):
                    break
        commands = [line.strip() for line in printed if line.strip().startswith("curl ")]
        assert len(commands) >= 3
        results = [await _curl(c) for c in commands]
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(TIMEOUT):
            _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert "Traceback" not in err.decode()

    app = "https://app.example.com"
    preflight, denied, get, put, legacy, public = results
    assert preflight[0] == 200
    assert _cors(preflight[1]) == {
        "access-control-allow-origin": app,
        "access-control-allow-methods": "GET, POST, PUT, DELETE",
        "access-control-allow-headers":
            "Accept, Accept-Language, Authorization, Content-Language, Content-Type",
        "access-control-max-age": "600",
    }
    assert denied[0] == 400 and _cors(denied[1]) == {}
    assert denied[2].startswith("Disallowed CORS origin")
    assert get[0] == 200
    assert _cors(get[1]) == {
        "access-control-allow-origin": app, "access-control-expose-headers": "X-Request-Id"
    }
    assert get[1]["vary"] == "Origin"
    assert '"first item"' in get[2]
    assert put[0] == 200 and '"renamed"' in put[2]
    assert legacy[0] == 200 and _cors(legacy[1]) == {}
    assert public[0] == 200
    assert _cors(public[1]) == {  # expose_headers is inherited from the top-level cors
        "access-control-allow-origin": "*", "access-control-expose-headers": "X-Request-Id"
    }
