"""TLS, end to end: the HTTPS listener (``listen.tls``), certificate rotation, the
``check`` errors for bad certificate files, and https upstreams behind a private CA.

Every proxy is the real ``python -m corsproxy run --config FILE --log-format json``
in a subprocess (:class:`hostile.ProxyProcess`, stopped by its PID). The CAs and
certificates are made by ``trustme`` in the test; clients trust the test CA only.
The upstream is an aiohttp app on a background loop (:class:`hostile.LoopThread`)
that records what reaches it, echoes WebSocket messages on ``/ws``, and listens
three ways: plain HTTP, HTTPS with a certificate from a private CA, and HTTPS
with a certificate for the wrong name.

Config files live in a temporary directory with the PEM files under ``tls/``,
named relative to the config file (the proxy runs with the repository as working
directory, so a path resolved against the cwd would not be found).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from aiohttp import WSMsgType, web
from hostile import (
    APP,
    IO,
    Client,
    LoopThread,
    ProxyProcess,
    Response,
    loop_thread,
    new_id,
    request,
    wait_for,
)
from ws_upstreams import frame, handshake, read_frame, ws_accept

ROOT = Path(__file__).resolve().parent.parent
#: The Host the tests send (the proxy's certificate names it; same-origin is checked
#: against it).
HOST = "proxy.test"
#: listen.header_timeout of the shared HTTPS proxy: also its TLS handshake deadline.
HEADER_TIMEOUT = 1.0
SLACK = 2.0
#: PEM files are padded to this size, so a rotation can rewrite them in place with
#: the same size and modification time (invisible to the file watcher).
PEM_SIZE = 8192


# ---------------------------------------------------------------------------
# certificates
# ---------------------------------------------------------------------------


def der(cert: trustme.LeafCert) -> bytes:
    """The leaf certificate as DER, as ``getpeercert(binary_form=True)`` gives it."""
    return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode("ascii"))


def write_pem(path: Path, data: bytes, *, stealth: bool = False) -> None:
    """Write a PEM file padded with newlines to :data:`PEM_SIZE` (text outside the
    BEGIN/END blocks is ignored). ``stealth``: in place, keeping the inode, the size
    and the modification time, so only SIGHUP can make the proxy notice."""
    assert len(data) < PEM_SIZE
    padded = data + b"\n" * (PEM_SIZE - len(data))
    if not stealth:
        tmp = path.with_name(path.name + ".new")
        tmp.write_bytes(padded)
        os.replace(tmp, path)  # a new inode, a new mtime: what a rotation looks like
        return
    before = path.stat()
    with open(path, "r+b") as f:
        f.write(padded)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino, before.st_size, before.st_mtime_ns)


def install(directory: Path, cert: trustme.LeafCert, *, stealth: bool = False) -> None:
    """``cert`` (chain and key) as ``directory/tls/cert.pem`` and ``key.pem``."""
    tls = directory / "tls"
    tls.mkdir(exist_ok=True)
    # Key first: a watcher that looks between the two writes sees a pair that does
    # not match, fails that reload and keeps the running certificate.
    write_pem(tls / "key.pem", cert.private_key_pem.bytes(), stealth=stealth)
    write_pem(tls / "cert.pem", b"".join(p.bytes() for p in cert.cert_chain_pems),
              stealth=stealth)


def client_context(ca: trustme.CA, *, alpn: list[str] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


def legacy_client_context() -> ssl.SSLContext:
    """A client that offers TLS 1.0 and 1.1 only (and may use their old ciphers)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():  # the TLSv1/TLSv1_1 members are deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    """The CA the proxy's listener certificates come from."""
    return trustme.CA()


