"""What a reverse proxy changes on the way through, as plain functions on header lists.

No sockets here: the server (``corsproxy.server``) hands in the raw header pairs
it received and sends on what comes out. Everything is a list of ``(name, value)``
pairs so that repeated names and their order survive; names and values are
latin-1 text, which carries every byte 1:1, so nothing is re-encoded on the way.

Upstream request (RFC 9110 §7.6):

- hop-by-hop headers are removed: ``Connection`` and every name it lists,
  ``Keep-Alive``, ``Proxy-*``, ``TE``, ``Trailer``, ``Transfer-Encoding``,
  ``Upgrade``; ``Expect`` too, since the proxy itself answers ``100-continue``;
- ``Host`` becomes the upstream's (unless ``upstream.preserve_host``);
- ``X-Forwarded-For`` gets the client address appended to whatever the client
  sent; ``X-Forwarded-Proto`` and ``X-Forwarded-Host`` are set by the proxy
  (a client's own values are replaced), except from a peer in
  ``listen.trusted_proxies``, whose values are kept;
- ``X-Request-Id`` carries the request's id: the client's own when it is one
  reasonable token (:func:`client_request_id`), otherwise a generated one
  (:func:`new_request_id`); the response carries the same id;
- everything else passes unchanged, in order.

Client response: hop-by-hop headers and every ``Access-Control-*`` header the
upstream sent are removed (the proxy is the one CORS authority: two ACAO headers
make a browser fail), the decision's CORS headers are added, and the decision's
``Vary`` names are merged into the upstream's ``Vary``. The upstream's own
``X-Request-Id`` gives way to the request's id (one id per request, the one in
the access line).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

from yarl import URL

__all__ = [
    "UpstreamTarget",
    "client_request_id",
    "forwarded_proto",
    "merge_vary",
    "new_request_id",
    "real_client",
    "response_headers",
    "upstream_request_headers",
]

#: Hop-by-hop headers (RFC 9110 §7.6.1), lower case; any ``proxy-*`` name is one too.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade"}
)
# Headers the proxy sets itself on the upstream request.
_REPLACED = frozenset({"host", "x-forwarded-proto", "x-forwarded-host", "expect"})
# ... except these two, which a trusted proxy's request keeps.
_TRUSTED_KEPT = frozenset({"x-forwarded-proto", "x-forwarded-host"})

#: A client's X-Request-Id is used when it is 1 to 200 visible ASCII characters.
_GOOD_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,200}").fullmatch


def client_request_id(values: Sequence[str]) -> str | None:
    """The client's request id: its one ``X-Request-Id`` value when that is a
    reasonable token (visible ASCII, at most 200 characters), else None (none,
    several, empty, too long, spaces or other bytes: the proxy makes its own)."""
    if len(values) == 1 and _GOOD_REQUEST_ID(values[0]):
        return values[0]
    return None


class _Ids:
    """32 hex digits: 16 random ones per process, then a 64-bit counter. Unique
    across restarts and worker processes (each gets its own random half after the
    fork) without a system call per request; an id is a label, not a secret."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.count = 0

    def next(self) -> str:
        self.count += 1
        return f"{self.prefix}{self.count:016x}"


_ids = _Ids()
os.register_at_fork(after_in_child=_ids.reset)


def new_request_id() -> str:
    """A fresh request id (see :class:`_Ids`)."""
    return _ids.next()


def forwarded_proto(pairs: Sequence[tuple[str, str]]) -> str | None:
    """The scheme a trusted proxy in front says the client used: the first
    element of the first ``X-Forwarded-Proto``, when it is ``http`` or ``https``."""
    for name, value in pairs:
        if name.lower() == "x-forwarded-proto":
            first = value.split(",", 1)[0].strip().lower()
            return first if first in ("http", "https") else None
    return None


def real_client(peer: str, pairs: Sequence[tuple[str, str]], trusted: Any) -> str:
    """The client's address for the log, as nginx's ``real_ip_recursive``: from the
    right of ``X-Forwarded-For``, the first address that is not a trusted proxy
    (``trusted(address) -> bool``); ``peer`` itself when it isn't trusted. An entry
    that is no IP address ends the walk at the last good one."""
    if not trusted(peer):
        return peer
    hops: list[str] = []
    for name, value in pairs:
        if name.lower() == "x-forwarded-for":
            hops.extend(part.strip() for part in value.split(","))
    client = peer
    for hop in reversed(hops):
        if not _is_ip(hop):
            break
        client = hop
        if not trusted(hop):
            break
    return client


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _connection_names(pairs: Sequence[tuple[str, str]]) -> frozenset[str]:
    """Names listed in ``Connection`` headers (they are hop-by-hop as well)."""
    names: set[str] = set()
    for name, value in pairs:
        if name.lower() == "connection":
            names.update(n.strip().lower() for n in value.split(","))
    names.discard("")
    return frozenset(names)


def _is_hop_by_hop(key: str, listed: frozenset[str]) -> bool:
    return key in HOP_BY_HOP or key.startswith("proxy-") or key in listed


