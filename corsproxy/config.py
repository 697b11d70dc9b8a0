"""The YAML config file: read once, validated once, turned into frozen objects.

Two layers, after jub0bs/cors and httpx:

- **Structure** is a set of pydantic v2 models (``extra="forbid"``, strict types:
  ``"true"`` in quotes is not a boolean, ``"8080"`` is not a port). The same models
  generate the JSON Schema shipped as ``corsproxy/config.schema.json`` (printed by
  ``corsproxy schema``), so editors and the loader agree on the shape.
- **Meaning** is checked by small validators attached to the fields (origins,
  regex, upstream URL, tokens) and by a pass over the *merged* per-route policies
  (``"*"`` with credentials after merging), which runs on every value that is
  valid on its own even when another field is broken, so one run shows every
  problem.

Every problem becomes one line ``FILE: field.path: what is wrong, and how to fix
it`` (``cors.allow_origins[2]``, ``routes[0].cors.allow_credentials``); all of them
are collected and raised together as :class:`ConfigError`. Problems that are not
in a field use a location instead of the path: ``FILE: line 3, column 7: ...``
(YAML syntax) or ``FILE: top level: ...``.

Choices, documented once here:

- An empty file, or an empty section (``cors:`` with nothing under it), means
  the defaults (Starlette's CORSMiddleware names and defaults for ``cors``).
- A single string where a list is expected is a one-item list
  (``allow_origins: https://app.example.com``).
- A route's ``cors`` overrides the top-level ``cors`` field by field: only the keys
  written in the route; everything else is inherited.
- Duplicate keys in one YAML mapping are an error (YAML would silently keep the
  last one), as is a second route with the same path (a trailing slash is ignored).
- Types are strict: ``allow_credentials: "true"`` (quoted) is a string, not a
  boolean. An unquoted ``null`` in ``allow_origins`` is YAML's null, so the error
  asks for ``"null"`` in quotes.
- Messages are sorted in file order (by the position of the key or item they are
  about); problems with no position (a missing key, a ``--upstream`` override)
  come first.
- Origins must be written the way browsers serialise them (lower case, no path
  or trailing slash, no default port), because matching is byte-exact; the error
  proposes the corrected value.
- ``upstream.url``: http or https, a host, an optional base path; no query,
  fragment or user:password (nothing would forward them meaningfully).
- ``listen.host`` is an address only: no scheme, no port, no IPv6 brackets.
- Warnings (risky but legal settings) never stop loading; they are returned in
  :attr:`Config.warnings` (and :attr:`ConfigError.warnings`) and printed by
  ``corsproxy check``: ``"null"`` in allow_origins, ``max_age`` over 7200, a regex
  that only Python ``re`` can run or that matches any origin, ``"*"`` in
  expose/allow headers or methods with credentials, a lower-case standard method,
  no origin allowed at all, no upstream URL.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
)
from pydantic_core import PydanticCustomError

from .core import CorsPolicy, CorsSettings, Router, compile_origin_regex, is_token

__all__ = [
    "Config",
    "ConfigError",
    "ListenConfig",
    "RouteConfig",
    "UpstreamConfig",
    "config_json_schema",
    "load_config",
    "parse_config",
]

# ---------------------------------------------------------------------------
# The frozen result (the interface the server and the CLI code against)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ListenConfig:
    """Where the proxy listens. ``port`` 0 picks any free port; ``max_body_size`` is
    in bytes (``None``: no limit); ``shutdown_grace`` is seconds for in-flight
    requests after SIGTERM; ``workers`` is the number of processes sharing the port
    (``0``, written ``auto`` in the file: one per CPU core)."""

    host: str = "127.0.0.1"
    port: int = 8080
    max_body_size: int | None = None
    shutdown_grace: float = 10.0
    workers: int = 1


@dataclass(frozen=True)
class UpstreamConfig:
    """The API behind the proxy. ``url`` may carry a base path; ``None`` only when the
    config was loaded without ``require_upstream`` (``run --upstream`` supplies it)."""

    url: str | None = None
    connect_timeout: float = 5.0
    timeout: float = 60.0
    preserve_host: bool = False


@dataclass(frozen=True)
class RouteConfig:
    """One ``routes`` entry: ``path`` as written, ``cors`` already merged over the
    top-level ``cors``."""

    path: str
    cors: CorsSettings


@dataclass(frozen=True)
class Config:
    """A validated config file. ``router`` is ready for ``decide()``.

    ``warnings`` holds lines in the same ``FILE: field.path: ...`` form as errors,
    for settings that are legal but risky (shown by ``corsproxy check``).
    """

    source: str
    listen: ListenConfig
    upstream: UpstreamConfig
    cors: CorsSettings
    routes: tuple[RouteConfig, ...]
    router: Router
    warnings: tuple[str, ...] = ()


class ConfigError(Exception):
    """The config can't be used. ``errors`` holds every problem found, one line each:
    ``FILE: field.path: what is wrong, and how to fix it``. ``warnings`` holds the
    warnings found on the way (may be empty)."""

    def __init__(self, errors: list[str], warnings: list[str] | tuple[str, ...] = ()) -> None:
        self.errors = list(errors)
        self.warnings = list(warnings)
        super().__init__("\n".join(self.errors))


# ---------------------------------------------------------------------------
# Field checks (raise PydanticCustomError so the message is used verbatim)
# ---------------------------------------------------------------------------


def _fail(message: str) -> PydanticCustomError:
    return PydanticCustomError("corsproxy", message.replace("{", "{{").replace("}", "}}"))


_SCHEME = re.compile(r"[a-z][a-z0-9+.\-]*")
_HOSTNAME = re.compile(
    r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?)*"
)
_IPV6 = re.compile(r"\[[0-9a-f:.]+\]")
_DEFAULT_PORTS = {"http": "80", "https": "443", "ws": "80", "wss": "443"}
_PATTERN_FIX = (
    'list the origins explicitly (e.g. "https://app.example.com"), '
    'or use a pattern like "https://*.example.com" or allow_origin_regex'
)


def _fixed_origin(value: str) -> str:
    """Best guess at the origin the user meant: lower case, no path, no default port."""
    v = "".join(value.split())
    if "://" not in v:
        v = "https://" + v.lstrip("/")
    scheme, rest = v.split("://", 1)
    scheme = scheme.lower()
    hostport = re.split(r"[/?#]", rest, maxsplit=1)[0].lower()
    hostport = hostport.rsplit("@", 1)[-1]
    if ":" in hostport and not hostport.endswith("]"):
        host, port = hostport.rsplit(":", 1)
        if port.isdigit() and str(int(port)) == _DEFAULT_PORTS.get(scheme):
            hostport = host
        elif port.isdigit():
            hostport = f"{host}:{int(port)}"
    return f"{scheme}://{hostport}"


def origin_problem(value: str) -> str | None:
    """Why ``value`` can't be an ``allow_origins`` entry (one sentence with the fix),
    or None when it is fine.

    Accepted: ``"*"``, ``"null"``, ``scheme://host[:port]`` exactly as a browser
    serialises an origin (lower case, no path, no default port), and the pattern
    ``scheme://*.host[:port]`` (one or more labels in place of ``*``).
    """
    if value in ("*", "null"):
        return None
    shown = json.dumps(value)
    if value == "":
        return 'is empty; write an origin like "https://app.example.com" or remove the entry'
    if any(c.isspace() for c in value):
        return (
            f"{shown} contains whitespace; an origin never does: "
            f"write {json.dumps(_fixed_origin(value))}"
        )
    scheme, _, rest = value.rpartition("://")
    hostport = re.split(r"[/?#]", rest, maxsplit=1)[0]
    after = rest[len(hostport) :]
    wildcard = hostport.startswith("*.")
    if "*" in scheme or "*" in (hostport[2:] if wildcard else hostport) or "*" in after:
        return (
            f'{shown}: "*" is only allowed as the whole value "*" or as a leading "*." label '
            f'after the scheme, e.g. "https://*.example.com" (for anything else use '
            f"allow_origin_regex)"
        )
    if "://" not in value:
        return f"{shown} needs a scheme, e.g. {json.dumps(_fixed_origin(value))}"
    fixed = _fixed_origin(value)
    if value != value.lower():
        return (
            f"{shown} has upper case letters; browsers send origins in lower case, so it "
            f"would never match: write {json.dumps(fixed)}"
        )
    if not _SCHEME.fullmatch(scheme):
        return f'{shown} has an invalid scheme; write e.g. "https://app.example.com"'
    if after == "/":
        return (
            f"{shown} has a trailing slash; browsers send origins without one: "
            f"write {json.dumps(fixed)}"
        )
    if after:
        what = "a path" if after.startswith("/") else "a query or fragment"
        return (
            f"{shown} has {what}; an origin is only scheme://host[:port]: write {json.dumps(fixed)}"
        )
    if "@" in hostport:
        return f"{shown} has a user name; an origin never does: write {json.dumps(fixed)}"
    host = hostport[2:] if wildcard else hostport
    port = None
    if host.startswith("["):
        end = host.find("]")
        if end != -1 and host[end + 1 :].startswith(":"):
            host, port = host[: end + 1], host[end + 2 :]
    elif ":" in host:
        host, port = host.rsplit(":", 1)
    if port is not None:
        if not port.isdigit() or not 0 < int(port) <= 65535:
            return f"{shown} has an invalid port {json.dumps(port)}; use 1-65535 or no port"
        if port == _DEFAULT_PORTS.get(scheme):
            return (
                f'{shown}: ":{port}" is the default port for {scheme} and browsers never '
                f"send it: write {json.dumps(fixed)}"
            )
        if str(int(port)) != port:
            return (
                f"{shown}: browsers send the port without leading zeros: write {json.dumps(fixed)}"
            )
    if not (_HOSTNAME.fullmatch(host) or (not wildcard and _IPV6.fullmatch(host))):
        return f'{shown} has an invalid host name; write e.g. "https://app.example.com"'
    return None


def _check_origin(value: str) -> str:
    problem = origin_problem(value)
    if problem is not None:
        raise _fail(problem)
    return value


def _check_regex(value: str | None) -> str | None:
    if value is None:
        return None
    if value == "":
        raise _fail(
            "is empty; write null for no regex, or a pattern such as "
            r'"https://[a-z0-9-]+\.example\.com"'
        )
    try:
        compile_origin_regex(value)
    except re.error as e:
        if str(e).startswith("RE2 "):  # valid for Python re, refused by the core: says why
            raise _fail(f"{json.dumps(value)}: {e}") from None
        raise _fail(
            f"{json.dumps(value)} is not a valid regular expression ({e}); fix the pattern, "
            r'e.g. "https://[a-z0-9-]+\.example\.com" (it must match the whole origin)'
        ) from None
    return value


def _check_method(value: str) -> str:
    if not is_token(value):
        raise _fail(
            f"{json.dumps(value)} is not a valid method name (an RFC 9110 token: letters, "
            "digits and !#$%&'*+-.^_`|~, no spaces or commas); write one method per list item, "
            "e.g. [GET, PUT]"
        )
    return value


def _check_header(value: str) -> str:
    if not is_token(value):
        raise _fail(
            f"{json.dumps(value)} is not a valid header name (an RFC 9110 token: letters, "
            "digits and !#$%&'*+-.^_`|~, no spaces or commas); write one header per list "
            "item, e.g. [Content-Type, X-Request-Id]"
        )
    return value


def _check_upstream_url(value: str | None) -> str | None:
    if value is None:
        return None
    shown = json.dumps(value)
    example = "http://127.0.0.1:8000"
    if not value or any(c.isspace() for c in value):
        raise _fail(f"{shown} is not a URL; write e.g. {example!r}".replace("'", '"'))
    if "://" not in value:
        raise _fail(f'{shown} needs a scheme: write "http://{value.lstrip("/")}"')
    parts = urlsplit(value)
    if parts.scheme.lower() not in ("http", "https"):
        raise _fail(
            f'{shown}: the scheme must be http or https, not "{parts.scheme}"; '
            f'write e.g. "{example}"'
        )
    if not parts.hostname:
        raise _fail(f'{shown} has no host; write e.g. "{example}"')
    if "@" in parts.netloc:
        raise _fail(f"{shown}: a user name or password in the URL is not supported; remove it")
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise _fail(f'{shown} has an invalid port; use 1-65535, e.g. "{example}"') from None
    if parts.query or value.endswith("?"):
        raise _fail(
            f"{shown} has a query; the upstream URL may carry a base path but no query: "
            f'remove "?{parts.query}"'
        )
    if parts.fragment or "#" in value:
        raise _fail(f'{shown} has a fragment; remove "#{parts.fragment}"')
    return value


def _check_listen_host(value: str) -> str:
    shown = json.dumps(value)
    if not value or any(c.isspace() for c in value):
        raise _fail(f'{shown} is not a host; write e.g. "127.0.0.1" (loopback) or "0.0.0.0" (all)')
    if "://" in value or "/" in value:
        host = urlsplit(value if "://" in value else "//" + value).hostname or "127.0.0.1"
        raise _fail(f'{shown} is a URL; listen.host takes an address only: write "{host}"')
    if value.startswith("[") and value.endswith("]"):
        raise _fail(f'{shown}: write the IPv6 address without brackets: "{value[1:-1]}"')
    if value.count(":") == 1:
        host, port = value.split(":")
        raise _fail(
            f'{shown} has a port; write host: "{host or "0.0.0.0"}" and put the port in '
            f"listen.port ({port})"
        )
    return value


def _check_route_path(value: str) -> str:
    shown = json.dumps(value)
    if not value.startswith("/"):
        raise _fail(f'{shown} must start with "/": write "/{value.lstrip("/")}"')
    if any(c.isspace() for c in value):
        raise _fail(f"{shown} contains whitespace; write the raw (percent-encoded) path")
    if "?" in value or "#" in value:
        base = re.split(r"[?#]", value, maxsplit=1)[0]
        raise _fail(f'{shown}: a route matches the request path without the query; write "{base}"')
    if "*" in value:
        base = value.split("*", 1)[0].rstrip("/") or "/"
        raise _fail(
            f'{shown}: route paths are prefixes, not patterns: write "{base}" (it matches '
            f'"{base}" and everything under it)'
        )
    return value


# ---------------------------------------------------------------------------
# Structure (pydantic models; also the JSON Schema)
# ---------------------------------------------------------------------------


#: Upper bound on listen.workers.
MAX_WORKERS = 512


def _auto_workers(value: Any) -> Any:
    """``workers: auto`` is stored as 0 (one process per CPU core)."""
    if value == "auto":
        return 0
    if isinstance(value, str):
        raise _fail(
            f"expected a whole number or auto, got the string {json.dumps(value)}; "
            f"for example: workers: 2 (or auto: one per CPU core)"
        )
    return value


def _one_item(value: Any) -> Any:
    """A single string where a list is expected is a one-item list."""
    return [value] if isinstance(value, str) else value


def _none_is_empty(value: Any) -> Any:
    """``cors:`` with nothing under it (YAML null) means "all defaults"."""
    return {} if value is None else value


def _none_is_empty_list(value: Any) -> Any:
    """``routes:`` with nothing under it means no routes."""
    return [] if value is None else value


def _str_list(check: Callable[[str], str]) -> Any:
    return Annotated[
        list[Annotated[str, AfterValidator(check)]],
        BeforeValidator(_one_item, json_schema_input_type=str | list[str]),
    ]


OriginList = _str_list(_check_origin)
MethodList = _str_list(_check_method)
HeaderList = _str_list(_check_header)

_STRICT = ConfigDict(extra="forbid", strict=True)


class ListenModel(BaseModel):
    """Where the proxy listens."""

    model_config = _STRICT

    host: Annotated[str, AfterValidator(_check_listen_host)] = Field(
        "127.0.0.1",
        description="Address to bind: 127.0.0.1 (loopback only), 0.0.0.0 (every IPv4 "
        "interface), ::1, :: ...",
    )
    port: int = Field(8080, ge=0, le=65535, description="TCP port; 0 picks any free port.")
    max_body_size: int | None = Field(
        None,
        gt=0,
        description="Largest request body in bytes (answered with 413 beyond it); "
        "null means no limit.",
        examples=[10485760],
    )
    shutdown_grace: float = Field(
        10.0,
        ge=0,
        allow_inf_nan=False,
        description="Seconds in-flight requests may finish after SIGTERM/SIGINT.",
    )
    workers: Annotated[
        int, BeforeValidator(_auto_workers, json_schema_input_type=int | Literal["auto"])
    ] = Field(
        1,
        ge=0,
        le=MAX_WORKERS,
        description="Processes serving the port (SO_REUSEPORT); auto (or 0) means one per "
        "CPU core.",
    )


class UpstreamModel(BaseModel):
    """The API behind the proxy."""

    model_config = _STRICT

    url: Annotated[str | None, AfterValidator(_check_upstream_url)] = Field(
        None,
        description="http or https URL of the upstream, may carry a base path "
        "(http://api:8000/v1). Required unless `corsproxy run --upstream URL` gives it.",
        examples=["http://127.0.0.1:8000"],
    )
    connect_timeout: float = Field(
        5.0, gt=0, allow_inf_nan=False, description="Seconds to connect (fractions allowed)."
    )
    timeout: float = Field(
        60.0,
        gt=0,
        allow_inf_nan=False,
        description="Seconds until the upstream's response headers (fractions allowed).",
    )
    preserve_host: bool = Field(
        False, description="true: forward the client's Host header instead of the upstream's."
    )


class CorsModel(BaseModel):
    """The CORS policy: Starlette CORSMiddleware's names and defaults."""

    model_config = _STRICT

    allow_origins: OriginList = Field(
        default=[],
        description='Allowed origins: exact "scheme://host[:port]" (lower case, no path, no '
        'default port), "*" (any origin; not with allow_credentials), patterns '
        '"https://*.example.com" (one or more subdomain labels, never the apex), or "null" '
        "(risky). A single string is a one-item list.",
        examples=[["https://app.example.com", "https://*.example.com"]],
    )
    allow_origin_regex: Annotated[str | None, AfterValidator(_check_regex)] = Field(
        None,
        description="Regular expression an origin must match in full (like re.fullmatch).",
        examples=[r"https://[a-z0-9-]+\.example\.com"],
    )
    allow_methods: MethodList = Field(
        default=["GET"],
        description="Methods a preflight may ask for, compared case-sensitively; "
        '"*" allows any method. (Simple GET, HEAD and POST requests send no preflight.)',
        examples=[["GET", "POST", "PUT", "DELETE"]],
    )
    allow_headers: HeaderList = Field(
        default=[],
        description="Request headers a preflight may ask for (case-insensitive); Accept, "
        'Accept-Language, Content-Language and Content-Type always are; "*" allows any.',
        examples=[["Authorization", "X-Request-Id"]],
    )
    allow_credentials: bool = Field(
        False, description="Allow cookies/HTTP auth (Access-Control-Allow-Credentials: true)."
    )
    expose_headers: HeaderList = Field(
        default=[],
        description="Response headers the page may read (Access-Control-Expose-Headers).",
        examples=[["X-Request-Id"]],
    )
    max_age: int = Field(
        600,
        ge=0,
        description="Seconds a browser may cache a preflight answer (0: no caching; "
        "Chromium caps at 7200).",
    )
    allow_private_network: bool = Field(
        False,
        description="Answer Access-Control-Request-Private-Network: true preflights "
        "(Private Network Access).",
    )
    enforce: bool = Field(
        False,
        description="Answer 403 to cross-origin requests from origins that are not allowed, "
        "instead of forwarding them without CORS headers.",
    )


