"""The browser suite's world: Chromium, a page server, a recording upstream, proxies.

Everything asynchronous (the aiohttp servers, the wire taps, and Playwright's async
API) runs on one event loop in a background thread, so the tests are plain
synchronous pytest functions and never meet pytest-asyncio's loops. Each proxy
is the real thing: ``python -m corsproxy run --config FILE --log-format json``
in a subprocess, with a :class:`~wiretap.WireTap` relay in front of it.

Addresses: every server listens on 127.0.0.1 only. Chromium is started with
``--host-resolver-rules=MAP *.test 127.0.0.1``, so a page at
``http://app.allowed.test:<page port>`` is a genuine origin of that name.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from aiohttp import web
from multidict import CIMultiDict

from .wiretap import Exchange, WireTap

HERE = Path(__file__).resolve().parent
#: The checkout under test: proxies start with this as working directory, so
#: ``python -m corsproxy`` runs this tree's code wherever pytest was started from.
REPO_ROOT = HERE.parent.parent
PAGE_HTML = (HERE / "page.html").read_text(encoding="utf-8")
CHROMIUM = os.environ.get("CORSPROXY_CHROMIUM", "/usr/bin/chromium")
#: The flags the machine needs (no sandbox as root, no background traffic on a
#: closed network) plus the host map that gives us real origins for any name.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP *.test 127.0.0.1",
]
#: Page-side bound on one fetch (page.html aborts after 8 s); this is the outer one.
CALL_TIMEOUT = 30.0
PROXY_START_TIMEOUT = 15.0
COOKIE = "corsproxy_sid=s3cret"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopThread:
    """An asyncio loop in a daemon thread; ``run`` waits for a coroutine's result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = CALL_TIMEOUT):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn, *args):
        async def wrapper():
            return fn(*args)

        return self.run(wrapper())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()  # else its sockets are left to the GC (a ResourceWarning)


# -- servers -------------------------------------------------------------------


async def _start_site(app: web.Application, port: int = 0) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


