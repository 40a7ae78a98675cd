"""Issue 27 item 9: samples and exports follow the jobs' rule. Taken under a lease, renewed while
the worker works; a worker that stops renewing loses the row to the sweeper, which sends it
again, or fails it with the reason once it has used max_attempts; a late write by the worker
that lost it changes nothing. One no worker took (its id lost by the broker, no sampler
running) is failed with the reason: a sample past its caller's deadline at once, an export
after it was sent again max_attempts times."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from sqlalchemy import update

from app.db import session_scope
from app.models import Export, Sample, utcnow
from app.queue import samples_queue
from app.schemas import ExportRequest, SampleRequest
from app.services import exports, queued_work, runs, samples
from app.services.sweeper import sweep
from app.settings import get_settings
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


def sent_ago(table, row_id: str, seconds: float) -> None:
    """As if the row's id had been sent `seconds` ago and no worker had taken it since."""
    with session_scope() as session:
        session.execute(
            update(table)
            .where(table.id == row_id)
            .values(dispatched_at=utcnow() - timedelta(seconds=seconds))
        )


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


UNTAKEN = "is `finetune sampler` running, taking the queue {}?"


def test_a_sample_no_sampler_took_by_its_callers_deadline_fails_with_the_reason(
    client, service_env, monkeypatch
):
    table, row_id = queued("sample", client, monkeypatch)
    monkeypatch.setenv("FINETUNE_LEASE_S", "60")
    reset_caches()
    job_id = row(table, row_id).job_id
    other = samples.create_sample(job_id, TEST_OWNER, SampleRequest(prompt="first")).id
    busy = taken(table, other)
    deadline_s = samples.untaken_after_s()
    assert sweep() == []  # not waited long enough
    sent_ago(table, row_id, deadline_s + 1)

    assert sweep() == []  # the sampler is busy with another sample: this one waits its turn
    assert row(table, row_id).status == "queued"

    assert samples.finish_sample(busy, completion="done")
    sent = queued_messages(service_env)
    assert sweep() == []

    failed = row(table, row_id)
    assert (failed.status, failed.attempts, failed.dispatched_at) == ("failed", 0, None)
    assert failed.error == f"no sampler took it within {deadline_s:g} s: " + UNTAKEN.format(samples_queue())
    assert queued_messages(service_env) == sent  # not sent again: no one waits for its answer
    assert queued_work.take(table, row_id) is None  # its id, delivered late, finds it failed


def test_an_export_no_worker_took_is_sent_again_then_failed_with_the_reason(client, service_env, monkeypatch):
    table, row_id = queued("export", client, monkeypatch)  # max_attempts 2
    sent = queued_messages(service_env)
    after_s = get_settings().redispatch_after_s
    assert sweep() == []  # not waited long enough

    for resends in (1, 2):
        sent_ago(table, row_id, after_s + 1)
        assert sweep() == [row_id]
        export = row(table, row_id)
        assert (export.status, export.resends, export.attempts) == ("queued", resends, 0)
        assert queued_messages(service_env) == sent + resends  # sent again
        assert sweep() == []  # and given another redispatch_after_s

    sent_ago(table, row_id, after_s + 1)
    assert sweep() == []

    failed = row(table, row_id)
    assert (failed.status, failed.resends, failed.dispatched_at) == ("failed", 2, None)
    reason = f"no sampler took it within {after_s:g} s each of the 3 times it was sent: "
    assert failed.error == reason + UNTAKEN.format(samples_queue())
    assert queued_messages(service_env) == sent + 2  # not sent a fourth time
    assert queued_work.take(table, row_id) is None
