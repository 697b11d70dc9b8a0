"""Unit tests for the core's building blocks and its words: header-list parsing,
route selection, verdicts, and the reason lines users read in 400/403 bodies,
logs and ``corsproxy explain``."""

import re

import pytest

from corsproxy.core import (
    MAX_ORIGIN_LENGTH,
    MAX_REQUEST_HEADERS_LENGTH,
    CorsPolicy,
    CorsSettings,
    Kind,
    RequestView,
    Router,
    compile_origin_regex,
    is_token,
    parse_header_list,
)

APP = "https://app.example.com"


def router(**fields):
    fields.setdefault("allow_origins", (APP,))
    return Router(CorsPolicy(CorsSettings(**fields)))


def preflight(origin=APP, method="GET", headers=(), pn=None, path="/"):
    return RequestView("OPTIONS", path, (origin,), method, tuple(headers), pn)


# -- Access-Control-Request-Headers parsing -------------------------------------


@pytest.mark.parametrize(
    ("lines", "names"),
    [
        ([], []),
        ([""], []),
        ([" , ,, "], []),
        (["content-type,x-a,x-b"], ["content-type", "x-a", "x-b"]),
        (["X-A ,\tx-b"], ["X-A", "x-b"]),
        (["x-a", "x-b, X-A"], ["x-a", "x-b"]),
        (["X-Trace, x-trace, X-TRACE"], ["X-Trace"]),
        ([",x-a,"], ["x-a"]),
    ],
)
def test_parse_header_list_accepts(lines, names):
    assert parse_header_list(lines) == (names, None)


@pytest.mark.parametrize(
    ("lines", "words"),
    [
        (["x a"], '"x a" is not a valid header name'),
        (["x-a, x:y"], '"x:y" is not a valid header name'),
        (['"x-a"'], "is not a valid header name"),
        (["x-\u00e9"], "is not a valid header name"),
        (["x-\udcff"], "is not a valid header name"),
        (["a" * (MAX_REQUEST_HEADERS_LENGTH + 1)], "longer than 8192 characters"),
        (["x-a,"] * 2100, "longer than 8192 characters"),
        ([",".join(f"h{i}" for i in range(257))], "more than 256 names"),
    ],
)
def test_parse_header_list_refuses(lines, words):
    names, error = parse_header_list(lines)
    assert names == []
    assert error.startswith("headers: ") and words in error


def test_invalid_name_is_cut_in_the_reason():
    _, error = parse_header_list(["x " + "a" * 5000])
    assert "(cut; 5002 characters)" in error and len(error) < 200


@pytest.mark.parametrize("value", ["GET", "patch", "X-Api-Key", "!#$%&'*+-.^_`|~"])
def test_tokens(value):
    assert is_token(value)


@pytest.mark.parametrize("value", ["", "GET PUT", "a,b", "a:b", "\u00e9", "a\r\n", "(x)"])
def test_not_tokens(value):
    assert not is_token(value)


# -- policy construction ------------------------------------------------------


def test_star_with_credentials_is_refused_by_the_core_too():
    with pytest.raises(ValueError, match="cannot be combined with allow_credentials"):
        CorsPolicy(CorsSettings(allow_origins=("*",), allow_credentials=True))


def test_regex_is_full_match_and_survives_a_backtracking_pattern():
    assert compile_origin_regex(r"https://[a-z]+\.example\.com").fullmatch("https://a.example.com")
    slow_in_re = compile_origin_regex(r"https://(a+)+\.example\.com")
    assert slow_in_re.fullmatch("https://" + "a" * 200 + ".example.org") is None


def test_regex_outside_re2_syntax_is_refused_with_the_reason():
    # A look-around would have to run on backtracking Python re: refused (ReDoS).
    with pytest.raises(re.error, match=r"RE2 cannot run this pattern .*look-arounds"):
        compile_origin_regex(r"(?=https)https://x")


def test_invalid_regex_raises():
    with pytest.raises(re.error):
        compile_origin_regex("https://(")


# -- routes -------------------------------------------------------------------


def test_router_reports_the_route_as_written():
    top = CorsPolicy(CorsSettings())
    routed = CorsPolicy(CorsSettings(allow_origins=("*",)))
    r = Router(top, [("/public/", routed), ("/", top)])
    assert r.select("/public") == ("/public/", routed)
    assert r.select("/public/x") == ("/public/", routed)
    assert r.select("/publicity") == ("/", top)
    assert r.decide(RequestView("GET", "/public/x", ("https://a.example",))).route == "/public/"
    assert r.decide(RequestView("GET", "/public/x")).route == "/public/"


def test_no_routes_means_no_route():
    assert router().decide(RequestView("GET", "/x", (APP,))).route is None


# -- verdicts and words -----------------------------------------------------------


