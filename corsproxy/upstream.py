"""The proxy's HTTP/1.1 client: pooled keep-alive connections to the one upstream.

Built for the proxy's single job (forward a request whose headers are already
computed, hand back the response as it arrives) instead of a general-purpose client:
connections are :class:`asyncio.Protocol` objects (no streams), responses are parsed
by llhttp through :mod:`httptools` (the parser uvicorn uses), and nothing is added to
or changed in what the caller gives.

Use::

    pool = UpstreamPool("http://127.0.0.1:8000", connect_timeout=5, timeout=60)
    response = await pool.request("GET", "/items?x=1", [("Host", "..."), ...])
    try:
        while chunk := await response.read():
            ...
    finally:
        response.release()          # back to the pool when reusable, else closed
    await pool.close()

Request: ``METHOD target HTTP/1.1``, then the headers exactly as given (order, case,
repeats), byte for byte. The body, an async iterator of bytes, is sent as it comes
with the transport's write back-pressure: with its own ``Content-Length`` when the
headers carry one (the body must match it), otherwise chunked (``Transfer-Encoding:
chunked`` is appended). A request without a body whose method normally has one gets
``Content-Length: 0``.

Response: 1xx interim responses are skipped (101 is an error: no upgrades); HEAD,
204 and 304 responses have no body whatever their headers say; otherwise the body is
framed by chunked encoding (extensions and trailers dropped), Content-Length, or the
connection closing. Body bytes are buffered up to :data:`READ_HIGH_WATER` and the
upstream socket stops being read until the caller catches up, so memory stays flat
for any body size.

A connection goes back to the pool only when the response was read to its end, the
request body was sent whole, both sides want keep-alive (HTTP/1.1 without
``Connection: close``, or HTTP/1.0 with ``Connection: keep-alive``) and the body's
end was not the connection closing. An upstream that answers early (before reading
the whole request body) gets its answer passed on, and the connection is closed
afterwards. Nothing is pipelined; bytes arriving on an idle connection close it.

Errors (all raised by :meth:`UpstreamPool.request` unless said otherwise)::

    UpstreamError                 anything that went wrong talking to the upstream
     +-- ConnectError             no connection: refused, unreachable, DNS, TLS (.os_error)
     +-- ConnectTimeout           no connection within connect_timeout
     +-- ResponseTimeout          no response headers within timeout of the request being sent
     +-- Disconnected             the upstream closed the connection before a response
     +-- ConnectionFailed         the connection broke before a response (reset...) (.os_error)
     +-- InvalidResponse          not a valid HTTP/1.x response (or headers too large)
     |    +-- UpgradeResponse     101 Switching Protocols
     +-- RequestBodyError         reading the caller's body failed; __cause__ is the error
     +-- BodyError                raised by UpstreamResponse.read(): the response body
                                  broke off (reset, truncated, invalid, timeout)

A request without a body (``retry=True``) that fails with ``Disconnected`` or
``ConnectionFailed`` on a reused pooled connection before any response byte is sent
again once on a fresh connection: the upstream closed an idle keep-alive connection
just as it was reused, the race every keep-alive pool has.
"""

from __future__ import annotations

import asyncio
import errno
import os
import ssl as _ssl
from collections import deque
from collections.abc import AsyncIterable, Sequence

import httptools
from yarl import URL

__all__ = [
    "BodyError",
    "ConnectError",
    "ConnectTimeout",
    "ConnectionFailed",
    "Disconnected",
    "InvalidResponse",
    "RequestBodyError",
    "ResponseTimeout",
    "UpgradeResponse",
    "UpstreamError",
    "UpstreamPool",
    "UpstreamResponse",
]

#: Buffered response body bytes at which the upstream socket stops being read.
READ_HIGH_WATER = 256 * 1024
#: Largest response head (status line plus headers) accepted, in bytes.
MAX_HEAD_SIZE = 256 * 1024
#: Most header lines accepted in one response.
MAX_HEADERS = 512
#: Methods sent without ``Content-Length: 0`` when they carry no body (as aiohttp's client).
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "CONNECT", "TRACE"})


class UpstreamError(Exception):
    """Talking to the upstream failed; ``str()`` says how, in a few words."""


