"""Leases: a worker that stops renewing loses its job to the sweeper, and can write nothing after."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from sqlalchemy import update

from app.db import session_scope
from app.models import Job, utcnow
from app.services import jobs, runs
from app.services.runs import LeaseLost
from app.services.sweeper import sweep
from tests.conftest import TEST_OWNER
from tests.helpers import register_worker
from worker.lease import LeaseKeeper


def expire(job_id: str) -> None:
    with session_scope() as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )


def running_job(client) -> runs.Claim:
    job = client.post("/jobs", json={}).json()
    claim = runs.claim_job(job["id"])
    assert claim is not None
    return claim


def test_an_expired_lease_is_swept_and_the_old_worker_is_fenced_off(client):
    old = running_job(client)
    runs.report_progress(old, 7, [{"step": 7, "loss": 1.0, "time": utcnow()}])
    expire(old.job_id)

    assert sweep() == [old.job_id]

    job = jobs.get_job(old.job_id, TEST_OWNER)
    assert (job.status, job.resume_from, job.current_step) == ("queued", None, 0)
    assert jobs.list_metrics(old.job_id, TEST_OWNER, None, 10).items == []  # replayed from step 0
    new = runs.claim_job(old.job_id)
    assert new is not None and new.attempt == 2
    for write in (
        lambda: runs.report_progress(old, 8, [{"step": 8, "loss": 0.5, "time": utcnow()}]),
        lambda: runs.finish_job(old, "succeeded", "done"),
        lambda: runs.renew_lease(old),
    ):
        with pytest.raises(LeaseLost):
            write()
    assert (
        jobs.list_metrics(old.job_id, TEST_OWNER, None, 10).items == []
        and jobs.get_job(old.job_id, TEST_OWNER).status == "running"
    )
    runs.finish_job(new, "succeeded", "done")
    assert jobs.get_job(old.job_id, TEST_OWNER).status == "succeeded"


def test_a_live_lease_is_left_alone_and_renewed_while_training(client, monkeypatch):
    claim = running_job(client)
    before = jobs.get_job(claim.job_id, TEST_OWNER).updated_at

    with LeaseKeeper(claim, interval_s=0.05):
        time.sleep(0.3)

    assert sweep() == []
    assert jobs.get_job(claim.job_id, TEST_OWNER).updated_at > before


def test_the_sweeper_resumes_from_the_last_checkpoint_and_gives_up_after_max_attempts(client, monkeypatch):
    from tests.conftest import reset_caches

    monkeypatch.setenv("FINETUNE_MAX_ATTEMPTS", "2")
    reset_caches()
    claim = running_job(client)
    runs.record_checkpoint(claim, "checkpoint-5", 5, "/nowhere.zip", 1, "0" * 64, keep=2)
    expire(claim.job_id)

    sweep()
    assert jobs.get_job(claim.job_id, TEST_OWNER).resume_from == "checkpoint-5"

    second = runs.claim_job(claim.job_id)
    expire(claim.job_id)
    assert sweep() == []
    job = jobs.get_job(claim.job_id, TEST_OWNER)
    assert job.status == "failed" and "gave up after 2 attempts" in job.error
    assert second is not None and job.attempts == 2


def test_ids_the_broker_lost_are_sent_again(client, service_env, monkeypatch):
    from app.queue import get_celery
    from app.routing import class_queue
    from app.services.sweeper import redispatch_lost
    from tests.conftest import reset_caches
    from tests.test_datasets import queued_messages

    monkeypatch.setenv("FINETUNE_REDISPATCH_AFTER_S", "0")
    reset_caches()
    for name in ("celery@a", "celery@b"):  # two free workers: both ids are sent
        register_worker(name)
    first, second = (client.post("/jobs", json={}).json()["id"] for _ in range(2))
    assert redispatch_lost() == []  # both ids are in the queue

    with get_celery().connection_for_write() as connection:  # a broker restarted without persistence
        connection.default_channel.queue_purge(class_queue("cpu"))
    assert queued_messages(service_env) == 0
    assert redispatch_lost() == [first, second]
    assert queued_messages(service_env) == 2
    assert redispatch_lost() == []


@pytest.mark.parametrize("action", ["cancel", "pause"])
def test_a_job_whose_worker_dies_after_a_cancel_or_pause_stops_instead_of_running_again(client, action):
    claim = running_job(client)
    client.post(f"/jobs/{claim.job_id}/{action}")
    expire(claim.job_id)

    assert sweep() == []

    job = jobs.get_job(claim.job_id, TEST_OWNER)
    assert job.status == {"cancel": "cancelled", "pause": "paused"}[action]
    assert runs.claim_job(claim.job_id) is None  # a late delivery of its id does not run it
    if action == "pause":
        assert client.post(f"/jobs/{claim.job_id}/resume").json()["status"] == "queued"
