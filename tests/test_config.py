"""The config file: exact error lines, defaults, route merging, schema, examples.

Every bad file is written to ``tmp_path`` and loaded with ``load_config``; the test
compares the FULL list of error lines (``FILE`` stands for the file's path), so a
reworded message, a lost error or an extra one all fail.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corsproxy.config import (
    Config,
    ConfigError,
    ListenConfig,
    UpstreamConfig,
    config_json_schema,
    load_config,
    parse_config,
)
from corsproxy.core import CorsSettings, Kind, RequestView, compile_origin_regex

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_FILE = ROOT / "corsproxy" / "config.schema.json"

STAR_FIX = (
    "because that would let every website read responses with the user's cookies; list the "
    'origins explicitly (e.g. "https://app.example.com"), or use a pattern like '
    '"https://*.example.com" or allow_origin_regex, or set allow_credentials: false'
)
CORS_KEYS = (
    "allow_origins, allow_origin_regex, allow_methods, allow_headers, allow_credentials, "
    "expose_headers, max_age, allow_private_network, enforce, allow_origins_file, "
    "check_websocket_origin, report_only"
)
WILDCARD_RULE = (
    '"*" is only allowed as the whole value "*", as a leading "*." label after the scheme, '
    'e.g. "https://*.example.com", or as the whole port, e.g. "http://localhost:*" (for '
    "anything else use allow_origin_regex)"
)
TOKEN_RULE = "(an RFC 9110 token: letters, digits and !#$%&'*+-.^_`|~, no spaces or commas)"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "corsproxy.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def problems(tmp_path: Path, text: str, **kwargs) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, **kwargs)
    return info.value


def expect(tmp_path: Path, lines: list[str]) -> list[str]:
    return [line.replace("FILE", str(tmp_path / "corsproxy.yaml"), 1) for line in lines]


# -- exact error lines ------------------------------------------------------------

BAD_FILES = [
    pytest.param(
        "cros:\n  allow_origins: [https://a.com]\nlisten: {prot: 8080}\n"
        "upstream: {uri: http://a}\n"
        "routes: [{path: /a, cros: {}}, {path: /b, cors: {colour: x}}]\n",
        [
            "FILE: cros: unknown key; did you mean cors? allowed keys here: listen, upstream, "
            "cors, routes, websocket, admin, log",
            "FILE: listen.prot: unknown key; did you mean port? allowed keys here: host, port, "
            "max_body_size, shutdown_grace, workers, header_timeout, keepalive_timeout, "
            "body_timeout, send_timeout, max_header_size, tls, trusted_proxies",
            "FILE: upstream.uri: unknown key; did you mean url? allowed keys here: url, "
            "connect_timeout, timeout, preserve_host, ca_file, tls_insecure_skip_verify, "
            "max_connections, idle_timeout, read_timeout",
            "FILE: routes[0].cros: unknown key; did you mean cors? allowed keys here: path, cors, "
            "upstream",
            f"FILE: routes[1].cors.colour: unknown key; allowed keys here: {CORS_KEYS}",
        ],
        id="unknown_keys_list_the_allowed_keys",
    ),
    pytest.param(
        "cors:\n  allow_origins: ['*']\n  allow_credentials: true\n",
        [
            f'FILE: cors.allow_origins[0]: "*" cannot be combined with allow_credentials: true '
            f"(set in cors.allow_credentials), {STAR_FIX}"
        ],
        id="star_with_credentials_top_level",
    ),
    pytest.param(
        "cors: {allow_origins: '*'}\n"
        "routes:\n  - path: /api\n    cors: {allow_credentials: true}\n",
        [
            f'FILE: routes[0].cors.allow_credentials: true cannot be combined with "*" in '
            f"allow_origins (inherited from cors.allow_origins), {STAR_FIX}"
        ],
        id="star_with_credentials_after_merging_credentials_from_route",
    ),
    pytest.param(
        "cors: {allow_origins: [https://a.com], allow_credentials: true}\n"
        "routes:\n  - path: /public\n    cors: {allow_origins: [https://b.com, '*']}\n",
        [
            f'FILE: routes[0].cors.allow_origins[1]: "*" cannot be combined with '
            f"allow_credentials: true (set in cors.allow_credentials), {STAR_FIX}"
        ],
        id="star_with_credentials_after_merging_origins_from_route",
    ),
    pytest.param(
        "cors: {allow_origins: '*', allow_credentials: true}\n"
        "routes:\n  - path: /a\n    cors: {max_age: 5}\n"
        "  - path: /b\n    cors: {allow_credentials: false}\n",
        [
            f'FILE: cors.allow_origins[0]: "*" cannot be combined with allow_credentials: true '
            f"(set in cors.allow_credentials), {STAR_FIX}"
        ],
        id="star_with_credentials_reported_once_when_a_route_inherits_both",
    ),
    pytest.param(
        "cors:\n  allow_origins:\n    - https://app.example.com/\n    - https://app.example.com/v1\n"
        "    - app.example.com\n    - https://App.Example.com\n    - ' https://a.example.com'\n"
        "    - https://a.example.com:443\n    - http://a.example.com:80\n",
        [
            'FILE: cors.allow_origins[0]: "https://app.example.com/" has a trailing slash; '
            'browsers send origins without one: write "https://app.example.com"',
            'FILE: cors.allow_origins[1]: "https://app.example.com/v1" has a path; an origin is '
            'only scheme://host[:port]: write "https://app.example.com"',
            'FILE: cors.allow_origins[2]: "app.example.com" needs a scheme, e.g. '
            '"https://app.example.com"',
            'FILE: cors.allow_origins[3]: "https://App.Example.com" has upper case letters; '
            "browsers send origins in lower case, so it would never match: write "
            '"https://app.example.com"',
            'FILE: cors.allow_origins[4]: " https://a.example.com" contains whitespace; an origin '
            'never does: write "https://a.example.com"',
            'FILE: cors.allow_origins[5]: "https://a.example.com:443": ":443" is the default port '
            'for https and browsers never send it: write "https://a.example.com"',
            'FILE: cors.allow_origins[6]: "http://a.example.com:80": ":80" is the default port '
            'for http and browsers never send it: write "http://a.example.com"',
        ],
        id="origins_as_browsers_never_send_them",
    ),
    pytest.param(
        "cors:\n  allow_origins: ['*.example.com', 'https://api.*.example.com', '*example.com',"
        " 'https://*', 'https://*.example.com/']\n",
        [
            'FILE: cors.allow_origins[0]: "*.example.com" needs a scheme, e.g. '
            '"https://*.example.com"',
            f'FILE: cors.allow_origins[1]: "https://api.*.example.com": {WILDCARD_RULE}',
            f'FILE: cors.allow_origins[2]: "*example.com": {WILDCARD_RULE}',
            f'FILE: cors.allow_origins[3]: "https://*": {WILDCARD_RULE}',
            'FILE: cors.allow_origins[4]: "https://*.example.com/" has a trailing slash; '
            'browsers send origins without one: write "https://*.example.com"',
        ],
        id="subdomain_patterns",
    ),
    pytest.param(
        "cors:\n  allow_origins: [null, '', 'https://a.com:99999', 'https://a..com']\n",
        [
            'FILE: cors.allow_origins[0]: got null; to allow the "null" origin (sandboxed '
            'iframes, file: pages) write it in quotes: "null"',
            "FILE: cors.allow_origins[1]: is empty; write an origin like "
            '"https://app.example.com" or remove the entry',
            'FILE: cors.allow_origins[2]: "https://a.com:99999" has an invalid port "99999"; '
            "use 1-65535 or no port",
            'FILE: cors.allow_origins[3]: "https://a..com" has an invalid host name; write e.g. '
            '"https://app.example.com"',
        ],
        id="unquoted_null_empty_bad_port_bad_host",
    ),
    pytest.param(
        "cors:\n  allow_origin_regex: 'https://(a|b.example.com'\n",
        [
            'FILE: cors.allow_origin_regex: "https://(a|b.example.com" is not a valid regular '
            "expression (missing ), unterminated subpattern at position 8); fix the pattern, "
            r'e.g. "https://[a-z0-9-]+\.example\.com" (it must match the whole origin)'
        ],
        id="invalid_regex_reports_re_error",
    ),
    pytest.param(
        "cors:\n  allow_origins: ['http://localhost:*x', 'http://*:*', 'http://localhost:*/path',"
        " 'http://localhost:3000:*', 'http://localhost:*/', 'https://*.example.com:*:*',"
        " 'http://LOCALHOST:*']\n",
        [
            f'FILE: cors.allow_origins[0]: "http://localhost:*x": {WILDCARD_RULE}',
            f'FILE: cors.allow_origins[1]: "http://*:*": {WILDCARD_RULE}',
            'FILE: cors.allow_origins[2]: "http://localhost:*/path" has a path; an origin is only '
            'scheme://host[:port]: write "http://localhost:*"',
            'FILE: cors.allow_origins[3]: "http://localhost:3000:*" has two ports; ":*" stands '
            'for any port: write "http://localhost:*" for any port, or "http://localhost:3000" '
            "for port 3000 only",
            'FILE: cors.allow_origins[4]: "http://localhost:*/" has a trailing slash; browsers '
            'send origins without one: write "http://localhost:*"',
            f'FILE: cors.allow_origins[5]: "https://*.example.com:*:*": {WILDCARD_RULE}',
            'FILE: cors.allow_origins[6]: "http://LOCALHOST:*" has upper case letters; browsers '
            'send origins in lower case, so it would never match: write "http://localhost:*"',
        ],
        id="port_wildcards",
    ),
    pytest.param(
        "cors:\n  allow_origin_regex: ['https://[a-z]+\\.example\\.org', 'https://(a|b.example.com',"
        " '', 5]\n",
        [
            'FILE: cors.allow_origin_regex[1]: "https://(a|b.example.com" is not a valid regular '
            "expression (missing ), unterminated subpattern at position 8); fix the pattern, "
            r'e.g. "https://[a-z0-9-]+\.example\.com" (it must match the whole origin)',
            "FILE: cors.allow_origin_regex[2]: is empty; remove it (null or [] means no regex), "
            r'or write a pattern such as "https://[a-z0-9-]+\.example\.com"',
            "FILE: cors.allow_origin_regex[3]: expected a string, got the number 5; for example: "
            r'allow_origin_regex: "https://[a-z0-9-]+\.example\.com"',
        ],
        id="regex_list_errors_name_the_item",
    ),
    pytest.param(
        "cors:\n  allow_origin_regex: {pattern: x}\n"
        "routes:\n  - path: /a\n    cors: {allow_origin_regex: ['x', '(?=a)a']}\n",
        [
            "FILE: cors.allow_origin_regex: expected a list (or a single string), got a mapping; "
            r'for example: allow_origin_regex: "https://[a-z0-9-]+\.example\.com"',
            'FILE: routes[0].cors.allow_origin_regex[1]: "(?=a)a": RE2 cannot run this pattern '
            "(invalid perl operator: (?=); corsproxy needs linear-time matching on untrusted "
            "Origin values, so look-arounds and back-references are not supported: rewrite the "
            "pattern without them",
        ],
        id="regex_list_wrong_type_and_re2_refusal_in_a_route",
    ),
    pytest.param(
        "upstream:\n  url: ftp://files.example.com\n",
        [
            'FILE: upstream.url: "ftp://files.example.com": the scheme must be http or https, not '
            '"ftp"; write e.g. "http://127.0.0.1:8000"'
        ],
        id="upstream_url_scheme",
    ),
    pytest.param(
        "upstream: {url: 'localhost:8000'}\n",
        ['FILE: upstream.url: "localhost:8000" needs a scheme: write "http://localhost:8000"'],
        id="upstream_url_without_scheme",
    ),
    pytest.param(
        "upstream: {url: 'http://'}\n",
        ['FILE: upstream.url: "http://" has no host; write e.g. "http://127.0.0.1:8000"'],
        id="upstream_url_without_host",
    ),
    pytest.param(
        "upstream: {url: 'http://api:8000/v1?key=1'}\n",
        [
            'FILE: upstream.url: "http://api:8000/v1?key=1" has a query; the upstream URL may '
            'carry a base path but no query: remove "?key=1"'
        ],
        id="upstream_url_with_query",
    ),
    pytest.param(
        "upstream: {url: 'http://api:8000/v1#top'}\n",
        ['FILE: upstream.url: "http://api:8000/v1#top" has a fragment; remove "#top"'],
        id="upstream_url_with_fragment",
    ),
    pytest.param(
        "cors: {max_age: -1}\n",
        [
            "FILE: cors.max_age: must be 0 or more, got -1 (seconds a browser may cache the "
            "preflight answer; 0 disables caching); for example: max_age: 600"
        ],
        id="negative_max_age",
    ),
    pytest.param(
        "routes:\n  - path: api\n  - path: '/a?x=1'\n  - path: /b/*\n  - {cors: {}}\n",
        [
            'FILE: routes[0].path: "api" must start with "/": write "/api"',
            'FILE: routes[1].path: "/a?x=1": a route matches the request path without the '
            'query; write "/a"',
            'FILE: routes[2].path: "/b/*": route paths are prefixes, not patterns: write "/b" '
            '(it matches "/b" and everything under it)',
            "FILE: routes[3].path: is missing; add it, for example: path: /api",
        ],
        id="route_paths",
    ),
    pytest.param(
        "routes:\n  - path: /api\n  - path: /api/\n",
        [
            'FILE: routes[1].path: "/api/" is the same route as routes[0] (a trailing slash is '
            "ignored); merge the two routes"
        ],
        id="duplicate_route_path",
    ),
    pytest.param(
        "cors:\n  allow_methods: ['GET, PUT', 'pa tch']\n  allow_headers: X-A,X-B\n"
        "  expose_headers: ['X(1)']\n",
        [
            f'FILE: cors.allow_methods[0]: "GET, PUT" is not a valid method name {TOKEN_RULE}; '
            "write one method per list item, e.g. [GET, PUT]",
            f'FILE: cors.allow_methods[1]: "pa tch" is not a valid method name {TOKEN_RULE}; '
            "write one method per list item, e.g. [GET, PUT]",
            f'FILE: cors.allow_headers[0]: "X-A,X-B" is not a valid header name {TOKEN_RULE}; '
            "write one header per list item, e.g. [Content-Type, X-Request-Id]",
            f'FILE: cors.expose_headers[0]: "X(1)" is not a valid header name {TOKEN_RULE}; '
            "write one header per list item, e.g. [Content-Type, X-Request-Id]",
        ],
        id="methods_and_headers_must_be_tokens",
    ),
    pytest.param(
        "listen: {host: null, port: '8080', max_body_size: 1.5}\n"
        "upstream: {timeout: soon, preserve_host: 1}\n"
        "cors: {allow_origins: {a: 1}, allow_credentials: 'true', allow_methods: [1]}\n"
        "routes: {path: /a}\n",
        [
            "FILE: listen.host: expected a string, got null; for example: host: 127.0.0.1",
            'FILE: listen.port: expected a whole number, got the string "8080"; for example: '
            "port: 8080",
            "FILE: listen.max_body_size: expected a whole number, got the number 1.5; for "
            "example: max_body_size: 10485760",
            "FILE: upstream.timeout: expected a number (seconds; fractions like 0.5 are fine), "
            'got the string "soon"; for example: timeout: 60',
            "FILE: upstream.preserve_host: expected true or false, got the number 1; for "
            "example: preserve_host: false",
            "FILE: cors.allow_origins: expected a list (or a single string), got a mapping; for "
            "example: allow_origins: [https://app.example.com]",
            'FILE: cors.allow_credentials: expected true or false, got the string "true"; for '
            "example: allow_credentials: true",
            "FILE: cors.allow_methods[0]: expected a string, got the number 1; for example: "
            "allow_methods: [GET, POST]",
            "FILE: routes: expected a list, got a mapping; for example: routes: [{path: /api, "
            "cors: {allow_credentials: true}}]",
        ],
        id="wrong_types_say_what_was_expected_and_given",
    ),
    pytest.param(
        "listen: {port: 65536, shutdown_grace: -1, max_body_size: 0}\n"
        "upstream: {connect_timeout: 0, timeout: .inf}\n",
        [
            "FILE: listen.port: must be at most 65535, got 65536 (0 picks any free port); for "
            "example: port: 8080",
            "FILE: listen.shutdown_grace: must be 0 or more, got -1 (seconds; 0 means stop at "
            "once); for example: shutdown_grace: 10",
            "FILE: listen.max_body_size: must be more than 0, got 0 (it is in bytes; write null "
            "for no limit); for example: max_body_size: 10485760",
            "FILE: upstream.connect_timeout: must be more than 0, got 0 (seconds; fractions like "
            "0.5 are fine); for example: connect_timeout: 5",
            "FILE: upstream.timeout: must be a finite number, got inf; for example: timeout: 60",
        ],
        id="ranges",
    ),
    pytest.param(
        "listen:\n  host: http://0.0.0.0:8080\n",
        [
            'FILE: listen.host: "http://0.0.0.0:8080" is a URL; listen.host takes an address only: '
            'write "0.0.0.0"'
        ],
        id="listen_host_url",
    ),
    pytest.param(
        "listen: {host: 'localhost:8080'}\n",
        [
            'FILE: listen.host: "localhost:8080" has a port; write host: "localhost" and put the '
            "port in listen.port (8080)"
        ],
        id="listen_host_with_port",
    ),
    pytest.param(
        "listen: {host: '[::1]'}\n",
        ['FILE: listen.host: "[::1]": write the IPv6 address without brackets: "::1"'],
        id="listen_host_ipv6_brackets",
    ),
    pytest.param(
        "routes: [/a, null]\n",
        [
            'FILE: routes[0]: expected a mapping with path and cors, got the string "/a"; for '
            "example: routes: [{path: /api, cors: {allow_credentials: true}}]",
            "FILE: routes[1]: expected a mapping with path and cors, got null; for example: "
            "routes: [{path: /api, cors: {allow_credentials: true}}]",
        ],
        id="route_not_a_mapping",
    ),
    pytest.param(
        "cors:\n  max_age: 1\nlisten: {}\ncors:\n  max_age: 2\n",
        [
            "FILE: cors: written twice (lines 1 and 4); YAML keeps only the last one, so remove "
            "one or merge them"
        ],
        id="duplicate_keys",
    ),
    pytest.param(
        "- listen\n- cors\n",
        [
            "FILE: top level: expected a mapping of sections (listen, upstream, cors, routes, "
            "websocket), got a list; see config/development.yaml for an example"
        ],
        id="top_level_not_a_mapping",
    ),
    pytest.param(
        "cors:\n  allow_origins: [https://a.com\n  max_age: 5\n",
        [
            "FILE: line 3, column 10: YAML syntax error: expected ',' or ']', but got ':' (while "
            "parsing a flow sequence at line 2); fix the YAML syntax there"
        ],
        id="yaml_syntax_error_with_line_and_column",
    ),
    pytest.param(
        "cors:\n\tmax_age: 5\n",
        [
            "FILE: line 2, column 1: YAML syntax error: found character '\\t' that cannot start "
            "any token (while scanning for the next token); indent with spaces, not tabs"
        ],
        id="yaml_tab",
    ),
]


@pytest.mark.parametrize(("text", "lines"), BAD_FILES)
def test_bad_file_reports_exact_errors(tmp_path, text, lines):
    assert problems(tmp_path, text).errors == expect(tmp_path, lines)


def test_every_error_is_reported_and_merged_checks_still_run(tmp_path):
    text = (
        "listen: {port: -1}\n"
        "cors:\n"
        "  allow_origins: ['*', 'https://A.com']\n"
        "  allow_credentials: true\n"
        "  max_age: -5\n"
        "routes:\n"
        "  - path: /a\n"
        "    cors: {allow_origins: '*', max_age: x, allow_headres: []}\n"
    )
    assert problems(tmp_path, text).errors == expect(
        tmp_path,
        [
            "FILE: listen.port: must be 0 or more, got -1 (0 picks any free port); for example: "
            "port: 8080",
            'FILE: cors.allow_origins[0]: "*" cannot be combined with allow_credentials: true '
            f"(set in cors.allow_credentials), {STAR_FIX}",
            'FILE: cors.allow_origins[1]: "https://A.com" has upper case letters; browsers send '
            'origins in lower case, so it would never match: write "https://a.com"',
            "FILE: cors.max_age: must be 0 or more, got -5 (seconds a browser may cache the "
            "preflight answer; 0 disables caching); for example: max_age: 600",
            'FILE: routes[0].cors.allow_origins[0]: "*" cannot be combined with '
            f"allow_credentials: true (set in cors.allow_credentials), {STAR_FIX}",
            'FILE: routes[0].cors.max_age: expected a whole number, got the string "x"; for '
            "example: max_age: 600",
            "FILE: routes[0].cors.allow_headres: unknown key; did you mean allow_headers? "
            f"allowed keys here: {CORS_KEYS}",
        ],
    )


def test_unreadable_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert info.value.errors == [
        f"{missing}: cannot read the config file (No such file or directory); check the path "
        "(--config or CORSPROXY_CONFIG)"
    ]
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.errors == [
        f"{tmp_path}: cannot read the config file (Is a directory); check the path "
        "(--config or CORSPROXY_CONFIG)"
    ]


def test_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"cors:\n  allow_origins: [https://caf\xe9.example]\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == [
        f"{path}: line 2, column 30: the file is not UTF-8 text (byte 0xe9); save it as UTF-8"
    ]


def test_require_upstream_and_overrides(tmp_path):
    text = "cors: {allow_origins: [https://a.com]}\n"
    assert problems(tmp_path, text, require_upstream=True).errors == expect(
        tmp_path,
        [
            "FILE: upstream.url: not set; add upstream: {url: http://127.0.0.1:8000} to the file "
            "or pass --upstream URL"
        ],
    )
    config = load_config(
        write(tmp_path, text),
        upstream="http://127.0.0.1:9/api",
        host="0.0.0.0",
        port=0,
        require_upstream=True,
    )
    assert config.upstream.url == "http://127.0.0.1:9/api"
    assert (config.listen.host, config.listen.port) == ("0.0.0.0", 0)
    assert problems(tmp_path, text, upstream="ftp://x", port=70000).errors == expect(
        tmp_path,
        [
            "FILE: listen.port (from --port): must be at most 65535, got 70000 (0 picks any free "
            "port); for example: port: 8080",
            'FILE: upstream.url (from --upstream): "ftp://x": the scheme must be http or https, '
            'not "ftp"; write e.g. "http://127.0.0.1:8000"',
        ],
    )


def test_upstream_override_replaces_the_files_url(tmp_path):
    path = write(tmp_path, "upstream: {url: http://127.0.0.1:1, timeout: 2.5}\n")
    config = load_config(path, upstream="https://api.example.com")
    assert config.upstream == UpstreamConfig("https://api.example.com", 5.0, 2.5, False)


# -- values -----------------------------------------------------------------------


def test_empty_file_means_all_defaults(tmp_path):
    config = load_config(write(tmp_path, ""))
    assert config.source == str(tmp_path / "corsproxy.yaml")
    assert config.listen == ListenConfig("127.0.0.1", 8080, None, 10.0)
    assert config.upstream == UpstreamConfig(None, 5.0, 60.0, False)
    assert config.cors == CorsSettings(
        allow_origins=(),
        allow_origin_regex=None,
        allow_methods=("GET",),
        allow_headers=(),
        allow_credentials=False,
        expose_headers=(),
        max_age=600,
        allow_private_network=False,
        enforce=False,
    )
    assert config.routes == ()


def test_empty_sections_mean_defaults():
    config = parse_config("listen:\nupstream:\ncors:\nroutes:\n")
    assert config.cors == CorsSettings()
    assert config.listen == ListenConfig()
    assert config.routes == ()


def test_full_file_values():
    config = parse_config(
        "listen: {host: 0.0.0.0, port: 0, max_body_size: 1048576, shutdown_grace: 0.5}\n"
        "upstream: {url: 'http://api:8000/v1', connect_timeout: 0.25, timeout: 30,"
        " preserve_host: true}\n"
        "cors:\n"
        "  allow_origins: [https://app.example.com, 'https://*.example.com', 'http://[::1]:3000']\n"
        "  allow_origin_regex: 'https://[a-z]+\\.example\\.org'\n"
        "  allow_methods: [GET, PUT]\n"
        "  allow_headers: [Authorization]\n"
        "  allow_credentials: true\n"
        "  expose_headers: [X-Request-Id]\n"
        "  max_age: 0\n"
        "  allow_private_network: true\n"
        "  enforce: true\n",
        "inline.yaml",
    )
    assert config.source == "inline.yaml"
    assert config.listen == ListenConfig("0.0.0.0", 0, 1048576, 0.5)
    assert config.upstream == UpstreamConfig("http://api:8000/v1", 0.25, 30.0, True)
    assert isinstance(config.upstream.timeout, float)
    assert config.cors == CorsSettings(
        allow_origins=("https://app.example.com", "https://*.example.com", "http://[::1]:3000"),
        allow_origin_regex=r"https://[a-z]+\.example\.org",
        allow_methods=("GET", "PUT"),
        allow_headers=("Authorization",),
        allow_credentials=True,
        expose_headers=("X-Request-Id",),
        max_age=0,
        allow_private_network=True,
        enforce=True,
    )
    assert config.warnings == ()


def test_single_string_is_a_one_item_list():
    config = parse_config(
        "cors:\n  allow_origins: https://a.com\n  allow_methods: PUT\n"
        "  allow_headers: X-A\n  expose_headers: X-B\n"
    )
    assert config.cors.allow_origins == ("https://a.com",)
    assert config.cors.allow_methods == ("PUT",)
    assert config.cors.allow_headers == ("X-A",)
    assert config.cors.expose_headers == ("X-B",)


def test_route_cors_overrides_field_by_field():
    config = parse_config(
        "cors:\n"
        "  allow_origins: [https://app.example.com]\n"
        "  allow_methods: [GET, PUT]\n"
        "  allow_credentials: true\n"
        "  max_age: 100\n"
        "routes:\n"
        "  - path: /public\n"
        "    cors: {allow_origins: '*', allow_credentials: false}\n"
        "  - path: /api/\n"
        "    cors: {max_age: 5, allow_origin_regex: 'https://[a-z]+\\.example\\.net'}\n"
        "  - path: /plain\n"
    )
    top = config.cors
    public, api, plain = config.routes
    assert public.path == "/public"
    assert public.cors == dataclasses.replace(top, allow_origins=("*",), allow_credentials=False)
    assert api.path == "/api/"
    assert api.cors == dataclasses.replace(
        top, max_age=5, allow_origin_regex=r"https://[a-z]+\.example\.net"
    )
    assert plain.cors == top


def test_router_uses_the_merged_route_policies():
    config = parse_config(
        "cors: {allow_origins: [https://app.example.com], allow_credentials: true}\n"
        "routes: [{path: /public, cors: {allow_origins: '*', allow_credentials: false}}]\n"
    )
    decide = config.router.decide
    public = decide(RequestView("GET", "/public/x", origin=("https://any.example",)))
    assert (public.kind, public.route, public.headers) == (
        Kind.ACTUAL,
        "/public",
        (("Access-Control-Allow-Origin", "*"),),
    )
    api = decide(RequestView("GET", "/api", origin=("https://app.example.com",)))
    assert (api.route, api.headers) == (
        None,
        (
            ("Access-Control-Allow-Origin", "https://app.example.com"),
            ("Access-Control-Allow-Credentials", "true"),
        ),
    )


def test_config_is_frozen():
    config = parse_config("cors: {allow_origins: [https://a.com]}\n")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.listen.port = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.cors = CorsSettings()  # type: ignore[misc]
    assert isinstance(config, Config)


def test_accepted_origin_forms():
    origins = [
        "*",
        "null",
        "https://app.example.com",
        "http://localhost:3000",
        "http://127.0.0.1:8080",
        "http://[::1]:8080",
        "https://*.example.com",
        "https://*.example.com:8443",
        "chrome-extension://abcdefghijklmnop",
        "https://xn--bcher-kva.example",
        "http://localhost:*",
        "https://*.example.com:*",
        "http://127.0.0.1:*",
        "http://[::1]:*",
    ]
    config = parse_config(json.dumps({"cors": {"allow_origins": origins}}))
    assert config.cors.allow_origins == tuple(origins)


@pytest.mark.parametrize(
    ("written", "patterns"),
    [
        (r"'https://[a-z]+\.example\.org'", (r"https://[a-z]+\.example\.org",)),
        (r"['https://[a-z]+\.example\.org']", (r"https://[a-z]+\.example\.org",)),
        (
            r"['https://[a-z]+\.example\.org', '(?i)https://app\.example\.io']",
            (r"https://[a-z]+\.example\.org", r"(?i)https://app\.example\.io"),
        ),
        ("null", ()),
        ("[]", ()),
    ],
    ids=["single_string", "one_item_list", "two_patterns", "null", "empty_list"],
)
def test_origin_regex_is_a_string_or_a_list(written, patterns):
    config = parse_config(
        f"cors:\n  allow_origins: [https://a.com]\n  allow_origin_regex: {written}\n"
    )
    assert config.cors.allow_origin_regex == patterns
    assert config.cors == CorsSettings(allow_origins=("https://a.com",),
                                       allow_origin_regex=patterns)
    origin = "https://shop.example.org"
    allowed = config.router.decide(RequestView("GET", "/", (origin,))).allowed
    assert allowed is bool(patterns)


def test_loose_regex_warning_names_the_list_item(tmp_path):
    text = (
        "upstream: {url: http://127.0.0.1:8000}\n"
        "cors:\n  allow_origin_regex: ['https://[a-z]+\\.example\\.org', 'https://.*']\n"
        "routes:\n  - path: /one\n    cors: {allow_origin_regex: ['https://.+']}\n"
    )
    loose = (
        'the pattern matches any https origin (it matched "https://corsproxy-check.invalid"); '
        r'anchor it to your domain, e.g. "https://[a-z0-9-]+\.example\.com"'
    )
    assert list(load_config(write(tmp_path, text)).warnings) == expect(
        tmp_path,
        [
            f"FILE: cors.allow_origin_regex[1]: {loose}",
            f"FILE: routes[0].cors.allow_origin_regex: {loose}",
        ],
    )


def test_broken_regex_item_is_not_no_regex(tmp_path):
    """A list whose only pattern is broken reports that error, not also "no origin is
    allowed"; an empty list is no regex and does warn."""
    error = problems(tmp_path, "cors: {allow_origin_regex: ['x(']}\n")
    assert len(error.errors) == 1 and "allow_origin_regex[0]" in error.errors[0]
    assert not any("no origin is allowed" in w for w in error.warnings)
    config = parse_config("cors: {allow_origin_regex: []}\n", "x.yaml")
    assert any(
        w.startswith("x.yaml: cors.allow_origins: empty and no allow_origin_regex, so no origin")
        for w in config.warnings
    )


