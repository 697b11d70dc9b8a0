"""One log line per request, as text or JSON, on stderr.

The server calls :func:`access_line` when a request is done and logs the result
on the ``corsproxy.access`` logger. Lines carry the method, the path (without the
query, which may hold secrets), the status, the Origin, the CORS verdict and its
reason, the route, the time the upstream took to answer (response headers) and,
when something failed, the error in words::

    2026-05-09T07:35:25.123Z 127.0.0.1 GET /api/items 200 origin=https://app.example.com
        cors=allowed upstream_ms=1.9 ms=2.3 reason="origin: ... is allowed by allow_origins"
    {"time": "...", "client": "127.0.0.1", "method": "GET", "path": "/api/items",
        "status": 200, ...}

(each is one line; wrapped here).

aiohttp's own complaints about requests it could not parse (answered 400 before
any handler runs) go to ``corsproxy.server``; :func:`setup_logging` renders those
as one line too, without a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

__all__ = ["ACCESS_LOGGER", "LOG_FORMATS", "SERVER_LOGGER", "access_line", "setup_logging"]

LOG_FORMATS = ("text", "json")
ACCESS_LOGGER = logging.getLogger("corsproxy.access")
#: Passed to aiohttp as its server logger (parse errors, dropped connections).
SERVER_LOGGER = logging.getLogger("corsproxy.server")


_second: list[Any] = [-1, ""]  # (whole second, its formatted prefix): one strftime a second


def _now() -> str:
    t = time.time()
    whole = int(t)
    if whole != _second[0]:
        _second[0], _second[1] = whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    return f"{_second[1]}.{int((t - whole) * 1000):03d}Z"


# Characters that make a text value need quoting: space, quote, backslash, "=",
# and anything not printable (a value must never break the line or fake a field).
_PLAIN = frozenset(chr(c) for c in range(0x21, 0x7F)) - frozenset(' "=\\')


def _text_value(value: str) -> str:
    """A value for a text line: bare when it is one plain word, JSON-quoted otherwise."""
    if value and _PLAIN.issuperset(value):
        return value
    return json.dumps(value)


def access_line(log_format: str, fields: dict[str, Any]) -> str:
    """Render one request's fields (see :func:`corsproxy.server._log_access` for the keys)."""
    if log_format == "json":
        return json.dumps({"time": _now(), **fields})
    parts = [
        _now(),
        fields["client"] or "-",
        _text_value(fields["method"]),
        _text_value(fields["path"]),
        str(fields["status"] or "-"),
    ]
    for key in ("origin", "cors", "route", "upstream_ms", "ms", "error", "reason"):
        value = fields[key]
        if value is not None:
            parts.append(f"{key}={value}" if isinstance(value, int | float) else
                         f"{key}={_text_value(value)}")
    return " ".join(parts)


def event_line(log_format: str, event: str, message: str, **fields: Any) -> str:
    """A line that is not about one request (start, stop, parse errors)."""
    if log_format == "json":
        return json.dumps(
            {"time": _now(), "event": event, "message": message, **fields}
        )
    return f"{_now()} {message}"


class _OneLineFormatter(logging.Formatter):
    """Records from aiohttp (``corsproxy.server``) and the proxy's own events as one
    line each: the exception's first line instead of a traceback."""

    def __init__(self, log_format: str) -> None:
        super().__init__()
        self.log_format = log_format

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.name == ACCESS_LOGGER.name or getattr(record, "preformatted", False):
            return message
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            detail = " ".join(str(exc).split()) or type(exc).__name__
            message = f"{message}: {detail}"
        event = "server-error" if record.name == SERVER_LOGGER.name else "log"
        return event_line(self.log_format, event, message, level=record.levelname.lower())


def setup_logging(log_format: str = "text", stream: Any = None) -> None:
    """Send every ``corsproxy.*`` record to stderr, one line each, in ``log_format``."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r}: use one of {', '.join(LOG_FORMATS)}")
    root = logging.getLogger("corsproxy")
    for old in list(root.handlers):
        root.removeHandler(old)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(_OneLineFormatter(log_format))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False
    # aiohttp reports a bad request line on a connection's first request (often
    # not HTTP at all, e.g. TLS to a plain port) at debug level; it is still one
    # rejected request, so it gets its line like the other parse errors.
    SERVER_LOGGER.setLevel(logging.DEBUG)
