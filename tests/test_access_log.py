"""The access log as an operator runs it (issue 10): request ids end to end, the
``log`` section (format, access on/off, a file reopened on SIGUSR1) and
``listen.trusted_proxies``.

Every test runs the real ``python -m corsproxy run`` in a subprocess against a
real upstream on loopback, and stops it by its PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import (
    Reply,
    config_text,
    free_port,
    headers_of,
    raw_request,
    raw_response,
    status_of,
)
from hostile import ProxyProcess

from corsproxy.forwarding import client_request_id, forwarded_proto, real_client

ROOT = Path(__file__).resolve().parent.parent
APP = "https://app.example.com"
GENERATED = re.compile(r"[0-9a-f]{32}")
#: Bound on waiting for a line to reach the log.
LINE = 10.0


def ids_of(raw: bytes) -> list[str]:
    return [v for n, v in headers_of(raw) if n.lower() == "x-request-id"]


async def access_record(proxy: ProxyProcess, request_id: str) -> dict:
    return await proxy.wait_record(lambda r: r.get("request_id") == request_id, LINE)


@pytest.fixture
async def proxy(upstream, tmp_path):
    proc = ProxyProcess.with_config(tmp_path, upstream.url)
    yield proc
    proc.kill()


# ---------------------------------------------------------------------------
# X-Request-Id
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("client_id", [
    "client-chosen-1",
    "!#$%&'*+-.^_`|~:/?@[]{}()<>=,;\"\\",  # every visible ASCII class
    "x" * 200,  # the longest kept
])
async def test_a_reasonable_client_id_goes_upstream_back_and_into_the_log(
    proxy, upstream, client_id
):
    raw = await raw_response(proxy.port, raw_request(
        "POST", "/items?q=1", [("Host", "h"), ("Origin", APP), ("X-Request-Id", client_id)],
        b"12345",
    ))
    assert status_of(raw) == 200
    (seen,) = await upstream.wait()
    assert seen.values("X-Request-Id") == [client_id]
    assert ids_of(raw) == [client_id]
    record = await access_record(proxy, client_id)
    assert (record["method"], record["path"], record["status"]) == ("POST", "/items", 200)
    assert record["request_bytes"] == 5
    assert record["response_bytes"] == len(b"hello from upstream\n")
    assert isinstance(record["us"], int) and isinstance(record["upstream_us"], int)
    assert 0 < record["upstream_us"] <= record["us"]


@pytest.mark.parametrize(("why", "id_headers"), [
    ("empty", [("X-Request-Id", "")]),
    ("a space inside", [("X-Request-Id", "two words")]),
    ("201 characters", [("X-Request-Id", "y" * 201)]),
    ("not ASCII", [("X-Request-Id", "caf\u00e9")]),
    ("a tab inside", [("X-Request-Id", "a\tb")]),
    ("two headers", [("X-Request-Id", "one"), ("X-Request-Id", "two")]),
    ("none", []),
])
async def test_otherwise_the_proxy_makes_one_and_uses_it_everywhere(
    proxy, upstream, why, id_headers
):
    raw = await raw_response(proxy.port, raw_request(
        "GET", "/x", [("Host", "h"), ("Origin", APP), *id_headers],
    ))
    assert status_of(raw) == 200, why
    (seen,) = await upstream.wait()
    (generated,) = seen.values("X-Request-Id")
    assert GENERATED.fullmatch(generated), why
    assert ids_of(raw) == [generated]
    record = await access_record(proxy, generated)
    assert record["path"] == "/x"


async def test_generated_ids_differ_per_request(proxy, upstream):
    seen = set()
    for _ in range(5):
        raw = await raw_response(proxy.port, raw_request("GET", "/x", [("Host", "h")]))
        (rid,) = ids_of(raw)
        seen.add(rid)
    assert len(seen) == 5


async def test_answers_the_proxy_makes_itself_carry_the_id_too(proxy, upstream):
    # A preflight (twice: the second from the answer cache), a refused target, a
    # head the parser refuses, and an upstream that is down are all answered by the
    # proxy; each answer and its access line carry one id.
    preflight = [("Host", "h"), ("Origin", APP), ("Access-Control-Request-Method", "GET")]
    for _ in range(2):
        raw = await raw_response(proxy.port, raw_request("OPTIONS", "/p", preflight))
        assert status_of(raw) == 200
        (rid,) = ids_of(raw)
        assert GENERATED.fullmatch(rid)
        record = await access_record(proxy, rid)
        assert record["method"] == "OPTIONS" and record["response_bytes"] == len(b"OK")
    raw = await raw_response(proxy.port, raw_request(
        "OPTIONS", "/p", [*preflight, ("X-Request-Id", "preflight-7")]))
    assert ids_of(raw) == ["preflight-7"]
    await access_record(proxy, "preflight-7")

    raw = await raw_response(proxy.port, raw_request("GET", "/a/../b", [("Host", "h")]))
    assert status_of(raw) == 400
    (rid,) = ids_of(raw)
    record = await access_record(proxy, rid)
    assert record["status"] == 400 and record["path"] == "/a/../b"

    raw = await raw_response(proxy.port, b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
    assert status_of(raw) == 400
    (rid,) = ids_of(raw)
    record = await access_record(proxy, rid)
    assert record["method"] == "-" and record["error"].startswith("malformed request")
    assert upstream.requests == []


async def test_the_upstreams_own_id_gives_way_to_the_requests(proxy, upstream):
    upstream.reply("/own", Reply(headers=[("Content-Type", "text/plain"),
                                          ("X-Request-Id", "chosen-by-upstream")]))
    raw = await raw_response(proxy.port, raw_request(
        "GET", "/own", [("Host", "h"), ("X-Request-Id", "chosen-by-client")]))
    assert status_of(raw) == 200
    assert ids_of(raw) == ["chosen-by-client"]


@pytest.mark.parametrize(("values", "expected"), [
    (["abc"], "abc"),
    (["a" * 200], "a" * 200),
    (["a" * 201], None),
    ([""], None),
    (["a b"], None),
    (["a\tb"], None),
    (["\u00e9"], None),
    (["a", "b"], None),
    ([], None),
])
def test_which_client_ids_are_taken(values, expected):
    assert client_request_id(values) == expected


# ---------------------------------------------------------------------------
# listen.trusted_proxies
# ---------------------------------------------------------------------------


def test_forwarded_proto_and_real_client_rules():
    import ipaddress

    nets = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("127.0.0.1/32")]

    def trusted(address: str) -> bool:
        return any(ipaddress.ip_address(address) in n for n in nets)

    assert forwarded_proto([("X-Forwarded-Proto", "HTTPS, http")]) == "https"
    assert forwarded_proto([("x-forwarded-proto", "http")]) == "http"
    assert forwarded_proto([("X-Forwarded-Proto", "ftp")]) is None
    assert forwarded_proto([]) is None
    xff = [("X-Forwarded-For", "198.51.100.1, 203.0.113.7"), ("X-Forwarded-For", "10.1.1.1")]
    assert real_client("127.0.0.1", xff, trusted) == "203.0.113.7"
    assert real_client("192.0.2.9", xff, trusted) == "192.0.2.9"  # an untrusted peer
    assert real_client("127.0.0.1", [("X-Forwarded-For", "garbage, 10.1.1.1")], trusted) \
        == "10.1.1.1"  # the walk stops at what is no address
    assert real_client("127.0.0.1", [], trusted) == "127.0.0.1"


async def start(tmp_path: Path, upstream_url: str, **sections) -> ProxyProcess:
    path = tmp_path / f"trusted-{time.monotonic_ns()}.yaml"
    data = yaml.safe_load(config_text(upstream_url, cors=sections.pop("cors", None),
                                      listen=sections.pop("listen", None)))
    data.update(sections)
    path.write_text(yaml.safe_dump(data))
    return ProxyProcess(path).start()


FORWARDED = [
    ("Host", "api.example.com"),
    ("X-Forwarded-For", "203.0.113.7, 10.1.1.1"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "public.example.com"),
]


async def test_a_trusted_proxys_forwarding_headers_are_kept(upstream, tmp_path):
    proc = await start(tmp_path, upstream.url,
                       listen={"trusted_proxies": ["10.0.0.0/8", "127.0.0.1"]})
    try:
        raw = await raw_response(proc.port, raw_request(
            "GET", "/t", [*FORWARDED, ("X-Request-Id", "trusted-1")]))
        assert status_of(raw) == 200
        (seen,) = await upstream.wait()
        assert seen.values("X-Forwarded-For") == ["203.0.113.7, 10.1.1.1, 127.0.0.1"]
        assert seen.values("X-Forwarded-Proto") == ["https"]
        assert seen.values("X-Forwarded-Host") == ["public.example.com"]
        record = await access_record(proc, "trusted-1")
        assert record["client"] == "203.0.113.7"
    finally:
        proc.kill()


async def test_anyone_elses_are_replaced(upstream, tmp_path):
    proc = await start(tmp_path, upstream.url, listen={"trusted_proxies": ["10.0.0.0/8"]})
    try:
        raw = await raw_response(proc.port, raw_request(
            "GET", "/t", [*FORWARDED, ("X-Request-Id", "untrusted-1")]))
        assert status_of(raw) == 200
        (seen,) = await upstream.wait()
        assert seen.values("X-Forwarded-For") == ["203.0.113.7, 10.1.1.1, 127.0.0.1"]
        assert seen.values("X-Forwarded-Proto") == ["http"]
        assert seen.values("X-Forwarded-Host") == ["api.example.com"]
        record = await access_record(proc, "untrusted-1")
        assert record["client"] == "127.0.0.1"
    finally:
        proc.kill()


@pytest.mark.parametrize(("trusted", "expected"), [
    (["127.0.0.1/32"], 200),  # https per X-Forwarded-Proto: same origin, forwarded
    ([], 403),  # the listener's http: another origin, refused under enforce
])
async def test_same_origin_follows_a_trusted_x_forwarded_proto(
    upstream, tmp_path, trusted, expected
):
    proc = await start(tmp_path, upstream.url, listen={"trusted_proxies": trusted},
                       cors={"allow_origins": [APP], "enforce": True})
    try:
        raw = await raw_response(proc.port, raw_request("POST", "/s", [
            ("Host", "api.example.com"), ("Origin", "https://api.example.com"),
            ("X-Forwarded-Proto", "https"),
        ], b"{}"))
        assert status_of(raw) == expected
        # Same origin is not a CORS request: no Access-Control-* header either way.
        assert [n for n, _ in headers_of(raw) if n.lower().startswith("access-control-")] == []
    finally:
        proc.kill()


def test_a_bad_trusted_proxy_entry_is_a_clear_config_error(tmp_path, capsys):
    from corsproxy.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text(config_text("http://127.0.0.1:9", listen={
        "trusted_proxies": ["10.0.0.0/8", "10.0.0.300"],
    }))
    assert main(["check", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert (f"{path}: listen.trusted_proxies[1]: \"10.0.0.300\" is not an IP address or CIDR "
            f"range; write e.g.") in err


# ---------------------------------------------------------------------------
# the log section: a file, SIGUSR1, access on/off, the format
# ---------------------------------------------------------------------------


class FileLogged:
    """``corsproxy run`` whose log goes to ``log.file``: the port is fixed in the
    config (the listening line is in the file, not on stderr)."""

    def __init__(self, tmp_path: Path, upstream_url: str, log: dict, workers: int = 1,
                 args: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.path = tmp_path / "cfg.yaml"
        data = yaml.safe_load(config_text(upstream_url, listen={
            "port": self.port, "workers": workers}))
        data["log"] = log
        self.path.write_text(yaml.safe_dump(data))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "corsproxy", "run", "--config", str(self.path), *args],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )

    async def wait_for(self, file: Path, predicate, timeout: float = LINE) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            lines = file.read_text().splitlines() if file.exists() else []
            if predicate(lines):
                return lines
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"{file} never matched (exit {self.proc.poll()}):\n" + "\n".join(lines)
                )
            await asyncio.sleep(0.05)

    async def stop(self, signal_it: bool = True) -> tuple[int, bytes]:
        """SIGTERM (unless ``signal_it`` is false: it is to exit by itself), then the
        exit code and everything it wrote to stdout and stderr."""
        if signal_it and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, err = await asyncio.to_thread(self.proc.communicate, timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        return self.proc.returncode, out + err

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def access(lines: list[str]) -> list[dict]:
    records = [json.loads(line) for line in lines]
    return [r for r in records if "method" in r]


async def get_ids(port: int, prefix: str, count: int) -> list[str]:
    ids = [f"{prefix}-{i}" for i in range(count)]
    for rid in ids:  # a new connection each: with workers, the kernel spreads them
        raw = await raw_response(port, raw_request("GET", "/r", [("Host", "h"),
                                                              ("X-Request-Id", rid)]))
        assert status_of(raw) == 200
    return ids


@pytest.mark.parametrize("workers", [1, 2])
async def test_the_log_file_gets_every_line_and_sigusr1_reopens_it(upstream, tmp_path, workers):
    (tmp_path / "logs").mkdir()
    log_file = tmp_path / "logs" / "corsproxy.log"
    moved = tmp_path / "logs" / "corsproxy.log.1"
    run = FileLogged(tmp_path, upstream.url, {"file": "logs/corsproxy.log", "format": "json"},
                     workers=workers)
    try:
        listening = "listening"
        await run.wait_for(log_file, lambda lines: sum(
            json.loads(line).get("event") == listening for line in lines) == workers)
        before = await get_ids(run.port, "before", 6)
        await run.wait_for(log_file, lambda lines: len(access(lines)) == 6)
        os.rename(log_file, moved)  # what logrotate does
        os.kill(run.proc.pid, signal.SIGUSR1)
        # Once reopened, the path exists again; each worker reopens on its own, so
        # wait a moment for all of them before more requests.
        await run.wait_for(log_file, lambda lines: True if log_file.exists() else False)
        await asyncio.sleep(0.5)
        after = await get_ids(run.port, "after", 20)
        lines = await run.wait_for(log_file, lambda lines: len(access(lines)) == 20)
        # Each process writes its lines in batches: across workers, file order is
        # batch order, not request order.
        assert sorted(r["request_id"] for r in access(lines)) == sorted(after)
        if workers == 2:  # both workers wrote to the new file
            assert len({r["pid"] for r in access(lines)}) == 2
        old = moved.read_text().splitlines()
        assert sorted(r["request_id"] for r in access(old)) == sorted(before)
        code, output = await run.stop()
        assert code == 0
        final = log_file.read_text().splitlines()
        assert json.loads(final[-1])["event"] == "stopped"
        assert output == b""  # nothing on stdout or stderr: it all went to the file
    finally:
        run.kill()


async def test_access_false_keeps_events_and_drops_request_lines(upstream, tmp_path):
    log_file = tmp_path / "quiet.log"
    run = FileLogged(tmp_path, upstream.url, {"file": str(log_file), "access": False})
    try:
        await run.wait_for(log_file, lambda lines: any("listening on" in x for x in lines))
        await get_ids(run.port, "quiet", 3)
        await upstream.wait(3)
        code, _ = await run.stop()
        assert code == 0
        lines = log_file.read_text().splitlines()
        assert not any("quiet-" in line for line in lines), lines
        assert lines[-1].endswith("corsproxy stopped")  # text: the config's default format
    finally:
        run.kill()


@pytest.mark.parametrize(("log", "args", "json_lines"), [
    ({"format": "json"}, (), True),
    ({"format": "json"}, ("--log-format", "text"), False),  # the flag wins
    ({}, ("--log-format", "json"), True),
])
async def test_log_format_comes_from_the_config_unless_the_flag_says(
    upstream, tmp_path, log, args, json_lines
):
    log_file = tmp_path / "format.log"
    run = FileLogged(tmp_path, upstream.url, {**log, "file": str(log_file)}, args=args)
    try:
        await run.wait_for(log_file, lambda lines: any("listening" in x for x in lines))
        await get_ids(run.port, "fmt", 1)
        lines = await run.wait_for(log_file, lambda lines: any("fmt-0" in x for x in lines))
        line = next(x for x in lines if "fmt-0" in x)
        if json_lines:
            assert json.loads(line)["request_id"] == "fmt-0"
        else:
            assert " GET /r 200 " in line and " request_id=fmt-0 " in line
    finally:
        run.kill()


async def test_a_log_file_that_cannot_be_opened_stops_the_start_clearly(upstream, tmp_path):
    from corsproxy.cli import main

    run = FileLogged(tmp_path, upstream.url, {"file": "missing/dir/corsproxy.log"})
    try:
        code, output = await run.stop(signal_it=False)
        assert code == 1
        text = output.decode()
        assert f"{run.path}: log.file: the directory {tmp_path}/missing/dir does not exist" in text
        assert "Traceback" not in text
    finally:
        run.kill()
    assert main(["check", "--config", str(run.path)]) == 1


def test_check_shows_trusted_proxies_admin_and_log(tmp_path, capsys):
    from corsproxy.cli import main

    path = tmp_path / "ops.yaml"
    data = yaml.safe_load(config_text("http://127.0.0.1:9", listen={
        "trusted_proxies": ["10.0.0.0/8", "::1"]}, admin={"port": 9911}))
    data["log"] = {"format": "json", "file": "corsproxy.log", "access": False}
    path.write_text(yaml.safe_dump(data))
    assert main(["check", "--config", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "trusted:  10.0.0.0/8, ::1/128  (their X-Forwarded-For/-Proto/-Host are kept)" in lines
    assert ("admin:    http://127.0.0.1:9911  (the page at /; /healthz /readyz /metrics "
            "/denied)") in lines
    assert f"log:      json lines to {tmp_path}/corsproxy.log, no access lines" in lines
