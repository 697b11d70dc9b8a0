"""Command-line pieces every ``corsproxy`` command shares (no other imports, so the
command modules below :mod:`corsproxy.cli` can use them without importing it)."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["DEFAULT_PUBLIC_SUFFIX_LIST", "ENV_CONFIG", "config_arg"]

#: The environment variable every command's ``--config`` defaults to.
ENV_CONFIG = "CORSPROXY_CONFIG"
#: Where ``corsproxy learn`` reads the Public Suffix List (Debian's publicsuffix).
DEFAULT_PUBLIC_SUFFIX_LIST = "/usr/share/publicsuffix/public_suffix_list.dat"


def config_arg(parser: Any, purpose: str = "the YAML config file", metavar: str = "FILE") -> None:
    """``--config FILE`` (``-c``), defaulting to $CORSPROXY_CONFIG (``parser`` may be a
    group)."""
    env = os.environ.get(ENV_CONFIG) or None
    parser.add_argument(
        "--config",
        "-c",
        metavar=metavar,
        default=env,
        help=f"{purpose} (default: ${ENV_CONFIG}"
        + (f", now {env!r})" if env else ", which is not set)"),
    )
