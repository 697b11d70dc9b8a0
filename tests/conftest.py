"""Fixtures for the proxy tests: a recording upstream, real proxies, clients, raw sockets.

Everything listens on 127.0.0.1 on a free port and speaks real HTTP over real
sockets; nothing is mocked.

- ``upstream``: a :class:`RecordingUpstream` (aiohttp). It records every request
  (method, raw path, header pairs as received, body bytes or their hash) and answers
  with a :class:`Reply` chosen by path: any status and headers (its own ACAO, Vary,
  gzip bodies), large streamed bodies, slow answers, resets.
- ``raw_upstream``: a plain asyncio TCP server for upstream behaviour aiohttp would
  not produce (no Content-Type, broken responses, 101).
- ``make_proxy(cors=..., routes=..., listen=..., upstream=...)``: a real proxy
  (``corsproxy.server.ProxyServer``, the object ``corsproxy run`` serves) on its own
  port, configured through the real config loader.
- ``http``: an aiohttp client that adds no headers of its own, follows no
  redirects, keeps no cookies and does not decompress.
- :func:`raw_exchange`: bytes in, bytes out over one TCP connection, with a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from corsproxy.config import parse_config
from corsproxy.server import Proxy as ProxyApp
from corsproxy.server import ProxyServer

IO_TIMEOUT = 10.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def unconnectable_port() -> Iterator[int]:
    """A loopback port whose connects hang: a listening socket with a full accept
    queue, so the kernel drops further SYNs until the client's connect timeout."""
    blocker = socket.socket()
    fillers: list[socket.socket] = []
    try:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(0)
        port = blocker.getsockname()[1]
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        time.sleep(0.1)  # let the fillers' handshakes land in the queue
        yield port
    finally:
        for filler in fillers:
            filler.close()
        blocker.close()


