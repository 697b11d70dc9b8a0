"""Starlette's CORSMiddleware as a reference for corsproxy's decision core.

For every case of the shared table (``tests/cases.yaml``), for a few thousand
hypothesis-generated policy/request pairs, and for the witness of every listed
difference, the same policy and request go through

- corsproxy: the policy parsed by the real config loader, ``Router.decide()``;
- Starlette 1.10.0: ``CORSMiddleware`` built with the same settings, called as an
  ASGI app (asyncio, no network) around an inner app that answers 200 with no
  headers (or, for some requests, with CORS headers of its own);

and what each would send is compared: kind, status (or "forwarded"), the full set
of ``Access-Control-*`` headers, the ``Vary`` names and the failed preflight
checks. They must be equal after the named differences of
``tests/reference_differences.py``; any other difference fails with a diff.

What is expressible in Starlette, and how:

- Per-route policies: Starlette has no routes; the request is compared against a
  Starlette middleware built from the settings of the route corsproxy selected
  (what one middleware per mounted sub-app would do). Route selection itself is
  covered by the core and proxy tests.
- ``enforce`` has no Starlette keyword; its effect is the named difference
  ``ENFORCE_REJECTS_DENIED_ORIGINS``, so those cases are compared too.
- Subdomain patterns and port wildcards are handed to Starlette as the equivalent
  regex (``SUBDOMAIN_PATTERNS``, ``PORT_WILDCARD``).
- A list of ``allow_origin_regex`` patterns is handed to Starlette as the one
  equivalent string ``(?:a)|(?:b)`` (``joined_origin_regex``): not a difference,
  so compared like any other policy.
- A policy corsproxy refuses at config load (``*`` with credentials, a regex RE2
  can't run) is compared as "refused" (``STAR_WITH_CREDENTIALS_REFUSED``,
  ``ORIGIN_REGEX_ON_RE2``).
- Starlette matches ``allow_origin_regex`` with its own Python ``re``, except for
  patterns with nested quantifiers, which ``re`` may never finish on: those are
  matched with RE2 on the Starlette side too (``ORIGIN_REGEX_ON_RE2``).
"""

from __future__ import annotations

import asyncio
import atexit
import difflib
import json
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import starlette
import yaml
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from reference_differences import (
    CHECK_ORDER,
    DIFFERENCES,
    STARLETTE_VERSION,
    Difference,
    Exchange,
    Observed,
    Stage,
    StarletteSettings,
    re2_compile,
    render_markdown,
    starlette_kwargs,
)
from starlette.middleware.cors import CORSMiddleware

from corsproxy.config import ConfigError, parse_config
from corsproxy.core import CorsSettings, RequestView, Router

#: Headers the inner app sends when it plays an upstream with its own CORS
#: headers. The values are ones Starlette itself never sends, so what survives
#: from the upstream is told apart from what the middleware set.
UPSTREAM_CORS_HEADERS = (
    ("Access-Control-Allow-Origin", "https://upstream.invalid"),
    ("Access-Control-Allow-Credentials", "upstream"),
    ("Access-Control-Expose-Headers", "X-From-Upstream"),
    ("Access-Control-Allow-Methods", "UPSTREAM"),
)

# ---------------------------------------------------------------------------
# Both sides
# ---------------------------------------------------------------------------


@lru_cache(maxsize=512)
def _router(policy_json: str) -> Router:
    policy = json.loads(policy_json)
    text = yaml.safe_dump({"cors": policy.get("cors") or {}, "routes": policy.get("routes") or []})
    return parse_config(text, source="reference-policy").router


def build_router(policy: Mapping[str, Any]) -> Router:
    """The policy (``{cors: ..., routes: ...}``) through the real config loader."""
    return _router(json.dumps(policy, sort_keys=True))


