"""Artifacts in a store: the data dir (the default) or an S3-compatible object store
(FINETUNE_STORAGE_URL), here moto's S3 server on loopback. The stores keep and find files the same
way; an upload that did not finish is never seen; downloads through the API keep their owner
checks and checksums, streamed or redirected to a presigned URL."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.db import session_scope
from app.errors import StorageUnavailable
from app.models import Checkpoint, Job, JobStatus, utcnow
from app.settings import get_settings
from app.storage import ArtifactStore, artifact_store, job_files
from tests.conftest import bearer, needs_redis, reset_caches, sqlite_only
from tests.helpers import wait_until
from tests.processes import finetune_process, job_state, running_service, wait_for
from tests.servers import S3Server, s3_server
from tests.test_end_to_end import submit
from tests.test_reliability import events, short_spec, steps

pytestmark = sqlite_only  # the database is not the subject


@pytest.fixture
def s3() -> Iterator[S3Server]:
    with s3_server() as server:
        yield server


@pytest.fixture
def in_s3(service_env, s3, monkeypatch) -> S3Server:
    """This process's settings put artifacts in the test's S3 server."""
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    reset_caches()
    return s3


@pytest.fixture(params=["local", "s3"])
def store(request, service_env) -> ArtifactStore:
    if request.param == "s3":
        request.getfixturevalue("in_s3")
    return artifact_store()


def zipped_folder(folder: Path, target: Path) -> str:
    """`folder` zipped (its name inside, as the trainer's zips are) to `target`; its sha256."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(target, "w") as archive:
        for file in folder.rglob("*"):
            archive.write(file, str(Path(folder.name) / file.relative_to(folder)))
    return hashlib.sha256(target.read_bytes()).hexdigest()


def test_a_stored_file_is_found_listed_and_deleted(store):
    files = job_files("job_" + "1" * 24)
    zip_path = files.checkpoint_zip("checkpoint-5")
    zip_path.parent.mkdir(parents=True)
    zip_path.write_bytes(b"weights" * 1000)

    location = store.put(zip_path)
    store.evict(zip_path)  # a host that keeps only a scratch copy may drop it now

    assert location.endswith("jobs/job_111111111111111111111111/checkpoints/checkpoint-5.zip")
    assert store.size(zip_path) == 7000
    assert store.names(files.checkpoint_zips_dir) == {"checkpoint-5.zip"}
    assert b"".join(store.chunks(zip_path)) == b"weights" * 1000
    assert store.fetch(zip_path).read_bytes() == b"weights" * 1000

    store.delete(zip_path)

    assert store.size(zip_path) is None and store.names(files.checkpoint_zips_dir) == set()
    with pytest.raises(FileNotFoundError):
        store.fetch(zip_path)


def test_a_folder_of_files_goes_at_once(store):
    folder = get_settings().dataset_dir("ds_" + "2" * 24)
    folder.mkdir(parents=True)
    for name in ("a.jsonl", "b.jsonl"):
        (folder / name).write_text("{}\n")
        store.put(folder / name)

    store.delete_folder(folder)

    assert store.names(folder) == set() and not folder.exists()


def test_an_object_store_keeps_only_a_scratch_copy_and_unpacks_by_content(in_s3, tmp_path):
    """What a second host sees: nothing of the first's disk, only the store."""
    store, files = artifact_store(), job_files("job_" + "3" * 24)
    checkpoint = files.checkpoint_dir("checkpoint-5")
    checkpoint.mkdir(parents=True)
    (checkpoint / "adapter_config.json").write_text('{"r": 8}')
    sha256 = zipped_folder(checkpoint, files.checkpoint_zip("checkpoint-5"))
    store.put(files.checkpoint_zip("checkpoint-5"))
    files.clear_scratch()
    assert not files.output_dir.exists() and not files.checkpoint_zips_dir.exists()

    unpacked = files.unzipped_checkpoint("checkpoint-5", sha256)

    assert unpacked.name == "checkpoint-5" and unpacked.parent.name == sha256
    assert (unpacked / "adapter_config.json").read_text() == '{"r": 8}'
    # a zip that is not the one the database recorded is refused, not trained from
    with pytest.raises(OSError, match="recorded"):
        files.unzipped_checkpoint("checkpoint-5", "f" * 64)


def test_an_upload_that_did_not_finish_is_never_seen(in_s3, monkeypatch):
    """A kill in the middle of a multipart upload (a checkpoint is larger than boto3's 8 MiB
    threshold) leaves parts, never an object: nothing lists, finds or fetches it."""
    store, files = artifact_store(), job_files("job_" + "4" * 24)
    big = files.checkpoint_zip("checkpoint-10")
    big.parent.mkdir(parents=True)
    big.write_bytes(b"x" * (9 << 20))

    def killed(**_):
        raise ConnectionError("killed before the upload completed")

    # the process dies before it completes the upload, and so never aborts it either
    events = store.client.meta.events
    for operation in ("CompleteMultipartUpload", "AbortMultipartUpload"):
        events.register(f"before-call.s3.{operation}", killed)
    try:
        with pytest.raises(ConnectionError):
            store.put(big)
    finally:
        for operation in ("CompleteMultipartUpload", "AbortMultipartUpload"):
            events.unregister(f"before-call.s3.{operation}", killed)

    started = in_s3.client().list_multipart_uploads(Bucket=in_s3.bucket).get("Uploads", [])
    assert [upload["Key"] for upload in started] == [store.object_key(big)]  # it did begin
    assert store.size(big) is None and store.names(files.checkpoint_zips_dir) == set()
    assert in_s3.keys() == []
    store.evict(big)
    with pytest.raises(FileNotFoundError):
        store.fetch(big)


def test_leftovers_the_database_never_recorded_are_removed_from_the_store(in_s3):
    """A kill after the upload but before the database recorded it leaves an object the next run
    deletes: the database records what exists."""
    store, files = artifact_store(), job_files("job_" + "5" * 24)
    for name in ("checkpoint-5", "checkpoint-10"):
        path = files.checkpoint_zip(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"PK")
        store.put(path)
    files.clear_scratch()

    removed = files.remove_unrecorded({"checkpoint-5"})

    assert removed == ["checkpoint-10.zip"]
    assert store.names(files.checkpoint_zips_dir) == {"checkpoint-5.zip"}


def test_an_unreachable_store_is_storage_unavailable(in_s3):
    store = artifact_store()
    in_s3.stop()

    with pytest.raises(StorageUnavailable):
        store.size(job_files("job_" + "6" * 24).adapter_zip)


def test_the_sampler_and_exports_find_a_jobs_adapters_in_the_store(in_s3):
    """What `finetune sampler` loads (an answer, an export, a job continuing from another) on a
    host that never trained the job: the final adapter and a checkpoint, unpacked from the store."""
    from worker.adapters import adapter_folder

    with session_scope() as session:
        job = Job(owner="alice", status=JobStatus.SUCCEEDED, spec={}, current_step=4, finished_at=utcnow())
        session.add(job)
        session.flush()
        files = job_files(job.id)
        for folder, archive in (
            (files.adapter_dir, files.adapter_zip),
            (files.checkpoint_dir("checkpoint-4"), files.checkpoint_zip("checkpoint-4")),
        ):
            folder.mkdir(parents=True)
            (folder / "adapter_config.json").write_text(json.dumps({"from": folder.name}))
            sha256 = zipped_folder(folder, archive)
            at = files.store.put(archive)
            if folder == files.adapter_dir:
                job.adapter_path, job.adapter_size_bytes, job.adapter_sha256 = at, 1, sha256
            else:
                checkpoint = {"name": "checkpoint-4", "step": 4, "size_bytes": 1, "sha256": sha256}
                session.add(Checkpoint(job_id=job.id, path=at, **checkpoint))
        job_id = job.id
    files.clear_scratch()

    final, checkpoint = adapter_folder(job_id, None), adapter_folder(job_id, "checkpoint-4")

    assert json.loads((final / "adapter_config.json").read_text()) == {"from": "adapter"}
    assert json.loads((checkpoint / "adapter_config.json").read_text()) == {"from": "checkpoint-4"}
    assert final.is_relative_to(get_settings().data_dir / "unpacked")
    # gone from the store (and from this host's cache): the sampler says so
    files.store.delete(files.checkpoint_zip("checkpoint-4"))
    shutil.rmtree(get_settings().data_dir / "unpacked")
    with pytest.raises(FileNotFoundError, match="checkpoint-4 is no longer on disk or in the store"):
        adapter_folder(job_id, "checkpoint-4")


# --- downloads through the API -----------------------------------------------------------------


def job_with_artifacts(owner: str) -> tuple[str, str, str]:
    """A succeeded job of `owner`'s whose checkpoint and adapter zips are in the store, as a
    worker leaves them; (job id, checkpoint sha256, adapter sha256)."""
    with session_scope() as session:
        job = Job(owner=owner, status=JobStatus.SUCCEEDED, spec={}, current_step=10, finished_at=utcnow())
        session.add(job)
        session.flush()
        files = job_files(job.id)
        sums = []
        contents = {files.checkpoint_zip("checkpoint-10"): b"ckpt", files.adapter_zip: b"adapter"}
        for path, content in contents.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content * 1000)
            sums.append(hashlib.sha256(path.read_bytes()).hexdigest())
        stored_at = files.store.put(files.checkpoint_zip("checkpoint-10"))
        recorded = {"name": "checkpoint-10", "step": 10, "size_bytes": 4000, "sha256": sums[0]}
        session.add(Checkpoint(job_id=job.id, path=stored_at, **recorded))
        job.adapter_path = files.store.put(files.adapter_zip)
        job.adapter_size_bytes, job.adapter_sha256 = 7000, sums[1]
        files.clear_scratch()  # the API's host has no copy: what it sends comes from the store
        return job.id, sums[0], sums[1]


