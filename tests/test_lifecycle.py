"""The job lifecycle's one table (issue 17): complete, and the picture in docs/architecture.md is
drawn from it."""

from __future__ import annotations

import ast

import pytest
from sqlalchemy import update

from app.db import session_scope
from app.lifecycle import OWNER_ACTIONS, SERVICE_MOVES, IllegalMove, state_diagram
from app.models import Job, JobStatus
from app.services import runs
from app.services.transitions import move_job
from tests.conftest import REPO


def test_every_status_has_its_owner_actions_and_is_reachable():
    assert set(OWNER_ACTIONS) == set(JobStatus)
    reached = {JobStatus.QUEUED} | {after for _, after, _, _ in SERVICE_MOVES}
    reached |= {target for actions in OWNER_ACTIONS.values() for target in actions.values()}
    assert set(JobStatus) <= reached


def test_the_architecture_page_shows_the_tables_diagram():
    page = (REPO / "docs" / "architecture.md").read_text()
    assert "```mermaid\n" + state_diagram() + "\n```" in page


def test_the_readme_lists_every_error_code_as_app_errors_defines_it():
    from app.errors import error_table

    assert error_table() in (REPO / "README.md").read_text()


def test_only_move_job_writes_a_jobs_status():
    """The rule's one place is app/services/transitions.py: no other code sets `jobs.status` in
    an UPDATE or on a loaded row (a new row starts `queued`)."""
    writers = []
    for path in [*(REPO / "app").rglob("*.py"), *(REPO / "worker").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            sets_in_update = (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "values"
                and "update(Job)" in ast.unparse(node.func.value)
                and any(keyword.arg == "status" for keyword in node.keywords)
            )
            sets_on_row = isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Attribute) and t.attr == "status" and ast.unparse(t.value) == "job"
                for t in node.targets
            )
            if sets_in_update or sets_on_row:
                writers.append(path.relative_to(REPO).as_posix())
    assert writers == ["app/services/transitions.py"]


def test_a_move_no_rule_allows_is_refused_and_a_lost_race_changes_nothing(client):
    job_id = client.post("/jobs", json={}).json()["id"]
    with session_scope() as session, pytest.raises(IllegalMove, match="from queued to succeeded"):
        move_job(session, job_id, JobStatus.QUEUED, JobStatus.SUCCEEDED, "skipped the training")
    with session_scope() as session:  # the job is queued, not running: another process moved it
        assert not move_job(session, job_id, JobStatus.RUNNING, JobStatus.FAILED, "lost", error="x")
    job = client.get(f"/jobs/{job_id}").json()
    assert (job["status"], job["error"], job["finished_at"]) == ("queued", None, None)
    events = client.get(f"/jobs/{job_id}/events").json()["items"]
    assert [e["message"] for e in events if e["kind"] == "state"] == ["job created"]


def test_every_move_into_a_status_leaves_the_job_in_the_same_shape(client):
    """A running job that ends (worker or sweeper) gives up its lease and pending pause, and gets
    its finish time only when the status is final; one queued again starts clean."""
    job_id = client.post("/jobs", json={}).json()["id"]
    claim = runs.claim_job(job_id)
    assert claim is not None
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(pause_requested=True))
    runs.finish_job(claim, JobStatus.PAUSED, "paused at step 0")
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert (job.status, job.lease_owner, job.lease_expires_at, job.pause_requested, job.finished_at) == (
            JobStatus.PAUSED,
            None,
            None,
            False,
            None,
        )
    client.post(f"/jobs/{job_id}/cancel").raise_for_status()
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.status == JobStatus.CANCELLED and job.finished_at is not None
    client.post(f"/jobs/{job_id}/resume").raise_for_status()
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert (job.status, job.finished_at, job.error, job.cancel_requested) == (
            JobStatus.QUEUED,
            None,
            None,
            False,
        )
