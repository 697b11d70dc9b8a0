"""The ``corsproxy`` command, run as a real subprocess (``python -m corsproxy``).

Exit codes and the full output of ``check``/``explain``/``schema``; user errors
(bad arguments, bad config, missing file) without a traceback; ``healthcheck``
against a loopback aiohttp server and against a real ``corsproxy run``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiohttp import web

from corsproxy import __version__
from corsproxy.cli import main
from corsproxy.config import config_json_schema

ROOT = Path(__file__).resolve().parent.parent
RUN_TIMEOUT = 60.0  # seconds for one CLI command to finish
START_TIMEOUT = 30.0  # seconds for `corsproxy run` to accept connections
PREFLIGHT_VARY = (
    "Origin, Access-Control-Request-Method, Access-Control-Request-Headers, "
    "Access-Control-Request-Private-Network"
)

CONFIG = """\
listen: {host: 0.0.0.0, port: 8080}
upstream: {url: "http://127.0.0.1:8000"}
cors:
  allow_origins: [https://app.example.com]
  allow_methods: [GET, PUT]
  allow_headers: [X-Token]
  allow_credentials: true
  enforce: true
routes:
  - path: /public
    cors: {allow_origins: "*", allow_credentials: false, max_age: 60}
"""


def env_without_config(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CORSPROXY_CONFIG"}
    env.update(extra)
    return env


def corsproxy(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m corsproxy ARGS``; never inherits a CORSPROXY_CONFIG by accident."""
    return subprocess.run(
        [sys.executable, "-m", "corsproxy", *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env=env if env is not None else env_without_config(),
        cwd=ROOT,
    )


def assert_no_traceback(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stderr
    assert "Traceback" not in result.stdout


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "corsproxy.yaml"
    path.write_text(CONFIG, encoding="utf-8")
    return path


# -- version, help, bad arguments -------------------------------------------------


def test_version():
    result = corsproxy("--version")
    assert (result.returncode, result.stdout) == (0, f"corsproxy {__version__}\n")


def test_installed_command_is_the_same_program():
    exe = shutil.which("corsproxy")
    if exe is None:
        pytest.skip("the corsproxy console script is not on PATH")
    result = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert (result.returncode, result.stdout) == (0, f"corsproxy {__version__}\n")


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("frobnicate",),
        ("check", "--nope"),
        ("run", "--port", "http"),
        ("run", "--port", "70000"),
        ("run", "--log-format", "xml"),
        ("healthcheck", "--url", "http://a", "--config", "x.yaml"),
    ],
    ids=[
        "no_command",
        "unknown_command",
        "unknown_option",
        "port_not_a_number",
        "port_out_of_range",
        "bad_log_format",
        "url_and_config_together",
    ],
)
def test_bad_arguments_exit_2(args, capsys):
    # argparse needs no process of its own: main() in-process keeps this fast; the
    # subprocess tests below cover `python -m corsproxy` itself.
    assert main(list(args)) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "usage: corsproxy" in err
    assert "Traceback" not in err


def test_bad_arguments_exit_2_in_a_real_process():
    result = corsproxy("run", "--port", "http")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.endswith(
        "corsproxy run: error: argument --port: 'http' is not a port number\n"
    )
    assert_no_traceback(result)


@pytest.mark.parametrize("command", ["check", "explain", "run"])
def test_missing_config_without_env_exits_2(command, capsys, monkeypatch):
    monkeypatch.delenv("CORSPROXY_CONFIG", raising=False)
    assert main([command]) == 2
    assert capsys.readouterr() == (
        "",
        f"corsproxy {command}: no config file: pass --config FILE or set CORSPROXY_CONFIG\n",
    )


def test_missing_config_in_a_real_process():
    result = corsproxy("check")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        "corsproxy check: no config file: pass --config FILE or set CORSPROXY_CONFIG\n"
    )


# -- check ------------------------------------------------------------------------