def test_downloads_stream_from_the_store_with_their_checksum(in_s3, client):
    job_id, checkpoint_sha, adapter_sha = job_with_artifacts("alice")

    for path, sha256 in (
        (f"/jobs/{job_id}/checkpoints/checkpoint-10/download", checkpoint_sha),
        (f"/jobs/{job_id}/adapter", adapter_sha),
    ):
        response = client.get(path)
        assert response.status_code == 200, response.text
        assert response.headers["x-checksum-sha256"] == sha256
        assert hashlib.sha256(response.content).hexdigest() == sha256
        assert int(response.headers["content-length"]) == len(response.content)
        assert "attachment" in response.headers["content-disposition"]

    # another owner's job is no job, stored or not
    other = client.get(f"/jobs/{job_id}/adapter", headers=bearer("bob"))
    assert (other.status_code, other.json()["error"]) == (404, "job_not_found")


def test_downloads_redirect_to_a_presigned_url_after_the_owner_check(in_s3, client, monkeypatch):
    monkeypatch.setenv("FINETUNE_STORAGE_REDIRECT_S", "60")
    get_settings.cache_clear()
    job_id, checkpoint_sha, _ = job_with_artifacts("alice")
    path = f"/jobs/{job_id}/checkpoints/checkpoint-10/download"

    response = client.get(path, follow_redirects=False)

    assert response.status_code == 307 and response.headers["x-checksum-sha256"] == checkpoint_sha
    url = response.headers["location"]
    assert url.startswith(in_s3.endpoint_url) and "X-Amz-Expires=60" in url and "Signature" in url
    fetched = httpx.get(url)  # no API key: the URL alone grants it, until it expires
    assert fetched.status_code == 200 and hashlib.sha256(fetched.content).hexdigest() == checkpoint_sha
    assert f"{job_id}-checkpoint-10.zip" in fetched.headers["content-disposition"]

    for owner in ("bob",):  # another owner gets no URL, only the 404 a missing job gets
        refused = client.get(path, headers=bearer(owner), follow_redirects=False)
        assert (refused.status_code, refused.json()["error"]) == (404, "job_not_found")
        assert "location" not in refused.headers


