"""``corsproxy test``: check a config's CORS policy against a file of expectations.

::

    corsproxy test --config config/production.yaml config/policy-tests.yaml [--junit FILE]

Every case is one request a browser would send, decided by the same core as
``corsproxy explain`` (:func:`corsproxy.explain.request_view`, then
``config.router.decide()``, rendered by :func:`corsproxy.explain.explain_json`),
and compared with what the case expects. Nothing listens and nothing is
forwarded: this is a policy test, fast enough for every commit (a CI gate next to
``corsproxy check``).

The case file
-------------

YAML: a list of cases, or a mapping whose only key is ``cases`` holding that list
(either way problems are reported as ``cases[3].expect``, counting from 0)::

    - name: the app reads the API with cookies     # required, unique, one line
      origin: https://app.example.com              # required: the Origin header
      method: GET                                  # default: OPTIONS with request_method, else GET
      path: /users                                 # default /; picks the route
      expect: allowed                              # required: allowed or denied
      headers:                                     # optional, exact values
        Access-Control-Allow-Origin: https://app.example.com
        Access-Control-Allow-Credentials: "true"   # values are strings: quote true, 7200
        Access-Control-Allow-Private-Network: null # null: the header must be absent

    - name: a header the API does not allow is refused
      origin: https://app.example.com
      request_method: PUT                          # makes it a preflight (OPTIONS)
      request_headers: [Authorization, X-Debug]    # a list, or one comma list "A, B"
      expect: denied

Keys of a case:

- ``name`` (required): a string, unique in the file, one line of printable text.
- ``origin`` (required): the ``Origin`` header, a string; ``"null"`` (quoted) is
  the opaque origin of sandboxed iframes and ``file:`` pages.
- ``method``: the request method (a token); default ``OPTIONS`` when
  ``request_method`` is given, else ``GET``.
- ``path``: the raw request path, starting with ``/`` (a query is ignored); default ``/``.
- ``request_method``: ``Access-Control-Request-Method``; makes the request a preflight.
- ``request_headers``: ``Access-Control-Request-Headers``, one comma list or a list of names.
- ``request_private_network``: ``true`` sends ``Access-Control-Request-Private-Network: true``.
- ``host``: the ``Host`` header (the same-origin test under ``enforce`` uses it).
- ``websocket``: ``true`` makes it a WebSocket handshake (a GET, no ``request_method``).
- ``expect`` (required): ``allowed`` (the decision allows it: a preflight answered
  200, an actual request forwarded with ``Access-Control-Allow-Origin`` or as
  same-origin, a handshake forwarded) or ``denied`` (a preflight answered 400, an
  actual request forwarded without CORS headers or refused with 403 under
  ``enforce``, a handshake refused with 403).
- ``headers``: a mapping of header name to its exact expected value (a string) or
  ``null`` (the header must be absent). Names are case-insensitive; only the
  headers corsproxy decides can be checked: ``Access-Control-*`` and ``Vary``
  (``Vary`` is corsproxy's part of it: the upstream's names are merged in at run time).
  Headers not listed are not checked.

Types are strict, as in the config file: ``expect: "allowed"`` and ``expect:
allowed`` are the same string, but ``websocket: "true"`` is not a boolean and a
header value ``7200`` must be written ``"7200"``. Unknown keys, duplicate keys
in a mapping, duplicate case names and an empty file are errors. Anchors,
aliases and ``<<`` merge keys work (e.g. one ``headers`` mapping shared by many
cases). A case file is at most 10 MiB and 100000 cases.

A case on a ``report_only`` policy is checked against what the policy would
answer if it enforced (corsproxy forwards such requests whatever the verdict); the
output notes it and it passes or fails like any other case.

Output and exit codes
---------------------

One line per case on stdout, ``PASS name`` or ``FAIL name``; under each failure
the request, the expected and the actual verdict, the decision's reasons and the
headers that differ. The last line is ``N cases: P passed, F failed (CONFIG against
CASES)``.

- 0: every case passed; 1: at least one failed;
- 2: the run could not be made: bad arguments, a case file that is missing,
  unreadable or invalid (every problem on stderr, one ``FILE: cases[3].key: what is
  wrong, and how to fix it`` line each; no case runs), a ``--config`` that is
  missing or unusable (its ``ConfigError`` lines on stderr: 2 and not 1, so that 1
  always means "the policy does not do what the cases say"), or a ``--junit``
  report that can't be written.

``--junit FILE`` also writes a JUnit XML report (one ``testsuite`` named
``corsproxy policy tests``, one ``testcase`` per case with the case file's name as
``classname``, a ``failure`` element holding the same text as the terminal), on
every run that runs the cases, atomically (a temporary file in the same
directory, then ``os.replace``). Its directory is checked before any case runs.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import os
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from ._args import ENV_CONFIG
from ._config_messages import _describe, _path
from ._config_yaml import Loc, _yaml_error
from .config import Config, ConfigError, load_config
from .core import Decision, Kind, RequestView, is_token
from .explain import explain_json, request_view

__all__ = [
    "MAX_CASES",
    "MAX_FILE_BYTES",
    "Case",
    "CaseFileError",
    "CaseResult",
    "cmd_test",
    "failure_lines",
    "junit_report",
    "parse_cases",
    "read_cases",
    "run_case",
]

#: Largest case file read, in bytes (10 MiB).
MAX_FILE_BYTES = 10 * 1024 * 1024
#: Most cases in one file.
MAX_CASES = 100_000
#: Most YAML values visited, aliases counted every time they are used: bounds the
#: work an alias bomb (a list of aliases of lists of aliases...) can cause.
MAX_YAML_NODES = 5_000_000
#: Deepest nesting of YAML values (a case file needs 5; a cycle of aliases has no end).
MAX_YAML_DEPTH = 64
#: The keys of a case, in the order the docs list them.
CASE_KEYS = (
    "name", "origin", "method", "path", "request_method", "request_headers",
    "request_private_network", "host", "websocket", "expect", "headers",
)
EXPECT = ("allowed", "denied")
SUITE_NAME = "corsproxy policy tests"
_STRING_KEYS = ("method", "path", "request_method", "host")
_BOOL_KEYS = ("request_private_network", "websocket")
_EXAMPLES = {
    "name": "name: the app reads the API",
    "origin": "origin: https://app.example.com",
    "method": "method: POST",
    "path": "path: /users",
    "request_method": "request_method: PUT",
    "request_headers": "request_headers: [Authorization, X-Request-Id]",
    "request_private_network": "request_private_network: true",
    "host": "host: api.example.com",
    "websocket": "websocket: true",
    "expect": "expect: allowed",
    "headers": "headers: {Access-Control-Allow-Origin: https://app.example.com}",
}


# ---------------------------------------------------------------------------
# The case file
# ---------------------------------------------------------------------------


class CaseFileError(Exception):
    """The case file can't be used; ``errors`` holds every problem, one line each
    (``FILE: cases[3].expect: what is wrong, and how to fix it``)."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


