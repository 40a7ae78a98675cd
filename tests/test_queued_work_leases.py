"""Issue 27 item 9: samples and exports follow the jobs' rule. Taken under a lease, renewed while
the worker works; a worker that stops renewing loses the row to the sweeper, which sends it
again, or fails it with the reason once it has used max_attempts; a late write by the worker
that lost it changes nothing."""

from __future__ import annotations

import time

import pytest

from app.db import session_scope
from app.models import Export, Sample
from app.schemas import ExportRequest, SampleRequest
from app.services import exports, queued_work, runs, samples
from app.services.sweeper import sweep
from tests.conftest import TEST_OWNER, reset_caches
from tests.test_datasets import queued_messages
from worker.lease import LeaseKeeper

LEASE_S = 0.3


def queued(kind: str, client, monkeypatch) -> tuple[type[Sample] | type[Export], str]:
    """A sample or an export of a running job's checkpoint, its id sent to the broker; leases
    from now on last LEASE_S and work is tried twice."""
    job = client.post("/jobs", json={}).json()
    claim = runs.claim_job(job["id"])
    assert claim is not None
    runs.record_checkpoint(claim, "checkpoint-1", 1, "/nowhere.zip", 1, "0" * 64, keep=2)
    monkeypatch.setenv("FINETUNE_LEASE_S", str(LEASE_S))
    monkeypatch.setenv("FINETUNE_MAX_ATTEMPTS", "2")
    reset_caches()
    if kind == "sample":
        return Sample, samples.create_sample(job["id"], TEST_OWNER, SampleRequest(prompt="hi")).id
    request = ExportRequest(format="merged", checkpoint="checkpoint-1")
    return Export, exports.create_export(job["id"], TEST_OWNER, request).id


def row(table, row_id: str):
    with session_scope() as session:
        found = session.get(table, row_id)
        session.expunge(found)
        return found


def taken(table, row_id: str) -> queued_work.Lease:
    result = queued_work.take(table, row_id)
    assert result is not None
    return result[1]


@pytest.mark.parametrize("kind", ["sample", "export"])
def test_work_whose_worker_dies_is_sent_again_then_failed_after_max_attempts(
    client, service_env, monkeypatch, kind
):
    table, row_id = queued(kind, client, monkeypatch)
    sent = queued_messages(service_env)  # the job's id and this one's
    first = taken(table, row_id)  # ... and its worker dies: nothing renews the lease
    assert sweep() == []  # not expired yet

    time.sleep(LEASE_S)
    assert sweep() == [row_id]

    assert (row(table, row_id).status, row(table, row_id).attempts) == ("queued", 1)
    assert queued_messages(service_env) == sent + 1  # sent again
    assert not queued_work.finish(first)  # its worker, back late, would have it succeed
    assert row(table, row_id).status == "queued"
    second = taken(table, row_id)
    assert not queued_work.finish(first, error="late")
    assert (row(table, row_id).status, row(table, row_id).error) == ("running", None)

    time.sleep(LEASE_S)
    assert sweep() == []

    ended = row(table, row_id)
    assert (ended.status, ended.attempts, ended.lease_owner) == ("failed", 2, None)
    assert ended.error == f"worker {second.owner} stopped renewing its lease; gave up after 2 attempts"
    assert queued_messages(service_env) == sent + 1  # not sent a third time
    assert not queued_work.finish(second)  # its worker, back too late, changes nothing
    assert row(table, row_id).status == "failed"


def test_a_renewed_lease_is_left_alone_and_its_holder_finishes(client, monkeypatch):
    table, row_id = queued("sample", client, monkeypatch)
    lease = taken(table, row_id)

    with LeaseKeeper(lease, interval_s=LEASE_S / 6):
        time.sleep(LEASE_S * 2)
        assert sweep() == []

    assert samples.finish_sample(lease, completion="hello")
    done = row(table, row_id)
    assert (done.status, done.completion, done.attempts, done.lease_owner) == ("succeeded", "hello", 1, None)
