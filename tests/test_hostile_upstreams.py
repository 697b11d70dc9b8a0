"""Hostile and broken upstreams behind the real proxy process, over raw sockets.

Every test drives ``python -m corsproxy run --config FILE --log-format json`` in a
subprocess (see ``tests/hostile.py``); the upstreams are hand-written HTTP
(:class:`hostile.ScriptedUpstream`: one handler per path, registered by the test)
or ``conftest.RecordingUpstream``, on a background event loop.

Shared by the module: ``proxy`` (in front of a scripted upstream, upstream.timeout
1 s), ``reuse`` (its own scripted upstream, used one request at a time, for the
connection-reuse tests), ``refused`` (an upstream port nothing listens on) and
``pool`` (upstream.max_connections 2). The shutdown tests start their own proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import os
import signal
import time

import pytest
from conftest import free_port
from hostile import (
    APP,
    EVIL,
    IO,
    Client,
    ProxyProcess,
    RawRequest,
    assert_cors,
    assert_no_cors,
    assert_no_internal_server_header,
    exchange,
    loop_thread,
    new_id,
    proxy_process,
    read_request_body,
    recorded_with,
    recording_upstream,
    request,
    reset,
    scripted_upstream,
    wait_for,
    wait_recorded,
)

UT = 0.75  # upstream.timeout of the shared proxy
CT = 0.5  # upstream.connect_timeout
SLACK = 2.0
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def bg():
    with loop_thread() as loop:
        yield loop


@pytest.fixture(scope="module")
def scripted(bg):
    # A small receive buffer, so an upstream that stops reading makes the proxy
    # wait after a few MiB rather than after the kernel's 32 MiB.
    with scripted_upstream(bg, rcvbuf=65536) as server:
        yield server


@pytest.fixture(scope="module")
def proxy(scripted, tmp_path_factory):
    with proxy_process(
        tmp_path_factory.mktemp("scripted"), scripted.url,
        listen={"shutdown_grace": 1}, upstream={"connect_timeout": CT, "timeout": UT},
    ) as process:
        yield process


@pytest.fixture(scope="module")
def reuse_upstream(bg):
    with scripted_upstream(bg) as server:
        yield server


@pytest.fixture(scope="module")
def reuse(reuse_upstream, tmp_path_factory):
    with proxy_process(
        tmp_path_factory.mktemp("reuse"), reuse_upstream.url,
        upstream={"connect_timeout": CT, "timeout": UT},
    ) as process:
        yield process


@pytest.fixture(scope="module")
def refused_port():
    return free_port()


@pytest.fixture(scope="module")
def refused(refused_port, tmp_path_factory):
    with proxy_process(
        tmp_path_factory.mktemp("refused"), f"http://127.0.0.1:{refused_port}",
        upstream={"connect_timeout": CT, "timeout": UT},
    ) as process:
        yield process


@pytest.fixture(scope="module")
def rec(bg):
    with recording_upstream(bg) as server:
        yield server


POOL_HOLD = 2.0  # how long the pool tests' upstream holds each answer


@pytest.fixture(scope="module")
def pool(rec, tmp_path_factory):
    with proxy_process(
        tmp_path_factory.mktemp("pool"), rec.url,
        upstream={"connect_timeout": CT, "timeout": POOL_HOLD + 3, "max_connections": 2},
    ) as process:
        yield process


def _route(upstream, prefix: str, handler) -> str:
    path = f"/{prefix}-{new_id()}"
    upstream.route(path, handler)
    return path


async def _sleep_forever(req: RawRequest, reader, writer) -> bool:
    await asyncio.sleep(3600)
    return False


def _assert_no_leak(response, port: int) -> None:
    """A proxy-made answer names neither the upstream's address nor its URL."""
    text = response.raw_head + response.body
    for needle in (f"127.0.0.1:{port}", f":{port}", "127.0.0.1", "http://"):
        assert needle.encode() not in text, (needle, response)


