"""A plain aiohttp CORS proxy (web.Application + one ClientSession): the naive baseline.

What a careful first version of a Python CORS proxy looks like: answers preflights with
constant headers, streams every other request to the upstream through one pooled
ClientSession and adds ACAO/ACAC/ACEH and Vary. No policy engine, no logging, no
hop-by-hop cleanup: it only shows what the framework and its HTTP client cost.

    python benchmarks/aiohttp_proxy.py --port 8083 --upstream http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web
from bare_aiohttp import HEADERS as PREFLIGHT_HEADERS

ORIGIN = "https://app.example.com"
ACTUAL_HEADERS = {
    "Access-Control-Allow-Origin": ORIGIN,
    "Access-Control-Allow-Credentials": "true",
    "Access-Control-Expose-Headers": "X-Request-Id",
}
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}
SESSION = web.AppKey("session", ClientSession)
UPSTREAM = web.AppKey("upstream", str)


async def proxy(request: web.Request) -> web.StreamResponse:
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        return web.Response(text="OK", headers=PREFLIGHT_HEADERS)
    session = request.app[SESSION]
    url = request.app[UPSTREAM] + request.raw_path
    async with session.request(
        request.method,
        url,
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


async def session_ctx(app: web.Application):
    app[SESSION] = ClientSession(
        connector=TCPConnector(limit=0),
        timeout=ClientTimeout(total=None, connect=5),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
    )
    yield
    await app[SESSION].close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    app = web.Application()
    app[UPSTREAM] = args.upstream.rstrip("/")
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", proxy)
    try:
        import uvloop
    except ImportError:
        loop = None
    else:
        loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
    web.run_app(
        app, host=args.host, port=args.port, access_log=None, print=None, backlog=4096, loop=loop
    )


if __name__ == "__main__":
    main()