@pytest.fixture(scope="module")
def proxy_cert(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert(HOST, "127.0.0.1")


@pytest.fixture(scope="module")
def upstream_ca() -> trustme.CA:
    """A private CA for the https upstream (nobody trusts it by default)."""
    return trustme.CA(organization_name="corsproxy upstream test CA")


# ---------------------------------------------------------------------------
# the upstream
# ---------------------------------------------------------------------------


class Upstream:
    """Records every request (``seen``: method, path, header pairs); ``/ws`` is a
    WebSocket echo (``echo: <text>``); anything else answers 200 JSON. Listens on
    ``url`` (plain), ``tls_url`` (private CA, right name), ``wrong_name_url``."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.runner: web.AppRunner | None = None
        self.url = self.tls_url = self.wrong_name_url = ""

    async def start(self, good: ssl.SSLContext, wrong_name: ssl.SSLContext) -> Upstream:
        app = web.Application()
        app.router.add_get("/ws", self._ws)
        app.router.add_route("*", "/{tail:.*}", self._any)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self.runner.setup()
        urls = []
        for scheme, context in (("http", None), ("https", good), ("https", wrong_name)):
            site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=context)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            urls.append(f"{scheme}://127.0.0.1:{port}")
        self.url, self.tls_url, self.wrong_name_url = urls
        return self

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def _record(self, request: web.Request) -> dict[str, Any]:
        entry = {
            "method": request.method,
            "path": request.path,
            "headers": [(k.decode("latin-1"), v.decode("latin-1"))
                        for k, v in request.raw_headers],
            "secure": request.transport is not None
            and request.transport.get_extra_info("sslcontext") is not None,
        }
        self.seen.append(entry)
        return entry

    def with_id(self, test_id: str) -> list[dict[str, Any]]:
        return [s for s in self.seen if ("X-Test-Id", test_id) in s["headers"]]

    async def _any(self, request: web.Request) -> web.Response:
        entry = self._record(request)
        await request.read()
        return web.json_response({"path": request.path, "secure": entry["secure"]})

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                await ws.send_str(f"echo: {msg.data}")
        return ws


def header(entry: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in entry["headers"] if k.lower() == name.lower()]


@pytest.fixture(scope="module")
def bg() -> Iterator[LoopThread]:
    with loop_thread() as loop:
        yield loop


@pytest.fixture(scope="module")
def upstream(bg: LoopThread, upstream_ca: trustme.CA) -> Iterator[Upstream]:
    good = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    upstream_ca.issue_cert("127.0.0.1").configure_cert(good)
    wrong = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    upstream_ca.issue_cert("somewhere-else.test").configure_cert(wrong)
    server = bg.run(Upstream().start(good, wrong))
    try:
        yield server
    finally:
        bg.run(server.close())


# ---------------------------------------------------------------------------
# proxies and clients
# ---------------------------------------------------------------------------

TLS_FILES = {"cert_file": "tls/cert.pem", "key_file": "tls/key.pem"}


def write_config(directory: Path, upstream: dict, *, listen: dict | None = None,
                 cors: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    data = {
        "listen": {"host": "127.0.0.1", "port": 0, "workers": 1, **(listen or {})},
        "upstream": {"connect_timeout": 2, "timeout": 10, **upstream},
        "cors": cors if cors is not None else {"allow_origins": [APP]},
        "admin": {"port": None},
    }
    path = directory / f"corsproxy-{new_id()}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def corsproxy(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m corsproxy ARGS`` (cwd: the repository), bounded."""
    return subprocess.run([sys.executable, "-m", "corsproxy", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)


class TlsClient(Client):
    """A :class:`hostile.Client` over TLS."""

    @classmethod
    async def connect(cls, port: int, context: ssl.SSLContext,
                      server_hostname: str = HOST) -> TlsClient:
        async with asyncio.timeout(IO):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=context, server_hostname=server_hostname,
                ssl_handshake_timeout=IO, ssl_shutdown_timeout=1.0,
            )
        return cls(reader, writer)

    @property
    def tls(self) -> ssl.SSLObject:
        return self.writer.get_extra_info("ssl_object")

    def peer_der(self) -> bytes:
        return self.tls.getpeercert(binary_form=True)

    async def roundtrip(self, data: bytes, method: str = "GET") -> Response:
        await self.send(data)
        response = await self.response(method)
        assert response is not None, "the proxy closed the connection without an answer"
        return response


async def https_request(port: int, context: ssl.SSLContext, data: bytes,
                        method: str = "GET") -> Response:
    """One request on a fresh TLS connection."""
    async with await TlsClient.connect(port, context) as client:
        return await client.roundtrip(data, method)


async def peer_cert(port: int, context: ssl.SSLContext) -> bytes:
    """The certificate a new TLS connection to the proxy is shown (DER)."""
    async with await TlsClient.connect(port, context) as client:
        return client.peer_der()


# ---------------------------------------------------------------------------
# 1. the HTTPS listener
# ---------------------------------------------------------------------------

CORS = {
    "allow_origins": [APP],
    "allow_methods": ["GET", "PUT"],
    "allow_headers": ["X-Token"],
    "expose_headers": ["X-Request-Id"],
    "max_age": 600,
    "enforce": True,
}


@pytest.fixture(scope="module")
def https_proxy(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream,
                proxy_cert: trustme.LeafCert) -> Iterator[ProxyProcess]:
    directory = tmp_path_factory.mktemp("https-proxy")
    install(directory, proxy_cert)
    path = write_config(directory, {"url": upstream.url}, cors=CORS,
                        listen={"tls": TLS_FILES, "header_timeout": HEADER_TIMEOUT})
    proxy = ProxyProcess(path).start()
    try:
        yield proxy
    finally:
        proxy.kill()


def test_listening_line_says_https(https_proxy: ProxyProcess) -> None:
    listening = [r for r in https_proxy.records() if r.get("event") == "listening"]
    assert len(listening) == 1
    assert f"https://127.0.0.1:{https_proxy.port}" in listening[0]["message"]


async def test_preflight_and_proxied_get_over_tls_with_exact_cors_headers(
    https_proxy: ProxyProcess, upstream: Upstream, ca: trustme.CA, proxy_cert: trustme.LeafCert
) -> None:
    test_id = new_id()
    context = client_context(ca, alpn=["h2", "http/1.1"])
    async with await TlsClient.connect(https_proxy.port, context) as client:
        assert client.tls.version() in ("TLSv1.2", "TLSv1.3")
        assert client.tls.selected_alpn_protocol() == "http/1.1"  # never h2
        assert client.peer_der() == der(proxy_cert)

        preflight = await client.roundtrip(request(
            "OPTIONS", "/api/items", f"Origin: {APP}", "Access-Control-Request-Method: PUT",
            "Access-Control-Request-Headers: x-token", f"X-Test-Id: {test_id}",
        ), "OPTIONS")
        assert preflight.status == 200, preflight
        assert preflight.cors == {
            "access-control-allow-origin": APP,
            "access-control-allow-methods": "GET, PUT",
            "access-control-allow-headers": "Accept, Accept-Language, Content-Language, "
                                            "Content-Type, X-Token",
            "access-control-max-age": "600",
        }, preflight

        # The same connection (keep-alive over TLS): a simple GET, then the actual PUT.
        get = await client.roundtrip(request(
            "GET", "/api/items?page=2", f"Origin: {APP}", f"X-Test-Id: {test_id}"))
        assert get.status == 200, get
        assert get.cors == {
            "access-control-allow-origin": APP,
            "access-control-expose-headers": "X-Request-Id",
        }, get
        assert get.vary == ["origin"]
        assert json.loads(get.body) == {"path": "/api/items", "secure": False}

        got = await client.roundtrip(request(
            "PUT", "/api/items", f"Origin: {APP}", "X-Token: t", f"X-Test-Id: {test_id}",
            "Content-Length: 2", body=b"{}",
        ), "PUT")
        assert got.status == 200, got
        assert got.cors == {
            "access-control-allow-origin": APP,
            "access-control-expose-headers": "X-Request-Id",
        }, got
        assert "origin" in got.vary
        assert json.loads(got.body) == {"path": "/api/items", "secure": False}

    seen = upstream.with_id(test_id)
    # The preflight was answered by the proxy; both others went upstream marked https.
    assert [s["method"] for s in seen] == ["GET", "PUT"]
    for entry in seen:
        assert header(entry, "X-Forwarded-Proto") == ["https"]
        assert header(entry, "X-Forwarded-Host") == [HOST]


async def test_tls_1_2_is_accepted(https_proxy: ProxyProcess, ca: trustme.CA) -> None:
    context = client_context(ca)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    response = await https_request(https_proxy.port, context, request("GET", "/v12"))
    assert response.status == 200


async def test_tls_1_1_and_lower_are_refused(https_proxy: ProxyProcess,
                                             proxy_cert: trustme.LeafCert) -> None:
    # Control: this client really speaks TLS 1.1 to a server that allows it, so a
    # failure below is the proxy's refusal, not a client that cannot start.
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        server_context.minimum_version = ssl.TLSVersion.TLSv1
    server_context.set_ciphers("DEFAULT:@SECLEVEL=0")
    proxy_cert.configure_cert(server_context)

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    control = await asyncio.start_server(hold, "127.0.0.1", 0, ssl=server_context)
    try:
        port = control.sockets[0].getsockname()[1]
        try:
            async with asyncio.timeout(IO):
                _, writer = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=legacy_client_context(), server_hostname=HOST)
        except ssl.SSLError as exc:
            pytest.skip(f"this OpenSSL cannot speak TLS 1.1 at all: {exc}")
        assert writer.get_extra_info("ssl_object").version() == "TLSv1.1"
        writer.transport.abort()
    finally:
        control.close()
        await control.wait_closed()

    started = time.monotonic()
    with pytest.raises((ssl.SSLError, ConnectionError)):
        async with asyncio.timeout(IO):
            _, writer = await asyncio.open_connection(
                "127.0.0.1", https_proxy.port, ssl=legacy_client_context(),
                server_hostname=HOST)
        writer.transport.abort()  # pragma: no cover - only when the handshake succeeded
    assert time.monotonic() - started < SLACK


