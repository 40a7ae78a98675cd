"""API keys and isolation: every route but /healthz needs a key, and a key sees only its
owner's jobs, datasets and files; another owner's ids are 404, exactly like ids that don't exist."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
from sqlalchemy import select

from app.db import session_scope
from app.models import ApiKey, Checkpoint, Export, Job, JobStatus, Sample, utcnow
from app.services.keys import create_key, revoke_key
from app.storage import job_files
from tests.conftest import REPO, bearer, demo_spec, reset_caches
from tests.helpers import register_worker
from tests.test_datasets import CHAT, jsonl, queued_messages, upload

PUBLIC = {"/healthz"}


def finished_job(owner: str, status: str = JobStatus.SUCCEEDED) -> str:
    """A job of `owner`'s that has a checkpoint zip and an adapter zip on disk."""
    with session_scope() as session:
        job = Job(owner=owner, status=status, spec={}, current_step=10, finished_at=utcnow())
        session.add(job)
        session.flush()
        files = job_files(job.id)
        for path in (files.checkpoint_zip("checkpoint-10"), files.adapter_zip):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip
        session.add(
            Checkpoint(
                job_id=job.id,
                name="checkpoint-10",
                step=10,
                path=str(files.checkpoint_zip("checkpoint-10")),
                size_bytes=22,
                sha256="0" * 64,
            )
        )
        job.adapter_path = str(files.adapter_zip)
        return job.id


def operations(client) -> list[tuple[str, str]]:
    """(method, path template) of every operation in the service's own OpenAPI document."""
    paths = client.get("/openapi.json").json()["paths"]
    return [(method.upper(), path) for path, ops in paths.items() for method in ops if path not in PUBLIC]


# Bodies for operations that need one (a route whose body is required must be listed here); a
# completion names the model in `values`, and streams (it ends when the sampler doesn't answer).
BODIES = {
    ("POST", "/jobs"): {},
    ("POST", "/jobs/{job_id}/generate"): {"prompt": "Hello", "wait_s": 0},
    ("POST", "/v1/chat/completions"): {"messages": [{"role": "user", "content": "Hi"}], "stream": True},
    ("POST", "/v1/completions"): {"prompt": "Hi", "stream": True},
    ("POST", "/jobs/{job_id}/exports"): {"format": "merged"},
}


def an_export(job_id: str) -> str:
    """A finished export of the job's adapter, its file on disk."""
    with session_scope() as session:
        export = Export(job_id=job_id, format="merged", status="succeeded", filename="merged.zip")
        session.add(export)
        session.flush()
        path = job_files(job_id).export_file(export.id, "merged")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"PK\x05\x06" + bytes(18))
        export.path, export.size_bytes, export.sha256 = (
            str(path),
            22,
            hashlib.sha256(path.read_bytes()).hexdigest(),
        )
        return export.id


def a_sample(job_id: str) -> str:
    with session_scope() as session:
        sample = Sample(job_id=job_id, prompt="Hi", max_new_tokens=8, temperature=0.0)
        session.add(sample)
        session.flush()
        return sample.id


def call(client, operation: tuple[str, str], values: dict[str, str], headers: dict[str, str]):
    method, template = operation
    body = BODIES.get(operation)
    if operation[1] in ("/v1/chat/completions", "/v1/completions"):
        body = {**body, "model": values["model"]}
    return client.request(method, template.format(**values), headers=headers, json=body)


