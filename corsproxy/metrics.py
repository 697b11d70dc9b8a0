"""Prometheus metrics: what the proxy counts, and the text the admin listener's
``GET /metrics`` renders (:mod:`corsproxy.admin`).

The :class:`~corsproxy.server.Proxy` owns one :class:`Metrics` and calls it once per
request (:meth:`Metrics.request`, from the place that writes the access line, and
from the cached-preflight path, which skips ``serve()``), for each request refused
before it could be parsed (:meth:`Metrics.refused_head`) and for each upstream
failure (:meth:`Metrics.upstream_error`). A future config-reload module calls
:meth:`Metrics.reload_succeeded` / :meth:`Metrics.reload_failed`.

Per-request cost: prometheus-client's ``labels()`` is slow (~1 µs), so the labelled
children are created once per label combination and kept in a dict keyed by the
decision's fields; a request costs one dict lookup, one ``inc`` and one
``observe``: about 1.5 µs in one process, 3 µs with several workers (the values are
then written to shared files).

Metrics (``README.md``, "Operating it", has the table):

- ``corsproxy_requests_total{route,kind,verdict}``: ``route`` is the route path as
  written in the config (``""``: the top-level policy); ``kind`` is ``preflight``,
  ``actual``, ``not_cors`` or ``websocket``; ``verdict``:

  - ``allowed`` / ``denied``: a preflight answered 200 / 400;
  - ``forwarded``: sent upstream with the policy's CORS headers (or none needed);
  - ``denied``: a cross-origin request from an origin that is not allowed, sent
    upstream without CORS headers (``enforce: false``);
  - ``rejected``: answered 403 (``enforce``, a WebSocket origin check), or refused
    before routing (400/405 for a bad target or Host; 400/408/431/505 for a request
    that could not be parsed, counted as route ``""``, kind ``not_cors``).

- ``corsproxy_request_duration_seconds{route,kind}``: from the end of the request
  head to the end of the response (a WebSocket: to the end of the tunnel). Not for
  requests that could not be parsed.
- ``corsproxy_upstream_errors_total{cause}``: ``refused`` (no connection could be
  opened: refused, unreachable, DNS, TLS), ``connect_timeout`` (no connection within
  ``upstream.connect_timeout``, including waiting for a free one at
  ``upstream.max_connections``), ``timeout`` (no response headers within
  ``upstream.timeout``, a request body not taken, a body silent for
  ``upstream.read_timeout``), ``reset`` (the connection closed or broke), ``protocol``
  (not a valid HTTP response).
- ``corsproxy_upstream_connections{state}``: ``idle`` / ``active`` pooled upstream
  connections, read from the pool when rendering.
- ``corsproxy_inflight_requests``: client connections with a request being received
  or answered (WebSocket tunnels included), read from the server when rendering.
- ``corsproxy_config_reloads_total{result}``, ``success`` / ``failure``.
- ``corsproxy_config_last_reload_success_timestamp_seconds``: Unix time of the last
  successful load (start-up counts).
- ``corsproxy_denied_origins_total{route,reason}``: requests whose CORS check failed
  (``denied`` and ``rejected`` ones), by the first failed check (``origin``,
  ``method``, ``headers``, ``private-network``). The Origin value itself is never a
  label (unbounded); :meth:`Metrics.denied` lists the last ones seen instead.

- ``corsproxy_report_only_disagreements_total{route,kind,direction}``: report-only
  requests (``cors.report_only``) where the policy would have answered differently
  from the upstream; ``direction`` is ``policy_stricter``, ``policy_looser`` or
  ``headers_differ`` (:mod:`corsproxy.report`). :meth:`Metrics.disagreements` keeps
  the last ones, with the detail, for the admin page.

Several workers (``listen.workers``): :func:`enable_multiprocess` (called by the
parent in :mod:`corsproxy.workers` before it forks) switches prometheus-client to
its multiprocess mode: every worker's values live in files in a shared directory
and any worker renders the sum (``MultiProcessCollector``). Gauges: ``livesum`` for
the in-flight and connection gauges (a dead worker's share disappears), ``max``
for the reload timestamp. The gauges read at render time are written to the files
by each worker every :data:`REFRESH` seconds as well (:meth:`Metrics.refresh`), so
another worker's share is at most that old. The denied-origins list is shared the
same way (one small JSON file per worker, written when it changed).
"""

