"""``corsproxy test``: a case file of expected answers checked against a config's policy.

Real processes (``python -m corsproxy test ...``) for the exit codes and the exact
output of passing and failing runs, the shipped ``config/policy-tests.yaml`` against
``config/production.yaml``, the JUnit report, and the match with ``corsproxy explain
--json``; in-process :func:`corsproxy.policytest.cmd_test` (the same function, through
the same argparse parser) for the many case-file errors, each with its exact message.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from corsproxy import cli, policytest
from corsproxy.config import load_config

ROOT = Path(__file__).resolve().parent.parent
RUN_TIMEOUT = 60.0
PREFLIGHT_VARY = (
    "Origin, Access-Control-Request-Method, Access-Control-Request-Headers, "
    "Access-Control-Request-Private-Network"
)

CONFIG = """\
upstream: {url: "http://127.0.0.1:8000"}
cors:
  allow_origins: [https://app.example.com]
  allow_methods: [GET, PUT]
  allow_headers: [X-Token]
  allow_credentials: true
  enforce: true
routes:
  - path: /public
    cors: {allow_origins: "*", allow_credentials: false, max_age: 60}
  - path: /legacy
    cors: {report_only: true}
"""

PASSING = """\
- name: the app reads with cookies
  origin: https://app.example.com
  path: /items
  expect: allowed
  headers:
    Access-Control-Allow-Origin: https://app.example.com
    access-control-allow-credentials: "true"
    Vary: Origin
- name: the app may PUT with a token
  origin: https://app.example.com
  request_method: PUT
  request_headers: [X-Token, Content-Type]
  expect: allowed
  headers:
    Access-Control-Allow-Headers: Accept, Accept-Language, Content-Language, Content-Type, X-Token
    Access-Control-Max-Age: "600"
- name: public data for everyone
  origin: https://any.example
  path: /public/logo.png
  expect: allowed
  headers: {Access-Control-Allow-Origin: "*", Access-Control-Allow-Credentials: null}
- name: another site is refused
  origin: https://evil.example
  method: POST
  expect: denied
- name: the legacy API would refuse it
  origin: https://evil.example
  path: /legacy/x
  expect: denied
"""

PASSING_OUTPUT = """\
PASS the app reads with cookies
PASS the app may PUT with a token
PASS public data for everyone
PASS another site is refused
PASS the legacy API would refuse it (report_only policy: checked as if enforced)
note: 1 case on report_only policies, checked against what the policy would answer if \
enforced (the proxy forwards those requests whatever the verdict)
5 cases: 5 passed, 0 failed ({config} against {cases})
"""

FAILING = """\
cases:
  - name: the app reads
    origin: https://app.example.com
    expect: allowed
  - name: another site may write
    origin: https://evil.example
    method: POST
    path: /items
    expect: allowed
  - name: X-Debug is allowed
    origin: https://app.example.com
    request_method: PUT
    request_headers: X-Token, X-Debug
    expect: allowed
    headers:
      Access-Control-Allow-Origin: https://app.example.com
  - name: public data without credentials
    origin: https://any.example
    path: /public
    expect: allowed
    headers:
      access-control-allow-origin: https://any.example
      Access-Control-Allow-Credentials: "true"
      Access-Control-Expose-Headers: null
      Access-Control-Max-Age: "60"
  - name: the legacy API allows everyone
    origin: https://evil.example
    path: /legacy
    expect: allowed
  - name: a handshake from another site is refused
    origin: https://evil.example
    websocket: true
    expect: denied
"""

FAILING_OUTPUT = """\
PASS the app reads
FAIL another site may write
  request:  POST /items
            Origin: https://evil.example
  expected: allowed
  got:      denied (actual request; corsproxy answers 403, not forwarded)
  reasons:
    - origin: "https://evil.example" is not allowed by allow_origins or allow_origin_regex
FAIL X-Debug is allowed
  request:  OPTIONS /
            Origin: https://app.example.com
            Access-Control-Request-Method: PUT
            Access-Control-Request-Headers: X-Token, X-Debug
  expected: allowed
  got:      denied (preflight; corsproxy answers 400)
  reasons:
    - headers: "X-Debug" not in allow_headers (X-Token; Accept, Accept-Language, \
Content-Language and Content-Type are always allowed)
  headers:
    Access-Control-Allow-Origin: expected "https://app.example.com", got none
FAIL public data without credentials
  request:  GET /public
            Origin: https://any.example
  expected: allowed
  got:      allowed (actual request; forwarded upstream)
  reasons:
    - origin: "https://any.example" is allowed by allow_origins "*"
  headers:
    access-control-allow-origin: expected "https://any.example", got "*"
    Access-Control-Allow-Credentials: expected "true", got none
    Access-Control-Max-Age: expected "60", got none
FAIL the legacy API allows everyone (report_only policy: checked as if enforced)
  request:  GET /legacy
            Origin: https://evil.example
  expected: allowed
  got:      denied (actual request; corsproxy answers 403, not forwarded; report_only: as \
if enforced, the proxy forwards it anyway)
  reasons:
    - origin: "https://evil.example" is not allowed by allow_origins or allow_origin_regex
PASS a handshake from another site is refused
note: 1 case on report_only policies, checked against what the policy would answer if \
enforced (the proxy forwards those requests whatever the verdict)
6 cases: 2 passed, 4 failed ({config} against {cases})
"""


# -- running the command ------------------------------------------------------------------


def corsproxy_test(*args: str | Path, env: dict[str, str] | None = None
                   ) -> subprocess.CompletedProcess:
    """Run ``python -m corsproxy test ARGS`` in the repository; no CORSPROXY_CONFIG."""
    if env is None:
        env = {k: v for k, v in os.environ.items() if k != "CORSPROXY_CONFIG"}
    result = subprocess.run(
        [sys.executable, "-m", "corsproxy", "test", *map(str, args)],
        capture_output=True, text=True, timeout=RUN_TIMEOUT, env=env, cwd=ROOT,
    )
    assert "Traceback" not in result.stdout + result.stderr
    return result


def run_in_process(*args: str | Path, capsys: pytest.CaptureFixture[str]
                   ) -> tuple[int, str, str]:
    """``cmd_test`` through the CLI's own argparse parser, in this process."""
    code = policytest.cmd_test(cli.build_parser().parse_args(["test", *map(str, args)]))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "corsproxy.yaml"
    path.write_text(CONFIG, encoding="utf-8")
    return path


def write(tmp_path: Path, text: str, name: str = "cases.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# -- passing and failing runs ---------------------------------------------------------------


def test_passing_file_exits_0_with_one_line_per_case(tmp_path, config_file):
    cases = write(tmp_path, PASSING)
    result = corsproxy_test("--config", config_file, cases)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == PASSING_OUTPUT.format(config=config_file, cases=cases)


def test_failing_file_exits_1_naming_each_failure(tmp_path, config_file):
    cases = write(tmp_path, FAILING)
    result = corsproxy_test("--config", config_file, cases)
    assert (result.returncode, result.stderr) == (1, "")
    assert result.stdout == FAILING_OUTPUT.format(config=config_file, cases=cases)


def test_shipped_policy_tests_pass_against_production():
    result = corsproxy_test("--config", "config/production.yaml", "config/policy-tests.yaml")
    assert (result.returncode, result.stderr) == (0, "")
    lines = result.stdout.splitlines()
    assert 10 <= len(lines) - 1 <= 15
    assert all(line.startswith("PASS ") for line in lines[:-1])
    assert lines[-1] == (
        f"{len(lines) - 1} cases: {len(lines) - 1} passed, 0 failed "
        f"(config/production.yaml against config/policy-tests.yaml)"
    )


def test_shipped_policy_tests_cover_what_they_document():
    cases = policytest.read_cases(str(ROOT / "config" / "policy-tests.yaml"))
    assert {c.expect for c in cases} == {"allowed", "denied"}
    preflights = [c for c in cases if c.request_method is not None]
    assert {c.expect for c in preflights} == {"allowed", "denied"}
    assert any(c.websocket for c in cases)
    assert any(c.origin == "null" for c in cases)
    checked = {name.lower() for c in cases for name, _ in c.headers}
    assert {"access-control-allow-origin", "access-control-allow-credentials", "vary"} <= checked


def test_config_from_the_environment(tmp_path, config_file):
    cases = write(tmp_path, PASSING)
    env = {**os.environ, "CORSPROXY_CONFIG": str(config_file)}
    result = corsproxy_test(cases, env=env)
    assert result.returncode == 0
    assert result.stdout.endswith(f"5 cases: 5 passed, 0 failed ({config_file} against "
                                  f"{cases})\n")


def test_anchors_aliases_and_merge_keys_share_parts_of_cases(tmp_path, config_file):
    cases = write(tmp_path, """\
- &app
  name: one
  origin: https://app.example.com
  expect: allowed
  headers: &credentialed
    Access-Control-Allow-Origin: https://app.example.com
    Access-Control-Allow-Credentials: "true"
- <<: *app
  name: two
  path: /items/1
- {name: three, origin: https://app.example.com, method: PUT, expect: allowed,
   headers: *credentialed}
""")
    result = corsproxy_test("--config", config_file, cases)
    assert result.returncode == 0, result.stdout
    assert result.stdout.startswith("PASS one\nPASS two\nPASS three\n")


# -- the same core as `corsproxy explain --json` ----------------------------------------------


@pytest.mark.parametrize(
    ("case", "flags"),
    [
        ({"origin": "https://app.example.com", "request_method": "PUT",
          "request_headers": ["X-Token", "X-Debug"], "path": "/items"},
         ["--origin", "https://app.example.com", "--request-method", "PUT",
          "--request-headers", "X-Token, X-Debug", "--path", "/items"]),
        ({"origin": "https://evil.example", "method": "POST", "path": "/legacy/a"},
         ["--origin", "https://evil.example", "--method", "POST", "--path", "/legacy/a"]),
        ({"origin": "https://any.example", "path": "/public", "request_method": "GET",
          "request_private_network": True},
         ["--origin", "https://any.example", "--path", "/public", "--request-method", "GET",
          "--request-private-network"]),
        ({"origin": "http://proxy.example", "host": "proxy.example", "method": "DELETE"},
         ["--origin", "http://proxy.example", "--host", "proxy.example", "--method", "DELETE"]),
        ({"origin": "https://evil.example", "websocket": True},
         ["--origin", "https://evil.example", "--websocket"]),
    ],
    ids=["preflight", "report_only", "private_network", "same_origin", "websocket"],
)
def test_verdict_and_headers_equal_explain_json(config_file, case, flags):
    explained = subprocess.run(
        [sys.executable, "-m", "corsproxy", "explain", "--json", "--config", str(config_file),
         *flags],
        capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=ROOT,
    )
    assert explained.returncode == 0, explained.stderr
    expected = json.loads(explained.stdout)
    config = load_config(str(config_file))
    result = policytest.run_case(config, policytest.Case(name="x", expect="allowed", **case))
    assert result.explained == expected
    assert result.decision.allowed is expected["allowed"]


# -- the JUnit report -----------------------------------------------------------------------


def read_report(path: Path) -> ET.Element:
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    return root


def test_junit_report_of_a_passing_run(tmp_path, config_file):
    cases = write(tmp_path, PASSING)
    report = tmp_path / "out" / "report.xml"
    report.parent.mkdir()
    result = corsproxy_test("--config", config_file, cases, "--junit", report)
    assert result.returncode == 0
    root = read_report(report)
    (suite,) = root
    assert suite.tag == "testsuite"
    for element in (root, suite):
        assert element.get("name") == "corsproxy policy tests"
        assert (element.get("tests"), element.get("failures"), element.get("errors")) == (
            "5", "0", "0")
        assert float(element.get("time", "x")) >= 0
    testcases = suite.findall("testcase")
    assert [t.get("name") for t in testcases] == [
        "the app reads with cookies", "the app may PUT with a token", "public data for everyone",
        "another site is refused", "the legacy API would refuse it",
    ]
    assert {t.get("classname") for t in testcases} == {"cases.yaml"}
    assert suite.findall("testcase/failure") == []
    assert os.listdir(report.parent) == ["report.xml"]  # no temporary file left
    umask = os.umask(0)
    os.umask(umask)
    assert report.stat().st_mode & 0o777 == 0o666 & ~umask  # like any new file, not 0600


def test_junit_report_of_a_failing_run(tmp_path, config_file):
    cases = write(tmp_path, FAILING)
    report = tmp_path / "report.xml"
    report.write_text("an old report")
    result = corsproxy_test("--config", config_file, cases, "--junit", report)
    assert result.returncode == 1
    (suite,) = read_report(report)
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("6", "4", "0")
    failures = {t.get("name"): t.find("failure") for t in suite.findall("testcase")}
    assert [name for name, f in failures.items() if f is not None] == [
        "another site may write", "X-Debug is allowed", "public data without credentials",
        "the legacy API allows everyone",
    ]
    debug = failures["X-Debug is allowed"]
    assert debug is not None
    assert debug.get("message") == (
        "expected allowed, got denied; headers differ: Access-Control-Allow-Origin"
    )
    # The element text is the terminal's failure text, without its indentation.
    terminal = result.stdout.split("FAIL X-Debug is allowed\n", 1)[1].split("\nFAIL ", 1)[0]
    assert debug.text == "\n".join(line[2:] for line in terminal.splitlines())
    public = failures["public data without credentials"]
    assert public is not None and public.get("message") == (
        "headers differ: access-control-allow-origin, Access-Control-Allow-Credentials, "
        "Access-Control-Max-Age"
    )


@pytest.mark.parametrize("where", ["missing_directory", "under_a_file", "a_directory"])
def test_junit_report_that_cannot_be_written_exits_2_before_any_case(
    tmp_path, config_file, where
):
    cases = write(tmp_path, PASSING)
    target = {
        "missing_directory": tmp_path / "nowhere" / "report.xml",
        "under_a_file": cases / "report.xml",
        "a_directory": tmp_path,
    }[where]
    result = corsproxy_test("--config", config_file, cases, "--junit", target)
    assert (result.returncode, result.stdout) == (2, "")
    expected = {
        "missing_directory": f"the directory {tmp_path / 'nowhere'} does not exist; create "
                             f"it or write the report elsewhere",
        "under_a_file": f"the directory {cases} does not exist; create it or write the report "
                        f"elsewhere",
        "a_directory": f"{tmp_path} is a directory; name a file in it, e.g. "
                       f"{tmp_path / 'policy-tests.xml'}",
    }[where]
    assert result.stderr == f"corsproxy test: --junit {target}: {expected}\n"


def test_junit_report_never_overwrites_the_case_file(tmp_path, config_file):
    cases = write(tmp_path, PASSING)
    result = corsproxy_test("--config", config_file, cases, "--junit", cases)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        f"corsproxy test: --junit {cases} is the case file; name another file for the report\n"
    )
    assert cases.read_text(encoding="utf-8") == PASSING


def test_junit_text_keeps_to_characters_xml_allows(tmp_path, config_file):
    cases = write(tmp_path, '- {name: odd origin, origin: "https://a\\x01.example", '
                            'expect: allowed}\n')
    report = tmp_path / "report.xml"
    result = corsproxy_test("--config", config_file, cases, "--junit", report)
    assert result.returncode == 1
    assert '            Origin: "https://a\\u0001.example"\n' in result.stdout
    (suite,) = read_report(report)
    assert '"https://a\\u0001.example"' in (suite.findtext("testcase/failure") or "")


# -- arguments, config and files that can't be used (exit 2) -------------------------------


def test_missing_case_file_exits_2(tmp_path, config_file):
    missing = tmp_path / "missing.yaml"
    result = corsproxy_test("--config", config_file, missing)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        f"{missing}: cannot read the case file (No such file or directory); check the path\n"
        f"1 error in {missing}; no case was run\n"
    )


