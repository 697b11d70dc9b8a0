"""The admin listener (``admin.host``/``admin.port``, default ``127.0.0.1:9901``):
health, readiness, metrics and the last denied origins, on a port of its own.

It is the proxy's own HTTP/1.1 server (:class:`corsproxy.httpserver.HttpServer`)
with a tiny application, :class:`AdminApp`. Every answer is made at once from
memory (``fast()``), except ``/readyz`` with ``admin.ready_checks_upstream`` when
its cached upstream check is older than :data:`UPSTREAM_CHECK_TTL`:

- ``GET /healthz``: 200 ``ok`` while the process serves (a liveness probe).
- ``GET /readyz``: 200 ``ready`` once the proxy listens with its policy loaded; 503
  while starting and from the moment a stop begins (SIGTERM: the proxy still
  finishes its in-flight requests for ``listen.shutdown_grace``, but a load
  balancer should send no more). With ``admin.ready_checks_upstream: true`` also
  503 while a TCP connect to the upstream's host and port fails within
  ``upstream.connect_timeout`` (checked at most once per
  :data:`UPSTREAM_CHECK_TTL` seconds; no TLS, no HTTP request).
- ``GET /metrics``: the Prometheus text format (:mod:`corsproxy.metrics`).
- ``GET /denied``: JSON ``{"kept": 100, "denied": [...]}``: the last 100 distinct
  (origin, route, reason) denials, most recent first, with ``count``,
  ``first_seen`` and ``last_seen``. ``route`` is null for the top-level policy.
- ``GET /``: the page (:mod:`corsproxy.dashboard`; its files are ``/ui/...``): the
  policy, the denied origins, the report-only disagreements, the reloads and an
  explain form, refreshed every few seconds from the JSON below.
- ``GET /api/policy``: JSON, the effective policy of the top-level ``cors`` and of
  every route, read from the policy in use (a reload shows at once).
- ``GET /api/status``: JSON, version, pid, config file, upstream, readiness, when
  the policy in use was loaded and the reload history (this process's).
- ``GET /api/report``: JSON ``{"kept": 100, "disagreements": [...]}``: the last 100
  distinct report-only disagreements (origin, route, kind, direction, detail),
  most recent first, with counts and ISO times like ``/denied``.
- ``GET /api/explain?origin=...&method=...&path=...&request_method=...&
  request_headers=...&request_private_network=1&host=...&websocket=1``: the JSON
  object ``corsproxy explain --json`` prints for that request (the same code); 400
  ``{"error": "..."}`` for a query that describes no request.

Anything else is 404, any method but GET 405. Every answer carries
``Cache-Control: no-store`` and :data:`corsproxy.dashboard.SECURITY_HEADERS` (a
Content-Security-Policy allowing nothing but the listener's own files,
``nosniff``, no referrer, no framing). Admin requests are never written to the
access log, never counted in the proxy's metrics and never forwarded.

Several workers (``listen.workers``): every worker binds the admin port with
``SO_REUSEPORT`` (the parent holds it, like the main port), so any of them answers;
``/metrics`` and ``/denied`` are the totals over all workers (files in the shared
directory of :mod:`corsproxy.metrics`, another worker's gauges and denied list at
most :data:`corsproxy.metrics.REFRESH` seconds old); ``/healthz`` and ``/readyz``
are the answering worker's own.

Bounds: the ``listen.*`` timeouts, capped short (:func:`admin_limits`): an admin
client has at most 5 s for a request head or body, 10 s to take a response, 30 s
idle between keep-alive requests; request heads up to 8 KiB (an
``/api/explain`` query included).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ._wire import date_line, reason_phrase
from .core import DEFAULT_PORTS
from .dashboard import (
    SECURITY_HEADERS,
    BadQuery,
    asset,
    explain_query,
    policy_json,
    report_json,
    status_json,
    with_iso,
)
from .httpserver import HttpServer, Limits, Request, Response
from .logs import describe_error
from .metrics import CONTENT_TYPE, DENIED_KEPT, REFRESH

if TYPE_CHECKING:
    from .config import Config
    from .server import ProxyServer

__all__ = [
    "UPSTREAM_CHECK_TTL",
    "AdminApp",
    "AdminServer",
    "admin_fields",
    "admin_limits",
    "admin_note",
    "cannot_listen",
    "open_admin",
]

#: Seconds an upstream check's result is reused by ``/readyz``.
UPSTREAM_CHECK_TTL = 1.0
#: Seconds admin requests get to finish when the admin listener stops.
ADMIN_GRACE = 0.5
_TEXT = "text/plain; charset=utf-8"
_JSON = "application/json"
NOT_FOUND = ("Not Found: the admin endpoints are / (the page), /api/policy, /api/status, "
             "/api/report, /api/explain, /healthz, /readyz, /metrics and /denied\n")


def admin_limits(config: Config) -> Limits:
    """The ``listen.*`` bounds, capped short for the admin listener."""
    listen = config.listen
    return Limits(
        header_timeout=min(listen.header_timeout, 5.0),
        keepalive_timeout=min(listen.keepalive_timeout, 30.0),
        body_timeout=min(listen.body_timeout, 5.0),
        send_timeout=min(listen.send_timeout, 10.0),
        max_header_size=min(listen.max_header_size, 8192),
    )


def _response(request: Request | None, status: int, body: bytes, content_type: str = _TEXT,
              extra: str = "") -> bytes:
    """A whole response (the server adds its Connection line)."""
    head = (
        f"HTTP/1.1 {status} {reason_phrase(status)}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n{SECURITY_HEADERS}{extra}"
    ).encode("latin-1")
    if request is not None and request.method == "HEAD":
        body = b""
    return head + date_line() + b"\r\n" + body


def _text(request: Request, status: int, text: str) -> bytes:
    return _response(request, status, text.encode("utf-8"))


def _json(request: Request, status: int, data: Any) -> bytes:
    body = json.dumps(data, indent=2) + "\n"
    return _response(request, status, body.encode("utf-8"), _JSON)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def cannot_listen(host: str, port: int, exc: OSError) -> str:
    """The one log line for an admin address that can't be used."""

    return (f"cannot listen on {_hostport(host, port)} for the admin endpoints: "
            f"{describe_error(exc)}; pick another admin.port (or admin.port: null to turn "
            f"the admin listener off)")


