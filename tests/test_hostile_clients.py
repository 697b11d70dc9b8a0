"""Hostile clients against the real proxy process, over raw loopback sockets.

Every test drives ``python -m corsproxy run --config FILE --log-format json`` in a
subprocess (see ``tests/hostile.py``). Three proxies are shared by the module:

- ``basic``: only long-standing config keys (strict targets, CONNECT, versions,
  Host, smuggling, what the proxy's own answers look like);
- ``limits``: the listen timeouts and ``max_header_size`` set short;
- ``via_nginx``: ``upstream.url`` is an nginx that normalises paths, with a
  ``/internal/`` location the proxy must never let a client reach.

Requests carry ``X-Test-Id``; "never forwarded" is proven with a control request
(:func:`hostile.assert_never_forwarded`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time

import pytest
from conftest import Reply
from hostile import (
    APP,
    EVIL,
    IO,
    Client,
    Gen,
    Nginx,
    assert_cors,
    assert_never_forwarded,
    assert_no_cors,
    assert_no_internal_server_header,
    exchange,
    loop_thread,
    new_id,
    proxy_process,
    raise_nofile,
    recording_upstream,
    request,
    trap_server,
    wait_for,
    wait_recorded,
)

UPSTREAM_BODY = b"hello from upstream\n"  # conftest.Reply's default body

# The limits proxy (new keys); short so the waits are short, and different from
# each other so a test can tell which one fired.
HT = 0.75  # listen.header_timeout
KA = 1.5  # listen.keepalive_timeout
BT = 0.75  # listen.body_timeout
ST = 0.75  # listen.send_timeout
MAX_HEAD = 8192  # listen.max_header_size
UT = 1.25  # upstream.timeout for the limits proxy
MAX_BODY = 1024 * 1024  # listen.max_body_size of the basic proxy
SLACK = 2.0  # how much later than the configured timeout an action may come


@pytest.fixture(scope="module")
def bg():
    with loop_thread() as loop:
        yield loop


@pytest.fixture(scope="module")
def rec(bg):
    with recording_upstream(bg) as server:
        yield server


@pytest.fixture(scope="module")
def trap(bg):
    with trap_server(bg) as server:
        yield server


@pytest.fixture(scope="module")
def basic(rec, tmp_path_factory):
    with proxy_process(
        tmp_path_factory.mktemp("basic"), rec.url,
        listen={"shutdown_grace": 1, "max_body_size": MAX_BODY},
        upstream={"connect_timeout": 1, "timeout": 3},
    ) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def limits(rec, tmp_path_factory):
    raise_nofile(4096)
    with proxy_process(
        tmp_path_factory.mktemp("limits"), rec.url,
        listen={
            "shutdown_grace": 1,
            "header_timeout": HT,
            "keepalive_timeout": KA,
            "body_timeout": BT,
            "send_timeout": ST,
            "max_header_size": MAX_HEAD,
        },
        upstream={"connect_timeout": 1, "timeout": UT},
    ) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def nginx(tmp_path_factory):
    server = Nginx(tmp_path_factory.mktemp("nginx")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def via_nginx(nginx, tmp_path_factory):
    with proxy_process(
        tmp_path_factory.mktemp("via-nginx"), f"http://127.0.0.1:{nginx.port}/v1",
        upstream={"connect_timeout": 1, "timeout": 3},
    ) as proxy:
        yield proxy


def _get(target: str, tid: str, *headers: str, **kw) -> bytes:
    return request("GET", target, f"Origin: {APP}", f"X-Test-Id: {tid}", *headers, **kw)


# ===========================================================================
# 1. strict request targets
# ===========================================================================

#: Dot-segments, literal or percent-encoded, also between %2f-separated segments.
DOT_SEGMENT_TARGETS = [
    "/../internal/admin",
    "/%2e%2e/internal/admin",
    "/%2E%2E/internal/admin",
    "/%2e%2E/internal/admin",
    "/.%2e/internal/admin",
    "/%2e./internal/admin",
    "/a/./b",
    "/a/%2E/b",
    "/a/%2e/b",
    "/public/../admin",
    "/a/b/../../../etc/passwd",
    "/a/..",
    "/a/.",
    "/..",
    "/.",
    "/./",
    "/a/.%2e/b",
    "/a/.%2E/b",
    "/a/%2e./b",
    "/a/%2e%2e",
    "/a%2f..%2fb",
    "/a%2F..%2Fb",
    "/a%2f%2e%2e%2fb",
    "/a%2F.%2Fb",
    "/a/..%2fb",
    "/a%2f../b",
    "/a/%2e%2e%2Fb",
    "/a/../b?x=1",
    "/a/..?x=1",
    "/a/%2e%2e?x=1",
]
#: Backslash-separated: the proxy may reject these in its parser (no CORS then).
BACKSLASH_TARGETS = ["/a\\..\\b", "/a/..\\b", "/a\\.\\b", "/..\\internal/admin", "/a\\%2e%2e\\b"]
#: Dots that are not dot-segments: forwarded byte for byte.
NOT_DOT_SEGMENTS = [
    "/a..b",
    "/.well-known/x",
    "/a/.../b",
    "/a/b.",
    "/a/b..",
    "/...",
    "/a/..b/c",
    "/a/b../c",
    "/.a/b",
    "/a/.b",
    "/a/%2ea",
    "/a/%2e%2e%2e/b",
    "/?x=../..",
    "/a?x=/../&y=%2e%2e",
    "/a/b?x=..%2f..",
    "/a?./b",
]


@pytest.mark.parametrize("target", DOT_SEGMENT_TARGETS)
async def test_dot_segment_target_is_400_with_cors_and_never_forwarded(basic, rec, target):
    tid = new_id()
    response, _ = await exchange(basic.port, _get(target, tid))
    assert response is not None and response.status == 400, response
    assert response.raw_head.startswith(b"HTTP/1.1 400 "), response
    assert_cors(response)
    await assert_never_forwarded(basic.port, rec, tid)


@pytest.mark.parametrize("target", BACKSLASH_TARGETS)
async def test_backslash_separated_dot_segment_is_400_and_never_forwarded(basic, rec, target):
    tid = new_id()
    response, _ = await exchange(basic.port, _get(target, tid))
    assert response is not None and response.status == 400, response
    assert response.raw_head.startswith(b"HTTP/1.1 400 "), response
    # A parser-level 400 may carry no CORS headers; if it does, they are right.
    assert response.cors in ({}, {"access-control-allow-origin": APP}), response
    await assert_never_forwarded(basic.port, rec, tid)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
@pytest.mark.parametrize("target", ["/api/../internal/admin", "/api/%2e%2e/internal"])
async def test_dot_segment_is_400_for_every_method(basic, rec, method, target):
    tid = new_id()
    body = b"" if method in ("HEAD", "OPTIONS", "DELETE") else b"x=1"
    extra = [f"Content-Length: {len(body)}"] if body else []
    data = request(method, target, f"Origin: {APP}", f"X-Test-Id: {tid}", *extra, body=body)
    response, _ = await exchange(basic.port, data, method=method)
    assert response is not None and response.status == 400, response
    assert_cors(response)
    if method == "HEAD":
        assert response.body == b""
    await assert_never_forwarded(basic.port, rec, tid)


@pytest.mark.parametrize("origin", [None, EVIL, "null"])
async def test_dot_segment_without_an_allowed_origin_is_400_without_cors(basic, rec, origin):
    tid = new_id()
    headers = [f"X-Test-Id: {tid}"] + ([f"Origin: {origin}"] if origin else [])
    response, _ = await exchange(basic.port, request("GET", "/x/../internal", *headers))
    assert response is not None and response.status == 400, response
    assert_no_cors(response)
    await assert_never_forwarded(basic.port, rec, tid)


@pytest.mark.parametrize("target", NOT_DOT_SEGMENTS)
async def test_dots_that_are_no_dot_segment_are_forwarded_byte_for_byte(basic, rec, target):
    tid = new_id()
    response, _ = await exchange(basic.port, _get(target, tid, "Connection: close"))
    assert response is not None and response.status == 200, response
    assert response.body == UPSTREAM_BODY
    assert_cors(response)
    (seen,) = await wait_recorded(rec, tid)
    assert seen.raw_path == target


#: Targets that climb from /v1 to nginx's /internal/ once nginx normalises them.
CLIMBING = [
    "/../internal/admin",
    "/%2e%2e/internal/admin",
    "/%2E%2E/internal/admin",
    "/.%2e/internal/admin",
    "/%2e./internal/admin",
    "/x/../../internal/admin",
    "/./../internal/admin",
    "/../internal/admin?x=1",
    "/%2e%2e/%2e%2e/internal/admin",
    "/..%2finternal/admin",
    "/..%2Finternal/admin",
    "/%2e%2e%2finternal/admin",
    "/x%2f..%2f..%2finternal/admin",
    "/..\\internal/admin",
    "/x/%2e%2e/%2E%2E/internal/admin",
]


async def test_the_nginx_upstream_really_normalises_the_climbing_targets(nginx):
    """The hazard is real: straight to nginx, most variants reach "secret"."""
    leaking = []
    for target in CLIMBING:
        response, _ = await exchange(nginx.port, request("GET", "/v1" + target,
                                                         "Connection: close"))
        if response is not None and response.body == b"secret":
            leaking.append(target)
    assert len(leaking) >= 8, leaking
    response, _ = await exchange(nginx.port, request("GET", "/v1/x", "Connection: close"))
    assert response is not None and response.body == b"v1"


@pytest.mark.parametrize("target", list(dict.fromkeys(CLIMBING + DOT_SEGMENT_TARGETS)))
async def test_no_dot_segment_variant_reaches_the_upstreams_internal_location(via_nginx, target):
    response, _ = await exchange(via_nginx.port, request("GET", target, f"Origin: {APP}",
                                                         "Connection: close"))
    assert response is not None, "no response"
    assert b"secret" not in response.body, response
    assert response.status == 400, response
    # The proxy's own 400, not nginx's answer to a path climbing above its root.
    assert b"nginx" not in response.body.lower(), response
    assert not any("nginx" in v.lower() for v in response.values("Server")), response


async def test_ordinary_paths_through_nginx_work(via_nginx):
    for target in ("/x", "/x/y?z=1", "/.well-known/a", "/a..b"):
        response, _ = await exchange(via_nginx.port, request("GET", target, "Connection: close"))
        assert response is not None and response.status == 200 and response.body == b"v1", (
            target, response)


@pytest.mark.parametrize(
    "form",
    [
        "http://127.0.0.1:{trap}/x",
        "https://127.0.0.1:{trap}/x",
        "http://evil.example/x",
        "http://user:pw@127.0.0.1:{trap}/x",
        "//127.0.0.1:{trap}/x",
        "//evil.example/x",
    ],
)
async def test_absolute_and_scheme_relative_targets_reach_only_the_configured_upstream(
    basic, rec, trap, form
):
    target = form.format(trap=trap.port)
    authority = target.split("//", 1)[1].split("/", 1)[0].rpartition("@")[2]
    tid = new_id()
    data = _get(target, tid, "Connection: close", host=authority.encode())
    response, _ = await exchange(basic.port, data)
    assert response is not None and response.status == 200, response
    assert response.body == UPSTREAM_BODY
    (seen,) = await wait_recorded(rec, tid)
    assert seen.raw_path.endswith("/x"), seen.raw_path
    await asyncio.sleep(0.1)
    assert trap.connections == 0, "the proxy connected to the host named in the request"


# ===========================================================================
# 2. CONNECT and OPTIONS *
# ===========================================================================


@pytest.mark.parametrize("authority", ["example.com:443", "127.0.0.1:{trap}", "[::1]:443",
                                       "app.example.com:80"])
async def test_connect_is_405_with_allow_never_forwarded_and_closed(basic, rec, trap, authority):
    authority = authority.format(trap=trap.port)
    tid = new_id()
    tunnel = request("GET", f"/smuggled-{tid}", f"X-Test-Id: {tid}")
    data = request("CONNECT", authority, f"X-Test-Id: {tid}", host=authority.encode()) + tunnel
    response, ending = await exchange(basic.port, data, then_eof=True)
    assert response is not None and response.status == 405, response
    assert response.raw_head.startswith(b"HTTP/1.1 405 "), response
    (allow,) = response.values("Allow")
    methods = {m.strip().upper() for m in allow.split(",")}
    assert "GET" in methods and "CONNECT" not in methods, allow
    assert ending in ("eof", "reset")
    await assert_never_forwarded(basic.port, rec, tid)
    assert trap.connections == 0


@pytest.mark.parametrize(
    "headers",
    [(), (f"Origin: {APP}",), (f"Origin: {APP}", "Access-Control-Request-Method: GET"),
     ("Max-Forwards: 0",)],
    ids=["plain", "origin", "preflight", "max-forwards"],
)
async def test_options_asterisk_is_400_and_never_forwarded(basic, rec, headers):
    tid = new_id()
    data = request("OPTIONS", "*", f"X-Test-Id: {tid}", *headers)
    response, _ = await exchange(basic.port, data)
    assert response is not None and response.status == 400, response
    assert response.raw_head.startswith(b"HTTP/1.1 400 ")
    await assert_never_forwarded(basic.port, rec, tid)


# ===========================================================================
# 3. HTTP versions
# ===========================================================================


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/3.0", b"HTTP/0.9", b"HTTP/1.2"])
@pytest.mark.parametrize("method", ["GET", "POST", "OPTIONS"])
async def test_unsupported_version_is_505_in_http_1_1(basic, rec, version, method):
    tid = new_id()
    if method == "POST":
        data = request("POST", "/v", f"X-Test-Id: {tid}", "Content-Length: 5", version=version,
                       body=b"hello")
    elif method == "OPTIONS":  # a preflight
        data = request("OPTIONS", "/v", f"X-Test-Id: {tid}", f"Origin: {APP}",
                       "Access-Control-Request-Method: PUT", version=version)
    else:
        data = request("GET", "/v", f"X-Test-Id: {tid}", f"Origin: {APP}", version=version)
    response, _ = await exchange(basic.port, data, method=method)
    assert response is not None and response.status == 505, response
    assert response.raw_head.startswith(b"HTTP/1.1 505 "), response
    await assert_never_forwarded(basic.port, rec, tid)


@pytest.mark.parametrize("line", [b"GET /{tid}", b"GET /{tid}/index.html", b"GET /{tid}?y=1"])
async def test_http_0_9_request_line_gets_an_http_1_1_400_and_close(basic, rec, line):
    tid = new_id()
    data = line.replace(b"{tid}", tid.encode()) + b"\r\n\r\n"
    response, ending = await exchange(basic.port, data, method="GET", timeout=3, then_eof=True)
    assert response is not None, "closed without an answer"
    assert response.raw_head.startswith(b"HTTP/1.1 400 "), response
    assert ending in ("eof", "reset")
    await assert_never_forwarded(basic.port, rec, tid)


# ===========================================================================
# 4. HTTP/1.0 with Transfer-Encoding
# ===========================================================================


@pytest.mark.parametrize(
    ("method", "headers", "body"),
    [
        ("POST", ("Transfer-Encoding: chunked",), b"5\r\nhello\r\n0\r\n\r\n"),
        ("GET", ("Transfer-Encoding: chunked",), b"0\r\n\r\n"),
        ("POST", ("Transfer-Encoding: chunked", "Connection: keep-alive"),
         b"5\r\nhello\r\n0\r\n\r\n"),
        ("PUT", ("Transfer-Encoding: gzip, chunked",), b"0\r\n\r\n"),
        ("POST", (f"Origin: {APP}", "Transfer-Encoding: chunked"), b"0\r\n\r\n"),
    ],
    ids=["post", "get", "keep-alive", "gzip-chunked", "with-origin"],
)
async def test_http_1_0_with_transfer_encoding_is_400_and_closed(basic, rec, method, headers,
                                                                 body):
    tid = new_id()
    data = request(method, "/te10", f"X-Test-Id: {tid}", *headers, version=b"HTTP/1.0",
                   body=body)
    response, ending = await exchange(basic.port, data, then_eof=True)
    assert response is not None and response.status == 400, response
    assert response.raw_head.startswith(b"HTTP/1.1 400 "), response
    assert ending in ("eof", "reset")
    await assert_never_forwarded(basic.port, rec, tid)


# ===========================================================================
# 5. Host
# ===========================================================================

BAD_HOSTS = {
    "space": [b"Host: a b"],
    "slash": [b"Host: evil/x"],
    "url": [b"Host: http://evil.example/"],
    "userinfo": [b"Host: a@b"],
    "non-numeric-port": [b"Host: a:b"],
    "two-ports": [b"Host: a:80:80"],
    "empty": [b"Host: "],
    "blank": [b"Host:    "],
    "two-different": [b"Host: a.example", b"Host: b.example"],
    "two-equal": [b"Host: a.example", b"Host: a.example"],
    "missing": [],
}


@pytest.mark.parametrize("lines", list(BAD_HOSTS.values()), ids=list(BAD_HOSTS))
async def test_bad_host_is_400_with_cors_and_never_forwarded(basic, rec, lines):
    tid = new_id()
    data = request("GET", "/h", *lines, f"Origin: {APP}", f"X-Test-Id: {tid}", host=None)
    response, _ = await exchange(basic.port, data)
    assert response is not None and response.status == 400, response
    assert response.raw_head.startswith(b"HTTP/1.1 400 ")
    assert_cors(response)
    await assert_never_forwarded(basic.port, rec, tid)


@pytest.mark.parametrize(
    ("host", "version"),
    [
        (b"example.com", b"HTTP/1.1"),
        (b"example.com:8080", b"HTTP/1.1"),
        (b"[::1]:8080", b"HTTP/1.1"),
        (b"[::1]", b"HTTP/1.1"),
        (b"127.0.0.1", b"HTTP/1.1"),
        (b"Example.COM", b"HTTP/1.1"),
        (b"example.com.", b"HTTP/1.1"),
        (None, b"HTTP/1.0"),
        (b"example.com", b"HTTP/1.0"),
    ],
)
async def test_valid_host_is_forwarded(basic, rec, host, version):
    tid = new_id()
    data = request("GET", "/h", f"Origin: {APP}", f"X-Test-Id: {tid}", "Connection: close",
                   host=host, version=version)
    response, _ = await exchange(basic.port, data)
    assert response is not None and response.status == 200, response
    assert response.body == UPSTREAM_BODY
    assert_cors(response)
    await wait_recorded(rec, tid)


# ===========================================================================
# 14. request smuggling classics
# ===========================================================================


def _smuggle(tid: str, head_lines: list[bytes], body: bytes, start: bytes = b"POST") -> bytes:
    """A request carrying ``tid``, then a second, smuggled request for /smuggled-<tid>."""
    first = b"\r\n".join(
        [start + b" /first-" + tid.encode() + b" HTTP/1.1", b"Host: h",
         b"X-Test-Id: " + tid.encode(), *head_lines]
    ) + b"\r\n\r\n" + body
    second = b"GET /smuggled-" + tid.encode() + b" HTTP/1.1\r\nHost: h\r\nX-Test-Id: " \
        + tid.encode() + b"\r\n\r\n"
    return first + second


SMUGGLING = {
    "cl-and-te": ([b"Content-Length: 4", b"Transfer-Encoding: chunked"], b"0\r\n\r\n"),
    "te-and-cl": ([b"Transfer-Encoding: chunked", b"Content-Length: 40"], b"0\r\n\r\n"),
    "cl-and-te-identity-chunked": ([b"Content-Length: 5", b"Transfer-Encoding: identity, chunked"],
                                   b"0\r\n\r\n"),
    "two-content-lengths": ([b"Content-Length: 5", b"Content-Length: 6"], b"hello!"),
    "content-length-list": ([b"Content-Length: 5, 6"], b"hello!"),
    "te-chunked-identity": ([b"Transfer-Encoding: chunked, identity"], b"0\r\n\r\n"),
    "te-two-lines": ([b"Transfer-Encoding: chunked", b"Transfer-Encoding: identity"],
                     b"0\r\n\r\n"),
    "te-xchunked": ([b"Transfer-Encoding: xchunked"], b"0\r\n\r\n"),
    "te-chunked-with-space-before-colon": ([b"Transfer-Encoding : chunked", b"Content-Length: 5"],
                                           b"0\r\n\r\n"),
    "space-before-colon": ([b"X-A : b", b"Content-Length: 0"], b""),
    "tab-before-colon": ([b"Content-Length\t: 0"], b""),
    "obs-fold": ([b"X-A: a", b" folded", b"Content-Length: 0"], b""),
    "obs-fold-te": ([b"Content-Length: 5", b"Transfer-Encoding: identity", b" chunked"],
                    b"0\r\n\r\n"),
    "nul-in-value": ([b"X-A: a\x00b", b"Content-Length: 0"], b""),
    "nul-in-te": ([b"Transfer-Encoding: chunked\x00", b"Content-Length: 5"], b"0\r\n\r\n"),
}


@pytest.mark.parametrize(("lines", "body"), list(SMUGGLING.values()), ids=list(SMUGGLING))
async def test_ambiguous_framing_is_400_closed_and_never_forwarded(basic, rec, lines, body):
    tid = new_id()
    response, ending = await exchange(basic.port, _smuggle(tid, lines, body), method="POST",
                                      then_eof=True)
    assert response is not None and response.status == 400, response
    assert response.raw_head.startswith(b"HTTP/1.1 400 "), response
    assert ending in ("eof", "reset")
    await assert_never_forwarded(basic.port, rec, tid)


@pytest.mark.parametrize(
    "data",
    [
        b"GET /first-{tid} HTTP/1.1\nHost: h\nX-Test-Id: {tid}\n\n",
        b"GET /first-{tid} HTTP/1.1\r\nHost: h\nX-Test-Id: {tid}\r\n\r\n",
        b"GET /first-{tid} HTTP/1.1\nHost: h\r\nX-Test-Id: {tid}\r\n\r\n",
        b"POST /first-{tid} HTTP/1.1\r\nHost: h\r\nX-Test-Id: {tid}\r\nContent-Length: 0\n\n"
        b"GET /smuggled-{tid} HTTP/1.1\r\nHost: h\r\nX-Test-Id: {tid}\r\n\r\n",
    ],
    ids=["all-lf", "lf-after-host", "lf-after-request-line", "lf-before-smuggled"],
)
async def test_bare_lf_line_ends_are_400_closed_and_never_forwarded(basic, rec, data):
    tid = new_id()
    response, ending = await exchange(basic.port, data.replace(b"{tid}", tid.encode()),
                                      then_eof=True)
    assert response is not None and response.status == 400, response
    assert response.raw_head.startswith(b"HTTP/1.1 400 "), response
    assert ending in ("eof", "reset")
    await assert_never_forwarded(basic.port, rec, tid)


@pytest.mark.parametrize(
    "chunks",
    [b"zz\r\nhello\r\n0\r\n\r\n", b"-5\r\nhello\r\n0\r\n\r\n", b"0x5\r\nhello\r\n0\r\n\r\n",
     b"+5\r\nhello\r\n0\r\n\r\n", b"ffffffffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
     b"5 5\r\nhello\r\n0\r\n\r\n", b"\r\nhello\r\n0\r\n\r\n"],
    ids=["letters", "negative", "0x-prefix", "plus-sign", "overflow", "two-numbers", "empty"],
)
async def test_invalid_chunk_size_is_400_closed_and_no_complete_request_forwarded(
    basic, rec, chunks
):
    tid = new_id()
    data = _smuggle(tid, [b"Transfer-Encoding: chunked"], chunks)
    response, ending = await exchange(basic.port, data, method="POST", then_eof=True)
    assert response is not None and response.status == 400, response
    assert response.raw_head.startswith(b"HTTP/1.1 400 "), response
    assert ending in ("eof", "reset")
    # The head may have been streamed upstream before the body broke; then the
    # upstream must have seen the connection drop, never a complete request.
    await assert_never_forwarded(basic.port, rec, tid, allow_incomplete=True)


# ===========================================================================
# 413 (basic proxy: listen.max_body_size 1 MiB)
# ===========================================================================


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_body_over_max_body_size_is_413_with_cors_and_never_complete_upstream(
    basic, rec, framing
):
    tid = new_id()
    body = os.urandom(2 * MAX_BODY)
    if framing == "chunked":
        headers = ["Transfer-Encoding: chunked"]
        wire = b"".join(b"%x\r\n%s\r\n" % (65536, body[i:i + 65536])
                        for i in range(0, len(body), 65536)) + b"0\r\n\r\n"
    else:
        headers, wire = [f"Content-Length: {len(body)}"], body
    async with await Client.open(basic.port) as client:
        await client.send(request("POST", "/upload", f"Origin: {APP}", f"X-Test-Id: {tid}",
                                  *headers))
        sender = asyncio.create_task(client.send_quietly(wire, timeout=10))
        try:
            response = await client.response("POST")
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
    assert response is not None and response.status == 413, response
    assert response.raw_head.startswith(b"HTTP/1.1 413 "), response
    assert_cors(response)
    await assert_never_forwarded(basic.port, rec, tid, allow_incomplete=True)


# ===========================================================================
# 11. the proxy's own answers do not advertise its internals
# ===========================================================================

OWN_ANSWERS = {
    "preflight-allowed": request("OPTIONS", "/p", f"Origin: {APP}",
                                 "Access-Control-Request-Method: PUT"),
    "preflight-allowed-close": request("OPTIONS", "/p", f"Origin: {APP}",
                                       "Access-Control-Request-Method: PUT", "Connection: close"),
    "preflight-denied": request("OPTIONS", "/p", f"Origin: {EVIL}",
                                "Access-Control-Request-Method: PUT"),
    "bad-host": request("GET", "/", f"Origin: {APP}", host=b"a b"),
    "no-host": request("GET", "/", f"Origin: {APP}", host=None),
    "dot-segment": request("GET", "/a/../b", f"Origin: {APP}"),
    "garbage": b"GARBAGE\r\n\r\n",
    "nul": b"GET / HTTP/1.1\r\nHost: h\r\nX: \x00\r\n\r\n",
    "connect": request("CONNECT", "example.com:443", host=b"example.com:443"),
    "http2": request("GET", "/", version=b"HTTP/2.0"),
}


@pytest.mark.parametrize("data", list(OWN_ANSWERS.values()), ids=list(OWN_ANSWERS))
async def test_the_proxys_own_answers_name_no_aiohttp_or_python(basic, data):
    response, _ = await exchange(basic.port, data)
    assert response is not None, "no answer"
    assert response.raw_head.startswith(b"HTTP/1.1 "), response
    assert_no_internal_server_header(response)
    assert b"aiohttp" not in response.body.lower() and b"python" not in response.body.lower()


# ===========================================================================
# 6. timeouts (limits proxy)
# ===========================================================================


def _assert_408_or_nothing(data: bytes) -> None:
    """What a timed-out head may get before the close: nothing, or one 408."""
    if data:
        assert data.startswith(b"HTTP/1.1 408 "), data[:300]


@pytest.mark.parametrize(
    "sent",
    [b"", b"\r\n", b"G", b"GET / HTTP/1.1\r\n", b"GET / HTTP/1.1\r\nHost: h\r\n",
     b"GET / HTTP/1.1\r\nHost: h\r\nX-A: b\r\n\r"],
    ids=["nothing", "crlf", "one-byte", "request-line", "some-headers", "almost-all"],
)
async def test_incomplete_head_is_closed_after_header_timeout(limits, sent):
    async with await Client.open(limits.port) as client:
        if sent:
            await client.send(sent)
        data, _, elapsed = await client.wait_closed(HT + SLACK)
    _assert_408_or_nothing(data)
    assert elapsed >= 0.8 * HT, f"closed after {elapsed:.2f} s, before header_timeout"


@pytest.mark.parametrize("interval", [0.2, 0.05])
async def test_head_dribbled_byte_by_byte_is_cut_after_header_timeout(limits, interval):
    head = b"GET /dribble HTTP/1.1\r\nHost: h\r\nX-Long: " + b"a" * 400 + b"\r\n\r\n"
    async with await Client.open(limits.port) as client:

        async def dribble() -> None:
            for i in range(len(head)):
                if not await client.send_quietly(head[i:i + 1], timeout=1):
                    return
                await asyncio.sleep(interval)

        sender = asyncio.create_task(dribble())
        try:
            data, _, elapsed = await client.wait_closed(HT + SLACK)
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
    _assert_408_or_nothing(data)
    assert elapsed >= 0.8 * HT, f"closed after {elapsed:.2f} s, before header_timeout"


@pytest.mark.parametrize("exchanges", [["GET"], ["POST"], ["GET", "POST", "GET"]])
async def test_idle_keep_alive_connection_is_closed_silently_after_keepalive_timeout(
    limits, rec, exchanges
):
    tid = new_id()
    async with await Client.open(limits.port) as client:
        for method in exchanges:
            body = b"payload" if method == "POST" else b""
            extra = [f"Content-Length: {len(body)}"] if body else []
            await client.send(request(method, "/ka", f"X-Test-Id: {tid}", *extra, body=body))
            response = await client.response(method)
            assert response is not None and response.status == 200, response
        idle_from = time.monotonic()
        data, _, _ = await client.wait_closed(KA + SLACK)
        idle = time.monotonic() - idle_from
    assert data == b"", f"an idle keep-alive close must be silent, got {data[:200]!r}"
    assert idle >= 0.8 * KA, f"closed after {idle:.2f} s idle, before keepalive_timeout"


async def test_keep_alive_connection_idle_longer_than_header_timeout_still_serves(limits, rec):
    """header_timeout runs from the next request's first byte, not from the idle start."""
    tid = new_id()
    async with await Client.open(limits.port) as client:
        await client.send(request("GET", "/ka1", f"X-Test-Id: {tid}"))
        first = await client.response()
        assert first is not None and first.status == 200, first
        await asyncio.sleep(HT + 0.3)  # below keepalive_timeout
        assert HT + 0.3 < 0.8 * KA
        await client.send(request("GET", "/ka2", f"X-Test-Id: {tid}", f"Origin: {APP}"))
        second = await client.response()
        assert second is not None and second.status == 200, second
        assert_cors(second)
    await wait_recorded(rec, tid, count=2)