async def test_plain_http_to_the_tls_port_is_closed_without_an_http_answer(
    https_proxy: ProxyProcess, ca: trustme.CA
) -> None:
    async with await Client.open(https_proxy.port) as client:
        await client.send_quietly(request("GET", "/plain", "Origin: " + APP))
        data, ending, _ = await client.wait_closed(SLACK)
    # Nothing, or a TLS alert record (content type 21); never an HTTP response.
    assert data == b"" or data[:1] == b"\x15", data[:100]
    assert ending in ("eof", "reset")
    # The listener is fine afterwards.
    response = await https_request(https_proxy.port, client_context(ca), request("GET", "/after"))
    assert response.status == 200


async def test_a_client_that_never_starts_the_handshake_is_dropped(
    https_proxy: ProxyProcess,
) -> None:
    async with await Client.open(https_proxy.port) as client:
        _, _, after = await client.wait_closed(HEADER_TIMEOUT + SLACK)
    assert after >= HEADER_TIMEOUT * 0.8


# ---------------------------------------------------------------------------
# 2. same-origin under TLS
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "origin", "forwarded"),
    [
        (HOST, f"https://{HOST}", True),
        (f"{HOST}:443", f"https://{HOST}", True),  # https's default port dropped
        (f"{HOST}:8443", f"https://{HOST}:8443", True),
        (HOST, f"http://{HOST}", False),  # another scheme: another origin
        (f"{HOST}:80", f"http://{HOST}", False),
        (f"{HOST}:80", f"https://{HOST}", False),  # 80 is not https's default port
    ],
)
async def test_same_origin_is_the_https_origin_of_the_host(
    https_proxy: ProxyProcess, upstream: Upstream, ca: trustme.CA,
    host: str, origin: str, forwarded: bool,
) -> None:
    test_id = new_id()
    response = await https_request(https_proxy.port, client_context(ca), request(
        "GET", f"/same/{test_id}", f"Origin: {origin}", f"X-Test-Id: {test_id}",
        host=host.encode(),
    ))
    if forwarded:
        assert response.status == 200, response
        assert response.cors == {}, response  # same-origin: no CORS headers needed
        seen = await wait_for(lambda: upstream.with_id(test_id), IO, "the forwarded request")
        assert header(seen[0], "X-Forwarded-Proto") == ["https"]
        assert header(seen[0], "X-Forwarded-Host") == [host]
    else:
        assert response.status == 403, response
        assert b"enforce: true" in response.body
        assert response.cors == {}
        await asyncio.sleep(0.1)
        assert upstream.with_id(test_id) == []
    record = await https_proxy.wait_record(lambda r: r.get("path") == f"/same/{test_id}")
    assert (record["status"], record["origin"]) == (200 if forwarded else 403, origin)