def test_every_route_needs_a_key_and_hides_other_owners_things(client, service_env, monkeypatch):
    monkeypatch.setenv("FINETUNE_COMPLETION_TIMEOUT_S", "0.3")  # no sampler runs here
    reset_caches()
    alice = dict(client.headers)
    bob = bearer("bob")
    dataset = upload(client, "chat.jsonl", jsonl(CHAT)).json()
    job_id = finished_job("alice")
    values = {
        "job_id": job_id,
        "name": "checkpoint-10",
        "dataset_id": dataset["id"],
        "file_id": upload(client, "chat.jsonl", jsonl(CHAT)).json()["id"],  # deleted by its own route
        "sample_id": a_sample(job_id),
        "export_id": an_export(job_id),
        "model": client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["fine_tuned_model"],
    }
    revoked = bearer("alice")
    assert revoke_key(revoked["Authorization"].split()[1].split(".")[0])
    anonymous = {"Authorization": ""}

    checked = sorted(operations(client), key=lambda op: op[0] == "DELETE")  # deletes last
    with_ids = [op for op in checked if "{" in op[1]]
    assert len(checked) >= 28 and len(with_ids) >= 20
    for operation in checked:
        for headers in (anonymous, {"Authorization": "Bearer nonsense"}, revoked):
            response = call(client, operation, values, headers)
            assert response.status_code == 401, (operation, response.text)
            assert response.headers.get("www-authenticate") == "Bearer"
        if operation in with_ids:
            response = call(client, operation, values, bob)
            assert response.status_code == 404, (operation, response.text)
            owner = call(client, operation, values, alice)
            # the owner gets the thing (or a state conflict: a 400 under /v1, as OpenAI's client
            # would retry a 409): the 404 above is about ownership
            conflict = 400 if operation[1].startswith("/v1/") else 409
            assert owner.status_code in (200, 202, 204, conflict), (operation, owner.text)

    # live metric streams and lists
    stream = client.get(f"/jobs/{values['job_id']}/logs", headers={**bob, "Accept": "text/event-stream"})
    assert stream.status_code == 404
    assert client.get("/jobs", headers=bob).json()["items"] == []
    assert client.get("/datasets", headers=bob).json()["items"] == []
    assert [j["id"] for j in client.get("/jobs").json()["items"]] == [values["job_id"]]

    # another owner's dataset can't be trained on: it doesn't exist for them
    spec = demo_spec()
    spec["dataset"].update(source=dataset["id"], validation_source=None)
    response = client.post("/jobs", json=spec, headers=bob)
    assert response.status_code == 422 and "no uploaded dataset" in response.text
    assert client.get("/healthz", headers=anonymous).status_code == 200
    print(
        f"FIGURE cross-owner matrix: {len(checked)} operations; no key, a wrong key and a revoked key "
        f"→ 401 on each; another owner's ids → 404 on all {len(with_ids)} that take an id (the owner: "
        "200/202/204 or a state conflict); lists show only the owner's rows"
    )


def test_metrics_show_key_holders_totals_and_only_the_operator_each_job(client, service_env, monkeypatch):
    """Finding 9: /metrics showed other owners' job ids and owner names to any key."""
    from fastapi.testclient import TestClient

    from app.api.main import create_app
    from app.services import runs
    from tests.conftest import reset_caches

    monkeypatch.setenv("FINETUNE_METRICS_TOKEN", "the-operators-token")
    reset_caches()
    for n in range(2):  # a job's id is sent once a worker is free for it
        register_worker(f"celery@box{n}")
    job_id = client.post("/jobs", json={}).json()["id"]
    claim = runs.claim_job(job_id)
    runs.report_progress(claim, 3, [{"step": 3, "loss": 1.0, "tokens_per_second": 500.0, "time": utcnow()}])

    with TestClient(create_app()) as other:
        bobs = other.get("/metrics", headers=bearer("bob")).text
        operators = other.get("/metrics", headers={"Authorization": "Bearer the-operators-token"}).text
        assert other.get("/metrics").status_code == 401
        assert other.get("/jobs", headers={"Authorization": "Bearer the-operators-token"}).status_code == 401

    assert 'finetune_jobs{status="running"} 1.0' in bobs and "finetune_tokens_per_second 500.0" in bobs
    assert job_id not in bobs and "alice" not in bobs and "finetune_job_step" not in bobs
    # queue depth counts jobs that will run: not a cancelled one whose id is still in the broker
    cancelled = client.post("/jobs", json={}).json()["id"]
    client.post(f"/jobs/{cancelled}/cancel")
    assert queued_messages(service_env) == 2
    assert "finetune_queue_depth 0.0" in client.get("/metrics").text
    assert f'finetune_job_step{{job_id="{job_id}",owner="alice"}} 3.0' in operators


