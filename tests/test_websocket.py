"""WebSocket pass-through, end to end: real clients (aiohttp's ``ws_connect``, the
``websockets`` library, raw frames) through a real proxy to real upstreams (an
aiohttp WebSocket server, a FastAPI app under uvicorn, a raw asyncio server).

The proxy runs in-process (``corsproxy.server.ProxyServer`` with its access lines
collected) unless the test needs a process: the slow-reader memory check and the
graceful shutdown run ``python -m corsproxy run --log-format json``.

What the spec says and these tests hold the proxy to:

- a handshake goes upstream with ``Upgrade``, ``Connection: upgrade`` and every
  ``Sec-WebSocket-*`` header intact, plus ``X-Forwarded-*``; the upstream's 101
  comes back with its headers; then bytes pass untouched both ways, half-closes
  propagate, and neither direction buffers without bound;
- a non-101 answer to a handshake is an ordinary response with CORS headers;
- a cross-origin handshake from an origin the route does not allow is answered
  403 by the proxy (``check_websocket_origin``, default on) and never forwarded;
- one access line per tunnel when it ends: status 101, ``ms``, ``up_bytes``,
  ``down_bytes``, ``closed_by`` (client, upstream, idle_timeout, shutdown);
- ``websocket.idle_timeout`` closes a tunnel silent both ways; on SIGTERM open
  tunnels get ``listen.shutdown_grace``;
- other upgrade tokens (h2c) are not tunnelled.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import time

import aiohttp
import pytest
import websockets
from aiohttp import WSMsgType
from hostile import Client, raise_nofile, request, reset
from websockets.asyncio.client import connect as ws_connect
from ws_upstreams import (
    APP,
    EVIL,
    IO,
    FastApiRecord,
    RawWsUpstream,
    close_frame,
    fastapi_app,
    frame,
    handshake,
    new_key,
    open_tunnel,
    proxy_process,
    read_frame,
    uvicorn_server,
    ws_accept,
    ws_proxies,
    ws_upstream,
)

MiB = 2**20
CLOSED_TYPES = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR)


# ---------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------


@pytest.fixture
async def wsup():
    async with ws_upstream() as server:
        yield server


@pytest.fixture
async def start():
    async with ws_proxies() as start_proxy:
        yield start_proxy


@pytest.fixture
async def proxy(wsup, start):
    return await start(wsup.url)


@pytest.fixture
async def session():
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        yield s


def aio_connect(session: aiohttp.ClientSession, url: str, **kwargs):
    kwargs.setdefault("max_msg_size", 0)
    kwargs.setdefault("timeout", aiohttp.ClientWSTimeout(ws_receive=None, ws_close=3.0))
    return session.ws_connect(url, **kwargs)


def wsl_connect(url: str, **kwargs):
    """The ``websockets`` client: no proxy from the environment, no keepalive pings."""
    kwargs.setdefault("proxy", None)
    kwargs.setdefault("open_timeout", IO)
    kwargs.setdefault("close_timeout", 3)
    kwargs.setdefault("ping_interval", None)
    kwargs.setdefault("max_size", None)
    return ws_connect(url, **kwargs)


async def receive(ws, timeout: float = IO):
    async with asyncio.timeout(timeout):
        return await ws.receive()


def tokens(values: list[str]) -> list[str]:
    return [t.strip().lower() for v in values for t in v.split(",") if t.strip()]


async def assert_not_forwarded(proxy, wsup, path: str) -> None:
    """``path`` never reached the upstream, proven by a control handshake (no
    Origin) through the same proxy that must arrive."""
    control = f"/control-{os.urandom(4).hex()}/echo"
    response, client = await open_tunnel(proxy.port, control)
    try:
        assert response.status == 101, response
    finally:
        await client.aclose()
    await wsup.wait_request(control)
    assert wsup.seen(path) == [], f"{path} reached the upstream: {wsup.seen(path)}"


# ---------------------------------------------------------------------------
# messages through the tunnel
# ---------------------------------------------------------------------------


async def test_text_and_binary_echo_with_aiohttp(proxy, wsup, session):
    async with aio_connect(session, proxy.ws_url + "/echo", origin=APP) as ws:
        for text in ("hello", "grüße ✓", ""):
            await ws.send_str(text)
            msg = await receive(ws)
            assert (msg.type, msg.data) == (WSMsgType.TEXT, text)
        data = bytes(range(256)) * 3
        await ws.send_bytes(data)
        msg = await receive(ws)
        assert (msg.type, msg.data) == (WSMsgType.BINARY, data)
    up = await wsup.wait_session("/echo")
    assert up.messages == ["hello", "grüße ✓", "", data]


async def test_text_and_binary_echo_with_websockets(proxy, wsup):
    async with wsl_connect(proxy.ws_url + "/echo", origin=APP) as ws:
        await ws.send("über")
        async with asyncio.timeout(IO):
            assert await ws.recv() == "über"
        await ws.send(b"\x00\x01\xfe\xff")
        async with asyncio.timeout(IO):
            assert await ws.recv() == b"\x00\x01\xfe\xff"
    up = await wsup.wait_session("/echo")
    assert up.messages == ["über", b"\x00\x01\xfe\xff"]


@pytest.mark.parametrize("client", ["aiohttp", "websockets"])
async def test_one_16_mib_message_both_ways(proxy, wsup, session, client):
    data = os.urandom(16 * MiB)
    async with asyncio.timeout(30):
        if client == "aiohttp":
            async with aio_connect(session, proxy.ws_url + "/echo") as ws:
                await ws.send_bytes(data)
                msg = await receive(ws, 20)
                assert msg.type == WSMsgType.BINARY
                echoed = msg.data
        else:
            async with wsl_connect(proxy.ws_url + "/echo", compression=None) as ws:
                await ws.send(data)
                echoed = await ws.recv()
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(data).digest()
    up = await wsup.wait_session("/echo")
    assert up.received_bytes == len(data)


async def test_ping_from_the_client_is_answered_by_the_upstream(proxy, session):
    # autoping=False: the client sees the Pong itself; the proxy only carries bytes,
    # so the Pong (with the Ping's payload) comes from the upstream.
    async with aio_connect(session, proxy.ws_url + "/echo", autoping=False) as ws:
        await ws.ping(b"client-ping")
        msg = await receive(ws)
        assert (msg.type, msg.data) == (WSMsgType.PONG, b"client-ping")


async def test_ping_from_the_upstream_is_answered_by_the_client(proxy, wsup, session):
    # aiohttp answers a Ping (autoping) while it is receiving.
    async with aio_connect(session, proxy.ws_url + "/ping") as ws:
        await ws.send_str("still open")
        assert (await receive(ws)).data == "still open"
        up = await wsup.wait_session("/ping")
        async with asyncio.timeout(IO):
            while up.pong is None:
                await asyncio.sleep(0.01)
        assert up.pong == b"up-ping"


@pytest.mark.parametrize("client", ["aiohttp", "websockets"])
async def test_close_code_and_reason_from_the_client_reach_the_upstream_and_back(
    proxy, wsup, session, client
):
    if client == "aiohttp":
        async with aio_connect(session, proxy.ws_url + "/echo") as ws:
            await ws.send_str("x")
            await receive(ws)
            async with asyncio.timeout(IO):
                await ws.close(code=4001, message=b"client bye")
            assert ws.close_code == 4001  # the upstream's answering Close
    else:
        async with wsl_connect(proxy.ws_url + "/echo") as ws:
            await ws.send("x")
            async with asyncio.timeout(IO):
                await ws.recv()
                await ws.close(code=4001, reason="client bye")
            assert ws.close_code == 4001 and ws.close_reason == "client bye"
    up = await wsup.wait_session("/echo")
    async with asyncio.timeout(IO):
        await up.ended.wait()
    assert (up.end, up.close_code, up.close_reason) == ("close", 4001, "client bye")
    record = await proxy.tunnel_record("/echo")
    # The proxy does not read frames: closed_by is the side whose connection ended
    # first, and after a closing handshake RFC 6455 has the server close the TCP
    # connection first (some clients do not wait for it). So either is right here.
    assert record["closed_by"] in ("client", "upstream")


@pytest.mark.parametrize("client", ["aiohttp", "websockets"])
async def test_the_upstream_closing_first_reaches_the_client_with_its_code(
    proxy, session, client
):
    if client == "aiohttp":
        async with aio_connect(session, proxy.ws_url + "/close-first") as ws:
            msg = await receive(ws)
            assert (msg.type, msg.data) == (WSMsgType.TEXT, "bye soon")
            msg = await receive(ws)
            assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 4002, "upstream done")
    else:
        async with wsl_connect(proxy.ws_url + "/close-first") as ws:
            async with asyncio.timeout(IO):
                assert await ws.recv() == "bye soon"
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await ws.recv()
            assert closed.value.rcvd is not None
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4002, "upstream done")
    record = await proxy.tunnel_record("/close-first")
    # aiohttp's client closes the TCP connection as soon as it has answered the
    # Close; the websockets client waits for the server to (RFC 6455 §7.1.1).
    assert record["closed_by"] == ("client" if client == "aiohttp" else "upstream")


@pytest.mark.parametrize("how", ["reset", "fin"])
async def test_the_client_vanishing_mid_message_ends_the_upstream_connection(proxy, wsup, how):
    response, client = await open_tunnel(proxy.port, "/echo")
    try:
        assert response.status == 101, response
        up = await wsup.wait_session("/echo")
        # A binary frame announcing 1 MiB, of which only 1000 bytes ever come.
        whole = frame(os.urandom(MiB), 0x2)
        await client.send(whole[: 14 + 1000])
        await asyncio.sleep(0.05)
    finally:
        if how == "reset":
            reset(client.writer)
        else:
            await client.aclose()
    async with asyncio.timeout(IO):
        await up.ended.wait()
    assert up.end in ("closed", "error", "cancelled"), up.end
    assert up.messages == []
    record = await proxy.tunnel_record("/echo")
    assert record["closed_by"] == "client"


@pytest.mark.parametrize("how", ["reset", "fin"])
async def test_the_upstream_vanishing_ends_the_client_connection(start, how):
    async def tunnel(reader, writer, head):
        writer.write(frame("half a conversation", 0x1, masked=False))
        await writer.drain()
        await reader.read(100)
        if how == "reset":
            reset(writer)

    raw = await RawWsUpstream(tunnel).start()
    try:
        proxy = await start(raw.url)
        response, client = await open_tunnel(proxy.port, "/gone")
        try:
            assert response.status == 101, response
            assert (await read_frame(client)).payload == b"half a conversation"
            await client.send(frame("are you there?", 0x1))
            async with asyncio.timeout(IO):
                while await client.read_some(IO):
                    pass
            assert client.ending in ("eof", "reset")
        finally:
            await client.aclose()
    finally:
        await raw.close()
    record = await proxy.tunnel_record("/gone")
    assert record["closed_by"] == "upstream"


async def test_500_concurrent_sockets_each_echo(proxy, wsup, session):
    raise_nofile(8192)
    count = 500
    gate = asyncio.Semaphore(100)

    async def open_one(i: int):
        async with gate:
            return await session.ws_connect(
                proxy.ws_url + f"/n{i}/echo", timeout=aiohttp.ClientWSTimeout(ws_close=5)
            )

    sockets = []
    try:
        async with asyncio.timeout(40):
            opened = await asyncio.gather(*(open_one(i) for i in range(count)),
                                          return_exceptions=True)
            sockets = [ws for ws in opened if not isinstance(ws, BaseException)]
            errors = [ws for ws in opened if isinstance(ws, BaseException)]
            assert not errors, f"{len(errors)} handshakes failed, e.g. {errors[0]!r}"
            # All 500 tunnels are open at the same time.
            live = [s for s in wsup.sessions if not s.ended.is_set()]
            assert len(live) == count

            async def echo(i: int, ws) -> None:
                text = f"socket {i} " + "x" * (i % 97)
                await ws.send_str(text)
                msg = await ws.receive()
                assert (msg.type, msg.data) == (WSMsgType.TEXT, text), (i, msg)

            await asyncio.gather(*(echo(i, ws) for i, ws in enumerate(sockets)))
    finally:
        async with asyncio.timeout(20):
            await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    assert sorted(len(s.messages) for s in wsup.sessions) == [1] * count
    await proxy.wait_record(
        lambda r: len([x for x in proxy.records() if x.get("status") == 101]) >= count,
        timeout=IO, what=f"{count} tunnel access lines",
    )


# ---------------------------------------------------------------------------
# bytes, half-closes, back-pressure (raw upstream)
# ---------------------------------------------------------------------------


async def test_bytes_pass_untouched_both_ways(start):
    # Frames a proxy that parsed WebSocket would be tempted to rewrite: a fragmented
    # message with a Ping between the fragments, RSV1 set (compressed), non-minimal
    # length encodings, fixed and random masks, and an unmasked server side.
    client_bytes = b"".join([
        frame("frag-1 ", 0x1, fin=False, mask=b"\x01\x02\x03\x04"),
        frame(b"ping!", 0x9),
        frame("frag-2", 0x0, fin=True),
        frame(b"\x00" * 5, 0x2, rsv=4, length_form=126),
        frame(os.urandom(70000), 0x2, length_form=127),
        frame(b"", 0x1, mask=b"\x00\x00\x00\x00"),
    ])
    server_bytes = b"".join([
        frame("hello", 0x1, masked=False),
        frame(b"pong!", 0xA, masked=False),
        frame(os.urandom(200000), 0x2, masked=False),
        frame(b"x", 0x2, masked=False, length_form=127),
    ])
    got_upstream = bytearray()
    done = asyncio.Event()

    async def tunnel(reader, writer, head):
        while len(got_upstream) < len(client_bytes):
            chunk = await reader.read(65536)
            if not chunk:
                break
            got_upstream.extend(chunk)
        done.set()
        writer.write(server_bytes)
        await writer.drain()
        await asyncio.sleep(IO)

    raw = await RawWsUpstream(tunnel).start()
    try:
        proxy = await start(raw.url)
        response, client = await open_tunnel(proxy.port, "/raw")
        try:
            assert response.status == 101, response
            await client.send(client_bytes)
            async with asyncio.timeout(IO):
                await done.wait()
                while len(client.buf) < len(server_bytes):
                    assert await client.read_some(IO), "the proxy closed the tunnel"
            assert bytes(got_upstream) == client_bytes
            assert bytes(client.buf) == server_bytes
        finally:
            await client.aclose()
    finally:
        await raw.close()


async def test_a_client_half_close_reaches_the_upstream_which_can_still_answer(start):
    events: list[str] = []
    got = bytearray()
    reply = frame("after your eof", 0x1, masked=False)

    async def tunnel(reader, writer, head):
        while chunk := await reader.read(65536):
            got.extend(chunk)
        events.append("upstream got eof")
        writer.write(reply)
        await writer.drain()
        writer.write_eof()
        events.append("upstream sent eof")
        await asyncio.sleep(IO)

    raw = await RawWsUpstream(tunnel).start()
    try:
        proxy = await start(raw.url)
        response, client = await open_tunnel(proxy.port, "/half")
        try:
            assert response.status == 101, response
            sent = frame("last words", 0x1)
            await client.send(sent)
            client.writer.write_eof()
            async with asyncio.timeout(IO):
                while await client.read_some(IO):
                    pass
            assert client.ending == "eof"
            assert bytes(client.buf) == reply
            assert bytes(got) == sent
            assert events == ["upstream got eof", "upstream sent eof"]
        finally:
            await client.aclose()
    finally:
        await raw.close()


async def test_an_upstream_half_close_reaches_the_client_which_can_still_send(start):
    got = bytearray()
    upstream_saw_eof = asyncio.Event()
    first = frame("upstream is done talking", 0x1, masked=False)

    async def tunnel(reader, writer, head):
        writer.write(first)
        await writer.drain()
        writer.write_eof()
        while chunk := await reader.read(65536):
            got.extend(chunk)
        upstream_saw_eof.set()

    raw = await RawWsUpstream(tunnel).start()
    try:
        proxy = await start(raw.url)
        response, client = await open_tunnel(proxy.port, "/half")
        try:
            assert response.status == 101, response
            async with asyncio.timeout(IO):
                while await client.read_some(IO):
                    pass
            assert (client.ending, bytes(client.buf)) == ("eof", first)
            later = frame("but I still have something to say", 0x1)
            await client.send(later)
            client.writer.write_eof()
            async with asyncio.timeout(IO):
                await upstream_saw_eof.wait()
            assert bytes(got) == later
        finally:
            await client.aclose()
    finally:
        await raw.close()


async def test_an_upstream_that_stops_reading_pushes_back_on_the_client(start):
    """Client -> upstream back-pressure: while the upstream reads nothing, the client
    can only get as much into the pipe as the kernel buffers on the way hold, not the
    whole 128 MiB (which a proxy without back-pressure would take into memory)."""
    total, size = 128 * MiB, MiB
    gate = asyncio.Event()
    digest = hashlib.sha256()
    received = [0]
    finished = asyncio.Event()

    async def tunnel(reader, writer, head):
        await gate.wait()
        while received[0] < expected_bytes:
            chunk = await reader.read(2**18)
            if not chunk:
                break
            digest.update(chunk)
            received[0] += len(chunk)
        finished.set()
        await asyncio.sleep(IO)

    frames = [frame(bytes([i % 251]) * size, 0x2, mask=b"\0\0\0\0") for i in range(total // size)]
    expected_bytes = sum(len(f) for f in frames)
    expected = hashlib.sha256(b"".join(frames)).digest()
    raw = await RawWsUpstream(tunnel, rcvbuf=64 * 1024).start()
    try:
        proxy = await start(raw.url)
        response, client = await open_tunnel(proxy.port, "/sink")
        try:
            assert response.status == 101, response
            written = [0]

            async def writer_task() -> None:
                for f in frames:
                    client.writer.write(f)
                    written[0] += len(f)
                    await client.writer.drain()

            def accepted() -> int:  # what the client's kernel has taken so far
                return written[0] - client.writer.transport.get_write_buffer_size()

            task = asyncio.ensure_future(writer_task())
            try:
                samples = []
                for _ in range(15):
                    await asyncio.sleep(0.1)
                    samples.append(accepted())
                assert not task.done(), "the whole 128 MiB went in while the upstream read nothing"
                assert samples[-1] < 96 * MiB, samples
                assert samples[-1] - samples[-6] < 2 * MiB, f"still flowing: {samples}"
                gate.set()
                async with asyncio.timeout(30):
                    await task
                    await finished.wait()
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            assert received[0] == expected_bytes
            assert digest.digest() == expected
        finally:
            await client.aclose()
    finally:
        await raw.close()


async def test_a_slow_reader_keeps_the_proxy_memory_flat(tmp_path, wsup):
    """Upstream -> client back-pressure, measured on a ``corsproxy run`` process: the
    upstream pushes 128 MiB to a client that first reads nothing for 1.5 s, then reads
    slowly. The upstream must be held back (not finished, not moving, while the
    client reads nothing) and the proxy's RSS stays under its start + 64 MiB."""
    total, size = 128 * MiB, MiB
    proxy = proxy_process(tmp_path, wsup.url)
    try:
        # Warm up (first tunnel, first buffers) before the baseline.
        response, warm = await open_tunnel(proxy.port, "/warm/echo")
        assert response.status == 101, response
        await warm.send(frame("warm", 0x1))
        assert (await read_frame(warm)).payload == b"warm"
        await warm.send(close_frame(1000))
        await warm.aclose()
        base = proxy.rss_kib() * 1024
        peak = base

        response, client = await open_tunnel(proxy.port, "/push", rcvbuf=64 * 1024,
                                              limit=64 * 1024)
        try:
            assert response.status == 101, response
            await client.send(frame(f"go {total} {size}", 0x1))
            up = await wsup.wait_session("/push")
            samples = []
            for _ in range(15):  # 1.5 s without reading a byte
                await asyncio.sleep(0.1)
                samples.append(up.sent)
                peak = max(peak, proxy.rss_kib() * 1024)
            assert not up.finished_push, "the upstream got all 128 MiB out to a stalled client"
            assert samples[-1] - samples[-6] <= 2 * MiB, f"the upstream kept sending: {samples}"

            got, index = 0, 0
            last_sample = time.monotonic()
            async with asyncio.timeout(40):
                while got < total:
                    f = await read_frame(client, IO)
                    assert f is not None, f"the tunnel ended after {got} bytes"
                    assert f.opcode == 0x2 and len(f.payload) == size
                    want = index % 251
                    assert f.payload[0] == want and f.payload[-1] == want, index
                    got += size
                    index += 1
                    if index % 8 == 0:
                        await asyncio.sleep(0.005)  # a slow reader
                    if time.monotonic() - last_sample > 0.05:
                        peak = max(peak, proxy.rss_kib() * 1024)
                        last_sample = time.monotonic()
            peak = max(peak, proxy.rss_kib() * 1024)
            assert peak - base < 64 * MiB, f"proxy RSS grew by {(peak - base) / MiB:.1f} MiB"
            assert up.finished_push
        finally:
            await client.aclose()
    finally:
        proxy.kill()


