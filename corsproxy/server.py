"""The proxy: an aiohttp server that puts the CORS decision core in front of an upstream.

Request flow (one handler, :func:`_handle`, for every method and path):

1. A :class:`~corsproxy.core.RequestView` is built from the raw request (every
   ``Origin`` and ``Access-Control-Request-Headers`` line, the raw path without
   the query, ``Host``, scheme) and ``config.router.decide()`` is asked.
2. When the decision has a status (preflight 200/400, ``enforce`` 403) the proxy
   answers itself with the decision's headers and ``Vary``; nothing goes upstream.
3. Otherwise the request is forwarded (``corsproxy.forwarding`` says what changes
   on the way) with the body streamed, and the upstream's response is streamed
   back with its ``Access-Control-*`` headers replaced by the decision's and the
   decision's ``Vary`` names merged in.
4. Responses the proxy makes when forwarding fails carry the decision's CORS
   headers too, so a browser app sees the real status instead of a "CORS error":

   - 502: the upstream refused or reset the connection, or sent no valid response;
   - 504: no connection within ``upstream.connect_timeout``, or no response
     headers within ``upstream.timeout`` after the request was sent;
   - 413: the request body is over ``listen.max_body_size`` (from Content-Length
     before anything is sent; while streaming for chunked bodies, and then the
     upstream connection is dropped so it never sees a complete request);
   - 400: a request the proxy can't forward (e.g. a header value that is not UTF-8).

5. One log line per request (``corsproxy.logs``).

One :class:`~corsproxy.upstream.UpstreamPool` per app, opened and closed by
``cleanup_ctx``: the proxy's own HTTP/1.1 client (keep-alive connections on asyncio
protocols, llhttp's parser). It sends exactly the headers ``corsproxy.forwarding``
computed, keeps no cookies, never decompresses (bodies pass byte for byte) and never
follows redirects: none of that exists in it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import hdrs, web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11
from multidict import CIMultiDict

from .core import Decision, Kind, RequestView, Router
from .forwarding import (
    HeaderError,
    UpstreamTarget,
    decode_request_headers,
    response_headers,
    upstream_request_headers,
)
from .logs import (
    ACCESS_LOGGER,
    LOG_FORMATS,
    SERVER_LOGGER,
    AccessTemplate,
    access_line,
    access_writer,
    event_line,
    setup_logging,
)
from .upstream import (
    ConnectError,
    ConnectionFailed,
    ConnectTimeout,
    Disconnected,
    InvalidResponse,
    ResponseTimeout,
    UpgradeResponse,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
)

if TYPE_CHECKING:
    from .config import Config

__all__ = ["build_app", "run_server", "serve"]

log = logging.getLogger("corsproxy")

#: Methods retried once on a fresh connection when a pooled keep-alive connection
#: turns out to be closed by the upstream (the race every keep-alive pool has);
#: only without a body, like nginx's proxy_next_upstream default.
_RETRY_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_TEXT = "text/plain; charset=utf-8"
# Marks a forwarded response: headers aiohttp adds on its own that the upstream
# did not send are taken out again just before the headers go out.
_STRIP_AUTO = "corsproxy.strip_auto"


class _State:
    """Per-app values, computed once from the config."""

    __slots__ = (
        "router",
        "target",
        "preserve_host",
        "max_body_size",
        "connect_timeout",
        "timeout",
        "log_format",
        "session",
        "write_access",
        "preflights",
    )

    def __init__(self, config: Config, log_format: str) -> None:
        if config.upstream.url is None:
            raise ValueError(
                f"{config.source}: upstream.url: not set; add it to the config "
                f"or pass --upstream URL"
            )
        self.router: Router = config.router
        self.target = UpstreamTarget(config.upstream.url)
        self.preserve_host = config.upstream.preserve_host
        self.max_body_size = config.listen.max_body_size
        self.connect_timeout = config.upstream.connect_timeout
        self.timeout = config.upstream.timeout
        self.log_format = log_format
        self.session: UpstreamPool | None = None
        #: Where access lines go: the ``corsproxy.access`` logger, or (set by
        #: :func:`serve`) a batching writer straight to stderr.
        self.write_access: Callable[[str], Any] = ACCESS_LOGGER.info
        #: Whole preflight answers by (route, Origin lines, ACRM, ACRH lines, ACRPN).
        self.preflights: dict[tuple, _Preflight | None] = {}


STATE = web.AppKey("corsproxy_state", _State)


def build_app(config: Config, *, log_format: str = "text") -> web.Application:
    """The proxy as an aiohttp application (the upstream connection pool lives in its
    ``cleanup_ctx``). ``log_format`` is ``"text"`` or ``"json"``."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r}: use one of {', '.join(LOG_FORMATS)}")
    app = web.Application(
        handler_args={
            # aiohttp's own log lines (parse errors) and no aiohttp access log:
            # the handler writes one line per request itself.
            "logger": SERVER_LOGGER,
            "access_log": None,
            # A gzip request body must reach the upstream as gzip: aiohttp's server
            # would otherwise inflate it and forward the result as "gzip".
            "auto_decompress": False,
        }
    )
    app[STATE] = _State(config, log_format)
    app.cleanup_ctx.append(_upstream_session)
    app.on_response_prepare.append(_strip_auto_headers)
    # One catch-all route; [\s\S] so a decoded %0A in the path still matches.
    app.router.add_route(hdrs.METH_ANY, r"/{path:[\s\S]*}", _handle, expect_handler=_no_expect)
    return app


