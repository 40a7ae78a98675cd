"""Hostile input: oversized bodies get a 413, models and data outside the allowed folders or
shipping their own code get a 422; nothing is stored or queued."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO, bearer, demo_spec, local_models, reset_caches
from tests.test_datasets import CHAT, jsonl, queued_messages, upload


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


def refusal(client, field: str, value: str):
    spec = demo_spec()
    if field == "base_model":
        spec["base_model"] = value
    else:
        spec["dataset"][field.removeprefix("dataset.")] = value
    return client.post("/jobs", json=spec)


def test_local_models_and_data_outside_the_allowed_folders_are_refused(client, service_env, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    # a link inside an allowed folder does not make its target allowed
    link = local_models(service_env) / "models-link"
    link.symlink_to(outside)

    for field, value in (
        ("base_model", str(outside)),
        ("base_model", str(link)),
        ("dataset.source", str(outside)),
    ):
        response = refusal(client, field, value)
        assert response.status_code == 422, value
        assert [d["field"] for d in response.json()["detail"]] == [field]
        assert "FINETUNE_LOCAL_ROOTS" in response.json()["detail"][0]["message"]
    assert nothing_stored(client, service_env)


def test_another_owners_upload_is_never_reached_through_its_path(client, service_env, monkeypatch):
    """Finding 1: the data dir (every owner's uploads, the SQLite database) was an allowed local
    root, and a refusal named the server's folders and told whether a file existed."""
    from fastapi.testclient import TestClient

    from app.api.main import create_app

    data_dir = Path(service_env["FINETUNE_DATA_DIR"])
    private = upload(client, "private.jsonl", jsonl(CHAT)).json()
    private_file = client.get(f"/datasets/{private['id']}").json()
    stored = next((data_dir / "datasets" / private["id"]).iterdir())
    assert private_file["status"] == "ready" and stored.is_file()
    # even an operator root that holds the data dir does not open it
    monkeypatch.setenv("FINETUNE_LOCAL_ROOTS", json.dumps([str(data_dir.parent), str(REPO / "examples")]))
    reset_caches()

    with TestClient(create_app(), headers=bearer("bob")) as bob:
        answers = {
            value: refusal(bob, field, value)
            for field in ("dataset.source", "dataset.validation_source", "base_model")
            for value in (
                str(stored),  # exists
                str(stored.with_name("no-such-file.jsonl")),  # does not
                str(data_dir / "finetune.db"),
                str(stored.parent),
            )
        }
        tokenizer = upload(bob, "a.jsonl", jsonl(CHAT), tokenizer=str(stored.parent))
        allowed = REPO / "examples" / "data" / "oasst1" / "en-validation.jsonl"
        mine = refusal(bob, "dataset.source", str(allowed))

    bodies = {json.dumps(r.json()["detail"][0]["message"]) for r in answers.values()}
    assert {r.status_code for r in answers.values()} == {422}
    assert len(bodies) == 1, bodies  # the same words whether the file exists or not
    assert str(data_dir) not in bodies.pop() and str(data_dir) not in tokenizer.text
    assert tokenizer.status_code == 422 and tokenizer.json()["detail"][0]["field"] == "tokenizer"
    assert mine.status_code == 201, mine.text  # a folder the operator allowed still works
    assert [j["id"] for j in client.get("/jobs").json()["items"]] == []  # alice has none; bob one


def test_models_that_ship_their_own_code_are_refused(client, service_env):
    model = local_models(service_env) / "custom-model"
    model.mkdir()
    config = json.loads((REPO / "examples" / "tiny-phi2" / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    config["model_type"] = "evil"
    (model / "config.json").write_text(json.dumps(config))
    spec = demo_spec()
    spec["base_model"] = str(model)

    response = client.post("/jobs", json=spec)

    assert response.status_code == 422
    assert response.json()["detail"] == [
        {
            "field": "base_model",
            "message": "this model ships its own code (auto_map) for a model_type transformers has no class "
            "for ('evil'); the server does not run remote code",
        }
    ]
    for url in ("https://evil.example/model", "hf://org/model", "file:///etc/passwd"):
        assert client.post("/jobs", json={"base_model": url}).status_code == 422
    assert client.get("/jobs").json()["items"] == [] and queued_messages(service_env) == 0


def test_a_local_copy_of_phi2_as_downloaded_is_accepted(client, service_env):
    """Issue 27: microsoft/phi-2's config.json still carries the `auto_map` of its old remote
    code; transformers loads it with its own Phi class, so a local copy (deploy.md's /models)
    was refused for nothing."""
    model = local_models(service_env) / "phi-2"
    shutil.copytree(REPO / "examples" / "tiny-phi2", model)
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {  # as in microsoft/phi-2's config.json on the hub
        "AutoConfig": "configuration_phi.PhiConfig",
        "AutoModelForCausalLM": "modeling_phi.PhiForCausalLM",
    }
    (model / "config.json").write_text(json.dumps(config))

    response = client.post("/jobs", json={**demo_spec(), "base_model": str(model)})

    assert response.status_code == 201, response.text


def unbounded_fields(schema: dict, where: str, components: dict, seen: frozenset = frozenset()) -> list[str]:
    """Strings without a maxLength, arrays without maxItems and maps without maxProperties in
    a request body's JSON schema (following $refs), named by their path."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return [] if name in seen else unbounded_fields(components[name], where, components, seen | {name})
    found = []
    for option in schema.get("anyOf", []) + schema.get("oneOf", []) + schema.get("allOf", []):
        found += unbounded_fields(option, where, components, seen)
    kind = schema.get("type")
    if kind == "string" and not {"maxLength", "enum", "const", "contentMediaType"} & set(schema):
        found.append(where)
    if kind == "array":
        found += [] if "maxItems" in schema else [f"{where}[]"]
        found += unbounded_fields(schema.get("items", {}), f"{where}[]", components, seen)
    if kind == "object":
        for name, field in schema.get("properties", {}).items():
            found += unbounded_fields(field, f"{where}.{name}", components, seen)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            found += [] if "maxProperties" in schema else [f"{where}{{}}"]
            found += unbounded_fields(extra, f"{where}{{}}", components, seen)
    return found


def test_every_string_and_list_in_every_request_body_is_bounded(client):
    """Finding 7: `dataset.split`, `languages`, `target_modules`, … had no size limit (60 jobs
    of 1 MB each made `GET /jobs?limit=1000` a 60 MB answer)."""
    document = client.get("/openapi.json").json()
    components = document["components"]["schemas"]
    bodies = [
        (f"{method.upper()} {path}", content["schema"])
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
        for content in operation.get("requestBody", {}).get("content", {}).values()
    ]

    unbounded = [field for where, schema in bodies for field in unbounded_fields(schema, where, components)]

    assert len(bodies) >= 6 and unbounded == []


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [
        ("dataset", "split", "s" * 1000),
        ("dataset", "languages", ["en"] * 1000),
        ("dataset", "languages", ["x" * 1000]),
        ("lora", "target_modules", ["q_proj"] * 1000),
        ("lora", "target_modules", ["q" * 1000]),
        ("dataset", "validation_split", "v" * 1000),
    ],
)
def test_oversized_spec_values_are_a_422_naming_the_field(client, service_env, section, field, value):
    response = client.post("/jobs", json={section: {field: value}})

    assert response.status_code == 422
    assert response.json()["detail"][0]["field"].startswith(f"{section}.{field}")
    assert nothing_stored(client, service_env)
