"""The proxy as a reverse proxy: what reaches the upstream, what reaches the client.

Headers are compared as the full ordered list of pairs the other side received,
so anything added, dropped or reordered by aiohttp's client shows up.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import re

import aiohttp
import pytest
from conftest import (
    Reply,
    client_session,
    headers_of,
    raw_exchange,
    raw_response,
    read_one_response,
    status_of,
)

APP = "https://app.example.com"
POLICY = {"allow_origins": [APP]}
ALLOWED = {"access-control-allow-origin": APP}


def request_bytes(method: str, target: str, headers: list[tuple[str, str]], body: bytes = b""
                  ) -> bytes:
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers)
    return head.encode("latin-1") + b"\r\n" + body


def upstream_host(upstream) -> str:
    return f"127.0.0.1:{upstream.port}"


# -- request headers -----------------------------------------------------------


async def test_upstream_gets_exactly_the_clients_headers_plus_forwarding_ones(
    upstream, make_proxy
):
    proxy = await make_proxy(cors=POLICY)
    client_headers = [
        ("Host", "api.example.test"),
        ("Origin", APP),
        ("X-Custom", "first"),
        ("cookie", "a=1; b=2"),
        ("x-lower-case", "kept"),
        ("Accept", "application/json"),
        ("X-Custom", "second"),
        ("x-request-id", "client/chosen:id-1"),
        ("Authorization", "Bearer abc.def"),
        ("Connection", "keep-alive"),
    ]
    raw = await raw_response(proxy.port, request_bytes("GET", "/items?x=1", client_headers))
    assert status_of(raw) == 200
    (seen,) = upstream.requests
    assert seen.headers == [
        ("Host", upstream_host(upstream)),
        ("Origin", APP),
        ("X-Custom", "first"),
        ("cookie", "a=1; b=2"),
        ("x-lower-case", "kept"),
        ("Accept", "application/json"),
        ("X-Custom", "second"),
        ("X-Request-Id", "client/chosen:id-1"),  # the client's id, in its place
        ("Authorization", "Bearer abc.def"),
        ("X-Forwarded-For", "127.0.0.1"),
        ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-Host", "api.example.test"),
    ]
    assert headers_of(raw).count(("X-Request-Id", "client/chosen:id-1")) == 1


async def test_a_body_goes_upstream_with_its_content_length_and_nothing_added(
    upstream, make_proxy
):
    proxy = await make_proxy(cors=POLICY)
    body = b'{"name": "x"}'
    raw = await raw_response(
        proxy.port,
        request_bytes("PUT", "/items/1", [("Host", "h"), ("Content-Length", str(len(body)))], body),
    )
    assert status_of(raw) == 200
    (seen,) = await upstream.wait()
    assert seen.body == body
    # No Content-Type, Accept, Accept-Encoding or User-Agent from aiohttp's client.
    assert seen.names() == [
        "Host", "Content-Length", "X-Forwarded-For", "X-Request-Id", "X-Forwarded-Proto",
        "X-Forwarded-Host",
    ]
    (generated,) = seen.values("X-Request-Id")
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    assert [v for n, v in headers_of(raw) if n == "X-Request-Id"] == [generated]


async def test_a_bodiless_post_gets_content_length_zero(upstream, make_proxy):
    # The one header aiohttp's client adds: Content-Length: 0 on a POST/PUT/PATCH/
    # DELETE without a body (RFC 9110 §8.6 says a client SHOULD send it; same meaning).
    proxy = await make_proxy(cors=POLICY)
    raw = await raw_response(proxy.port, request_bytes("POST", "/x", [("Host", "h")]))
    assert status_of(raw) == 200
    (seen,) = await upstream.wait()
    assert seen.values("Content-Length") == ["0"]
    assert seen.body == b""


async def test_hop_by_hop_request_headers_are_removed(upstream, make_proxy):
    proxy = await make_proxy(cors=POLICY)
    client_headers = [
        ("Host", "h"),
        ("Connection", "keep-alive, X-Hop-Named"),
        ("Connection", "X-Also-Named"),
        ("X-Hop-Named", "secret"),
        ("X-Also-Named", "secret"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("Proxy-Authorization", "Basic cHJveHk6c2VjcmV0"),
        ("Proxy-Connection", "keep-alive"),
        ("X-End-To-End", "kept"),
        ("Transfer-Encoding", "chunked"),
    ]
    body = b"5\r\nhello\r\n0\r\n\r\n"
    raw = await raw_response(proxy.port, request_bytes("POST", "/x", client_headers, body))
    assert status_of(raw) == 200
    (seen,) = await upstream.wait()
    assert seen.body == b"hello"
    assert [n for n, _ in seen.headers] == [
        "Host",
        "X-End-To-End",
        "X-Forwarded-For",
        "X-Request-Id",
        "X-Forwarded-Proto",
        "X-Forwarded-Host",
        "Transfer-Encoding",  # the proxy's own hop: it re-chunks the streamed body
    ]
    assert seen.values("Transfer-Encoding") == ["chunked"]


async def test_upgrade_requests_are_forwarded_without_the_upgrade(upstream, make_proxy):
    proxy = await make_proxy(cors=POLICY)
    raw = await raw_response(
        proxy.port,
        request_bytes("GET", "/ws", [("Host", "h"), ("Connection", "Upgrade"), ("Upgrade", "h2c")]),
    )
    assert status_of(raw) == 200
    (seen,) = upstream.requests
    assert seen.values("Upgrade") == [] and seen.values("Connection") == []


async def test_x_forwarded_for_appends_and_proto_and_host_are_set_by_the_proxy(
    upstream, make_proxy
):
    proxy = await make_proxy(cors=POLICY)
    headers = [
        ("Host", "public.example:8443"),
        ("X-Forwarded-For", "203.0.113.7"),
        ("X-Forwarded-For", "198.51.100.2, 10.0.0.1"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "spoofed.example"),
    ]
    await raw_response(proxy.port, request_bytes("GET", "/", headers))
    (seen,) = upstream.requests
    assert seen.values("X-Forwarded-For") == ["203.0.113.7, 198.51.100.2, 10.0.0.1, 127.0.0.1"]
    assert seen.values("X-Forwarded-Proto") == ["http"]
    assert seen.values("X-Forwarded-Host") == ["public.example:8443"]
    assert seen.values("Host") == [upstream_host(upstream)]


async def test_preserve_host_forwards_the_clients_host(upstream, make_proxy):
    proxy = await make_proxy(cors=POLICY, upstream={"preserve_host": True})
    await raw_response(proxy.port, request_bytes("GET", "/", [("Host", "public.example")]))
    (seen,) = upstream.requests
    assert seen.values("Host") == ["public.example"]
    assert seen.values("X-Forwarded-Host") == ["public.example"]


async def test_header_bytes_that_are_not_utf8_are_forwarded_byte_for_byte(upstream, make_proxy):
    proxy = await make_proxy(cors=POLICY)
    data = (b"GET / HTTP/1.1\r\nHost: h\r\nOrigin: " + APP.encode()
            + b"\r\nX-Name: caf\xe9\xff\r\n\r\n")
    raw = await raw_response(proxy.port, data)
    assert status_of(raw) == 200
    assert b"\r\nAccess-Control-Allow-Origin: https://app.example.com\r\n" in raw
    (seen,) = upstream.requests
    assert [v.encode("latin-1") for v in seen.values("X-Name")] == [b"caf\xe9\xff"]


async def test_expect_100_continue_is_answered_when_the_body_is_wanted(upstream, make_proxy):
    proxy = await make_proxy(cors=POLICY)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(request_bytes(
            "PUT", "/x", [("Host", "h"), ("Content-Length", "5"), ("Expect", "100-continue")]
        ))
        async with asyncio.timeout(5):
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        assert status_of(await read_one_response(reader)) == 200
    finally:
        writer.close()
    (seen,) = await upstream.wait()
    assert seen.body == b"hello"
    assert seen.values("Expect") == []


# -- paths and queries ---------------------------------------------------------


TARGETS = [
    "/",
    "/items?q=1",
    "/a%2Fb/c",
    "//double//slash",
    "/caf%C3%A9?name=%E2%82%AC&x=a+b&y=%20&z=%2F",
    "/path;matrix=1/x",
    "/~user/%7Euser",
    "/q?&&a=&=b&a=1&a=2",
    "/q?url=http://x/y?z#",
    "/%ZZ/not-escaped%",
    "/upper%3a%3A",
]


@pytest.mark.parametrize("target", TARGETS)
async def test_path_and_query_reach_the_upstream_byte_for_byte(upstream, make_proxy, target):
    proxy = await make_proxy(cors=POLICY)
    raw = await raw_response(proxy.port, request_bytes("GET", target, [("Host", "h")]))
    assert status_of(raw) == 200, raw
    (seen,) = upstream.requests
    assert seen.raw_path == target.split("#")[0]


@pytest.mark.parametrize(
    ("base", "target", "expected"),
    [
        ("/api", "/x?q=1", "/api/x?q=1"),
        ("/api/", "/x?q=1", "/api/x?q=1"),
        ("/api", "/", "/api/"),
        ("/v1/api%20x", "/a%2Fb", "/v1/api%20x/a%2Fb"),
        ("/", "/x", "/x"),
    ],
)
async def test_the_upstream_base_path_is_prefixed(upstream, make_proxy, base, target, expected):
    proxy = await make_proxy(cors=POLICY, upstream_url=upstream.url + base)
    await raw_response(proxy.port, request_bytes("GET", target, [("Host", "h")]))
    (seen,) = upstream.requests
    assert seen.raw_path == expected


async def test_absolute_form_request_target_forwards_path_and_query(upstream, make_proxy):
    proxy = await make_proxy(cors=POLICY)
    raw = await raw_response(
        proxy.port, request_bytes("GET", "http://elsewhere.example/x/%2F?y=1", [("Host", "h")])
    )
    assert status_of(raw) == 200
    assert upstream.requests[0].raw_path == "/x/%2F?y=1"


async def test_methods_pass_unchanged(upstream, make_proxy):
    # aiohttp's HTTP parser (llhttp) accepts the registered methods only: a
    # lower-case or unknown method gets aiohttp's 400 before the proxy sees it.
    proxy = await make_proxy(cors=POLICY)
    methods = ["GET", "DELETE", "PATCH", "PROPFIND", "MKCOL", "PURGE"]
    for method in methods:
        raw = await raw_response(proxy.port, request_bytes(method, "/m", [("Host", "h")]))
        assert status_of(raw) == 200
    assert [r.method for r in upstream.requests] == methods


# -- response headers and bodies -----------------------------------------------


async def test_hop_by_hop_response_headers_are_removed(raw_upstream, make_proxy, http):
    async def answer(head, reader, writer):
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"
            b"Connection: keep-alive, X-Up-Hop\r\nX-Up-Hop: 1\r\nKeep-Alive: timeout=5\r\n"
            b"Proxy-Authenticate: Basic\r\nProxy-Connection: keep-alive\r\nTrailer: X-T\r\n"
            b"Upgrade: h2c\r\nX-Kept: yes\r\nVary: Accept\r\n\r\nok"
        )
        await writer.drain()

    up = await raw_upstream(answer)
    proxy = await make_proxy(cors=POLICY, upstream_url=up.url)
    result = await http.request("GET", proxy.url + "/", {"Origin": APP})
    assert result.body == b"ok"
    names = [n for n, _ in result.headers if n not in ("Date", "Server")]
    assert names == [
        "Content-Type", "Content-Length", "X-Kept", "Vary", "X-Request-Id",
        "Access-Control-Allow-Origin",
    ]
    assert result.values("Vary") == ["Accept, Origin"]


async def test_no_content_type_or_server_is_added_to_an_upstream_response(
    raw_upstream, make_proxy
):
    async def answer(head, reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        await writer.drain()

    up = await raw_upstream(answer)
    proxy = await make_proxy(cors=POLICY, upstream_url=up.url)
    raw = await raw_response(proxy.port, request_bytes("GET", "/", [("Host", "h")]))
    head = raw.split(b"\r\n\r\n")[0].lower()
    assert b"content-type" not in head and b"server" not in head
    assert raw.endswith(b"\r\n\r\nhello")


async def test_cookies_are_never_kept_between_clients(upstream, make_proxy):
    upstream.reply("/login", headers=[("Set-Cookie", "sid=alice; Path=/")], body=b"hi alice")
    proxy = await make_proxy(cors=POLICY)
    async with client_session() as alice, client_session() as bob:
        async with alice.get(proxy.url + "/login") as r:
            assert r.headers.getall("Set-Cookie") == ["sid=alice; Path=/"]
        async with bob.get(proxy.url + "/whoami") as r:
            assert r.status == 200
        async with alice.get(proxy.url + "/again") as r:
            assert r.status == 200
    assert [r.values("Cookie") for r in upstream.requests] == [[], [], []]


async def test_head_response_keeps_content_length_and_sends_no_body(upstream, make_proxy):
    upstream.reply("/file", body=b"x" * 1234)
    proxy = await make_proxy(cors=POLICY)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        # Pipelined on one connection: a stray body byte after the HEAD answer would
        # corrupt the GET answer that follows.
        writer.write(request_bytes("HEAD", "/file", [("Host", "h")])
                     + request_bytes("GET", "/file", [("Host", "h")]))
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            assert status_of(head) == 200
            assert b"\r\nContent-Length: 1234\r\n" in head
            get = await read_one_response(reader)
    finally:
        writer.close()
    assert status_of(get) == 200
    assert get.endswith(b"\r\n\r\n" + b"x" * 1234)
    assert [r.method for r in upstream.requests] == ["HEAD", "GET"]


@pytest.mark.parametrize("status", [204, 304])
async def test_204_and_304_have_no_body(upstream, make_proxy, status):
    upstream.reply("/empty", status=status, headers=[("ETag", '"v1"')], body=b"")
    proxy = await make_proxy(cors=POLICY)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(request_bytes("GET", "/empty", [("Host", "h"), ("Origin", APP)])
                     + request_bytes("GET", "/next", [("Host", "h")]))
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            after = await read_one_response(reader)
    finally:
        writer.close()
    assert status_of(head) == status
    assert b'\r\nETag: "v1"\r\n' in head
    assert b"\r\nAccess-Control-Allow-Origin: https://app.example.com\r\n" in head
    assert b"Transfer-Encoding" not in head
    assert status_of(after) == 200


async def test_a_chunked_response_reaches_an_http10_client_delimited_by_close(
    upstream, make_proxy
):
    upstream.reply("/stream", chunks=lambda: [b"one,", b"two,", b"three"])
    proxy = await make_proxy(cors=POLICY)
    raw = await raw_exchange(proxy.port, b"GET /stream HTTP/1.0\r\n\r\n")
    assert not raw.timed_out
    head, _, body = raw.partition(b"\r\n\r\n")
    # RFC 9110 §2.5: a server answers with the highest version it speaks (1.1).
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"\r\nConnection: close" in head
    assert b"transfer-encoding" not in head.lower()
    assert body == b"one,two,three"


async def test_gzip_body_passes_byte_identical(upstream, make_proxy, http):
    payload = json.dumps([{"id": i, "name": f"item {i}"} for i in range(2000)]).encode()
    compressed = gzip.compress(payload)
    upstream.reply(
        "/data",
        headers=[("Content-Type", "application/json"), ("Content-Encoding", "gzip")],
        body=compressed,
    )
    proxy = await make_proxy(cors=POLICY)
    result = await http.request("GET", proxy.url + "/data", {"Accept-Encoding": "gzip"})
    assert result.body == compressed
    assert result.values("Content-Encoding") == ["gzip"]
    assert result.values("Content-Length") == [str(len(compressed))]
    assert upstream.requests[0].values("Accept-Encoding") == ["gzip"]


async def test_gzip_request_body_passes_byte_identical(upstream, make_proxy, http):
    compressed = gzip.compress(b"z" * 100_000)
    proxy = await make_proxy(cors=POLICY)
    result = await http.request(
        "POST", proxy.url + "/upload", {"Content-Encoding": "gzip"}, data=compressed
    )
    assert result.status == 200
    (seen,) = await upstream.wait()
    assert seen.body == compressed
    assert seen.values("Content-Encoding") == ["gzip"]


MIB = 1024 * 1024
BIG = 64 * MIB


def _pattern_chunks(total: int, size: int = 256 * 1024):
    block = bytes(range(256)) * (size // 256)
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        yield block[:n]
        sent += n


def _pattern_digest(total: int) -> str:
    digest = hashlib.sha256()
    for chunk in _pattern_chunks(total):
        digest.update(chunk)
    return digest.hexdigest()


async def test_large_streamed_response_arrives_byte_identical(upstream, make_proxy):
    upstream.reply(
        "/big",
        headers=[("Content-Type", "application/octet-stream")],
        chunks=lambda: _pattern_chunks(BIG),
    )
    proxy = await make_proxy(cors=POLICY)
    digest, size = hashlib.sha256(), 0
    async with client_session() as session, session.get(proxy.url + "/big") as resp:
        assert resp.status == 200
        assert "Content-Length" not in resp.headers
        async for chunk in resp.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
    assert size == BIG
    assert digest.hexdigest() == _pattern_digest(BIG)


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
async def test_large_streamed_upload_arrives_byte_identical(upstream, make_proxy, framing):
    upstream.default = Reply(keep_body=False)
    proxy = await make_proxy(cors=POLICY)

    async def body():
        for chunk in _pattern_chunks(BIG):
            yield chunk

    headers = {"Content-Length": str(BIG)} if framing == "content-length" else {}
    async with client_session() as session, session.post(
        proxy.url + "/upload", data=body(), headers=headers
    ) as resp:
        assert resp.status == 200
    (seen,) = await upstream.wait()
    assert seen.complete
    assert seen.body_size == BIG
    assert seen.body_sha256 == _pattern_digest(BIG)
    if framing == "content-length":
        assert seen.values("Content-Length") == [str(BIG)]
    else:
        assert seen.values("Transfer-Encoding") == ["chunked"]


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
async def test_upstream_failing_mid_body_cuts_the_client_connection(upstream, make_proxy, framing):
    headers = [("Content-Type", "application/octet-stream")]
    if framing == "content-length":
        headers.append(("Content-Length", "100000"))
    upstream.reply("/cut", headers=headers, body=b"b" * 100_000, reset_after=1000)
    proxy = await make_proxy(cors=POLICY)
    async with client_session() as session:
        with pytest.raises(aiohttp.ClientPayloadError):
            async with session.get(proxy.url + "/cut") as resp:
                assert resp.status == 200
                await resp.read()
        # The proxy keeps serving.
        async with session.get(proxy.url + "/fine") as resp:
            assert resp.status == 200


async def test_a_pooled_connection_closed_by_the_upstream_is_retried_for_get(
    raw_upstream, make_proxy, http
):
    # The upstream answers the first request on a connection, then closes it when
    # the next one arrives (its keep-alive timer firing at that moment).
    dropped = []

    async def answer(head, reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        dropped.append(await reader.readuntil(b"\r\n\r\n"))

    up = await raw_upstream(answer)
    proxy = await make_proxy(cors=POLICY, upstream_url=up.url)
    first = await http.request("GET", proxy.url + "/1")
    second = await http.request("GET", proxy.url + "/2")
    assert (first.status, second.status) == (200, 200)
    # /2 went out on the pooled connection, was dropped, and went again on a new one.
    assert [h.split(b" ")[1] for h in dropped] == [b"/2"]
    assert [h.split(b" ")[1] for h in up.heads] == [b"/1", b"/2"]
    post = await http.request("POST", proxy.url + "/3", data=b"body")
    assert post.status == 502  # a request with a body is never retried
    assert b"closed the connection without a response" in post.body


async def test_an_early_upstream_answer_before_the_body_is_read_reaches_the_client(
    raw_upstream, make_proxy, http
):
    # An upstream that refuses an upload from its headers alone (e.g. 401), then
    # reads and discards the body before closing (a lingering close, as servers do).
    async def refuse(head, reader, writer):
        writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 7\r\nConnection: close\r\n"
                     b"\r\nsign in")
        await writer.drain()
        await reader.readexactly(4 * MIB)

    up = await raw_upstream(refuse)
    proxy = await make_proxy(cors=POLICY, upstream_url=up.url)
    result = await http.request(
        "PUT", proxy.url + "/upload", {"Origin": APP}, data=io.BytesIO(b"u" * (4 * MIB))
    )
    assert result.status == 401
    assert result.body == b"sign in"
    assert result.cors == ALLOWED
