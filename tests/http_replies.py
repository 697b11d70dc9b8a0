"""One HTTP request over a fresh connection, and its answer with checked headers:
shared by the packaging replay (``test_packaging``) and the container tests
(``test_docker``)."""

from __future__ import annotations

import http.client
from dataclasses import dataclass


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def cors(self) -> dict[str, str]:
        """Every Access-Control-* header; a name sent twice fails the test."""
        found: dict[str, str] = {}
        for name, value in self.headers:
            if name.lower().startswith("access-control-"):
                assert name.lower() not in {k.lower() for k in found}, f"{name} sent twice"
                found[name] = value
        return found

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        assert len(values) <= 1, f"{name} sent {len(values)} times: {values}"
        return values[0] if values else None


def send(port: int, method: str, path: str, headers: dict[str, str],
         timeout: float = 10) -> Reply:
    """``method path`` to 127.0.0.1:``port``, the whole answer read."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, headers=headers)
        resp = conn.getresponse()
        return Reply(resp.status, resp.getheaders(), resp.read())
    finally:
        conn.close()
