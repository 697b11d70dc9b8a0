"""Shared harness for the hostile-client and hostile-upstream suites.

Everything is black-box: the proxy is the real ``python -m corsproxy run --config
FILE --log-format json`` in a subprocess (:class:`ProxyProcess`), and every byte it
sees or sends goes over real loopback sockets.

- The upstreams (``conftest.RecordingUpstream``, :class:`ScriptedUpstream`, a
  :class:`Trap` that must never be connected to, nginx) run on one event loop in a
  background thread (:class:`LoopThread`). So they can be module-scoped and
  shared by many tests while every test keeps pytest-asyncio's own function loop
  for its raw client sockets.
- :class:`Client` is one raw TCP connection to the proxy with a buffer; every read
  is bounded by ``asyncio.timeout``; :meth:`Client.response` parses one response
  the way a strict client would (Content-Length, chunked, close-delimited,
  no body for HEAD/1xx/204/304) and says whether it ended cleanly.
- Requests carry an ``X-Test-Id`` header with a fresh id, so a test finds its own
  requests at a shared upstream; :func:`assert_never_forwarded` proves a negative
  by sending a valid control request with the same id and checking it is the only
  one that arrived (so a dead upstream cannot make the test pass).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import RecordingUpstream, config_text, cors_of, free_port

ROOT = Path(__file__).resolve().parent.parent
APP = "https://app.example.com"
EVIL = "https://evil.example"
START_TIMEOUT = 20.0
#: Default bound on one read from the proxy.
IO = 5.0


def new_id() -> str:
    return uuid.uuid4().hex[:16]


# ---------------------------------------------------------------------------
# the proxy process
# ---------------------------------------------------------------------------


class ProxyProcess:
    """``python -m corsproxy run --config FILE --log-format json`` (cwd: the repo).

    Started and stopped synchronously (so module-scoped fixtures need no event
    loop); stderr is read by a thread into :attr:`lines`; the port comes from the
    ``listening`` event. Stopped by its PID only.
    """

    def __init__(self, config_file: Path) -> None:
        self.config_file = config_file
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: list[str] = []
        self.port = 0
        self._listening = threading.Event()
        self._reader: threading.Thread | None = None

    @classmethod
    def with_config(
        cls,
        directory: Path,
        upstream_url: str,
        *,
        listen: dict | None = None,
        upstream: dict | None = None,
        cors: dict | None = None,
        start: bool = True,
    ) -> ProxyProcess:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"corsproxy-{new_id()}.yaml"
        path.write_text(
            config_text(
                upstream_url,
                cors=cors if cors is not None else {"allow_origins": [APP]},
                listen=listen,
                upstream=upstream,
            )
        )
        proxy = cls(path)
        if start:
            proxy.start()
        return proxy

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> ProxyProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "corsproxy", "run", "--config", str(self.config_file),
             "--log-format", "json"],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self._listening.wait(0.02):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(
                    f"the proxy did not start ({self.config_file.read_text()!r}):\n"
                    + "\n".join(self.lines)
                )
        return self

    def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            if not self._listening.is_set():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict) and event.get("event") == "listening":
                    self.port = int(event["port"])
                    self._listening.set()

    def records(self) -> list[dict]:
        out = []
        for line in list(self.lines):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                out.append(record)
        return out

    def log_text(self) -> str:
        return "\n".join(self.lines)

    async def wait_record(self, predicate: Callable[[dict], bool], timeout: float = IO) -> dict:
        try:
            async with asyncio.timeout(timeout):
                while True:
                    for record in self.records():
                        if predicate(record):
                            return record
                    await asyncio.sleep(0.02)
        except TimeoutError:
            raise AssertionError(
                f"no such log line within {timeout:.1f} s; the log:\n{self.log_text()[-4000:]}"
            ) from None

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    async def wait_exit(self, timeout: float) -> int:
        """The exit code, polled; AssertionError when it is still running after ``timeout``."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                return code
            if time.monotonic() > deadline:
                raise AssertionError(f"the proxy (pid {self.pid}) still runs after {timeout} s")
            await asyncio.sleep(0.01)

    async def log_complete(self) -> None:
        """Once the process has exited: wait until its stderr has been read to the end."""
        assert self.proc is not None and self.proc.poll() is not None
        if self._reader is not None:
            await asyncio.to_thread(self._reader.join, 5)

    def status_kib(self, key: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise AssertionError(f"no {key} in /proc/{self.pid}/status")

    def rss_kib(self) -> int:
        return self.status_kib("VmRSS")

    def kill(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        if self._reader is not None:
            self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


# ---------------------------------------------------------------------------
# a loop in a thread, for the servers
# ---------------------------------------------------------------------------


class LoopThread:
    """An asyncio loop in a daemon thread; :meth:`run` waits for a coroutine there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable[Any], timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def close(self) -> None:
        async def drain() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.get_running_loop().shutdown_asyncgens()

        with contextlib.suppress(Exception):
            self.run(drain(), timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Trap:
    """A listener that must never be connected to (it counts connections)."""

    def __init__(self) -> None:
        self.connections = 0
        self.port = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> Trap:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


# ---------------------------------------------------------------------------
# a scripted raw upstream (hand-written HTTP, one handler per path)
# ---------------------------------------------------------------------------


@dataclass
class RawRequest:
    """One request head as a :class:`ScriptedUpstream` received it."""

    conn: int  # connection number (1, 2, ...) at this upstream
    head: bytes  # request line and headers, up to and including the blank line
    method: str
    target: str
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    body_complete: bool = False

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    def values(self, name: str) -> list[bytes]:
        key = name.lower().encode()
        return [v for n, v in self.headers if n.lower() == key]

    @property
    def test_id(self) -> str | None:
        ids = self.values("X-Test-Id")
        return ids[0].decode("latin-1") if ids else None


#: ``handler(request, reader, writer)``; returns True to read another request on
#: the same connection (keep-alive), False to close it.
RawHandler = Callable[[RawRequest, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


def parse_head(head: bytes) -> tuple[str, str, list[tuple[bytes, bytes]]]:
    lines = head.split(b"\r\n")
    method, target, _ = lines[0].decode("latin-1").split(" ", 2)
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(b":")
        headers.append((name, value.strip(b" \t")))
    return method, target, headers


async def read_request_body(req: RawRequest, reader: asyncio.StreamReader) -> bytes:
    """The body of ``req`` (Content-Length or chunked), de-chunked; sets body_complete."""
    te = b",".join(req.values("Transfer-Encoding")).lower()
    if b"chunked" in te:
        parts = []
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        req.body = b"".join(parts)
    else:
        lengths = req.values("Content-Length")
        req.body = await reader.readexactly(int(lengths[0])) if lengths else b""
    req.body_complete = True
    return req.body


class ScriptedUpstream:
    """A plain asyncio HTTP/1.1 server: for every request head the handler
    registered for its path (without the query) answers; every head is kept in
    :attr:`requests` with its connection number. Unknown paths get a small 200.
    Connections and handler tasks are tracked and closed by :meth:`close`."""

    def __init__(self) -> None:
        self.handlers: dict[str, RawHandler] = {}
        self.requests: list[RawRequest] = []
        self.connections = 0
        self.port = 0
        self.url = ""
        self.server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()

    def route(self, path: str, handler: RawHandler) -> None:
        self.handlers[path] = handler

    async def start(self, rcvbuf: int | None = None) -> ScriptedUpstream:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind(("127.0.0.1", 0))
        self.server = await asyncio.start_server(self._conn, sock=sock, limit=2**20)
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def with_id(self, test_id: str) -> list[RawRequest]:
        return [r for r in self.requests if r.test_id == test_id]

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        conn = self.connections
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, target, headers = parse_head(head)
                req = RawRequest(conn, head, method, target, headers)
                self.requests.append(req)
                handler = self.handlers.get(req.path, _default_handler)
                if not await handler(req, reader, writer):
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError,
                ValueError):
            pass
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in list(self._writers):
            writer.close()
        if self.server is not None:
            await self.server.wait_closed()


async def _default_handler(req: RawRequest, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> bool:
    await read_request_body(req, reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
    await writer.drain()
    return True


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST (SO_LINGER 0) instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


# ---------------------------------------------------------------------------
# nginx as a path-normalising upstream
# ---------------------------------------------------------------------------

NGINX = "/usr/sbin/nginx"


class Nginx:
    """nginx in the foreground (``daemon off; master_process off;``) with everything
    in a temp prefix: ``/v1/`` answers 200 "v1", ``/internal/`` answers 200 "secret"."""

    def __init__(self, prefix: Path) -> None:
        self.prefix = prefix
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Nginx:
        for sub in ("logs", "tmp"):
            (self.prefix / sub).mkdir(parents=True, exist_ok=True)
        conf = self.prefix / "nginx.conf"
        tmp = self.prefix / "tmp"
        conf.write_text(f"""
daemon off;
master_process off;
worker_processes 1;
pid {self.prefix}/nginx.pid;
error_log {self.prefix}/logs/error.log;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{self.port};
        default_type text/plain;
        location /v1/ {{ return 200 "v1"; }}
        location = /v1 {{ return 200 "v1"; }}
        location /internal/ {{ return 200 "secret"; }}
        location / {{ return 404 "nothing here"; }}
    }}
}}
""")
        self.proc = subprocess.Popen(
            [NGINX, "-p", str(self.prefix), "-c", str(conf),
             "-e", str(self.prefix / "logs/error.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self.port), 0.2
            ):
                return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log = (self.prefix / "logs/error.log")
                text = log.read_text() if log.exists() else ""
                raise AssertionError("nginx did not start: " + text)
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


# ---------------------------------------------------------------------------
# the raw client
# ---------------------------------------------------------------------------


@dataclass
class Response:
    """One HTTP response as read off the wire."""

    version: bytes
    status: int
    reason: bytes
    raw_head: bytes
    header_lines: list[tuple[bytes, bytes]]
    body: bytes = b""
    #: "length", "chunked", "close" (read until EOF), "none" (HEAD, 1xx, 204, 304)
    framing: str = "none"
    #: The body ended as its framing says (a chunked body's last chunk, all of the
    #: Content-Length, a clean EOF for a close-delimited one).
    complete: bool = False
    #: How the connection ended while reading this response, if it did:
    #: "eof", "reset" or "timeout"; None while it is still open.
    ending: str | None = None

    @property
    def headers(self) -> list[tuple[str, str]]:
        return [(n.decode("latin-1"), v.decode("latin-1")) for n, v in self.header_lines]

    def values(self, name: str) -> list[str]:
        key = name.lower()
        return [v for n, v in self.headers if n.lower() == key]

    @property
    def cors(self) -> dict[str, str]:
        return cors_of(self.headers)

    @property
    def vary(self) -> list[str]:
        return [t.strip().lower() for v in self.values("Vary") for t in v.split(",") if t.strip()]

    def __repr__(self) -> str:
        return (f"Response({self.raw_head[:600]!r}, body={self.body[:200]!r}"
                f"{'...' if len(self.body) > 200 else ''}, framing={self.framing}, "
                f"complete={self.complete}, ending={self.ending})")


class Client:
    """One raw TCP connection to ``127.0.0.1:port``; every read is bounded."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()
        self.ending: str | None = None  # "eof" / "reset" once the proxy closed
        self.opened = time.monotonic()
        self.limit = 2**16

    @classmethod
    async def open(cls, port: int, rcvbuf: int | None = None, limit: int = 2**22) -> Client:
        """``rcvbuf``: the socket's SO_RCVBUF; ``limit``: the StreamReader's buffer
        (it stops reading from the socket at twice this much unread data, so a
        client that means to stop reading must pass a small one)."""
        async with asyncio.timeout(IO):
            if rcvbuf is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=limit)
            else:
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
                sock.setblocking(False)
                try:
                    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
                except BaseException:
                    sock.close()
                    raise
                reader, writer = await asyncio.open_connection(sock=sock, limit=limit)
        client = cls(reader, writer)
        client.limit = limit
        return client

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def close(self) -> None:
        """Close now; unsent bytes (a body the proxy stopped reading) are dropped,
        else the transport would wait for them forever."""
        transport = self.writer.transport
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            self.writer.close()

    async def aclose(self) -> None:
        """:meth:`close`, then let the loop finish closing the socket."""
        self.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1):
                await self.writer.wait_closed()

    async def send(self, data: bytes, timeout: float = IO) -> None:
        self.writer.write(data)
        async with asyncio.timeout(timeout):
            await self.writer.drain()

    async def send_quietly(self, data: bytes, timeout: float = IO) -> bool:
        """Send, tolerating the proxy closing or resetting meanwhile; False if it did
        (or the send did not finish within ``timeout``)."""
        try:
            await self.send(data, timeout)
        except (ConnectionError, TimeoutError):
            return False
        return True

    async def read_some(self, timeout: float) -> bool:
        """Read once into :attr:`buf`; False at EOF/reset (sets :attr:`ending`);
        TimeoutError when nothing came within ``timeout``."""
        if self.ending is not None:
            return False
        try:
            async with asyncio.timeout(timeout):
                chunk = await self.reader.read(max(self.limit, 2**16))
        except ConnectionError:
            self.ending = "reset"
            return False
        if not chunk:
            self.ending = "eof"
            return False
        self.buf += chunk
        return True

    async def response(self, method: str = "GET", timeout: float = IO,
                       skip_interim: bool = True) -> Response | None:
        """The next response; None when the connection closed before any byte of it.
        AssertionError when no whole head arrives within ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end != -1:
                head = bytes(self.buf[: end + 4])
                del self.buf[: end + 4]
                response = _parse_head(head)
                if skip_interim and 100 <= response.status < 200 and response.status != 101:
                    continue
                break
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(
                    f"no response head within {timeout} s; got {bytes(self.buf)[:300]!r}")
            try:
                more = await self.read_some(remaining)
            except TimeoutError:
                continue
            if not more:
                if not self.buf:
                    return None
                raise AssertionError(f"connection {self.ending} inside a response head: "
                                     f"{bytes(self.buf)[:300]!r}")
        await self._read_body(response, method, deadline)
        return response

    async def _read_body(self, response: Response, method: str, deadline: float) -> None:
        loop = asyncio.get_running_loop()

        async def more() -> bool:
            remaining = deadline - loop.time()
            if remaining <= 0:
                response.ending = "timeout"
                return False
            try:
                ok = await self.read_some(remaining)
            except TimeoutError:
                response.ending = "timeout"
                return False
            if not ok:
                response.ending = self.ending
            return ok

        te = [t.strip().lower() for v in response.values("Transfer-Encoding") for t in v.split(",")]
        lengths = response.values("Content-Length")
        if method == "HEAD" or response.status < 200 or response.status in (204, 304):
            response.framing, response.complete = "none", True
        elif te:
            if te[-1] == "chunked":
                response.framing = "chunked"
                body = bytearray()
                while True:
                    line_end = self.buf.find(b"\r\n")
                    if line_end == -1:
                        if not await more():
                            response.body = bytes(body)
                            return
                        continue
                    size = int(bytes(self.buf[:line_end]).split(b";")[0].strip(), 16)
                    if size == 0:  # the last chunk, trailers (if any), the final CRLF
                        while True:
                            rest = bytes(self.buf[line_end + 2:])
                            end = 2 if rest.startswith(b"\r\n") else rest.find(b"\r\n\r\n") + 4
                            if end >= 2:
                                del self.buf[: line_end + 2 + end]
                                break
                            if not await more():
                                response.body = bytes(body)
                                return
                        response.body, response.complete = bytes(body), True
                        return
                    need = line_end + 2 + size + 2
                    while len(self.buf) < need:
                        if not await more():
                            body += self.buf[line_end + 2: line_end + 2 + size]
                            response.body = bytes(body)
                            return
                    assert self.buf[need - 2: need] == b"\r\n", "chunk data not followed by CRLF"
                    body += self.buf[line_end + 2: need - 2]
                    del self.buf[:need]
            else:
                response.framing = "close"
        elif lengths:
            response.framing = "length"
            length = int(lengths[0])
            while len(self.buf) < length:
                if not await more():
                    response.body = bytes(self.buf)
                    self.buf.clear()
                    return
            response.body = bytes(self.buf[:length])
            del self.buf[:length]
            response.complete = True
            return
        else:
            response.framing = "close"
        if response.framing == "close":
            while await more():
                pass
            response.body = bytes(self.buf)
            self.buf.clear()
            response.complete = response.ending == "eof"

    async def wait_closed(self, timeout: float) -> tuple[bytes, str, float]:
        """Read until the proxy closes the connection: (bytes read meanwhile, "eof" or
        "reset", seconds since the connection was opened). AssertionError if it is
        still open after ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                while await self.read_some(timeout):
                    pass
        except TimeoutError:
            raise AssertionError(
                f"the proxy kept the connection open for {timeout} s more "
                f"(received {bytes(self.buf)[:200]!r})"
            ) from None
        data = bytes(self.buf)
        self.buf.clear()
        assert self.ending is not None
        return data, self.ending, time.monotonic() - self.opened