@pytest.mark.parametrize(
    ("headers", "sent"),
    [
        (["Content-Length: 1000"], b"0123456789"),
        (["Content-Length: 1000"], b""),
        (["Content-Length: 100000"], b"x" * 65536),
        (["Transfer-Encoding: chunked"], b"a\r\n0123456789\r\n"),
        (["Transfer-Encoding: chunked"], b"a\r\n01234"),
        (["Transfer-Encoding: chunked"], b""),
    ],
    ids=["cl-10-bytes", "cl-nothing", "cl-64k", "chunked-one-chunk", "chunked-half-chunk",
         "chunked-nothing"],
)
async def test_stalled_request_body_gets_408_with_cors_and_close(limits, rec, headers, sent):
    tid = new_id()
    head = request("POST", "/stall", f"Origin: {APP}", f"X-Test-Id: {tid}", *headers)
    async with await Client.open(limits.port) as client:
        await client.send(head + sent)
        stalled = time.monotonic()
        response = await client.response("POST", timeout=BT + SLACK)
        waited = time.monotonic() - stalled
        assert response is not None and response.status == 408, response
        assert response.raw_head.startswith(b"HTTP/1.1 408 "), response
        assert_cors(response)
        assert waited >= 0.8 * BT, f"408 after {waited:.2f} s, before body_timeout"
        if response.ending is None:
            await client.wait_closed(SLACK)
    # The upstream never got a complete request (at most a head and a dropped body).
    await assert_never_forwarded(limits.port, rec, tid, allow_incomplete=True)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_slow_but_steady_upload_is_not_cut(limits, rec, framing):
    tid = new_id()
    # One piece every 0.3 s: 1.5 s in all, longer than body_timeout and upstream.timeout.
    pieces = [os.urandom(1000) for _ in range(5)]
    body = b"".join(pieces)
    if framing == "chunked":
        head = request("POST", "/slow-up", f"Origin: {APP}", f"X-Test-Id: {tid}",
                       "Transfer-Encoding: chunked")
        wire = [b"%x\r\n%s\r\n" % (len(p), p) for p in pieces]
        wire[-1] += b"0\r\n\r\n"
    else:
        head = request("POST", "/slow-up", f"Origin: {APP}", f"X-Test-Id: {tid}",
                       f"Content-Length: {len(body)}")
        wire = list(pieces)
    async with await Client.open(limits.port) as client:
        await client.send(head)
        for piece in wire:
            await asyncio.sleep(0.3)
            await client.send(piece)
        response = await client.response("POST", timeout=UT + SLACK)
    assert response is not None and response.status == 200, response
    assert_cors(response)
    (seen,) = await wait_recorded(rec, tid)
    assert seen.complete and seen.body == body