# ---------------------------------------------------------------------------
# the Origin rule
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "host"),
    [
        pytest.param(APP, None, id="allowed-origin"),
        pytest.param(None, None, id="no-origin"),
        pytest.param("http://{proxy_host}", None, id="same-origin"),
        pytest.param("http://proxy.test", "proxy.test", id="same-origin-by-name"),
    ],
)
@pytest.mark.parametrize("enforce", [False, True])
async def test_handshakes_that_pass_the_origin_rule_are_tunnelled(
    wsup, start, origin, host, enforce
):
    proxy = await start(wsup.url, cors={"allow_origins": [APP], "enforce": enforce})
    if origin is not None:
        origin = origin.format(proxy_host=proxy.host)
    response, client = await open_tunnel(proxy.port, "/echo", origin=origin, host=host)
    try:
        assert response.status == 101, response
        await client.send(frame("through", 0x1))
        echoed = await read_frame(client)
        assert echoed is not None and echoed.payload == b"through"
    finally:
        await client.aclose()
    seen = await wsup.wait_request("/echo")
    assert seen.values("Origin") == ([] if origin is None else [origin])


@pytest.mark.parametrize(
    ("origin", "host"),
    [
        pytest.param(EVIL, None, id="other-origin"),
        pytest.param("null", None, id="null-origin"),
        pytest.param("https://{proxy_host}", None, id="same-host-other-scheme"),
        pytest.param("http://proxy.test:8080", "proxy.test", id="same-host-other-port"),
    ],
)
@pytest.mark.parametrize("enforce", [False, True])
async def test_a_denied_origin_gets_403_and_the_upstream_never_sees_the_handshake(
    wsup, start, origin, host, enforce
):
    proxy = await start(wsup.url, cors={"allow_origins": [APP], "enforce": enforce})
    origin = origin.format(proxy_host=proxy.host)
    response, client = await open_tunnel(proxy.port, "/denied/echo", origin=origin, host=host)
    await client.aclose()
    assert response.status == 403, response
    assert response.values("Content-Type")[0].startswith("text/plain"), response
    body = response.body.decode("utf-8")
    assert origin in body and "check_websocket_origin" in body, body
    await assert_not_forwarded(proxy, wsup, "/denied/echo")
    record = await proxy.wait_record(lambda r: r.get("path") == "/denied/echo")
    assert record["status"] == 403