@dataclass(frozen=True)
class Case:
    """One validated case. ``headers``: (name as written, value or None for absent)."""

    name: str
    origin: str
    expect: str
    index: int = 0
    method: str | None = None
    path: str = "/"
    request_method: str | None = None
    request_headers: str | tuple[str, ...] | None = None
    request_private_network: bool = False
    host: str | None = None
    websocket: bool = False
    headers: tuple[tuple[str, str | None], ...] = ()


@dataclass
class _Tree:
    """A parsed case file: the data, the YAML node tree (for positions, looked up
    only for the locations that have a problem) and the duplicate keys."""

    data: Any
    root: yaml.Node | None
    prefix: Loc  # ("cases",) when the file is a bare list: its items are cases[i]
    duplicates: list[tuple[Loc, str]] = field(default_factory=list)


class _TooLarge(Exception):
    """The YAML expands to more than :data:`MAX_YAML_NODES` values, or nests deeper
    than :data:`MAX_YAML_DEPTH`; the message says which."""


def _scan(root: yaml.Node, prefix: Loc, duplicates: list[tuple[Loc, str]]) -> None:
    """Find keys written twice in one mapping, visiting at most MAX_YAML_NODES
    values (an alias counts each time it is used, so a cycle or a bomb stops)."""
    stack: list[tuple[yaml.Node, Loc]] = [(root, prefix)]
    visited = 0
    reported: set[int] = set()
    while stack:
        node, loc = stack.pop()
        visited += 1
        if visited > MAX_YAML_NODES:
            raise _TooLarge(f"the file expands to more than {MAX_YAML_NODES} YAML values "
                            f"(every use of an alias counts); write the cases out or split "
                            f"the file")
        if len(loc) > MAX_YAML_DEPTH:
            raise _TooLarge(f"values are nested more than {MAX_YAML_DEPTH} levels deep (or "
                            f"an alias refers to itself); flatten it")
        if isinstance(node, yaml.SequenceNode):
            stack.extend((item, (*loc, i)) for i, item in enumerate(node.value))
        elif isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    line = key.start_mark.line + 1
                    if key.value in seen and id(key) not in reported:
                        reported.add(id(key))
                        duplicates.append(((*loc, key.value), (
                            f"written twice (lines {seen[key.value]} and {line}); YAML keeps "
                            f"only the last one, so remove one or merge them")))
                    seen.setdefault(key.value, line)
                stack.append((value, (*loc, key.value)))


