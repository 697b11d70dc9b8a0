"""Invariants of the decision core, checked on generated policies and requests.

Each property runs a bounded number of examples (no deadline: CI machines vary).
The oracles are written independently of corsproxy/core.py: plain string rules
for subdomain patterns, Python's ``re.fullmatch`` for the origin regex.
"""

import re

from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from corsproxy.core import (
    MAX_ORIGIN_LENGTH,
    MAX_REQUEST_HEADER_NAMES,
    MAX_REQUEST_HEADERS_LENGTH,
    PREFLIGHT_VARY,
    CorsPolicy,
    CorsSettings,
    Kind,
    RequestView,
    Router,
)

BOUNDED = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

# -- strategies ---------------------------------------------------------------

# Any code point, lone surrogates included: aiohttp decodes header bytes with
# surrogateescape, so a non-UTF-8 byte reaches the core as "\udcff".
ANY_CHAR = st.characters(exclude_categories=())
FRAGMENTS = st.sampled_from(
    [
        "https://", "http://", "null", "*", ".example.com", "example.com", ".evil.com",
        "app", ":443", ":8443", "/", ",", ", ", " ", "\t", "\r\n", "\x00", "\udcff",
        "é", "A", "a" * 50, "x-a", "Content-Type", "true", "GET", "patch",
    ]
)
TEXT = st.lists(st.one_of(FRAGMENTS, st.text(ANY_CHAR, max_size=20)), max_size=8).map("".join)
HUGE = st.builds(lambda s, n: s * n, st.sampled_from(["a", "x-a,", ",", " ", "\udcff"]),
                 st.integers(MAX_REQUEST_HEADERS_LENGTH - 10, 3 * MAX_REQUEST_HEADERS_LENGTH))
HEADER_VALUE = st.one_of(TEXT, HUGE)

ORIGIN_ENTRIES = [
    "https://app.example.com", "http://localhost:3000", "null", "https://*.example.com",
    "https://*.example.com:8443", "http://*.test", "http://[::1]:8080",
    "http://localhost:*", "https://*.example.com:*",
]
REGEXES = [
    None, r"https://[a-z]+\.example\.org", r"https://(a+)+\.example\.com", r".*",
    r"https://app\.example\.org|http://localhost:\d+", r"https://[a-z.]+",
    (r"https://[a-z]+\.example\.org", r"(?i)http://localhost:\d+"),
]
#: Single patterns Python ``re`` finishes on quickly (usable as an oracle).
SINGLE_REGEXES = [r for r in REGEXES if isinstance(r, str) and "(a+)+" not in r]
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "patch", "DELETE", "*"]
HEADER_NAMES = ["X-Api-Key", "Authorization", "content-type", "x-a", "*"]


@st.composite
def cors_settings(draw):
    wildcard = draw(st.booleans())
    origins = draw(st.lists(st.sampled_from(ORIGIN_ENTRIES), max_size=4, unique=True))
    if wildcard:
        origins.append("*")
    return CorsSettings(
        allow_origins=tuple(origins),
        allow_origin_regex=draw(st.sampled_from(REGEXES)),
        allow_methods=tuple(draw(st.lists(st.sampled_from(METHODS), max_size=4, unique=True))),
        allow_headers=tuple(draw(st.lists(st.sampled_from(HEADER_NAMES), max_size=3, unique=True))),
        # "*" with credentials is refused at load time (config and CorsPolicy).
        allow_credentials=draw(st.booleans()) and not wildcard,
        expose_headers=tuple(draw(st.lists(st.sampled_from(["X-Request-Id", "X-Total"]),
                                           max_size=2, unique=True))),
        max_age=draw(st.integers(0, 86400)),
        allow_private_network=draw(st.booleans()),
        enforce=draw(st.booleans()),
    )


@st.composite
def routers(draw):
    default = CorsPolicy(draw(cors_settings()))
    paths = draw(st.lists(st.sampled_from(["/", "/api", "/api/public", "/public/", "/a%20b"]),
                          max_size=3, unique=True))
    return Router(default, [(p, CorsPolicy(draw(cors_settings()))) for p in paths])