async def _log_names_upstream(process: ProxyProcess, path: str, port: int) -> None:
    record = await process.wait_record(lambda r: r.get("path") == path)
    assert f"127.0.0.1:{port}" in json.dumps(record), record


# ===========================================================================
# 8. header bytes 0x80-0xFF pass both ways byte for byte
# ===========================================================================

OBS_TEXT = {
    "e9-ff-80": b"\xe9\xff\x80",
    "latin1-word": b"caf\xe9",
    "ff": b"\xff",
    "utf8-then-ff": b"\xc3\xa9\xff",
    "spaced": b"a \x80 b",
    "all-high": bytes(range(0x80, 0x100)),
}


@pytest.mark.parametrize("value", list(OBS_TEXT.values()), ids=list(OBS_TEXT))
async def test_request_header_bytes_80_ff_reach_the_upstream_byte_for_byte(proxy, scripted,
                                                                           value):
    tid = new_id()
    data = request("GET", "/bytes", b"X-Bytes: " + value, f"X-Test-Id: {tid}",
                   f"Origin: {APP}", "Connection: close")
    response, _ = await exchange(proxy.port, data)
    assert response is not None and response.status == 200, response
    (seen,) = await wait_for(lambda: scripted.with_id(tid), IO, "the request arrived")
    assert b"\r\nX-Bytes: " + value + b"\r\n" in seen.head, seen.head


@pytest.mark.parametrize("value", list(OBS_TEXT.values()), ids=list(OBS_TEXT))
async def test_response_header_bytes_80_ff_reach_the_client_byte_for_byte(proxy, scripted,
                                                                          value):
    async def answer(req, reader, writer) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Bytes: " + value
                     + b"\r\nX-After: plain\r\n\r\nok")
        await writer.drain()
        return True

    path = _route(scripted, "resp-bytes", answer)
    response, _ = await exchange(proxy.port, request("GET", path, f"Origin: {APP}",
                                                     "Connection: close"))
    assert response is not None and response.status == 200, response
    assert b"\r\nX-Bytes: " + value + b"\r\n" in response.raw_head, response
    assert response.values("X-After") == ["plain"]
    assert response.body == b"ok"
    assert_cors(response)


# ===========================================================================
# 9. response framing: every kind arrives whole, the body byte-identical
# ===========================================================================


def _chunked(data: bytes, sizes=(1, 10, 1000, 65536), upper: bool = False,
             ext: bool = False, trailer: bytes = b"") -> bytes:
    out, pos, i = [], 0, 0
    while pos < len(data):
        size = min(sizes[i % len(sizes)], len(data) - pos)
        hexsize = (b"%X" if upper else b"%x") % size
        out.append(hexsize + (b";ext=%d" % i if ext else b"") + b"\r\n" + data[pos:pos + size]
                   + b"\r\n")
        pos, i = pos + size, i + 1
    return b"".join(out) + b"0\r\n" + trailer + b"\r\n"


