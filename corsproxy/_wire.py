"""Sans-IO pieces of HTTP/1.1 on the client side of the proxy: pure functions over
the values a parsed request head holds, and the bytes of a response head.

Nothing here touches a socket or a clock, so every rule is tested from tables
(``tests/test_wire.py``). :mod:`corsproxy.httpserver` calls these when a request
head is complete; :mod:`corsproxy.server` renders responses with them.

Text here carries bytes: header names and values, the method and the target are
decoded as latin-1, which maps every byte to one character and back, so what
arrives is exactly what leaves (``encode("latin-1")``). Only the values the CORS
decision reads are ever looked at as text.

Request-target rules (RFC 9112 §3.2, RFC 3986 §5.2.4), each answered before routing:

- origin-form (``/path?query``) is the normal case;
- absolute-form (``http://host/path``) is accepted, but only its path and query are
  used: the proxy has one upstream, and the authority in the target never chooses
  another one (nginx does the same);
- authority-form (``host:443``) belongs to CONNECT, which a reverse proxy does not
  tunnel: CONNECT gets 405, any other method with such a target 400;
- asterisk-form (``*``) belongs to ``OPTIONS *`` (a question to the server itself):
  400, since it can't be turned into a path under the upstream's base path;
- any dot-segment (``.`` or ``..``, literal or percent-encoded, in any mix of case)
  in the path gets 400: an upstream that normalises paths would otherwise serve
  something outside ``upstream.url``'s base path, or outside the route whose policy
  was applied. Segments are split at ``/`` and also at ``\\``, ``%2F`` and ``%5C``,
  since some upstreams decode or accept those as separators. Nothing is normalised:
  a path that passes goes upstream byte for byte.
"""

from __future__ import annotations

import re
import time
from email.utils import formatdate
from http import HTTPStatus

__all__ = [
    "Rejected",
    "check_host",
    "check_target",
    "date_line",
    "has_dot_segment",
    "reason_phrase",
    "render_head",
]


class Rejected(Exception):
    """A request the proxy answers itself with ``status``; ``str()`` says why, in
    words fit for the response body and the log line."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# A segment made only of dots, written literally or as %2e/%2E: "." and "..".
_DOT_SEGMENT = re.compile(r"(?:\.|%2[eE]){1,2}")
# Separators upstreams may honour: "/", "\", and their percent-encodings.
_SEPARATORS = re.compile(r"/|\\|%2[fF]|%5[cC]")


def has_dot_segment(path: str) -> bool:
    """True when some segment of ``path`` (the part before ``?``) is ``.`` or ``..``,
    literally or percent-encoded."""
    if "." not in path and "%" not in path:
        return False  # the common case, without a regex
    return any(_DOT_SEGMENT.fullmatch(part) for part in _SEPARATORS.split(path))


def check_target(method: str, target: str) -> str:
    """The origin-form target (path and query) to route and forward, or
    :class:`Rejected`. ``target`` is the request-target exactly as received."""
    if method == "CONNECT":
        raise Rejected(405, "CONNECT is not supported: corsproxy is a reverse proxy, not a "
                            "tunnel")
    if not target.startswith("/"):
        if target == "*":
            raise Rejected(400, "the request target * (asterisk-form) is not forwarded; "
                                "ask about a path instead, e.g. OPTIONS /")
        scheme, sep, rest = target.partition("://")
        if not sep or scheme.lower() not in ("http", "https"):
            raise Rejected(400, f"request target {_shown(target)} is not a path; it must "
                                f"start with / (or be an http:// URL)")
        slash = rest.find("/")
        query = rest.find("?")
        if slash == -1 or (query != -1 and query < slash):
            # "http://host" or "http://host?q": the path is "/" (RFC 9112 §3.2.2)
            target = "/" + (rest[query:] if query != -1 else "")
        else:
            target = rest[slash:]
    path = target.partition("?")[0].partition("#")[0]
    if has_dot_segment(path):
        raise Rejected(400, f"request path {_shown(path)} holds a dot-segment (. or .., "
                            f"maybe percent-encoded); send the path without them")
    return target


# RFC 3986: reg-name / IPv4address (unreserved, pct-encoded, sub-delims), or an
# IP-literal in brackets; then an optional ":" port of digits.
_HOST = re.compile(
    r"(?:\[[0-9A-Za-z:.%_\-~]+\]|(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})+)"
    r"(?::[0-9]{0,5})?"
)


def check_host(values: list[str], version: str) -> None:
    """:class:`Rejected` (400) unless the ``Host`` lines are valid (RFC 9112 §3.2):
    exactly one for HTTP/1.1 (none is fine for HTTP/1.0), holding ``host[:port]``."""
    if not values:
        if version == "1.1":
            raise Rejected(400, "the request has no Host header; HTTP/1.1 requires one")
        return
    if len(values) > 1:
        raise Rejected(400, "the request has more than one Host header; send exactly one")
    value = values[0]
    if not _HOST.fullmatch(value):
        raise Rejected(400, f"Host header {_shown(value)} is not a valid host[:port]")


def _shown(value: str, limit: int = 80) -> str:
    """A client's value quoted for a message, cut to ``limit`` characters."""
    text = value if len(value) <= limit else value[:limit] + "..."
    return repr(text)


def reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


_date: list = [0, b""]


def date_line() -> bytes:
    """``Date: ...\\r\\n`` for now (formatted once a second)."""
    now = int(time.time())
    if now != _date[0]:
        _date[0] = now
        _date[1] = b"Date: " + formatdate(now, usegmt=True).encode("ascii") + b"\r\n"
    return _date[1]


def render_head(status: int, reason: str, headers: list[tuple[str, str]]) -> bytes:
    """``HTTP/1.1 status reason`` and the header lines, each ending in CRLF, without
    the blank line. Raises ValueError when a name or value would break the framing
    (CR, LF or NUL), or holds a character outside latin-1."""
    parts = [f"HTTP/1.1 {status} {reason}"]
    for name, value in headers:
        parts.append(f"{name}: {value}")
    parts.append("")
    text = "\r\n".join(parts)
    # Exactly one CR and one LF per line, and no NUL: no value can end its line early.
    breaks = len(parts) - 1
    if text.count("\n") != breaks or text.count("\r") != breaks or "\0" in text:
        raise ValueError("a response header holds CR, LF or NUL")
    return text.encode("latin-1")
