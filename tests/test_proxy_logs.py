"""One access line per request, in text and JSON, and what goes into it."""

from __future__ import annotations

import json
import logging
import re

import pytest
from conftest import free_port

from corsproxy import server

APP = "https://app.example.com"


def access_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "corsproxy.access"]


@pytest.fixture(autouse=True)
def _capture(caplog):
    caplog.set_level(logging.INFO, logger="corsproxy")


async def test_json_lines_carry_method_path_status_origin_verdict_reason_and_times(
    upstream, make_proxy, http, caplog
):
    proxy = await make_proxy(cors={"allow_origins": [APP]}, log_format="json")
    await http.request("GET", proxy.url + "/items/%2F?token=secret", {"Origin": APP})
    await http.request("GET", proxy.url + "/plain")
    (allowed, plain) = [json.loads(line) for line in access_lines(caplog)]
    assert allowed["method"] == "GET"
    assert allowed["path"] == "/items/%2F"
    assert allowed["status"] == 200
    assert allowed["origin"] == APP
    assert allowed["cors"] == "allowed"
    assert allowed["reason"] == f'origin: "{APP}" is allowed by allow_origins'
    # Whole microseconds from a monotonic clock, the upstream's part within the total.
    assert isinstance(allowed["upstream_us"], int) and isinstance(allowed["us"], int)
    assert 0 < allowed["upstream_us"] <= allowed["us"]
    assert allowed["request_bytes"] == 0
    assert allowed["response_bytes"] == len(b"hello from upstream\n")
    assert re.fullmatch(r"[0-9a-f]{32}", allowed["request_id"])
    assert allowed["request_id"] != plain["request_id"]
    assert allowed["client"] == "127.0.0.1"
    assert allowed["error"] is None and allowed["route"] is None
    assert allowed["time"].endswith("Z")
    assert "secret" not in access_lines(caplog)[0]
    assert plain["origin"] is None and plain["cors"] == "not-cors"


async def test_text_lines_are_one_line_with_key_value_fields(upstream, make_proxy, http, caplog):
    proxy = await make_proxy(cors={"allow_origins": [APP], "enforce": True})
    await http.request("POST", proxy.url + "/pay", {"Origin": "https://evil.example"}, data=b"x")
    (line,) = access_lines(caplog)
    assert "\n" not in line
    assert " 127.0.0.1 POST /pay 403 origin=https://evil.example cors=rejected " in line
    assert 'reason="origin: \\"https://evil.example\\" is not allowed by allow_origins' in line
    assert "upstream_us" not in line  # nothing went upstream
    assert " request_bytes=1 " in line


async def test_proxy_made_errors_are_logged_with_their_cause(make_proxy, http, caplog):
    proxy = await make_proxy(cors={"allow_origins": [APP]}, log_format="json",
                             upstream_url=f"http://127.0.0.1:{free_port()}")
    await http.request("GET", proxy.url + "/x", {"Origin": APP})
    (record,) = [json.loads(line) for line in access_lines(caplog)]
    assert record["status"] == 502
    assert record["cors"] == "allowed"
    assert record["error"].startswith("upstream refused the connection (upstream http://127.0.0.1:")
    assert record["error"].endswith(": connection refused)")


async def test_a_bug_in_the_proxy_becomes_a_clean_502_with_cors_headers(
    upstream, make_proxy, http, caplog, monkeypatch
):
    # The only way to reach this branch is to break the proxy on purpose.
    def broken(*args, **kwargs):
        raise RuntimeError("deliberately broken for the test")

    monkeypatch.setattr(server, "response_headers", broken)
    proxy = await make_proxy(cors={"allow_origins": [APP]}, log_format="json")
    result = await http.request("GET", proxy.url + "/x", {"Origin": APP})
    assert result.status == 502
    assert result.cors == {"access-control-allow-origin": APP}
    assert result.vary == ["Origin"]
    assert result.body == b"Bad Gateway: internal error in corsproxy; see its log\n"
    assert b"Traceback" not in result.body
    (record,) = [json.loads(line) for line in access_lines(caplog)]
    assert record["error"] == "internal error: RuntimeError: deliberately broken for the test"
    assert any(r.name == "corsproxy" and r.levelno == logging.ERROR for r in caplog.records)
    # And it keeps serving.
    monkeypatch.undo()
    assert (await http.request("GET", proxy.url + "/y")).status == 200