def _big(path: str, rec, total: int = 64 * 1024 * 1024) -> Gen:
    gen = Gen(total)
    rec.reply(path, Reply(headers=[("Content-Type", "application/octet-stream"),
                                   ("Content-Length", str(total))], chunks=gen))
    return gen


@pytest.mark.parametrize("read_first", [0, 1024 * 1024], ids=["never-reads", "reads-1mib"])
async def test_client_that_stops_reading_is_aborted_after_send_timeout(limits, rec, read_first):
    path = f"/big-{new_id()}"
    gen = _big(path, rec)
    async with await Client.open(limits.port, rcvbuf=65536, limit=65536) as client:
        await client.send(request("GET", path))
        sent = time.monotonic()
        while len(client.buf) < read_first:
            assert await client.read_some(IO)
        # Now read nothing. The proxy must give up on this client and drop the
        # upstream connection (the upstream's writes fail) about send_timeout later.
        await wait_for(lambda: gen.stopped_at is not None, ST + 6,
                       "the upstream connection was dropped after send_timeout")
        assert gen.stopped_at - sent <= ST + 5
        data, ending, _ = await client.wait_closed(10)
        received = len(client.buf) + len(data)
    assert gen.produced < gen.total
    assert ending in ("eof", "reset")
    assert received < 64 * 1024 * 1024, "the whole body arrived: nothing was aborted"