# -- warnings ---------------------------------------------------------------------


def test_warnings(tmp_path):
    text = (
        "upstream: {url: http://127.0.0.1:8000}\n"
        "cors:\n"
        "  allow_origins: [https://a.com, 'null']\n"
        "  allow_credentials: true\n"
        "  expose_headers: ['*']\n"
        "  allow_headers: ['*']\n"
        "  allow_methods: ['*', get]\n"
        "  max_age: 86400\n"
        "routes:\n"
        "  - path: /any\n"
        "    cors: {allow_origin_regex: 'https://.*'}\n"
        "  - path: /none\n"
        "    cors: {allow_origins: []}\n"
    )
    config = load_config(write(tmp_path, text))
    assert list(config.warnings) == expect(
        tmp_path,
        [
            'FILE: cors.allow_origins[1]: "null" trusts every sandboxed iframe, data: and file: '
            "page on the web (they all send Origin: null); remove it unless you really mean that",
            'FILE: cors.expose_headers: "*" with allow_credentials: true is a literal header name '
            "in Access-Control-Expose-Headers when credentials are allowed, so it exposes "
            "nothing; list the header names to expose",
            'FILE: cors.allow_headers: "*" with allow_credentials: true is literal for browsers '
            "on credentialed requests, so corsproxy echoes the requested header names instead: "
            "this works, but allows every header; list the names if you can",
            'FILE: cors.allow_methods: "*" with allow_credentials: true is literal for browsers '
            "on credentialed requests, so corsproxy echoes the requested method instead: this "
            "works, but allows every method; list the methods if you can",
            'FILE: cors.allow_methods[1]: "get" never matches: fetch() sends GET in upper case '
            "and methods compare case-sensitively; write GET",
            "FILE: cors.max_age: 86400 is above 7200; Chromium caps the preflight cache at 7200 "
            "seconds (Firefox at 86400)",
            "FILE: routes[0].cors.allow_origin_regex: the pattern matches any https origin (it "
            'matched "https://corsproxy-check.invalid"); anchor it to your domain, e.g. '
            r'"https://[a-z0-9-]+\.example\.com"',
            "FILE: routes[1].cors.allow_origins: empty and no allow_origin_regex, so no origin is "
            "allowed (as with Starlette's defaults); add the origins of your web app, e.g. "
            "allow_origins: [https://app.example.com]",
        ],
    )


