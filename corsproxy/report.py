"""Report-only mode: where a policy would answer differently from the upstream.

A route with ``cors.report_only: true`` is a dry run of its policy. The proxy
forwards every request, preflights included, and passes the upstream's own
``Access-Control-*`` and ``Vary`` headers through unchanged, so a browser sees
exactly what the API answered without corsproxy. For each CORS request it also
decides with the policy (the same :class:`~corsproxy.core.Decision` as always, as if
enforced) and :func:`compare` judges the two answers the way a browser would
(Fetch §4.9 "CORS check" and §4.8 "CORS-preflight fetch"):

- ``agree``: the same verdict, and, when both allow, the same CORS headers;
- ``policy_stricter``: the upstream's answer passes the browser's checks, the
  policy's would not (enforcing it would break this request);
- ``policy_looser``: the policy would allow what the upstream's answer does not;
- ``headers_differ``: both allow, with different CORS header values (a different
  ``Access-Control-Max-Age``, other exposed headers, ``*`` against an echoed origin).

The detail names the origin, the method or headers asked for, the policy's reason,
and the upstream's header values. Header values compare the way browsers read them:
``Access-Control-Allow-Methods`` as a set of case-sensitive tokens,
``Access-Control-Allow-Headers`` and ``-Expose-Headers`` as sets of names in any
case, everything else as the exact value (surrounding spaces ignored).

The upstream's verdict, per kind of request:

- preflight: a 2xx status, ``Access-Control-Allow-Origin`` equal to the origin or
  ``*``, the method asked for in ``Access-Control-Allow-Methods`` (or ``*``, or a
  CORS-safelisted GET, HEAD or POST), every header asked for in
  ``Access-Control-Allow-Headers`` (or ``*``, which does not cover
  ``Authorization``), and ``Access-Control-Allow-Private-Network: true`` when it
  was asked for. A preflight carries no cookies, so ``*`` counts as allowing;
- actual request: ``Access-Control-Allow-Origin`` equal to the origin, or ``*``
  when the request carried no ``Cookie`` (a request with cookies was made with
  ``credentials: "include"``, which also needs ``Access-Control-Allow-Credentials:
  true``);
- WebSocket handshake: the upstream switched protocols (101). Browsers enforce
  nothing on WebSockets, so this is what the upstream accepted.

Requests without ``Origin`` and same-origin requests are not CORS requests and are
not compared (no report). Pure functions: no I/O (the server calls :func:`compare`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from .core import Decision, Kind, parse_header_list

__all__ = ["AGREE", "HEADERS_DIFFER", "POLICY_LOOSER", "POLICY_STRICTER", "RESULTS", "compare"]

AGREE = "agree"
POLICY_STRICTER = "policy_stricter"
POLICY_LOOSER = "policy_looser"
HEADERS_DIFFER = "headers_differ"
#: Every result, in the order the docs list them.
RESULTS = (AGREE, POLICY_STRICTER, POLICY_LOOSER, HEADERS_DIFFER)

_SAFELISTED_METHODS = frozenset({"GET", "HEAD", "POST"})
#: Headers whose value is a comma list of names compared in any case.
_NAME_SETS = frozenset({"access-control-allow-headers", "access-control-expose-headers"})
_ALLOW_METHODS = "access-control-allow-methods"
#: How each CORS response header is spelled in a detail.
_SPELLING = {
    "access-control-allow-origin": "Access-Control-Allow-Origin",
    "access-control-allow-credentials": "Access-Control-Allow-Credentials",
    "access-control-allow-methods": "Access-Control-Allow-Methods",
    "access-control-allow-headers": "Access-Control-Allow-Headers",
    "access-control-expose-headers": "Access-Control-Expose-Headers",
    "access-control-max-age": "Access-Control-Max-Age",
    "access-control-allow-private-network": "Access-Control-Allow-Private-Network",
}


def _cors_headers(pairs: Sequence[tuple[str, str]]) -> dict[str, str]:
    """The ``Access-Control-*`` headers by lower-case name; repeated lines joined
    with ", " (how a browser combines them, which then fails a single-value check)."""
    out: dict[str, str] = {}
    for name, value in pairs:
        key = name.lower()
        if key.startswith("access-control-"):
            value = value.strip(" \t")
            out[key] = f"{out[key]}, {value}" if key in out else value
    return out


def _items(value: str) -> list[str]:
    return [item.strip(" \t") for item in value.split(",") if item.strip(" \t")]


def _normal(key: str, value: str) -> object:
    """A header value in the form two answers are compared in."""
    if key in _NAME_SETS:
        return frozenset(item.lower() for item in _items(value))
    if key == _ALLOW_METHODS:
        return frozenset(_items(value))
    return value


def _show(value: str | None) -> str:
    return "absent" if value is None else json.dumps(value)


def _upstream_problem(kind: Kind, status: int, headers: dict[str, str], origin: str,
                      method: str | None, names: Sequence[str], private_network: bool,
                      cookies: bool) -> str | None:
    """Why a browser would refuse the upstream's answer, or None when it passes."""
    if kind is Kind.WEBSOCKET:
        return None if status == 101 else f"the upstream answered {status}, not 101"
    acao = headers.get("access-control-allow-origin")
    credentialed = cookies and kind is Kind.ACTUAL
    if acao is None:
        problem: str | None = "the upstream sent no Access-Control-Allow-Origin"
    elif acao == "*" and credentialed:
        problem = ('the upstream sent Access-Control-Allow-Origin "*", which a request with '
                   "cookies can't use")
    elif acao != "*" and acao != origin:
        problem = f"the upstream's Access-Control-Allow-Origin is {_show(acao)}"
    elif credentialed and headers.get("access-control-allow-credentials") != "true":
        problem = "the request has cookies but the upstream sent no " \
                  "Access-Control-Allow-Credentials: true"
    else:
        problem = None
    if problem is not None or kind is not Kind.PREFLIGHT:
        return problem
    if not 200 <= status <= 299:
        return f"the upstream answered the preflight with {status}, not 2xx"
    methods = _items(headers.get(_ALLOW_METHODS, ""))
    if method and method not in _SAFELISTED_METHODS and method not in methods \
            and "*" not in methods:
        shown = _show(headers.get(_ALLOW_METHODS))
        return f"the upstream's Access-Control-Allow-Methods ({shown}) lacks {json.dumps(method)}"
    allowed = {item.lower() for item in _items(headers.get("access-control-allow-headers", ""))}
    missing = [n for n in names if n.lower() not in allowed
               and ("*" not in allowed or n.lower() == "authorization")]
    if missing:
        return (f"the upstream's Access-Control-Allow-Headers "
                f"({_show(headers.get('access-control-allow-headers'))}) lacks "
                f"{', '.join(json.dumps(n) for n in missing)}")
    if private_network and headers.get("access-control-allow-private-network") != "true":
        return "the upstream sent no Access-Control-Allow-Private-Network: true"
    return None


