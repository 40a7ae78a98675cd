"""Exports (issue 16): a job's adapter merged into its base, made by the worker's real code on
the tiny model from its 4-bit weights, downloaded with its SHA-256, and loaded by transformers
alone. The export runs in a thread of the test process instead of `finetune sampler` (its queue
is the one part left out); tests/test_deployment.py runs `finetune export` against the real one."""

from __future__ import annotations

import hashlib
import io
import threading
import zipfile

import pytest

from app.db import session_scope
from app.models import Export
from app.services import jobs
from app.storage import job_files
from tests.conftest import TEST_OWNER, bearer, sqlite_only
from tests.test_auth import finished_job
from tests.test_training import quick_spec
from worker.tasks import execute_job

pytestmark = [pytest.mark.usefixtures("demo_model"), sqlite_only]


@pytest.fixture
def exporter(monkeypatch):
    """Exports are made at once by worker.exports.export, in a thread."""
    from app.services import exports
    from worker.exports import export

    threads = []

    def export_now(export_id: str) -> None:
        thread = threading.Thread(target=export, args=(export_id,))
        thread.start()
        threads.append(thread)

    monkeypatch.setattr(exports, "enqueue_export", export_now)
    yield threads
    for thread in threads:
        thread.join()


def made(client, job_id: str, body: dict, threads: list[threading.Thread]) -> dict:
    response = client.post(f"/jobs/{job_id}/exports", json=body)
    assert response.status_code == 202, response.text
    threads[-1].join()
    return client.get(f"/jobs/{job_id}/exports/{response.json()['id']}").json()


@pytest.mark.slow
def test_the_merged_export_loads_without_peft_and_answers_as_base_plus_adapter(client, exporter, tmp_path):
    import gguf
    import numpy as np
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from worker.training.model import compute_dtype, keep_4bit_layers_trainable, load_quantized_model

    spec = quick_spec(max_steps=2, save_steps=1)  # the demo's: biases train too
    job = jobs.create_job(spec, TEST_OWNER)
    execute_job(job.id)

    export = made(client, job.id, {"format": "merged"}, exporter)
    assert export["status"] == "succeeded", export["error"]
    download = client.get(f"/jobs/{job.id}/exports/{export['id']}/download")
    assert download.status_code == 200
    assert (
        hashlib.sha256(download.content).hexdigest()
        == export["sha256"]
        == download.headers["x-checksum-sha256"]
    )
    assert export["filename"] == f"{job.id}-final-merged.zip" and export["size_bytes"] == len(
        download.content
    )
    zipfile.ZipFile(io.BytesIO(download.content)).extractall(tmp_path)
    folder = tmp_path / "merged"

    merged = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert not any("4bit" in type(m).__name__ or "lora" in type(m).__name__.lower() for m in merged.modules())
    adapter = job_files(job.id).adapter_dir
    dtype = compute_dtype(spec.quantization)
    base = load_quantized_model(spec, dtype, "cpu")
    keep_4bit_layers_trainable(base)  # the exact dequantize-then-matmul path, not the CPU's bf16 kernel
    trained = PeftModel.from_pretrained(base, adapter).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    inputs = tokenizer("Human: What is a good name for a cat?\nAssistant:", return_tensors="pt")
    with torch.no_grad():
        expected, got = trained(**inputs).logits, merged(**inputs).logits
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()

    # the same merged weights as one GGUF file
    as_gguf = made(client, job.id, {"format": "gguf"}, exporter)
    assert as_gguf["status"] == "succeeded" and as_gguf["filename"].endswith("-final-gguf.gguf"), as_gguf
    (tmp_path / "model.gguf").write_bytes(
        client.get(f"/jobs/{job.id}/exports/{as_gguf['id']}/download").content
    )
    written = {t.name: np.array(t.data) for t in gguf.GGUFReader(tmp_path / "model.gguf").tensors}
    merged_weights = load_file(folder / "model.safetensors")
    assert np.array_equal(
        written["blk.1.attn_q.weight"].reshape(128, 128),
        merged_weights["model.layers.1.self_attn.q_proj.weight"].numpy(),
    )

    # a checkpoint's adapter, too
    from_checkpoint = made(client, job.id, {"format": "merged", "checkpoint": "checkpoint-1"}, exporter)
    assert from_checkpoint["status"] == "succeeded" and from_checkpoint["sha256"] != export["sha256"]
    listed = [e["id"] for e in client.get(f"/jobs/{job.id}/exports").json()["items"]]
    assert listed == [export["id"], as_gguf["id"], from_checkpoint["id"]]


def test_an_export_needs_a_finished_adapter_or_a_kept_checkpoint_and_is_the_owners(
    client, exporter, service_env
):
    running = client.post("/jobs", json={}).json()["id"]
    refused = client.post(f"/jobs/{running}/exports", json={"format": "merged"})
    assert refused.status_code == 409 and "checkpoint" in refused.json()["detail"]
    missing = client.post(f"/jobs/{running}/exports", json={"format": "merged", "checkpoint": "checkpoint-5"})
    assert missing.status_code == 404 and missing.json()["error"] == "checkpoint_not_found"
    wrong = client.post(f"/jobs/{running}/exports", json={"format": "onnx"})
    assert wrong.status_code == 422 and "'merged' or 'gguf'" in wrong.json()["detail"][0]["message"]

    done = finished_job(TEST_OWNER)
    export = made(client, done, {"format": "merged"}, exporter)  # its adapter zip is no model
    assert export["status"] == "failed" and "no longer on disk" in export["error"]
    not_ready = client.get(f"/jobs/{done}/exports/{export['id']}/download")
    assert not_ready.status_code == 404 and not_ready.json()["error"] == "artifact_not_ready"

    stranger = bearer("stranger")
    assert client.get(f"/jobs/{done}/exports/{export['id']}", headers=stranger).status_code == 404
    assert (
        client.post(f"/jobs/{done}/exports", json={"format": "merged"}, headers=stranger).status_code == 404
    )
    with session_scope() as session:
        assert session.query(Export).filter(Export.job_id == running).count() == 0
