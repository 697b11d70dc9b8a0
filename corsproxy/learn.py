"""``corsproxy learn``: propose a CORS policy from the proxy's JSON access logs.

``corsproxy learn --log FILE [FILE...] [--min-count N] [--config CURRENT]
[--public-suffix-list FILE]`` reads access lines (``log: {format: json}`` or
``corsproxy run --log-format json``) and prints a commented YAML proposal in the
config file's format (``cors:`` and ``routes:``) on stdout. It never writes a file
and never touches the network: redirect stdout, review, then merge.

What is read:

- ``FILE`` is a JSON access log, one object per line; ``-`` is stdin, a file that
  starts with the gzip magic bytes is decompressed (rotated ``access.log.2.gz``).
- An access line is a JSON object with a string ``method``; event lines (an
  ``event`` key, no ``method``) and other JSON objects are "not access lines";
  lines that are not JSON objects (the text format, garbage, a binary file) are
  "not JSON"; lines over 64 KiB are skipped unread ("over 64 KiB"); blank lines are
  ignored. A line whose ``route`` is not a route path (``/...``, visible ASCII, no
  ``?#*``) can't come from corsproxy and is "not an access line" too.
- Counted: access lines with one serialized origin in ``origin``
  (:func:`~corsproxy._config_checks.origin_problem` accepts it, no ``*``, not several
  Origin headers joined with ``", "``, at most 300 characters); ``"null"`` counts.
  Skipped and counted separately: no Origin, an invalid Origin, and same-origin
  requests (their ``reason`` says "is the proxy's own origin"). The verdict
  (allowed, denied, rejected) does not matter: denied origins are proposed too,
  which is the point of learning from a report-only or permissive deployment.
- ``time``: the earliest and latest timestamp of the access lines (ISO 8601 UTC as
  corsproxy writes it; other values are ignored), whatever the order of the files.
- Work is bounded: each line is read in pieces of at most 64 KiB, JSON nested too
  deeply or numbers too long are "not JSON", an ``Access-Control-Request-Headers``
  value ``parse_header_list`` refuses (too long, too many names) adds no header.

What is proposed, per policy section (``route`` null: the top-level ``cors``;
every other route: a ``routes`` entry, sorted by path so the output does not
depend on the order of the lines):

- ``allow_origins``: the origins seen at least ``--min-count`` times (default 1),
  most requests first, then by name; each with its request count in a comment.
  Origins under ``--min-count`` are listed, commented out, in a "left out" block.
  Active entries come first, then the risky ones (commented out), then the left-out
  ones.
- Grouping: two or more distinct hosts that are strict subdomains of one site (the
  registrable domain: the public suffix plus one label, per the Public Suffix List,
  ICANN and PRIVATE sections alike), with the same scheme and port, become one
  pattern ``scheme://*.site[:port]``; the origins seen are listed under it (commented
  out, so the pattern can be swapped for them). ``a.github.io`` and ``b.github.io``
  are two sites, as are ``a.co.uk`` and ``b.co.uk``; the site itself
  (``https://example.com``) is never covered by a pattern and stays on its own; IP
  addresses, ``localhost`` and risky origins never group. The list is read from
  ``--public-suffix-list FILE`` (an error when unreadable or without rules), else
  from ``/usr/share/publicsuffix/public_suffix_list.dat`` (Debian's ``publicsuffix``
  package); when that is missing nothing is grouped and the header says so. Rules
  are lower-cased, Unicode rules are converted to punycode (hosts in origins are
  punycode already and are compared as they are); wildcards (``*.ck``) and
  exceptions (``!www.ck``) follow the publicsuffix.org algorithm, and a host no rule
  matches has its last label as public suffix.
- Risky origins are flagged ``# RISK: ...`` and written commented out, so the
  proposal is safe as printed: ``"null"`` (sandboxed iframes, ``file:`` pages: any
  site can send it), ``http://`` origins whose host also sent requests over
  ``https://`` (in any section: traffic in clear, likely a mixed-content leftover),
  and loopback origins (``localhost``, ``*.localhost``, ``127.0.0.0/8``, ``[::1]``: a
  developer's machine, where any local program can serve a page).
- ``allow_methods``: the ``request_method`` of preflights (``OPTIONS`` lines with a
  ``request_method``) that is an RFC 9110 token, sorted, with counts; ``GET`` always
  stays (the default; GET, HEAD and POST sent as simple requests never preflight).
- ``allow_headers``: the names in the preflights' ``request_headers``
  (:func:`~corsproxy.core.parse_header_list`; a value it refuses is ignored), merged
  case-insensitively and written in their most common spelling (ties: the first in
  ASCII order), sorted case-insensitively, without the safelisted names
  (:data:`~corsproxy.core.SAFELISTED_REQUEST_HEADERS`, always allowed).
- ``allow_credentials``: true when a counted request of the section carried
  a Cookie (``credentials: true`` in its line: the page used ``credentials:
  "include"``), with how many.
- Only origins that pass ``--min-count`` contribute methods, headers and
  credentials (risky ones included: they are in the proposal, commented out).
- Nothing else is learned (``allow_origin_regex``, ``expose_headers``, ``max_age``,
  ``enforce`` ...): a route entry writes the four keys above and inherits the rest.

``--config CURRENT`` (default ``$CORSPROXY_CONFIG``, as in every command) appends
YAML comments "changes against CURRENT", per section: origins the proposal adds
(and whether the current policy already allows them, through a pattern, the regex
or ``"*"``: :meth:`~corsproxy.core.CorsPolicy.match_origin` of the policy the
current router picks for that path), current entries with no traffic in the logs
(candidates for removal), current entries only seen under ``--min-count``, current
entries the proposal covers differently (a pattern, ``"*"``, ``allow_origin_regex``:
the proposal lists the origins they matched), methods and headers added and
removed, and a change of ``allow_credentials``; current routes without counted
traffic are candidates for removal. A route of the logs that CURRENT lacks is
compared with the policy that decides its path now; a route's removal candidates
are only the origin rules it sets itself (inherited ones belong to the top level).
An unusable CURRENT is reported as every command reports a config (its lines and
"N errors; corsproxy did not use this config" on stderr) and exits 1.

Exit codes: 0 the proposal was printed; 1 ``--config`` can't be used; 2 bad
arguments, an unreadable file (one line naming it and the reason), a
``--public-suffix-list`` that can't be used, or logs without a single JSON access
line. Output is deterministic (no clock, sorted everything) and ASCII.
"""