def _framing(kind: str, payload: bytes):
    """(handler, the body bytes the client must get)."""
    zipped = gzip.compress(payload)
    pieces: list[bytes]
    keep = True
    if kind == "chunked":
        head, wire, expected = b"Transfer-Encoding: chunked\r\n", _chunked(payload), payload
    elif kind == "chunked-ext-trailer":
        head = b"Transfer-Encoding: chunked\r\nTrailer: X-Trailer\r\n"
        wire = _chunked(payload, upper=True, ext=True, trailer=b"X-Trailer: t\r\n")
        expected = payload
    elif kind == "chunked-empty":
        head, wire, expected = b"Transfer-Encoding: chunked\r\n", b"0\r\n\r\n", b""
    elif kind in ("length", "length-slow"):
        head, wire, expected = b"Content-Length: %d\r\n" % len(payload), payload, payload
    elif kind == "close":
        head, wire, expected, keep = b"", payload, payload, False
    elif kind == "close-empty":
        head, wire, expected, keep = b"", b"", b"", False
    elif kind == "close-http10":
        head, wire, expected, keep = b"", payload, payload, False
    elif kind == "close-gzip-te":
        head, wire, expected, keep = b"Transfer-Encoding: gzip\r\n", zipped, zipped, False
    elif kind == "gzip-chunked":
        head, wire, expected = b"Transfer-Encoding: gzip, chunked\r\n", _chunked(zipped), zipped
    else:  # pragma: no cover
        raise ValueError(kind)
    status = b"HTTP/1.0 200 OK\r\n" if kind == "close-http10" else b"HTTP/1.1 200 OK\r\n"
    whole = status + b"Content-Type: application/octet-stream\r\n" + head + b"\r\n" + wire
    slow = kind.endswith("-slow")
    pieces = [whole[i:i + 40000] for i in range(0, len(whole), 40000)] if slow else [whole]

    async def handler(req, reader, writer) -> bool:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            if slow:
                await asyncio.sleep(0.03)
        return keep

    return handler, expected


FRAMINGS = ["chunked", "chunked-ext-trailer", "chunked-empty", "length", "length-slow", "close",
            "close-empty", "close-http10", "close-gzip-te", "gzip-chunked"]


@pytest.mark.parametrize("kind", FRAMINGS)
async def test_every_response_framing_arrives_whole_and_byte_identical(proxy, scripted, kind):
    payload = os.urandom(300_000)
    handler, expected = _framing(kind, payload)
    path = _route(scripted, f"frame-{kind}", handler)
    async with await Client.open(proxy.port) as client:
        await client.send(request("GET", path, f"Origin: {APP}", "Connection: close"))
        response = await client.response(timeout=IO)
        assert response is not None and response.status == 200, response
        if response.ending is None:
            extra, ending, _ = await client.wait_closed(IO)
            assert extra == b"", f"bytes after the response: {extra[:200]!r}"
            response.ending = ending
    assert response.complete, response
    assert len(response.body) == len(expected)
    assert response.body == expected
    assert_cors(response)


# ===========================================================================
# 10. upstream faults
# ===========================================================================


def _upload(size: int, chunked: bool) -> tuple[list[str], bytes]:
    block = os.urandom(MIB)
    body = (block * (size // MIB + 1))[:size]
    if chunked:
        wire = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 65536]), body[i:i + 65536])
                        for i in range(0, size, 65536)) + b"0\r\n\r\n"
        return ["Transfer-Encoding: chunked"], wire
    return [f"Content-Length: {size}"], body


async def _reads_a_little_then_stops(req, reader, writer) -> bool:
    await reader.readexactly(100_000)
    await asyncio.sleep(3600)
    return False


@pytest.mark.parametrize(
    ("size", "chunked", "handler"),
    [(8 * MIB, False, _sleep_forever), (32 * MIB, False, _sleep_forever),
     (16 * MIB, True, _sleep_forever), (8 * MIB, False, _reads_a_little_then_stops)],
    ids=["8mib", "32mib", "16mib-chunked", "reads-100k-then-stops"],
)
async def test_upstream_that_stops_accepting_the_body_gives_504_not_a_hang(proxy, scripted, size,
                                                                          chunked, handler):
    path = _route(scripted, "never-reads", handler)
    headers, wire = _upload(size, chunked)
    async with await Client.open(proxy.port) as client:
        await client.send(request("POST", path, f"Origin: {APP}", *headers))
        started = time.monotonic()
        sender = asyncio.create_task(client.send_quietly(wire, timeout=30))
        try:
            response = await client.response("POST", timeout=UT + 4)
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
        waited = time.monotonic() - started
    assert response is not None and response.status == 504, response
    assert_cors(response)
    assert_no_internal_server_header(response)
    _assert_no_leak(response, scripted.port)
    assert 0.8 * UT <= waited <= UT + SLACK, f"504 after {waited:.2f} s"