def _parse_head(head: bytes) -> Response:
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    assert len(parts) >= 2 and parts[0].startswith(b"HTTP/"), f"not a status line: {head[:200]!r}"
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        assert sep, f"header line without a colon: {line!r} in {head[:400]!r}"
        headers.append((name, value.strip(b" \t")))
    return Response(parts[0], int(parts[1]), parts[2] if len(parts) > 2 else b"", head, headers)


async def exchange(port: int, data: bytes, method: str | None = None, timeout: float = IO,
                   then_eof: bool = False) -> tuple[Response | None, str | None]:
    """Send ``data`` on a fresh connection, read one response; with ``then_eof``
    also wait (bounded) for the proxy to close the connection and return how it
    ended ("eof"/"reset"); raises if it stays open."""
    if method is None:
        method = data.split(b" ", 1)[0].decode("latin-1")
    async with await Client.open(port) as client:
        await client.send_quietly(data)
        response = await client.response(method, timeout)
        ending = None
        if then_eof:
            if response is None or response.ending is not None:
                ending = client.ending
            else:
                extra, ending, _ = await client.wait_closed(timeout)
                assert extra == b"", f"bytes after the response: {extra[:300]!r}"
        return response, ending


def request(method: str, target: str, *headers: str | bytes, host: bytes | None = b"proxy.test",
            version: bytes = b"HTTP/1.1", body: bytes = b"") -> bytes:
    """A request head (CRLF line ends) plus ``body``; ``host=None`` sends no Host."""
    lines = [method.encode() + b" " + target.encode("latin-1") + b" " + version]
    if host is not None:
        lines.append(b"Host: " + host)
    lines += [h.encode("latin-1") if isinstance(h, str) else h for h in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


# ---------------------------------------------------------------------------
# assertions
# ---------------------------------------------------------------------------


def assert_cors(response: Response, origin: str = APP) -> None:
    """The full set of Access-Control-* headers of an actual (non-preflight)
    response for an allowed origin under ``allow_origins: [APP]``, plus Vary: Origin."""
    assert response.cors == {"access-control-allow-origin": origin}, response
    assert "origin" in response.vary, response


def assert_no_cors(response: Response) -> None:
    assert response.cors == {}, response


def assert_no_internal_server_header(response: Response) -> None:
    for value in response.values("Server"):
        lowered = value.lower()
        assert "aiohttp" not in lowered and "python" not in lowered, response


def recorded_with(upstream: Any, test_id: str) -> list[Any]:
    """The requests a ``conftest.RecordingUpstream`` got with this X-Test-Id."""
    return [r for r in list(upstream.requests) if test_id in r.values("X-Test-Id")]


async def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    try:
        async with asyncio.timeout(timeout):
            while True:
                value = predicate()
                if value:
                    return value
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"not within {timeout} s: {what}") from None


