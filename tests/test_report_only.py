"""Report-only mode (``cors.report_only``), end to end and rule by rule.

End to end: a Starlette app with its own ``CORSMiddleware`` under uvicorn is the
upstream; ``corsproxy run`` is in front of it with a different policy in report-only
mode. Every request is sent to both, and the proxy's answer must be the upstream's
own (status, body and every header but ``Date`` and the added ``X-Request-Id``),
while the access line and ``/metrics`` say where the policy would differ, in each
direction. Then :func:`corsproxy.report.compare` is checked rule by rule from a table.
"""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import headers_of, raw_exchange, raw_request, status_of
from hostile import ProxyProcess
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.routing import Route
from ws_upstreams import open_tunnel, uvicorn_server, ws_proxies, ws_upstream

from corsproxy.core import CorsPolicy, CorsSettings, RequestView, Router
from corsproxy.report import compare

APP = "https://app.example.com"
LEGACY = "https://legacy.example.com"  # the upstream allows it, the new policy does not
NEW = "https://new.example.com"  # the new policy allows it, the upstream does not
BODY = b"\x00\xff caf\xc3\xa9 \r\n" * 100  # any bytes, byte for byte


def starlette_app() -> Starlette:
    async def items(request):
        return Response(BODY, headers={"X-Total": "3", "Vary": "Accept-Encoding"},
                        media_type="application/octet-stream")

    return Starlette(
        routes=[Route("/{path:path}", items, methods=["GET", "PUT", "POST"])],
        middleware=[Middleware(
            CORSMiddleware, allow_origins=[APP, LEGACY], allow_methods=["GET", "PUT"],
            allow_headers=["X-Token"], expose_headers=["X-Total"], max_age=600,
        )],
    )


def proxy_config(directory: Path, upstream: str) -> Path:
    path = directory / "report-only.yaml"
    path.write_text(yaml.safe_dump({
        "listen": {"host": "127.0.0.1", "port": 0, "workers": 1},
        "upstream": {"url": upstream, "connect_timeout": 2, "timeout": 10},
        "admin": {"host": "127.0.0.1", "port": 0},
        "cors": {"allow_origins": [APP, NEW], "allow_methods": ["GET", "PUT"],
                 "allow_headers": ["X-Token"], "expose_headers": ["X-Total"],
                 "report_only": True},
        "routes": [
            {"path": "/short", "cors": {"max_age": 60}},
            {"path": "/enforced", "cors": {"report_only": False}},
        ],
    }, sort_keys=False))
    return path


def request(method: str, path: str, *headers: tuple[str, str]) -> bytes:
    return raw_request(method, path, [("Host", "api.test"), *headers])


#: Headers that differ between two answers of the same server, or that the proxy adds.
_VOLATILE = {"date", "x-request-id"}


def comparable(raw: bytes) -> tuple[int | None, list[tuple[str, str]], bytes]:
    headers = [(n, v) for n, v in headers_of(raw) if n.lower() not in _VOLATILE]
    return status_of(raw), headers, raw.partition(b"\r\n\r\n")[2]


#: (name, request, expected report, expected detail) for the end-to-end run.
EXCHANGES = [
    ("agree", request("GET", "/items", ("Origin", APP)), "agree", None),
    ("stricter", request("GET", "/items", ("Origin", LEGACY)), "policy_stricter",
     f'origin "{LEGACY}": the upstream allowed it (Access-Control-Allow-Origin: {LEGACY}); '
     f'the policy would deny it (origin: "{LEGACY}" is not allowed by allow_origins or '
     f"allow_origin_regex)"),
    ("looser", request("GET", "/items", ("Origin", NEW)), "policy_looser",
     f'origin "{NEW}": the upstream sent no Access-Control-Allow-Origin; the policy would '
     f'allow it (origin: "{NEW}" is allowed by allow_origins)'),
    ("headers", request("OPTIONS", "/short/x", ("Origin", APP),
                        ("Access-Control-Request-Method", "PUT")), "headers_differ",
     f'origin "{APP}", method "PUT": Access-Control-Max-Age: policy "60", upstream "600"'),
    ("preflight-stricter", request("OPTIONS", "/items", ("Origin", LEGACY),
                                   ("Access-Control-Request-Method", "PUT"),
                                   ("Access-Control-Request-Headers", "x-token")),
     "policy_stricter",
     f'origin "{LEGACY}", method "PUT", headers "x-token": the upstream allowed it '
     f"(Access-Control-Allow-Origin: {LEGACY}); the policy would deny it (origin: "
     f'"{LEGACY}" is not allowed by allow_origins or allow_origin_regex)'),
    ("both-deny", request("OPTIONS", "/items", ("Origin", APP),
                          ("Access-Control-Request-Method", "DELETE")), "agree", None),
    ("not-cors", request("GET", "/items"), None, None),
]


