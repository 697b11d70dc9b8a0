"""The shared table of CORS cases (``tests/cases.yaml``) and the helpers to use it.

One data file drives both the core tests (``test_core_cases.py``: the policy is
parsed as a config file, the request turned into a :class:`RequestView`) and the
end-to-end tests (the policy written into a config file for a real proxy, the
request sent over a socket). Both compare with the same helpers here, so the two
suites cannot drift apart.

Case format (one YAML list item)::

    - name: exact_origin_preflight_allowed      # unique snake_case
      why: the rule or pitfall it covers
      policy: {cors: {...}, routes: [...]}      # the config file's cors/routes
      request:
        method: OPTIONS
        path: /items?q=1                        # raw; default "/"
        headers: [[Origin, https://a.example], ...]   # order kept, names may repeat
      expect:
        kind: preflight                         # core only: preflight|actual|not-cors
        status: 200                             # 200/400/403, or "forwarded"
        headers: {Access-Control-Allow-Origin: ...}   # the FULL Access-Control-* set
        vary: [Origin, ...]
        failed: [origin]                        # optional
        body_startswith: "OK"                   # optional

A ``Host`` header in a case is sent as given (same-origin cases under
``enforce``); without one the listener's address is the Host.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from corsproxy.config import parse_config
from corsproxy.core import Kind, RequestView, Router

CASES_FILE = Path(__file__).with_name("cases.yaml")

#: What ``expect.status`` says for a request the proxy sends upstream.
FORWARDED = "forwarded"

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Values every HTTP client can send and every server receives unchanged: visible
# ASCII, inner spaces and tabs; no leading/trailing whitespace (parsers strip it).
_SENDABLE_VALUE = re.compile(r"(?:[\x21-\x7e](?:[\x20-\x7e\t]*[\x21-\x7e])?)?")
_CASE_KEYS = {"name", "why", "policy", "request", "expect"}
_REQUEST_KEYS = {"method", "path", "headers"}
_EXPECT_KEYS = {"kind", "status", "headers", "vary", "failed", "body_startswith"}
_CHECKS = ("origin", "method", "headers", "private-network")


class CaseTableError(ValueError):
    """``cases.yaml`` holds a case that is not well formed."""


@dataclass(frozen=True)
class CaseRequest:
    """The request of a case, as it goes on the wire."""

    method: str
    path: str
    headers: tuple[tuple[str, str], ...]

    def values(self, name: str) -> tuple[str, ...]:
        """Every value of header ``name`` (case-insensitive), in order."""
        key = name.lower()
        return tuple(v for n, v in self.headers if n.lower() == key)

    def first(self, name: str) -> str | None:
        values = self.values(name)
        return values[0] if values else None

    @property
    def raw_path(self) -> str:
        """The path without the query, still percent-encoded."""
        return self.path.split("?", 1)[0]


@dataclass(frozen=True)
class Expect:
    """What the proxy must answer."""

    kind: Kind
    status: int | str  # 200/400/403 or FORWARDED
    headers: dict[str, str]
    vary: tuple[str, ...]
    failed: tuple[str, ...] | None = None
    body_startswith: str | None = None

    @property
    def forwarded(self) -> bool:
        return self.status == FORWARDED

    @property
    def core_status(self) -> int | None:
        """The status as :class:`corsproxy.core.Decision` spells it (None = forward)."""
        return None if self.forwarded else int(self.status)


@dataclass(frozen=True)
class Case:
    """One named case of the table."""

    name: str
    why: str
    policy: dict[str, Any]
    request: CaseRequest
    expect: Expect
    index: int = field(default=0, compare=False)

    def __str__(self) -> str:
        return self.name

    def config_dict(self, upstream_url: str) -> dict[str, Any]:
        """The whole config file as a mapping: the policy plus ``upstream.url``."""
        config: dict[str, Any] = {"upstream": {"url": upstream_url}}
        config["cors"] = dict(self.policy.get("cors") or {})
        config["routes"] = list(self.policy.get("routes") or [])
        return config

    def config_yaml(self, upstream_url: str) -> str:
        """A complete config file text for this case's policy."""
        header = f"# corsproxy test case {self.name}: {self.why}\n"
        return header + yaml.safe_dump(
            self.config_dict(upstream_url), sort_keys=False, default_flow_style=False
        )

    def router(self) -> Router:
        """The core :class:`Router` built through the real config loader."""
        return _build_router(self.config_yaml("http://127.0.0.1:9"), self.name)

    def host(self, default: str | None = None) -> str | None:
        """The Host the request carries: the case's own Host header, else ``default``."""
        return self.request.first("Host") or default

    def request_view(self, host: str | None = None, scheme: str = "http") -> RequestView:
        """The request as the proxy hands it to the core (``host``: listener address,
        used unless the case sets its own Host header)."""
        req = self.request
        return RequestView(
            method=req.method,
            path=req.raw_path,
            origin=req.values("Origin"),
            request_method=req.first("Access-Control-Request-Method"),
            request_headers=req.values("Access-Control-Request-Headers"),
            request_private_network=req.first("Access-Control-Request-Private-Network"),
            host=self.host(host),
            scheme=scheme,
        )


def _build_router(config_text: str, name: str) -> Router:
    return parse_config(config_text, source=f"cases.yaml[{name}]").router


# -- comparing responses --------------------------------------------------------


