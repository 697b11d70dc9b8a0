"""Chromium through corsproxy: WebSockets and EventSource from a page on another origin.

Browsers enforce no CORS on WebSockets: a page on any site may open one and the
answer is not checked. So the proxy checks the handshake's ``Origin`` itself
(``check_websocket_origin``, on by default): an origin the policy does not allow
gets 403 and the upstream never sees the handshake; the page sees a failed socket
(an error, then close code 1006). An allowed page exchanges messages through the
tunnel. An ``EventSource`` receives events whose gaps are longer than
``upstream.timeout`` (the wait for the response headers only).

The sockets go to the proxy's own port (``direct_url``), not through the wire
tap, which reads HTTP exchanges only. The upstream is an aiohttp WebSocket/SSE
server (``ws_upstreams.WsUpstream``) on the browser world's loop.
"""

from __future__ import annotations

import uuid

import pytest
from websockets.asyncio.client import connect as ws_connect
from ws_upstreams import WsUpstream

pytestmark = pytest.mark.browser

#: Opens a WebSocket, sends each message once open (``"bin:<n>"`` sends n zero
#: bytes), closes with 1000 once as many messages came back; reports everything
#: the page could see. Bounded by its own 8 s timer.
SOCKET_JS = """
([url, messages]) => new Promise((resolve) => {
  const out = {opened: false, received: [], error: false, code: null, reason: "",
               wasClean: null, timedOut: false, protocol: null};
  let ws;
  try { ws = new WebSocket(url, ["chat.v2"]); }
  catch (e) { out.thrown = String(e); resolve(out); return; }
  ws.binaryType = "arraybuffer";
  const timer = setTimeout(() => { out.timedOut = true; try { ws.close(); } catch (e) {}
                                   resolve(out); }, 8000);
  ws.onopen = () => {
    out.opened = true;
    out.protocol = ws.protocol;
    for (const m of messages) {
      ws.send(m.startsWith("bin:") ? new Uint8Array(Number(m.slice(4))) : m);
    }
    if (messages.length === 0) ws.close(1000, "done");
  };
  ws.onmessage = (e) => {
    out.received.push(typeof e.data === "string" ? e.data : "bin:" + e.data.byteLength);
    if (out.received.length === messages.length) ws.close(1000, "page done");
  };
  ws.onerror = () => { out.error = true; };
  ws.onclose = (e) => {
    clearTimeout(timer);
    Object.assign(out, {code: e.code, reason: e.reason, wasClean: e.wasClean});
    resolve(out);
  };
})
"""

#: Collects ``n`` events from an EventSource (then closes it), with their arrival
#: times in ms since it was created; ``errors`` counts error events before that
#: (a cut stream makes EventSource reconnect, which would repeat event 1).
EVENTSOURCE_JS = """
([url, n]) => new Promise((resolve) => {
  const out = {events: [], times: [], errors: 0, timedOut: false};
  const started = performance.now();
  const es = new EventSource(url);
  const timer = setTimeout(() => { out.timedOut = true; es.close(); resolve(out); }, 8000);
  es.onmessage = (e) => {
    out.events.push(e.data);
    out.times.push(performance.now() - started);
    if (out.events.length === n) { clearTimeout(timer); es.close(); resolve(out); }
  };
  es.onerror = () => { out.errors += 1; };
})
"""


@pytest.fixture(scope="module")
def ws_api(browser_world):
    server = browser_world.loop.run(WsUpstream().start())
    yield server
    browser_world.loop.run(server.close())


def seen(world, api: WsUpstream, path: str):
    return world.loop.call(api.seen, path)


def new_path(kind: str) -> str:
    return f"/{uuid.uuid4().hex[:12]}/{kind}"


def socket_from_page(world, tab, url: str, messages: list[str]) -> dict:
    return world.loop.run(tab.page.evaluate(SOCKET_JS, [url, messages]))


def control_handshake(world, api: WsUpstream, proxy) -> None:
    """A handshake without Origin (not a browser) through the same proxy must reach
    the upstream: proof that the proxy and the upstream were up all along."""
    path = new_path("echo")

    async def run() -> None:
        async with ws_connect(f"ws://127.0.0.1:{proxy.port}{path}", proxy=None,
                              open_timeout=5, close_timeout=2, ping_interval=None) as ws:
            await ws.send("control")
            assert await ws.recv() == "control"

    world.loop.run(run())
    assert len(seen(world, api, path)) == 1