@pytest.fixture
async def report_only_setup(tmp_path):
    async with uvicorn_server(starlette_app()) as upstream:
        proxy = ProxyProcess(proxy_config(tmp_path, upstream)).start()
        try:
            yield upstream, proxy
            proxy.signal(signal.SIGTERM)
            assert await proxy.wait_exit(10) == 0
        finally:
            proxy.kill()


async def test_report_only_passes_the_upstream_answer_and_reports_each_direction(
        report_only_setup):
    upstream, proxy = report_only_setup
    upstream_port = int(upstream.rsplit(":", 1)[1])
    for name, data, _, _ in EXCHANGES:
        direct = await raw_exchange(upstream_port, data)
        through = await raw_exchange(proxy.port, data)
        assert comparable(through) == comparable(direct), name
        assert [v for n, v in headers_of(through) if n.lower() == "x-request-id"], name

    lines = [r for r in proxy.records() if "method" in r]
    for _ in range(100):  # access lines are flushed once per loop iteration
        if len(lines) >= len(EXCHANGES):
            break
        await asyncio.sleep(0.05)
        lines = [r for r in proxy.records() if "method" in r]
    assert [(r["report"], r["report_detail"]) for r in lines] == [
        (report, detail) for _, _, report, detail in EXCHANGES
    ]
    preflight = lines[3]
    assert (preflight["request_method"], preflight["request_headers"]) == ("PUT", None)
    assert lines[4]["request_headers"] == "x-token"

    listening = next(r for r in proxy.records() if r.get("event") == "listening")
    with urllib.request.urlopen(f"http://127.0.0.1:{listening['admin_port']}/metrics",
                                timeout=5) as answer:
        text = answer.read().decode()
    counted = {
        line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
        if line.startswith("corsproxy_report_only_disagreements_total{")
    }
    assert counted == {
        'corsproxy_report_only_disagreements_total{direction="policy_stricter",'
        'kind="actual",route=""}': 1.0,
        'corsproxy_report_only_disagreements_total{direction="policy_looser",'
        'kind="actual",route=""}': 1.0,
        'corsproxy_report_only_disagreements_total{direction="headers_differ",'
        'kind="preflight",route="/short"}': 1.0,
        'corsproxy_report_only_disagreements_total{direction="policy_stricter",'
        'kind="preflight",route=""}': 1.0,
    }


async def test_an_enforced_route_beside_report_only_ones_still_answers_itself(
        report_only_setup):
    _, proxy = report_only_setup
    data = request("OPTIONS", "/enforced/x", ("Origin", LEGACY),
                   ("Access-Control-Request-Method", "PUT"))
    raw = await raw_exchange(proxy.port, data)
    assert status_of(raw) == 400
    assert not [n for n, _ in headers_of(raw) if n.lower().startswith("access-control-")]
    assert raw.partition(b"\r\n\r\n")[2].startswith(b"Disallowed CORS origin")
    record = await proxy.wait_record(lambda r: r.get("path") == "/enforced/x")
    assert (record["report"], record["cors"], record["route"]) == (None, "denied", "/enforced")


async def test_report_only_preflights_are_never_answered_from_the_cache(make_proxy, upstream):
    proxy = await make_proxy(cors={"allow_origins": [APP], "report_only": True})
    data = request("OPTIONS", "/p", ("Origin", APP), ("Access-Control-Request-Method", "GET"))
    for _ in range(3):
        await raw_exchange(proxy.port, data)
    seen = await upstream.wait(3)
    assert [r.method for r in seen] == ["OPTIONS"] * 3
    assert proxy.server.proxy.preflights == {}