def test_verdicts():
    r = router(enforce=True)
    assert r.decide(RequestView("GET")).verdict == "not-cors"
    assert r.decide(RequestView("GET", "/", (APP,))).verdict == "allowed"
    assert r.decide(RequestView("GET", "/", ("https://evil.example",))).verdict == "rejected"
    assert r.decide(preflight("https://evil.example")).verdict == "denied"
    assert router().decide(RequestView("GET", "/", ("https://evil.example",))).verdict == "denied"


def test_denied_preflight_body_lists_checks_then_one_reason_per_check():
    d = router(allow_methods=("GET",)).decide(
        preflight("https://evil.example", "DELETE", ["x-secret"], "true")
    )
    lines = d.body.split("\n")
    assert lines[0] == "Disallowed CORS origin, method, headers, private-network"
    assert lines[1] == ""
    assert lines[2:6] == list(d.reasons)
    assert d.body.endswith("\n")
    assert d.reasons == (
        'origin: "https://evil.example" is not allowed by allow_origins or allow_origin_regex',
        'method: "DELETE" is not in allow_methods (GET); methods compare case-sensitively',
        'headers: "x-secret" not in allow_headers (none; Accept, Accept-Language, '
        "Content-Language and Content-Type are always allowed)",
        "private-network: Access-Control-Request-Private-Network is true "
        "but allow_private_network is false",
    )


def test_allowed_preflight_reasons_name_each_rule():
    d = router(allow_headers=("X-A",), allow_private_network=True).decide(
        preflight(headers=["x-a"], pn="true")
    )
    assert d.allowed and d.body == "OK" and d.failed == ()
    assert d.reasons == (
        'origin: "https://app.example.com" is allowed by allow_origins',
        'method: "GET" is in allow_methods',
        "headers: every requested header is allowed",
        "private-network: allowed by allow_private_network",
    )


def test_origin_reasons_say_which_rule_matched():
    r = Router(CorsPolicy(CorsSettings(
        allow_origins=("https://*.example.com",), allow_origin_regex=r"https://[a-z]+\.test"
    )))
    assert r.decide(RequestView("GET", "/", ("https://a.example.com",))).reasons == (
        'origin: "https://a.example.com" is allowed by pattern "https://*.example.com"',
    )
    assert r.decide(RequestView("GET", "/", ("https://a.test",))).reasons == (
        'origin: "https://a.test" is allowed by allow_origin_regex',
    )


def test_port_wildcard_reason_names_the_pattern():
    r = router(allow_origins=("http://localhost:*", "https://*.example.com:*"))
    assert r.decide(RequestView("GET", "/", ("http://localhost:5173",))).reasons == (
        'origin: "http://localhost:5173" is allowed by pattern "http://localhost:*"',
    )
    assert r.decide(RequestView("GET", "/", ("https://a.b.example.com:8443",))).reasons == (
        'origin: "https://a.b.example.com:8443" is allowed by pattern "https://*.example.com:*"',
    )


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("http://localhost:1", True),
        ("http://localhost:5173", True),
        ("http://localhost:65535", True),
        ("http://localhost", False),
        ("http://localhost:", False),
        ("http://localhost:0", False),
        ("http://localhost:080", False),
        ("http://localhost:65536", False),
        ("http://localhost:99999", False),
        ("http://localhost:123456", False),
        ("http://localhost:80", False),  # the default port: a browser never writes it
        ("http://localhost:+80", False),
        ("http://localhost:8O", False),
        ("http://localhost:5173:5173", False),
        ("http://localhost:5173/", False),
        ("http://localhost.evil.com:80", False),
        ("http://evil.localhost:3000", False),
        ("http://localhost@evil.com:3000", False),
        ("https://localhost:5173", False),
        ("http://LOCALHOST:5173", False),
    ],
)
def test_port_wildcard_takes_ports_as_browsers_write_them(origin, allowed):
    policy = CorsPolicy(CorsSettings(allow_origins=("http://localhost:*",)))
    assert (policy.match_origin(origin) is not None) is allowed


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("https://a.example.com:8443", True),
        ("https://a.b.example.com:1", True),
        ("https://example.com:8443", False),
        ("https://a.example.com", False),
        ("https://a.example.com:443", False),
        ("https://.example.com:8443", False),
        ("https://a.example.com.evil.net:8443", False),
        ("https://evil-example.com:8443", False),
        ("http://a.example.com:8443", False),
    ],
)
def test_subdomain_port_wildcard(origin, allowed):
    policy = CorsPolicy(CorsSettings(allow_origins=("https://*.example.com:*",)))
    assert (policy.match_origin(origin) is not None) is allowed


def test_regex_list_matches_when_any_pattern_matches_in_full():
    policy = CorsPolicy(CorsSettings(
        allow_origin_regex=(r"(?i)https://app\.example\.io", r"https://[a-z]+\.example\.org"),
    ))
    assert policy.match_origin("https://APP.example.io") == "allow_origin_regex"
    assert policy.match_origin("https://docs.example.org") == "allow_origin_regex"
    # The flag stays in its own pattern; each pattern is anchored as a whole.
    assert policy.match_origin("https://DOCS.example.org") is None
    assert policy.match_origin("https://app.example.io.example.org") is None
    assert policy.match_origin("https://docs.example.org.evil.net") is None