def cors_of(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The Access-Control-* headers, names lower-cased; a repeated one fails the test."""
    found: dict[str, str] = {}
    for name, value in headers:
        key = name.lower()
        if key.startswith("access-control-"):
            assert key not in found, f"{name} sent twice: {found[key]!r} and {value!r}"
            found[key] = value
    return found


def values_of(headers: Iterable[tuple[str, str]], name: str) -> list[str]:
    key = name.lower()
    return [v for n, v in headers if n.lower() == key]


# ---------------------------------------------------------------------------
# the recording upstream
# ---------------------------------------------------------------------------


@dataclass
class Reply:
    """How the recording upstream answers one path.

    ``chunks``: a callable giving the body piece by piece (streamed; chunked unless
    ``headers`` has Content-Length). ``delay``: seconds before the response headers.
    ``reset``: abort the connection instead of answering. ``reset_after``: send the
    headers and this many body bytes, then abort. ``keep_body``: store the request
    body (else only its size and SHA-256). ``strip``: headers aiohttp adds on its
    own (Content-Type, Server, Date) to take out again.
    """

    status: int = 200
    headers: list[tuple[str, str]] = field(
        default_factory=lambda: [("Content-Type", "text/plain; charset=utf-8")]
    )
    body: bytes = b"hello from upstream\n"
    chunks: Callable[[], Iterable[bytes]] | None = None
    delay: float = 0.0
    reset: bool = False
    reset_after: int | None = None
    keep_body: bool = True
    read_body: bool = True
    strip: tuple[str, ...] = ()


@dataclass
class Recorded:
    """One request as the upstream received it."""

    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    version: str
    body: bytes = b""
    body_size: int = 0
    body_sha256: str = ""
    complete: bool = False
    error: str | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def values(self, name: str) -> list[str]:
        return values_of(self.headers, name)

    def names(self) -> list[str]:
        return [n for n, _ in self.headers]


# Headers to take out of a response again, by id(response) (no aiohttp response key
# type across the aiohttp versions the project supports).
_REPLY_STRIP: dict[int, tuple[str, ...]] = {}


class RecordingUpstream:
    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.replies: dict[str, Reply] = {}
        self.default = Reply()
        self.closing = asyncio.Event()
        self.url = ""
        self.port = 0
        self._runner: web.AppRunner | None = None

    def reply(self, path: str, reply: Reply | None = None, **kwargs: Any) -> None:
        """Answer requests for ``path`` (without query) with ``reply`` / ``Reply(**kwargs)``."""
        self.replies[path] = reply or Reply(**kwargs)

    async def start(self) -> None:
        app = web.Application(client_max_size=2**40)
        app.router.add_route("*", r"/{path:[\s\S]*}", self._handle)
        app.on_response_prepare.append(self._strip)
        self._runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=1.0, auto_decompress=False
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{self.port}"

    async def close(self) -> None:
        self.closing.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def wait(self, count: int = 1) -> list[Recorded]:
        """Wait until ``count`` requests arrived and their bodies were read."""
        async with asyncio.timeout(IO_TIMEOUT):
            while len(self.requests) < count:
                await asyncio.sleep(0.01)
            for rec in self.requests[:count]:
                await rec.done.wait()
        return self.requests[:count]

    @staticmethod
    async def _strip(request: web.BaseRequest, response: web.StreamResponse) -> None:
        for name in _REPLY_STRIP.pop(id(response), ()):
            response.headers.popall(name, None)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        rec = Recorded(
            method=request.method,
            raw_path=request.raw_path,
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers],
            version=f"{request.version.major}.{request.version.minor}",
        )
        self.requests.append(rec)
        reply = self.replies.get(request.raw_path.partition("?")[0], self.default)
        try:
            if reply.read_body:
                digest = hashlib.sha256()
                parts = []
                async for chunk in request.content.iter_any():
                    rec.body_size += len(chunk)
                    digest.update(chunk)
                    if reply.keep_body:
                        parts.append(chunk)
                rec.body = b"".join(parts)
                rec.body_sha256 = digest.hexdigest()
                rec.complete = True
        except Exception as exc:  # the proxy dropped the connection mid-body
            rec.error = f"{type(exc).__name__}: {exc}"
        finally:
            rec.done.set()
        if rec.error is not None:
            return web.Response(status=400)
        if reply.delay:
            try:
                async with asyncio.timeout(reply.delay):
                    await self.closing.wait()
            except TimeoutError:
                pass
        if reply.reset:
            request.transport.abort()
            return web.Response()
        response: web.StreamResponse
        if reply.chunks is None and reply.reset_after is None:
            response = web.Response(status=reply.status, body=reply.body)
            response.headers.extend(reply.headers)
            _REPLY_STRIP[id(response)] = reply.strip
            return response
        response = web.StreamResponse(status=reply.status)
        response.headers.extend(reply.headers)
        _REPLY_STRIP[id(response)] = reply.strip
        await response.prepare(request)
        if reply.reset_after is not None:
            await response.write(reply.body[: reply.reset_after])
            await asyncio.sleep(0.05)
            request.transport.abort()
            return response
        assert reply.chunks is not None
        for chunk in reply.chunks():
            await response.write(chunk)
        await response.write_eof()
        return response


@pytest.fixture
async def upstream():
    server = RecordingUpstream()
    await server.start()
    yield server
    await server.close()


# ---------------------------------------------------------------------------
# a raw upstream (hand-written HTTP)
# ---------------------------------------------------------------------------


class RawUpstream:
    """``handler(head: bytes, reader, writer)`` runs for each connection after the
    request head (up to the blank line) was read; ``heads`` keeps every head."""

    def __init__(self, handler: Callable[..., Any]) -> None:
        self.handler = handler
        self.heads: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.heads.append(head)
            await self.handler(head, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def raw_upstream():
    started: list[RawUpstream] = []

    async def start(handler: Callable[..., Any]) -> RawUpstream:
        server = RawUpstream(handler)
        await server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.close()


# ---------------------------------------------------------------------------
# proxies
# ---------------------------------------------------------------------------


@dataclass
class Proxy:
    url: str
    port: int
    server: ProxyServer

    @property
    def app(self) -> ProxyApp:
        """The application object (its preflight cache, pool...)."""
        return self.server.proxy

    async def close(self) -> None:
        await self.server.stop(2.0)


def config_text(
    upstream_url: str,
    cors: dict | None = None,
    routes: list | None = None,
    listen: dict | None = None,
    upstream: dict | None = None,
    admin: dict | None = None,
) -> str:
    data: dict[str, Any] = {
        # One process unless a test asks (the default, auto, runs one per CPU).
        "listen": {"host": "127.0.0.1", "port": 0, "workers": 1, **(listen or {})},
        "upstream": {"url": upstream_url, "connect_timeout": 2, "timeout": 10, **(upstream or {})},
        "cors": cors if cors is not None else {"allow_origins": ["https://app.example.com"]},
        # Off unless a test asks: processes started at once would share its default port.
        "admin": admin if admin is not None else {"port": None},
    }
    if routes:
        data["routes"] = routes
    return yaml.safe_dump(data, sort_keys=False)


async def start_proxy(config_yaml: str, log_format: str = "text") -> Proxy:
    config = parse_config(config_yaml, "test-config.yaml")
    # Always a free port: a file that names none would take 8080, which anything
    # else on the machine may hold.
    config = dataclasses.replace(config, listen=dataclasses.replace(config.listen, port=0))
    server = ProxyServer(config, log_format=log_format)
    _, port = await server.start()
    return Proxy(f"http://127.0.0.1:{port}", port, server)


@pytest.fixture
async def make_proxy(upstream):
    """``await make_proxy(cors=..., routes=..., listen=..., upstream=..., upstream_url=...)``."""
    started: list[Proxy] = []

    async def make(
        cors: dict | None = None,
        routes: list | None = None,
        listen: dict | None = None,
        upstream_url: str | None = None,
        log_format: str = "text",
        **kwargs: Any,
    ) -> Proxy:
        url = upstream_url or upstream.url
        text = config_text(url, cors, routes, listen, kwargs.get("upstream"))
        proxy = await start_proxy(text, log_format)
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        await proxy.close()


# ---------------------------------------------------------------------------
# clients
# ---------------------------------------------------------------------------


@dataclass
class Result:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def values(self, name: str) -> list[str]:
        return values_of(self.headers, name)

    @property
    def cors(self) -> dict[str, str]:
        return cors_of(self.headers)

    @property
    def vary(self) -> list[str]:
        return [n.strip() for v in self.values("Vary") for n in v.split(",") if n.strip()]


class Http:
    """A client that sends exactly the headers it is given (plus Host)."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def request(
        self,
        method: str,
        url: str,
        headers: Iterable[tuple[str, str]] | dict[str, str] = (),
        data: Any = None,
    ) -> Result:
        if isinstance(headers, dict):
            headers = list(headers.items())
        async with asyncio.timeout(IO_TIMEOUT * 3):
            async with self.session.request(
                method,
                aiohttp.client.URL(url, encoded=True),
                headers=list(headers),
                data=data,
                allow_redirects=False,
            ) as resp:
                body = await resp.read()
                pairs = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in resp.raw_headers]
                return Result(resp.status, pairs, body)