# ---------------------------------------------------------------------------
# the rules, from a table
# ---------------------------------------------------------------------------


def decide(cors: dict, **view) -> object:
    settings = CorsSettings(**{"allow_origins": (APP,), **cors})
    return Router(CorsPolicy(settings)).decide(RequestView(**view))


PREFLIGHT = {"method": "OPTIONS", "origin": (APP,), "request_method": "PUT"}
ACTUAL = {"method": "GET", "origin": (APP,)}
OK_PREFLIGHT = [("Access-Control-Allow-Origin", APP), ("Access-Control-Allow-Methods", "PUT")]

RULES = [
    # (name, policy, request view, upstream status, upstream headers, compare kwargs, result)
    ("preflight_non_2xx_is_a_denial", {"allow_methods": ("PUT",)}, PREFLIGHT, 404,
     OK_PREFLIGHT, {"request_method": "PUT"}, "policy_looser"),
    ("preflight_2xx_other_than_200_is_ok", {"allow_methods": ("PUT",)}, PREFLIGHT, 204,
     OK_PREFLIGHT + [("Access-Control-Allow-Headers", "Accept, Accept-Language, "
                      "Content-Language, Content-Type"), ("Access-Control-Max-Age", "600")],
     {"request_method": "PUT"}, "agree"),
    ("preflight_method_missing_upstream", {"allow_methods": ("PUT",)}, PREFLIGHT, 200,
     [("Access-Control-Allow-Origin", APP), ("Access-Control-Allow-Methods", "GET")],
     {"request_method": "PUT"}, "policy_looser"),
    ("safelisted_method_needs_no_acam", {}, {**PREFLIGHT, "request_method": "POST"}, 200,
     [("Access-Control-Allow-Origin", "*")], {"request_method": "POST"}, "policy_stricter"),
    ("star_headers_do_not_cover_authorization", {"allow_methods": ("PUT",)},
     {**PREFLIGHT, "request_headers": ("Authorization",)}, 200,
     OK_PREFLIGHT + [("Access-Control-Allow-Headers", "*")],
     {"request_method": "PUT", "request_headers": ("Authorization",)}, "agree"),
    ("star_headers_cover_other_names", {"allow_methods": ("PUT",)},
     {**PREFLIGHT, "request_headers": ("X-A",)}, 200,
     OK_PREFLIGHT + [("Access-Control-Allow-Headers", "*")],
     {"request_method": "PUT", "request_headers": ("X-A",)}, "policy_stricter"),
    ("private_network_needs_its_header", {"allow_methods": ("PUT",),
                                          "allow_private_network": True},
     {**PREFLIGHT, "request_private_network": "true"}, 200, OK_PREFLIGHT,
     {"request_method": "PUT", "private_network": True}, "policy_looser"),
    ("star_origin_fails_with_cookies", {}, ACTUAL, 200,
     [("Access-Control-Allow-Origin", "*")], {"cookies": True}, "policy_looser"),
    ("cookies_need_allow_credentials", {"allow_credentials": True}, ACTUAL, 200,
     [("Access-Control-Allow-Origin", APP)], {"cookies": True}, "policy_looser"),
    ("star_origin_without_cookies_differs_in_value", {}, ACTUAL, 200,
     [("Access-Control-Allow-Origin", "*")], {}, "headers_differ"),
    ("another_origin_echoed_is_a_denial", {}, ACTUAL, 200,
     [("Access-Control-Allow-Origin", "https://other.example")], {}, "policy_looser"),
    ("two_acao_lines_are_a_denial", {}, ACTUAL, 200,
     [("Access-Control-Allow-Origin", APP), ("access-control-allow-origin", APP)], {},
     "policy_looser"),
    ("header_sets_compare_in_any_case_and_order", {"expose_headers": ("X-A", "X-B")}, ACTUAL,
     200, [("Access-Control-Allow-Origin", APP), ("Access-Control-Expose-Headers", "x-b,X-A")],
     {}, "agree"),
    ("websocket_101_against_a_403", {}, {"method": "GET", "origin": ("https://evil.example",),
                                         "websocket": True}, 101, [],
     {"origin": "https://evil.example"}, "policy_stricter"),
    ("websocket_refused_by_both", {}, {"method": "GET", "origin": ("https://evil.example",),
                                       "websocket": True}, 403, [],
     {"origin": "https://evil.example"}, "agree"),
    ("both_deny_with_any_headers", {}, {"method": "GET", "origin": ("https://evil.example",)},
     200, [("Access-Control-Allow-Origin", APP)], {"origin": "https://evil.example"}, "agree"),
]