class ConnectError(UpstreamError):
    """No connection could be opened (refused, unreachable, DNS, TLS handshake)."""

    def __init__(self, message: str, os_error: OSError) -> None:
        super().__init__(message)
        self.os_error = os_error


class ConnectTimeout(UpstreamError):
    """No connection within ``connect_timeout``."""


class ResponseTimeout(UpstreamError):
    """No response headers within ``timeout`` after the request was sent."""


class Disconnected(UpstreamError):
    """The upstream closed the connection without sending a response."""


class ConnectionFailed(UpstreamError):
    """The connection broke (reset, broken pipe) before a response arrived."""

    def __init__(self, message: str, os_error: OSError | None) -> None:
        super().__init__(message)
        self.os_error = os_error


class InvalidResponse(UpstreamError):
    """What the upstream sent is not a valid HTTP/1.x response head."""


class UpgradeResponse(InvalidResponse):
    """The upstream answered 101 Switching Protocols; upgrades are not proxied."""


class RequestBodyError(UpstreamError):
    """Reading the request body (the caller's iterator) failed; ``__cause__`` is why."""


class BodyError(UpstreamError):
    """The response body broke off after the headers (reset, truncated, invalid, timeout)."""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, _ssl.SSLError):  # its errno is the library's, not the OS's
        return " ".join(str(getattr(exc, "verify_message", None) or exc.reason or exc).split())
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# response states
_HEAD, _BODY, _DONE = 0, 1, 2


class _Stop(Exception):
    """Raised from a parser callback to stop parsing: at the end of a HEAD
    response's head (llhttp can't be told that it has no body), or at the start of
    a second response nobody asked for."""


