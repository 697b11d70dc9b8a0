"""WebSocket pass-through: what makes a request a handshake, and the byte tunnel
that follows the upstream's ``101 Switching Protocols``.

The Origin rule for handshakes lives in the decision core
(:meth:`corsproxy.core.CorsPolicy.websocket`); :mod:`corsproxy.server` forwards
the handshake and, on 101, hands both connections to a :class:`Tunnel`.

The tunnel copies bytes both ways untouched (no frame parsing) until either side
closes:

- back-pressure: when one side's transport buffer is full, the other side stops
  being read until it drains, so a slow reader never makes the proxy buffer more
  than one transport's high-water mark per direction;
- half-close: an end-of-stream from one side becomes a ``write_eof`` to the other;
  the tunnel ends when both directions have ended, or either connection is lost;
- ``websocket.idle_timeout``: no byte either way for that long closes both sides;
- :meth:`Tunnel.close` (graceful shutdown at the end of ``listen.shutdown_grace``)
  closes both sides.

When it ends, :attr:`Tunnel.done` resolves and the access line gets the bytes each
way and who closed it (``client``, ``upstream``, ``idle_timeout``, ``shutdown``).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .httpserver import Request

__all__ = ["Tunnel", "is_handshake"]


def _tokens(values: list[str]) -> set[str]:
    return {t.strip(" \t").lower() for v in values for t in v.split(",")}


def is_handshake(request: Request) -> bool:
    """A WebSocket opening handshake (RFC 6455 §4.1): GET over HTTP/1.1 with
    ``Upgrade: websocket`` and ``Connection: upgrade``."""
    return (
        request.upgrade
        and request.method == "GET"
        and request.version == "1.1"
        and "websocket" in _tokens(request.get_all("upgrade"))
        and "upgrade" in _tokens(request.get_all("connection"))
    )


class _UpstreamSide(asyncio.Protocol):
    """The upstream connection's protocol once it is a tunnel."""

    def __init__(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel

    def data_received(self, data: bytes) -> None:
        self.tunnel.from_upstream(data)

    def eof_received(self) -> bool:
        if self.tunnel.upstream.get_extra_info("sslcontext"):
            self.tunnel.lost("upstream")  # TLS has no half-close
            return False
        return self.tunnel.upstream_eof()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.tunnel.lost("upstream")

    def pause_writing(self) -> None:
        self.tunnel.client_reading(False)

    def resume_writing(self) -> None:
        self.tunnel.client_reading(True)


class Tunnel:
    """Bytes both ways between the client connection and the upstream transport."""

    def __init__(self, client: asyncio.Transport, upstream: asyncio.Transport,
                 idle_timeout: float) -> None:
        self.client = client
        self.upstream = upstream
        self.idle_timeout = idle_timeout
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.up_bytes = 0  # client -> upstream
        self.down_bytes = 0  # upstream -> client
        self.closed_by: str | None = None
        self._client_eof = False
        self._upstream_eof = False
        self._last = time.monotonic()
        self._timer: asyncio.TimerHandle | None = None

    def start(self, client_tail: bytes, upstream_tail: bytes) -> None:
        """Begin: the bytes each side sent after its head go across first, then
        both sides are read."""
        self.upstream.set_protocol(_UpstreamSide(self))
        if client_tail:
            self.from_client(client_tail)
        if upstream_tail:
            self.from_upstream(upstream_tail)
        for transport in (self.client, self.upstream):
            if not transport.is_closing():
                transport.resume_reading()
        self._timer = self.loop.call_later(self.idle_timeout, self._check_idle)

    # -- bytes ------------------------------------------------------------------------

    def from_client(self, data: bytes) -> None:
        self.up_bytes += len(data)
        self._last = time.monotonic()
        self.upstream.write(data)

    def from_upstream(self, data: bytes) -> None:
        self.down_bytes += len(data)
        self._last = time.monotonic()
        self.client.write(data)

    # -- back-pressure: a full buffer on one side stops reading the other ---------

    def upstream_reading(self, on: bool) -> None:
        """The client's transport buffer is full (False) or drained (True)."""
        if self.upstream.is_closing():
            return
        if on:
            self.upstream.resume_reading()
        else:
            self.upstream.pause_reading()

    def client_reading(self, on: bool) -> None:
        """The upstream's transport buffer is full (False) or drained (True)."""
        if self.client.is_closing():
            return
        if on:
            self.client.resume_reading()
        else:
            self.client.pause_reading()

    # -- ends -------------------------------------------------------------------------

    def client_eof(self) -> bool:
        self._client_eof = True
        self._half_close(self.upstream, "client")
        return True  # keep our sending side open

    def upstream_eof(self) -> bool:
        self._upstream_eof = True
        self._half_close(self.client, "upstream")
        return True

    def _half_close(self, other: asyncio.Transport, who: str) -> None:
        if self.closed_by is None:
            self.closed_by = who
        if self._client_eof and self._upstream_eof:
            self._finish(None)
            return
        try:
            if other.can_write_eof():
                other.write_eof()
            else:  # pragma: no cover - TCP transports can
                self._finish(who)
        except (OSError, RuntimeError):
            self._finish(who)

    def lost(self, who: str) -> None:
        """One connection is gone: close the other."""
        self._finish(who)

    def close(self, why: str = "shutdown") -> None:
        self._finish(why)

    def _finish(self, who: str | None) -> None:
        if self.done.done():
            return
        if self.closed_by is None:
            self.closed_by = who or "client"
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for transport in (self.client, self.upstream):
            if not transport.is_closing():
                transport.close()
        self.done.set_result(None)

    def _check_idle(self) -> None:
        self._timer = None
        if self.done.done():
            return
        quiet = time.monotonic() - self._last
        if quiet >= self.idle_timeout:
            self._finish("idle_timeout")
        else:
            self._timer = self.loop.call_later(self.idle_timeout - quiet, self._check_idle)