async def test_websocket_handshake_from_the_https_same_origin_passes(
    https_proxy: ProxyProcess, upstream: Upstream, ca: trustme.CA
) -> None:
    test_id = new_id()
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    async with await TlsClient.connect(https_proxy.port, client_context(ca)) as client:
        await client.send(handshake("/ws", HOST, f"X-Test-Id: {test_id}", key=key,
                                    origin=f"https://{HOST}"))
        response = await client.response("GET")
        assert response is not None and response.status == 101, response
        assert response.values("Sec-WebSocket-Accept") == [ws_accept(key)]
        await client.send(frame("ping over tls", opcode=0x1))
        echoed = await read_frame(client)
        assert echoed is not None
        assert (echoed.opcode, echoed.payload) == (0x1, b"echo: ping over tls")
    seen = upstream.with_id(test_id)
    assert len(seen) == 1
    assert header(seen[0], "Origin") == [f"https://{HOST}"]
    assert header(seen[0], "X-Forwarded-Proto") == ["https"]


async def test_websocket_handshake_from_the_http_origin_of_the_host_is_refused(
    https_proxy: ProxyProcess, upstream: Upstream, ca: trustme.CA
) -> None:
    test_id = new_id()
    response = await https_request(https_proxy.port, client_context(ca), handshake(
        "/ws", HOST, f"X-Test-Id: {test_id}", origin=f"http://{HOST}"))
    assert response.status == 403, response
    assert b"WebSocket handshake" in response.body
    await asyncio.sleep(0.1)
    assert upstream.with_id(test_id) == []


