"""The proxy's HTTP/1.1 client: pooled keep-alive connections to the one upstream.

Built for the proxy's single job (forward a request whose headers are already
computed, hand back the response as it arrives) instead of a general-purpose client:
connections are :class:`asyncio.Protocol` objects (no streams), responses are parsed
by llhttp through :mod:`httptools` (the parser uvicorn uses), and nothing is added to
or changed in what the caller gives.

Use::

    pool = UpstreamPool("http://127.0.0.1:8000", connect_timeout=5, timeout=60,
                        read_timeout=60)
    response = await pool.request("GET", "/items?x=1", [("Host", "..."), ...])
    try:
        while chunk := await response.read():
            ...
    finally:
        response.release()          # back to the pool when reusable, else closed
    await pool.close()

Request: ``METHOD target HTTP/1.1``, then the headers exactly as given (order, case,
repeats), byte for byte: the head is encoded as latin-1, so a str carries raw bytes
1:1 (a character above U+00FF can't go on the wire: :class:`ValueError`). The body,
an async iterator of bytes, is sent as it comes with the transport's write
back-pressure: with its own ``Content-Length`` when the headers carry one (the body
must match it), otherwise chunked (``Transfer-Encoding: chunked`` is appended). A
request without a body whose method normally has one gets ``Content-Length: 0`` (not
an upgrade request: its head goes exactly as given). When the upstream takes none of
the body for ``timeout`` seconds (the write buffer stays full and, on Linux, the
socket's send queue does not shrink) before it answers, the exchange fails with
:class:`SendTimeout` and the connection is closed; the bound is per wait and any
progress resets it, so a slow but moving upload is never cut. The wait for the
response head (``timeout``, :class:`ResponseTimeout`) starts once the last body byte
is handed to the socket, when up to a send buffer's worth of it may still be on its
way. Once the head is in, each silence between two pieces of the body is bounded by
``read_timeout`` instead (:class:`BodyError`; None: no limit, for event streams and
long polls). ``request(..., timeout=..., read_timeout=...)`` replaces the pool's
values for one exchange (None too).

Response: 1xx interim responses are skipped (101 is an error, but for an upgrade
request: below); HEAD, 204 and 304 responses have no body whatever their headers
say. Otherwise the body is framed as RFC 9112 §6.3 says: when ``Transfer-Encoding``
is present (the header may be repeated; its values are comma-separated codings,
case-insensitive) the body is chunked if the last coding is ``chunked`` (extensions
and trailers dropped), else it runs until the connection closes, whatever
``Content-Length`` says; without it,
``Content-Length`` or, lacking that too, the connection closing. The body is handed
on with the chunked coding removed and any other coding left in place:
:attr:`UpstreamResponse.transfer_codings` names those (lower-cased, in order, e.g.
``(b"gzip",)``) so the caller can tell its client, and ``chunked`` says whether the
last coding was chunked; so ``chunked or transfer_codings`` is true exactly when
``Transfer-Encoding`` frames the body. A ``Transfer-Encoding`` that names no coding
(``,``), or whose last element is empty or ends in a tab while its last coding is
chunked (``chunked,``), is an :class:`InvalidResponse`: llhttp would frame it as
read-until-close, and a proxy must not guess. A response with both
``Transfer-Encoding`` and ``Content-Length`` (smuggling-shaped), or an HTTP/1.0
response with ``Transfer-Encoding``, is framed by the former and its connection
never reused; ``Content-Length`` stays in ``raw_headers``, and a caller that
forwards the response must drop it. Body bytes are buffered up to
:data:`READ_HIGH_WATER` and the upstream socket stops being read until the caller
catches up, so memory stays flat for any body size.

A connection goes back to the pool only when the response was read to its end, the
request body was sent whole, both sides want keep-alive (HTTP/1.1 without
``Connection: close``, or HTTP/1.0 with ``Connection: keep-alive``) and the body's
end was not the connection closing. An upstream that answers early (before reading
the whole request body) gets its answer passed on, and the connection is closed
afterwards. Nothing is pipelined: bytes after the end of a response (after a HEAD,
204 or 304 head, or after a complete body, whether in the same packet or later) or
on an idle connection close it; only bare empty lines right after a complete
non-HEAD response, which llhttp skips as RFC 9112 §2.2 allows, go unnoticed.

Upgrades (WebSocket): ``request(..., upgrade=True)`` with the caller's own
``Connection: upgrade`` and ``Upgrade: ...`` headers. A ``101 Switching Protocols``
answer comes back as a response with ``status == 101`` and no body, the
connection's reading paused right after the 101 head; anything else is an ordinary
response. :meth:`UpstreamResponse.detach` then takes the connection out of the pool
for good (no longer open, active or idle; its ``max_connections`` slot free; no
timer of the pool's on it; :meth:`UpstreamPool.close` leaves it alone) and returns
its transport, reading resumed, with the bytes that came after the 101 head (the
tunnel's first, possibly in the same packet as the head): the caller sets its own
protocol on the transport at once (``transport.set_protocol``, before awaiting
anything) and owns it from then on. :meth:`UpstreamResponse.release` instead closes
it. With a request body, the 101 must come after the body was sent whole, else it
is an :class:`UpgradeResponse`.

The pool: at most ``max_connections`` open connections (None: no limit); a request
beyond it waits for a free one at most ``acquire_timeout`` seconds
(:class:`PoolTimeout`). Idle connections are kept at most ``max_idle`` and
``idle_timeout`` seconds each (a timer closes them as they expire).

Errors (all raised by :meth:`UpstreamPool.request` unless said otherwise)::

    UpstreamError                 anything that went wrong talking to the upstream
     +-- PoolTimeout              all max_connections busy for acquire_timeout
     +-- ConnectError             no connection: refused, unreachable, DNS, TLS (.os_error)
     +-- ConnectTimeout           no connection within connect_timeout
     +-- SendTimeout              the upstream read none of the request body for timeout
     |                            (before answering); the connection is closed
     +-- ResponseTimeout          no response headers within timeout of the request being sent
     +-- Disconnected             the upstream closed the connection before a response
     |                            (also from UpstreamResponse.detach(): the pool was closed)
     +-- ConnectionFailed         the connection broke before a response (reset...) (.os_error)
     +-- InvalidResponse          not a valid HTTP/1.x response (or headers too large,
     |    |                       or an ambiguous Transfer-Encoding)
     |    +-- UpgradeResponse     101 Switching Protocols to a request without upgrade=True
     |                            (or before its request body was sent whole)
     +-- RequestBodyError         reading the caller's body failed; __cause__ is the error
     +-- BodyError                raised by UpstreamResponse.read(): the response body
                                  broke off (reset, truncated, invalid, or no byte for
                                  read_timeout)

UpstreamResponse.detach() raises RuntimeError for a response that is not a 101 or
was already released or detached.

A request without a body, with an idempotent method (GET, HEAD, OPTIONS, TRACE, PUT,
DELETE: RFC 9110 §9.2.2) and ``retry=True``, that fails with ``Disconnected`` or
``ConnectionFailed`` on a reused pooled connection before any response byte is sent
again once on a fresh connection: the upstream closed an idle keep-alive connection
just as it was reused, the race every keep-alive pool has (an upgrade request
too: a GET without a body). Nothing else is ever sent twice (never a POST, never a
request with a body, never one that got a response byte back).
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import ssl as _ssl
from collections import deque
from collections.abc import AsyncIterable, Sequence
from typing import Any

import httptools
from yarl import URL

from ._sockets import unsent_bytes

__all__ = [
    "BodyError",
    "ConnectError",
    "ConnectTimeout",
    "ConnectionFailed",
    "Disconnected",
    "InvalidResponse",
    "PoolTimeout",
    "RequestBodyError",
    "ResponseTimeout",
    "SendTimeout",
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
#: Methods a stale pooled connection may be retried for (idempotent, RFC 9110 §9.2.2).
_RETRY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
#: The end of a message head: an empty line (llhttp takes a bare LF as a line end).
_EMPTY_LINE = re.compile(rb"\n\r?\n")
#: request()'s default for ``timeout`` and ``read_timeout``: the pool's value.
_POOL: Any = object()


class UpstreamError(Exception):
    """Talking to the upstream failed; ``str()`` says how, in a few words."""


class PoolTimeout(UpstreamError):
    """Every one of ``max_connections`` stayed busy for ``acquire_timeout``."""


class ConnectError(UpstreamError):
    """No connection could be opened (refused, unreachable, DNS, TLS handshake)."""

    def __init__(self, message: str, os_error: OSError) -> None:
        super().__init__(message)
        self.os_error = os_error


class ConnectTimeout(UpstreamError):
    """No connection within ``connect_timeout``."""


class SendTimeout(UpstreamError):
    """The upstream read none of the request body for ``timeout`` seconds, before
    answering; the connection is closed."""


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
    """The upstream answered 101 Switching Protocols to a request that asked for no
    upgrade (``upgrade=False``), or before the upgrade request's body was sent whole."""


