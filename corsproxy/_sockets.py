"""How much of what was written to a TCP transport the peer has not taken yet.

A send timeout must fire on a peer that takes nothing, never on one that is slow
but moving. The transport's own buffer is not enough to tell: on Linux a socket
becomes writable again only once half of its (often multi-megabyte) send queue is
free, so a steady reader can leave the buffer untouched for seconds. The kernel's
send queue (``SIOCOUTQ``, the same number as ``TIOCOUTQ``) shows every byte the
peer takes.
"""

from __future__ import annotations

import asyncio
import sys

try:  # Linux only
    import fcntl
    import termios

    _OUTQ: int | None = termios.TIOCOUTQ if sys.platform.startswith("linux") else None
except ImportError:  # pragma: no cover
    _OUTQ = None

__all__ = ["unsent_bytes"]


def unsent_bytes(transport: asyncio.BaseTransport | None) -> int | None:
    """Bytes in the transport's buffer plus the socket's send queue; None when the
    queue can't be read (not Linux, no socket): then only the buffer counts."""
    if _OUTQ is None or transport is None or transport.is_closing():
        return None
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        queued = fcntl.ioctl(sock.fileno(), _OUTQ, b"\0\0\0\0")
    except (OSError, ValueError):
        return None
    size = transport.get_write_buffer_size()  # type: ignore[attr-defined]
    return size + int.from_bytes(queued, sys.byteorder)
