"""Uploaded datasets: a report that names each bad line, and jobs refused before they queue."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from app.services import jobs
from tests.conftest import REPO, TEST_OWNER, demo_spec, sqlite_only

DATA = REPO / "examples" / "data" / "oasst1"
CHAT = [
    {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4."},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "6."},
        ]
    },
]


def upload(client, name: str, content: bytes, **form):
    return client.post("/datasets", files={"file": (name, content)}, data=form)


def jsonl(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def queued_messages(service_env) -> int:
    broker = service_env["FINETUNE_BROKER_URL"].removeprefix("sqla+sqlite:///")
    with sqlite3.connect(broker) as conn:
        try:
            return conn.execute("select count(*) from kombu_message").fetchone()[0]
        except sqlite3.OperationalError:  # no message was ever sent
            return 0


def test_a_valid_chat_file_is_ready_with_its_report(client, service_env):
    response = upload(client, "chats.jsonl", jsonl(CHAT), tokenizer=str(REPO / "examples" / "tiny-phi2"))

    assert response.status_code == 201, response.text
    dataset = response.json()
    assert dataset["id"].startswith("ds_") and (dataset["status"], dataset["format"]) == ("ready", "chat")
    report = dataset["report"]
    assert (report["records"], report["samples"], report["problem_count"], report["valid"]) == (2, 2, 0, True)
    assert report["tokens"]["status"] == "pending"
    assert queued_messages(service_env) == 1  # the worker computes the token statistics
    assert client.get(f"/datasets/{dataset['id']}").json() == dataset
    assert [d["id"] for d in client.get("/datasets").json()["items"]] == [dataset["id"]]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "en-validation.jsonl",
            {"format": "oasst_rows", "messages": 2022, "trees": 191, "languages": {"en": 2022}},
        ),
        (
            "en-100-trees.jsonl",
            {"format": "oasst_trees", "messages": 1167, "trees": 100, "languages": {"en": 1167}},
        ),
    ],
)
def test_oasst_files_report_messages_trees_languages_and_drops(client, name, expected):
    dataset = upload(client, name, (DATA / name).read_bytes()).json()

    report = dataset["report"]
    assert {key: report[key] for key in expected} == expected
    assert dataset["status"] == "ready" and report["samples"] > 0
    if name == "en-validation.jsonl":
        assert report["dropped"]["rows_deleted"] == 40


def test_broken_lines_and_wrong_fields_are_named_by_line(client, service_env):
    content = b"\n".join(
        [
            json.dumps(CHAT[0]).encode(),
            b'{"messages": [ broken',
            json.dumps({"messages": [{"role": "bot", "content": "hi"}]}).encode(),
            json.dumps({"messages": [{"role": "user", "content": "only a question"}]}).encode(),
            b"[1, 2]",
        ]
    )

    dataset = upload(client, "bad.jsonl", content).json()

    assert dataset["status"] == "invalid"
    problems = dataset["report"]["problems"]
    assert [p["line"] for p in problems] == [2, 3, 4, 5]
    assert problems[0]["error"].startswith("invalid JSON")
    assert "messages[0].role" in problems[1]["error"]
    assert "no assistant message" in problems[2]["error"]
    assert problems[3]["error"] == "not a JSON object"
    assert dataset["report"]["tokens"]["status"] == "skipped"
    assert queued_messages(service_env) == 0


def test_oasst_rows_missing_fields_are_named(client):
    rows = [json.loads(line) for line in (DATA / "en-validation.jsonl").read_text().splitlines()[:3]]
    del rows[1]["text"]
    rows[2]["role"] = "moderator"

    report = upload(client, "rows.jsonl", jsonl(rows)).json()["report"]

    assert [(p["line"], p["error"]) for p in report["problems"]] == [
        (2, "missing or wrong fields: text"),
        (3, "missing or wrong fields: role (prompter or assistant)"),
    ]


def test_uploads_must_be_json_lines_or_json(client):
    response = upload(client, "data.csv", b"a,b\n")
    assert response.status_code == 422 and response.json()["detail"][0]["field"] == "file"
    assert client.get("/datasets").json()["items"] == []


def test_a_broken_multipart_body_is_a_bad_field(client):
    """Found by the fuzz test: an empty multipart body was an undocumented 400."""
    boundary = "4bea7452f2ee0b8418ae8c1020a88206"
    broken = {"content": f"--{boundary}\r\n--{boundary}--\r\n".encode()}
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    native = client.post("/datasets", headers=headers, **broken)
    assert native.status_code == 422 and native.json()["detail"][0]["field"] == "body"
    openai = client.post("/v1/files", headers=headers, **broken)
    assert openai.status_code == 400 and openai.json()["error"]["param"] == "body"
    assert client.get("/datasets").json()["items"] == []


def test_a_job_naming_an_invalid_or_unknown_dataset_is_refused_before_it_is_queued(client, service_env):
    invalid = upload(client, "bad.jsonl", b"not json\n").json()
    spec = demo_spec()

    for source, message in ((invalid["id"], "is invalid"), ("ds_" + "0" * 24, "no uploaded dataset")):
        spec["dataset"]["source"] = source
        response = client.post("/jobs", json=spec)
        assert response.status_code == 422
        [problem] = response.json()["detail"]
        assert problem["field"] == "dataset.source" and message in problem["message"]
    assert client.get("/jobs").json()["items"] == []
    assert queued_messages(service_env) == 0


def test_an_upload_is_downloaded_as_sent_and_deleted_unless_a_job_needs_it(client, service_env):
    content = jsonl(CHAT)
    dataset = upload(client, "chats.jsonl", content).json()
    assert client.get(f"/datasets/{dataset['id']}/content").content == content
    spec = demo_spec()
    spec["dataset"]["source"] = dataset["id"]
    job = client.post("/jobs", json=spec).json()

    in_use = client.delete(f"/datasets/{dataset['id']}")
    assert in_use.status_code == 409 and job["id"] in in_use.json()["detail"]
    client.post(f"/jobs/{job['id']}/cancel")
    assert client.delete(f"/datasets/{dataset['id']}").status_code == 204
    assert client.get(f"/datasets/{dataset['id']}").status_code == 404
    assert client.delete(f"/datasets/{dataset['id']}").status_code == 404
    assert not any((Path(service_env["FINETUNE_DATA_DIR"]) / "datasets").iterdir())
    # the cancelled job can't be resumed onto a file that is gone
    resumed = client.post(f"/jobs/{job['id']}/resume")
    assert resumed.status_code == 422 and resumed.json()["detail"][0]["field"] == "dataset.source"


@pytest.mark.slow
@pytest.mark.usefixtures("demo_model")
@sqlite_only
def test_token_statistics_and_training_on_an_uploaded_dataset(client, service_env):
    from worker.analysis import analyze_dataset
    from worker.tasks import execute_job

    tokenizer = str(REPO / "examples" / "tiny-phi2")
    dataset = upload(
        client, "trees.jsonl", (DATA / "en-100-trees.jsonl").read_bytes(), tokenizer=tokenizer
    ).json()

    analyze_dataset(dataset["id"], tokenizer, 256)

    tokens = client.get(f"/datasets/{dataset['id']}").json()["report"]["tokens"]
    assert tokens["status"] == "done" and tokens["samples"] == dataset["report"]["samples"]
    assert 0 < tokens["p50"] <= tokens["p95"] <= tokens["max"] and tokens["over_max_seq_length"] > 0

    spec = demo_spec(max_steps=2, save_steps=2, max_seq_length=128)
    spec["dataset"].update(source=dataset["id"], validation_source=None)
    job = client.post("/jobs", json=spec).json()
    assert job["spec"]["dataset"]["source"] == dataset["id"]
    execute_job(job["id"])
    assert jobs.get_job(job["id"], TEST_OWNER).status == "succeeded"


@pytest.mark.slow
def test_uploads_are_validated_in_bounded_memory(tmp_path):
    """Finding 5: a file was read whole, with every record and conversation held at once (a
    100 MB upload took 1.5 GB in the API). Now a line at a time; threads in an index on disk."""
    import tracemalloc

    from app.dataset_report import validate_file
    from bench.upload_memory import write_rows

    chats, oasst = tmp_path / "chats.jsonl", tmp_path / "rows.jsonl"
    with chats.open("w") as out:
        while out.tell() < 24 << 20:
            out.write(json.dumps(CHAT[1]) + "\n")
    rows = write_rows(oasst, 24 << 20)  # the file the upload bench sends, smaller

    peaks = {}
    for path in (chats, oasst):
        tracemalloc.start()
        report = validate_file(path)
        peaks[path.name] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert report["valid"] and report["samples"] > 0, report

    single = validate_file(DATA / "en-validation.jsonl")
    copies = rows // single["messages"]  # the validation split's rows again under new ids
    assert report["trees"] == copies * single["trees"] and report["samples"] == copies * single["samples"]
    for name, peak in peaks.items():
        print(f"FIGURE validating a 24 MiB {name}: peak Python memory {peak / 2**20:.1f} MiB")
        assert peak < 4 << 20, (name, peak)  # a few MiB for a 24 MiB file


@pytest.mark.parametrize("route", ["/datasets", "/v1/files"])
def test_deeply_nested_json_in_an_upload_is_a_named_problem(client, route):
    """Finding 6: depth ≥ 1000 was a 500."""
    deep = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
    content = jsonl(CHAT[:1]) + deep

    response = client.post(route, files={"file": ("deep.jsonl", content)}, data={"purpose": "fine-tune"})

    assert response.status_code == 201 if route == "/datasets" else 200, response.text
    dataset = client.get(f"/datasets/{response.json()['id']}").json()
    assert dataset["status"] == "invalid"
    assert dataset["report"]["problems"] == [{"line": 2, "error": "JSON nested too deeply"}]


@pytest.mark.parametrize("route", ["/jobs", "/v1/fine_tuning/jobs"])
def test_deeply_nested_json_bodies_are_a_422_naming_the_body(client, route):
    body = b'{"model": "a/b", "training_file": "x", "metadata": ' + b"[" * 5000 + b"]" * 5000 + b"}"

    response = client.post(route, content=body, headers={"content-type": "application/json"})

    assert response.status_code == (422 if route == "/jobs" else 400), response.text
    assert "nested deeper than 32 levels" in response.text
    assert client.get("/jobs").json()["items"] == []


def test_parquet_uploads_are_validated_a_batch_at_a_time(client, monkeypatch):
    """Issue 15: Parquet couldn't be uploaded. Rows are read a batch at a time (2 here)."""
    import io

    import pyarrow
    import pyarrow.parquet

    from app import dataset_report

    monkeypatch.setattr(dataset_report, "PARQUET_BATCH_ROWS", 2)
    bad = {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}
    rows = [CHAT[0], CHAT[0], bad, CHAT[0], CHAT[0]]
    buffer = io.BytesIO()
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), buffer)

    response = upload(client, "chat.parquet", buffer.getvalue())

    assert response.status_code == 201, response.text
    report = response.json()["report"]
    assert (report["format"], report["records"], report["samples"]) == ("chat", 5, 4)
    assert [p["line"] for p in report["problems"]] == [3] and "messages[0].role" in report["problems"][0][
        "error"
    ]

    broken = upload(client, "broken.parquet", b"PAR1 not really")
    assert broken.status_code == 201 and broken.json()["status"] == "invalid"
    assert "not a readable Parquet file" in broken.json()["report"]["problems"][0]["error"]