async def test_the_origin_rule_is_for_handshakes_only(wsup, start, session):
    # A plain GET from the same denied origin is forwarded as before (no enforce),
    # just without CORS headers.
    proxy = await start(wsup.url)
    async with session.get(proxy.url + "/plain", headers={"Origin": EVIL}) as resp:
        assert resp.status == 200
        assert await resp.text() == "plain\n"
        assert "Access-Control-Allow-Origin" not in resp.headers
    assert len(wsup.seen("/plain")) == 1


async def test_check_websocket_origin_false_on_a_route_forwards_any_origin(wsup, start):
    proxy = await start(
        wsup.url, cors={"allow_origins": [APP]},
        routes=[{"path": "/public", "cors": {"check_websocket_origin": False}}],
    )
    response, client = await open_tunnel(proxy.port, "/public/echo", origin=EVIL)
    try:
        assert response.status == 101, response
        await client.send(frame("open to all", 0x1))
        assert (await read_frame(client)).payload == b"open to all"
    finally:
        await client.aclose()
    # Elsewhere the rule still holds.
    response, client = await open_tunnel(proxy.port, "/private/echo", origin=EVIL)
    await client.aclose()
    assert response.status == 403, response
    await assert_not_forwarded(proxy, wsup, "/private/echo")


async def test_check_websocket_origin_false_at_the_top_forwards_any_origin(wsup, start):
    proxy = await start(wsup.url, cors={"allow_origins": [APP], "check_websocket_origin": False})
    response, client = await open_tunnel(proxy.port, "/echo", origin=EVIL)
    try:
        assert response.status == 101, response
        await client.send(frame("anyone", 0x1))
        assert (await read_frame(client)).payload == b"anyone"
    finally:
        await client.aclose()
    assert wsup.seen("/echo")[0].values("Origin") == [EVIL]