def _route_cors_schema(schema: dict[str, Any]) -> None:
    # In a route every key is optional and inherits from the top-level cors.
    for prop in schema.get("properties", {}).values():
        prop.pop("default", None)


class RouteCorsModel(CorsModel):
    """A route's CORS overrides: only the keys written replace the top-level cors
    ones (field by field); the rest is inherited."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_route_cors_schema)


class RouteModel(BaseModel):
    """A path prefix with its own CORS overrides."""

    model_config = _STRICT

    path: Annotated[str, AfterValidator(_check_route_path)] = Field(
        description="Path prefix, matched on whole segments (/api matches /api and /api/x, "
        "not /apis); the longest matching route wins.",
        examples=["/api"],
    )
    cors: Annotated[
        RouteCorsModel,
        BeforeValidator(_none_is_empty, json_schema_input_type=RouteCorsModel | None),
    ] = Field(
        default_factory=RouteCorsModel,
        description="Overrides of the top-level cors keys for this path.",
    )


class ConfigModel(BaseModel):
    """corsproxy configuration file."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        title="corsproxy configuration",
        json_schema_extra={"$schema": "https://json-schema.org/draft/2020-12/schema"},
    )

    listen: Annotated[
        ListenModel, BeforeValidator(_none_is_empty, json_schema_input_type=ListenModel | None)
    ] = Field(default_factory=ListenModel, description="Where the proxy listens.")
    upstream: Annotated[
        UpstreamModel, BeforeValidator(_none_is_empty, json_schema_input_type=UpstreamModel | None)
    ] = Field(default_factory=UpstreamModel, description="The API behind the proxy.")
    cors: Annotated[
        CorsModel, BeforeValidator(_none_is_empty, json_schema_input_type=CorsModel | None)
    ] = Field(default_factory=CorsModel, description="The CORS policy for every path.")
    routes: Annotated[
        list[RouteModel],
        BeforeValidator(_none_is_empty_list, json_schema_input_type=list[RouteModel] | None),
    ] = Field(default=[], description="Per-path CORS overrides; the longest matching path wins.")