async def test_client_that_reads_slowly_but_steadily_is_not_cut(limits, rec):
    path = f"/big-{new_id()}"
    gen = _big(path, rec)
    async with await Client.open(limits.port, rcvbuf=65536, limit=32768) as client:
        await client.send(request("GET", path))
        got = 0
        started = time.monotonic()
        while time.monotonic() - started < ST + 1.0:  # longer than send_timeout
            await asyncio.sleep(0.1)  # about 300 KiB/s, never a pause near send_timeout
            chunk = await asyncio.wait_for(client.reader.read(32768), IO)
            assert chunk, "the proxy closed a connection whose client was reading"
            got += len(chunk)
    assert gen.stopped_at is None or gen.stopped_at > started + ST + 1.0, (
        f"the upstream connection was dropped {gen.stopped_at - started:.2f} s in")
    assert got > 256 * 1024


def _socket_state(sock: socket.socket) -> str:
    """"open", "closed" (EOF or reset) without blocking; a 408 before the close is fine."""
    while True:
        try:
            data = sock.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return "open"
        except ConnectionError:
            return "closed"
        if not data:
            return "closed"
        assert data.startswith(b"HTTP/1.1 408 ") or b"HTTP/1.1" not in data, data[:200]


async def test_a_thousand_silent_connections_neither_block_service_nor_outlive_header_timeout(
    limits, rec
):
    soft = raise_nofile(4096)
    count = min(1000, soft - 200)
    if count < 100:
        pytest.skip(f"RLIMIT_NOFILE allows only {soft} descriptors")

    def open_all() -> list[tuple[socket.socket, float]]:
        out = []
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", limits.port), timeout=5)
            sock.setblocking(False)
            out.append((sock, time.monotonic()))
        return out

    socks = await asyncio.to_thread(open_all)
    try:
        tid = new_id()
        started = time.monotonic()
        response, _ = await exchange(limits.port, request("GET", "/alive", f"X-Test-Id: {tid}",
                                                          "Connection: close"), timeout=1.0)
        assert response is not None and response.status == 200, response
        assert time.monotonic() - started < 1.0
        closed_at: dict[int, float] = {}
        deadline = socks[-1][1] + HT + SLACK + 1.0
        while len(closed_at) < count and time.monotonic() < deadline:
            for i, (sock, _) in enumerate(socks):
                if i not in closed_at and _socket_state(sock) == "closed":
                    closed_at[i] = time.monotonic()
            await asyncio.sleep(0.05)
        assert len(closed_at) == count, f"{count - len(closed_at)} of {count} still open"
        early = [closed_at[i] - opened for i, (_, opened) in enumerate(socks)
                 if closed_at[i] - opened < 0.8 * HT - 0.06]
        assert not early, f"{len(early)} closed before header_timeout, e.g. {early[:3]}"
    finally:
        for sock, _ in socks:
            sock.close()