def test_missing_config_exits_2(tmp_path):
    cases = write(tmp_path, PASSING)
    missing = tmp_path / "missing.yaml"
    result = corsproxy_test("--config", missing, cases)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        f"{missing}: cannot read the config file (No such file or directory); check the path "
        f"(--config or CORSPROXY_CONFIG)\n1 error; corsproxy did not use this config\n"
    )


def test_no_config_at_all_exits_2(tmp_path):
    result = corsproxy_test(write(tmp_path, PASSING))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        "corsproxy test: no config file: pass --config FILE or set CORSPROXY_CONFIG\n"
    )


def test_no_case_file_argument_exits_2(config_file):
    result = corsproxy_test("--config", config_file)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.endswith(
        "corsproxy test: error: the following arguments are required: CASES.yaml\n"
    )


def test_invalid_config_and_invalid_cases_are_both_reported(tmp_path):
    config = write(tmp_path, "cors: {allow_origins: [https://app.example.com/]}\n", "bad.yaml")
    cases = write(tmp_path, "- {name: a, origin: https://a.example}\n")
    result = corsproxy_test("--config", config, cases)
    assert (result.returncode, result.stdout) == (2, "")
    lines = result.stderr.splitlines()
    assert lines[:2] == [
        f"{cases}: cases[0].expect: is missing; add it, for example: expect: allowed",
        f"1 error in {cases}; no case was run",
    ]
    # The config's own ConfigError lines (their wording is test_config.py's business).
    assert lines[2].startswith(f'{config}: cors.allow_origins[0]: "https://app.example.com/" ')
    assert lines[3:] == ["1 error; corsproxy did not use this config"]


