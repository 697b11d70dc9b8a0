"""A transparent TCP relay that records the HTTP/1.1 exchanges passing through it.

The browser suite puts one in front of each corsproxy it starts. Bytes are passed
on unchanged in both directions, so the browser talks to the real proxy; the tap
only reads along. It is how the suite sees what the upstream never sees: the
preflights (and their headers, cookies included), and the exact
``Access-Control-*`` headers of every response the browser judged.

Chromium speaks plain HTTP/1.1 without pipelining on ``http://`` URLs, so each
connection is a strict sequence of request, response, request, response.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

MAX_KEPT_BODY = 64 * 1024


@dataclass
class Message:
    """One HTTP message head (plus the start of its body) as seen on the wire."""

    start: str
    headers: list[tuple[str, str]]
    body: bytes = b""

    def get_all(self, name: str) -> list[str]:
        key = name.lower()
        return [v for k, v in self.headers if k.lower() == key]

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        return values[0] if values else None

    def has(self, name: str) -> bool:
        return bool(self.get_all(name))

    @property
    def method(self) -> str:
        return self.start.split(" ", 1)[0]

    @property
    def target(self) -> str:
        parts = self.start.split(" ")
        return parts[1] if len(parts) > 1 else ""

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def status(self) -> int:
        return int(self.start.split(" ")[1])

    def cors_headers(self) -> list[tuple[str, str]]:
        """Every ``Access-Control-*`` header line, in order, duplicates kept."""
        return [(k, v) for k, v in self.headers if k.lower().startswith("access-control-")]

    def cors_header_dict(self) -> dict[str, str]:
        """The ``Access-Control-*`` headers by canonical name; fails on a repeated one."""
        out: dict[str, str] = {}
        for k, v in self.cors_headers():
            name = "-".join(p.capitalize() for p in k.split("-"))
            assert name not in out, f"{name} sent twice: {self.cors_headers()}"
            out[name] = v
        return out

    def vary(self) -> list[str]:
        """The ``Vary`` names, all lines joined, in order."""
        names: list[str] = []
        for line in self.get_all("Vary"):
            names.extend(n.strip() for n in line.split(",") if n.strip())
        return names


@dataclass
class Exchange:
    """A request and, once it has come back, its response."""

    request: Message
    response: Message | None = None
    connection: int = 0

    @property
    def is_preflight(self) -> bool:
        return self.request.method == "OPTIONS" and self.request.has(
            "Access-Control-Request-Method"
        )


class _Splitter:
    """Splits one direction of one connection into HTTP messages (RFC 9112 §6)."""

    def __init__(self, *, response: bool, next_method=None) -> None:
        self.response = response
        self.next_method = next_method
        self.buf = bytearray()
        self.cur: Message | None = None
        self.mode = ""
        self.remaining = 0

    def _keep(self, data: bytes) -> None:
        assert self.cur is not None
        room = MAX_KEPT_BODY - len(self.cur.body)
        if room > 0:
            self.cur.body += data[:room]

    def _start(self) -> Message | None:
        """Parse a head; return it when it has no body, else set up body framing."""
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        lines = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
        del self.buf[: end + 4]
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
        msg = Message(lines[0], headers)
        no_body = False
        if self.response:
            status = msg.status
            if status < 200:
                return msg  # interim response: the real one follows
            method = self.next_method() if self.next_method else "GET"
            no_body = method == "HEAD" or status in (204, 304)
        te = (msg.get("Transfer-Encoding") or "").lower()
        length = msg.get("Content-Length")
        if no_body:
            return msg
        if "chunked" in te:
            self.mode = "chunk-size"
        elif length is not None:
            self.mode, self.remaining = "length", int(length)
        elif self.response:
            self.mode = "close"
        else:
            return msg
        self.cur = msg
        return None

    def feed(self, data: bytes) -> list[Message]:
        self.buf += data
        out: list[Message] = []
        while True:
            if self.cur is None:
                msg = self._start()
                if msg is not None:
                    out.append(msg)
                    continue
                if self.cur is None:
                    return out
            if self.mode == "length":
                take = min(self.remaining, len(self.buf))
                self._keep(bytes(self.buf[:take]))
                del self.buf[:take]
                self.remaining -= take
                if self.remaining:
                    return out
            elif self.mode == "chunk-size":
                eol = self.buf.find(b"\r\n")
                if eol < 0:
                    return out
                size = int(bytes(self.buf[:eol]).split(b";")[0].strip() or b"0", 16)
                del self.buf[: eol + 2]
                self.mode, self.remaining = ("trailers", 0) if size == 0 else ("chunk-data", size)
                continue
            elif self.mode == "chunk-data":
                if len(self.buf) < self.remaining + 2:
                    return out
                self._keep(bytes(self.buf[: self.remaining]))
                del self.buf[: self.remaining + 2]
                self.mode = "chunk-size"
                continue
            elif self.mode == "trailers":
                if self.buf.startswith(b"\r\n"):
                    del self.buf[:2]
                else:
                    end = self.buf.find(b"\r\n\r\n")
                    if end < 0:
                        return out
                    del self.buf[: end + 4]
            elif self.mode == "close":
                self._keep(bytes(self.buf))
                self.buf.clear()
                return out
            out.append(self.cur)
            self.cur, self.mode = None, ""

    def eof(self) -> list[Message]:
        if self.cur is not None and self.mode == "close":
            msg, self.cur = self.cur, None
            return [msg]
        return []


class WireTap:
    """Listens on 127.0.0.1:<port>, relays every connection to ``target_port``.

    ``exchanges`` holds every request in arrival order; a request is recorded
    before its bytes are passed on, and a response before the browser gets it, so
    once a ``fetch()`` has settled its exchanges are complete.
    """

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, target_port)
        self.exchanges: list[Exchange] = []
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()
        self._connections = 0

    async def start(self) -> WireTap:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _accept(self, reader, writer) -> None:
        task = asyncio.ensure_future(self._relay(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _relay(self, c_reader, c_writer) -> None:
        self._connections += 1
        conn = self._connections
        pending: list[Exchange] = []
        try:
            u_reader, u_writer = await asyncio.open_connection(*self.target)
        except OSError:
            c_writer.close()
            return

        def on_request(msg: Message) -> None:
            ex = Exchange(msg, connection=conn)
            self.exchanges.append(ex)
            pending.append(ex)

        def next_method() -> str:
            return pending[0].request.method if pending else "GET"

        def on_response(msg: Message) -> None:
            if msg.status < 200 or not pending:
                return
            pending.pop(0).response = msg

        requests = _Splitter(response=False)
        responses = _Splitter(response=True, next_method=next_method)

        async def pump(src, dst, splitter: _Splitter, handle) -> None:
            try:
                while data := await src.read(65536):
                    for msg in splitter.feed(data):
                        handle(msg)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                for msg in splitter.eof():
                    handle(msg)
                try:
                    if dst.can_write_eof():
                        dst.write_eof()
                except (ConnectionError, OSError, RuntimeError):
                    pass

        try:
            await asyncio.gather(
                pump(c_reader, u_writer, requests, on_request),
                pump(u_reader, c_writer, responses, on_response),
            )
        finally:
            for w in (c_writer, u_writer):
                w.close()
