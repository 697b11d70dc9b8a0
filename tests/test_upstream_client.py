"""corsproxy.upstream: the proxy's own HTTP/1.1 client, against hand-written upstreams.

Every upstream here is a raw asyncio server on 127.0.0.1 that sends exact bytes, so
framing edge cases (chunk extensions, trailers, Transfer-Encoding codings, HEAD with
Content-Length, 1xx, 204/304, read-until-close, early and unsolicited responses,
bytes after a response's end, garbage) are what the client really gets, and
upstreams that read a request body slowly or not at all exercise the send timeout.
Each test records what the server received, byte for byte. Waits are bounded;
nothing asserts on how long anything took (the idle sweeper test relies only on two
connections expiring 0.15 s apart, in order).
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import subprocess
from collections.abc import Awaitable, Callable

import pytest
from conftest import free_port, unconnectable_port

from corsproxy.upstream import (
    BodyError,
    ConnectError,
    ConnectionFailed,
    ConnectTimeout,
    Disconnected,
    InvalidResponse,
    PoolTimeout,
    RequestBodyError,
    ResponseTimeout,
    SendTimeout,
    UpgradeResponse,
    UpstreamPool,
    UpstreamResponse,
)

IO = 10.0  # bound on any single wait in these tests

Handler = Callable[["Conn"], Awaitable[None]]


class Conn:
    """One accepted connection: helpers to read requests and write exact bytes."""

    def __init__(self, server: RawServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer

    async def head(self) -> bytes:
        async with asyncio.timeout(IO):
            head = await self.reader.readuntil(b"\r\n\r\n")
        self.server.heads.append(head)
        return head

    async def body(self, head: bytes) -> bytes:
        """The request body as framed by ``head`` (Content-Length or chunked)."""
        lower = head.lower()
        async with asyncio.timeout(IO):
            if b"\r\ncontent-length:" in lower:
                length = int(lower.split(b"\r\ncontent-length:")[1].split(b"\r\n")[0])
                data = await self.reader.readexactly(length)
            elif b"\r\ntransfer-encoding: chunked" in lower:
                parts = []
                while True:
                    size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    if size == 0:
                        await self.reader.readuntil(b"\r\n")
                        break
                    parts.append(await self.reader.readexactly(size))
                    await self.reader.readexactly(2)
                data = b"".join(parts)
            else:
                data = b""
        self.server.bodies.append(data)
        return data

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()


class RawServer:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []
        self.connections = 0
        self.errors: list[BaseException] = []
        self.server: asyncio.Server | None = None
        self.url = ""
        self.tasks: set[asyncio.Task] = set()

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0, ssl=ssl_context)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}"

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.tasks.add(asyncio.current_task())
        try:
            await self.handler(Conn(self, reader, writer))
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        except Exception as exc:  # a broken test handler shows up in the test
            self.errors.append(exc)
        finally:
            writer.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()
        assert not self.errors, self.errors


@pytest.fixture
async def serve():
    started: list[RawServer] = []
    pools: list[UpstreamPool] = []

    async def start(handler: Handler, pool_kwargs: dict | None = None,
                    ssl_context: ssl.SSLContext | None = None) -> tuple[RawServer, UpstreamPool]:
        server = RawServer(handler)
        await server.start(ssl_context)
        started.append(server)
        kwargs = {"connect_timeout": 5.0, "timeout": IO, "read_timeout": IO,
                  **(pool_kwargs or {})}
        pool = UpstreamPool(server.url, **kwargs)
        pools.append(pool)
        return server, pool

    yield start
    for pool in pools:
        await pool.close()
    for server in started:
        await server.close()


async def read_all(response: UpstreamResponse) -> bytes:
    parts = []
    async with asyncio.timeout(IO):
        while chunk := await response.read():
            parts.append(chunk)
    return b"".join(parts)


async def fetch(pool: UpstreamPool, method: str = "GET", target: str = "/",
                headers: list[tuple[str, str]] | None = None, body=None, retry: bool = False
                ) -> tuple[UpstreamResponse, bytes]:
    async with asyncio.timeout(IO * 2):
        response = await pool.request(method, target, headers or [("Host", "up")], body,
                                      retry=retry)
        try:
            data = await read_all(response)
        finally:
            response.release()
    return response, data


def keep_alive_handler(responses: list[bytes]) -> Handler:
    """Answer each request on a connection with the next of ``responses``."""

    async def handle(conn: Conn) -> None:
        for data in responses:
            head = await conn.head()
            await conn.body(head)
            await conn.send(data)
        await conn.reader.read()  # wait for the client to close

    return handle


def repeat_handler(data: bytes) -> Handler:
    async def handle(conn: Conn) -> None:
        while True:
            head = await conn.head()
            await conn.body(head)
            await conn.send(data)

    return handle


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


# -- requests on the wire --------------------------------------------------------


async def test_request_head_is_sent_byte_exact(serve):
    # The head is latin-1: each character of the caller's str is one byte, so raw
    # bytes (here UTF-8 and a lone \xff) go through unchanged.
    server, pool = await serve(repeat_handler(OK))
    headers = [("Host", "up:1"), ("x-lower", "a"), ("X-Dup", "1"), ("X-Dup", "2"),
               ("Authorization", "Bearer é"), ("X-Raw", "caf\xc3\xa9 \x80\xff"),
               ("X-\xe9", "v")]
    response, data = await fetch(pool, "GET", "/a%2Fb/../c?q=%20&x=a+b&r=\xff", headers)
    assert (response.status, data) == (200, b"ok")
    assert server.heads == [
        b"GET /a%2Fb/../c?q=%20&x=a+b&r=\xff HTTP/1.1\r\nHost: up:1\r\nx-lower: a\r\n"
        b"X-Dup: 1\r\nX-Dup: 2\r\nAuthorization: Bearer \xe9\r\n"
        b"X-Raw: caf\xc3\xa9 \x80\xff\r\nX-\xe9: v\r\n\r\n"
    ]


@pytest.mark.parametrize(("target", "headers"), [
    ("/", [("X-Euro", "\u20ac")]), ("/", [("X-\u0100", "a")]), ("/\u2603", []),
])
async def test_a_character_above_u00ff_is_refused_before_sending(serve, target, headers):
    server, pool = await serve(repeat_handler(OK))
    with pytest.raises(ValueError, match=r"above U\+00FF"):
        await pool.request("GET", target, [("Host", "up"), *headers])
    assert server.connections == 0


@pytest.mark.parametrize(("method", "added"), [
    ("POST", b"Content-Length: 0\r\n"), ("PUT", b"Content-Length: 0\r\n"),
    ("DELETE", b"Content-Length: 0\r\n"), ("GET", b""), ("HEAD", b""), ("OPTIONS", b""),
])
async def test_a_bodyless_request_gets_content_length_zero_unless_get_like(serve, method, added):
    server, pool = await serve(repeat_handler(b"HTTP/1.1 204 No Content\r\n\r\n"))
    response, _ = await fetch(pool, method, "/x")
    assert response.status == 204
    assert server.heads == [f"{method} /x HTTP/1.1\r\nHost: up\r\n".encode() + added + b"\r\n"]


async def test_a_body_with_content_length_is_streamed_as_is(serve):
    server, pool = await serve(repeat_handler(OK))

    async def body():
        for part in (b"hel", b"", b"lo"):
            yield part

    await fetch(pool, "PUT", "/u", [("Host", "up"), ("Content-Length", "5")], body())
    assert server.heads == [b"PUT /u HTTP/1.1\r\nHost: up\r\nContent-Length: 5\r\n\r\n"]
    assert server.bodies == [b"hello"]


async def test_a_body_without_length_is_chunked(serve):
    server, pool = await serve(repeat_handler(OK))

    async def body():
        yield b"a" * 300
        yield b"bc"

    response, data = await fetch(pool, "POST", "/u", body=body())
    assert data == b"ok"
    assert server.heads == [b"POST /u HTTP/1.1\r\nHost: up\r\nTransfer-Encoding: chunked\r\n\r\n"]
    assert server.bodies == [b"a" * 300 + b"bc"]
    # The connection was reusable: body sent whole, response read whole.
    assert pool.idle_count == 1


@pytest.mark.parametrize("bad", [
    [("X-Evil", "a\r\nX-Injected: 1")], [("X-Evil", "a\nb")], [("X-Evil\r\n", "a")],
])
async def test_cr_or_lf_in_a_header_is_refused_before_sending(serve, bad):
    server, pool = await serve(repeat_handler(OK))
    with pytest.raises(ValueError, match="CR or LF"):
        await pool.request("GET", "/", [("Host", "up"), *bad])
    with pytest.raises(ValueError, match="CR or LF"):
        await pool.request("GET", "/x\r\nHost:evil", [("Host", "up")])
    assert server.connections == 0


async def test_a_body_longer_or_shorter_than_its_content_length_never_completes(serve):
    async def handle(conn: Conn) -> None:
        await conn.head()
        server.bodies.append(await conn.reader.read())  # everything until the close

    server, pool = await serve(handle)

    async def body(data: bytes):
        yield data

    for data in (b"123456", b"123"):
        with pytest.raises(RequestBodyError, match="Content-Length") as info:
            await pool.request("PUT", "/", [("Host", "up"), ("Content-Length", "5")], body(data))
        assert isinstance(info.value.__cause__, ValueError)
    async with asyncio.timeout(IO):
        while len(server.bodies) < 2:
            await asyncio.sleep(0.01)
    assert sorted(server.bodies) == [b"", b"123"]  # a body of 6 is never sent at all
    assert pool.open_count == 0


async def test_a_failing_body_iterator_drops_the_connection_mid_body(serve):
    got = asyncio.Event()

    async def handle(conn: Conn) -> None:
        head = await conn.head()
        assert b"chunked" in head
        server.bodies.append(await conn.reader.read())
        got.set()

    server, pool = await serve(handle)

    async def body():
        yield b"start"
        raise OSError("client went away")

    with pytest.raises(RequestBodyError) as info:
        await pool.request("POST", "/", [("Host", "up")], body())
    assert isinstance(info.value.__cause__, OSError)
    async with asyncio.timeout(IO):
        await got.wait()
    assert server.bodies == [b"5\r\nstart\r\n"]  # never the final 0-size chunk


async def test_a_slow_upstream_applies_back_pressure_to_the_body(serve):
    # The upstream reads nothing until told to; the client must not buffer the
    # whole 64 MiB body: it waits on the transport's write buffer.
    total = 64 * 1024 * 1024
    produced = []
    release = asyncio.Event()

    async def handle(conn: Conn) -> None:
        await conn.head()
        async with asyncio.timeout(IO):
            await release.wait()
        received = 0
        async with asyncio.timeout(IO):
            while received < total:
                received += len(await conn.reader.read(1 << 20))
        assert received == total
        await conn.send(OK)

    server, pool = await serve(handle)

    async def body():
        for _ in range(total // 65536):
            produced.append(65536)
            yield b"p" * 65536

    task = asyncio.create_task(fetch(pool, "PUT", "/", [("Host", "up"),
                                                        ("Content-Length", str(total))], body()))
    async with asyncio.timeout(IO):
        while True:  # wait until the producer stalls
            before = len(produced)
            await asyncio.sleep(0.05)
            if len(produced) == before:
                break
    assert sum(produced) < total  # stalled on back-pressure, not all buffered
    release.set()
    response, data = await task
    assert data == b"ok"


# -- response framing ------------------------------------------------------------


async def test_chunked_response_with_extensions_and_trailers(serve):
    server, pool = await serve(keep_alive_handler([
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n"
        b"5;ext=1;name=\"q\"\r\nhello\r\n1\r\n,\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n"
        b"X-Other: u\r\n\r\n",
        OK,
    ]))
    response, data = await fetch(pool)
    assert data == b"hello, world"
    assert response.chunked
    assert response.raw_headers == [(b"Transfer-Encoding", b"chunked"), (b"X-A", b"1")]
    # Trailers are dropped and the connection is reused for the next request.
    response, data = await fetch(pool)
    assert data == b"ok"
    assert server.connections == 1


async def test_head_response_has_no_body_whatever_its_headers_say(serve):
    server, pool = await serve(keep_alive_handler([
        b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        OK,
    ]))
    for _ in range(2):
        response, data = await fetch(pool, "HEAD", "/file")
        assert (response.status, data) == (200, b"")
    response, data = await fetch(pool, "GET", "/file")
    assert data == b"ok"
    assert server.connections == 1
    assert (response.raw_headers, response.status) == ([(b"Content-Length", b"2")], 200)


@pytest.mark.parametrize("status", [204, 304])
async def test_204_and_304_have_no_body(serve, status):
    server, pool = await serve(keep_alive_handler([
        f"HTTP/1.1 {status} X\r\nETag: \"v\"\r\n\r\n".encode(), OK,
    ]))
    response, data = await fetch(pool)
    assert (response.status, response.reason, data) == (status, "X", b"")
    response, data = await fetch(pool)
    assert data == b"ok" and server.connections == 1


async def test_interim_responses_are_skipped(serve):
    server, pool = await serve(keep_alive_handler([
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\nX-Final: yes\r\n\r\ndone",
        OK,
    ]))
    response, data = await fetch(pool, "POST", "/")
    assert (response.status, response.reason, data) == (201, "Created", b"done")
    assert response.raw_headers == [(b"Content-Length", b"4"), (b"X-Final", b"yes")]
    response, data = await fetch(pool)
    assert data == b"ok" and server.connections == 1


async def test_interim_response_in_separate_packets(serve):
    async def handle(conn: Conn) -> None:
        await conn.head()
        await conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        await asyncio.sleep(0.02)
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nyes")
        await conn.reader.read()

    server, pool = await serve(handle)
    response, data = await fetch(pool)
    assert (response.status, data) == (200, b"yes")


async def test_101_is_an_error(serve):
    server, pool = await serve(keep_alive_handler([
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    ]))
    with pytest.raises(UpgradeResponse, match="101"):
        await fetch(pool)
    assert pool.open_count == 0


# -- upgrades (WebSocket tunnels) ------------------------------------------------------

WS_HEADERS = [("Host", "up"), ("Connection", "Upgrade"), ("Upgrade", "websocket"),
              ("Sec-WebSocket-Version", "13"), ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")]
SWITCH = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
          b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")


class Tunnel(asyncio.Protocol):
    """The caller's own protocol on a detached connection: records what arrives."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.arrived = asyncio.Event()
        self.lost: asyncio.Future[BaseException | None] = (
            asyncio.get_running_loop().create_future()
        )

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.arrived.set()

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)

    async def until(self, size: int) -> bytes:
        async with asyncio.timeout(IO):
            while len(self.data) < size:
                self.arrived.clear()
                await self.arrived.wait()
        return bytes(self.data)


