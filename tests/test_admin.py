"""The admin listener (``corsproxy.admin``) and the metrics (``corsproxy.metrics``),
against real ``python -m corsproxy run`` processes on loopback.

Known traffic goes through the proxy, then ``GET /metrics`` is parsed with
prometheus-client's own parser and every counter is compared exactly; /healthz,
/readyz (starting, ready, stopping during the grace, an unreachable upstream),
/denied, 404/405, the access log (no admin requests) and the upstream (never
touched by them); with ``listen.workers: 2`` the counters are the totals over both
workers. Processes are stopped by their PID; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import yaml
from conftest import (
    IO_TIMEOUT,
    client_session,
    config_text,
    free_port,
    raw_exchange,
    status_of,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from corsproxy import upstream as up
from corsproxy.admin import AdminServer
from corsproxy.config import ConfigError, parse_config
from corsproxy.metrics import upstream_cause
from corsproxy.server import ProxyServer

APP = "https://app.example.com"
EVIL = "https://evil.example"
ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 20.0
ADMIN_PATHS = {"/healthz", "/readyz", "/metrics", "/denied", "/nope"}


class Run:
    """``python -m corsproxy run --config FILE --log-format json``; its stderr as
    JSON records. The admin port comes from the ``listening`` events."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.records: list[dict] = []
        self.raw: list[str] = []
        self.reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, path: Path, env: dict[str, str] | None = None) -> Run:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "corsproxy", "run", "--config", str(path),
            "--log-format", "json",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, cwd=ROOT,
            env={k: v for k, v in (env or os.environ).items() if k != "CORSPROXY_CONFIG"},
        )
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            text = line.decode("utf-8", "replace").rstrip("\n")
            self.raw.append(text)
            self.records.append(json.loads(text))

    async def wait_for(self, predicate, count: int = 1, timeout: float = START_TIMEOUT
                       ) -> list[dict]:
        try:
            async with asyncio.timeout(timeout):
                while True:
                    found = [r for r in self.records if predicate(r)]
                    if len(found) >= count:
                        return found
                    if self.proc.returncode is not None and self.reader.done():
                        raise AssertionError("proxy exited:\n" + "\n".join(self.raw))
                    await asyncio.sleep(0.02)
        except TimeoutError:
            raise AssertionError("no such line; the log:\n" + "\n".join(self.raw)) from None

    async def listening(self, count: int = 1) -> tuple[int, int]:
        """(proxy port, admin port) once ``count`` processes listen."""
        events = await self.wait_for(lambda r: r.get("event") == "listening", count)
        return events[0]["port"], events[0]["admin_port"]

    def access(self) -> list[dict]:
        return [r for r in self.records if "event" not in r]

    async def finish(self, timeout: float = 20.0) -> int:
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
            await self.reader
        return code

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()  # by its PID (asyncio's Process.kill)
            await self.proc.wait()
        self.reader.cancel()


