"""The pre-flight check: workers register their GPUs, the API estimates a spec's GPU memory from
its base's config.json and refuses (422) what no registered GPU can hold, before queueing.

The GPUs here are rows a worker would write (there is no GPU on CI): a worker process's own
registration is checked in tests/test_end_to_end.py, and the nvidia-smi reading with a stand-in
nvidia-smi below. The checks run on SQLite (the registry's queries run on both databases in
test_only_live_workers_of_the_job_queue_count). The estimate is checked against peaks measured on a GPU in
test_the_estimate_is_within_15_percent_of_the_peaks_measured_on_a_gpu."""

from __future__ import annotations

import json
import os
import stat
from datetime import timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from app.architectures import shape
from app.memory_estimate import GIB, estimate
from app.queue import job_queue
from app.spec import STORED, JobSpec
from tests.conftest import REPO, local_models, sqlite_only

PHI2_CONFIG = REPO / "bench" / "phi-2-config.json"
MEASURED = REPO / "bench" / "results" / "memory-peaks-h200.json"
T4 = {"name": "Tesla T4", "memory_bytes": 15 * GIB, "bf16": False, "capability": "7.5"}
H200 = {"name": "NVIDIA H200", "memory_bytes": 140 * GIB, "bf16": True, "capability": "9.0"}


def phi2_base(service_env) -> str:
    """A local base with microsoft/phi-2's config.json (all the estimate reads), without its
    `auto_map` (remote code, which the server refuses)."""
    folder = local_models(service_env) / "phi-2"
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads(PHI2_CONFIG.read_text())
    config.pop("auto_map", None)
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def register(name: str, *gpus: dict, queue: str | None = None) -> None:
    from app.services import workers

    workers.register(name, queue or job_queue(), list(gpus))


def messages(client, job_id: str) -> list[str]:
    return [e["message"] for e in client.get(f"/jobs/{job_id}/events").json()["items"]]


@sqlite_only
def test_with_no_worker_registered_a_job_queues_with_a_warning(client, service_env):
    job = client.post("/jobs", json={"base_model": phi2_base(service_env)})
    assert job.status_code == 201
    notes = [m for m in messages(client, job.json()["id"]) if m.startswith("pre-flight")]
    assert notes == [
        "pre-flight: no worker is registered, so nothing checked that a GPU can hold this job "
        "(it needs ~12.7 GiB of GPU memory at its largest micro-batch (4 × 2048 tokens))"
    ]


@sqlite_only
def test_a_spec_no_registered_gpu_holds_is_refused_with_what_to_change(client, service_env):
    register("celery@t4-box", T4)
    base = phi2_base(service_env)
    too_big = {"base_model": base, "training": {"batch_size": 8, "gradient_accumulation_steps": 2}}
    before = client.get("/jobs").json()["items"]

    refused = client.post("/jobs", json=too_big)

    assert refused.status_code == 422
    [problem] = refused.json()["detail"]
    assert problem["field"] == "training"
    message = problem["message"]
    assert message.startswith("needs ~") and "the largest registered GPU is Tesla T4 (15.0 GiB)" in message
    assert "training.batch_size: 4 with gradient_accumulation_steps: 4 to keep 16 samples a step" in message
    assert "training.max_seq_length: 1024" in message
    assert "t4-box" not in refused.text  # the server's host names stay on the server
    assert client.get("/jobs").json()["items"] == before  # nothing queued

    # the suggestion it made is accepted, and the job's events say what it was checked against
    fits = client.post(
        "/jobs", json={**too_big, "training": {"batch_size": 4, "gradient_accumulation_steps": 4}}
    )
    assert fits.status_code == 201
    [note] = [m for m in messages(client, fits.json()["id"]) if m.startswith("pre-flight")]
    assert note.startswith("pre-flight: needs ~12.7 GiB") and note.endswith("fits Tesla T4 (15.0 GiB)")


@sqlite_only
def test_gradient_checkpointing_off_is_refused_on_a_t4_and_fits_a_bigger_card(client, service_env):
    spec = {"base_model": phi2_base(service_env), "training": {"gradient_checkpointing": False}}
    register("celery@t4-box", T4)
    refused = client.post("/jobs", json=spec)
    assert refused.status_code == 422
    assert "training.gradient_checkpointing: true" in refused.json()["detail"][0]["message"]

    register("celery@big-box", H200)
    assert client.post("/jobs", json=spec).status_code == 201


