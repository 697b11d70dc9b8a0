"""Malformed and hostile requests over a raw socket: never a 500, never a traceback,
never a hang, and the proxy keeps serving afterwards.

Each corpus entry is sent on its own connection. "No hang" means the proxy either
answers or closes the connection before the socket timeout; entries that end in the
middle of a message half-close the socket, so the proxy knows nothing more comes.

What aiohttp's parser (llhttp) does with these, seen here: it answers 400 itself
for every framing or syntax error (no CORS headers: there is no request to decide
on), and a parse error in a pipelined batch also drops the valid requests before
it in the same packet. Header values that parse but are not UTF-8 get the proxy's
own 400 with CORS headers.
"""

from __future__ import annotations

import logging

import pytest
from conftest import raw_exchange, status_of

APP = "https://app.example.com"
GET = b"GET / HTTP/1.1\r\nHost: h\r\n"


def _req(*lines: bytes, body: bytes = b"", start: bytes = GET) -> bytes:
    return start + b"".join(line + b"\r\n" for line in lines) + b"\r\n" + body


# (id, bytes, half_close)
CORPUS: list[tuple[str, bytes, bool]] = [
    ("header_without_colon", _req(b"NoColonHere"), False),
    ("empty_header_name", _req(b": value"), False),
    ("space_before_colon", _req(b"X-A : b"), False),
    ("space_in_header_name", _req(b"X A: b"), False),
    ("bad_char_in_header_name", _req(b"X(A): b"), False),
    ("nul_in_header_value", _req(b"X-A: a\x00b"), False),
    ("nul_in_header_name", _req(b"X-\x00A: b"), False),
    ("nul_in_origin", _req(b"Origin: https://app.example.com\x00.evil"), False),
    ("cr_inside_header_value", _req(b"X-A: a\rb"), False),
    ("control_chars_in_value", _req(b"X-A: \x01\x02\x7f"), False),
    ("obs_fold", _req(b"X-A: first", b" continued"), False),
    ("obs_fold_first_line", b"GET / HTTP/1.1\r\n Host: h\r\n\r\n", False),
    ("huge_header_value", _req(b"X-Big: " + b"a" * 100_000), False),
    ("huge_origin", _req(b"Origin: https://" + b"a" * 9000 + b".example"), False),
    ("long_origin_under_limit", _req(b"Origin: https://" + b"a" * 5000 + b".example"), False),
    ("many_headers", _req(*(b"X-H%d: v" % i for i in range(2000))), False),
    ("many_origin_lines", _req(*(b"Origin: " + APP.encode() for _ in range(100))), False),
    ("huge_url", b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: h\r\n\r\n", False),
    ("non_ascii_path", b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: h\r\n\r\n", False),
    ("non_utf8_header_value", _req(b"X-A: \xff\xfe"), False),
    ("non_utf8_origin", _req(b"Origin: https://\xff.example"), False),
    ("two_different_content_lengths",
     _req(b"Content-Length: 5", b"Content-Length: 6", body=b"hello!", start=b"POST / HTTP/1.1\r\n"
          b"Host: h\r\n"), False),
    ("two_equal_content_lengths",
     _req(b"Content-Length: 5", b"Content-Length: 5", body=b"hello", start=b"POST / HTTP/1.1\r\n"
          b"Host: h\r\n"), False),
    ("content_length_and_chunked",
     _req(b"Content-Length: 5", b"Transfer-Encoding: chunked", body=b"0\r\n\r\n",
          start=b"POST / HTTP/1.1\r\nHost: h\r\n"), False),
    ("negative_content_length", _req(b"Content-Length: -1", start=b"POST / HTTP/1.1\r\n"), False),
    ("non_numeric_content_length", _req(b"Content-Length: abc"), False),
    ("huge_content_length", _req(b"Content-Length: 99999999999999999999999"), False),
    ("bad_chunk_size",
     _req(b"Transfer-Encoding: chunked", body=b"zz\r\nhello\r\n0\r\n\r\n",
          start=b"POST / HTTP/1.1\r\nHost: h\r\n"), False),
    ("overflowing_chunk_size",
     _req(b"Transfer-Encoding: chunked", body=b"ffffffffffffffffffffff\r\nx\r\n",
          start=b"POST / HTTP/1.1\r\nHost: h\r\n"), True),
    ("chunk_without_crlf",
     _req(b"Transfer-Encoding: chunked", body=b"5\r\nhelloXX0\r\n\r\n",
          start=b"POST / HTTP/1.1\r\nHost: h\r\n"), False),
    ("truncated_chunked_body",
     _req(b"Transfer-Encoding: chunked", body=b"100\r\nabc",
          start=b"POST / HTTP/1.1\r\nHost: h\r\n"), True),
    ("truncated_content_length_body",
     _req(b"Content-Length: 1000", body=b"abc", start=b"POST / HTTP/1.1\r\nHost: h\r\n"), True),
    ("unknown_transfer_encoding",
     _req(b"Transfer-Encoding: gzip", body=b"abc", start=b"POST / HTTP/1.1\r\nHost: h\r\n"), True),
    ("chunked_not_last",
     _req(b"Transfer-Encoding: chunked, gzip", body=b"0\r\n\r\n",
          start=b"POST / HTTP/1.1\r\nHost: h\r\n"), True),
    ("garbage_request_line", b"GARBAGE\r\n\r\n", False),
    ("bad_http_version", b"GET / HTTP/9.9\r\nHost: h\r\n\r\n", False),
    ("http09_request", b"GET /\r\n\r\n", True),
    ("lowercase_method", b"get / HTTP/1.1\r\nHost: h\r\n\r\n", False),
    ("unknown_method", b"FOO-BAR / HTTP/1.1\r\nHost: h\r\n\r\n", False),
    ("bare_lf_line_endings", b"GET / HTTP/1.1\nHost: h\n\n", True),
    ("tls_client_hello", bytes.fromhex("16030100a5010000a10303") + b"\x00" * 64, True),
    ("only_crlf", b"\r\n\r\n\r\n", True),
    ("no_host_header", b"GET / HTTP/1.1\r\n\r\n", False),
    ("two_host_headers", _req(b"Host: other"), False),
    ("http10_no_host", b"GET / HTTP/1.0\r\n\r\n", False),
    ("asterisk_target", b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n", False),
    ("connect_method", b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", True),
    ("absolute_form_other_host", b"GET http://other.example/x HTTP/1.1\r\nHost: h\r\n\r\n", False),
    ("unknown_expectation", _req(b"Expect: teapot", b"Content-Length: 1", body=b"x"), False),
    ("upgrade_websocket",
     _req(b"Connection: Upgrade", b"Upgrade: websocket", b"Sec-WebSocket-Version: 13",
          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", body=b"\x81\x85garbage"), True),
    ("preflight_with_junk_acrh",
     _req(b"Origin: " + APP.encode(), b"Access-Control-Request-Method: GET",
          b"Access-Control-Request-Headers: ,,,\t, x y, \"q\"", start=b"OPTIONS / HTTP/1.1\r\n"
          b"Host: h\r\n"), False),
    ("preflight_with_two_acrm",
     _req(b"Origin: " + APP.encode(), b"Access-Control-Request-Method: GET",
          b"Access-Control-Request-Method: PUT", start=b"OPTIONS / HTTP/1.1\r\nHost: h\r\n"),
     False),
    ("pipelined_garbage_after_valid", _req() + b"\x00\x01\x02 junk\r\n\r\n", True),
]


@pytest.mark.parametrize(("data", "half_close"), [(d, h) for _, d, h in CORPUS],
                         ids=[name for name, _, _ in CORPUS])
async def test_malformed_request_gets_no_500_no_traceback_no_hang(
    upstream, make_proxy, caplog, data, half_close
):
    caplog.set_level(logging.INFO, logger="corsproxy")
    proxy = await make_proxy(cors={"allow_origins": [APP]})
    raw = await raw_exchange(proxy.port, data, timeout=3.0, half_close=half_close)
    status = status_of(raw)
    assert status is None or 200 <= status < 500 or status in (502, 504, 505), raw[:300]
    assert b"Traceback" not in raw and b"File \"" not in raw
    # The proxy answered or closed the connection instead of waiting.
    assert not raw.timed_out, raw[:300]
    internal = [r for r in caplog.records if r.name == "corsproxy" and r.levelno >= logging.ERROR]
    assert internal == [], [r.getMessage() for r in internal]
    # Still serving afterwards.
    after = await raw_exchange(
        proxy.port, b"GET /after HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    )
    assert status_of(after) == 200
    assert upstream.requests[-1].raw_path == "/after"