def test_a_recorded_file_missing_from_the_store_is_404_and_a_store_down_is_503(in_s3, client):
    job_id, _, _ = job_with_artifacts("alice")
    key = artifact_store().object_key(job_files(job_id).checkpoint_zip("checkpoint-10"))
    in_s3.client().delete_object(Bucket=in_s3.bucket, Key=key)

    missing = client.get(f"/jobs/{job_id}/checkpoints/checkpoint-10/download")
    assert (missing.status_code, missing.json()["error"]) == (404, "artifact_not_ready")

    in_s3.stop()
    down = client.get(f"/jobs/{job_id}/adapter")
    assert (down.status_code, down.json()["error"]) == (503, "storage_unavailable")
    assert "Retry-After" in down.headers and "Traceback" not in down.text
    assert in_s3.endpoint_url.removeprefix("http://") not in down.text and "artifacts/" not in down.text


def test_an_upload_lives_in_the_store_and_goes_with_its_delete(in_s3, client):
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    records = (json.dumps({"messages": turns}) + "\n").encode()
    response = client.post("/datasets", files={"file": ("chats.jsonl", io.BytesIO(records * 3))})
    assert response.status_code == 201, response.text
    dataset = response.json()
    folder = get_settings().dataset_dir(dataset["id"])

    assert in_s3.keys() == [f"artifacts/datasets/{dataset['id']}/chats.jsonl"]
    assert not folder.exists()  # the API's copy was scratch
    content = client.get(f"/datasets/{dataset['id']}/content")
    assert content.content == records * 3 and content.headers["x-checksum-sha256"] == dataset["sha256"]
    assert client.get(f"/datasets/{dataset['id']}/content", headers=bearer("bob")).status_code == 404

    # what a worker trains on: fetched into its own data dir
    from app.services.dataset_files import dataset_file

    assert dataset_file(dataset["id"]).read_bytes() == records * 3

    assert client.delete(f"/datasets/{dataset['id']}").status_code == 204
    assert in_s3.keys() == []


