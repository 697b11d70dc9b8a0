"""Fixtures for the real-browser suite (``python -m pytest -m browser``).

- ``browser_world`` (package scope): one Chromium, the page server, the recording
  upstream; started for the first browser test, stopped after the last one.
- ``tab``: a fresh browser context and page per test.
- ``start_proxy``: starts ``python -m corsproxy run`` with a per-test policy.

The suite must run, not skip, in CI: with ``CI`` set, a missing Chromium or
Playwright is a failure with a message saying how to install it.
"""

from __future__ import annotations

import os

import pytest

from .browser_harness import CHROMIUM, ProxyProcess, Tab, World


def _unavailable(why: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"browser suite cannot run in CI: {why}", pytrace=False)
    pytest.skip(why)


@pytest.fixture(scope="package")
def browser_world():
    """Chromium and the servers, shared by the browser tests, stopped after the last one."""
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        _unavailable(
            f"Chromium not found at {CHROMIUM}; install it with `apt-get install -y chromium` "
            f"or point CORSPROXY_CHROMIUM at a Chromium binary"
        )
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        _unavailable('Playwright for Python is missing; install it with pip install -e ".[test]"')
    world = World()
    try:
        world.start()
    except Exception as exc:
        world.stop()
        _unavailable(f"could not launch Chromium at {CHROMIUM}: {exc}")
    yield world
    world.stop()


@pytest.fixture
def world(browser_world):
    """The session world, with the upstream's record cleared for this test."""
    browser_world.reset()
    return browser_world


@pytest.fixture
def upstream(world):
    return world.upstream


@pytest.fixture
def tab(world):
    t = Tab(world)
    yield t
    t.close()


@pytest.fixture
def start_proxy(world, tmp_path):
    """``start_proxy(cors={...}, routes=[...], upstream_url=None, upstream_timeout=10.0)``.

    Returns a started :class:`ProxyProcess`.

    Writes a config file (listen/upstream/cors/routes) and starts the CLI on it.
    ``upstream_url`` defaults to the recording upstream.
    """
    started: list[ProxyProcess] = []

    def start(
        cors: dict,
        routes: list | None = None,
        upstream_url: str | None = None,
        upstream_timeout: float = 10.0,
        **extra,
    ):
        config = {
            "upstream": {
                "url": upstream_url or world.upstream.url,
                "connect_timeout": 2.0,
                "timeout": upstream_timeout,
            },
            "cors": cors,
        }
        if routes:
            config["routes"] = routes
        config.update(extra)
        proxy = ProxyProcess(world, tmp_path, config)
        started.append(proxy)
        return proxy.start()

    yield start
    for proxy in started:
        proxy.stop()
