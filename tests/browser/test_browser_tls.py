"""HTTPS in a real browser: Chromium loads a page over TLS from the proxy and the
page's ``fetch()`` to another https origin on the same proxy passes CORS.

The proxy (``python -m corsproxy run`` with ``listen.tls``, a certificate for
``app.test`` and ``api.test`` from a trustme CA) forwards to a small upstream that
serves the suite's ``page.html`` at ``/`` and JSON elsewhere. Chromium maps
``*.test`` to 127.0.0.1, so ``https://app.test:PORT`` and ``https://api.test:PORT``
are two genuine origins on one listener. The browser context ignores certificate
errors (``ignore_https_errors``): the test CA is not in Chromium's store. No wire
tap here: it would see only TLS records.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
import yaml
from aiohttp import web

from .browser_harness import PAGE_HTML, REPO_ROOT, Tab, World, free_port

pytestmark = pytest.mark.browser

START_TIMEOUT = 15.0


class PageUpstream:
    """``/``: the suite's page; anything else: JSON ``{"method", "path"}``. Records
    (method, path, Origin, X-Forwarded-Proto) of every request."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str | None, str | None]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> PageUpstream:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        self.seen.append((request.method, request.path, request.headers.get("Origin"),
                          request.headers.get("X-Forwarded-Proto")))
        if request.path == "/":
            return web.Response(text=PAGE_HTML, content_type="text/html",
                                headers={"Cache-Control": "no-store"})
        if request.path == "/favicon.ico":
            return web.Response(status=204)
        return web.json_response({"method": request.method, "path": request.path},
                                 headers={"Cache-Control": "no-store", "X-Total": "7"})


class TlsProxy:
    """``python -m corsproxy run`` with listen.tls on a free port; stopped by PID."""

    def __init__(self, directory: Path, upstream_url: str, ca: trustme.CA) -> None:
        self.directory = directory
        self.upstream_url = upstream_url
        self.cert = ca.issue_cert("app.test", "api.test", "evil.test")
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = directory / "corsproxy.log"

    def start(self) -> TlsProxy:
        tls = self.directory / "tls"
        tls.mkdir(parents=True, exist_ok=True)
        self.cert.cert_chain_pems[0].write_to_path(str(tls / "cert.pem"))
        self.cert.private_key_pem.write_to_path(str(tls / "key.pem"))
        for _attempt in range(3):  # a free port can be taken before the proxy binds it
            self.port = free_port()
            if self._spawn():
                return self
        raise AssertionError(f"corsproxy never listened:\n{self.output()}")

    def _spawn(self) -> bool:
        config = {
            "listen": {"host": "127.0.0.1", "port": self.port,
                       "tls": {"cert_file": "tls/cert.pem", "key_file": "tls/key.pem"}},
            "upstream": {"url": self.upstream_url, "connect_timeout": 2, "timeout": 10},
            "cors": {"allow_origins": [self.origin("app")], "allow_methods": ["GET", "PUT"],
                     "allow_headers": ["X-Token"], "expose_headers": ["X-Total"]},
            "admin": {"port": None},
        }
        path = self.directory / "corsproxy.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "corsproxy", "run", "--config", str(path),
                 "--log-format", "json"],
                cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if any(r.get("event") == "listening" for r in self.records()):
                return True
            if self.proc.poll() is not None:
                if "in use" in self.output():
                    return False
                raise AssertionError(f"corsproxy exited before listening:\n{self.output()}")
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"corsproxy did not listen within {START_TIMEOUT} s:\n"
                             f"{self.output()}")

    def origin(self, name: str) -> str:
        return f"https://{name}.test:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def records(self) -> list[dict]:
        out = []
        for line in self.output().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    out.append(record)
        return out

    def access(self, path: str, count: int, timeout: float = 5.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in self.records() if "method" in r and r.get("path") == path]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


class HttpsTab(Tab):
    """A :class:`Tab` whose context accepts the test CA's certificates."""

    def __init__(self, world: World) -> None:  # not super().__init__: it makes its own context
        self.world = world
        self.context = world.loop.run(world.browser.new_context(ignore_https_errors=True))
        world.loop.call(self.context.set_default_timeout, 10_000)
        self.page = world.loop.run(self.context.new_page())


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def page_upstream(world: World) -> Iterator[PageUpstream]:
    server = world.loop.run(PageUpstream().start())
    yield server
    world.loop.run(server.stop())


@pytest.fixture
def tls_proxy(tmp_path: Path, page_upstream: PageUpstream, ca: trustme.CA) -> Iterator[TlsProxy]:
    proxy = TlsProxy(tmp_path, page_upstream.url, ca).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def https_tab(world: World) -> Iterator[HttpsTab]:
    tab = HttpsTab(world)
    yield tab
    tab.close()


def test_page_over_https_fetches_an_allowed_cross_origin_https_endpoint(
    tls_proxy: TlsProxy, page_upstream: PageUpstream, https_tab: HttpsTab
) -> None:
    app, api = tls_proxy.origin("app"), tls_proxy.origin("api")
    assert https_tab.open(app + "/") == 200
    assert https_tab.world.loop.run(https_tab.page.evaluate("self.origin")) == app

    got = https_tab.fetch(api + "/api/data")
    assert got.ok and got.status == 200, got
    assert got.origin == app
    assert got.type == "cors"
    assert json.loads(got.body) == {"method": "GET", "path": "/api/data"}
    assert got.headers.get("x-total") == "7"  # exposed by expose_headers

    # A non-simple request: the preflight and the PUT, both over TLS.
    put = https_tab.fetch(api + "/api/data", method="PUT", body="{}",
                          headers={"X-Token": "t", "Content-Type": "application/json"})
    assert put.ok and put.status == 200, put
    assert json.loads(put.body) == {"method": "PUT", "path": "/api/data"}

    seen = [s for s in page_upstream.seen if s[1] == "/api/data"]
    assert seen == [("GET", "/api/data", app, "https"), ("PUT", "/api/data", app, "https")]
    records = tls_proxy.access("/api/data", 3)
    assert [(r["method"], r["status"], r["origin"], r["cors"]) for r in records] == [
        ("GET", 200, app, "allowed"),
        ("OPTIONS", 200, app, "allowed"),
        ("PUT", 200, app, "allowed"),
    ], records


def test_page_from_an_origin_not_allowed_cannot_read_the_https_endpoint(
    tls_proxy: TlsProxy, page_upstream: PageUpstream, https_tab: HttpsTab
) -> None:
    evil, api = tls_proxy.origin("evil"), tls_proxy.origin("api")
    assert https_tab.open(evil + "/") == 200
    got = https_tab.fetch(api + "/api/data")
    assert (got.ok, got.error) == (False, "TypeError"), got
    records = tls_proxy.access("/api/data", 1)
    assert [(r["status"], r["origin"], r["cors"]) for r in records] == [
        (200, evil, "denied")], records