# --- a job killed on one host resumes on another, through the store ------------------------------


@pytest.mark.e2e
@pytest.mark.faults
@needs_redis
def test_a_job_killed_on_one_host_resumes_on_another_from_the_store(redis_env, s3, demo_model, tmp_path):
    """Two `finetune worker` processes with data dirs of their own (no folder in common), one
    bucket, one database: the first is killed -9 after a checkpoint; the second, which never saw
    the first's disk, resumes from the checkpoint in the store; each step is recorded once."""
    env = {**redis_env, **s3.env(), "FINETUNE_LEASE_S": "3", "FINETUNE_SWEEP_INTERVAL_S": "1"}
    hosts = {name: {**env, "FINETUNE_DATA_DIR": str(tmp_path / name)} for name in ("host-a", "host-b")}
    with running_service(env, tmp_path, worker=False) as client:  # the API's data dir: tmp_path/data
        with finetune_process("worker", hosts["host-a"], tmp_path, name="worker-a") as first:
            job = submit(client, short_spec(max_steps=8, save_steps=4, save_total_limit=5))
            wait_until(
                lambda: client.get(f"/jobs/{job['id']}/checkpoints").json()["items"],
                300,
                what="the first checkpoint to be recorded",
                every=0.05,
                state=lambda: job_state(client, job["id"]),
            )
            os.killpg(first.pid, signal.SIGKILL)  # the worker and the child training the job
        killed = client.get(f"/jobs/{job['id']}").json()
        recorded_at_kill = client.get(f"/jobs/{job['id']}/checkpoints").json()["items"]
        assert killed["status"] == "running" and killed["current_step"] < 8, "killed after the end"

        with finetune_process("worker", hosts["host-b"], tmp_path, name="worker-b"):
            done = wait_for(client, job["id"], {"succeeded", "failed", "cancelled"})

        assert (done["status"], done["attempts"]) == ("succeeded", 2), events(client, job["id"])
        resumed_from = recorded_at_kill[-1]
        messages = [e["message"] for e in events(client, job["id"])]
        resumed = f"stopped renewing its lease: resuming from {resumed_from['name']}"
        assert any(m.endswith(resumed) for m in messages), messages
        assert steps(client, job["id"]) == list(range(1, 9))  # each step once, none missing

        # host B trained from the zip it unpacked from the store, checked against the recorded sha256
        assert (tmp_path / "host-b" / "unpacked" / resumed_from["sha256"] / resumed_from["name"]).is_dir()
        # the store holds what the database records, and nothing else
        checkpoints = client.get(f"/jobs/{job['id']}/checkpoints").json()["items"]
        prefix = f"artifacts/jobs/{job['id']}/"
        assert s3.keys(prefix) == sorted(
            [prefix + "adapter.zip"] + [f"{prefix}checkpoints/{c['name']}.zip" for c in checkpoints]
        )
        assert [c["name"] for c in checkpoints] == ["checkpoint-4", "checkpoint-8"]
        # host B kept only scratch, dropped once the job ended; the API's data dir never held a job
        assert not any((tmp_path / "host-b" / "jobs" / job["id"]).glob("*"))
        assert not (tmp_path / "data" / "jobs").exists()
        adapter = client.get(f"/jobs/{job['id']}/adapter")
        assert hashlib.sha256(adapter.content).hexdigest() == done["adapter_sha256"]
        assert zipfile.ZipFile(io.BytesIO(adapter.content)).getinfo("adapter/adapter_config.json")
        saved = next(e for e in events(client, job["id"]) if e["message"] == f"saved {resumed_from['name']}")
        print(
            f"FIGURE object store: worker A killed -9 at step {killed['current_step']} with "
            f"{resumed_from['name']} in the store ({resumed_from['size_bytes']:,} bytes, zipped in "
            f"{saved['data']['zip_seconds']} s, uploaded in {saved['data']['store_seconds']} s); worker B, "
            f"another data dir, resumed from it and finished: steps 1-8 each once"
        )
