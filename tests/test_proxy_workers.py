"""``corsproxy run --workers N``: N processes on one port (SO_REUSEPORT), one
graceful stop on SIGTERM, crashed workers reported and replaced."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import aiohttp
import pytest
from conftest import client_session, config_text, cors_of

from corsproxy.workers import resolve_workers

APP = "https://app.example.com"
ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 20.0

pytestmark = pytest.mark.skipif(
    not hasattr(os, "fork") or not hasattr(__import__("socket"), "SO_REUSEPORT"),
    reason="workers need fork and SO_REUSEPORT",
)


class Workers:
    """``python -m corsproxy run --workers N --log-format json`` and its stderr lines."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.records: list[dict] = []
        self.raw: list[str] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            text = line.decode("utf-8", "replace").rstrip("\n")
            self.raw.append(text)
            self.records.append(json.loads(text))

    async def wait_for(self, predicate, count: int = 1, timeout: float = START_TIMEOUT
                       ) -> list[dict]:
        async with asyncio.timeout(timeout):
            while True:
                found = [r for r in self.records if predicate(r)]
                if len(found) >= count:
                    return found
                if self.proc.returncode is not None and self.reader.done():
                    raise AssertionError("proxy exited:\n" + "\n".join(self.raw))
                await asyncio.sleep(0.02)

    async def finish(self, timeout: float = 20.0) -> int:
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
            await self.reader
        return code

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self.reader.cancel()


@pytest.fixture
async def start_workers(upstream, tmp_path):
    started: list[Workers] = []

    async def start(count: str, *extra: str) -> Workers:
        path = tmp_path / "workers.yaml"
        path.write_text(config_text(upstream.url, cors={"allow_origins": [APP]}))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "corsproxy", "run", "--config", str(path),
            "--log-format", "json", "--workers", count, *extra,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, cwd=ROOT,
        )
        workers = Workers(proc)
        started.append(workers)
        return workers

    yield start
    for workers in started:
        await workers.kill()


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, str]]:
    async with asyncio.timeout(10):
        async with session.get(url, headers={"Origin": APP}) as resp:
            await resp.read()
            pairs = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in resp.raw_headers]
            return resp.status, cors_of(pairs)


async def test_two_workers_share_the_port_and_stop_together_on_sigterm(start_workers, upstream):
    proxy = await start_workers("2")
    (supervisor,) = await proxy.wait_for(lambda r: r.get("event") == "workers")
    assert supervisor["workers"] == 2 and supervisor["pid"] == proxy.proc.pid
    listening = await proxy.wait_for(lambda r: r.get("event") == "listening", count=2)
    pids = {r["pid"] for r in listening}
    assert len(pids) == 2 and proxy.proc.pid not in pids
    port = supervisor["port"]
    assert {r["port"] for r in listening} == {port}
    # New connections are spread over the workers by the kernel: 64 fresh ones
    # all landing on one of two workers has probability 2**-63.
    for _ in range(64):
        async with client_session(connector=aiohttp.TCPConnector(force_close=True)) as session:
            status, cors = await get(session, f"http://127.0.0.1:{port}/spread")
        assert status == 200
        assert cors == {"access-control-allow-origin": APP}
    served = await proxy.wait_for(lambda r: r.get("path") == "/spread", count=64)
    assert {r["pid"] for r in served} == pids
    assert all(r["status"] == 200 and r["cors"] == "allowed" for r in served)
    proxy.proc.send_signal(signal.SIGTERM)
    assert await proxy.finish() == 0
    events = [r.get("event") for r in proxy.records]
    assert events.count("stopped") == 3  # two workers and the supervisor
    assert not any("Traceback" in line for line in proxy.raw)


async def test_a_crashed_worker_is_reported_and_replaced(start_workers):
    proxy = await start_workers("2")
    listening = await proxy.wait_for(lambda r: r.get("event") == "listening", count=2)
    victim = listening[0]["pid"]
    os.kill(victim, signal.SIGKILL)
    (exit_line,) = await proxy.wait_for(lambda r: r.get("event") == "worker-exit")
    assert exit_line["pid"] == victim
    assert exit_line["message"] == f"worker {victim} was killed by SIGKILL; starting a new one"
    again = await proxy.wait_for(lambda r: r.get("event") == "listening", count=3)
    assert again[2]["pid"] not in {r["pid"] for r in listening}
    proxy.proc.send_signal(signal.SIGINT)
    assert await proxy.finish() == 0