# ---------------------------------------------------------------------------
# 3. certificate rotation
# ---------------------------------------------------------------------------


@pytest.fixture
def rotating(tmp_path: Path, upstream: Upstream, proxy_cert: trustme.LeafCert
             ) -> Iterator[ProxyProcess]:
    """A proxy of its own (its files get rewritten), serving ``proxy_cert`` at first."""
    install(tmp_path, proxy_cert)
    path = write_config(tmp_path, {"url": upstream.url}, listen={"tls": TLS_FILES})
    proxy = ProxyProcess(path).start()
    try:
        yield proxy
    finally:
        proxy.kill()


def reloads(proxy: ProxyProcess) -> list[str]:
    return [r["message"] for r in proxy.records() if r.get("event") == "reloaded"]


async def test_sighup_rotates_the_certificate_and_keepalive_connections_keep_working(
    rotating: ProxyProcess, tmp_path: Path, ca: trustme.CA, proxy_cert: trustme.LeafCert
) -> None:
    context = client_context(ca)
    new_cert = ca.issue_cert(HOST, "127.0.0.1", common_name="rotated by SIGHUP")
    assert der(new_cert) != der(proxy_cert)
    async with await TlsClient.connect(rotating.port, context) as old:
        assert old.peer_der() == der(proxy_cert)
        assert (await old.roundtrip(request("GET", "/before"))).status == 200

        # Same inode, size and mtime: the file watcher cannot see this; only SIGHUP can.
        install(tmp_path, new_cert, stealth=True)
        rotating.signal(signal.SIGHUP)
        await rotating.wait_record(lambda r: r.get("event") == "reloaded")

        assert await peer_cert(rotating.port, context) == der(new_cert)
        assert all("(SIGHUP)" in m for m in reloads(rotating)), reloads(rotating)
        # The connection opened before keeps its session and keeps working.
        response = await old.roundtrip(request("GET", "/after"))
        assert response.status == 200, response
        assert old.peer_der() == der(proxy_cert)


