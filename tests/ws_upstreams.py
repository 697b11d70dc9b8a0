"""Upstreams, proxies and raw clients for the WebSocket and streaming suites.

- :class:`WsUpstream`: an aiohttp server that records every request (raw header
  pairs) and answers by the *last segment* of the path, so a route prefix in
  front (``/public/echo``) changes nothing:

  ``echo``        WebSocket echo (text to text, binary to binary); a Close from the
                  client is recorded and answered with the same code and reason
  ``asym``        WebSocket: every message of n bytes is answered with 3n bytes
  ``ping``        WebSocket: sends a Ping ``b"up-ping"`` and records the Pong
  ``close-first`` WebSocket: sends ``"bye soon"``, then closes with 4002 "upstream done"
  ``hold``        WebSocket: says nothing; records how the connection ended
  ``tick``        WebSocket: sends ``"tick"`` every ``?every=`` seconds until closed
  ``push``        WebSocket: waits for ``"go <total> <size>"``, then sends ``total`` bytes
                  in binary messages of ``size`` (message i is ``size`` times byte
                  ``i % 251``), the socket's send buffer kept small; counts what it got
                  out in :attr:`Session.sent`
  ``not-ws``      a plain 404 "no socket here" with its own ``ACAO: *`` (a non-101
                  answer to a handshake)
  ``sse``         ``text/event-stream``: ``?n=`` events ``data: event <i>``, ``?gap=``
                  seconds apart (chunked), each write's time in :attr:`SseRun.sent_at`
  ``sse-acked``   like ``sse`` but event i+1 is only written once the test called
                  ``ack(i)`` (bounded wait; a missing ack is recorded)
  ``poll``        headers at once, then after ``?delay=`` s a Content-Length body
  ``slow-head``   the response headers after ``?delay=`` s
  anything else   200 ``plain``

- :class:`RawWsUpstream`: an asyncio server that answers a handshake with a 101
  itself, then hands the raw socket to a test-supplied coroutine (byte-exact
  tunnels, half-closes, an upstream that stops reading).
- :func:`uvicorn_server`: a FastAPI app (:func:`fastapi_app`) under uvicorn on a
  free loopback port, in this process.
- :func:`start_ws_proxy`: ``corsproxy.server.ProxyServer`` with any config
  (including the ``websocket:`` section), its access lines collected.
- Raw frames: :func:`frame`, :func:`read_frame`, :func:`handshake`,
  :func:`open_tunnel` (a raw handshake through the proxy on a
  :class:`hostile.Client`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
import yaml
from aiohttp import WSMsgType, web
from conftest import config_text
from fastapi import FastAPI, WebSocket
from hostile import Client, ProxyProcess, Response, new_id

from corsproxy.config import parse_config
from corsproxy.server import ProxyServer

APP = "https://app.example.com"
EVIL = "https://evil.example"
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: Bound on one wait in these suites.
IO = 10.0


def ws_accept(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + GUID).digest()).decode("ascii")


def new_key() -> str:
    return base64.b64encode(os.urandom(16)).decode("ascii")


# ---------------------------------------------------------------------------
# raw frames
# ---------------------------------------------------------------------------


def _xor(data: bytes, mask: bytes) -> bytes:
    if not data or mask == b"\0\0\0\0":
        return data
    n = len(data)
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def frame(payload: bytes | str, opcode: int = 0x2, *, fin: bool = True, mask: bytes | None = None,
          masked: bool = True, rsv: int = 0, length_form: int | None = None) -> bytes:
    """One WebSocket frame. ``masked``: a client frame (random key unless ``mask``);
    ``length_form`` forces the 7-bit (0), 16-bit (126) or 64-bit (127) length form."""
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    n = len(payload)
    form = length_form if length_form is not None else (0 if n < 126 else 126 if n < 65536 else 127)
    mbit = 0x80 if masked else 0
    if form == 0:
        head = struct.pack("!BB", first, mbit | n)
    elif form == 126:
        head = struct.pack("!BBH", first, mbit | 126, n)
    else:
        head = struct.pack("!BBQ", first, mbit | 127, n)
    if not masked:
        return head + payload
    key = mask if mask is not None else os.urandom(4)
    return head + key + _xor(payload, key)


def close_frame(code: int, reason: str = "", masked: bool = True) -> bytes:
    return frame(struct.pack("!H", code) + reason.encode(), 0x8, masked=masked)


@dataclass
class Frame:
    fin: bool
    opcode: int
    payload: bytes

    @property
    def close_code(self) -> int | None:
        return struct.unpack("!H", self.payload[:2])[0] if len(self.payload) >= 2 else None


def parse_frame(buf: bytes | bytearray) -> tuple[Frame, int] | None:
    """The first whole frame in ``buf`` and its size, or None."""
    if len(buf) < 2:
        return None
    b0, b1 = buf[0], buf[1]
    n = b1 & 0x7F
    pos = 2
    if n == 126:
        if len(buf) < 4:
            return None
        n = struct.unpack("!H", bytes(buf[2:4]))[0]
        pos = 4
    elif n == 127:
        if len(buf) < 10:
            return None
        n = struct.unpack("!Q", bytes(buf[2:10]))[0]
        pos = 10
    key = b""
    if b1 & 0x80:
        if len(buf) < pos + 4:
            return None
        key = bytes(buf[pos:pos + 4])
        pos += 4
    if len(buf) < pos + n:
        return None
    payload = bytes(buf[pos:pos + n])
    if key:
        payload = _xor(payload, key)
    return Frame(bool(b0 & 0x80), b0 & 0x0F, payload), pos + n


async def read_frame(client: Client, timeout: float = IO) -> Frame | None:
    """The next frame from a raw :class:`hostile.Client`; None when the connection
    ended first. TimeoutError after ``timeout``."""
    async with asyncio.timeout(timeout):
        while True:
            got = parse_frame(client.buf)
            if got is not None:
                del client.buf[:got[1]]
                return got[0]
            if not await client.read_some(timeout):
                return None


def handshake(path: str, host: str, *extra: str, key: str | None = None,
              origin: str | None = None, version: str = "13",
              connection: str = "Upgrade") -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Upgrade: websocket",
             f"Connection: {connection}", f"Sec-WebSocket-Key: {key or new_key()}",
             f"Sec-WebSocket-Version: {version}"]
    if origin is not None:
        lines.append(f"Origin: {origin}")
    lines += list(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def open_tunnel(port: int, path: str, *extra: str, origin: str | None = None,
                      host: str | None = None, key: str | None = None,
                      rcvbuf: int | None = None, limit: int = 2**22,
                      timeout: float = IO) -> tuple[Response, Client]:
    """A raw handshake through the proxy; returns the response head (and body, for
    a non-101) and the open connection (the caller closes it)."""
    client = await Client.open(port, rcvbuf=rcvbuf, limit=limit)
    try:
        await client.send(handshake(path, host or f"127.0.0.1:{port}", *extra, key=key,
                                    origin=origin))
        response = await client.response("GET", timeout)
        assert response is not None, "the proxy closed the connection without an answer"
    except BaseException:
        await client.aclose()
        raise
    return response, client


# ---------------------------------------------------------------------------
# the aiohttp upstream
# ---------------------------------------------------------------------------


@dataclass
class Seen:
    """One request as the upstream received it."""

    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    version: str
    at: float = field(default_factory=time.monotonic)

    def values(self, name: str) -> list[str]:
        key = name.lower()
        return [v for n, v in self.headers if n.lower() == key]

    def get(self, name: str) -> str | None:
        values = self.values(name)
        return values[0] if values else None


@dataclass
class Session:
    """One accepted WebSocket at the upstream."""

    request: Seen
    messages: list[Any] = field(default_factory=list)  # what the client sent (str/bytes)
    received_bytes: int = 0
    sent: int = 0
    close_code: int | None = None
    close_reason: str | None = None
    pong: bytes | None = None
    #: "close" (a Close frame came), "closed"/"error" (the connection just ended), "cancelled"
    end: str | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    ended_at: float | None = None
    finished_push: bool = False


WsHandler = Callable[[web.WebSocketResponse, Session, web.Request], Awaitable[None]]


@dataclass
class SseRun:
    path: str
    sent_at: list[float] = field(default_factory=list)
    acks: dict[int, asyncio.Event] = field(default_factory=dict)
    missing_acks: list[int] = field(default_factory=list)
    aborted: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)


def sse_event(i: int) -> bytes:
    return f"id: {i}\ndata: event {i}\n\n".encode()


class WsUpstream:
    def __init__(self) -> None:
        self.requests: list[Seen] = []
        self.sessions: list[Session] = []
        self.sse_runs: list[SseRun] = []
        self.port = 0
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._handlers: dict[str, WsHandler] = {
            "echo": self._echo, "asym": self._asym, "ping": self._ping,
            "close-first": self._close_first, "hold": self._hold, "tick": self._tick,
            "push": self._push,
        }

    async def start(self) -> WsUpstream:
        app = web.Application()
        app.router.add_route("*", r"/{path:[\s\S]*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0,
                                     handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- queries --------------------------------------------------------------------

    def seen(self, path: str) -> list[Seen]:
        return [r for r in self.requests if r.path == path]

    def sessions_for(self, path: str) -> list[Session]:
        return [s for s in self.sessions if s.request.path == path]

    async def wait_session(self, path: str, count: int = 1, timeout: float = IO) -> Session:
        async with asyncio.timeout(timeout):
            while len(self.sessions_for(path)) < count:
                await asyncio.sleep(0.005)
        return self.sessions_for(path)[count - 1]

    async def wait_request(self, path: str, timeout: float = IO) -> Seen:
        async with asyncio.timeout(timeout):
            while not self.seen(path):
                await asyncio.sleep(0.005)
        return self.seen(path)[0]

    def sse_run(self, path: str) -> SseRun:
        runs = [r for r in self.sse_runs if r.path == path]
        assert runs, f"no SSE request for {path} reached the upstream"
        return runs[-1]

    # -- handlers -------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        seen = Seen(
            request.method, request.path, request.query_string,
            [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers],
            f"{request.version.major}.{request.version.minor}",
        )
        self.requests.append(seen)
        kind = request.path.rsplit("/", 1)[-1]
        if kind == "not-ws":
            return web.Response(status=404, text="no socket here\n",
                                headers={"Access-Control-Allow-Origin": "*", "X-Upstream": "yes"})
        if kind in ("sse", "sse-acked"):
            return await self._sse(request, acked=kind == "sse-acked")
        if kind == "poll":
            return await self._poll(request)
        if kind == "slow-head":
            await asyncio.sleep(float(request.query.get("delay", "0.6")))
            return web.Response(text="late head\n")
        handler = self._handlers.get(kind)
        if handler is None or request.headers.get("Upgrade", "").lower() != "websocket":
            return web.Response(text="plain\n")
        ws = web.WebSocketResponse(
            protocols=("chat.v2",), autoclose=False, autoping=kind != "ping", max_msg_size=0,
            compress=True,
        )
        ws.headers["X-Upstream-Ws"] = "yes"
        await ws.prepare(request)
        session = Session(seen)
        self.sessions.append(session)
        try:
            await handler(ws, session, request)
        except asyncio.CancelledError:
            session.end = session.end or "cancelled"
            raise
        except ConnectionError:
            session.end = session.end or "error"
        finally:
            session.ended_at = time.monotonic()
            session.ended.set()
        return ws

    async def _receive(self, ws: web.WebSocketResponse, session: Session) -> Any:
        """The next data message (str/bytes), or None once the socket ended (recorded)."""
        while True:
            msg = await ws.receive()
            if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                session.messages.append(msg.data)
                session.received_bytes += len(msg.data)
                return msg.data
            if msg.type == WSMsgType.PONG:
                session.pong = msg.data
                continue
            if msg.type == WSMsgType.PING:
                await ws.pong(msg.data)
                continue
            if msg.type == WSMsgType.CLOSE:
                session.close_code, session.close_reason = msg.data, msg.extra
                session.end = "close"
                with contextlib.suppress(Exception):
                    await ws.close(code=msg.data or 1000, message=(msg.extra or "").encode())
                return None
            session.end = "error" if msg.type == WSMsgType.ERROR else "closed"
            return None

    async def _echo(self, ws: web.WebSocketResponse, session: Session,
                    request: web.Request) -> None:
        while (data := await self._receive(ws, session)) is not None:
            if isinstance(data, str):
                await ws.send_str(data)
            else:
                await ws.send_bytes(data)

    async def _asym(self, ws: web.WebSocketResponse, session: Session,
                    request: web.Request) -> None:
        while (data := await self._receive(ws, session)) is not None:
            await ws.send_bytes(b"d" * (3 * len(data)))

    async def _ping(self, ws: web.WebSocketResponse, session: Session,
                    request: web.Request) -> None:
        await ws.ping(b"up-ping")
        await self._echo(ws, session, request)

    async def _close_first(self, ws: web.WebSocketResponse, session: Session,
                           request: web.Request) -> None:
        await ws.send_str("bye soon")
        await ws.close(code=4002, message=b"upstream done")
        session.end = "closed-by-upstream"

    async def _hold(self, ws: web.WebSocketResponse, session: Session,
                    request: web.Request) -> None:
        while await self._receive(ws, session) is not None:
            pass

    async def _tick(self, ws: web.WebSocketResponse, session: Session,
                    request: web.Request) -> None:
        every = float(request.query.get("every", "0.15"))
        reader = asyncio.ensure_future(self._hold(ws, session, request))
        try:
            while not reader.done():
                await asyncio.wait({reader}, timeout=every)
                if not reader.done():
                    await ws.send_str("tick")
        finally:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader

    async def _push(self, ws: web.WebSocketResponse, session: Session,
                    request: web.Request) -> None:
        transport = request.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        go = await self._receive(ws, session)
        if go is None:
            return
        _, total, size = str(go).split()
        total_n, size_n = int(total), int(size)
        i = 0
        while session.sent < total_n:
            await ws.send_bytes(bytes([i % 251]) * size_n)
            session.sent += size_n
            i += 1
        session.finished_push = True
        await self._hold(ws, session, request)

    async def _sse(self, request: web.Request, acked: bool) -> web.StreamResponse:
        n = int(request.query.get("n", "3"))
        gap = float(request.query.get("gap", "0.6"))
        run = SseRun(request.path)
        self.sse_runs.append(run)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-store"})
        response.enable_chunked_encoding()
        try:
            await response.prepare(request)
            for i in range(1, n + 1):
                if i > 1:
                    if acked:
                        event = run.acks.setdefault(i - 1, asyncio.Event())
                        try:
                            async with asyncio.timeout(3.0):
                                await event.wait()
                        except TimeoutError:
                            run.missing_acks.append(i - 1)
                    else:
                        await asyncio.sleep(gap)
                await response.write(sse_event(i))
                run.sent_at.append(time.monotonic())
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            run.aborted = True
            raise
        finally:
            run.done.set()
        return response

    def ack(self, path: str, i: int) -> None:
        self.sse_run(path).acks.setdefault(i, asyncio.Event()).set()

    async def _poll(self, request: web.Request) -> web.StreamResponse:
        delay = float(request.query.get("delay", "0.6"))
        body = b'{"news": true}\n'
        response = web.StreamResponse(headers={"Content-Type": "application/json",
                                               "Content-Length": str(len(body))})
        await response.prepare(request)
        await asyncio.sleep(delay)
        await response.write(body)
        await response.write_eof()
        return response


@contextlib.asynccontextmanager
async def ws_upstream() -> AsyncIterator[WsUpstream]:
    server = await WsUpstream().start()
    try:
        yield server
    finally:
        await server.close()


# ---------------------------------------------------------------------------
# a raw upstream: 101 by hand, then the socket is the test's
# ---------------------------------------------------------------------------

RawTunnel = Callable[[asyncio.StreamReader, asyncio.StreamWriter, bytes], Awaitable[None]]


class RawWsUpstream:
    """Answers each handshake with a 101 (``Sec-WebSocket-Accept`` computed, the
    requested first subprotocol chosen), then runs ``tunnel(reader, writer, head)``.
    ``rcvbuf`` is the accepted sockets' SO_RCVBUF (a small one makes an upstream
    that stops reading push back quickly)."""

    def __init__(self, tunnel: RawTunnel, rcvbuf: int | None = None) -> None:
        self.tunnel = tunnel
        self.rcvbuf = rcvbuf
        self.heads: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.url = ""
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> RawWsUpstream:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.bind(("127.0.0.1", 0))
        self.server = await asyncio.start_server(self._conn, sock=sock, limit=2**16)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.heads.append(head)
            key = ""
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"sec-websocket-key":
                    key = value.strip().decode("latin-1")
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
                + ws_accept(key).encode() + b"\r\n\r\n"
            )
            await writer.drain()
            await self.tunnel(reader, writer, head)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()


# ---------------------------------------------------------------------------
# FastAPI under uvicorn
# ---------------------------------------------------------------------------


@dataclass
class FastApiRecord:
    handshakes: list[dict[str, str]] = field(default_factory=list)
    disconnects: list[tuple[int, str | None]] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)


def fastapi_app(record: FastApiRecord) -> FastAPI:
    # FastAPI resolves the (string) annotations in this module's globals: WebSocket
    # must be a module-level name.
    app = FastAPI()

    @app.websocket("/fa/echo")
    async def echo(ws: WebSocket) -> None:
        record.handshakes.append(dict(ws.headers))
        offered = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",")]
        await ws.accept(subprotocol="chat.v1" if "chat.v1" in offered else None)
        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    record.disconnects.append((message.get("code", 1005), message.get("reason")))
                    return
                if message.get("text") is not None:
                    await ws.send_text(message["text"])
                else:
                    await ws.send_bytes(message["bytes"])
        finally:
            record.ended.set()

    @app.websocket("/fa/close")
    async def close(ws: WebSocket) -> None:
        record.handshakes.append(dict(ws.headers))
        await ws.accept()
        await ws.send_text("closing")
        await ws.close(code=4003, reason="fastapi done")
        record.ended.set()

    @app.get("/fa/plain")
    async def plain() -> dict[str, bool]:
        return {"plain": True}

    return app


@contextlib.asynccontextmanager
async def uvicorn_server(app: Any) -> AsyncIterator[str]:
    """``app`` under uvicorn (websockets' sans-I/O implementation, no lifespan, no
    logging setup) on a free loopback port in this event loop; yields its URL."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, ws="websockets-sansio", lifespan="off",
        log_config=None, log_level="warning", access_log=False, ws_max_size=64 * 2**20,
        ws_ping_interval=None, timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(IO):
            while not server.started:
                if task.done():
                    task.result()
                    raise AssertionError("uvicorn stopped before it started")
                await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        try:
            async with asyncio.timeout(IO):
                await task
        finally:
            sock.close()


