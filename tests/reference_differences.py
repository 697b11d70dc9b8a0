"""Where corsproxy deliberately answers differently from Starlette's CORSMiddleware.

``tests/test_starlette_reference.py`` runs the same policy and the same request
through corsproxy's decision core and through ``starlette==1.10.0``'s
``CORSMiddleware`` (an ASGI app around a trivial upstream), and compares what each
would send: the kind of request, the status (or "forwarded"), the full set of
``Access-Control-*`` headers, the ``Vary`` names and, for preflights, the failed
checks. The two must be equal once the differences below are applied to the
Starlette side; anything else fails the comparison with a diff.

This module is the list of those differences, as data. Each :class:`Difference`
has a name, a one-line summary, the reason corsproxy does it on purpose, and a
narrow function that applies it at one of three stages:

- ``SETTINGS``: how the policy reaches Starlette (or that corsproxy refuses it at
  config load);
- ``REQUEST``: how the request Starlette sees is rewritten to mean what corsproxy
  reads it as;
- ``RESPONSE``: how Starlette's observed answer is normalised.

Each function returns ``None`` when the difference does not apply, so it stays as
narrow as its predicate. Each has a ``witness`` (a policy and a request in the
case-table shape) on which the comparison passes with every difference applied
and fails with that one left out: the test suite proves so, so the list can't go
stale. ``render_markdown()`` produces the README's migration list
(``python tests/reference_differences.py`` prints it).

Not a difference: a list of ``allow_origin_regex`` patterns. Starlette takes one
string, but the list allows exactly the origins its patterns joined as one
alternation do, so Starlette gets that string (:func:`joined_origin_regex`) and
the answers are compared like any other.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

try:
    import re2

    _RE2_OPTIONS = re2.Options()
    _RE2_OPTIONS.log_errors = False
except ImportError:  # pragma: no cover - google-re2 is a dependency of corsproxy
    re2 = None

from corsproxy.core import (
    MAX_ORIGIN_LENGTH,
    MAX_REQUEST_HEADER_NAMES,
    MAX_REQUEST_HEADERS_LENGTH,
    CorsSettings,
    RequestView,
)

STARLETTE_VERSION = "1.10.0"

#: Order in which both implementations name failed preflight checks.
CHECK_ORDER = ("origin", "method", "headers", "private-network")

ACAO = "Access-Control-Allow-Origin"
ACAC = "Access-Control-Allow-Credentials"
ACAM = "Access-Control-Allow-Methods"
ACAH = "Access-Control-Allow-Headers"
ACEH = "Access-Control-Expose-Headers"
ACMA = "Access-Control-Max-Age"
ACAPN = "Access-Control-Allow-Private-Network"
CORS_HEADER_NAMES = (ACAO, ACAC, ACAM, ACAH, ACEH, ACMA, ACAPN)
_CANONICAL = {n.lower(): n for n in CORS_HEADER_NAMES}

# RFC 9110 §5.6.2 token, written out here rather than imported, so the reference
# side does not borrow corsproxy's own parser.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# What a serialised origin is made of: visible ASCII (hosts are punycoded).
_VISIBLE_ASCII = re.compile(r"[!-~]+")
# RFC 9110 §5.6.3 optional whitespace.
_OWS = " \t"


def canonical_header_name(name: str) -> str:
    """``access-control-allow-origin`` -> ``Access-Control-Allow-Origin``; other names
    are kept as they are (so an unexpected header shows up in a diff as sent)."""
    return _CANONICAL.get(name.lower(), name)


# ---------------------------------------------------------------------------
# What is compared
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Observed:
    """One side's answer to one request, in comparable form.

    ``status`` is the status of a response the CORS layer makes itself (200/400 for
    preflights, 403 under ``enforce``) or ``"forwarded"``; ``headers`` holds the
    ``Access-Control-*`` headers, sorted, names canonical; ``failed`` the failed
    preflight checks in :data:`CHECK_ORDER` (empty for other requests).
    """

    kind: str  # "preflight" | "actual" | "not-cors"
    status: int | str
    headers: tuple[tuple[str, str], ...]
    vary: tuple[str, ...]
    failed: tuple[str, ...] = ()

    @staticmethod
    def make(kind, status, headers: Mapping[str, str], vary, failed=()) -> Observed:
        return Observed(
            kind,
            status,
            tuple(sorted((canonical_header_name(k), v) for k, v in headers.items())),
            tuple(vary),
            tuple(failed),
        )

    def get(self, name: str) -> str | None:
        return dict(self.headers).get(name)

    def without(self, *names: str) -> Observed:
        return replace(self, headers=tuple((k, v) for k, v in self.headers if k not in names))

    def with_header(self, name: str, value: str) -> Observed:
        headers = dict(self.headers)
        headers[name] = value
        return replace(self, headers=tuple(sorted(headers.items())))

    def with_failed(self, failed: Sequence[str]) -> Observed:
        """The same preflight answer with other failed checks (and so 400 or 200).

        Starlette builds its preflight headers the same way whether it then answers
        200 or 400, so only the status follows the failures.
        """
        ordered = tuple(c for c in CHECK_ORDER if c in failed)
        return replace(self, failed=ordered, status=400 if ordered else 200)

    def lines(self) -> list[str]:
        """Readable form for diffs."""
        out = [f"kind: {self.kind}", f"status: {self.status}"]
        out += [f"{k}: {v}" for k, v in self.headers]
        out.append(f"Vary: {', '.join(self.vary)}")
        if self.failed:
            out.append(f"failed: {', '.join(self.failed)}")
        return out


@dataclass(frozen=True)
class Exchange:
    """One comparison: the policy that applies to the request (after corsproxy's
    route selection), the request as corsproxy's core sees it, the header lines
    Starlette receives, and the ``Access-Control-*`` headers the upstream itself
    sends (the Starlette side's inner app sends them too)."""

    settings: CorsSettings
    request: RequestView
    raw_headers: tuple[tuple[str, str], ...]
    upstream_headers: tuple[tuple[str, str], ...] = ()

    @property
    def is_preflight(self) -> bool:
        r = self.request
        return r.method == "OPTIONS" and bool(r.origin) and r.request_method is not None


@dataclass(frozen=True)
class StarletteSettings:
    """Keyword arguments for ``CORSMiddleware``, or a refusal by corsproxy."""

    kwargs: Mapping[str, Any]
    refused_by_corsproxy: bool = False
    #: "re" (Starlette's own ``re.compile``) or "re2": the reference then matches
    #: ``allow_origin_regex`` with google-re2 instead (see ORIGIN_REGEX_ON_RE2;
    #: only for patterns Python ``re`` may never finish on).
    regex_engine: str = "re"


def _scoped_flags(regex: str) -> str:
    """``(?i)abc`` -> ``(?i:abc)``: Python only takes global flags at the very start,
    so a regex that is to become one alternative of several scopes them."""
    m = re.match(r"(?:\(\?[aiLmsux]+\))+", regex)
    if not m:
        return regex
    flags = "".join(dict.fromkeys(c for c in m.group() if c.isalpha()))
    return f"(?{flags}:{regex[m.end() :]})"


def joined_origin_regex(patterns: Sequence[str]) -> str | None:
    """corsproxy's list of ``allow_origin_regex`` patterns as Starlette's one string.

    None for no pattern, the pattern itself for one, and for several the
    alternation ``(?:a)|(?:b)`` with each pattern's leading inline flags scoped to
    its own branch. ``re.fullmatch`` of an alternation is a full match of one of its
    branches, so this string allows exactly the origins the list does: a list is
    not a difference in behaviour, only a spelling Starlette lacks, and is therefore
    not in :data:`DIFFERENCES` (a user moving to Starlette writes this string).
    The one list it can't spell is patterns that reuse a group name, which Python
    ``re`` refuses in one expression; the comparison uses none.
    """
    if len(patterns) < 2:
        return patterns[0] if patterns else None
    return "|".join(f"(?:{_scoped_flags(p)})" for p in patterns)


def starlette_kwargs(settings: CorsSettings) -> dict[str, Any]:
    """The same policy, field for field, in ``CORSMiddleware``'s keywords.

    ``enforce`` has no Starlette equivalent and is left out (see
    ``ENFORCE_REJECTS_DENIED_ORIGINS``); a list of ``allow_origin_regex`` patterns
    becomes the one equivalent string (:func:`joined_origin_regex`).
    """
    return {
        "allow_origins": list(settings.allow_origins),
        "allow_origin_regex": joined_origin_regex(settings.allow_origin_regex),
        "allow_methods": list(settings.allow_methods),
        "allow_headers": list(settings.allow_headers),
        "allow_credentials": settings.allow_credentials,
        "expose_headers": list(settings.expose_headers),
        "max_age": settings.max_age,
        "allow_private_network": settings.allow_private_network,
    }


class Stage(StrEnum):
    SETTINGS = "settings"
    REQUEST = "request"
    RESPONSE = "response"


@dataclass(frozen=True)
class Difference:
    """One deliberate difference.

    ``apply`` by stage:

    - ``SETTINGS``: ``(settings, StarletteSettings) -> StarletteSettings | None``
    - ``REQUEST``: ``(exchange, header lines) -> header lines | None``
    - ``RESPONSE``: ``(exchange, Observed) -> Observed | None``

    ``None`` (or an unchanged value) means: does not apply here.
    """

    name: str
    summary: str
    reason: str
    stage: Stage
    apply: Callable[..., Any]
    witness: Mapping[str, Any]


# ---------------------------------------------------------------------------
# Helpers the predicates share
# ---------------------------------------------------------------------------


def _values(lines: Sequence[tuple[str, str]], name: str) -> list[str]:
    key = name.lower()
    return [v for n, v in lines if n.lower() == key]


def _replace_lines(
    lines: Sequence[tuple[str, str]], name: str, values: Sequence[str]
) -> tuple[tuple[str, str], ...]:
    """``lines`` with every ``name`` line replaced by ``values`` (at the first one's place)."""
    key = name.lower()
    out: list[tuple[str, str]] = []
    placed = False
    for n, v in lines:
        if n.lower() != key:
            out.append((n, v))
        elif not placed:
            out.extend((name, value) for value in values)
            placed = True
    return tuple(out)


def _elements(value: str) -> list[str]:
    """A comma list split into its elements, optional whitespace trimmed."""
    return [e.strip(_OWS) for e in value.split(",")]


def _requested_names(exchange: Exchange) -> list[str]:
    """Every non-empty ACRH element, over all lines."""
    return [e for line in exchange.request.request_headers for e in _elements(line) if e]


def _origin_denied(obs: Observed) -> Observed:
    """Starlette's answer as it would be had it refused the origin."""
    obs = obs.without(ACAO)
    if obs.kind == "preflight":
        obs = obs.with_failed((*obs.failed, "origin"))
    return obs


def _same_origin(request: RequestView) -> bool:
    """Origin equals the listener's scheme plus the Host header (issue 2), with the
    host compared case-insensitively and the scheme's default port dropped, as a
    browser serialises its own origin."""
    if len(request.origin) != 1 or not request.host:
        return False
    host = request.host.lower()
    default = {"http": ":80", "https": ":443"}.get(request.scheme)
    if default and host.endswith(default):
        host = host[: -len(default)]
    return request.origin[0] == f"{request.scheme}://{host}"


_LABEL = r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?"


def pattern_regex(entry: str) -> str:
    """A subdomain pattern ``scheme://*.host[:port]`` as a regex: one or more labels
    where the ``*`` is, the rest literal (issue 2: never the apex, dot boundary)."""
    prefix, rest = entry.split("://*.", 1)
    return re.escape(prefix + "://") + f"(?:{_LABEL}\\.)+" + re.escape(rest)


# ---------------------------------------------------------------------------
# The differences
# ---------------------------------------------------------------------------


def _star_with_credentials(settings: CorsSettings, theirs: StarletteSettings):
    if "*" in settings.allow_origins and settings.allow_credentials:
        return replace(theirs, refused_by_corsproxy=True)
    return None


def _as_regex(theirs: StarletteSettings, entries: Sequence[str], regexes: Sequence[str]):
    """Starlette's settings with ``entries`` taken out of ``allow_origins`` and their
    ``regexes`` added to ``allow_origin_regex`` as alternatives."""
    kwargs = dict(theirs.kwargs)
    kwargs["allow_origins"] = [o for o in kwargs["allow_origins"] if o not in entries]
    alternatives = list(regexes)
    if kwargs["allow_origin_regex"]:
        alternatives.append(_scoped_flags(kwargs["allow_origin_regex"]))
    kwargs["allow_origin_regex"] = "|".join(f"(?:{a})" for a in alternatives)
    return replace(theirs, kwargs=kwargs)


def _subdomain_patterns(settings: CorsSettings, theirs: StarletteSettings):
    patterns = [
        o for o in settings.allow_origins if o != "*" and "://*." in o and not o.endswith(":*")
    ]
    if not patterns:
        return None
    return _as_regex(theirs, patterns, [pattern_regex(p) for p in patterns])


#: The port a browser leaves out of an origin, written out here rather than imported.
_DEFAULT_PORT = {"http": "80", "https": "443", "ws": "80", "wss": "443"}


def port_regex(excluded: str | None) -> str:
    """1-65535 as a browser writes a port (no leading zero), except ``excluded``.

    RE2-compatible (no look-ahead): the numbers as long as ``excluded`` are those
    that first differ from it at some digit ``i``.
    """
    by_length = {
        1: "[1-9]",
        2: "[1-9][0-9]",
        3: "[1-9][0-9]{2}",
        4: "[1-9][0-9]{3}",
        5: "[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]",
    }
    if excluded:
        assert len(excluded) < 5, "only the default ports 80 and 443 are excluded"
        branches = []
        for i, digit in enumerate(excluded):
            others = "".join(d for d in ("123456789" if i == 0 else "0123456789") if d != digit)
            branches.append(excluded[:i] + f"[{others}]" + "[0-9]" * (len(excluded) - i - 1))
        by_length[len(excluded)] = "|".join(branches)
    return "(?:" + "|".join(by_length.values()) + ")"


def port_wildcard_regex(entry: str) -> str:
    """A port wildcard ``scheme://host:*`` or ``scheme://*.host:*`` as a regex: the
    host (or pattern) exact, then any port but the scheme's default."""
    body = entry.removesuffix(":*")
    host = pattern_regex(body) if "://*." in body else re.escape(body)
    return host + ":" + port_regex(_DEFAULT_PORT.get(body.split("://", 1)[0]))


def _port_wildcards(settings: CorsSettings, theirs: StarletteSettings):
    entries = [o for o in settings.allow_origins if o != "*" and o.endswith(":*")]
    if not entries:
        return None
    return _as_regex(theirs, entries, [port_wildcard_regex(e) for e in entries])


def re2_compile(pattern: str):
    """``pattern`` compiled by google-re2, as the reference's regex engine."""
    return re2.compile(pattern, _RE2_OPTIONS)


# A group holding a quantifier, itself quantified: `(a+)+`, `(x*)*`, `([a-z]+.)+`.
# The shape Python `re` can take exponential time on.
_NESTED_QUANTIFIER = re.compile(r"\((?:[^()\\]|\\.)*[+*}](?:[^()\\]|\\.)*\)[+*{]")


def _origin_regex_on_re2(settings: CorsSettings, theirs: StarletteSettings):
    patterns = settings.allow_origin_regex
    if not patterns:
        return None
    try:
        for pattern in patterns:
            re2_compile(pattern)
    except Exception:  # look-arounds, back-references...: a config error in corsproxy
        return replace(theirs, refused_by_corsproxy=True)
    if not any(_NESTED_QUANTIFIER.search(p) for p in patterns):
        return None  # Python `re` finishes quickly: the reference keeps Starlette's engine
    return replace(theirs, regex_engine="re2")


def _acrh_lines_combined(exchange: Exchange, lines):
    values = _values(lines, "Access-Control-Request-Headers")
    if len(values) < 2:
        return None
    return _replace_lines(lines, "Access-Control-Request-Headers", [", ".join(values)])


def _empty_acrh_elements(exchange: Exchange, lines):
    values = _values(lines, "Access-Control-Request-Headers")
    if not any("" in _elements(v) for v in values):
        return None
    cleaned = [", ".join(e for e in _elements(v) if e) for v in values]
    return _replace_lines(lines, "Access-Control-Request-Headers", [v for v in cleaned if v])


def _acrpn_only_true(exchange: Exchange, lines):
    values = _values(lines, "Access-Control-Request-Private-Network")
    if not exchange.is_preflight or not values or values[0] == "true":
        return None
    return _replace_lines(lines, "Access-Control-Request-Private-Network", [])


def _two_origins(exchange: Exchange, obs: Observed):
    if len(exchange.request.origin) < 2 or obs.kind == "not-cors":
        return None
    return _origin_denied(obs)


def _overlong_origin(exchange: Exchange, obs: Observed):
    s, origins = exchange.settings, exchange.request.origin
    if (
        len(origins) != 1
        or len(origins[0]) <= MAX_ORIGIN_LENGTH
        or "*" in s.allow_origins
        or origins[0] in s.allow_origins
    ):
        return None
    return _origin_denied(obs)


def _null_only_when_listed(exchange: Exchange, obs: Observed):
    s, origins = exchange.settings, exchange.request.origin
    if origins != ("null",) or "*" in s.allow_origins or "null" in s.allow_origins:
        return None
    return _origin_denied(obs)


def _visible_ascii_only(exchange: Exchange, obs: Observed):
    s, origins = exchange.settings, exchange.request.origin
    if (
        len(origins) != 1
        or _VISIBLE_ASCII.fullmatch(origins[0])
        or "*" in s.allow_origins
        or origins[0] in s.allow_origins
    ):
        return None
    return _origin_denied(obs)


def _method_star_any_token(exchange: Exchange, obs: Observed):
    method = exchange.request.request_method
    if (
        obs.kind != "preflight"
        or "*" not in exchange.settings.allow_methods
        or "method" not in obs.failed
        or _TOKEN.fullmatch(method or "") is None
    ):
        return None
    return obs.with_failed([c for c in obs.failed if c != "method"])


def _method_star_echo(exchange: Exchange, obs: Observed):
    method = exchange.request.request_method
    if (
        obs.kind != "preflight"
        or "*" not in exchange.settings.allow_methods
        or obs.get(ACAM) is None
        or _TOKEN.fullmatch(method or "") is None
    ):
        return None
    return obs.with_header(ACAM, method)


def _invalid_header_name(exchange: Exchange, obs: Observed):
    if obs.kind != "preflight" or "headers" in obs.failed:
        return None
    if all(_TOKEN.fullmatch(n) for n in _requested_names(exchange)):
        return None
    return obs.with_failed((*obs.failed, "headers"))


def _acrh_size_bounded(exchange: Exchange, obs: Observed):
    if obs.kind != "preflight" or "headers" in obs.failed:
        return None
    lines = exchange.request.request_headers
    distinct = {n.lower() for n in _requested_names(exchange)}
    if (
        sum(len(line) for line in lines) <= MAX_REQUEST_HEADERS_LENGTH
        and len(distinct) <= MAX_REQUEST_HEADER_NAMES
    ):
        return None
    return obs.with_failed((*obs.failed, "headers"))


def _acah_star_echo(exchange: Exchange, obs: Observed):
    echoed = obs.get(ACAH)
    if obs.kind != "preflight" or "*" not in exchange.settings.allow_headers or echoed is None:
        return None
    names: dict[str, str] = {}
    for element in _elements(echoed):
        names.setdefault(element.lower(), element)
    return obs.with_header(ACAH, ", ".join(names.values()))


def _acah_configured_dedup(exchange: Exchange, obs: Observed):
    listed = obs.get(ACAH)
    if obs.kind != "preflight" or "*" in exchange.settings.allow_headers or listed is None:
        return None
    names: dict[str, str] = {}
    for element in listed.split(", "):
        names.setdefault(element.lower(), element)
    if len(names) == len(listed.split(", ")):
        return None
    # Starlette sorts the set of spellings; corsproxy keeps the first spelling
    # (safelisted names first, then the configured order) and sorts those.
    first: dict[str, str] = {}
    for name in ("Accept", "Accept-Language", "Content-Language", "Content-Type"):
        first.setdefault(name.lower(), name)
    for name in exchange.settings.allow_headers:
        first.setdefault(name.lower(), name)
    return obs.with_header(ACAH, ", ".join(sorted(first.values())))


def _upstream_cors_removed(exchange: Exchange, obs: Observed):
    if obs.status != "forwarded" or not exchange.upstream_headers:
        return None
    upstream = {(canonical_header_name(n), v) for n, v in exchange.upstream_headers}
    kept = tuple(h for h in obs.headers if h not in upstream)
    if kept == obs.headers:
        return None
    return replace(obs, headers=kept)


def _denied_origin_nothing(exchange: Exchange, obs: Observed):
    if obs.kind != "actual" or obs.get(ACAO) is not None:
        return None
    return obs.without(ACAC, ACEH)


def _enforce(exchange: Exchange, obs: Observed):
    if (
        not exchange.settings.enforce
        or obs.kind != "actual"
        or obs.status != "forwarded"
        or obs.get(ACAO) is not None
        or _same_origin(exchange.request)
    ):
        return None
    return replace(obs, status=403)


def _denied_preflight(exchange: Exchange, obs: Observed):
    if obs.kind != "preflight" or obs.status != 400:
        return None
    return obs.without(*CORS_HEADER_NAMES)


def _w(cors: Mapping[str, Any], method: str, headers, *, upstream_cors: bool = False):
    return {
        "policy": {"cors": dict(cors)},
        "request": {"method": method, "path": "/", "headers": [list(h) for h in headers]},
        "upstream_cors": upstream_cors,
    }


_APP = "https://app.example.com"
_PREFLIGHT_PUT = [("Origin", _APP), ("Access-Control-Request-Method", "PUT")]

DIFFERENCES: tuple[Difference, ...] = (
    Difference(
        "STAR_WITH_CREDENTIALS_REFUSED",
        '`allow_origins: ["*"]` with `allow_credentials: true` is a config error; Starlette '
        "accepts it and echoes any Origin, `null` included, with "
        "`Access-Control-Allow-Credentials: true`.",
        "Fetch refuses `*` on credentialed responses; echoing every origin instead lets every "
        "website read responses made with the user's cookies (cors-rules.md, pitfall "
        '"reflecting any origin with credentials"; issue 2). List the origins, or use a '
        "pattern or `allow_origin_regex`.",
        Stage.SETTINGS,
        _star_with_credentials,
        _w({"allow_origins": ["*"], "allow_credentials": True}, "GET", [("Origin", "null")]),
    ),
    Difference(
        "SUBDOMAIN_PATTERNS",
        "`https://*.example.com` in `allow_origins` matches one or more subdomain labels "
        "(never the apex); Starlette compares it as a literal string that no browser sends. "
        "(The suite hands Starlette the equivalent `allow_origin_regex`.)",
        "Subdomain lists are the most common reason people write regexes, and the most common "
        "place they get them wrong (`evil-example.com`, `example.com.evil.net`: cors-rules.md, "
        "pitfalls). A pattern with a dot boundary and an exact scheme and port can't be.",
        Stage.SETTINGS,
        _subdomain_patterns,
        _w(
            {"allow_origins": ["https://*.example.com"]},
            "GET",
            [("Origin", "https://a.b.example.com")],
        ),
    ),
    Difference(
        "PORT_WILDCARD",
        "`http://localhost:*` (and `https://*.example.com:*`) in `allow_origins` matches that "
        "scheme and host (or its subdomains) with any explicit port, 1-65535 without leading "
        "zeros, never the default port and never no port; Starlette compares it as a literal "
        "string that no browser sends. (The suite hands Starlette the equivalent "
        "`allow_origin_regex`.)",
        "Dev servers move between ports (Vite's 5173, 5174, ...), and the usual fix, a "
        "hand-written regex, is where origin checks go wrong (an unescaped dot, a missing "
        "anchor: cors-rules.md, pitfalls). A wildcard port with the scheme and host exact "
        "can't be; `http://localhost` itself stays a separate entry.",
        Stage.SETTINGS,
        _port_wildcards,
        _w(
            {"allow_origins": ["http://localhost:*"]},
            "GET",
            [("Origin", "http://localhost:5173")],
        ),
    ),
    Difference(
        "ORIGIN_REGEX_ON_RE2",
        "`allow_origin_regex` runs on RE2: linear time, so a pattern like `(a+)+` can't stall "
        "a request, and a pattern RE2 can't run (look-arounds, back-references) or reads "
        "differently from `re` (`{,n}`, `[[:alpha:]]`) is a config error. Starlette "
        "compiles any Python `re` pattern and backtracks. (For patterns with "
        "nested quantifiers the suite matches Starlette's regex with RE2 too: `re` would not "
        "finish.)",
        "The regex runs on unauthenticated input before anything else; backtracking patterns "
        "take exponential time in `re` (cors-rules.md, ReDoS pitfall). Refusing what RE2 "
        "can't run beats silently falling back to a backtracking engine.",
        Stage.SETTINGS,
        _origin_regex_on_re2,
        _w(
            {"allow_origin_regex": r"https://(?!evil)[a-z]+\.example\.net"},
            "GET",
            [("Origin", "https://app.example.net")],
        ),
    ),
    Difference(
        "ACRH_LINES_COMBINED",
        "Several `Access-Control-Request-Headers` lines form one list: every name is checked "
        "and echoed. Starlette reads only the first line.",
        "RFC 9110 §5.3: repeated field lines are one comma-separated list; API gateways split "
        "ACRH into several lines (cors-rules.md). Ignoring the later lines approves a "
        "preflight for headers nobody checked.",
        Stage.REQUEST,
        _acrh_lines_combined,
        _w(
            {"allow_origins": [_APP], "allow_methods": ["PUT"], "allow_headers": ["X-A"]},
            "OPTIONS",
            [
                *_PREFLIGHT_PUT,
                ("Access-Control-Request-Headers", "x-a"),
                ("Access-Control-Request-Headers", "x-b"),
            ],
        ),
    ),
    Difference(
        "EMPTY_ACRH_ELEMENTS_IGNORED",
        "Empty elements in `Access-Control-Request-Headers` (`x-a,,x-b`, a trailing comma, an "
        'empty value) are skipped; Starlette answers 400 "Disallowed CORS headers".',
        "RFC 9110 §5.6.1: a recipient ignores empty list elements, and an empty value asks "
        "for no header at all (cors-rules.md; issue 2).",
        Stage.REQUEST,
        _empty_acrh_elements,
        _w(
            {"allow_origins": [_APP], "allow_methods": ["PUT"], "allow_headers": ["X-A"]},
            "OPTIONS",
            [*_PREFLIGHT_PUT, ("Access-Control-Request-Headers", "x-a,")],
        ),
    ),
    Difference(
        "ACAPN_ONLY_FOR_TRUE",
        "Only `Access-Control-Request-Private-Network: true` asks for private-network access; "
        "Starlette treats any value (`false`, empty) as a request and answers "
        '`Access-Control-Allow-Private-Network: true` or fails "private-network".',
        "Private Network Access defines the request header with the single value `true`; "
        "any other value asks for nothing (issue 2).",
        Stage.REQUEST,
        _acrpn_only_true,
        _w(
            {"allow_origins": [_APP], "allow_methods": ["PUT"]},
            "OPTIONS",
            [*_PREFLIGHT_PUT, ("Access-Control-Request-Private-Network", "false")],
        ),
    ),
    Difference(
        "TWO_ORIGIN_HEADERS_DENIED",
        "A request with two `Origin` lines is treated as coming from a denied origin; "
        "Starlette uses the first line.",
        "A browser sends one Origin. With two, the proxy, the upstream and any cache may each "
        "pick a different one; refusing is the only answer that can't be played (issue 2).",
        Stage.RESPONSE,
        _two_origins,
        _w(
            {"allow_origins": [_APP]},
            "GET",
            [("Origin", _APP), ("Origin", "https://evil.example")],
        ),
    ),
    Difference(
        "OVERLONG_ORIGIN_REFUSED",
        f"An Origin longer than {MAX_ORIGIN_LENGTH} characters never matches a subdomain "
        "pattern or `allow_origin_regex` (exact entries and `*` still apply); Starlette runs "
        "its regex on any length.",
        "The origin regex runs on unauthenticated input; bounding its length is the ReDoS "
        "guard (cors-rules.md, pitfalls). A serialised origin is at most a scheme, `://`, a "
        "253-character host and a port, so no browser is refused.",
        Stage.RESPONSE,
        _overlong_origin,
        _w(
            {"allow_origin_regex": r"https://.*\.example\.com"},
            "GET",
            [("Origin", "https://" + "a" * 300 + ".example.com")],
        ),
    ),
    Difference(
        "ORIGIN_MATCHING_SEES_VISIBLE_ASCII_ONLY",
        "An Origin holding anything but visible ASCII (a space, a control character, `é`) "
        "never matches a subdomain pattern or `allow_origin_regex` (exact entries and `*` "
        "still apply); Starlette's regex can match it, so `.*` echoes such a value into ACAO.",
        "A serialised origin is visible ASCII (hosts are punycoded, RFC 6454 / Fetch), so no "
        "browser is refused, and a loose regex can't be used to reflect control or non-ASCII "
        "characters into a response header (issue 2: bound the Origin before any regex runs).",
        Stage.RESPONSE,
        _visible_ascii_only,
        _w(
            {"allow_origin_regex": r"https://.*\.example\.com"},
            "GET",
            [("Origin", "https://x y.example.com")],
        ),
    ),
    Difference(
        "NULL_ORIGIN_ONLY_WHEN_LISTED",
        "`Origin: null` is allowed only by a `null` entry in `allow_origins` (or `*`), never "
        "by `allow_origin_regex`; Starlette lets a loose regex such as `[a-z:/.]+` match it.",
        "`null` is the origin of every sandboxed iframe, `data:` and `file:` page and "
        "cross-origin redirect: allowing it trusts all of them, so it has to be written out "
        "(cors-rules.md; issue 2, and `corsproxy check` warns about it).",
        Stage.RESPONSE,
        _null_only_when_listed,
        _w({"allow_origin_regex": "[a-z:/.]+"}, "GET", [("Origin", "null")]),
    ),
    Difference(
        "METHODS_STAR_ALLOWS_ANY_TOKEN",
        '`allow_methods: ["*"]` allows any method token (`PURGE`, `patch`); Starlette turns '
        "`*` into its fixed list `DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT, QUERY` and "
        "refuses anything else.",
        '`*` says "any method" (issue 2); Fetch methods are case-sensitive tokens, and a '
        "lower-case `patch` from `fetch()` is a different method that a fixed list misses "
        "(cors-rules.md).",
        Stage.RESPONSE,
        _method_star_any_token,
        _w(
            {"allow_origins": [_APP], "allow_methods": ["*"]},
            "OPTIONS",
            [("Origin", _APP), ("Access-Control-Request-Method", "PURGE")],
        ),
    ),
    Difference(
        "METHODS_STAR_ECHOES_REQUESTED_METHOD",
        '`allow_methods: ["*"]` answers `Access-Control-Allow-Methods` with the requested '
        "method; Starlette sends its fixed list of eight.",
        "Under credentials a `*` in ACAM is a literal name, so echoing the one method asked "
        "for is what works with and without credentials (Fetch; cors-rules.md; issue 2).",
        Stage.RESPONSE,
        _method_star_echo,
        _w({"allow_origins": [_APP], "allow_methods": ["*"]}, "OPTIONS", _PREFLIGHT_PUT),
    ),
    Difference(
        "INVALID_HEADER_NAME_DENIED",
        "A name in `Access-Control-Request-Headers` that is not an RFC 9110 token "
        '(`x a`, `x-é`) fails the preflight ("headers"); Starlette echoes it under '
        '`allow_headers: ["*"]`, and strips all Unicode whitespace, not just spaces and tabs.',
        "No browser sends such a name, and echoing it puts an invalid token into ACAH, which "
        "makes the browser reject the whole list (cors-rules.md; issue 2).",
        Stage.RESPONSE,
        _invalid_header_name,
        _w(
            {"allow_origins": [_APP], "allow_methods": ["PUT"], "allow_headers": ["*"]},
            "OPTIONS",
            [*_PREFLIGHT_PUT, ("Access-Control-Request-Headers", "x a")],
        ),
    ),
    Difference(
        "ACRH_SIZE_BOUNDED",
        f"`Access-Control-Request-Headers` longer than {MAX_REQUEST_HEADERS_LENGTH} characters "
        f"or naming more than {MAX_REQUEST_HEADER_NAMES} headers fails the preflight "
        '("headers"); Starlette takes any size.',
        'Issue 2: "cap the work on huge values" - the value is unauthenticated input and is '
        "echoed under `*`; real preflights name a handful of headers.",
        Stage.RESPONSE,
        _acrh_size_bounded,
        _w(
            {"allow_origins": [_APP], "allow_methods": ["PUT"], "allow_headers": ["*"]},
            "OPTIONS",
            [
                *_PREFLIGHT_PUT,
                (
                    "Access-Control-Request-Headers",
                    ",".join(f"x-h{i}" for i in range(MAX_REQUEST_HEADER_NAMES + 1)),
                ),
            ],
        ),
    ),
    Difference(
        "ACAH_STAR_ECHO_NORMALISED",
        '`allow_headers: ["*"]` echoes the requested names trimmed, de-duplicated '
        'case-insensitively (first spelling kept) and joined by ", "; Starlette echoes the '
        "raw header value.",
        "Header names compare case-insensitively (Fetch); echoing exactly the names that "
        "were parsed and checked keeps client whitespace and repeats out of the response.",
        Stage.RESPONSE,
        _acah_star_echo,
        _w(
            {"allow_origins": [_APP], "allow_methods": ["PUT"], "allow_headers": ["*"]},
            "OPTIONS",
            [*_PREFLIGHT_PUT, ("Access-Control-Request-Headers", "x-a,X-A,x-b")],
        ),
    ),
    Difference(
        "ACAH_CONFIGURED_NAMES_DEDUPLICATED",
        "`Access-Control-Allow-Headers` names each configured header once, whatever its "
        "case (`content-type` next to the built-in `Content-Type` is sent once); Starlette "
        "lists both spellings.",
        "Header names are case-insensitive (RFC 9110 §5.1); the same name twice in ACAH is "
        "noise at best.",
        Stage.RESPONSE,
        _acah_configured_dedup,
        _w(
            {"allow_origins": [_APP], "allow_methods": ["PUT"], "allow_headers": ["content-type"]},
            "OPTIONS",
            _PREFLIGHT_PUT,
        ),
    ),
    Difference(
        "UPSTREAM_CORS_HEADERS_REMOVED",
        "`Access-Control-*` headers the upstream sends are removed; the proxy's own are the "
        "only ones. Starlette keeps the app's headers wherever it sets none of its own, so "
        "e.g. the upstream's ACAO reaches an origin the policy denies.",
        "Two ACAO headers fail in the browser even when equal, and an upstream's ACAO would "
        "bypass the policy (cors-rules.md: Kong #259, ingress-nginx #2138). Shown here with "
        "an inner app that sets its own CORS headers; the proxy tests check it on the wire.",
        Stage.RESPONSE,
        _upstream_cors_removed,
        _w(
            {"allow_origins": [_APP]},
            "GET",
            [("Origin", "https://evil.example")],
            upstream_cors=True,
        ),
    ),
    Difference(
        "DENIED_ORIGIN_GETS_NOTHING",
        "An actual request from an origin that is not allowed gets no `Access-Control-*` "
        "header; Starlette still sends `Access-Control-Allow-Credentials` and "
        "`Access-Control-Expose-Headers`.",
        "Without ACAO the browser blocks the response anyway; the other headers only leak "
        "the policy to anyone who asks (cors-rules.md, Starlette's weak spots; issue 2).",
        Stage.RESPONSE,
        _denied_origin_nothing,
        _w(
            {"allow_origins": [_APP], "allow_credentials": True, "expose_headers": ["X-Total"]},
            "GET",
            [("Origin", "https://evil.example")],
        ),
    ),
    Difference(
        "ENFORCE_REJECTS_DENIED_ORIGINS",
        "With `enforce: true` an actual request from a present, not allowed, cross-origin "
        "Origin is answered 403 and never forwarded (same-origin requests, Origin = scheme "
        "+ Host, pass); Starlette has no such option and forwards it.",
        "CORS blocks reading, not sending: a cross-origin simple POST from any site still "
        "reaches the server, and only a server-side check stops it (cors-rules.md). Opt-in.",
        Stage.RESPONSE,
        _enforce,
        _w(
            {"allow_origins": [_APP], "enforce": True},
            "POST",
            [("Origin", "https://evil.example"), ("Host", "api.example.com")],
        ),
    ),
    Difference(
        "DENIED_PREFLIGHT_GETS_NO_CORS_HEADERS",
        "A denied preflight (400) carries `Vary` and no `Access-Control-*` header; Starlette's "
        "400 carries what an allowed answer would (ACAM, ACMA, ACAH/ACAC/ACAPN as configured, "
        "ACAO when the origin passed).",
        "A browser fails any preflight without an ok status (Fetch, CORS-preflight fetch), so "
        "those headers serve nobody, and they advertise the policy to every origin that asks "
        "(issue 2).",
        Stage.RESPONSE,
        _denied_preflight,
        _w(
            {"allow_origins": [_APP], "allow_methods": ["GET"]},
            "OPTIONS",
            _PREFLIGHT_PUT,
        ),
    ),
)

BY_NAME = {d.name: d for d in DIFFERENCES}
assert len(BY_NAME) == len(DIFFERENCES), "difference names must be unique"


def render_markdown() -> str:
    """The list as markdown, for the README's migration section."""
    out = [
        f"Where corsproxy deliberately differs from Starlette's `CORSMiddleware` "
        f"(starlette {STARLETTE_VERSION}), as checked by `tests/test_starlette_reference.py`:",
        "",
    ]
    for d in DIFFERENCES:
        out.append(f"- **`{d.name}`**: {d.summary}")
        out.append(f"  *Why:* {d.reason}")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render_markdown(), end="")