def _parse_yaml(text: str, source: str) -> _Tree:
    """Parse ``text`` (raises CaseFileError for a syntax error or an alias bomb)."""
    loader = None
    try:
        loader = yaml.SafeLoader(text)
        root = loader.get_single_node()
        prefix: Loc = ("cases",) if isinstance(root, yaml.SequenceNode) else ()
        tree = _Tree(None, root, prefix)
        if root is not None:
            _scan(root, prefix, tree.duplicates)
            tree.data = loader.construct_document(root)
    except yaml.YAMLError as e:
        raise CaseFileError([_yaml_error(source, e, text)]) from None
    except RecursionError:
        raise CaseFileError(
            [f"{source}: YAML: the document is nested too deeply; flatten it"]) from None
    except _TooLarge as e:
        raise CaseFileError([f"{source}: top level: {e}"]) from None
    finally:
        if loader is not None:
            loader.dispose()
    return tree


def _position(tree: _Tree, loc: Loc) -> tuple[int, int]:
    """(line, column) of the deepest node found along ``loc``; (-1, -1) if none."""
    node, best = tree.root, (-1, -1)
    parts = loc[len(tree.prefix):] if loc[: len(tree.prefix)] == tree.prefix else loc
    for part in parts:
        child = None
        if isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            child = node.value[part] if 0 <= part < len(node.value) else None
        elif isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value == part:
                    best = (key.start_mark.line, key.start_mark.column)
                    child = value
                    break
        if child is None:
            break
        node = child
        best = (node.start_mark.line, node.start_mark.column) if isinstance(part, int) else best
    return best


Problems = list[tuple[Loc, str]]
Headers = tuple[tuple[str, str | None], ...]


def _top_level(data: Any) -> tuple[Any, Problems]:
    """The raw list of cases (maybe not a list) and the top level's own problems."""
    if data is None:
        return None, [((), "the file is empty; write a list of cases, for example: "
                          "[{name: app, origin: https://app.example.com, expect: allowed}]")]
    if isinstance(data, list):
        return data, []
    if not isinstance(data, dict):
        return None, [((), f"expected a list of cases (or a mapping with cases: [...]), got "
                          f"{_describe(data)}")]
    problems: Problems = [((key,), "unknown key; the top level holds only cases: [...] (or is "
                                   "the list of cases itself)") for key in data if key != "cases"]
    if "cases" not in data:
        problems.append((("cases",), "is missing; write the cases as a list under cases:, or "
                                     "make the whole file that list"))
    return data.get("cases"), problems