async def test_a_route_can_turn_the_check_back_on(wsup, start):
    proxy = await start(
        wsup.url, cors={"allow_origins": [APP], "check_websocket_origin": False},
        routes=[{"path": "/strict", "cors": {"check_websocket_origin": True}}],
    )
    response, client = await open_tunnel(proxy.port, "/strict/echo", origin=EVIL)
    await client.aclose()
    assert response.status == 403, response
    await assert_not_forwarded(proxy, wsup, "/strict/echo")


async def test_real_clients_see_the_refusal_as_a_failed_handshake(proxy, wsup, session):
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        async with asyncio.timeout(IO):
            await session.ws_connect(proxy.ws_url + "/echo", origin=EVIL)
    assert refused.value.status == 403
    with pytest.raises(websockets.InvalidStatus) as invalid:
        async with asyncio.timeout(IO):
            async with wsl_connect(proxy.ws_url + "/echo", origin=EVIL):
                pass
    assert invalid.value.response.status_code == 403
    await assert_not_forwarded(proxy, wsup, "/echo")


# ---------------------------------------------------------------------------
# handshakes: what goes upstream, what comes back
# ---------------------------------------------------------------------------


async def test_the_handshake_reaches_the_upstream_intact(proxy, wsup):
    async with wsl_connect(
        proxy.ws_url + "/echo", origin=APP, subprotocols=["chat.v2", "chat.v1"],
        additional_headers={"X-Forwarded-For": "10.9.8.7", "X-Custom": "kept"},
    ) as ws:
        assert ws.subprotocol == "chat.v2"
        assert ws.response.headers["X-Upstream-Ws"] == "yes"  # the upstream's 101 headers
        # permessage-deflate negotiated end to end (the proxy does not look inside).
        assert ws.response.headers["Sec-WebSocket-Extensions"].startswith("permessage-deflate")
        await ws.send("compressed " * 100)
        async with asyncio.timeout(IO):
            assert await ws.recv() == "compressed " * 100
        sent = ws.request.headers
    seen = wsup.seen("/echo")[0]
    assert seen.method == "GET" and seen.version == "1.1"
    assert tokens(seen.values("Upgrade")) == ["websocket"]
    assert "upgrade" in tokens(seen.values("Connection"))
    for name in ("Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Protocol",
                 "Sec-WebSocket-Extensions"):
        assert seen.values(name) == [sent[name]], name
    assert seen.values("Sec-WebSocket-Version") == ["13"]
    assert seen.values("Sec-WebSocket-Protocol") == ["chat.v2, chat.v1"]
    assert seen.values("Origin") == [APP]
    assert seen.values("X-Custom") == ["kept"]
    assert seen.values("X-Forwarded-For") == ["10.9.8.7, 127.0.0.1"]
    assert seen.values("X-Forwarded-Proto") == ["http"]
    assert seen.values("X-Forwarded-Host") == [proxy.host]


