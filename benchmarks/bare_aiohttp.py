"""The framework's ceiling for preflights: aiohttp's low-level server, constant answer.

Answers every request with the same 200 response carrying the headers an allowed
preflight gets from corsproxy for benchmarks/corsproxy.yaml. No routing, no policy,
no logging: whatever corsproxy's preflight path costs beyond this is corsproxy's own.

    python benchmarks/bare_aiohttp.py --port 8082
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from aiohttp import web

HEADERS = {
    "Access-Control-Allow-Origin": "https://app.example.com",
    "Access-Control-Allow-Methods": "GET, POST, PUT, DELETE",
    "Access-Control-Allow-Headers": (
        "Accept, Accept-Language, Authorization, Content-Language, Content-Type, X-Request-Id"
    ),
    "Access-Control-Max-Age": "600",
    "Access-Control-Allow-Credentials": "true",
    "Vary": (
        "Origin, Access-Control-Request-Method, Access-Control-Request-Headers, "
        "Access-Control-Request-Private-Network"
    ),
}


async def handler(request: web.BaseRequest) -> web.Response:
    return web.Response(text="OK", headers=HEADERS)


async def serve(host: str, port: int) -> None:
    server = web.Server(handler, access_log=None)
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(server, host, port, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    listener.close()
    await server.shutdown(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.host, args.port))
    else:
        uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
