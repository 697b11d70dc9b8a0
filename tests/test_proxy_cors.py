"""CORS on every response the proxy sends: forwarded, answered itself, and made on errors.

Each test checks the FULL set of Access-Control-* headers the client received.
"""

from __future__ import annotations

import asyncio

import pytest
from conftest import Reply, free_port, raw_response, status_of, unconnectable_port

APP = "https://app.example.com"
EVIL = "https://evil.example"
POLICY = {"allow_origins": [APP], "allow_methods": ["GET", "PUT"], "expose_headers": ["X-Id"]}
ALLOWED = {"access-control-allow-origin": APP, "access-control-expose-headers": "X-Id"}
PREFLIGHT_VARY = [
    "Origin",
    "Access-Control-Request-Method",
    "Access-Control-Request-Headers",
    "Access-Control-Request-Private-Network",
]
UPSTREAM_CORS = [
    ("Access-Control-Allow-Origin", "*"),
    ("access-control-allow-credentials", "true"),
    ("Access-Control-Allow-Methods", "DELETE"),
    ("Access-Control-Expose-Headers", "X-Secret"),
    ("ACCESS-CONTROL-MAX-AGE", "99999"),
]


# -- the upstream's own CORS headers -----------------------------------------


@pytest.mark.parametrize(
    ("origin", "expected"),
    [(APP, ALLOWED), (EVIL, {}), (None, {})],
    ids=["allowed_origin", "denied_origin", "no_origin"],
)
async def test_upstream_cors_headers_are_replaced_by_the_proxys_own(
    upstream, make_proxy, http, origin, expected
):
    upstream.default = Reply(headers=[("Content-Type", "text/plain"), *UPSTREAM_CORS])
    proxy = await make_proxy(cors=POLICY)
    headers = {"Origin": origin} if origin else {}
    result = await http.request("GET", proxy.url + "/items", headers)
    assert result.status == 200
    assert result.cors == expected
    assert result.vary == ["Origin"]


async def test_denied_origin_without_enforce_is_forwarded_without_cors_headers(
    upstream, make_proxy, http
):
    proxy = await make_proxy(cors=POLICY)
    result = await http.request("PUT", proxy.url + "/items/1", {"Origin": EVIL}, data=b"{}")
    assert result.status == 200
    assert result.cors == {}
    (seen,) = upstream.requests
    assert seen.method == "PUT" and seen.body == b"{}"


# -- Vary ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("upstream_vary", "expected"),
    [
        ([], ["Origin"]),
        (["Accept-Encoding"], ["Accept-Encoding, Origin"]),
        (["origin"], ["origin"]),
        (["Accept, ORIGIN, accept"], ["Accept, ORIGIN"]),
        (["Accept-Encoding", "Accept-Language"], ["Accept-Encoding, Accept-Language, Origin"]),
        (["*"], ["*"]),
        (["Accept, *"], ["*"]),
        ([" , Accept ,"], ["Accept, Origin"]),
    ],
    ids=[
        "none",
        "one_name",
        "origin_already_there_any_case",
        "duplicates_dropped",
        "two_lines_become_one",
        "star",
        "star_among_names",
        "empty_elements",
    ],
)
async def test_vary_merges_origin_into_the_upstreams_vary(
    upstream, make_proxy, http, upstream_vary, expected
):
    upstream.default = Reply(headers=[("Content-Type", "text/plain")]
                             + [("Vary", v) for v in upstream_vary])
    proxy = await make_proxy(cors=POLICY)
    result = await http.request("GET", proxy.url + "/", {"Origin": APP})
    assert result.values("Vary") == expected
    assert result.cors == ALLOWED


# -- preflights and OPTIONS ----------------------------------------------------


async def test_preflight_is_answered_by_the_proxy_and_never_forwarded(upstream, make_proxy, http):
    proxy = await make_proxy(cors=POLICY)
    result = await http.request(
        "OPTIONS",
        proxy.url + "/items/1",
        [("Origin", APP), ("Access-Control-Request-Method", "PUT")],
    )
    assert result.status == 200
    assert result.body == b"OK"
    assert result.cors == {
        "access-control-allow-origin": APP,
        "access-control-allow-methods": "GET, PUT",
        "access-control-allow-headers": "Accept, Accept-Language, Content-Language, Content-Type",
        "access-control-max-age": "600",
    }
    assert result.vary == PREFLIGHT_VARY
    denied = await http.request(
        "OPTIONS",
        proxy.url + "/items/1",
        [("Origin", EVIL), ("Access-Control-Request-Method", "PUT")],
    )
    assert denied.status == 400
    assert denied.cors == {}
    assert denied.vary == PREFLIGHT_VARY
    assert denied.body.startswith(b"Disallowed CORS origin")
    assert upstream.requests == []