@st.composite
def requests(draw):
    origin_pool = st.one_of(st.sampled_from(ORIGIN_ENTRIES + ["https://shop.example.com",
                                                              "https://example.com"]), TEXT)
    return RequestView(
        method=draw(st.one_of(st.sampled_from(["OPTIONS", "GET", "POST"]), TEXT)),
        path=draw(st.one_of(st.sampled_from(["/", "/api/x", "/publicity", "/a%20b/c"]), TEXT)),
        origin=tuple(draw(st.lists(origin_pool, max_size=3))),
        request_method=draw(st.one_of(st.none(), st.sampled_from(METHODS), TEXT)),
        request_headers=tuple(draw(st.lists(HEADER_VALUE, max_size=4))),
        request_private_network=draw(st.one_of(st.none(), st.just("true"), TEXT)),
        host=draw(st.one_of(st.none(), st.just("app.example.com"), TEXT)),
        scheme=draw(st.sampled_from(["http", "https"])),
    )


# -- invariants on every decision -----------------------------------------------


def check_invariants(router: Router, req: RequestView):
    decision = router.decide(req)
    names = [n.lower() for n, _ in decision.headers]
    values = dict((n.lower(), v) for n, v in decision.headers)

    # Only Access-Control-* headers, each once.
    assert all(n.startswith("access-control-") for n in names)
    assert len(names) == len(set(names))
    # Vary always holds Origin (caches), preflights the full four.
    assert "Origin" in decision.vary
    if decision.kind is Kind.PREFLIGHT:
        assert decision.vary == PREFLIGHT_VARY
    # ACAO "*" never goes with credentials.
    if values.get("access-control-allow-origin") == "*":
        assert "access-control-allow-credentials" not in values
    # A denied request never gets any CORS header, ACAO included.
    if not decision.allowed:
        assert decision.headers == ()
        assert decision.failed
    # ACAO is "*" or exactly the one request origin.
    if "access-control-allow-origin" in values:
        assert len(req.origin) == 1
        assert values["access-control-allow-origin"] in ("*", req.origin[0])
    # Kinds and statuses.
    if not req.origin:
        assert decision.kind is Kind.NOT_CORS and decision.forward and not decision.headers
    elif req.method == "OPTIONS" and req.request_method is not None:
        assert decision.kind is Kind.PREFLIGHT
        assert decision.status == (200 if decision.allowed else 400)
    else:
        assert decision.kind is Kind.ACTUAL
        assert decision.status in (None, 403)
        if decision.status == 403:
            assert not decision.allowed and decision.body
    # Every failed check has a reason in words.
    for check in decision.failed:
        assert any(r.startswith(check + ":") for r in decision.reasons)
    return decision


@BOUNDED
@given(cors_settings(), st.lists(cors_settings(), max_size=2), requests())
def test_core_never_raises_keeps_invariants_and_is_deterministic(top, routed, req):
    def build():
        paths = ("/api", "/public/")[: len(routed)]
        routes = [(p, CorsPolicy(s)) for p, s in zip(paths, routed, strict=True)]
        return Router(CorsPolicy(top), routes)

    router = build()
    decision = check_invariants(router, req)
    assert router.decide(req) == decision  # same router, same answer
    assert build().decide(req) == decision  # same settings, same answer


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cors_settings(), st.lists(TEXT, min_size=1, max_size=60), requests())
def test_many_header_lines_never_raise(s, lines, req):
    req = RequestView("OPTIONS", "/", req.origin or ("https://app.example.com",), "GET",
                      tuple(lines), req.request_private_network, req.host)
    check_invariants(Router(CorsPolicy(s)), req)


# -- origins ------------------------------------------------------------------

PATTERN_POLICY = Router(CorsPolicy(CorsSettings(allow_origins=("https://*.example.com",))))
LABEL = st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
_ORACLE_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?")


def pattern_oracle(origin: str) -> bool:
    """https://*.example.com: "https://", one or more lower-case labels, ".example.com"."""
    prefix, suffix = "https://", ".example.com"
    if not (origin.startswith(prefix) and origin.endswith(suffix)):
        return False
    middle = origin[len(prefix) : -len(suffix)]
    return (
        middle != ""
        and len(origin) <= MAX_ORIGIN_LENGTH
        and all(_ORACLE_LABEL.fullmatch(label) for label in middle.split("."))
    )


