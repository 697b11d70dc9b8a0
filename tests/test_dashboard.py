"""The admin listener's page and its JSON (``corsproxy.dashboard`` through
``corsproxy.admin``), against real ``python -m corsproxy run`` processes on loopback
(the helpers of ``test_admin``) and, for the report-only list, an in-process
:class:`~corsproxy.server.ProxyServer` whose :class:`~corsproxy.metrics.Metrics` the
test fills itself.

- every endpoint's status, Content-Type, security headers and JSON shape; the page's
  files load nothing from elsewhere and never build HTML from data;
- ``/api/explain`` answers exactly what ``corsproxy explain --json`` prints (the CLI
  run as a subprocess on the same config file), for preflights, actual requests,
  WebSockets, routes, report-only routes; bad queries are a 400 with a sentence;
- ``/api/policy`` and ``/api/status`` show a reload (SIGHUP) at once, and a failed one;
- admin requests stay out of the access log and the metrics.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest
import yaml
from conftest import config_text
from test_admin import (
    APP,
    EVIL,
    ROOT,
    Run,
    admin_config,
    fetch,
    requests_total,
    scrape,
)

from corsproxy import __version__
from corsproxy.admin import AdminServer
from corsproxy.config import parse_config
from corsproxy.explain import request_view
from corsproxy.server import ProxyServer

#: An Origin a browser never sends but anyone can: HTML, quotes, an event handler.
HOSTILE = '"><img src=x onerror=alert(1)>'
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Resource-Policy": "same-origin",
}
JSON_TYPE = "application/json"
PAGE_FILES = {
    "/": "text/html; charset=utf-8",
    "/ui/dashboard.js": "text/javascript; charset=utf-8",
    "/ui/dashboard.css": "text/css; charset=utf-8",
    "/ui/icon.svg": "image/svg+xml",
}
DASHBOARD_PATHS = {*PAGE_FILES, "/api/policy", "/api/status", "/api/report", "/api/explain"}
ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
ROUTES = [
    {"path": "/strict", "cors": {"enforce": True, "allow_methods": ["GET", "PUT"],
                                 "allow_headers": ["X-Token"]}},
    {"path": "/try", "cors": {"report_only": True, "allow_credentials": True}},
    {"path": "/lan", "cors": {"allow_private_network": True},
     "upstream": {"timeout": 3}},
]
SETTINGS = {
    "allow_origins", "allow_origin_regex", "allow_methods", "allow_headers",
    "allow_credentials", "expose_headers", "max_age", "allow_private_network", "enforce",
    "check_websocket_origin", "report_only",
}


def assert_secure(headers: dict[str, str], content_type: str) -> None:
    """The Content-Type, and the security headers with exactly their values."""
    assert headers["Content-Type"] == content_type
    for name, value in SECURITY.items():
        assert headers.get(name) == value, name


async def get_json(port: int, path: str, status: int = 200) -> dict:
    got, headers, body = await fetch(port, path)
    assert got == status, body
    assert_secure(headers, JSON_TYPE)
    return json.loads(body)


async def explain_api(port: int, params: dict) -> tuple[int, dict]:
    """``GET /api/explain`` with ``params`` form-encoded (flags as 1)."""
    query = urlencode({k: ("1" if v is True else v) for k, v in params.items()})
    status, headers, body = await fetch(port, f"/api/explain?{query}")
    assert_secure(headers, JSON_TYPE)
    return status, json.loads(body)


async def explain_cli(config: Path, params: dict) -> dict:
    """``python -m corsproxy explain --config FILE --json ...`` for ``params``."""
    args = []
    for name, value in params.items():
        option = "--" + name.replace("_", "-")
        args += [option] if value is True else [option, value]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "corsproxy", "explain", "--config", str(config), "--json",
        *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return json.loads(out)


def replace(path: Path, text: str) -> None:
    """Write ``path`` the way editors save (a new file renamed over it): the reload
    poller never sees it half written, and sees it within its interval."""
    new = path.with_suffix(".new")
    new.write_text(text)
    os.replace(new, path)


@pytest.fixture
async def run_admin(tmp_path):
    """``await run_admin(config_text)``: ``corsproxy run`` on that config file (the
    ``Run`` of ``test_admin``); returns (run, proxy port, admin port, config path)."""
    runs: list[Run] = []

    async def start(text: str) -> tuple[Run, int, int, Path]:
        path = tmp_path / f"dashboard-{len(runs)}.yaml"
        path.write_text(text)
        runs.append(proc := await Run.start(path))
        port, admin = await proc.listening()
        return proc, port, admin, path

    yield start
    for proc in runs:
        await proc.kill()


# ---------------------------------------------------------------------------
# the page's files
# ---------------------------------------------------------------------------


async def test_the_page_and_its_files_are_self_contained_and_safe(run_admin, upstream):
    proc, _, admin, _ = await run_admin(admin_config(upstream.url))
    bodies = {}
    for path, content_type in PAGE_FILES.items():
        status, headers, body = await fetch(admin, path)
        assert status == 200, path
        assert_secure(headers, content_type)
        assert int(headers["Content-Length"]) == len(body) > 0
        bodies[path] = body.decode("utf-8")
    html, js, css = bodies["/"], bodies["/ui/dashboard.js"], bodies["/ui/dashboard.css"]
    # Nothing from elsewhere: every reference is a path on the listener itself.
    for attr in re.findall(r'\b(?:src|href|action)="([^"]*)"', html):
        assert attr.startswith(("/", "#")) and not attr.startswith("//"), attr
    assert re.findall(r"<script\b[^>]*>", html) == [
        '<script src="/ui/dashboard.js" defer>'
    ]  # one script, from a file: the CSP allows no inline one
    assert "<style" not in html and " style=" not in html
    assert not re.search(r"\son[a-z]+=", html)  # no inline event handlers
    assert "url(" not in css and "@import" not in css
    assert "http:" not in js and "https:" not in js
    # Data becomes text nodes only.
    for sink in (".innerHTML", ".outerHTML", "insertAdjacentHTML(", "document.write(",
                 "eval(", "new Function", "setTimeout(\"", "setAttribute(\"on"):
        assert sink not in js, sink
    # HEAD and other methods: as for every admin path.
    status, headers, body = await fetch(admin, "/", "HEAD")
    assert (status, body, headers["Allow"]) == (405, b"", "GET")
    status, headers, _ = await fetch(admin, "/api/explain", "POST")
    assert (status, headers["Allow"]) == (405, "GET")
    status, headers, body = await fetch(admin, "/ui/nope.js")
    assert status == 404
    assert_secure(headers, "text/plain; charset=utf-8")
    assert body == (b"Not Found: the admin endpoints are / (the page), /api/policy, "
                    b"/api/status, /api/report, /api/explain, /healthz, /readyz, /metrics "
                    b"and /denied\n")
    assert (await fetch(admin, "/api/nope"))[0] == 404
    proc.proc.send_signal(signal.SIGTERM)
    assert await proc.finish() == 0


# ---------------------------------------------------------------------------
# the JSON endpoints
# ---------------------------------------------------------------------------


async def test_the_json_endpoints_answer_from_the_running_proxy(run_admin, upstream):
    before = time.time()
    proc, port, admin, path = await run_admin(admin_config(
        upstream.url, cors={"allow_origins": [APP], "expose_headers": ["X-Total"]},
        routes=ROUTES,
    ))
    config_file = str(path)
    assert (await fetch(port, "/a", headers={"Origin": HOSTILE}))[0] == 200
    assert (await fetch(port, "/strict/x", headers={"Origin": EVIL}))[0] == 403
    assert (await fetch(port, "/strict/x", headers={"Origin": EVIL}))[0] == 403
    fams = await scrape(admin)

    status = await get_json(admin, "/api/status")
    assert set(status) == {"version", "pid", "config", "upstream", "ready", "readiness", "now",
                           "loaded_at", "reloads", "last_reload"}
    assert status["version"] == __version__
    assert status["pid"] == proc.proc.pid
    assert status["config"] == config_file
    assert status["upstream"] == upstream.url
    assert (status["ready"], status["readiness"]) == (True, "ready")
    assert status["reloads"] == {"success": 0, "failure": 0}
    assert status["last_reload"] is None
    assert ISO.fullmatch(status["now"]) and ISO.fullmatch(status["loaded_at"])
    assert status["loaded_at"] <= status["now"]
    assert time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(before - 1)) <= status["loaded_at"]

    policy = await get_json(admin, "/api/policy")
    assert set(policy) == {"config", "safelisted_headers", "policies", "warnings"}
    assert policy["config"] == config_file
    assert policy["safelisted_headers"] == [
        "Accept", "Accept-Language", "Content-Language", "Content-Type"]
    top, strict, tried, lan = policy["policies"]
    for entry in policy["policies"]:
        assert set(entry) == {"route", "index", "label", "matches", "report_only", "settings",
                              "overrides", "upstream"}
        assert set(entry["settings"]) == SETTINGS
        assert entry["report_only"] is entry["settings"]["report_only"]
    assert (top["route"], top["index"], top["label"]) == (None, None, "(top-level cors)")
    assert top["matches"] == "every path not under a route"
    assert top["settings"]["allow_origins"] == [APP]
    assert top["settings"]["expose_headers"] == ["X-Total"]
    assert (top["overrides"], top["upstream"], top["report_only"]) == ([], None, False)
    assert (strict["route"], strict["index"], strict["label"]) == (
        "/strict", 0, "/strict (routes[0])")
    assert strict["matches"] == "/strict and below (the longest route wins)"
    assert sorted(strict["overrides"]) == ["allow_headers", "allow_methods", "enforce"]
    assert strict["settings"]["allow_methods"] == ["GET", "PUT"]
    assert strict["settings"]["allow_origins"] == [APP]  # inherited, not an override
    assert (tried["route"], tried["report_only"]) == ("/try", True)
    assert sorted(tried["overrides"]) == ["allow_credentials", "report_only"]
    assert lan["upstream"] == {"timeout": 3, "read_timeout": 60}
    assert lan["overrides"] == ["allow_private_network"]

    denied = await get_json(admin, "/denied")
    assert [(e["origin"], e["route"], e["reason"], e["count"]) for e in denied["denied"]] == [
        (EVIL, "/strict", "origin", 2), (HOSTILE, None, "origin", 1)]
    assert all(ISO.fullmatch(e["first_seen"]) and ISO.fullmatch(e["last_seen"])
               for e in denied["denied"])

    assert await get_json(admin, "/api/report") == {"kept": 100, "disagreements": []}

    explained = await get_json(admin, "/api/explain?" + urlencode({"origin": HOSTILE}))
    assert explained["verdict"] == "denied"
    assert explained["request"]["headers"] == [["Origin", HOSTILE]]

    # None of that was counted, logged or forwarded.
    assert requests_total(await scrape(admin)) == requests_total(fams)
    proc.proc.send_signal(signal.SIGTERM)
    assert await proc.finish() == 0
    access = proc.access()
    assert len(access) == 3
    assert not {r["path"] for r in access} & DASHBOARD_PATHS
    assert [r.raw_path for r in upstream.requests] == ["/a"]


# ---------------------------------------------------------------------------
# /api/explain is `corsproxy explain --json`
# ---------------------------------------------------------------------------

EXPLAINED = [
    pytest.param({"origin": APP, "request_method": "GET"}, id="preflight-allowed"),
    pytest.param({"origin": EVIL, "request_method": "GET", "path": "/a/b"},
                 id="preflight-denied-origin"),
    pytest.param({"origin": APP, "request_method": "PUT", "path": "/strict/x",
                  "request_headers": "x-token, content-type"}, id="preflight-route-headers"),
    pytest.param({"origin": APP, "request_method": "DELETE", "path": "/strict/x",
                  "request_headers": "X-Other"}, id="preflight-route-denied"),
    pytest.param({"origin": APP, "request_method": "GET", "request_private_network": True,
                  "path": "/lan/printer"}, id="preflight-private-network"),
    pytest.param({"origin": APP, "request_method": "PATCH", "method": "OPTIONS"},
                 id="preflight-explicit-method"),
    pytest.param({"origin": APP}, id="actual-allowed"),
    pytest.param({"origin": APP, "method": "POST", "path": "/x?q=1#f"}, id="actual-post"),
    pytest.param({"origin": EVIL, "path": "/strict/x"}, id="actual-rejected-enforce"),
    pytest.param({"origin": "http://proxy.example", "path": "/strict/x",
                  "host": "proxy.example"}, id="actual-same-origin"),
    pytest.param({"origin": HOSTILE, "method": "PUT"}, id="actual-hostile-origin"),
    pytest.param({}, id="not-cors"),
    pytest.param({"path": "/strict"}, id="not-cors-route"),
    pytest.param({"origin": APP, "websocket": True, "path": "/ws"}, id="websocket-allowed"),
    pytest.param({"origin": EVIL, "websocket": True, "path": "/strict/ws"},
                 id="websocket-rejected"),
    pytest.param({"origin": EVIL, "request_method": "PUT", "path": "/try/x"},
                 id="report-only-preflight"),
    pytest.param({"origin": APP, "path": "/try"}, id="report-only-actual"),
    pytest.param({"origin": "", "method": "GET"}, id="empty-origin"),
]


async def test_explain_answers_exactly_what_the_cli_prints(run_admin, upstream):
    proc, _, admin, config_file = await run_admin(admin_config(upstream.url, routes=ROUTES))
    cases = [p.values[0] for p in EXPLAINED]
    cli = await asyncio.gather(*(explain_cli(config_file, params) for params in cases))
    for params, expected in zip(cases, cli, strict=True):
        status, got = await explain_api(admin, params)
        assert status == 200, (params, got)
        assert got == expected, params
    # Spot checks that the cases are what their names say.
    verdicts = {p.id: (c["kind"], c["verdict"], c["route"], c["report_only"])
                for p, c in zip(EXPLAINED, cli, strict=True)}
    assert verdicts["preflight-allowed"] == ("preflight", "allowed", None, False)
    assert verdicts["preflight-denied-origin"] == ("preflight", "denied", None, False)
    assert verdicts["preflight-route-headers"] == ("preflight", "allowed", "/strict", False)
    assert verdicts["actual-rejected-enforce"] == ("actual", "rejected", "/strict", False)
    assert verdicts["websocket-allowed"][:2] == ("websocket", "allowed")
    assert verdicts["websocket-rejected"] == ("websocket", "rejected", "/strict", False)
    assert verdicts["report-only-preflight"] == ("preflight", "denied", "/try", True)
    assert verdicts["not-cors"][:2] == ("not-cors", "not-cors")
    proc.proc.send_signal(signal.SIGTERM)
    assert await proc.finish() == 0


@pytest.mark.parametrize(
    ("query", "error"),
    [
        ("path=api", "the path 'api' must start with /"),
        ("path=", "the path '' must start with /"),
        ("websocket=1&request_method=GET",
         "a WebSocket handshake is a GET without Access-Control-Request-Method"),
        ("websocket=1&method=POST",
         "a WebSocket handshake is a GET without Access-Control-Request-Method"),
        ("origin=x&colour=red", "unknown parameter 'colour'; the parameters are origin, "
                                "method, path, request_method, request_headers, "
                                "request_private_network, host, websocket"),
        ("origin=a&origin=b", "'origin' given twice; give each parameter at most once"),
        ("websocket=maybe", "websocket='maybe': use websocket=1 to turn it on, or leave it out"),
        ("request_private_network=2", "request_private_network='2': use "
                                      "request_private_network=1 to turn it on, or leave it out"),
        ("origin=%ff", "the query is not UTF-8 once percent-decoded"),
        ("&".join(f"origin{i}=x" for i in range(17)), "too many parameters; the parameters "
         "are origin, method, path, request_method, request_headers, request_private_network, "
         "host, websocket, each at most once"),
    ],
)
async def test_explain_refuses_a_query_that_describes_no_request(upstream, http, query, error):
    async with InProcess(upstream.url) as (_, admin_port):
        result = await http.request("GET", f"http://127.0.0.1:{admin_port}/api/explain?{query}")
    assert result.status == 400
    assert_secure(dict(result.headers), JSON_TYPE)
    assert json.loads(result.body) == {"error": error}


async def test_explain_queries_are_bounded_by_the_admin_head_limit(upstream, http):
    async with InProcess(upstream.url) as (_, admin_port):
        url = f"http://127.0.0.1:{admin_port}/api/explain?origin="
        result = await http.request("GET", url + "a" * 7000)
        assert result.status == 200
        assert json.loads(result.body)["request"]["headers"] == [["Origin", "a" * 7000]]
        result = await http.request("GET", url + "a" * 9000)
        assert result.status == 431
        # The listener still answers.
        assert (await http.request("GET", url + "b")).status == 200


# ---------------------------------------------------------------------------
# a reload shows at once
# ---------------------------------------------------------------------------


async def test_policy_and_status_follow_a_reload_and_a_failed_one(run_admin, upstream):
    text = admin_config(upstream.url)
    proc, _, admin, path = await run_admin(text)
    first = await get_json(admin, "/api/status")
    assert [p["route"] for p in (await get_json(admin, "/api/policy"))["policies"]] == [None]
    assert (await explain_api(admin, {"origin": EVIL}))[1]["verdict"] == "denied"

    data = yaml.safe_load(text)
    data["cors"]["allow_origins"] = [APP, EVIL]
    data["routes"] = [{"path": "/try", "cors": {"report_only": True}}]
    replace(path, yaml.safe_dump(data, sort_keys=False))  # the poller sees it
    await proc.wait_for(lambda r: r.get("event") == "reloaded", timeout=10)

    policy = await get_json(admin, "/api/policy")
    assert [(p["route"], p["report_only"]) for p in policy["policies"]] == [
        (None, False), ("/try", True)]
    assert policy["policies"][0]["settings"]["allow_origins"] == [APP, EVIL]
    status = await get_json(admin, "/api/status")
    assert status["reloads"] == {"success": 1, "failure": 0}
    last = status["last_reload"]
    assert (last["result"], last["errors"]) == ("success", [])
    assert ISO.fullmatch(last["at"])
    assert first["loaded_at"] < status["loaded_at"] == last["at"]
    assert (await explain_api(admin, {"origin": EVIL}))[1]["verdict"] == "allowed"

    replace(path, "cors: {allow_origins: [42], max_age: -1}\n")
    await proc.wait_for(lambda r: r.get("event") == "reload-failed", timeout=10)
    errors = [r["message"] for r in proc.records if r.get("event") == "reload-error"]
    assert errors
    failed = await get_json(admin, "/api/status")
    assert failed["reloads"] == {"success": 1, "failure": 1}
    assert failed["last_reload"]["result"] == "failure"
    assert failed["last_reload"]["errors"] == errors
    assert failed["loaded_at"] == status["loaded_at"]  # the policy in use did not change
    assert await get_json(admin, "/api/policy") == policy
    proc.proc.send_signal(signal.SIGTERM)
    assert await proc.finish() == 0


# ---------------------------------------------------------------------------
# report-only disagreements
# ---------------------------------------------------------------------------


class InProcess:
    """``async with InProcess(url) as (server, admin_port)``: a :class:`ProxyServer`
    and its admin listener in this process (so the test can reach its Metrics)."""

    def __init__(self, upstream_url: str) -> None:
        text = config_text(upstream_url, routes=ROUTES,
                           admin={"host": "127.0.0.1", "port": 0})
        self.config = parse_config(text, "dashboard.yaml")
        self.server = ProxyServer(self.config)
        self.admin = AdminServer(self.server)

    async def __aenter__(self) -> tuple[ProxyServer, int]:
        await self.server.start()
        _, port = await self.admin.start()
        return self.server, port

    async def __aexit__(self, *exc) -> None:
        await self.server.stop(0)
        await self.admin.stop()


async def test_report_lists_the_disagreements_as_the_proxy_records_them(upstream):
    async with InProcess(upstream.url) as (server, admin):
        config = server.proxy.config
        metrics = server.proxy.metrics

        def decide(**request):
            return config.router.decide(request_view(config, **request))

        preflight = decide(origin=HOSTILE, request_method="PUT", path="/try/x")
        actual = decide(origin=APP, path="/try/y")
        assert preflight.report_only and actual.report_only
        metrics.report(preflight, "policy_stricter", f"the upstream allows {HOSTILE}", HOSTILE)
        metrics.report(actual, "agree", "", APP)  # agreement: counted, not listed
        metrics.report(actual, "headers_differ", "Access-Control-Max-Age: 600 vs 5", APP)
        metrics.report(actual, "headers_differ", "Access-Control-Max-Age: 600 vs 5", APP)
        report = await get_json(admin, "/api/report")
    assert report["kept"] == 100
    entries = report["disagreements"]
    assert [{k: v for k, v in e.items() if k not in ("first_seen", "last_seen")}
            for e in entries] == [
        {"origin": APP, "route": "/try", "kind": "actual", "direction": "headers_differ",
         "detail": "Access-Control-Max-Age: 600 vs 5", "count": 2},
        {"origin": HOSTILE, "route": "/try", "kind": "preflight",
         "direction": "policy_stricter", "detail": f"the upstream allows {HOSTILE}",
         "count": 1},
    ]
    for entry in entries:
        assert ISO.fullmatch(entry["first_seen"]) and ISO.fullmatch(entry["last_seen"])
        assert entry["first_seen"] <= entry["last_seen"]


async def test_status_says_starting_and_stopping(upstream):
    unit = InProcess(upstream.url)
    _, admin = await unit.admin.start()
    try:
        status = await get_json(admin, "/api/status")
        assert (status["ready"], status["readiness"]) == (False, "starting")
        await unit.server.start()
        assert (await get_json(admin, "/api/status"))["ready"] is True
        await unit.server.stop(0)
        status = await get_json(admin, "/api/status")
        assert (status["ready"], status["readiness"]) == (
            False, "stopping (in-flight requests are finishing; send no new ones)")
        # The page and the policy still answer while stopping.
        assert (await fetch(admin, "/"))[0] == 200
        assert (await get_json(admin, "/api/policy"))["policies"][1]["route"] == "/strict"
    finally:
        await unit.admin.stop()


async def test_report_shows_a_disagreement_the_proxy_found(run_admin, upstream):
    """End to end: a report-only route forwards a request from an origin its policy
    refuses; the upstream allows it (its own ACAO): ``policy_stricter``."""
    upstream.reply("/try/open", headers=[("Access-Control-Allow-Origin", HOSTILE)])
    proc, port, admin, _ = await run_admin(admin_config(upstream.url, routes=ROUTES))
    status, headers, _ = await fetch(port, "/try/open", headers={"Origin": HOSTILE})
    assert (status, headers.get("Access-Control-Allow-Origin")) == (200, HOSTILE)
    (entry,) = (await get_json(admin, "/api/report"))["disagreements"]
    assert {k: entry[k] for k in ("origin", "route", "kind", "direction", "count")} == {
        "origin": HOSTILE, "route": "/try", "kind": "actual", "direction": "policy_stricter",
        "count": 1}
    assert HOSTILE in entry["detail"]
    proc.proc.send_signal(signal.SIGTERM)
    assert await proc.finish() == 0