from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    values,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from .core import Kind
from .upstream import (
    BodyError,
    ConnectError,
    ConnectTimeout,
    InvalidResponse,
    PoolTimeout,
    ResponseTimeout,
    SendTimeout,
)

if TYPE_CHECKING:
    from .core import Decision
    from .httpserver import Request

__all__ = [
    "CAUSES",
    "CONTENT_TYPE",
    "DENIED_KEPT",
    "REFRESH",
    "Metrics",
    "enable_multiprocess",
    "multiprocess_dir",
    "upstream_cause",
    "worker_exited",
]

#: The ``Content-Type`` of ``GET /metrics`` (Prometheus text format).
CONTENT_TYPE = CONTENT_TYPE_LATEST
#: Distinct (origin, route, reason) entries kept for ``GET /denied``.
DENIED_KEPT = 100
#: Characters of an Origin value kept in the denied list (the rest is cut).
ORIGIN_KEPT = 256
#: The ``cause`` labels of ``corsproxy_upstream_errors_total`` (all exported from 0).
CAUSES = ("refused", "connect_timeout", "timeout", "reset", "protocol")
#: Seconds between two writes of a worker's gauges and denied list (several workers).
REFRESH = 1.0
#: Seconds buckets of the request duration histogram (a cached preflight takes
#: tens of microseconds; a proxied request what the upstream takes).
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
           10.0, 30.0, 60.0)

