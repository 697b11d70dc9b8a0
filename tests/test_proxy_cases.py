"""Every case of tests/cases.yaml end to end: a real proxy in front of a real upstream.

For each case the policy becomes a config file (through the real loader), the
request goes over a socket exactly as written (raw path, header lines in order),
and the answer must match the case: status, the FULL set of Access-Control-*
headers, Vary. "forwarded" means the upstream received the request (same method
and raw path) and its status reached the client; any other status means the proxy
answered itself and the upstream saw nothing.

The upstream answers every request with its own (wrong) CORS headers, so every
forwarded case also proves they are replaced by the proxy's.
"""

from __future__ import annotations

import pytest
from casetable import expected_cors_headers, load_cases
from conftest import Reply, start_proxy

CASES = load_cases()
UPSTREAM_STATUS = 203
UPSTREAM_CORS = [
    ("Access-Control-Allow-Origin", "https://evil.example"),
    ("Access-Control-Allow-Credentials", "true"),
    ("Access-Control-Expose-Headers", "X-Upstream-Secret"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_case_through_the_proxy(case, upstream, http):
    upstream.default = Reply(
        status=UPSTREAM_STATUS,
        headers=[("Content-Type", "text/plain"), *UPSTREAM_CORS],
        body=b"from upstream\n",
    )
    proxy = await start_proxy(case.config_yaml(upstream.url))
    try:
        result = await http.request(
            case.request.method, proxy.url + case.request.path, list(case.request.headers)
        )
    finally:
        await proxy.close()
    expect = case.expect

    assert result.cors == expected_cors_headers(case), result.body
    assert [v.lower() for v in result.vary] == [v.lower() for v in expect.vary]
    if expect.forwarded:
        assert result.status == UPSTREAM_STATUS, result.body
        assert result.body == (b"" if case.request.method == "HEAD" else b"from upstream\n")
        (seen,) = upstream.requests
        assert seen.method == case.request.method
        assert seen.raw_path == case.request.path
    else:
        assert result.status == expect.status, result.body
        assert upstream.requests == [], "the proxy must answer this itself"
        assert result.values("Content-Type") == ["text/plain; charset=utf-8"]
        if expect.body_startswith is not None:
            assert result.body.decode().startswith(expect.body_startswith)