@sqlite_only
def test_bfloat16_and_gpu_counts_are_checked_against_what_workers_have(client, service_env):
    base = phi2_base(service_env)
    register("celery@t4-box", T4)
    bf16 = client.post("/jobs", json={"base_model": base, "quantization": {"compute_dtype": "bfloat16"}})
    assert bf16.status_code == 422
    assert bf16.json()["detail"] == [
        {
            "field": "quantization.compute_dtype",
            "message": "no registered GPU supports bfloat16 (Tesla T4); use 'auto' or 'float16'",
        }
    ]
    assert (
        client.post("/jobs", json={"base_model": base, "quantization": {"compute_dtype": "auto"}}).status_code
        == 201
    )

    two = client.post("/jobs", json={"base_model": base, "resources": {"gpus": 2}})
    assert two.status_code == 422
    assert two.json()["detail"][0]["field"] == "resources.gpus"
    register("celery@pair", T4, T4)
    assert client.post("/jobs", json={"base_model": base, "resources": {"gpus": 2}}).status_code == 201


DPO = {"type": "dpo"}
REFERENCE_FORWARD = "DPO reference forward without gradients (one layer and its hidden states)"
FROZEN_REFERENCE = "DPO reference: the frozen adapter init_from names"


def test_a_dpo_micro_batch_scores_completions_by_chunk_and_runs_the_reference_beside_it():
    phi2 = shape(json.loads(PHI2_CONFIG.read_text()))
    supervised = estimate(JobSpec(), phi2)
    dpo = estimate(JobSpec.model_validate({"method": DPO}), phi2)

    assert (dpo.rows, dpo.tokens) == (supervised.rows, supervised.tokens)  # the same micro-batch
    assert "logits and loss, or one layer's recomputation" not in dpo.parts  # no vocabulary-wide logits
    hidden_states = dpo.tokens * phi2.hidden * 4
    assert 0 < dpo.parts[REFERENCE_FORWARD] <= hidden_states
    assert FROZEN_REFERENCE not in dpo.parts  # the base is the reference: the adapter switched off
    assert dpo.peak_bytes == sum(dpo.parts.values()) < supervised.peak_bytes

    continued = {"method": DPO, "init_from": {"job": "job_" + "0" * 24}}
    frozen = estimate(JobSpec.model_validate(continued), phi2)
    lora = supervised.parts["LoRA weights, gradients and optimizer state"]
    assert frozen.parts[FROZEN_REFERENCE] == lora // 4  # its float32 weights only
    continued["method"] = {"type": "dpo", "dpo": {"hyperparameters": {"reference": "base"}}}
    assert FROZEN_REFERENCE not in estimate(JobSpec.model_validate(continued), phi2).parts


@sqlite_only
def test_a_dpo_job_no_registered_gpu_holds_is_refused_with_what_to_change(client, service_env):
    register("celery@t4-box", T4)
    base = phi2_base(service_env)
    too_big = {
        "base_model": base,
        "method": DPO,
        "training": {"batch_size": 16, "gradient_accumulation_steps": 1},
    }

    refused = client.post("/jobs", json=too_big)

    assert refused.status_code == 422
    [problem] = refused.json()["detail"]
    assert problem["field"] == "training" and "Tesla T4 (15.0 GiB)" in problem["message"]
    assert "training.batch_size: 8 with gradient_accumulation_steps: 2" in problem["message"]
    report = client.post("/preflight", json=too_big).json()
    assert report["fits"] is False and report["parts_gib"][REFERENCE_FORWARD] > 0
    # the micro-batch a supervised job can't take on a T4 fits a DPO one (no vocabulary-wide logits)
    eight = {"batch_size": 8, "gradient_accumulation_steps": 2}
    assert client.post("/jobs", json={**too_big, "training": eight}).status_code == 201
    assert client.post("/jobs", json={"base_model": base, "training": eight}).status_code == 422


