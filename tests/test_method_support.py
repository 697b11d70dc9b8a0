"""Which request methods reach corsproxy at all.

The proxy's server parses request lines with llhttp (httptools), which refuses methods it doesn't
know (and lower-case ones) with its own 400 before any handler runs. ``corsproxy
check`` warns about such methods in ``allow_methods`` (config.RECEIVABLE_METHODS);
this test keeps that list true against a live proxy.
"""

from __future__ import annotations

import pytest
from conftest import raw_exchange, status_of

from corsproxy.config import RECEIVABLE_METHODS, parse_config

# Receivable ones plus a sample that is not: lower case, RTSP, made up.
NOT_RECEIVABLE = ("patch", "get", "Foo", "DESCRIBE", "PLAY", "X-CUSTOM")


@pytest.mark.parametrize("method", sorted(RECEIVABLE_METHODS) + list(NOT_RECEIVABLE))
async def test_method_reaches_the_upstream_exactly_when_listed_as_receivable(
    make_proxy, upstream, method
):
    proxy = await make_proxy(cors={"allow_origins": ["https://app.example.com"]})
    request = (
        f"{method} /m HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    ).encode()
    raw = await raw_exchange(proxy.port, request)
    if method in RECEIVABLE_METHODS:
        assert status_of(raw) == 200, raw[:200]
        assert [r.method for r in upstream.requests] == [method]
    else:
        assert status_of(raw) == 400, raw[:200]
        assert upstream.requests == []


def test_check_warns_about_a_method_the_proxy_cannot_receive():
    config = parse_config(
        "upstream: {url: http://127.0.0.1:9}\n"
        "cors: {allow_origins: [https://a.example], allow_methods: [GET, FOO]}\n"
    )
    assert config.warnings == (
        '<string>: cors.allow_methods[1]: "FOO": a preflight for it is answered, but the '
        "request itself gets a 400 without CORS headers from the proxy's HTTP parser, which "
        "only accepts registered methods (e.g. PATCH, PURGE, PROPFIND); use one of those",
    )
