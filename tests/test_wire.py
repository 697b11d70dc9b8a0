"""The sans-IO request rules (``corsproxy._wire``) from tables, without sockets.

The same rules are tested end to end, against a real proxy and a normalising
nginx upstream, in ``tests/test_hostile_clients.py``.
"""

from __future__ import annotations

import pytest

from corsproxy._wire import Rejected, check_host, check_target, has_dot_segment, render_head

DOT_SEGMENT_PATHS = [
    "/.", "/..", "/./", "/../", "/a/.", "/a/..", "/a/./b", "/a/../b", "/../internal/admin",
    "/%2e", "/%2E", "/%2e%2e", "/%2E%2e/x", "/.%2e/x", "/%2e./x", "/a/%2e/b", "/a/.%2E",
    "/a%2f..%2fb", "/a%2F..%2Fb", "/a\\..\\b", "/a%5c..%5cb", "/a%5C%2e%2e%5Cb",
    "/public/../admin", "/x/..;/y".replace(";", ""),
]
PLAIN_PATHS = [
    "/", "/a..b", "/.well-known/x", "/a/.../b", "/a/b.", "/a/.b", "/..a", "/a..", "/%2e%2e%2e",
    "/%2ex", "/x%2e", "/a/%252e%252e/b", "/file.tar.gz", "",
]


@pytest.mark.parametrize("path", DOT_SEGMENT_PATHS)
def test_every_spelling_of_a_dot_segment_is_found(path):
    assert has_dot_segment(path)


@pytest.mark.parametrize("path", PLAIN_PATHS)
def test_dots_that_are_not_whole_segments_are_fine(path):
    assert not has_dot_segment(path)


@pytest.mark.parametrize("path", DOT_SEGMENT_PATHS)
def test_a_target_with_a_dot_segment_is_refused_with_400(path):
    with pytest.raises(Rejected) as info:
        check_target("GET", path + "?q=1")
    assert info.value.status == 400
    assert "dot-segment" in str(info.value)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/a?x=../..", "/a?x=../.."),  # the query is not a path
        ("/a#frag", "/a#frag"),
        ("http://evil.example/x?y=1", "/x?y=1"),  # absolute-form: only path and query
        ("HTTPS://evil.example:8443/a/b", "/a/b"),
        ("http://evil.example", "/"),
        ("http://evil.example?q=1", "/?q=1"),
        ("//evil.example/x", "//evil.example/x"),  # a path that starts with two slashes
    ],
)
def test_targets_that_are_forwarded(target, expected):
    assert check_target("GET", target) == expected


@pytest.mark.parametrize(
    ("method", "target", "status", "words"),
    [
        ("CONNECT", "evil.example:443", 405, "CONNECT is not supported"),
        ("CONNECT", "/", 405, "CONNECT is not supported"),
        ("OPTIONS", "*", 400, "asterisk-form"),
        ("GET", "*", 400, "asterisk-form"),
        ("GET", "evil.example:443", 400, "is not a path"),
        ("GET", "ftp://evil.example/x", 400, "is not a path"),
        ("GET", "http://evil.example/../x", 400, "dot-segment"),
    ],
)
def test_targets_that_are_refused(method, target, status, words):
    with pytest.raises(Rejected) as info:
        check_target(method, target)
    assert info.value.status == status
    assert words in str(info.value)


@pytest.mark.parametrize(
    "host",
    ["example.com", "example.com:8080", "[::1]:8080", "[::1]", "127.0.0.1", "a-b.c_d~",
     "xn--bcher-kva.example", "example.com:", "%41.example"],
)
def test_valid_host_headers(host):
    check_host([host], "1.1")


@pytest.mark.parametrize(
    ("values", "version", "words"),
    [
        (["a b"], "1.1", "not a valid host"),
        (["evil/x"], "1.1", "not a valid host"),
        (["a@b"], "1.1", "not a valid host"),
        (["a:b"], "1.1", "not a valid host"),
        (["a:123456"], "1.1", "not a valid host"),
        ([""], "1.1", "not a valid host"),
        (["[::1"], "1.1", "not a valid host"),
        (["a\\b"], "1.0", "not a valid host"),
        (["a", "a"], "1.1", "more than one Host"),
        ([], "1.1", "no Host header"),
    ],
)
def test_invalid_host_headers_get_400(values, version, words):
    with pytest.raises(Rejected) as info:
        check_host(values, version)
    assert info.value.status == 400
    assert words in str(info.value)


def test_http10_needs_no_host():
    check_host([], "1.0")


def test_a_response_head_carries_bytes_one_to_one():
    head = render_head(200, "OK", [("X-Bytes", "\xe9\xff\x80"), ("Vary", "Origin")])
    assert head == b"HTTP/1.1 200 OK\r\nX-Bytes: \xe9\xff\x80\r\nVary: Origin\r\n"


@pytest.mark.parametrize("value", ["a\r\nX-Evil: 1", "a\nb", "a\rb", "a\x00b"])
def test_a_response_head_refuses_to_break_its_framing(value):
    with pytest.raises(ValueError):
        render_head(200, "OK", [("X", value)])
