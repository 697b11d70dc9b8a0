"""The proxy's HTTP/1.1 server: one :class:`asyncio.Protocol` per client connection,
llhttp (through :mod:`httptools`) as the parser, every wait bounded by a timer.

Why not aiohttp's server: a production front door needs a deadline on every phase
of a connection (aiohttp has none for a request head, so a silent or dribbling
client holds a connection for an hour), a bound on the whole request head (431),
header bytes passed through untouched (aiohttp decodes them), strict request lines
(aiohttp echoes ``HTTP/2.0`` and answers ``HTTP/0.9``) and a graceful stop to the
second. Those live in the read loop itself, so the loop is ours. It is small: the
parser does the framing; this module moves bytes and runs timers; the rules about
request targets and Host live in :mod:`corsproxy._wire` as pure functions; what to
answer lives in :mod:`corsproxy.server`.

A connection's life, and the timer that owns each wait (``listen.*`` keys)::

    open ──► HEAD ──► request ──► response ──► IDLE ──► HEAD ...
             header_timeout  body_timeout  send_timeout  keepalive_timeout

- **HEAD**: from the connection's start (or the first byte after an idle spell),
  the whole request head must arrive within ``header_timeout``: 408 and close
  when bytes came, a silent close when none did. A head over ``max_header_size``
  bytes gets 431 and close; at most that plus one socket read is ever buffered.
- **request**: the head is checked (version, target, Host, framing) and handed to
  the application (:class:`corsproxy.server.Proxy`): either answered at once from
  bytes it has ready (a cached preflight) or in a task. The body arrives through
  :class:`RequestBody`, which stops reading the socket while its buffer is full;
  a reader that waits ``body_timeout`` for a byte gets :class:`ClientError`.
- **response**: written through :class:`Response`; each wait for the client to
  take more bytes is bounded by ``send_timeout``, after which the connection is
  aborted. A response whose request body was not read to its end closes the
  connection (``Connection: close``; the rest of the body is read and dropped
  for up to :data:`LINGER` seconds first, so the client sees the answer rather
  than a reset).
- **IDLE**: a keep-alive connection with nothing to do is closed after
  ``keepalive_timeout``. Pipelined requests are answered in order; the socket is
  not read while more than one is waiting.

Errors the server answers itself, without the application: 400 for what the parser
refuses (bad syntax or framing, smuggling attempts such as Content-Length with
Transfer-Encoding), 431, 505 for any version but HTTP/1.0 and 1.1, 408. They carry
no CORS headers (there is no request to decide on), and always close the connection.

:meth:`HttpServer.shutdown` stops listening, closes idle connections at once, lets
busy ones finish their current response (then closes them) for up to the grace
period, then cuts what is left (cancelling its task, so the application logs it).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import httptools

from ._sockets import unsent_bytes
from ._wire import date_line, reason_phrase

__all__ = [
    "LINGER",
    "Application",
    "ClientError",
    "HttpServer",
    "Limits",
    "Request",
    "RequestBody",
    "Response",
]

#: Seconds the rest of an unread request body is read and dropped before closing.
LINGER = 2.0
#: Request body bytes buffered before the socket stops being read.
BODY_HIGH_WATER = 256 * 1024
_CRLF = b"\r\n"
_START = 1024  # bytes of a head kept to read its request line


@dataclass(frozen=True)
class Limits:
    """The ``listen.*`` bounds (seconds and bytes); see the module docstring."""

    header_timeout: float = 10.0
    keepalive_timeout: float = 75.0
    body_timeout: float = 60.0
    send_timeout: float = 60.0
    max_header_size: int = 32 * 1024


class ClientError(Exception):
    """The client side of an exchange failed (went away, timed out, sent a broken
    body); ``str()`` says how, naming the ``listen.*`` key when a timer fired.
    ``timed_out``: the client went silent (``listen.body_timeout``: a 408)."""

    def __init__(self, message: str, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class Application(Protocol):
    """What the server needs from the proxy."""

    def fast(self, request: Request) -> bytes | None:
        """A whole response, ready to write, or None: then :meth:`serve` runs."""

    def serve(self, request: Request, response: Response) -> Awaitable[None]:
        """Answer ``request`` through ``response``."""

    def refuse(self, request: Request, status: int, message: str) -> bytes:
        """A whole response for a request the server refuses after its head was
        parsed (the application adds CORS headers and logs it)."""

    def log_refusal(self, remote: str | None, status: int, message: str) -> bytes:
        """Log a refusal made before any request could be parsed (408, 431, 505...);
        returns header lines (each ending in CRLF) for the answer, e.g. its request id."""


class Request:
    """One parsed request head. Names and values are latin-1 text (bytes 1:1)."""

    __slots__ = (
        "method",
        "target",
        "version",
        "headers",
        "keep_alive",
        "has_body",
        "content_length",
        "expect_continue",
        "upgrade",
        "remote",
        "body",
        "conn",
        "started",
        "checked_target",
        "refusal",
        "request_id",
    )

    def __init__(self, conn: Connection, method: str, target: str, version: str,
                 headers: list[tuple[str, str]], keep_alive: bool, has_body: bool,
                 content_length: int | None) -> None:
        self.conn = conn
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive
        self.has_body = has_body
        self.content_length = content_length
        self.expect_continue = False
        self.upgrade = False
        self.remote = conn.remote
        self.body = RequestBody(conn, self, has_body)
        self.started = time.perf_counter()  # uvloop's loop.time() has 1 ms steps
        #: The origin-form target the application checked and will forward.
        self.checked_target: str | None = None
        #: (status, message) when the server refuses it (answered in its turn).
        self.refusal: tuple[int, str] | None = None
        #: The application's id for this request (``X-Request-Id``), once it chose one.
        self.request_id: str | None = None

    def get(self, lower_name: str) -> str | None:
        for name, value in self.headers:
            if len(name) == len(lower_name) and name.lower() == lower_name:
                return value
        return None

    def get_all(self, lower_name: str) -> list[str]:
        return [v for n, v in self.headers
                if len(n) == len(lower_name) and n.lower() == lower_name]

    @property
    def scheme(self) -> str:
        return self.conn.server.scheme


class RequestBody:
    """The request body as it arrives: ``await read()`` gives the next piece,
    ``b""`` at its end; raises :class:`ClientError` when the client goes away,
    sends a broken body, or is silent for ``listen.body_timeout`` seconds."""

    __slots__ = ("conn", "request", "chunks", "buffered", "complete", "error", "size",
                 "timed_out", "_waiter", "_continued")

    def __init__(self, conn: Connection, request: Request, has_body: bool) -> None:
        self.conn = conn
        self.request = request
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.complete = not has_body
        self.error: str | None = None
        self.timed_out = False
        self.size = 0
        self._waiter: asyncio.Future[None] | None = None
        self._continued = False

    def _feed(self, data: bytes) -> None:
        self.chunks.append(data)
        self.buffered += len(data)
        self.size += len(data)
        if self.buffered >= BODY_HIGH_WATER:
            self.conn._pause_reading("body")
        self._wake()

    def _end(self) -> None:
        self.complete = True
        self._wake()

    def _fail(self, error: str) -> None:
        if not self.complete and self.error is None:
            self.error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def read(self) -> bytes:
        conn = self.conn
        while True:
            if self.chunks:
                data = self.chunks.popleft() if len(self.chunks) == 1 else b"".join(self.chunks)
                self.chunks.clear()
                self.buffered = 0
                conn._resume_reading("body")
                return data
            if self.error is not None:
                raise ClientError(self.error, self.timed_out)
            if self.complete:
                return b""
            if self.request.expect_continue and not self._continued:
                self._continued = True
                conn._write(b"HTTP/1.1 100 Continue\r\n\r\n")
            waiter = self._waiter = conn.loop.create_future()
            timeout = conn.limits.body_timeout
            handle = conn.loop.call_later(timeout, self._timed_out, waiter, timeout)
            try:
                await waiter
            finally:
                handle.cancel()

    def _timed_out(self, waiter: asyncio.Future[None], timeout: float) -> None:
        if self._waiter is waiter and not waiter.done():
            self.timed_out = not self.complete and self.error is None
            self._fail(f"no request body bytes from the client for {timeout:g} s "
                       f"(listen.body_timeout)")

    @property
    def continued(self) -> bool:
        """True once ``100 Continue`` was sent."""
        return self._continued


class Response:
    """The response to one request, written by the application: either
    :meth:`whole` once, or :meth:`start`, :meth:`send` and :meth:`end`.

    Framing: with ``length`` (a Content-Length the headers already carry) the body
    is sent as is; otherwise HTTP/1.1 clients get chunked encoding (after the
    ``codings`` given, e.g. ``gzip``) and HTTP/1.0 clients a body delimited by the
    connection closing. ``Date`` is added unless present; ``Connection`` is set by
    the server (``close`` or, for HTTP/1.0, ``keep-alive``)."""

    __slots__ = ("conn", "request", "status", "started", "finished", "chunked", "sent",
                 "_pending", "_no_body")

    def __init__(self, conn: Connection, request: Request) -> None:
        self.conn = conn
        self.request = request
        self.status: int | None = None
        self.started = False
        self.finished = False
        self.chunked = False
        self.sent = 0  # body bytes written (before chunked framing)
        self._pending: bytes | None = None
        self._no_body = False

    def whole(self, data: bytes, status: int) -> None:
        """Write a whole response rendered by the application: the head (ending in
        the blank line) and the body, with Content-Length. The server puts its
        ``Connection`` line in front of the blank line."""
        self.status = status
        self.started = self.finished = True
        self.conn._whole(self.request, data)

    def start(self, status: int, head_lines: bytes, *, has_date: bool, length: bool,
              codings: str | None = None, no_body: bool = False) -> None:
        """Prepare the head; it is sent with the first body bytes. ``head_lines`` is
        the status line and the header lines, each ending in CRLF. ``length``: the
        headers carry the body's Content-Length. ``codings``: transfer codings the
        body already has (e.g. ``gzip``), kept in front of the server's own framing.
        ``no_body``: the status has no body (1xx, 204, 304)."""
        request = self.request
        conn = self.conn
        self.status = status
        self.started = True
        extra = [] if has_date else [date_line()]
        self._no_body = no_body = no_body or request.method == "HEAD"
        keep = conn._keep_alive_after(request)
        if not no_body and not length:
            if request.version == "1.1":
                self.chunked = True
                te = f"{codings}, chunked" if codings else "chunked"
                extra.append(f"Transfer-Encoding: {te}\r\n".encode("latin-1"))
            else:  # HTTP/1.0: the end of the body is the end of the connection
                keep = False
                if codings:
                    extra.append(f"Transfer-Encoding: {codings}\r\n".encode("latin-1"))
        if not keep:
            conn.must_close = True
            extra.append(b"Connection: close\r\n")
        elif request.version == "1.0":
            extra.append(b"Connection: keep-alive\r\n")
        self._pending = head_lines + b"".join(extra) + _CRLF

    async def send(self, data: bytes) -> None:
        """Body bytes (waits while the client is slow, up to ``listen.send_timeout``)."""
        if not data:
            return
        conn = self.conn
        if conn.state == _CLOSED:
            raise ClientError("the client closed the connection")
        if self._no_body:
            data = b""
        else:
            self.sent += len(data)
            if self.chunked:
                data = b"%x\r\n%b\r\n" % (len(data), data)
        pending = self._pending
        if pending is not None:
            self._pending = None
            data = pending + data
        conn._write(data)
        await conn._drain()

    async def end(self, data: bytes = b"") -> None:
        """The last body bytes (if any) and the end of the response."""
        conn = self.conn
        if conn.state == _CLOSED:
            raise ClientError("the client closed the connection")
        if self._no_body:
            data = b""
        else:
            self.sent += len(data)
            if self.chunked:
                data = (b"%x\r\n%b\r\n0\r\n\r\n" % (len(data), data)) if data else b"0\r\n\r\n"
        pending = self._pending
        if pending is not None:
            self._pending = None
            data = pending + data
        self.finished = True
        if data:
            conn._write(data)
        await conn._drain()

    def abort(self) -> None:
        """Cut the connection: the client sees an incomplete response."""
        self.conn.abort()

    def switch(self, head: bytes, tunnel: Any) -> bytes:
        """Send a ``101 Switching Protocols`` head (status line and headers ending in
        the blank line) and make the connection ``tunnel``'s; returns the bytes the
        client sent after its request head."""
        conn = self.conn
        self.status = 101
        self.started = self.finished = True
        conn.must_close = True
        conn._cancel_timer()
        conn._write(head)
        conn.tunnel = tunnel
        tail, conn.upgrade_tail = conn.upgrade_tail, b""
        return tail


# Connection states.
_NEW, _BUSY, _IDLE, _CLOSED = range(4)


class Connection(asyncio.Protocol):
    """One client connection (see the module docstring)."""

    __slots__ = (
        "server",
        "app",
        "loop",
        "limits",
        "transport",
        "remote",
        "state",
        "parser",
        "must_close",
        "_timer",
        "_timer_kind",
        "_url",
        "_head_size",
        "_head_seen",
        "_began",
        "_in_head",
        "_start",
        "_headers",
        "_current",
        "_queue",
        "_task",
        "_paused",
        "_write_paused",
        "_drain_waiter",
        "_linger",
        "_got_bytes",
        "tunnel",
        "upgrade_tail",
    )

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.app = server.app
        self.loop = server.loop
        self.limits = server.limits
        self.transport: asyncio.Transport | None = None
        self.remote: str | None = None
        self.state = _NEW
        self.parser = httptools.HttpRequestParser(self)
        self.must_close = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_kind = ""
        self._url: list[bytes] = []
        self._head_size = 0
        self._head_seen = 0
        self._began = 0
        self._in_head = False
        self._start = b""
        self._headers: list[tuple[str, str]] = []
        self._current: Request | None = None  # the request whose body is being parsed
        self._queue: deque[Request] = deque()  # requests waiting for their turn
        self._task: asyncio.Task[None] | None = None
        self._paused: set[str] = set()
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._linger = False
        self._got_bytes = False
        #: A :class:`corsproxy.websocket.Tunnel` once the connection is one.
        self.tunnel: Any = None
        #: Bytes that came after an upgrade request's head (the first tunnel bytes).
        self.upgrade_tail = b""

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) and peer else None
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # pragma: no cover - best effort
                pass
        self.server.connections.add(self)
        self._set_timer("header", self.limits.header_timeout)

    def data_received(self, data: bytes) -> None:
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.from_client(data)
            return
        if self.state == _CLOSED:
            return
        if self._linger:
            return  # the rest of an unread body: dropped
        self._got_bytes = True
        # Between messages (not in a head, not in a body): this chunk starts a head.
        between = not self._in_head and self._current is None
        self._began = 0
        # The start of a head, to tell "GET / HTTP/0.9" (505) from "GET /" (400).
        if between:
            self._start = data[:_START]
        elif self._in_head and len(self._start) < _START:
            self._start += data[:_START]
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # A complete request asking for another protocol (or CONNECT): it was
            # handed on already; what follows its head belongs to the new protocol
            # (kept for a WebSocket tunnel) and nothing more is parsed.
            self.must_close = True
            self._pause_reading("upgrade")
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
            self.upgrade_tail = data[offset:]
            return
        except httptools.HttpParserError as exc:
            self._parse_error(exc)
            return
        if self._in_head and self.state != _CLOSED:
            # Bytes of an unfinished head: a bound on what the parser holds for it
            # (exact when the chunk started it; a later chunk counts whole).
            if not self._began:
                self._head_seen += len(data)
            else:
                self._head_seen = len(data) if between and self._began == 1 else 0
            if self._head_seen > self.limits.max_header_size:
                self._refuse_head(431, f"request head over listen.max_header_size "
                                       f"({self.limits.max_header_size} bytes)")

    def eof_received(self) -> bool:
        if self.transport is not None and self.transport.get_extra_info("sslcontext"):
            # TLS has no half-close: the client's close_notify ends the connection.
            if self.tunnel is not None:
                self.tunnel.lost("client")
            return False
        if self.tunnel is not None:
            return self.tunnel.client_eof()
        current = self._current
        if current is not None and not current.body.complete:
            current.body._fail("the client closed the connection before the body's end")
        if self._task is None and not self._queue:
            self.close()
            return False
        # Half-closed by the client: answer what was asked, then close.
        self.must_close = True
        return True

    def connection_lost(self, exc: BaseException | None) -> None:
        self.state = _CLOSED
        self._cancel_timer()
        self.server.connections.discard(self)
        current = self._current
        if current is not None:
            current.body._fail("the client closed the connection before the body's end")
        for request in self._queue:
            request.body._fail("the client closed the connection")
        if self.tunnel is not None:
            self.tunnel.lost("client")
        task = self._task
        if (task is not None and not task.done() and not self.server.closing
                and self.tunnel is None):
            task.cancel()  # nobody is left to answer: stop the upstream exchange too
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_exception(ClientError("the client closed the connection"))

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.tunnel is not None:
            self.tunnel.upstream_reading(False)

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.tunnel is not None:
            self.tunnel.upstream_reading(True)
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- parser callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._began += 1
        self._in_head = True
        if self.state in (_NEW, _IDLE):
            # The whole head must come within header_timeout of its first byte.
            if self.state == _IDLE:
                self._set_timer("header", self.limits.header_timeout)
            self.state = _BUSY
        self._url = []
        self._headers = []
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        self._head_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        # llhttp drops the whitespace before a value but not after (RFC 9110 §5.5).
        self._headers.append((name.decode("latin-1"), value.rstrip(b" \t").decode("latin-1")))

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self.state == _CLOSED:
            raise _Stop
        parser = self.parser
        version = parser.get_http_version()
        method = parser.get_method().decode("latin-1")
        target = b"".join(self._url).decode("latin-1")
        head_size = self._head_size + len(method) + 12
        if head_size > self.limits.max_header_size:
            self._refuse_head(431, f"request head of {head_size} bytes is over "
                                   f"listen.max_header_size ({self.limits.max_header_size})")
            raise _Stop
        if version not in ("1.1", "1.0"):
            if version == "0.9" and b" HTTP/" not in self._start.partition(b"\n")[0]:
                # "GET /" with no version at all: an HTTP/0.9 request line.
                self._refuse_head(400, "request line without an HTTP version (HTTP/0.9); "
                                       "send HTTP/1.1")
            else:
                self._refuse_head(505, f"HTTP/{version} is not supported; use HTTP/1.1")
            raise _Stop
        self._start = b""
        headers = self._headers
        content_length: int | None = None
        chunked = False
        expect: str | None = None
        codings: list[str] = []
        for name, value in headers:
            key = name.lower()
            if key == "content-length":
                content_length = int(value)  # llhttp checked it: digits, one value
            elif key == "transfer-encoding":
                chunked = True
                codings += (c.strip(" \t").lower() for c in value.split(","))
            elif key == "expect":
                expect = value
        has_body = chunked or bool(content_length)
        request = Request(self, method, target, version, headers,
                          parser.should_keep_alive(), has_body, content_length)
        if self._timer_kind == "header":
            self._cancel_timer()
        if chunked and version == "1.0":
            # RFC 9112 §6.1: a server MUST treat such a message as faulty and close.
            self.must_close = True
            self._refuse(request, 400, "Transfer-Encoding in an HTTP/1.0 request is not "
                                       "allowed (RFC 9112 §6.1); send Content-Length")
            raise _Stop
        if chunked and (codings[-1] != "chunked" or "" in codings):
            # RFC 9112 §6.3: the body's length can't be known; 400 and close. (Checked
            # here, before the request is handed on: llhttp says so only afterwards.)
            self.must_close = True
            self._refuse(request, 400, "Transfer-Encoding must end in chunked; send the body "
                                       "chunked or with Content-Length")
            raise _Stop
        if chunked and len(codings) > 1:
            # RFC 9112 §6.1: a transfer coding the server does not understand: 501.
            self.must_close = True
            self._refuse(request, 501, f"transfer coding {codings[0]!r} is not supported; "
                                       f"send the body with Transfer-Encoding: chunked only")
            raise _Stop
        if expect is not None and has_body and version == "1.1" \
                and expect.lower() == "100-continue":
            request.expect_continue = True
        self._current = request if has_body else None
        if parser.should_upgrade():
            request.upgrade = True
        if self._task is None and not self._queue:
            self._dispatch(request)
        else:
            self._queue.append(request)
            self._pause_reading("pipeline")

    def on_body(self, data: bytes) -> None:
        current = self._current
        if current is not None:
            current.body._feed(data)

    def on_message_complete(self) -> None:
        current = self._current
        if current is not None:
            self._current = None
            current.body._end()

    # -- requests -------------------------------------------------------------------------

    def _dispatch(self, request: Request) -> None:
        if request.refusal is not None:
            self._refuse(request, *request.refusal, in_turn=True)
            return
        try:
            data = self.app.fast(request)
        except Exception:  # pragma: no cover - a bug: serve() answers (with its 502)
            data = None
        if data is not None:
            self._whole(request, data)
            self._finished(request)
            return
        self._task = self.loop.create_task(self._run(request))

    async def _run(self, request: Request) -> None:
        response = Response(self, request)
        try:
            await self.app.serve(request, response)
            if not response.finished and self.state != _CLOSED:
                self.abort()  # the application did not finish it: never a hang
        except (ClientError, ConnectionError):
            self.abort()
        except asyncio.CancelledError:
            self.abort()
            raise
        finally:
            self._task = None
        if self.state != _CLOSED:
            self._finished(request)

    def _keep_alive_after(self, request: Request) -> bool:
        """Whether the connection stays open after ``request``'s response."""
        return (
            request.keep_alive
            and not self.must_close
            and not self.server.closing
            and request.body.complete
            and request.body.error is None
            and not request.upgrade
        )

    def _whole(self, request: Request, data: bytes) -> None:
        """Write a whole response: ``data`` is the head without its blank line,
        then ``b"\\r\\n"`` and the body... as one block: the head's last line is
        followed by ``\\r\\n\\r\\n``; ``Connection`` goes in before it."""
        keep = self._keep_alive_after(request)
        end = data.find(b"\r\n\r\n")
        if not keep:
            self.must_close = True
            data = data[: end + 2] + b"Connection: close\r\n" + data[end + 2:]
        elif request.version == "1.0":
            data = data[: end + 2] + b"Connection: keep-alive\r\n" + data[end + 2:]
        self._write(data)

    def _finished(self, request: Request) -> None:
        """``request``'s response is written: next request, idle, or close."""
        if self.state == _CLOSED:
            return
        if self.must_close or not self._keep_alive_after(request):
            if not request.body.complete and request.body.error is None:
                self._start_linger()
            else:
                self.close()
            return
        if self._write_paused:  # the client is behind: wait (send_timeout) before more
            self._task = self.loop.create_task(self._after_drain())
            return
        self._next()

    async def _after_drain(self) -> None:
        try:
            await self._drain()
        except ClientError:
            return
        finally:
            self._task = None
        self._next()

    def _next(self) -> None:
        if self.state == _CLOSED:
            return
        if self._queue:
            request = self._queue.popleft()
            if not self._queue:
                self._resume_reading("pipeline")
            self._dispatch(request)
            return
        if self.server.closing:
            self.close()
            return
        if self._in_head:  # the next request's head has started arriving
            self._set_timer("header", self.limits.header_timeout)
            return
        self.state = _IDLE
        self._set_timer("keepalive", self.limits.keepalive_timeout)

    def _refuse(self, request: Request, status: int, message: str,
                in_turn: bool = False) -> None:
        """Answer ``request`` with an error the application renders, then close; in
        its turn when earlier pipelined requests are still being answered."""
        self._pause_reading("refused")  # nothing after it is read
        if not in_turn and (self._task is not None or self._queue):
            request.refusal = (status, message)
            self._queue.append(request)
            return
        try:
            data = self.app.refuse(request, status, message)
        except Exception:  # pragma: no cover - a bug: still an answer
            data = _plain(status, message)
        self.must_close = True
        self._whole(request, data)
        self._pause_reading("refused")
        self._finished(request)

    def _refuse_head(self, status: int, message: str) -> None:
        """Answer before a request exists (431, 505, 400 from the parser, 408)."""
        extra = self.app.log_refusal(self.remote, status, message)
        if self._task is not None or self._queue:
            # Earlier pipelined requests are still being answered: finish those, then
            # close without answering this one (its bytes can't be trusted).
            self.must_close = True
            self._pause_reading("refused")
            return
        self.must_close = True
        self.state = _BUSY
        self._write(_plain(status, message, close=True, extra=extra))
        self.close()

    def _parse_error(self, exc: BaseException) -> None:
        cause = exc.__context__
        if isinstance(cause, _Stop):
            return  # a callback already answered
        current = self._current
        text = " ".join(str(exc).split()) or type(exc).__name__
        if current is not None:
            # The head was fine and the request is being answered: the body broke.
            self._current = None
            current.body._fail(f"invalid request body: {text}")
            self.must_close = True
            self._pause_reading("refused")
            return
        if self._task is not None or self._queue:
            self.must_close = True
            self._pause_reading("refused")
            return
        status = 505 if "HTTP version" in text else 400
        if status == 505:
            message = "the request's HTTP version is not supported; use HTTP/1.1"
        else:
            message = f"malformed request: {text}"
        self._refuse_head(status, message)

    # -- writing -----------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self.state != _CLOSED and self.transport is not None:
            self.transport.write(data)

    async def _drain(self) -> None:
        """Wait until the client takes the buffered bytes, for at most
        ``listen.send_timeout`` seconds (then the connection is aborted)."""
        if not self._write_paused:
            return
        if self.state == _CLOSED:
            raise ClientError("the client closed the connection")
        waiter = self._drain_waiter
        if waiter is None:
            waiter = self._drain_waiter = self.loop.create_future()
        timeout = self.limits.send_timeout
        transport = self.transport
        assert transport is not None
        while True:
            # send_timeout bounds each stretch without progress (as nginx's does), not
            # the whole response: a slow but steady reader is never cut.
            before = unsent_bytes(transport)
            if before is None:
                before = transport.get_write_buffer_size()
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.shield(waiter)
                return
            except TimeoutError:
                after = unsent_bytes(transport)
                if after is None:
                    after = transport.get_write_buffer_size()
                if self.state != _CLOSED and after < before:
                    continue
                self.abort()
                raise ClientError(
                    f"the client read none of the response for {timeout:g} s "
                    f"(listen.send_timeout)"
                ) from None

    # -- reading and timers ------------------------------------------------------------------

    def _pause_reading(self, why: str) -> None:
        if not self._paused and self.state != _CLOSED and self.transport is not None:
            self.transport.pause_reading()
        self._paused.add(why)

    def _resume_reading(self, why: str) -> None:
        if why in self._paused:
            self._paused.discard(why)
            if not self._paused and self.state != _CLOSED and self.transport is not None:
                self.transport.resume_reading()

    def _set_timer(self, kind: str, delay: float) -> None:
        timer = self._timer
        if timer is not None:
            timer.cancel()
        self._timer_kind = kind
        self._timer = self.loop.call_later(delay, self._timed_out)

    def _cancel_timer(self) -> None:
        timer = self._timer
        if timer is not None:
            self._timer = None
            timer.cancel()

    def _timed_out(self) -> None:
        self._timer = None
        kind = self._timer_kind
        if self.state == _CLOSED:
            return
        if kind == "header":
            if self._got_bytes and self._in_head:
                timeout = self.limits.header_timeout
                self._refuse_head(408, f"no complete request head within {timeout:g} s "
                                       f"(listen.header_timeout)")
            else:
                self.close()  # a connection that never sent a byte: nothing to answer
        else:  # keepalive, linger
            self.close()

    def _start_linger(self) -> None:
        """Close after the client's unread body: stop sending, read and drop for up
        to :data:`LINGER` seconds, then close (the client reads the answer instead
        of a reset)."""
        self._linger = True
        self._paused.clear()
        transport = self.transport
        if transport is None or self.state == _CLOSED:
            return
        try:
            transport.resume_reading()
            if transport.can_write_eof():
                transport.write_eof()
        except (OSError, RuntimeError):
            self.abort()
            return
        self._set_timer("linger", LINGER)

    def close(self) -> None:
        if self.state != _CLOSED:
            self.state = _CLOSED
            self._cancel_timer()
            if self.transport is not None:
                self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self.state = _CLOSED
        self._cancel_timer()

    @property
    def idle(self) -> bool:
        return self.state in (_NEW, _IDLE) and self._task is None and not self._queue


