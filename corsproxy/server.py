"""The proxy: the CORS decision core in front of an upstream, on the proxy's own
HTTP/1.1 server (:mod:`corsproxy.httpserver`).

One front door: :class:`ProxyServer` is what ``corsproxy run`` serves and what the
tests start; every request goes through :class:`Proxy` (``fast`` then ``serve``).

Request flow:

1. The server has parsed and checked the head (version, framing, size, timeouts).
   :meth:`Proxy.fast` checks the request target and Host (:mod:`corsproxy._wire`:
   dot-segments, CONNECT, ``OPTIONS *``, a bad Host: answered 400/405 with the
   route's CORS headers, connection closed) and answers a preflight from whole
   precomputed responses when it can.
2. Otherwise :meth:`Proxy.serve` asks ``config.router.decide()``. When the decision
   has a status (preflight 200/400, ``enforce`` 403) the proxy answers itself with
   the decision's headers and ``Vary``; nothing goes upstream.
3. Otherwise the request is forwarded (``corsproxy.forwarding`` says what changes
   on the way) with the body streamed, and the upstream's response is streamed
   back with its ``Access-Control-*`` headers replaced by the decision's and the
   decision's ``Vary`` names merged in. Header names and values pass byte for byte
   both ways (latin-1 text in between).
4. Responses the proxy makes when forwarding fails carry the decision's CORS
   headers too, so a browser app sees the real status instead of a "CORS error".
   Their bodies name the cause in generic words; the access line adds the
   upstream's address and the low-level detail:

   - 502: the upstream refused or reset the connection, or sent no valid response;
   - 503: every upstream connection (``upstream.max_connections``) stayed busy for
     ``upstream.connect_timeout``;
   - 504: no connection within ``upstream.connect_timeout``; no response headers
     within ``upstream.timeout`` after the request was sent; or the upstream took
     none of the request body for ``upstream.timeout``;
   - 413: the request body is over ``listen.max_body_size`` (from Content-Length
     before anything is sent; while streaming for chunked bodies, and then the
     upstream connection is dropped so it never sees a complete request);
   - 408: the client sent no body bytes for ``listen.body_timeout``; 400: the
     client's body was broken (the upstream connection is dropped in both cases).

5. One access line per request (``corsproxy.logs``).

A decision marked ``report_only`` (``cors.report_only``) changes steps 1-3: nothing
is answered from the decision, not even from the preflight cache; everything is
forwarded, the upstream's ``Access-Control-*`` and ``Vary`` headers pass unchanged,
and :func:`corsproxy.report.compare` judges the upstream's answer against the
decision for the access line (``report``) and the metrics.

The upstream side is :class:`~corsproxy.upstream.UpstreamPool`, the proxy's own
HTTP/1.1 client: it sends exactly the headers ``corsproxy.forwarding`` computed,
keeps no cookies, never decompresses (bodies pass byte for byte) and never follows
redirects.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import ipaddress
import logging
import os
import signal
import ssl
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from ._wire import Rejected, check_host, check_target, date_line, reason_phrase, render_head
from .core import Decision, Kind, RequestView, Router
from .forwarding import (
    UpstreamTarget,
    client_request_id,
    forwarded_proto,
    new_request_id,
    real_client,
    response_headers,
    upstream_request_headers,
)
from .httpserver import ClientError, HttpServer, Limits, Request, Response
from .logs import (
    ACCESS_LOGGER,
    LOG_FORMATS,
    AccessTemplate,
    access_line,
    access_writer,
    describe_error,
    event_line,
    reopen_log_file,
    setup_logging,
)
from .metrics import Metrics
from .report import compare
from .upstream import (
    ConnectError,
    ConnectionFailed,
    ConnectTimeout,
    Disconnected,
    InvalidResponse,
    PoolTimeout,
    ResponseTimeout,
    SendTimeout,
    UpgradeResponse,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
)
from .websocket import Tunnel, is_handshake

if TYPE_CHECKING:
    from .config import Config

__all__ = ["Proxy", "ProxyServer", "describe_error", "new_event_loop", "run_server", "serve"]

log = logging.getLogger("corsproxy")

#: Methods retried once on a fresh connection when a pooled keep-alive connection
#: turns out to be closed by the upstream (the race every keep-alive pool has);
#: only without a body, like nginx's proxy_next_upstream default.
_RETRY_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_TEXT = "text/plain; charset=utf-8"
_CRLF = b"\r\n"


# ---------------------------------------------------------------------------
# responses the proxy makes itself
# ---------------------------------------------------------------------------


def _own_head(decision: Decision, status: int, body: bytes) -> bytes:
    """Status line and headers (CRLF after each, no blank line, no Date, no request
    id) of an answer the proxy makes: the decision's CORS headers, Vary, a text body."""
    lines = [(name, value) for name, value in decision.headers]
    if decision.vary:
        lines.append(("Vary", ", ".join(decision.vary)))
    lines.append(("Content-Type", _TEXT))
    lines.append(("Content-Length", str(len(body))))
    return render_head(status, reason_phrase(status), lines)


def _id_line(request_id: str) -> bytes:
    """The ``X-Request-Id`` header line (the id is visible ASCII: see forwarding)."""
    return b"X-Request-Id: " + request_id.encode("latin-1") + _CRLF


