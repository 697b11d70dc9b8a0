"""The ``corsproxy`` command (also ``python -m corsproxy``).

Commands: ``run`` (the proxy), ``check`` (validate a config and print the effective
policy), ``explain`` (what the proxy would answer to one request, and why),
``demo``, ``schema`` (the config file's JSON Schema), ``healthcheck`` (for the
Dockerfile's HEALTHCHECK), ``learn`` (a policy proposed from access logs,
:mod:`corsproxy.learn`) and ``test`` (a file of expected answers checked against the
policy, :mod:`corsproxy.policytest`).

Exit codes: 0 success (``explain`` exits 0 whatever the verdict), 1 an unusable
config or a failed health check, 2 bad command-line arguments (argparse's
convention), 130 interrupted. ``test`` exits 1 when a case fails and 2 when the run
can't be made (a bad case file or config, too). A user error never prints a traceback: config
problems arrive as :class:`~corsproxy.config.ConfigError` lines, file problems as
``OSError``, both printed in one line each.

``--config`` defaults to the ``CORSPROXY_CONFIG`` environment variable in every
command. ``run`` and ``demo`` import the server lazily, so ``check``, ``explain``
and ``schema`` start fast and never load the server; ``learn`` and ``test`` import
their modules lazily too (every command's arguments are defined here), so
``healthcheck`` and ``run`` don't pay for them.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import os
import sys
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from . import __version__
from ._args import DEFAULT_PUBLIC_SUFFIX_LIST, ENV_CONFIG, config_arg
from .config import AdminConfig, Config, ConfigError, config_json_schema, load_config
from .core import SAFELISTED_REQUEST_HEADERS, CorsSettings
from .explain import explain_json, explain_text, request_view

HEALTHCHECK_URL = "http://127.0.0.1:8080/"
HEALTHZ_URL = "http://127.0.0.1:9901/healthz"
HEALTHCHECK_ORIGIN = "http://corsproxy-healthcheck.invalid"
HEALTHCHECK_TIMEOUT = 3.0


class UsageError(Exception):
    """A bad command line that argparse can't see (exit 2)."""


# ---------------------------------------------------------------------------
# Argument parsing
# ---------------------------------------------------------------------------


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0-65535)")
    return port


def _workers(value: str) -> int:
    from .config import MAX_WORKERS

    if value == "auto":
        return 0
    try:
        workers = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a number of processes; write e.g. 2, or auto (one per usable CPU)"
        ) from None
    if not 0 <= workers <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(
            f"{workers} processes: use 1 to {MAX_WORKERS}, or auto (one per usable CPU)"
        )
    return workers


def _min_count(value: str) -> int:
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"{count}: use 1 or more")
    return count


def _learn_parser(subparsers: Any) -> None:
    """``learn`` (:mod:`corsproxy.learn`)."""
    p = subparsers.add_parser(
        "learn",
        help="propose a CORS policy from JSON access logs",
        description="Read corsproxy's JSON access logs and print a commented YAML policy "
        "proposal (cors and routes) on stdout: the origins seen with their counts, "
        "subdomains of one site grouped into a pattern, risky origins commented out, the "
        "methods and headers preflights asked for, and whether credentials were sent. "
        "It never writes a file: redirect the output, review it, merge it.",
    )
    p.add_argument("--log", nargs="+", action="extend", required=True, metavar="FILE",
                   help="JSON access log files (- for stdin; .gz files are decompressed)")
    p.add_argument("--min-count", type=_min_count, default=1, metavar="N",
                   help="leave out origins seen fewer than N times (default 1)")
    config_arg(p, "also list the changes against this config", metavar="CURRENT")
    p.add_argument("--public-suffix-list", metavar="FILE",
                   help=f"the Public Suffix List for grouping subdomains by site (default "
                   f"{DEFAULT_PUBLIC_SUFFIX_LIST}, Debian's publicsuffix package)")


