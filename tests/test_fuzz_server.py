"""Fuzz the HTTP server against its own OpenAPI spec with schemathesis, over real HTTP on 127.0.0.1.

Every generated request (valid and invalid bodies, paths and methods, from the spec) must get a
non-5xx answer whose status code is one the spec documents and whose body matches the documented
schema. ``DIFFPRUNE_FUZZ_EXAMPLES`` sets the examples per operation (default 30 in the suite; the
long run in benchmarks/results/reliability.md uses more).
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("uvicorn")
schemathesis = pytest.importorskip("schemathesis")
httpx = pytest.importorskip("httpx")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

from diffprune import MultiTaskModel  # noqa: E402
from diffprune.serving.server import create_app  # noqa: E402

from .fuzz_report import append_report  # noqa: E402
from .serving_fixtures import live, serving_env  # noqa: E402, F401

EXAMPLES = int(os.environ.get("DIFFPRUNE_FUZZ_EXAMPLES", "30"))
SEEN = {"requests": 0, "statuses": {}}


@pytest.fixture(scope="module")
def live_server(serving_env):
    runs = serving_env["runs"]
    model = MultiTaskModel.from_run_dirs({"sent": runs["sent"], "nli": runs["nli"], "sim": runs["sim"]})
    app = create_app(model, diff_root=str(serving_env["root"] / "runs"), batch_wait_ms=1)
    with live(app, log_level="critical") as url:
        yield url


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    """After the module: what the fuzzer sent, appended to DIFFPRUNE_FUZZ_REPORT when set
    (benchmarks/reliability.py reads it)."""
    yield
    append_report({"server": SEEN, "examples_per_operation": EXAMPLES})


@pytest.fixture(scope="module")
def api_schema(live_server):
    return schemathesis.openapi.from_url(f"{live_server}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_5xx_and_responses_match_the_spec(case, live_server):
    response = case.call(base_url=live_server, timeout=30)
    SEEN["requests"] += 1
    SEEN["statuses"][response.status_code] = SEEN["statuses"].get(response.status_code, 0) + 1
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:300]}"
    # Every other check runs (not_a_server_error, status code / content type / response schema conformance,
    # negative data rejection, ...). Not positive_data_acceptance: a schema-valid body may still be refused
    # with the documented 422 - text pairs for a single-text task, a directory that is not a run, a diff
    # trained on another base - which the spec cannot express (it depends on the task and the file system).
    case.validate_response(response, excluded_checks=[positive_data_acceptance])


def test_server_still_answers_after_fuzzing(live_server):
    r = httpx.get(f"{live_server}/health", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok"


@pytest.mark.parametrize(
    "body, status",
    [
        (b"[" * 100_000 + b"]" * 100_000, 400),  # a 100k-deep nested array: RecursionError in the parser
        (b'{"inputs": [' + b"1" * 5000 + b"]}", 400),  # an integer over Python's digit limit: ValueError
        (b'{"inputs": ' + b"[" * 500 + b'"a"' + b"]" * 500 + b"}", 422),  # deep but parseable: the schema refuses
        (b"\xff\xfe", 400),
        (b'{"inputs": [NaN]}', 422),
    ],
)
def test_hostile_bodies_are_4xx(live_server, body, status):
    r = httpx.post(f"{live_server}/v1/tasks/sent/predict", content=body,
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text[:300]
    assert "detail" in r.json()