class AdminApp:
    """The :class:`~corsproxy.httpserver.Application` of the admin listener, for one
    :class:`~corsproxy.server.ProxyServer` (see the module docstring)."""

    def __init__(self, proxy_server: ProxyServer) -> None:
        self.proxy_server = proxy_server
        config = proxy_server.config
        self.metrics = proxy_server.proxy.metrics
        self.check_upstream = config.admin.ready_checks_upstream
        url = urlsplit(proxy_server.proxy.target.url)
        self.upstream_host = url.hostname or ""
        self.upstream_port = url.port or int(DEFAULT_PORTS.get(url.scheme, "80"))
        self.connect_timeout = config.upstream.connect_timeout
        #: (monotonic time, problem or None) of the last upstream check.
        self._checked: tuple[float, str | None] = (-math.inf, None)
        self._check: asyncio.Task[str | None] | None = None

    # -- the server's interface ---------------------------------------------------------

    def fast(self, request: Request) -> bytes | None:
        path = request.target.partition("?")[0]
        if request.method != "GET":
            return _response(request, 405, b"Method Not Allowed: the admin endpoints answer "
                             b"GET only\n", extra="Allow: GET\r\n")
        if path == "/healthz":
            return _text(request, 200, "ok\n")
        if path == "/readyz":
            problem = self._not_ready()
            if problem is not None:
                return _text(request, 503, f"not ready: {problem}\n")
            if not self.check_upstream:
                return _text(request, 200, "ready\n")
            checked, problem = self._checked
            if time.monotonic() - checked >= UPSTREAM_CHECK_TTL:
                return None  # serve(): check the upstream first
            return self._readiness(request, problem)
        if path == "/metrics":
            return _response(request, 200, self.metrics.render(**self.sample()), CONTENT_TYPE)
        if path == "/denied":
            return _json(request, 200, {"kept": DENIED_KEPT,
                                        "denied": with_iso(self.metrics.denied())})
        if path.startswith("/api/"):
            return self._api(request, path)
        try:
            page = asset(path)
        except OSError as exc:  # pragma: no cover - a broken installation
            return _text(request, 500, f"the page's files are missing from this installation "
                                       f"(corsproxy/ui): {describe_error(exc)}\n")
        if page is not None:
            return _response(request, 200, *page)
        return _text(request, 404, NOT_FOUND)

    async def serve(self, request: Request, response: Response) -> None:
        """``/readyz`` when the upstream must be checked again."""
        problem = await self._upstream_problem()
        not_ready = self._not_ready()  # it may have started stopping meanwhile
        if not_ready is not None:
            data = _text(request, 503, f"not ready: {not_ready}\n")
            response.whole(data, 503)
            return
        data = self._readiness(request, problem)
        response.whole(data, 200 if problem is None else 503)

    def refuse(self, request: Request, status: int, message: str) -> bytes:
        return _text(request, status, f"{reason_phrase(status)}: {message}\n")

    def log_refusal(self, remote: str | None, status: int, message: str) -> bytes:
        """Admin requests are not logged (and carry no request id)."""
        return b""

    # -- the page's JSON -----------------------------------------------------------------

    def _api(self, request: Request, path: str) -> bytes:
        """``/api/...``, read from the policy in use now (a reload swaps
        ``proxy.config``). A bug here is a 500 with its message, never a dropped
        connection (nor the ``/readyz`` of :meth:`serve`)."""
        try:
            return self._api_answer(request, path)
        except Exception as exc:  # pragma: no cover - a bug
            return _json(request, 500, {"error": f"internal error: {type(exc).__name__}: "
                                                 f"{exc}"})

    def _api_answer(self, request: Request, path: str) -> bytes:
        proxy = self.proxy_server.proxy
        config = proxy.config
        if path == "/api/policy":
            return _json(request, 200, policy_json(config))
        if path == "/api/status":
            return _json(request, 200, status_json(config, self.metrics, proxy.target.url,
                                                   self._not_ready()))
        if path == "/api/report":
            return _json(request, 200, report_json(self.metrics, DENIED_KEPT))
        if path == "/api/explain":
            try:
                return _json(request, 200,
                             explain_query(config, request.target.partition("?")[2]))
            except BadQuery as exc:
                return _json(request, 400, {"error": str(exc)})
        return _text(request, 404, NOT_FOUND)

    # -- readiness ----------------------------------------------------------------------

    def _not_ready(self) -> str | None:
        server = self.proxy_server
        if server.stopping:
            return "stopping (in-flight requests are finishing; send no new ones)"
        if not server.listening or server.proxy.router is None:
            return "starting"
        return None

    def _readiness(self, request: Request, problem: str | None) -> bytes:
        if problem is None:
            return _text(request, 200, "ready\n")
        return _text(request, 503, f"not ready: {problem}\n")

    async def _upstream_problem(self) -> str | None:
        checked, problem = self._checked
        if time.monotonic() - checked < UPSTREAM_CHECK_TTL:
            return problem
        if self._check is None:
            self._check = asyncio.get_running_loop().create_task(self._connect())
        return await asyncio.shield(self._check)

    async def _connect(self) -> str | None:
        """A TCP connect to the upstream: None when it worked, else what went wrong."""
        where = _hostport(self.upstream_host, self.upstream_port)
        loop = asyncio.get_running_loop()
        problem: str | None = None
        try:
            async with asyncio.timeout(self.connect_timeout):
                transport, _ = await loop.create_connection(
                    asyncio.Protocol, self.upstream_host, self.upstream_port
                )
            transport.close()
        except TimeoutError:
            problem = (f"no connection to the upstream {where} within upstream.connect_timeout "
                       f"({self.connect_timeout:g} s)")
        except OSError as exc:

            problem = f"cannot connect to the upstream {where}: {describe_error(exc)}"
        finally:
            self._check = None
        self._checked = (time.monotonic(), problem)
        return problem

    # -- values read at render time --------------------------------------------------------

    def sample(self) -> dict[str, int]:
        """The gauges read from the running server: upstream connections, requests
        in flight."""
        server = self.proxy_server
        pool = server.proxy.pool
        http = server.server
        inflight = sum(1 for c in http.connections if not c.idle) if http is not None else 0
        return {
            "idle": pool.idle_count if pool is not None else 0,
            "active": pool.active_count if pool is not None else 0,
            "inflight": inflight,
        }


