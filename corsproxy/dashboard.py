"""The admin listener's page (``GET /``) and the JSON it reads (:mod:`corsproxy.admin`
routes the requests here).

The page is three static files in ``corsproxy/ui/`` (``index.html``,
``dashboard.js``, ``dashboard.css``, plus ``icon.svg``), served as they are: no
build step, nothing loaded from anywhere but the admin listener itself, so it works
offline. Its script fetches the JSON endpoints every few seconds and builds the page
with ``textContent`` only: every value that came from traffic (an Origin is any
visible ASCII an attacker chose) is shown as text, never parsed as HTML. Every
admin answer carries :data:`SECURITY_HEADERS`; the Content-Security-Policy allows
scripts, styles and requests from the listener itself and nothing else (no inline
script, no form submission, no framing).

The JSON, built here from the running proxy at request time (so a reload shows at
once):

- ``/api/policy`` (:func:`policy_json`): the effective policy of the top-level
  ``cors`` and of every route, every :class:`~corsproxy.core.CorsSettings` field,
  which of them a route sets differently (``overrides``), ``report_only``;
- ``/api/status`` (:func:`status_json`): version, pid, config file, upstream, and
  :meth:`corsproxy.metrics.Metrics.reload_status` with ISO times;
- ``/api/report`` (:func:`report_json`): the report-only disagreements;
- ``/api/explain?...`` (:func:`explain_query`): ``corsproxy explain --json``'s
  object for the request the query describes (:mod:`corsproxy.explain`, the one
  implementation of both), or :class:`BadQuery` with a sentence for a 400.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from . import __version__
from .core import SAFELISTED_REQUEST_HEADERS
from .explain import explain_json, request_view, route_label

if TYPE_CHECKING:
    from .config import Config
    from .metrics import Metrics

__all__ = [
    "ASSETS",
    "EXPLAIN_PARAMETERS",
    "SECURITY_HEADERS",
    "BadQuery",
    "asset",
    "explain_query",
    "iso",
    "policy_json",
    "report_json",
    "status_json",
]

#: Header lines on every admin answer (each ends in CRLF).
SECURITY_HEADERS = (
    "Content-Security-Policy: default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'\r\n"
    "X-Content-Type-Options: nosniff\r\n"
    "Referrer-Policy: no-referrer\r\n"
    "X-Frame-Options: DENY\r\n"
    "Cross-Origin-Resource-Policy: same-origin\r\n"
)

#: Admin path -> (file in corsproxy/ui, Content-Type).
ASSETS: dict[str, tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/ui/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/ui/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
    "/ui/icon.svg": ("icon.svg", "image/svg+xml"),
}

#: The query parameters of ``/api/explain`` (``corsproxy explain``'s options).
EXPLAIN_PARAMETERS = (
    "origin", "method", "path", "request_method", "request_headers",
    "request_private_network", "host", "websocket",
)
_FLAGS = ("request_private_network", "websocket")
_TRUE = ("1", "true")
_FALSE = ("0", "false", "")


@functools.cache
def asset(path: str) -> tuple[bytes, str] | None:
    """(body, Content-Type) of a page file, or None when ``path`` is none of them
    (read once per process)."""
    entry = ASSETS.get(path)
    if entry is None:
        return None
    name, content_type = entry
    return (resources.files(__package__) / "ui" / name).read_bytes(), content_type


def iso(ts: float) -> str:
    """A Unix time as ``2024-05-01T12:00:00.123Z``."""
    whole = int(ts)
    return (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
            + f".{int((ts - whole) * 1000):03d}Z")


def with_iso(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Recent-list entries (``Metrics.denied()``, ``disagreements()``) with ISO times."""
    for entry in entries:
        entry["first_seen"] = iso(entry["first_seen"])
        entry["last_seen"] = iso(entry["last_seen"])
    return entries


# -- /api/policy ------------------------------------------------------------------------


def _settings(cors: Any) -> dict[str, Any]:
    return {f.name: (list(v) if isinstance(v := getattr(cors, f.name), tuple) else v)
            for f in dataclasses.fields(cors)}


