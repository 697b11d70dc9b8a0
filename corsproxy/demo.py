"""``corsproxy demo``: a sample API with the proxy in front of it, and curl commands to try.

Needs nothing but the installed package: the policy is the packaged copy of
``config/demo.yaml`` (``corsproxy/demo.yaml``, kept identical by a test), so the
demo runs the same from a source checkout and from a wheel.

The sample API (aiohttp, in memory) on ``upstream_port``:

- ``GET /api/items``, ``POST /api/items``, ``GET|PUT|DELETE /api/items/{id}``: JSON;
- ``GET /api/public/status``: readable by any origin (the ``/api/public`` route);
- ``GET /api/legacy-cors``: sets its own ``Access-Control-Allow-Origin: *``, to show
  that the proxy removes an upstream's CORS headers and sends only its own.

Every response echoes the ``X-Request-Id`` corsproxy forwarded (listed in
``expose_headers``, so the page can read it and find the request in the log).
"""

from __future__ import annotations

import asyncio
import itertools
import shlex
import signal
import sys
from importlib import resources
from typing import Any

from aiohttp import web

from .config import Config, ConfigError, parse_config
from .logs import setup_logging
from .server import describe_error, new_event_loop, serve

__all__ = ["demo_config", "demo_policy_text", "run_demo", "sample_api"]

ALLOWED_ORIGIN = "https://app.example.com"
DENIED_ORIGIN = "https://evil.example"


def demo_policy_text() -> str:
    """The demo policy as shipped in the package (same bytes as config/demo.yaml)."""
    return resources.files("corsproxy").joinpath("demo.yaml").read_text(encoding="utf-8")


def demo_config(host: str, port: int, upstream_url: str) -> Config:
    """The demo policy with the listen address and upstream URL filled in."""
    return parse_config(
        demo_policy_text(), "corsproxy/demo.yaml", upstream=upstream_url, host=host, port=port
    )


# ---------------------------------------------------------------------------
# the sample API
# ---------------------------------------------------------------------------

_ITEMS = web.AppKey("items", dict)
_IDS = web.AppKey("ids", itertools.count)


@web.middleware
async def _request_id(request: web.Request, handler: Any) -> web.StreamResponse:
    response = await handler(request)
    # The id corsproxy sent (its access line has the same one); a direct request
    # without one gets a numbered id of the demo's own.
    response.headers["X-Request-Id"] = (
        request.headers.get("X-Request-Id") or f"demo-{next(request.app[_IDS])}"
    )
    return response


def _item_id(request: web.Request) -> int:
    try:
        item_id = int(request.match_info["id"])
    except ValueError:
        raise web.HTTPNotFound(text="no such item\n") from None
    if item_id not in request.app[_ITEMS]:
        raise web.HTTPNotFound(text="no such item\n")
    return item_id


async def _read_item(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text='send JSON like {"name": "a name"}\n') from None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise web.HTTPBadRequest(text='send JSON like {"name": "a name"}\n')
    return {"name": data["name"]}


async def _list_items(request: web.Request) -> web.Response:
    items = request.app[_ITEMS]
    return web.json_response([{"id": i, **item} for i, item in sorted(items.items())])


async def _create_item(request: web.Request) -> web.Response:
    item = await _read_item(request)
    items = request.app[_ITEMS]
    item_id = max(items, default=0) + 1
    items[item_id] = item
    return web.json_response({"id": item_id, **item}, status=201)


async def _get_item(request: web.Request) -> web.Response:
    item_id = _item_id(request)
    return web.json_response({"id": item_id, **request.app[_ITEMS][item_id]})


async def _put_item(request: web.Request) -> web.Response:
    item_id = _item_id(request)
    request.app[_ITEMS][item_id] = await _read_item(request)
    return web.json_response({"id": item_id, **request.app[_ITEMS][item_id]})


async def _delete_item(request: web.Request) -> web.Response:
    del request.app[_ITEMS][_item_id(request)]
    return web.Response(status=204)


async def _public_status(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "items": len(request.app[_ITEMS])})


async def _legacy_cors(request: web.Request) -> web.Response:
    # An API that does its own (too generous) CORS: the proxy drops these headers.
    return web.json_response(
        {"note": "this API sends its own Access-Control-Allow-Origin: *; corsproxy removes it"},
        headers={
            "Access-Control-Allow-Origin": "*",
            "Access-Control-Allow-Headers": "*",
        },
    )