async def test_upstream_that_reads_the_body_slowly_but_steadily_is_not_cut(proxy, scripted):
    async def slow_reader(req: RawRequest, reader, writer) -> bool:
        total = int(req.values("Content-Length")[0])
        digest, got = hashlib.sha256(), 0
        while got < total:
            data = await reader.read(min(512 * 1024, total - got))
            if not data:
                return False
            digest.update(data)
            got += len(data)
            # At most 12.5 MiB/s, so 16 MiB take longer than upstream.timeout; yet
            # what the proxy's kernel buffers hold (a few MiB) drains well within it.
            await asyncio.sleep(0.04)
        answer = f"{got} {digest.hexdigest()}".encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))
        await writer.drain()
        return True

    path = _route(scripted, "slow-reader", slow_reader)
    size = 16 * MIB
    headers, body = _upload(size, chunked=False)
    async with await Client.open(proxy.port) as client:
        await client.send(request("POST", path, f"Origin: {APP}", *headers))
        started = time.monotonic()
        sender = asyncio.create_task(client.send_quietly(body, timeout=30))
        try:
            response = await client.response("POST", timeout=15)
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
        took = time.monotonic() - started
    assert response is not None and response.status == 200, response
    assert response.body == f"{size} {hashlib.sha256(body).hexdigest()}".encode()
    assert took > UT, "the upload was not slow enough to test anything"


async def _silent_after_body(req, reader, writer) -> bool:
    await read_request_body(req, reader)
    await asyncio.sleep(3600)
    return False


def _writes_then_silent(data: bytes):
    async def handler(req, reader, writer) -> bool:
        await read_request_body(req, reader)
        writer.write(data)
        await writer.drain()
        await asyncio.sleep(3600)
        return False

    return handler


