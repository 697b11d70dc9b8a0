"""``listen.workers: N``: N processes serving one port.

The parent process binds the address once (with ``SO_REUSEPORT``), so a bad or
busy address is reported once, before any worker starts, and port 0 becomes one
concrete port all workers share. It keeps that socket bound but never listens on
it: it holds the port while workers come and go. Then it forks N workers; each
runs the ordinary single-process server (:func:`corsproxy.server.run_server`) on
its own listening socket bound to the same address with ``SO_REUSEPORT``, and the
kernel spreads new connections over the workers' sockets.

Signals: SIGTERM/SIGINT to the parent are forwarded to every worker; each worker
shuts down gracefully (``listen.shutdown_grace``), and the parent exits 0 once all
of them exited 0 (or were ended by that signal before they were set up).

A worker that exits on its own (a crash) is reported in one log line and replaced.
When more than :data:`MAX_RESTARTS` workers die within :data:`RESTART_WINDOW`
seconds, the parent gives up: it stops the remaining workers and exits 1.

The admin port (``admin.port``) is held the same way, and every worker's admin
listener joins it; before forking, the parent points prometheus-client's
multiprocess mode at a fresh temporary directory (``PROMETHEUS_MULTIPROC_DIR``,
removed at exit), so any worker's ``/metrics`` shows the totals
(:mod:`corsproxy.metrics`). A dead worker's live gauges are dropped there.

Linux and other systems with ``SO_REUSEPORT`` and ``fork`` only.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any

from .cpus import usable_cpus
from .logs import emit, event_line, reopen_log_file, setup_logging

if TYPE_CHECKING:
    from .config import Config

__all__ = ["MAX_RESTARTS", "RESTART_WINDOW", "resolve_workers", "run_workers", "workers_note"]

#: More than this many worker deaths within RESTART_WINDOW seconds: give up, exit 1.
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: The admin port's socket while the parent holds it (closed in each worker).
_held_admin: list[socket.socket] = []


def resolve_workers(workers: int) -> int:
    """``listen.workers`` as a process count: 0 (``auto``) is one per usable CPU
    (:func:`corsproxy.cpus.usable_cpus`: the affinity mask and the cgroup quota)."""
    return workers if workers > 0 else usable_cpus().count


def workers_note(workers: int) -> str:
    """How the worker count came about, for the start-up line and ``check``."""
    if workers > 0:
        return f"listen.workers: {workers}"
    limit = usable_cpus()
    return f"listen.workers: auto = {limit.count}: {limit.why}"


def _say(log_format: str, event: str, message: str, **fields: Any) -> None:
    emit(event_line(log_format, event, message, **fields))


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _worker(config: Config, log_format: str, held: socket.socket, load: Any = None) -> int:
    """In the forked child: the ordinary server, sharing the port."""
    from .server import run_server

    held.close()
    for sock in _held_admin:  # the admin port: the worker binds its own
        sock.close()
    return run_server(config, log_format=log_format, reuse_port=True, load=load)


def _start(config: Config, log_format: str, held: socket.socket, workers: dict[int, int],
           number: int, load: Any = None) -> None:
    """Fork worker ``number``. The stop signals are blocked around the fork, so the
    parent's forwarding handler never runs in a child and never misses a new pid."""
    sys.stderr.flush()
    parent = os.getpid()
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        pid = os.fork()
        if pid != 0:
            workers[pid] = number
    finally:
        if pid != 0:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    if pid == 0:  # pragma: no cover - runs in the child (tests see it as a process)
        code = 1
        try:
            _die_with_parent(parent)
            for sig in _STOP_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            # A SIGHUP or SIGUSR1 before the worker's own handlers are set must not kill it.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
            code = _worker(config, log_format, held, load)
        except BaseException as exc:  # never let a child fall back into the parent's loop
            _say(log_format, "error", f"worker {os.getpid()} failed: {type(exc).__name__}: {exc}")
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)


def _die_with_parent(parent: int) -> None:
    """In a new worker: get SIGTERM when the parent dies (PR_SET_PDEATHSIG), so a
    parent killed with SIGKILL (OOM killer, ``docker kill``) leaves no orphaned
    workers holding the port; the SIGTERM is a graceful stop. A parent already
    gone before this ran: exit at once."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux: no such guard
        return
    if os.getppid() != parent:
        os._exit(0)


def _describe_exit(status: int) -> tuple[str, bool]:
    """(words, clean) for a wait status; clean is exit 0 or our stop signal."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return f"was killed by {signal.Signals(sig).name}", sig in _STOP_SIGNALS
    code = os.waitstatus_to_exitcode(status)
    return f"exited with code {code}", code == 0


