"""The CORS decision core: a request view in, a decision out.

Pure Python: no I/O, no clock, no aiohttp, no YAML (``tests/test_core_purity.py``
proves it). The server, ``corsproxy explain``, the logs and the tests all consume
the same :class:`Decision`.

Shape, after Starlette's ``CORSMiddleware`` and rs/cors: everything that does not
depend on the request is computed once in :class:`CorsPolicy` (header values
joined, regex compiled, origin sets built); per request only the origin-dependent
parts are added. References are to the WHATWG Fetch standard ("Fetch §3.2.x").

Three kinds of request (Fetch §3.2.2, "CORS-preflight request"):

- ``preflight``: ``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``.
  Answered here, never forwarded: 200 when allowed, 400 when not.
- ``actual``: any other request carrying ``Origin``.
- ``not-cors``: no ``Origin`` at all. Forwarded untouched, but still ``Vary: Origin``.

And a fourth that CORS does not cover: ``websocket``, a WebSocket handshake. Browsers
send ``Origin`` on it but enforce nothing on the answer, so a page on any site could
open a socket with the user's cookies (cross-site WebSocket hijacking). With
``check_websocket_origin`` (on by default) a handshake from an origin the policy
does not allow, that is not the proxy's own, is answered 403 and never forwarded,
whatever ``enforce`` says; a handshake without ``Origin`` (not a browser) passes.

A policy with ``report_only`` decides exactly as it would otherwise; the
:class:`Router` marks its decisions ``report_only``, and the server then forwards
every request (preflights, refused origins and handshakes included), passes the
upstream's own CORS headers through, and compares them with the decision
(:mod:`corsproxy.report`).
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

import re2 as _re2  # google-re2: linear-time matching, so no origin regex is a ReDoS

_RE2_OPTIONS = _re2.Options()
_RE2_OPTIONS.log_errors = False

__all__ = [
    "ACTUAL_VARY",
    "DEFAULT_PORTS",
    "PREFLIGHT_VARY",
    "SAFELISTED_REQUEST_HEADERS",
    "CorsPolicy",
    "CorsSettings",
    "Decision",
    "Kind",
    "RequestView",
    "Router",
    "compile_origin_regex",
    "is_token",
    "parse_header_list",
]

#: Request headers a preflight always allows (Starlette's set; Fetch §2.2.2
#: "CORS-safelisted request-header" for the names a browser never preflights for).
SAFELISTED_REQUEST_HEADERS = ("Accept", "Accept-Language", "Content-Language", "Content-Type")

#: Vary names on every preflight answer, allowed or denied: each of these request
#: headers changes the answer, so a cache must key on all of them.
PREFLIGHT_VARY = (
    "Origin",
    "Access-Control-Request-Method",
    "Access-Control-Request-Headers",
    "Access-Control-Request-Private-Network",
)
#: Vary names on every other response, including ones to requests without Origin:
#: otherwise a cached copy from a plain navigation is replayed to a later fetch().
ACTUAL_VARY = ("Origin",)

#: Longest Origin value ever looked at. A serialized origin is at most a scheme,
#: "://", a 253-character host and ":65535"; anything longer is refused before a
#: pattern or regex runs on it (ReDoS guard on unauthenticated input).
MAX_ORIGIN_LENGTH = 300
#: Bounds on the work spent on Access-Control-Request-Headers.
MAX_REQUEST_HEADERS_LENGTH = 8192
MAX_REQUEST_HEADER_NAMES = 256

# RFC 9110 §5.6.2 token.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# One or more DNS-ish labels, lower case only (browsers serialize hosts lower-cased).
_LABELS = re.compile(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?)*")
_VISIBLE = re.compile(r"[!-~]+")
#: The port a browser leaves out of a serialized origin, per scheme.
DEFAULT_PORTS = {"http": "80", "https": "443", "ws": "80", "wss": "443"}


def is_token(value: str) -> bool:
    """True when ``value`` is an RFC 9110 token (a valid method or header name)."""
    return _TOKEN.fullmatch(value) is not None


def _show(value: str, limit: int = 80) -> str:
    """A request value quoted for a reason line: escaped, and cut when long."""
    if len(value) > limit:
        return json.dumps(value[:limit]) + f" (cut; {len(value)} characters)"
    return json.dumps(value)


def parse_header_list(lines: Iterable[str]) -> tuple[list[str], str | None]:
    """Split Access-Control-Request-Headers lines into names.

    RFC 9110 §5.6.1: a comma list, optional whitespace, empty elements ignored;
    several lines combine as one list. Returns ``(names, error)``; ``error`` is a
    reason line when the value is too large or holds a name that is not a token.
    Names keep the client's spelling; duplicates (any case) are dropped.
    """
    total = 0
    names: list[str] = []
    seen: set[str] = set()
    for line in lines:
        total += len(line)
        if total > MAX_REQUEST_HEADERS_LENGTH:
            return [], (
                f"headers: Access-Control-Request-Headers is longer than "
                f"{MAX_REQUEST_HEADERS_LENGTH} characters"
            )
        for element in line.split(","):
            name = element.strip(" \t")
            if not name:
                continue
            if _TOKEN.fullmatch(name) is None:
                return [], f"headers: {_show(name)} is not a valid header name"
            key = name.lower()
            if key in seen:
                continue
            seen.add(key)
            names.append(name)
            if len(names) > MAX_REQUEST_HEADER_NAMES:
                return [], (
                    f"headers: more than {MAX_REQUEST_HEADER_NAMES} names in "
                    f"Access-Control-Request-Headers"
                )
    return names, None


#: Constructs valid in both engines that mean different things: the pattern must
#: mean in corsproxy what it meant under Starlette's ``re.fullmatch``, or be refused.
_RE2_DIVERGENT = (
    (
        re.compile(r"(?<!\\)\{,\d"),
        "'{,n}' means 0 to n repeats in Python re but the literal text '{,n}' in RE2: "
        "write '{0,n}'",
    ),
    (
        re.compile(r"\[:\^?[a-z]+:\]"),
        "'[:name:]' inside a set is a POSIX class in RE2 but plain characters in Python "
        "re: write the characters out, e.g. '[a-zA-Z]' for '[[:alpha:]]'",
    ),
)


class OriginRegex:
    """``allow_origin_regex`` compiled for full-match (Starlette uses ``re.fullmatch``).

    Compiled with RE2, whose matching time is linear in the input: the regex runs
    on unauthenticated input, and Python ``re`` backtracks exponentially on
    patterns like ``(a+)+`` (ReDoS). Patterns outside RE2's syntax (look-arounds,
    back-references) are refused with ``re.error`` rather than run on ``re``.
    Callers only pass visible-ASCII origins (see ``CorsPolicy.match_origin``).
    """

    __slots__ = ("pattern", "fullmatch")

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        for construct, meaning in _RE2_DIVERGENT:
            if construct.search(pattern):
                raise re.error(meaning)
        with warnings.catch_warnings():  # re's FutureWarnings are not for the user
            warnings.simplefilter("ignore")
            re.compile(pattern)  # re.error for a pattern that is invalid anywhere
        try:
            compiled = _re2.compile(pattern, _RE2_OPTIONS)
        except Exception as exc:  # re2 raises its own error type
            detail = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else exc
            raise re.error(
                f"RE2 cannot run this pattern ({detail}); corsproxy needs linear-time "
                f"matching on untrusted Origin values, so look-arounds and back-references "
                f"are not supported: rewrite the pattern without them"
            ) from None
        self.fullmatch = compiled.fullmatch


def compile_origin_regex(pattern: str) -> OriginRegex:
    """Compile one ``allow_origin_regex`` pattern; raises ``re.error`` for an invalid one."""
    return OriginRegex(pattern)


def _any_fullmatch(patterns: tuple[str, ...]) -> Callable[[str], object] | None:
    """One full-match test for several patterns: true when any of them matches the
    whole origin. None for no pattern; raises ``re.error`` for an invalid one.

    Each pattern is checked on its own (:class:`OriginRegex`), then all run as ONE
    RE2 alternation ``(?:a)|(?:b)``: a full match of an alternation is a full match
    of one branch, and RE2 scopes inline flags (``(?i)``) to their group, so this
    means exactly "any pattern matches", in one linear-time pass.
    """
    compiled = [OriginRegex(p) for p in patterns]
    if len(compiled) < 2:
        return compiled[0].fullmatch if compiled else None
    try:
        return _re2.compile("|".join(f"(?:{p})" for p in patterns), _RE2_OPTIONS).fullmatch
    except Exception:  # e.g. over RE2's memory budget: still linear, one pass per pattern
        return lambda origin: any(r.fullmatch(origin) for r in compiled)


def _regex_tuple(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """``allow_origin_regex`` as a tuple: a single string is a one-item tuple, and
    None or "" (the old spellings of "no regex") are empty."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


