"""A plain aiohttp CORS proxy: the naive Python baseline (issue 5's table).

What a careful first version of a Python CORS proxy looks like: answers preflights with
constant headers, streams every other request to the upstream through one pooled
ClientSession and adds ACAO/ACAC/ACEH and Vary. No policy engine, no logging, no full
hop-by-hop cleanup: it only shows what the framework and its HTTP client cost.

    python benchmarks/aiohttp_proxy.py --port 8083 --upstream http://127.0.0.1:8000
    python benchmarks/aiohttp_proxy.py --low-level ...   # web.Server instead of web.Application
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Awaitable, Callable

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web
from bare_aiohttp import HEADERS as PREFLIGHT_HEADERS

ORIGIN = "https://app.example.com"
ACTUAL_HEADERS = {
    "Access-Control-Allow-Origin": ORIGIN,
    "Access-Control-Allow-Credentials": "true",
    "Access-Control-Expose-Headers": "X-Request-Id",
}
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def new_session() -> ClientSession:
    return ClientSession(
        connector=TCPConnector(limit=0),
        timeout=ClientTimeout(total=None, connect=5),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
    )


def make_handler(session: ClientSession, upstream_url: str) -> Handler:
    base = upstream_url.rstrip("/")

    async def proxy(request: web.BaseRequest) -> web.StreamResponse:
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            return web.Response(text="OK", headers=PREFLIGHT_HEADERS)
        async with session.request(
            request.method,
            base + request.raw_path,
            headers={k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP},
            data=request.content if request.body_exists else None,
            allow_redirects=False,
            auto_decompress=False,
        ) as upstream:
            response = web.StreamResponse(status=upstream.status)
            for name, value in upstream.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    response.headers.add(name, value)
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            if request.headers.get("Origin") == ORIGIN:
                response.headers.update(ACTUAL_HEADERS)
            response.headers["Vary"] = "Origin"
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(65536):
                await response.write(chunk)
            await response.write_eof()
            return response

    return proxy


async def serve(host: str, port: int, upstream_url: str, low_level: bool) -> None:
    session = new_session()
    handler = make_handler(session, upstream_url)
    if low_level:
        server = web.Server(handler, access_log=None)
        listener = await asyncio.get_running_loop().create_server(server, host, port, backlog=4096)
    else:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port, backlog=4096).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if low_level:
        listener.close()
        await server.shutdown(1.0)
    else:
        await runner.cleanup()
    await session.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--low-level", action="store_true", help="aiohttp's low-level web.Server")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.host, args.port, args.upstream, args.low_level))
    else:
        uvloop.run(serve(args.host, args.port, args.upstream, args.low_level))


if __name__ == "__main__":
    main()
