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
  (a client's own values are replaced: nothing in front of the proxy is trusted);
- everything else passes unchanged, in order.

Client response: hop-by-hop headers and every ``Access-Control-*`` header the
upstream sent are removed (the proxy is the one CORS authority: two ACAO headers
make a browser fail), the decision's CORS headers are added, and the decision's
``Vary`` names are merged into the upstream's ``Vary``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from yarl import URL

__all__ = [
    "UpstreamTarget",
    "merge_vary",
    "response_headers",
    "upstream_request_headers",
]

#: Hop-by-hop headers (RFC 9110 §7.6.1), lower case; any ``proxy-*`` name is one too.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade"}
)
# Headers the proxy sets itself on the upstream request.
_REPLACED = frozenset({"host", "x-forwarded-proto", "x-forwarded-host", "expect"})


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
) -> list[tuple[str, str]]:
    """The headers to send upstream, given the client's ``pairs`` (see module doc)."""
    listed = _connection_names(pairs)
    out: list[tuple[str, str]] = [("Host", upstream_host)]
    client_host: str | None = None
    forwarded_for: list[str] = []
    xff_at: int | None = None
    for name, value in pairs:
        key = name.lower()
        if key == "host":
            if client_host is None:
                client_host = value
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
    out.append(("X-Forwarded-Proto", scheme))
    if client_host is not None:
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
) -> list[tuple[str, str]]:
    """The headers for the client: the upstream's ``pairs`` without hop-by-hop and
    ``Access-Control-*`` headers, plus ``cors``, with ``vary`` merged into ``Vary``
    (which takes the place of the upstream's first ``Vary``, or goes last)."""
    listed = _connection_names(pairs)
    # RFC 9112 §6.3: Transfer-Encoding overrides Content-Length; the body arrives
    # de-chunked, so its length is whatever arrives and Content-Length must go.
    chunked = any(n.lower() == "transfer-encoding" for n, _ in pairs)
    out: list[tuple[str, str]] = []
    vary_values: list[str] = []
    vary_at: int | None = None
    for name, value in pairs:
        key = name.lower()
        if key.startswith("access-control-") or _is_hop_by_hop(key, listed):
            continue
        if key == "vary":
            if vary_at is None:
                vary_at = len(out)
                out.append(("Vary", ""))  # filled in below
            vary_values.append(value)
            continue
        if chunked and key == "content-length":
            continue
        out.append((name, value))
    merged = merge_vary(vary_values, vary)
    if vary_at is not None:
        if merged is None:
            del out[vary_at]
        else:
            out[vary_at] = ("Vary", merged)
    elif merged is not None:
        out.append(("Vary", merged))
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