# ---------------------------------------------------------------------------
# proxies
# ---------------------------------------------------------------------------


def config_dict(upstream_url: str, *, cors: dict | None = None, routes: list | None = None,
                listen: dict | None = None, upstream: dict | None = None,
                websocket: dict | None = None) -> dict[str, Any]:
    data = yaml.safe_load(config_text(upstream_url, cors, routes, listen, upstream))
    if websocket is not None:
        data["websocket"] = websocket
    return data


class WsProxy:
    """An in-process ``ProxyServer`` whose access lines are collected in :attr:`lines`."""

    def __init__(self, server: ProxyServer, port: int, lines: list[str]) -> None:
        self.server = server
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.ws_url = f"ws://127.0.0.1:{port}"
        self.lines = lines
        self.host = f"127.0.0.1:{port}"

    def records(self) -> list[dict]:
        out = []
        for line in list(self.lines):
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    out.append(record)
        return out

    def for_path(self, path: str) -> list[dict]:
        return [r for r in self.records() if r.get("path") == path]

    async def wait_record(self, predicate: Callable[[dict], bool], timeout: float = IO,
                          what: str = "a matching access line") -> dict:
        try:
            async with asyncio.timeout(timeout):
                while True:
                    for record in self.records():
                        if predicate(record):
                            return record
                    await asyncio.sleep(0.01)
        except TimeoutError:
            raise AssertionError(f"no {what} within {timeout} s; lines:\n"
                                 + "\n".join(self.lines[-30:])) from None

    async def tunnel_record(self, path: str, timeout: float = IO) -> dict:
        """The access line of the (first) tunnel on ``path``, once it was written."""
        return await self.wait_record(
            lambda r: r.get("path") == path and r.get("status") == 101, timeout,
            f"access line with status 101 for {path}",
        )

    async def close(self) -> None:
        await self.server.stop(2.0)