from __future__ import annotations

import argparse
import gzip
import ipaddress
import json
import re
import sys
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from ._args import DEFAULT_PUBLIC_SUFFIX_LIST
from ._config_checks import origin_problem
from .config import Config, ConfigError, load_config
from .core import (
    MAX_ORIGIN_LENGTH,
    SAFELISTED_REQUEST_HEADERS,
    CorsPolicy,
    CorsSettings,
    is_token,
    parse_header_list,
)

__all__ = [
    "DEFAULT_PUBLIC_SUFFIX_LIST",
    "MAX_LINE_BYTES",
    "Entry",
    "LogSummary",
    "PublicSuffixList",
    "Section",
    "SectionProposal",
    "changes",
    "cmd_learn",
    "group_origins",
    "origin_risk",
    "printable",
    "propose",
    "propose_section",
    "read_lines",
    "render",
    "split_origin",
    "yaml_scalar",
]

#: Longest line looked at; longer ones are skipped without being kept in memory.
MAX_LINE_BYTES = 64 * 1024
_CHECKED_MAX = 10_000
_SAME_ORIGIN = "is the proxy's own origin (same-origin request)"
_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,9})?Z")
_ROUTE = re.compile(r"/[!-~]*")  # visible ASCII
_SAFELISTED = frozenset(h.lower() for h in SAFELISTED_REQUEST_HEADERS)
_NOT_JSON_HINT = (
    "make corsproxy write JSON lines with `log: {format: json}` in its config or "
    "`corsproxy run --log-format json`"
)


# ---------------------------------------------------------------------------
# The Public Suffix List
# ---------------------------------------------------------------------------


class _Node:
    """One label of the rule trie (labels right to left)."""

    __slots__ = ("children", "rule", "exception")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.rule = False
        self.exception = False


def _ace(label: str) -> str:
    """A rule label as it appears in a serialized origin (punycode)."""
    if label.isascii():
        return label
    try:
        return label.encode("idna").decode("ascii")
    except UnicodeError:  # not IDNA 2003: no origin host can match it anyway
        return label


class PublicSuffixList:
    """The rules of https://publicsuffix.org/list/ and its algorithm: which part
    of a host name is a public suffix, and which is the site (registrable domain)."""

    def __init__(self, rules: Iterable[str], source: str = "<rules>") -> None:
        self.source = source
        self.count = 0
        self._root = _Node()
        for rule in rules:
            self._add(rule)

    @classmethod
    def parse(cls, text: str, source: str = "<text>") -> PublicSuffixList:
        """Rules from the list's text: the first word of each line; ``//`` comments."""
        rules = []
        for line in text.splitlines():
            words = line.split()
            if words and not words[0].startswith("//"):
                rules.append(words[0])
        return cls(rules, source)

    @classmethod
    def load(cls, path: str) -> PublicSuffixList:
        """Read the list at ``path``; ``OSError`` when unreadable, ``ValueError``
        when it holds no rule (not a public suffix list)."""
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", errors="replace")
        psl = cls.parse(text, path)
        if psl.count == 0:
            raise ValueError("no rules in it: not a public suffix list")
        return psl

    def _add(self, rule: str) -> None:
        exception = rule.startswith("!")
        labels = rule[exception:].lower().strip(".").split(".")
        if not all(labels):
            return
        node = self._root
        for label in reversed(labels):
            node = node.children.setdefault(_ace(label), _Node())
        if exception:
            node.exception = True
        else:
            node.rule = True
        self.count += 1

    def _matches(self, node: _Node, labels: list[str], depth: int, found: list[int]) -> None:
        """Collect into ``found`` [longest rule, longest exception] matching the
        last ``depth`` labels and more (``*`` matches any one label)."""
        if depth == len(labels):
            return
        for key in (labels[-1 - depth], "*"):
            child = node.children.get(key)
            if child is None:
                continue
            if child.rule:
                found[0] = max(found[0], depth + 1)
            if child.exception:
                found[1] = max(found[1], depth + 1)
            self._matches(child, labels, depth + 1, found)

    def suffix_labels(self, host: str) -> int:
        """How many labels of ``host`` are its public suffix: the exception rule
        minus one label, else the longest matching rule, else 1 (rule ``*``)."""
        found = [0, 0]
        self._matches(self._root, host.split("."), 0, found)
        if found[1]:
            return found[1] - 1
        return found[0] or 1

    def site(self, host: str) -> str | None:
        """The registrable domain of ``host`` (public suffix plus one label), or None
        when ``host`` is a public suffix itself or not a host name."""
        labels = host.lower().split(".")
        if not all(labels):
            return None
        n = self.suffix_labels(".".join(labels))
        if len(labels) <= n:
            return None
        return ".".join(labels[-n - 1 :])