def client_session(**kwargs: Any) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=IO_TIMEOUT, sock_read=IO_TIMEOUT),
        **kwargs,
    )


@pytest.fixture
async def http():
    async with client_session() as session:
        yield Http(session)


def _complete_response(data: bytes) -> bool:
    """True when ``data`` holds at least one whole response (Content-Length or
    chunked framing; no body for 1xx/204/304)."""
    end = data.find(b"\r\n\r\n")
    if end == -1:
        return False
    head, body = data[:end].lower(), data[end + 4 :]
    status = status_of(data)
    if status is not None and (status < 200 or status in (204, 304)):
        return True
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip() == b"content-length":
            return len(body) >= int(value)
        if name.strip() == b"transfer-encoding" and b"chunked" in value:
            return body.endswith(b"0\r\n\r\n")
    return False


class Received(bytes):
    """Bytes read from a socket; ``timed_out`` when the peer neither closed the
    connection nor sent a whole response in time."""

    timed_out: bool = False


async def raw_exchange(port: int, data: bytes, timeout: float = 5.0, half_close: bool = False
                       ) -> Received:
    """Send ``data`` on a fresh connection and read until the server closes it, a
    whole response has arrived, or ``timeout`` seconds pass. Never hangs."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = bytearray()
    timed_out = False
    try:
        writer.write(data)
        await writer.drain()
        if half_close and writer.can_write_eof():
            writer.write_eof()
        try:
            async with asyncio.timeout(timeout):
                while not _complete_response(received):
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    received += chunk
        except TimeoutError:
            timed_out = True
    except ConnectionError:
        pass
    finally:
        writer.close()
    result = Received(received)
    result.timed_out = timed_out
    return result


def raw_request(method: str, target: str, headers: Iterable[tuple[str, str]],
                body: bytes = b"") -> bytes:
    """An HTTP/1.1 request as bytes: exactly these header lines (latin-1), plus a
    Content-Length when there is a body."""
    lines = [f"{method} {target} HTTP/1.1", *(f"{n}: {v}" for n, v in headers)]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def headers_of(raw: bytes) -> list[tuple[str, str]]:
    """The header lines of a raw response, as (name, value) pairs in order."""
    head = raw.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")[1:]
    return [(n, v.strip()) for n, _, v in (line.partition(":") for line in head)]


def status_of(raw: bytes) -> int | None:
    """The status code of the first response in ``raw`` (None when there is none)."""
    if not raw.startswith(b"HTTP/1."):
        return None
    try:
        return int(raw.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None


async def read_one_response(reader: asyncio.StreamReader) -> bytes:
    """One response with a Content-Length body (or none) from ``reader``."""
    async with asyncio.timeout(IO_TIMEOUT):
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return head + (await reader.readexactly(length) if length else b"")


async def raw_response(port: int, data: bytes) -> bytes:
    """Send ``data`` and read exactly one Content-Length framed response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await read_one_response(reader)
    finally:
        writer.close()