def workers_text() -> str:
    """What check says about the default ``workers: auto`` on this machine."""
    from corsproxy.cpus import usable_cpus

    limit = usable_cpus()
    return (f"{limit.count} worker{'s' if limit.count != 1 else ''} (listen.workers: auto = "
            f"{limit.count}: {limit.why})")


def test_check_prints_the_effective_policy_per_route(config_file):
    result = corsproxy("check", "--config", str(config_file))
    assert (result.returncode, result.stderr) == (0, "")
    safelisted = "plus Accept, Accept-Language, Content-Language, Content-Type"
    assert result.stdout == "\n".join(
        [
            f"{config_file}: OK",
            "",
            "listen:   0.0.0.0:8080  (max_body_size: no limit, shutdown_grace: 10 s, "
            f"{workers_text()})",
            "upstream: http://127.0.0.1:8000  (connect_timeout: 5 s, timeout: 60 s, "
            "read_timeout: 60 s, preserve_host: false)",
            "admin:    http://127.0.0.1:9901  (the page at /; /healthz /readyz /metrics /denied)",
            "log:      text lines to stderr",
            "",
            "cors (every path not under a route):",
            "  allow_origins:          https://app.example.com",
            "  allow_origin_regex:     (none)",
            "  allow_methods:          GET, PUT",
            f"  allow_headers:          X-Token  ({safelisted})",
            "  allow_credentials:      true",
            "  expose_headers:         (none)",
            "  max_age:                600 s",
            "  allow_private_network:  false",
            "  enforce:                true (cross-origin requests from other origins get 403)",
            "  check_websocket_origin: true (WebSocket handshakes from other origins get 403)",
            "  report_only:            false (enforced)",
            "",
            "route /public (routes[0]; matches /public and below, longest route wins):",
            "  allow_origins:          *   <- set by this route",
            "  allow_origin_regex:     (none)",
            "  allow_methods:          GET, PUT",
            f"  allow_headers:          X-Token  ({safelisted})",
            "  allow_credentials:      false   <- set by this route",
            "  expose_headers:         (none)",
            "  max_age:                60 s   <- set by this route",
            "  allow_private_network:  false",
            "  enforce:                true (cross-origin requests from other origins get 403)",
            "  check_websocket_origin: true (WebSocket handshakes from other origins get 403)",
            "  report_only:            false (enforced)",
            "",
            "2 policies, 0 warnings",
            "",
        ]
    )


def test_check_shows_port_wildcards_and_the_regex_list(tmp_path):
    path = tmp_path / "dev.yaml"
    path.write_text(
        "upstream: {url: 'http://127.0.0.1:1'}\n"
        "cors:\n"
        "  allow_origins: ['http://localhost:*', 'https://*.example.com:*']\n"
        "  allow_origin_regex: ['https://[a-z]+\\.example\\.org', 'https://x{1,2}\\.test',"
        " \"it's\"]\n"
        "routes:\n"
        "  - path: /one\n"
        "    cors: {allow_origin_regex: 'https://[a-z]+\\.example\\.net'}\n"
        "  - path: /none\n"
        "    cors: {allow_origin_regex: []}\n"
    )
    result = corsproxy("check", "--config", str(path))
    assert (result.returncode, result.stderr) == (0, "")
    lines = result.stdout.splitlines()
    origins = [line for line in lines if line.startswith("  allow_origins:")]
    assert origins == ["  allow_origins:          http://localhost:*, https://*.example.com:*"] * 3
    regexes = [line for line in lines if line.startswith("  allow_origin_regex:")]
    assert regexes == [
        r"  allow_origin_regex:     'https://[a-z]+\.example\.org', 'https://x{1,2}\.test', "
        "'it''s'",
        r"  allow_origin_regex:     https://[a-z]+\.example\.net   <- set by this route",
        "  allow_origin_regex:     (none)   <- set by this route",
    ]


def test_check_reads_corsproxy_config_from_the_environment(config_file):
    result = corsproxy("check", env=env_without_config(CORSPROXY_CONFIG=str(config_file)))
    assert result.returncode == 0
    assert result.stdout.startswith(f"{config_file}: OK\n")