class AdminServer:
    """The admin listener for one :class:`~corsproxy.server.ProxyServer`:
    ``await start()``, then ``await stop()`` (after the proxy's own stop, so
    ``/readyz`` answers 503 during the grace)."""

    def __init__(self, proxy_server: ProxyServer) -> None:
        admin = proxy_server.config.admin
        assert admin.port is not None, "admin.port is null: no admin listener"
        self.config = proxy_server.config
        self.app = AdminApp(proxy_server)
        self.server: HttpServer | None = None
        self.host: str = admin.host
        self.port: int = admin.port
        self._refresher: asyncio.Task[None] | None = None

    async def start(self, *, reuse_port: bool = False) -> tuple[str, int]:
        """Listen; returns the bound (host, port). Raises OSError when the address
        can't be used (:meth:`cannot_listen` words it)."""
        self.server = HttpServer(self.app, admin_limits(self.config))
        self.host, self.port = await self.server.listen(self.host, self.port,
                                                        reuse_port=reuse_port)
        if self.app.metrics.multiprocess is not None:
            self._refresher = asyncio.get_running_loop().create_task(self._refresh())
        return self.host, self.port

    def cannot_listen(self, exc: OSError) -> str:
        """The one log line for an admin address that can't be used."""
        return cannot_listen(self.host, self.port, exc)

    @property
    def url(self) -> str:
        return f"http://{_hostport(self.host, self.port)}"

    async def _refresh(self) -> None:
        """Several workers: share this worker's gauges and denied list regularly."""
        metrics = self.app.metrics
        while True:
            await asyncio.sleep(REFRESH)
            try:
                metrics.refresh(**self.app.sample())
            except Exception:  # pragma: no cover - never let metrics stop the proxy
                pass

    async def stop(self) -> None:
        refresher, self._refresher = self._refresher, None
        if refresher is not None:
            refresher.cancel()
            try:
                await refresher
            except asyncio.CancelledError:
                pass
        if self.server is not None:
            await self.server.shutdown(ADMIN_GRACE)


async def open_admin(proxy_server: ProxyServer, *, reuse_port: bool = False
                     ) -> tuple[AdminServer | None, str | None]:
    """Start the admin listener when ``admin.port`` is set: (the server or None, the
    one log line saying why it could not listen, or None)."""
    if proxy_server.config.admin.port is None:
        return None, None
    admin = AdminServer(proxy_server)
    try:
        await admin.start(reuse_port=reuse_port)
    except OSError as exc:
        return None, admin.cannot_listen(exc)
    return admin, None


def admin_note(admin: AdminServer | None) -> str:
    """The end of the ``listening`` event's message."""
    return "" if admin is None else f"; admin endpoints on {admin.url}"


def admin_fields(admin: AdminServer | None) -> dict[str, Any]:
    """Fields for the ``listening`` event."""
    if admin is None:
        return {}
    return {"admin": admin.url, "admin_port": admin.port}
