"""The Vary case: Chromium's HTTP cache must not replay a navigation's copy to fetch().

The upstream's ``/naive-cacheable`` sends ``Cache-Control: public, max-age=600``,
echoes Origin into ACAO when there is one, and sends no ``Vary``. A top-level
navigation to it (no Origin, so no ACAO) fills the cache; a later cross-origin
``fetch()`` of the same URL from a page on the same site shares that cache
partition. Through corsproxy (``Vary: Origin`` on every response) the fetch must
go to the network and succeed; the control shows that without ``Vary`` Chromium
replays the cached copy and the fetch fails, so the main test can tell.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.browser


def only(items: list):
    assert len(items) == 1, f"expected exactly one, got {len(items)}: {items}"
    return items[0]


def test_fetch_after_navigating_to_a_cacheable_proxied_url_succeeds(
    world, upstream, tab, start_proxy
):
    origin = world.page_origin("localhost")
    proxy = start_proxy(cors={"allow_origins": [origin]})
    url = proxy.url + "/naive-cacheable"

    assert tab.open(url) == 200  # plain navigation: no Origin, cached for 600 s
    tab.open(origin + "/")
    got = tab.fetch(url)

    assert got.ok and got.status == 200, got
    navigation, fetched = proxy.exchanges("/naive-cacheable")
    assert navigation.request.get("Origin") is None
    assert navigation.response.cors_header_dict() == {}
    assert navigation.response.vary() == ["Origin"]
    assert navigation.response.get("Cache-Control") == "public, max-age=600"
    assert fetched.request.get("Origin") == origin
    assert fetched.response.cors_header_dict() == {"Access-Control-Allow-Origin": origin}
    assert fetched.response.vary() == ["Origin"]
    copies = [s.get("Origin") for s in upstream.requests("/naive-cacheable")]
    assert copies == [None, origin]
    assert got.body != navigation.response.body.decode()  # a fresh copy, not the cached one


def test_control_without_vary_chromium_replays_the_navigation_copy_and_fetch_fails(
    world, upstream, tab
):
    origin = world.page_origin("localhost")
    url = f"http://localhost:{upstream.port}/naive-cacheable"  # straight to the naive upstream

    assert tab.open(url) == 200
    tab.open(origin + "/")
    got = tab.fetch(url)

    assert (got.ok, got.error) == (False, "TypeError"), got
    # The fetch never reached the upstream: the cached copy (no ACAO) was replayed.
    assert [s.get("Origin") for s in upstream.requests("/naive-cacheable")] == [None]