@pytest.mark.parametrize("connection", ["Upgrade", "upgrade", "keep-alive, Upgrade"])
async def test_connection_upgrade_is_recognised_in_any_spelling(proxy, wsup, connection):
    client = None
    try:
        key = new_key()
        client = await Client.open(proxy.port)
        await client.send(handshake("/echo", proxy.host, key=key, connection=connection))
        response = await client.response("GET", IO)
        assert response is not None and response.status == 101, response
        assert response.values("Sec-WebSocket-Accept") == [ws_accept(key)]
        assert tokens(response.values("Upgrade")) == ["websocket"]
        assert "upgrade" in tokens(response.values("Connection"))
        await client.send(frame("ok?", 0x1))
        assert (await read_frame(client)).payload == b"ok?"
    finally:
        if client is not None:
            await client.aclose()


async def test_a_non_101_answer_is_relayed_with_cors_headers(proxy, wsup):
    response, client = await open_tunnel(proxy.port, "/not-ws", origin=APP)
    await client.aclose()
    assert response.status == 404, response
    assert response.body == b"no socket here\n"
    assert response.cors == {"access-control-allow-origin": APP}  # not the upstream's "*"
    assert "origin" in response.vary
    assert response.values("X-Upstream") == ["yes"]
    assert len(wsup.seen("/not-ws")) == 1