class _Stop(Exception):
    """Raised from a parser callback once the server has answered the request."""


def _plain(status: int, message: str, close: bool = True, extra: bytes = b"") -> bytes:
    """A small text/plain response made without the application (``extra``: more
    header lines, each ending in CRLF)."""
    reason = reason_phrase(status)
    body = f"{reason}: {message}\n".encode("latin-1", "replace")
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
    ).encode("latin-1")
    return (head + extra + date_line() + (b"Connection: close\r\n" if close else b"")
            + _CRLF + body)


class HttpServer:
    """Listening sockets and their connections for one :class:`Application`."""

    def __init__(self, app: Application, limits: Limits) -> None:
        self.app = app
        self.limits = limits
        self.loop = asyncio.get_running_loop()
        self.connections: set[Connection] = set()
        self.closing = False
        #: "https" once listening with TLS (same-origin checks, X-Forwarded-Proto).
        self.scheme = "http"
        self._servers: list[asyncio.base_events.Server] = []

    def protocol(self) -> Connection:
        return Connection(self)

    async def listen(self, host: str, port: int, *, reuse_port: bool = False,
                     backlog: int = 1024, sock: socket.socket | None = None,
                     ssl: Any = None) -> tuple[str, int]:
        """Start listening (with TLS when ``ssl`` is an SSLContext; the handshake must
        finish within ``header_timeout``); returns the bound (host, port)."""
        tls: dict[str, Any] = {}
        if ssl is not None:
            self.scheme = "https"
            # A closing TLS connection waits for the client's close_notify: bounded.
            tls = {"ssl": ssl, "ssl_handshake_timeout": self.limits.header_timeout,
                   "ssl_shutdown_timeout": min(self.limits.header_timeout, 5.0)}
        if sock is not None:
            server = await self.loop.create_server(self.protocol, sock=sock, backlog=backlog,
                                                   **tls)
        else:
            server = await self.loop.create_server(
                self.protocol, host, port, backlog=backlog, reuse_port=reuse_port or None,
                **tls,
            )
        self._servers.append(server)
        bound = server.sockets[0].getsockname()
        return bound[0], bound[1]

    async def shutdown(self, grace: float, on_cut: Callable[[int], Any] | None = None) -> None:
        """Stop listening; give busy connections up to ``grace`` seconds to finish
        their current response; then cut them. ``on_cut(count)`` is told how many
        were cut."""
        self.closing = True
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            if conn.idle:
                conn.close()
        deadline = self.loop.time() + grace
        # Wait for the busy ones (a closed TLS connection still finishing its
        # close_notify exchange is not busy).
        while self.loop.time() < deadline and any(
            c.state != _CLOSED for c in self.connections
        ):
            await asyncio.sleep(min(0.05, max(0.0, deadline - self.loop.time())))
        left = list(self.connections)
        busy = [conn for conn in left if conn.state != _CLOSED]
        tasks = [conn._task for conn in left if conn._task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=0.5)
        for conn in left:
            conn.abort()
        if on_cut is not None and busy:
            on_cut(len(busy))
        for server in self._servers:
            try:
                async with asyncio.timeout(0.2):
                    await server.wait_closed()
            except TimeoutError:  # pragma: no cover - wait_closed waits for connections
                pass