def take_over(response: UpstreamResponse) -> tuple[asyncio.Transport, bytes, Tunnel]:
    """What a caller does: detach, then set its own protocol before anything awaits."""
    transport, first = response.detach()
    tunnel = Tunnel()
    transport.set_protocol(tunnel)
    return transport, first, tunnel


async def close_tunnel(transport: asyncio.Transport, tunnel: Tunnel) -> None:
    transport.close()
    async with asyncio.timeout(IO):
        await tunnel.lost


def upgrade_handler(answer: bytes = SWITCH, tunnel: bool = True, cut: int | None = None
                    ) -> Handler:
    """Answer an upgrade request with ``answer`` (sent in two packets, split at
    ``cut``, when given), then, when ``tunnel``, echo every byte until EOF; answer
    any other request with OK."""

    async def handle(conn: Conn) -> None:
        while True:
            head = await conn.head()
            await conn.body(head)
            if b"\r\nUpgrade: websocket\r\n" not in head:
                await conn.send(OK)
                continue
            if cut is None:
                await conn.send(answer)
            else:
                await conn.send(answer[:cut])
                await asyncio.sleep(0.05)
                await conn.send(answer[cut:])
            if tunnel:
                while data := await conn.reader.read(65536):
                    await conn.send(data)
                return

    return handle