def _case_list(tree: _Tree) -> tuple[list[Any], Problems]:
    """The list of raw cases and the problems of the file's top level."""
    items, problems = _top_level(tree.data)
    if problems and items is None:
        return [], problems
    if items is not None and not isinstance(items, list):
        return [], [*problems, (("cases",), f"expected a list of cases, got {_describe(items)}")]
    if not items:
        return [], [*problems, (("cases",), "no cases; add at least one (name, origin and "
                                            "expect)")]
    if len(items) > MAX_CASES:
        return [], [*problems, (("cases",), f"{len(items)} cases; one file holds at most "
                                            f"{MAX_CASES}: split it into several files")]
    return items, problems


def _string(value: Any, key: str) -> str | None:
    """The problem with a value that must be a string, or None."""
    if isinstance(value, str):
        return None
    return f"expected a string, got {_describe(value)}; for example: {_EXAMPLES[key]}"


def _header_value(loc: Loc, value: Any) -> Problems:
    if value is None or isinstance(value, str):
        return []
    if isinstance(value, bool | int | float):
        shown = json.dumps(value)
        fix = f'; write it in quotes: "{shown}"'
    else:
        fix = "; write the exact header value, or null for absent"
    return [(loc, f"expected the header's exact value as a string (or null: must be absent), "
                  f"got {_describe(value)}{fix}")]


def _header_name(loc: Loc, name: Any, seen: dict[str, str]) -> Problems:
    if not isinstance(name, str) or not is_token(name):
        return [(loc[:-1], f"{_describe(name)} is not a header name; write it as a response "
                           f"carries it, e.g. Access-Control-Allow-Origin")]
    key = name.lower()
    if not (key.startswith("access-control-") or key == "vary"):
        return [(loc, "corsproxy decides only the Access-Control-* headers and Vary; the "
                      "others come from the upstream, so remove it")]
    if key in seen:
        return [(loc, f"the same header as {seen[key]} (header names are case-insensitive); "
                      f"keep one")]
    seen[key] = name
    return []


def _headers(loc: Loc, value: Any) -> tuple[Problems, Headers]:
    """The problems of a case's ``headers`` and the (name, value) pairs."""
    if not isinstance(value, dict):
        return [(loc, f"expected a mapping of header name to exact value, got "
                      f"{_describe(value)}; for example: {_EXAMPLES['headers']}")], ()
    problems: Problems = []
    seen: dict[str, str] = {}
    for name, header_value in value.items():
        problems += _header_name((*loc, name), name, seen)
        problems += _header_value((*loc, name), header_value)
    return problems, tuple(value.items())


def _request_headers(loc: Loc, value: Any) -> Problems:
    if isinstance(value, str):
        return []
    if isinstance(value, list):
        return [((*loc, i), f"expected a header name (a string), got {_describe(item)}")
                for i, item in enumerate(value) if not isinstance(item, str)]
    return [(loc, f"expected a comma list or a list of header names, got {_describe(value)}; "
                  f"for example: {_EXAMPLES['request_headers']}")]


def _keys(loc: Loc, raw: dict[Any, Any]) -> Problems:
    """Unknown keys and missing required ones."""
    problems: Problems = []
    for key in raw:
        if key in CASE_KEYS:
            continue
        hint = difflib.get_close_matches(str(key), CASE_KEYS, n=1)
        maybe = f"did you mean {hint[0]}? " if hint else ""
        if isinstance(key, str):
            problems.append(((*loc, key), f"unknown key; {maybe}allowed keys here: "
                                          f"{', '.join(CASE_KEYS)}"))
        else:
            problems.append((loc, f"{_describe(key)} is not a valid key; allowed keys here: "
                                  f"{', '.join(CASE_KEYS)}"))
    for key in ("name", "origin", "expect"):
        if key not in raw:
            problems.append(((*loc, key), f"is missing; add it, for example: {_EXAMPLES[key]}"))
    return problems


