"""Reloading the policy without a restart (``corsproxy.reload``), black-box.

Every test runs the real ``python -m corsproxy run --config FILE --log-format json``
in a subprocess (:class:`hostile.ProxyProcess`, stopped by its PID), changes its
config on disk and proves the reload with a request whose verdict flips: a
preflight from ``https://b.example`` goes 400 (no CORS headers) -> 200 (exactly
the four CORS headers of an allowed preflight), or back.

How a change reaches the proxy is controlled exactly:

- :func:`write_unseen` rewrites the file in place with the same size and puts the
  old modification time back, so the poller (device, inode, size, mtime) cannot
  see it and only a SIGHUP can load it; that is how the SIGHUP tests prove the
  signal did the work (the ``reloaded`` line also says why it reloaded);
- :func:`write_in_place` (truncate and write, same inode) and :func:`write_replace`
  (a temp file renamed over the config, as editors save) are seen by the poller
  within one :data:`corsproxy.reload.POLL_INTERVAL`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import config_text, free_port
from hostile import (
    Client,
    ProxyProcess,
    Response,
    Trap,
    exchange,
    new_id,
    request,
    wait_for,
    wait_recorded,
)

from corsproxy.cli import main as cli_main
from corsproxy.reload import POLL_INTERVAL

A = "https://a.example"
B = "https://b.example"
C = "https://c.example"  # as long as B: [A, B] and [A, C] files have the same size
EVIL = "https://evil.example"
#: How long a change may take to be seen without a signal: one poll interval,
#: plus one more for a write that lands just after a look, plus slack (asserted
#: by the polling test).
PICKUP = 2 * POLL_INTERVAL + 0.5
#: The bound on waiting for a pick-up elsewhere: generous, for a busy machine.
PATIENCE = 5.0
#: Bound on waiting for one log line that should come at once.
LINE = 5.0
BODY = b"hello from upstream\n"


# ---------------------------------------------------------------------------
# the proxy process and its log
# ---------------------------------------------------------------------------


class Proc(ProxyProcess):
    """:class:`hostile.ProxyProcess` with the log parsed once per line (a load test
    writes thousands of access lines): events by name, access lines by path."""

    def __init__(self, config_file: Path) -> None:
        super().__init__(config_file)
        self._parsed = 0
        self._events: list[dict] = []
        self._access: list[dict] = []
        self._other: list[str] = []

    def _scan(self) -> None:
        lines = self.lines
        end = len(lines)
        for line in lines[self._parsed:end]:
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict):
                self._other.append(line)
            elif "event" in record:
                self._events.append(record)
            else:
                self._access.append(record)
        self._parsed = end

    def events(self, name: str | None = None) -> list[dict]:
        self._scan()
        return [e for e in self._events if name is None or e["event"] == name]

    def access(self, path: str) -> list[dict]:
        self._scan()
        return [r for r in self._access if r.get("path") == path]

    async def wait_events(self, name: str, count: int = 1, timeout: float = LINE,
                          where: Callable[[dict], bool] = lambda r: True) -> list[dict]:
        """The ``name`` events (once at least ``count`` of them are logged)."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    found = [e for e in self.events(name) if where(e)]
                    if len(found) >= count:
                        return found
                    assert self.proc is not None
                    if self.proc.poll() is not None:
                        raise AssertionError(f"the proxy exited:\n{self.log_text()[-4000:]}")
                    await asyncio.sleep(0.01)
        except TimeoutError:
            raise AssertionError(
                f"not {count} {name!r} line(s) within {timeout} s; {self.dump()}"
            ) from None

    def children(self) -> list[int]:
        """The PIDs of the process's children (the workers), from /proc."""
        found: list[int] = []
        for task in Path(f"/proc/{self.pid}/task").glob("*"):
            with contextlib.suppress(OSError, ValueError):
                found += [int(pid) for pid in (task / "children").read_text().split()]
        return found

    def stop(self) -> None:
        """SIGTERM (a parent passes it on to its workers and waits for them); what
        still runs after a few seconds gets SIGKILL by PID, its children first, so
        no worker outlives the test holding the stderr pipe."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(8)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGSTOP)  # forks no replacement meanwhile
                for child in self.children():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child, signal.SIGKILL)
        self.kill()

    async def wait_watching(self, pids: set[int] | None = None) -> None:
        """Until each process (default: this one) catches SIGHUP (/proc SigCgt).
        ``serve`` sets that handler right after the Reloader took its first look at
        the files, so a change made from then on is one it must see; a change made
        while the process starts, before that look, is not what these tests are
        about. (``serve`` now does this before the listening line, so this is a
        guard that costs one read; a worker starts with SIGHUP ignored.)"""
        bit = 1 << (signal.SIGHUP - 1)

        def catching(pid: int) -> bool:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) & bit)
            return False

        for pid in pids or {self.pid}:
            await wait_for(lambda pid=pid: catching(pid), LINE, f"{pid} handles SIGHUP")

    def dump(self) -> str:
        """The events so far, one JSON line each (for assertion messages)."""
        return "the proxy's events:\n" + "\n".join(json.dumps(e) for e in self.events())

    async def wait_one(self, name: str, timeout: float = LINE) -> dict:
        """The one ``name`` event (AssertionError when there are more)."""
        found = await self.wait_events(name, timeout=timeout)
        assert len(found) == 1, f"{len(found)} {name!r} lines; {self.dump()}"
        return found[0]

    def count(self, name: str) -> int:
        return len(self.events(name))

    def assert_clean(self) -> None:
        """Every line is JSON (no traceback, no asyncio 'Exception in callback')
        and no line is an error."""
        self._scan()
        assert self._other == [], "lines that are not JSON:\n" + "\n".join(self._other)
        errors = [e for e in self._events if e["event"] == "error" or e.get("level") == "error"]
        assert errors == []


@pytest.fixture
def proxies():
    """``await proxies(config_file)``: a started :class:`Proc` whose reloader runs
    (``workers=True``: the caller waits for the workers); stopped by PID after."""
    started: list[Proc] = []

    async def start(config_file: Path, workers: bool = False) -> Proc:
        proc = Proc(config_file)
        started.append(proc)
        await asyncio.to_thread(proc.start)
        if not workers:
            await proc.wait_watching()
        return proc

    yield start
    for proc in started:
        proc.stop()


# ---------------------------------------------------------------------------
# the config on disk
# ---------------------------------------------------------------------------


def policy(upstream_url: str, origins: list[str], *, cors: dict | None = None,
           listen: dict | None = None, upstream: dict | None = None) -> str:
    """A config allowing ``origins``; the admin listener off."""
    return config_text(upstream_url, cors={"allow_origins": origins, **(cors or {})},
                       listen=listen, upstream=upstream, admin={"port": None})


def stamp(path: Path) -> tuple[int, int, int, int]:
    """What the poller compares (``corsproxy.reload._stamp``)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def write_unseen(path: Path, text: str) -> None:
    """Rewrite ``path`` in place, same size, old mtime put back: invisible to the
    poller, so only a SIGHUP can load it."""
    data = text.encode()
    before = os.stat(path)
    assert len(data) == before.st_size, "write_unseen needs a text of the same size"
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert stamp(path) == (before.st_dev, before.st_ino, before.st_size, before.st_mtime_ns)
    assert path.read_text() == text


