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

Where the parts live (private modules; none of them imports this one):

- this module: the frozen result (:class:`Config` and its parts, :class:`ConfigError`),
  the pydantic models and :func:`config_json_schema`, merging the routes over the
  top-level ``cors`` with the cross-field errors and the warnings, and the entry
  points :func:`parse_config` and :func:`load_config`;
- ``corsproxy/_config_checks.py``: the checks of single values (origins with
  :func:`origin_problem`, the origin regex, method and header names, the upstream
  URL, ``listen.host``, route paths);
- ``corsproxy/_config_messages.py``: pydantic errors turned into plain-English
  lines, and field paths spelled as in the file (``routes[0].cors``);
- ``corsproxy/_config_yaml.py``: reading the YAML with the position of every key
  and item, duplicate keys, and syntax errors as one line.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)

from ._config_checks import (
    _PATTERN_FIX,
    _check_header,
    _check_listen_host,
    _check_method,
    _check_network,
    _check_origin,
    _check_regex,
    _check_route_path,
    _check_upstream_url,
    _fail,
)
from ._config_checks import origin_problem as origin_problem  # public, re-exported
from ._config_messages import _STR_LISTS, _describe, _english, _path
from ._config_yaml import Loc, _read_yaml, _YamlError
from .core import CorsPolicy, CorsSettings, Router, compile_origin_regex

