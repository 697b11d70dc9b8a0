"""Pydantic validation errors turned into plain-English lines.

:func:`_english` turns one pydantic error into ``(loc, message with the fix)``;
:func:`_path` spells a loc the way the file does (``routes[0].cors``);
:func:`_describe` names a YAML value the way the user wrote it. The module knows
field names, not the models: the caller passes ``model_at`` (in
:mod:`corsproxy.config`, next to the models), so this module never imports
:mod:`corsproxy.config`.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel

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
    "check_websocket_origin": "check_websocket_origin: true",
    "read_timeout": "read_timeout: 60",
    "idle_timeout": "idle_timeout: 30",
    "path": "path: /api",
}

_STR_LISTS = (
    "allow_origins",
    "allow_origin_regex",
    "allow_methods",
    "allow_headers",
    "expose_headers",
)
_RANGE_HINTS = {
    "port": "0 picks any free port",
    "max_body_size": "it is in bytes; write null for no limit",
    "shutdown_grace": "seconds; 0 means stop at once",
    "workers": "processes; auto or 0 means one per usable CPU",
    "connect_timeout": "seconds; fractions like 0.5 are fine",
    "timeout": "seconds; fractions like 0.5 are fine",
    "read_timeout": "seconds; null means no limit",
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


def _field_name(loc: tuple[Any, ...]) -> str | None:
    names = [p for p in loc if isinstance(p, str)]
    return names[-1] if names else None


def _english(
    err: Mapping[str, Any], model_at: Callable[[tuple[Any, ...]], type[BaseModel] | None]
) -> tuple[tuple[Any, ...], str]:
    """One pydantic error as (loc, message with the fix). ``model_at(loc)`` is the
    model that owns the mapping at ``loc`` (for "allowed keys" lists)."""
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
        model = model_at(loc[:-1])
        allowed = list(model.model_fields) if model else []
        key = str(loc[-1])
        hint = difflib.get_close_matches(key, allowed, n=1)
        maybe = f"did you mean {hint[0]}? " if hint else ""
        return loc, f"unknown key; {maybe}allowed keys here: {', '.join(allowed)}"
    if kind == "invalid_key":
        model = model_at(loc[:-1])
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