@pytest.fixture
async def run_proxy(tmp_path):
    started: list[Run] = []

    async def start(text: str, env: dict[str, str] | None = None) -> Run:
        path = tmp_path / f"admin-{len(started)}.yaml"
        path.write_text(text)
        proc = await Run.start(path, env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        await proc.kill()


def admin_config(upstream_url: str, *, admin: dict | None = None, listen: dict | None = None,
                 routes: list | None = None, cors: dict | None = None) -> str:
    return config_text(
        upstream_url, cors=cors or {"allow_origins": [APP]}, routes=routes, listen=listen,
        admin={"host": "127.0.0.1", "port": 0, **(admin or {})},
    )


async def fetch(port: int, path: str, method: str = "GET", headers: dict | None = None
                ) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection (so workers see spread connections)."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with client_session(connector=connector) as session:
        async with asyncio.timeout(IO_TIMEOUT):
            async with session.request(method, f"http://127.0.0.1:{port}{path}",
                                       headers=headers or {}) as resp:
                return resp.status, dict(resp.headers), await resp.read()


def families(text: str) -> dict[str, dict[tuple, float]]:
    """Metric family name -> {sorted label pairs plus the sample name: value}."""
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        values = out.setdefault(family.name, {})
        for sample in family.samples:
            values[(sample.name, *sorted(sample.labels.items()))] = sample.value
    return out


def counter(fams: dict, name: str) -> dict[tuple, float]:
    """A counter's ``_total`` samples by their label values (in label-name order)."""
    return {tuple(v for _, v in key[1:]): value
            for key, value in fams[name].items() if key[0] == f"{name}_total"}


async def scrape(admin_port: int) -> dict[str, dict[tuple, float]]:
    status, headers, body = await fetch(admin_port, "/metrics")
    assert status == 200
    assert headers["Content-Type"] == CONTENT_TYPE_LATEST
    return families(body.decode())


def requests_total(fams: dict) -> dict[tuple[str, str, str], float]:
    """corsproxy_requests_total as {(route, kind, verdict): value}, zeros left out."""
    out = {}
    for key, value in fams["corsproxy_requests"].items():
        labels = dict(key[1:])
        if value:
            out[(labels["route"], labels["kind"], labels["verdict"])] = value
    return out


# ---------------------------------------------------------------------------
# exact counters for known traffic
# ---------------------------------------------------------------------------


async def test_metrics_count_known_traffic_exactly(run_proxy, upstream):
    started = time.time()
    proc = await run_proxy(admin_config(
        upstream.url, routes=[{"path": "/strict", "cors": {"enforce": True}}],
    ))
    port, admin = await proc.listening()
    preflight = {"Origin": APP, "Access-Control-Request-Method": "GET"}
    # Allowed preflight twice: the second one comes from the preflight cache (fast()).
    assert (await fetch(port, "/a", "OPTIONS", preflight))[0] == 200
    assert (await fetch(port, "/a", "OPTIONS", preflight))[0] == 200
    denied_preflight = {"Origin": EVIL, "Access-Control-Request-Method": "GET"}
    assert (await fetch(port, "/a", "OPTIONS", denied_preflight))[0] == 400
    status, headers, _ = await fetch(port, "/a", headers={"Origin": APP})
    assert (status, headers.get("Access-Control-Allow-Origin")) == (200, APP)
    status, headers, _ = await fetch(port, "/a", headers={"Origin": EVIL})
    assert (status, headers.get("Access-Control-Allow-Origin")) == (200, None)
    assert (await fetch(port, "/strict/x", headers={"Origin": EVIL}))[0] == 403
    assert (await fetch(port, "/plain"))[0] == 200
    bad_target = await raw_exchange(port, b"GET /a/../b HTTP/1.1\r\nHost: p\r\n\r\n")
    assert status_of(bad_target) == 400
    bad_version = await raw_exchange(port, b"GET / HTTP/2.0\r\nHost: p\r\n\r\n")
    assert status_of(bad_version) == 505

    fams = await scrape(admin)
    assert requests_total(fams) == {
        ("", "preflight", "allowed"): 2,
        ("", "preflight", "denied"): 1,
        ("", "actual", "forwarded"): 1,
        ("", "actual", "denied"): 1,
        ("/strict", "actual", "rejected"): 1,
        ("", "not_cors", "forwarded"): 1,
        ("", "not_cors", "rejected"): 2,  # the bad target and the bad version
    }
    durations = {
        (dict(key[1:])["route"], dict(key[1:])["kind"]): value
        for key, value in fams["corsproxy_request_duration_seconds"].items()
        if key[0] == "corsproxy_request_duration_seconds_count"
    }
    # Every request but the one refused before its head was parsed (505).
    assert durations == {("", "preflight"): 3, ("", "actual"): 2, ("/strict", "actual"): 1,
                         ("", "not_cors"): 2}
    assert counter(fams, "corsproxy_denied_origins") == {
        ("origin", ""): 2, ("origin", "/strict"): 1,
    }
    assert counter(fams, "corsproxy_upstream_errors") == {
        (cause,): 0 for cause in ("refused", "connect_timeout", "timeout", "reset", "protocol")
    }
    assert counter(fams, "corsproxy_config_reloads") == {("success",): 0, ("failure",): 0}
    (loaded,) = fams["corsproxy_config_last_reload_success_timestamp_seconds"].values()
    assert started - 1 <= loaded <= time.time()
    # The three forwarded requests went one after the other over one pooled connection.
    assert fams["corsproxy_upstream_connections"] == {
        ("corsproxy_upstream_connections", ("state", "idle")): 1,
        ("corsproxy_upstream_connections", ("state", "active")): 0,
    }
    assert fams["corsproxy_inflight_requests"] == {("corsproxy_inflight_requests",): 0}

    status, headers, body = await fetch(admin, "/denied")
    assert (status, headers["Content-Type"]) == (200, "application/json")
    denied = json.loads(body)
    assert denied["kept"] == 100
    assert [(e["origin"], e["route"], e["reason"], e["count"]) for e in denied["denied"]] == [
        (EVIL, "/strict", "origin", 1),  # most recent first
        (EVIL, None, "origin", 2),
    ]
    assert all(e["first_seen"] <= e["last_seen"] for e in denied["denied"])

    assert (await fetch(admin, "/healthz"))[::2] == (200, b"ok\n")
    assert (await fetch(admin, "/readyz"))[::2] == (200, b"ready\n")
    status, _, body = await fetch(admin, "/nope")
    assert status == 404 and b"/healthz, /readyz, /metrics and /denied" in body
    status, headers, body = await fetch(admin, "/metrics", "POST")
    assert (status, headers["Allow"]) == (405, "GET")
    status, headers, body = await fetch(admin, "/healthz", "HEAD")
    assert (status, body) == (405, b"")

    # Admin requests are in neither the metrics nor the access log, and never upstream.
    assert requests_total(await scrape(admin)) == requests_total(fams)
    proc.proc.send_signal(signal.SIGTERM)
    assert await proc.finish() == 0
    access = proc.access()
    assert len(access) == 9  # every request above (the 505 with path "-")
    assert not {r["path"] for r in access} & ADMIN_PATHS
    assert [(r.method, r.raw_path) for r in upstream.requests] == [
        ("GET", "/a"), ("GET", "/a"), ("GET", "/plain"),
    ]


async def test_an_unreachable_upstream_counts_errors_and_fails_readiness_when_asked(
    run_proxy,
):
    dead = free_port()  # nothing listens there (yet)
    proc = await run_proxy(admin_config(
        f"http://127.0.0.1:{dead}", admin={"ready_checks_upstream": True},
    ))
    port, admin = await proc.listening()
    status, _, body = await fetch(admin, "/readyz")
    assert status == 503
    assert body == (f"not ready: cannot connect to the upstream 127.0.0.1:{dead}: "
                    f"connection refused\n").encode()
    assert (await fetch(admin, "/healthz"))[0] == 200  # alive all the same
    assert (await fetch(port, "/x", headers={"Origin": APP}))[0] == 502
    assert (await fetch(port, "/y"))[0] == 502
    fams = await scrape(admin)
    assert counter(fams, "corsproxy_upstream_errors") == {
        ("refused",): 2, ("connect_timeout",): 0, ("timeout",): 0, ("reset",): 0,
        ("protocol",): 0,
    }
    assert requests_total(fams) == {
        ("", "actual", "forwarded"): 1, ("", "not_cors", "forwarded"): 1,
    }
    # The upstream comes up: ready again once the cached check (1 s) is stale.
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", dead)
    try:
        async with asyncio.timeout(5):
            while (await fetch(admin, "/readyz"))[0] != 200:
                await asyncio.sleep(0.2)
    finally:
        server.close()
        await server.wait_closed()
    proc.proc.send_signal(signal.SIGTERM)
    assert await proc.finish() == 0


async def test_readyz_is_503_while_stopping_and_healthz_stays_200(run_proxy, upstream):
    upstream.reply("/slow", delay=1.5, body=b"slow done")
    proc = await run_proxy(admin_config(upstream.url, listen={"shutdown_grace": 10}))
    port, admin = await proc.listening()
    assert (await fetch(admin, "/readyz"))[0] == 200
    slow = asyncio.create_task(fetch(port, "/slow", headers={"Origin": APP}))
    await upstream.wait(1)  # in flight at the upstream
    proc.proc.send_signal(signal.SIGTERM)
    await proc.wait_for(lambda r: r.get("event") == "stopping", timeout=5)
    status, _, body = await fetch(admin, "/readyz")
    assert (status, body) == (
        503, b"not ready: stopping (in-flight requests are finishing; send no new ones)\n"
    )
    assert (await fetch(admin, "/healthz"))[::2] == (200, b"ok\n")
    fams = await scrape(admin)
    assert fams["corsproxy_inflight_requests"] == {("corsproxy_inflight_requests",): 1}
    assert fams["corsproxy_upstream_connections"][
        ("corsproxy_upstream_connections", ("state", "active"))] == 1
    status, _, body = await slow  # the in-flight request still finishes
    assert (status, body) == (200, b"slow done")
    assert await proc.finish() == 0
    assert not {r["path"] for r in proc.access()} & ADMIN_PATHS


async def test_readyz_is_503_until_the_proxy_listens_and_from_the_start_of_stop(upstream):
    config = parse_config(admin_config(upstream.url), "admin.yaml")
    server = ProxyServer(config)
    admin = AdminServer(server)
    _, admin_port = await admin.start()
    try:
        status, _, body = await fetch(admin_port, "/readyz")
        assert (status, body) == (503, b"not ready: starting\n")
        await server.start()
        assert (await fetch(admin_port, "/readyz"))[::2] == (200, b"ready\n")
        await server.stop(0)
        assert (await fetch(admin_port, "/readyz"))[0] == 503
    finally:
        await admin.stop()


# ---------------------------------------------------------------------------
# several workers: the totals
# ---------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork") or not hasattr(socket, "SO_REUSEPORT"),
                    reason="workers need fork and SO_REUSEPORT")
