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
