"""What the proxy would answer to one request, and why: the one implementation behind
``corsproxy explain``, ``corsproxy test`` and the admin page's explain form.

:func:`request_view` builds the :class:`~corsproxy.core.RequestView` a browser's
request would give from a few plain values; ``config.router.decide()`` decides it;
:func:`explain_json` and :func:`explain_text` render the verdict, the reasons and
exactly the headers the proxy would send. No I/O here: the callers read files and
print.

A route with ``report_only`` is decided as if it enforced (what the report compares
with the upstream's answer); both renderings say that the proxy forwards the request
anyway and passes the upstream's own CORS headers through.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .core import Decision, RequestView

if TYPE_CHECKING:
    from .config import Config

__all__ = ["explain_json", "explain_text", "request_view", "response_headers", "route_label"]


def request_view(
    config: Config,
    *,
    origin: str | None = None,
    method: str | None = None,
    path: str = "/",
    request_method: str | None = None,
    request_headers: str | Sequence[str] | None = None,
    request_private_network: bool = False,
    host: str | None = None,
    websocket: bool = False,
) -> RequestView:
    """The request a browser would send. ``method`` defaults to OPTIONS when
    ``request_method`` is given (a preflight), else GET. ``request_headers`` is one
    Access-Control-Request-Headers value (a comma list) or a list of names. Raises
    ``ValueError`` (one sentence) for a request that can't be made."""
    if websocket and (request_method is not None or method not in (None, "GET")):
        raise ValueError("a WebSocket handshake is a GET without Access-Control-Request-Method")
    method = method or ("OPTIONS" if request_method is not None else "GET")
    path = path.split("?", 1)[0].split("#", 1)[0]
    if not path.startswith("/"):
        raise ValueError(f"the path {path!r} must start with /")
    if isinstance(request_headers, str):
        headers: tuple[str, ...] = (request_headers,)
    elif request_headers:
        headers = (", ".join(request_headers),)
    else:
        headers = ()
    return RequestView(
        method=method,
        path=path,
        origin=(origin,) if origin is not None else (),
        request_method=request_method,
        request_headers=headers,
        request_private_network="true" if request_private_network else None,
        host=host,
        # The listener's scheme: the same-origin test compares Origin with it + Host.
        scheme="https" if config.listen.tls is not None else "http",
        websocket=websocket,
    )


def response_headers(decision: Decision) -> list[tuple[str, str]]:
    """The CORS headers and ``Vary`` the proxy sends for ``decision``."""
    return [*decision.headers, ("Vary", ", ".join(decision.vary))]


def route_label(config: Config, route: str | None) -> str:
    """``/api (routes[0])``, or ``(top-level cors)``."""
    if route is None:
        return "(top-level cors)"
    for i, r in enumerate(config.routes):
        if r.path == route:
            return f"{route} (routes[{i}])"
    return route  # pragma: no cover - the router only knows configured routes


def _request_lines(req: RequestView) -> list[tuple[str, str]]:
    lines = [("Origin", o) for o in req.origin]
    if req.request_method is not None:
        lines.append(("Access-Control-Request-Method", req.request_method))
    lines += [("Access-Control-Request-Headers", h) for h in req.request_headers]
    if req.request_private_network is not None:
        lines.append(("Access-Control-Request-Private-Network", req.request_private_network))
    if req.host is not None:
        lines.append(("Host", req.host))
    if req.websocket:
        lines += [("Connection", "Upgrade"), ("Upgrade", "websocket")]
    return lines


_REPORT_ONLY = (
    "report_only: corsproxy forwards this request whatever the verdict and passes the "
    "upstream's own Access-Control-* headers through; the verdict and headers here are what "
    "this policy would answer, and the access line reports where the upstream differs"
)


def explain_json(config: Config, req: RequestView, decision: Decision) -> dict[str, Any]:
    """The ``explain --json`` object (also the admin page's ``/api/explain``)."""
    return {
        "config": config.source,
        "request": {"method": req.method, "path": req.path,
                    "headers": [list(pair) for pair in _request_lines(req)]},
        "verdict": decision.verdict,
        "allowed": decision.allowed,
        "kind": decision.kind.value,
        "route": decision.route,
        "status": decision.status,
        "forwarded": decision.forward or decision.report_only,
        "report_only": decision.report_only,
        "reasons": list(decision.reasons),
        "failed": list(decision.failed),
        "headers": dict(response_headers(decision)),
        "body": decision.body if not decision.forward else None,
    }


def explain_text(config: Config, req: RequestView, decision: Decision) -> str:
    """What ``corsproxy explain`` prints."""
    if decision.forward:
        status = (
            "forwarded upstream (the upstream's status; corsproxy replaces the upstream's "
            "Access-Control-* headers with the ones below and merges Vary)"
        )
    else:
        status = f"{decision.status} (answered by corsproxy, not forwarded)"
    if decision.report_only:
        would = "forward it" if decision.forward else f"answer {decision.status} itself"
        status = f"forwarded upstream (report_only); enforced, this policy would {would}"
    request = [f"{name}: {value}" for name, value in _request_lines(req)]
    lines = [f"request:  {req.method} {req.path}", *(f"          {line}" for line in request)]
    lines += [
        f"kind:     {decision.kind.value}",
        f"route:    {route_label(config, decision.route)}",
        f"verdict:  {decision.verdict}",
        f"status:   {status}",
    ]
    if decision.report_only:
        lines.append(f"mode:     {_REPORT_ONLY}")
    lines += [
        "reasons:",
        *(f"  - {r}" for r in decision.reasons),
        "response headers:",
        *(f"  {name}: {value}" for name, value in response_headers(decision)),
    ]
    if not decision.forward and decision.body:
        lines.append("body:")
        lines += [f"  {line}".rstrip() for line in decision.body.rstrip("\n").split("\n")]
    return "\n".join(lines)