async def test_two_workers_report_the_totals_over_both(run_proxy, upstream, tmp_path):
    scratch = tmp_path / "tmp"  # where the parent makes its metrics directory
    scratch.mkdir()
    proc = await run_proxy(admin_config(upstream.url, listen={"workers": 2}),
                           env={**os.environ, "TMPDIR": str(scratch)})
    port, admin = await proc.listening(count=2)
    events = [r for r in proc.records if r.get("event") == "listening"]
    assert {r["admin_port"] for r in events} == {admin} and admin != 0
    assert len(list(scratch.iterdir())) == 1
    for _ in range(40):  # separate connections: the kernel spreads them over both
        assert (await fetch(port, "/spread", headers={"Origin": APP}))[0] == 200
    for _ in range(6):
        assert (await fetch(port, "/spread", headers={"Origin": EVIL}))[0] == 200
    served = await proc.wait_for(lambda r: r.get("path") == "/spread", count=46)
    assert len({r["pid"] for r in served}) == 2  # both took some (all but 2**-45 sure)
    for _ in range(6):  # any worker answers, each with the totals
        fams = await scrape(admin)
        assert requests_total(fams) == {
            ("", "actual", "forwarded"): 40, ("", "actual", "denied"): 6,
        }
        assert counter(fams, "corsproxy_denied_origins") == {("origin", ""): 6}
    # /denied too: another worker's list is at most 1 s old.
    async with asyncio.timeout(5):
        while True:
            _, _, body = await fetch(admin, "/denied")
            entries = json.loads(body)["denied"]
            if [(e["origin"], e["count"]) for e in entries] == [(EVIL, 6)]:
                break
            await asyncio.sleep(0.2)
    proc.proc.send_signal(signal.SIGTERM)
    assert await proc.finish() == 0
    assert list(scratch.iterdir()) == []  # the metrics directory is gone
    assert not {r["path"] for r in proc.access()} & ADMIN_PATHS
    assert len(upstream.requests) == 46


