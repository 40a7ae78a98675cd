"""Local models and data (issue 27): links at any depth of a folder, names spelled as local paths
that don't exist, and a job's local files moved before it resumes or runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from app.local_paths import LocalPathRefused
from tests.conftest import REPO, bearer, demo_spec, local_models
from tests.test_datasets import CHAT, jsonl, queued_messages, upload

OASST = REPO / "examples" / "data" / "oasst1" / "en-validation.jsonl"


def submit(client, **fields):
    spec = demo_spec()
    for field, value in fields.items():
        if field == "base_model":
            spec["base_model"] = value
        else:
            spec["dataset"][field] = value
    return client.post("/jobs", json=spec)


def refused_field(response) -> tuple[str, str]:
    assert response.status_code == 422, response.text
    [detail] = response.json()["detail"]
    return detail["field"], detail["message"]


def test_a_link_at_any_depth_to_another_owners_upload_is_refused(client, service_env):
    """Finding 1: a link directly in a root was refused, but one a folder down was followed,
    and owner B trained on owner A's upload."""
    from fastapi.testclient import TestClient

    from app.api.main import create_app

    data_dir = Path(service_env["FINETUNE_DATA_DIR"])
    private = upload(client, "private.jsonl", jsonl(CHAT)).json()
    stored = next((data_dir / "datasets" / private["id"]).iterdir())
    messages = queued_messages(service_env)  # the upload's analysis
    root = local_models(service_env)
    one_down, deeper, linked_folder = root / "folder", root / "a" / "b" / "c", root / "linked"
    one_down.mkdir()
    deeper.mkdir(parents=True)
    linked_folder.mkdir()
    (one_down / "data.jsonl").symlink_to(stored)
    (deeper / "data.jsonl").symlink_to(stored)
    (linked_folder / "uploads").symlink_to(data_dir / "datasets")  # a folder of every upload

    with TestClient(create_app(), headers=bearer("bob")) as bob:
        answers = [
            submit(bob, source=str(one_down)),
            submit(bob, source=str(root / "a")),
            submit(bob, source=str(linked_folder)),
            submit(bob, validation_source=str(one_down)),
        ]

    for response, link in zip(
        answers, ["data.jsonl", "b/c/data.jsonl", "uploads", "data.jsonl"], strict=True
    ):
        field, message = refused_field(response)
        assert field in ("dataset.source", "dataset.validation_source")
        assert f", {link} in this folder is a link" in message and str(data_dir) not in message
    assert client.get("/jobs").json()["items"] == [] and queued_messages(service_env) == messages


def test_a_model_folder_whose_files_link_outside_the_roots_is_refused(client, service_env, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(REPO / "examples" / "tiny-phi2", elsewhere)
    model = local_models(service_env) / "model"
    shutil.copytree(REPO / "examples" / "tiny-phi2", model, ignore=shutil.ignore_patterns("*.safetensors"))
    (model / "model.safetensors").symlink_to(elsewhere / "model.safetensors")

    field, message = refused_field(submit(client, base_model=str(model)))

    assert field == "base_model" and "model.safetensors in this folder is a link" in message
    # links that stay under the roots are a layout like any other (the hub cache's blobs)
    (model / "model.safetensors").unlink()
    (model / "model.safetensors").symlink_to(REPO / "examples" / "tiny-phi2" / "model.safetensors")
    (local_models(service_env) / "data").mkdir()
    (local_models(service_env) / "data" / "chats.jsonl").symlink_to(OASST)
    accepted = submit(client, base_model=str(model), source=str(local_models(service_env) / "data"))
    assert accepted.status_code == 201, accepted.text


def test_the_worker_checks_a_local_folder_again_when_it_opens_it(service_env, tmp_path):
    """A folder changed after the job was submitted: the worker refuses it before reading."""
    from worker.training.data import load_records
    from worker.training.hub import fetching

    folder = local_models(service_env) / "data"
    folder.mkdir()
    shutil.copy(OASST, folder / "chats.jsonl")
    outside = tmp_path / "outside.jsonl"
    outside.write_text(jsonl(CHAT).decode())
    (folder / "more.jsonl").symlink_to(outside)

    with pytest.raises(LocalPathRefused, match="more.jsonl in this folder is a link"):
        load_records(str(folder), "train")
    with pytest.raises(LocalPathRefused, match="more.jsonl in this folder is a link"):
        with fetching("base model", str(folder)):
            pytest.fail("opened")
    shutil.rmtree(folder)
    with pytest.raises(LocalPathRefused, match="no such file or folder"):
        load_records(str(folder / "chats.jsonl"), "train")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("base_model", "examples/nope-model"),
        ("base_model", "./examples/nope-model"),
        ("source", "examples/data/oasst1/nope.jsonl"),
    ],
)
def test_a_missing_local_path_is_refused_as_missing_not_sent_to_the_hub(client, service_env, field, value):
    """Finding 6: `examples/nope-model` is hub-shaped, was accepted, and failed a minute later
    with "the hub could not be reached"."""
    answer = refused_field(submit(client, **{field: value}))

    assert answer == (
        "base_model" if field == "base_model" else "dataset.source",
        f"Value error, no such file or folder under the server's folders for local models and data: {value}",
    )
    assert queued_messages(service_env) == 0


def test_missing_paths_outside_the_roots_and_hub_names_keep_their_answers(client, service_env):
    for value in ("/nope/model", "../nope-model", "~/nope-model"):
        field, message = refused_field(submit(client, base_model=value))
        assert field == "base_model" and "FINETUNE_LOCAL_ROOTS" in message and "no such" not in message
    assert submit(client, base_model="microsoft/phi-2").status_code == 201  # hub-shaped: the hub's


def test_resuming_a_job_whose_local_data_moved_names_it(client, service_env):
    """Finding 4: the stored spec was re-validated as a new one, so a moved file made resume a
    500 `internal_error`."""
    data = local_models(service_env) / "chats.jsonl"
    shutil.copy(OASST, data)
    job = submit(client, source=str(data)).json()
    assert client.post(f"/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
    data.rename(data.with_name("moved.jsonl"))

    response = client.post(f"/jobs/{job['id']}/resume")

    field, message = refused_field(response)
    assert field == "dataset.source" and "no such file or folder" in message and str(data) in message
    assert "moved or changed since the job was created" in message
    assert client.get(f"/jobs/{job['id']}").json()["status"] == "cancelled"
    data.with_name("moved.jsonl").rename(data)
    assert client.post(f"/jobs/{job['id']}/resume").status_code == 202
    assert client.get(f"/jobs/{job['id']}").json()["status"] == "queued"