def _own_response(decision: Decision, status: int, text: str, request_id: str) -> bytes:
    body = text.encode("utf-8")
    try:
        head = _own_head(decision, status, body)
    except ValueError:  # odd bytes in an echoed value: answer without CORS headers
        head = _own_head(_NO_DECISION, status, body)
    return head + _id_line(request_id) + date_line() + _CRLF + body


_NO_DECISION = Decision(Kind.NOT_CORS, False, None, (), ("Origin",), ("no decision",))


class _Preflight:
    """One preflight answer, computed once: the decision, the whole response except
    its ``Date`` line, and its access line's fixed parts."""

    __slots__ = ("decision", "status", "head", "tail", "log")

    def __init__(self, decision: Decision, log_format: str, origin: str | None,
                 request_method: str | None = None, request_headers: str | None = None
                 ) -> None:
        assert decision.status is not None
        self.decision = decision
        self.status = status = decision.status
        body = decision.body.encode("utf-8")
        self.head = _own_head(decision, status, body)
        self.tail = _CRLF + body
        self.log = AccessTemplate(
            log_format, "OPTIONS", status, origin, decision.verdict, decision.route,
            "; ".join(decision.reasons), len(body), request_method, request_headers,
        )


#: Bounds on the preflight cache: entries, and the key size (characters in the
#: Origin/ACRM/ACRH/ACRPN values) above which a preflight is decided uncached.
_PREFLIGHT_CACHE_SIZE = 1024
_PREFLIGHT_KEY_MAX = 1024
#: Bound on the report-only comparisons kept (emptied when full).
_REPORT_CACHE_SIZE = 4096


class _Log:
    """What the access line says about one request."""

    __slots__ = ("upstream_us", "error", "status", "tunnel", "response_bytes", "report")

    def __init__(self) -> None:
        self.upstream_us: int | None = None
        self.error: str | None = None
        self.status: int | None = None
        self.tunnel: Tunnel | None = None
        #: Body bytes of an answer written whole (else the Response counts them).
        self.response_bytes: int | None = None
        #: Report-only: (result, detail) of the comparison with the upstream's answer.
        self.report: tuple[str, str] | None = None


def _request_view(request: Request, path: str, websocket: bool = False,
                  scheme: str | None = None) -> RequestView:
    acrm = request.get_all("access-control-request-method")
    return RequestView(
        method=request.method,
        path=path,
        origin=tuple(request.get_all("origin")),
        # Several ACRM lines are combined the HTTP way, which is not a valid method.
        request_method=", ".join(acrm) if acrm else None,
        request_headers=tuple(request.get_all("access-control-request-headers")),
        request_private_network=request.get("access-control-request-private-network"),
        host=request.get("host"),
        scheme=scheme or request.scheme,
        websocket=websocket,
    )


class _Policy:
    """Everything a request reads from the policy, swapped as one on a reload: the
    router, the routes' upstream timeouts, and the preflight answers cached for it."""

    __slots__ = ("router", "route_timeouts", "preflights", "reports")

    def __init__(self, config: Config) -> None:
        self.router: Router = config.router
        #: pool.request keywords by route path as written.
        self.route_timeouts: dict[str | None, dict[str, float | None]] = {}
        for route in config.routes:
            own = route.upstream
            if own is None:
                continue
            kwargs: dict[str, float | None] = {}
            if own.timeout is not None:
                kwargs["timeout"] = own.timeout
            if own.read_timeout_set:
                kwargs["read_timeout"] = own.read_timeout
            if kwargs:
                self.route_timeouts[route.path] = kwargs
        #: Whole preflight answers by (route, Origin lines, ACRM, ACRH lines, ACRPN).
        self.preflights: dict[tuple, _Preflight | None] = {}
        #: Report-only comparisons by request and upstream answer (:meth:`Proxy._report`).
        self.reports: dict[tuple, tuple[str, str] | None] = {}