#: A port as a browser serialises it: digits, no leading zero (1-65535 is checked apart).
_PORT = re.compile(r"[1-9][0-9]{0,4}")


class _OriginPattern:
    """An ``allow_origins`` entry with a ``*``, precomputed for string tests only.

    - ``scheme://*.host[:port]``: one or more labels where the ``*`` is, on a dot
      boundary (never the apex); the rest exact;
    - ``scheme://host:*``: exactly that scheme and host with any explicit port;
    - ``scheme://*.host:*``: both.

    A port wildcard matches 1-65535 written without leading zeros (as a browser
    serialises it), never the scheme's default port (a browser leaves it out) and
    never an origin without a port: ``http://localhost:*`` does not match
    ``http://localhost``.
    """

    __slots__ = ("entry", "prefix", "suffix", "labels", "any_port", "default_port")

    def __init__(self, entry: str) -> None:
        self.entry = entry
        self.any_port = entry.endswith(":*")
        body = entry[:-2] if self.any_port else entry
        scheme = body.split("://", 1)[0]
        self.labels = "://*." in body
        if self.labels:
            # "https://" prefix, ".example.com[:port]" suffix: the labels in between
            # must be non-empty, so the apex never matches.
            self.prefix, rest = body.split("://*.", 1)
            self.prefix += "://"
            self.suffix = "." + rest
        else:
            self.prefix, self.suffix = body, ""
        self.default_port = DEFAULT_PORTS.get(scheme)

    def matches(self, origin: str) -> bool:
        """True when ``origin`` (visible ASCII, bounded length) matches the entry."""
        host = origin
        if self.any_port:
            host, colon, port = origin.rpartition(":")
            if (
                not colon
                or _PORT.fullmatch(port) is None
                or int(port) > 65535
                or port == self.default_port
            ):
                return False
        if not self.labels:
            return host == self.prefix
        prefix, suffix = self.prefix, self.suffix
        return (
            len(host) > len(prefix) + len(suffix)
            and host.startswith(prefix)
            and host.endswith(suffix)
            and _LABELS.fullmatch(host, len(prefix), len(host) - len(suffix)) is not None
        )