# ---------------------------------------------------------------------------
# start-up problems, config, the upstream error causes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_busy_admin_port_is_one_error_line_and_exit_1(run_proxy, upstream, workers):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        proc = await run_proxy(admin_config(upstream.url, admin={"port": taken},
                                            listen={"workers": workers}))
        assert await proc.finish() == 1
    (record,) = proc.records
    assert record["event"] == "error"
    assert record["message"] == (
        f"cannot listen on 127.0.0.1:{taken} for the admin endpoints: address already in use; "
        "pick another admin.port (or admin.port: null to turn the admin listener off)"
    )


def test_admin_config_defaults_and_errors():
    config = parse_config("upstream: {url: 'http://127.0.0.1:8000'}\n", "a.yaml")
    assert (config.admin.host, config.admin.port, config.admin.ready_checks_upstream) == (
        "127.0.0.1", 9901, False)
    off = parse_config("admin: {port: null}\n", "a.yaml")
    assert off.admin.port is None
    with pytest.raises(ConfigError) as caught:
        parse_config(yaml.safe_dump({"listen": {"port": 9000}, "admin": {"port": 9000}}),
                     "a.yaml")
    assert caught.value.errors == [
        "a.yaml: admin.port: 9000 is listen.port too; the admin endpoints need a port of "
        "their own: change one of the two, or set admin.port: null to turn the admin "
        "listener off"
    ]
    with pytest.raises(ConfigError) as caught:
        parse_config("admin: {host: 'http://x', port: 70000, ready_checks_upstream: 'yes'}\n",
                     "a.yaml")
    assert [e.split(": ")[1] for e in caught.value.errors] == [
        "admin.host", "admin.port", "admin.ready_checks_upstream",
    ]


@pytest.mark.parametrize(
    ("exc", "cause"),
    [
        (up.ConnectError("x", ConnectionRefusedError()), "refused"),
        (up.ConnectTimeout("x"), "connect_timeout"),
        (up.PoolTimeout("x"), "connect_timeout"),
        (up.ResponseTimeout("x"), "timeout"),
        (up.SendTimeout("x"), "timeout"),
        (up.BodyError("no body bytes from the upstream for 1 s (upstream.read_timeout)"),
         "timeout"),
        (up.Disconnected("x"), "reset"),
        (up.ConnectionFailed("x", None), "reset"),
        (up.BodyError("the connection broke: connection reset by peer"), "reset"),
        (up.InvalidResponse("x"), "protocol"),
        (up.UpgradeResponse("x"), "protocol"),
        (up.BodyError("invalid response body: bad chunk"), "protocol"),
    ],
)
def test_upstream_error_causes(exc, cause):
    assert upstream_cause(exc) == cause