class Proxy:
    """The application behind :class:`~corsproxy.httpserver.HttpServer`: decides,
    answers or forwards, and logs (one per listening process)."""

    def __init__(self, config: Config, *, log_format: str = "text",
                 write_access: Callable[[str], Any] | None = None) -> None:
        if log_format not in LOG_FORMATS:
            raise ValueError(f"log format {log_format!r}: use one of {', '.join(LOG_FORMATS)}")
        if config.upstream.url is None:
            raise ValueError(
                f"{config.source}: upstream.url: not set; add it to the config "
                f"or pass --upstream URL"
            )
        self.config = config
        #: The policy in force; a reload swaps it whole (:meth:`swap`).
        self.policy = _Policy(config)
        self.target = UpstreamTarget(config.upstream.url)
        self.preserve_host = config.upstream.preserve_host
        self.max_body_size = config.listen.max_body_size
        self.connect_timeout = config.upstream.connect_timeout
        self.timeout = config.upstream.timeout
        self.read_timeout = config.upstream.read_timeout
        self.ws_idle_timeout = config.websocket.idle_timeout
        self.log_format = log_format
        self.pool: UpstreamPool | None = None
        #: Where access lines go: the ``corsproxy.access`` logger, or a batching
        #: writer straight to stderr (:func:`corsproxy.logs.access_writer`).
        self.write_access: Callable[[str], Any] = write_access or ACCESS_LOGGER.info
        self.closing = False
        #: Prometheus metrics (``corsproxy.metrics``), rendered by the admin listener.
        self.metrics = Metrics()
        #: listen.trusted_proxies, and the verdict per peer address seen (bounded).
        self.trusted_networks = config.listen.trusted_proxies
        self._trusted_peers: dict[str, bool] = {}

    def reload_result(self, ok: bool, errors: list[str] | None = None) -> None:
        """A config reload's outcome and errors (``corsproxy.reload`` reports it), for
        the metrics and the admin page."""
        if ok:
            self.metrics.reload_succeeded()
        else:
            self.metrics.reload_failed(errors or ())

    @property
    def router(self) -> Router:
        return self.policy.router

    @property
    def preflights(self) -> dict[tuple, _Preflight | None]:
        return self.policy.preflights

    def swap(self, config: Config) -> None:
        """Use ``config``'s policy for new requests (a reload); requests in flight
        keep the one they started with."""
        self.config = config
        self.policy = _Policy(config)

    async def open(self) -> None:
        upstream = self.config.upstream
        self.pool = UpstreamPool(
            self.target.url,
            connect_timeout=upstream.connect_timeout,
            timeout=upstream.timeout,
            read_timeout=upstream.read_timeout,
            max_connections=upstream.max_connections,
            idle_timeout=upstream.idle_timeout,
            ssl=_upstream_tls(self.config) if self.target.url.startswith("https:") else None,
        )

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
            self.pool = None

    # -- the server's interface ---------------------------------------------------------

    def fast(self, request: Request) -> bytes | None:
        """Check the target and Host; answer a refused request or a cached
        preflight at once (bytes), or None: :meth:`serve` runs."""
        try:
            target = check_target(request.method, request.target)
            check_host(request.get_all("host"), request.version)
        except Rejected as exc:
            request.conn.must_close = True
            return self.refuse(request, exc.status, str(exc))
        request.checked_target = target
        if request.method != "OPTIONS" or request.has_body:
            return None
        path = target.partition("?")[0]
        cached = self._preflight(self.policy, request, path)
        if cached is None:
            return None
        request_id = self.request_id(request)
        elapsed = time.perf_counter() - request.started
        self.metrics.request(cached.decision, elapsed, request)
        if ACCESS_LOGGER.isEnabledFor(logging.INFO):
            self.write_access(cached.log.line(self._client(request), path, request_id,
                                              int(elapsed * 1e6)))
        return cached.head + _id_line(request_id) + date_line() + cached.tail

    def request_id(self, request: Request) -> str:
        """The request's id: the client's ``X-Request-Id`` when it is a reasonable
        token, else a new one (chosen once per request)."""
        request_id = request.request_id
        if request_id is None:
            request_id = request.request_id = (
                client_request_id(request.get_all("x-request-id")) or new_request_id()
            )
        return request_id

    def _trusted(self, address: str | None) -> bool:
        """Whether ``address`` is in listen.trusted_proxies."""
        if not self.trusted_networks or not address:
            return False
        known = self._trusted_peers.get(address)
        if known is None:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                known = False
            else:
                known = any(ip in network for network in self.trusted_networks)
            if len(self._trusted_peers) >= 4096:
                self._trusted_peers.clear()
            self._trusted_peers[address] = known
        return known

    def _scheme(self, request: Request) -> str:
        """The scheme the client used: the listener's, or a trusted proxy's
        X-Forwarded-Proto."""
        if self.trusted_networks and self._trusted(request.remote):
            return forwarded_proto(request.headers) or request.scheme
        return request.scheme

    def _client(self, request: Request) -> str | None:
        """The client's address for the log (through trusted proxies' X-Forwarded-For)."""
        remote = request.remote
        if self.trusted_networks and remote:
            return real_client(remote, request.headers, self._trusted)
        return remote

    def refuse(self, request: Request, status: int, message: str) -> bytes:
        """The answer to a request refused before routing (400, 405), with the
        CORS headers its route's policy gives, logged."""
        path = request.target.partition("?")[0]
        try:
            decision = self.router.decide(_request_view(request, path))
        except Exception:  # pragma: no cover - decide never raises; still an answer
            decision = _NO_DECISION
        text = f"{reason_phrase(status)}: {message}\n"
        data = _own_response(decision, status, text, self.request_id(request))
        if status == 405:  # RFC 9110 §15.5.6: 405 carries Allow
            end = data.index(b"\r\n\r\n")
            data = data[: end + 2] + b"Allow: GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS\r\n" \
                + data[end + 2:]
        entry = _Log()
        entry.error = message
        entry.status = status
        entry.response_bytes = len(text.encode("utf-8"))
        self._log_access(request, path, decision, entry, refused=True)
        return data

    def log_refusal(self, remote: str | None, status: int, message: str) -> bytes:
        """A request answered before it could be parsed (408, 431, 505, 400): logged
        with a new request id, which the answer carries too."""
        self.metrics.refused_head()
        request_id = new_request_id()
        if ACCESS_LOGGER.isEnabledFor(logging.INFO):
            fields: dict[str, Any] = {
                "client": remote, "method": "-", "path": "-", "status": status,
                "origin": None, "cors": None, "route": None, "request_id": request_id,
                "upstream_us": None, "us": None, "request_bytes": None,
                "response_bytes": None, "error": message, "reason": "",
            }
            self.write_access(access_line(self.log_format, fields))
        return _id_line(request_id)

    async def serve(self, request: Request, response: Response) -> None:
        target = request.checked_target or check_target(request.method, request.target)
        path = target.partition("?")[0]
        entry = _Log()
        decision: Decision | None = None
        policy = self.policy  # the request keeps this one, whatever a reload does
        request_id = self.request_id(request)
        try:
            websocket = request.upgrade and is_handshake(request)
            decision = policy.router.decide(
                _request_view(request, path, websocket, self._scheme(request))
            )
            if decision.status is not None and not decision.report_only:
                entry.status = decision.status
                data = _own_response(decision, decision.status, decision.body, request_id)
                entry.response_bytes = len(data) - data.index(b"\r\n\r\n") - 4
                response.whole(data, decision.status)
            else:
                await self._forward(request, response, decision, target, entry, policy)
        except asyncio.CancelledError:
            if entry.tunnel is not None:
                entry.tunnel.close("shutdown" if self.closing else "client")
            elif self.closing:
                entry.error = "cut off: still running when listen.shutdown_grace ended"
            else:
                entry.error = "the client closed the connection before the response's end"
            entry.status = response.status
            self._log_access(request, path, decision or _NO_DECISION, entry,
                             response=response)
            raise
        except ClientError as exc:
            entry.error = str(exc)
            entry.status = response.status
            self._log_access(request, path, decision or _NO_DECISION, entry,
                             response=response)
            raise
        except Exception as exc:  # a bug in the proxy: still a clean answer with CORS headers
            log.exception("internal error on %s %s", request.method, path)
            entry.error = f"internal error: {type(exc).__name__}: {exc}"
            if decision is None:
                decision = _NO_DECISION
            if response.started:
                response.abort()
            else:
                entry.status = 502
                text = "Bad Gateway: internal error in corsproxy; see its log\n"
                entry.response_bytes = len(text)
                response.whole(_own_response(decision, 502, text, request_id), 502)
        self._log_access(request, path, decision, entry, response=response)

    # -- forwarding ----------------------------------------------------------------------

    def _error(self, response: Response, decision: Decision, entry: _Log, status: int,
               cause: str, detail: str | None = None) -> None:
        """A 4xx/5xx made by the proxy: the body names the cause in one line; the
        access line also gets ``detail`` (the upstream's address, the low-level error)."""
        entry.status = status
        entry.error = cause if detail is None else f"{cause} ({detail})"
        text = f"{reason_phrase(status)}: {cause}\n"
        entry.response_bytes = len(text.encode("utf-8"))
        response.whole(
            _own_response(decision, status, text, self.request_id(response.request)), status
        )

    async def _forward(self, request: Request, response: Response, decision: Decision,
                       target: str, entry: _Log, policy: _Policy) -> None:
        limit = self.max_body_size
        length = request.content_length
        if limit is not None and length is not None and length > limit:
            return self._error(
                response, decision, entry, 413,
                f"request body of {length} bytes (Content-Length) is over "
                f"listen.max_body_size ({limit} bytes)",
            )
        expect = request.get("expect")
        if expect is not None and expect.lower() != "100-continue":
            return self._error(response, decision, entry, 417,
                               f"corsproxy only understands Expect: 100-continue, not "
                               f"{expect!r}")
        trusted = bool(self.trusted_networks) and self._trusted(request.remote)
        headers = upstream_request_headers(
            request.headers,
            client_addr=request.remote,
            scheme=request.scheme,
            upstream_host=self.target.host,
            preserve_host=self.preserve_host,
            request_id=self.request_id(request),
            trusted=trusted,
        )
        websocket = decision.kind is Kind.WEBSOCKET
        if websocket:
            # The hop-by-hop pair that asks the upstream to switch protocols goes on
            # (the Sec-WebSocket-* headers passed as end-to-end ones).
            headers.append(("Connection", "Upgrade"))
            headers.extend(("Upgrade", v) for v in request.get_all("upgrade"))
        timeouts = policy.route_timeouts.get(decision.route)
        # The target goes upstream byte for byte (a fragment is never sent).
        path = self.target.base_path + target.partition("#")[0]
        body = _RequestBody(request, limit) if request.has_body else None
        pool = self.pool
        assert pool is not None
        sent = time.perf_counter()
        try:
            upstream = await pool.request(
                request.method,
                path,
                headers,
                body.chunks() if body is not None else None,
                retry=body is None and request.method in _RETRY_METHODS,
                upgrade=websocket,
                **(timeouts or {}),
            )
        except UpstreamError as exc:
            return self._upstream_error(response, decision, entry, body, exc, timeouts)
        except ValueError as exc:
            return self._error(response, decision, entry, 400,
                               "the request can't be forwarded", str(exc))
        entry.upstream_us = int((time.perf_counter() - sent) * 1e6)
        if upstream.status == 101:
            return await self._tunnel(request, response, decision, upstream, entry)
        try:
            await self._stream_back(request, response, decision, upstream, entry)
        finally:
            upstream.release()

    async def _tunnel(self, request: Request, response: Response, decision: Decision,
                      upstream: UpstreamResponse, entry: _Log) -> None:
        """Relay the upstream's 101, then bytes both ways until the tunnel ends."""
        entry.status = 101
        pairs = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in upstream.raw_headers]
        headers = response_headers(pairs, decision.headers, decision.vary,
                                   self.request_id(request), decision.report_only)
        if decision.report_only:
            self._report(request, decision, 101, pairs, entry)
        headers.append(("Connection", "Upgrade"))
        headers.extend((n, v) for n, v in pairs if n.lower() == "upgrade")
        try:
            head = render_head(101, upstream.reason or "Switching Protocols", headers)
        except ValueError as exc:  # pragma: no cover - llhttp refuses such bytes already
            upstream.close()
            return self._error(response, decision, entry, 502,
                               "the upstream sent an invalid HTTP response", str(exc))
        try:
            transport, upstream_tail = upstream.detach()
        except UpstreamError as exc:  # the pool closed (shutdown) just before
            upstream.release()
            return self._error(response, decision, entry, 502,
                               "the upstream connection closed before the tunnel began", str(exc))
        client = request.conn.transport
        assert client is not None
        tunnel = Tunnel(client, transport, self.ws_idle_timeout)
        entry.tunnel = tunnel
        client_tail = response.switch(head + _CRLF, tunnel)
        tunnel.start(client_tail, upstream_tail)
        # Shielded: a cancellation (the end of the shutdown grace) must reach the
        # handler, which closes the tunnel and records why, not the tunnel's future.
        await asyncio.shield(tunnel.done)

    def _upstream_error(self, response: Response, decision: Decision, entry: _Log,
                        body: _RequestBody | None, exc: UpstreamError,
                        timeouts: dict[str, float | None] | None = None) -> None:
        """The proxy's answer when no upstream response came."""
        where = f"upstream {self.target.origin}: {exc}"
        timeout = (timeouts or {}).get("timeout", self.timeout)
        if body is not None and body.too_large:
            return self._error(
                response, decision, entry, 413,
                f"request body is over listen.max_body_size ({body.limit} bytes)",
                "the upstream connection was dropped",
            )
        client_error = body.client_error if body is not None else None
        if client_error is not None:
            status = 408 if client_error.timed_out else 400
            return self._error(response, decision, entry, status, str(client_error),
                               "the upstream connection was dropped")
        self.metrics.upstream_error(exc)
        if isinstance(exc, PoolTimeout):
            return self._error(
                response, decision, entry, 503,
                f"every upstream connection stayed busy for {self.connect_timeout:g} s "
                f"(upstream.max_connections)", where,
            )
        if isinstance(exc, ConnectTimeout):
            return self._error(
                response, decision, entry, 504,
                f"the upstream accepted no connection within upstream.connect_timeout "
                f"({self.connect_timeout:g} s)", where,
            )
        if isinstance(exc, ResponseTimeout):
            return self._error(
                response, decision, entry, 504,
                f"the upstream sent no response headers within upstream.timeout "
                f"({timeout:g} s)", where,
            )
        if isinstance(exc, SendTimeout):
            return self._error(
                response, decision, entry, 504,
                f"the upstream accepted none of the request body for upstream.timeout "
                f"({timeout:g} s)", where,
            )
        if isinstance(exc, ConnectError):
            refused = getattr(exc.os_error, "errno", None) == errno.ECONNREFUSED
            cause = "upstream refused the connection" if refused else \
                "cannot connect to the upstream"
            return self._error(response, decision, entry, 502, cause, where)
        if isinstance(exc, Disconnected):
            return self._error(response, decision, entry, 502,
                               "the upstream closed the connection without a response", where)
        if isinstance(exc, UpgradeResponse):
            return self._error(response, decision, entry, 502,
                               "the upstream switched protocols (101), which corsproxy does "
                               "not proxy here", where)
        if isinstance(exc, InvalidResponse):
            return self._error(response, decision, entry, 502,
                               "the upstream sent an invalid HTTP response", where)
        if isinstance(exc, ConnectionFailed):
            return self._error(response, decision, entry, 502,
                               "the connection to the upstream failed", where)
        return self._error(response, decision, entry, 502, "the request to the upstream failed",
                           where)

    async def _stream_back(self, request: Request, response: Response, decision: Decision,
                           upstream: UpstreamResponse, entry: _Log) -> None:
        pairs = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in upstream.raw_headers]
        headers = response_headers(pairs, decision.headers, decision.vary,
                                   self.request_id(request), decision.report_only)
        status = upstream.status
        entry.status = status
        if decision.report_only:
            self._report(request, decision, status, pairs, entry)
        names = {n.lower() for n, _ in headers}
        codings = upstream.transfer_codings
        has_length = "content-length" in names and not upstream.chunked and not codings
        no_body = status < 200 or status in (204, 304) or request.method == "HEAD"
        has_date = "date" in names
        try:
            head = render_head(status, upstream.reason, headers)
        except ValueError as exc:  # pragma: no cover - llhttp refuses such bytes already
            upstream.close()
            return self._error(response, decision, entry, 502,
                               "the upstream sent an invalid HTTP response", str(exc))
        if upstream.complete and has_length and not no_body:
            # The whole body is here and framed by its Content-Length: one write.
            data = await upstream.read()
            entry.response_bytes = len(data)
            response.whole(
                head + (b"" if has_date else date_line()) + _CRLF + data, status
            )
            return
        response.start(
            status, head, has_date=has_date, length=has_length or no_body,
            codings=", ".join(c.decode("latin-1") for c in codings) if codings else None,
            no_body=no_body,
        )
        read = upstream.read
        while True:
            try:
                chunk = await read()
            except UpstreamError as exc:
                # Too late for a status: cut the client connection so it sees an
                # incomplete body instead of a clean (truncated) end.
                entry.error = f"upstream failed while sending the body: {exc}"
                self.metrics.upstream_error(exc)
                upstream.close()
                response.abort()
                return
            if not chunk:
                break
            if upstream.at_eof:  # the last piece: body and end in one write
                await response.end(chunk)
                return
            await response.send(chunk)
        await response.end()

    def _report(self, request: Request, decision: Decision, status: int,
                pairs: list[tuple[str, str]], entry: _Log) -> None:
        """Report-only: compare the upstream's answer with the policy's decision, for
        the access line and the metrics (:mod:`corsproxy.report`)."""
        origins = request.get_all("origin")
        if len(origins) != 1:
            return
        acrm = request.get_all("access-control-request-method")
        acrh = tuple(request.get_all("access-control-request-headers"))
        private_network = request.get("access-control-request-private-network") == "true"
        cookies = request.get("cookie") is not None
        theirs = tuple(p for p in pairs if p[0][:15].lower() == "access-control-")
        # The same request and answer repeat: compare each combination once (bounded).
        key = (decision, status, theirs, origins[0], tuple(acrm), acrh, private_network,
               cookies)
        reports = self.policy.reports
        try:
            report = reports[key]
        except KeyError:
            report = compare(
                decision, status, theirs, origin=origins[0],
                request_method=", ".join(acrm) if acrm else None, request_headers=acrh,
                private_network=private_network, cookies=cookies,
            )
            size = len(origins[0]) + sum(map(len, acrh)) + sum(len(n) + len(v) for n, v in theirs)
            if size <= _PREFLIGHT_KEY_MAX:  # never keep large hostile values
                if len(reports) >= _REPORT_CACHE_SIZE:
                    reports.clear()
                reports[key] = report
        if report is not None:
            entry.report = report
            self.metrics.report(decision, report[0], report[1], origins[0])

    # -- preflights from precomputed answers -------------------------------------------

    def _preflight(self, policy: _Policy, request: Request, path: str) -> _Preflight | None:
        """The cached answer for a preflight (deciding and caching it on a miss), or
        None when this is no preflight or its values are too large to cache."""
        acrm = request.get_all("access-control-request-method")
        origin = request.get_all("origin")
        if not acrm or not origin:
            return None
        acrh = request.get_all("access-control-request-headers")
        acrpn = request.get("access-control-request-private-network")
        router = policy.router
        route = router.select(path)[0] if router.routes else None
        if router.report_only and route in router.report_only:
            return None  # forwarded: the upstream answers report-only preflights
        key = (route, *origin, "\0", *acrm, "\0", *acrh, "\0", acrpn)
        cache = policy.preflights
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
            entry: _Preflight | None = _Preflight(
                decision, self.log_format, ", ".join(origin) or None, ", ".join(acrm),
                ", ".join(acrh) if acrh else None,
            )
        except ValueError:  # odd bytes in an echoed value: the general path handles it
            entry = None
        if len(cache) >= _PREFLIGHT_CACHE_SIZE:
            del cache[next(iter(cache))]  # oldest first
        cache[key] = entry
        return entry

    # -- logging ----------------------------------------------------------------------------

    def _log_access(self, request: Request, path: str, decision: Decision, entry: _Log,
                    refused: bool = False, response: Response | None = None) -> None:
        """The access line, and the request's metrics (``refused``: before routing).

        Keys: client (through trusted proxies), method, path (no query), status,
        origin, cors (verdict), route, request_id, upstream_us (until the upstream's
        response head), us (the whole request), request_bytes and response_bytes
        (body bytes received and sent, without chunk framing; WebSocket tunnels
        count up_bytes/down_bytes instead and say closed_by), error, reason."""
        elapsed = time.perf_counter() - request.started
        self.metrics.request(decision, elapsed, request, refused)
        if not ACCESS_LOGGER.isEnabledFor(logging.INFO):
            return
        tunnel = entry.tunnel
        sent = entry.response_bytes
        if sent is None:
            sent = response.sent if response is not None else 0
        fields: dict[str, Any] = {
            "client": self._client(request),
            "method": request.method,
            "path": path,
            "status": entry.status,
            "origin": ", ".join(request.get_all("origin")) or None,
            "cors": decision.verdict,
            "route": decision.route,
            "request_id": self.request_id(request),
            "upstream_us": entry.upstream_us,
            "us": int(elapsed * 1e6),
            "request_bytes": None if tunnel is not None else request.body.size,
            "response_bytes": None if tunnel is not None else sent,
            "request_method": None,
            "request_headers": None,
            "credentials": None,
            "report": None,
            "report_detail": None,
            "error": entry.error,
            "reason": "; ".join(decision.reasons),
        }
        if decision.kind is not Kind.NOT_CORS:
            if decision.kind is Kind.PREFLIGHT:
                fields["request_method"] = ", ".join(
                    request.get_all("access-control-request-method")) or None
                fields["request_headers"] = ", ".join(
                    request.get_all("access-control-request-headers")) or None
            elif request.get("cookie") is not None:
                fields["credentials"] = True
            if entry.report is not None:
                fields["report"], detail = entry.report
                fields["report_detail"] = detail or None
        if tunnel is not None:
            fields["up_bytes"] = tunnel.up_bytes
            fields["down_bytes"] = tunnel.down_bytes
            fields["closed_by"] = tunnel.closed_by
        self.write_access(access_line(self.log_format, fields))