class UpstreamResponse:
    """One response: status, reason, version, raw header pairs, and the body by
    :meth:`read`. Call :meth:`release` when done (always; it is cheap)."""

    __slots__ = (
        "status",
        "reason",
        "version",
        "raw_headers",
        "chunked",
        "_conn",
        "_parser",
        "_state",
        "_head",
        "_interim",
        "_head_size",
        "_keep_alive",
        "_until_close",
        "_chunks",
        "_buffered",
        "_error",
        "_waiter",
        "_body_sent",
        "_pump",
        "_released",
        "_got_data",
        "_extra",
    )

    def __init__(self, conn: _Connection, head: bool) -> None:
        self.status = 0
        self.reason = ""
        self.version = "1.1"
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.chunked = False
        self._conn = conn
        parser = self._parser = httptools.HttpResponseParser(self)
        # As aiohttp's client (and most clients) accept: bare LF line ends and spaces
        # after a chunk size. Header values stay strict (no control characters).
        parser.set_dangerous_leniencies(
            lenient_optional_cr_before_lf=True, lenient_spaces_after_chunk_size=True
        )
        self._state = _HEAD
        self._head = head
        self._interim = False
        self._head_size = 0
        self._keep_alive = False
        self._until_close = False
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._error: UpstreamError | None = None
        # Resolved when the head arrives (request) or body bytes / the end arrive (read).
        self._waiter: asyncio.Future[None] | None = None
        self._body_sent = False
        self._pump: asyncio.Task[None] | None = None
        self._released = False
        self._got_data = False
        self._extra = False

    # -- parser callbacks (httptools) ------------------------------------------

    def on_message_begin(self) -> None:
        if self._state == _DONE:
            self._extra = True  # a second response nobody asked for
            raise _Stop
        self.raw_headers = []
        self._head_size = 0

    def on_status(self, reason: bytes) -> None:
        self.reason = reason.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._state != _HEAD:
            return  # chunked trailers: dropped
        self._head_size += len(name) + len(value) + 4
        if self._head_size > MAX_HEAD_SIZE or len(self.raw_headers) >= MAX_HEADERS:
            raise InvalidResponse(
                f"response head over {MAX_HEAD_SIZE} bytes or {MAX_HEADERS} header lines"
            )
        # llhttp drops the whitespace before a value but not after (RFC 9110 §5.5: not
        # part of the value).
        self.raw_headers.append((name, value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if status < 200:
            if status == 101:
                raise UpgradeResponse(
                    "the upstream switched protocols (101); corsproxy does not proxy upgrades"
                )
            self._interim = True  # 100 Continue, 102, 103: skipped
            return
        self.status = status
        self.version = version = parser.get_http_version()
        content_length = False
        close = keep_alive_token = False
        for name, value in self.raw_headers:
            key = name.lower()
            if key == b"transfer-encoding":
                self.chunked = True
            elif key == b"content-length":
                content_length = True
            elif key == b"connection":
                for token in value.lower().split(b","):
                    token = token.strip()
                    if token == b"close":
                        close = True
                    elif token == b"keep-alive":
                        keep_alive_token = True
        no_body = self._head or status in (204, 304)
        self._until_close = not no_body and not self.chunked and not content_length
        if close or self._until_close:
            self._keep_alive = False
        elif version == "1.1":
            self._keep_alive = True
        else:
            self._keep_alive = keep_alive_token
        self._state = _BODY
        self._conn._head_arrived()
        if self._head:
            raise _Stop  # llhttp can't be told; stop here, the message is complete

    def on_body(self, data: bytes) -> None:
        if self._state != _BODY:
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered >= READ_HIGH_WATER:
            self._conn._pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self._state == _BODY:
            self._finish()

    # -- state changes -----------------------------------------------------------

    def _finish(self) -> None:
        self._state = _DONE
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        """The exchange broke: remember why and wake whoever waits."""
        if self._error is None and self._state != _DONE:
            self._error = error
        self._wake()

    # -- the caller's side ---------------------------------------------------------

    @property
    def complete(self) -> bool:
        """True once the whole body has arrived (it may still be buffered)."""
        return self._state == _DONE

    @property
    def at_eof(self) -> bool:
        """True once the whole body has arrived and been read: :meth:`read` would
        return ``b""``."""
        return self._state == _DONE and not self._chunks

    async def read(self) -> bytes:
        """The next piece of the body (all that is buffered), ``b""`` at its end.
        Raises :class:`BodyError` when the body broke off or the upstream stayed
        silent for ``timeout`` seconds."""
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._buffered = 0
                self._conn._resume_reading()
                return data
            if self._error is not None:
                raise BodyError(str(self._error))
            if self._state == _DONE:
                return b""
            await self._conn._wait(self, body=True)

    def release(self) -> None:
        """Hand the connection back (kept only when reusable) or close it."""
        if self._released:
            return
        self._released = True
        conn = self._conn
        pump = self._pump
        if pump is not None and not pump.done():
            pump.cancel()
        if (
            self._state == _DONE
            and not self._chunks
            and self._error is None
            and self._keep_alive
            and self._body_sent
            and not self._extra
        ):
            conn._release()
        else:
            conn._close()
        # Break the response <-> parser cycle now rather than in the cyclic GC.
        self._parser = None
        self._pump = None

    def close(self) -> None:
        """Drop the connection whatever state the response is in."""
        self._keep_alive = False
        self.release()


class _Connection(asyncio.Protocol):
    """One upstream connection; at most one request on it at a time."""

    __slots__ = (
        "pool",
        "loop",
        "transport",
        "closed",
        "reused",
        "idle_since",
        "response",
        "_reading_paused",
        "_writing_paused",
        "_drain",
        "_timer",
        "_lost",
    )

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.loop = pool._loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self.response: UpstreamResponse | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._lost: BaseException | None = None

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None or response._state == _DONE:
            # Bytes nobody asked for (idle connection, or after the response's end).
            if response is not None:
                response._extra = True
            self._close()
            return
        response._got_data = True
        try:
            response._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, _Stop):
                if response._state == _BODY:  # the end of a HEAD response's head
                    response._finish()
            elif isinstance(cause, UpstreamError):
                self._broken(response, cause)
            else:
                self._broken(response, InvalidResponse(_describe(exc)))
        except httptools.HttpParserUpgrade:  # 101 without our check (defensive)
            self._broken(response, UpgradeResponse("the upstream switched protocols (101)"))

    def eof_received(self) -> bool:
        response = self.response
        if response is not None and response._state == _BODY and response._until_close:
            response._keep_alive = False
            response._finish()
        return False  # close the transport

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self._lost = exc
        self._cancel_timer()
        self.pool._forget(self)
        drain = self._drain
        if drain is not None:
            self._drain = None
            if not drain.done():
                drain.set_exception(self._lost_error())
        response = self.response
        if response is not None and response._state != _DONE:
            if response._state == _BODY and response._until_close and exc is None:
                response._keep_alive = False
                response._finish()
            else:
                response._fail(self._lost_error())
        self.response = None

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        drain = self._drain
        if drain is not None:
            self._drain = None
            if not drain.done():
                drain.set_result(None)

    # -- helpers ---------------------------------------------------------------------

    def _lost_error(self) -> UpstreamError:
        exc = self._lost
        response = self.response
        if response is not None and response._state == _BODY:
            if exc is None:
                return BodyError("the upstream closed the connection before the body's end")
            return BodyError(f"the connection broke: {_describe(exc)}")
        if exc is None:
            return Disconnected("the upstream closed the connection without a response")
        if isinstance(exc, OSError):
            return ConnectionFailed(_describe(exc), exc)
        return ConnectionFailed(_describe(exc), None)

    def _broken(self, response: UpstreamResponse, error: UpstreamError) -> None:
        if response._state == _BODY and not isinstance(error, BodyError):
            error = BodyError(f"invalid response body: {error}")
        response._fail(error)
        self._close()

    def _pause_reading(self) -> None:
        if not self._reading_paused and not self.closed:
            self._reading_paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    def _resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            if not self.closed:
                self.transport.resume_reading()  # type: ignore[union-attr]

    def _cancel_timer(self) -> None:
        timer = self._timer
        if timer is not None:
            self._timer = None
            timer.cancel()

    def _head_arrived(self) -> None:
        self._cancel_timer()
        response = self.response
        if response is not None:
            response._wake()

    async def _wait(self, response: UpstreamResponse, body: bool) -> None:
        """Wait for the response head (``body=False``) or more body bytes, for at
        most ``pool.timeout`` seconds of silence."""
        waiter = self.loop.create_future()
        response._waiter = waiter
        timeout = self.pool.timeout
        if body and timeout is not None:
            self._timer = self.loop.call_later(timeout, self._timed_out, response, True)
        try:
            await waiter
        finally:
            if body:
                self._cancel_timer()
            if response._waiter is waiter:
                response._waiter = None

    def _start_head_timer(self) -> None:
        """The request is sent: from now on the head must come within ``timeout``."""
        timeout = self.pool.timeout
        response = self.response
        if timeout is not None and response is not None and response._state == _HEAD:
            self._timer = self.loop.call_later(timeout, self._timed_out, response, False)

    def _timed_out(self, response: UpstreamResponse, body: bool) -> None:
        self._timer = None
        timeout = self.pool.timeout
        if body:
            error: UpstreamError = BodyError(
                f"no body bytes from the upstream for {timeout:g} s (upstream.timeout)"
            )
        else:
            error = ResponseTimeout(f"no response headers within {timeout:g} s")
        response._fail(error)
        self._close()

    async def _write_body(self, body: AsyncIterable[bytes], length: int | None,
                          response: UpstreamResponse) -> None:
        """Send the request body; runs beside the wait for the response head."""
        transport = self.transport
        assert transport is not None
        sent = 0
        try:
            async for chunk in body:
                if not chunk:
                    continue
                if self.closed or response._state == _DONE:
                    return  # the exchange is over (early answer, or the upstream left)
                size = len(chunk)
                if length is None:
                    transport.writelines((b"%x\r\n" % size, chunk, b"\r\n"))
                else:
                    sent += size
                    if sent > length:
                        raise ValueError(
                            f"the body is longer than its Content-Length ({length} bytes)"
                        )
                    transport.write(chunk)
                if self._writing_paused:
                    await self._drained()
            if self.closed or response._state == _DONE:
                return
            if length is None:
                transport.write(b"0\r\n\r\n")
            elif sent != length:
                raise ValueError(
                    f"the body ended after {sent} of its {length} bytes (Content-Length)"
                )
        except asyncio.CancelledError:
            raise
        except UpstreamError as exc:  # the connection went while waiting to write
            response._fail(exc)
            return
        except Exception as exc:  # the caller's iterator failed, or a bad length
            if response._state == _HEAD:
                # Drop the connection mid-body: the upstream must never see a
                # complete (truncated) request.
                error = RequestBodyError(f"request body: {_describe(exc)}")
                error.__cause__ = exc
                response._fail(error)
                self._close()
            return
        response._body_sent = True
        self._start_head_timer()

    async def _drained(self) -> None:
        if self.closed:
            raise self._lost_error()
        drain = self._drain
        if drain is None:
            drain = self._drain = self.loop.create_future()
        await drain

    def _release(self) -> None:
        self.response = None
        self._cancel_timer()
        if self.closed:
            return
        self._resume_reading()
        self.pool._put(self)

    def _close(self) -> None:
        self._cancel_timer()
        if not self.closed:
            self.closed = True
            transport = self.transport
            if transport is not None:
                transport.abort()
        self.pool._forget(self)


class UpstreamPool:
    """Keep-alive connections to one upstream (``http://`` or ``https://`` URL; its
    path is ignored here: callers send the full request target).

    ``connect_timeout``: seconds to open a connection (TCP and TLS). ``timeout``:
    seconds to wait for the response head once the request is sent, and for each
    piece of the body (None: no limit). ``max_connections``: open connections at
    most (None: no limit); requests beyond it wait for one to be free. ``max_idle``:
    idle connections kept. ``idle_timeout``: seconds an idle connection is kept.
    ``ssl``: the context for https (default: the system's CAs, hostname checked).
    """

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float | None = 5.0,
        timeout: float | None = 60.0,
        max_connections: int | None = None,
        max_idle: int = 1024,
        idle_timeout: float = 15.0,
        ssl: _ssl.SSLContext | None = None,
    ) -> None:
        parsed = URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"upstream URL {url!r} must be http:// or https:// with a host")
        if max_connections is not None and max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {max_connections}")
        self.host: str = parsed.host
        self.port: int = parsed.port or (443 if parsed.scheme == "https" else 80)
        self.ssl: _ssl.SSLContext | None = None
        if parsed.scheme == "https":
            self.ssl = ssl if ssl is not None else _ssl.create_default_context()
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.max_connections = max_connections
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self._loop = asyncio.get_running_loop()
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._connecting = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    # -- pool ------------------------------------------------------------------------

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    @property
    def open_count(self) -> int:
        return len(self._open)

    async def _acquire(self) -> _Connection:
        idle = self._idle
        now = self._loop.time()
        while idle:
            conn = idle.pop()  # most recently used first: the others may expire
            if conn.closed:
                continue
            if now - conn.idle_since >= self.idle_timeout:
                conn._close()
                continue
            conn.reused = True
            return conn
        limit = self.max_connections
        while limit is not None and len(self._open) + self._connecting >= limit:
            waiter = self._loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif waiter.done() and not waiter.cancelled():
                    self._wake_one()  # pass the free slot on
                raise
            while idle:
                conn = idle.pop()
                if not conn.closed:
                    conn.reused = True
                    return conn
        return await self._connect()

    async def _connect(self) -> _Connection:
        if self._closed:
            raise ConnectError("the upstream pool is closed", OSError(errno.ESHUTDOWN, "closed"))
        conn = _Connection(self)
        self._connecting += 1
        try:
            async with asyncio.timeout(self.connect_timeout):
                await self._loop.create_connection(
                    lambda: conn,
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl is not None else None,
                )
        except TimeoutError:
            raise ConnectTimeout(
                f"no connection within {self.connect_timeout:g} s"
            ) from None
        except OSError as exc:  # refused, unreachable, DNS (gaierror), TLS (SSLError)
            raise ConnectError(_describe(exc), exc) from exc
        finally:
            self._connecting -= 1
            if conn.transport is None or conn.closed:
                self._wake_one()
        self._open.add(conn)
        return conn

    def _put(self, conn: _Connection) -> None:
        if self._closed or len(self._idle) >= self.max_idle:
            conn._close()
            return
        if self._waiters:
            # Someone waits for a slot: give them this connection.
            self._idle.append(conn)
            conn.idle_since = self._loop.time()
            self._wake_one()
            return
        conn.idle_since = self._loop.time()
        self._idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self._loop.call_later(self.idle_timeout, self._sweep)

    def _forget(self, conn: _Connection) -> None:
        if conn in self._open:
            self._open.discard(conn)
            self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _sweep(self) -> None:
        self._sweeper = None
        deadline = self._loop.time() - self.idle_timeout
        keep = []
        for conn in self._idle:
            if conn.closed:
                continue
            if conn.idle_since <= deadline:
                conn._close()
            else:
                keep.append(conn)
        self._idle[:] = keep
        if keep and not self._closed:
            self._sweeper = self._loop.call_later(self.idle_timeout / 2, self._sweep)

    async def close(self) -> None:
        """Close every connection (idle and in use); later requests fail."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._open) + self._idle:
            conn._close()
        self._idle.clear()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.cancel()

    # -- one exchange ---------------------------------------------------------------

    async def request(
        self,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]],
        body: AsyncIterable[bytes] | None = None,
        *,
        retry: bool = False,
    ) -> UpstreamResponse:
        """Send one request and return once the response head is in.

        ``target`` is sent as given (path and query, already percent-encoded);
        ``headers`` exactly as given, plus ``Content-Length: 0`` or
        ``Transfer-Encoding: chunked`` as the module docstring says. Raises
        :class:`ValueError` for a target or header that can't go on the wire
        (control characters, non-UTF-8-encodable text), an :class:`UpstreamError`
        for everything else.
        """
        head, length = _serialise(method, target, headers, body is not None)
        attempts = 2 if retry and body is None else 1
        for attempt in range(attempts):
            conn = await self._acquire()
            try:
                return await self._exchange(conn, method, head, body, length)
            except (Disconnected, ConnectionFailed) as exc:
                if attempt + 1 < attempts and conn.reused and _stale(exc):
                    continue
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _exchange(
        self,
        conn: _Connection,
        method: str,
        head: bytes,
        body: AsyncIterable[bytes] | None,
        length: int | None,
    ) -> UpstreamResponse:
        response = UpstreamResponse(conn, method == "HEAD")
        conn.response = response
        try:
            if conn.closed:
                raise conn._lost_error()
            conn.transport.write(head)  # type: ignore[union-attr]
            if body is None:
                response._body_sent = True
                conn._start_head_timer()
            else:
                response._pump = self._loop.create_task(
                    conn._write_body(body, length, response)
                )
            while response._state == _HEAD and response._error is None:
                await conn._wait(response, body=False)
            error = response._error
            if error is not None and response._state == _HEAD:
                # (after the head, a broken body shows up in read())
                error._got_data = response._got_data  # type: ignore[attr-defined]
                raise error
        except BaseException:
            response.close()
            raise
        return response


def _stale(exc: UpstreamError) -> bool:
    """The failure of a reused connection that never gave a response byte: the
    upstream closed it while idle (FIN or reset) just as it was used again."""
    if getattr(exc, "_got_data", False):
        return False
    if isinstance(exc, Disconnected):
        return True
    os_error = getattr(exc, "os_error", None)
    return getattr(os_error, "errno", None) in (errno.ECONNRESET, errno.EPIPE)


def _serialise(
    method: str, target: str, headers: Sequence[tuple[str, str]], has_body: bool
) -> tuple[bytes, int | None]:
    """The request head as bytes, and the body's Content-Length (None: chunked)."""
    if " " in target or " " in method:
        raise ValueError(f"request target {target!r} holds a space")
    lines = [f"{method} {target} HTTP/1.1"]
    length: int | None = None
    has_length = False
    for name, value in headers:
        lines.append(f"{name}: {value}")
        if len(name) == 14 and name.lower() == "content-length":
            has_length = True
            if has_body:
                try:
                    length = int(value)
                except ValueError:
                    raise ValueError(f"Content-Length {value!r} is not a number") from None
                if length < 0:
                    raise ValueError(f"Content-Length {value!r} is negative")
    if has_body:
        if not has_length:
            lines.append("Transfer-Encoding: chunked")
    elif not has_length and method not in _NO_BODY_METHODS:
        lines.append("Content-Length: 0")
    lines.append("\r\n")
    text = "\r\n".join(lines)
    # One CR and one LF per line, nothing else: no header can smuggle another one in.
    newlines = len(lines) - 1
    if text.count("\n") != newlines + 1 or text.count("\r") != newlines + 1:
        raise ValueError("a request header or the target holds a CR or LF character")
    try:
        return text.encode("utf-8"), length
    except UnicodeEncodeError as exc:
        raise ValueError(f"request head can't be encoded: {exc}") from None