def _types(loc: Loc, raw: dict[Any, Any]) -> Problems:
    """Values of the wrong type (strings, booleans, request_headers)."""
    problems: Problems = []
    for key in ("name", "origin", *_STRING_KEYS):
        if key not in raw:
            continue
        if key == "origin" and raw[key] is None:
            problems.append(((*loc, key), 'got null; for the "null" origin (sandboxed '
                                          'iframes, file: pages) write it in quotes: "null"'))
        elif problem := _string(raw[key], key):
            problems.append(((*loc, key), problem))
    for key in _BOOL_KEYS:
        if key in raw and not isinstance(raw[key], bool):
            problems.append(((*loc, key), f"expected true or false, got {_describe(raw[key])}"))
    if "request_headers" in raw:
        problems += _request_headers((*loc, "request_headers"), raw["request_headers"])
    return problems


def _values(loc: Loc, raw: dict[Any, Any]) -> Problems:
    """Values of the right type that still can't be used."""
    problems: Problems = []
    name, method, path = raw.get("name"), raw.get("method"), raw.get("path")
    if isinstance(name, str) and (not name.strip() or not name.isprintable()):
        problems.append(((*loc, "name"), f"{_describe(name)} is not one line of printable "
                                         f"text; for example: {_EXAMPLES['name']}"))
    if isinstance(method, str) and not is_token(method):
        problems.append(((*loc, "method"), f"{_describe(method)} is not a method name; "
                                           f"for example: {_EXAMPLES['method']}"))
    if isinstance(path, str) and not path.startswith("/"):
        problems.append(((*loc, "path"), f"{_describe(path)} must start with /; for "
                                         f"example: {_EXAMPLES['path']}"))
    if raw.get("websocket") is True and raw.get("request_method") is not None:
        problems.append(((*loc, "request_method"), "a WebSocket handshake is a GET without "
                                                   "Access-Control-Request-Method; remove "
                                                   "request_method (or websocket: true)"))
    if raw.get("websocket") is True and method not in (None, "GET"):
        problems.append(((*loc, "method"), "a WebSocket handshake is a GET; remove method (or "
                                           "websocket: true)"))
    expect = raw.get("expect", "allowed")
    if not isinstance(expect, str) or expect not in EXPECT:
        hint = "; a 403 counts as denied" if expect == "rejected" else ""
        problems.append(((*loc, "expect"), f"expected allowed or denied, got "
                                           f"{_describe(expect)}{hint}"))
    return problems


def _case(index: int, raw: dict[str, Any], headers: Headers) -> Case:
    request_headers = raw.get("request_headers")
    return Case(
        name=raw["name"], origin=raw["origin"], expect=raw["expect"], index=index,
        method=raw.get("method"), path=raw.get("path", "/"),
        request_method=raw.get("request_method"),
        request_headers=(tuple(request_headers) if isinstance(request_headers, list)
                         else request_headers),
        request_private_network=raw.get("request_private_network", False),
        host=raw.get("host"), websocket=raw.get("websocket", False), headers=headers,
    )


def _check_cases(items: list[Any]) -> tuple[list[Case], Problems]:
    cases: list[Case] = []
    problems: Problems = []
    names: dict[str, int] = {}
    for i, raw in enumerate(items):
        loc: Loc = ("cases", i)
        if not isinstance(raw, dict):
            problems.append((loc, f"expected a mapping with name, origin and expect, got "
                                  f"{_describe(raw)}; for example: {{name: app, origin: "
                                  f"https://app.example.com, expect: allowed}}"))
            continue
        found = _keys(loc, raw) + _types(loc, raw) + _values(loc, raw)
        headers: Headers = ()
        if "headers" in raw:
            header_problems, headers = _headers((*loc, "headers"), raw["headers"])
            found += header_problems
        name = raw.get("name")
        if isinstance(name, str) and name in names:
            found.append(((*loc, "name"), f"{json.dumps(name)} is also the name of "
                                          f"cases[{names[name]}]; give every case its own name"))
        elif isinstance(name, str):
            names[name] = i
        problems += found
        if not found:
            cases.append(_case(i, raw, headers))
    return cases, problems