async def test_options_without_request_method_goes_upstream(upstream, make_proxy, http):
    upstream.default = Reply(status=204, headers=[("Allow", "GET, OPTIONS")], body=b"")
    proxy = await make_proxy(cors=POLICY)
    result = await http.request("OPTIONS", proxy.url + "/items", {"Origin": APP})
    assert result.status == 204
    assert result.values("Allow") == ["GET, OPTIONS"]
    assert result.cors == ALLOWED
    assert [r.method for r in upstream.requests] == ["OPTIONS"]


# -- enforce -------------------------------------------------------------------


async def test_enforce_refuses_a_disallowed_origin_with_403_and_never_forwards(
    upstream, make_proxy, http
):
    proxy = await make_proxy(cors={**POLICY, "enforce": True})
    result = await http.request("POST", proxy.url + "/transfer", {"Origin": EVIL}, data=b"amount=1")
    assert result.status == 403
    assert result.cors == {}
    assert result.vary == ["Origin"]
    body = result.body.decode()
    assert EVIL in body and "allow_origins" in body
    assert upstream.requests == []


async def test_enforce_forwards_allowed_same_origin_and_non_cors_requests(
    upstream, make_proxy, http
):
    proxy = await make_proxy(cors={**POLICY, "enforce": True})
    allowed = await http.request("GET", proxy.url + "/a", {"Origin": APP})
    same = await http.request(
        "GET", proxy.url + "/b", {"Origin": f"http://127.0.0.1:{proxy.port}"}
    )
    plain = await http.request("GET", proxy.url + "/c")
    assert (allowed.status, same.status, plain.status) == (200, 200, 200)
    assert allowed.cors == ALLOWED
    assert same.cors == {} and plain.cors == {}
    assert [r.raw_path for r in upstream.requests] == ["/a", "/b", "/c"]


# -- routes --------------------------------------------------------------------


async def test_routes_pick_the_policy_by_whole_path_segments(upstream, make_proxy, http):
    proxy = await make_proxy(
        cors=POLICY,
        routes=[{"path": "/public", "cors": {"allow_origins": ["*"], "expose_headers": []}}],
    )
    public = await http.request("GET", proxy.url + "/public/x?q=1", {"Origin": EVIL})
    public_root = await http.request("GET", proxy.url + "/public", {"Origin": EVIL})
    publicity = await http.request("GET", proxy.url + "/publicity", {"Origin": EVIL})
    private = await http.request("GET", proxy.url + "/private", {"Origin": APP})
    assert public.cors == {"access-control-allow-origin": "*"}
    assert public_root.cors == {"access-control-allow-origin": "*"}
    assert publicity.cors == {}
    assert private.cors == ALLOWED
    preflight = await http.request(
        "OPTIONS",
        proxy.url + "/public/x",
        [("Origin", EVIL), ("Access-Control-Request-Method", "GET")],
    )
    assert preflight.status == 200
    assert preflight.cors["access-control-allow-origin"] == "*"
    assert len(upstream.requests) == 4


# -- responses the proxy makes: 502, 504, 413 ----------------------------------


async def test_upstream_refusing_the_connection_gives_502_with_cors_headers(make_proxy, http):
    proxy = await make_proxy(cors=POLICY, upstream_url=f"http://127.0.0.1:{free_port()}")
    result = await http.request("GET", proxy.url + "/items", {"Origin": APP})
    assert result.status == 502
    assert result.cors == ALLOWED
    assert result.vary == ["Origin"]
    assert result.values("Content-Type") == ["text/plain; charset=utf-8"]
    # Generic words for the client; the address and the detail go to the log only.
    assert result.body == b"Bad Gateway: upstream refused the connection\n"
    assert b"refused" in result.body


async def test_upstream_resetting_the_connection_gives_502_with_cors_headers(
    upstream, make_proxy, http
):
    upstream.reply("/reset", reset=True)
    proxy = await make_proxy(cors=POLICY)
    result = await http.request("POST", proxy.url + "/reset", {"Origin": APP}, data=b"x")
    assert result.status == 502
    assert result.cors == ALLOWED
    assert b"closed the connection" in result.body or b"reset" in result.body


async def test_upstream_sending_garbage_gives_502_with_cors_headers(raw_upstream, make_proxy, http):
    async def garbage(head, reader, writer):
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()

    bad = await raw_upstream(garbage)
    proxy = await make_proxy(cors=POLICY, upstream_url=bad.url)
    result = await http.request("GET", proxy.url + "/", {"Origin": APP})
    assert result.status == 502
    assert result.cors == ALLOWED
    assert result.body.startswith(b"Bad Gateway: the upstream")


