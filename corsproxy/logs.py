"""One log line per request, as text or JSON, on stderr or in a file.

The server calls :func:`access_line` when a request is done and logs the result
on the ``corsproxy.access`` logger. Lines carry the method, the path (without the
query, which may hold secrets), the status, the Origin, the CORS verdict and its
reason, the route, the request id (``X-Request-Id``), the time the upstream took
to answer (response headers) and the whole time, both in microseconds from a
monotonic clock, the request and response body bytes and, when something failed,
the error in words::

    2026-05-09T07:35:25.123Z 127.0.0.1 GET /api/items 200 origin=https://app.example.com
        cors=allowed request_id=5f0c2a9e41d7b3a800000001 upstream_us=1874 us=2291
        request_bytes=0 response_bytes=1234 reason="origin: ... is allowed by allow_origins"
    {"time": "...", "client": "127.0.0.1", "method": "GET", "path": "/api/items",
        "status": 200, ...}

(each is one line; wrapped here).

Requests the server refuses before they can be parsed (400 from the parser, 408,
431, 505) get an access line too, with ``-`` for the method and path and the
cause in ``error``. Other records (start, stop, internal errors) are rendered as
one line each by :func:`setup_logging`, without a traceback.

``log.file`` sends every line to a file opened for appending instead of stderr;
:func:`reopen_log_file` (SIGUSR1) opens the path again, so logrotate can move the
old file away. ``log.access: false`` turns the per-request lines off.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import sys
import time
from typing import Any

__all__ = [
    "ACCESS_LOGGER",
    "LOG_FORMATS",
    "AccessTemplate",
    "AccessWriter",
    "access_line",
    "access_writer",
    "describe_error",
    "emit",
    "reopen_log_file",
    "setup_logging",
]

LOG_FORMATS = ("text", "json")
ACCESS_LOGGER = logging.getLogger("corsproxy.access")


_second: list[Any] = [-1, ""]  # (whole second, its formatted prefix): one strftime a second
_stamp: list[Any] = [-1, ""]  # (millisecond, its whole timestamp): one format a millisecond


def _now() -> str:
    """The time as ``2026-05-09T07:35:25.123Z``; formatted once per millisecond
    (a busy proxy logs many lines in the same one)."""
    ms = int(time.time() * 1000)
    if ms != _stamp[0]:
        whole = ms // 1000
        if whole != _second[0]:
            _second[0], _second[1] = whole, time.strftime("%Y-%m-%dT%H:%M:%S",
                                                          time.gmtime(whole))
        _stamp[0], _stamp[1] = ms, f"{_second[1]}.{ms % 1000:03d}Z"
    return _stamp[1]


# Characters that make a text value need quoting: space, quote, backslash, "=",
# and anything not printable (a value must never break the line or fake a field).
_PLAIN = frozenset(chr(c) for c in range(0x21, 0x7F)) - frozenset(' "=\\')


def _text_value(value: str) -> str:
    """A value for a text line: bare when it is one plain word, JSON-quoted otherwise."""
    try:
        return _rendered[value]  # reasons, origins and paths repeat: render each once
    except KeyError:
        pass
    text = value if value and _PLAIN.issuperset(value) else json.dumps(value)
    if len(value) <= _RENDERED_MAX_LENGTH:
        if len(_rendered) >= _RENDERED_MAX:
            _rendered.clear()
        _rendered[value] = text
    return text


def _id_value(value: str) -> str:
    """A request id for a text line: like :func:`_text_value` but not memoized (every
    id is new; memoizing them would only evict the values that do repeat)."""
    if value.isalnum() and value.isascii():  # generated ids: hex digits
        return value
    return value if _PLAIN.issuperset(value) else json.dumps(value)


#: Memo of _text_value: at most this many values of at most this many characters.
_RENDERED_MAX = 1024
_RENDERED_MAX_LENGTH = 512
_rendered: dict[str, str] = {}


_pid = [os.getpid()]  # this process's id, for JSON lines (several workers share stderr)
os.register_at_fork(after_in_child=lambda: _pid.__setitem__(0, os.getpid()))


#: Optional fields of a text line, in their order after ``time client method path status``.
_TEXT_KEYS = ("origin", "cors", "route", "request_id", "upstream_us", "us", "request_bytes",
              "response_bytes", "up_bytes", "down_bytes", "closed_by", "request_method",
              "request_headers", "credentials", "report", "report_detail", "error", "reason")


def access_line(log_format: str, fields: dict[str, Any]) -> str:
    """Render one request's fields (see :func:`corsproxy.server.Proxy._log_access`
    for the keys). JSON lines also carry ``pid``, the worker process that served
    the request."""
    if log_format == "json":
        return json.dumps({"time": _now(), **fields, "pid": _pid[0]})
    parts = [
        _now(),
        fields["client"] or "-",
        _text_value(fields["method"]),
        _text_value(fields["path"]),
        str(fields["status"] or "-"),
    ]
    for key in _TEXT_KEYS:
        value = fields.get(key)
        if value is not None:
            if isinstance(value, bool):
                parts.append(f"{key}={'true' if value else 'false'}")
            elif isinstance(value, int | float):
                parts.append(f"{key}={value}")
            elif key == "request_id":
                parts.append(f"{key}={_id_value(value)}")
            else:
                parts.append(f"{key}={_text_value(value)}")
    return " ".join(parts)


class AccessTemplate:
    """The access line of a request whose fields are all known in advance except
    the client address, the path, the request id and the time taken (a cached
    preflight answer): everything else is rendered once, so a line costs one
    string concatenation. ``line(client, path, request_id, us)`` equals
    ``access_line`` for the same fields (no upstream time, no error, no request
    body, ``response_bytes`` the answer's body)."""

    __slots__ = ("log_format", "_method", "_status", "_mid", "_tail")

    def __init__(
        self,
        log_format: str,
        method: str,
        status: int,
        origin: str | None,
        cors: str,
        route: str | None,
        reason: str,
        response_bytes: int,
        request_method: str | None = None,
        request_headers: str | None = None,
    ) -> None:
        self.log_format = log_format
        if log_format == "json":
            self._method = json.dumps(method)
            self._status = json.dumps(status)
            self._mid = (
                f", \"origin\": {json.dumps(origin)}, \"cors\": {json.dumps(cors)}, "
                f"\"route\": {json.dumps(route)}, \"request_id\": "
            )
            self._tail = (
                f", \"request_bytes\": 0, \"response_bytes\": {response_bytes}, "
                f"\"request_method\": {json.dumps(request_method)}, \"request_headers\": "
                f"{json.dumps(request_headers)}, \"credentials\": null, \"report\": null, "
                f"\"report_detail\": null, \"error\": null, \"reason\": {json.dumps(reason)}, "
                f"\"pid\": {_pid[0]}}}"
            )
        else:
            self._method = _text_value(method)
            self._status = str(status)
            mid = "".join(
                f" {key}={_text_value(value)}"
                for key, value in (("origin", origin), ("cors", cors), ("route", route))
                if value is not None
            )
            self._mid = f"{mid} request_id="
            asked = "".join(
                f" {key}={_text_value(value)}"
                for key, value in (("request_method", request_method),
                                   ("request_headers", request_headers))
                if value is not None
            )
            self._tail = (
                f" request_bytes=0 response_bytes={response_bytes}{asked} "
                f"reason={_text_value(reason)}"
            )

    def line(self, client: str | None, path: str, request_id: str, us: int) -> str:
        if self.log_format == "json":
            return (
                f'{{"time": "{_now()}", "client": {json.dumps(client)}, "method": '
                f'{self._method}, "path": {json.dumps(path)}, "status": {self._status}'
                f'{self._mid}{json.dumps(request_id)}, "upstream_us": null, "us": {us}'
                f"{self._tail}"
            )
        return (
            f"{_now()} {client or '-'} {self._method} {_text_value(path)} {self._status}"
            f"{self._mid}{_id_value(request_id)} us={us}{self._tail}"
        )


class AccessWriter:
    """Access lines straight to a stream, without the logging module's per-record
    cost (record object, caller lookup, lock, one write and flush per line).

    Lines logged in one event-loop iteration are joined, encoded once and written
    at the end of that iteration, so none waits longer than the iteration itself
    and the lines of several workers stay in time order within a few
    milliseconds. (Batching for a fixed interval instead, as nginx's ``access_log
    buffer= flush=``, saved little more CPU and shuffled workers' lines.)

    On a pipe (stderr shared by several worker processes) the batch goes out with
    ``os.write`` in pieces of whole lines of at most 4096 bytes (PIPE_BUF), so the
    lines of different processes never mix; a regular file is opened with
    ``O_APPEND`` (``log.file``) and gets the batch in one write. Call
    :meth:`flush` before the loop stops."""

    __slots__ = ("stream", "_lines", "_handle", "_pipe")

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self._lines: list[str] = []
        self._handle: asyncio.Handle | None = None
        self._pipe: tuple[int, bool] | None = None  # (fd, is a pipe or socket)

    @property
    def fd(self) -> int | None:
        """The stream's descriptor now (a :class:`LogFile` changes it on reopen)."""
        try:
            return self.stream.fileno()
        except (AttributeError, OSError, ValueError):
            return None

    def __call__(self, line: str) -> None:
        self._lines.append(line)
        if self._handle is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no running loop: write now
                self.flush()
                return
            self._handle = loop.call_soon(self.flush)

    def flush(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.cancel()
        lines, self._lines = self._lines, []
        if not lines:
            return
        lines.append("")
        text = "\n".join(lines)
        try:
            fd = self.fd
            if fd is None:
                self.stream.write(text)
                self.stream.flush()
                return
            self.stream.flush()  # whatever the logging module left in the buffer first
            data = text.encode("utf-8", "replace")
            if not self._is_pipe(fd) or len(data) <= _PIPE_BUF:
                _write_all(fd, data)
                return
            view = memoryview(data)
            while view:
                if len(view) <= _PIPE_BUF:
                    cut = len(view)
                else:
                    cut = bytes(view[:_PIPE_BUF]).rfind(b"\n") + 1 or _PIPE_BUF
                _write_all(fd, view[:cut])
                view = view[cut:]
        except (OSError, ValueError):  # stderr closed or gone: lose the lines, keep serving
            pass

    def _is_pipe(self, fd: int) -> bool:
        known = self._pipe
        if known is None or known[0] != fd:
            try:
                mode = os.fstat(fd).st_mode
                pipe = stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)
            except OSError:
                pipe = True
            known = self._pipe = (fd, pipe)
        return known[1]


_PIPE_BUF = 4096


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


_direct_stream: list[Any] = [None]  # the stream setup_logging chose for corsproxy.*


def access_writer() -> Any:
    """Where the server should send access lines: an :class:`AccessWriter` on the
    stream :func:`setup_logging` configured (the process owns its log), else the
    ``corsproxy.access`` logger (embedded use, tests with ``caplog``)."""
    stream = _direct_stream[0]
    if stream is None:
        return ACCESS_LOGGER.info
    return AccessWriter(stream)


class LogFile:
    """``log.file``: a file opened for appending (``O_APPEND``: the lines of several
    worker processes each land whole at the end), reopened by :meth:`reopen` after
    logrotate moved it. Text writes are line-buffered; :class:`AccessWriter`
    writes to :meth:`fileno` directly."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = self._open()

    def _open(self) -> Any:
        return open(self.path, "a", encoding="utf-8", errors="replace", buffering=1)

    def reopen(self) -> None:
        """Open the path again (a new file when it was moved away); on failure keep
        writing to the old one and raise the OSError."""
        new = self._open()
        old, self._file = self._file, new
        old.close()

    def write(self, text: str) -> int:
        return self._file.write(text)

    def flush(self) -> None:
        self._file.flush()

    def fileno(self) -> int:
        return self._file.fileno()

    def close(self) -> None:
        self._file.close()


def emit(line: str) -> None:
    """Write one preformatted line (an event) where the log goes, now."""
    stream = _direct_stream[0] or sys.stderr
    try:
        stream.write(line + "\n")
        stream.flush()
    except (OSError, ValueError):  # the log is gone: keep serving
        pass


def reopen_log_file() -> str | None:
    """SIGUSR1: reopen ``log.file``. Returns a problem in words, or None (also when
    logging to stderr: nothing to reopen)."""
    stream = _direct_stream[0]
    if not isinstance(stream, LogFile):
        return None
    try:
        stream.reopen()
    except OSError as exc:
        return (f"cannot reopen the log file {stream.path} ({describe_error(exc)}); still "
                f"writing to the old one; check the directory and its permissions, then send "
                f"SIGUSR1 again")
    return None


def describe_error(exc: BaseException) -> str:
    """An exception in a few words for a response body or a log line."""
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()  # "connection refused", not asyncio's text
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def event_line(log_format: str, event: str, message: str, **fields: Any) -> str:
    """A line that is not about one request (start, stop, parse errors)."""
    if log_format == "json":
        return json.dumps(
            {"time": _now(), "event": event, "message": message, **fields}
        )
    return f"{_now()} {message}"


class _OneLineFormatter(logging.Formatter):
    """The proxy's own events as one line each: the exception's first line instead
    of a traceback."""

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
        return event_line(self.log_format, "log", message, level=record.levelname.lower())


def setup_logging(log_format: str = "text", stream: Any = None, *, file: str | None = None,
                  access: bool = True) -> None:
    """Send every ``corsproxy.*`` record to stderr (or ``stream``, or the ``file``
    opened for appending), one line each, in ``log_format``; ``access`` False drops
    the per-request lines. Raises OSError when ``file`` can't be opened."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r}: use one of {', '.join(LOG_FORMATS)}")
    if file is not None:
        target = LogFile(file)
    else:
        target = stream if stream is not None else sys.stderr
    old_stream = _direct_stream[0]
    root = logging.getLogger("corsproxy")
    for old in list(root.handlers):
        root.removeHandler(old)
    if isinstance(old_stream, LogFile) and old_stream is not target:
        old_stream.close()
    _direct_stream[0] = target
    handler = logging.StreamHandler(target)
    handler.setFormatter(_OneLineFormatter(log_format))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False
    ACCESS_LOGGER.setLevel(logging.NOTSET if access else logging.WARNING)