def _test_parser(subparsers: Any) -> None:
    """``test`` (:mod:`corsproxy.policytest`)."""
    p = subparsers.add_parser(
        "test",
        help="check the policy against a file of expected answers (for CI)",
        description="Decide every case of a YAML case file with the config's policy (the "
        "same core as explain) and compare with its expect: and headers:. Prints PASS/FAIL "
        "per case and the reasons and header differences of each failure. Exit 0 when "
        "every case passes, 1 when one fails, 2 for bad arguments or an unusable case file "
        "or config. The case format is documented in corsproxy/policytest.py and "
        "config/policy-tests.yaml.",
    )
    config_arg(p, "the YAML config file whose policy is tested")
    p.add_argument("cases", metavar="CASES.yaml", help="the case file")
    p.add_argument("--junit", metavar="FILE", help="also write a JUnit XML report to FILE")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser for every command (exposed for docs and tests)."""
    parser = argparse.ArgumentParser(
        prog="corsproxy",
        description="A CORS-enforcing reverse proxy: one YAML policy in front of any HTTP API.",
        epilog=f"--config defaults to ${ENV_CONFIG} in every command.",
    )
    parser.add_argument("--version", action="version", version=f"corsproxy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="run the proxy", description="Run the proxy.")
    config_arg(p)
    p.add_argument("--upstream", metavar="URL", help="override upstream.url")
    p.add_argument("--host", metavar="HOST", help="override listen.host")
    p.add_argument("--port", metavar="PORT", type=_port, help="override listen.port")
    p.add_argument(
        "--workers", metavar="N", type=_workers,
        help="override listen.workers: processes sharing the port (auto: one per usable CPU)",
    )
    p.add_argument(
        "--log-format", choices=("text", "json"), default=None,
        help="override log.format: text or json lines",
    )

    p = sub.add_parser(
        "check",
        help="validate a config and print the effective policy",
        description="Validate a config file. Exit 0 and print the effective CORS policy "
        "of every route; exit 1 and print every error (stderr).",
    )
    config_arg(p)

    p = sub.add_parser(
        "explain",
        help="show what the proxy would answer to one request, and why",
        description="Decide one request with the config's policy and print the verdict, "
        "the reasons and exactly the headers the proxy would send. --request-method makes "
        "it a preflight (method OPTIONS). Without --origin the request is not a CORS "
        "request (it gets only Vary: Origin). Exit 0 whatever the verdict.",
    )
    config_arg(p)
    p.add_argument("--origin", metavar="ORIGIN", help="the Origin header (omit: no Origin)")
    p.add_argument(
        "--method",
        metavar="METHOD",
        help="the request method (default: OPTIONS with --request-method, else GET)",
    )
    p.add_argument("--path", metavar="PATH", default="/", help="request path (picks the route)")
    p.add_argument(
        "--request-method",
        metavar="METHOD",
        help="Access-Control-Request-Method: makes the request a preflight",
    )
    p.add_argument(
        "--request-headers",
        metavar="A,B",
        help="Access-Control-Request-Headers, as one comma list",
    )
    p.add_argument(
        "--request-private-network",
        action="store_true",
        help="send Access-Control-Request-Private-Network: true",
    )
    p.add_argument(
        "--host",
        metavar="HOST",
        help="the Host header (used for the same-origin test under enforce)",
    )
    p.add_argument(
        "--websocket",
        action="store_true",
        help="make it a WebSocket handshake (GET with Upgrade: websocket): shows the origin "
        "check on handshakes",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser(
        "demo",
        help="run a sample API with the proxy in front of it",
        description="Start a small sample API and corsproxy in front of it with "
        "config/demo.yaml, and print curl commands to try.",
    )
    p.add_argument("--port", type=_port, default=8080, help="proxy port (default 8080)")
    p.add_argument(
        "--upstream-port", type=_port, default=8000, help="sample API port (default 8000)"
    )

    sub.add_parser(
        "schema",
        help="print the config file's JSON Schema",
        description="Print the JSON Schema of the config file (the same as "
        "corsproxy/config.schema.json).",
    )

    _learn_parser(sub)
    _test_parser(sub)

    p = sub.add_parser(
        "healthcheck",
        help="check that a running proxy answers (for Docker HEALTHCHECK)",
        description="Ask the admin listener's GET /healthz (admin.host/admin.port from "
        f"--config or ${ENV_CONFIG}, default {HEALTHZ_URL}): exit 0 when it answers 200. "
        "With --url, or when the config turns the admin listener off (admin.port: null or "
        "0), send a CORS preflight (OPTIONS, Origin: "
        f"{HEALTHCHECK_ORIGIN}, Access-Control-Request-Method: GET) to the proxy instead "
        "(--url, else listen.host/port): exit 0 when it answers 200 or 400. The upstream is "
        "never touched. Exit 1 otherwise.",
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument("--url", metavar="URL",
                       help=f"send the health preflight to this proxy URL (e.g. "
                            f"{HEALTHCHECK_URL})")
    config_arg(group, "take the address from this config")
    return parser


# ---------------------------------------------------------------------------
# Output helpers
# ---------------------------------------------------------------------------


def _err(line: str) -> None:
    print(line, file=sys.stderr)


def _need_config(args: argparse.Namespace) -> str:
    if not args.config:
        raise UsageError(
            f"corsproxy {args.command}: no config file: pass --config FILE or set {ENV_CONFIG}"
        )
    return args.config


def _list(values: Sequence[str]) -> str:
    return ", ".join(values) if values else "(none)"


def _regex_list(patterns: Sequence[str]) -> str:
    """``allow_origin_regex`` for the check summary: one pattern as written; several
    YAML-quoted (a pattern may hold ", "), so the line reads back unambiguously."""
    if len(patterns) < 2:
        return _list(patterns)
    return ", ".join("'" + p.replace("'", "''") + "'" for p in patterns)


def _policy_lines(s: CorsSettings, base: CorsSettings | None = None) -> list[str]:
    """The effective policy, one field per line; ``base`` marks route overrides."""
    safelisted = ", ".join(SAFELISTED_REQUEST_HEADERS)
    origins = _list(s.allow_origins)
    if not s.allow_origins and not s.allow_origin_regex:
        origins = "(none: no origin is allowed)"
    rows: list[tuple[str, str]] = [
        ("allow_origins", origins),
        ("allow_origin_regex", _regex_list(s.allow_origin_regex)),
        (
            "allow_methods",
            "any method (the requested one is echoed)"
            if "*" in s.allow_methods
            else _list(s.allow_methods),
        ),
        (
            "allow_headers",
            "any header (the requested names are echoed)"
            if "*" in s.allow_headers
            else f"{_list(s.allow_headers)}  (plus {safelisted})",
        ),
        ("allow_credentials", str(s.allow_credentials).lower()),
        ("expose_headers", _list(s.expose_headers)),
        ("max_age", f"{s.max_age} s"),
        ("allow_private_network", str(s.allow_private_network).lower()),
        (
            "enforce",
            "true (cross-origin requests from other origins get 403)"
            if s.enforce
            else "false (other origins are forwarded, without CORS headers)",
        ),
        (
            "check_websocket_origin",
            "true (WebSocket handshakes from other origins get 403)"
            if s.check_websocket_origin
            else "false (WebSocket handshakes from any page are forwarded)",
        ),
        (
            "report_only",
            "true (REPORT ONLY: every request is forwarded and the upstream's own CORS "
            "headers pass; differences are logged as report=)"
            if s.report_only
            else "false (enforced)",
        ),
    ]
    lines = []
    for name, text in rows:
        mark = ""
        if base is not None and getattr(s, name) != getattr(base, name):
            mark = "   <- set by this route"
        lines.append(f"  {name + ':':<24}{text}{mark}")
    return lines


def _workers_note(workers: int) -> str:
    """``listen.workers`` for the check summary: the count and why."""
    from .workers import resolve_workers, workers_note

    count = resolve_workers(workers)
    return f", {count} worker{'s' if count != 1 else ''} ({workers_note(workers)})"


def _seconds(value: float | None) -> str:
    return "no limit" if value is None else f"{value:g} s"


def _admin_line(config: Config) -> str:
    admin = config.admin
    if admin.port is None:
        return "off (admin.port: null)"
    host = f"[{admin.host}]" if ":" in admin.host else admin.host
    port = "any free port" if admin.port == 0 else admin.port
    return f"http://{host}:{port}  (the page at /; /healthz /readyz /metrics /denied)"


def _summary(config: Config) -> str:
    listen, up = config.listen, config.upstream
    body = "no limit" if listen.max_body_size is None else f"{listen.max_body_size} bytes"
    url = up.url or "(not set: pass --upstream to corsproxy run)"
    out = [
        f"{config.source}: OK",
        "",
        f"listen:   {listen.host}:{listen.port}  (max_body_size: {body}, shutdown_grace: "
        f"{listen.shutdown_grace:g} s{_workers_note(listen.workers)})",
        f"upstream: {url}  (connect_timeout: {up.connect_timeout:g} s, timeout: "
        f"{up.timeout:g} s, read_timeout: {_seconds(up.read_timeout)}, preserve_host: "
        f"{str(up.preserve_host).lower()})",
        *([f"trusted:  {', '.join(str(n) for n in listen.trusted_proxies)}  (their "
           f"X-Forwarded-For/-Proto/-Host are kept)"] if listen.trusted_proxies else []),
        f"admin:    {_admin_line(config)}",
        f"log:      {config.log.format} lines to {config.log.file or 'stderr'}"
        f"{'' if config.log.access else ', no access lines'}",
        "",
        "cors (every path not under a route):",
        *_policy_lines(config.cors),
    ]
    for i, route in enumerate(config.routes):
        out += [
            "",
            f"route {route.path} (routes[{i}]; matches {route.path.rstrip('/') or '/'} and "
            f"below, longest route wins):",
            *_policy_lines(route.cors, config.cors),
        ]
        own = route.upstream
        if own is not None and (own.timeout is not None or own.read_timeout_set):
            timeout = _seconds(own.timeout if own.timeout is not None else up.timeout)
            read = _seconds(own.read_timeout if own.read_timeout_set else up.read_timeout)
            out.append(f"  upstream timeouts:      timeout: {timeout}, read_timeout: {read}"
                       f"   <- set by this route")
    n = len(config.warnings)
    reporting = [r.path for r in config.routes if r.cors.report_only]
    if config.cors.report_only:
        reporting.insert(0, "cors")
    report = f" ({len(reporting)} report-only: {', '.join(reporting)})" if reporting else ""
    count = 1 + len(config.routes)
    out += ["", f"{count} polic{'ies' if count != 1 else 'y'}{report}, {n} warning"
                f"{'s' if n != 1 else ''}"]
    return "\n".join(out)


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    config = load_config(_need_config(args))
    print(_summary(config))
    for w in config.warnings:
        _err(f"warning: {w}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    config = load_config(_need_config(args))
    if args.websocket and (args.request_method is not None or args.method not in (None, "GET")):
        raise UsageError("corsproxy explain: --websocket is a GET handshake; leave out "
                         "--request-method and --method")
    if not args.path.startswith("/"):
        raise UsageError(f"corsproxy explain: --path {args.path!r} must start with /")
    try:
        req = request_view(
            config, origin=args.origin, method=args.method, path=args.path,
            request_method=args.request_method,
            request_headers=args.request_headers,
            request_private_network=args.request_private_network,
            host=args.host, websocket=args.websocket,
        )
    except ValueError as exc:
        raise UsageError(f"corsproxy explain: {exc}") from None
    decision = config.router.decide(req)
    if args.json:
        print(json.dumps(explain_json(config, req, decision), indent=2))
    else:
        print(explain_text(config, req, decision))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    path = _need_config(args)

    def load() -> Config:
        """The config as this command reads it (also on every reload)."""
        config = load_config(
            path, upstream=args.upstream, host=args.host, port=args.port, require_upstream=True
        )
        if args.workers is not None:
            config = dataclasses.replace(
                config, listen=dataclasses.replace(config.listen, workers=args.workers)
            )
        return config

    config = load()
    try:
        from .logs import event_line
        from .server import run_server
    except ModuleNotFoundError as e:
        _err(f"corsproxy run: the proxy server is not available ({e}); reinstall corsproxy")
        return 1
    log_format = args.log_format or config.log.format
    for w in config.warnings:  # in the log's own format, before the server's first line
        _err(event_line(log_format, "config-warning", f"warning: {w}"))
    return run_server(config, log_format=log_format, load=load)


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        from .demo import run_demo
    except ModuleNotFoundError as e:
        _err(f"corsproxy demo: the demo is not available ({e}); reinstall corsproxy")
        return 1
    return run_demo(port=args.port, upstream_port=args.upstream_port)


def cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(config_json_schema(), indent=2))
    return 0


def _loopback(host: str) -> str:
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"[{host}]" if ":" in host else host


def _healthcheck_target(args: argparse.Namespace) -> tuple[str, str]:
    """(URL, "preflight" or "healthz"): what ``healthcheck`` asks, and how."""
    if args.url:
        return args.url, "preflight"
    if not args.config:
        admin = AdminConfig()
        return f"http://{_loopback(admin.host)}:{admin.port}/healthz", "healthz"
    config = load_config(args.config)
    admin = config.admin
    if admin.port:  # the admin listener's /healthz; else the preflight to the proxy
        return f"http://{_loopback(admin.host)}:{admin.port}/healthz", "healthz"
    listen = config.listen
    if listen.port == 0:
        raise UsageError(
            f"corsproxy healthcheck: {args.config}: listen.port is 0 (any free port), so the "
            f"address is unknown; pass --url http://HOST:PORT/"
        )
    scheme = "https" if listen.tls is not None else "http"
    return f"{scheme}://{_loopback(listen.host)}:{listen.port}/", "preflight"


def healthz(url: str, timeout: float = HEALTHCHECK_TIMEOUT) -> tuple[bool, str]:
    """``GET url`` (the admin listener's /healthz); (healthy, one line saying what
    happened)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("GET", parts.path)
        response = conn.getresponse()
        response.read(65536)
    except (OSError, http.client.HTTPException) as e:
        reason = str(e) or type(e).__name__
        return False, f"unhealthy: {url}: no answer ({reason})"
    finally:
        conn.close()
    if response.status == 200:
        return True, f"healthy: {url} answered 200"
    return False, (
        f"unhealthy: {url} answered {response.status} {response.reason}; corsproxy's admin "
        f"listener answers 200 (is something else on admin.port?)"
    )