class _AccessCapture(logging.Handler):
    """Collects ``corsproxy.access`` records, for an implementation that logs tunnel
    lines through the logger rather than the server's writer."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__(logging.INFO)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextlib.asynccontextmanager
async def ws_proxies() -> AsyncIterator[Callable[..., Awaitable[WsProxy]]]:
    """``start(upstream_url, cors=..., routes=..., listen=..., upstream=..., websocket=...,
    log_format="json")``; every proxy is stopped at the end."""
    access = logging.getLogger("corsproxy.access")
    old_level = access.level
    access.setLevel(logging.INFO)
    started: list[WsProxy] = []
    handlers: list[logging.Handler] = []

    async def start(upstream_url: str, log_format: str = "json", **sections: Any) -> WsProxy:
        text = yaml.safe_dump(config_dict(upstream_url, **sections), sort_keys=False)
        config = parse_config(text, "test-config.yaml")
        lines: list[str] = []
        handler = _AccessCapture(lines)
        access.addHandler(handler)
        handlers.append(handler)
        server = ProxyServer(config, log_format=log_format, write_access=lines.append)
        _, port = await server.start()
        proxy = WsProxy(server, port, lines)
        started.append(proxy)
        return proxy

    try:
        yield start
    finally:
        for proxy in started:
            await proxy.close()
        for handler in handlers:
            access.removeHandler(handler)
        access.setLevel(old_level)


def proxy_process(directory: Path, upstream_url: str, **sections: Any) -> ProxyProcess:
    """``python -m corsproxy run --config FILE --log-format json`` with any config
    (the ``websocket:`` section too), started; the caller kills it."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"corsproxy-{new_id()}.yaml"
    path.write_text(yaml.safe_dump(config_dict(upstream_url, **sections), sort_keys=False))
    return ProxyProcess(path).start()