# ---------------------------------------------------------------------------
# Origins: parts, risks, grouping
# ---------------------------------------------------------------------------


def split_origin(origin: str) -> tuple[str, str, str | None]:
    """(scheme, host, port or None) of a serialized origin (IPv6 hosts keep ``[]``)."""
    scheme, _, hostport = origin.partition("://")
    if hostport.startswith("["):
        end = hostport.find("]") + 1
        host, rest = hostport[:end], hostport[end:]
        return scheme, host, rest[1:] if rest.startswith(":") else None
    host, colon, port = hostport.partition(":")
    return scheme, host, port if colon else None


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host[1:-1] if host.startswith("[") else host)
    except ValueError:
        return None


def _loopback(host: str) -> bool:
    """``localhost``, a name under it (browsers resolve those to loopback too), or a
    loopback address."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    address = _ip(host)
    return address is not None and address.is_loopback


RISK_NULL = "null"
RISK_LOOPBACK = "loopback"
RISK_HTTP = "http"
_RISK_TEXT = {
    RISK_NULL: (
        'RISK: "null" is the origin of sandboxed iframes, file: pages and some redirects;',
        'any website can make its requests carry "null", so allowing it allows every site.',
    ),
    RISK_LOOPBACK: (
        "RISK: a developer's machine (loopback): any program running on a visitor's computer",
        "can serve a page from this origin and call the API as that visitor.",
    ),
    RISK_HTTP: (
        "RISK: plain http although the same host also sent requests over https: anyone on",
        "the network can read and change this traffic; probably a mixed-content leftover.",
    ),
}


def origin_risk(origin: str, https_hosts: frozenset[str]) -> str | None:
    """Why ``origin`` should only be allowed deliberately (a ``RISK_*`` key), or None.
    ``https_hosts``: the hosts seen with ``https://``."""
    if origin == "null":
        return RISK_NULL
    scheme, host, _ = split_origin(origin)
    if _loopback(host):
        return RISK_LOOPBACK
    if scheme == "http" and host in https_hosts:
        return RISK_HTTP
    return None


def group_origins(origins: Iterable[str], psl: PublicSuffixList | None) -> dict[str, list[str]]:
    """``{pattern: [origins]}`` for every site with two or more subdomains seen
    (same scheme and port); origins not in a group are not in the result."""
    if psl is None:
        return {}
    sites: dict[tuple[str, str, str | None], list[str]] = {}
    for origin in origins:
        if origin == "null":
            continue
        scheme, host, port = split_origin(origin)
        if _ip(host) is not None or _loopback(host):
            continue
        site = psl.site(host)
        if site is not None and site != host:
            sites.setdefault((scheme, site, port), []).append(origin)
    return {
        f"{scheme}://*.{site}" + (f":{port}" if port else ""): sorted(members)
        for (scheme, site, port), members in sites.items()
        if len(members) >= 2
    }


# ---------------------------------------------------------------------------
# Reading the logs
# ---------------------------------------------------------------------------


def read_lines(stream: IO[bytes], limit: int = MAX_LINE_BYTES) -> Iterator[bytes | None]:
    """The lines of ``stream``; None for a line longer than ``limit`` bytes, whose
    rest is read and dropped piece by piece (memory stays bounded)."""
    while True:
        chunk = stream.readline(limit + 1)
        if not chunk:
            return
        if chunk.endswith(b"\n") or len(chunk) <= limit:
            yield chunk
            continue
        while chunk and not chunk.endswith(b"\n"):
            chunk = stream.readline(limit)
        yield None