def sample_api() -> web.Application:
    """The demo's upstream: a tiny in-memory JSON API."""
    app = web.Application(middlewares=[_request_id])
    app[_ITEMS] = {1: {"name": "first item"}, 2: {"name": "second item"}}
    app[_IDS] = itertools.count(1)
    app.router.add_get("/api/items", _list_items)
    app.router.add_post("/api/items", _create_item)
    app.router.add_get("/api/items/{id}", _get_item)
    app.router.add_put("/api/items/{id}", _put_item)
    app.router.add_delete("/api/items/{id}", _delete_item)
    app.router.add_get("/api/public/status", _public_status)
    app.router.add_get("/api/legacy-cors", _legacy_cors)
    return app


# ---------------------------------------------------------------------------
# running it
# ---------------------------------------------------------------------------


def curl_commands(proxy: str) -> list[tuple[str, str]]:
    """(what it shows, command) pairs for a proxy at ``proxy`` (``http://host:port``)."""

    def curl(*args: str) -> str:
        return " ".join(["curl", "-i", *(shlex.quote(a) for a in args)])

    return [
        (
            "an allowed preflight (200, CORS headers from the proxy; the API never sees it)",
            curl("-X", "OPTIONS", f"{proxy}/api/items/1",
                 "-H", f"Origin: {ALLOWED_ORIGIN}",
                 "-H", "Access-Control-Request-Method: PUT",
                 "-H", "Access-Control-Request-Headers: content-type"),
        ),
        (
            "a denied preflight (400, the body says why)",
            curl("-X", "OPTIONS", f"{proxy}/api/items/1",
                 "-H", f"Origin: {DENIED_ORIGIN}",
                 "-H", "Access-Control-Request-Method: DELETE"),
        ),
        (
            "a proxied GET (the API's JSON plus Access-Control-Allow-Origin and Vary: Origin)",
            curl(f"{proxy}/api/items", "-H", f"Origin: {ALLOWED_ORIGIN}"),
        ),
        (
            "a proxied PUT",
            curl("-X", "PUT", f"{proxy}/api/items/1", "-H", f"Origin: {ALLOWED_ORIGIN}",
                 "-H", "Content-Type: application/json", "--data", '{"name": "renamed"}'),
        ),
        (
            "the API's own Access-Control-Allow-Origin: * removed for an origin not allowed",
            curl(f"{proxy}/api/legacy-cors", "-H", f"Origin: {DENIED_ORIGIN}"),
        ),
        (
            "a public route: any origin may read it",
            curl(f"{proxy}/api/public/status", "-H", f"Origin: {DENIED_ORIGIN}"),
        ),
    ]


async def _demo(host: str, port: int, upstream_port: int) -> int:
    api = web.AppRunner(sample_api(), access_log=None)
    await api.setup()
    site = web.TCPSite(api, "127.0.0.1", upstream_port)
    try:
        await site.start()
    except OSError as exc:
        await api.cleanup()
        print(
            f"corsproxy demo: cannot start the sample API on 127.0.0.1:{upstream_port}: "
            f"{describe_error(exc)}; pick another port with --upstream-port",
            file=sys.stderr,
        )
        return 1
    api_port = api.addresses[0][1]
    upstream_url = f"http://127.0.0.1:{api_port}"
    try:
        config = demo_config(host, port, upstream_url)
    except ConfigError as exc:  # only if the packaged policy was edited badly
        await api.cleanup()
        print("\n".join(exc.errors), file=sys.stderr)
        return 1

    def ready(bound_host: str, bound_port: int) -> None:
        proxy = f"http://{bound_host}:{bound_port}"
        lines = [
            f"corsproxy demo: sample API on {upstream_url}, corsproxy on {proxy}",
            f"policy: the package's demo.yaml (same as config/demo.yaml); allowed origins: "
            f"{', '.join(config.cors.allow_origins)}",
            "",
            "Try:",
        ]
        for what, command in curl_commands(proxy):
            lines += [f"  # {what}", f"  {command}", ""]
        lines.append("Press Ctrl-C to stop.")
        print("\n".join(lines), flush=True)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        return await serve(config, stop=stop, ready=ready)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await api.cleanup()


def run_demo(host: str = "127.0.0.1", port: int = 8080, upstream_port: int = 8000) -> int:
    """Run the sample API and the proxy until Ctrl-C/SIGTERM; returns the exit code."""
    setup_logging("text")
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(_demo(host, port, upstream_port))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_demo())