def unvalidated_settings(policy: Mapping[str, Any]) -> list[CorsSettings]:
    """The top-level and every merged route policy, straight into CorsSettings
    (used only when the config loader refused the policy)."""

    def merge(fields: Mapping[str, Any], base: CorsSettings) -> CorsSettings:
        values = dict(base.__dict__)
        for key, value in fields.items():
            if isinstance(getattr(base, key), tuple):  # None: allow_origin_regex: null
                value = (value,) if isinstance(value, str) else tuple(value or ())
            values[key] = value
        return CorsSettings(**values)

    top = merge(policy.get("cors") or {}, CorsSettings())
    return [top] + [merge(r.get("cors") or {}, top) for r in policy.get("routes") or []]


def view_from_lines(
    method: str, path: str, lines: Sequence[tuple[str, str]], scheme: str = "http"
) -> RequestView:
    """The request as the proxy hands it to the core (as tests/casetable.py does)."""

    def values(name: str) -> tuple[str, ...]:
        return tuple(v for n, v in lines if n.lower() == name.lower())

    def first(name: str) -> str | None:
        found = values(name)
        return found[0] if found else None

    return RequestView(
        method=method,
        path=path.split("?", 1)[0],
        origin=values("Origin"),
        request_method=first("Access-Control-Request-Method"),
        request_headers=values("Access-Control-Request-Headers"),
        request_private_network=first("Access-Control-Request-Private-Network"),
        host=first("Host"),
        scheme=scheme,
    )


# One event loop for the whole module: a fresh asyncio.run() per call would cost
# more than the middleware itself.
_RUNNER = asyncio.Runner()
atexit.register(_RUNNER.close)


def _latin1(value: str, what: str) -> bytes:
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:  # pragma: no cover - a generator or case-table bug
        raise AssertionError(f"{what} {value!r} can't go into an ASGI header (latin-1)") from None


async def _call_starlette(
    theirs: StarletteSettings,
    method: str,
    path: str,
    lines: Sequence[tuple[str, str]],
    scheme: str,
    upstream_headers: Sequence[tuple[str, str]],
) -> tuple[bool, list[dict[str, Any]]]:
    forwarded = False

    async def upstream(scope, receive, send):
        nonlocal forwarded
        forwarded = True
        headers = [(n.lower().encode(), v.encode()) for n, v in upstream_headers]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"from upstream"})

    app = CORSMiddleware(upstream, **theirs.kwargs)
    if theirs.regex_engine == "re2":
        # CORSMiddleware only ever calls .fullmatch(origin) on this attribute.
        app.allow_origin_regex = re2_compile(theirs.kwargs["allow_origin_regex"])
    raw_path, _, query = path.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": scheme,
        "path": raw_path,
        "raw_path": raw_path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(_latin1(n, "header name").lower(), _latin1(v, n)) for n, v in lines],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
    }
    messages: list[dict[str, Any]] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        messages.append(message)

    await app(scope, receive, send)
    return forwarded, messages