def _json_object(text: bytes) -> dict[str, Any] | None:
    if not text.startswith(b"{"):
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _one_origin(value: object) -> bool:
    """One origin as a browser serializes it (``"null"`` included)."""
    return (
        isinstance(value, str)
        and len(value) <= MAX_ORIGIN_LENGTH
        and "*" not in value
        and ", " not in value
        and origin_problem(value) is None
    )


def _route_ok(route: object) -> bool:
    """None (the top level) or a route path as a config can write it."""
    return route is None or (
        isinstance(route, str)
        and _ROUTE.fullmatch(route) is not None
        and not any(c in route for c in "?#*")
    )


@dataclass
class Section:
    """The counted requests of one policy section, per origin."""

    requests: Counter[str] = field(default_factory=Counter)
    credentials: Counter[str] = field(default_factory=Counter)
    methods: Counter[tuple[str, str]] = field(default_factory=Counter)
    headers: Counter[tuple[str, str]] = field(default_factory=Counter)


@dataclass
class LogSummary:
    """Everything counted from the lines given to :meth:`add`."""

    files: list[tuple[str, int]] = field(default_factory=list)
    lines: int = 0
    access: int = 0
    counted: int = 0
    not_json: int = 0
    too_long: int = 0
    not_access: int = 0
    same_origin: int = 0
    no_origin: int = 0
    invalid_origin: int = 0
    first_time: str | None = None
    last_time: str | None = None
    routes: set[str] = field(default_factory=set)
    sections: dict[str | None, Section] = field(default_factory=dict)
    #: Origin values already checked (a log repeats a few origins many times).
    _checked: dict[str, bool] = field(default_factory=dict, repr=False)

    def read(self, name: str, stream: IO[bytes]) -> None:
        """Add every line of ``stream`` (named ``name`` in the header)."""
        before = self.lines
        for line in read_lines(stream):
            self.add(line)
        self.files.append((name, self.lines - before))

    def add(self, line: bytes | None) -> None:
        """Count one line (None: a line over the length limit)."""
        if line is None:
            self.lines += 1
            self.too_long += 1
            return
        line = line.strip()
        if not line:
            return
        self.lines += 1
        record = _json_object(line)
        if record is None:
            self.not_json += 1
            return
        route = record.get("route")
        if not isinstance(record.get("method"), str) or not _route_ok(route):
            self.not_access += 1
            return
        self.access += 1
        self._time(record.get("time"))
        if route is not None:
            self.routes.add(route)
        origin = record.get("origin")
        if origin is None:
            self.no_origin += 1
        elif not self._valid(origin):
            self.invalid_origin += 1
        elif isinstance(record.get("reason"), str) and _SAME_ORIGIN in record["reason"]:
            self.same_origin += 1
        else:
            self.counted += 1
            self._count(self.sections.setdefault(route, Section()), origin, record)

    def _valid(self, origin: object) -> bool:
        """:func:`_one_origin`, remembered for up to ``_CHECKED_MAX`` values."""
        if not isinstance(origin, str):
            return False
        valid = self._checked.get(origin)
        if valid is None:
            valid = _one_origin(origin)
            if len(self._checked) < _CHECKED_MAX:
                self._checked[origin] = valid
        return valid

    def _time(self, value: object) -> None:
        if isinstance(value, str) and _TIME.fullmatch(value):
            if self.first_time is None or value < self.first_time:
                self.first_time = value
            if self.last_time is None or value > self.last_time:
                self.last_time = value

    @staticmethod
    def _count(section: Section, origin: str, record: dict[str, Any]) -> None:
        section.requests[origin] += 1
        if record.get("credentials") is True:
            section.credentials[origin] += 1
        method = record.get("request_method")
        if record["method"] != "OPTIONS" or not isinstance(method, str):
            return
        if is_token(method):
            section.methods[(origin, method)] += 1
        headers = record.get("request_headers")
        if isinstance(headers, str):
            names, error = parse_header_list([headers])
            if error is None:
                for name in names:
                    section.headers[(origin, name)] += 1

    def https_hosts(self) -> frozenset[str]:
        """Hosts seen with ``https://`` in any section."""
        return frozenset(
            split_origin(origin)[1]
            for section in self.sections.values()
            for origin in section.requests
            if origin.startswith("https://")
        )