def test_regex_outside_re2_syntax_is_refused(tmp_path):
    """A look-ahead is valid Python ``re`` but not RE2, which corsproxy needs for
    linear-time matching: the core's reason is reported as the error."""
    pattern = r"https://(?!evil)[a-z]+\.example\.com"
    text = f"cors: {{allow_origin_regex: '{pattern}'}}\n"
    with pytest.raises(re.error) as info:
        compile_origin_regex(pattern)
    assert str(info.value).startswith("RE2 cannot run this pattern")
    assert problems(tmp_path, text).errors == expect(
        tmp_path, [f"FILE: cors.allow_origin_regex: {json.dumps(pattern)}: {info.value}"]
    )


def test_default_policy_and_missing_upstream_warn():
    config = parse_config("", "x.yaml")
    assert config.warnings == (
        "x.yaml: cors.allow_origins: empty and no allow_origin_regex, so no origin is allowed "
        "(as with Starlette's defaults); add the origins of your web app, e.g. "
        "allow_origins: [https://app.example.com]",
        "x.yaml: upstream.url: not set; only `corsproxy run --upstream URL` can start this config",
    )


def test_errors_carry_the_warnings_too(tmp_path):
    error = problems(tmp_path, "cors: {allow_origins: ['null'], max_age: -1}\n")
    assert len(error.errors) == 1
    assert error.warnings == expect(
        tmp_path,
        [
            'FILE: cors.allow_origins[0]: "null" trusts every sandboxed iframe, data: and file: '
            "page on the web (they all send Origin: null); remove it unless you really mean that"
        ],
    )
    assert str(error) == error.errors[0]