# ===========================================================================
# 7. max_header_size (limits proxy)
# ===========================================================================


async def _send_and_read(port: int, data: bytes, timeout: float = 5.0):
    """Send ``data`` (in the background: the proxy may answer and close before all
    of it is sent) and read one response, then wait for the close."""
    async with await Client.open(port) as client:
        sender = asyncio.create_task(client.send_quietly(data, timeout))
        try:
            response = await client.response(timeout=timeout)
            ending = response.ending if response is not None else client.ending
            if response is not None and ending is None:
                _, ending, _ = await client.wait_closed(SLACK + 1)
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
    return response, ending


OVERSIZED_HEADS = {
    "one-header": request("GET", "/big", "X-Big: " + "a" * (MAX_HEAD + 200)),
    "many-headers": request("GET", "/big", *(f"X-H{i}: {'b' * 240}" for i in range(40))),
    "long-target": request("GET", "/" + "c" * (MAX_HEAD + 200)),
    "long-origin": request("GET", "/big", "Origin: https://" + "d" * (MAX_HEAD + 200)),
    "one-mb-header": request("GET", "/big", "X-Big: " + "e" * (1 << 20)),
    "one-mb-unfinished": b"GET /big HTTP/1.1\r\nHost: h\r\nX-Big: " + b"f" * (1 << 20),
}