# ---------------------------------------------------------------------------
# The proposal
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One ``allow_origins`` item: an origin, or a pattern with the origins seen."""

    value: str
    requests: int
    credentials: int = 0
    members: tuple[tuple[str, int], ...] = ()
    risk: str | None = None


@dataclass(frozen=True)
class SectionProposal:
    """The proposed policy of one section (``route`` None: the top level)."""

    route: str | None
    origins: tuple[Entry, ...]
    risky: tuple[Entry, ...]
    left_out: tuple[tuple[str, int], ...]
    methods: tuple[tuple[str, int], ...]
    headers: tuple[tuple[str, int], ...]
    credentials: int
    requests: int
    #: Every origin counted in the section (any count), with its requests.
    seen: tuple[tuple[str, int], ...]

    def values(self) -> dict[str, Entry]:
        """Every proposed entry by value, and every grouped origin by its own value."""
        out: dict[str, Entry] = {}
        for entry in (*self.origins, *self.risky):
            out[entry.value] = entry
            for member, _ in entry.members:
                out[member] = entry
        return out


def _by_count(item: tuple[str, int]) -> tuple[int, str]:
    return -item[1], item[0]


def _entries(
    section: Section, passing: dict[str, int], psl: PublicSuffixList | None, safe: list[str]
) -> list[Entry]:
    groups = group_origins(safe, psl)
    grouped = {member for members in groups.values() for member in members}
    entries = [
        Entry(
            pattern,
            sum(passing[m] for m in members),
            sum(section.credentials[m] for m in members),
            tuple(sorted(((m, passing[m]) for m in members), key=_by_count)),
        )
        for pattern, members in groups.items()
    ]
    entries += [Entry(o, passing[o], section.credentials[o]) for o in safe if o not in grouped]
    return sorted(entries, key=lambda e: (-e.requests, e.value))


def _headers(section: Section, passing: dict[str, int]) -> tuple[tuple[str, int], ...]:
    spellings: dict[str, Counter[str]] = {}
    for (origin, name), n in section.headers.items():
        if origin in passing and name.lower() not in _SAFELISTED:
            spellings.setdefault(name.lower(), Counter())[name] += n
    return tuple(
        (min(names.items(), key=_by_count)[0], sum(names.values()))
        for _, names in sorted(spellings.items())
    )


def propose_section(
    route: str | None,
    section: Section,
    min_count: int,
    psl: PublicSuffixList | None,
    https_hosts: frozenset[str],
) -> SectionProposal:
    """The proposal for one section's counts."""
    passing = {o: n for o, n in section.requests.items() if n >= min_count}
    risks = {o: origin_risk(o, https_hosts) for o in passing}
    safe = sorted(o for o, risk in risks.items() if risk is None)
    risky = sorted(
        (Entry(o, passing[o], section.credentials[o], risk=risk)
         for o, risk in risks.items() if risk is not None),
        key=lambda e: (-e.requests, e.value),
    )
    methods: Counter[str] = Counter()
    for (origin, method), n in section.methods.items():
        if origin in passing:
            methods[method] += n
    methods.setdefault("GET", 0)
    return SectionProposal(
        route=route,
        origins=tuple(_entries(section, passing, psl, safe)),
        risky=tuple(risky),
        left_out=tuple(sorted(((o, n) for o, n in section.requests.items() if n < min_count),
                              key=_by_count)),
        methods=tuple(sorted(methods.items())),
        headers=_headers(section, passing),
        credentials=sum(section.credentials[o] for o in passing),
        requests=sum(passing.values()),
        seen=tuple(sorted(section.requests.items(), key=_by_count)),
    )


def propose(
    summary: LogSummary, min_count: int = 1, psl: PublicSuffixList | None = None
) -> list[SectionProposal]:
    """One proposal per section: the top level first (always), then routes by path."""
    https_hosts = summary.https_hosts()
    top = summary.sections.get(None, Section())
    out = [propose_section(None, top, min_count, psl, https_hosts)]
    for route in sorted(r for r in summary.sections if r is not None):
        out.append(propose_section(route, summary.sections[route], min_count, psl,
                                   https_hosts))
    return out


# ---------------------------------------------------------------------------
# Rendering: YAML with comments
# ---------------------------------------------------------------------------

_PLAIN = re.compile(
    r"[a-z][a-z0-9+.\-]*://[a-z0-9_.\-\[\]:*]*[a-z0-9_\]*]"  # an origin or a pattern
    r"|/[A-Za-z0-9._~/%+\-]*"  # a route path
    r"|[A-Za-z][A-Za-z0-9_.\-]*"  # a method or header name
)
_YAML_WORDS = frozenset("y n yes no true false on off null".split())


def yaml_scalar(value: str) -> str:
    """``value`` as a YAML string: plain when that reads back as the same string,
    else double-quoted (JSON's escapes are YAML's)."""
    if _PLAIN.fullmatch(value) and value.lower() not in _YAML_WORDS:
        return value
    return json.dumps(value)


def printable(text: str) -> str:
    """``text`` safe for one line of ASCII output: escapes for everything else."""
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\x{ord(m.group()):02x}", text)


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


#: A list row: (text, trailing comment or None); a row with text None is a comment line.
_Row = tuple[str | None, str | None]


def _aligned(rows: list[_Row], indent: str) -> list[str]:
    """Rows with their trailing comments in one column."""
    width = max((len(text) for text, _ in rows if text is not None), default=0)
    out = []
    for text, comment in rows:
        if text is None:
            out.append(f"{indent}# {comment}")
        elif comment is None:
            out.append(f"{indent}{text}".rstrip())
        else:
            out.append(f"{indent}{text:<{width}}  # {comment}")
    return out


def _requests(entry: Entry) -> str:
    text = _n(entry.requests, "request")
    if entry.credentials:
        text += f", {entry.credentials} with credentials"
    return text