_KIND = {
    Kind.PREFLIGHT: "preflight",
    Kind.ACTUAL: "actual",
    Kind.NOT_CORS: "not_cors",
    Kind.WEBSOCKET: "websocket",
}
_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: The shared directory once :func:`enable_multiprocess` ran in this process (or
#: the parent it was forked from).
_multiprocess_dir: str | None = None


def enable_multiprocess(path: str) -> None:
    """Switch this process, and the ones it forks from now on, to prometheus-client's
    multiprocess mode with its files in ``path`` (an empty directory). Call it before
    any :class:`Metrics` exists (the worker parent does, before forking)."""
    global _multiprocess_dir
    os.environ[_ENV] = path
    _multiprocess_dir = path
    # prometheus-client picks its value class when it is first imported; it may have
    # been imported before the variable was set, so pick again.
    values.ValueClass = values.MultiProcessValue()


def multiprocess_dir() -> str | None:
    """The shared metrics directory, or None in single-process mode."""
    return _multiprocess_dir


def worker_exited(pid: int) -> None:
    """Drop a dead worker's live gauges (its counters and denied list stay)."""
    if _multiprocess_dir is not None:
        mark_process_dead(pid, _multiprocess_dir)


def upstream_cause(exc: BaseException) -> str:
    """The ``cause`` label for an upstream failure (see the module docstring)."""
    if isinstance(exc, ConnectError):
        return "refused"
    if isinstance(exc, ConnectTimeout | PoolTimeout):
        return "connect_timeout"
    if isinstance(exc, ResponseTimeout | SendTimeout):
        return "timeout"
    if isinstance(exc, InvalidResponse):
        return "protocol"
    if isinstance(exc, BodyError):
        text = str(exc)
        if "read_timeout" in text:
            return "timeout"
        if text.startswith("invalid"):
            return "protocol"
        return "reset"
    return "reset"  # Disconnected, ConnectionFailed, and anything else


def _verdict(decision: Decision, refused: bool) -> str:
    if refused:
        return "rejected"
    kind = decision.kind
    if kind is Kind.PREFLIGHT:
        return "allowed" if decision.allowed else "denied"
    if decision.status is not None:
        return "rejected"
    if decision.allowed or kind is Kind.NOT_CORS:
        return "forwarded"
    return "denied"


class Metrics:
    """The proxy's metrics (one per :class:`~corsproxy.server.Proxy`, each with its
    own registry, so several proxies can live in one test process).

    ``loaded_at``: Unix time the config was loaded (default: now)."""

    def __init__(self, *, loaded_at: float | None = None) -> None:
        # The _created samples are noise for these dashboards (and absent in
        # multiprocess mode): leave them out in both modes.
        disable_created_metrics()
        self.multiprocess = _multiprocess_dir
        if self.multiprocess is None and getattr(values.ValueClass, "_multiprocess", False):
            # One process: never write into a directory inherited through the
            # environment (prometheus-client reads PROMETHEUS_MULTIPROC_DIR on import).
            values.ValueClass = values.MutexValue
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self._requests = Counter(
            "corsproxy_requests", "Requests by route, kind and CORS verdict.",
            ("route", "kind", "verdict"), registry=registry,
        )
        self._duration = Histogram(
            "corsproxy_request_duration_seconds",
            "Seconds from the end of the request head to the end of the response.",
            ("route", "kind"), buckets=BUCKETS, registry=registry,
        )
        self._upstream_errors = Counter(
            "corsproxy_upstream_errors", "Failed exchanges with the upstream, by cause.",
            ("cause",), registry=registry,
        )
        self._connections = Gauge(
            "corsproxy_upstream_connections", "Open upstream connections by state.",
            ("state",), registry=registry, multiprocess_mode="livesum",
        )
        self._inflight = Gauge(
            "corsproxy_inflight_requests",
            "Client connections with a request being received or answered.",
            registry=registry, multiprocess_mode="livesum",
        )
        self._reloads = Counter(
            "corsproxy_config_reloads", "Config reloads by result.", ("result",),
            registry=registry,
        )
        self._reload_time = Gauge(
            "corsproxy_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful config load (start-up included).",
            registry=registry, multiprocess_mode="max",
        )
        self._denied_total = Counter(
            "corsproxy_denied_origins",
            "Requests whose CORS check failed, by route and first failed check.",
            ("route", "reason"), registry=registry,
        )
        self._idle = self._connections.labels("idle")
        self._active = self._connections.labels("active")
        self._head_refused: Any = None
        self._reload_ok = self._reloads.labels("success")
        self._reload_failed = self._reloads.labels("failure")
        self._causes = {cause: self._upstream_errors.labels(cause) for cause in CAUSES}
        #: (route, kind, status, allowed, refused) -> (count, duration, denied or None)
        self._children: dict[tuple, tuple[Any, Any, Any]] = {}
        self._disagreements_total = Counter(
            "corsproxy_report_only_disagreements",
            "Report-only requests where the policy would have answered differently from the "
            "upstream, by route, request kind and direction.",
            ("route", "kind", "direction"), registry=registry,
        )
        self._report_children: dict[tuple, Any] = {}
        self._denied = Recent("denied", ("origin", "route", "reason"), self.multiprocess)
        self._disagreements = Recent(
            "disagreements", ("origin", "route", "kind", "direction", "detail"),
            self.multiprocess,
        )
        self._reload_status: dict[str, Any] = {
            "loaded_at": time.time() if loaded_at is None else loaded_at,
            "reloads": {"success": 0, "failure": 0}, "last": None,
        }
        self._reload_time.set(time.time() if loaded_at is None else loaded_at)
        self._idle.set(0)
        self._active.set(0)
        self._inflight.set(0)

    # -- recorded by the proxy ----------------------------------------------------------

    def request(self, decision: Decision, seconds: float, request: Request | None = None,
                refused: bool = False) -> None:
        """One answered request: ``decision`` is the policy's (for a request refused
        before routing, ``refused`` and the decision its CORS headers came from);
        ``request``'s Origin values are read only when it was denied."""
        key = (decision.route, decision.kind, decision.status, decision.allowed, refused)
        children = self._children.get(key)
        if children is None:
            children = self._add(key, decision)
        count, duration, denied = children
        count.inc()
        duration.observe(seconds)
        if denied is not None:
            denied.inc()
            origin = ", ".join(request.get_all("origin")) if request is not None else ""
            self._denied.remember((origin[:ORIGIN_KEPT], decision.route, decision.failed[0]))

    def _add(self, key: tuple, decision: Decision) -> tuple[Any, Any, Any]:
        route = decision.route or ""
        kind = _KIND[decision.kind]
        refused = key[-1]
        denied = None
        if not refused and not decision.allowed and decision.failed:
            denied = self._denied_total.labels(route, decision.failed[0])
        children = (
            self._requests.labels(route, kind, _verdict(decision, refused)),
            self._duration.labels(route, kind),
            denied,
        )
        self._children[key] = children
        return children

    def refused_head(self) -> None:
        """A request refused before its head could be parsed (400, 408, 431, 505)."""
        child = self._head_refused
        if child is None:
            child = self._head_refused = self._requests.labels("", "not_cors", "rejected")
        child.inc()

    def upstream_error(self, exc: BaseException) -> None:
        """The upstream exchange failed with ``exc`` (an ``UpstreamError``)."""
        self._causes[upstream_cause(exc)].inc()

    def reload_succeeded(self, ts: float | None = None) -> None:
        """A config reload took effect at Unix time ``ts`` (default: now)."""
        ts = time.time() if ts is None else ts
        self._reload_ok.inc()
        self._reload_time.set(ts)
        status = self._reload_status
        status["loaded_at"] = ts
        status["reloads"]["success"] += 1
        status["last"] = {"result": "success", "at": ts, "errors": []}

    def reload_failed(self, errors: list[str] | tuple[str, ...] = ()) -> None:
        """A config reload was refused (the old config stays in use); ``errors``: why,
        in ``corsproxy check``'s lines."""
        self._reload_failed.inc()
        status = self._reload_status
        status["reloads"]["failure"] += 1
        status["last"] = {"result": "failure", "at": time.time(), "errors": list(errors)}

    # -- the recent lists ------------------------------------------------------------------

    def report(self, decision: Decision, result: str, detail: str, origin: str) -> None:
        """One report-only comparison (:mod:`corsproxy.report`): a disagreement is
        counted and kept in :meth:`disagreements`; ``agree`` is only counted as a
        request (its verdict is in the access line)."""
        if result == "agree":
            return
        key = (decision.route, decision.kind, result)
        child = self._report_children.get(key)
        if child is None:
            child = self._report_children[key] = self._disagreements_total.labels(
                decision.route or "", _KIND[decision.kind], result)
        child.inc()
        self._disagreements.remember((origin[:ORIGIN_KEPT], decision.route,
                                      _KIND[decision.kind], result, detail))

    def denied(self) -> list[dict[str, Any]]:
        """The last :data:`DENIED_KEPT` distinct (origin, route, reason) denials, most
        recent first, with their counts; over every worker when there are several."""
        return self._denied.entries()

    def disagreements(self) -> list[dict[str, Any]]:
        """The last :data:`DENIED_KEPT` distinct report-only disagreements (origin,
        route, kind, direction, detail), most recent first, with their counts."""
        return self._disagreements.entries()

    def reload_status(self) -> dict[str, Any]:
        """The config's load and reload history in this process: ``loaded_at`` (Unix
        time of the policy in use), ``reloads`` (succeeded and failed counts), and
        ``last``: the last reload's ``result``, ``at`` and ``errors`` (None before the
        first reload)."""
        return dict(self._reload_status, last=dict(self._reload_status["last"] or {}) or None)

    # -- rendering --------------------------------------------------------------------------

    def refresh(self, *, idle: int, active: int, inflight: int) -> None:
        """Record the values read at render time (and, with several workers, share
        this worker's; the admin listener calls it every :data:`REFRESH` seconds)."""
        self._idle.set(idle)
        self._active.set(active)
        self._inflight.set(inflight)
        self._denied.share()
        self._disagreements.share()

    def render(self, *, idle: int, active: int, inflight: int) -> bytes:
        """The Prometheus text exposition (over every worker when there are several)."""
        self.refresh(idle=idle, active=active, inflight=inflight)
        if self.multiprocess is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, self.multiprocess)
        return generate_latest(registry)