def starlette_observe(
    theirs: StarletteSettings,
    method: str,
    path: str,
    lines: Sequence[tuple[str, str]],
    scheme: str = "http",
    upstream_headers: Sequence[tuple[str, str]] = (),
) -> Observed:
    """What Starlette's CORSMiddleware sends for this request."""
    forwarded, messages = _RUNNER.run(
        _call_starlette(theirs, method, path, lines, scheme, upstream_headers)
    )
    start = next(m for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    cors: dict[str, str] = {}
    vary: list[str] = []
    for raw_name, raw_value in start["headers"]:
        name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
        if name.lower() == "vary":
            vary += [v.strip() for v in value.split(",") if v.strip()]
        elif name.lower().startswith("access-control-"):
            assert name.lower() not in cors, f"Starlette sent {name} twice"
            cors[name.lower()] = value
    has_origin = any(n.lower() == "origin" for n, _ in lines)
    if forwarded:
        return Observed.make("actual" if has_origin else "not-cors", "forwarded", cors, vary)
    failed: tuple[str, ...] = ()
    text = body.decode()
    if start["status"] == 400:
        assert text.startswith("Disallowed CORS "), text
        failed = tuple(text.removeprefix("Disallowed CORS ").split(", "))
        assert set(failed) <= set(CHECK_ORDER), text
    return Observed.make("preflight", start["status"], cors, vary, failed)


def corsproxy_observe(router: Router, view: RequestView) -> Observed:
    """What corsproxy's decision says it sends for this request."""
    decision = router.decide(view)
    cors: dict[str, str] = {}
    for name, value in decision.headers:
        assert name.lower().startswith("access-control-"), f"core put {name} in headers"
        assert name.lower() not in cors, f"core sends {name} twice: {decision.headers}"
        cors[name.lower()] = value
    status = "forwarded" if decision.status is None else decision.status
    failed = decision.failed if decision.kind.value == "preflight" else ()
    return Observed.make(decision.kind.value, status, cors, decision.vary, failed)


# ---------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """The outcome of one comparison. ``problem`` is None when the two agree."""

    ours: Observed | None
    theirs: Observed | None
    starlette_raw: Observed | None
    applied: tuple[str, ...]
    problem: str | None
    context: str

    def report(self) -> str:
        out = [self.problem or "equal", self.context]
        if self.ours is not None and self.theirs is not None:
            diff = difflib.unified_diff(
                self.theirs.lines(),
                self.ours.lines(),
                "starlette (after the listed differences)",
                "corsproxy",
                lineterm="",
            )
            out += ["", *diff]
        if self.starlette_raw is not None:
            out += ["", "starlette as sent:", *("  " + x for x in self.starlette_raw.lines())]
        out.append(f"differences applied: {', '.join(self.applied) or 'none'}")
        return "\n".join(out)


def compare(
    policy: Mapping[str, Any],
    method: str,
    path: str,
    lines: Sequence[tuple[str, str]],
    *,
    view: RequestView | None = None,
    upstream_cors: bool = False,
    scheme: str = "http",
    omit: frozenset[str] = frozenset(),
) -> Comparison:
    """Run one request through both sides and compare (``omit``: differences to
    leave out, to prove each one is needed)."""
    lines = tuple((str(n), str(v)) for n, v in lines)
    view = view or view_from_lines(method, path, lines, scheme)
    upstream = UPSTREAM_CORS_HEADERS if upstream_cors else ()
    context = (
        f"policy: {json.dumps(dict(policy))}\nrequest: {method} {path} "
        f"{json.dumps([list(x) for x in lines])}"
        + (" (upstream sends CORS headers)" * upstream_cors)
    )
    active = [d for d in DIFFERENCES if d.name not in omit]
    applied: list[str] = []

    def starlette_settings(settings: CorsSettings) -> StarletteSettings:
        theirs = StarletteSettings(starlette_kwargs(settings))
        for d in (d for d in active if d.stage is Stage.SETTINGS):
            changed = d.apply(settings, theirs)
            if changed is not None and changed != theirs:
                theirs = changed
                applied.append(d.name)
        return theirs

    try:
        router = build_router(policy)
    except ConfigError as e:
        candidates = unvalidated_settings(policy)
        refused = any(starlette_settings(s).refused_by_corsproxy for s in candidates)
        theirs_raw = starlette_observe(
            StarletteSettings(starlette_kwargs(candidates[0])),
            method,
            path,
            lines,
            scheme,
            upstream,
        )
        problem = None if refused else f"corsproxy refused the policy: {e}"
        return Comparison(None, None, theirs_raw, tuple(applied), problem, context)

    _, chosen = router.select(view.path) if router.routes else (None, router.default)
    settings_ = chosen.settings
    theirs_settings = starlette_settings(settings_)
    if theirs_settings.refused_by_corsproxy:
        return Comparison(
            None, None, None, tuple(applied), "corsproxy accepted a policy it must refuse", context
        )

    exchange = Exchange(settings_, view, lines, upstream)
    starlette_lines: tuple[tuple[str, str], ...] = lines
    for d in (d for d in active if d.stage is Stage.REQUEST):
        changed = d.apply(exchange, starlette_lines)
        if changed is not None and tuple(changed) != starlette_lines:
            starlette_lines = tuple(changed)
            applied.append(d.name)
    raw = starlette_observe(theirs_settings, method, path, starlette_lines, scheme, upstream)
    theirs = raw
    for d in (d for d in active if d.stage is Stage.RESPONSE):
        changed = d.apply(exchange, theirs)
        if changed is not None and changed != theirs:
            theirs = changed
            applied.append(d.name)

    ours = corsproxy_observe(router, view)
    problem = None if ours == theirs else "corsproxy and Starlette differ"
    return Comparison(ours, theirs, raw, tuple(applied), problem, context)


def assert_agree(result: Comparison) -> None:
    assert result.problem is None, result.report()


# ---------------------------------------------------------------------------
# The shared case table
# ---------------------------------------------------------------------------


def _table() -> list[Any]:
    try:
        from casetable import CASES_FILE, load_cases
    except ImportError:  # pragma: no cover - the table module is part of the repo
        return []
    return load_cases() if CASES_FILE.exists() else []


CASES = _table()


def test_the_shared_case_table_is_there_to_compare():
    assert len(CASES) >= 20, "tests/cases.yaml is missing or nearly empty"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_case_table_agrees_with_starlette(case):
    result = compare(
        case.policy,
        case.request.method,
        case.request.path,
        case.request.headers,
        view=case.request_view(),
    )
    assert_agree(result)


# ---------------------------------------------------------------------------
# Generated policies and requests
# ---------------------------------------------------------------------------

_APP = "https://app.example.com"

#: Origin entries and, for each, origins that match it and origins that nearly do.
ORIGIN_ENTRIES: dict[str, tuple[list[str], list[str]]] = {
    _APP: (
        [_APP],
        ["https://APP.example.com", _APP + "/", _APP + ":443", "http://app.example.com"],
    ),
    "http://localhost:3000": (
        ["http://localhost:3000"],
        ["http://localhost:3001", "http://localhost"],
    ),
    "null": (["null"], ["Null", "null "]),
    "https://xn--bcher-kva.example": (
        ["https://xn--bcher-kva.example"],
        ["https://b\xfccher.example"],
    ),
    "https://*.example.com": (
        ["https://a.example.com", "https://a.b.example.com", "https://a_b.example.com"],
        [
            "https://example.com",
            "https://evil-example.com",
            "https://a.example.com.evil.net",
            "https://-a.example.com",
            "https://a..example.com",
            "https://A.example.com",
            "http://a.example.com",
            "https://a.example.com:8443",
            "https://*.example.com",
            "https://" + "a" * 300 + ".example.com",
        ],
    ),
    "http://*.dev.test:8080": (
        ["http://x.dev.test:8080", "http://x.y.dev.test:8080"],
        ["http://x.dev.test", "http://x.dev.test:8081", "http://dev.test:8080"],
    ),
    "http://localhost:*": (
        ["http://localhost:5173", "http://localhost:1", "http://localhost:65535",
         "http://localhost:8080"],
        [
            "http://localhost",
            "http://localhost:",
            "http://localhost:80",
            "http://localhost:0",
            "http://localhost:080",
            "http://localhost:65536",
            "http://localhost:99999",
            "https://localhost:5173",
            "http://localhost.evil.com:80",
            "http://localhost:5173.evil.com",
            "http://localhost:5173/",
            "http://localhost:*",
        ],
    ),
    "https://*.example.com:*": (
        ["https://a.example.com:8443", "https://a.b.example.com:4430", "https://a.example.com:80"],
        [
            "https://example.com:8443",
            "https://a.example.com",
            "https://a.example.com:443",
            "https://a.example.com.evil.net:8443",
            "https://evil-example.com:8443",
        ],
    ),
}
ORIGIN_SETS = [
    [_APP],
    [_APP, "http://localhost:3000"],
    ["https://*.example.com"],
    ["https://*.example.com", "http://*.dev.test:8080", "null"],
    ["http://localhost:*"],
    ["http://localhost", "http://localhost:*", "https://*.example.com:*"],
    ["https://*.example.com", "https://*.example.com:*"],
    ["null", "https://xn--bcher-kva.example"],
    [],
    ["*"],
    ["*", _APP],
]
#: Origin regexes (a tuple: a list of patterns), with origins that match them and
#: origins that nearly do.
REGEXES: dict[str | tuple[str, ...] | None, tuple[list[str], list[str]]] = {
    None: ([], []),
    (r"(?i)https://app\.example\.io", r"https://[a-z0-9-]+\.example\.org"): (
        ["https://APP.example.io", "https://foo.example.org"],
        ["https://FOO.example.org", "https://app.example.io.example.org", "https://app.example.io/"],
    ),
    (r"https://([a-z0-9-]+\.)+example\.com", r"http://127\.0\.0\.1:[0-9]{2,5}"): (
        ["https://a.b.example.com", "http://127.0.0.1:8000"],
        ["https://example.com", "http://127.0.0.1:8", "https://a.example.comhttp://127.0.0.1:80"],
    ),
    (r"https://[a-z0-9-]+\.example\.org",): (["https://foo.example.org"], ["https://example.org"]),
    (r"https://a\.test", r"https://(?!admin)[a-z]+\.example\.org"): (["https://a.test"], []),
    r"https://[a-z0-9-]+\.example\.org": (
        ["https://foo.example.org", "https://foo-bar.example.org"],
        ["https://foo.example.org.evil.net", "https://FOO.example.org", "https://example.org"],
    ),
    r"https?://localhost(:[0-9]+)?": (
        ["http://localhost", "http://localhost:8080", "https://localhost:1"],
        ["http://localhost:", "http://localhost:" + "1" * 300],
    ),
    r"https://.*\.example\.com": (
        ["https://x.example.com", "https://x/y.example.com"],
        [
            "https://.example.com",
            "https://" + "b" * 290 + ".example.com",
            "https://x y.example.com",
            "https://\xe9.example.com",
            "https://x\t.example.com",
        ],
    ),
    r"https://\w+\.example\.net|http://127\.0\.0\.1:[0-9]{2,5}": (
        ["https://abc.example.net", "https://a_1.example.net", "http://127.0.0.1:8000"],
        ["https://\xe9t\xe9.example.net", "http://127.0.0.1:80000", "http://127.0.0.1"],
    ),
    r"(?i)https://app\.example\.io": (["https://app.example.io", "https://APP.EXAMPLE.IO"], []),
    r"https://([a-z0-9-]+\.)+example\.com": (
        ["https://a.example.com", "https://a.b.example.com"],
        ["https://example.com", "https://" + "a" * 250 + "!"],
    ),
    r"https://(?!admin)[a-z]+\.example\.org": (["https://app.example.org"], []),
    r"[a-z]+(://[a-z0-9.-]+(:[0-9]+)?)?": (["https://any.test", "word"], ["null", "https://"]),
}
OTHER_ORIGINS = [
    "",
    " " + _APP,
    "https://evil.example",
    "http://proxy.test:8080",
    "https://proxy.test",
]
ALL_ORIGINS = sorted(
    {o for pair in (*ORIGIN_ENTRIES.values(), *REGEXES.values()) for o in pair[0] + pair[1]}
    | set(OTHER_ORIGINS)
)
METHOD_ENTRIES = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "patch", "PURGE", "OPTIONS"]
REQUESTED_METHODS = [*METHOD_ENTRIES, "QUERY", "", "GE T", "pUt", "PUT "]
HEADER_ENTRIES = ["X-Requested-With", "x-api-key", "Authorization", "content-type", "X-B", "Accept"]
REQUESTED_NAMES = [
    "x-requested-with",
    "X-API-KEY",
    "authorization",
    "Content-Type",
    "accept",
    "x-b",
    "x-unknown",
    "*",
    "",
    " ",
    "bad name",
    "x-\xe9",
    "x-a\x0b",
    "x-a;",
]
EXPOSE_ENTRIES = ["X-Total-Count", "X-Request-Id", "Content-Length", "*"]