def parse_cases(text: str, source: str = "<string>") -> list[Case]:
    """Validate case file ``text``; raises :class:`CaseFileError` with every
    problem, in file order."""
    tree = _parse_yaml(text, source)
    items, problems = _case_list(tree)
    cases, case_problems = _check_cases(items)
    problems = tree.duplicates + problems + case_problems
    if problems:
        ordered = sorted(problems, key=lambda p: _position(tree, p[0]))
        raise CaseFileError([f"{source}: {_path(loc) or 'top level'}: {message}"
                             for loc, message in ordered])
    return cases


def read_cases(path: str) -> list[Case]:
    """Read and validate the case file at ``path`` (UTF-8, at most MAX_FILE_BYTES)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise CaseFileError([f"{path}: cannot read the case file ({e.strerror or e}); "
                             f"check the path"]) from None
    if len(data) > MAX_FILE_BYTES:
        raise CaseFileError([f"{path}: top level: the file is larger than 10 MiB "
                             f"({MAX_FILE_BYTES} bytes), the limit for a case file; split it "
                             f"into several files"])
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise CaseFileError([f"{path}: line {line}, column {column}: the file is not UTF-8 "
                             f"text (byte 0x{data[e.start]:02x}); save it as UTF-8"]) from None
    return parse_cases(text, path)


# ---------------------------------------------------------------------------
# Running the cases
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseResult:
    """A case decided: ``explained`` is the ``explain --json`` object for its
    request; ``mismatches`` holds one line per header that differs."""

    case: Case
    request: RequestView
    decision: Decision
    explained: dict[str, Any]
    verdict_ok: bool
    mismatches: tuple[str, ...]
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.verdict_ok and not self.mismatches


def _quote(value: str | None) -> str:
    return "none" if value is None else json.dumps(value)


def _header_mismatches(case: Case, sent: dict[str, str]) -> tuple[str, ...]:
    got = {name.lower(): value for name, value in sent.items()}
    lines = []
    for name, want in case.headers:
        value = got.get(name.lower())
        if value == want:
            continue
        if want is None:
            lines.append(f"{name}: expected absent, got {_quote(value)}")
        else:
            lines.append(f"{name}: expected {_quote(want)}, got {_quote(value)}")
    return tuple(lines)


def run_case(config: Config, case: Case) -> CaseResult:
    """Decide ``case``'s request with ``config``'s policy and compare. Raises
    ``ValueError`` for a request that can't be made (validation prevents it)."""
    started = time.perf_counter()
    req = request_view(
        config, origin=case.origin, method=case.method, path=case.path,
        request_method=case.request_method, request_headers=case.request_headers,
        request_private_network=case.request_private_network, host=case.host,
        websocket=case.websocket,
    )
    decision = config.router.decide(req)
    explained = explain_json(config, req, decision)
    return CaseResult(
        case=case, request=req, decision=decision, explained=explained,
        verdict_ok=decision.allowed == (case.expect == "allowed"),
        mismatches=_header_mismatches(case, explained["headers"]),
        seconds=time.perf_counter() - started,
    )


_KINDS = {
    Kind.PREFLIGHT: "preflight",
    Kind.ACTUAL: "actual request",
    Kind.NOT_CORS: "not a CORS request",
    Kind.WEBSOCKET: "WebSocket handshake",
}


def _outcome(decision: Decision) -> str:
    """``denied (preflight; corsproxy answers 400)`` and the like."""
    if decision.kind is Kind.PREFLIGHT:
        what = f"corsproxy answers {decision.status}"
    elif not decision.forward:
        what = f"corsproxy answers {decision.status}, not forwarded"
    elif decision.allowed:
        what = "forwarded upstream"
    else:
        what = "forwarded upstream without CORS headers"
    if decision.report_only:
        what += "; report_only: as if enforced, the proxy forwards it anyway"
    return f"{'allowed' if decision.allowed else 'denied'} ({_KINDS[decision.kind]}; {what})"


def _shown(value: str) -> str:
    """A request header value for a terminal line: as is, or JSON-quoted if odd."""
    return value if value.isprintable() else json.dumps(value)