def ws_url(proxy, path: str) -> str:
    return proxy.direct_url.replace("http://", "ws://") + path


def test_a_page_on_an_allowed_origin_talks_through_a_websocket(
    world, tab, start_proxy, ws_api
):
    origin = world.page_origin("app.allowed.test")
    proxy = start_proxy(cors={"allow_origins": [origin]}, upstream_url=ws_api.url)
    tab.open(origin + "/")
    path = new_path("echo")

    got = socket_from_page(world, tab, ws_url(proxy, path), ["hello", "grüße", "bin:70000"])

    assert got["opened"] and not got["error"] and not got["timedOut"], got
    assert got["received"] == ["hello", "grüße", "bin:70000"]
    assert got["protocol"] == "chat.v2"  # the upstream's choice, relayed in the 101
    assert (got["code"], got["wasClean"]) == (1000, True), got
    (handshake,) = seen(world, ws_api, path)
    assert handshake.get("Origin") == origin
    assert handshake.get("Sec-WebSocket-Protocol") == "chat.v2"
    assert handshake.get("Sec-WebSocket-Version") == "13"
    (record,) = proxy.access_records(path, 1)
    assert record["status"] == 101
    assert record["closed_by"] in ("client", "upstream")
    # Chromium negotiates permessage-deflate (the zero bytes shrink): just both ways.
    assert record["up_bytes"] > 0 and record["down_bytes"] > 0, record


def test_a_page_on_a_denied_origin_gets_the_handshake_refused(
    world, tab, start_proxy, ws_api
):
    allowed = world.page_origin("app.allowed.test")
    proxy = start_proxy(cors={"allow_origins": [allowed]}, upstream_url=ws_api.url)
    tab.open(world.page_origin("evil.test") + "/")
    path = new_path("echo")

    got = socket_from_page(world, tab, ws_url(proxy, path), ["steal"])

    assert not got["opened"] and not got["timedOut"], got
    assert got["error"], got
    assert (got["code"], got["wasClean"]) == (1006, False), got
    assert got["received"] == []
    (record,) = proxy.access_records(path, 1)
    assert record["status"] == 403
    assert record["origin"] == world.page_origin("evil.test")
    control_handshake(world, ws_api, proxy)
    assert seen(world, ws_api, path) == [], "the refused handshake reached the upstream"


def test_with_the_check_off_the_browser_itself_stops_nothing(world, tab, start_proxy, ws_api):
    # Why the check exists: without it a page on any origin gets the socket.
    allowed = world.page_origin("app.allowed.test")
    proxy = start_proxy(
        cors={"allow_origins": [allowed], "check_websocket_origin": False},
        upstream_url=ws_api.url,
    )
    tab.open(world.page_origin("evil.test") + "/")
    path = new_path("echo")

    got = socket_from_page(world, tab, ws_url(proxy, path), ["anyone"])

    assert got["opened"] and got["received"] == ["anyone"], got
    (handshake,) = seen(world, ws_api, path)
    assert handshake.get("Origin") == world.page_origin("evil.test")


def test_eventsource_receives_events_with_gaps_longer_than_upstream_timeout(
    world, tab, start_proxy, ws_api
):
    origin = world.page_origin("app.allowed.test")
    timeout, gap = 0.3, 0.7
    proxy = start_proxy(
        cors={"allow_origins": [origin]},
        upstream={"url": ws_api.url, "connect_timeout": 2.0, "timeout": timeout,
                  "read_timeout": 3.0},
    )
    tab.open(origin + "/")
    path = new_path("sse")

    got = world.loop.run(
        tab.page.evaluate(EVENTSOURCE_JS, [proxy.direct_url + path + f"?n=3&gap={gap}", 3])
    )

    assert not got["timedOut"], got
    assert got["events"] == ["event 1", "event 2", "event 3"], got
    assert got["errors"] == 0, got
    gaps = [b - a for a, b in zip(got["times"], got["times"][1:], strict=False)]
    assert all(g >= (gap - 0.1) * 1000 for g in gaps), gaps  # each gap > upstream.timeout
    assert len(seen(world, ws_api, path)) == 1  # one connection, no reconnect
    (record,) = proxy.access_records(path, 1)
    assert record["status"] == 200 and record["cors"] == "allowed", record