def test_origin_regex_setting_accepts_the_old_single_string():
    assert CorsSettings(allow_origin_regex="x").allow_origin_regex == ("x",)
    assert CorsSettings(allow_origin_regex=None).allow_origin_regex == ()
    assert CorsSettings(allow_origin_regex="").allow_origin_regex == ()
    assert CorsSettings(allow_origin_regex=["a", "b"]).allow_origin_regex == ("a", "b")
    assert CorsSettings(allow_origin_regex="x") == CorsSettings(allow_origin_regex=("x",))


def test_regex_list_still_matches_when_re2_refuses_the_joined_alternation(monkeypatch):
    """The one-alternation form is an optimisation: if RE2 refuses it (its memory
    budget), the patterns run one by one with the same answers."""
    import corsproxy.core as core

    real = core._re2.compile

    def no_alternation(pattern, *args):
        if ")|(?:" in pattern:
            raise core._re2.error("pattern too large")
        return real(pattern, *args)

    monkeypatch.setattr(core._re2, "compile", no_alternation)
    policy = CorsPolicy(CorsSettings(allow_origin_regex=(r"https://a\.test", r"https://b\.test")))
    assert policy.match_origin("https://b.test") == "allow_origin_regex"
    assert policy.match_origin("https://c.test") is None


def test_an_invalid_pattern_in_a_regex_list_is_refused():
    with pytest.raises(re.error):
        CorsPolicy(CorsSettings(allow_origin_regex=(r"https://a\.test", "https://(")))


def test_two_origin_lines_reason():
    d = router().decide(RequestView("GET", "/", (APP, APP)))
    assert d.reasons == ("origin: the request has 2 Origin headers; one is allowed",)


def test_overlong_origin_reason_is_cut():
    origin = "https://" + "a" * 400 + ".example.com"
    d = router(allow_origins=("https://*.example.com",)).decide(RequestView("GET", "/", (origin,)))
    (reason,) = d.reasons
    assert f"is longer than {MAX_ORIGIN_LENGTH} characters" in reason
    assert "(cut; 420 characters)" in reason and len(reason) < 250


def test_empty_origin_reason():
    d = router().decide(RequestView("GET", "/", ("",)))
    assert d.reasons == ("origin: the Origin header is empty",)


def test_null_origin_is_not_matched_by_a_catch_all_regex():
    d = router(allow_origins=(), allow_origin_regex=".*").decide(RequestView("GET", "/", ("null",)))
    assert not d.allowed and d.headers == ()


def test_enforce_body_names_origin_reason_and_fix():
    top = CorsPolicy(CorsSettings(allow_origins=(APP,)))
    pay = CorsPolicy(CorsSettings(allow_origins=(APP,), enforce=True))
    r = Router(top, [("/payments", pay)])
    d = r.decide(RequestView("POST", "/payments/x", ("https://evil.example",)))
    assert d.status == 403 and d.kind is Kind.ACTUAL
    assert d.body == (
        'Forbidden: cross-origin request from origin "https://evil.example" refused by '
        "corsproxy (enforce: true).\n"
        'origin: "https://evil.example" is not allowed by allow_origins or allow_origin_regex\n'
        "To allow it, add the origin to routes[path=/payments].cors.allow_origins in the "
        "proxy's config.\n"
    )
    top_level = router(enforce=True).decide(RequestView("POST", "/", ("https://evil.example",)))
    assert "add the origin to cors.allow_origins" in top_level.body


def test_same_origin_needs_the_listener_scheme():
    r = router(enforce=True)
    req = RequestView("POST", "/", ("https://api.example.com",), host="api.example.com:443",
                      scheme="https")
    d = r.decide(req)
    assert d.allowed and d.status is None and d.headers == ()
    assert d.reasons == (
        'origin: "https://api.example.com" is the proxy\'s own origin (same-origin request)',
    )


def test_same_origin_without_host_is_cross_origin():
    d = router(enforce=True).decide(RequestView("POST", "/", ("http://api.example.com",)))
    assert d.status == 403


def test_bodies_stay_small_on_huge_inputs():
    huge = "x" * 100_000
    r = router(enforce=True)
    assert len(r.decide(preflight(huge, huge, [huge], huge)).body) < 1000
    assert len(r.decide(RequestView("GET", "/", (huge, huge))).body) < 1000


@pytest.mark.parametrize(
    ("pattern", "fix"),
    [
        (r"https://[a-z]{,8}\.example\.com", "write '{0,n}'"),
        (r"https://[[:alpha:]]+\.example\.com", "write the characters out"),
    ],
)
def test_regex_that_means_something_else_in_re2_is_refused(pattern, fix):
    with pytest.raises(re.error, match=re.escape(fix)):
        compile_origin_regex(pattern)
