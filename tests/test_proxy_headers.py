"""corsproxy.forwarding on its own: the header rules, without sockets."""

from __future__ import annotations

import pytest

from corsproxy.forwarding import (
    UpstreamTarget,
    merge_vary,
    response_headers,
    upstream_request_headers,
)


def forward(pairs, **kwargs):
    options = {"client_addr": "10.1.2.3", "scheme": "http", "upstream_host": "api:8000",
               "preserve_host": False}
    options.update(kwargs)
    return upstream_request_headers(pairs, **options)


def test_a_request_without_host_gets_the_upstream_host_and_no_forwarded_host():
    assert forward([("Accept", "*/*")]) == [
        ("Host", "api:8000"),
        ("Accept", "*/*"),
        ("X-Forwarded-For", "10.1.2.3"),
        ("X-Forwarded-Proto", "http"),
    ]


def test_preserve_host_without_a_client_host_keeps_the_upstream_host():
    assert forward([], preserve_host=True)[0] == ("Host", "api:8000")


def test_an_empty_x_forwarded_for_is_replaced_by_the_client_address():
    assert ("X-Forwarded-For", "10.1.2.3") in forward([("X-Forwarded-For", " ")])


def test_connection_named_headers_compare_case_insensitively():
    out = forward([("Connection", " x-ONE ,, X-two"), ("X-One", "1"), ("x-two", "2"), ("X-3", "3")])
    assert [n for n, _ in out] == ["Host", "X-3", "X-Forwarded-For", "X-Forwarded-Proto"]


def test_every_proxy_header_is_hop_by_hop():
    out = forward([("Proxy-Authorization", "a"), ("proxy-anything", "b"), ("Proxyish", "c")])
    assert [n for n, _ in out][1:2] == ["Proxyish"]


@pytest.mark.parametrize(
    ("upstream", "names", "expected"),
    [
        ([], ["Origin"], "Origin"),
        ([], [], None),
        ([""], [], None),
        (["Accept"], [], "Accept"),
        (["accept-encoding,Origin"], ["Origin", "Access-Control-Request-Method"],
         "accept-encoding, Origin, Access-Control-Request-Method"),
        (["*"], ["Origin"], "*"),
        (["\tAccept\t,  Cookie"], ["origin"], "Accept, Cookie, origin"),
    ],
)
def test_merge_vary(upstream, names, expected):
    assert merge_vary(upstream, names) == expected


def test_response_headers_drop_content_length_when_the_upstream_sent_chunked():
    out = response_headers(
        [("Content-Length", "10"), ("Transfer-Encoding", "chunked"), ("X-A", "1")], [], ["Origin"]
    )
    assert out == [("X-A", "1"), ("Vary", "Origin")]


def test_response_headers_put_cors_last_and_vary_where_the_upstream_had_it():
    out = response_headers(
        [
            ("Vary", "Accept"),
            ("access-control-allow-origin", "*"),
            ("X-A", "1"),
            ("Vary", "Cookie"),
        ],
        [("Access-Control-Allow-Origin", "https://a.example")],
        ["Origin"],
    )
    assert out == [
        ("Vary", "Accept, Cookie, Origin"),
        ("X-A", "1"),
        ("Access-Control-Allow-Origin", "https://a.example"),
    ]


@pytest.mark.parametrize(
    ("url", "origin", "host", "base"),
    [
        ("http://api:8000", "http://api:8000", "api:8000", ""),
        ("http://API.example:80/v1/", "http://api.example", "api.example", "/v1"),
        ("https://api.example/v1//", "https://api.example", "api.example", "/v1"),
        ("http://[::1]:9000/x", "http://[::1]:9000", "[::1]:9000", "/x"),
    ],
)
def test_upstream_target_splits_the_url_once(url, origin, host, base):
    target = UpstreamTarget(url)
    assert (target.origin, target.host, target.base_path) == (origin, host, base)
    assert target.url_for("/a%2Fb?c=%20").raw_path_qs == base + "/a%2Fb?c=%20"
