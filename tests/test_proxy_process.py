"""The proxy as a process: ``python -m corsproxy run`` in a subprocess.

Graceful shutdown on SIGTERM/SIGINT, the log on stderr (one line per request, no
tracebacks), and flat memory while large bodies stream through.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import aiohttp
import pytest
from conftest import client_session, config_text, raw_exchange, status_of

APP = "https://app.example.com"
START_TIMEOUT = 20.0
ROOT = Path(__file__).resolve().parent.parent


class ProxyProcess:
    """``python -m corsproxy run --config FILE --log-format json`` on a free port."""

    def __init__(self, config_file: Path) -> None:
        self.config_file = config_file
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self.port = 0
        self._reader: asyncio.Task | None = None
        self._listening = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> ProxyProcess:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "corsproxy", "run", "--config", str(self.config_file),
            "--log-format", "json",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=ROOT,
        )
        self._reader = asyncio.create_task(self._read_stderr())
        try:
            async with asyncio.timeout(START_TIMEOUT):
                await self._listening.wait()
        except TimeoutError:
            await self.kill()
            raise AssertionError("proxy did not start:\n" + "\n".join(self.lines)) from None
        return self

    async def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            if not self._listening.is_set():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("event") == "listening":
                    self.port = event["port"]
                    self._listening.set()

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.lines]

    async def wait_for_line(self, predicate, timeout: float = 10.0) -> dict:
        async with asyncio.timeout(timeout):
            while True:
                for record in self.records():
                    if predicate(record):
                        return record
                await asyncio.sleep(0.02)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
            if self._reader is not None:
                await self._reader
        return code

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            self._reader.cancel()

    def vm_hwm_kib(self) -> int:
        """Peak resident memory of the proxy process so far (Linux)."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM in /proc")


@pytest.fixture
async def run_proxy(upstream, tmp_path):
    started: list[ProxyProcess] = []

    async def run(**kwargs) -> ProxyProcess:
        path = tmp_path / f"config{len(started)}.yaml"
        path.write_text(config_text(
            kwargs.pop("upstream_url", upstream.url),
            cors=kwargs.pop("cors", {"allow_origins": [APP]}),
            listen=kwargs.pop("listen", None),
            upstream=kwargs.pop("upstream", None),
        ))
        proxy = ProxyProcess(path)
        started.append(proxy)
        return await proxy.start()

    yield run
    for proxy in started:
        await proxy.kill()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_lets_the_in_flight_request_finish_and_exits_0(upstream, run_proxy, sig):
    upstream.reply("/slow", delay=1.5, body=b"worth the wait\n")
    proxy = await run_proxy(listen={"shutdown_grace": 10})
    async with client_session() as session:
        in_flight = asyncio.create_task(session.get(proxy.url + "/slow", headers={"Origin": APP}))
        await upstream.wait()
        proxy.signal(sig)
        await proxy.wait_for_line(lambda r: r.get("event") == "stopping")
        # No new connections once stopping ...
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", proxy.port)
        # ... but the request already in flight completes normally.
        async with await in_flight as resp:
            assert resp.status == 200
            assert await resp.read() == b"worth the wait\n"
            assert resp.headers["Access-Control-Allow-Origin"] == APP
    assert await proxy.wait() == 0
    assert proxy.records()[-1]["event"] == "stopped"


async def test_requests_still_running_after_the_grace_period_are_cut_and_exit_is_0(
    upstream, run_proxy
):
    upstream.reply("/forever", delay=30)
    proxy = await run_proxy(listen={"shutdown_grace": 0.3})
    async with client_session() as session:
        in_flight = asyncio.create_task(session.get(proxy.url + "/forever"))
        await upstream.wait()
        proxy.signal(signal.SIGTERM)
        assert await proxy.wait() == 0
        with pytest.raises(aiohttp.ClientError):
            async with await in_flight as resp:
                await resp.read()
    (cut,) = [r for r in proxy.records() if r.get("path") == "/forever"]
    assert cut["status"] is None
    assert cut["error"] == "cut off: still running when listen.shutdown_grace ended"


