"""Resident memory of corsproxy (issue 5): idle, with 10,000 open keep-alive
connections, and while 1 GiB streams up and 1 GiB streams down through it.

    python benchmarks/memory.py                    # about 30 s
    python benchmarks/memory.py --connections 2000 --gib 0.25
    python benchmarks/memory.py --workers 2        # RSS of each worker and the parent

Starts ``python -m corsproxy run`` on 127.0.0.1 (free port, access log to a file)
in front of an aiohttp upstream run by this script (it streams a body of the asked
size and discards uploads), then reads ``VmRSS``/``VmHWM`` from ``/proc/PID/status``:

- idle: after start-up and 20 requests (so the first-request allocations are in);
- download, then upload: RSS sampled every 20 ms while the body streams; the table
  shows the largest rise over the RSS just before the transfer (measured before the
  connection test, whose freed memory would otherwise hide a rise);
- connections: after N connections each sent one preflight, got the answer and
  stay open (keep-alive). RLIMIT_NOFILE is raised (up to the hard limit) for this
  script and the proxy it starts; N is capped to what that limit allows.

Every step is bounded (time-outs on start, on each connection and on each
transfer); everything started is stopped at the end. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ORIGIN = "https://app.example.com"
CHUNK = b"\0" * (256 * 1024)
START_TIMEOUT = 20.0
PREFLIGHT = (
    b"OPTIONS /small.json HTTP/1.1\r\nHost: proxy\r\nOrigin: " + ORIGIN.encode()
    + b"\r\nAccess-Control-Request-Method: PUT\r\n\r\n"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_kib(pid: int) -> dict[str, int]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def pss_kib(pid: int) -> int:
    """Proportional set size: shared pages split between the processes sharing them
    (forked workers share the interpreter and imports with the supervisor)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f} MiB"


# -- the upstream ---------------------------------------------------------------------


async def start_upstream(download_bytes: int) -> tuple[web.AppRunner, int]:
    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(download_bytes)})
        await response.prepare(request)
        left = download_bytes
        while left > 0:
            piece = CHUNK if left >= len(CHUNK) else CHUNK[:left]
            await response.write(piece)
            left -= len(piece)
        await response.write_eof()
        return response

    async def sink(request: web.Request) -> web.Response:
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
        return web.Response(text=str(size))

    async def small(request: web.Request) -> web.Response:
        return web.Response(text='{"ok": true}', content_type="application/json")

    app = web.Application(client_max_size=1 << 40)
    app.router.add_get("/big", big)
    app.router.add_post("/sink", sink)
    app.router.add_route("*", "/{tail:.*}", small)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


# -- the proxy --------------------------------------------------------------------------


async def start_proxy(upstream_port: int, workers: int, log_path: Path
                      ) -> tuple[asyncio.subprocess.Process, int]:
    port = free_port()
    config = log_path.with_suffix(".yaml")
    config.write_text(
        "cors:\n  allow_origins: [https://app.example.com]\n  allow_methods: [GET, POST, PUT]\n"
    )
    log = log_path.open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "corsproxy", "run", "--config", str(config), "--host", "127.0.0.1",
        "--port", str(port), "--upstream", f"http://127.0.0.1:{upstream_port}",
        "--workers", str(workers),  # always: the default, auto, is one per CPU
        stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, cwd=ROOT,
    )
    log.close()
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            if workers > 1 and len(children(proc.pid)) < workers:
                raise ConnectionError
            return proc, port
        except OSError:
            await asyncio.sleep(0.05)
    proc.kill()
    raise SystemExit(f"corsproxy did not start within {START_TIMEOUT:g} s; see {log_path}")


def proxy_pids(proc: asyncio.subprocess.Process, workers: int) -> list[int]:
    return children(proc.pid) if workers > 1 else [proc.pid]


def rss_line(label: str, pids: list[int]) -> str:
    parts = [mib(status_kib(p)["VmRSS"]) for p in pids]
    line = f"| {label} | {' + '.join(parts)}"
    if len(pids) > 1 or label == "supervisor process":
        line += f" (PSS {' + '.join(mib(pss_kib(p)) for p in pids)})"
    return line + " |"


# -- the measurements -------------------------------------------------------------------