def healthcheck(url: str, timeout: float = HEALTHCHECK_TIMEOUT) -> tuple[bool, str]:
    """Send the health preflight to ``url``; (healthy, one line saying what happened)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"corsproxy healthcheck: --url {url!r} must be http://HOST[:PORT]/...")
    try:
        port = parts.port
    except ValueError:
        raise UsageError(f"corsproxy healthcheck: --url {url!r} has an invalid port") from None
    if parts.scheme == "https":
        # A liveness probe of our own listener, usually on loopback: whether it answers
        # matters, not who signed its certificate (a private CA, a rotated one).
        import ssl

        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            parts.hostname, port, timeout=timeout, context=context
        )
    else:
        conn = http.client.HTTPConnection(parts.hostname, port, timeout=timeout)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        conn.request(
            "OPTIONS",
            target,
            headers={"Origin": HEALTHCHECK_ORIGIN, "Access-Control-Request-Method": "GET"},
        )
        response = conn.getresponse()
        response.read(65536)
    except (OSError, http.client.HTTPException) as e:
        reason = str(e) or type(e).__name__
        return False, f"unhealthy: {url}: no answer to the health preflight ({reason})"
    finally:
        conn.close()
    if response.status in (200, 400):
        return True, f"healthy: {url} answered the preflight with {response.status}"
    return False, (
        f"unhealthy: {url} answered the preflight with {response.status} {response.reason}; "
        f"a corsproxy listener answers 200 or 400 (is something else on that port?)"
    )


def cmd_healthcheck(args: argparse.Namespace) -> int:
    url, probe = _healthcheck_target(args)
    ok, message = healthz(url) if probe == "healthz" else healthcheck(url)
    print(message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def cmd_learn(args: argparse.Namespace) -> int:
    from .learn import cmd_learn

    return cmd_learn(args)


def cmd_test(args: argparse.Namespace) -> int:
    from .policytest import cmd_test

    return cmd_test(args)


COMMANDS = {
    "run": cmd_run,
    "check": cmd_check,
    "explain": cmd_explain,
    "demo": cmd_demo,
    "schema": cmd_schema,
    "healthcheck": cmd_healthcheck,
    "learn": cmd_learn,
    "test": cmd_test,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``corsproxy`` command; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version (0) and bad arguments (2)
        return e.code if isinstance(e.code, int) else 2
    try:
        return COMMANDS[args.command](args)
    except UsageError as e:
        _err(str(e))
        return 2
    except ConfigError as e:
        for line in e.report():
            _err(line)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `corsproxy schema | head`
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the final flush
        except OSError:
            pass
        return 0
    except OSError as e:  # a port in use, a file that vanished: say so, no traceback
        _err(f"corsproxy {args.command}: {e.strerror or e}")
        return 1