CASE_FILE_ERRORS = {
    "empty": ("", ["top level: the file is empty; write a list of cases, for example: "
                   "[{name: app, origin: https://app.example.com, expect: allowed}]"]),
    "not_a_list": ("42\n", ["top level: expected a list of cases (or a mapping with cases: "
                            "[...]), got the number 42"]),
    "no_cases_key": ("tests: []\n", [  # no position, so first (as in config errors)
        "cases: is missing; write the cases as a list under cases:, or make the whole file "
        "that list",
        "tests: unknown key; the top level holds only cases: [...] (or is the list of cases "
        "itself)",
    ]),
    "cases_not_a_list": ("cases: {name: a}\n", [
        "cases: expected a list of cases, got a mapping"]),
    "no_cases": ("cases: []\n", [
        "cases: no cases; add at least one (name, origin and expect)"]),
    "case_not_a_mapping": ("- https://app.example.com\n", [
        'cases[0]: expected a mapping with name, origin and expect, got the string '
        '"https://app.example.com"; for example: {name: app, origin: https://app.example.com, '
        'expect: allowed}']),
    "missing_keys": ("- {method: GET}\n", [
        "cases[0].name: is missing; add it, for example: name: the app reads the API",
        "cases[0].origin: is missing; add it, for example: origin: https://app.example.com",
        "cases[0].expect: is missing; add it, for example: expect: allowed",
    ]),
    "unknown_key": ("- {name: a, origin: o, expect: allowed, expected: denied}\n", [
        "cases[0].expected: unknown key; did you mean expect? allowed keys here: name, origin, "
        "method, path, request_method, request_headers, request_private_network, host, "
        "websocket, expect, headers"]),
    "bad_expect": ("- {name: a, origin: o, expect: rejected}\n", [
        'cases[0].expect: expected allowed or denied, got the string "rejected"; a 403 '
        'counts as denied']),
    "expect_not_a_string": ("- {name: a, origin: o, expect: true}\n", [
        "cases[0].expect: expected allowed or denied, got true"]),
    "duplicate_names": ("- {name: a, origin: o, expect: allowed}\n"
                        "- {name: a, origin: p, expect: denied}\n", [
        'cases[1].name: "a" is also the name of cases[0]; give every case its own name']),
    "duplicate_key": ("- name: a\n  origin: o\n  expect: allowed\n  expect: denied\n", [
        "cases[0].expect: written twice (lines 3 and 4); YAML keeps only the last one, so "
        "remove one or merge them"]),
    "name_not_a_string": ("- {name: 7, origin: o, expect: allowed}\n", [
        "cases[0].name: expected a string, got the number 7; for example: name: the app reads "
        "the API"]),
    "name_not_one_line": ('- {name: "a\\nb", origin: o, expect: allowed}\n', [
        'cases[0].name: the string "a\\nb" is not one line of printable text; for example: '
        'name: the app reads the API']),
    "null_origin_unquoted": ("- {name: a, origin: null, expect: denied}\n", [
        'cases[0].origin: got null; for the "null" origin (sandboxed iframes, file: pages) '
        'write it in quotes: "null"']),
    "origin_a_list": ("- {name: a, origin: [x], expect: denied}\n", [
        "cases[0].origin: expected a string, got a list; for example: origin: "
        "https://app.example.com"]),
    "bad_method": ("- {name: a, origin: o, method: GET /x, expect: allowed}\n", [
        'cases[0].method: the string "GET /x" is not a method name; for example: method: POST']),
    "bad_path": ("- {name: a, origin: o, path: items, expect: allowed}\n", [
        'cases[0].path: the string "items" must start with /; for example: path: /users']),
    "bool_as_string": ('- {name: a, origin: o, websocket: "true", expect: allowed}\n', [
        'cases[0].websocket: expected true or false, got the string "true"']),
    "private_network_number": ("- {name: a, origin: o, request_method: GET, "
                               "request_private_network: 1, expect: allowed}\n", [
        "cases[0].request_private_network: expected true or false, got the number 1"]),
    "request_headers_item": ("- {name: a, origin: o, request_method: GET, "
                             "request_headers: [X-A, 3], expect: allowed}\n", [
        "cases[0].request_headers[1]: expected a header name (a string), got the number 3"]),
    "request_headers_mapping": ("- {name: a, origin: o, request_method: GET, "
                                "request_headers: {X-A: 1}, expect: allowed}\n", [
        "cases[0].request_headers: expected a comma list or a list of header names, got a "
        "mapping; for example: request_headers: [Authorization, X-Request-Id]"]),
    "websocket_preflight": ("- {name: a, origin: o, websocket: true, request_method: GET, "
                            "method: POST, expect: allowed}\n", [
        "cases[0].request_method: a WebSocket handshake is a GET without "
        "Access-Control-Request-Method; remove request_method (or websocket: true)",
        "cases[0].method: a WebSocket handshake is a GET; remove method (or websocket: true)",
    ]),
    "headers_not_a_mapping": ("- {name: a, origin: o, expect: allowed, headers: [Vary]}\n", [
        "cases[0].headers: expected a mapping of header name to exact value, got a list; for "
        "example: headers: {Access-Control-Allow-Origin: https://app.example.com}"]),
    "header_value_number": ("- {name: a, origin: o, request_method: GET, expect: allowed, "
                            "headers: {Access-Control-Max-Age: 600}}\n", [
        "cases[0].headers.Access-Control-Max-Age: expected the header's exact value as a "
        'string (or null: must be absent), got the number 600; write it in quotes: "600"']),
    "header_value_bool": ("- {name: a, origin: o, expect: allowed, "
                          "headers: {Access-Control-Allow-Credentials: true}}\n", [
        "cases[0].headers.Access-Control-Allow-Credentials: expected the header's exact value "
        'as a string (or null: must be absent), got true; write it in quotes: "true"']),
    "header_not_cors": ("- {name: a, origin: o, expect: allowed, "
                        "headers: {Content-Type: text/plain}}\n", [
        "cases[0].headers.Content-Type: corsproxy decides only the Access-Control-* headers "
        "and Vary; the others come from the upstream, so remove it"]),
    "header_twice": ("- {name: a, origin: o, expect: allowed, headers: {Vary: Origin, "
                     "vary: Origin}}\n", [
        "cases[0].headers.vary: the same header as Vary (header names are case-insensitive); "
        "keep one"]),
    "header_name_invalid": ('- {name: a, origin: o, expect: allowed, headers: {"Vary:": x}}\n', [
        'cases[0].headers: the string "Vary:" is not a header name; write it as a response '
        'carries it, e.g. Access-Control-Allow-Origin']),
    "yaml_syntax": ("- name: a\n  origin: [o\n", [
        "line 3, column 1: YAML syntax error: expected ',' or ']', but got '<stream end>' "
        "(while parsing a flow sequence at line 2); fix the YAML syntax there"]),
    "yaml_tab": ("- name: a\n\torigin: o\n", [
        "line 2, column 1: YAML syntax error: found character '\\t' that cannot start any "
        "token (while scanning for the next token); indent with spaces, not tabs"]),
    "alias_cycle": ("- &a [*a]\n", [
        "top level: values are nested more than 64 levels deep (or an alias refers to "
        "itself); flatten it"]),
}


