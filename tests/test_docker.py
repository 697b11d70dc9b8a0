"""The image and docker-compose.yml on a real Docker engine.

One engine per session (:mod:`docker_engine`): Debian's dockerd in a temporary
directory, no bridge and no iptables, so builds and containers use the host's network
and listen on loopback ports picked here. The base image is a debootstrap stand-in for
``python:3.11-slim-bookworm`` (no registry is reachable), passed as the Dockerfile's
``BASE`` build argument and also tagged under the official name for compose.

Checked: the image builds on the stand-in and carries no compiler, pip or pip cache
(its size is printed); a container with a read-only root file system and a read-only
mounted config, as a non-root PID 1, answers a preflight and a proxied GET to an
upstream container with exactly the policy's CORS headers; its HEALTHCHECK turns
healthy without touching the upstream; ``docker stop`` with requests in flight lets
the short one finish, cuts the long one at ``listen.shutdown_grace`` and exits 0 before
Docker's SIGKILL; ``docker compose up --build`` of the repository's file (with a
test-only override for host networking) answers the README's curl commands as
documented.

Needs root, docker, dockerd, debootstrap and curl (``.ci/run`` installs them), and
PyPI plus a Debian mirror (apt's; CORSPROXY_DEBIAN_MIRROR overrides it); skipped without
them, except under CI, where that fails. CORSPROXY_DOCKER_CACHE=DIR keeps the stand-in's
debootstrap tarball between runs (about a minute saved).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shlex
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import free_port
from docker_engine import Engine, EngineError, missing_tools, new_engine
from http_replies import Reply, send

REPO = Path(__file__).resolve().parent.parent
STANDIN = "corsproxy-test/standin:bookworm"
OFFICIAL_BASE = "python:3.11-slim-bookworm"  # the Dockerfile's default BASE, compose's api
IMAGE = "corsproxy-test/image:latest"
ORIGIN = "https://app.example.com"
USER_ID = "10001"
START_TIMEOUT = 30.0  # a container listening
HEALTHY_TIMEOUT = 60.0  # the HEALTHCHECK: first run after --interval=15s, then --timeout=5s
DEFAULT_GRACE = 10.0  # listen.shutdown_grace when the config says nothing
PREFLIGHT_VARY = (
    "Origin, Access-Control-Request-Method, Access-Control-Request-Headers, "
    "Access-Control-Request-Private-Network"
)

#: Seconds each stage took, printed with the image size.
TIMINGS: dict[str, float] = {}


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def unavailable() -> str | None:
    missing = missing_tools()
    if missing:
        return (f"a real Docker engine needs {', '.join(missing)} (Debian packages docker.io, "
                "debootstrap, curl: .ci/run installs them)")
    if os.geteuid() != 0:
        return "dockerd and debootstrap need root"
    return None


# ---------------------------------------------------------------------------
# Session fixtures: the engine, the stand-in base, the image
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    reason = unavailable()
    if reason is not None:
        if in_ci():
            pytest.fail(f"CI=true: {reason}")
        pytest.skip(reason)
    eng = new_engine()
    started = time.monotonic()
    try:
        eng.start()
    except EngineError as exc:
        problems = eng.stop()
        pytest.fail(f"starting dockerd failed: {exc}\n{problems or ''}")
    TIMINGS["dockerd start"] = time.monotonic() - started
    yield eng
    problems = eng.stop()
    assert problems == [], "the engine was not cleaned up:\n" + "\n".join(problems)


@pytest.fixture(scope="session")
def standin(engine: Engine) -> str:
    """The debootstrap stand-in base, also tagged as the official image's name, so
    nothing is ever pulled. CORSPROXY_DOCKER_CACHE keeps its tarball between runs."""
    cache = Path(os.environ.get("CORSPROXY_DOCKER_CACHE") or engine.root / "cache")
    try:
        TIMINGS["stand-in base (debootstrap + import)"] = engine.import_standin(STANDIN, cache)
        engine.docker("tag", STANDIN, OFFICIAL_BASE, timeout=30)
    except EngineError as exc:
        pytest.fail(f"building the stand-in base failed: {exc}")
    return STANDIN


@pytest.fixture(scope="session")
def image(engine: Engine, standin: str) -> str:
    started = time.monotonic()
    try:
        engine.docker("build", "--network", "host", "--build-arg", f"BASE={standin}",
                      "--tag", IMAGE, str(REPO), timeout=900)
    except EngineError as exc:
        pytest.fail(f"docker build on the stand-in base failed: {exc}")
    TIMINGS["docker build"] = time.monotonic() - started
    return IMAGE


# ---------------------------------------------------------------------------
# Helpers: ports, containers, requests
# ---------------------------------------------------------------------------


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_listening(engine: Engine, name: str, port: int) -> None:
    """Until 127.0.0.1:port accepts; fails with the container's log if it stops."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        state = engine.inspect(name)["State"]
        if not state["Running"]:
            logs = engine.docker("logs", name, check=False, timeout=30)
            pytest.fail(f"container {name} exited with {state['ExitCode']}:\n"
                        f"{logs.stdout}{logs.stderr}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"container {name} did not listen on 127.0.0.1:{port} in {START_TIMEOUT:.0f} s")


def logs(engine: Engine, name: str) -> str:
    result = engine.docker("logs", name, timeout=30)
    return result.stdout + result.stderr


#: The upstream: a JSON API on the stand-in base that sends its own ACAO (the proxy
#: must replace it), logs every request line, and answers /slow?seconds=N after N s.
UPSTREAM_SCRIPT = r"""
import json, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

class Api(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        print(self.command, self.path, flush=True)
        url = urlsplit(self.path)
        if url.path == "/slow":
            time.sleep(float(parse_qs(url.query)["seconds"][0]))
        body = json.dumps({"path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Upstream", "stand-in")
        self.send_header("Access-Control-Allow-Origin", "*")
        self.end_headers()
        self.wfile.write(body)

    do_OPTIONS = do_PUT = do_GET

    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Api)
server.daemon_threads = True
server.serve_forever()
"""


@dataclass
class Upstream:
    name: str
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests(self, engine: Engine) -> list[str]:
        return [line for line in logs(engine, self.name).splitlines()
                if line.split(" ")[0] in ("GET", "OPTIONS", "PUT")]


@pytest.fixture(scope="module")
def upstream(engine: Engine, standin: str) -> Iterator[Upstream]:
    port = free_port()
    name = "corsproxy-test-upstream"
    engine.docker("run", "--detach", "--name", name, "--network", "host", "--init",
                  standin, "python3", "-c", UPSTREAM_SCRIPT, str(port), timeout=60)
    wait_listening(engine, name, port)
    yield Upstream(name, port)
    engine.docker("rm", "--force", name, check=False, timeout=60)


@dataclass
class Proxy:
    name: str
    port: int
    admin_port: int
    config: Path


def policy(upstream: Upstream, port: int, admin_port: int, grace: float | None = None,
           workers: int | None = None) -> dict:
    listen: dict = {"host": "127.0.0.1", "port": port}
    if grace is not None:
        listen["shutdown_grace"] = grace
    if workers is not None:
        listen["workers"] = workers
    return {
        "listen": listen,
        "upstream": {"url": upstream.url, "connect_timeout": 2, "timeout": 60},
        "admin": {"port": admin_port},
        "cors": {
            "allow_origins": [ORIGIN],
            "allow_methods": ["GET", "PUT"],
            "allow_headers": ["X-Request-Id"],
            "expose_headers": ["X-Upstream"],
            "max_age": 300,
        },
    }


def run_proxy(engine: Engine, image: str, name: str, config: dict, directory: Path) -> Proxy:
    """``docker run`` the image as documented: host network here, a read-only root file
    system, the policy mounted read-only at CORSPROXY_CONFIG's default path. The
    arguments replace CMD only to keep the listener on loopback."""
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o644)  # readable by the image's user
    port, admin_port = config["listen"]["port"], config["admin"]["port"]
    engine.docker(
        "run", "--detach", "--name", name, "--network", "host", "--read-only",
        "--volume", f"{path}:/etc/corsproxy/config.yaml:ro",
        image, "run", "--host", "127.0.0.1",
        timeout=60,
    )
    wait_listening(engine, name, port)
    return Proxy(name, port, admin_port, path)


