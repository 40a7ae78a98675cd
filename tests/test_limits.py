"""Hostile input: oversized bodies get a 413, models and data outside the allowed folders or
shipping their own code get a 422; nothing is stored or queued."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import REPO, bearer, demo_spec, reset_caches
from tests.test_datasets import queued_messages


def nothing_stored(client, service_env) -> bool:
    datasets_dir = Path(service_env["FINETUNE_DATA_DIR"]) / "datasets"
    leftovers = list(datasets_dir.rglob("*")) if datasets_dir.exists() else []
    return (
        client.get("/jobs").json()["items"] == []
        and client.get("/datasets").json()["items"] == []
        and queued_messages(service_env) == 0
        and leftovers == []
    )


def test_oversized_bodies_are_a_413(client, service_env):
    huge = json.dumps({"dataset": {"source": "x" * (2 << 20)}})

    declared = client.post("/jobs", content=huge, headers={"content-type": "application/json"})
    chunked = client.post(
        "/jobs",
        content=(part.encode() for part in (huge[:1000], huge[1000:])),
        headers={"content-type": "application/json"},
    )

    assert declared.status_code == chunked.status_code == 413
    assert declared.json()["error"] == "body_too_large"
    assert nothing_stored(client, service_env)


def test_uploads_have_their_own_cap(client, service_env, monkeypatch):
    from fastapi.testclient import TestClient

    from app.api.main import create_app

    monkeypatch.setenv("FINETUNE_MAX_UPLOAD_BYTES", "1000")
    reset_caches()
    with TestClient(create_app(), headers=bearer()) as small:
        response = small.post("/datasets", files={"file": ("big.jsonl", b"{}\n" * 1000)})

    assert response.status_code == 413
    assert nothing_stored(client, service_env)


def test_local_models_and_data_outside_the_allowed_folders_are_refused(client, service_env, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    # a link inside an allowed folder does not make its target allowed
    link = Path(service_env["FINETUNE_DATA_DIR"]) / "models-link"
    link.symlink_to(outside)

    for field, value in (
        ("base_model", str(outside)),
        ("base_model", str(link)),
        ("dataset.source", str(outside)),
    ):
        spec = demo_spec()
        if field == "base_model":
            spec["base_model"] = value
        else:
            spec["dataset"]["source"] = value
        response = client.post("/jobs", json=spec)
        assert response.status_code == 422, value
        assert [d["field"] for d in response.json()["detail"]] == [field]
        assert "local paths must lie under" in response.json()["detail"][0]["message"]
    link.unlink()
    assert nothing_stored(client, service_env)


def test_models_that_ship_their_own_code_are_refused(client, service_env):
    model = Path(service_env["FINETUNE_DATA_DIR"]) / "custom-model"
    model.mkdir()
    config = json.loads((REPO / "examples" / "tiny-phi2" / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (model / "config.json").write_text(json.dumps(config))
    spec = demo_spec()
    spec["base_model"] = str(model)

    response = client.post("/jobs", json=spec)

    assert response.status_code == 422
    assert response.json()["detail"] == [
        {
            "field": "base_model",
            "message": "this model ships its own code (auto_map); the server does not run remote code",
        }
    ]
    for url in ("https://evil.example/model", "hf://org/model", "file:///etc/passwd"):
        assert client.post("/jobs", json={"base_model": url}).status_code == 422
    assert client.get("/jobs").json()["items"] == [] and queued_messages(service_env) == 0
