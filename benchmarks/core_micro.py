"""Micro-benchmark of the decision core: nanoseconds per ``Router.decide`` call.

One row per policy shape (exact origin list, subdomain pattern, regex, routes), one
column per kind of request (allowed preflight, allowed actual request, denied actual
request, request without Origin). Pure CPU, no I/O: the policy work a request pays
before any networking.

    python benchmarks/core_micro.py             # best of 5 rounds of about 0.05 s each
    python benchmarks/core_micro.py --quick     # one short round (used by the smoke test)
"""

from __future__ import annotations

import argparse
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from corsproxy.core import CorsPolicy, CorsSettings, RequestView, Router  # noqa: E402

COMMON = dict(
    allow_methods=("GET", "POST", "PUT", "DELETE"),
    allow_headers=("Authorization", "X-Request-Id"),
    allow_credentials=True,
    expose_headers=("X-Request-Id",),
)
EXACT = tuple(f"https://app{i}.example.com" for i in range(20))


def shapes() -> dict[str, tuple[Router, str, str]]:
    """name -> (router, an allowed origin, the path to request)."""
    exact = Router(CorsPolicy(CorsSettings(allow_origins=EXACT, **COMMON)))
    pattern = Router(CorsPolicy(CorsSettings(allow_origins=("https://*.example.com",), **COMMON)))
    regex = Router(
        CorsPolicy(
            CorsSettings(allow_origin_regex=r"https://([a-z0-9-]+\.)*example\.(com|org)", **COMMON)
        )
    )
    default = CorsPolicy(CorsSettings(allow_origins=EXACT[:3], **COMMON))
    routes = Router(
        default,
        [
            (
                f"/api/v{i}/{name}",
                CorsPolicy(CorsSettings(allow_origins=EXACT[i : i + 3], **COMMON)),
            )
            for i in range(1, 4)
            for name in ("items", "users", "orders")
        ]
        + [("/public", CorsPolicy(CorsSettings(allow_origins=("*",), allow_methods=("GET",))))],
    )
    return {
        "exact list (20 origins)": (exact, EXACT[-1], "/items/42"),
        "subdomain pattern": (pattern, "https://eu.app.example.com", "/items/42"),
        "regex (RE2)": (regex, "https://eu.app.example.org", "/items/42"),
        "routes (10, longest prefix)": (routes, EXACT[3], "/api/v3/orders/42?x=1"),
    }


def requests(origin: str, path: str) -> dict[str, RequestView]:
    """Column name -> the request decided in that column."""
    return {
        "preflight allowed": RequestView(
            "OPTIONS",
            path,
            origin=(origin,),
            request_method="PUT",
            request_headers=("content-type,x-request-id",),
            host="api.example.com",
        ),
        "actual allowed": RequestView("GET", path, origin=(origin,), host="api.example.com"),
        "actual denied": RequestView(
            "GET", path, origin=("https://evil.example.net",), host="api.example.com"
        ),
        "no Origin": RequestView("GET", path, host="api.example.com"),
    }


def ns_per_call(router: Router, req: RequestView, rounds: int, target_s: float) -> float:
    decide = router.decide
    timer = timeit.Timer(lambda: decide(req))
    number = 1
    while timer.timeit(number) < target_s:  # grow the loop count until a round is long enough
        number *= 2
    best = min(timer.repeat(repeat=rounds, number=number))
    return best / number * 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="ns per Router.decide call, per policy shape")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per cell; the best counts")
    parser.add_argument("--quick", action="store_true", help="one short round per cell")
    args = parser.parse_args(argv)
    rounds, target_s = (1, 0.01) if args.quick else (max(1, args.rounds), 0.05)

    table = {}
    columns: list[str] = []
    for shape, (router, origin, path) in shapes().items():
        reqs = requests(origin, path)
        columns = list(reqs)
        for column, req in reqs.items():
            decision = router.decide(req)
            # A wrong verdict would time the wrong code path: check before timing.
            expected = column != "actual denied"
            if decision.allowed is not expected:
                print(
                    f"{shape}: {column}: expected allowed={expected}, got {decision}",
                    file=sys.stderr,
                )
                return 1
            table[(shape, column)] = ns_per_call(router, req, rounds, target_s)

    print(f"Router.decide, ns per call (best of {rounds}; Python {sys.version.split()[0]})")
    print()
    print("| policy shape | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for shape in shapes():
        cells = [f"{table[(shape, c)]:.0f}" for c in columns]
        print(f"| {shape} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