async def wait_recorded(upstream: Any, test_id: str, count: int = 1,
                        timeout: float = IO) -> list[Any]:
    """The requests with this X-Test-Id at a RecordingUpstream, once ``count`` of
    them arrived and their bodies were read (or failed)."""
    def ready() -> list[Any]:
        found = recorded_with(upstream, test_id)
        return found if len(found) >= count and all(r.done.is_set() for r in found) else []

    return await wait_for(ready, timeout, f"{count} request(s) with X-Test-Id {test_id} "
                                          f"reached the upstream")


async def assert_never_forwarded(port: int, upstream: Any, test_id: str,
                                 allow_incomplete: bool = False) -> None:
    """No request with ``test_id`` (in an X-Test-Id header or in its target) reached
    ``upstream`` (a RecordingUpstream or a ScriptedUpstream); proven with a valid
    control request carrying the same id, which must arrive and be the only one.
    ``allow_incomplete``: a request whose head arrived but whose body never
    completed does not count (the proxy may stream a head before it finds a broken
    body, then drop the connection)."""
    control = f"/control-{test_id}"
    response, _ = await exchange(port, request("GET", control, f"X-Test-Id: {test_id}",
                                               "Connection: close"))
    assert response is not None and response.status == 200, response

    def arrived() -> list[Any]:
        every = list(upstream.requests)
        if isinstance(upstream, ScriptedUpstream):
            return [r for r in every if r.test_id == test_id or test_id in r.target]
        return [r for r in every if test_id in r.values("X-Test-Id") or test_id in r.raw_path]

    await wait_for(lambda: any(_path(r) == control for r in arrived()), IO,
                   "the control request reached the upstream")
    others = [r for r in arrived() if _path(r) != control]
    if allow_incomplete:
        await wait_for(lambda: all(_finished(r) for r in others), IO,
                       "the upstream saw the end of every partial request")
        others = [r for r in others if _complete(r)]
    assert others == [], f"forwarded although it must not be: {others!r}"


