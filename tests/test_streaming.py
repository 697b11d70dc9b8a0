"""Long-lived responses through the proxy: Server-Sent Events and long polls.

``upstream.timeout`` bounds the wait for the response headers only; the silence
between two pieces of a body is bounded by ``upstream.read_timeout`` (``null``: no
limit), globally or per route. Each piece reaches the client as it arrives.

The upstream is ``ws_upstreams.WsUpstream`` (aiohttp): ``/sse`` writes
``?n=`` events ``?gap=`` seconds apart, ``/sse-acked`` writes the next event only
once the test says the client got the previous one, ``/poll`` sends its headers at
once and a Content-Length body after ``?delay=``, ``/slow-head`` sends the headers
after ``?delay=``. Short values keep it fast: timeout 0.3 s, read_timeout 1.0 s,
gaps 0.6 s.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from hostile import Client, request
from ws_upstreams import APP, IO, sse_event, ws_proxies, ws_upstream

TIMEOUT = 0.3
READ_TIMEOUT = 1.0
GAP = 0.6


@pytest.fixture
async def wsup():
    async with ws_upstream() as server:
        yield server


@pytest.fixture
async def start():
    async with ws_proxies() as start_proxy:
        yield start_proxy


@pytest.fixture
async def session():
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=IO, sock_read=IO)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as s:
        yield s


async def read_events(resp: aiohttp.ClientResponse, on_event=None) -> list[tuple[bytes, float]]:
    """Every event (up to its blank line) with the time it arrived, until the body ends."""
    events = []
    while True:
        async with asyncio.timeout(IO):
            event = await resp.content.readuntil(b"\n\n")
        if not event:
            return events
        events.append((event, time.monotonic()))
        if on_event is not None:
            on_event(len(events))


async def raw_get(port: int, target: str, timeout: float = IO):
    """One GET on a raw connection: the parsed response (``complete`` tells whether
    its body ended as its framing says) and the seconds it took."""
    started = time.monotonic()
    async with await Client.open(port) as client:
        await client.send(request("GET", target, f"Origin: {APP}", host=b"proxy.test"))
        response = await client.response("GET", timeout)
    return response, time.monotonic() - started


async def test_sse_with_gaps_longer_than_timeout_streams_through(wsup, start, session):
    proxy = await start(wsup.url, upstream={"timeout": TIMEOUT, "read_timeout": READ_TIMEOUT})
    async with session.get(proxy.url + f"/sse?n=3&gap={GAP}", headers={"Origin": APP}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert resp.headers["Access-Control-Allow-Origin"] == APP
        assert resp.headers.get("Transfer-Encoding", "").lower() == "chunked"
        events = await read_events(resp)
    run = wsup.sse_run("/sse")
    assert [e for e, _ in events] == [sse_event(i) for i in (1, 2, 3)]
    # Each event came as soon as the upstream wrote it, not with the next one.
    for (_, arrived), sent in zip(events, run.sent_at, strict=True):
        assert arrived - sent < 0.25, (arrived - sent)
    assert events[-1][1] - events[0][1] >= 2 * GAP - 0.05
    record = await proxy.wait_record(lambda r: r.get("path") == "/sse")
    assert record["status"] == 200 and record["error"] is None, record


async def test_a_long_poll_body_after_a_gap_longer_than_timeout_arrives(wsup, start):
    proxy = await start(wsup.url, upstream={"timeout": TIMEOUT, "read_timeout": READ_TIMEOUT})
    response, took = await raw_get(proxy.port, f"/poll?delay={GAP}")
    assert response is not None and response.status == 200, response
    assert response.complete and response.framing == "length", response
    assert response.body == b'{"news": true}\n'
    assert took >= GAP - 0.05


async def test_a_gap_longer_than_read_timeout_cuts_the_response(wsup, start):
    read_timeout = 0.5
    proxy = await start(wsup.url, upstream={"timeout": TIMEOUT, "read_timeout": read_timeout})
    response, took = await raw_get(proxy.port, "/sse?n=3&gap=1.5")
    assert response is not None and response.status == 200, response
    assert response.framing == "chunked", response
    assert not response.complete, "a cut chunked body must not end with the last chunk"
    assert response.ending in ("eof", "reset"), response
    assert response.body == sse_event(1)
    # Cut by read_timeout after the first event: not by timeout (0.3 s), not by the
    # upstream's next event (1.5 s).
    assert read_timeout - 0.05 <= took < 1.2, took
    record = await proxy.wait_record(lambda r: r.get("path") == "/sse")
    assert record["status"] == 200
    assert "upstream.read_timeout" in (record["error"] or ""), record


async def test_read_timeout_null_lets_gaps_of_any_length_pass(wsup, start):
    proxy = await start(wsup.url, upstream={"timeout": TIMEOUT, "read_timeout": None})
    response, took = await raw_get(proxy.port, "/sse?n=2&gap=1.3")
    assert response is not None and response.status == 200, response
    assert response.complete, response
    assert response.body == sse_event(1) + sse_event(2)
    assert took >= 1.25


async def test_route_overrides_of_timeout_and_read_timeout(wsup, start):
    proxy = await start(
        wsup.url,
        upstream={"timeout": TIMEOUT, "read_timeout": 0.5},
        routes=[
            {"path": "/events", "upstream": {"read_timeout": None}},
            {"path": "/patient", "upstream": {"timeout": 1.5, "read_timeout": 2.0}},
        ],
    )
    (events, _), (other, _), (patient_head, _), (impatient_head, _) = await asyncio.gather(
        raw_get(proxy.port, "/events/sse?n=2&gap=0.8"),
        raw_get(proxy.port, "/other/sse?n=2&gap=0.8"),
        raw_get(proxy.port, "/patient/slow-head?delay=0.6"),
        raw_get(proxy.port, "/other/slow-head?delay=0.6"),
    )
    # read_timeout: null on /events; the top-level 0.5 s elsewhere.
    assert events is not None and events.complete, events
    assert events.body == sse_event(1) + sse_event(2)
    assert other is not None and other.status == 200 and not other.complete, other
    assert other.body == sse_event(1)
    # timeout: 1.5 s on /patient; the top-level 0.3 s elsewhere.
    assert patient_head is not None and patient_head.status == 200, patient_head
    assert patient_head.body == b"late head\n"
    assert impatient_head is not None and impatient_head.status == 504, impatient_head
    # The route's read_timeout of 2 s also applies to the body there.
    response, _ = await raw_get(proxy.port, "/patient/sse?n=2&gap=0.8")
    assert response is not None and response.complete, response


async def test_each_event_reaches_the_client_before_the_upstream_sends_the_next(
    wsup, start, session
):
    """No added latency: the upstream writes event i+1 only after the client has
    received event i (the test tells it); a proxy holding a chunk back until more
    data comes would leave the upstream waiting (recorded as a missing ack)."""
    proxy = await start(wsup.url, upstream={"timeout": TIMEOUT, "read_timeout": READ_TIMEOUT})
    path = "/sse-acked"
    async with session.get(proxy.url + path + "?n=5", headers={"Origin": APP}) as resp:
        assert resp.status == 200
        events = await read_events(resp, on_event=lambda i: wsup.ack(path, i))
    run = wsup.sse_run(path)
    assert [e for e, _ in events] == [sse_event(i) for i in range(1, 6)]
    assert run.missing_acks == [], f"events held back by the proxy: {run.missing_acks}"
    for (_, arrived), sent in zip(events, run.sent_at, strict=True):
        assert arrived - sent < 0.2, (arrived - sent)