def _what(kind: Kind, origin: str, method: str | None, names: Sequence[str]) -> str:
    """The request in a few words: origin, and what a preflight asked for."""
    words = f"origin {json.dumps(origin)}"
    if kind is Kind.PREFLIGHT:
        words += f", method {json.dumps(method or '')}"
        if names:
            words += f", headers {', '.join(json.dumps(n) for n in names)}"
    elif kind is Kind.WEBSOCKET:
        words += ", WebSocket handshake"
    return words


def _header_differences(policy: dict[str, str], upstream: dict[str, str]) -> list[str]:
    out = []
    for key in sorted(set(policy) | set(upstream)):
        ours, theirs = policy.get(key), upstream.get(key)
        if ours is not None and theirs is not None and _normal(key, ours) == _normal(key, theirs):
            continue
        name = _SPELLING.get(key, key)
        out.append(f"{name}: policy {_show(ours)}, upstream {_show(theirs)}")
    return out


def compare(decision: Decision, status: int, upstream_headers: Sequence[tuple[str, str]],
            *, origin: str, request_method: str | None = None,
            request_headers: Sequence[str] = (), private_network: bool = False,
            cookies: bool = False) -> tuple[str, str] | None:
    """``(result, detail)`` for one report-only request: ``decision`` is the policy's,
    ``status`` and ``upstream_headers`` the upstream's answer (every header line,
    latin-1 text). ``request_headers`` are the Access-Control-Request-Headers lines,
    ``cookies`` whether the request carried a Cookie header. None for a request that
    is not compared (no Origin, a same-origin request). ``detail`` is empty for
    ``agree``."""
    kind = decision.kind
    if kind is Kind.NOT_CORS or (kind is Kind.WEBSOCKET and not origin):
        return None
    if decision.allowed and not decision.failed and kind is Kind.ACTUAL and not decision.headers:
        return None  # same-origin: the browser applies no CORS check
    names, _ = parse_header_list(request_headers)
    theirs = _cors_headers(upstream_headers)
    problem = _upstream_problem(kind, status, theirs, origin, request_method, names,
                                private_network, cookies)
    what = _what(kind, origin, request_method, names)
    why = "; ".join(decision.reasons)
    if problem is None and not decision.allowed:
        shown = theirs.get("access-control-allow-origin")
        allowed_by = f"status {status}" if kind is Kind.WEBSOCKET else \
            f"Access-Control-Allow-Origin: {shown}"
        return POLICY_STRICTER, (f"{what}: the upstream allowed it ({allowed_by}); the policy "
                                 f"would deny it ({why})")
    if problem is not None and decision.allowed:
        return POLICY_LOOSER, f"{what}: {problem}; the policy would allow it ({why})"
    if problem is not None or kind is Kind.WEBSOCKET:
        return AGREE, ""  # both refuse (any headers), or both accept a handshake
    differences = _header_differences(dict((n.lower(), v) for n, v in decision.headers), theirs)
    if differences:
        return HEADERS_DIFFER, f"{what}: " + "; ".join(differences)
    return AGREE, ""