def policy_json(config: Config) -> dict[str, Any]:
    """The effective policy of the top-level ``cors`` and of each route."""
    top = config.cors
    policies: list[dict[str, Any]] = [{
        "route": None,
        "index": None,
        "label": route_label(config, None),
        "matches": "every path not under a route",
        "report_only": top.report_only,
        "settings": _settings(top),
        "overrides": [],
        "upstream": None,
    }]
    up = config.upstream
    for i, route in enumerate(config.routes):
        own = route.upstream
        timeouts = None
        if own is not None and (own.timeout is not None or own.read_timeout_set):
            timeouts = {
                "timeout": own.timeout if own.timeout is not None else up.timeout,
                "read_timeout": own.read_timeout if own.read_timeout_set else up.read_timeout,
            }
        policies.append({
            "route": route.path,
            "index": i,
            "label": route_label(config, route.path),
            "matches": f"{route.path.rstrip('/') or '/'} and below (the longest route wins)",
            "report_only": route.cors.report_only,
            "settings": _settings(route.cors),
            "overrides": [f.name for f in dataclasses.fields(route.cors)
                          if getattr(route.cors, f.name) != getattr(top, f.name)],
            "upstream": timeouts,
        })
    return {
        "config": config.source,
        "safelisted_headers": list(SAFELISTED_REQUEST_HEADERS),
        "policies": policies,
        "warnings": list(config.warnings),
    }


# -- /api/status and /api/report -----------------------------------------------------------


def status_json(config: Config, metrics: Metrics, upstream: str, readiness: str | None
                ) -> dict[str, Any]:
    """Version, process, config file, upstream, readiness and the reload history
    (this process's: with several workers, the one that answered)."""
    reload = metrics.reload_status()
    last = reload["last"]
    if last is not None:
        last = dict(last, at=iso(last["at"]))
    return {
        "version": __version__,
        "pid": os.getpid(),
        "config": config.source,
        "upstream": upstream,
        "ready": readiness is None,
        "readiness": readiness or "ready",
        "now": iso(time.time()),
        "loaded_at": iso(reload["loaded_at"]),
        "reloads": dict(reload["reloads"]),
        "last_reload": last,
    }


def report_json(metrics: Metrics, kept: int) -> dict[str, Any]:
    """The report-only disagreements, most recent first."""
    return {"kept": kept, "disagreements": with_iso(metrics.disagreements())}


# -- /api/explain ------------------------------------------------------------------------


class BadQuery(ValueError):
    """An ``/api/explain`` query that describes no request (the message says why)."""


def _flag(name: str, value: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise BadQuery(f"{name}={value!r}: use {name}=1 to turn it on, or leave it out")


def explain_query(config: Config, query: str) -> dict[str, Any]:
    """``corsproxy explain --json``'s object for the request ``query`` describes
    (``origin=...&method=...&path=...&request_method=...&request_headers=...&
    request_private_network=1&host=...&websocket=1``, each at most once; a
    parameter given empty is passed on empty, as ``--origin ''`` would be).
    Raises :class:`BadQuery`."""
    try:
        pairs = parse_qsl(query, keep_blank_values=True, encoding="utf-8", errors="strict",
                          max_num_fields=2 * len(EXPLAIN_PARAMETERS))
    except UnicodeDecodeError:
        raise BadQuery("the query is not UTF-8 once percent-decoded") from None
    except ValueError:
        raise BadQuery(f"too many parameters; the parameters are "
                       f"{', '.join(EXPLAIN_PARAMETERS)}, each at most once") from None
    given: dict[str, str] = {}
    for name, value in pairs:
        if name not in EXPLAIN_PARAMETERS:
            raise BadQuery(f"unknown parameter {name!r}; the parameters are "
                           f"{', '.join(EXPLAIN_PARAMETERS)}")
        if name in given:
            raise BadQuery(f"{name!r} given twice; give each parameter at most once")
        given[name] = value
    values: dict[str, Any] = {
        name: _flag(name, value) if name in _FLAGS else value
        for name, value in given.items()
    }
    try:
        req = request_view(config, **values)
    except ValueError as exc:
        raise BadQuery(str(exc)) from None
    return explain_json(config, req, config.router.decide(req))