def failure_lines(result: CaseResult) -> list[str]:
    """What went wrong with a failed case (unindented; empty when it passed)."""
    if result.passed:
        return []
    request = result.explained["request"]
    lines = [f"request:  {request['method']} {_shown(request['path'])}"]
    lines += [f"          {name}: {_shown(value)}" for name, value in request["headers"]]
    lines += [f"expected: {result.case.expect}", f"got:      {_outcome(result.decision)}"]
    lines += ["reasons:", *(f"  - {reason}" for reason in result.decision.reasons)]
    if result.mismatches:
        lines += ["headers:", *(f"  {line}" for line in result.mismatches)]
    return lines


def _failure_message(result: CaseResult) -> str:
    """One line for the JUnit ``failure message``."""
    parts = []
    if not result.verdict_ok:
        parts.append(f"expected {result.case.expect}, got "
                     f"{'allowed' if result.decision.allowed else 'denied'}")
    if result.mismatches:
        names = ", ".join(line.split(":", 1)[0] for line in result.mismatches)
        parts.append(f"headers differ: {names}")
    return "; ".join(parts)


def _status_line(result: CaseResult) -> str:
    mark = " (report_only policy: checked as if enforced)" if result.decision.report_only else ""
    return f"{'PASS' if result.passed else 'FAIL'} {result.case.name}{mark}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def summary_line(results: Sequence[CaseResult], config_source: str, cases_source: str) -> str:
    """``12 cases: 11 passed, 1 failed (CONFIG against CASES)``."""
    failed = sum(not r.passed for r in results)
    return (f"{_plural(len(results), 'case')}: {len(results) - failed} passed, {failed} failed "
            f"({config_source} against {cases_source})")


# ---------------------------------------------------------------------------
# The JUnit report
# ---------------------------------------------------------------------------


def _xml_safe(text: str) -> str:
    """``text`` without the characters XML 1.0 can't hold (written as \\uXXXX)."""
    def ok(c: str) -> bool:
        n = ord(c)
        return (n >= 0x20 and n not in (0xFFFE, 0xFFFF) and not 0xD800 <= n <= 0xDFFF) or \
            c in "\t\n\r"

    return text if all(ok(c) for c in text) else "".join(
        c if ok(c) else f"\\u{ord(c):04x}" for c in text)


def junit_report(results: Sequence[CaseResult], *, config_source: str, cases_source: str,
                 seconds: float) -> bytes:
    """The JUnit XML report of a run (UTF-8, with an XML declaration)."""
    failures = sum(not r.passed for r in results)
    counts = {"tests": str(len(results)), "failures": str(failures), "errors": "0"}
    suites = ET.Element("testsuites", name=SUITE_NAME, **counts, time=f"{seconds:.6f}")
    suite = ET.SubElement(suites, "testsuite", name=SUITE_NAME, **counts, skipped="0",
                          time=f"{seconds:.6f}")
    properties = ET.SubElement(suite, "properties")
    ET.SubElement(properties, "property", name="config", value=_xml_safe(config_source))
    ET.SubElement(properties, "property", name="cases", value=_xml_safe(cases_source))
    classname = _xml_safe(os.path.basename(cases_source))
    for result in results:
        case = ET.SubElement(suite, "testcase", classname=classname,
                             name=_xml_safe(result.case.name), time=f"{result.seconds:.6f}")
        if not result.passed:
            failure = ET.SubElement(case, "failure", message=_xml_safe(_failure_message(result)),
                                    type="policy")
            failure.text = _xml_safe("\n".join(failure_lines(result)))
        if result.decision.report_only:
            ET.SubElement(case, "system-out").text = (
                "report_only policy: checked against what it would answer if enforced; "
                "the proxy forwards this request whatever the verdict")
    ET.indent(suites)
    return ET.tostring(suites, encoding="utf-8", xml_declaration=True) + b"\n"