def _weighted(draw, *choices):
    """Draw from ``(weight, strategy)`` pairs."""
    total = sum(w for w, _ in choices)
    pick = draw(st.integers(0, total - 1))
    for weight, strategy in choices:
        if pick < weight:
            return draw(strategy)
        pick -= weight
    raise AssertionError("unreachable")


@st.composite
def policies(draw) -> dict[str, Any]:
    """Policies over every setting: exact lists, `*`, patterns, regexes,
    credentials, methods and headers incl. `*`, expose, max_age, PNA, enforce."""
    cors: dict[str, Any] = {"allow_origins": draw(st.sampled_from(ORIGIN_SETS))}
    regex = draw(st.sampled_from([None, *REGEXES]))
    if regex is not None:
        cors["allow_origin_regex"] = list(regex) if isinstance(regex, tuple) else regex
    cors["allow_methods"] = _weighted(
        draw,
        (1, st.sampled_from([["*"], ["*", "GET"]])),
        (1, st.just([])),
        (4, st.lists(st.sampled_from(METHOD_ENTRIES), unique=True, min_size=1, max_size=4)),
    )
    cors["allow_headers"] = _weighted(
        draw,
        (1, st.sampled_from([["*"], ["X-B", "*"]])),
        (3, st.lists(st.sampled_from(HEADER_ENTRIES), unique=True, max_size=3)),
    )
    # `*` with credentials is refused at config load: drawn, but rarely.
    star = "*" in cors["allow_origins"]
    cors["allow_credentials"] = draw(st.booleans()) and (not star or draw(st.integers(0, 9)) == 0)
    cors["expose_headers"] = draw(
        st.lists(st.sampled_from(EXPOSE_ENTRIES), unique=True, max_size=2)
    )
    cors["max_age"] = draw(st.sampled_from([0, 5, 600, 7200]))
    cors["allow_private_network"] = draw(st.booleans())
    cors["enforce"] = draw(st.integers(0, 3)) == 0
    return {"cors": cors}