def test_only_live_workers_of_the_job_queue_count(client, service_env):
    from sqlalchemy import update

    from app.db import session_scope
    from app.models import Worker, utcnow
    from app.services.workers import STALE

    base = phi2_base(service_env)
    register("sampler@box", H200, queue=f"{job_queue()}.samples")  # answers samples, trains nothing
    register("celery@gone", H200)
    with session_scope() as session:
        session.execute(
            update(Worker)
            .where(Worker.name == "celery@gone")
            .values(seen_at=utcnow() - STALE - timedelta(seconds=1))
        )
    report = client.post("/preflight", json={"base_model": base}).json()
    assert (report["workers"], report["gpus"], report["fits"]) == (0, [], None)

    register("celery@gone", H200)  # renewed: live again
    report = client.post("/preflight", json={"base_model": base}).json()
    assert report["workers"] == 1 and report["fits"] is True
    assert report["gpus"] == [
        {"worker": 1, "name": H200["name"], "memory_gib": 140.0, "bf16": True, "holds_job": True}
    ]


@sqlite_only
def test_a_cpu_only_fleet_and_an_unreadable_config_queue_with_notes(client, service_env):
    register("celery@laptop")  # no GPU: trains on the CPU
    odd = local_models(service_env) / "odd"
    odd.mkdir(parents=True)
    (odd / "config.json").write_text(json.dumps({"model_type": "mystery"}))
    register("celery@t4-box", T4)
    job = client.post("/jobs", json={"base_model": str(odd)})
    assert job.status_code == 201
    assert (
        "pre-flight: memory not estimated: the base's config.json has no hidden_size, num_hidden_layers, "
        "num_attention_heads, vocab_size" in messages(client, job.json()["id"])
    )


@sqlite_only
def test_doctor_prints_the_services_estimate_for_a_spec(client, service_env, monkeypatch, tmp_path):
    """`finetune doctor SPEC` through the real API (in-process) and the real client."""
    from app.cli import cli
    from app.client.commands import load_spec
    from app.client.http import ServiceClient

    def over_test_client(self, url="", api_key=None, timeout=30):
        self.http = client

    monkeypatch.setattr(ServiceClient, "__init__", over_test_client)
    monkeypatch.setattr(ServiceClient, "__exit__", lambda self, *_: None)
    register("celery@t4-box", T4)
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"base_model: {phi2_base(service_env)}\ntraining:\n  batch_size: 8\n")

    result = CliRunner().invoke(cli, ["doctor", str(spec)])
    assert result.exit_code == 1, result.output
    assert "4-bit weights" in result.output and "Tesla T4" in result.output
    assert "training: needs ~" in result.output

    result = CliRunner().invoke(cli, ["doctor", str(spec), "--set", "training.batch_size=2"])
    assert result.exit_code == 0, result.output
    assert "fits Tesla T4" in result.output

    # a method, and its nested settings, as `finetune submit` and `doctor` take them
    dpo = ["method.type=dpo", "method.dpo.hyperparameters.beta=0.2"]
    assert JobSpec.model_validate(load_spec(spec, dpo)).dpo.beta == 0.2
    result = CliRunner().invoke(cli, ["doctor", str(spec), *(f"--set={s}" for s in dpo)])
    assert result.exit_code == 0, result.output
    assert "DPO reference forward" in result.output and "fits Tesla T4" in result.output