async def test_an_upgrade_is_detached_from_the_pool_as_a_raw_tunnel(serve):
    # Short pool timers: none of them may touch the tunnel once it is detached.
    server, pool = await serve(upgrade_handler(), {
        "max_connections": 1, "timeout": 0.2, "read_timeout": 0.2, "idle_timeout": 0.2,
    })
    async with asyncio.timeout(IO):
        response = await pool.request("GET", "/ws", WS_HEADERS, upgrade=True)
    assert (response.status, response.reason, response.version) == (
        101, "Switching Protocols", "1.1")
    assert response.raw_headers == [
        (b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"),
        (b"Sec-WebSocket-Accept", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
    ]
    assert await response.read() == b""  # a 101 has no body
    # The head went out exactly as given (no Content-Length: 0, nothing added).
    assert server.heads == [
        b"GET /ws HTTP/1.1\r\nHost: up\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    ]
    # Until detached, the connection is the pool's: in use, holding the one slot.
    assert (pool.open_count, pool.active_count, pool.idle_count) == (1, 1, 0)
    waiting = asyncio.create_task(fetch(pool, target="/next"))
    async with asyncio.timeout(IO):
        while pool.waiting_count < 1:
            await asyncio.sleep(0.01)
    transport, first, tunnel = take_over(response)
    try:
        assert first == b""
        assert (pool.open_count, pool.active_count, pool.idle_count) == (0, 0, 0)
        response.release()  # a no-op now
        assert not transport.is_closing()
        # The slot was freed: the waiting request got a connection of its own.
        _, data = await waiting
        assert data == b"ok"
        assert server.connections == 2
        assert pool.open_count == pool.idle_count == 1  # the new one, not the tunnel
        # Past every pool timer (timeout, read_timeout, idle_timeout), the tunnel
        # still carries bytes both ways.
        await asyncio.sleep(0.5)
        transport.write(b"ping")
        assert await tunnel.until(4) == b"ping"
        # Closing the pool leaves the tunnel alone: it is the caller's.
        await pool.close()
        transport.write(b"pong")
        assert await tunnel.until(8) == b"pingpong"
        assert not tunnel.lost.done()
    finally:
        await close_tunnel(transport, tunnel)
    assert pool.open_count == 0


@pytest.mark.parametrize(("answer", "first"), [
    (SWITCH + b"\x81\x05hello", b"\x81\x05hello"),  # a WebSocket frame right behind
    # an interim response first; then bytes that look like HTTP, which are the tunnel's
    (b"HTTP/1.1 100 Continue\r\n\r\n" + SWITCH + b"HTTP/1.1 200 OK\r\n\r\n",
     b"HTTP/1.1 200 OK\r\n\r\n"),
    # a 101 without Upgrade/Connection (llhttp would not pause on it itself)
    (b"HTTP/1.1 101 Switching Protocols\r\n\r\nraw", b"raw"),
    # a 101 has no body whatever its headers say
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
     b"Content-Length: 3\r\n\r\nabcdef", b"abcdef"),
    # bare LF line ends: the tunnel starts right after the empty line
    (b"HTTP/1.1 101 Switching Protocols\nUpgrade: websocket\nConnection: Upgrade\n\n\r\n\r\nx",
     b"\r\n\r\nx"),
])
@pytest.mark.parametrize("split", [False, True])
async def test_tunnel_bytes_sent_with_the_101_head_are_handed_over(serve, answer, first, split):
    # With `split`, the head's last byte comes in a second packet with the tunnel's
    # first bytes: the empty line ending the head spans two packets.
    cut = len(answer) - len(first) - 1 if split else None
    server, pool = await serve(upgrade_handler(answer, cut=cut))
    async with asyncio.timeout(IO):
        response = await pool.request("GET", "/ws", WS_HEADERS, upgrade=True)
    assert response.status == 101
    transport, data, tunnel = take_over(response)
    try:
        assert data == first
        assert pool.open_count == 0
        transport.write(b"echo")
        assert await tunnel.until(4) == b"echo"
    finally:
        await close_tunnel(transport, tunnel)


async def test_tunnel_bytes_after_the_101_wait_for_the_caller(serve):
    # The upstream speaks first, a while after its 101 head and before the caller
    # detaches: those bytes are neither lost nor taken as a byte after the response's
    # end (which would close the connection); they reach the caller's protocol.
    async def handle(conn: Conn) -> None:
        await conn.head()
        await conn.send(SWITCH)
        await asyncio.sleep(0.05)
        await conn.send(b"hello from upstream")
        while data := await conn.reader.read(65536):
            await conn.send(data)

    server, pool = await serve(handle)
    async with asyncio.timeout(IO):
        response = await pool.request("GET", "/ws", WS_HEADERS, upgrade=True)
    await asyncio.sleep(0.2)
    assert pool.open_count == 1  # still open, reading paused
    transport, first, tunnel = take_over(response)
    try:
        # (all of it, whether a first part came with the head or not)
        assert first + await tunnel.until(19 - len(first)) == b"hello from upstream"
        transport.write(b"!")
        assert first + await tunnel.until(20 - len(first)) == b"hello from upstream!"
        # The upstream closing the tunnel reaches the caller's protocol too.
        transport.write_eof()
        async with asyncio.timeout(IO):
            assert await tunnel.lost is None
    finally:
        transport.close()


@pytest.mark.parametrize(("answer", "status", "body"), [
    (b"HTTP/1.1 400 Bad Request\r\nContent-Length: 12\r\n\r\nno\r\n\r\nthanks", 400,
     b"no\r\n\r\nthanks"),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 426 Upgrade Required\r\nUpgrade: websocket\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n4\r\n\r\n\r\n\r\n0\r\n\r\n", 426, b"\r\n\r\n"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 200, b""),
])
async def test_an_upgrade_answered_without_101_is_an_ordinary_response(
    serve, answer, status, body
):
    server, pool = await serve(upgrade_handler(answer, tunnel=False))
    async with asyncio.timeout(IO):
        response = await pool.request("GET", "/ws", WS_HEADERS, upgrade=True)
    try:
        assert response.status == status
        assert await read_all(response) == body
        with pytest.raises(RuntimeError, match=f"only a 101 .* not a {status}"):
            response.detach()
    finally:
        response.release()
    assert pool.idle_count == 1  # read whole, keep-alive: back in the pool
    _, data = await fetch(pool)
    assert data == b"ok" and server.connections == 1


async def test_101_without_upgrade_stays_an_error(serve):
    server, pool = await serve(upgrade_handler())
    with pytest.raises(UpgradeResponse, match="asked for no upgrade"):
        async with asyncio.timeout(IO):
            await pool.request("GET", "/ws", WS_HEADERS)
    assert pool.open_count == 0


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_101_released_instead_of_detached_closes_the_connection(serve, method):
    closed = asyncio.Event()

    async def handle(conn: Conn) -> None:
        server.heads.append(await conn.reader.readuntil(b"\r\n\r\n"))
        await conn.send(SWITCH + b"tunnel")
        assert await conn.reader.read() == b""  # the client closes it
        closed.set()

    server, pool = await serve(handle)
    headers = [("Host", "up"), ("Connection", "upgrade"), ("Upgrade", "x")]
    async with asyncio.timeout(IO):
        response = await pool.request(method, "/", headers, upgrade=True)
    assert response.status == 101
    response.release()
    with pytest.raises(RuntimeError, match="already released or detached"):
        response.detach()
    async with asyncio.timeout(IO):
        await closed.wait()
    assert pool.open_count == 0
    # Exactly as given: no Content-Length: 0 even for a POST.
    assert server.heads == [
        f"{method} / HTTP/1.1\r\nHost: up\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n".encode()
    ]


async def test_detach_twice_or_after_the_pool_closed(serve):
    server, pool = await serve(upgrade_handler())
    async with asyncio.timeout(IO):
        first = await pool.request("GET", "/ws", WS_HEADERS, upgrade=True)
        second = await pool.request("GET", "/ws", WS_HEADERS, upgrade=True)
    assert (pool.open_count, pool.active_count) == (2, 2)
    transport, _, tunnel = take_over(first)
    try:
        with pytest.raises(RuntimeError, match="already released or detached"):
            first.detach()
        await pool.close()  # the second was still the pool's: closed with it
        with pytest.raises(Disconnected, match="before the tunnel was taken over"):
            second.detach()
        second.release()
        assert not transport.is_closing()
    finally:
        await close_tunnel(transport, tunnel)


async def test_an_upgrade_with_a_body_switches_once_the_body_is_sent_whole(serve):
    server, pool = await serve(upgrade_handler(SWITCH + b"hi"))

    async def body():
        yield b"da"
        yield b"ta"

    headers = [*WS_HEADERS, ("Content-Length", "4")]
    async with asyncio.timeout(IO):
        response = await pool.request("POST", "/ws", headers, body(), upgrade=True)
    transport, first, tunnel = take_over(response)
    try:
        assert (response.status, first, server.bodies) == (101, b"hi", [b"data"])
        transport.write(b"x")
        assert await tunnel.until(1) == b"x"
    finally:
        await close_tunnel(transport, tunnel)


async def test_a_101_before_the_request_body_was_sent_whole_is_an_error(serve):
    async def handle(conn: Conn) -> None:
        await conn.head()
        await conn.send(SWITCH)
        await conn.reader.read()

    server, pool = await serve(handle)
    unblock = asyncio.Event()

    async def body():
        yield b"part"
        async with asyncio.timeout(IO):
            await unblock.wait()
        yield b"rest"

    with pytest.raises(UpgradeResponse, match="before the request body was sent whole"):
        async with asyncio.timeout(IO):
            await pool.request("POST", "/ws", WS_HEADERS, body(), upgrade=True)
    unblock.set()
    assert pool.open_count == 0


async def test_an_upgrade_on_a_stale_connection_is_retried_only_without_a_response_byte(serve):
    # First connection: answers /1, then drops the upgrade request unanswered (the
    # idle race) or after a byte of an answer; later connections upgrade.
    partial = [False]

    async def handle(conn: Conn) -> None:
        if server.connections == 1:
            await conn.head()
            await conn.send(OK)
            await conn.head()
            if partial[0]:
                await conn.send(b"HTTP/1.1 10")
                conn.writer.close()
            else:
                conn.writer.transport.abort()
            return
        await upgrade_handler()(conn)

    server, pool = await serve(handle)
    await fetch(pool, target="/1")
    async with asyncio.timeout(IO):
        response = await pool.request("GET", "/ws", WS_HEADERS, upgrade=True, retry=True)
    transport, _, tunnel = take_over(response)
    await close_tunnel(transport, tunnel)
    assert [h.split(b" ")[1] for h in server.heads] == [b"/1", b"/ws", b"/ws"]

    server.connections = 0
    server.heads.clear()
    partial[0] = True
    await fetch(pool, target="/1")
    with pytest.raises(Disconnected):
        async with asyncio.timeout(IO):
            await pool.request("GET", "/ws", WS_HEADERS, upgrade=True, retry=True)
    assert [h.split(b" ")[1] for h in server.heads] == [b"/1", b"/ws"]  # sent once
    assert server.connections == 1


async def test_read_until_close_body(serve):
    async def handle(conn: Conn) -> None:
        await conn.head()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart one, ")
        await asyncio.sleep(0.02)
        await conn.send(b"part two")
        conn.writer.close()

    server, pool = await serve(handle)
    response, data = await fetch(pool)
    assert data == b"part one, part two"
    assert pool.open_count == 0 and pool.idle_count == 0


def close_handler(data: bytes) -> Handler:
    """Answer one request with ``data``, then close the connection."""

    async def handle(conn: Conn) -> None:
        await conn.head()
        await conn.send(data)
        conn.writer.close()

    return handle


async def test_a_close_delimited_transfer_coding_is_read_to_the_end(serve):
    # Transfer-Encoding without chunked last: the body runs until the connection
    # closes (RFC 9112 §6.3), and comes with its coding still applied.
    async def handle(conn: Conn) -> None:
        await conn.head()
        await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n\x1f\x8b part one, ")
        await asyncio.sleep(0.02)
        await conn.send(b"part two")
        conn.writer.close()

    server, pool = await serve(handle)
    response, data = await fetch(pool)
    assert data == b"\x1f\x8b part one, part two"
    assert (response.chunked, response.transfer_codings) == (False, (b"gzip",))
    assert pool.open_count == 0 and pool.idle_count == 0


@pytest.mark.parametrize(("head", "body", "codings"), [
    # chunked last: de-chunked, the other codings named
    (b"Transfer-Encoding: gzip, chunked", b"3\r\nabc\r\n0\r\n\r\n", (b"gzip",)),
    (b"Transfer-Encoding: GZip\r\nTransfer-Encoding: x-a ,\tCHUNKED  ",
     b"3\r\nabc\r\n0\r\n\r\n", (b"gzip", b"x-a")),
    (b"Transfer-Encoding: chunked", b"3\r\nabc\r\n0\r\n\r\n", ()),
    (b"Transfer-Encoding: gzip,,chunked", b"3\r\nabc\r\n0\r\n\r\n", (b"gzip",)),
])
async def test_chunked_as_the_last_transfer_coding(serve, head, body, codings):
    server, pool = await serve(repeat_handler(b"HTTP/1.1 200 OK\r\n" + head + b"\r\n\r\n" + body))
    for _ in range(2):
        response, data = await fetch(pool)
        assert data == b"abc"
        assert (response.chunked, response.transfer_codings) == (True, codings)
    assert server.connections == 1  # framed by chunked: reused


@pytest.mark.parametrize(("head", "codings"), [
    (b"Transfer-Encoding: chunked, gzip", (b"chunked", b"gzip")),
    (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: br", (b"chunked", b"br")),
    (b"Transfer-Encoding: x-custom;q=1", (b"x-custom;q=1",)),
    # with Content-Length too: Transfer-Encoding wins, whatever the length says
    (b"Transfer-Encoding: gzip\r\nContent-Length: 3", (b"gzip",)),
    (b"Content-Length: 300\r\nTransfer-Encoding: gzip", (b"gzip",)),
])
async def test_a_transfer_coding_other_than_chunked_last_reads_until_close(serve, head, codings):
    body = b"3\r\nabc\r\n0\r\n\r\nand more"
    server, pool = await serve(close_handler(b"HTTP/1.1 200 OK\r\n" + head + b"\r\n\r\n" + body))
    response, data = await fetch(pool)
    assert data == body  # all of it, as sent
    assert (response.chunked, response.transfer_codings) == (False, codings)
    assert pool.open_count == 0


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2",
    b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked",
    b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked",
])
async def test_suspect_chunked_framing_is_read_but_never_reused(serve, head):
    # Transfer-Encoding with Content-Length (RFC 9112 §6.3: smuggling-shaped), or in
    # HTTP/1.0 (§6.1): framed by chunked, then the connection is closed.
    server, pool = await serve(repeat_handler(head + b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n"))
    for _ in range(2):
        response, data = await fetch(pool)
        assert (data, response.chunked) == (b"abc", True)
        assert pool.idle_count == 0
    assert server.connections == 2


@pytest.mark.parametrize(("head", "message"), [
    (b"Transfer-Encoding: chunked,", "ambiguous"),
    (b"Transfer-Encoding: gzip, chunked\t", "ambiguous"),
    (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: ,", "ambiguous"),
    (b"Transfer-Encoding: , \r\nContent-Length: 3", "names no coding"),
    (b"Transfer-Encoding: ", "(?i)empty"),
])
async def test_an_ambiguous_transfer_encoding_is_invalid(serve, head, message):
    # llhttp would read these until close while chunked is their last coding, or
    # while they name no coding at all (or refuses them).
    server, pool = await serve(keep_alive_handler([
        b"HTTP/1.1 200 OK\r\n" + head + b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    ]))
    with pytest.raises(InvalidResponse, match=message):
        await fetch(pool)
    assert pool.open_count == 0


async def test_transfer_codings_of_bodiless_responses(serve):
    server, pool = await serve(keep_alive_handler([
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: br\r\n\r\n",
        OK,
    ]))
    response, data = await fetch(pool, "HEAD")
    assert (data, response.chunked, response.transfer_codings) == (b"", True, (b"gzip",))
    response, data = await fetch(pool)
    assert (data, response.chunked, response.transfer_codings) == (b"", False, (b"br",))
    response, data = await fetch(pool)
    assert (data, response.chunked, response.transfer_codings) == (b"ok", False, ())
    assert server.connections == 1


async def test_http10_response_without_keep_alive_is_not_reused(serve):
    server, pool = await serve(repeat_handler(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    await fetch(pool)
    assert pool.idle_count == 0
    await fetch(pool)
    assert server.connections == 2


async def test_http10_response_with_keep_alive_is_reused(serve):
    server, pool = await serve(repeat_handler(
        b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 2\r\n\r\nok"
    ))
    for _ in range(3):
        _, data = await fetch(pool)
        assert data == b"ok"
    assert server.connections == 1


async def test_connection_close_is_not_reused(serve):
    server, pool = await serve(repeat_handler(
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    ))
    await fetch(pool)
    await fetch(pool)
    assert server.connections == 2 and pool.idle_count == 0


async def test_truncated_bodies_are_errors(serve):
    for response_bytes in (
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    ):
        async def handle(conn: Conn, data=response_bytes) -> None:
            await conn.head()
            await conn.send(data)

        server, pool = await serve(handle)
        response = await pool.request("GET", "/", [("Host", "up")])
        with pytest.raises(BodyError, match="closed the connection before the body's end"):
            await read_all(response)
        response.release()
        assert pool.open_count == 0


async def test_invalid_chunk_framing_is_a_body_error(serve):
    server, pool = await serve(keep_alive_handler([
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n"
    ]))
    response = await pool.request("GET", "/", [("Host", "up")])
    with pytest.raises(BodyError, match="invalid response body"):
        await read_all(response)
    response.release()


@pytest.mark.parametrize("garbage", [
    b"SMTP ready\r\n\r\n", b"HTTP/1.1 abc OK\r\n\r\n", b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
    b"\x00\x01\x02\r\n\r\n",
])
async def test_garbage_is_an_invalid_response(serve, garbage):
    server, pool = await serve(keep_alive_handler([garbage]))
    with pytest.raises(InvalidResponse):
        await fetch(pool)
    assert pool.open_count == 0


async def test_huge_response_headers_are_refused(serve):
    big = b"X-Big: " + b"v" * 8000 + b"\r\n"
    server, pool = await serve(keep_alive_handler([
        b"HTTP/1.1 200 OK\r\n" + big * 40 + b"Content-Length: 2\r\n\r\nok"
    ]))
    with pytest.raises(InvalidResponse, match="response head over"):
        await fetch(pool)


async def test_many_response_headers_are_refused(serve):
    server, pool = await serve(keep_alive_handler([
        b"HTTP/1.1 200 OK\r\n" + b"X: 1\r\n" * 600 + b"Content-Length: 2\r\n\r\nok"
    ]))
    with pytest.raises(InvalidResponse, match="header lines"):
        await fetch(pool)


async def test_large_headers_within_limits_pass(serve):
    big = b"X-Big: " + b"v" * 60000 + b"\r\n"
    server, pool = await serve(keep_alive_handler([
        b"HTTP/1.1 200 OK\r\n" + big + b"Content-Length: 2\r\n\r\nok"
    ]))
    response, data = await fetch(pool)
    assert data == b"ok"
    assert response.raw_headers[0] == (b"X-Big", b"v" * 60000)


# -- connection reuse and the pool ----------------------------------------------------


async def test_keep_alive_connection_is_reused(serve):
    server, pool = await serve(repeat_handler(OK))
    for _ in range(5):
        await fetch(pool)
    assert server.connections == 1 and pool.idle_count == 1


async def test_an_idle_connection_closed_by_the_upstream_is_not_used(serve):
    async def handle(conn: Conn) -> None:
        await conn.head()
        await conn.send(OK)
        # closes right away (after the response)

    server, pool = await serve(handle)
    await fetch(pool)
    async with asyncio.timeout(IO):
        while pool.open_count:
            await asyncio.sleep(0.01)  # the FIN arrives; the pool forgets the connection
    await fetch(pool)
    assert server.connections == 2


async def test_stale_pooled_connection_is_retried_once_without_a_body(serve):
    # The upstream answers once, then drops the connection when the next request
    # arrives (its idle timer firing just then).
    async def handle(conn: Conn) -> None:
        await conn.head()
        await conn.send(OK)
        await conn.head()
        conn.writer.transport.abort()

    server, pool = await serve(handle)
    await fetch(pool, target="/1")
    _, data = await fetch(pool, target="/2", retry=True)
    assert data == b"ok"
    assert [h.split(b" ")[1] for h in server.heads] == [b"/1", b"/2", b"/2"]
    # Without retry (e.g. a request with a body) the failure is reported.
    with pytest.raises((Disconnected, ConnectionFailed)):
        await fetch(pool, target="/3")


async def test_a_fresh_connection_failing_is_not_retried(serve):
    async def handle(conn: Conn) -> None:
        await conn.head()
        conn.writer.transport.abort()

    server, pool = await serve(handle)
    with pytest.raises((Disconnected, ConnectionFailed)):
        await fetch(pool, retry=True)
    assert server.connections == 1


def stale_handler() -> Handler:
    """Answer the first request, then drop the connection when the next one comes
    (the upstream's idle timer firing just then)."""

    async def handle(conn: Conn) -> None:
        head = await conn.head()
        await conn.body(head)
        await conn.send(OK)
        await conn.head()
        conn.writer.transport.abort()

    return handle


@pytest.mark.parametrize(("method", "with_body"), [
    ("POST", False), ("PATCH", False), ("PUT", True), ("GET", True),
])
async def test_a_stale_connection_is_never_retried_for_a_body_or_a_non_idempotent_method(
    serve, method, with_body
):
    server, pool = await serve(stale_handler())
    await fetch(pool, target="/1")

    async def body():
        yield b"data"

    with pytest.raises((Disconnected, ConnectionFailed)):
        await fetch(pool, method, "/2", [("Host", "up"), ("Content-Length", "4")]
                    if with_body else None, body() if with_body else None, retry=True)
    assert [h.split(b" ")[1] for h in server.heads] == [b"/1", b"/2"]  # sent once
    assert server.connections == 1


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS", "PUT", "DELETE"])
async def test_a_stale_connection_is_retried_for_other_idempotent_methods(serve, method):
    server, pool = await serve(stale_handler())
    await fetch(pool, target="/1")
    response, _ = await fetch(pool, method, "/2", retry=True)
    assert response.status == 200
    assert [h.split(b" ")[1] for h in server.heads] == [b"/1", b"/2", b"/2"]
    assert server.connections == 2


@pytest.mark.parametrize(("method", "response_bytes", "extra", "body"), [
    ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b"hello", b""),
    ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b"\r\n", b""),
    ("HEAD", b"HTTP/1.1 200 OK\nContent-Length: 2\n\n", OK, b""),
    ("HEAD", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked"
             b"\r\n\r\n", b"0\r\n\r\n", b""),
    ("GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n", b"hello", b""),
    ("GET", b"HTTP/1.1 304 Not Modified\r\n\r\n", OK, b""),
    ("GET", OK, b"garbage", b"ok"),
    ("GET", OK, b"HTTP/1.1 200 OK\r\n", b"ok"),
    ("GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", b"X",
     b"ok"),
])
@pytest.mark.parametrize("same_packet", [True, False])
async def test_bytes_after_the_end_of_a_response_close_the_connection(
    serve, method, response_bytes, extra, body, same_packet
):
    # Whatever follows the end of a response (a body after a HEAD, 204 or 304 head,
    # anything after a complete body) is a byte nobody asked for: the connection
    # must never carry another request, whether the bytes come with the response
    # or after it.
    async def handle(conn: Conn) -> None:
        await conn.head()
        if same_packet:
            await conn.send(response_bytes + extra)
        else:
            await conn.send(response_bytes)
            await asyncio.sleep(0.05)
            await conn.send(extra)
        await conn.reader.read()

    server, pool = await serve(handle)
    response, data = await fetch(pool, method)
    status = int(response_bytes.rsplit(b"HTTP/1.1 ", 1)[1][:3])  # the final response's
    assert (response.status, data) == (status, body)
    async with asyncio.timeout(IO):
        while pool.open_count:
            await asyncio.sleep(0.01)
    assert pool.idle_count == 0


async def test_a_head_response_split_anywhere_is_reused(serve):
    # A HEAD response's head is fed to the parser up to each empty line: an empty
    # line split across packets is still the end, and nothing is left over.
    head = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n"

    async def handle(conn: Conn) -> None:
        for cut in (len(head) - 1, len(head) - 2, len(head) - 3, 25, 26):
            await conn.head()
            await conn.send(head[:cut])
            await asyncio.sleep(0.02)
            await conn.send(head[cut:])
        await conn.reader.read()

    server, pool = await serve(handle)
    for _ in range(5):
        response, data = await fetch(pool, "HEAD")
        assert (response.status, data) == (200, b"")
        assert pool.idle_count == 1
    assert server.connections == 1


async def test_disconnect_without_response(serve):
    async def handle(conn: Conn) -> None:
        await conn.head()
        conn.writer.close()

    server, pool = await serve(handle)
    with pytest.raises(Disconnected, match="without a response"):
        await fetch(pool)


async def test_unsolicited_extra_response_closes_the_connection(serve):
    # Two responses for one request (a pipelining bug upstream): the second must
    # never be taken as the answer to the next request.
    server, pool = await serve(keep_alive_handler([OK + b"HTTP/1.1 200 OK\r\nContent-Length: 5"
                                                        b"\r\n\r\nwrong", OK, OK]))
    _, data = await fetch(pool)
    assert data == b"ok"
    _, data = await fetch(pool)
    assert data == b"ok"
    assert server.connections == 2


async def test_early_response_before_the_body_is_sent(serve):
    # The upstream answers from the head alone and never reads the body: the answer
    # comes through, and the connection is not reused.
    async def handle(conn: Conn) -> None:
        await conn.head()
        await conn.send(b"HTTP/1.1 413 Too Big\r\nContent-Length: 3\r\n\r\nbig")
        await conn.reader.read()

    server, pool = await serve(handle)
    unblock = asyncio.Event()

    async def body():
        yield b"x" * 1024
        await unblock.wait()  # the client is slow; the answer must not wait for it
        yield b"y"

    response, data = await fetch(pool, "PUT", "/", [("Host", "up")], body())
    assert (response.status, data) == (413, b"big")
    unblock.set()
    assert pool.idle_count == 0
    await fetch(pool, "PUT", "/", [("Host", "up")], None)
    assert server.connections == 2


def gated_handler(gate: asyncio.Event) -> Callable[[Conn], Awaitable[None]]:
    """An upstream that reads each request head, then answers OK once ``gate`` is set."""

    async def handle(conn: Conn) -> None:
        while True:
            await conn.head()
            async with asyncio.timeout(IO):
                await gate.wait()
            await conn.send(OK)

    return handle


async def test_max_connections_makes_requests_wait(serve):
    gate = asyncio.Event()
    handle = gated_handler(gate)
    server, pool = await serve(handle, {"max_connections": 2})
    tasks = [asyncio.create_task(fetch(pool)) for _ in range(5)]
    async with asyncio.timeout(IO):
        while len(server.heads) < 2:
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    assert len(server.heads) == 2 and pool.open_count == 2
    gate.set()
    results = await asyncio.gather(*tasks)
    assert [data for _, data in results] == [b"ok"] * 5
    assert server.connections == 2


async def test_active_count(serve):
    gate = asyncio.Event()
    server, pool = await serve(gated_handler(gate))
    assert (pool.active_count, pool.open_count, pool.idle_count) == (0, 0, 0)
    tasks = [asyncio.create_task(fetch(pool)) for _ in range(3)]
    async with asyncio.timeout(IO):
        while len(server.heads) < 3:
            await asyncio.sleep(0.01)
    assert (pool.active_count, pool.open_count, pool.idle_count) == (3, 3, 0)
    gate.set()
    await asyncio.gather(*tasks)
    assert (pool.active_count, pool.open_count, pool.idle_count) == (0, 3, 3)


async def test_a_request_waits_for_a_connection_at_most_acquire_timeout(serve):
    gate = asyncio.Event()
    server, pool = await serve(gated_handler(gate),
                               {"max_connections": 1, "acquire_timeout": 0.2})
    first = asyncio.create_task(fetch(pool, target="/first"))
    async with asyncio.timeout(IO):
        while not server.heads:
            await asyncio.sleep(0.01)
    with pytest.raises(PoolTimeout, match=r"^all 1 upstream connections busy for 0.2 s "
                                          r"\(upstream.max_connections\)$"):
        await fetch(pool, target="/late")
    assert pool.waiting_count == 0  # no waiter left behind
    # A later waiter still gets the connection when it is handed back.
    pool.acquire_timeout = IO
    second = asyncio.create_task(fetch(pool, target="/second"))
    async with asyncio.timeout(IO):
        while pool.waiting_count < 1:
            await asyncio.sleep(0.01)
    gate.set()
    results = await asyncio.gather(first, second)
    assert [data for _, data in results] == [b"ok", b"ok"]
    assert [h.split(b" ")[1] for h in server.heads] == [b"/first", b"/second"]
    assert server.connections == 1 and pool.waiting_count == 0


async def test_a_cancelled_waiter_passes_the_connection_on(serve):
    # Two waiters go away: one while still waiting, one just after it was handed
    # the connection (cancelled before it could run). The connection must reach
    # the third.
    server, pool = await serve(repeat_handler(OK), {"max_connections": 1})
    async with asyncio.timeout(IO):
        held = await pool.request("GET", "/held", [("Host", "up")])
    waiting = asyncio.create_task(fetch(pool, target="/waiting"))
    woken = asyncio.create_task(fetch(pool, target="/woken"))
    last = asyncio.create_task(fetch(pool, target="/last"))
    async with asyncio.timeout(IO):
        while pool.waiting_count < 3:
            await asyncio.sleep(0.01)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert pool.waiting_count == 2
    assert await read_all(held) == b"ok"
    held.release()  # hands the connection to `woken`...
    woken.cancel()  # ...which goes before it runs
    with pytest.raises(asyncio.CancelledError):
        await woken
    _, data = await last
    assert data == b"ok"
    assert [h.split(b" ")[1] for h in server.heads] == [b"/held", b"/last"]
    assert pool.waiting_count == 0 and server.connections == 1


async def test_acquire_timeout_defaults_to_connect_timeout(serve):
    gate = asyncio.Event()
    server, pool = await serve(gated_handler(gate),
                               {"max_connections": 1, "connect_timeout": 0.2})
    assert pool.acquire_timeout == 0.2
    first = asyncio.create_task(fetch(pool))
    async with asyncio.timeout(IO):
        while not server.heads:
            await asyncio.sleep(0.01)
    with pytest.raises(PoolTimeout, match="busy for 0.2 s"):
        await fetch(pool)
    gate.set()
    await first
    assert UpstreamPool(server.url, connect_timeout=None).acquire_timeout is None
    with pytest.raises(ValueError, match="acquire_timeout"):
        UpstreamPool(server.url, acquire_timeout=-1)


async def test_closing_the_pool_fails_the_waiting_requests(serve):
    gate = asyncio.Event()
    server, pool = await serve(gated_handler(gate), {"max_connections": 1})
    first = asyncio.create_task(fetch(pool))
    async with asyncio.timeout(IO):
        while not server.heads:
            await asyncio.sleep(0.01)
    waiting = asyncio.create_task(fetch(pool))
    async with asyncio.timeout(IO):
        while pool.waiting_count < 1:
            await asyncio.sleep(0.01)
    await pool.close()
    with pytest.raises(ConnectError, match="closed"):
        await waiting  # an error, not a CancelledError out of a task nobody cancelled
    with pytest.raises((Disconnected, ConnectionFailed)):
        await first


async def test_idle_timeout_defaults_to_30_s(serve):
    server, pool = await serve(repeat_handler(OK))
    assert UpstreamPool(server.url).idle_timeout == 30.0


async def test_the_sweeper_closes_each_idle_connection_as_it_expires(serve):
    # Two idle connections, released 0.15 s apart: the older one is closed when its
    # 0.3 s are up, the younger one stays until its own time (not a sweep interval
    # later), and the upstream sees both closed.
    closed = []
    answer = asyncio.Event()

    async def handle(conn: Conn) -> None:
        head = await conn.head()
        if b"/later" in head:
            async with asyncio.timeout(IO):
                await answer.wait()
        await conn.send(OK)
        await conn.reader.read()  # until the client closes
        closed.append(head.split(b" ")[1])

    server, pool = await serve(handle, {"idle_timeout": 0.3})
    later = asyncio.create_task(fetch(pool, target="/later"))
    await fetch(pool, target="/now")
    await asyncio.sleep(0.15)
    answer.set()
    await later
    assert (pool.idle_count, pool.active_count) == (2, 0)
    async with asyncio.timeout(IO):
        while pool.idle_count == 2:
            await asyncio.sleep(0.005)
    assert pool.idle_count == pool.open_count == 1  # the younger one is still kept
    async with asyncio.timeout(IO):
        while pool.open_count or len(closed) < 2:
            await asyncio.sleep(0.01)
    assert closed == [b"/now", b"/later"]
    assert pool.idle_count == 0


async def test_idle_connections_expire(serve):
    server, pool = await serve(repeat_handler(OK), {"idle_timeout": 0.05})
    await fetch(pool)
    async with asyncio.timeout(IO):
        while pool.open_count:
            await asyncio.sleep(0.02)
    await fetch(pool)
    assert server.connections == 2


async def test_max_idle_limits_kept_connections(serve):
    gate = asyncio.Event()
    handle = gated_handler(gate)
    server, pool = await serve(handle, {"max_idle": 1})
    tasks = [asyncio.create_task(fetch(pool)) for _ in range(3)]
    async with asyncio.timeout(IO):
        while len(server.heads) < 3:
            await asyncio.sleep(0.01)
    gate.set()
    await asyncio.gather(*tasks)
    assert pool.idle_count == 1
    async with asyncio.timeout(IO):
        while pool.open_count > 1:
            await asyncio.sleep(0.01)


async def test_unread_body_closes_the_connection_on_release(serve):
    server, pool = await serve(repeat_handler(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"z" * 100000
    ))
    response = await pool.request("GET", "/", [("Host", "up")])
    response.release()
    assert pool.idle_count == 0
    await fetch(pool)
    assert server.connections == 2


# -- flow control ------------------------------------------------------------------------


async def test_large_body_is_read_with_bounded_buffering(serve):
    total = 64 * 1024 * 1024
    block = bytes(range(256)) * 256  # 64 KiB

    async def handle(conn: Conn) -> None:
        await conn.head()
        conn.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        for _ in range(total // len(block)):
            conn.writer.write(block)
            await conn.writer.drain()
        await conn.reader.read()

    server, pool = await serve(handle)
    response = await pool.request("GET", "/", [("Host", "up")])
    digest, size, biggest = hashlib.sha256(), 0, 0
    async with asyncio.timeout(IO * 3):
        while chunk := await response.read():
            digest.update(chunk)
            size += len(chunk)
            biggest = max(biggest, len(chunk))
            await asyncio.sleep(0)  # a consumer slower than the socket
    response.release()
    assert size == total
    assert digest.hexdigest() == hashlib.sha256(block * (total // len(block))).hexdigest()
    # What the client held at once stayed near its read buffer limit.
    assert biggest <= 2 * 1024 * 1024


async def test_reading_pauses_while_the_consumer_does_not_read(serve):
    # The upstream writes until its socket is full; it can only finish writing 32 MiB
    # if the client keeps reading. While the consumer reads nothing, the upstream's
    # writes stall (the client stopped reading the socket).
    total = 32 * 1024 * 1024
    written = [0]
    block = b"w" * 65536

    async def handle(conn: Conn) -> None:
        await conn.head()
        conn.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        for _ in range(total // len(block)):
            conn.writer.write(block)
            await conn.writer.drain()
            written[0] += len(block)
        await conn.reader.read()

    server, pool = await serve(handle)
    response = await pool.request("GET", "/", [("Host", "up")])
    async with asyncio.timeout(IO):
        while True:
            before = written[0]
            await asyncio.sleep(0.05)
            if written[0] == before:
                break
    assert written[0] < total
    assert response._buffered <= 2 * 1024 * 1024
    assert len(await read_all(response)) == total
    response.release()


# -- timeouts and connection errors ---------------------------------------------------------


async def test_no_response_head_within_timeout(serve):
    async def handle(conn: Conn) -> None:
        await conn.head()
        await conn.reader.read()  # never answers

    server, pool = await serve(handle, {"timeout": 0.2})
    with pytest.raises(ResponseTimeout, match="no response headers within 0.2 s"):
        await fetch(pool)
    assert pool.open_count == 0


async def test_silent_upstream_while_the_body_streams(serve):
    async def handle(conn: Conn) -> None:
        await conn.head()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfirst")
        await conn.reader.read()

    server, pool = await serve(handle, {"read_timeout": 0.2})
    response = await pool.request("GET", "/", [("Host", "up")])
    assert await response.read() == b"first"
    with pytest.raises(BodyError, match=r"^no body bytes from the upstream for 0.2 s "
                                        r"\(upstream.read_timeout\)$"):
        async with asyncio.timeout(IO):
            await response.read()
    response.release()
    assert pool.open_count == 0


def gap_handler(gap: float) -> Handler:
    """Answer each request with a body of two pieces, ``gap`` seconds apart."""

    async def handle(conn: Conn) -> None:
        while True:
            await conn.head()
            await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\na")
            await asyncio.sleep(gap)
            await conn.send(b"b")

    return handle


@pytest.mark.parametrize("read_timeout", [3.0, None])
async def test_a_body_quiet_for_longer_than_timeout_is_bounded_by_read_timeout(
    serve, read_timeout
):
    # `timeout` (0.3 s) bounds only the wait for the head; the 0.8 s gap in the body
    # is within read_timeout (3 s, or no limit at all).
    server, pool = await serve(gap_handler(0.8), {"timeout": 0.3, "read_timeout": read_timeout})
    for _ in range(2):
        response, data = await fetch(pool)
        assert (response.status, data) == (200, b"ab")
    assert server.connections == 1


async def test_read_timeout_per_request(serve):
    # The pool's read_timeout is 0.3 s; one request lifts it (None: no limit), the
    # next has the pool's again.
    server, pool = await serve(gap_handler(0.8), {"timeout": 0.3, "read_timeout": 0.3})
    async with asyncio.timeout(IO):
        response = await pool.request("GET", "/events", [("Host", "up")], read_timeout=None)
    try:
        assert await read_all(response) == b"ab"
    finally:
        response.release()
    async with asyncio.timeout(IO):
        response = await pool.request("GET", "/", [("Host", "up")], read_timeout=1.5)
    try:
        assert await read_all(response) == b"ab"
    finally:
        response.release()
    response = await pool.request("GET", "/", [("Host", "up")])
    try:
        assert await response.read() == b"a"
        with pytest.raises(BodyError, match=r"for 0.3 s \(upstream.read_timeout\)$"):
            async with asyncio.timeout(IO):
                await response.read()
    finally:
        response.release()
    assert server.connections == 1 and pool.open_count == 0  # timed out: closed


async def test_timeout_per_request(serve):
    # The upstream answers each request 0.8 s after its head; the pool's timeout is
    # 0.3 s. A longer (or no) timeout for one request lets it through.
    async def handle(conn: Conn) -> None:
        while True:
            await conn.head()
            await asyncio.sleep(0.8)
            await conn.send(OK)

    server, pool = await serve(handle, {"timeout": 0.3})
    for timeout in (2.0, None):
        async with asyncio.timeout(IO):
            response = await pool.request("GET", "/", [("Host", "up")], timeout=timeout)
        try:
            assert await read_all(response) == b"ok"
        finally:
            response.release()
    assert server.connections == 1
    with pytest.raises(ResponseTimeout, match=r"^no response headers within 0.3 s$"):
        async with asyncio.timeout(IO):
            await pool.request("GET", "/", [("Host", "up")])
    pool.timeout = IO
    with pytest.raises(ResponseTimeout, match=r"^no response headers within 0.2 s$"):
        async with asyncio.timeout(IO):
            await pool.request("GET", "/", [("Host", "up")], timeout=0.2)
    assert pool.open_count == 0


async def test_a_per_request_timeout_bounds_a_stalled_request_body(serve):
    total = 16 * 1024 * 1024
    done = asyncio.Event()

    async def handle(conn: Conn) -> None:
        await conn.head()
        async with asyncio.timeout(IO):
            await done.wait()

    server, pool = await serve(handle)  # the pool's timeout: IO

    async def body():
        for _ in range(total // 65536):
            yield b"s" * 65536

    with pytest.raises(SendTimeout, match=r"for 0.3 s \(upstream.timeout\)$"):
        async with asyncio.timeout(IO):
            await pool.request("PUT", "/", [("Host", "up"), ("Content-Length", str(total))],
                               body(), timeout=0.3)
    done.set()
    assert pool.open_count == 0


async def test_head_timeout_starts_once_the_body_is_sent(serve):
    # A slow client body (longer than the timeout) is not a response timeout.
    server, pool = await serve(repeat_handler(OK), {"timeout": 0.2})

    async def body():
        for _ in range(4):
            await asyncio.sleep(0.1)
            yield b"slow"

    _, data = await fetch(pool, "POST", "/", body=body())
    assert data == b"ok"
    assert server.bodies == [b"slow" * 4]


async def test_an_upstream_that_reads_none_of_the_body_is_a_send_timeout(serve):
    # The upstream reads the head, then nothing: once the socket buffers are full
    # the body can't move, and after `timeout` the exchange fails and the
    # connection is closed.
    total = 16 * 1024 * 1024
    produced = []
    done = asyncio.Event()

    async def handle(conn: Conn) -> None:
        await conn.head()
        async with asyncio.timeout(IO):
            await done.wait()

    server, pool = await serve(handle, {"timeout": 0.3})

    async def body():
        for _ in range(total // 65536):
            produced.append(65536)
            yield b"s" * 65536

    with pytest.raises(SendTimeout, match=r"^the upstream accepted none of the request "
                                          r"body for 0.3 s \(upstream.timeout\)$"):
        async with asyncio.timeout(IO):
            await pool.request("PUT", "/", [("Host", "up"), ("Content-Length", str(total))],
                               body())
    done.set()
    assert sum(produced) < total
    assert pool.open_count == 0 and pool.idle_count == 0


async def test_a_slow_but_steady_upload_is_never_cut(serve):
    # The upstream reads the first 8 MiB 128 KiB at a time with a pause in between:
    # that takes far longer than `timeout` (64 pauses of 20 ms against 0.25 s), but
    # each wait for the write buffer to drain is short. Then it reads the rest at
    # once: what sits in the socket buffers when the last byte is handed over must
    # reach it well within the response timeout, which starts then.
    total = 16 * 1024 * 1024

    async def handle(conn: Conn) -> None:
        await conn.head()
        received = 0
        async with asyncio.timeout(IO * 2):
            while received < total // 2:
                received += len(await conn.reader.read(128 * 1024))
                await asyncio.sleep(0.02)
            while received < total:
                received += len(await conn.reader.read(1 << 20))
        server.bodies.append(received)
        await conn.send(OK)
        await conn.reader.read()

    server, pool = await serve(handle, {"timeout": 0.25})

    async def body():
        for _ in range(total // 65536):
            yield b"u" * 65536

    response, data = await fetch(pool, "PUT", "/", [("Host", "up"),
                                                    ("Content-Length", str(total))], body())
    assert (response.status, data) == (200, b"ok")
    assert server.bodies == [total]
    assert pool.idle_count == 1  # sent whole, read whole: reusable


async def test_an_early_answer_while_the_upstream_reads_none_of_the_body(serve):
    # The upstream answers from the head and never reads the body: the answer comes
    # through whole (no SendTimeout once the head is in), the rest of the body is
    # not sent, and the connection is closed.
    total = 16 * 1024 * 1024
    done = asyncio.Event()

    async def handle(conn: Conn) -> None:
        await conn.head()
        await conn.send(b"HTTP/1.1 413 Too Big\r\nContent-Length: 3\r\n\r\nbig")
        async with asyncio.timeout(IO):
            await done.wait()

    server, pool = await serve(handle, {"timeout": 0.2})

    async def body():
        for _ in range(total // 65536):
            yield b"e" * 65536

    response = await pool.request("PUT", "/", [("Host", "up"), ("Content-Length", str(total))],
                                  body())
    assert (response.status, await read_all(response)) == (413, b"big")
    await asyncio.sleep(0.4)  # past the send timeout: nothing breaks
    assert response.at_eof
    response.release()
    done.set()
    assert pool.open_count == 0


async def test_connection_refused(serve):
    port = free_port()  # nothing listens there
    pool = UpstreamPool(f"http://127.0.0.1:{port}", connect_timeout=2, timeout=2)
    with pytest.raises(ConnectError, match="refused") as info:
        await pool.request("GET", "/", [("Host", "up")])
    assert isinstance(info.value.os_error, ConnectionRefusedError)
    await pool.close()


async def test_connect_timeout():
    with unconnectable_port() as port:
        pool = UpstreamPool(f"http://127.0.0.1:{port}", connect_timeout=0.2, timeout=2)
        with pytest.raises(ConnectTimeout, match="0.2 s"):
            await pool.request("GET", "/", [("Host", "up")])
        await pool.close()


async def test_reset_after_the_request(serve):
    async def handle(conn: Conn) -> None:
        await conn.head()
        conn.writer.transport.abort()

    server, pool = await serve(handle)
    with pytest.raises((Disconnected, ConnectionFailed)):
        await fetch(pool)


# -- https ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    where = tmp_path_factory.mktemp("tls")
    key, cert = where / "key.pem", where / "cert.pem"
    try:
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
             "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
             "-addext", "subjectAltName=IP:127.0.0.1"],
            check=True, capture_output=True, timeout=60,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"openssl could not make a test certificate: {exc}")
    return key, cert


async def test_https_upstream(serve, tls_files):
    key, cert = tls_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    server, pool = await serve(repeat_handler(OK), {"ssl": client_ctx}, ssl_context=server_ctx)
    for _ in range(3):
        _, data = await fetch(pool)
        assert data == b"ok"
    assert server.connections == 1


async def test_https_upstream_with_an_untrusted_certificate_is_a_connect_error(serve, tls_files):
    key, cert = tls_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    server, pool = await serve(repeat_handler(OK), ssl_context=server_ctx)
    with pytest.raises(ConnectError, match="(?i)certificate"):
        await fetch(pool)


async def test_an_upgrade_over_https_is_detached_as_a_tls_tunnel(serve, tls_files):
    key, cert = tls_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    server, pool = await serve(upgrade_handler(SWITCH + b"first"), {"ssl": client_ctx},
                               ssl_context=server_ctx)
    async with asyncio.timeout(IO):
        response = await pool.request("GET", "/ws", WS_HEADERS, upgrade=True)
    transport, first, tunnel = take_over(response)
    try:
        assert (response.status, first, pool.open_count) == (101, b"first", 0)
        transport.write(b"x" * 100000)  # more than one TLS record
        assert await tunnel.until(100000) == b"x" * 100000
    finally:
        await close_tunnel(transport, tunnel)


async def test_complete_and_at_eof(serve):
    server, pool = await serve(repeat_handler(OK))
    response = await pool.request("GET", "/", [("Host", "up")])
    async with asyncio.timeout(IO):
        while not response.complete:
            await asyncio.sleep(0.01)
    assert not response.at_eof  # the body is in, not yet read
    assert await response.read() == b"ok"
    assert response.at_eof
    assert await response.read() == b""
    response.release()
    assert pool.idle_count == 1


async def test_a_released_response_is_freed_without_the_cyclic_gc(serve):
    # No response <-> parser cycle is left behind: each request's objects go by
    # reference counting as soon as they are released, instead of piling up for
    # the garbage collector.
    import sys

    server, pool = await serve(repeat_handler(OK))
    for _ in range(2):
        response, data = await fetch(pool)
        assert data == b"ok"
        assert sys.getrefcount(response) == 2  # this name and getrefcount's argument


async def test_bare_lf_line_ends_and_trailing_value_whitespace(serve):
    # What aiohttp's client accepted stays accepted: LF without CR, and whitespace
    # after a value (not part of it, RFC 9110 §5.5), spaces after a chunk size.
    server, pool = await serve(keep_alive_handler([
        b"HTTP/1.1 200 OK\nX-Pad: value \t\nContent-Length: 2\n\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2  \r\nok\r\n0\r\n\r\n",
    ]))
    response, data = await fetch(pool)
    assert data == b"ok"
    assert response.raw_headers == [(b"X-Pad", b"value"), (b"Content-Length", b"2")]
    response, data = await fetch(pool)
    assert data == b"ok"
    assert server.connections == 1


@pytest.mark.parametrize("value", [b"a\x00b", b"a\x01b", b"a\rb"])
async def test_control_characters_in_a_header_value_are_invalid(serve, value):
    server, pool = await serve(keep_alive_handler([
        b"HTTP/1.1 200 OK\r\nX-Bad: " + value + b"\r\nContent-Length: 2\r\n\r\nok"
    ]))
    with pytest.raises(InvalidResponse):
        await fetch(pool)


# -- through the proxy: the whole-response fast path --------------------------------


@pytest.mark.parametrize("upstream_bytes", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nServer: up/1\r\n"
    b"Date: Mon, 01 Jan 2024 00:00:00 GMT\r\nVary: Accept\r\nAccess-Control-Allow-Origin: *\r\n"
    b"Content-Length: 2\r\n\r\n{}",
    b"HTTP/1.1 404 Not Here\r\nX-Caf: caf\xc3\xa9\r\nX-Bad: \xe9\r\n"
    b"Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 201 \r\nContent-Length: 1\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\nx",
])
async def test_whole_small_responses_are_byte_identical_to_the_streamed_path(
    serve, make_proxy, upstream_bytes, monkeypatch
):
    # A response that arrived whole with its head goes out as one precomputed write;
    # otherwise it is streamed. Both must send the same bytes (the Date value aside).
    import re

    from conftest import raw_response

    import corsproxy.httpserver
    import corsproxy.upstream

    taken = []
    whole = corsproxy.httpserver.Response.whole
    monkeypatch.setattr(corsproxy.httpserver.Response, "whole",
                        lambda *args: taken.append(1) or whole(*args))
    server, _ = await serve(repeat_handler(upstream_bytes))
    proxy = await make_proxy(
        cors={"allow_origins": ["https://app.example.com"], "allow_credentials": True,
              "expose_headers": ["X-Id"]},
        upstream_url=server.url,
    )
    origin = b"Origin: https://app.example.com\r\n"
    # One client-chosen request id for both, so the answers can be equal.
    request = b"GET /x HTTP/1.1\r\nHost: h\r\nX-Request-Id: same-id\r\n" + origin + b"\r\n"
    fast = await raw_response(proxy.port, request)
    monkeypatch.setattr(corsproxy.upstream.UpstreamResponse, "complete",
                        property(lambda self: False))
    streamed = await raw_response(proxy.port, request)

    def normal(data: bytes) -> bytes:
        return re.sub(rb"\r\nDate: [^\r]*GMT(?=\r\n)", b"\r\nDate: -", data)

    assert normal(fast) == normal(streamed)
    assert taken == [1]  # the first took the one-write path, the second did not
    assert b"\r\nAccess-Control-Allow-Origin: https://app.example.com\r\n" in fast