@pytest.mark.parametrize("data", list(OVERSIZED_HEADS.values()), ids=list(OVERSIZED_HEADS))
async def test_head_over_max_header_size_is_431_and_closed(limits, data):
    response, ending = await _send_and_read(limits.port, data)
    assert response is not None and response.status == 431, response
    assert response.raw_head.startswith(b"HTTP/1.1 431 "), response
    assert ending in ("eof", "reset")


def _head_of_size(size: int, tid: str, many: bool) -> bytes:
    base = request("GET", "/under", f"X-Test-Id: {tid}", "Connection: close")
    room = size - len(base)
    if many:
        lines = []
        while room > 0:
            take = min(200, room - len("X-F000: \r\n"))
            if take <= 0:
                break
            line = f"X-F{len(lines):03d}: " + "g" * take
            lines.append(line)
            room -= len(line) + 2
        return request("GET", "/under", f"X-Test-Id: {tid}", "Connection: close", *lines)
    return request("GET", "/under", f"X-Test-Id: {tid}", "Connection: close",
                   "X-Fill: " + "h" * (room - len("X-Fill: \r\n")))


@pytest.mark.parametrize("many", [False, True], ids=["one-header", "many-headers"])
async def test_head_just_under_max_header_size_is_forwarded(limits, rec, many):
    tid = new_id()
    data = _head_of_size(MAX_HEAD - 300, tid, many)
    assert MAX_HEAD - 320 < len(data) <= MAX_HEAD - 300
    response, _ = await exchange(limits.port, data)
    assert response is not None and response.status == 200, response
    (seen,) = await wait_recorded(rec, tid)
    sent = [tuple(line.split(": ", 1)) for line in data.decode().split("\r\n")
            if line.startswith("X-F")]
    assert sent and all(pair in seen.headers for pair in sent), "the filler did not arrive whole"


async def test_300_unfinished_megabyte_heads_do_not_grow_memory(limits, rec):
    blob = b"GET /mem HTTP/1.1\r\nHost: h\r\nX-Big: " + b"m" * (1 << 20)
    baseline = limits.rss_kib()
    peak = baseline
    stop = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, limits.rss_kib())
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    clients: list[Client] = []
    try:
        opened = await asyncio.gather(*(Client.open(limits.port) for _ in range(300)),
                                      return_exceptions=True)
        clients = [c for c in opened if isinstance(c, Client)]
        assert len(clients) == 300, [e for e in opened if not isinstance(e, Client)][:3]
        await asyncio.gather(*(c.send_quietly(blob, timeout=3) for c in clients))
        await asyncio.sleep(0.3)
        tid = new_id()
        response, _ = await exchange(limits.port, request("GET", "/after-mem", f"X-Test-Id: {tid}",
                                                          "Connection: close"))
        assert response is not None and response.status == 200, response
    finally:
        stop.set()
        await sampler
        await asyncio.gather(*(c.aclose() for c in clients))
    grown = (peak - baseline) / 1024
    assert grown <= 64, f"the proxy's RSS grew by {grown:.0f} MiB for 300 x 1 MiB unfinished heads"
