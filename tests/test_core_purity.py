"""The decision core is pure: importing it loads no I/O framework."""

import json
import subprocess
import sys


def test_core_imports_no_aiohttp_yaml_or_pydantic():
    code = (
        "import sys, json, corsproxy.core; "
        "print(json.dumps(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('aiohttp', 'yaml', 'pydantic', 'asyncio', 'socket'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_the_proxy_path_uses_no_aiohttp_at_all():
    # The server, its HTTP/1.1 protocol and the upstream client are the proxy's own
    # (httptools for parsing): no aiohttp internals to pin, nothing to break when
    # aiohttp changes. Only the demo's sample API and the tests use aiohttp.
    code = (
        "import sys, json, corsproxy.server, corsproxy.workers, corsproxy.cli; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'aiohttp')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