@pytest.fixture(scope="module")
def proxy(engine: Engine, image: str, upstream: Upstream,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    name = "corsproxy-test-proxy"
    port, admin_port = free_port(), free_port()
    started = run_proxy(engine, image, name, policy(upstream, port, admin_port),
                        tmp_path_factory.mktemp("docker-config"))
    yield started
    engine.docker("rm", "--force", name, check=False, timeout=60)


# ---------------------------------------------------------------------------
# The image
# ---------------------------------------------------------------------------


def test_image_builds_on_the_stand_in_base_and_its_size_is_printed(
    engine: Engine, image: str, standin: str, capsys: pytest.CaptureFixture
):
    size = engine.inspect(image)["Size"]
    base = engine.inspect(standin)["Size"]
    with capsys.disabled():
        print(f"\n[docker] image {image}: {size / 1e6:.1f} MB "
              f"(base {standin}: {base / 1e6:.1f} MB, corsproxy's layers: "
              f"{(size - base) / 1e6:.1f} MB)")
        print("[docker] " + ", ".join(f"{k}: {v:.0f} s" for k, v in TIMINGS.items()))
    # The virtualenv with corsproxy and its wheels: tens of MB, not a toolchain or a cache.
    assert size - base < 100e6, f"corsproxy adds {(size - base) / 1e6:.0f} MB to its base"


def test_image_config_runs_corsproxy_as_a_non_root_user_stopped_by_sigterm(
    engine: Engine, image: str
):
    config = engine.inspect(image)["Config"]
    assert config["User"] == f"{USER_ID}:{USER_ID}"
    assert config["Entrypoint"] == ["corsproxy"]
    assert config["Cmd"] == ["run", "--host", "0.0.0.0"]
    assert config["StopSignal"] == "SIGTERM"
    assert config["Healthcheck"]["Test"] == ["CMD", "corsproxy", "healthcheck"]
    assert "8080/tcp" in config["ExposedPorts"]
    assert "CORSPROXY_CONFIG=/etc/corsproxy/config.yaml" in config["Env"]


CHECK_LEFTOVERS = r"""
import json, os, shutil
found = {"compilers": [t for t in ("gcc", "cc", "c++", "g++", "clang", "make")
                       if shutil.which(t)],
         # The base's own pip may stay (the official image has one); corsproxy's
         # virtualenv has none, and nothing is left of the build.
         "paths": [p for p in ("/build", "/opt/corsproxy/bin/pip", "/root/.cache/pip")
                   if os.path.exists(p)],
         "caches": []}
for top in ("/root", "/home", "/tmp", "/opt", "/var/cache", "/nonexistent"):
    for root, dirs, files in os.walk(top):
        if os.path.basename(root) == "pip" and "/.cache" in root:
            found["caches"].append(root)
print(json.dumps(found))
"""


def test_image_has_no_compiler_no_pip_and_no_pip_cache(engine: Engine, image: str):
    result = engine.docker("run", "--rm", "--network", "none", "--user", "0",
                           "--entrypoint", "python3", image, "-c", CHECK_LEFTOVERS, timeout=60)
    assert json.loads(result.stdout) == {"compilers": [], "paths": [], "caches": []}
    # corsproxy's virtualenv holds the package itself (not an editable checkout).
    where = engine.docker("run", "--rm", "--network", "none", "--entrypoint", "python",
                          image, "-c", "import corsproxy, importlib.util as u; "
                          "print(corsproxy.__file__, u.find_spec('pip'))", timeout=60)
    file, pip = where.stdout.split()
    assert file.startswith("/opt/corsproxy/lib/python3.11/site-packages/corsproxy/"), file
    assert pip == "None", "pip is importable in corsproxy's virtualenv"


# ---------------------------------------------------------------------------
# A running container
# ---------------------------------------------------------------------------


def test_preflight_and_proxied_get_answer_with_exactly_the_policys_cors_headers(
    engine: Engine, proxy: Proxy, upstream: Upstream
):
    before = len(upstream.requests(engine))
    got = send(proxy.port, "GET", "/items?page=2", {"Origin": ORIGIN})
    assert got.status == 200
    assert json.loads(got.body) == {"path": "/items?page=2"}
    # The upstream's own "Access-Control-Allow-Origin: *" is replaced by the policy's.
    assert got.cors() == {
        "Access-Control-Allow-Origin": ORIGIN,
        "Access-Control-Expose-Headers": "X-Upstream",
    }
    assert got.header("Vary") == "Origin"
    assert got.header("X-Upstream") == "stand-in"

    denied = send(proxy.port, "GET", "/items", {"Origin": "https://evil.example"})
    assert denied.status == 200 and denied.cors() == {}

    pre = send(proxy.port, "OPTIONS", "/items", {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "PUT",
        "Access-Control-Request-Headers": "x-request-id",
    })
    assert pre.status == 200
    assert pre.cors() == {
        "Access-Control-Allow-Origin": ORIGIN,
        "Access-Control-Allow-Methods": "GET, PUT",
        "Access-Control-Allow-Headers": (
            "Accept, Accept-Language, Content-Language, Content-Type, X-Request-Id"
        ),
        "Access-Control-Max-Age": "300",
    }
    assert pre.header("Vary") == PREFLIGHT_VARY

    refused = send(proxy.port, "OPTIONS", "/items", {
        "Origin": ORIGIN, "Access-Control-Request-Method": "DELETE",
    })
    assert refused.status == 400 and refused.cors() == {}
    # Two GETs reached the upstream; preflights never do.
    assert upstream.requests(engine)[before:] == ["GET /items?page=2", "GET /items"]


def test_the_read_only_mounted_config_is_the_one_in_use(engine: Engine, proxy: Proxy):
    container = engine.inspect(proxy.name)
    (mount,) = container["Mounts"]
    assert mount["Source"] == str(proxy.config)
    assert mount["Destination"] == "/etc/corsproxy/config.yaml"
    assert mount["RW"] is False
    check = engine.docker("exec", proxy.name, "corsproxy", "check", timeout=60)
    assert "/etc/corsproxy/config.yaml: OK" in check.stdout
    # Even root inside the container cannot change it.
    write = engine.docker("exec", "--user", "0", proxy.name, "sh", "-c",
                          "echo '# x' >> /etc/corsproxy/config.yaml", check=False, timeout=30)
    assert write.returncode != 0 and "Read-only file system" in write.stderr


def test_the_container_runs_on_a_read_only_root_file_system(engine: Engine, proxy: Proxy):
    assert engine.inspect(proxy.name)["HostConfig"]["ReadonlyRootfs"] is True
    for path in ("/opt/corsproxy/x", "/tmp/x", "/x"):  # as root, so not a permission error
        write = engine.docker("exec", "--user", "0", proxy.name, "touch", path, check=False,
                              timeout=30)
        assert write.returncode != 0 and "Read-only file system" in write.stderr, path
    # ...and it serves all the same (the CORS test above went through it), metrics too
    # (with listen.workers they are files under the image's TMPDIR, a tmpfs).
    assert send(proxy.port, "GET", "/ro", {"Origin": ORIGIN}).status == 200
    metrics = send(proxy.admin_port, "GET", "/metrics", {})
    assert metrics.status == 200 and b"corsproxy_" in metrics.body


def test_corsproxy_is_pid_1_and_runs_as_the_non_root_user(engine: Engine, proxy: Proxy):
    assert engine.docker("exec", proxy.name, "id", "-u", timeout=30).stdout.strip() == USER_ID
    status = engine.docker("exec", proxy.name, "cat", "/proc/1/status", timeout=30).stdout
    uids = re.search(r"^Uid:\s+(.*)$", status, re.M)
    assert uids is not None and set(uids.group(1).split()) == {USER_ID}
    cmdline = engine.docker("exec", proxy.name, "cat", "/proc/1/cmdline", timeout=30).stdout
    argv = cmdline.split("\0")
    assert argv[1:4] == ["/opt/corsproxy/bin/corsproxy", "run", "--host"], argv


def test_healthcheck_turns_healthy_without_touching_the_upstream(
    engine: Engine, proxy: Proxy, upstream: Upstream
):
    seen = upstream.requests(engine)
    deadline = time.monotonic() + HEALTHY_TIMEOUT
    health: dict = {}
    while time.monotonic() < deadline:
        health = engine.inspect(proxy.name)["State"].get("Health") or {}
        if health.get("Status") in ("healthy", "unhealthy"):
            break
        time.sleep(0.5)
    assert health.get("Status") == "healthy", json.dumps(health, indent=2)
    assert health["Log"][-1]["ExitCode"] == 0
    assert upstream.requests(engine) == seen, "the health check reached the upstream"


@pytest.mark.parametrize(
    ("grace", "stop_args", "workers"),
    [(None, ["--time", "15"], 2), (4.0, [], 1)],
    ids=["default-grace-docker-stop-time-15-2-workers", "grace-4s-plain-docker-stop-1-worker"],
)
def test_docker_stop_lets_in_flight_requests_finish_then_exits_0(
    engine: Engine, image: str, upstream: Upstream, tmp_path: Path,
    grace: float | None, stop_args: list[str], workers: int,
):
    """The documented ways to stop it before Docker's SIGKILL: `docker stop --time 15`
    with the default grace (10 s), or a grace below 9 s with plain `docker stop`; with
    worker processes (PID 1 forwards SIGTERM to them) and without."""
    name = f"corsproxy-test-stop-{uuid.uuid4().hex[:8]}"
    port, admin_port = free_port(), free_port()
    config = policy(upstream, port, admin_port, grace, workers)
    proxy = run_proxy(engine, image, name, config, tmp_path)
    tag = uuid.uuid4().hex[:8]
    short, long_ = f"/slow?seconds=2&tag={tag}", f"/slow?seconds=40&tag={tag}"
    try:
        with ThreadPoolExecutor(2) as pool:
            quick = pool.submit(send, proxy.port, "GET", short, {"Origin": ORIGIN}, 60)
            slow = pool.submit(send, proxy.port, "GET", long_, {"Origin": ORIGIN}, 60)
            deadline = time.monotonic() + 10
            while not {f"GET {short}", f"GET {long_}"} <= set(upstream.requests(engine)):
                assert time.monotonic() < deadline, "the requests never reached the upstream"
                time.sleep(0.05)
            started = time.monotonic()
            engine.docker("stop", *stop_args, name, timeout=60)
            took = time.monotonic() - started
            finished = quick.result(timeout=60)
            try:
                cut: Reply | Exception = slow.result(timeout=60)
            except (OSError, http.client.HTTPException) as exc:
                cut = exc
        state = engine.inspect(name)["State"]
        output = logs(engine, name)
    finally:
        engine.docker("rm", "--force", name, check=False, timeout=60)

    assert finished.status == 200, finished
    assert json.loads(finished.body) == {"path": short}
    assert finished.cors()["Access-Control-Allow-Origin"] == ORIGIN
    assert not (isinstance(cut, Reply) and cut.status == 200), "the long request was not cut"
    effective = DEFAULT_GRACE if grace is None else grace
    assert (state["ExitCode"], state["OOMKilled"]) == (0, False), output
    assert effective - 0.5 <= took <= effective + 3, (
        f"docker stop took {took:.1f} s with listen.shutdown_grace {effective:g} s"
    )
    assert "listen.shutdown_grace" in output and "corsproxy stopped" in output, output
    assert "Traceback" not in output, output


# ---------------------------------------------------------------------------
# docker compose up --build, and the README's curl commands
# ---------------------------------------------------------------------------

#: Test-only: this engine has no bridge network, so both services use the host's network
#: on loopback (nothing published), and `api` resolves through /etc/hosts, not DNS.
COMPOSE_OVERRIDE = {
    "services": {
        "api": {
            "network_mode": "host",
            "expose": "!reset []",
            "environment": {"API_HOST": "127.0.0.1"},
        },
        "corsproxy": {
            "network_mode": "host",
            "build": {"network": "host"},
            "ports": "!reset []",
            "extra_hosts": ["api=127.0.0.1"],
            "command": ["run", "--host", "127.0.0.1"],
        },
    },
}
#: What the compose setup listens on (config/compose.yaml, the api's API_PORT, the
#: admin listener's default), here on the host's loopback.
COMPOSE_PORTS = (8000, 8080, 9901)
PORTS_TIMEOUT = 60.0  # another program's use of them (a demo, a test) to end


def shell_commands(lines: list[str]) -> list[str]:
    """Shell lines with backslash continuations joined."""
    commands, pending = [], ""
    for line in lines:
        line = line.strip()
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        if pending + line:
            commands.append(pending + line)
        pending = ""
    return commands


def compose_header_commands() -> list[str]:
    """The commands in docker-compose.yml's header comment (``#   command``)."""
    lines = []
    for raw in (REPO / "docker-compose.yml").read_text().splitlines():
        if not raw.startswith("#"):
            break
        if raw.startswith("#   "):
            lines.append(raw[1:])
    return shell_commands(lines)


def readme_compose_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = re.search(r"^## docker-compose.*?^```sh\n(.*?)^```", text, re.M | re.S)
    assert section, "README.md has no '## docker-compose' section with a ```sh block"
    return shell_commands(section.group(1).splitlines())


def curl(command: str) -> Reply:
    """Run a documented curl command (quiet, with a time limit); its -i output parsed."""
    argv = shlex.split(command)
    assert argv[0] == "curl" and "-i" in argv, command
    result = subprocess.run([argv[0], "-sS", "--max-time", "10", *argv[1:]],
                            capture_output=True, timeout=30)
    assert result.returncode == 0, f"{command}: {result.stderr.decode(errors='replace')}"
    head, _, body = result.stdout.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = [tuple(part.strip() for part in line.split(":", 1)) for line in header_lines]
    return Reply(int(status_line.split()[1]), headers, body)  # type: ignore[arg-type]


def test_readme_and_compose_file_document_the_same_commands():
    commands = compose_header_commands()
    assert commands[0] == "docker compose up --build"
    assert readme_compose_commands() == commands


def test_compose_up_build_answers_the_readme_curl_commands_as_documented(
    engine: Engine, image: str, standin: str, tmp_path: Path, capsys: pytest.CaptureFixture
):
    deadline = time.monotonic() + PORTS_TIMEOUT
    while busy := [port for port in COMPOSE_PORTS if not port_is_free(port)]:
        if time.monotonic() > deadline:
            pytest.fail(f"127.0.0.1 ports {busy} stayed in use for {PORTS_TIMEOUT:.0f} s: the "
                        "compose test runs the services on the host's loopback at the ports "
                        "docker-compose.yml uses")
        time.sleep(1)
    override = tmp_path / "compose.host-network.yml"
    # "!reset" is a YAML tag, written as such.
    override.write_text(yaml.safe_dump(COMPOSE_OVERRIDE, sort_keys=False)
                        .replace("'!reset []'", "!reset []"))
    compose = ["compose", "--project-directory", str(REPO), "--file",
               str(REPO / "docker-compose.yml"), "--file", str(override)]
    started = time.monotonic()
    try:
        up = engine.docker(*compose, "up", "--build", "--pull", "never", "--detach", "--wait",
                           "--wait-timeout", "120", cwd=REPO, check=False, timeout=600)
        if up.returncode != 0:
            ps = engine.docker(*compose, "logs", "--no-color", cwd=REPO, check=False, timeout=60)
            pytest.fail(f"docker compose up failed:\n{up.stdout[-4000:]}\n{up.stderr[-4000:]}"
                        f"\n{ps.stdout[-4000:]}")
        with capsys.disabled():
            print(f"\n[docker] compose up --build, both services healthy: "
                  f"{time.monotonic() - started:.0f} s")
        (proxy_id,) = engine.docker(*compose, "ps", "--quiet", "corsproxy", cwd=REPO,
                                    timeout=60).stdout.split()
        container = engine.inspect(proxy_id)
        assert container["State"]["Health"]["Status"] == "healthy"
        assert [(m["Source"], m["Destination"], m["RW"]) for m in container["Mounts"]] == [
            (str(REPO / "config"), "/etc/corsproxy", False)
        ]

        _, get, preflight = readme_compose_commands()
        got = curl(get)
        assert got.status == 200
        assert json.loads(got.body) == [{"id": 1, "name": "apple"}, {"id": 2, "name": "pear"}]
        # The sample API's own "Access-Control-Allow-Origin: *" is gone.
        assert got.cors() == {
            "Access-Control-Allow-Origin": "http://localhost:3000",
            "Access-Control-Expose-Headers": "X-Request-Id",
        }
        assert got.header("Vary") == "Origin"

        pre = curl(preflight)
        assert pre.status == 200
        assert pre.cors() == {
            "Access-Control-Allow-Origin": "http://localhost:3000",
            "Access-Control-Allow-Methods": "GET, POST, PUT, DELETE",
            "Access-Control-Allow-Headers": (
                "Accept, Accept-Language, Authorization, Content-Language, Content-Type, "
                "X-Request-Id"
            ),
            "Access-Control-Max-Age": "600",
        }
        assert pre.header("Vary") == PREFLIGHT_VARY

        stopped = time.monotonic()
        engine.docker(*compose, "stop", cwd=REPO, timeout=120)
        assert time.monotonic() - stopped < 15, "compose stop waited for a SIGKILL"
        assert engine.inspect(proxy_id)["State"]["ExitCode"] == 0
    finally:
        down = engine.docker(*compose, "down", "--timeout", "20", cwd=REPO, check=False,
                             timeout=120)
    assert down.returncode == 0, down.stderr