async def test_rewritten_certificate_files_are_picked_up_without_sighup(
    rotating: ProxyProcess, tmp_path: Path, ca: trustme.CA, proxy_cert: trustme.LeafCert
) -> None:
    context = client_context(ca)
    new_cert = ca.issue_cert(HOST, "127.0.0.1", common_name="rotated by the watcher")
    async with await TlsClient.connect(rotating.port, context) as old:
        assert (await old.roundtrip(request("GET", "/before"))).status == 200
        install(tmp_path, new_cert)  # new files renamed into place, as cert-manager does

        async def rotated() -> bool:
            return await peer_cert(rotating.port, context) == der(new_cert)

        deadline = time.monotonic() + 5.0  # the watcher polls once a second
        while not await rotated():
            assert time.monotonic() < deadline, f"still the old certificate; log:\n" \
                                                f"{rotating.log_text()[-3000:]}"
            await asyncio.sleep(0.1)
        assert reloads(rotating) and all("changed" in m for m in reloads(rotating))
        assert (await old.roundtrip(request("GET", "/after"))).status == 200
        assert old.peer_der() == der(proxy_cert)


async def test_a_broken_rotation_keeps_the_running_certificate(
    rotating: ProxyProcess, tmp_path: Path, ca: trustme.CA, proxy_cert: trustme.LeafCert
) -> None:
    context = client_context(ca)
    other = ca.issue_cert(HOST, "127.0.0.1", common_name="another key")
    # A new certificate with a key that is not its own.
    write_pem(tmp_path / "tls" / "cert.pem", other.cert_chain_pems[0].bytes())
    failed = await rotating.wait_record(lambda r: r.get("event") == "reload-failed")
    assert "still serving the previous policy" in failed["message"]
    errors = [r["message"] for r in rotating.records() if r.get("event") == "reload-error"]
    assert any("listen.tls: cannot load the certificate" in e for e in errors), errors
    # New connections still get the running certificate and are served.
    async with await TlsClient.connect(rotating.port, context) as client:
        assert client.peer_der() == der(proxy_cert)
        assert (await client.roundtrip(request("GET", "/still"))).status == 200
    # Completing the pair is picked up.
    write_pem(tmp_path / "tls" / "key.pem", other.private_key_pem.bytes())
    await rotating.wait_record(lambda r: r.get("event") == "reloaded", timeout=5.0)
    assert await peer_cert(rotating.port, context) == der(other)


# ---------------------------------------------------------------------------
# 4. `check` errors for bad certificate files
# ---------------------------------------------------------------------------


def _missing_cert(tls: Path, cert: trustme.LeafCert, other: trustme.LeafCert) -> str:
    (tls / "cert.pem").unlink()
    return "No such file or directory"


def _missing_key(tls: Path, cert: trustme.LeafCert, other: trustme.LeafCert) -> str:
    (tls / "key.pem").unlink()
    return "No such file or directory"


def _mismatched_key(tls: Path, cert: trustme.LeafCert, other: trustme.LeafCert) -> str:
    write_pem(tls / "key.pem", other.private_key_pem.bytes())
    return "key values mismatch"


def _not_pem(tls: Path, cert: trustme.LeafCert, other: trustme.LeafCert) -> str:
    (tls / "cert.pem").write_text("this is not a certificate\n")
    return ""


@pytest.mark.parametrize("spoil", [_missing_cert, _missing_key, _mismatched_key, _not_pem],
                         ids=["missing-cert", "missing-key", "mismatched-key", "not-pem"])
def test_check_reports_an_unusable_certificate_in_one_line(
    tmp_path: Path, ca: trustme.CA, proxy_cert: trustme.LeafCert, spoil: Any
) -> None:
    install(tmp_path, proxy_cert)
    reason = spoil(tmp_path / "tls", proxy_cert, ca.issue_cert("other.test"))
    path = write_config(tmp_path, {"url": "http://127.0.0.1:9"}, listen={"tls": TLS_FILES})
    result = corsproxy("check", "--config", str(path))
    assert result.returncode == 1, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    cert_file, key_file = tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem"
    prefix = (f"{path}: listen.tls: cannot load the certificate {cert_file} with the key "
              f"{key_file} (")
    assert len(lines) == 2, result.stderr
    assert lines[0].startswith(prefix), lines[0]
    assert reason in lines[0]
    assert lines[1] == "1 error; corsproxy did not use this config"


