"""Path tricks: downloads serve only files the database names, inside the job's own folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.services import runs
from worker.training.artifacts import zip_directory


@pytest.fixture
def job_with_checkpoint(client, service_env) -> tuple[str, Path]:
    data_dir = Path(service_env["FINETUNE_DATA_DIR"])
    claim = runs.claim_job(client.post("/jobs", json={}).json()["id"])
    folder = data_dir / "jobs" / claim.job_id / "output" / "checkpoint-1"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    info = zip_directory(folder, data_dir / "jobs" / claim.job_id / "checkpoints" / "checkpoint-1.zip")
    runs.record_checkpoint(claim, "checkpoint-1", 1, str(info.path), info.size_bytes, info.sha256, keep=2)
    return claim.job_id, info.path


@pytest.mark.parametrize(
    "name",
    [
        "..%2F..%2F..%2Fetc%2Fpasswd",
        "%2E%2E%2Fcheckpoint-1",
        "..",
        "%2Fetc%2Fpasswd",
        "checkpoint-1%00.zip",
        "checkpoint-1.zip",
        "CHECKPOINT-1",
    ],
)
def test_checkpoint_names_the_database_does_not_know_serve_nothing(client, job_with_checkpoint, name):
    job_id, _ = job_with_checkpoint
    response = client.get(f"/jobs/{job_id}/checkpoints/{name}/download")
    assert response.status_code == 404 and b"root:" not in response.content


@pytest.mark.parametrize("bad_id", ["..", "..%2F..%2Fetc", "%2E%2E", "job_%00", "ds_%00", "job_" + "0" * 24])
def test_ids_with_path_tricks_are_unknown(client, bad_id):
    assert client.get(f"/jobs/{bad_id}/adapter").status_code == 404
    response = client.get(f"/datasets/{bad_id}", follow_redirects=False)
    # the HTTP client itself resolves "/datasets/.." to "/", the redirect to the dashboard
    assert response.status_code == 404 or (response.request.url.path == "/" and response.status_code == 307)


def test_a_file_swapped_for_a_symlink_out_of_the_job_folder_is_not_served(
    client, job_with_checkpoint, tmp_path
):
    job_id, zip_path = job_with_checkpoint
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0")
    zip_path.unlink()
    os.symlink(secret, zip_path)

    response = client.get(f"/jobs/{job_id}/checkpoints/checkpoint-1/download")

    assert response.status_code == 404 and b"root:" not in response.content


def test_archives_are_not_accepted_as_uploads(client):
    response = client.post("/datasets", files={"file": ("data.zip", b"PK\x03\x04../../evil")})
    assert response.status_code == 422 and response.json()["detail"][0]["field"] == "file"