def _origin_rows(p: SectionProposal, min_count: int) -> list[_Row]:
    rows: list[_Row] = []
    for entry in p.origins:
        if entry.members:
            rows.append((f"- {yaml_scalar(entry.value)}",
                         f"{_requests(entry)}, from {len(entry.members)} subdomains:"))
            rows += [(f"# - {yaml_scalar(o)}", _n(n, "request")) for o, n in entry.members]
        else:
            rows.append((f"- {yaml_scalar(entry.value)}", _requests(entry)))
    for entry in p.risky:
        rows += [(None, line) for line in _RISK_TEXT[entry.risk or ""]]
        rows.append((f"# - {yaml_scalar(entry.value)}", _requests(entry)))
    if p.left_out:
        rows.append((None, f"left out: fewer than {_n(min_count, 'request')} "
                           f"(--min-count {min_count}):"))
        rows += [(f"# - {yaml_scalar(o)}", _n(n, "request")) for o, n in p.left_out]
    return rows


def _method_comment(method: str, preflights: int) -> str:
    if method != "GET":
        return _n(preflights, "preflight")
    default = "the default (a simple GET never preflights)"
    return f"{_n(preflights, 'preflight')}; also {default}" if preflights else default


def _section_lines(p: SectionProposal, indent: str, min_count: int) -> list[str]:
    """The four keys of one ``cors`` mapping, indented by ``indent``."""
    out = []
    if p.origins:
        out.append(f"{indent}allow_origins:")
    elif p.risky or p.left_out:
        out.append(f"{indent}allow_origins: []  # to allow an entry below: uncomment it, "
                   f"remove []")
    else:
        out.append(f"{indent}allow_origins: []  # no origin counted")
    out += _aligned(_origin_rows(p, min_count), indent + "  ")
    out.append(f"{indent}allow_methods:")
    out += _aligned([(f"- {yaml_scalar(m)}", _method_comment(m, n)) for m, n in p.methods],
                    indent + "  ")
    if p.headers:
        out.append(f"{indent}allow_headers:")
        out += _aligned([(f"- {yaml_scalar(h)}", _n(n, "preflight")) for h, n in p.headers],
                        indent + "  ")
    else:
        out.append(f"{indent}allow_headers: []  # no preflight asked for another header")
    if p.credentials:
        out.append(f"{indent}allow_credentials: true  # {p.credentials} of "
                   f"{_n(p.requests, 'request')} carried cookies (credentials: \"include\")")
    elif p.requests:
        out.append(f"{indent}allow_credentials: false  # no credentials in "
                   f"{_n(p.requests, 'request')}")
    else:
        out.append(f"{indent}allow_credentials: false")
    return out


_GUIDE = """\
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


def _header(summary: LogSummary, min_count: int, psl_note: str,
            proposals: list[SectionProposal]) -> list[str]:
    s = summary
    out = [
        "# CORS policy proposal from corsproxy access logs (corsproxy learn).",
        "# Review before use; corsproxy learn never writes files.",
        "#",
    ]
    for i, (name, lines) in enumerate(s.files):
        shown = "- (stdin)" if name == "-" else printable(name)
        out.append(f"# {'logs:' if i == 0 else '':<11}{shown} ({_n(lines, 'line')})")
    out += [
        f"# lines:     {s.lines} read, {s.counted} counted (cross-origin requests with one "
        f"valid Origin)",
        f"# skipped:   {s.not_json} not JSON, {s.too_long} over 64 KiB, {s.not_access} not "
        f"access lines (events, other JSON),",
        f"#            {s.same_origin} same-origin, {s.no_origin} without Origin, "
        f"{s.invalid_origin} invalid Origin",
        f"# time:      {s.first_time} to {s.last_time}" if s.first_time else
        "# time:      (no timestamps)",
        f"# min-count: {min_count} (origins with fewer requests are left out, listed in a "
        f"comment)",
        f"# grouping:  {psl_note}",
    ]
    proposed = {p.route for p in proposals}
    quiet = sorted(s.routes - {r for r in proposed if r is not None})
    if quiet:
        out.append(f"# routes without counted requests (not in the proposal): "
                   f"{', '.join(quiet)}")
    return out + _GUIDE.rstrip("\n").split("\n")


def _counted(p: SectionProposal, where: str = "") -> str:
    """"N requests[ where] (M from the origins kept)" for a section's first line."""
    total = sum(n for _, n in p.seen)
    text = _n(total, "request") + where
    return text if total == p.requests else f"{text} ({p.requests} from the origins kept)"


def render(
    summary: LogSummary,
    proposals: list[SectionProposal],
    *,
    min_count: int = 1,
    psl_note: str = "off",
) -> str:
    """The proposal as commented YAML (ends with a newline)."""
    out = _header(summary, min_count, psl_note, proposals)
    top, routes = proposals[0], proposals[1:]
    out += ["", f"cors:  # {_counted(top, ' outside the routes')}"]
    out += _section_lines(top, "  ", min_count)
    if routes:
        out += ["", "routes:"]
        for p in routes:
            out.append(f"  - path: {yaml_scalar(p.route or '/')}  # {_counted(p)}")
            out.append("    cors:")
            out += _section_lines(p, "      ", min_count)
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------
# Changes against the current config
# ---------------------------------------------------------------------------