@st.composite
def exchanges(draw) -> dict[str, Any]:
    """A policy and a request aimed at it: origins, methods and header names
    mostly from near the policy (so allowed preflights are common), the rest
    from everywhere, including non-tokens, empty elements, Latin-1 and overlong
    values, two Origin lines, cookies and an upstream with CORS headers."""
    policy = draw(policies())
    cors = policy["cors"]
    pairs = [ORIGIN_ENTRIES[e] for e in cors["allow_origins"] if e in ORIGIN_ENTRIES]
    regex = cors.get("allow_origin_regex")
    pairs.append(REGEXES[tuple(regex) if isinstance(regex, list) else regex])
    hits = [o for pair in pairs for o in pair[0]]
    misses = [o for pair in pairs for o in pair[1]]
    lines: list[tuple[str, str]] = []
    host = draw(st.sampled_from([None, "proxy.test:8080", "PROXY.TEST:8080", "proxy.test:443"]))
    if host is not None:
        lines.append(("Host", host))
    for _ in range(_weighted(draw, (16, st.just(1)), (2, st.just(0)), (1, st.just(2)))):
        origin = _weighted(
            draw,
            (8 if hits else 0, st.sampled_from(hits or [""])),
            (3 if misses else 0, st.sampled_from(misses or [""])),
            (3, st.sampled_from(ALL_ORIGINS)),
            (1, st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=24)),
        )
        lines.append(("Origin", origin))

    preflight = draw(st.integers(0, 2)) > 0
    method = "OPTIONS" if preflight else draw(st.sampled_from(["GET", "POST", "OPTIONS", "PUT"]))
    if preflight or draw(st.integers(0, 9)) == 0:
        listed = [m for m in cors["allow_methods"] if m != "*"]
        acrm = _weighted(
            draw,
            (5 if listed else 0, st.sampled_from(listed or ["GET"])),
            (2, st.sampled_from(REQUESTED_METHODS)),
        )
        lines.append(("Access-Control-Request-Method", acrm))

    allowed = [h for h in cors["allow_headers"] if h != "*"] + ["accept", "Content-Type"]
    names = st.sampled_from(allowed * 3 + REQUESTED_NAMES)
    separators = st.sampled_from([",", ", ", " ,", ",\t", " , "])
    n_lines = _weighted(draw, (5, st.just(0)), (6, st.just(1)), (1, st.just(2)))
    for _ in range(n_lines):
        sep = draw(separators)
        lines.append(
            ("Access-Control-Request-Headers", sep.join(draw(st.lists(names, max_size=4))))
        )
    acrpn = _weighted(
        draw, (12, st.none()), (3, st.just("true")), (1, st.sampled_from(["false", "TRUE", ""]))
    )
    if acrpn is not None:
        lines.append(("Access-Control-Request-Private-Network", acrpn))
    if draw(st.integers(0, 4)) == 0:  # older Starlettes keyed the `*` echo on cookies
        lines.append(("Cookie", "session=1"))
    return {
        "policy": policy,
        "method": method,
        "path": "/items?q=1",
        "lines": lines,
        "scheme": "https" if host == "proxy.test:443" else "http",
        "upstream_cors": draw(st.booleans()),
    }


