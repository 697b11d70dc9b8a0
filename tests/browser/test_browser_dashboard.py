"""The admin page (``GET /`` on the admin listener) in a real Chromium.

Every proxy is the real ``python -m corsproxy run`` (the harness's
:class:`~tests.browser.browser_harness.ProxyProcess`) with ``admin.port: 0``; the
page is opened on the admin listener and watched for console messages, page
errors, failed or refused requests, dialogs, and any request that leaves the admin
listener (those are aborted: the page must work with nothing but loopback).

- the page shows the policy of every route, report-only and overrides marked;
- the explain form shows what ``corsproxy explain --json`` prints (the CLI run as a
  subprocess on the same config file);
- a denial made a moment before, through the proxy, from a browser page and from a
  client sending an Origin full of HTML, appears without reloading the page, as
  plain text, and no script ran; so does a report-only disagreement;
- a reload of the config file shows on the page without reloading it.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from .browser_harness import REPO_ROOT, Tab

pytestmark = pytest.mark.browser

HOSTILE = '"><img src=x onerror=alert(1)>'
#: The page refreshes every 5 s; this bounds waiting for new data to show.
SHOWS_WITHIN = 15_000
ADMIN = {"host": "127.0.0.1", "port": 0}


def admin_url(proxy) -> str:
    """The admin listener's URL, from the proxy's ``listening`` event."""
    deadline = time.monotonic() + 10
    while True:
        for record in proxy.log_records():
            if record.get("event") == "listening" and record.get("admin_port"):
                return f"http://127.0.0.1:{record['admin_port']}"
        if time.monotonic() > deadline:
            raise AssertionError(f"no listening event with an admin port:\n{proxy.output()}")
        time.sleep(0.05)


class Watched:
    """A tab on the admin page, with everything that could go wrong recorded; any
    request to another origin than the admin listener is aborted and recorded."""

    def __init__(self, world, tab: Tab, admin: str) -> None:
        self.world = world
        self.tab = tab
        self.page = tab.page
        self.admin = admin
        self.console: list[tuple[str, str]] = []
        self.errors: list[str] = []
        self.failed: list[tuple[str, str | None]] = []
        self.refused: list[tuple[str, int]] = []
        self.dialogs: list[str] = []
        self.elsewhere: list[str] = []
        self.requested: list[str] = []
        world.loop.run(self._watch())

    async def _watch(self) -> None:
        page = self.page
        page.on("console", lambda m: self.console.append((m.type, m.text)))
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("requestfailed", lambda r: self.failed.append((r.url, r.failure)))
        page.on("response", self._response)
        page.on("dialog", self._dialog)
        await self.tab.context.route("**/*", self._route)

    def _response(self, response) -> None:
        if response.status >= 400:
            self.refused.append((response.url, response.status))

    async def _dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        await dialog.dismiss()

    async def _route(self, route) -> None:
        url = route.request.url
        self.requested.append(url)
        if url == self.admin or url.startswith(self.admin + "/"):
            await route.continue_()
        else:
            self.elsewhere.append(url)
            await route.abort()

    # -- driving the page -------------------------------------------------------------

    def run(self, coro):
        return self.world.loop.run(coro)

    def open(self) -> None:
        assert self.tab.open(self.admin + "/") == 200
        self.run(self.page.wait_for_selector("#facts dd"))

    def evaluate(self, script: str, arg=None):
        return self.run(self.page.evaluate(script, arg))

    def texts(self, selector: str) -> list[str]:
        return self.evaluate("s => [...document.querySelectorAll(s)].map(e => e.textContent)",
                             selector)

    def wait_until(self, script: str, arg=None) -> None:
        self.run(self.page.wait_for_function(script, arg=arg, timeout=SHOWS_WITHIN))

    def assert_clean(self) -> None:
        assert self.console == [], self.console
        assert self.errors == [], self.errors
        assert self.failed == [], self.failed
        assert self.refused == [], self.refused
        assert self.dialogs == [], self.dialogs
        assert self.elsewhere == [], self.elsewhere


@pytest.fixture
def watched(world, tab):
    """``watched(proxy)``: the admin page of ``proxy`` open in ``tab``, watched."""

    def open_page(proxy) -> Watched:
        page = Watched(world, tab, admin_url(proxy))
        page.open()
        return page

    return open_page


def cli_explain(proxy, params: dict) -> dict:
    """``python -m corsproxy explain --config <the proxy's file> --json ...``."""
    args = []
    for name, value in params.items():
        option = "--" + name.replace("_", "-")
        args += [option] if value is True else [option, value]
    result = subprocess.run(
        [sys.executable, "-m", "corsproxy", "explain", "--config", str(proxy.config_path),
         "--json", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def send(proxy, path: str, origin: str) -> http.client.HTTPResponse:
    """One GET through the proxy with that Origin (a client, not a browser: any value)."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        conn.request("GET", path, headers={"Origin": origin})
        response = conn.getresponse()
        response.read()
        return response
    finally:
        conn.close()


# ---------------------------------------------------------------------------


def test_the_page_shows_every_route_with_report_only_and_overrides(world, start_proxy, watched):
    app = world.page_origin("app.allowed.test")
    proxy = start_proxy(
        cors={"allow_origins": [app]},
        routes=[
            {"path": "/strict", "cors": {"enforce": True, "allow_methods": ["GET", "PUT"]}},
            {"path": "/try", "cors": {"report_only": True}},
        ],
        admin=ADMIN,
    )
    page = watched(proxy)
    page.run(page.page.wait_for_selector('article[data-route="/try"]'))
    assert page.texts("article.policy h3") == [
        "(top-level cors)", "/strict (routes[0])", "/try (routes[1])"]
    overridden = page.evaluate("""() => Object.fromEntries(
        [...document.querySelectorAll("article.policy")].map(a => [a.dataset.route,
          [...a.querySelectorAll("tr.override")].map(tr => tr.dataset.field)]))""")
    assert overridden == {"": [], "/strict": ["allow_methods", "enforce"],
                          "/try": ["report_only"]}
    chips = page.evaluate("""() => Object.fromEntries(
        [...document.querySelectorAll("article.policy")].map(a => [a.dataset.route,
          [...a.querySelectorAll(".policy-head .chip")].map(c => c.textContent)]))""")
    assert chips == {"": [], "/strict": ["enforce", "2 overrides"],
                     "/try": ["report-only", "1 override"]}
    assert page.evaluate(
        "() => document.querySelector('article[data-route=\"/try\"]')"
        ".classList.contains('report-only')")
    assert app in page.texts('article[data-route=""] tr[data-field="allow_origins"] td')[0]
    assert page.texts("#readiness") == ["ready"]
    assert "0 succeeded, 0 failed" in page.texts("#reload-status")[0]
    assert page.texts("#denied-list .empty") == ["No denied request since the proxy started."]
    page.assert_clean()
    # Everything came from the admin listener: its files and its JSON, nothing else.
    paths = {url[len(page.admin):] for url in page.requested}
    assert {"/", "/ui/dashboard.js", "/ui/dashboard.css", "/api/status", "/api/policy",
            "/denied", "/api/report"} <= paths


def test_the_explain_form_answers_what_the_cli_prints(world, start_proxy, watched):
    app = world.page_origin("app.allowed.test")
    proxy = start_proxy(
        cors={"allow_origins": [app]},
        routes=[
            {"path": "/strict", "cors": {"enforce": True, "allow_methods": ["GET", "PUT"],
                                         "allow_headers": ["X-Token"]}},
            {"path": "/try", "cors": {"report_only": True, "allow_private_network": True}},
        ],
        admin=ADMIN,
    )
    page = watched(proxy)
    cases = [
        {"origin": app, "request_method": "PUT", "path": "/strict/x",
         "request_headers": "x-token"},
        {"origin": "http://evil.test", "request_method": "DELETE", "path": "/a"},
        {"origin": HOSTILE, "path": "/strict/x", "method": "POST"},
        {"origin": app, "websocket": True, "path": "/ws"},
        {"origin": app, "request_method": "GET", "request_private_network": True,
         "path": "/try/printer", "host": "proxy.test"},
        {"path": "/"},
    ]
    fields = {"origin": "#ex-origin", "path": "#ex-path", "method": "#ex-method",
              "request_method": "#ex-request-method", "request_headers": "#ex-request-headers",
              "host": "#ex-host"}
    checks = {"websocket": "#ex-websocket", "request_private_network": "#ex-private-network"}
    p = page.page
    for params in cases:
        expected = cli_explain(proxy, params)
        page.run(p.click("#ex-reset"))
        assert page.texts("#explain-result") == [""]
        for name, value in params.items():
            if name in checks:
                page.run(p.check(checks[name]))
            elif name != "path":
                page.run(p.fill(fields[name], value))
        page.run(p.fill("#ex-path", params["path"]))
        page.run(p.click("#ex-submit"))
        page.run(p.wait_for_selector("#explain-verdict"))
        assert page.texts("#explain-verdict") == [expected["verdict"]], params
        headers = page.evaluate("""() => [...document.querySelectorAll("#explain-headers tr")]
            .map(tr => [tr.querySelector("th").textContent, tr.querySelector("td").textContent])""")
        assert dict(headers) == expected["headers"], params
        assert page.texts("#explain-reasons li") == expected["reasons"], params
        # The whole object, as the page received it, is the CLI's.
        assert json.loads(page.texts("#explain-json")[0]) == expected, params
        assert page.texts("#explain-body") == ([expected["body"]] if expected["body"] else [])
    # A request that can't be made: the sentence, not a broken page.
    page.run(p.click("#ex-reset"))
    page.run(p.fill("#ex-path", "no-slash"))
    page.run(p.click("#ex-submit"))
    page.run(p.wait_for_selector("#explain-error"))
    assert page.texts("#explain-error") == ["the path 'no-slash' must start with /"]
    # That 400 is the one refused request the page made, on purpose.
    assert [status for _, status in page.refused] == [400]
    page.refused.clear()
    page.console[:] = [m for m in page.console if "400 (Bad Request)" not in m[1]]
    page.assert_clean()


def test_a_denial_a_moment_ago_shows_as_plain_text_and_runs_nothing(world, start_proxy,
                                                                    watched):
    app = world.page_origin("app.allowed.test")
    evil = world.page_origin("evil.test")
    proxy = start_proxy(
        cors={"allow_origins": [app]},
        # The test upstream echoes any Origin into ACAO on this path: on a report-only
        # route that is a disagreement (the upstream allows what the policy refuses).
        routes=[{"path": "/naive-cacheable", "cors": {"report_only": True}}],
        admin=ADMIN,
    )
    page = watched(proxy)
    assert page.texts("#denied-list .empty") == ["No denied request since the proxy started."]
    page.evaluate("() => { window.stillTheSamePage = true; }")

    # A real browser page on another origin calls the API: refused by the browser.
    other = Tab(world)
    try:
        other.open(evil + "/")
        got = other.fetch(f"{proxy.url}/from-a-page")
        assert (got.ok, got.error) == (False, "TypeError")
    finally:
        other.close()
    # A client sends an Origin full of HTML (browsers never would; anyone can).
    response = send(proxy, "/from-a-client", HOSTILE)
    assert (response.status, response.getheader("Access-Control-Allow-Origin")) == (200, None)
    response = send(proxy, "/naive-cacheable", HOSTILE)
    assert response.getheader("Access-Control-Allow-Origin") == HOSTILE  # passed through

    # Both show up without reloading the page (its refresh), as text.
    page.wait_until("""([a, b]) => {
        const cells = [...document.querySelectorAll("#denied-table td.origin")]
          .map(td => td.textContent);
        return cells.includes(a) && cells.includes(b);
    }""", [evil, HOSTILE])
    page.wait_until("""(a) => [...document.querySelectorAll("#report-table td.origin")]
        .some(td => td.textContent === a)""", HOSTILE)
    assert page.evaluate("() => window.stillTheSamePage") is True

    rows = page.evaluate("""() => [...document.querySelectorAll("#denied-table tbody tr")]
        .map(tr => [...tr.cells].slice(0, 4).map(td => td.textContent))""")
    assert [evil, "(top-level cors)", "origin", "1"] in rows
    assert [HOSTILE, "(top-level cors)", "origin", "1"] in rows
    # A report-only route counts what its policy would refuse as denied too.
    assert [HOSTILE, "/naive-cacheable", "origin", "1"] in rows
    report = page.evaluate("""() => [...document.querySelectorAll("#report-table tbody tr")]
        .map(tr => [...tr.cells].slice(0, 4).map(td => td.textContent)
          .concat([tr.cells[4].textContent]))""")
    assert len(report) == 1
    assert report[0][:4] == [HOSTILE, "/naive-cacheable", "actual", "policy stricter"]
    assert HOSTILE in report[0][4]
    # Text only: the cells hold no element, and nothing was injected or ran.
    injected = page.evaluate("""(value) => ({
        images: [...document.images].map(i => i.getAttribute("src")),
        handlers: document.querySelectorAll("[onerror], [onload], [onclick]").length,
        elementsInOriginCells: [...document.querySelectorAll("td.origin")]
          .filter(td => td.textContent === value).map(td => td.childElementCount),
        detailElements: [...document.querySelectorAll("#report-table td.detail")]
          .map(td => td.childElementCount),
    })""", HOSTILE)
    assert injected == {"images": ["/ui/icon.svg"], "handlers": 0,
                        "elementsInOriginCells": [0, 0, 0], "detailElements": [0]}
    assert page.texts("#denied-count") == ["(3)"]
    page.assert_clean()


def test_a_reload_shows_on_the_open_page(world, start_proxy, watched):
    app = world.page_origin("app.allowed.test")
    proxy = start_proxy(cors={"allow_origins": [app]}, admin=ADMIN)
    page = watched(proxy)
    assert page.texts("article.policy h3") == ["(top-level cors)"]
    config = dict(proxy.config, routes=[{"path": "/beta", "cors": {"report_only": True}}])
    new = proxy.config_path.with_suffix(".new")
    new.write_text(yaml.safe_dump(config, sort_keys=False))
    os.replace(new, proxy.config_path)  # the proxy's poller sees it within a second
    page.wait_until("() => document.querySelector('article[data-route=\"/beta\"]') !== null")
    page.wait_until("() => document.querySelector('#reload-status').textContent"
                    ".includes('1 succeeded, 0 failed')")
    assert page.texts("article.policy h3") == ["(top-level cors)", "/beta (routes[0])"]
    assert page.texts("#reload-status .chip") == ["success"]
    page.assert_clean()