async def test_workers_that_keep_dying_make_the_supervisor_exit_1(start_workers):
    proxy = await start_workers("2")
    await proxy.wait_for(lambda r: r.get("event") == "listening", count=2)
    killed: set[int] = set()
    ended = ("worker-exit", "error")
    for _ in range(8):  # bounded: the supervisor gives up after the 6th death
        if any(r.get("event") == "error" for r in proxy.records):
            break
        alive = [r["pid"] for r in proxy.records
                 if r.get("event") == "listening" and r["pid"] not in killed]
        os.kill(alive[-1], signal.SIGKILL)
        killed.add(alive[-1])
        await proxy.wait_for(lambda r: r.get("event") in ended, count=len(killed))
        if not any(r.get("event") == "error" for r in proxy.records):
            await proxy.wait_for(lambda r: r.get("event") == "listening", count=2 + len(killed))
    assert await proxy.finish() == 1
    (error,) = [r for r in proxy.records if r.get("event") == "error"]
    assert error["message"].endswith(
        "more than 5 workers ended within 60 s, giving up: stopping the others"
    )
    assert len(killed) == 6


async def test_a_busy_port_is_one_error_line_and_exit_1(start_workers, upstream):
    port = upstream.port  # something already listens there (without SO_REUSEPORT)
    proxy = await start_workers("2", "--port", str(port))
    assert await proxy.finish() == 1
    (record,) = proxy.records
    assert record["event"] == "error"
    assert record["message"].startswith(
        f"cannot listen on 127.0.0.1:{port}: address already in use"
    )


def test_auto_is_one_worker_per_usable_core():
    assert resolve_workers(0) == len(os.sched_getaffinity(0))
    assert resolve_workers(3) == 3


@pytest.mark.parametrize(
    ("value", "message"),
    [("many", "'many' is not a number of processes; write e.g. 2, or auto (one per usable CPU)"),
     ("-1", "-1 processes: use 1 to 512, or auto (one per usable CPU)")],
)
def test_bad_workers_options_are_usage_errors(value, message, capsys, tmp_path):
    from corsproxy.cli import main

    assert main(["run", "--config", str(tmp_path / "none.yaml"), "--workers", value]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("workers", "note"),
    [("1", ", 1 worker (listen.workers: 1)"), ("3", ", 3 workers (listen.workers: 3)")],
)
def test_check_shows_how_many_workers_and_why(workers, note, tmp_path, capsys):
    from corsproxy.cli import main

    path = tmp_path / "w.yaml"
    path.write_text(f"listen: {{workers: {workers}}}\ncors: {{allow_origins: [{APP}]}}\n")
    assert main(["check", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    line = f"listen:   127.0.0.1:8080  (max_body_size: no limit, shutdown_grace: 10 s{note})\n"
    assert line in out


def test_check_shows_what_auto_comes_to(tmp_path, capsys):
    from corsproxy.cli import main
    from corsproxy.cpus import usable_cpus

    path = tmp_path / "w.yaml"
    path.write_text(f"cors: {{allow_origins: [{APP}]}}\n")  # auto is the default
    assert main(["check", "--config", str(path)]) == 0
    limit = usable_cpus()
    count = f"{limit.count} worker{'s' if limit.count != 1 else ''}"
    assert (f"shutdown_grace: 10 s, {count} (listen.workers: auto = {limit.count}: "
            f"{limit.why}))\n") in capsys.readouterr().out


async def test_workers_stop_when_their_parent_is_killed(start_workers):
    # SIGKILL to the parent (the OOM killer, `docker kill`): no orphan keeps the port.
    proxy = await start_workers("2")
    listening = await proxy.wait_for(lambda r: r.get("event") == "listening", count=2)
    pids = [r["pid"] for r in listening]
    proxy.proc.kill()
    await proxy.proc.wait()
    stopped = await proxy.wait_for(lambda r: r.get("event") == "stopped", count=2, timeout=15)
    assert len(stopped) == 2
    async with asyncio.timeout(15):
        while any(alive(pid) for pid in pids):
            await asyncio.sleep(0.05)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for init to reap it does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False