@BOUNDED
@given(st.lists(LABEL, min_size=1, max_size=4))
def test_pattern_allows_any_subdomain_depth(labels):
    origin = "https://" + ".".join(labels) + ".example.com"
    decision = PATTERN_POLICY.decide(RequestView("GET", origin=(origin,)))
    assert decision.allowed
    assert decision.headers == (("Access-Control-Allow-Origin", origin),)


@BOUNDED
@given(
    st.sampled_from(["https://", "http://", "HTTPS://", "", "https://evil.com/", "https://."]),
    st.lists(st.one_of(LABEL, TEXT), max_size=3).map(".".join),
    st.sampled_from([".example.com", "example.com", "-example.com", ".example.com.evil.com",
                     ".example.com:443", ".example.com/", ".EXAMPLE.com", ".example.co"]),
)
@example("https://", "", ".example.com")
@example("https://", "evil", "-example.com")
@example("https://", "example.com", ".evil.com")
def test_pattern_only_allows_subdomains_with_a_dot_boundary(scheme, middle, suffix):
    origin = scheme + middle + suffix
    decision = PATTERN_POLICY.decide(RequestView("GET", origin=(origin,)))
    assert decision.allowed == pattern_oracle(origin), origin
    if decision.allowed:
        assert origin.endswith(".example.com") and len(middle) >= 1


PORT_POLICY = Router(CorsPolicy(CorsSettings(allow_origins=("http://localhost:*",))))


def port_oracle(origin: str) -> bool:
    """http://localhost:*: the host exactly, then 1-65535 as a browser writes it
    (no leading zero), and never 80 (a browser leaves the default port out)."""
    prefix = "http://localhost:"
    port = origin[len(prefix) :]
    return (
        origin.startswith(prefix)
        and port.isascii()
        and port.isdigit()
        and not port.startswith("0")
        and 0 < int(port) <= 65535
        and port != "80"
    )


@BOUNDED
@given(
    st.sampled_from(["http://localhost:", "https://localhost:", "http://localhost", "http://",
                     "http://localhost.evil.com:", "http://LOCALHOST:", "http://localhost::"]),
    st.one_of(st.integers(0, 99999).map(str), st.integers(0, 999).map("0{}".format), TEXT),
)
@example("http://localhost:", "80")
@example("http://localhost:", "65535")
@example("http://localhost:", "65536")
@example("http://localhost:", "")
@example("http://localhost:", "5173/")
def test_port_wildcard_allows_exactly_the_ports_a_browser_sends(start, port):
    origin = start + port
    decision = PORT_POLICY.decide(RequestView("GET", origin=(origin,)))
    assert decision.allowed == port_oracle(origin), origin
    if decision.allowed:
        assert decision.headers == (("Access-Control-Allow-Origin", origin),)


REGEX = r"https://app\.example\.org"
REGEX_POLICY = Router(CorsPolicy(CorsSettings(allow_origin_regex=REGEX)))


@BOUNDED
@given(
    st.lists(st.sampled_from(SINGLE_REGEXES), min_size=1, max_size=3, unique=True),
    st.one_of(TEXT, st.sampled_from(
        ["https://aaa.example.com", "https://shop.example.org", "http://localhost:8"])),
)
def test_regex_list_is_any_pattern_in_full(patterns, origin):
    router = Router(CorsPolicy(CorsSettings(allow_origin_regex=tuple(patterns))))
    assume(len(origin) <= MAX_ORIGIN_LENGTH and origin != "null")
    visible = re.fullmatch(r"[!-~]+", origin) is not None
    expected = visible and any(re.fullmatch(p, origin) for p in patterns)
    assert router.decide(RequestView("GET", origin=(origin,))).allowed == expected


@BOUNDED
@given(st.one_of(st.just(""), TEXT), st.one_of(st.just(""), TEXT))
@example("", ".evil.net")
@example("https://evil.net/", "")
@example("x", "")
def test_regex_is_a_full_match_not_prefix_or_suffix(before, after):
    origin = before + "https://app.example.org" + after
    allowed = REGEX_POLICY.decide(RequestView("GET", origin=(origin,))).allowed
    assert allowed == (origin == "https://app.example.org")


@BOUNDED
@given(st.sampled_from([r for r in REGEXES if isinstance(r, str)]), st.one_of(TEXT, st.sampled_from(
    ["https://aaa.example.com", "https://shop.example.org", "http://localhost:8", "null"])))