def cors_headers(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The ``Access-Control-*`` headers among ``pairs``, names lower-cased.

    A name sent twice is an error (browsers join repeated ACAO and then fail), so
    it raises ``AssertionError`` naming the header.
    """
    found: dict[str, str] = {}
    for name, value in pairs:
        key = name.lower()
        if not key.startswith("access-control-"):
            continue
        assert key not in found, f"{name} sent twice: {found[key]!r} and {value!r}"
        found[key] = value
    return found


def expected_cors_headers(case: Case) -> dict[str, str]:
    """The FULL expected ``Access-Control-*`` set, names lower-cased."""
    return {name.lower(): value for name, value in case.expect.headers.items()}


def vary_names(values: Iterable[str]) -> list[str]:
    """Names listed by one or more ``Vary`` header values, lower-cased, in order."""
    names = []
    for value in values:
        names.extend(n.strip().lower() for n in value.split(",") if n.strip())
    return names


def expected_vary(case: Case) -> list[str]:
    """The Vary names the response must hold (lower-cased); the proxy may merge
    the upstream's own names in, without duplicates."""
    return [n.lower() for n in case.expect.vary]


# -- loading ------------------------------------------------------------------


def load_cases(path: Path = CASES_FILE) -> list[Case]:
    """Read and check the table; raises :class:`CaseTableError` naming the bad case."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(raw, list):
        raise CaseTableError(f"{path}: the file must be a YAML list of cases")
    cases = []
    seen: dict[str, int] = {}
    for index, item in enumerate(raw):
        where = f"{path.name}[{index}]"
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            where += f" ({item['name']})"
        try:
            case = _case(item, index)
        except CaseTableError as exc:
            raise CaseTableError(f"{where}: {exc}") from None
        if case.name in seen:
            raise CaseTableError(f"{where}: name also used by case #{seen[case.name]}")
        seen[case.name] = index
        cases.append(case)
    return cases


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise CaseTableError(message)


def _case(item: Any, index: int) -> Case:
    _need(isinstance(item, dict), "a case must be a mapping")
    _need(set(item) <= _CASE_KEYS, f"unknown keys {sorted(set(item) - _CASE_KEYS)}")
    for key in ("name", "why", "request", "expect"):
        _need(key in item, f"missing {key!r}")
    name, why = item["name"], item["why"]
    _need(isinstance(name, str) and re.fullmatch(r"[a-z0-9_]+", name) is not None,
          "name must be snake_case")
    _need(isinstance(why, str) and why.strip() != "", "why must be a sentence")
    policy = item.get("policy") or {}
    _need(isinstance(policy, dict) and set(policy) <= {"cors", "routes"},
          "policy holds only cors and routes")
    return Case(name, why, policy, _request(item["request"]), _expect(item["expect"]), index)


def _request(raw: Any) -> CaseRequest:
    _need(isinstance(raw, dict), "request must be a mapping")
    _need(set(raw) <= _REQUEST_KEYS, f"request: unknown keys {sorted(set(raw) - _REQUEST_KEYS)}")
    method = raw.get("method")
    _need(isinstance(method, str) and _TOKEN.fullmatch(method) is not None
          and method == method.upper(), "request.method must be an upper-case token")
    path = raw.get("path", "/")
    _need(isinstance(path, str) and path.startswith("/")
          and re.fullmatch(r"[\x21-\x7e]+", path) is not None,
          "request.path must start with / and hold visible ASCII only")
    headers = []
    for pair in raw.get("headers") or []:
        _need(isinstance(pair, list) and len(pair) == 2, f"header {pair!r} must be [name, value]")
        hname, value = pair
        _need(isinstance(hname, str) and _TOKEN.fullmatch(hname) is not None,
              f"header name {hname!r} is not a token")
        _need(isinstance(value, str),
              f"header {hname}: value {value!r} must be a string (quote null/true/*)")
        _need(_SENDABLE_VALUE.fullmatch(value) is not None,
              f"header {hname}: value {value!r} is not sendable unchanged "
              "(visible ASCII, no leading/trailing whitespace)")
        _need(len(value) <= 8000, f"header {hname}: value longer than a server's line limit")
        headers.append((hname, value))
    return CaseRequest(method, path, tuple(headers))


def _expect(raw: Any) -> Expect:
    _need(isinstance(raw, dict), "expect must be a mapping")
    _need(set(raw) <= _EXPECT_KEYS, f"expect: unknown keys {sorted(set(raw) - _EXPECT_KEYS)}")
    for key in ("kind", "status", "headers", "vary"):
        _need(key in raw, f"expect: missing {key!r}")
    kind = Kind(raw["kind"])
    status = raw["status"]
    _need(status in (200, 400, 403, FORWARDED), f"expect.status {status!r}: 200/400/403/forwarded")
    headers = raw["headers"] or {}
    _need(isinstance(headers, dict), "expect.headers must be a mapping")
    for hname, value in headers.items():
        _need(isinstance(hname, str) and hname.lower().startswith("access-control-"),
              f"expect.headers: {hname!r} is not an Access-Control-* header")
        _need(isinstance(value, str), f"expect.headers.{hname}: value must be a string")
    vary = raw["vary"]
    _need(isinstance(vary, list) and all(isinstance(v, str) for v in vary), "expect.vary: names")
    failed = raw.get("failed")
    if failed is not None:
        _need(isinstance(failed, list) and all(f in _CHECKS for f in failed),
              f"expect.failed: a list of {_CHECKS}")
        failed = tuple(failed)
    body = raw.get("body_startswith")
    _need(body is None or isinstance(body, str), "expect.body_startswith must be a string")
    return Expect(kind, status, dict(headers), tuple(vary), failed, body)