@settings(
    max_examples=2500,
    deadline=None,
    # The explain phase re-runs failing examples for a minute; the diff says enough.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(exchange=exchanges())
def test_generated_requests_agree_with_starlette(exchange):
    result = compare(
        exchange["policy"],
        exchange["method"],
        exchange["path"],
        exchange["lines"],
        scheme=exchange["scheme"],
        upstream_cors=exchange["upstream_cors"],
    )
    for name in result.applied:
        event(f"difference: {name}")
    if result.ours is not None:
        event(f"kind: {result.ours.kind}, status: {result.ours.status}")
    assert_agree(result)


# ---------------------------------------------------------------------------
# The list of differences itself
# ---------------------------------------------------------------------------


def _witness(difference: Difference, omit: frozenset[str] = frozenset()) -> Comparison:
    w = difference.witness
    req = w["request"]
    return compare(
        w["policy"],
        req["method"],
        req["path"],
        [tuple(h) for h in req["headers"]],
        upstream_cors=w["upstream_cors"],
        omit=omit,
    )


@pytest.mark.parametrize("difference", DIFFERENCES, ids=lambda d: d.name)
def test_every_difference_is_exercised_and_needed(difference):
    """On its witness, the comparison passes with every difference applied, the
    difference is one of those applied, and without it the comparison fails."""
    result = _witness(difference)
    assert_agree(result)
    assert difference.name in result.applied, result.report()
    without = _witness(difference, omit=frozenset({difference.name}))
    assert without.problem is not None, (
        f"{difference.name} is not needed on its own witness:\n{without.report()}"
    )


def test_a_backtracking_regex_is_compared_with_re2_on_both_sides():
    """The swap branch of ORIGIN_REGEX_ON_RE2 (its witness shows the refusal branch):
    `(a+)+` on a long non-matching origin, which Python `re` would not finish."""
    origin = "https://" + "a" * 250 + "!"
    result = compare(
        {"cors": {"allow_origin_regex": r"https://(a+)+\.example\.com"}},
        "GET",
        "/",
        [("Origin", origin)],
    )
    assert_agree(result)
    assert "ORIGIN_REGEX_ON_RE2" in result.applied


@pytest.mark.parametrize(
    "origin",
    ["https://APP.example.io", "https://docs.example.org", "https://DOCS.example.org",
     "https://app.example.io.example.org", "https://evil.example"],
)
def test_a_regex_list_needs_no_listed_difference(origin):
    """A list of patterns is no difference from Starlette: handed over as one
    alternation with each pattern's flags kept to its branch, it answers the same
    with no difference applied."""
    policy = {"cors": {"allow_origin_regex": [r"(?i)https://app\.example\.io",
                                              r"https://[a-z]+\.example\.org"]}}
    result = compare(policy, "GET", "/", [("Origin", origin)])
    assert_agree(result)
    assert result.applied == (), result.report()


@pytest.mark.filterwarnings("ignore:Possible nested set:FutureWarning")
@pytest.mark.parametrize(
    ("regex", "origin"),
    [
        # Python re: `{,8}` is "0 to 8 times"; RE2: the literal text "{,8}".
        (r"https://[a-z]{,8}\.example\.com", "https://app.example.com"),
        # Python re: a set of "[:alph" then a literal "]"; RE2: the POSIX class.
        (r"https://[[:alpha:]]+\.example\.com", "https://app.example.com"),
    ],
    ids=["open_lower_bound", "posix_class"],
)
def test_a_regex_means_what_it_means_in_starlette_or_is_refused(regex, origin):
    result = compare({"cors": {"allow_origin_regex": regex}}, "GET", "/", [("Origin", origin)])
    refused = (result.problem or "").startswith("corsproxy refused the policy")
    assert result.problem is None or refused, result.report()


def test_an_unlisted_difference_fails_with_a_diff(monkeypatch):
    """The comparison is not blind: a header corsproxy would add that Starlette does
    not send, on no list, fails and the report shows both sides."""
    real = corsproxy_observe

    def with_extra_header(router, view):
        return real(router, view).with_header("Access-Control-Max-Age", "1")

    monkeypatch.setattr(sys.modules[__name__], "corsproxy_observe", with_extra_header)
    result = compare({"cors": {"allow_origins": [_APP]}}, "GET", "/", [("Origin", _APP)])
    assert result.problem == "corsproxy and Starlette differ"
    assert "+Access-Control-Max-Age: 1" in result.report()
    assert " Access-Control-Allow-Origin: https://app.example.com" in result.report()


def test_star_with_credentials_witness_shows_starlette_echoing_null():
    difference = next(d for d in DIFFERENCES if d.name == "STAR_WITH_CREDENTIALS_REFUSED")
    result = _witness(difference)
    assert result.starlette_raw is not None
    assert dict(result.starlette_raw.headers) == {
        "Access-Control-Allow-Origin": "null",
        "Access-Control-Allow-Credentials": "true",
    }


def test_the_pinned_starlette_is_the_one_the_differences_describe():
    assert starlette.__version__ == STARLETTE_VERSION


def test_differences_render_as_a_markdown_list():
    text = render_markdown()
    lines = text.splitlines()
    assert text.endswith("\n") and not text.endswith("\n\n")
    assert lines[0].startswith("Where corsproxy deliberately differs") and lines[1] == ""
    items = lines[2:]
    assert len(items) == 2 * len(DIFFERENCES)
    for d, (head, why) in zip(DIFFERENCES, zip(items[::2], items[1::2], strict=True), strict=True):
        assert head == f"- **`{d.name}`**: {d.summary}"
        assert why == f"  *Why:* {d.reason}"
    for line in lines:
        assert line == line.rstrip(), f"trailing whitespace: {line!r}"
        assert line.count("`") % 2 == 0, f"unbalanced backticks: {line!r}"
        assert line.count("**") % 2 == 0, f"unbalanced bold: {line!r}"
    for d in DIFFERENCES:
        assert re.fullmatch(r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*", d.name), d.name
        for text_ in (d.summary, d.reason):
            assert text_.strip() == text_ and text_.endswith((".", ")")), text_
            assert "\n" not in text_, f"{d.name}: one line each"


def test_readme_carries_the_current_list_once_it_has_the_section():
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    rendered = render_markdown()
    if rendered.splitlines()[0] not in readme:
        pytest.skip(
            "README.md has no Starlette migration list yet "
            "(python tests/reference_differences.py prints it)"
        )
    assert rendered in readme, (
        "README.md's list of differences from Starlette is out of date; replace it with the "
        "output of: python tests/reference_differences.py"
    )