class _BodyTooLarge(Exception):
    pass


class _RequestBody:
    """The client's body as an async iterator for the upstream request, counted
    against ``listen.max_body_size``; records which side failed."""

    __slots__ = ("request", "limit", "size", "too_large", "client_error")

    def __init__(self, request: Request, limit: int | None) -> None:
        self.request = request
        self.limit = limit
        self.size = 0
        self.too_large = False
        self.client_error: ClientError | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        read, limit = self.request.body.read, self.limit
        while True:
            try:
                chunk = await read()
            except ClientError as exc:  # the client went away, stalled or broke the body
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


# ---------------------------------------------------------------------------
# running it
# ---------------------------------------------------------------------------


def limits_of(config: Config) -> Limits:
    listen = config.listen
    return Limits(
        header_timeout=listen.header_timeout,
        keepalive_timeout=listen.keepalive_timeout,
        body_timeout=listen.body_timeout,
        send_timeout=listen.send_timeout,
        max_header_size=listen.max_header_size,
    )


def _server_tls(cert_file: str, key_file: str) -> ssl.SSLContext:
    """HTTPS for the listener: TLS 1.2 or later, HTTP/1.1 offered by ALPN."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    context.load_cert_chain(cert_file, key_file)
    return context


def _upstream_tls(config: Config) -> ssl.SSLContext:
    """The context for an https upstream: the system's CAs, or upstream.ca_file's;
    no checks at all with upstream.tls_insecure_skip_verify. SNI is the URL's host."""
    upstream = config.upstream
    context = ssl.create_default_context(cafile=upstream.ca_file)
    if upstream.tls_insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class ProxyServer:
    """The proxy listening on ``config.listen`` (``corsproxy run`` and the tests run
    this same object): ``await start()``, then ``await stop()``."""

    def __init__(self, config: Config, *, log_format: str = "text",
                 write_access: Callable[[str], Any] | None = None) -> None:
        self.config = config
        self.proxy = Proxy(config, log_format=log_format, write_access=write_access)
        self.server: HttpServer | None = None
        self.host = config.listen.host
        self.port = config.listen.port
        #: The listener's TLS context (listen.tls), and the newest certificate's context
        #: that new handshakes switch to (rotation, :meth:`reload`).
        self.tls_context: ssl.SSLContext | None = None
        self._tls_current: ssl.SSLContext | None = None
        #: Readiness (the admin listener's /readyz): listening, and not stopping.
        self.listening = False
        self.stopping = False

    async def start(self, *, reuse_port: bool = False) -> tuple[str, int]:
        """Open the upstream pool and listen; returns the bound (host, port).
        Raises OSError when the address can't be used."""
        await self.proxy.open()
        self.server = HttpServer(self.proxy, limits_of(self.config))
        tls = self.config.listen.tls
        if tls is not None:
            self.tls_context = _server_tls(tls.cert_file, tls.key_file)
            self.tls_context.sni_callback = self._pick_tls
        try:
            self.host, self.port = await self.server.listen(
                self.config.listen.host, self.config.listen.port, reuse_port=reuse_port,
                ssl=self.tls_context,
            )
        except OSError:
            await self.proxy.close()
            raise
        self.listening = True
        return self.host, self.port

    def reload(self, config: Config) -> None:
        """A reload: the certificate files read again into a new context (rotation:
        new handshakes use it, open connections keep theirs), then the new policy for
        new requests. A certificate that fails to load raises before anything changes."""
        tls = self.config.listen.tls
        if self.tls_context is not None and tls is not None:
            self._tls_current = _server_tls(tls.cert_file, tls.key_file)
        self.proxy.swap(config)

    def _pick_tls(self, sock: ssl.SSLObject, name: str | None, context: ssl.SSLContext
                  ) -> None:
        """SNI callback of the listening context: hand each new handshake the newest
        certificate (a context swapped in by :meth:`reload`)."""
        current = self._tls_current
        if current is not None and current is not context:
            sock.context = current

    async def stop(self, grace: float | None = None) -> int:
        """Stop accepting; in-flight requests get ``grace`` seconds (default
        ``listen.shutdown_grace``), then are cut. Returns how many were cut."""
        self.stopping = True  # first: /readyz answers 503 from now on
        if grace is None:
            grace = self.config.listen.shutdown_grace
        cut = [0]
        self.proxy.closing = True
        if self.server is not None:
            await self.server.shutdown(grace, on_cut=lambda n: cut.__setitem__(0, n))
        await self.proxy.close()
        return cut[0]