@pytest.mark.parametrize("token", ["h2c", "foo/1.0"])
async def test_other_upgrade_tokens_are_not_tunnelled(proxy, wsup, token):
    async with await Client.open(proxy.port) as client:
        await client.send(request(
            "GET", "/h2c", "Connection: Upgrade, HTTP2-Settings", f"Upgrade: {token}",
            "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA", host=proxy.host.encode(),
        ))
        response = await client.response("GET", IO)
        assert response is not None and response.status == 200, response
        assert response.body == b"plain\n"
        # Still plain HTTP on that connection (or closed after the response, which
        # is fine too); never a tunnel.
        if await client.send_quietly(request("GET", "/after", host=proxy.host.encode())):
            second = await client.response("GET", IO)
            assert second is None or second.status == 200, second
    seen = wsup.seen("/h2c")[0]
    assert seen.values("Upgrade") == []
    assert "upgrade" not in tokens(seen.values("Connection"))


async def test_upgrade_websocket_without_connection_upgrade_is_a_plain_get(proxy, wsup):
    async with await Client.open(proxy.port) as client:
        await client.send(request(
            "GET", "/echo", "Upgrade: websocket", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version: 13", host=proxy.host.encode(),
        ))
        response = await client.response("GET", IO)
    assert response is not None and response.status == 200, response
    assert response.body == b"plain\n"
    assert wsup.seen("/echo")[0].values("Upgrade") == []