def run_workers(config: Config, *, log_format: str = "text", count: int,
                load: Any = None) -> int:
    """Run ``count`` worker processes on ``config.listen``; returns the exit code.
    SIGHUP and SIGUSR1 go on to every worker (reload; reopen ``log.file``)."""
    try:
        setup_logging(log_format, file=config.log.file, access=config.log.access)
    except OSError as exc:
        from .logs import describe_error

        _say(log_format, "error", f"cannot open log.file {config.log.file}: "
                                  f"{describe_error(exc)}; check the path and its permissions")
        return 1
    host, port = config.listen.host, config.listen.port
    try:
        held = _bind(host, port)
    except OSError as exc:
        from .logs import describe_error

        _say(log_format, "error", f"cannot listen on {host}:{port}: {describe_error(exc)}; "
                                  f"pick another address with --host/--port or listen.port")
        return 1
    port = held.getsockname()[1]
    config = dataclasses.replace(config, listen=dataclasses.replace(config.listen, port=port))
    # The admin port, held the same way; every worker's admin listener joins it, and
    # their metrics are summed through files in a fresh directory (corsproxy.metrics).
    admin = config.admin
    metrics_dir: str | None = None
    if admin.port is not None:
        from .admin import cannot_listen
        from .metrics import enable_multiprocess

        try:
            _held_admin.append(_bind(admin.host, admin.port))
        except OSError as exc:
            held.close()
            _say(log_format, "error", cannot_listen(admin.host, admin.port, exc))
            return 1
        admin_port = _held_admin[-1].getsockname()[1]
        config = dataclasses.replace(config, admin=dataclasses.replace(admin, port=admin_port))
        metrics_dir = tempfile.mkdtemp(prefix="corsproxy-metrics-")
        enable_multiprocess(metrics_dir)  # before any fork

    stopping: list[int] = []  # the signal that asked us to stop, once one did
    workers: dict[int, int] = {}  # pid -> worker number

    def forward(signum: int, frame: Any) -> None:
        stopping.append(signum)
        for pid in list(workers):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def reload(signum: int, frame: Any) -> None:
        # SIGHUP: each worker reloads (and validates) by itself; SIGUSR1: each
        # reopens its log file, after this process reopened its own.
        if signum == signal.SIGUSR1:
            problem = reopen_log_file()
            if problem is not None:
                _say(log_format, "error", problem)
        for pid in list(workers):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    previous = {sig: signal.signal(sig, forward) for sig in _STOP_SIGNALS}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, reload)
    previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, reload)
    note = workers_note(config.listen.workers)
    _say(log_format, "workers", f"corsproxy starting {count} worker processes on port {port} "
                                f"({note})", workers=count, port=port, pid=os.getpid(),
         why=note)
    deaths: list[float] = []
    failed = False
    try:
        for number in range(count):
            if stopping:
                break
            _start(config, log_format, held, workers, number, load)
        while workers:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:  # pragma: no cover - nothing left to wait for
                break
            number = workers.pop(pid, None)
            if number is None:
                continue
            if metrics_dir is not None:
                from .metrics import worker_exited

                worker_exited(pid)
            words, clean = _describe_exit(status)
            if stopping:
                failed = failed or not clean
                continue
            now = time.monotonic()
            deaths = [t for t in deaths if now - t < RESTART_WINDOW] + [now]
            if len(deaths) > MAX_RESTARTS:
                _say(log_format, "error", f"worker {pid} {words}; more than {MAX_RESTARTS} "
                                          f"workers ended within {RESTART_WINDOW:g} s, giving up: "
                                          f"stopping the others", pid=pid)
                failed = True
                forward(signal.SIGTERM, None)
                continue
            _say(log_format, "worker-exit", f"worker {pid} {words}; starting a new one",
                 pid=pid)
            _start(config, log_format, held, workers, number, load)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        held.close()
        while _held_admin:
            _held_admin.pop().close()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    _say(log_format, "stopped", f"corsproxy stopped ({count} workers)")
    return 1 if failed else 0