def config_json_schema() -> dict[str, Any]:
    """The JSON Schema of the config file (what ``corsproxy schema`` prints and
    ``corsproxy/config.schema.json`` holds)."""
    return ConfigModel.model_json_schema()


# ---------------------------------------------------------------------------
# Pydantic errors -> plain English
# ---------------------------------------------------------------------------

_EXAMPLES = {
    "listen": "listen: {host: 127.0.0.1, port: 8080}",
    "upstream": "upstream: {url: http://127.0.0.1:8000}",
    "cors": "cors: {allow_origins: [https://app.example.com]}",
    "routes": "routes: [{path: /api, cors: {allow_credentials: true}}]",
    "host": "host: 127.0.0.1",
    "port": "port: 8080",
    "max_body_size": "max_body_size: 10485760",
    "shutdown_grace": "shutdown_grace: 10",
    "workers": "workers: auto",
    "url": "url: http://127.0.0.1:8000",
    "connect_timeout": "connect_timeout: 5",
    "timeout": "timeout: 60",
    "preserve_host": "preserve_host: false",
    "allow_origins": "allow_origins: [https://app.example.com]",
    "allow_origin_regex": r'allow_origin_regex: "https://[a-z0-9-]+\.example\.com"',
    "allow_methods": "allow_methods: [GET, POST]",
    "allow_headers": "allow_headers: [Authorization, X-Request-Id]",
    "allow_credentials": "allow_credentials: true",
    "expose_headers": "expose_headers: [X-Request-Id]",
    "max_age": "max_age: 600",
    "allow_private_network": "allow_private_network: false",
    "enforce": "enforce: false",
    "path": "path: /api",
}

