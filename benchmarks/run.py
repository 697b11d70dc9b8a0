"""Side-by-side throughput and latency of corsproxy on loopback (issue 3 and issue 5).

One command starts everything on 127.0.0.1 with free ports, one worker each, measures
with wrk, prints the tables and stops what it started:

    python benchmarks/run.py                 # 10 s per measurement, about 2.5 minutes
    python benchmarks/run.py --duration 5 --paths preflight,small
    python benchmarks/run.py --smoke         # every piece once, 1 s each (the test uses it)

Targets (the columns):

- ``direct``: the upstream itself, nginx serving a small JSON and a 1 MiB file
  (``nginx-upstream.conf``);
- ``nginx-cors``: nginx configured as a CORS proxy with the same policy
  (``nginx-cors.conf``) in front of that upstream;
- ``aiohttp-bare``: aiohttp's low-level server returning a constant preflight answer,
  the framework's ceiling for preflights (``bare_aiohttp.py``);
- ``aiohttp-proxy``: a plain web.Application + ClientSession proxy (``aiohttp_proxy.py``);
- ``aiohttp-ll-proxy``: the same on aiohttp's low-level server (only with ``--targets``);
- ``corsproxy``: ``python -m corsproxy run --config benchmarks/corsproxy.yaml``.

Paths (the rows): ``preflight`` (OPTIONS with Origin, Access-Control-Request-Method and
-Headers), ``small`` (GET of the small JSON with Origin), ``large`` (GET of 1 MiB with
Origin). Every target is checked with one real request before it is loaded (status,
body size, CORS headers), so a misconfigured target fails loudly instead of measuring
error pages. Needs ``nginx`` (Debian nginx-light) and ``wrk``. A benchmark, not a test:
numbers vary between machines and runs; compare columns of the same run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORIGIN = "https://app.example.com"
SMALL_BODY = b'{"id": 42, "name": "corsproxy benchmark", "tags": ["cors", "proxy"], "ok": true}\n'
LARGE_SIZE = 1 << 20
START_TIMEOUT = 20.0  # seconds for a server to accept connections
STOP_TIMEOUT = 15.0  # seconds for a server to exit after SIGTERM


class BenchError(Exception):
    """A step failed; the message says which and how to fix it."""


@dataclass(frozen=True)
class Scenario:
    """One row of the table: the request wrk sends over and over."""

    name: str
    label: str
    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body_size: int


SCENARIOS = {
    "preflight": Scenario(
        "preflight",
        "preflight",
        "OPTIONS",
        "/small.json",
        (
            ("Origin", ORIGIN),
            ("Access-Control-Request-Method", "PUT"),
            ("Access-Control-Request-Headers", "content-type,x-request-id"),
        ),
        2,
    ),
    "small": Scenario(
        "small", "small proxied GET", "GET", "/small.json", (("Origin", ORIGIN),), len(SMALL_BODY)
    ),
    "large": Scenario(
        "large", "1 MiB proxied GET", "GET", "/1mib.bin", (("Origin", ORIGIN),), LARGE_SIZE
    ),
}

#: target -> (column title, the paths it serves, whether it adds CORS headers)
TARGETS = {
    "direct": ("upstream direct", ("small", "large"), False),
    "nginx-cors": ("nginx as a CORS proxy", ("preflight", "small", "large"), True),
    "aiohttp-bare": ("bare aiohttp, constant", ("preflight",), True),
    "aiohttp-proxy": ("plain aiohttp proxy", ("preflight", "small", "large"), True),
    "aiohttp-ll-proxy": ("aiohttp low-level proxy", ("small", "large"), True),
    "corsproxy": ("corsproxy", ("preflight", "small", "large"), True),
}
#: Measured unless --targets says otherwise (aiohttp-ll-proxy only on request).
DEFAULT_TARGETS = ("direct", "nginx-cors", "aiohttp-bare", "aiohttp-proxy", "corsproxy")

#: Issue 5's targets: (path, baseline target, minimum corsproxy/baseline req/s ratio,
#: maximum corsproxy/baseline p99 ratio or None).
GOALS = (
    ("preflight", "aiohttp-bare", 0.9, None),
    ("small", "nginx-cors", 0.3, None),
    ("large", "nginx-cors", 0.9, 3.0),
)


# -- processes -----------------------------------------------------------------------


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


class Processes:
    """The servers this run started; stopped (SIGTERM, then SIGKILL) in reverse order."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.started: list[tuple[str, subprocess.Popen, Path]] = []

    def start(self, name: str, argv: list[str], port: int, env: dict | None = None) -> None:
        log = self.run_dir / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=HERE,
                start_new_session=True,  # a Ctrl-C at the terminal reaches run.py only
            )
        self.started.append((name, proc, log))
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BenchError(
                    f"{name} exited with code {proc.returncode} before listening on port "
                    f"{port}.\ncommand: {' '.join(argv)}\n{log}:\n{_tail(log)}"
                )
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise BenchError(
            f"{name} did not listen on 127.0.0.1:{port} within {START_TIMEOUT:.0f} s.\n"
            f"command: {' '.join(argv)}\n{log}:\n{_tail(log)}"
        )

    def stop_all(self) -> None:
        for _name, proc, _log in reversed(self.started):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc, _log in reversed(self.started):
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                print(
                    f"warning: {name} ignored SIGTERM for {STOP_TIMEOUT:.0f} s; killing it",
                    file=sys.stderr,
                )
                proc.kill()
                proc.wait(STOP_TIMEOUT)
        self.started.clear()