__all__ = [
    "AdminConfig",
    "Config",
    "ConfigError",
    "ListenConfig",
    "LogConfig",
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
    (``0``, written ``auto`` in the file and the default: one per CPU this process
    may use, see :mod:`corsproxy.cpus`)."""

    host: str = "127.0.0.1"
    port: int = 8080
    max_body_size: int | None = None
    shutdown_grace: float = 10.0
    workers: int = 0
    header_timeout: float = 10.0
    keepalive_timeout: float = 75.0
    body_timeout: float = 60.0
    send_timeout: float = 60.0
    max_header_size: int = 32768
    tls: TlsConfig | None = None
    #: Networks (``ipaddress`` objects) whose X-Forwarded-For/-Proto/-Host are kept.
    trusted_proxies: tuple[Any, ...] = ()


@dataclass(frozen=True)
class UpstreamConfig:
    """The API behind the proxy. ``url`` may carry a base path; ``None`` only when the
    config was loaded without ``require_upstream`` (``run --upstream`` supplies it)."""

    url: str | None = None
    connect_timeout: float = 5.0
    timeout: float = 60.0
    preserve_host: bool = False
    max_connections: int = 1024
    idle_timeout: float = 30.0
    read_timeout: float | None = 60.0
    ca_file: str | None = None
    tls_insecure_skip_verify: bool = False


@dataclass(frozen=True)
class TlsConfig:
    """``listen.tls``: absolute paths of the PEM certificate chain and key."""

    cert_file: str
    key_file: str


@dataclass(frozen=True)
class UpstreamTimeouts:
    """A route's own upstream timeouts (``routes[].upstream``); None in a field
    means "inherit", except ``read_timeout`` whose None is "no limit" once set
    (``read_timeout_set`` says whether the route wrote it)."""

    timeout: float | None = None
    read_timeout: float | None = None
    read_timeout_set: bool = False


@dataclass(frozen=True)
class AdminConfig:
    """``admin``: the listener for /healthz, /readyz, /metrics and /denied
    (``corsproxy.admin``); ``port`` None turns it off, 0 picks any free port.
    ``ready_checks_upstream``: /readyz also needs a TCP connect to the upstream."""

    host: str = "127.0.0.1"
    port: int | None = 9901
    ready_checks_upstream: bool = False


@dataclass(frozen=True)
class LogConfig:
    """``log``: the format of every line, whether requests are logged, and where
    (``file`` None: stderr; otherwise an absolute path, opened for appending and
    reopened on SIGUSR1)."""

    format: str = "text"
    access: bool = True
    file: str | None = None


@dataclass(frozen=True)
class WebSocketConfig:
    """``websocket``: ``idle_timeout`` seconds of silence both ways close a tunnel."""

    idle_timeout: float = 300.0


@dataclass(frozen=True)
class RouteConfig:
    """One ``routes`` entry: ``path`` as written, ``cors`` already merged over the
    top-level ``cors``."""

    path: str
    cors: CorsSettings
    upstream: UpstreamTimeouts | None = None


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
    websocket: WebSocketConfig = WebSocketConfig()
    admin: AdminConfig = AdminConfig()
    log: LogConfig = LogConfig()
    #: Other files the config reads (allow_origins_file), absolute: a reload
    #: watches them too.
    watched_files: tuple[str, ...] = ()


class ConfigError(Exception):
    """The config can't be used. ``errors`` holds every problem found, one line each:
    ``FILE: field.path: what is wrong, and how to fix it``. ``warnings`` holds the
    warnings found on the way (may be empty)."""

    def __init__(self, errors: list[str], warnings: list[str] | tuple[str, ...] = ()) -> None:
        self.errors = list(errors)
        self.warnings = list(warnings)
        super().__init__("\n".join(self.errors))

    def report(self) -> list[str]:
        """What a command prints (stderr) for an unusable config: every error, every
        warning (``warning: ...``), and a last line with the count."""
        n = len(self.errors)
        return [*self.errors, *(f"warning: {w}" for w in self.warnings),
                f"{n} error{'s' if n != 1 else ''}; corsproxy did not use this config"]


# ---------------------------------------------------------------------------
# Structure (pydantic models; also the JSON Schema)
# ---------------------------------------------------------------------------


#: Upper bound on listen.workers.
MAX_WORKERS = 512


def _auto_workers(value: Any) -> Any:
    """``workers: auto`` is stored as 0 (one process per usable CPU)."""
    if value == "auto":
        return 0
    if isinstance(value, str):
        raise _fail(
            f"expected a whole number or auto, got the string {json.dumps(value)}; "
            f"for example: workers: 2 (or auto: one per usable CPU)"
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


def _one_regex(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """``allow_origin_regex``: a single pattern is a one-item list, checked as a
    whole so its error is on the key itself (``cors.allow_origin_regex``); list
    items are checked one by one (``cors.allow_origin_regex[1]``)."""
    if isinstance(value, str):
        return [_check_regex(value)]
    return handler(value)


RegexList = Annotated[
    list[Annotated[str, AfterValidator(_check_regex)]] | None,
    WrapValidator(_one_regex, json_schema_input_type=str | list[str] | None),
]

_STRICT = ConfigDict(extra="forbid", strict=True)


class TlsModel(BaseModel):
    """Serve HTTPS: a PEM certificate chain and its private key."""

    model_config = _STRICT

    cert_file: str = Field(
        description="PEM certificate chain (leaf first), relative to the config file.",
        examples=["tls/cert.pem"],
    )
    key_file: str = Field(
        description="PEM private key of the certificate, relative to the config file.",
        examples=["tls/key.pem"],
    )


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
        0,
        ge=0,
        le=MAX_WORKERS,
        description="Processes serving the port (SO_REUSEPORT); auto (or 0, the default) "
        "means one per CPU this process may use: its affinity mask and its cgroup CPU quota "
        "(a container limited to 2 CPUs runs 2).",
        json_schema_extra={"default": "auto"},
    )
    header_timeout: float = Field(
        10.0, gt=0, allow_inf_nan=False,
        description="Seconds a client has to send a whole request head (from the connection's "
        "start or its first byte after an idle spell); then 408 and close. Protects against "
        "silent and slowloris clients.",
    )
    keepalive_timeout: float = Field(
        75.0, gt=0, allow_inf_nan=False,
        description="Seconds an idle keep-alive client connection is kept open.",
    )
    body_timeout: float = Field(
        60.0, gt=0, allow_inf_nan=False,
        description="Seconds of silence allowed while a request body is being received; "
        "then 408 and close (the upstream never sees a complete request).",
    )
    send_timeout: float = Field(
        60.0, gt=0, allow_inf_nan=False,
        description="Seconds a client may take none of the response; then the connection "
        "is aborted (and the upstream connection dropped).",
    )
    max_header_size: int = Field(
        32768, ge=1024, le=1048576,
        description="Largest request head (request line and headers) in bytes; beyond it "
        "431 and close.",
    )
    tls: TlsModel | None = Field(
        None,
        description="Serve HTTPS (TLS 1.2 or later) with this certificate; the files are "
        "read again on every reload (certificate rotation).",
    )
    trusted_proxies: list[Annotated[str, AfterValidator(_check_network)]] = Field(
        [],
        description="Addresses or CIDR ranges of load balancers in front of the proxy. A "
        "request from one of them keeps its X-Forwarded-For/-Proto/-Host, its scheme for "
        "same-origin checks follows X-Forwarded-Proto, and the access log names the client "
        "from X-Forwarded-For. Everyone else's X-Forwarded-Proto/-Host are replaced.",
        examples=[["10.0.0.0/8", "127.0.0.1"]],
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
    ca_file: str | None = Field(
        None,
        description="PEM file of the CA(s) to trust for an https upstream (a private CA), "
        "instead of the system's; relative to the config file.",
    )
    tls_insecure_skip_verify: bool = Field(
        False,
        description="true: accept any certificate from an https upstream (no CA or host "
        "name check). Only for tests; check warns.",
    )
    max_connections: int = Field(
        1024, ge=1, le=1000000,
        description="Open upstream connections per worker at most; a request beyond it waits "
        "up to connect_timeout for a free one, then gets 503.",
    )
    idle_timeout: float = Field(
        30.0, gt=0, allow_inf_nan=False,
        description="Seconds an idle pooled upstream connection is kept.",
    )
    read_timeout: float | None = Field(
        60.0, gt=0, allow_inf_nan=False,
        description="Longest silence between two pieces of a response body, in seconds; "
        "null: no limit (Server-Sent Events, long polls).",
    )


class RouteUpstreamModel(BaseModel):
    """A route's own upstream timeouts (the URL stays the top-level one)."""

    model_config = _STRICT

    timeout: float | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="Seconds until the response headers (default: inherited).",
    )
    read_timeout: float | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="Longest silence between two body pieces; null: no limit (default: "
        "inherited).",
    )