def _path(r: Any) -> str:
    return getattr(r, "raw_path", None) or r.target


def _finished(r: Any) -> bool:
    done = getattr(r, "done", None)
    return done.is_set() if done is not None else True


def _complete(r: Any) -> bool:
    return bool(getattr(r, "complete", getattr(r, "body_complete", False)))


# ---------------------------------------------------------------------------
# file descriptors
# ---------------------------------------------------------------------------


def raise_nofile(wanted: int) -> int:
    """Raise this process's RLIMIT_NOFILE soft limit towards ``wanted`` (the proxy
    subprocesses started afterwards inherit it); returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft


@dataclass
class Gen:
    """A streamed upstream body (for ``Reply(chunks=...)``) that counts what it
    produced and notes when the upstream stopped writing it (GeneratorExit: the
    connection to the proxy went away)."""

    total: int
    size: int = 256 * 1024
    produced: int = 0
    stopped_at: float | None = None
    finished: bool = False
    _block: bytes = field(default=b"", repr=False)

    def __call__(self) -> Iterable[bytes]:
        block = self._block or os.urandom(self.size)
        self._block = block
        try:
            while self.produced < self.total:
                yield block
                self.produced += len(block)
            self.finished = True
        finally:
            if not self.finished:
                self.stopped_at = time.monotonic()


# ---------------------------------------------------------------------------
# the shared servers, as context managers for the test modules' fixtures
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def loop_thread() -> Iterator[LoopThread]:
    """The servers' event loop thread."""
    loop = LoopThread()
    try:
        yield loop
    finally:
        loop.close()


@contextlib.contextmanager
def recording_upstream(bg: LoopThread) -> Iterator[RecordingUpstream]:
    """A ``conftest.RecordingUpstream`` on the background loop."""
    server = RecordingUpstream()
    bg.run(server.start())
    try:
        yield server
    finally:
        bg.run(server.close())


@contextlib.contextmanager
def trap_server(bg: LoopThread) -> Iterator[Trap]:
    """A listener nothing may connect to."""
    server = bg.run(Trap().start())
    try:
        yield server
    finally:
        bg.run(server.close())


@contextlib.contextmanager
def scripted_upstream(bg: LoopThread, rcvbuf: int | None = None) -> Iterator[ScriptedUpstream]:
    server = bg.run(ScriptedUpstream().start(rcvbuf))
    try:
        yield server
    finally:
        bg.run(server.close())


@contextlib.contextmanager
def proxy_process(directory: Path, upstream_url: str, **kwargs: Any) -> Iterator[ProxyProcess]:
    proxy = ProxyProcess.with_config(directory, upstream_url, **kwargs)
    try:
        yield proxy
    finally:
        proxy.kill()