@dataclass(frozen=True)
class CorsSettings:
    """The CORS policy as written: Starlette's ``CORSMiddleware`` names and defaults,
    plus ``allow_private_network`` (Starlette has it too) and ``enforce``.

    Plain validated values (the config layer checks them); :class:`CorsPolicy`
    turns them into the precomputed form used per request.

    ``allow_origin_regex`` holds the patterns (empty: none); a single string, or
    None, is accepted and stored as a tuple, so older callers keep working.
    """

    allow_origins: tuple[str, ...] = ()
    allow_origin_regex: tuple[str, ...] = ()
    allow_methods: tuple[str, ...] = ("GET",)
    allow_headers: tuple[str, ...] = ()
    allow_credentials: bool = False
    expose_headers: tuple[str, ...] = ()
    max_age: int = 600
    allow_private_network: bool = False
    enforce: bool = False
    check_websocket_origin: bool = True
    report_only: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "allow_origin_regex", _regex_tuple(self.allow_origin_regex))


class Kind(StrEnum):
    """What kind of request the decision is about."""

    PREFLIGHT = "preflight"
    ACTUAL = "actual"
    NOT_CORS = "not-cors"
    WEBSOCKET = "websocket"


@dataclass(frozen=True, slots=True)
class RequestView:
    """What the core needs to know about a request; all values as received.

    ``origin`` and ``request_headers`` hold every header line (a request with two
    Origin lines is refused). ``path`` is the raw, still percent-encoded path
    without the query. ``host``/``scheme`` are the listener's view, used for the
    same-origin test under ``enforce`` and on WebSocket handshakes. ``websocket``:
    the request is a WebSocket handshake (``Upgrade: websocket``).
    """

    method: str
    path: str = "/"
    origin: tuple[str, ...] = ()
    request_method: str | None = None
    request_headers: tuple[str, ...] = ()
    request_private_network: str | None = None
    host: str | None = None
    scheme: str = "http"
    websocket: bool = False


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict on one request.

    - ``status``: the response the proxy makes itself (200/400 for preflights, 403
      under ``enforce``), or ``None``: forward upstream.
    - ``headers``: the exact ``Access-Control-*`` headers to send (and no others).
    - ``vary``: names to merge into ``Vary``.
    - ``failed``: the failed checks in order (origin, method, headers,
      private-network); ``reasons``: one plain-words line per check made.
    - ``body``: text/plain body when the proxy answers itself.
    - ``report_only``: the policy is ``report_only``: ``status`` and ``headers`` say
      what it *would* answer; the proxy forwards the request anyway.
    """

    kind: Kind
    allowed: bool
    status: int | None
    headers: tuple[tuple[str, str], ...]
    vary: tuple[str, ...]
    reasons: tuple[str, ...]
    failed: tuple[str, ...] = ()
    route: str | None = None
    body: str = ""
    #: The route is ``report_only``: the request is forwarded whatever this
    #: decision says, and the upstream's own CORS headers are compared with it.
    report_only: bool = False

    @property
    def forward(self) -> bool:
        """True when the request goes upstream."""
        return self.status is None

    @property
    def verdict(self) -> str:
        """One word for logs: allowed, denied, rejected (403) or not-cors."""
        if self.kind is Kind.NOT_CORS:
            return "not-cors"
        if self.status == 403:
            return "rejected"
        return "allowed" if self.allowed else "denied"


class CorsPolicy:
    """A :class:`CorsSettings` precomputed for per-request use (immutable)."""

    __slots__ = (
        "settings",
        "_allow_all_origins",
        "_wildcard_acao",
        "_exact",
        "_patterns",
        "_regex",
        "_allow_all_methods",
        "_methods",
        "_acam",
        "_allow_all_headers",
        "_header_keys",
        "_acah",
        "_static_preflight",
        "_static_actual",
        "_methods_text",
        "_headers_text",
    )

    def __init__(self, settings: CorsSettings) -> None:
        s = settings
        self.settings = s
        self._allow_all_origins = "*" in s.allow_origins
        if self._allow_all_origins and s.allow_credentials:
            # Fetch §3.2.3: a credentialed response can't use ACAO "*"; echoing
            # every origin instead would hand every website the user's data.
            raise ValueError('allow_origins "*" cannot be combined with allow_credentials')
        self._wildcard_acao = self._allow_all_origins
        self._exact = frozenset(o for o in s.allow_origins if "*" not in o)
        # Subdomain and port patterns, split into string tests once (no regex).
        self._patterns = tuple(
            _OriginPattern(o)
            for o in s.allow_origins
            if o != "*" and ("://*." in o or o.endswith(":*"))
        )
        self._regex = _any_fullmatch(s.allow_origin_regex)

        self._allow_all_methods = "*" in s.allow_methods
        self._methods = frozenset(s.allow_methods)
        self._acam = ", ".join(s.allow_methods)
        self._methods_text = ", ".join(s.allow_methods) or "none"

        self._allow_all_headers = "*" in s.allow_headers
        names: dict[str, str] = {}
        for name in (*SAFELISTED_REQUEST_HEADERS, *s.allow_headers):
            if name != "*":
                names.setdefault(name.lower(), name)
        self._header_keys = frozenset(names)
        self._acah = ", ".join(sorted(names.values()))
        self._headers_text = ", ".join(h for h in s.allow_headers) or "none"

        preflight = [("Access-Control-Max-Age", str(s.max_age))]
        actual = []
        if s.allow_credentials:
            preflight.append(("Access-Control-Allow-Credentials", "true"))
            actual.append(("Access-Control-Allow-Credentials", "true"))
        if s.expose_headers:
            actual.append(("Access-Control-Expose-Headers", ", ".join(s.expose_headers)))
        self._static_preflight = tuple(preflight)
        self._static_actual = tuple(actual)

    # -- origins ---------------------------------------------------------------

    def match_origin(self, origin: str) -> str | None:
        """Which rule allows ``origin`` (words for a reason line), or None."""
        if self._allow_all_origins:
            return 'allow_origins "*"'
        if origin in self._exact:
            return "allow_origins"
        if len(origin) > MAX_ORIGIN_LENGTH or origin == "null" or not _VISIBLE.fullmatch(origin):
            # "null" (every sandboxed/opaque origin) only matches when listed
            # explicitly (issue 2), never through a loose allow_origin_regex.
            # Patterns and the regex only see visible ASCII (a serialized origin
            # is ASCII: hosts are punycoded), so a loose regex never echoes
            # control or non-ASCII characters into ACAO.
            return None
        for pattern in self._patterns:
            if pattern.matches(origin):
                return f"pattern {json.dumps(pattern.entry)}"
        if self._regex is not None and self._regex(origin):
            return "allow_origin_regex"
        return None

    def _origin_denied_reason(self, origin: str) -> str:
        if len(origin) > MAX_ORIGIN_LENGTH:
            return (
                f"origin: {_show(origin)} is longer than {MAX_ORIGIN_LENGTH} characters, "
                f"so it is not a browser origin"
            )
        if not origin:
            return "origin: the Origin header is empty"
        return f"origin: {_show(origin)} is not allowed by allow_origins or allow_origin_regex"

    def _acao(self, origin: str) -> str:
        return "*" if self._wildcard_acao else origin

    # -- decisions -------------------------------------------------------------

    def preflight(self, req: RequestView, route: str | None) -> Decision:
        """Decide a preflight: all four checks run, so every failure is named."""
        failed: list[str] = []
        reasons: list[str] = []
        headers: list[tuple[str, str]] = []

        origin = req.origin[0]
        if len(req.origin) > 1:
            failed.append("origin")
            reasons.append(
                f"origin: the request has {len(req.origin)} Origin headers; one is allowed"
            )
        else:
            rule = self.match_origin(origin)
            if rule is None:
                failed.append("origin")
                reasons.append(self._origin_denied_reason(origin))
            else:
                headers.append(("Access-Control-Allow-Origin", self._acao(origin)))
                reasons.append(f"origin: {_show(origin)} is allowed by {rule}")

        method = req.request_method or ""
        if _TOKEN.fullmatch(method) is None:
            failed.append("method")
            reasons.append(f"method: {_show(method)} is not a valid method name")
        elif self._allow_all_methods:
            # Echo the one method asked for: "*" is literal under credentials.
            headers.append(("Access-Control-Allow-Methods", method))
            reasons.append(f'method: {_show(method)} is allowed by allow_methods "*"')
        elif method in self._methods:
            headers.append(("Access-Control-Allow-Methods", self._acam))
            reasons.append(f"method: {_show(method)} is in allow_methods")
        else:
            failed.append("method")
            reasons.append(
                f"method: {_show(method)} is not in allow_methods ({self._methods_text}); "
                f"methods compare case-sensitively"
            )

        names, error = parse_header_list(req.request_headers)
        if error is not None:
            failed.append("headers")
            reasons.append(error)
        elif self._allow_all_headers:
            if names:
                headers.append(("Access-Control-Allow-Headers", ", ".join(names)))
                reasons.append('headers: all requested headers are allowed by allow_headers "*"')
        else:
            refused = [n for n in names if n.lower() not in self._header_keys]
            if refused:
                failed.append("headers")
                reasons.append(
                    f"headers: {', '.join(_show(n) for n in refused)} not in allow_headers "
                    f"({self._headers_text}; Accept, Accept-Language, Content-Language and "
                    f"Content-Type are always allowed)"
                )
            else:
                headers.append(("Access-Control-Allow-Headers", self._acah))
                if names:
                    reasons.append("headers: every requested header is allowed")

        if req.request_private_network == "true":
            if self.settings.allow_private_network:
                headers.append(("Access-Control-Allow-Private-Network", "true"))
                reasons.append("private-network: allowed by allow_private_network")
            else:
                failed.append("private-network")
                reasons.append(
                    "private-network: Access-Control-Request-Private-Network is true "
                    "but allow_private_network is false"
                )

        if failed:
            denied = tuple(r for r in reasons if r.split(":", 1)[0] in failed)
            body = "Disallowed CORS " + ", ".join(failed) + "\n\n" + "\n".join(denied) + "\n"
            return Decision(
                Kind.PREFLIGHT, False, 400, (), PREFLIGHT_VARY, denied, tuple(failed), route, body
            )
        headers.extend(self._static_preflight)
        return Decision(
            Kind.PREFLIGHT,
            True,
            200,
            tuple(headers),
            PREFLIGHT_VARY,
            tuple(reasons),
            (),
            route,
            "OK",
        )

    def actual(self, req: RequestView, route: str | None) -> Decision:
        """Decide a request with Origin that is not a preflight."""
        if len(req.origin) > 1:
            reason = f"origin: the request has {len(req.origin)} Origin headers; one is allowed"
            return self._refused(req, route, reason, ", ".join(req.origin))
        origin = req.origin[0]
        rule = self.match_origin(origin)
        if rule is None:
            if _same_origin(origin, req):
                return Decision(
                    Kind.ACTUAL,
                    True,
                    None,
                    (),
                    ACTUAL_VARY,
                    (f"origin: {_show(origin)} is the proxy's own origin (same-origin request)",),
                    (),
                    route,
                )
            return self._refused(req, route, self._origin_denied_reason(origin), origin)
        headers = (("Access-Control-Allow-Origin", self._acao(origin)), *self._static_actual)
        return Decision(
            Kind.ACTUAL,
            True,
            None,
            headers,
            ACTUAL_VARY,
            (f"origin: {_show(origin)} is allowed by {rule}",),
            (),
            route,
        )

    def websocket(self, req: RequestView, route: str | None) -> Decision:
        """Decide a WebSocket handshake (see the module docstring). An allowed one
        carries the headers an actual request would get, for the case where the
        upstream answers with an ordinary response instead of 101."""
        if not req.origin:
            return Decision(
                Kind.WEBSOCKET, True, None, (), ACTUAL_VARY,
                ("no Origin header: not a browser, so the handshake is forwarded",), (), route,
            )
        decision = self.actual(req, route)
        if decision.allowed:
            return Decision(
                Kind.WEBSOCKET, True, None, decision.headers, ACTUAL_VARY, decision.reasons, (),
                route,
            )
        if not self.settings.check_websocket_origin:
            reason = (decision.reasons[0] + "; forwarded because check_websocket_origin is false")
            return Decision(Kind.WEBSOCKET, False, None, (), ACTUAL_VARY, (reason,), ("origin",),
                            route)
        origin = ", ".join(req.origin)
        where = f"routes[path={route}].cors" if route is not None else "cors"
        body = (
            f"Forbidden: WebSocket handshake from origin {_show(origin)} refused by corsproxy.\n"
            f"{decision.reasons[0]}\n"
            f"To allow it, add the origin to {where}.allow_origins in the proxy's config "
            f"(or turn the check off with {where}.check_websocket_origin: false).\n"
        )
        return Decision(Kind.WEBSOCKET, False, 403, (), ACTUAL_VARY, decision.reasons,
                        ("origin",), route, body)

    def _refused(self, req: RequestView, route: str | None, reason: str, origin: str) -> Decision:
        if not self.settings.enforce:
            return Decision(
                Kind.ACTUAL, False, None, (), ACTUAL_VARY, (reason,), ("origin",), route
            )
        where = f"routes[path={route}].cors" if route is not None else "cors"
        body = (
            f"Forbidden: cross-origin request from origin {_show(origin)} refused by corsproxy "
            f"(enforce: true).\n{reason}\n"
            f"To allow it, add the origin to {where}.allow_origins in the proxy's config.\n"
        )
        return Decision(
            Kind.ACTUAL, False, 403, (), ACTUAL_VARY, (reason,), ("origin",), route, body
        )


def _same_origin(origin: str, req: RequestView) -> bool:
    """Origin equals the listener's scheme plus the Host header (default port dropped)."""
    host = req.host
    if not host:
        return False
    host = host.lower()
    default = DEFAULT_PORTS.get(req.scheme)
    if default and host.endswith(":" + default):
        host = host[: -len(default) - 1]
    return origin == f"{req.scheme}://{host}"