_STR_LISTS = ("allow_origins", "allow_methods", "allow_headers", "expose_headers")
_RANGE_HINTS = {
    "port": "0 picks any free port",
    "max_body_size": "it is in bytes; write null for no limit",
    "shutdown_grace": "seconds; 0 means stop at once",
    "workers": "processes; auto or 0 means one per CPU core",
    "connect_timeout": "seconds; fractions like 0.5 are fine",
    "timeout": "seconds; fractions like 0.5 are fine",
    "max_age": "seconds a browser may cache the preflight answer; 0 disables caching",
}

_EXPECTED = {
    "string_type": "expected a string",
    "bool_type": "expected true or false",
    "int_type": "expected a whole number",
    "float_type": "expected a number",
    "list_type": "expected a list",
    "model_type": "expected a mapping (key: value)",
    "dict_type": "expected a mapping (key: value)",
    "model_attributes_type": "expected a mapping (key: value)",
}


def _describe(value: Any) -> str:
    """A YAML value named the way the user wrote it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        shown = value if len(value) <= 60 else value[:60] + "..."
        return f"the string {json.dumps(shown)}"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _path(loc: tuple[Any, ...]) -> str:
    """``("routes", 0, "cors")`` -> ``routes[0].cors``; odd keys are quoted."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_KEY.fullmatch(str(part)):
            out += ("." if out else "") + str(part)
        else:
            out += f"[{json.dumps(str(part))}]"
    return out


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model that owns the mapping at ``loc`` (for "allowed keys" lists)."""
    model: type[BaseModel] = ConfigModel
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        if part == "routes":
            model = RouteModel
        elif part == "cors":
            model = RouteCorsModel if model is RouteModel else CorsModel
        elif part in ("listen", "upstream"):
            model = ListenModel if part == "listen" else UpstreamModel
        else:
            return None
    return model


def _field_name(loc: tuple[Any, ...]) -> str | None:
    names = [p for p in loc if isinstance(p, str)]
    return names[-1] if names else None


def _english(err: Mapping[str, Any]) -> tuple[tuple[Any, ...], str]:
    """One pydantic error as (loc, message with the fix)."""
    kind = err["type"]
    loc = tuple(err["loc"])
    value = err.get("input")
    ctx = err.get("ctx") or {}
    name = _field_name(loc)
    example = _EXAMPLES.get(name or "", "")
    for_example = f"; for example: {example}" if example else ""

    if kind == "corsproxy":
        return loc, err["msg"]
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1])
        allowed = list(model.model_fields) if model else []
        key = str(loc[-1])
        hint = difflib.get_close_matches(key, allowed, n=1)
        maybe = f"did you mean {hint[0]}? " if hint else ""
        return loc, f"unknown key; {maybe}allowed keys here: {', '.join(allowed)}"
    if kind == "invalid_key":
        model = _model_at(loc[:-1])
        allowed = ", ".join(model.model_fields) if model else "names"
        return loc[:-1], f"{_describe(value)} is not a valid key; allowed keys here: {allowed}"
    if kind == "missing":
        return loc, f"is missing; add it, for example: {example}"
    if kind in _EXPECTED:
        expected = _EXPECTED[kind]
        if kind == "list_type" and name in _STR_LISTS:
            expected = "expected a list (or a single string)"
        if isinstance(loc[-1], int) and name == "routes":
            got = _describe(value)
            return loc, f"expected a mapping with path and cors, got {got}{for_example}"
        if value is None and name == "allow_origins":
            return loc, (
                'got null; to allow the "null" origin (sandboxed iframes, file: pages) write it '
                'in quotes: "null"'
            )
        if kind == "float_type" and name in _RANGE_HINTS:
            expected = f"expected a number ({_RANGE_HINTS[name]})"
        return loc, f"{expected}, got {_describe(value)}{for_example}"
    if kind in ("greater_than", "greater_than_equal", "less_than_equal", "less_than"):
        bound = next(iter(ctx.values()), "?")
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)
        rule = {
            "greater_than": f"must be more than {bound}",
            "greater_than_equal": f"must be {bound} or more",
            "less_than_equal": f"must be at most {bound}",
            "less_than": f"must be less than {bound}",
        }[kind]
        hint = _RANGE_HINTS.get(name or "")
        hint = f" ({hint})" if hint else ""
        return loc, f"{rule}, got {value}{hint}{for_example}"
    if kind == "finite_number":
        return loc, f"must be a finite number, got {value}{for_example}"
    return loc, f"{err['msg']}{for_example}"  # pragma: no cover - a type we did not map


# ---------------------------------------------------------------------------
# YAML
# ---------------------------------------------------------------------------

Loc = tuple[Any, ...]


@dataclass
class _Document:
    """A parsed YAML file: the data, where each key and item is (for sorting the
    messages in file order), and the duplicate keys found."""

    data: Any
    positions: dict[Loc, tuple[int, int]]
    duplicates: list[tuple[Loc, str]]


def _yaml_error(source: str, e: yaml.YAMLError, text: str) -> str:
    if isinstance(e, yaml.reader.ReaderError):  # a character YAML does not allow
        line = text.count("\n", 0, e.position) + 1
        column = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        return (
            f"{source}: line {line}, column {column}: YAML syntax error: character "
            f"U+{e.character:04X} is not allowed in YAML; remove it"
        )
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
    context = getattr(e, "context", None)
    context_mark = getattr(e, "context_mark", None)
    extra = ""
    if context and context_mark is not None:
        extra = f" ({context} at line {context_mark.line + 1})"
    elif context:
        extra = f" ({context})"
    fix = "fix the YAML syntax there"
    if "\\t" in problem or "\t" in problem:
        fix = "indent with spaces, not tabs"
    elif "expected a single document" in problem:
        fix = "keep a single document in the file (remove the extra ---)"
    return f"{source}: {where}: YAML syntax error: {problem}{extra}; {fix}"


def _walk(node: yaml.Node, loc: Loc, doc: _Document) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            here = (*loc, key_node.value)
            line = key_node.start_mark.line + 1
            if key_node.value in seen:
                doc.duplicates.append(
                    (
                        here,
                        f"written twice (lines {seen[key_node.value]} and {line}); YAML keeps "
                        f"only the last one, so remove one or merge them",
                    )
                )
            else:
                seen[key_node.value] = line
                doc.positions[here] = (key_node.start_mark.line, key_node.start_mark.column)
            _walk(value_node, here, doc)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            doc.positions[(*loc, i)] = (item.start_mark.line, item.start_mark.column)
            _walk(item, (*loc, i), doc)


def _read_yaml(text: str, source: str) -> _Document:
    """Parse ``text``; a syntax error raises :class:`ConfigError` at once (nothing
    else can be checked then)."""
    loader = None
    try:
        loader = yaml.SafeLoader(text)
        node = loader.get_single_node()
        doc = _Document(None, {}, [])
        if node is not None:
            _walk(node, (), doc)
            doc.data = loader.construct_document(node)
    except yaml.YAMLError as e:
        raise ConfigError([_yaml_error(source, e, text)]) from None
    except RecursionError:
        raise ConfigError(
            [f"{source}: YAML: the document is nested too deeply; flatten it"]
        ) from None
    finally:
        if loader is not None:
            loader.dispose()
    return doc


# ---------------------------------------------------------------------------
# Merging and cross-field checks
# ---------------------------------------------------------------------------

_CORS_FIELDS = tuple(CorsModel.model_fields)
_CORS_DEFAULTS = {name: getattr(CorsModel(), name) for name in _CORS_FIELDS}
_BAD = object()  # stands for an invalid list item, so indexes stay those of the file


def _valid_fields(section: Any) -> dict[str, Any]:
    """The keys written in a cors mapping whose value is valid on its own.

    Validates one field at a time (and, for a list with a bad item, one item at a
    time, the bad ones kept as a placeholder), so a broken value doesn't hide the
    merged checks and warnings of the others, nor cause false ones (a broken
    allow_origins is not an empty one).
    """
    if not isinstance(section, dict):
        return {}
    good: dict[str, Any] = {}
    for name in _CORS_FIELDS:
        if name not in section:
            continue
        value = section[name]
        try:
            good[name] = getattr(CorsModel.model_validate({name: value}), name)
        except ValidationError:
            value = _one_item(value)
            if name in _STR_LISTS:
                items = []
                for item in value if isinstance(value, list) else [value]:
                    try:
                        items.append(getattr(CorsModel.model_validate({name: [item]}), name)[0])
                    except ValidationError:
                        items.append(_BAD)
                good[name] = items
            elif name == "allow_origin_regex":
                good[name] = _BAD  # written, but broken: not "no regex"
    return good


def _star_with_credentials(
    where: Loc, written: dict[str, Any], merged: dict[str, Any]
) -> tuple[Loc, str] | None:
    """The error for ``"*"`` in allow_origins with allow_credentials true, on the key
    this section wrote (None when a route wrote neither: the top-level error covers
    it)."""
    if "*" not in merged["allow_origins"] or merged["allow_credentials"] is not True:
        return None
    why = (
        "because that would let every website read responses with the user's cookies; "
        f"{_PATTERN_FIX}, or set allow_credentials: false"
    )
    if "allow_origins" in written:
        index = written["allow_origins"].index("*")
        source = where if "allow_credentials" in written else ("cors",)
        return (
            (*where, "allow_origins", index),
            f'"*" cannot be combined with allow_credentials: true (set in '
            f"{_path((*source, 'allow_credentials'))}), {why}",
        )
    if "allow_credentials" in written:
        return (
            (*where, "allow_credentials"),
            f'true cannot be combined with "*" in allow_origins (inherited from '
            f"cors.allow_origins), {why}",
        )
    return None


_STAR_WITH_CREDENTIALS = {
    "expose_headers": "is a literal header name in Access-Control-Expose-Headers when "
    "credentials are allowed, so it exposes nothing; list the header names to expose",
    "allow_headers": "is literal for browsers on credentialed requests, so corsproxy echoes "
    "the requested header names instead: this works, but allows every header; list the "
    "names if you can",
    "allow_methods": "is literal for browsers on credentialed requests, so corsproxy echoes "
    "the requested method instead: this works, but allows every method; list the methods "
    "if you can",
}
_FETCH_UPPERCASED = ("DELETE", "GET", "HEAD", "OPTIONS", "POST", "PUT")

#: Methods the proxy's HTTP parser (llhttp, inside aiohttp's server) accepts on a
#: request line; it answers any other method (lower case included) with its own 400
#: before corsproxy sees the request. tests/test_method_support.py checks this list
#: against a live proxy, so it can't go stale.
RECEIVABLE_METHODS = frozenset(
    "ACL BIND CHECKOUT COPY DELETE GET HEAD LINK LOCK M-SEARCH MERGE MKACTIVITY "
    "MKCALENDAR MKCOL MOVE NOTIFY OPTIONS PATCH POST PROPFIND PROPPATCH PURGE PUT QUERY "
    "REBIND REPORT SEARCH SOURCE SUBSCRIBE TRACE UNBIND UNLINK UNLOCK UNSUBSCRIBE".split()
)


def _policy_warnings(
    where: Loc, written: dict[str, Any], merged: dict[str, Any]
) -> list[tuple[Loc, str]]:
    """Warnings for one cors section, on the keys it wrote (a route repeats nothing
    it inherited unchanged from the top level)."""
    top = where == ("cors",)
    out: list[tuple[Loc, str]] = []
    for i, origin in enumerate(written.get("allow_origins", [])):
        if origin == "null":
            out.append(
                (
                    (*where, "allow_origins", i),
                    '"null" trusts every sandboxed iframe, data: and file: page on the web '
                    "(they all send Origin: null); remove it unless you really mean that",
                )
            )
    if written.get("max_age", 0) > 7200:
        out.append(
            (
                (*where, "max_age"),
                f"{written['max_age']} is above 7200; Chromium caps the preflight cache at "
                f"7200 seconds (Firefox at 86400)",
            )
        )
    regex = written.get("allow_origin_regex")
    if isinstance(regex, str) and regex:
        compiled = compile_origin_regex(regex)
        if compiled.fullmatch("https://corsproxy-check.invalid"):
            out.append(
                (
                    (*where, "allow_origin_regex"),
                    'the pattern matches any https origin (it matched "https://corsproxy-check'
                    '.invalid"); anchor it to your domain, e.g. '
                    r'"https://[a-z0-9-]+\.example\.com"',
                )
            )
    if merged["allow_credentials"] is True:
        touched = top or "allow_credentials" in written
        for key, what in _STAR_WITH_CREDENTIALS.items():
            if "*" in merged[key] and (touched or key in written):
                out.append(((*where, key), f'"*" with allow_credentials: true {what}'))
    for i, method in enumerate(written.get("allow_methods", [])):
        upper = method.upper() if isinstance(method, str) else None
        if method != upper and upper in _FETCH_UPPERCASED:
            out.append(
                (
                    (*where, "allow_methods", i),
                    f"{json.dumps(method)} never matches: fetch() sends {upper} in upper case "
                    f"and methods compare case-sensitively; write {upper}",
                )
            )
        elif isinstance(method, str) and method != "*" and method not in RECEIVABLE_METHODS:
            out.append(
                (
                    (*where, "allow_methods", i),
                    f"{json.dumps(method)}: a preflight for it is answered, but the request "
                    f"itself gets a 400 without CORS headers from the proxy's HTTP parser, "
                    f"which only accepts registered methods (e.g. PATCH, PURGE, PROPFIND); "
                    f"use one of those",
                )
            )
    wrote_origins = "allow_origins" in written or "allow_origin_regex" in written
    if (top or wrote_origins) and not merged["allow_origins"] and not merged["allow_origin_regex"]:
        out.append(
            (
                (*where, "allow_origins"),
                "empty and no allow_origin_regex, so no origin is allowed (as with Starlette's "
                "defaults); add the origins of your web app, e.g. "
                "allow_origins: [https://app.example.com]",
            )
        )
    return out


def _settings(values: dict[str, Any]) -> CorsSettings:
    return CorsSettings(
        allow_origins=tuple(values["allow_origins"]),
        allow_origin_regex=values["allow_origin_regex"],
        allow_methods=tuple(values["allow_methods"]),
        allow_headers=tuple(values["allow_headers"]),
        allow_credentials=values["allow_credentials"],
        expose_headers=tuple(values["expose_headers"]),
        max_age=values["max_age"],
        allow_private_network=values["allow_private_network"],
        enforce=values["enforce"],
    )


def _route_problems(
    raw: dict[str, Any], top_merged: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[tuple[Loc, str]], list[tuple[Loc, str]]]:
    """Merge every route over the top-level cors; (merged values, errors, warnings)."""
    raw_routes = raw.get("routes")
    merged_routes: list[dict[str, Any]] = []
    errors: list[tuple[Loc, str]] = []
    warnings: list[tuple[Loc, str]] = []
    seen_paths: dict[str, int] = {}
    for i, route in enumerate(raw_routes if isinstance(raw_routes, list) else []):
        route = route if isinstance(route, dict) else {}
        where = ("routes", i, "cors")
        written = _valid_fields(route.get("cors"))
        merged = {**top_merged, **written}
        merged_routes.append(merged)
        problem = _star_with_credentials(where, written, merged)
        if problem:
            errors.append(problem)
        warnings += _policy_warnings(where, written, merged)
        path = route.get("path")
        if isinstance(path, str) and path.startswith("/"):
            key = path.rstrip("/")
            if key in seen_paths:
                errors.append(
                    (
                        ("routes", i, "path"),
                        f"{json.dumps(path)} is the same route as routes[{seen_paths[key]}] "
                        f"(a trailing slash is ignored); merge the two routes",
                    )
                )
            else:
                seen_paths[key] = i
    return merged_routes, errors, warnings


# ---------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------

_OVERRIDES = (
    ("upstream", "url", "upstream", "--upstream"),
    ("listen", "host", "host", "--host"),
    ("listen", "port", "port", "--port"),
)


def parse_config(
    text: str,
    source: str = "<string>",
    *,
    upstream: str | None = None,
    host: str | None = None,
    port: int | None = None,
    require_upstream: bool = False,
) -> Config:
    """Validate config ``text`` (YAML) into a :class:`Config`.

    ``source`` names the file in messages. ``upstream``/``host``/``port`` override
    ``upstream.url``/``listen.host``/``listen.port`` (the ``run`` flags; their errors
    are reported as e.g. ``upstream.url (from --upstream)``). ``require_upstream``
    makes a missing upstream URL an error. Raises :class:`ConfigError` with every
    problem found, in file order.
    """
    doc = _read_yaml(text, source)
    raw = {} if doc.data is None else doc.data
    if not isinstance(raw, dict):
        raise ConfigError(
            [
                f"{source}: top level: expected a mapping of sections (listen, upstream, cors, "
                f"routes), got {_describe(raw)}; see config/development.yaml for an example"
            ]
        )
    errors: list[tuple[Loc, str]] = list(doc.duplicates)
    warnings: list[tuple[Loc, str]] = []

    flags: dict[Loc, str] = {}
    values = {"upstream": upstream, "host": host, "port": port}
    for section, key, name, flag in _OVERRIDES:
        part = raw.get(section)
        if values[name] is not None and isinstance(part, dict | None):
            raw[section] = {**(part or {}), key: values[name]}
            flags[(section, key)] = flag

    model: ConfigModel | None = None
    try:
        model = ConfigModel.model_validate(raw)
    except ValidationError as e:
        errors += [_english(err) for err in e.errors(include_url=False)]

    # Merged checks, on every value that is valid by itself.
    top_written = _valid_fields(raw.get("cors"))
    top_merged = {**_CORS_DEFAULTS, **top_written}
    problem = _star_with_credentials(("cors",), top_written, top_merged)
    if problem:
        errors.append(problem)
    warnings += _policy_warnings(("cors",), top_written, top_merged)
    merged_routes, route_errors, route_warnings = _route_problems(raw, top_merged)
    errors += route_errors
    warnings += route_warnings

    if model is not None and model.upstream.url is None:
        if require_upstream:
            errors.append(
                (
                    ("upstream", "url"),
                    "not set; add upstream: {url: http://127.0.0.1:8000} to the file or pass "
                    "--upstream URL",
                )
            )
        else:
            warnings.append(
                (
                    ("upstream", "url"),
                    "not set; only `corsproxy run --upstream URL` can start this config",
                )
            )

    def lines(problems: list[tuple[Loc, str]]) -> list[str]:
        def position(item: tuple[Loc, str]) -> tuple[int, int]:
            loc = item[0]
            for n in range(len(loc), 0, -1):
                if loc[:n] in doc.positions:
                    return doc.positions[loc[:n]]
            return (-1, -1)

        out = []
        for loc, message in sorted(problems, key=position):
            path = _path(loc) or "top level"
            if loc in flags:
                path += f" (from {flags[loc]})"
            out.append(f"{source}: {path}: {message}")
        return out

    if errors or model is None:
        raise ConfigError(lines(errors), lines(warnings))

    cors = _settings(top_merged)
    routes = tuple(
        RouteConfig(path=r.path, cors=_settings(m))
        for r, m in zip(model.routes, merged_routes, strict=True)
    )
    router = Router(CorsPolicy(cors), [(r.path, CorsPolicy(r.cors)) for r in routes])
    lm, um = model.listen, model.upstream
    return Config(
        source=source,
        listen=ListenConfig(
            lm.host, lm.port, lm.max_body_size, float(lm.shutdown_grace), lm.workers
        ),
        upstream=UpstreamConfig(
            um.url, float(um.connect_timeout), float(um.timeout), um.preserve_host
        ),
        cors=cors,
        routes=routes,
        router=router,
        warnings=tuple(lines(warnings)),
    )


def load_config(
    path: str | os.PathLike[str],
    *,
    upstream: str | None = None,
    host: str | None = None,
    port: int | None = None,
    require_upstream: bool = False,
) -> Config:
    """Read and validate the config file at ``path`` (see :func:`parse_config`).

    An unreadable file or one that is not UTF-8 raises :class:`ConfigError` too.
    """
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            data = f.read()
    except OSError as e:
        reason = e.strerror or str(e)
        raise ConfigError(
            [
                f"{source}: cannot read the config file ({reason}); check the path "
                f"(--config or CORSPROXY_CONFIG)"
            ]
        ) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(
            [
                f"{source}: line {line}, column {column}: the file is not UTF-8 text (byte "
                f"0x{data[e.start]:02x}); save it as UTF-8"
            ]
        ) from None
    return parse_config(
        text,
        source,
        upstream=upstream,
        host=host,
        port=port,
        require_upstream=require_upstream,
    )