async def serve(
    config: Config,
    *,
    log_format: str = "text",
    stop: asyncio.Event | None = None,
    ready: Any = None,
    reuse_port: bool = False,
    load: Callable[[], Config] | None = None,
) -> int:
    """Run the proxy until ``stop`` is set (or SIGTERM/SIGINT when ``stop`` is None),
    then shut down gracefully: stop accepting, give in-flight requests exactly
    ``listen.shutdown_grace`` seconds, cut what is left, close the upstream pool.
    Returns the exit code.

    ``ready(host, port)`` is called once listening (port 0 picks a free port).
    ``reuse_port`` listens with SO_REUSEPORT (one of several worker processes).
    """
    loop = asyncio.get_running_loop()
    writer = access_writer()
    server = ProxyServer(config, log_format=log_format, write_access=writer)
    from .admin import admin_fields, admin_note, open_admin

    # The admin listener first: /readyz answers 503 until the proxy listens.
    admin, problem = await open_admin(server, reuse_port=reuse_port)
    if problem is not None:
        _event(log_format, "error", problem)
        return 1
    host, port = config.listen.host, config.listen.port
    try:
        bound = await server.start(reuse_port=reuse_port)
    except OSError as exc:
        _event(log_format, "error", f"cannot listen on {host}:{port}: {describe_error(exc)}; "
                                    f"pick another address with --host/--port or listen.port")
        if admin is not None:
            await admin.stop()
        return 1
    # Signals are handled before the listening line: whoever reads that line may
    # send SIGTERM or SIGHUP at once.
    own_signals = stop is None
    if stop is None:
        stop = asyncio.Event()
    if own_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    reloader = None
    if load is not None:  # SIGHUP and file changes reload the policy (corsproxy.reload)
        from .reload import Reloader

        reloader = Reloader(
            config, load, server.reload,
            lambda event, message, **fields: _event(log_format, event, message, **fields),
            getattr(server.proxy, "reload_result", None),
        )
        reloader.start()
        loop.add_signal_handler(signal.SIGHUP, reloader.reload)

    def reopen() -> None:  # SIGUSR1: logrotate moved log.file away
        flush = getattr(writer, "flush", None)
        if flush is not None:
            flush()  # what was logged so far goes to the old file
        problem = reopen_log_file()
        if problem is not None:
            _event(log_format, "error", problem)

    if own_signals:
        loop.add_signal_handler(signal.SIGUSR1, reopen)
    loop_name = type(loop).__module__.partition(".")[0]  # "uvloop" or "asyncio"
    scheme = "https" if config.listen.tls else "http"
    workers: dict[str, Any] = {}
    if not reuse_port:  # one process: say why one (a worker's parent said it for all)
        from .workers import workers_note

        workers = {"workers": 1, "why": workers_note(config.listen.workers)}
    _event(log_format, "listening", f"corsproxy listening on {scheme}://{_hostport(*bound)}, "
                                    f"forwarding to {config.upstream.url} ({loop_name})"
                                    f"{admin_note(admin)}"
                                    + (f"; 1 worker ({workers['why']})" if workers else ""),
           host=bound[0], port=bound[1], upstream=config.upstream.url, loop=loop_name,
           pid=os.getpid(), **admin_fields(admin), **workers)
    if ready is not None:
        ready(bound[0], bound[1])
    grace = config.listen.shutdown_grace
    try:
        await stop.wait()
        if reloader is not None:
            reloader.stop()
            loop.remove_signal_handler(signal.SIGHUP)
        _event(log_format, "stopping", f"stopping: no new connections; in-flight requests get "
                                       f"{grace:g} s (listen.shutdown_grace)")
        cut = await server.stop(grace)
        if cut:
            _event(log_format, "cut", f"{cut} connection(s) still busy after "
                                      f"listen.shutdown_grace ({grace:g} s) were closed",
                   connections=cut)
    finally:
        if admin is not None:  # after the proxy's grace: /readyz said 503 all along
            await admin.stop()
        if own_signals:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
                loop.remove_signal_handler(sig)
        flush = getattr(writer, "flush", None)
        if flush is not None:
            flush()
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