@pytest.mark.parametrize("text,errors", CASE_FILE_ERRORS.values(), ids=CASE_FILE_ERRORS.keys())
def test_invalid_case_file_exits_2_with_every_problem(tmp_path, config_file, capsys, text,
                                                      errors):
    cases = write(tmp_path, text)
    code, out, err = run_in_process("--config", config_file, cases, capsys=capsys)
    assert (code, out) == (2, "")
    n = len(errors)
    assert err.splitlines() == [
        *(f"{cases}: {line}" for line in errors),
        f"{n} error{'s' if n != 1 else ''} in {cases}; no case was run",
    ]


def test_problems_come_in_file_order_in_a_real_process(tmp_path, config_file):
    cases = write(tmp_path, """\
cases:
  - name: one
    origin: https://a.example
    expect: rejected
  - name: one
    origin: https://b.example
    expect: allowed
    headers: {X-Frame-Options: DENY}
  - 17
""")
    result = corsproxy_test("--config", config_file, cases)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == [
        f'{cases}: cases[0].expect: expected allowed or denied, got the string "rejected"; a '
        f"403 counts as denied",
        f'{cases}: cases[1].name: "one" is also the name of cases[0]; give every case its own '
        f"name",
        f"{cases}: cases[1].headers.X-Frame-Options: corsproxy decides only the "
        f"Access-Control-* headers and Vary; the others come from the upstream, so remove it",
        f"{cases}: cases[2]: expected a mapping with name, origin and expect, got the number "
        f"17; for example: {{name: app, origin: https://app.example.com, expect: allowed}}",
        f"4 errors in {cases}; no case was run",
    ]