@pytest.mark.parametrize(("name", "cors", "view", "status", "headers", "kwargs", "result"),
                         RULES, ids=[r[0] for r in RULES])
def test_compare_rules(name, cors, view, status, headers, kwargs, result):
    decision = decide(cors, **view)
    kwargs = {"origin": view["origin"][0], **kwargs}
    got = compare(decision, status, headers, **kwargs)
    assert got is not None
    assert got[0] == result, got
    assert (got[1] == "") == (result == "agree")


def test_requests_that_are_not_cors_are_not_compared():
    assert compare(decide({}, method="GET"), 200, [], origin="") is None
    same = decide({}, method="GET", origin=("http://api.test",), host="api.test")
    assert same.allowed and same.headers == ()
    assert compare(same, 200, [("Access-Control-Allow-Origin", "*")],
                   origin="http://api.test") is None


def test_headers_differ_names_every_header_and_both_values():
    decision = decide({"expose_headers": ("X-A",)}, **ACTUAL)
    got = compare(decision, 200, [("Access-Control-Allow-Origin", APP),
                                  ("Access-Control-Allow-Credentials", "true")], origin=APP)
    assert got == ("headers_differ", f'origin "{APP}": Access-Control-Allow-Credentials: policy '
                   'absent, upstream "true"; Access-Control-Expose-Headers: policy "X-A", '
                   "upstream absent")


def test_detail_is_json_safe_for_hostile_values():
    origin = 'https://x"\\y'
    decision = decide({}, method="GET", origin=(origin,))
    got = compare(decision, 200, [("Access-Control-Allow-Origin", origin)], origin=origin)
    assert got is not None and got[0] == "policy_stricter"
    assert json.loads(json.dumps(got[1])) == got[1]
    assert '"https://x\\"\\\\y"' in got[1]


async def test_report_only_forwards_a_handshake_the_policy_would_refuse():
    """The upstream accepts every handshake (101); enforced, the policy would answer 403."""
    async with ws_upstream() as upstream, ws_proxies() as start:
        proxy = await start(upstream.url, cors={"allow_origins": [APP], "report_only": True})
        response, client = await open_tunnel(proxy.port, "/echo", origin="https://evil.example")
        await client.aclose()
        assert response.status == 101
        record = await proxy.tunnel_record("/echo")
        assert (record["cors"], record["report"]) == ("rejected", "policy_stricter")
        assert record["report_detail"] == (
            'origin "https://evil.example", WebSocket handshake: the upstream allowed it '
            '(status 101); the policy would deny it (origin: "https://evil.example" is not '
            "allowed by allow_origins or allow_origin_regex)"
        )


async def test_a_repeated_request_is_reported_every_time(upstream):
    """The comparison is computed once per combination, but every request still gets
    its access line's report and its count."""
    async with ws_proxies() as start:
        proxy = await start(upstream.url, cors={"allow_origins": [NEW], "report_only": True})
        data = request("GET", "/again", ("Origin", NEW))
        for _ in range(3):
            assert status_of(await raw_exchange(proxy.port, data)) is not None
        records = await proxy.wait_record(lambda r: len(proxy.for_path("/again")) >= 3)
        assert records is not None
        reports = {(r["report"], r["report_detail"]) for r in proxy.for_path("/again")}
        assert len(reports) == 1 and None not in next(iter(reports))
        text = proxy.server.proxy.metrics.render(idle=0, active=0, inflight=0).decode()
        assert 'corsproxy_report_only_disagreements_total{direction="policy_looser",' \
               'kind="actual",route=""} 3.0' in text