class PageServer:
    """Serves page.html for any Host name (so any ``*.test`` origin works).

    ``/`` the page; ``/cookie`` the page plus ``Set-Cookie: corsproxy_sid=s3cret``
    (host-only cookie on the page's host: on ``localhost`` it also goes to a
    proxy on another ``localhost`` port, the same site).
    """

    def __init__(self) -> None:
        self.port = 0
        self.runner: web.AppRunner | None = None

    async def start(self) -> PageServer:
        app = web.Application()
        app.router.add_get("/", self._page)
        app.router.add_get("/cookie", self._page_with_cookie)
        app.router.add_get("/favicon.ico", self._no_icon)
        self.runner, self.port = await _start_site(app)
        return self

    async def _page(self, request: web.Request) -> web.Response:
        return web.Response(
            text=PAGE_HTML, content_type="text/html", headers={"Cache-Control": "no-store"}
        )

    async def _no_icon(self, request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def _page_with_cookie(self, request: web.Request) -> web.Response:
        response = await self._page(request)
        response.headers["Set-Cookie"] = f"{COOKIE}; Path=/; SameSite=Lax"
        return response

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@dataclass
class Seen:
    """One request as the upstream received it (raw header lines, in order)."""

    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes

    def get_all(self, name: str) -> list[str]:
        key = name.lower()
        return [v for k, v in self.headers if k.lower() == key]

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        return values[0] if values else None


class RecordingUpstream:
    """The API behind the proxy. Records every request (OPTIONS too) in ``seen``.

    Behaviour by path:

    - ``/status/<code>``: that status, body ``upstream status <code>``.
    - ``/slow``: answers after 5 s (longer than the suite's proxy ``upstream.timeout``).
    - ``/expose``: sends ``X-Total: 7`` and ``X-Secret: hidden``.
    - ``/dup-acao``: two ``Access-Control-Allow-Origin: *`` lines (a broken upstream).
    - ``/naive-cacheable``: ``Cache-Control: public, max-age=600``; echoes the Origin
      into ACAO when there is one, and sends no ``Vary`` (a naive upstream).
    - anything else: 200, JSON ``{"method", "path", "n"}``.
    """

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.port = 0
        self.runner: web.AppRunner | None = None
        self._count = itertools.count(1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> RecordingUpstream:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner, self.port = await _start_site(app)
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def requests(self, path: str | None = None, method: str | None = None) -> list[Seen]:
        return [
            s
            for s in self.seen
            if (path is None or s.path == path) and (method is None or s.method == method)
        ]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        n = next(self._count)
        self.seen.append(
            Seen(
                request.method,
                request.path,
                request.query_string,
                [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers],
                body,
            )
        )
        path = request.path
        if path.startswith("/status/"):
            code = int(path.split("/")[2])
            return web.Response(status=code, text=f"upstream status {code}")
        if path == "/slow":
            await asyncio.sleep(5)
            return web.Response(text="too late")
        if path == "/expose":
            return web.Response(text="exposed", headers={"X-Total": "7", "X-Secret": "hidden"})
        if path == "/dup-acao":
            headers = CIMultiDict(
                [("Access-Control-Allow-Origin", "*"), ("Access-Control-Allow-Origin", "*")]
            )
            return web.Response(text="two ACAO lines", headers=headers)
        if path == "/naive-cacheable":
            headers = CIMultiDict([("Cache-Control", "public, max-age=600")])
            if "Origin" in request.headers:
                headers["Access-Control-Allow-Origin"] = request.headers["Origin"]
            return web.Response(text=f"copy {n}", headers=headers)
        payload = {"method": request.method, "path": path, "n": n}
        return web.json_response(payload, headers={"Cache-Control": "no-store"})


# -- the proxy under test --------------------------------------------------------


class ProxyProcess:
    """``python -m corsproxy run`` on a free port, with a wire tap in front.

    ``url`` is what pages fetch (the tap); ``direct_url`` is the proxy's own port.
    """

    _ids = itertools.count(1)

    def __init__(self, world: World, workdir: Path, config: dict) -> None:
        self.world = world
        self.config = config
        n = next(self._ids)
        self.config_path = workdir / f"corsproxy-{n}.yaml"
        self.stdout_path = workdir / f"corsproxy-{n}.stdout"
        self.stderr_path = workdir / f"corsproxy-{n}.stderr"
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.tap: WireTap | None = None

    @property
    def url(self) -> str:
        return f"http://localhost:{self.tap.port}"

    @property
    def direct_url(self) -> str:
        return f"http://localhost:{self.port}"

    def start(self) -> ProxyProcess:
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        for _attempt in range(3):  # a free port can be taken before the proxy binds it
            self.port = free_port()
            if self._spawn():
                break
        else:
            raise AssertionError(f"corsproxy never started listening:\n{self.output()}")
        self.tap = self.world.loop.run(WireTap(self.port).start())
        return self

    def _spawn(self) -> bool:
        cmd = [
            sys.executable,
            "-m",
            "corsproxy",
            "run",
            "--config",
            str(self.config_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-format",
            "json",
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=err, env=env, cwd=REPO_ROOT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + PROXY_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                text = self.output()
                if "in use" in text.lower():
                    return False
                raise AssertionError(
                    f"corsproxy exited with code {self.proc.returncode} before listening.\n"
                    f"command: {' '.join(cmd)}\nconfig:\n{self.config_path.read_text()}\n{text}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return True
            time.sleep(0.05)
        self.stop()
        raise AssertionError(
            f"corsproxy did not listen on 127.0.0.1:{self.port} within "
            f"{PROXY_START_TIMEOUT} s.\n{self.output()}"
        )

    def output(self) -> str:
        parts = []
        for label, path in (("stdout", self.stdout_path), ("stderr", self.stderr_path)):
            if path.exists():
                parts.append(f"--- corsproxy {label} ---\n{path.read_text(errors='replace')}")
        return "\n".join(parts)

    def log_records(self) -> list[dict]:
        """The JSON log lines the proxy wrote so far (stdout and stderr)."""
        records = []
        for path in (self.stderr_path, self.stdout_path):
            if not path.exists():
                continue
            for line in path.read_text(errors="replace").splitlines():
                line = line.strip()
                if line.startswith("{"):
                    with contextlib.suppress(ValueError):
                        records.append(json.loads(line))
        return records

    def access_records(self, path: str, count: int, timeout: float = 5.0) -> list[dict]:
        """The proxy's JSON access-log records for ``path``.

        A line is written when the proxy has finished a request, which can be just
        after the browser got the response; so this waits (bounded) until at least
        ``count`` records are there, then returns what there is.
        """
        deadline = time.monotonic() + timeout
        while True:
            records = [r for r in self.log_records() if "method" in r and r.get("path") == path]
            if len(records) >= count or time.monotonic() > deadline:
                return records
            time.sleep(0.02)

    def exchanges(self, path: str | None = None) -> list[Exchange]:
        """Exchanges seen by the tap, optionally only those for one path."""
        items = self.world.loop.call(list, self.tap.exchanges)
        return [e for e in items if path is None or e.request.path == path]

    def preflights(self, path: str | None = None) -> list[Exchange]:
        return [e for e in self.exchanges(path) if e.is_preflight]

    def stop(self) -> None:
        if self.tap is not None:
            with contextlib.suppress(Exception):
                self.world.loop.run(self.tap.stop(), timeout=10)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# -- the browser side --------------------------------------------------------------


@dataclass
class Fetched:
    """What the page saw from one ``fetch()``: a readable response, or an error name."""

    ok: bool
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: str = ""
    type: str | None = None
    error: str | None = None
    message: str = ""
    origin: str = ""

    @classmethod
    def from_js(cls, data: dict) -> Fetched:
        return cls(
            ok=data["ok"],
            status=data.get("status"),
            headers=data.get("headers") or {},
            body=data.get("body") or "",
            type=data.get("type"),
            error=data.get("error"),
            message=data.get("message") or "",
            origin=data.get("origin") or "",
        )


class Tab:
    """One page in a fresh browser context, driven synchronously."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.context = world.loop.run(world.browser.new_context())
        world.loop.call(self.context.set_default_timeout, 10_000)
        self.page = world.loop.run(self.context.new_page())

    def open(self, url: str) -> int | None:
        """Navigate the tab; returns the HTTP status of the navigation."""
        response = self.world.loop.run(self.page.goto(url))
        return response.status if response is not None else None

    def text(self) -> str:
        return self.world.loop.run(self.page.inner_text("body"))

    def fetch(self, url: str, **init) -> Fetched:
        """``fetch(url, init)`` from the page's own origin."""
        data = self.world.loop.run(
            self.page.evaluate("([url, init]) => window.probe(url, init)", [url, init])
        )
        return Fetched.from_js(data)

    def fetch_in_frame(self, url: str, sandbox: str | None = "allow-scripts", **init) -> Fetched:
        """``fetch()`` from a srcdoc iframe; sandboxed (opaque origin) unless ``sandbox=None``."""
        data = self.world.loop.run(
            self.page.evaluate(
                "([url, init, sandbox]) => window.probeInFrame(url, init, sandbox)",
                [url, init, sandbox],
            )
        )
        return Fetched.from_js(data)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.world.loop.run(self.context.close(), timeout=10)


class World:
    """Session-wide: the loop thread, Chromium, the page server and the upstream."""

    def __init__(self) -> None:
        self.loop = LoopThread()
        self.pages = PageServer()
        self.upstream = RecordingUpstream()
        self.playwright = None
        self.browser = None

    def start(self) -> World:
        from playwright.async_api import async_playwright

        self.loop.run(self.pages.start())
        self.loop.run(self.upstream.start())
        self.playwright = self.loop.run(async_playwright().start())
        self.browser = self.loop.run(
            self.playwright.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, timeout=30_000
            ),
            timeout=60,
        )
        return self

    def page_origin(self, host: str = "localhost") -> str:
        """The origin of the test page served under ``host`` (any ``*.test`` name works)."""
        return f"http://{host}:{self.pages.port}"

    def reset(self) -> None:
        self.loop.call(self.upstream.seen.clear)

    def stop(self) -> None:
        for step in (
            lambda: self.browser and self.loop.run(self.browser.close(), timeout=20),
            lambda: self.playwright and self.loop.run(self.playwright.stop(), timeout=20),
            lambda: self.loop.run(self.upstream.stop()),
            lambda: self.loop.run(self.pages.stop()),
        ):
            with contextlib.suppress(Exception):
                step()
        self.loop.stop()