async def test_stderr_has_one_json_line_per_request_and_no_tracebacks(upstream, run_proxy):
    upstream.reply("/items", headers=[("Content-Type", "application/json")], body=b"[]")
    proxy = await run_proxy(cors={"allow_origins": [APP], "allow_methods": ["GET", "PUT"]})
    preflight = (
        b"OPTIONS /items HTTP/1.1\r\nHost: h\r\nOrigin: https://evil.example\r\n"
        b"Access-Control-Request-Method: PUT\r\nConnection: close\r\n\r\n"
    )
    get = (b"GET /items?secret=1 HTTP/1.1\r\nHost: h\r\nOrigin: " + APP.encode()
           + b"\r\nConnection: close\r\n\r\n")
    assert status_of(await raw_exchange(proxy.port, preflight)) == 400
    assert status_of(await raw_exchange(proxy.port, get)) == 200
    assert status_of(await raw_exchange(proxy.port, b"BAD\x00REQUEST\r\n\r\n")) == 400
    proxy.signal(signal.SIGTERM)
    assert await proxy.wait() == 0

    assert not any("Traceback" in line for line in proxy.lines), proxy.lines
    records = proxy.records()  # every line is one JSON object
    access = [r for r in records if "method" in r]
    assert [(r["method"], r["path"], r["status"]) for r in access] == [
        ("OPTIONS", "/items", 400),
        ("GET", "/items", 200),  # the query is not logged
        ("-", "-", 400),  # refused by the parser: no method or path to show
    ]
    denied, allowed, refused = access
    assert refused["error"].startswith("malformed request: ") and "method" in refused["error"]
    assert denied["origin"] == "https://evil.example"
    assert denied["cors"] == "denied"
    assert "is not allowed by allow_origins" in denied["reason"]
    assert denied["upstream_us"] is None
    assert allowed["cors"] == "allowed" and allowed["origin"] == APP
    assert isinstance(allowed["upstream_us"], int)
    listening = records[0]
    assert listening["event"] == "listening" and listening["loop"] == "uvloop"


async def test_an_unusable_port_is_reported_in_one_line_with_exit_1(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        config = tmp_path / "c.yaml"
        config.write_text(config_text("http://127.0.0.1:9", listen={"port": port}))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "corsproxy", "run", "--config", str(config),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
        )
        async with asyncio.timeout(START_TIMEOUT):
            _, err = await proc.communicate()
    assert proc.returncode == 1
    text = err.decode()
    assert f"cannot listen on 127.0.0.1:{port}: address already in use" in text
    assert "Traceback" not in text


MIB = 1024 * 1024
STREAM = 256 * MIB


def _chunks(total: int, size: int = 256 * 1024):
    block = os.urandom(size)
    for _ in range(total // size):
        yield block


async def test_memory_stays_flat_while_large_bodies_stream_both_ways(upstream, run_proxy):
    upstream.reply("/down", headers=[("Content-Type", "application/octet-stream")],
                   chunks=lambda: _chunks(STREAM))
    upstream.reply("/up", keep_body=False)
    proxy = await run_proxy()
    async with client_session() as session:
        # Warm up: every code path loaded and the pool open before measuring.
        async with session.get(proxy.url + "/warm") as resp:
            await resp.read()
        async with session.post(proxy.url + "/warm", data=b"x" * MIB) as resp:
            await resp.read()
        before = proxy.vm_hwm_kib()
        size = 0
        async with session.get(proxy.url + "/down") as resp:
            async for chunk in resp.content.iter_any():
                size += len(chunk)
        assert size == STREAM

        async def body():
            for chunk in _chunks(STREAM):
                yield chunk

        async with session.post(proxy.url + "/up", data=body()) as resp:
            assert resp.status == 200
    assert upstream.requests[-1].body_size == STREAM
    grown_mib = (proxy.vm_hwm_kib() - before) / 1024
    print(f"peak RSS before {before / 1024:.1f} MiB, grew by {grown_mib:.1f} MiB")
    assert grown_mib < 32, f"peak RSS grew by {grown_mib:.1f} MiB for 2 x 256 MiB"