def render(template: str, run_dir: Path, **values: object) -> Path:
    """Fill a config template's @NAME@ placeholders; returns the rendered file."""
    text = (HERE / template).read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", str(value))
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    leftover = sorted(set(re.findall(r"@[A-Z_]+@", code)))
    if leftover:
        raise BenchError(f"{template}: placeholders left unfilled: {', '.join(leftover)}")
    out = run_dir / template
    out.write_text(text)
    return out


def require(tool: str, package: str) -> str:
    found = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/usr/local/sbin:/sbin")
    if found is None:
        raise BenchError(f"{tool} not found on PATH; install it: apt-get install {package}")
    return found


# -- one request to check a target before loading it ---------------------------------


def probe(target: str, port: int, scenario: Scenario, cors: bool) -> None:
    """Send the scenario's request once; fail when the answer is not the expected one."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(scenario.method, scenario.path, headers=dict(scenario.headers))
        resp = conn.getresponse()
        body = resp.read()
        acao = resp.getheader("Access-Control-Allow-Origin")
        acam = resp.getheader("Access-Control-Allow-Methods")
    except OSError as exc:
        raise BenchError(f"{target}: {scenario.method} {scenario.path} failed: {exc}") from exc
    finally:
        conn.close()
    problems = []
    if resp.status != 200:
        problems.append(f"status {resp.status}, expected 200 (body: {body[:200]!r})")
    if len(body) != scenario.body_size:
        problems.append(f"body of {len(body)} bytes, expected {scenario.body_size}")
    if cors and acao != ORIGIN:
        problems.append(f"Access-Control-Allow-Origin {acao!r}, expected {ORIGIN!r}")
    if cors and scenario.name == "preflight" and not acam:
        problems.append("no Access-Control-Allow-Methods on the preflight answer")
    if problems:
        raise BenchError(
            f"{target} answers {scenario.method} {scenario.path} wrongly: "
            + "; ".join(problems)
            + ". Fix the target (or its config in benchmarks/) before measuring it."
        )


# -- wrk -----------------------------------------------------------------------------


def run_wrk(
    wrk: str, port: int, scenario: Scenario, args: argparse.Namespace, duration: int
) -> dict:
    argv = [
        wrk,
        "-t",
        str(args.threads),
        "-c",
        str(args.connections),
        "-d",
        f"{duration}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(HERE / "wrk_report.lua"),
    ]
    for name, value in scenario.headers:
        argv += ["-H", f"{name}: {value}"]
    argv.append(f"http://127.0.0.1:{port}{scenario.path}")
    env = dict(os.environ, BENCH_METHOD=scenario.method)
    try:
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=duration + 60)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish within {duration + 60} s: {' '.join(argv)}") from exc
    for line in out.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            result = json.loads(line[len("BENCH_JSON ") :])
            break
    else:
        raise BenchError(
            f"wrk printed no result line (exit {out.returncode}).\ncommand: {' '.join(argv)}\n"
            f"stdout:\n{out.stdout}\nstderr:\n{out.stderr}"
        )
    seconds = result["duration_us"] / 1e6
    result["rps"] = result["requests"] / seconds if seconds else 0.0
    result["errors"] = sum(
        result[k]
        for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
    )
    return result


# -- the table ---------------------------------------------------------------------------


def fmt_rps(rps: float) -> str:
    return f"{rps / 1000:.1f}k" if rps >= 10_000 else f"{rps / 1000:.2f}k"


def fmt_ms(us: float) -> str:
    return f"{us / 1000:.2f}"


def cell(r: dict | None) -> str:
    if r is None:
        return "-"
    text = f"{fmt_rps(r['rps'])} req/s, p50 {fmt_ms(r['p50_us'])} / p99 {fmt_ms(r['p99_us'])} ms"
    if r["errors"]:
        text += f" ({r['errors']} errors)"
    return text


def ratio(a: dict | None, b: dict | None, key: str = "rps") -> float | None:
    if a is None or b is None or not b[key]:
        return None
    return a[key] / b[key]


def fmt_ratio(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}x" if x >= 0.1 else f"{x:.3f}x"


def tables(results: dict, targets: list[str], paths: list[str]) -> str:
    lines = []
    head = ["path"] + [TARGETS[t][0] for t in targets]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for p in paths:
        row = [SCENARIOS[p].label] + [cell(results.get((t, p))) for t in targets]
        lines.append("| " + " | ".join(row) + " |")
    if "corsproxy" in targets:
        lines.append("")
        others = [t for t in targets if t != "corsproxy"]
        head = ["path"] + [f"corsproxy / {t}" for t in others]
        head += ["p99 corsproxy / nginx-cors", "issue 5 target"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for p in paths:
            mine = results.get(("corsproxy", p))
            row = [SCENARIOS[p].label]
            row += [fmt_ratio(ratio(mine, results.get((t, p)))) for t in others]
            row.append(fmt_ratio(ratio(mine, results.get(("nginx-cors", p)), "p99_us")))
            row.append(goal_text(results, p))
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def goal_text(results: dict, path: str) -> str:
    for p, base, min_ratio, max_p99 in GOALS:
        if p != path:
            continue
        mine, theirs = results.get(("corsproxy", p)), results.get((base, p))
        r = ratio(mine, theirs)
        want = f">= {min_ratio}x {base}" + (f", p99 <= {max_p99}x" if max_p99 else "")
        if r is None:
            return f"{want}: not measured"
        met = r >= min_ratio
        if max_p99 is not None:
            met = met and ratio(mine, theirs, "p99_us") <= max_p99
        return f"{want}: {'met' if met else 'not met'}"
    return "-"


# -- main ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark corsproxy beside nginx and aiohttp baselines on loopback.",
    )
    parser.add_argument(
        "--duration", type=int, default=10, help="seconds of load per measurement (default 10)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="seconds of unrecorded load before each measurement (default 2)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the whole plan N times; each cell keeps its median round (default 1)",
    )
    parser.add_argument("--connections", type=int, default=50, help="wrk connections (50)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (2)")
    parser.add_argument(
        "--targets",
        default=",".join(DEFAULT_TARGETS),
        help=f"comma list of targets (default {','.join(DEFAULT_TARGETS)}; "
        f"all: {','.join(TARGETS)})",
    )
    parser.add_argument(
        "--paths",
        default=",".join(SCENARIOS),
        help=f"comma list of paths (default all: {','.join(SCENARIOS)})",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="check every piece quickly: 1 s each, no warm-up, 4 connections",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the raw results as JSON")
    parser.add_argument(
        "--corsproxy-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `corsproxy run` (repeatable)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary directory (rendered configs, logs)"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.duration, args.warmup, args.connections, args.threads = 1, 0, 4, 1
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    args.paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    for t in args.targets:
        if t not in TARGETS:
            parser.error(f"--targets: unknown target {t!r}; choose from {', '.join(TARGETS)}")
    for p in args.paths:
        if p not in SCENARIOS:
            parser.error(f"--paths: unknown path {p!r}; choose from {', '.join(SCENARIOS)}")
    if args.duration < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error("--duration and --rounds must be at least 1, --warmup at least 0")
    if args.threads < 1 or args.connections < args.threads:
        parser.error("--threads must be at least 1 and --connections at least --threads")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    targets = [t for t in TARGETS if t in args.targets]
    paths = [p for p in SCENARIOS if p in args.paths]
    plan = [(t, p) for p in paths for t in targets if p in TARGETS[t][1]]
    if not plan:
        print("nothing to measure: no target serves the chosen paths", file=sys.stderr)
        return 2
    run_dir = Path(tempfile.mkdtemp(prefix="corsproxy-bench-"))
    # nginx started as root drops its workers to "nobody", who must read the docroot.
    run_dir.chmod(0o755)
    procs = Processes(run_dir)
    results: dict[tuple[str, str], dict] = {}
    try:
        wrk = require("wrk", "wrk")
        nginx = require("nginx", "nginx-light")
        estimate = len(plan) * (args.duration + args.warmup) * args.rounds
        print(
            f"corsproxy benchmark: {args.rounds} x {len(plan)} measurements of {args.duration} s "
            f"(+{args.warmup} s warm-up), wrk -t{args.threads} -c{args.connections}, "
            f"about {estimate // 60} min {estimate % 60} s; one worker per server, "
            f"{os.cpu_count()} CPUs, load average before the run {os.getloadavg()[0]:.2f} "
            "(well above 0: other processes share the CPUs, numbers will be low)",
            flush=True,
        )
        ports = start_servers(procs, run_dir, nginx, {t for t, _ in plan}, args)
        for t, p in plan:
            probe(t, ports[t], SCENARIOS[p], TARGETS[t][2])
        rounds: dict[tuple[str, str], list[dict]] = {}
        for round_no in range(1, args.rounds + 1):
            if args.rounds > 1:
                print(f"round {round_no} of {args.rounds}", flush=True)
            for t, p in plan:
                if args.warmup:
                    run_wrk(wrk, ports[t], SCENARIOS[p], args, args.warmup)
                r = run_wrk(wrk, ports[t], SCENARIOS[p], args, args.duration)
                rounds.setdefault((t, p), []).append(r)
                print(f"  {SCENARIOS[p].label:<18} {t:<17} {cell(r)}", flush=True)
        # Several rounds: each cell keeps its median round by requests/s (the upper one
        # for an even count), so one disturbed round moves nothing.
        for key, runs in rounds.items():
            results[key] = sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        if args.keep:
            print(f"kept {run_dir}", file=sys.stderr)
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
    print()
    print(tables(results, targets, paths))
    if args.json:
        raw = [{"target": t, "path": p, **r} for (t, p), r in results.items()]
        Path(args.json).write_text(json.dumps(raw, indent=2) + "\n")
    return 0


def start_servers(
    procs: Processes, run_dir: Path, nginx: str, needed: set[str], args: argparse.Namespace
) -> dict[str, int]:
    """Start the upstream and every needed target; returns target -> port."""
    docroot = run_dir / "docroot"
    docroot.mkdir()
    (docroot / "small.json").write_bytes(SMALL_BODY)
    (docroot / "1mib.bin").write_bytes(os.urandom(LARGE_SIZE))
    for path in (docroot, docroot / "small.json", docroot / "1mib.bin"):
        path.chmod(0o755 if path.is_dir() else 0o644)

    up = free_port()
    ports = {"direct": up}
    upstream_url = f"http://127.0.0.1:{up}"
    (run_dir / "upstream-tmp").mkdir()
    conf = render(
        "nginx-upstream.conf", run_dir, RUN_DIR=run_dir, UPSTREAM_PORT=up, DOCROOT=docroot
    )
    procs.start(
        "upstream",
        [nginx, "-e", str(run_dir / "upstream-startup.log"), "-p", str(run_dir), "-c", str(conf)],
        up,
    )
    if "nginx-cors" in needed:
        port = ports["nginx-cors"] = free_port()
        (run_dir / "nginx-cors-tmp").mkdir()
        conf = render(
            "nginx-cors.conf", run_dir, RUN_DIR=run_dir, UPSTREAM_PORT=up, PROXY_PORT=port
        )
        procs.start(
            "nginx-cors",
            [
                nginx,
                "-e",
                str(run_dir / "nginx-cors-startup.log"),
                "-p",
                str(run_dir),
                "-c",
                str(conf),
            ],
            port,
        )
    if "aiohttp-bare" in needed:
        port = ports["aiohttp-bare"] = free_port()
        procs.start(
            "aiohttp-bare",
            [sys.executable, str(HERE / "bare_aiohttp.py"), "--port", str(port)],
            port,
        )
    if "aiohttp-proxy" in needed:
        port = ports["aiohttp-proxy"] = free_port()
        procs.start(
            "aiohttp-proxy",
            [
                sys.executable,
                str(HERE / "aiohttp_proxy.py"),
                "--port",
                str(port),
                "--upstream",
                upstream_url,
            ],
            port,
        )
    if "aiohttp-ll-proxy" in needed:
        port = ports["aiohttp-ll-proxy"] = free_port()
        procs.start(
            "aiohttp-ll-proxy",
            [
                sys.executable,
                str(HERE / "aiohttp_proxy.py"),
                "--low-level",
                "--port",
                str(port),
                "--upstream",
                upstream_url,
            ],
            port,
        )
    if "corsproxy" in needed:
        port = ports["corsproxy"] = free_port()
        procs.start(
            "corsproxy",
            [
                sys.executable,
                "-m",
                "corsproxy",
                "run",
                "--config",
                str(HERE / "corsproxy.yaml"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--upstream",
                upstream_url,
                *args.corsproxy_arg,
            ],
            port,
        )
    return ports


if __name__ == "__main__":
    sys.exit(main())