class WebSocketModel(BaseModel):
    """WebSocket tunnels."""

    model_config = _STRICT

    idle_timeout: float = Field(
        300.0, gt=0, allow_inf_nan=False,
        description="Seconds of silence in both directions after which a tunnel is closed.",
    )


class LogModel(BaseModel):
    """What the proxy logs, how, and where."""

    model_config = _STRICT

    format: Literal["text", "json"] = Field(
        "text", description="text (one key=value line) or json (one object per line); "
        "`run --log-format` overrides it.",
    )
    access: bool = Field(
        True, description="false: no access line per request (events and errors still go).",
    )
    file: str | None = Field(
        None,
        description="Append every line to this file instead of stderr (relative to the "
        "config file); SIGUSR1 reopens it, for logrotate.",
        examples=["/var/log/corsproxy/access.log"],
    )


class AdminModel(BaseModel):
    """The admin listener: /healthz, /readyz, /metrics, /denied."""

    model_config = _STRICT

    host: Annotated[str, AfterValidator(_check_listen_host)] = Field(
        "127.0.0.1",
        description="Address of the admin listener; keep it on loopback (or a private "
        "network): /metrics and /denied tell anyone who asks about your traffic.",
    )
    port: int | None = Field(
        9901, ge=0, le=65535,
        description="TCP port of the admin listener; null turns it off, 0 picks any free port.",
    )
    ready_checks_upstream: bool = Field(
        False,
        description="true: /readyz also answers 503 while a TCP connect to the upstream fails "
        "(within upstream.connect_timeout; checked at most once a second).",
    )