class RequestBodyError(UpstreamError):
    """Reading the request body (the caller's iterator) failed; ``__cause__`` is why."""


class BodyError(UpstreamError):
    """The response body broke off after the headers (reset, truncated, invalid, or
    silent for ``read_timeout``)."""


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
    response's head (llhttp can't be told that it has no body), at the end of a 101
    head (what follows is the tunnel's), or at the start of a second response nobody
    asked for."""


class UpstreamResponse:
    """One response: status, reason, version, raw header pairs, and the body by
    :meth:`read`. Call :meth:`release` when done (always; it is cheap).

    ``status == 101`` (only ever for ``request(..., upgrade=True)``): the upstream
    switched protocols; there is no body (:meth:`read` returns ``b""``) and
    :meth:`detach` takes the connection out of the pool as a raw tunnel, or
    :meth:`release` closes it.

    ``chunked``: the last transfer coding was chunked (the body is handed on
    de-chunked). ``transfer_codings``: the other codings, lower-cased and in order
    (``(b"gzip",)`` for ``gzip, chunked`` and for ``gzip`` alone), still applied to
    the body; ``()`` without ``Transfer-Encoding``."""

    __slots__ = (
        "status",
        "reason",
        "version",
        "raw_headers",
        "chunked",
        "transfer_codings",
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
        "_te",
        "_tail",
        "_upgrade",
        "_upgraded",
        "_tunnel",
        "_timeout",
        "_read_timeout",
    )

    def __init__(
        self,
        conn: _Connection,
        head: bool,
        upgrade: bool = False,
        timeout: float | None = None,
        read_timeout: float | None = None,
    ) -> None:
        self.status = 0
        self.reason = ""
        self.version = "1.1"
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.chunked = False
        self.transfer_codings: tuple[bytes, ...] = ()
        self._conn = conn
        parser = self._parser = httptools.HttpResponseParser(self)
        # As aiohttp's client (and most clients) accept: bare LF line ends and spaces
        # after a chunk size. Header values stay strict (no control characters).
        # Transfer-Encoding with Content-Length: the former frames the body (RFC 9112
        # §6.3), not an error; llhttp then ignores Content-Length in a response.
        parser.set_dangerous_leniencies(
            lenient_optional_cr_before_lf=True,
            lenient_spaces_after_chunk_size=True,
            lenient_chunked_length=True,
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
        self._te: list[bytes] = []  # Transfer-Encoding values as sent (not stripped)
        self._tail = b""  # HEAD: the last bytes fed to the parser (see _feed_head)
        self._upgrade = upgrade  # the caller asked for an upgrade: a 101 is an answer
        self._upgraded = False  # a 101 came: the connection is a tunnel now
        self._tunnel: list[bytes] = []  # bytes after the 101 head (the tunnel's first)
        self._timeout = timeout  # for the head, and for each stall sending the body
        self._read_timeout = read_timeout  # for each silence in the body

    # -- parser callbacks (httptools) ------------------------------------------

    def on_message_begin(self) -> None:
        if self._state == _DONE:
            self._extra = True  # a second response nobody asked for
            raise _Stop
        self.raw_headers = []
        self._te = []
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
        if len(name) == 17 and name.lower() == b"transfer-encoding":
            self._te.append(value)
        # llhttp drops the whitespace before a value but not after (RFC 9110 §5.5: not
        # part of the value).
        self.raw_headers.append((name, value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if status < 200:
            if status == 101:
                self._switch()
            self._interim = True  # 100 Continue, 102, 103: skipped
            return
        self.status = status
        self.version = version = parser.get_http_version()
        content_length = False
        close = keep_alive_token = False
        for name, value in self.raw_headers:
            key = name.lower()
            if key == b"content-length":
                content_length = True
            elif key == b"connection":
                for token in value.lower().split(b","):
                    token = token.strip()
                    if token == b"close":
                        close = True
                    elif token == b"keep-alive":
                        keep_alive_token = True
        te = self._te
        if te:
            self._transfer_encoding(te)
            # Both framings, or chunked in HTTP/1.0: framed by Transfer-Encoding as
            # llhttp does, but the connection's framing is suspect (RFC 9112 §6.1, §6.3).
            if content_length or version != "1.1":
                close = True
        no_body = self._head or status in (204, 304)
        if te:
            self._until_close = not no_body and not self.chunked
        else:
            self._until_close = not no_body and not content_length
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

    def _switch(self) -> None:
        """A 101 head is in: the answer to an upgrade request, whose connection is a
        tunnel from the next byte on (stop the parser there), or an error."""
        if not self._upgrade:
            raise UpgradeResponse(
                "the upstream switched protocols (101) on a request that asked for no upgrade"
            )
        if not self._body_sent:
            raise UpgradeResponse(
                "the upstream switched protocols (101) before the request body was sent whole"
            )
        self.status = 101
        self.version = self._parser.get_http_version()
        self._keep_alive = False
        self._upgraded = True
        self._state = _BODY  # the parser stops here: _feed finishes the response
        conn = self._conn
        conn._pause_reading()  # until detach(): the tunnel's bytes wait in the socket
        conn._head_arrived()
        raise _Stop

    def _transfer_encoding(self, values: list[bytes]) -> None:
        """Set ``chunked`` and ``transfer_codings`` from the Transfer-Encoding values
        (RFC 9112 §6.1: a list of codings, chunked last or the body runs until close)."""
        codings = [
            coding
            for value in values
            for coding in (element.strip(b" \t").lower() for element in value.split(b","))
            if coding  # empty list elements are ignored (RFC 9110 §5.6.1)
        ]
        if not codings:  # llhttp refuses an empty value, but reads "," until close
            raise InvalidResponse(
                f"Transfer-Encoding {b', '.join(values).decode('latin-1')!r} names no coding"
            )
        chunked = codings[-1] == b"chunked"
        if chunked:
            # llhttp takes chunked as last only when the value ends with it (spaces
            # after it allowed): with a trailing "," or tab it reads until close.
            # Where the two readings differ, nobody can know the body's end.
            last = values[-1].rsplit(b",", 1)[-1].lstrip(b" \t").rstrip(b" ")
            if last.lower() != b"chunked":
                raise InvalidResponse(
                    f"ambiguous Transfer-Encoding {b', '.join(values).decode('latin-1')!r}"
                )
            codings.pop()
        self.chunked = chunked
        self.transfer_codings = tuple(codings)

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
        silent for ``read_timeout`` seconds while this waited."""
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

    def detach(self) -> tuple[asyncio.Transport, bytes]:
        """Take the connection of a 101 response out of the pool for good, as a raw
        tunnel: returns its transport and the bytes the upstream sent after the 101
        head (the tunnel's first, possibly ``b""``).

        The pool forgets the connection (it no longer counts as open, active or
        idle, its ``max_connections`` slot is free, :meth:`UpstreamPool.close` leaves
        it alone) and none of the pool's timers run on it any more. Reading is
        resumed: set your own protocol with ``transport.set_protocol(p)`` right
        away, before anything awaits (the transport's next bytes, EOF and loss go to
        whichever protocol is set when they arrive; bytes that still reach the
        pool's abort the transport). From then on the caller owns the transport and
        must close it. :meth:`release` after this does nothing.

        Raises :class:`RuntimeError` when the response is not a 101 or was already
        released or detached, :class:`Disconnected` when the connection is gone
        (the pool was closed meanwhile).
        """
        if not self._upgraded:
            raise RuntimeError(
                f"only a 101 response to an upgrade request can be detached, not a {self.status}"
            )
        if self._released:
            raise RuntimeError("the response was already released or detached")
        self._released = True
        self._parser = None
        conn = self._conn
        if conn.closed:
            raise Disconnected("the upstream connection closed before the tunnel was taken over")
        data = b"".join(self._tunnel)
        self._tunnel.clear()
        return conn._detach(), data

    def release(self) -> None:
        """Hand the connection back (kept only when reusable) or close it. Does
        nothing after :meth:`detach` (or a first call)."""
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
        "pooled",
        "idle_since",
        "response",
        "_reading_paused",
        "_writing_paused",
        "_drain",
        "_timer",
        "_send_timer",
        "_lost",
        "detached",
    )

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.loop = pool._loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.pooled = False  # in the pool's idle list
        self.idle_since = 0.0
        self.response: UpstreamResponse | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._drain: asyncio.Future[bool] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        self._lost: BaseException | None = None
        self.detached = False  # handed over as a tunnel (UpstreamResponse.detach)

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.detached:
            # The caller did not set its protocol in time: these bytes would be
            # lost from the tunnel, so the tunnel is broken.
            self.transport.abort()  # type: ignore[union-attr]
            return
        response = self.response
        if response is not None and response._upgraded:
            response._tunnel.append(data)  # (reading is paused; only what was in flight)
            return
        if response is None or response._state == _DONE:
            # Bytes nobody asked for (idle connection, or after the response's end).
            if response is not None:
                response._extra = True
            self._close()
            return
        response._got_data = True
        if response._head or (response._upgrade and response._state == _HEAD):
            self._feed_head(response, data)
        else:
            self._feed(response, data)

    def _feed(self, response: UpstreamResponse, data: bytes) -> bool:
        """Parse ``data``; True when the parser stopped at the end of a HEAD
        response's head or of a 101 head (whatever followed in ``data`` was not
        parsed)."""
        try:
            response._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, _Stop):
                if response._extra:  # a second response after the end of this one
                    self._close()
                elif response._state == _BODY:  # the end of a HEAD or 101 head
                    response._finish()
                    return True
            elif isinstance(cause, UpstreamError):
                self._broken(response, cause)
            else:
                self._broken(response, InvalidResponse(_describe(exc)))
        except httptools.HttpParserUpgrade:  # 101 without our check (defensive)
            self._broken(response, UpgradeResponse("the upstream switched protocols (101)"))
        return False

    def _feed_head(self, response: UpstreamResponse, data: bytes) -> None:
        """Parse a HEAD response, or the head of the answer to an upgrade request.
        llhttp can't be told a HEAD response has no body, and a 101 head is where
        the tunnel starts, so it is stopped at the end of the head, and anything
        after that in the same packet would go unseen: feed it one head (up to an
        empty line) at a time. Anything left after a HEAD response's final head is a
        byte nobody asked for; after a 101 head, the tunnel's first bytes; after
        another final head (an upgrade refused), its body, parsed as usual."""
        tail = response._tail  # an empty line may start in the previous packet
        seen = tail + data
        response._tail = seen[-2:]
        skip = len(tail)
        start = 0
        for match in _EMPTY_LINE.finditer(seen):
            end = match.end() - skip
            if end <= start:
                continue
            if self._feed(response, data[start:end]):
                if end < len(data):
                    if response._upgraded:
                        response._tunnel.append(data[end:])
                    else:
                        response._extra = True
                        self._close()
                return
            if self.closed or response._error is not None:
                return
            start = end
            if response._state != _HEAD:
                break  # a final head that was not a 101: the body follows
        if start < len(data):
            self._feed(response, data[start:])  # no head ends in it

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
                drain.set_result(True)

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
        """Wait for the response head (``body=False``: bounded by the head timer)
        or more body bytes, for at most ``read_timeout`` seconds of silence."""
        waiter = self.loop.create_future()
        response._waiter = waiter
        timeout = response._read_timeout
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
        response = self.response
        if response is None:
            return
        timeout = response._timeout
        if timeout is not None and response._state == _HEAD:
            self._timer = self.loop.call_later(timeout, self._timed_out, response, False)

    def _timed_out(self, response: UpstreamResponse, body: bool) -> None:
        self._timer = None
        if body:
            error: UpstreamError = BodyError(
                f"no body bytes from the upstream for {response._read_timeout:g} s "
                f"(upstream.read_timeout)"
            )
        else:
            error = ResponseTimeout(f"no response headers within {response._timeout:g} s")
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
                if self._writing_paused and not await self._drained(response._timeout):
                    # The upstream has read nothing for `timeout` seconds.
                    if response._state == _HEAD:
                        response._fail(SendTimeout(
                            f"the upstream accepted none of the request body for "
                            f"{response._timeout:g} s (upstream.timeout)"
                        ))
                        self._close()
                    # (after an early answer: stop sending; the connection is not
                    # reused, the body never having been sent whole)
                    return
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

    async def _drained(self, timeout: float | None) -> bool:
        """Wait for the write buffer to drain: True once it has, False when the
        upstream took none of the body for ``timeout`` seconds. Each wait is
        bounded by itself, and bytes the upstream acknowledged meanwhile count as
        progress (the kernel wakes a writer only once a third or so of a send buffer
        of up to megabytes is free): a slow but moving upload is never cut."""
        if self.closed:
            raise self._lost_error()
        drain = self._drain
        if drain is None or drain.done():
            drain = self._drain = self.loop.create_future()
        if timeout is None:
            return await drain
        self._send_timer = self.loop.call_later(
            timeout, self._send_stalled, drain, self._unsent(), timeout
        )
        try:
            return await drain
        finally:
            timer = self._send_timer
            if timer is not None:
                self._send_timer = None
                timer.cancel()
            if self._drain is drain:
                self._drain = None

    def _send_stalled(self, drain: asyncio.Future[bool], unsent: int | None,
                      timeout: float) -> None:
        """``timeout`` passed in a wait to write: go on waiting if the upstream took
        some bytes since, else end the wait (False)."""
        self._send_timer = None
        now = self._unsent()
        if now is not None and unsent is not None and now < unsent and not drain.done():
            self._send_timer = self.loop.call_later(
                timeout, self._send_stalled, drain, now, timeout
            )
        else:
            _resolve(drain, False)

    def _unsent(self) -> int | None:
        """Bytes written that the upstream has not acknowledged yet: the transport's
        buffer plus the socket's send queue. None where the latter can't be known
        (not Linux): then only the buffer draining counts as progress."""
        if self.closed:
            return None
        return unsent_bytes(self.transport)

    def _detach(self) -> asyncio.Transport:
        """Leave the pool for good, with reading resumed: the transport is the
        caller's."""
        self._cancel_timer()
        timer = self._send_timer
        if timer is not None:
            self._send_timer = None
            timer.cancel()
        transport = self.transport
        assert transport is not None
        self.detached = True
        self.closed = True  # nothing here touches the transport again
        self.response = None
        self.pool._forget(self)  # no longer open; its max_connections slot is free
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        return transport

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
    seconds to wait for the response head once the request is sent, and for the
    upstream to take more of the request body (None: no limit). ``read_timeout``:
    the longest silence between two pieces of the response body, in seconds (None:
    no limit, for event streams and long polls that may be quiet for ever). Both
    can be replaced for one exchange: :meth:`request`'s ``timeout`` and
    ``read_timeout``. ``max_connections``: open connections at most (None: no limit);
    requests beyond it wait for one to be free, at most ``acquire_timeout`` seconds
    (None: ``connect_timeout``'s value, so no limit when that is None too).
    ``max_idle``: idle connections kept. ``idle_timeout``: seconds an idle
    connection is kept. ``ssl``: the context for https (default: the system's CAs,
    hostname checked).
    """

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float | None = 5.0,
        timeout: float | None = 60.0,
        read_timeout: float | None = 60.0,
        max_connections: int | None = None,
        acquire_timeout: float | None = None,
        max_idle: int = 1024,
        idle_timeout: float = 30.0,
        ssl: _ssl.SSLContext | None = None,
    ) -> None:
        parsed = URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"upstream URL {url!r} must be http:// or https:// with a host")
        if max_connections is not None and max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {max_connections}")
        if acquire_timeout is None:
            acquire_timeout = connect_timeout
        if acquire_timeout is not None and acquire_timeout < 0:
            raise ValueError(f"acquire_timeout must not be negative, not {acquire_timeout}")
        self.host: str = parsed.host
        self.port: int = parsed.port or (443 if parsed.scheme == "https" else 80)
        self.ssl: _ssl.SSLContext | None = None
        if parsed.scheme == "https":
            self.ssl = ssl if ssl is not None else _ssl.create_default_context()
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self.acquire_timeout = acquire_timeout
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
        """Open connections in the pool, waiting for a request."""
        return len(self._idle)

    @property
    def open_count(self) -> int:
        """Open connections, idle or in use (not those still connecting)."""
        return len(self._open)

    @property
    def active_count(self) -> int:
        """Open connections in use by a request: open minus idle."""
        return len(self._open) - len(self._idle)

    @property
    def waiting_count(self) -> int:
        """Requests waiting for a connection (``max_connections`` reached)."""
        return len(self._waiters)

    def _take_idle(self) -> _Connection | None:
        idle = self._idle
        now = self._loop.time()
        while idle:
            conn = idle.pop()  # most recently used first: the others may expire
            conn.pooled = False
            if conn.closed:
                continue
            if now - conn.idle_since >= self.idle_timeout:
                conn._close()
                continue
            conn.reused = True
            return conn
        return None

    async def _acquire(self) -> _Connection:
        conn = self._take_idle()
        if conn is not None:
            return conn
        limit = self.max_connections
        if limit is not None and len(self._open) + self._connecting >= limit:
            try:
                async with asyncio.timeout(self.acquire_timeout):
                    conn = await self._wait_for_slot(limit)
            except TimeoutError:
                raise PoolTimeout(
                    f"all {limit} upstream connections busy for "
                    f"{self.acquire_timeout:g} s (upstream.max_connections)"
                ) from None
            if conn is not None:
                return conn
        return await self._connect()

    async def _wait_for_slot(self, limit: int) -> _Connection | None:
        """Wait until a connection is handed back (returned) or one may be opened
        (None)."""
        while len(self._open) + self._connecting >= limit:
            waiter = self._loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif waiter.done() and not waiter.cancelled():
                    self._wake_one()  # woken, but leaving: pass the free slot on
                raise
            if self._closed:
                raise ConnectError(
                    "the upstream pool is closed", OSError(errno.ESHUTDOWN, "closed")
                )
            conn = self._take_idle()
            if conn is not None:
                return conn
        return None

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
        conn.idle_since = self._loop.time()
        conn.pooled = True
        self._idle.append(conn)  # so the list is oldest first
        if self._sweeper is None:
            self._sweeper = self._loop.call_later(self.idle_timeout, self._sweep)
        if self._waiters:
            self._wake_one()  # someone waits for a slot: this connection is theirs

    def _forget(self, conn: _Connection) -> None:
        if conn.pooled:
            conn.pooled = False
            self._idle.remove(conn)
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
        """Close the idle connections that expired; come back when the oldest of
        the others does."""
        self._sweeper = None
        if self._closed:
            return
        idle = self._idle
        deadline = self._loop.time() - self.idle_timeout
        expired = 0
        while expired < len(idle) and idle[expired].idle_since <= deadline:
            expired += 1
        gone = idle[:expired]
        del idle[:expired]
        for conn in gone:
            conn.pooled = False
            conn._close()
        if idle:
            self._sweeper = self._loop.call_at(
                idle[0].idle_since + self.idle_timeout, self._sweep
            )

    async def close(self) -> None:
        """Close every connection (idle and in use); later requests fail, and so do
        those waiting for a connection."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._open) + self._idle:
            conn._close()
        self._idle.clear()
        while self._waiters:  # they see the pool closed
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    # -- one exchange ---------------------------------------------------------------

    async def request(
        self,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]],
        body: AsyncIterable[bytes] | None = None,
        *,
        retry: bool = False,
        upgrade: bool = False,
        timeout: float | None = _POOL,
        read_timeout: float | None = _POOL,
    ) -> UpstreamResponse:
        """Send one request and return once the response head is in.

        ``target`` is sent as given (path and query, already percent-encoded);
        ``headers`` exactly as given, plus ``Content-Length: 0`` or
        ``Transfer-Encoding: chunked`` as the module docstring says; all of it
        encoded as latin-1 (one character, one byte). Raises :class:`ValueError`
        for a target or header that can't go on the wire (CR, LF, a character above
        U+00FF), an :class:`UpstreamError` for everything else. ``retry``: send a
        body-less idempotent request again once if a reused connection turns out
        stale (the module docstring says when); ignored for any other request.

        ``upgrade``: the request asks to switch protocols (the caller's headers say
        ``Connection: upgrade`` and ``Upgrade: ...``); no ``Content-Length: 0`` is
        added, and a ``101 Switching Protocols`` answer is returned as a response
        with ``status == 101`` whose connection :meth:`UpstreamResponse.detach`
        takes over. Any other answer is an ordinary response. Without it a 101 is an
        :class:`UpgradeResponse`.

        ``timeout``, ``read_timeout``: when given (None too: no limit), replace the
        pool's values for this exchange alone (the wait for the head and for the
        upstream to take the body; each silence in the response body).
        """
        if timeout is _POOL:
            timeout = self.timeout
        if read_timeout is _POOL:
            read_timeout = self.read_timeout
        head, length = _serialise(method, target, headers, body is not None, upgrade)
        attempts = 2 if retry and body is None and method in _RETRY_METHODS else 1
        for attempt in range(attempts):
            conn = await self._acquire()
            response = UpstreamResponse(conn, method == "HEAD", upgrade, timeout, read_timeout)
            try:
                return await self._exchange(conn, response, head, body, length)
            except (Disconnected, ConnectionFailed) as exc:
                if attempt + 1 < attempts and conn.reused and _stale(exc):
                    continue
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _exchange(
        self,
        conn: _Connection,
        response: UpstreamResponse,
        head: bytes,
        body: AsyncIterable[bytes] | None,
        length: int | None,
    ) -> UpstreamResponse:
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


def _resolve(future: asyncio.Future[bool], value: bool) -> None:
    if not future.done():
        future.set_result(value)


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
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]],
    has_body: bool,
    upgrade: bool = False,
) -> tuple[bytes, int | None]:
    """The request head as bytes, and the body's Content-Length (None: chunked).
    An upgrade request without a body goes exactly as given."""
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
    elif not has_length and not upgrade and method not in _NO_BODY_METHODS:
        lines.append("Content-Length: 0")
    lines.append("\r\n")
    text = "\r\n".join(lines)
    # One CR and one LF per line, nothing else: no header can smuggle another one in.
    newlines = len(lines) - 1
    if text.count("\n") != newlines + 1 or text.count("\r") != newlines + 1:
        raise ValueError("a request header or the target holds a CR or LF character")
    try:
        # latin-1: the caller's str carries the bytes 1:1 (U+0000-U+00FF).
        return text.encode("latin-1"), length
    except UnicodeEncodeError as exc:
        bad = exc.object[exc.start]
        raise ValueError(
            f"a request header or the target holds {bad!r} (U+{ord(bad):04X}), "
            f"above U+00FF: it can't be sent as one byte"
        ) from None