# ---------------------------------------------------------------------------
# FastAPI under uvicorn
# ---------------------------------------------------------------------------


@pytest.fixture
async def fastapi():
    record = FastApiRecord()
    async with uvicorn_server(fastapi_app(record)) as url:
        yield url, record


async def test_fastapi_echo_subprotocol_and_close_codes_both_ways(fastapi, start, session):
    url, record = fastapi
    proxy = await start(url)
    async with wsl_connect(proxy.ws_url + "/fa/echo", origin=APP,
                          subprotocols=["chat.v1"]) as ws:
        assert ws.subprotocol == "chat.v1"
        await ws.send("fast")
        await ws.send(b"\x01\x02")
        async with asyncio.timeout(IO):
            assert await ws.recv() == "fast"
            assert await ws.recv() == b"\x01\x02"
            await ws.close(code=4001, reason="client bye")
    async with asyncio.timeout(IO):
        await record.ended.wait()
    assert record.disconnects == [(4001, "client bye")]
    assert record.handshakes[0]["origin"] == APP
    assert record.handshakes[0]["x-forwarded-host"] == proxy.host

    async with aio_connect(session, proxy.ws_url + "/fa/close") as ws:
        msg = await receive(ws)
        assert (msg.type, msg.data) == (WSMsgType.TEXT, "closing")
        msg = await receive(ws)
        assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 4003, "fastapi done")
    await proxy.tunnel_record("/fa/close")


async def test_fastapi_16_mib_binary_echo(fastapi, start, session):
    url, _ = fastapi
    proxy = await start(url)
    data = os.urandom(16 * MiB)
    async with aio_connect(session, proxy.ws_url + "/fa/echo") as ws:
        await ws.send_bytes(data)
        msg = await receive(ws, 20)
    assert msg.type == WSMsgType.BINARY and msg.data == data


# ---------------------------------------------------------------------------
# the access line, idle tunnels, shutdown
# ---------------------------------------------------------------------------