_NOT_CORS_REASONS = ("no Origin header: not a CORS request",)


class Router:
    """The top-level policy plus per-route ones; picks one and decides.

    The longest route path that is a whole-segment prefix of the raw path wins
    (``/public`` matches ``/public`` and ``/public/x``, not ``/publicity``); a
    trailing slash on a route path is ignored, so ``/`` matches every path.
    """

    __slots__ = ("default", "routes", "report_only")

    def __init__(self, default: CorsPolicy, routes: Sequence[tuple[str, CorsPolicy]] = ()) -> None:
        self.default = default
        # (prefix without trailing slash, route path as written, policy), longest first
        self.routes = tuple(
            sorted(
                ((path.rstrip("/"), path, policy) for path, policy in routes),
                key=lambda r: len(r[0]),
                reverse=True,
            )
        )
        #: The routes (None: the top-level policy) whose policy is report_only.
        self.report_only = frozenset(
            [None] * default.settings.report_only
            + [path for path, policy in routes if policy.settings.report_only]
        )

    def select(self, path: str) -> tuple[str | None, CorsPolicy]:
        """The route path (as written) and policy for a raw request path."""
        for prefix, written, policy in self.routes:
            if path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/"):
                return written, policy
        return None, self.default

    def decide(self, req: RequestView) -> Decision:
        """The decision for one request. Never raises on any header values."""
        decision = self._decide(req)
        if self.report_only and decision.route in self.report_only:
            return replace(decision, report_only=True)
        return decision

    def _decide(self, req: RequestView) -> Decision:
        if req.websocket:
            route, policy = self.select(req.path) if self.routes else (None, self.default)
            return policy.websocket(req, route)
        if not req.origin:
            route, _ = self.select(req.path) if self.routes else (None, None)
            return Decision(
                Kind.NOT_CORS, True, None, (), ACTUAL_VARY, _NOT_CORS_REASONS, (), route
            )
        route, policy = self.select(req.path) if self.routes else (None, self.default)
        if req.method == "OPTIONS" and req.request_method is not None:
            return policy.preflight(req, route)
        return policy.actual(req, route)