def _raise_fd_limit() -> None:
    """Each client costs a file descriptor and each forwarded one a second: raise the
    soft RLIMIT_NOFILE to the hard limit (as nginx's worker_rlimit_nofile would), so
    the common soft limit of 1024 is not what caps the connections."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = max(soft, 1 << 20)
        if soft != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, OSError, ValueError):  # pragma: no cover - not permitted: keep it
        pass


def run_server(config: Config, *, log_format: str | None = None, reuse_port: bool = False,
               load: Callable[[], Config] | None = None) -> int:
    """Run the proxy in the foreground until SIGTERM/SIGINT; returns the exit code.

    ``log_format`` overrides ``log.format`` (``run --log-format``). With
    ``listen.workers`` above 1 (or ``auto`` on a machine with several cores)
    this process supervises that many worker processes (``corsproxy.workers``);
    ``reuse_port`` is how a worker runs its own server on the shared port."""
    log_format = log_format or config.log.format
    if not reuse_port:
        from .workers import resolve_workers, run_workers

        count = resolve_workers(config.listen.workers)
        if count > 1:
            return run_workers(config, log_format=log_format, count=count, load=load)
        # SIGUSR1 (reopen the log) before its handler is set must not end the process.
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        setup_logging(log_format, file=config.log.file, access=config.log.access)
    except OSError as exc:
        print(event_line(log_format, "error", f"cannot open log.file {config.log.file}: "
                                              f"{describe_error(exc)}; check the path and "
                                              f"its permissions"), file=sys.stderr, flush=True)
        return 1
    _raise_fd_limit()
    # Everything loaded so far (the policy, pydantic) lives as long as the process:
    # move it out of the cyclic GC's reach, so the collections that request garbage
    # triggers stop re-scanning it (small proxied GET: ~12% less CPU).
    gc.collect()
    gc.freeze()
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(
            serve(config, log_format=log_format, reuse_port=reuse_port, load=load)
        )


if __name__ == "__main__":  # pragma: no cover - `python -m corsproxy run` is the entry point
    sys.exit("use: corsproxy run --config FILE")
