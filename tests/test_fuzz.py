"""Schemathesis against the service's own OpenAPI document: every operation with generated
valid and invalid input, then stateful sequences along the links it infers (POST /jobs →
GET/cancel/resume /jobs/{job_id} …). Each response must not be a server error and must
match the document (status code, content type, headers, body schema)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance
from sqlalchemy import delete

from app.api.main import create_app
from app.db import session_scope
from app.models import Checkpoint, Dataset, Event, Export, Job, Metric, Notification, Sample
from app.services.keys import create_key
from tests.conftest import sqlite_only

SETTINGS = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,  # the same cases on every run
    derandomize=True,
)
# Every check but two that judge requests, not responses: a request valid by the document's
# JSON Schema may still be refused with a 422 naming the field (a base model that is neither a
# hub id nor an allowed local path, a dataset id that doesn't exist), which is the service doing
# its job; and unknown query parameters are ignored, as most HTTP APIs do (the stateful phase
# also counts the key it doesn't know we add as missing).
EXCLUDED = [positive_data_acceptance, negative_data_rejection]


@pytest.fixture
def api_schema(service_env):
    return schemathesis.openapi.from_asgi("/openapi.json", create_app())


@pytest.fixture
def auth(service_env) -> dict[str, str]:
    return {"Authorization": f"Bearer {create_key('fuzz')}"}


@pytest.mark.slow
def test_every_operation_answers_within_its_documented_contract(api_schema, auth):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 14
    cases = 0
    for operation in operations:

        @given(case=operation.as_strategy())
        @SETTINGS
        def check(case):
            nonlocal cases
            cases += 1
            case.call_and_validate(headers=auth, excluded_checks=EXCLUDED)

        check()
    print(
        f"FIGURE schemathesis, stateless: {cases} cases over all {len(operations)} operations; "
        "0 server errors, 0 schema violations"
    )


@pytest.mark.slow
@sqlite_only  # the stateless phase covers both databases; this one is about sequences
def test_stateful_sequences_along_inferred_links(api_schema, auth):
    base = api_schema.as_state_machine()
    calls = 0
    linked_hits: set[str] = set()  # operations on a created job or dataset that answered 2xx

    class Machine(base):
        def setup(self):
            # every sequence starts from the same empty database: hypothesis replays sequences
            # and needs the same answers to the same calls
            with session_scope() as session:
                for table in (Export, Sample, Notification, Checkpoint, Metric, Event, Job, Dataset):
                    session.execute(delete(table))

        def get_call_kwargs(self, case):
            return {"headers": auth}

        def before_call(self, case):
            # This phase is about sequences: every job it creates is the recipe (`{}`), so the
            # links lead to real jobs (generated specs mostly name models or data that can't
            # exist: a 422, then the links lead nowhere). The stateless phase fuzzes the bodies.
            if (case.method.upper(), case.path) == ("POST", "/jobs"):
                case.body = {}

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            nonlocal calls
            calls += 1
            if "{" in case.operation.path and response.status_code < 300:
                linked_hits.add(f"{case.operation.method.upper()} {case.operation.path}")
            case.validate_response(
                response,
                excluded_checks=EXCLUDED,
                transport_kwargs=kwargs or None,
                recorder=self.recorder,
            )

    Machine.run(settings=settings(SETTINGS, max_examples=150, stateful_step_count=6))
    # the sequences reached real jobs and datasets through the links (not only 404s)
    # (which operations succeed varies with the state the sequences build: a job may already be
    # cancelled, the owner's queue may be full; the job may be reached natively or under /v1)
    assert any("/jobs/{job_id}" in hit for hit in linked_hits) and len(linked_hits) >= 2, linked_hits
    print(
        f"FIGURE schemathesis, stateful: {calls} calls in sequences along inferred links "
        f"({len(linked_hits)} operations reached on created jobs and datasets); 0 server errors, "
        "0 schema violations"
    )


def test_numbers_beyond_the_database_integer_range_are_a_422(client):
    """What the stateful run found on Postgres: a cursor past 2^31 reached the query (a 500)."""
    job = client.post("/jobs", json={}).json()
    for path in (
        f"/jobs/{job['id']}/events?after=2147483648",
        f"/jobs/{job['id']}/logs?after_step=2147483648",
    ):
        response = client.get(path)
        assert response.status_code == 422, (path, response.text)
    streamed = client.get(
        f"/jobs/{job['id']}/logs", headers={"Accept": "text/event-stream", "Last-Event-ID": "9" * 12}
    )
    assert streamed.status_code == 422
    assert client.get(f"/jobs/{job['id']}/events?after=2147483647").status_code == 200
