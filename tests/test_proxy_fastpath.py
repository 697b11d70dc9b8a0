"""The hot path: cached preflight answers, precomputed access lines, the batching
access writer, and ``serve()`` (what ``corsproxy run`` runs) on the same server.

Each fast path is compared with the general one it replaces: same bytes on the
wire (apart from Date), same access line.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import select
import socket

import pytest
from conftest import (
    config_text,
    cors_of,
    raw_exchange,
    raw_response,
    start_proxy,
    status_of,
)

from corsproxy import server
from corsproxy.config import parse_config
from corsproxy.logs import AccessTemplate, AccessWriter, access_line

APP = "https://app.example.com"
POLICY = {
    "allow_origins": [APP],
    "allow_methods": ["GET", "PUT"],
    "allow_headers": ["X-Request-Id"],
    "allow_credentials": True,
    "max_age": 60,
}
VARY = (
    "Origin, Access-Control-Request-Method, Access-Control-Request-Headers, "
    "Access-Control-Request-Private-Network"
)
ALLOWED_CORS = {
    "access-control-allow-origin": APP,
    "access-control-allow-methods": "GET, PUT",
    "access-control-allow-headers": "Accept, Accept-Language, Content-Language, Content-Type, "
                                    "X-Request-Id",
    "access-control-max-age": "60",
    "access-control-allow-credentials": "true",
}


def preflight(origin: str = APP, version: str = "1.1", extra: str = "") -> bytes:
    return (
        f"OPTIONS /items?x=1 HTTP/{version}\r\nHost: proxy.test\r\nOrigin: {origin}\r\n"
        f"Access-Control-Request-Method: PUT\r\nAccess-Control-Request-Headers: x-request-id\r\n"
        f"{extra}\r\n"
    ).encode("latin-1")


def head_lines(raw: bytes) -> list[str]:
    """Status line and header lines, without Date (it changes every second)."""
    head = raw.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    return [line for line in head if not line.startswith("Date: ")]


def without_id(lines: list[str]) -> list[str]:
    """``lines`` without their one ``X-Request-Id`` line (a generated id, 32 hex
    digits, different in every answer)."""
    ids = [line for line in lines if line.startswith("X-Request-Id: ")]
    assert len(ids) == 1, lines
    assert re.fullmatch(r"[0-9a-f]{32}", ids[0].partition(": ")[2]), ids
    return [line for line in lines if not line.startswith("X-Request-Id: ")]


def pairs(raw: bytes) -> list[tuple[str, str]]:
    return [tuple(line.split(": ", 1)) for line in head_lines(raw)[1:]]  # type: ignore[misc]


@pytest.fixture
async def proxy(upstream):
    started = await start_proxy(config_text(upstream.url, cors=POLICY))
    yield started
    await started.close()


async def test_a_cached_preflight_is_byte_for_byte_the_general_answer(proxy, upstream):
    # A preflight with a body skips the cache and takes the general path (the body
    # arrived whole, so the connection may stay open: no Connection: close).
    slow = await raw_exchange(
        proxy.port, preflight(extra="Content-Length: 2\r\n") + b"{}"
    )
    fast1 = await raw_response(proxy.port, preflight())
    fast2 = await raw_response(proxy.port, preflight())  # from the cache
    assert status_of(fast1) == status_of(fast2) == 200
    assert without_id(head_lines(fast1)) == without_id(head_lines(fast2))
    assert without_id(head_lines(fast1)) == without_id(head_lines(slow))
    assert dict(pairs(fast1))["X-Request-Id"] != dict(pairs(fast2))["X-Request-Id"]
    assert head_lines(fast1)[0] == "HTTP/1.1 200 OK"
    assert cors_of(pairs(fast1)) == ALLOWED_CORS
    assert dict(pairs(fast1))["Vary"] == VARY
    assert fast1.endswith(b"\r\n\r\nOK") and slow.endswith(b"\r\n\r\nOK")
    assert upstream.requests == []


async def test_denied_and_closing_preflights_keep_their_own_framing(proxy):
    denied = await raw_response(proxy.port, preflight("https://evil.example"))
    again = await raw_response(proxy.port, preflight("https://evil.example"))
    assert status_of(denied) == status_of(again) == 400
    assert without_id(head_lines(denied)) == without_id(head_lines(again))
    assert cors_of(pairs(denied)) == {}
    assert dict(pairs(denied))["Vary"] == VARY
    assert denied.partition(b"\r\n\r\n")[2].startswith(b"Disallowed CORS origin\n")
    closing = await raw_exchange(proxy.port, preflight(extra="Connection: close\r\n"))
    assert status_of(closing) == 200
    assert ("Connection", "close") in pairs(closing)
    assert cors_of(pairs(closing)) == ALLOWED_CORS


async def test_pipelined_preflights_all_get_answers(proxy):
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(preflight() * 3 + preflight(extra="Connection: close\r\n"))
        async with asyncio.timeout(10):
            raw = await reader.read()  # until the server closes after the fourth
    finally:
        writer.close()
    assert raw.count(b"HTTP/1.1 200 OK\r\n") == 4
    assert raw.count(b"\r\n\r\nOK") == 4


async def test_the_cache_is_bounded_and_ignores_huge_values(proxy, monkeypatch):
    monkeypatch.setattr(server, "_PREFLIGHT_CACHE_SIZE", 4)
    state = proxy.app
    for i in range(10):
        raw = await raw_response(proxy.port, preflight(f"https://o{i}.example"))
        assert status_of(raw) == 400
    assert len(state.preflights) == 4
    before = dict(state.preflights)
    long_origin = "https://" + "a" * 2000 + ".example"
    raw = await raw_response(proxy.port, preflight(long_origin))
    assert status_of(raw) == 400 and cors_of(pairs(raw)) == {}
    assert state.preflights == before


@pytest.mark.parametrize("log_format", ["text", "json"])
@pytest.mark.parametrize(
    ("client", "path", "origin", "route", "asked"),
    [
        ("127.0.0.1", "/items", APP, None, ("PUT", None)),
        (None, "/a b/\u00e9\"=", 'x" y', "/api", ("P T", 'X-A, "b"')),
        ("::1", "", None, "/", (None, None)),
    ],
)
def test_precomputed_access_lines_equal_the_general_ones(log_format, client, path, origin, route,
                                                         asked):
    template = AccessTemplate(log_format, "OPTIONS", 400, origin, "denied", route, 'why; "q"', 23,
                              *asked)
    request_id = 'client-id-"with\\quotes"'
    fields = {
        "client": client, "method": "OPTIONS", "path": path, "status": 400, "origin": origin,
        "cors": "denied", "route": route, "request_id": request_id, "upstream_us": None,
        "us": 370, "request_bytes": 0, "response_bytes": 23, "request_method": asked[0],
        "request_headers": asked[1], "credentials": None, "report": None,
        "report_detail": None, "error": None, "reason": 'why; "q"',
    }
    fast = template.line(client, path, request_id, 370)
    slow = access_line(log_format, fields)
    if log_format == "text":
        assert fast.split(" ", 1)[1] == slow.split(" ", 1)[1]
    else:
        fast_fields, slow_fields = json.loads(fast), json.loads(slow)
        fast_fields.pop("time"), slow_fields.pop("time")
        assert fast_fields == slow_fields
        assert list(json.loads(fast)) == list(json.loads(slow))


def read_pipe(fd: int, size: int, timeout: float = 5.0) -> bytes:
    """``size`` bytes from a pipe, each read bounded by ``timeout``."""
    data = b""
    while len(data) < size:
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, f"only {len(data)} of {size} bytes within {timeout} s"
        data += os.read(fd, 1 << 20)
    return data


async def test_the_writer_batches_one_loop_iteration_into_whole_lines():
    read_fd, write_fd = os.pipe()
    lines = [f"line {i} " + "x" * 40 for i in range(500)]
    expected = ("\n".join(lines) + "\n").encode()
    try:
        with os.fdopen(write_fd, "w", closefd=False) as stream:
            writer = AccessWriter(stream)
            for line in lines:
                writer(line)
            assert select.select([read_fd], [], [], 0)[0] == []  # nothing yet: batched
            await asyncio.sleep(0)  # the flush runs at the end of this iteration
            assert read_pipe(read_fd, len(expected)) == expected
        text = io.StringIO()
        plain = AccessWriter(text)
        plain("one")
        plain.flush()
        assert text.getvalue() == "one\n"
    finally:
        os.close(read_fd)
        os.close(write_fd)


def test_a_pipe_gets_whole_lines_of_at_most_pipe_buf_per_write():
    # Workers share one stderr pipe, where a write of at most PIPE_BUF (4096) bytes
    # is atomic: every write must end at a line's end. A SOCK_SEQPACKET socket keeps
    # each write as one message, so the test sees the writes themselves.
    class Stream:
        def __init__(self, sock: socket.socket) -> None:
            self.sock = sock

        def fileno(self) -> int:
            return self.sock.fileno()

        def flush(self) -> None:
            pass

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        writer = AccessWriter(Stream(ours))
        lines = [f"{i:04d} " + "y" * (37 + i % 50) for i in range(400)]
        for line in lines:
            writer(line)
        writer.flush()  # no loop timer needed
        theirs.settimeout(5)
        messages = []
        while sum(map(len, messages)) < sum(len(x) + 1 for x in lines):
            messages.append(theirs.recv(1 << 16))
        assert len(messages) > 1
        assert all(len(m) <= 4096 and m.endswith(b"\n") for m in messages)
        assert b"".join(messages).decode().split("\n") == lines + [""]
    finally:
        ours.close()
        theirs.close()


async def test_serve_runs_the_same_proxy_server(upstream, caplog):
    caplog.set_level(logging.INFO, logger="corsproxy")
    upstream.reply("/bare", headers=[], body=b"no content type", strip=("Content-Type", "Server"))
    config = parse_config(config_text(upstream.url, cors=POLICY), "fast.yaml")
    stop = asyncio.Event()
    bound: list[int] = []
    task = asyncio.create_task(
        server.serve(config, stop=stop, ready=lambda host, port: bound.append(port))
    )
    try:
        async with asyncio.timeout(10):
            while not bound:
                await asyncio.sleep(0.01)
        port = bound[0]
        fast = await raw_response(port, preflight())
        assert cors_of(pairs(fast)) == ALLOWED_CORS
        got = await raw_response(
            port, f"GET /bare HTTP/1.1\r\nHost: p\r\nOrigin: {APP}\r\n\r\n".encode()
        )
        assert status_of(got) == 200
        assert cors_of(pairs(got)) == {
            "access-control-allow-origin": APP,
            "access-control-allow-credentials": "true",
        }
        names = [n.lower() for n, _ in pairs(got)]
        assert "content-type" not in names and "server" not in names  # nothing added
        assert got.endswith(b"no content type")
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 15) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "corsproxy.access"]
    assert len(lines) == 2
    assert " OPTIONS /items 200 origin=https://app.example.com cors=allowed " in lines[0]
    assert " GET /bare 200 origin=https://app.example.com cors=allowed " in lines[1]


async def test_a_bug_in_the_preflight_cache_falls_back_to_the_general_path(proxy, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("deliberately broken for the test")

    monkeypatch.setattr(server, "_Preflight", broken)
    raw = await raw_response(proxy.port, preflight())
    assert status_of(raw) == 200
    assert cors_of(pairs(raw)) == ALLOWED_CORS
    assert proxy.app.preflights == {}