def _route_key(path: str) -> str:
    return path.rstrip("/") or "/"


def _rule(settings: CorsSettings, origin: str) -> str | None:
    return CorsPolicy(settings).match_origin(origin)


def _added(p: SectionProposal, current: CorsSettings) -> list[_Row]:
    """Rows for the proposed entries not written in the current allow_origins."""
    rows: list[_Row] = []
    written = set(current.allow_origins)
    policy = CorsPolicy(current)
    for entry in (*p.origins, *p.risky):
        if entry.value in written:
            continue
        origins = [m for m, _ in entry.members] or [entry.value]
        rules = [policy.match_origin(o) for o in origins]
        allowed = [r for r in rules if r is not None]
        if not allowed:
            status = "not allowed now"
        elif len(allowed) < len(rules):
            status = f"{len(allowed)} of {len(rules)} origins seen allowed now"
        else:
            status = "allowed now by " + ", ".join(sorted(set(allowed)))
        if entry.risk:
            status += "; commented out (RISK)"
        rows.append((f"- {yaml_scalar(entry.value)}", status))
    return rows


def _current_entries(current: CorsSettings,
                     top: CorsSettings | None) -> list[tuple[str, CorsSettings]]:
    """(label, settings allowing only that entry) for each origin rule of ``current``
    that a route sets itself (``top``: the top-level cors it would inherit)."""
    out = []
    if top is None or current.allow_origins != top.allow_origins:
        out += [(yaml_scalar(o), CorsSettings(allow_origins=(o,))) for o in current.allow_origins]
    regexes: Any = current.allow_origin_regex or ()  # one pattern, or a tuple of them
    if top is not None and regexes == top.allow_origin_regex:
        regexes = ()
    for regex in (regexes,) if isinstance(regexes, str) else regexes:
        out.append((f"allow_origin_regex {json.dumps(regex)}",
                    CorsSettings(allow_origin_regex=regex)))
    return out


def _covered(label: str, seen: list[tuple[str, int]], values: dict[str, Entry],
             min_count: int) -> str:
    """How the proposal covers the origins a current entry matched."""
    by = sorted({values[o].value for o, n in seen if n >= min_count})
    if [yaml_scalar(v) for v in by] == [label] and values[by[0]].risk:
        return "commented out in the proposal (RISK): uncomment it to keep it"
    return "covered by " + ", ".join(
        yaml_scalar(v) + (" (commented out: RISK)" if values[v].risk else "") for v in by
    )


def _removed(p: SectionProposal, current: CorsSettings, top: CorsSettings | None,
             min_count: int) -> list[str]:
    """Lines about the current entries the proposal does not write (for a route, the
    ones it sets itself: inherited ones are the top level's business)."""
    values = p.values()
    active = {e.value for e in p.origins}
    unused: list[_Row] = []
    rare: list[_Row] = []
    covered: list[str] = []
    for label, only in _current_entries(current, top):
        if set(only.allow_origins) & active:  # written in the proposal as well
            continue
        seen = [(o, n) for o, n in p.seen if _rule(only, o) is not None]
        if not seen:
            unused.append((f"- {label}", None))
        elif all(n < min_count for _, n in seen):
            rare.append((f"- {label}", _n(sum(n for _, n in seen), "request")))
        else:
            covered += [f"#     - {label}", f"#       {_covered(label, seen, values, min_count)}"]
    out = []
    for title, rows in (
        ("current entries with no request in this section (candidates for removal):", unused),
        (f"current entries seen fewer than {min_count} times (left out):", rare),
    ):
        if rows:
            out += [f"#   {title}", *_aligned(rows, "#     ")]
    if covered:
        out += ["#   current entries the proposal replaces with the entries they matched:",
                *covered]
    return out


def _list_changes(name: str, proposed: list[str], current: tuple[str, ...],
                  fold: bool) -> str | None:
    if "*" in current:
        return f'{name}: now "*" (any); the proposal lists {", ".join(proposed) or "none"}'

    def key(v: str) -> str:
        return v.lower() if fold else v

    now = {key(v) for v in current}
    new = {key(v) for v in proposed}
    add = [v for v in proposed if key(v) not in now]
    drop = [v for v in current if key(v) not in new]
    parts = ([f"add {', '.join(add)}"] if add else []) + (
        [f"remove {', '.join(drop)}"] if drop else [])
    return f"{name}: {'; '.join(parts)}" if parts else None