def fake_nvidia_smi(folder: Path, rows: list[str]) -> None:
    script = folder / "nvidia-smi"
    script.write_text("#!/bin/sh\ncat <<'EOF'\n" + "\n".join(rows) + "\nEOF\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_workers_read_their_gpus_from_nvidia_smi(tmp_path, monkeypatch):
    from app.settings import get_settings
    from worker.gpus import visible_gpus

    monkeypatch.setenv("PATH", str(tmp_path), prepend=os.pathsep)
    fake_nvidia_smi(
        tmp_path,
        [
            "0, GPU-1111aaaa-0000, Tesla T4, 15360, 7.5",
            "1, GPU-2222bbbb-0000, NVIDIA H100 80GB HBM3, 81559, 9.0",
        ],
    )
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    get_settings.cache_clear()
    assert [(g["name"], g["memory_bytes"], g["bf16"]) for g in visible_gpus()] == [
        ("Tesla T4", 15360 * 2**20, False),
        ("NVIDIA H100 80GB HBM3", 81559 * 2**20, True),
    ]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-2222")  # as CUDA reads it: by index or UUID prefix
    assert [g["name"] for g in visible_gpus()] == ["NVIDIA H100 80GB HBM3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    monkeypatch.setenv("FINETUNE_GPU_MEMORY_GIB", "14")  # the service may use 14 GiB of each
    get_settings.cache_clear()
    assert [(g["name"], g["memory_bytes"]) for g in visible_gpus()] == [
        ("NVIDIA H100 80GB HBM3", 14 * GIB),
        ("Tesla T4", 14 * GIB),
    ]
    get_settings.cache_clear()


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "gemma", "phi"])
def test_the_shape_read_from_a_config_counts_what_transformers_builds(kind):
    """Tiny random configs of each architecture: the weights the estimate counts as 4-bit are
    the decoder's linear layers transformers builds, and LoRA's parameter count is peft's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from app.memory_estimate import lora_modules, lora_parameters

    config = AutoConfig.for_model(
        kind,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        tie_word_embeddings=kind == "gemma",
        **({"head_dim": 24} if kind == "gemma" else {}),
    )
    model = AutoModelForCausalLM.from_config(config)
    read = shape(config.to_dict())
    head = model.get_output_embeddings()
    linear = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head
    )
    assert read.quantized_weights() == linear
    total = sum(p.numel() for p in model.parameters())
    assert read.other_weights() == pytest.approx(total - linear, rel=0.05)

    spec = JobSpec.model_validate({"lora": {"r": 8}})
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=lora_modules(spec, read)))
    assert lora_parameters(spec, read) == peft_model.get_nb_trainable_parameters()[0]
    all_linear = JobSpec.model_validate({"lora": {"r": 8, "target_modules": "all-linear"}})
    model = AutoModelForCausalLM.from_config(config)
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    assert lora_parameters(all_linear, read) == peft_model.get_nb_trainable_parameters()[0]


def test_the_estimate_is_within_15_percent_of_the_peaks_measured_on_a_gpu():
    """bench/memory_peaks.py's runs on an H200 (docs/gpu.md): the worker's real step at full
    micro-batches, Phi-2 and a Llama of TinyLlama's shape, with and without checkpointing."""
    measured = json.loads(MEASURED.read_text())
    configs = {name: shape(model["config"]) for name, model in measured["models"].items()}
    compared = 0
    for run in measured["runs"]:
        if run["status"] != "succeeded":
            continue
        model = run["spec"]["base_model"]
        spec = JobSpec.model_validate(run["spec"], context={STORED: True})
        predicted = estimate(spec, configs[model]).peak_bytes
        # what this run allocated, less what the runs before it in the same process left behind
        peak = run["peak_allocated_bytes"] - run["allocated_before_bytes"]
        assert predicted == pytest.approx(peak, rel=0.15), run["run"]
        compared += 1
    assert compared >= 8


def test_a_hub_base_missing_while_the_hub_is_down_is_asked_for_again_later(tmp_path, monkeypatch):
    """The hub can't be reached here: its two functions are stood in for. A miss is not asked
    for again on every submission (each asking can wait seconds), but is after a while; a
    config found is kept."""
    import huggingface_hub

    from app.services import preflight

    monkeypatch.setattr(preflight, "_hub_configs", {})
    monkeypatch.setattr(preflight, "_hub_misses", {})
    config = tmp_path / "config.json"
    config.write_text((REPO / "bench" / "phi-2-config.json").read_text())
    asked: list[str] = []
    hub_up = False

    def download(name, filename, revision=None, etag_timeout=None):
        asked.append(name)
        if not hub_up:
            raise OSError("hub unreachable")
        return str(config)

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    now = [1000.0]
    monkeypatch.setattr(preflight.time, "monotonic", lambda: now[0])

    assert preflight.base_shape("microsoft/phi-2")[0] is None
    assert preflight.base_shape("microsoft/phi-2")[0] is None
    assert asked == ["microsoft/phi-2"]  # the second submission did not wait on the hub
    hub_up = True
    now[0] += preflight.HUB_MISS_RETRY_S
    found, _ = preflight.base_shape("microsoft/phi-2")
    assert found is not None and found.layers == 32
    assert preflight.base_shape("microsoft/phi-2")[0] == found
    assert asked == ["microsoft/phi-2"] * 2  # found once, then kept