# -- schema and examples ----------------------------------------------------------


def test_shipped_schema_is_up_to_date():
    shipped = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    assert shipped == config_json_schema(), (
        "corsproxy/config.schema.json is out of date; regenerate it with: "
        "corsproxy schema > corsproxy/config.schema.json"
    )


def test_schema_forbids_unknown_keys_everywhere():
    schema = config_json_schema()
    assert schema["additionalProperties"] is False
    for name, definition in schema["$defs"].items():
        assert definition["additionalProperties"] is False, name


# config/policy-tests.yaml is a `corsproxy test` case file, not a config.
EXAMPLES = sorted(p for p in (ROOT / "config").glob("*.yaml") if p.name != "policy-tests.yaml")


def test_there_are_examples():
    names = {p.name for p in EXAMPLES}
    assert {"development.yaml", "production.yaml", "routes.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_configs_load_without_errors(path):
    config = load_config(path)
    assert config.source == str(path)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_configs_validate_against_the_shipped_schema(path):
    jsonschema = pytest.importorskip("jsonschema")

    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    jsonschema.validate(yaml.safe_load(path.read_text(encoding="utf-8")) or {}, schema)


@pytest.mark.parametrize(
    "path",
    [p for p in EXAMPLES if p.name in {"development.yaml", "production.yaml", "routes.yaml"}],
)
def test_my_examples_point_editors_at_the_schema(path):
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first == "# yaml-language-server: $schema=../corsproxy/config.schema.json"


# -- robustness -------------------------------------------------------------------


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(["*", "null", "https://a.com", "https://*.a.com", "GET", "/api", "(("]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), inner, max_size=4)
    ),
    max_leaves=12,
)
CORS_KEY = st.sampled_from([*CORS_KEYS.split(", "), "bogus"])
DOCUMENTS = st.fixed_dictionaries(
    {},
    optional={
        "listen": st.dictionaries(
            st.sampled_from(["host", "port", "max_body_size", "shutdown_grace", "workers", "x"]),
            VALUES,
        ),
        "upstream": st.dictionaries(
            st.sampled_from(["url", "connect_timeout", "timeout", "preserve_host"]), VALUES
        )
        | VALUES,
        "cors": st.dictionaries(CORS_KEY, VALUES) | VALUES,
        "routes": st.lists(
            st.fixed_dictionaries(
                {}, optional={"path": VALUES, "cors": st.dictionaries(CORS_KEY, VALUES) | VALUES}
            )
            | VALUES,
            max_size=3,
        )
        | VALUES,
    },
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(DOCUMENTS)
def test_any_document_gives_a_config_or_config_error(document):
    text = yaml.safe_dump(document)
    try:
        config = parse_config(text, "fuzz.yaml")
    except ConfigError as e:
        assert e.errors
        for line in [*e.errors, *e.warnings]:
            assert line.startswith("fuzz.yaml: ")
            assert "\n" not in line
    else:
        assert isinstance(config, Config)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_any_text_gives_a_config_or_config_error(text):
    try:
        parse_config(text, "fuzz.yaml")
    except ConfigError as e:
        assert e.errors and all(line.startswith("fuzz.yaml: ") for line in e.errors)


@pytest.mark.parametrize(
    ("text", "workers"),
    [("listen: {workers: 4}", 4), ("listen: {workers: auto}", 0), ("listen: {workers: 0}", 0),
     ("listen: {}", 0)],  # the default is auto
)
def test_workers_is_a_count_or_auto(text, workers):
    assert parse_config(text, "FILE").listen.workers == workers


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('listen: {workers: "4"}', 'expected a whole number or auto, got the string "4"; '
                                   "for example: workers: 2 (or auto: one per usable CPU)"),
        ("listen: {workers: -1}", "must be 0 or more, got -1 (processes; auto or 0 means one per "
                                  "usable CPU); for example: workers: auto"),
        ("listen: {workers: 513}", "must be at most 512, got 513 (processes; auto or 0 means one "
                                   "per usable CPU); for example: workers: auto"),
        ("listen: {workers: 1.5}", "expected a whole number, got the number 1.5; for example: "
                                   "workers: auto"),
    ],
)
def test_bad_workers_values_say_what_to_write(text, error):
    with pytest.raises(ConfigError) as info:
        parse_config(text, "FILE")
    assert info.value.errors == [f"FILE: listen.workers: {error}"]