def _section_changes(p: SectionProposal, current: CorsSettings, own: bool,
                     top: CorsSettings | None, min_count: int) -> list[str]:
    out = []
    added = _added(p, current)
    if added:
        out += ["#   origins to add:", *_aligned(added, "#     ")]
    if own:  # a policy of its own now: what the proposal drops from it
        out += _removed(p, current, top, min_count)
    for line in (
        _list_changes("allow_methods", [m for m, _ in p.methods], current.allow_methods, False),
        _list_changes("allow_headers", [h for h, _ in p.headers], current.allow_headers, True),
    ):
        if line:
            out.append(f"#   {line}")
    credentials = p.credentials > 0
    if credentials != current.allow_credentials:
        out.append(f"#   allow_credentials: {str(current.allow_credentials).lower()} -> "
                   f"{str(credentials).lower()}")
    return out or ["#   no changes"]


def changes(proposals: list[SectionProposal], config: Config, min_count: int = 1) -> str:
    """YAML comments: what replacing ``config``'s cors and routes with the proposal
    changes, section by section."""
    out = [
        "",
        "# " + "-" * 78,
        f"# Changes against {printable(config.source)} (its cors and routes replaced by the "
        f"proposal).",
        "# The proposal writes only allow_origins, allow_methods, allow_headers and",
        "# allow_credentials. When you merge, keep the current file's other keys (expose_headers,",
        "# max_age, enforce ...) but not allow_origin_regex: the origins it matched are listed.",
    ]
    routes = {_route_key(r.path): r for r in config.routes}
    for p in proposals:
        out.append("#")
        if p.route is None:
            out.append("# cors (top level):")
            out += _section_changes(p, config.cors, True, None, min_count)
            continue
        out.append(f"# route {p.route}:")
        mine = routes.pop(_route_key(p.route), None)
        if mine is not None:
            out += _section_changes(p, mine.cors, True, config.cors, min_count)
            continue
        now, policy = config.router.select(p.route)
        where = "the top-level cors" if now is None else f"route {now}"
        out.append(f"#   not in {printable(config.source)}: its requests are decided now by "
                   f"{where}")
        out += _section_changes(p, policy.settings, False, None, min_count)
    for key in sorted(routes):
        out += ["#", f"# route {routes[key].path}:",
                "#   no counted request in these logs; not in the proposal (candidate for "
                "removal)"]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------


def _err(line: str) -> None:
    print(line, file=sys.stderr)


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return " ".join(str(e).split()) or type(e).__name__


def _public_suffix_list(path: str | None) -> tuple[PublicSuffixList | None, str]:
    """(the list or None, the header's grouping note); an explicit ``path`` that
    can't be used raises ``OSError``/``ValueError``."""
    if path is not None:
        psl = PublicSuffixList.load(path)
        return psl, f"by site, public suffix list {printable(path)}"
    try:
        psl = PublicSuffixList.load(DEFAULT_PUBLIC_SUFFIX_LIST)
    except (OSError, ValueError) as e:
        return None, (
            f"off: no public suffix list at {DEFAULT_PUBLIC_SUFFIX_LIST} ({_reason(e)}); "
            f"install Debian's publicsuffix package or pass --public-suffix-list FILE"
        )
    return psl, f"by site, public suffix list {DEFAULT_PUBLIC_SUFFIX_LIST}"


def _read(summary: LogSummary, name: str) -> None:
    """Read one log (``-``: stdin; gzip when it starts with the gzip magic)."""
    if name == "-":
        summary.read(name, sys.stdin.buffer)
        return
    with open(name, "rb") as raw:
        if raw.peek(2)[:2] == b"\x1f\x8b":
            with gzip.GzipFile(fileobj=raw) as unzipped:
                summary.read(name, unzipped)  # type: ignore[arg-type]
        else:
            summary.read(name, raw)


def cmd_learn(args: argparse.Namespace) -> int:
    """Run ``corsproxy learn``; returns the exit code (see the module docstring)."""
    try:
        psl, psl_note = _public_suffix_list(args.public_suffix_list)
    except (OSError, ValueError) as e:
        _err(f"corsproxy learn: cannot use --public-suffix-list "
             f"{printable(args.public_suffix_list)}: {_reason(e)}")
        return 2
    config = None
    if args.config:
        try:
            config = load_config(args.config)
        except ConfigError as e:
            for line in e.report():
                _err(line)
            return 1
    summary = LogSummary()
    for name in args.log:
        try:
            _read(summary, name)
        except (OSError, EOFError, zlib.error) as e:
            _err(f"corsproxy learn: cannot read {printable(name)}: {_reason(e)}")
            return 2
    if summary.access == 0:
        names = ", ".join(printable(n) for n in args.log)
        what = "is not a JSON access log" if len(args.log) == 1 else "are not JSON access logs"
        _err(f"corsproxy learn: {names} {what} ({_n(summary.lines, 'line')}, no JSON access "
             f"line); {_NOT_JSON_HINT}")
        return 2
    proposals = propose(summary, args.min_count, psl)
    text = render(summary, proposals, min_count=args.min_count, psl_note=psl_note)
    if config is not None:
        text += changes(proposals, config, args.min_count)
    sys.stdout.write(text)
    sys.stdout.flush()
    return 0