async def open_connections(port: int, count: int) -> list[asyncio.StreamWriter]:
    """``count`` connections, each with one answered preflight, left open."""
    writers: list[asyncio.StreamWriter] = []
    sem = asyncio.Semaphore(200)

    async def one() -> None:
        async with sem:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writers.append(writer)
            writer.write(PREFLIGHT)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)

    async with asyncio.timeout(120):
        await asyncio.gather(*(one() for _ in range(count)))
    return writers


async def sample_peak(pids: list[int], stop: asyncio.Event) -> int:
    peak = 0
    while not stop.is_set():
        peak = max(peak, sum(status_kib(p)["VmRSS"] for p in pids))
        try:
            await asyncio.wait_for(stop.wait(), 0.02)
        except TimeoutError:
            pass
    return peak


async def transfer(url: str, pids: list[int], upload: int | None) -> tuple[int, int, float]:
    """(RSS before, peak RSS during, seconds) for one download or upload."""
    before = sum(status_kib(p)["VmRSS"] for p in pids)
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_peak(pids, stop))
    started = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=600, sock_read=60)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
        if upload is None:
            async with session.get(url + "/big", headers={"Origin": ORIGIN}) as resp:
                assert resp.status == 200, resp.status
                async for _ in resp.content.iter_chunked(1 << 20):
                    pass
        else:
            async def body():
                left = upload
                while left > 0:
                    piece = CHUNK if left >= len(CHUNK) else CHUNK[:left]
                    left -= len(piece)
                    yield piece

            async with session.post(url + "/sink", data=body(), headers={
                "Origin": ORIGIN, "Content-Length": str(upload)
            }) as resp:
                assert resp.status == 200 and int(await resp.text()) == upload, resp.status
    elapsed = time.monotonic() - started
    stop.set()
    peak = await sampler
    return before, peak, elapsed


async def main_async(args: argparse.Namespace) -> int:
    size = int(args.gib * (1 << 30))
    upstream, upstream_port = await start_upstream(size)
    tmp = Path(tempfile.mkdtemp(prefix="corsproxy-memory-"))
    proc, port = await start_proxy(upstream_port, args.workers, tmp / "proxy.log")
    url = f"http://127.0.0.1:{port}"
    rows = ["| measurement | corsproxy RSS (per worker) |", "|---|---|"]
    try:
        pids = proxy_pids(proc, args.workers)
        async with aiohttp.ClientSession() as session:
            for _ in range(20):
                async with session.get(url + "/small.json", headers={"Origin": ORIGIN}) as r:
                    await r.read()
        await asyncio.sleep(0.5)
        rows.append(rss_line("idle (after 20 requests)", pids))
        if args.workers > 1:
            rows.append(rss_line("supervisor process", [proc.pid]))

        for label, upload in (("download", None), ("upload", size)):
            before, peak, elapsed = await transfer(url, pids, upload)
            rate = size / elapsed / (1 << 20)
            rows.append(
                f"| {args.gib:g} GiB {label} ({rate:.0f} MiB/s): RSS before, peak, rise | "
                f"{mib(before)}, {mib(peak)}, +{mib(peak - before)} |"
            )

        writers = await open_connections(port, args.connections)
        await asyncio.sleep(0.5)
        rows.append(rss_line(f"{len(writers)} open keep-alive connections", pids))
        for writer in writers:
            writer.close()
        writers.clear()
        await asyncio.sleep(1.0)
        rows.append(rss_line("after those connections closed", pids))
        rows.append("| peak over the whole run (VmHWM) | "
                    + " + ".join(mib(status_kib(p)["VmHWM"]) for p in pids) + " |")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(20):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
        await upstream.cleanup()
    print("\n".join(rows))
    print(f"\n(proxy log: {tmp / 'proxy.log'}; exit code {proc.returncode})")
    return 0 if proc.returncode == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=10_000,
                        help="keep-alive connections to hold open (10000)")
    parser.add_argument("--gib", type=float, default=1.0,
                        help="size of the upload and of the download in GiB (1)")
    parser.add_argument("--workers", type=int, default=1, help="corsproxy workers (1)")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.connections + 1024
    if soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))  # the proxy inherits it
        soft = new
    if args.connections + 200 > soft:
        args.connections = max(0, soft - 200)
        print(f"RLIMIT_NOFILE hard limit {hard}: holding {args.connections} connections")
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main_async(args))
    return uvloop.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