def test_check_prints_warnings_on_stderr(tmp_path):
    path = tmp_path / "warn.yaml"
    path.write_text("upstream: {url: 'http://127.0.0.1:1'}\ncors: {allow_origins: ['null']}\n")
    result = corsproxy("check", "-c", str(path))
    assert result.returncode == 0
    assert result.stdout.endswith("\n1 policy, 1 warning\n")
    assert result.stderr == (
        f'warning: {path}: cors.allow_origins[0]: "null" trusts every sandboxed iframe, data: '
        "and file: page on the web (they all send Origin: null); remove it unless you really "
        "mean that\n"
    )


def test_check_bad_config_prints_every_error_and_exits_1(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "cors:\n  allow_origins: ['https://app.example.com/', '*']\n  allow_credentials: true\n"
        "  max_age: -1\n"
    )
    result = corsproxy("check", "--config", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f'{path}: cors.allow_origins[0]: "https://app.example.com/" has a trailing slash; '
        'browsers send origins without one: write "https://app.example.com"',
        f'{path}: cors.allow_origins[1]: "*" cannot be combined with allow_credentials: true '
        "(set in cors.allow_credentials), because that would let every website read responses "
        'with the user\'s cookies; list the origins explicitly (e.g. "https://app.example.com"),'
        ' or use a pattern like "https://*.example.com" or allow_origin_regex, or set '
        "allow_credentials: false",
        f"{path}: cors.max_age: must be 0 or more, got -1 (seconds a browser may cache the "
        "preflight answer; 0 disables caching); for example: max_age: 600",
        "3 errors; corsproxy did not use this config",
    ]


def test_check_missing_file_exits_1(tmp_path):
    missing = tmp_path / "missing.yaml"
    result = corsproxy("check", "--config", str(missing))
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        f"{missing}: cannot read the config file (No such file or directory); check the path "
        "(--config or CORSPROXY_CONFIG)\n1 error; corsproxy did not use this config\n"
    )