def upstream_request_headers(
    pairs: Sequence[tuple[str, str]],
    *,
    client_addr: str | None,
    scheme: str,
    upstream_host: str,
    preserve_host: bool,
    request_id: str | None = None,
    trusted: bool = False,
) -> list[tuple[str, str]]:
    """The headers to send upstream, given the client's ``pairs`` (see module doc).
    ``trusted``: the peer is in ``listen.trusted_proxies``."""
    listed = _connection_names(pairs)
    out: list[tuple[str, str]] = [("Host", upstream_host)]
    client_host: str | None = None
    forwarded_for: list[str] = []
    xff_at: int | None = None
    id_at: int | None = None
    kept: set[str] = set()
    for name, value in pairs:
        key = name.lower()
        if key == "host":
            if client_host is None:
                client_host = value
            continue
        if key == "x-request-id" and request_id is not None:
            if id_at is None:
                id_at = len(out)
                out.append(("X-Request-Id", request_id))
            continue
        if trusted and key in _TRUSTED_KEPT:
            kept.add(key)
            out.append((name, value))
            continue
        if key == "x-forwarded-for":
            if xff_at is None:
                xff_at = len(out)
                out.append(("X-Forwarded-For", ""))  # filled in below
            if value.strip():
                forwarded_for.append(value.strip())
            continue
        if key in _REPLACED or _is_hop_by_hop(key, listed):
            continue
        out.append((name, value))
    if client_addr:
        forwarded_for.append(client_addr)
    if forwarded_for:
        xff = ("X-Forwarded-For", ", ".join(forwarded_for))
        if xff_at is None:
            out.append(xff)
        else:
            out[xff_at] = xff
    elif xff_at is not None:
        del out[xff_at]
    if request_id is not None and id_at is None:
        out.append(("X-Request-Id", request_id))
    if "x-forwarded-proto" not in kept:
        out.append(("X-Forwarded-Proto", scheme))
    if client_host is not None:
        if "x-forwarded-host" not in kept:
            out.append(("X-Forwarded-Host", client_host))
        if preserve_host:
            out[0] = ("Host", client_host)
    return out


def merge_vary(upstream_values: Iterable[str], names: Iterable[str]) -> str | None:
    """One ``Vary`` value: the upstream's names (spelling and order kept, duplicates
    dropped case-insensitively) followed by the ``names`` not already there.
    ``*`` anywhere stays ``*`` (it already varies on everything). None when empty."""
    out: list[str] = []
    seen: set[str] = set()
    for value in upstream_values:
        for part in value.split(","):
            name = part.strip(" \t")
            if not name:
                continue
            if name == "*":
                return "*"
            key = name.lower()
            if key not in seen:
                seen.add(key)
                out.append(name)
    for name in names:
        key = name.lower()
        if key not in seen:
            seen.add(key)
            out.append(name)
    return ", ".join(out) if out else None


def response_headers(
    pairs: Sequence[tuple[str, str]],
    cors: Sequence[tuple[str, str]],
    vary: Sequence[str],
    request_id: str | None = None,
    report_only: bool = False,
) -> list[tuple[str, str]]:
    """The headers for the client: the upstream's ``pairs`` without hop-by-hop and
    ``Access-Control-*`` headers, plus ``cors``, with ``vary`` merged into ``Vary``
    (which takes the place of the upstream's first ``Vary``, or goes last), and
    ``X-Request-Id: request_id`` (in place of the upstream's first, or last).

    ``report_only``: the upstream's ``Access-Control-*`` and ``Vary`` headers pass
    unchanged instead, and ``cors``/``vary`` are not used (report-only mode)."""
    listed = _connection_names(pairs)
    # RFC 9112 §6.3: Transfer-Encoding overrides Content-Length; the body arrives
    # de-chunked, so its length is whatever arrives and Content-Length must go.
    chunked = any(n.lower() == "transfer-encoding" for n, _ in pairs)
    out: list[tuple[str, str]] = []
    vary_values: list[str] = []
    vary_at: int | None = None
    id_at: int | None = None
    for name, value in pairs:
        key = name.lower()
        if _is_hop_by_hop(key, listed) or (key.startswith("access-control-")
                                           and not report_only):
            continue
        if key == "x-request-id" and request_id is not None:
            if id_at is None:
                id_at = len(out)
                out.append(("X-Request-Id", request_id))
            continue
        if key == "vary" and not report_only:
            if vary_at is None:
                vary_at = len(out)
                out.append(("Vary", ""))  # filled in below
            vary_values.append(value)
            continue
        if chunked and key == "content-length":
            continue
        out.append((name, value))
    merged = None if report_only else merge_vary(vary_values, vary)
    if vary_at is not None:
        if merged is None:
            del out[vary_at]
        else:
            out[vary_at] = ("Vary", merged)
    elif merged is not None:
        out.append(("Vary", merged))
    if request_id is not None and id_at is None:
        out.append(("X-Request-Id", request_id))
    if not report_only:
        out.extend(cors)
    return out


class UpstreamTarget:
    """The upstream URL, split once: where to connect, the ``Host`` to send, and the
    base path every request path is appended to (a trailing slash ignored)."""

    __slots__ = ("url", "origin", "base_path", "host")

    def __init__(self, url: str) -> None:
        parsed = URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"upstream URL {url!r} must be http:// or https:// with a host")
        self.url = url
        self.origin = str(parsed.origin())
        self.base_path = parsed.raw_path.rstrip("/")
        host = parsed.host_port_subcomponent
        assert host is not None
        self.host = host

    def url_for(self, target: str) -> URL:
        """The upstream URL for a raw request target (path and query, as received).

        ``encoded=True``: yarl must not re-encode or normalise anything, so
        ``%2F``, ``..`` and the query reach the upstream byte for byte.
        """
        return URL(self.origin + self.base_path + target, encoded=True)
