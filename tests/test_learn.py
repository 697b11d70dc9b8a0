"""``corsproxy learn``: a policy proposal from recorded JSON access logs.

The logs are written by the tests with every key a real access line carries
(WebSocket tunnel lines, event lines, text-format lines, garbage and a huge line
mixed in). The proposals are compared as exact text; the output is parsed back
with the real config loader; the command runs as a real process too.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from corsproxy import learn
from corsproxy.cli import build_parser
from corsproxy.config import parse_config
from corsproxy.core import RequestView
from corsproxy.learn import PublicSuffixList, cmd_learn, read_lines

ROOT = Path(__file__).resolve().parent.parent
RUN_TIMEOUT = 60.0

#: A small list: enough for the scenarios, with a wildcard and an exception rule,
#: a Unicode rule, and a PRIVATE section.
SMALL_PSL = """\
// A test list in the format of https://publicsuffix.org/list/public_suffix_list.dat
// ===BEGIN ICANN DOMAINS===
com
org
net
io
uk
co.uk
// ck : https://en.wikipedia.org/wiki/.ck
*.ck
!www.ck
cn
\u516c\u53f8.cn
// ===END ICANN DOMAINS===
// ===BEGIN PRIVATE DOMAINS===
github.io
// ===END PRIVATE DOMAINS===
"""

GUIDE = """\
#
# How to read it:
# - allow_origins: the origins seen, most requests first. Two or more subdomains of one site
#   (same scheme and port) become one pattern "scheme://*.site": it matches any subdomain,
#   never the site itself; the origins seen are listed under it.
# - Entries marked RISK are commented out: uncomment one only if you mean it.
# - allow_methods, allow_headers: what preflights asked for. GET stays (the default); GET,
#   HEAD and POST sent as simple requests need no preflight, so they appear only when a
#   preflight asked for them. Accept, Accept-Language, Content-Language and Content-Type are
#   always allowed and not listed.
# - allow_credentials: true when a counted request carried a Cookie (credentials: "include").
# - Not learned (add what you need): allow_origin_regex, expose_headers, max_age, enforce,
#   allow_private_network, check_websocket_origin. A route inherits them from cors.
# - Add upstream: {url: ...} (or pass --upstream to corsproxy run), then corsproxy check.
"""

_ids = iter(range(1, 1_000_000))


def access(
    origin: str | None,
    *,
    method: str = "GET",
    path: str = "/api/items",
    route: str | None = None,
    time: str = "2026-05-09T07:35:25.123Z",
    request_method: str | None = None,
    request_headers: str | None = None,
    credentials: bool | None = None,
    reason: str | None = None,
    websocket: bool = False,
) -> str:
    """One JSON access line as corsproxy writes it (every key, in its order)."""
    preflight = method == "OPTIONS" and request_method is not None
    if reason is None:
        reason = (
            f'origin: "{origin}" is allowed by allow_origins' if origin is not None
            else "no Origin header: not a CORS request"
        )
    fields = {
        "time": time,
        "client": "10.0.0.7",
        "method": method,
        "path": path,
        "status": 101 if websocket else 200,
        "origin": origin,
        "cors": "not-cors" if origin is None else "allowed",
        "route": route,
        "request_id": f"5f0c2a9e41d7b3a8{next(_ids):08x}",
        "upstream_us": None if preflight else 1874,
        "us": 2291,
        "request_bytes": None if websocket else 0,
        "response_bytes": None if websocket else 1234,
        "request_method": request_method,
        "request_headers": request_headers,
        "credentials": credentials,
        "report": None,
        "report_detail": None,
        "error": None,
        "reason": reason,
    }
    if websocket:
        fields.update(up_bytes=120, down_bytes=4096, closed_by="client")
    fields["pid"] = 4242
    return json.dumps(fields)


def preflight(origin: str, method: str, headers: str | None = None, **kw: object) -> str:
    return access(origin, method="OPTIONS", request_method=method, request_headers=headers,
                  **kw)  # type: ignore[arg-type]


def event(name: str, message: str) -> str:
    return json.dumps({"time": "2026-05-09T07:35:20.000Z", "event": name, "message": message})


def main_log() -> list[str]:
    """The main scenario: one API, its apps, a public route, and noise."""
    app = "https://app.example.com"
    return [
        event("start", "corsproxy listening on http://0.0.0.0:8080"),
        *[access(app, credentials=True)] * 3,
        access(app, method="POST"),
        preflight(app, "PUT", "authorization, x-request-id, content-type"),
        preflight(app, "PUT", "Authorization, X-Request-Id"),
        preflight(app, "DELETE", "x-request-id"),
        access("https://a.preview.example.com"),
        access("https://a.preview.example.com", path="/api/live", websocket=True),
        access("https://b.preview.example.com", time="2026-05-09T09:15:00.000Z"),
        access("https://example.com"),
        access("https://a.github.io"),
        access("https://b.github.io"),
        access("https://a.co.uk"),
        access("https://b.co.uk"),
        access("https://x.shop.b.ck"),
        access("https://y.shop.b.ck"),
        access("null"),
        preflight("http://localhost:3000", "PATCH", "X-Debug"),
        access("http://localhost:3000", credentials=True),
        access("http://app.example.com"),
        preflight(app, "PUT, PATCH", "x-request-id"),  # two ACRM lines: no method counted
        preflight(app, "bad method", "bad header"),
        access("https://partner.example.net", route="/public", path="/public/logo.png"),
        access("https://partner.example.net", route="/public", path="/public/logo.png"),
        access(None),
        access(None, route="/health", path="/health"),
        access("http://proxy.example.com",
               reason='origin: "http://proxy.example.com" is the proxy\'s own origin '
                      "(same-origin request)"),
        access("https://a.example.com, https://b.example.com"),
        access("*"),
        access("HTTPS://APP.EXAMPLE.COM"),
        access("https://*.example.com"),
        event("reload", "config reloaded"),
        "2026-05-09T07:35:25.123Z 10.0.0.7 GET /api/items 200 origin=https://app.example.com "
        "cors=allowed",
        "",
        "not json at all {",
        "[1, 2, 3]",
        '{"method": "GET", "route": 42, "origin": "https://route-not-a-path.example.com"}',
        "{" + "x" * (70 * 1024) + "}",
        '{"a":' * 10_000 + "1" + "}" * 10_000,  # under 64 KiB, too deep for json
    ]


def write_log(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run(*argv: str) -> int:
    """``corsproxy learn ARGV`` in this process, through the CLI's own parser."""
    try:
        args = build_parser().parse_args(["learn", *argv])
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    return cmd_learn(args)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test in its own directory (file names in the output stay short), with
    no CORSPROXY_CONFIG from the environment and the small list beside the logs."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CORSPROXY_CONFIG", raising=False)
    (tmp_path / "psl.dat").write_text(SMALL_PSL, encoding="utf-8")
    return tmp_path