def write_in_place(path: Path, text: str) -> None:
    """Truncate and write: the same inode, a new size or mtime."""
    path.write_text(text)


def write_replace(path: Path, text: str) -> None:
    """A temp file renamed over ``path`` (an editor's atomic save): a new inode."""
    tmp = path.with_name(f".{path.name}.{new_id()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def check_errors(path: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """The error lines ``corsproxy check --config PATH`` prints for ``path``."""
    capsys.readouterr()
    assert cli_main(["check", "--config", str(path)]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].endswith("corsproxy did not use this config"), lines
    return [line for line in lines[:-1] if not line.startswith("warning: ")]


# ---------------------------------------------------------------------------
# requests and verdicts
# ---------------------------------------------------------------------------


def preflight(origin: str, path: str = "/") -> bytes:
    return request("OPTIONS", path, f"Origin: {origin}", "Access-Control-Request-Method: GET")


def get(origin: str, path: str = "/", test_id: str | None = None) -> bytes:
    return request("GET", path, f"Origin: {origin}", f"X-Test-Id: {test_id or new_id()}")


def allowed_preflight(origin: str) -> dict[str, str]:
    """Every Access-Control-* header of a 200 preflight (GET, no request headers)."""
    return {
        "access-control-allow-origin": origin,
        "access-control-allow-methods": "GET",
        "access-control-allow-headers": "Accept, Accept-Language, Content-Language, Content-Type",
        "access-control-max-age": "600",
    }


def preflight_verdict(response: Response | None, origin: str) -> str:
    """"allowed" (200, exactly the allowed headers) or "denied" (400, no CORS
    headers); anything else fails."""
    assert response is not None, "the connection closed without a response"
    assert response.complete, response
    if response.status == 200:
        assert response.cors == allowed_preflight(origin), response
        return "allowed"
    assert response.status == 400, response
    assert response.cors == {}, response
    assert response.body.startswith(b"Disallowed CORS origin"), response
    return "denied"


def get_verdict(response: Response | None, origin: str) -> str:
    """A forwarded GET: 200 from the upstream with ACAO for ``origin`` ("allowed")
    or with no CORS header at all ("denied"); anything else fails."""
    assert response is not None, "the connection closed without a response"
    assert response.complete and response.status == 200, response
    assert response.body == BODY, response
    assert "origin" in response.vary, response
    if response.cors:
        assert response.cors == {"access-control-allow-origin": origin}, response
        return "allowed"
    return "denied"


async def verdict(port: int, origin: str = B, path: str = "/") -> str:
    """The verdict on a preflight from ``origin``, on a fresh connection."""
    response, _ = await exchange(port, preflight(origin, path))
    return preflight_verdict(response, origin)


async def get_on_fresh(port: int, origin: str, path: str = "/") -> str:
    response, _ = await exchange(port, get(origin, path))
    return get_verdict(response, origin)


async def until_verdict(proxy: Proc, want: str, timeout: float = PATIENCE,
                        origin: str = B) -> float:
    """Ask every 20 ms until the preflight from ``origin`` gets ``want``; the seconds
    that took. AssertionError (with the proxy's events) when not within ``timeout``."""
    started = time.monotonic()
    got = None
    try:
        async with asyncio.timeout(timeout):
            while (got := await verdict(proxy.port, origin)) != want:
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(
            f"a preflight from {origin} was still {got} after {timeout} s, not {want}; "
            + proxy.dump()
        ) from None
    return time.monotonic() - started


def reloaded_message(path: Path, why: str) -> str:
    return f"reloaded the policy from {path} ({why})"


# ---------------------------------------------------------------------------
# 1. SIGHUP
# ---------------------------------------------------------------------------


async def test_sighup_reloads_a_file_rewritten_in_place(tmp_path, upstream, proxies):
    path = tmp_path / "corsproxy.yaml"
    path.write_text(policy(upstream.url, [A, C]))
    proxy = await proxies(path)
    assert await verdict(proxy.port) == "denied"
    assert await verdict(proxy.port, C) == "allowed"

    write_unseen(path, policy(upstream.url, [A, B]))
    proxy.signal(signal.SIGHUP)
    line = await proxy.wait_one("reloaded")
    assert line["message"] == reloaded_message(path, "SIGHUP")
    assert await verdict(proxy.port) == "allowed"
    assert await verdict(proxy.port, C) == "denied"
    assert await verdict(proxy.port, A) == "allowed"
    assert await get_on_fresh(proxy.port, B) == "allowed"

    # And back, with a second signal.
    write_unseen(path, policy(upstream.url, [A, C]))
    proxy.signal(signal.SIGHUP)
    await proxy.wait_events("reloaded", count=2)
    assert await verdict(proxy.port) == "denied"
    assert await get_on_fresh(proxy.port, B) == "denied"

    assert [e["message"] for e in proxy.events("reloaded")] == \
        [reloaded_message(path, "SIGHUP")] * 2
    assert proxy.events("reload-failed") == []
    # The stop signals still work after the reloads.
    proxy.signal(signal.SIGTERM)
    assert await proxy.wait_exit(10) == 0
    await proxy.log_complete()
    proxy.assert_clean()


# ---------------------------------------------------------------------------
# 2. polling
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("write", [write_in_place, write_replace], ids=["in-place", "renamed"])
async def test_a_changed_file_is_picked_up_without_a_signal(tmp_path, upstream, proxies, write):
    path = tmp_path / "corsproxy.yaml"
    path.write_text(policy(upstream.url, [A]))
    proxy = await proxies(path)
    assert await verdict(proxy.port) == "denied"

    write(path, policy(upstream.url, [A, B]))
    await until_verdict(proxy, "allowed", timeout=PICKUP)
    assert await verdict(proxy.port, A) == "allowed"
    lines = await proxy.wait_events("reloaded")
    assert lines[-1]["message"] == reloaded_message(path, f"{path} changed")
    proxy.assert_clean()


# ---------------------------------------------------------------------------
# 3. a Kubernetes ConfigMap volume
# ---------------------------------------------------------------------------


def configmap_update(mount: Path, old: str, new: str, text: str) -> None:
    """What the kubelet does: a new timestamped directory, a new ``..data_tmp``
    link renamed over ``..data``, the old directory deleted. The new file gets the
    old one's size and mtime, so only the inode (seen through the links) differs."""
    previous = os.stat(mount / old / "config.yaml")
    (mount / new).mkdir()
    (mount / new / "config.yaml").write_text(text)
    os.utime(mount / new / "config.yaml", ns=(previous.st_atime_ns, previous.st_mtime_ns))
    os.symlink(new, mount / "..data_tmp")
    os.replace(mount / "..data_tmp", mount / "..data")
    shutil.rmtree(mount / old)


async def test_a_configmap_symlink_swap_is_picked_up_without_a_signal(tmp_path, upstream,
                                                                       proxies):
    mount = tmp_path / "etc-corsproxy"
    (mount / "..2026_11_25_v1").mkdir(parents=True)
    (mount / "..2026_11_25_v1" / "config.yaml").write_text(policy(upstream.url, [A, C]))
    os.symlink("..2026_11_25_v1", mount / "..data")
    os.symlink("..data/config.yaml", mount / "config.yaml")
    path = mount / "config.yaml"
    proxy = await proxies(path)
    assert await verdict(proxy.port) == "denied"

    configmap_update(mount, "..2026_11_25_v1", "..2026_11_25_v2", policy(upstream.url, [A, B]))
    assert os.readlink(mount / "..data") == "..2026_11_25_v2"
    assert stamp(path)[2:] == stamp(mount / "..2026_11_25_v2" / "config.yaml")[2:]
    await until_verdict(proxy, "allowed")
    line = await proxy.wait_one("reloaded")
    assert line["message"] == reloaded_message(path, f"{path} changed")

    # A second update: the proxy still watches the link, not the deleted directory.
    configmap_update(mount, "..2026_11_25_v2", "..2026_11_25_v3", policy(upstream.url, [A, C]))
    await until_verdict(proxy, "denied")
    assert await verdict(proxy.port, C) == "allowed"
    assert proxy.count("reloaded") == 2, proxy.dump()
    assert proxy.events("reload-failed") == []
    proxy.assert_clean()


# ---------------------------------------------------------------------------
# 4. an invalid file
# ---------------------------------------------------------------------------


def _yaml_syntax_error(upstream_url: str) -> str:
    text = policy(upstream_url, [A, B])
    return text.replace("allow_origins:", "allow_origins: [https://b.example\n  x:", 1)


def _star_with_credentials(upstream_url: str) -> str:
    return policy(upstream_url, ["*"], cors={"allow_credentials": True})


@pytest.mark.parametrize("bad", [_yaml_syntax_error, _star_with_credentials],
                         ids=["yaml-syntax", "star-with-credentials"])
async def test_an_invalid_file_keeps_the_old_policy_until_a_valid_one(
        tmp_path, upstream, proxies, capsys, bad):
    path = tmp_path / "corsproxy.yaml"
    path.write_text(policy(upstream.url, [A]))
    proxy = await proxies(path)
    assert await verdict(proxy.port) == "denied"

    write_in_place(path, bad(upstream.url))
    expected = check_errors(path, capsys)
    assert expected and all(line.startswith(f"{path}: ") for line in expected), expected
    if bad is _star_with_credentials:
        assert expected[0].startswith(f"{path}: cors.allow_origins[0]: \"*\" cannot be "
                                      f"combined with allow_credentials: true"), expected
    else:
        assert re.match(rf"{re.escape(str(path))}: line \d+, column \d+: YAML syntax error: ",
                        expected[0]), expected
    failed = await proxy.wait_one("reload-failed", timeout=PATIENCE)
    n = len(expected)
    assert failed["message"] == (f"reload ({path} changed) failed: {n} error"
                                 f"{'s' if n != 1 else ''}; still serving the previous policy")
    assert failed["errors"] == n
    assert [e["message"] for e in proxy.events("reload-error")] == expected
    # The old policy serves: A allowed, B and any other origin still denied.
    assert await verdict(proxy.port, A) == "allowed"
    assert await verdict(proxy.port) == "denied"
    assert await verdict(proxy.port, EVIL) == "denied"
    assert proxy.events("reloaded") == []

    # A valid file is picked up again (without a signal).
    write_in_place(path, policy(upstream.url, [A, B]))
    await until_verdict(proxy, "allowed")
    line = await proxy.wait_one("reloaded")
    assert line["message"] == reloaded_message(path, f"{path} changed")
    assert await verdict(proxy.port, EVIL) == "denied"
    assert proxy.count("reload-failed") == 1, proxy.dump()
    proxy.assert_clean()


# ---------------------------------------------------------------------------
# 5. under load
# ---------------------------------------------------------------------------


async def test_no_request_fails_while_the_policy_is_reloaded_under_load(tmp_path, upstream,
                                                                         proxies):
    """Six keep-alive connections send preflights and forwarded GETs from B without
    a pause while the policy flips five times (SIGHUP and file changes in turn).
    Every response is whole and on the same connection; each one that was sent
    after the test saw a reload's log line and answered before the next change
    started has that reload's verdict."""
    path = tmp_path / "corsproxy.yaml"
    path.write_text(policy(upstream.url, [A, C]))
    proxy = await proxies(path)
    connections = 6
    stop = asyncio.Event()
    # Per connection: (sent, received, kind, verdict).
    seen: list[list[tuple[float, float, str, str]]] = [[] for _ in range(connections)]

    async def client(n: int) -> None:
        async with await Client.open(proxy.port) as conn:
            for i in itertools.count():
                if stop.is_set():
                    return
                kind = "preflight" if i % 2 == 0 else "get"
                sent = time.monotonic()
                await conn.send(preflight(B, f"/load/{n}") if kind == "preflight"
                                else get(B, f"/load/{n}"))
                response = await conn.response("OPTIONS" if kind == "preflight" else "GET")
                assert response is not None, \
                    f"connection {n} closed ({conn.ending}) after {i} responses"
                assert response.ending is None, (n, i, response)
                check = preflight_verdict if kind == "preflight" else get_verdict
                seen[n].append((sent, time.monotonic(), kind, check(response, B)))

    tasks = [asyncio.create_task(client(n)) for n in range(connections)]
    # (changed at, seen in the log at, verdict) per phase; phase 0 is the start.
    phases: list[tuple[float, float, str]] = [(0.0, time.monotonic(), "denied")]
    try:
        await asyncio.sleep(0.3)
        for number in range(1, 6):
            allowed = number % 2 == 1
            text = policy(upstream.url, [A, B] if allowed else [A, C])
            changed = time.monotonic()
            if number % 2 == 1:
                write_unseen(path, text)
                proxy.signal(signal.SIGHUP)
            else:
                write_replace(path, text)
            await proxy.wait_events("reloaded", count=number, timeout=PATIENCE)
            phases.append((changed, time.monotonic(), "allowed" if allowed else "denied"))
            assert not any(t.done() for t in tasks), [t for t in tasks if t.done()]
            await asyncio.sleep(0.3)
        final = time.monotonic()
    finally:
        stop.set()
        async with asyncio.timeout(10):
            await asyncio.gather(*tasks)

    for n, responses in enumerate(seen):
        for number, (_, seen_at, want) in enumerate(phases):
            ends = phases[number + 1][0] if number + 1 < len(phases) else final
            inside = [r for r in responses if r[0] >= seen_at and r[1] <= ends]
            assert inside, f"connection {n} sent nothing in phase {number}"
            wrong = [r for r in inside if r[3] != want]
            assert wrong == [], f"connection {n}, phase {number}: not {want}: {wrong[:5]}"
    assert sum(map(len, seen)) > 500
    # After the last reload the new verdict holds on fresh connections too.
    assert await verdict(proxy.port) == "allowed"
    assert await get_on_fresh(proxy.port, B) == "allowed"
    reasons = [e["message"] for e in proxy.events("reloaded")]
    assert reasons == [reloaded_message(path, "SIGHUP"),
                       reloaded_message(path, f"{path} changed")] * 2 \
        + [reloaded_message(path, "SIGHUP")]
    assert proxy.events("reload-failed") == []
    proxy.assert_clean()


# ---------------------------------------------------------------------------
# 6. requests in flight
# ---------------------------------------------------------------------------


async def test_a_request_in_flight_finishes_under_the_policy_it_started_with(
        tmp_path, upstream, proxies):
    upstream.reply("/slow", delay=1.5)
    path = tmp_path / "corsproxy.yaml"
    path.write_text(policy(upstream.url, [A, B]))
    proxy = await proxies(path)

    async with await Client.open(proxy.port) as slow:
        test_id = new_id()
        await slow.send(get(B, "/slow", test_id))
        await wait_recorded(upstream, test_id)  # the GET is at the upstream: in flight
        pending = asyncio.create_task(slow.response("GET", timeout=10))

        write_unseen(path, policy(upstream.url, [A, C]))  # B is no longer allowed
        proxy.signal(signal.SIGHUP)
        await proxy.wait_events("reloaded")
        assert await get_on_fresh(proxy.port, B, "/fast") == "denied"
        assert await verdict(proxy.port) == "denied"
        assert not pending.done(), "the slow response came before the reload was over"

        response = await pending
        assert get_verdict(response, B) == "allowed"  # the policy it started with
        # The same keep-alive connection: its next request gets the new policy.
        await slow.send(get(B, "/after"))
        assert get_verdict(await slow.response("GET"), B) == "denied"
    proxy.assert_clean()


# ---------------------------------------------------------------------------
# 7. keys that need a restart
# ---------------------------------------------------------------------------


async def test_keys_that_need_a_restart_are_reported_and_kept(tmp_path, upstream, proxies):
    upstream.reply("/slow", delay=1.0)
    trap = await Trap().start()  # the new upstream.url: must never be connected to
    try:
        path = tmp_path / "corsproxy.yaml"
        path.write_text(policy(upstream.url, [A], upstream={"timeout": 10}))
        proxy = await proxies(path)
        old_port = proxy.port
        new_port = free_port()
        assert await verdict(old_port) == "denied"

        write_in_place(path, policy(
            f"http://127.0.0.1:{trap.port}", [A, B],
            listen={"port": new_port}, upstream={"timeout": 0.3},
        ))
        await until_verdict(proxy, "allowed")  # the cors change of the same edit
        line = await proxy.wait_one("reloaded")
        assert line["message"] == reloaded_message(path, f"{path} changed")
        restart = proxy.events("reload-restart-needed")
        assert sorted(e["section"] for e in restart) == ["listen", "upstream"], restart
        for e in restart:
            assert e["message"] == (f"{e['section']}: changed in {path}, but only a restart "
                                    f"applies it; the running values are kept")

        # Still the old port, the old upstream, the old upstream.timeout (10 s, not 0.3).
        test_id = new_id()
        response, _ = await exchange(old_port, get(B, "/slow", test_id), timeout=10)
        assert get_verdict(response, B) == "allowed"
        assert len(await wait_recorded(upstream, test_id)) == 1
        assert trap.connections == 0
        with pytest.raises(ConnectionRefusedError):
            _, writer = await asyncio.open_connection("127.0.0.1", new_port)
            writer.close()
        assert proxy.events("reload-failed") == []
        proxy.assert_clean()
    finally:
        await trap.close()


# ---------------------------------------------------------------------------
# 8. allow_origins_file
# ---------------------------------------------------------------------------


async def test_an_allow_origins_file_is_watched_too(tmp_path, upstream, proxies):
    directory = tmp_path / "conf"
    directory.mkdir()
    path = directory / "corsproxy.yaml"
    origins = directory / "origins.txt"
    origins.write_text("# the apps that may call us\nhttps://a2.example\n")
    # Relative to the config file (the proxy runs with the repository as its cwd).
    path.write_text(policy(upstream.url, [A], cors={"allow_origins_file": "origins.txt"}))
    proxy = await proxies(path)
    assert await verdict(proxy.port, "https://a2.example") == "allowed"
    assert await verdict(proxy.port) == "denied"

    # Origins added to the file (not to the config) are picked up without a signal.
    write_in_place(origins, "# the apps that may call us\nhttps://a2.example\n"
                            "https://b.example  # the new one\n")
    await until_verdict(proxy, "allowed")
    line = await proxy.wait_one("reloaded")
    assert line["message"] == reloaded_message(path, f"{origins} changed")
    assert await verdict(proxy.port, A) == "allowed"

    # An invalid line: the old policy stays; the error names the file and the line.
    write_in_place(origins, "# the apps that may call us\nhttps://a2.example\n"
                            "https://b.example\nnot an origin\nhttps://c.example\n")
    failed = await proxy.wait_one("reload-failed", timeout=PATIENCE)
    assert failed["message"] == (f"reload ({origins} changed) failed: 1 error; still serving "
                                 f"the previous policy")
    errors = proxy.events("reload-error")
    assert len(errors) == 1, proxy.dump()
    error = errors[0]
    assert error["message"].startswith(
        f"{path}: cors.allow_origins_file: {origins}, line 4: "), error
    assert await verdict(proxy.port, C) == "denied"
    assert await verdict(proxy.port) == "allowed"

    # Fixed: picked up again.
    write_in_place(origins, "https://b.example\nhttps://c.example\n")
    await until_verdict(proxy, "allowed", origin=C)
    assert await verdict(proxy.port, "https://a2.example") == "denied"
    assert proxy.count("reloaded") == 2, proxy.dump()
    proxy.assert_clean()


# ---------------------------------------------------------------------------
# 9. listen.workers
# ---------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="workers need fork and SO_REUSEPORT")
@pytest.mark.parametrize("trigger", ["sighup-to-parent", "file-change"])
async def test_every_worker_switches(tmp_path, upstream, proxies, trigger):
    path = tmp_path / "corsproxy.yaml"
    path.write_text(policy(upstream.url, [A, C], listen={"workers": 2}))
    proxy = await proxies(path, workers=True)
    listening = await proxy.wait_events("listening", count=2, timeout=20)
    workers = {e["pid"] for e in listening}
    assert len(workers) == 2 and proxy.pid not in workers
    await proxy.wait_watching(workers)
    port = proxy.port
    assert await verdict(port) == "denied"

    if trigger == "sighup-to-parent":
        write_unseen(path, policy(upstream.url, [A, B], listen={"workers": 2}))
        proxy.signal(signal.SIGHUP)  # the parent's PID: it passes it on
        why = "SIGHUP"
    else:
        write_replace(path, policy(upstream.url, [A, B], listen={"workers": 2}))
        why = f"{path} changed"
    lines = await proxy.wait_events("reloaded", count=2, timeout=PATIENCE)
    assert [e["message"] for e in lines] == [reloaded_message(path, why)] * 2

    # Fresh connections, so the kernel spreads them over both workers: all flipped.
    probe = f"/after-{new_id()}"
    verdicts = [await verdict(port, B, probe) for _ in range(24)]
    assert verdicts == ["allowed"] * 24
    served = await wait_for(lambda: len(proxy.access(probe)) >= 24 and proxy.access(probe),
                            LINE, "24 access lines")
    assert {r["pid"] for r in served} == workers  # 24 on one worker: p = 2**-23
    assert all(r["status"] == 200 and r["cors"] == "allowed" for r in served)
    assert proxy.count("reloaded") == 2, proxy.dump()
    proxy.assert_clean()