async def _upstream_session(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    state.session = UpstreamPool(
        state.target.url,
        connect_timeout=state.connect_timeout,
        # "No response headers within upstream.timeout" once the request is sent,
        # and the same bound on a silent upstream while the body streams.
        timeout=state.timeout,
    )
    try:
        yield
    finally:
        await state.session.close()
        state.session = None


async def _strip_auto_headers(request: web.BaseRequest, response: web.StreamResponse) -> None:
    names = response.get(_STRIP_AUTO)
    if names:
        for name in names:
            response.headers.popall(name, None)


async def _no_expect(request: web.Request) -> None:
    """``Expect: 100-continue`` is answered only once the body is really wanted
    (see :func:`_forward`): a preflight, 403 or 413 needs no body."""
    return None


# ---------------------------------------------------------------------------
# the handler
# ---------------------------------------------------------------------------


class _Log:
    """What the access line says about one request."""

    __slots__ = ("upstream_ms", "error", "streaming", "continued")

    def __init__(self) -> None:
        self.upstream_ms: float | None = None
        self.error: str | None = None
        self.continued = False  # "100 Continue" was sent
        # The forwarded response once its headers are out: too late for a status.
        self.streaming: web.StreamResponse | None = None


def _request_view(request: web.BaseRequest, path: str) -> RequestView:
    headers = request.headers
    acrm = headers.getall(hdrs.ACCESS_CONTROL_REQUEST_METHOD, None)
    return RequestView(
        method=request.method,
        path=path,
        origin=tuple(headers.getall(hdrs.ORIGIN, ())),
        # Several ACRM lines are combined the HTTP way, which is not a valid method.
        request_method=None if acrm is None else ", ".join(acrm),
        request_headers=tuple(headers.getall(hdrs.ACCESS_CONTROL_REQUEST_HEADERS, ())),
        request_private_network=headers.get("Access-Control-Request-Private-Network"),
        host=headers.get(hdrs.HOST),
        scheme=request.scheme,
    )


async def _handle(request: web.Request) -> web.StreamResponse:
    """The handler as an :class:`aiohttp.web.Application` route (``build_app``)."""
    return await _handle_request(request.app[STATE], request)


# ---------------------------------------------------------------------------
# preflights from precomputed answers
# ---------------------------------------------------------------------------

#: Bounds on the preflight cache: entries, and the key size (characters in the
#: Origin/ACRM/ACRH/ACRPN values) above which a preflight is decided uncached.
_PREFLIGHT_CACHE_SIZE = 1024
_PREFLIGHT_KEY_MAX = 1024
_CRLF = b"\r\n"


class _Preflight:
    """One preflight answer, computed once: the decision, the whole HTTP/1.1
    response except its ``Date`` line (as bytes, byte for byte what aiohttp would
    send for the same :func:`_own_response`), and its access line's fixed parts."""

    __slots__ = ("decision", "status", "head", "tail", "log")

    def __init__(self, decision: Decision, state: _State, origin: str | None) -> None:
        assert decision.status is not None
        self.decision = decision
        self.status = status = decision.status
        body = decision.body.encode("utf-8")
        lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
        lines += [f"{name}: {value}" for name, value in decision.headers]
        if decision.vary:
            lines.append("Vary: " + ", ".join(decision.vary))
        lines += [f"Content-Type: {_TEXT}", f"Content-Length: {len(body)}"]
        head = "\r\n".join(lines)
        if not head.isascii() or "\n" in head.replace("\r\n", "") or "\r" in head.replace(
            "\r\n", ""
        ):
            raise ValueError("not a plain ASCII header block")
        self.head = head.encode("ascii") + _CRLF
        self.tail = f"Server: {SERVER_SOFTWARE}\r\n\r\n".encode("latin-1") + body
        self.log = AccessTemplate(
            state.log_format, "OPTIONS", status, origin, decision.verdict, decision.route,
            "; ".join(decision.reasons),
        )


_date = ["", b""]  # aiohttp's Date value (its own per-second cache) and our line for it


def _date_line() -> bytes:
    now = rfc822_formatted_time()
    if now is not _date[0]:
        _date[0], _date[1] = now, f"Date: {now}\r\n".encode("latin-1")
    return _date[1]


class _RawResponse:
    """A precomputed response written with one call (what the server needs of a
    response object: ``prepare``, ``write_eof``, ``keep_alive``, ``status``)."""

    __slots__ = ("status", "data")
    keep_alive = True

    def __init__(self, status: int, data: bytes) -> None:
        self.status = status
        self.data = data

    async def prepare(self, request: web.BaseRequest) -> None:
        await request.writer.write_eof(self.data)

    async def write_eof(self, data: bytes = b"") -> None:
        return None


def _preflight(state: _State, request: web.BaseRequest, path: str) -> _Preflight | None:
    """The cached answer for a preflight (deciding and caching it on a miss), or
    None when this is no preflight or its values are too large to cache."""
    headers = request.headers
    acrm = headers.getall(hdrs.ACCESS_CONTROL_REQUEST_METHOD, None)
    origin = headers.getall(hdrs.ORIGIN, None)
    if acrm is None or origin is None:
        return None
    acrh = headers.getall(hdrs.ACCESS_CONTROL_REQUEST_HEADERS, ())
    acrpn = headers.get("Access-Control-Request-Private-Network")
    router = state.router
    route = router.select(path)[0] if router.routes else None
    key = (route, *origin, "\0", *acrm, "\0", *acrh, "\0", acrpn)
    cache = state.preflights
    try:
        return cache[key]
    except KeyError:
        pass
    if sum(map(len, origin)) + sum(map(len, acrm)) + sum(map(len, acrh)) > _PREFLIGHT_KEY_MAX:
        return None
    decision = router.decide(_request_view(request, path))
    if decision.kind is not Kind.PREFLIGHT or decision.status is None:
        return None  # pragma: no cover - an OPTIONS with Origin and ACRM is a preflight
    try:
        entry: _Preflight | None = _Preflight(decision, state, ", ".join(origin) or None)
    except ValueError:  # odd bytes in an echoed value: aiohttp's own path handles it
        entry = None
    if len(cache) >= _PREFLIGHT_CACHE_SIZE:
        del cache[next(iter(cache))]  # oldest first
    cache[key] = entry
    return entry


async def _handle_request(state: _State, request: web.BaseRequest) -> web.StreamResponse:
    loop = asyncio.get_running_loop()
    started = loop.time()
    target = request.raw_path
    if not target.startswith("/"):  # absolute-form request target (RFC 9112 §3.2.2)
        target = request.rel_url.raw_path_qs
    if request.method == "OPTIONS":
        path = target.partition("?")[0]
        try:
            cached = _preflight(state, request, path)
        except Exception:  # a bug: the general path below answers with its 502
            cached = None
        if cached is not None:
            if (
                request.version == HttpVersion11
                and request.keep_alive
                and not request.body_exists
            ):
                response: Any = _RawResponse(
                    cached.status, b"".join((cached.head, _date_line(), cached.tail))
                )
            else:  # HTTP/1.0, Connection: close, a body: aiohttp's own framing
                response = _own_response(cached.decision, cached.status, cached.decision.body)
                if request.body_exists and hdrs.EXPECT in request.headers:
                    response.force_close()
            if ACCESS_LOGGER.isEnabledFor(logging.INFO):
                state.write_access(
                    cached.log.line(request.remote, path, round((loop.time() - started) * 1000, 2))
                )
            return response
    return await _handle_decided(state, request, target, loop, started)


async def _handle_decided(
    state: _State,
    request: web.BaseRequest,
    target: str,
    loop: asyncio.AbstractEventLoop,
    started: float,
) -> web.StreamResponse:
    entry = _Log()
    decision: Decision | None = None
    response: web.StreamResponse | None = None
    try:
        decision = state.router.decide(_request_view(request, target.partition("?")[0]))
        if decision.status is not None:
            response = _own_response(decision, decision.status, decision.body)
        else:
            response = await _forward(request, state, decision, target, entry)
    except asyncio.CancelledError:
        # Shutdown: listen.shutdown_grace is over and aiohttp cancels what is left.
        entry.error = "cut off: still running when the shutdown grace period ended"
        if decision is not None:
            _log_access(state, request, target, decision, entry.streaming, entry,
                        loop.time() - started)
        raise
    except Exception as exc:  # a bug in the proxy: still a clean answer with CORS headers
        log.exception("internal error on %s %s", request.method, target)
        entry.error = f"internal error: {type(exc).__name__}: {exc}"
        if decision is None:
            decision = Decision(Kind.NOT_CORS, False, None, (), ("Origin",), ("no decision",))
        if entry.streaming is not None:
            response = entry.streaming
            _abort(request, response)
        else:
            response = _own_response(
                decision, 502, "Bad Gateway: internal error in corsproxy; see its log\n"
            )
    if not entry.continued and request.body_exists and hdrs.EXPECT in request.headers:
        # The client waits for "100 Continue" before sending the body and will now
        # not send it: close instead of lingering for a body that never comes.
        response.force_close()
    _log_access(state, request, target, decision, response, entry, loop.time() - started)
    return response


def _own_response(decision: Decision, status: int, body: str) -> web.Response:
    """A response the proxy makes itself, with the decision's CORS headers and Vary."""
    headers = CIMultiDict(decision.headers)
    if decision.vary:
        headers["Vary"] = ", ".join(decision.vary)
    return web.Response(
        status=status, headers=headers, body=body.encode("utf-8"), content_type="text/plain",
        charset="utf-8",
    )


def _error(decision: Decision, entry: _Log, status: int, cause: str) -> web.Response:
    """A 4xx/5xx made by the proxy: the body names the cause in one line."""
    entry.error = cause
    reason = {400: "Bad Request", 413: "Content Too Large", 417: "Expectation Failed",
              502: "Bad Gateway", 504: "Gateway Timeout"}[status]
    return _own_response(decision, status, f"{reason}: {cause}\n")


class _BodyTooLarge(Exception):
    pass


class _RequestBody:
    """The client's body as an async iterator for the upstream request, counted
    against ``listen.max_body_size``; records which side failed."""

    __slots__ = ("content", "limit", "size", "too_large", "client_error")

    def __init__(self, content: aiohttp.StreamReader, limit: int | None) -> None:
        self.content = content
        self.limit = limit
        self.size = 0
        self.too_large = False
        self.client_error: BaseException | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        content, limit = self.content, self.limit
        while True:
            try:
                chunk = await content.readany()
            except Exception as exc:  # the client went away or sent a broken body
                self.client_error = exc
                raise
            if not chunk:
                return
            self.size += len(chunk)
            if limit is not None and self.size > limit:
                # Raising here makes the upstream client drop the connection mid-body,
                # so the upstream never sees a complete (truncated) request.
                self.too_large = True
                raise _BodyTooLarge
            yield chunk


async def _forward(
    request: web.Request, state: _State, decision: Decision, target: str, entry: _Log
) -> web.StreamResponse:
    limit = state.max_body_size
    length = request.content_length
    if limit is not None and length is not None and length > limit:
        return _error(
            decision, entry, 413,
            f"request body of {length} bytes (Content-Length) is over listen.max_body_size "
            f"({limit} bytes)",
        )
    expect = request.headers.get(hdrs.EXPECT)
    if expect is not None and expect.lower() != "100-continue":
        return _error(decision, entry, 417, f"corsproxy only understands Expect: 100-continue, "
                                            f"not {expect!r}")
    try:
        pairs = decode_request_headers(request.raw_headers)
    except HeaderError as exc:
        return _error(decision, entry, 400, str(exc))
    headers = upstream_request_headers(
        pairs,
        client_addr=request.remote,
        scheme=request.scheme,
        upstream_host=state.target.host,
        preserve_host=state.preserve_host,
    )
    # The target goes upstream byte for byte (a fragment is never sent).
    path = state.target.base_path + target.partition("#")[0]

    body: _RequestBody | None = None
    if request.body_exists:
        if expect is not None and request.version >= (1, 1):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # the response proper has not started
            entry.continued = True
        body = _RequestBody(request.content, limit)
    pool = state.session
    assert pool is not None
    loop = asyncio.get_running_loop()
    sent = loop.time()
    try:
        upstream = await pool.request(
            request.method,
            path,
            headers,
            body.chunks() if body is not None else None,
            retry=body is None and request.method in _RETRY_METHODS,
        )
    except UpstreamError as exc:
        return _upstream_error(decision, entry, state, body, exc)
    except ValueError as exc:
        return _error(decision, entry, 400, f"request to {target!r} can't be forwarded: {exc}")
    entry.upstream_ms = round((loop.time() - sent) * 1000, 2)
    try:
        return await _stream_back(request, decision, upstream, entry)
    finally:
        upstream.release()


def _upstream_error(
    decision: Decision, entry: _Log, state: _State, body: _RequestBody | None, exc: UpstreamError
) -> web.Response:
    """The proxy's answer when no upstream response came (502, 504, 413, 400)."""
    where = state.target.origin
    if body is not None and body.too_large:
        return _error(
            decision, entry, 413,
            f"request body is over listen.max_body_size ({body.limit} bytes); "
            f"the upstream connection was dropped",
        )
    if body is not None and body.client_error is not None:
        return _error(
            decision, entry, 400,
            f"could not read the request body from the client: {describe_error(body.client_error)}",
        )
    if isinstance(exc, ConnectTimeout):
        return _error(
            decision, entry, 504,
            f"no connection to the upstream {where} within upstream.connect_timeout "
            f"({state.connect_timeout:g} s)",
        )
    if isinstance(exc, ResponseTimeout):
        return _error(
            decision, entry, 504,
            f"the upstream {where} sent no response headers within upstream.timeout "
            f"({state.timeout:g} s)",
        )
    if isinstance(exc, ConnectError):
        return _error(decision, entry, 502, f"cannot connect to the upstream {where}: {exc}")
    if isinstance(exc, Disconnected):
        return _error(
            decision, entry, 502, f"the upstream {where} closed the connection without a response"
        )
    if isinstance(exc, ConnectionFailed):
        return _error(decision, entry, 502, f"the connection to the upstream {where} failed: {exc}")
    if isinstance(exc, UpgradeResponse):
        return _error(
            decision, entry, 502,
            "the upstream switched protocols (101); corsproxy does not proxy upgrades",
        )
    if isinstance(exc, InvalidResponse):
        return _error(
            decision, entry, 502, f"the upstream {where} sent an invalid HTTP response: {exc}"
        )
    return _error(decision, entry, 502, f"request to the upstream {where} failed: {exc}")


def describe_error(exc: BaseException) -> str:
    """An exception in a few words for a response body or a log line."""
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()  # "connection refused", not asyncio's text
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


async def _stream_back(
    request: web.BaseRequest, decision: Decision, upstream: UpstreamResponse, entry: _Log
) -> web.StreamResponse:
    pairs = [(n.decode("latin-1"), v.decode("utf-8", "replace")) for n, v in upstream.raw_headers]
    headers = response_headers(pairs, decision.headers, decision.vary)
    sent = {n.lower() for n, _ in pairs}
    if (
        upstream.complete
        and "content-length" in sent
        and not upstream.chunked
        and request.version == HttpVersion11
        and request.keep_alive
        and not request.body_exists
        and request.method != "HEAD"
        and upstream.status not in (204, 304)
    ):
        # The whole body is already here and framed by its Content-Length: one
        # precomputed write, byte for byte what the StreamResponse below would send
        # (the upstream's headers, the CORS ones, then Date when the upstream sent
        # none; aiohttp's own Content-Type and Server are left out as below).
        raw = _whole_response(upstream, headers, "date" in sent, await upstream.read())
        if raw is not None:
            return raw
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    response.headers.extend(headers)
    strip = [n for n in (hdrs.CONTENT_TYPE, hdrs.SERVER) if n.lower() not in sent]
    if strip:
        response[_STRIP_AUTO] = strip
    # The head goes out with the first body bytes (one write instead of two).
    response._send_headers_immediately = False
    try:
        await response.prepare(request)
        entry.streaming = response
        read = upstream.read
        while True:
            try:
                chunk = await read()
            except UpstreamError as exc:
                # Too late for a status: cut the client connection so it sees an
                # incomplete body instead of a clean (truncated) end.
                entry.error = f"upstream failed while sending the body: {exc}"
                upstream.close()
                _abort(request, response)
                return response
            if not chunk:
                break
            if upstream.at_eof:  # the last piece: head, body and end in one write
                await response.write_eof(chunk)
                return response
            await response.write(chunk)
        await response.write_eof()
    except ConnectionError:
        entry.error = "client disconnected before the response was complete"
        upstream.close()
    return response


def _whole_response(
    upstream: UpstreamResponse, headers: list[tuple[str, str]], has_date: bool, body: bytes
) -> _RawResponse | None:
    """A complete forwarded response as one block of bytes (None: not plain enough
    to be sure of the bytes; the caller then takes aiohttp's path)."""
    lines = [f"HTTP/1.1 {upstream.status} {upstream.reason}"]
    lines += [f"{name}: {value}" for name, value in headers]
    text = "\r\n".join(lines)
    if "\n" in text.replace("\r\n", "") or "\r" in text.replace("\r\n", ""):
        return None
    head = text.encode("utf-8") + b"\r\n"
    date = b"" if has_date else _date_line()
    return _RawResponse(upstream.status, b"".join((head, date, b"\r\n", body)))


def _abort(request: web.BaseRequest, response: web.StreamResponse) -> None:
    response.force_close()
    transport = request.transport
    if transport is not None:
        transport.abort()


def _log_access(
    state: _State,
    request: web.BaseRequest,
    target: str,
    decision: Decision,
    response: web.StreamResponse | None,
    entry: _Log,
    elapsed: float,
) -> None:
    if not ACCESS_LOGGER.isEnabledFor(logging.INFO):
        return
    fields: dict[str, Any] = {
        "client": request.remote,
        "method": request.method,
        "path": target.partition("?")[0],
        "status": response.status if response is not None else None,
        "origin": ", ".join(request.headers.getall(hdrs.ORIGIN, ())) or None,
        "cors": decision.verdict,
        "route": decision.route,
        "upstream_ms": entry.upstream_ms,
        "ms": round(elapsed * 1000, 2),
        "error": entry.error,
        "reason": "; ".join(decision.reasons),
    }
    state.write_access(access_line(state.log_format, fields))


# ---------------------------------------------------------------------------
# running it
# ---------------------------------------------------------------------------


class _ProxyRequest(web.BaseRequest):
    """The request on the low-level server: what ``on_response_prepare`` does for
    the Application (take out headers aiohttp added to a forwarded response)."""

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        await _strip_auto_headers(self, response)


def _low_level_server(app: web.Application) -> web.Server:
    """The same handler on aiohttp's low-level server: no router, no Application
    request object, no signal per response (about 7% of a preflight's CPU time under
    wrk). ``build_app``'s Application stays the embeddable form (and the tests'
    in-process proxy); the behaviour is the same: one catch-all handler, ``Expect``
    left to :func:`_forward` (as :func:`_no_expect` does), gzip bodies not inflated,
    auto-added headers stripped from forwarded responses (:class:`_ProxyRequest`)."""
    state = app[STATE]
    loop = asyncio.get_running_loop()

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return await _handle_request(state, request)

    def request_factory(message: Any, payload: Any, protocol: Any, writer: Any, task: Any
                        ) -> web.BaseRequest:
        return _ProxyRequest(message, payload, protocol, writer, task, loop)

    return web.Server(
        handler, request_factory=request_factory, logger=SERVER_LOGGER, access_log=None,
        auto_decompress=False,
    )


async def serve(
    config: Config,
    *,
    log_format: str = "text",
    stop: asyncio.Event | None = None,
    ready: Any = None,
    reuse_port: bool = False,
) -> int:
    """Run the proxy until ``stop`` is set (or SIGTERM/SIGINT when ``stop`` is None),
    then shut down gracefully: stop accepting, give in-flight requests up to
    ``listen.shutdown_grace`` seconds, close the upstream pool. Returns the exit code.

    ``ready(host, port)`` is called once listening (port 0 picks a free port).
    ``reuse_port`` listens with SO_REUSEPORT (one of several worker processes).
    """
    loop = asyncio.get_running_loop()
    app = build_app(config, log_format=log_format)
    writer = access_writer()
    app[STATE].write_access = writer
    app.freeze()
    grace = config.listen.shutdown_grace
    await app.startup()  # the upstream pool (cleanup_ctx)
    runner = web.ServerRunner(
        _low_level_server(app), handle_signals=False, shutdown_timeout=grace
    )
    await runner.setup()

    async def cleanup() -> None:
        try:
            await runner.cleanup()
            await app.shutdown()
            await app.cleanup()
        finally:
            flush = getattr(writer, "flush", None)
            if flush is not None:
                flush()

    host, port = config.listen.host, config.listen.port
    site = web.TCPSite(runner, host, port, backlog=1024, reuse_port=reuse_port or None)
    try:
        await site.start()
    except OSError as exc:
        await cleanup()
        _event(log_format, "error", f"cannot listen on {host}:{port}: {describe_error(exc)}; "
                                    f"pick another address with --host/--port or listen.port")
        return 1
    bound = runner.addresses[0][:2] if runner.addresses else (host, port)
    loop_name = type(loop).__module__.partition(".")[0]  # "uvloop" or "asyncio"
    _event(log_format, "listening", f"corsproxy listening on http://{_hostport(*bound)}, "
                                    f"forwarding to {config.upstream.url} ({loop_name})",
           host=bound[0], port=bound[1], upstream=config.upstream.url, loop=loop_name,
           pid=os.getpid())
    if ready is not None:
        ready(bound[0], bound[1])
    own_signals = stop is None
    if stop is None:
        stop = asyncio.Event()
    if own_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        _event(log_format, "stopping", f"stopping: no new connections; in-flight requests get "
                                       f"up to {grace:g} s (listen.shutdown_grace)")
        await cleanup()
    finally:
        if own_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
    _event(log_format, "stopped", "corsproxy stopped")
    return 0


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _event(log_format: str, event: str, message: str, **fields: Any) -> None:
    log.info(event_line(log_format, event, message, **fields), extra={"preformatted": True})


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when it is installed, asyncio's otherwise."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_server(config: Config, *, log_format: str = "text", reuse_port: bool = False) -> int:
    """Run the proxy in the foreground until SIGTERM/SIGINT; returns the exit code.

    With ``listen.workers`` above 1 (or ``auto`` on a machine with several cores)
    this process supervises that many worker processes (``corsproxy.workers``);
    ``reuse_port`` is how a worker runs its own server on the shared port."""
    if not reuse_port:
        from .workers import resolve_workers, run_workers

        count = resolve_workers(config.listen.workers)
        if count > 1:
            return run_workers(config, log_format=log_format, count=count)
    setup_logging(log_format)
    # Everything loaded so far (aiohttp, pydantic, the policy) lives as long as the
    # process: move it out of the cyclic GC's reach, so the collections that request
    # garbage triggers stop re-scanning it (small proxied GET: ~12% less CPU).
    gc.collect()
    gc.freeze()
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(serve(config, log_format=log_format, reuse_port=reuse_port))


if __name__ == "__main__":  # pragma: no cover - `python -m corsproxy run` is the entry point
    sys.exit("use: corsproxy run --config FILE")