class _Report:
    """The ``--junit`` file: a temporary file beside it, made before any case runs
    (so an unwritable path is found at once), moved into place by ``os.replace``."""

    def __init__(self, path: str) -> None:
        self.path = path
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            raise OSError(f"{path} is a directory; name a file in it, e.g. "
                          f"{os.path.join(path, 'policy-tests.xml')}")
        if not os.path.isdir(folder):
            raise OSError(f"the directory {folder} does not exist; create it or write the "
                          f"report elsewhere")
        try:
            fd, self.tmp = tempfile.mkstemp(dir=folder, prefix=".corsproxy-junit-",
                                            suffix=".tmp")
        except OSError as e:
            raise OSError(f"cannot create a file in {folder} ({e.strerror or e}); pick a "
                          f"writable directory") from None
        os.close(fd)

    def write(self, data: bytes) -> None:
        """Fill the temporary file and move it over the report's path."""
        umask = os.umask(0)
        os.umask(umask)
        try:
            with open(self.tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(self.tmp, 0o666 & ~umask)
            os.replace(self.tmp, self.path)
        except OSError as e:
            raise OSError(f"cannot write the report ({e.strerror or e}); pick a writable "
                          f"path") from None

    def discard(self) -> None:
        """Remove the temporary file if it is still there."""
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)


# ---------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------


def _err(line: str) -> None:
    print(line, file=sys.stderr)


def _load(args: argparse.Namespace) -> tuple[Config | None, list[Case], list[str]]:
    """The config and the cases, or the lines saying why not."""
    problems: list[str] = []
    cases: list[Case] = []
    try:
        cases = read_cases(args.cases)
    except CaseFileError as e:
        n = len(e.errors)
        problems += [*e.errors, f"{_plural(n, 'error')} in {args.cases}; no case was run"]
    try:
        config = load_config(args.config)
    except ConfigError as e:
        problems += e.report()
        return None, cases, problems
    return config, cases, problems


def _run(config: Config, cases: list[Case]) -> list[CaseResult]:
    """Run and print every case (stdout); raises ValueError from request_view."""
    results = []
    for case in cases:
        result = run_case(config, case)
        results.append(result)
        print(_status_line(result))
        for line in failure_lines(result):
            print(f"  {line}")
    return results


def cmd_test(args: argparse.Namespace) -> int:
    """Run ``corsproxy test``; returns the exit code (0, 1 or 2; see the module doc)."""
    if not args.config:
        _err(f"corsproxy test: no config file: pass --config FILE or set {ENV_CONFIG}")
        return 2
    report = None
    if args.junit:
        inputs = {os.path.realpath(args.cases): "the case file",
                  os.path.realpath(args.config): "the config file"}
        if os.path.realpath(args.junit) in inputs:
            _err(f"corsproxy test: --junit {args.junit} is "
                 f"{inputs[os.path.realpath(args.junit)]}; name another file for the report")
            return 2
        try:
            report = _Report(args.junit)
        except OSError as e:
            _err(f"corsproxy test: --junit {args.junit}: {e}")
            return 2
    try:
        config, cases, problems = _load(args)
        if config is None or problems:
            for line in problems:
                _err(line)
            return 2
        for w in config.warnings:
            _err(f"warning: {w}")
        started = time.perf_counter()
        try:
            results = _run(config, cases)
        except ValueError as e:
            _err(f"{args.cases}: {e}")
            return 2
        seconds = time.perf_counter() - started
        report_only = sum(r.decision.report_only for r in results)
        if report_only:
            print(f"note: {_plural(report_only, 'case')} on report_only policies, checked "
                  f"against what the policy would answer if enforced (the proxy forwards "
                  f"those requests whatever the verdict)")
        print(summary_line(results, config.source, args.cases))
        sys.stdout.flush()
        if report is not None:
            try:
                report.write(junit_report(results, config_source=config.source,
                                          cases_source=args.cases, seconds=seconds))
            except OSError as e:
                _err(f"corsproxy test: --junit {args.junit}: {e}")
                return 2
        return 0 if all(r.passed for r in results) else 1
    finally:
        if report is not None:
            report.discard()