def test_run_refuses_an_unusable_certificate_before_listening(
    tmp_path: Path, ca: trustme.CA, proxy_cert: trustme.LeafCert
) -> None:
    install(tmp_path, proxy_cert)
    _mismatched_key(tmp_path / "tls", proxy_cert, ca.issue_cert("other.test"))
    path = write_config(tmp_path, {"url": "http://127.0.0.1:9"}, listen={"tls": TLS_FILES})
    result = corsproxy("run", "--config", str(path), "--log-format", "json")
    assert result.returncode == 1, result
    assert f"{path}: listen.tls: cannot load the certificate" in result.stderr
    assert '"listening"' not in result.stderr


def test_check_reports_an_unreadable_ca_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"url": "https://127.0.0.1:9", "ca_file": "tls/nope.pem"})
    result = corsproxy("check", "--config", str(path))
    assert result.returncode == 1, result
    assert result.stderr.splitlines()[0].startswith(
        f"{path}: upstream.ca_file: cannot load {tmp_path / 'tls' / 'nope.pem'} ("), result.stderr


# ---------------------------------------------------------------------------
# 5. an https upstream behind a private CA
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "target", "status", "error"),
    [
        ({"ca_file": "upstream-ca.pem"}, "tls_url", 200, None),
        ({}, "tls_url", 502, "unable to get local issuer certificate"),
        ({"tls_insecure_skip_verify": True}, "tls_url", 200, None),
        ({"ca_file": "upstream-ca.pem"}, "wrong_name_url", 502,
         "IP address mismatch, certificate is not valid for '127.0.0.1'"),
        ({"tls_insecure_skip_verify": True}, "wrong_name_url", 200, None),
    ],
    ids=["ca-file", "no-ca-file", "skip-verify", "wrong-name", "wrong-name-skip-verify"],
)
async def test_https_upstream_behind_a_private_ca(
    tmp_path: Path, upstream: Upstream, upstream_ca: trustme.CA,
    settings: dict, target: str, status: int, error: str | None,
) -> None:
    upstream_ca.cert_pem.write_to_path(str(tmp_path / "upstream-ca.pem"))
    path = write_config(tmp_path, {"url": getattr(upstream, target), **settings})
    proxy = ProxyProcess(path).start()
    try:
        test_id = new_id()
        async with await Client.open(proxy.port) as client:
            await client.send(request("GET", "/private", f"Origin: {APP}",
                                      f"X-Test-Id: {test_id}"))
            response = await client.response()
        assert response is not None and response.status == status, response
        assert response.cors == {"access-control-allow-origin": APP}  # errors carry CORS too
        record = await proxy.wait_record(lambda r: r.get("path") == "/private")
        assert record["status"] == status
        if error is None:
            assert json.loads(response.body) == {"path": "/private", "secure": True}
            assert len(upstream.with_id(test_id)) == 1
            assert record["error"] is None
        else:
            assert response.body.startswith(b"Bad Gateway: "), response
            assert upstream.with_id(test_id) == []
            assert error in record["error"], record
            assert "certificate" in record["error"], record
    finally:
        proxy.kill()
    if settings.get("tls_insecure_skip_verify"):  # `run` says it at start-up too
        warned = [r for r in proxy.records() if r.get("event") == "config-warning"]
        assert any("upstream.tls_insecure_skip_verify" in r["message"] for r in warned)


def test_check_warns_about_tls_insecure_skip_verify(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"url": "https://127.0.0.1:9",
                                   "tls_insecure_skip_verify": True})
    result = corsproxy("check", "--config", str(path))
    assert result.returncode == 0, result
    assert "tls_insecure_skip_verify" not in result.stdout
    warnings_ = [line for line in result.stderr.splitlines() if "tls_insecure_skip_verify" in line]
    assert warnings_ == [
        f"warning: {path}: upstream.tls_insecure_skip_verify: true: the upstream's certificate "
        f"is not checked, so anyone on the path can read and change the traffic; trust its CA "
        f"with upstream.ca_file instead"
    ], result.stderr