def test_not_utf8_exits_2(tmp_path, config_file, capsys):
    cases = tmp_path / "cases.yaml"
    cases.write_bytes(b"- name: caf\xe9\n")
    code, out, err = run_in_process("--config", config_file, cases, capsys=capsys)
    assert (code, out) == (2, "")
    assert err.splitlines()[0] == (
        f"{cases}: line 1, column 12: the file is not UTF-8 text (byte 0xe9); save it as UTF-8"
    )


def test_case_file_over_10_mib_is_refused_unread(tmp_path, config_file, capsys):
    cases = tmp_path / "cases.yaml"
    cases.write_bytes(b"#" * (policytest.MAX_FILE_BYTES + 1))
    code, out, err = run_in_process("--config", config_file, cases, capsys=capsys)
    assert (code, out) == (2, "")
    assert err.splitlines()[0] == (
        f"{cases}: top level: the file is larger than 10 MiB (10485760 bytes), the limit for "
        f"a case file; split it into several files"
    )


def test_more_than_100000_cases_are_refused(tmp_path, config_file, capsys):
    cases = write(tmp_path, "- 0\n" * (policytest.MAX_CASES + 1))
    code, out, err = run_in_process("--config", config_file, cases, capsys=capsys)
    assert (code, out) == (2, "")
    assert err.splitlines()[0] == (
        f"{cases}: cases: 100001 cases; one file holds at most 100000: split it into several "
        f"files"
    )


def test_alias_bomb_stops_at_the_value_budget(tmp_path, config_file, capsys, monkeypatch):
    monkeypatch.setattr(policytest, "MAX_YAML_NODES", 1000)
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"] + [
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 6)
    ]
    cases = write(tmp_path, "\n".join(levels) + "\n")
    code, out, err = run_in_process("--config", config_file, cases, capsys=capsys)
    assert (code, out) == (2, "")
    assert err.splitlines()[0] == (
        f"{cases}: top level: the file expands to more than 1000 YAML values (every use of an "
        f"alias counts); write the cases out or split the file"
    )
