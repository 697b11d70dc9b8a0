"""Every case of tests/cases.yaml through the pure decision core.

The policy goes through the real config loader (``Case.router``), the request
through ``Case.request_view``; the decision must match the case exactly: kind,
status, the FULL set of Access-Control-* headers, Vary, failed checks, body.
"""

from collections import Counter

import pytest
from casetable import (
    CASES_FILE,
    CaseTableError,
    cors_headers,
    expected_cors_headers,
    load_cases,
)

CASES = load_cases()
#: The listener address the core tests pretend to be (cases may set their own Host).
LISTENER = "127.0.0.1:8080"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case(case):
    decision = case.router().decide(case.request_view(host=LISTENER))
    expect = case.expect

    assert decision.kind is expect.kind, decision.reasons
    assert decision.status == expect.core_status, decision.reasons
    assert decision.forward is expect.forwarded
    assert cors_headers(decision.headers) == expected_cors_headers(case), decision.reasons
    # The core must never hand the proxy anything but Access-Control-* headers.
    assert all(n.lower().startswith("access-control-") for n, _ in decision.headers)
    assert list(decision.vary) == list(expect.vary)
    if expect.failed is not None:
        assert list(decision.failed) == list(expect.failed), decision.reasons
    if expect.body_startswith is not None:
        assert decision.body.startswith(expect.body_startswith), decision.body
    # Every denial is explained in words, one reason line per failed check.
    assert len(decision.reasons) >= len(decision.failed)
    for check in decision.failed:
        assert any(r.startswith(check + ":") for r in decision.reasons), decision.reasons


def test_case_names_are_unique():
    counts = Counter(c.name for c in CASES)
    assert [n for n, k in counts.items() if k > 1] == []


def test_duplicate_case_name_is_refused(tmp_path):
    text = CASES_FILE.read_text(encoding="utf-8")
    first = text.index("- name: ")
    second = text.index("- name: ", first + 1)
    copy = tmp_path / "cases.yaml"
    copy.write_text(text[:second] + text[first:second] + text[second:], encoding="utf-8")
    with pytest.raises(CaseTableError, match="name also used by case #0"):
        load_cases(copy)


def test_table_is_big_enough_and_explained():
    assert len(CASES) >= 120
    assert all(len(c.why) > 15 for c in CASES)


def test_table_covers_every_kind_and_status():
    seen = {(c.expect.kind.value, c.expect.status) for c in CASES}
    assert seen >= {
        ("preflight", 200),
        ("preflight", 400),
        ("actual", "forwarded"),
        ("actual", 403),
        ("not-cors", "forwarded"),
    }


def test_every_failed_check_combination_is_named_in_order():
    orders = {c.expect.failed for c in CASES if c.expect.failed}
    order = ("origin", "method", "headers", "private-network")
    for failed in orders:
        assert list(failed) == sorted(failed, key=order.index)
    singles = {f[0] for f in orders if len(f) == 1}
    assert singles == set(order)
    assert order in orders


def test_config_yaml_is_a_whole_config_file():
    case = next(c for c in CASES if c.policy.get("routes"))
    text = case.config_yaml("http://127.0.0.1:8000")
    assert "upstream:" in text and "http://127.0.0.1:8000" in text
    assert "routes:" in text and "cors:" in text


def test_host_header_of_a_case_wins_over_the_listener():
    case = next(c for c in CASES if c.name == "enforce_same_origin_request_passes")
    assert case.request_view(host=LISTENER).host == "api.example.com"
    other = next(c for c in CASES if c.name == "enforce_denied_cross_origin_gets_403")
    assert other.request_view(host=LISTENER).host == LISTENER