def test_regex_agrees_with_python_fullmatch(pattern, origin):
    router = Router(CorsPolicy(CorsSettings(allow_origin_regex=pattern)))
    assume(len(origin) <= MAX_ORIGIN_LENGTH and origin != "null")
    assume("(a+)+" not in pattern)  # Python re would take exponential time as oracle
    # Only visible ASCII reaches the regex (a serialized origin is ASCII); the rest is denied.
    visible = re.fullmatch(r"[!-~]+", origin) is not None
    expected = visible and re.fullmatch(pattern, origin) is not None
    assert router.decide(RequestView("GET", origin=(origin,))).allowed == expected


@BOUNDED
@given(routers(), st.text(ANY_CHAR, max_size=40))
def test_denied_origin_never_gets_acao(router, origin):
    for method, acrm in (("GET", None), ("OPTIONS", "GET")):
        decision = router.decide(RequestView(method, "/", (origin,), acrm))
        if "origin" in decision.failed:
            assert not any(n == "Access-Control-Allow-Origin" for n, _ in decision.headers)


def test_non_utf8_origin_is_denied_not_raised():
    router = Router(CorsPolicy(CorsSettings(allow_origin_regex=r".*")))
    decision = router.decide(RequestView("GET", origin=("https://\udcff.example.com",)))
    assert not decision.allowed and decision.headers == ()


def test_catastrophic_regex_on_long_origin_is_denied():
    # (a+)+ takes exponential time in a backtracking engine; RE2 is linear. This
    # asserts the result only: it finishes (the suite would hang otherwise).
    router = Router(CorsPolicy(CorsSettings(allow_origin_regex=r"https://(a+)+\.example\.com")))
    for n in (30, 100, MAX_ORIGIN_LENGTH - 9, 5000):
        origin = "https://" + "a" * n + "!"
        decision = router.decide(RequestView("GET", origin=(origin,)))
        assert not decision.allowed and decision.headers == ()
    good = router.decide(RequestView("GET", origin=("https://" + "a" * 200 + ".example.com",)))
    assert good.allowed


# -- Access-Control-Request-Headers bounds --------------------------------------


@BOUNDED
@given(st.sampled_from(["x-a,", "a", ",", " ", "x-h"]), st.integers(1, 4), st.booleans())
def test_huge_acrh_is_denied(unit, lines, star):
    router = Router(CorsPolicy(CorsSettings(allow_origins=("https://app.example.com",),
                                            allow_headers=("*",) if star else ())))
    per_line = MAX_REQUEST_HEADERS_LENGTH // lines + 1
    value = (unit * (per_line // len(unit) + 1))[:per_line]
    req = RequestView("OPTIONS", "/", ("https://app.example.com",), "GET", (value,) * lines)
    decision = router.decide(req)
    assert decision.failed == ("headers",) and decision.status == 400
    assert "longer than" in decision.reasons[0]


@BOUNDED
@given(st.integers(MAX_REQUEST_HEADER_NAMES + 1, 1500), st.integers(1, 5))
def test_too_many_acrh_names_are_denied(count, lines):
    names = [f"x-{i}" for i in range(count)]
    chunk = -(-count // lines)
    values = tuple(",".join(names[i : i + chunk]) for i in range(0, count, chunk))
    assume(sum(map(len, values)) <= MAX_REQUEST_HEADERS_LENGTH)
    router = Router(CorsPolicy(CorsSettings(allow_origins=("https://app.example.com",),
                                            allow_headers=("*",))))
    decision = router.decide(RequestView("OPTIONS", "/", ("https://app.example.com",), "GET",
                                         values))
    assert decision.failed == ("headers",) and decision.headers == ()


def test_exactly_the_name_cap_is_allowed():
    names = ",".join(f"x-{i}" for i in range(MAX_REQUEST_HEADER_NAMES))
    router = Router(CorsPolicy(CorsSettings(allow_origins=("https://app.example.com",),
                                            allow_headers=("*",))))
    decision = router.decide(RequestView("OPTIONS", "/", ("https://app.example.com",), "GET",
                                         (names,)))
    assert decision.allowed
    acah = dict(decision.headers)["Access-Control-Allow-Headers"]
    assert acah.split(", ") == names.split(",")