class Recent:
    """The last :data:`DENIED_KEPT` distinct events of one sort (keyed by the values of
    ``fields``), each with ``count``, ``first_seen`` and ``last_seen`` (Unix times).

    With several workers (``multiprocess``: the shared directory) each worker writes
    its own list to ``{name}_{pid}.json`` when it changed (:meth:`share`, called every
    :data:`REFRESH` seconds and before a read), and :meth:`entries` sums every
    worker's file by key."""

    __slots__ = ("name", "fields", "multiprocess", "_items", "_dirty")

    def __init__(self, name: str, fields: tuple[str, ...], multiprocess: str | None) -> None:
        self.name = name
        self.fields = fields
        self.multiprocess = multiprocess
        #: key -> [count, first seen, last seen], oldest first
        self._items: OrderedDict[tuple, list[float]] = OrderedDict()
        self._dirty = False

    def remember(self, key: tuple) -> None:
        now = time.time()
        items = self._items
        entry = items.get(key)
        if entry is None:
            items[key] = [1, now, now]
            if len(items) > DENIED_KEPT:
                items.popitem(last=False)
        else:
            entry[0] += 1
            entry[2] = now
            items.move_to_end(key)
        self._dirty = True

    def _own(self) -> list[dict[str, Any]]:
        return [
            {**dict(zip(self.fields, key, strict=True)), "count": int(count),
             "first_seen": first, "last_seen": last}
            for key, (count, first, last) in self._items.items()
        ]

    def entries(self) -> list[dict[str, Any]]:
        """Most recent first, at most :data:`DENIED_KEPT`."""
        if self.multiprocess is None:
            entries = self._own()
        else:
            self.share()
            entries = self._merged(self.multiprocess)
        entries.sort(key=lambda e: e["last_seen"], reverse=True)
        return entries[:DENIED_KEPT]

    def share(self) -> None:
        """Several workers: write this worker's list for the others (when changed)."""
        if self.multiprocess is None or not self._dirty:
            return
        self._dirty = False
        path = os.path.join(self.multiprocess, f"{self.name}_{os.getpid()}.json")
        temporary = f"{path}.tmp"
        try:
            with open(temporary, "w", encoding="utf-8") as f:
                json.dump(self._own(), f)
            os.replace(temporary, path)
        except OSError:  # pragma: no cover - the directory went away (shutting down)
            pass

    def _merged(self, path: str) -> list[dict[str, Any]]:
        """Every worker's list, summed by key."""
        merged: dict[tuple, dict[str, Any]] = {}
        prefix = f"{self.name}_"
        try:
            names = [n for n in os.listdir(path) if n.startswith(prefix) and n.endswith(".json")]
        except OSError:  # pragma: no cover - the directory went away (shutting down)
            return []
        for name in names:
            try:
                with open(os.path.join(path, name), encoding="utf-8") as f:
                    entries = json.load(f)
            except (OSError, ValueError):  # pragma: no cover - being replaced; next time
                continue
            for entry in entries:
                key = tuple(entry[field] for field in self.fields)
                seen = merged.get(key)
                if seen is None:
                    merged[key] = dict(entry)
                else:
                    seen["count"] += entry["count"]
                    seen["first_seen"] = min(seen["first_seen"], entry["first_seen"])
                    seen["last_seen"] = max(seen["last_seen"], entry["last_seen"])
        return list(merged.values())
