"""Real origins (any host name, the opaque "null" origin) and credentials, judged by Chromium.

Chromium runs with ``--host-resolver-rules=MAP *.test 127.0.0.1``: the page server
answers for every ``*.test`` name, so a page at ``http://app.allowed.test:<port>``
sends that genuine ``Origin``; nothing is forged.
"""

from __future__ import annotations

import pytest

from .browser_harness import COOKIE

pytestmark = pytest.mark.browser


def only(items: list):
    assert len(items) == 1, f"expected exactly one, got {len(items)}: {items}"
    return items[0]


def fetch_from_hosts(world, tab, proxy, hosts: list[str]) -> dict[str, bool]:
    """Open the page under each host name, fetch the proxy; host -> readable?

    Also checks the wire for each: ACAO is exactly that page's origin, or absent.
    """
    results = {}
    for host in hosts:
        origin = world.page_origin(host)
        tab.open(origin + "/")
        got = tab.fetch(f"{proxy.url}/who/{host}")
        assert got.ok or got.error == "TypeError", got
        ex = only(proxy.exchanges(f"/who/{host}"))
        assert ex.request.get("Origin") == origin
        cors = ex.response.cors_header_dict()
        assert cors in ({}, {"Access-Control-Allow-Origin": origin}), cors
        assert got.ok == bool(cors), (host, got, cors)
        results[host] = got.ok
    return results


def test_subdomain_pattern_allows_real_subdomains_and_refuses_look_alikes(world, tab, start_proxy):
    port = world.pages.port
    proxy = start_proxy(cors={"allow_origins": [f"http://*.allowed.test:{port}"]})

    results = fetch_from_hosts(
        world,
        tab,
        proxy,
        [
            "app.allowed.test",
            "a.b.allowed.test",
            "allowed.test",  # the apex is not a subdomain
            "evil-allowed.test",  # no dot boundary
            "allowed.test.evil.test",  # suffix of another name
            "app.allowed.test.evil.test",
        ],
    )

    assert results == {
        "app.allowed.test": True,
        "a.b.allowed.test": True,
        "allowed.test": False,
        "evil-allowed.test": False,
        "allowed.test.evil.test": False,
        "app.allowed.test.evil.test": False,
    }


def test_origin_regex_must_match_the_whole_origin(world, tab, start_proxy):
    proxy = start_proxy(cors={"allow_origin_regex": r"http://[a-z]+\.allowed\.test:[0-9]+"})

    results = fetch_from_hosts(
        world,
        tab,
        proxy,
        ["app.allowed.test", "app.allowed.test.evil.test", "a.b.allowed.test"],
    )

    assert results == {
        "app.allowed.test": True,
        "app.allowed.test.evil.test": False,  # re.match would let this through
        "a.b.allowed.test": False,
    }


def test_exact_origin_allows_only_that_host_and_port(world, tab, start_proxy):
    proxy = start_proxy(cors={"allow_origins": [world.page_origin("app.allowed.test")]})

    results = fetch_from_hosts(
        world, tab, proxy, ["app.allowed.test", "allowed.test", "localhost", "x.app.allowed.test"]
    )

    assert results == {
        "app.allowed.test": True,
        "allowed.test": False,
        "localhost": False,
        "x.app.allowed.test": False,
    }


@pytest.mark.parametrize("null_listed", [False, True])
def test_sandboxed_iframe_null_origin_is_refused_unless_null_is_listed(
    world, upstream, tab, start_proxy, null_listed
):
    origin = world.page_origin()
    allowed = [origin, "null"] if null_listed else [origin]
    proxy = start_proxy(cors={"allow_origins": allowed})
    tab.open(origin)

    framed = tab.fetch_in_frame(proxy.url + "/framed", sandbox="allow-scripts")
    plain = tab.fetch_in_frame(proxy.url + "/plain-frame", sandbox=None)

    assert framed.origin == "null"
    assert plain.ok and plain.origin == origin, plain  # control: same page, no sandbox
    ex = only(proxy.exchanges("/framed"))
    assert ex.request.get("Origin") == "null"
    if null_listed:
        assert framed.ok and framed.status == 200, framed
        assert ex.response.cors_header_dict() == {"Access-Control-Allow-Origin": "null"}
    else:
        assert (framed.ok, framed.error) == (False, "TypeError"), framed
        assert ex.response.cors_header_dict() == {}
    assert only(upstream.requests("/framed")).get("Origin") == "null"


# -- credentials: page at localhost:A, proxy at localhost:B (same site, cookies flow) --


@pytest.mark.parametrize("allow_credentials", [True, False])
def test_credentialed_fetch_is_readable_only_with_allow_credentials(
    world, upstream, tab, start_proxy, allow_credentials
):
    origin = world.page_origin("localhost")
    proxy = start_proxy(cors={"allow_origins": [origin], "allow_credentials": allow_credentials})
    tab.open(origin + "/cookie")  # sets corsproxy_sid on localhost

    got = tab.fetch(proxy.url + "/me", credentials="include")
    anonymous = tab.fetch(proxy.url + "/anon")  # default credentials mode: same-origin

    seen = only(upstream.requests("/me"))
    assert seen.get("Cookie") == COOKIE  # sent either way: CORS blocks reading, not sending
    assert only(upstream.requests("/anon")).get("Cookie") is None
    assert anonymous.ok, anonymous
    ex = only(proxy.exchanges("/me"))
    if allow_credentials:
        assert got.ok and got.status == 200, got
        assert ex.response.cors_header_dict() == {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Credentials": "true",
        }
    else:
        assert (got.ok, got.error) == (False, "TypeError"), got
        assert ex.response.cors_header_dict() == {"Access-Control-Allow-Origin": origin}


def test_the_preflight_carries_no_cookie_but_the_credentialed_put_does(
    world, upstream, tab, start_proxy
):
    origin = world.page_origin("localhost")
    proxy = start_proxy(
        cors={
            "allow_origins": [origin],
            "allow_methods": ["PUT"],
            "allow_headers": ["X-Custom"],
            "allow_credentials": True,
        }
    )
    tab.open(origin + "/cookie")

    got = tab.fetch(
        proxy.url + "/profile",
        method="PUT",
        headers={"X-Custom": "1"},
        body="name=x",
        credentials="include",
    )

    assert got.ok and got.status == 200, got
    pre, put = proxy.exchanges("/profile")
    assert pre.is_preflight
    assert pre.request.get("Cookie") is None
    assert pre.response.cors_header_dict() == {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Methods": "PUT",
        "Access-Control-Allow-Headers": (
            "Accept, Accept-Language, Content-Language, Content-Type, X-Custom"
        ),
        "Access-Control-Max-Age": "600",
        "Access-Control-Allow-Credentials": "true",
    }
    assert put.request.get("Cookie") == COOKIE
    assert put.response.cors_header_dict() == {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Credentials": "true",
    }
    assert only(upstream.requests("/profile")).get("Cookie") == COOKIE