def test_only_a_hash_of_the_key_is_stored(service_env):
    key = create_key("carol")
    key_id, secret = key.split(".")
    with session_scope() as session:
        row = session.scalar(select(ApiKey).where(ApiKey.id == key_id))
        assert row.owner == "carol" and secret not in str(vars(row))


def test_queued_jobs_are_capped_per_owner(client, service_env, monkeypatch):
    from tests.conftest import reset_caches

    monkeypatch.setenv("FINETUNE_MAX_QUEUED_JOBS", "2")
    reset_caches()
    for n in range(3):  # a job's id is sent once a worker is free for it
        register_worker(f"celery@box{n}")
    bob = bearer("bob")
    assert [client.post("/jobs", json={}).status_code for _ in range(2)] == [201, 201]

    response = client.post("/jobs", json={})
    assert response.status_code == 429 and response.json()["error"] == "too_many_queued_jobs"
    assert len(client.get("/jobs").json()["items"]) == 2 and queued_messages(service_env) == 2
    assert client.post("/jobs", json={}, headers=bob).status_code == 201  # the cap is per owner

    first = client.get("/jobs").json()["items"][0]["id"]
    assert client.post(f"/jobs/{first}/cancel").status_code == 202
    assert client.post("/jobs", json={}).status_code == 201


def test_the_queue_cap_holds_under_concurrent_submissions(client, service_env, monkeypatch):
    """Finding 10: a burst passed the cap (93 queued + 40 concurrent posts → 107 queued): the
    count and the insert were not serialized."""
    import threading

    from app.errors import TooManyQueuedJobs
    from app.services import jobs
    from app.spec import JobSpec
    from tests.conftest import reset_caches

    monkeypatch.setenv("FINETUNE_MAX_QUEUED_JOBS", "5")
    reset_caches()
    for n in range(6):  # a job's id is sent once a worker is free for it (one spare)
        register_worker(f"celery@box{n}")
    start = threading.Barrier(24)
    outcomes: list[str] = []

    def submit() -> None:
        start.wait()
        try:
            jobs.create_job(JobSpec(), "alice")
            outcomes.append("created")
        except TooManyQueuedJobs:
            outcomes.append("refused")

    threads = [threading.Thread(target=submit) for _ in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(outcomes) == ["created"] * 5 + ["refused"] * 19
    assert len(client.get("/jobs").json()["items"]) == 5 and queued_messages(service_env) == 5


def finetune(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_keys_cli_prints_a_working_key_once(client, service_env):
    made = finetune("keys", "create", "dave", env=service_env)
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert client.get("/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200

    listed = finetune("keys", "list", env=service_env).stdout
    key_id, secret = key.split(".")
    assert key_id in listed and "dave" in listed and secret not in listed

    assert finetune("keys", "revoke", key_id, env=service_env).returncode == 0
    assert client.get("/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    assert finetune("keys", "create", "no spaces please", env=service_env).returncode != 0


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10"])
def test_serve_refuses_auth_off_on_a_reachable_address(service_env, host):
    result = finetune("serve", env={**service_env, "FINETUNE_AUTH": "off", "FINETUNE_HOST": host})
    assert result.returncode == 2 and "refusing to start" in result.stderr


def test_auth_off_acts_as_local_owner(service_env, monkeypatch):
    from fastapi.testclient import TestClient

    from app.api.main import create_app
    from tests.conftest import reset_caches

    monkeypatch.setenv("FINETUNE_AUTH", "off")
    reset_caches()
    with TestClient(create_app()) as anonymous:
        job = anonymous.post("/jobs", json={}).json()
        assert anonymous.get(f"/jobs/{job['id']}").status_code == 200
    with session_scope() as session:
        assert session.get(Job, job["id"]).owner == "local"