async def test_no_response_headers_within_timeout_gives_504_with_cors_headers(
    upstream, make_proxy, http
):
    upstream.reply("/slow", delay=5)
    proxy = await make_proxy(cors=POLICY, upstream={"timeout": 0.3})
    result = await http.request("GET", proxy.url + "/slow", {"Origin": APP})
    assert result.status == 504
    assert result.cors == ALLOWED
    assert result.vary == ["Origin"]
    assert b"no response headers within upstream.timeout (0.3 s)" in result.body


async def test_connect_timeout_gives_504_with_cors_headers(make_proxy, http):
    with unconnectable_port() as port:
        proxy = await make_proxy(
            cors=POLICY, upstream_url=f"http://127.0.0.1:{port}", upstream={"connect_timeout": 0.3}
        )
        result = await http.request("GET", proxy.url + "/", {"Origin": APP})
    assert result.status == 504
    assert result.cors == ALLOWED
    assert b"within upstream.connect_timeout (0.3 s)" in result.body


async def test_body_over_limit_by_content_length_gives_413_before_forwarding(
    upstream, make_proxy, http
):
    proxy = await make_proxy(cors=POLICY, listen={"max_body_size": 1000})
    result = await http.request("PUT", proxy.url + "/up", {"Origin": APP}, data=b"x" * 1001)
    assert result.status == 413
    assert result.cors == ALLOWED
    assert result.vary == ["Origin"]
    assert b"1001 bytes (Content-Length) is over listen.max_body_size (1000 bytes)" in result.body
    assert upstream.requests == []
    # The connection is still good for the next request.
    ok = await http.request("PUT", proxy.url + "/up", {"Origin": APP}, data=b"x" * 1000)
    assert ok.status == 200
    assert upstream.requests[0].body == b"x" * 1000


async def _chunks(total: int, size: int = 4096):
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        sent += n
        yield b"y" * n
        await asyncio.sleep(0)


async def test_chunked_body_over_limit_gives_413_and_drops_the_upstream_connection(
    upstream, make_proxy, http
):
    proxy = await make_proxy(cors=POLICY, listen={"max_body_size": 50_000})
    result = await http.request("POST", proxy.url + "/up", {"Origin": APP}, data=_chunks(200_000))
    assert result.status == 413
    assert result.cors == ALLOWED
    assert b"over listen.max_body_size (50000 bytes)" in result.body
    # The upstream got the start of the body, never a complete request.
    (seen,) = await upstream.wait()
    assert not seen.complete
    assert seen.error is not None
    assert seen.body_size <= 50_000


async def test_chunked_body_at_the_limit_is_forwarded_whole(upstream, make_proxy, http):
    proxy = await make_proxy(cors=POLICY, listen={"max_body_size": 50_000})
    result = await http.request("POST", proxy.url + "/up", {"Origin": APP}, data=_chunks(50_000))
    assert result.status == 200
    (seen,) = await upstream.wait()
    assert seen.complete and seen.body_size == 50_000
    assert seen.values("Transfer-Encoding") == ["chunked"]


async def test_413_with_expect_continue_is_sent_without_100_continue(upstream, make_proxy):
    proxy = await make_proxy(cors=POLICY, listen={"max_body_size": 10})
    raw = await raw_response(
        proxy.port,
        b"PUT /x HTTP/1.1\r\nHost: p\r\nOrigin: " + APP.encode() + b"\r\n"
        b"Content-Length: 100\r\nExpect: 100-continue\r\n\r\n",
    )
    assert status_of(raw) == 413
    assert b"\r\nConnection: close\r\n" in raw
    assert b"100 Continue" not in raw
    assert upstream.requests == []


async def test_redirects_go_back_to_the_client_with_cors_headers(upstream, make_proxy, http):
    upstream.reply("/old", status=302, headers=[("Location", "/new")], body=b"")
    proxy = await make_proxy(cors=POLICY)
    result = await http.request("GET", proxy.url + "/old", {"Origin": APP})
    assert result.status == 302
    assert result.values("Location") == ["/new"]
    assert result.cors == ALLOWED
    assert [r.raw_path for r in upstream.requests] == ["/old"]


async def test_upstream_error_statuses_pass_through_with_cors_headers(upstream, make_proxy, http):
    upstream.reply("/boom", status=500, body=b"upstream broke\n")
    proxy = await make_proxy(cors=POLICY)
    result = await http.request("GET", proxy.url + "/boom", {"Origin": APP})
    assert result.status == 500
    assert result.body == b"upstream broke\n"
    assert result.cors == ALLOWED