def learned(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """stdout of a successful run (nothing on stderr)."""
    code = run(*argv)
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    return out


MAIN_HEADER = """\
# CORS policy proposal from corsproxy access logs (corsproxy learn).
# Review before use; corsproxy learn never writes files.
#
# logs:      access.log (40 lines)
# lines:     40 read, 25 counted (cross-origin requests with one valid Origin)
# skipped:   4 not JSON, 1 over 64 KiB, 3 not access lines (events, other JSON),
#            1 same-origin, 2 without Origin, 4 invalid Origin
# time:      2026-05-09T07:35:25.123Z to 2026-05-09T09:15:00.000Z
# min-count: 1 (origins with fewer requests are left out, listed in a comment)
# grouping:  by site, public suffix list psl.dat
# routes without counted requests (not in the proposal): /health
"""

MAIN_BODY = """
cors:  # 23 requests outside the routes
  allow_origins:
    - https://*.example.com            # 12 requests, 3 with credentials, from 3 subdomains:
    # - https://app.example.com        # 9 requests
    # - https://a.preview.example.com  # 2 requests
    # - https://b.preview.example.com  # 1 request
    - https://*.shop.b.ck              # 2 requests, from 2 subdomains:
    # - https://x.shop.b.ck            # 1 request
    # - https://y.shop.b.ck            # 1 request
    - https://a.co.uk                  # 1 request
    - https://a.github.io              # 1 request
    - https://b.co.uk                  # 1 request
    - https://b.github.io              # 1 request
    - https://example.com              # 1 request
    # RISK: a developer's machine (loopback): any program running on a visitor's computer
    # can serve a page from this origin and call the API as that visitor.
    # - http://localhost:3000          # 2 requests, 1 with credentials
    # RISK: plain http although the same host also sent requests over https: anyone on
    # the network can read and change this traffic; probably a mixed-content leftover.
    # - http://app.example.com         # 1 request
    # RISK: "null" is the origin of sandboxed iframes, file: pages and some redirects;
    # any website can make its requests carry "null", so allowing it allows every site.
    # - "null"                         # 1 request
  allow_methods:
    - DELETE  # 1 preflight
    - GET     # the default (a simple GET never preflights)
    - PATCH   # 1 preflight
    - PUT     # 2 preflights
  allow_headers:
    - Authorization  # 2 preflights
    - X-Debug        # 1 preflight
    - x-request-id   # 4 preflights
  allow_credentials: true  # 4 of 23 requests carried cookies (credentials: "include")

routes:
  - path: /public  # 2 requests
    cors:
      allow_origins:
        - https://partner.example.net  # 2 requests
      allow_methods:
        - GET  # the default (a simple GET never preflights)
      allow_headers: []  # no preflight asked for another header
      allow_credentials: false  # no credentials in 2 requests
"""


def test_main_proposal(capsys: pytest.CaptureFixture[str]) -> None:
    write_log(Path("access.log"), main_log())
    out = learned(capsys, "--log", "access.log", "--public-suffix-list", "psl.dat")
    assert out == MAIN_HEADER + GUIDE + MAIN_BODY


def test_output_is_a_valid_config(capsys: pytest.CaptureFixture[str]) -> None:
    """The proposal plus an upstream loads; its policy allows what it lists, and the
    commented-out risky origins stay refused."""
    write_log(Path("access.log"), main_log())
    out = learned(capsys, "--log", "access.log", "--public-suffix-list", "psl.dat")
    config = parse_config(out + "upstream: {url: http://127.0.0.1:9}\n", "proposal.yaml")
    assert config.cors.allow_origins == (
        "https://*.example.com", "https://*.shop.b.ck", "https://a.co.uk", "https://a.github.io",
        "https://b.co.uk", "https://b.github.io", "https://example.com",
    )
    assert config.cors.allow_methods == ("DELETE", "GET", "PATCH", "PUT")
    assert config.cors.allow_headers == ("Authorization", "X-Debug", "x-request-id")
    assert config.cors.allow_credentials is True
    assert [(r.path, r.cors.allow_origins, r.cors.allow_credentials) for r in config.routes] == [
        ("/public", ("https://partner.example.net",), False)
    ]
    assert config.warnings == ()

    def allowed(origin: str, path: str = "/api/items") -> bool:
        decision = config.router.decide(
            RequestView("OPTIONS", path, (origin,), "PUT", ("x-request-id",))
        )
        return decision.allowed

    assert allowed("https://app.example.com")
    assert allowed("https://new.preview.example.com")  # the pattern: any subdomain
    assert allowed("https://example.com")
    for risky in ("null", "http://localhost:3000", "http://app.example.com"):
        assert not allowed(risky)
    assert not allowed("https://c.github.io")  # github.io is a public suffix: no pattern
    assert not allowed("https://app.example.com", "/public/logo.png")  # the route's own list


def test_real_public_suffix_list(capsys: pytest.CaptureFixture[str]) -> None:
    """Debian's list (the default): sites across the ICANN and PRIVATE sections, and a
    wildcard with its exception (*.kawasaki.jp, !city.kawasaki.jp)."""
    assert os.path.exists(learn.DEFAULT_PUBLIC_SUFFIX_LIST), (
        "install Debian's publicsuffix package (apt-get install publicsuffix)"
    )
    origins = [
        "https://a.github.io", "https://b.github.io",  # two sites (PRIVATE section)
        "https://a.co.uk", "https://b.co.uk",  # two sites (ICANN section)
        "https://x.a.github.io", "https://y.a.github.io",  # one site: a.github.io
        "https://shop.example.co.uk", "https://blog.example.co.uk",
        "https://a.city.kawasaki.jp", "https://b.city.kawasaki.jp",  # !city.kawasaki.jp
        "https://a.foo.kawasaki.jp", "https://b.foo.kawasaki.jp",  # *.kawasaki.jp: two sites
        "http://10.0.0.1", "http://10.0.0.2",  # addresses never group
    ]
    write_log(Path("access.log"), [access(o) for o in origins])
    out = learned(capsys, "--log", "access.log")
    assert (
        f"# grouping:  by site, public suffix list {learn.DEFAULT_PUBLIC_SUFFIX_LIST}\n" in out
    )
    assert out.split("cors:  # 14 requests outside the routes\n", 1)[1] == """\
  allow_origins:
    - https://*.a.github.io         # 2 requests, from 2 subdomains:
    # - https://x.a.github.io       # 1 request
    # - https://y.a.github.io       # 1 request
    - https://*.city.kawasaki.jp    # 2 requests, from 2 subdomains:
    # - https://a.city.kawasaki.jp  # 1 request
    # - https://b.city.kawasaki.jp  # 1 request
    - https://*.example.co.uk       # 2 requests, from 2 subdomains:
    # - https://blog.example.co.uk  # 1 request
    # - https://shop.example.co.uk  # 1 request
    - http://10.0.0.1               # 1 request
    - http://10.0.0.2               # 1 request
    - https://a.co.uk               # 1 request
    - https://a.foo.kawasaki.jp     # 1 request
    - https://a.github.io           # 1 request
    - https://b.co.uk               # 1 request
    - https://b.foo.kawasaki.jp     # 1 request
    - https://b.github.io           # 1 request
  allow_methods:
    - GET  # the default (a simple GET never preflights)
  allow_headers: []  # no preflight asked for another header
  allow_credentials: false  # no credentials in 14 requests
"""


def test_min_count(capsys: pytest.CaptureFixture[str]) -> None:
    """Origins under --min-count are left out (listed in a comment), and add no
    method, header or credentials; grouping only sees the origins kept."""
    write_log(Path("access.log"), main_log())
    out = learned(capsys, "--log", "access.log", "--public-suffix-list", "psl.dat",
                  "--min-count", "2")
    assert "# min-count: 2 (origins with fewer requests are left out, listed in a comment)\n" in out
    assert out.split(GUIDE, 1)[1] == """
cors:  # 23 requests outside the routes (13 from the origins kept)
  allow_origins:
    - https://*.example.com            # 11 requests, 3 with credentials, from 2 subdomains:
    # - https://app.example.com        # 9 requests
    # - https://a.preview.example.com  # 2 requests
    # RISK: a developer's machine (loopback): any program running on a visitor's computer
    # can serve a page from this origin and call the API as that visitor.
    # - http://localhost:3000          # 2 requests, 1 with credentials
    # left out: fewer than 2 requests (--min-count 2):
    # - http://app.example.com         # 1 request
    # - https://a.co.uk                # 1 request
    # - https://a.github.io            # 1 request
    # - https://b.co.uk                # 1 request
    # - https://b.github.io            # 1 request
    # - https://b.preview.example.com  # 1 request
    # - https://example.com            # 1 request
    # - https://x.shop.b.ck            # 1 request
    # - https://y.shop.b.ck            # 1 request
    # - "null"                         # 1 request
  allow_methods:
    - DELETE  # 1 preflight
    - GET     # the default (a simple GET never preflights)
    - PATCH   # 1 preflight
    - PUT     # 2 preflights
  allow_headers:
    - Authorization  # 2 preflights
    - X-Debug        # 1 preflight
    - x-request-id   # 4 preflights
  allow_credentials: true  # 4 of 13 requests carried cookies (credentials: "include")

routes:
  - path: /public  # 2 requests
    cors:
      allow_origins:
        - https://partner.example.net  # 2 requests
      allow_methods:
        - GET  # the default (a simple GET never preflights)
      allow_headers: []  # no preflight asked for another header
      allow_credentials: false  # no credentials in 2 requests
"""


def test_min_count_contributions(capsys: pytest.CaptureFixture[str]) -> None:
    """Methods, headers and credentials come only from the origins kept; a section
    whose origins are all left out gets an empty list (still valid YAML)."""
    write_log(Path("access.log"), [
        *[access("https://app.example.com")] * 3,
        preflight("https://rare.example.com", "PUT", "X-Rare"),
        access("https://rare.example.com", credentials=True),
        preflight("https://once.example.net", "DELETE", route="/admin", path="/admin/x"),
    ])
    out = learned(capsys, "--log", "access.log", "--public-suffix-list", "psl.dat",
                  "--min-count", "3")
    assert out.split(GUIDE, 1)[1] == """
cors:  # 5 requests outside the routes (3 from the origins kept)
  allow_origins:
    - https://app.example.com     # 3 requests
    # left out: fewer than 3 requests (--min-count 3):
    # - https://rare.example.com  # 2 requests
  allow_methods:
    - GET  # the default (a simple GET never preflights)
  allow_headers: []  # no preflight asked for another header
  allow_credentials: false  # no credentials in 3 requests

routes:
  - path: /admin  # 1 request (0 from the origins kept)
    cors:
      allow_origins: []  # to allow an entry below: uncomment it, remove []
        # left out: fewer than 3 requests (--min-count 3):
        # - https://once.example.net  # 1 request
      allow_methods:
        - GET  # the default (a simple GET never preflights)
      allow_headers: []  # no preflight asked for another header
      allow_credentials: false
"""
    config = parse_config(out + "upstream: {url: http://127.0.0.1:9}\n")
    assert config.routes[0].cors.allow_origins == ()


def test_risky_only_section_is_safe(capsys: pytest.CaptureFixture[str]) -> None:
    """Only risky origins: nothing is allowed until someone uncomments an entry."""
    write_log(Path("access.log"), [
        access("null"), access("http://127.0.0.1:5173"), access("http://[::1]:8080"),
        access("http://dev.localhost"), access("http://localhost"),
    ])
    out = learned(capsys, "--log", "access.log", "--public-suffix-list", "psl.dat")
    loopback = (
        "    # RISK: a developer's machine (loopback): any program running on a visitor's "
        "computer\n"
        "    # can serve a page from this origin and call the API as that visitor.\n"
    )
    assert out.split(GUIDE, 1)[1] == (
        "\ncors:  # 5 requests outside the routes\n"
        "  allow_origins: []  # to allow an entry below: uncomment it, remove []\n"
        + loopback + "    # - http://127.0.0.1:5173  # 1 request\n"
        + loopback + "    # - http://[::1]:8080      # 1 request\n"
        + loopback + "    # - http://dev.localhost   # 1 request\n"
        + loopback + "    # - http://localhost       # 1 request\n"
        "    # RISK: \"null\" is the origin of sandboxed iframes, file: pages and some "
        "redirects;\n"
        "    # any website can make its requests carry \"null\", so allowing it allows every "
        "site.\n"
        '    # - "null"                 # 1 request\n'
        "  allow_methods:\n"
        "    - GET  # the default (a simple GET never preflights)\n"
        "  allow_headers: []  # no preflight asked for another header\n"
        "  allow_credentials: false  # no credentials in 5 requests\n"
    )
    config = parse_config(out + "upstream: {url: http://127.0.0.1:9}\n")
    assert config.cors.allow_origins == ()
    # Uncommenting one entry (and removing "[]") is all it takes.
    edited = out.replace("allow_origins: []", "allow_origins:").replace(
        '    # - "null"', '    - "null"')
    config = parse_config(edited + "upstream: {url: http://127.0.0.1:9}\n")
    assert config.cors.allow_origins == ("null",)


def test_http_is_risky_only_beside_https(capsys: pytest.CaptureFixture[str]) -> None:
    """http://intranet.example.org has no https twin: kept. The http twin of an https
    origin seen on another route is flagged."""
    write_log(Path("access.log"), [
        access("http://intranet.example.org"),
        access("http://app.example.com"),
        access("https://app.example.com", route="/api", path="/api"),
    ])
    out = learned(capsys, "--log", "access.log", "--public-suffix-list", "psl.dat")
    top = out.split("cors:  # 2 requests outside the routes\n", 1)[1].split("  allow_methods")[0]
    assert top == """\
  allow_origins:
    - http://intranet.example.org  # 1 request
    # RISK: plain http although the same host also sent requests over https: anyone on
    # the network can read and change this traffic; probably a mixed-content leftover.
    # - http://app.example.com     # 1 request
"""


def test_no_public_suffix_list(capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without a list nothing is grouped, and the header says which file was missing
    and how to get it."""
    missing = str(tmp_path / "no" / "public_suffix_list.dat")
    monkeypatch.setattr(learn, "DEFAULT_PUBLIC_SUFFIX_LIST", missing)
    write_log(Path("access.log"), [access("https://a.example.com"), access("https://b.example.com")])
    out = learned(capsys, "--log", "access.log")
    assert (
        f"# grouping:  off: no public suffix list at {missing} (No such file or directory); "
        f"install Debian's publicsuffix package or pass --public-suffix-list FILE\n"
    ) in out
    assert "  allow_origins:\n    - https://a.example.com  # 1 request\n" \
           "    - https://b.example.com  # 1 request\n" in out


CURRENT = """\
upstream: {url: "http://127.0.0.1:8000"}
cors:
  allow_origins:
    - https://app.example.com
    - https://old.example.com
    - https://*.preview.example.com
    - "null"
    - https://rare.example.org
  allow_origin_regex: 'https://[a-z]+\\.github\\.io'
  allow_methods: [GET, POST, DELETE]
  allow_headers: [Authorization, X-Old]
  allow_credentials: true
  expose_headers: [X-Request-Id]
routes:
  - path: /public/
    cors: {allow_origins: "*", allow_credentials: false, allow_headers: "*"}
  - path: /legacy
    cors: {allow_origins: [https://legacy.example.com]}
"""

CHANGES = """
# ------------------------------------------------------------------------------
# Changes against current.yaml (its cors and routes replaced by the proposal).
# The proposal writes only allow_origins, allow_methods, allow_headers and
# allow_credentials. When you merge, keep the current file's other keys (expose_headers,
# max_age, enforce ...) but not allow_origin_regex: the origins it matched are listed.
#
# cors (top level):
#   origins to add:
#     - https://*.example.com   # allowed now by allow_origins, pattern "https://*.preview.example.com"
#     - https://*.shop.b.ck     # not allowed now
#     - https://a.co.uk         # not allowed now
#     - https://a.github.io     # allowed now by allow_origin_regex
#     - https://b.co.uk         # not allowed now
#     - https://b.github.io     # allowed now by allow_origin_regex
#     - https://example.com     # not allowed now
#     - http://localhost:3000   # not allowed now; commented out (RISK)
#     - http://app.example.com  # not allowed now; commented out (RISK)
#   current entries with no request in this section (candidates for removal):
#     - https://old.example.com
#     - https://rare.example.org
#   current entries the proposal replaces with the entries they matched:
#     - https://app.example.com
#       covered by https://*.example.com
#     - https://*.preview.example.com
#       covered by https://*.example.com
#     - "null"
#       commented out in the proposal (RISK): uncomment it to keep it
#     - allow_origin_regex "https://[a-z]+\\\\.github\\\\.io"
#       covered by https://a.github.io, https://b.github.io
#   allow_methods: add PATCH, PUT; remove POST
#   allow_headers: add X-Debug, x-request-id; remove X-Old
#
# route /public:
#   origins to add:
#     - https://partner.example.net  # allowed now by allow_origins "*"
#   current entries the proposal replaces with the entries they matched:
#     - "*"
#       covered by https://partner.example.net
#   allow_methods: remove POST, DELETE
#   allow_headers: now "*" (any); the proposal lists none
#
# route /legacy:
#   no counted request in these logs; not in the proposal (candidate for removal)
"""


def test_changes_against_current_config(capsys: pytest.CaptureFixture[str]) -> None:
    Path("current.yaml").write_text(CURRENT, encoding="utf-8")
    write_log(Path("access.log"), main_log())
    out = learned(capsys, "--log", "access.log", "--public-suffix-list", "psl.dat",
                  "--config", "current.yaml")
    assert out == MAIN_HEADER + GUIDE + MAIN_BODY + CHANGES
    parse_config(out + "upstream: {url: http://127.0.0.1:9}\n")  # comments only: still valid


def test_changes_for_a_route_the_config_lacks(capsys: pytest.CaptureFixture[str]) -> None:
    """A route in the logs but not in CURRENT is compared with the policy that decides
    its path now; credentials and min-count changes are named."""
    Path("current.yaml").write_text(
        "cors:\n  allow_origins: [https://app.example.com, https://seldom.example.com]\n"
        "  allow_credentials: true\n"
        "routes:\n  - path: /\n    cors: {allow_origins: [https://partner.example.net]}\n",
        encoding="utf-8",
    )
    write_log(Path("access.log"), [
        *[access("https://app.example.com")] * 2,
        access("https://seldom.example.com"),
        *[access("https://partner.example.net", route="/public", path="/public")] * 2,
    ])
    out = learned(capsys, "--log", "access.log", "--public-suffix-list", "psl.dat",
                  "--config", "current.yaml", "--min-count", "2")
    assert out.split("the origins it matched are listed.\n", 1)[1] == """\
#
# cors (top level):
#   current entries seen fewer than 2 times (left out):
#     - https://seldom.example.com  # 1 request
#   allow_credentials: true -> false
#
# route /public:
#   not in current.yaml: its requests are decided now by route /
#   allow_credentials: true -> false
#
# route /:
#   no counted request in these logs; not in the proposal (candidate for removal)
"""


def test_unusable_config_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    Path("bad.yaml").write_text("cors:\n  allow_origins: [https://App.example.com/]\n",
                                encoding="utf-8")
    write_log(Path("access.log"), [access("https://app.example.com")])
    assert run("--log", "access.log", "--config", "bad.yaml") == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        'bad.yaml: cors.allow_origins[0]: "https://App.example.com/" has upper case letters; '
        'browsers send origins in lower case, so it would never match: write '
        '"https://app.example.com"\n'
        "1 error; corsproxy did not use this config\n"
    )


def test_config_defaults_to_the_environment(capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    Path("current.yaml").write_text("cors: {allow_origins: [https://app.example.com]}\n",
                                    encoding="utf-8")
    monkeypatch.setenv("CORSPROXY_CONFIG", "current.yaml")
    write_log(Path("access.log"), [access("https://app.example.com")])
    out = learned(capsys, "--log", "access.log", "--public-suffix-list", "psl.dat")
    assert out.endswith("#\n# cors (top level):\n#   no changes\n")


def test_not_a_json_access_log(capsys: pytest.CaptureFixture[str]) -> None:
    """Text-format lines only, or JSON that is only events: exit 2, one line saying
    how to get JSON access lines."""
    write_log(Path("text.log"), [
        "2026-05-09T07:35:25.123Z 10.0.0.7 GET /api/items 200 origin=https://app.example.com "
        "cors=allowed request_id=5f0c2a9e41d7b3a800000001 us=2291",
        "2026-05-09T07:35:25.500Z corsproxy listening on http://0.0.0.0:8080",
    ])
    write_log(Path("events.log"), [event("start", "listening")])
    Path("empty.log").write_bytes(b"")
    hint = ("make corsproxy write JSON lines with `log: {format: json}` in its config or "
            "`corsproxy run --log-format json`\n")
    assert run("--log", "text.log") == 2
    assert capsys.readouterr() == (
        "", "corsproxy learn: text.log is not a JSON access log (2 lines, no JSON access "
        "line); " + hint)
    assert run("--log", "events.log", "empty.log") == 2
    assert capsys.readouterr() == (
        "", "corsproxy learn: events.log, empty.log are not JSON access logs (1 line, no JSON "
        "access line); " + hint)


def test_unreadable_files_and_bad_arguments(capsys: pytest.CaptureFixture[str],
                                            tmp_path: Path) -> None:
    write_log(Path("access.log"), [access("https://app.example.com")])
    cases = [
        (["--log", "access.log", "missing.log"],
         "corsproxy learn: cannot read missing.log: No such file or directory\n"),
        (["--log", str(tmp_path)], f"corsproxy learn: cannot read {tmp_path}: Is a directory\n"),
        (["--log", "access.log", "--public-suffix-list", "missing.dat"],
         "corsproxy learn: cannot use --public-suffix-list missing.dat: No such file or "
         "directory\n"),
    ]
    for argv, message in cases:
        assert run(*argv) == 2, argv
        assert capsys.readouterr() == ("", message)
    Path("empty.dat").write_text("// only comments\n\n", encoding="utf-8")
    assert run("--log", "access.log", "--public-suffix-list", "empty.dat") == 2
    assert capsys.readouterr().err == (
        "corsproxy learn: cannot use --public-suffix-list empty.dat: no rules in it: not a "
        "public suffix list\n")
    for argv, fragment in (
        ([], "the following arguments are required: --log"),
        (["--log", "access.log", "--min-count", "0"], "argument --min-count: 0: use 1 or more"),
        (["--log", "access.log", "--min-count", "x"],
         "argument --min-count: 'x' is not a whole number"),
        (["--log"], "argument --log: expected at least one argument"),
    ):
        assert run(*argv) == 2
        out, err = capsys.readouterr()
        assert out == "" and f"corsproxy learn: error: {fragment}\n" in err


def test_gzip_logs_and_truncated_ones(capsys: pytest.CaptureFixture[str]) -> None:
    """Rotated logs are often gzipped: read them; a broken one is an unreadable file."""
    lines = main_log()
    data = ("\n".join(lines) + "\n").encode()
    Path("access.log.1.gz").write_bytes(gzip.compress(data))
    out = learned(capsys, "--log", "access.log.1.gz", "--public-suffix-list", "psl.dat")
    assert out == MAIN_HEADER.replace("access.log (", "access.log.1.gz (") + GUIDE + MAIN_BODY
    Path("broken.gz").write_bytes(gzip.compress(data)[:200])
    assert run("--log", "broken.gz") == 2
    assert capsys.readouterr() == ("", "corsproxy learn: cannot read broken.gz: Compressed file "
                                       "ended before the end-of-stream marker was reached\n")


def test_several_files_in_any_order_give_the_same_policy(
    capsys: pytest.CaptureFixture[str],
) -> None:
    lines = main_log()
    write_log(Path("a.log"), lines[:20])
    write_log(Path("b.log"), lines[20:][::-1])
    out = learned(capsys, "--log", "b.log", "--log", "a.log", "--public-suffix-list", "psl.dat")
    header = MAIN_HEADER.replace(
        "# logs:      access.log (40 lines)\n",
        "# logs:      b.log (20 lines)\n#            a.log (20 lines)\n",
    )
    assert out == header + GUIDE + MAIN_BODY


def test_hostile_lines_are_counted_not_fatal(capsys: pytest.CaptureFixture[str]) -> None:
    """Bytes that are not UTF-8, NULs, deep nesting, huge numbers, lone surrogates,
    wrong types, a last line without newline far over 64 KiB: skipped and counted."""
    good = access("https://app.example.com")
    hostile = [
        b"\xff\xfe\x00garbage",
        b"{\"method\": \"GET\", \"origin\": \"https://\xff.example.com\"}",
        b'{"a":' * 12_000,  # under 64 KiB, too deep for json
        b'{"a": ' + b"9" * 10_000 + b"}",
        json.dumps({"method": "GET", "origin": "https://\ud800.example.com"}).encode(),
        json.dumps({"method": "GET", "origin": "https://a.example.com", "route": "/\ud800"})
        .encode(),
        json.dumps({"method": "GET", "origin": 42}).encode(),
        json.dumps({"method": 7, "origin": "https://app.example.com"}).encode(),
        json.dumps({"method": "GET", "origin": "https://x.example.com", "time": "\ud800",
                    "credentials": "true", "request_method": ["PUT"]}).encode(),
        json.dumps({"method": "OPTIONS", "origin": "https://x.example.com",
                    "request_method": "PUT", "request_headers": "x," * 5000}).encode(),
        json.dumps({"method": "GET", "origin": "https://" + "a" * 400 + ".com"}).encode(),
        good.encode(),
        b"{" + b"y" * (1024 * 1024),  # no newline at the end
    ]
    Path("hostile.log").write_bytes(b"\n".join(hostile))
    out = learned(capsys, "--log", "hostile.log", "--public-suffix-list", "psl.dat")
    assert "# lines:     13 read, 3 counted (cross-origin requests with one valid Origin)\n" \
           "# skipped:   4 not JSON, 1 over 64 KiB, 2 not access lines (events, other JSON),\n" \
           "#            0 same-origin, 0 without Origin, 3 invalid Origin\n" in out
    assert "  allow_origins:\n" \
           "    - https://*.example.com      # 3 requests, from 2 subdomains:\n" \
           "    # - https://x.example.com    # 2 requests\n" \
           "    # - https://app.example.com  # 1 request\n" in out
    assert "  allow_methods:\n    - GET  # the default (a simple GET never preflights)\n" \
           "    - PUT  # 1 preflight\n  allow_headers: []" in out
    assert out.isascii()


def test_odd_values_stay_strings_in_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    """Names YAML would read as booleans, numbers, comments or tags are quoted; IPv6
    origins, ports and odd route paths come back as written."""
    write_log(Path("access.log"), [
        preflight("https://app.example.com", "ON", "On, yes, 123, #a, x_y, ~"),
        access("http://[2001:db8::1]:8080"),
        access("chrome-extension://abcdefghijklmnop"),
        access("https://app.example.com", route="/we'ird:/", path="/we'ird:/x"),
    ])
    out = learned(capsys, "--log", "access.log", "--public-suffix-list", "psl.dat")
    assert '    - "ON"  # 1 preflight\n' in out
    assert '    - "#a"   # 1 preflight\n' in out
    assert '  - path: "/we\'ird:/"  # 1 request\n' in out
    config = parse_config(out + "upstream: {url: http://127.0.0.1:9}\n")
    assert config.cors.allow_origins == (
        "chrome-extension://abcdefghijklmnop", "http://[2001:db8::1]:8080",
        "https://app.example.com",
    )
    assert config.cors.allow_methods == ("GET", "ON")
    assert config.cors.allow_headers == ("#a", "123", "On", "x_y", "yes", "~")
    assert [r.path for r in config.routes] == ["/we'ird:/"]


def test_read_lines_bounds_every_line() -> None:
    import io

    data = b"a" * 10 + b"\n" + b"b" * 11 + b"\n" + b"c" * 12 + b"\n" + b"d" * 30 + b"\nlast"
    assert list(read_lines(io.BytesIO(data), limit=11)) == [
        b"a" * 10 + b"\n", b"b" * 11 + b"\n", None, None, b"last"]


def test_public_suffix_algorithm() -> None:
    """publicsuffix.org's rules: the longest rule wins, * matches one label, an
    exception rule wins over everything, no match means the last label."""
    psl = PublicSuffixList.parse(SMALL_PSL, "psl.dat")
    cases = {
        "example.com": "example.com",
        "www.example.com": "example.com",
        "a.b.example.co.uk": "example.co.uk",
        "co.uk": None,  # a public suffix: no site
        "github.io": None,
        "a.github.io": "a.github.io",
        "x.a.github.io": "a.github.io",
        "b.ck": None,  # *.ck: every second-level name is a public suffix
        "a.b.ck": "a.b.ck",
        "x.a.b.ck": "a.b.ck",
        "www.ck": "www.ck",  # !www.ck: an exception, so www.ck is a site
        "x.www.ck": "www.ck",
        "ck": None,
        "a.xn--55qx5d.cn": "a.xn--55qx5d.cn",  # the Unicode rule, as punycode
        "b.cn": "b.cn",
        "a.example.unlisted": "example.unlisted",  # no rule: the last label
        "unlisted": None,
        "a..com": None,
    }
    assert {host: psl.site(host) for host in cases} == cases
    assert psl.count == 11
    assert PublicSuffixList(["COM", "*.Ck"]).site("x.b.ck") == "x.b.ck"


def test_real_process(tmp_path: Path) -> None:
    """``python -m corsproxy learn`` as a user runs it, the log on stdin."""
    data = "\n".join(main_log()) + "\n"
    env = {k: v for k, v in os.environ.items() if k != "CORSPROXY_CONFIG"}
    proc = subprocess.run(
        [sys.executable, "-m", "corsproxy", "learn", "--log", "-", "--public-suffix-list",
         "psl.dat"],
        input=data, capture_output=True, text=True, cwd=tmp_path, env=env,
        timeout=RUN_TIMEOUT,
    )
    assert (proc.returncode, proc.stderr) == (0, "")
    header = MAIN_HEADER.replace("access.log (", "- (stdin) (")
    assert proc.stdout == header + GUIDE + MAIN_BODY

    write_log(tmp_path / "text.log", ["2026-05-09T07:35:25.123Z corsproxy listening"])
    proc = subprocess.run(
        [sys.executable, "-m", "corsproxy", "learn", "--log", "text.log"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=RUN_TIMEOUT,
    )
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr.startswith("corsproxy learn: text.log is not a JSON access log")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
