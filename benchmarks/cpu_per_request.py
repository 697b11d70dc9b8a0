"""CPU microseconds per proxied request spent in the corsproxy process.

Requests/s move with whatever else runs on a shared machine; the proxy's own CPU time
per request moves much less, so this is the number to compare two versions with:

    python benchmarks/cpu_per_request.py ROOT [PATH] [SECONDS] [nolog]

ROOT is a directory holding the corsproxy package to measure (e.g. this checkout, or a
worktree of another commit); PATH is /small.json (81 bytes, default) or /1mib.bin.
``nolog`` turns the access log off (``log.access: false``), to measure what it costs.
A tiny uvloop upstream and corsproxy (one worker) run on loopback ports, wrk (Debian) loads the
proxy with 50 connections for 2 s of warm-up and SECONDS (default 6) measured; every
process is stopped at the end. Run two versions alternately, a few rounds each.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.abspath(sys.argv[1])  # directory holding the corsproxy package to test
PATH = sys.argv[2] if len(sys.argv) > 2 else "/small.json"
DUR = sys.argv[3] if len(sys.argv) > 3 else "6"
CONF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corsproxy.yaml")
if "nolog" in sys.argv[4:]:
    import tempfile

    with open(CONF) as f:
        text = f.read() + "\nlog: {access: false}\n"
    CONF = os.path.join(tempfile.mkdtemp(prefix="corsproxy-bench-"), "corsproxy.yaml")
    with open(CONF, "w") as f:
        f.write(text)

UPSTREAM = r"""
import asyncio, uvloop, os, sys
SMALL = (b'{"id": 1, "name": "small", "tags": ["a", "b"], "ok": true, '
         b'"pad": "xxxxxxxxxxxxxxxx"}')[:81]
BIG = os.urandom(1 << 20)
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
def resp(body): return HEAD % len(body) + body
R = {b"/small.json": resp(SMALL), b"/1mib.bin": resp(BIG)}
class P(asyncio.Protocol):
    def connection_made(self, t): self.t = t; self.buf = b""
    def data_received(self, d):
        self.buf += d
        while b"\r\n\r\n" in self.buf:
            head, _, self.buf = self.buf.partition(b"\r\n\r\n")
            self.t.write(R.get(head.split(b" ")[1], R[b"/small.json"]))
async def main():
    s = await asyncio.get_running_loop().create_server(P, "127.0.0.1", int(sys.argv[1]))
    await asyncio.Event().wait()
uvloop.run(main())
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(p):
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", p), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"port {p} never opened")


def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


up, px = free_port(), free_port()
procs = []
try:
    procs.append(subprocess.Popen([sys.executable, "-c", UPSTREAM, str(up)]))
    wait_port(up)
    env = dict(os.environ, PYTHONPATH=ROOT)
    log = open(os.devnull, "w")
    procs.append(
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "corsproxy",
                "run",
                "--config",
                CONF,
                "--host",
                "127.0.0.1",
                "--port",
                str(px),
                "--upstream",
                f"http://127.0.0.1:{up}",
            ],
            env=env,
            cwd="/tmp",
            stdout=log,
            stderr=log,
        )
    )
    wait_port(px)
    proxy = procs[1].pid
    url = f"http://127.0.0.1:{px}{PATH}"
    subprocess.run(
        ["wrk", "-t1", "-c50", "-d2s", "-H", "Origin: https://app.example.com", url],
        capture_output=True,
    )
    c0 = cpu(proxy)
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            "-c50",
            f"-d{DUR}s",
            "--latency",
            "-H",
            "Origin: https://app.example.com",
            url,
        ],
        capture_output=True,
        text=True,
    ).stdout
    c1 = cpu(proxy)
    n = int(re.search(r"(\d+) requests in", out).group(1))
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)
    errs = re.search(r"Non-2xx.*", out)
    print(out[out.find("Latency Distribution") :][:200]) if "--latency" in sys.argv else None
    per_request = (c1 - c0) / n * 1e6
    note = errs.group(0) if errs else ""
    print(f"{ROOT}: {PATH} {n} requests, {rps} req/s, proxy CPU {per_request:.1f} us/request", note)
finally:
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