SILENT = {
    "get": ("GET", _silent_after_body),
    "post": ("POST", _silent_after_body),
    "delete": ("DELETE", _silent_after_body),
    "half-status-line": ("GET", _writes_then_silent(b"HTTP/1.1 20")),
    "half-head": ("GET", _writes_then_silent(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n")),
}


@pytest.mark.parametrize(("method", "handler"), list(SILENT.values()), ids=list(SILENT))
async def test_upstream_silent_after_the_request_gives_504_with_cors(proxy, scripted, method,
                                                                     handler):
    path = _route(scripted, "silent", handler)
    body = b"payload" if method == "POST" else b""
    extra = [f"Content-Length: {len(body)}"] if body else []
    async with await Client.open(proxy.port) as client:
        await client.send(request(method, path, f"Origin: {APP}", *extra, body=body))
        started = time.monotonic()
        response = await client.response(method, timeout=UT + 4)
        waited = time.monotonic() - started
    assert response is not None and response.status == 504, response
    assert response.raw_head.startswith(b"HTTP/1.1 504 ")
    assert_cors(response)
    assert_no_internal_server_header(response)
    _assert_no_leak(response, scripted.port)
    assert 0.8 * UT <= waited <= UT + SLACK, f"504 after {waited:.2f} s"
    await _log_names_upstream(proxy, path, scripted.port)


@pytest.mark.parametrize(
    ("method", "headers", "body"),
    [("GET", (), b""), ("POST", ("Content-Length: 5",), b"hello"), ("DELETE", (), b""),
     ("HEAD", (), b""), ("PUT", ("Transfer-Encoding: chunked",), b"5\r\nhello\r\n0\r\n\r\n")],
    ids=["get", "post", "delete", "head", "put-chunked"],
)
async def test_refused_upstream_gives_502_with_cors_and_no_address_in_the_answer(
    refused, refused_port, method, headers, body
):
    path = f"/refused-{new_id()}"
    response, _ = await exchange(refused.port, request(method, path, f"Origin: {APP}", *headers,
                                                       body=body), method=method)
    assert response is not None and response.status == 502, response
    assert response.raw_head.startswith(b"HTTP/1.1 502 ")
    assert_cors(response)
    assert_no_internal_server_header(response)
    _assert_no_leak(response, refused_port)
    if method != "HEAD":
        assert response.body.strip(), "a 502 says in words what went wrong"
    await _log_names_upstream(refused, path, refused_port)


async def test_refused_upstream_502_for_a_disallowed_origin_has_no_cors(refused, refused_port):
    response, _ = await exchange(refused.port, request("GET", "/r", f"Origin: {EVIL}"))
    assert response is not None and response.status == 502, response
    assert_no_cors(response)
    _assert_no_leak(response, refused_port)


def _truncating(framing: str, how: str, payload: bytes):
    async def handler(req, reader, writer) -> bool:
        if framing == "length":
            head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(payload)
            first, second = payload[:20000], payload[20000:30000]
        elif framing == "chunked":
            head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            first = b"%x\r\n%s\r\n" % (20000, payload[:20000])
            second = b"%x\r\n%s" % (20000, payload[20000:30000])  # a chunk cut in the middle
        else:  # close-delimited
            head = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"
            first, second = payload[:20000], payload[20000:30000]
        writer.write(head + first)
        await writer.drain()
        await asyncio.sleep(0.2)  # the proxy has sent the head on by now
        writer.write(second)
        await writer.drain()
        await asyncio.sleep(0.05)
        if how == "rst":
            reset(writer)
        return False  # "fin": a clean close, the body still short

    return handler


@pytest.mark.parametrize(
    ("framing", "how"),
    [("length", "rst"), ("chunked", "rst"), ("close", "rst"), ("length", "fin"),
     ("chunked", "fin")],
    ids=["length-rst", "chunked-rst", "close-rst", "length-fin", "chunked-fin"],
)
async def test_upstream_failing_mid_body_gives_the_client_an_aborted_response(
    proxy, scripted, framing, how
):
    payload = os.urandom(100_000)
    path = _route(scripted, f"cut-{framing}-{how}", _truncating(framing, how, payload))
    async with await Client.open(proxy.port) as client:
        await client.send(request("GET", path, f"Origin: {APP}"))
        response = await client.response(timeout=IO)
    assert response is not None and response.status == 200, response
    assert not response.complete, f"a truncated body must not end cleanly: {response!r}"
    assert response.ending in ("eof", "reset"), "the proxy left the client waiting"
    assert len(response.body) < len(payload)
    assert payload.startswith(response.body)


# -- connection reuse after a response with extra bytes -------------------------------------

GARBAGE = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nSMUGGL"


def _with_garbage(status_line: bytes, head: bytes, delayed: bool):
    async def handler(req, reader, writer) -> bool:
        await read_request_body(req, reader)
        writer.write(status_line + head + b"\r\n" + (b"" if delayed else GARBAGE))
        await writer.drain()
        if delayed:
            await asyncio.sleep(0.1)
            writer.write(GARBAGE)
            await writer.drain()
        return True  # keep the connection: a proxy that reuses it reads the garbage

    return handler


async def _fresh(req, reader, writer) -> bool:
    await read_request_body(req, reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nfresh\n")
    await writer.drain()
    return True


async def _plain(req, reader, writer) -> bool:
    await read_request_body(req, reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nplain\n")
    await writer.drain()
    return True


GARBAGE_CASES = {
    "head-same-packet": ("HEAD", b"HTTP/1.1 200 OK\r\n", b"Content-Length: 5\r\n", False),
    "head-delayed": ("HEAD", b"HTTP/1.1 200 OK\r\n", b"Content-Length: 5\r\n", True),
    "head-chunked-same-packet": ("HEAD", b"HTTP/1.1 200 OK\r\n", b"Transfer-Encoding: chunked\r\n",
                                 False),
    "204-same-packet": ("GET", b"HTTP/1.1 204 No Content\r\n", b"", False),
    "204-delayed": ("GET", b"HTTP/1.1 204 No Content\r\n", b"", True),
    "304-same-packet": ("GET", b"HTTP/1.1 304 Not Modified\r\n", b"ETag: \"x\"\r\n", False),
}


@pytest.mark.parametrize(("method", "status_line", "head", "delayed"),
                         list(GARBAGE_CASES.values()), ids=list(GARBAGE_CASES))
async def test_connection_with_bytes_after_a_bodiless_response_is_not_reused(
    reuse, reuse_upstream, method, status_line, head, delayed
):
    up = reuse_upstream
    plain = _route(up, "plain", _plain)
    dirty = _route(up, "dirty", _with_garbage(status_line, head, delayed))
    fresh = _route(up, "fresh", _fresh)

    async def call(path: str, how: str = "GET"):
        response, ending = await exchange(reuse.port, request(how, path, "Connection: close"),
                                          method=how, then_eof=True)
        assert response is not None, f"no answer for {path}"
        return response

    def conn_of(path: str) -> int:
        (seen,) = [r for r in up.requests if r.path == path]
        return seen.conn

    warm = await call(plain)
    assert warm.status == 200 and warm.body == b"plain\n"
    answer = await call(dirty, method)
    assert answer.status == int(status_line.split()[1]) and answer.body == b"", answer
    # The pool reuses a clean keep-alive connection (else this test proves nothing).
    assert conn_of(dirty) == conn_of(plain), "the pool did not reuse a clean connection"
    await asyncio.sleep(0.3)
    for _ in range(2):
        again = await call(fresh)
        assert again.status == 200 and again.body == b"fresh\n", again
    fresh_conns = {r.conn for r in up.requests if r.path == fresh}
    assert conn_of(dirty) not in fresh_conns, "the connection with extra bytes was reused"


# ===========================================================================
# 12. graceful stop
# ===========================================================================

GRACE = 1.0


@pytest.fixture
def start_proxy(scripted, tmp_path):
    started: list[ProxyProcess] = []

    def start(grace: float) -> ProxyProcess:
        process = ProxyProcess.with_config(
            tmp_path, scripted.url, listen={"shutdown_grace": grace},
            upstream={"connect_timeout": CT, "timeout": 30},
        )
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


async def _answers_after_10s(req, reader, writer) -> bool:
    await read_request_body(req, reader)
    await asyncio.sleep(10)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate")
    await writer.drain()
    return True


async def _body_then_stalls(req, reader, writer) -> bool:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
    await writer.drain()
    await asyncio.sleep(10)
    return False


@pytest.mark.parametrize(
    ("method", "handler"),
    [("GET", _answers_after_10s), ("POST", _answers_after_10s), ("GET", _body_then_stalls)],
    ids=["get-waiting-for-head", "post-waiting-for-head", "mid-body"],
)
async def test_sigterm_cuts_what_outlives_the_grace_period_and_exits_0(
    scripted, start_proxy, method, handler
):
    process = start_proxy(GRACE)
    path = _route(scripted, "in-flight", handler)
    tid = new_id()
    body = b"payload" if method == "POST" else b""
    extra = [f"Content-Length: {len(body)}"] if body else []
    async with await Client.open(process.port) as client:
        await client.send(request(method, path, f"X-Test-Id: {tid}", f"Origin: {APP}", *extra,
                                  body=body))
        await wait_for(lambda: scripted.with_id(tid), IO, "the request reached the upstream")
        if handler is _body_then_stalls:  # the response has started
            while b"\r\n\r\n" not in client.buf:
                assert await client.read_some(IO), "closed before the response head"
        signalled = time.monotonic()
        process.signal(signal.SIGTERM)
        code = await process.wait_exit(GRACE + 1.5)
        took = time.monotonic() - signalled
        try:
            response = await client.response(method, timeout=2)
        except AssertionError:
            response = None
    assert code == 0
    assert took >= 0.8 * GRACE, f"exited after {took:.2f} s: the request got no grace period"
    assert response is None or not response.complete or response.status != 200, response
    await process.log_complete()
    records = [r for r in process.records() if r.get("path") == path]
    assert records, "no log line for the cut request:\n" + process.log_text()
    assert any(r.get("error") for r in records), records


@pytest.mark.parametrize("idle", ["nothing", "keep-alive-connection", "silent-connection"])
async def test_sigterm_without_requests_in_flight_exits_at_once(scripted, start_proxy, idle):
    process = start_proxy(10)
    async with contextlib.AsyncExitStack() as stack:
        if idle != "nothing":
            client = await stack.enter_async_context(await Client.open(process.port))
            if idle == "keep-alive-connection":
                await client.send(request("GET", "/idle"))
                response = await client.response()
                assert response is not None and response.status == 200, response
            else:
                await asyncio.sleep(0.1)  # accepted by now
        signalled = time.monotonic()
        process.signal(signal.SIGTERM)
        code = await process.wait_exit(5)
        took = time.monotonic() - signalled
    assert code == 0
    # Far below the 10 s grace: nothing waited for it (the bound leaves room for a
    # loaded machine's interpreter teardown).
    assert took < 3.0, f"took {took:.2f} s to stop with nothing in flight"


# ===========================================================================
# 13. upstream connection pool limit
# ===========================================================================


async def _get_timed(port: int, path: str, tid: str):
    started = time.monotonic()
    response, _ = await exchange(port, request("GET", path, f"Origin: {APP}", f"X-Test-Id: {tid}",
                                               "Connection: close"), timeout=POOL_HOLD + 5)
    return response, time.monotonic() - started


@pytest.mark.parametrize("extra", [1, 2])
async def test_requests_beyond_max_connections_get_503_with_cors_after_connect_timeout(
    pool, rec, extra
):
    path = f"/hold-{new_id()}"
    rec.reply(path, delay=POOL_HOLD)
    tid = new_id()
    holders = [asyncio.create_task(_get_timed(pool.port, path, tid)) for _ in range(2)]
    try:
        await wait_for(lambda: len(recorded_with(rec, tid)) >= 2, IO, "two requests upstream")
        waiters = await asyncio.gather(*(_get_timed(pool.port, path, tid) for _ in range(extra)))
        for response, waited in waiters:
            assert response is not None and response.status == 503, response
            assert response.raw_head.startswith(b"HTTP/1.1 503 ")
            assert_cors(response)
            assert 0.8 * CT <= waited <= CT + 1.5, f"503 after {waited:.2f} s"
        for response, _ in await asyncio.gather(*holders):
            assert response is not None and response.status == 200, response
            assert_cors(response)
    finally:
        for task in holders:
            task.cancel()
        await asyncio.gather(*holders, return_exceptions=True)
    assert len(recorded_with(rec, tid)) == 2, "a request beyond the limit reached the upstream"
    after = new_id()
    response, _ = await _get_timed(pool.port, "/after", after)
    assert response is not None and response.status == 200, response


async def test_a_waiter_gets_a_connection_freed_within_connect_timeout(pool, rec):
    hold = 0.15  # well within connect_timeout
    path = f"/short-hold-{new_id()}"
    rec.reply(path, delay=hold)
    tid = new_id()
    results = await asyncio.gather(*(_get_timed(pool.port, path, tid) for _ in range(3)))
    assert [r.status for r, _ in results] == [200, 200, 200], results
    # One of the three waited for a connection to come free (else the limit was not there).
    assert max(t for _, t in results) >= 1.8 * hold, [t for _, t in results]
    await wait_recorded(rec, tid, count=3)