async def test_one_access_line_per_tunnel_with_bytes_duration_and_who_closed(proxy, wsup):
    response, client = await open_tunnel(proxy.port, "/asym", origin=APP)
    try:
        assert response.status == 101, response
        await client.send(frame(b"u" * 10_000, 0x2))
        reply = await read_frame(client)
        assert reply is not None and len(reply.payload) == 30_000
        await asyncio.sleep(0.2)
        assert proxy.for_path("/asym") == [], "the line must come when the tunnel ends"
    finally:
        await client.aclose()  # the client's TCP connection ends first: closed_by client
    up = await wsup.wait_session("/asym")
    async with asyncio.timeout(IO):
        await up.ended.wait()
    record = await proxy.tunnel_record("/asym")
    await asyncio.sleep(0.05)
    assert len(proxy.for_path("/asym")) == 1, proxy.for_path("/asym")
    assert record["method"] == "GET"
    assert record["status"] == 101
    assert record["origin"] == APP
    assert record["us"] >= 200_000
    # Frame overhead (and the handshake, should it be counted) stay well under 2 KiB;
    # a swap of the two directions cannot pass.
    assert 10_000 <= record["up_bytes"] < 10_000 + 2048, record
    assert 30_000 <= record["down_bytes"] < 30_000 + 2048, record
    assert record["closed_by"] == "client"


async def test_the_text_access_line_names_the_tunnel_fields(wsup, start):
    proxy = await start(wsup.url, log_format="text")
    response, client = await open_tunnel(proxy.port, "/echo")
    try:
        assert response.status == 101, response
        await client.send(frame("x", 0x1))
        assert (await read_frame(client)).payload == b"x"
    finally:
        await client.aclose()
    async with asyncio.timeout(IO):
        while not [line for line in proxy.lines if " /echo 101 " in line]:
            await asyncio.sleep(0.01)
    (line,) = [line for line in proxy.lines if " /echo 101 " in line]
    assert " GET /echo 101 " in line
    for key in ("us=", "up_bytes=", "down_bytes=", "closed_by=client"):
        assert key in line, line


async def test_idle_timeout_closes_a_tunnel_silent_both_ways(wsup, start, session):
    proxy = await start(wsup.url, websocket={"idle_timeout": 0.5})
    async with aio_connect(session, proxy.ws_url + "/hold") as ws:
        opened = time.monotonic()
        msg = await receive(ws, 5)
        closed_after = time.monotonic() - opened
    assert msg.type in CLOSED_TYPES, msg
    assert 0.4 <= closed_after <= 2.0, closed_after
    up = await wsup.wait_session("/hold")
    async with asyncio.timeout(IO):
        await up.ended.wait()
    record = await proxy.tunnel_record("/hold")
    assert record["closed_by"] == "idle_timeout"
    assert record["us"] >= 400_000


@pytest.mark.parametrize("direction", ["client-to-upstream", "upstream-to-client"])
async def test_traffic_in_one_direction_keeps_a_tunnel_open(wsup, start, session, direction):
    proxy = await start(wsup.url, websocket={"idle_timeout": 0.4})
    path = "/hold" if direction == "client-to-upstream" else "/tick"
    async with aio_connect(session, proxy.ws_url + path + "?every=0.1") as ws:
        up = await wsup.wait_session(path)
        deadline = time.monotonic() + 1.2  # three idle timeouts
        ticks = 0
        while time.monotonic() < deadline:
            if direction == "client-to-upstream":
                await ws.send_str("still here")
                await asyncio.sleep(0.1)
            else:
                msg = await receive(ws, 1)
                assert (msg.type, msg.data) == (WSMsgType.TEXT, "tick"), msg
                ticks += 1
        assert not up.ended.is_set(), "the tunnel was closed although bytes kept flowing"
        if direction == "client-to-upstream":
            assert len(up.messages) >= 10
        else:
            assert ticks >= 8
    assert (await proxy.tunnel_record(path))["closed_by"] in ("client", "upstream")


async def test_sigterm_gives_open_tunnels_the_shutdown_grace_then_closes_them(
    tmp_path, wsup, session
):
    grace = 1.0
    proxy = proxy_process(tmp_path, wsup.url, listen={"shutdown_grace": grace})
    try:
        async with aio_connect(session, f"ws://127.0.0.1:{proxy.port}/echo") as ws:
            await ws.send_str("before")
            assert (await receive(ws)).data == "before"
            stopped = time.monotonic()
            proxy.signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            await ws.send_str("during the grace")
            assert (await receive(ws)).data == "during the grace"
            msg = await receive(ws, grace + 3)
            closed_after = time.monotonic() - stopped
        assert msg.type in CLOSED_TYPES, msg
        assert grace - 0.2 <= closed_after <= grace + 1.5, closed_after
        code = await proxy.wait_exit(max(0.1, grace + 1.5 - (time.monotonic() - stopped)))
        assert code == 0
        await proxy.log_complete()
        record = await proxy.wait_record(
            lambda r: r.get("path") == "/echo" and r.get("status") == 101, timeout=1
        )
        assert record["closed_by"] == "shutdown", proxy.log_text()
        up = await wsup.wait_session("/echo")
        async with asyncio.timeout(IO):
            await up.ended.wait()
    finally:
        proxy.kill()