def test_check_yaml_syntax_error_exits_1_without_traceback(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("cors: {allow_origins: [a\n")
    result = corsproxy("check", "--config", str(path))
    assert result.returncode == 1
    assert result.stderr.splitlines()[0].startswith(f"{path}: line 2, column 1: YAML syntax error")
    assert_no_traceback(result)


@pytest.mark.parametrize("name", ["development.yaml", "production.yaml", "routes.yaml"])
def test_check_accepts_the_shipped_examples(name):
    result = corsproxy("check", "--config", f"config/{name}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"config/{name}: OK\n")


# -- explain ----------------------------------------------------------------------


def test_explain_allowed_preflight(config_file):
    result = corsproxy(
        "explain",
        "--config",
        str(config_file),
        "--origin",
        "https://app.example.com",
        "--request-method",
        "PUT",
        "--request-headers",
        "x-token",
        "--path",
        "/items",
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == "\n".join(
        [
            "request:  OPTIONS /items",
            "          Origin: https://app.example.com",
            "          Access-Control-Request-Method: PUT",
            "          Access-Control-Request-Headers: x-token",
            "kind:     preflight",
            "route:    (top-level cors)",
            "verdict:  allowed",
            "status:   200 (answered by corsproxy, not forwarded)",
            "reasons:",
            '  - origin: "https://app.example.com" is allowed by allow_origins',
            '  - method: "PUT" is in allow_methods',
            "  - headers: every requested header is allowed",
            "response headers:",
            "  Access-Control-Allow-Origin: https://app.example.com",
            "  Access-Control-Allow-Methods: GET, PUT",
            "  Access-Control-Allow-Headers: Accept, Accept-Language, Content-Language, "
            "Content-Type, X-Token",
            "  Access-Control-Max-Age: 600",
            "  Access-Control-Allow-Credentials: true",
            f"  Vary: {PREFLIGHT_VARY}",
            "body:",
            "  OK",
            "",
        ]
    )


def test_explain_denied_preflight_json(config_file):
    result = corsproxy(
        "explain",
        "-c",
        str(config_file),
        "--origin",
        "https://evil.example",
        "--request-method",
        "patch",
        "--request-headers",
        "X-Token, X-Other",
        "--request-private-network",
        "--json",
    )
    assert (result.returncode, result.stderr) == (0, "")
    failed = [
        'origin: "https://evil.example" is not allowed by allow_origins or allow_origin_regex',
        'method: "patch" is not in allow_methods (GET, PUT); methods compare case-sensitively',
        'headers: "X-Other" not in allow_headers (X-Token; Accept, Accept-Language, '
        "Content-Language and Content-Type are always allowed)",
        "private-network: Access-Control-Request-Private-Network is true but "
        "allow_private_network is false",
    ]
    assert json.loads(result.stdout) == {
        "config": str(config_file),
        "request": {
            "method": "OPTIONS",
            "path": "/",
            "headers": [
                ["Origin", "https://evil.example"],
                ["Access-Control-Request-Method", "patch"],
                ["Access-Control-Request-Headers", "X-Token, X-Other"],
                ["Access-Control-Request-Private-Network", "true"],
            ],
        },
        "verdict": "denied",
        "allowed": False,
        "kind": "preflight",
        "route": None,
        "status": 400,
        "forwarded": False,
        "report_only": False,
        "reasons": failed,
        "failed": ["origin", "method", "headers", "private-network"],
        "headers": {"Vary": PREFLIGHT_VARY},
        "body": "Disallowed CORS origin, method, headers, private-network\n\n"
        + "\n".join(failed)
        + "\n",
    }


def test_explain_actual_request_on_a_route_is_forwarded(config_file):
    result = corsproxy(
        "explain",
        "-c",
        str(config_file),
        "--origin",
        "https://any.example",
        "--path",
        "/public/logo.png?size=2",
        "--json",
    )
    assert result.returncode == 0
    out = json.loads(result.stdout)
    assert {k: out[k] for k in ("verdict", "kind", "route", "status", "forwarded", "headers")} == {
        "verdict": "allowed",
        "kind": "actual",
        "route": "/public",
        "status": None,
        "forwarded": True,
        "headers": {"Access-Control-Allow-Origin": "*", "Vary": "Origin"},
    }
    assert out["request"]["path"] == "/public/logo.png"


def test_explain_enforce_rejects_with_403(config_file):
    result = corsproxy(
        "explain",
        "-c",
        str(config_file),
        "--origin",
        "https://evil.example",
        "--method",
        "POST",
        "--path",
        "/items",
    )
    assert result.returncode == 0
    assert result.stdout == "\n".join(
        [
            "request:  POST /items",
            "          Origin: https://evil.example",
            "kind:     actual",
            "route:    (top-level cors)",
            "verdict:  rejected",
            "status:   403 (answered by corsproxy, not forwarded)",
            "reasons:",
            '  - origin: "https://evil.example" is not allowed by allow_origins or '
            "allow_origin_regex",
            "response headers:",
            "  Vary: Origin",
            "body:",
            '  Forbidden: cross-origin request from origin "https://evil.example" refused by '
            "corsproxy (enforce: true).",
            '  origin: "https://evil.example" is not allowed by allow_origins or '
            "allow_origin_regex",
            "  To allow it, add the origin to cors.allow_origins in the proxy's config.",
            "",
        ]
    )


def test_explain_same_origin_passes_enforce_with_host(config_file):
    result = corsproxy(
        "explain",
        "-c",
        str(config_file),
        "--origin",
        "http://proxy.example:8080",
        "--host",
        "proxy.example:8080",
        "--method",
        "POST",
        "--json",
    )
    out = json.loads(result.stdout)
    assert (out["verdict"], out["status"], out["headers"]) == ("allowed", None, {"Vary": "Origin"})


def test_explain_without_origin_is_not_cors(config_file):
    result = corsproxy("explain", "-c", str(config_file), "--path", "/items")
    assert result.returncode == 0
    assert result.stdout == "\n".join(
        [
            "request:  GET /items",
            "kind:     not-cors",
            "route:    (top-level cors)",
            "verdict:  not-cors",
            "status:   forwarded upstream (the upstream's status; corsproxy replaces the "
            "upstream's Access-Control-* headers with the ones below and merges Vary)",
            "reasons:",
            "  - no Origin header: not a CORS request",
            "response headers:",
            "  Vary: Origin",
            "",
        ]
    )


def test_explain_bad_config_exits_1(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("cors: {allow_origins: app.example.com}\n")
    result = corsproxy("explain", "-c", str(path), "--origin", "https://app.example.com")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        f'{path}: cors.allow_origins[0]: "app.example.com" needs a scheme, e.g. '
        '"https://app.example.com"\n1 error; corsproxy did not use this config\n'
    )


def test_explain_bad_path_exits_2(config_file):
    result = corsproxy("explain", "-c", str(config_file), "--path", "items")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == "corsproxy explain: --path 'items' must start with /\n"


# -- schema -----------------------------------------------------------------------


def test_schema_prints_the_shipped_json_schema():
    result = corsproxy("schema")
    assert result.returncode == 0
    printed = json.loads(result.stdout)
    assert printed == config_json_schema()
    shipped = (ROOT / "corsproxy" / "config.schema.json").read_text(encoding="utf-8")
    assert json.loads(shipped) == printed


# -- run --------------------------------------------------------------------------


def test_run_without_upstream_exits_1(tmp_path):
    path = tmp_path / "no-upstream.yaml"
    path.write_text("cors: {allow_origins: [https://app.example.com]}\n")
    result = corsproxy("run", "--config", str(path))
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        f"{path}: upstream.url: not set; add upstream: {{url: http://127.0.0.1:8000}} to the "
        "file or pass --upstream URL\n1 error; corsproxy did not use this config\n"
    )


def test_run_reports_a_bad_upstream_flag(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("cors: {allow_origins: [https://app.example.com]}\n")
    result = corsproxy("run", "--config", str(path), "--upstream", "127.0.0.1:8000")
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == (
        f'{path}: upstream.url (from --upstream): "127.0.0.1:8000" needs a scheme: write '
        '"http://127.0.0.1:8000"'
    )


# -- healthcheck ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def corsproxy_async(*args: str) -> tuple[int, str, str]:
    """Run the CLI without blocking the test's event loop (the server lives there)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "corsproxy",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env_without_config(),
        cwd=ROOT,
    )
    out, err = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT)
    return proc.returncode, out.decode(), err.decode()


def preflight_server(status: int, seen: list) -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        seen.append(
            (
                request.method,
                request.path_qs,
                request.headers.get("Origin"),
                request.headers.get("Access-Control-Request-Method"),
            )
        )
        return web.Response(status=status, text="x")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


@pytest.mark.parametrize("status", [200, 400])
async def test_healthcheck_healthy_when_the_preflight_is_answered(aiohttp_server, status):
    seen: list = []
    server = await aiohttp_server(preflight_server(status, seen))
    url = f"http://127.0.0.1:{server.port}/"
    code, out, err = await corsproxy_async("healthcheck", "--url", url)
    assert (code, out, err) == (0, f"healthy: {url} answered the preflight with {status}\n", "")
    assert seen == [("OPTIONS", "/", "http://corsproxy-healthcheck.invalid", "GET")]


async def test_healthcheck_unhealthy_on_another_status(aiohttp_server):
    server = await aiohttp_server(preflight_server(503, []))
    url = f"http://127.0.0.1:{server.port}/health"
    code, out, err = await corsproxy_async("healthcheck", "--url", url)
    assert (code, out) == (1, "")
    assert err == (
        f"unhealthy: {url} answered the preflight with 503 Service Unavailable; a corsproxy "
        "listener answers 200 or 400 (is something else on that port?)\n"
    )


async def test_healthcheck_takes_the_address_from_the_config(aiohttp_server, tmp_path):
    """With the admin listener off, the preflight goes to listen.host/port."""
    seen: list = []
    server = await aiohttp_server(preflight_server(200, seen))
    path = tmp_path / "c.yaml"
    path.write_text(f"listen: {{host: 0.0.0.0, port: {server.port}}}\nadmin: {{port: null}}\n")
    code, out, _ = await corsproxy_async("healthcheck", "--config", str(path))
    assert (code, out) == (
        0,
        f"healthy: http://127.0.0.1:{server.port}/ answered the preflight with 200\n",
    )
    assert len(seen) == 1


def healthz_server(status: int, seen: list) -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        seen.append((request.method, request.path_qs))
        return web.Response(status=status, text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


async def test_healthcheck_asks_the_admin_listeners_healthz(aiohttp_server, tmp_path):
    seen: list = []
    server = await aiohttp_server(healthz_server(200, seen))
    path = tmp_path / "c.yaml"
    path.write_text(f"admin: {{host: 0.0.0.0, port: {server.port}}}\n")
    code, out, err = await corsproxy_async("healthcheck", "--config", str(path))
    url = f"http://127.0.0.1:{server.port}/healthz"
    assert (code, out, err) == (0, f"healthy: {url} answered 200\n", "")
    assert seen == [("GET", "/healthz")]


async def test_healthcheck_unhealthy_when_healthz_answers_another_status(aiohttp_server,
                                                                          tmp_path):
    server = await aiohttp_server(healthz_server(503, []))
    path = tmp_path / "c.yaml"
    path.write_text(f"admin: {{port: {server.port}}}\n")
    code, out, err = await corsproxy_async("healthcheck", "--config", str(path))
    assert (code, out) == (1, "")
    assert err == (
        f"unhealthy: http://127.0.0.1:{server.port}/healthz answered 503 Service Unavailable; "
        "corsproxy's admin listener answers 200 (is something else on admin.port?)\n"
    )


def test_healthcheck_unhealthy_when_nothing_listens():
    port = free_port()
    result = corsproxy("healthcheck", "--url", f"http://127.0.0.1:{port}/")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.startswith(
        f"unhealthy: http://127.0.0.1:{port}/: no answer to the health preflight ("
    )
    assert_no_traceback(result)


def test_healthcheck_bad_url_exits_2():
    result = corsproxy("healthcheck", "--url", "ftp://127.0.0.1/")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        "corsproxy healthcheck: --url 'ftp://127.0.0.1/' must be http://HOST[:PORT]/...\n"
    )


def test_run_serves_and_passes_healthcheck_then_stops_on_sigterm(tmp_path):
    """A real `corsproxy run`: the health preflight is answered by the proxy itself
    (the upstream port has nothing listening), then SIGTERM stops it with exit 0."""
    pytest.importorskip("corsproxy.server")
    port, dead_upstream, admin_port = free_port(), free_port(), free_port()
    path = tmp_path / "run.yaml"
    path.write_text(f"listen: {{shutdown_grace: 1}}\nadmin: {{port: {admin_port}}}\n"
                    f"cors: {{allow_origins: [https://a.example]}}\n")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "corsproxy",
            "run",
            "--config",
            str(path),
            "--port",
            str(port),
            "--upstream",
            f"http://127.0.0.1:{dead_upstream}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env_without_config(),
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:  # bounded: until it accepts connections or the deadline passes
            assert proc.poll() is None, proc.communicate(timeout=RUN_TIMEOUT)
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "corsproxy run did not start listening"
                time.sleep(0.05)
        result = corsproxy("healthcheck", "--url", f"http://127.0.0.1:{port}/")
        assert (result.returncode, result.stdout) == (
            0,
            f"healthy: http://127.0.0.1:{port}/ answered the preflight with 400\n",
        )
        result = corsproxy("healthcheck", "--config", str(path))  # the admin listener
        assert (result.returncode, result.stdout) == (
            0,
            f"healthy: http://127.0.0.1:{admin_port}/healthz answered 200\n",
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
    assert proc.returncode == 0, err
    assert "Traceback" not in err
