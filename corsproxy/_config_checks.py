"""Value checks for single config fields: origins, the origin regex, method and
header names, the upstream URL, ``listen.host`` and route paths.

Each ``_check_*`` is attached to its field in :mod:`corsproxy.config` as an
``AfterValidator``; a bad value raises :class:`PydanticCustomError` (made by
``_fail``) so the message is used verbatim in the ``FILE: field.path: ...`` line.
:func:`origin_problem` is public and re-exported by :mod:`corsproxy.config`.
This module imports only :mod:`corsproxy.core`, never :mod:`corsproxy.config`.
"""

from __future__ import annotations

import json
import re
from urllib.parse import urlsplit

from pydantic_core import PydanticCustomError

from .core import DEFAULT_PORTS, compile_origin_regex, is_token


def _fail(message: str) -> PydanticCustomError:
    return PydanticCustomError("corsproxy", message.replace("{", "{{").replace("}", "}}"))


_SCHEME = re.compile(r"[a-z][a-z0-9+.\-]*")
_HOSTNAME = re.compile(
    r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?)*"
)
_IPV6 = re.compile(r"\[[0-9a-f:.]+\]")
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
        if port.isdigit() and str(int(port)) == DEFAULT_PORTS.get(scheme):
            hostport = host
        elif port.isdigit():
            hostport = f"{host}:{int(port)}"
    return f"{scheme}://{hostport}"


def origin_problem(value: str) -> str | None:
    """Why ``value`` can't be an ``allow_origins`` entry (one sentence with the fix),
    or None when it is fine.

    Accepted: ``"*"``, ``"null"``, ``scheme://host[:port]`` exactly as a browser
    serialises an origin (lower case, no path, no default port), the pattern
    ``scheme://*.host[:port]`` (one or more labels in place of ``*``), and the
    port wildcard ``scheme://host:*`` / ``scheme://*.host:*`` (any explicit port).
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
    any_port = hostport.endswith(":*")
    if any_port:
        hostport = hostport[:-2]
    wildcard = hostport.startswith("*.")
    if "*" in scheme or "*" in (hostport[2:] if wildcard else hostport) or "*" in after:
        return (
            f'{shown}: "*" is only allowed as the whole value "*", as a leading "*." label '
            f'after the scheme, e.g. "https://*.example.com", or as the whole port, e.g. '
            f'"http://localhost:*" (for anything else use allow_origin_regex)'
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
    if port is not None and any_port:
        return (
            f'{shown} has two ports; ":*" stands for any port: write '
            f"{json.dumps(value.replace(':' + port + ':*', ':*', 1))} for any port, or "
            f"{json.dumps(value[:-2])} for port {port} only"
        )
    if port is not None:
        if not port.isdigit() or not 0 < int(port) <= 65535:
            return f"{shown} has an invalid port {json.dumps(port)}; use 1-65535 or no port"
        if port == DEFAULT_PORTS.get(scheme):
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
    """One ``allow_origin_regex`` pattern (the whole value, or one list item)."""
    if value is None:
        return None
    if value == "":
        raise _fail(
            "is empty; remove it (null or [] means no regex), or write a pattern such as "
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


def _check_network(value: str) -> str:
    """A listen.trusted_proxies entry: an IP address or a CIDR range."""
    import ipaddress

    shown = json.dumps(value)
    try:
        ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise _fail(
            f'{shown} is not an IP address or CIDR range; write e.g. "10.0.0.0/8", '
            f'"192.168.1.10" or "fd00::/8"'
        ) from None
    return value.strip()


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