class CorsModel(BaseModel):
    """The CORS policy: Starlette CORSMiddleware's names and defaults."""

    model_config = _STRICT

    allow_origins: OriginList = Field(
        default=[],
        description='Allowed origins: exact "scheme://host[:port]" (lower case, no path, no '
        'default port), "*" (any origin; not with allow_credentials), patterns '
        '"https://*.example.com" (one or more subdomain labels, never the apex), port '
        'wildcards "http://localhost:*" and "https://*.example.com:*" (any explicit port '
        "1-65535; never the origin without a port, so list that too if you need it), or "
        '"null" (risky). A single string is a one-item list.',
        examples=[["https://app.example.com", "https://*.example.com", "http://localhost:*"]],
    )
    allow_origin_regex: RegexList = Field(
        None,
        description="Regular expression an origin must match in full (like re.fullmatch; "
        "RE2 syntax, linear time), or a list of them: an origin matches when any one does. "
        "A single string is a one-item list; null or [] means none.",
        examples=[
            r"https://[a-z0-9-]+\.example\.com",
            [r"https://[a-z0-9-]+\.example\.com", r"https://[a-z0-9-]+\.example\.org"],
        ],
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
    allow_origins_file: str | None = Field(
        None,
        description="A file of more allowed origins, one per line (# starts a comment), "
        "added to allow_origins; relative to the config file. Watched and reloaded like the "
        "config file.",
        examples=["origins.txt"],
    )
    check_websocket_origin: bool = Field(
        True,
        description="Answer 403 to WebSocket handshakes from cross-origin pages whose origin "
        "is not allowed (browsers enforce nothing on WebSockets); false forwards them.",
    )
    report_only: bool = Field(
        False,
        description="Report, don't enforce: forward every request (preflights included) and "
        "pass the upstream's own Access-Control-* headers through unchanged; log and count "
        "where this policy would have answered differently (the access line's report field).",
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
    upstream: RouteUpstreamModel | None = Field(
        None,
        description="This path's own upstream timeouts (timeout, read_timeout); the URL "
        "stays the top-level one.",
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
    websocket: Annotated[
        WebSocketModel,
        BeforeValidator(_none_is_empty, json_schema_input_type=WebSocketModel | None),
    ] = Field(default_factory=WebSocketModel, description="WebSocket tunnels.")
    admin: Annotated[
        AdminModel,
        BeforeValidator(_none_is_empty, json_schema_input_type=AdminModel | None),
    ] = Field(
        default_factory=AdminModel,
        description="The admin listener: health, readiness, Prometheus metrics, denied origins.",
    )
    log: Annotated[
        LogModel,
        BeforeValidator(_none_is_empty, json_schema_input_type=LogModel | None),
    ] = Field(default_factory=LogModel, description="Logging: format, access lines, file.")


def config_json_schema() -> dict[str, Any]:
    """The JSON Schema of the config file (what ``corsproxy schema`` prints and
    ``corsproxy/config.schema.json`` holds)."""
    return ConfigModel.model_json_schema()


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
        elif part == "upstream" and model is RouteModel:
            model = RouteUpstreamModel
        elif part == "websocket":
            model = WebSocketModel
        elif part == "admin":
            model = AdminModel
        elif part == "log":
            model = LogModel
        elif part in ("listen", "upstream"):
            model = ListenModel if part == "listen" else UpstreamModel
        else:
            return None
    return model


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
                # A broken allow_origin_regex item stays a placeholder too:
                # written, but broken, is not "no regex".
                good[name] = items
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

#: Methods the proxy's HTTP parser (llhttp, through httptools) accepts on a
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
    regexes = written.get("allow_origin_regex") or []
    for i, regex in enumerate(regexes):
        if not isinstance(regex, str) or not regex:
            continue  # a broken item: its error is reported already
        if compile_origin_regex(regex).fullmatch("https://corsproxy-check.invalid"):
            # One pattern: on the key itself (however it was written); several: the item.
            loc = (*where, "allow_origin_regex") + ((i,) if len(regexes) > 1 else ())
            out.append(
                (
                    loc,
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
    if written.get("check_websocket_origin") is False:
        out.append(
            (
                (*where, "check_websocket_origin"),
                "false: WebSocket handshakes from any web page are forwarded, and browsers "
                "enforce nothing on WebSockets, so any site can open a socket with your users' "
                "cookies (cross-site WebSocket hijacking); remove it unless the upstream "
                "checks Origin itself",
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
        allow_origin_regex=tuple(values["allow_origin_regex"] or ()),
        allow_methods=tuple(values["allow_methods"]),
        allow_headers=tuple(values["allow_headers"]),
        allow_credentials=values["allow_credentials"],
        expose_headers=tuple(values["expose_headers"]),
        max_age=values["max_age"],
        allow_private_network=values["allow_private_network"],
        enforce=values["enforce"],
        check_websocket_origin=values["check_websocket_origin"],
        report_only=values["report_only"],
    )


def _tls_files(
    model: ConfigModel, base: str, errors: list[tuple[Loc, str]], warnings: list[tuple[Loc, str]]
) -> tuple[TlsConfig | None, str | None]:
    """listen.tls and upstream.ca_file as absolute paths, each tried once here, so a
    bad file is reported by check instead of at the first connection."""
    import ssl

    tls = None
    if model.listen.tls is not None:
        cert = os.path.join(base, model.listen.tls.cert_file)
        key = os.path.join(base, model.listen.tls.key_file)
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
            tls = TlsConfig(cert, key)
        except (OSError, ssl.SSLError) as e:
            reason = getattr(e, "strerror", None) or str(e)
            errors.append((("listen", "tls"), f"cannot load the certificate {cert} with the key "
                                              f"{key} ({reason}); give PEM files of a "
                                              f"certificate chain and its private key"))
    ca_file = None
    if model.upstream.ca_file is not None:
        ca_file = os.path.join(base, model.upstream.ca_file)
        try:
            ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as e:
            reason = getattr(e, "strerror", None) or str(e)
            errors.append((("upstream", "ca_file"), f"cannot load {ca_file} ({reason}); give a "
                                                    f"PEM file of CA certificates"))
    if model.upstream.tls_insecure_skip_verify:
        warnings.append((("upstream", "tls_insecure_skip_verify"),
                         "true: the upstream's certificate is not checked, so anyone on the "
                         "path can read and change the traffic; trust its CA with "
                         "upstream.ca_file instead"))
    return tls, ca_file


def _read_origins_file(path: str) -> tuple[list[str], str | None]:
    """(lines, error) of an allow_origins_file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return [], f"cannot read {path} ({e.strerror or e}); check the path"
    try:
        return data.decode("utf-8-sig").splitlines(), None
    except UnicodeDecodeError:
        return [], f"{path} is not UTF-8 text; save it as UTF-8"


def _add_origins_file(
    where: Loc, merged: dict[str, Any], base: str, cache: dict[str, tuple[list[str], str | None]]
) -> list[tuple[Loc, str]]:
    """Add the origins of ``merged``'s allow_origins_file to its allow_origins (in
    place); the problems found, each naming the file and line."""
    name = merged.get("allow_origins_file")
    if not isinstance(name, str) or not name:
        return []
    path = os.path.join(base, name)
    if path not in cache:
        cache[path] = _read_origins_file(path)
    lines, error = cache[path]
    loc = (*where, "allow_origins_file")
    if error is not None:
        return [(loc, error)]
    problems: list[tuple[Loc, str]] = []
    added: list[str] = []
    for number, line in enumerate(lines, 1):
        origin = line.split("#", 1)[0].strip()
        if not origin:
            continue
        problem = origin_problem(origin)
        if problem is not None:
            problems.append((loc, f"{path}, line {number}: {problem}"))
        else:
            added.append(origin)
    merged["allow_origins"] = [*merged["allow_origins"], *added]
    return problems


def _route_timeouts(model: RouteUpstreamModel | None) -> UpstreamTimeouts | None:
    if model is None:
        return None

    def seconds(value: float | None) -> float | None:
        return None if value is None else float(value)

    return UpstreamTimeouts(
        seconds(model.timeout), seconds(model.read_timeout),
        "read_timeout" in model.model_fields_set,
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
    try:
        doc = _read_yaml(text, source)
    except _YamlError as e:
        raise ConfigError([e.line]) from None
    raw = {} if doc.data is None else doc.data
    if not isinstance(raw, dict):
        raise ConfigError(
            [
                f"{source}: top level: expected a mapping of sections (listen, upstream, cors, "
                f"routes, websocket), got {_describe(raw)}; see config/development.yaml for an "
                f"example"
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
        errors += [_english(err, _model_at) for err in e.errors(include_url=False)]

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
    base = os.path.dirname(os.path.abspath(source)) if source != "<string>" else os.getcwd()
    origin_files: dict[str, tuple[list[str], str | None]] = {}
    for where, merged in [(("cors",), top_merged)] + [
        (("routes", i, "cors"), m) for i, m in enumerate(merged_routes)
    ]:
        errors += _add_origins_file(where, merged, base, origin_files)
    tls: TlsConfig | None = None
    ca_file: str | None = None
    if model is not None:
        tls, ca_file = _tls_files(model, base, errors, warnings)

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

    if model is not None and model.log.file is not None:
        log_file = os.path.join(base, model.log.file)
        folder = os.path.dirname(log_file) or "."
        if os.path.isdir(log_file):
            errors.append((("log", "file"), f"{log_file} is a directory; name a file in it, "
                                            f"e.g. {os.path.join(log_file, 'corsproxy.log')}"))
        elif not os.path.isdir(folder):
            errors.append((("log", "file"), f"the directory {folder} does not exist; create it "
                                            f"or log to stderr (file: null)"))

    if model is not None and model.admin.port and model.admin.port == model.listen.port:
        # With listen.workers, both would join one SO_REUSEPORT group and share traffic.
        errors.append((("admin", "port"), f"{model.admin.port} is listen.port too; the admin "
                       f"endpoints need a port of their own: change one of the two, or set "
                       f"admin.port: null to turn the admin listener off"))

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
        RouteConfig(path=r.path, cors=_settings(m), upstream=_route_timeouts(r.upstream))
        for r, m in zip(model.routes, merged_routes, strict=True)
    )
    router = Router(CorsPolicy(cors), [(r.path, CorsPolicy(r.cors)) for r in routes])
    lm, um = model.listen, model.upstream
    return Config(
        source=source,
        watched_files=tuple(origin_files)
        + ((tls.cert_file, tls.key_file) if tls is not None else ()),
        listen=ListenConfig(
            lm.host, lm.port, lm.max_body_size, float(lm.shutdown_grace), lm.workers,
            float(lm.header_timeout), float(lm.keepalive_timeout), float(lm.body_timeout),
            float(lm.send_timeout), lm.max_header_size, tls,
            tuple(ipaddress.ip_network(n, strict=False) for n in lm.trusted_proxies),
        ),
        upstream=UpstreamConfig(
            um.url, float(um.connect_timeout), float(um.timeout), um.preserve_host,
            um.max_connections, float(um.idle_timeout),
            None if um.read_timeout is None else float(um.read_timeout),
            ca_file, um.tls_insecure_skip_verify,
        ),
        websocket=WebSocketConfig(float(model.websocket.idle_timeout)),
        admin=AdminConfig(
            model.admin.host, model.admin.port, model.admin.ready_checks_upstream
        ),
        log=LogConfig(
            model.log.format, model.log.access,
            None if model.log.file is None else os.path.join(base, model.log.file),
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
