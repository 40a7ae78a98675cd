"""Where the sampler answers (issue 18): the GPU only when the model fits beside what runs
there. There is no GPU here: torch.cuda's memory readings are stood in for; the estimate is
checked against the real tiny model loaded in 4-bit on the CPU."""

from __future__ import annotations

import gc

import pytest
import torch
from transformers import AutoConfig

from tests.conftest import DEMO_MODEL, reset_caches, sqlite_only
from worker import placement

GIB = placement.GIB


@pytest.mark.slow
def test_the_weight_estimate_matches_the_loaded_4bit_model(demo_model):
    from app.spec import JobSpec
    from worker.training.model import load_quantized_model

    spec = JobSpec.model_validate({"base_model": str(demo_model)})
    model = load_quantized_model(spec, torch.float32, "cpu")
    measured = model.get_memory_footprint()

    estimated = placement.weight_bytes(AutoConfig.from_pretrained(demo_model), torch.float32)

    assert estimated == pytest.approx(measured, rel=0.05)


def test_the_kv_cache_estimate_is_phi2s_arithmetic():
    config = AutoConfig.from_pretrained(DEMO_MODEL.parent.parent / "bench" / "phi-2-config.json")
    # 32 layers × K and V × 2,176 tokens × 2,560 × 2 bytes
    assert placement.kv_cache_bytes(config, 2176, torch.float16) == 32 * 2 * 2176 * 2560 * 2


@pytest.fixture
def a_gpu(monkeypatch):
    """A stand-in 16 GB card: `used` GiB taken by other processes (a training), none by this one."""
    card = {"total": 15.0, "used": 0.0}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        torch.cuda,
        "mem_get_info",
        lambda: (int((card["total"] - card["used"]) * GIB), int(card["total"] * GIB)),
    )
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda: 0)
    monkeypatch.setattr(placement, "needed_bytes", lambda config, tokens, dtype: int(3 * GIB))
    monkeypatch.setattr(placement, "model_config", lambda name: None)
    yield card
    reset_caches()


def test_the_sampler_answers_on_the_cpu_while_a_training_fills_the_gpu(a_gpu, monkeypatch):
    a_gpu["used"] = 13.0  # the default recipe's training on a T4: 2 GiB left, 3 needed
    assert placement.answer_device("phi", 2176, torch.float16) == "cpu"

    a_gpu["used"] = 0.5  # between trainings
    assert placement.answer_device("phi", 2176, torch.float16) == "cuda"


def test_a_memory_cap_counts_what_the_others_use_against_it(a_gpu, monkeypatch):
    a_gpu.update(total=140.0, used=13.0)  # a big card, but the service may use 15 GiB of it
    assert placement.answer_device("phi", 2176, torch.float16) == "cuda"
    monkeypatch.setenv("FINETUNE_GPU_MEMORY_GIB", "15")
    reset_caches()
    assert placement.answer_device("phi", 2176, torch.float16) == "cpu"


@pytest.mark.parametrize("forced", ["cpu", "cuda"])
def test_the_device_can_be_forced(a_gpu, monkeypatch, forced):
    a_gpu["used"] = 13.0
    monkeypatch.setenv("FINETUNE_SAMPLER_DEVICE", forced)
    reset_caches()
    assert placement.answer_device("phi", 2176, torch.float16) == forced


@pytest.mark.slow
@sqlite_only  # about the model's memory, not the database
def test_the_sampler_releases_a_model_nothing_refers_to_any_more(service_env, monkeypatch):
    """Measured on the GPU machine: release_model() ran while answer() still held the model in a
    local, so torch.cuda.empty_cache() could not give its memory back (1.8–3.1 GiB stayed)."""
    from peft import PeftModel

    from app.models import LOCAL_OWNER
    from app.schemas import SampleRequest
    from app.services import jobs, samples
    from tests.test_training import quick_spec
    from worker import sampling
    from worker.tasks import execute_job

    job = jobs.create_job(quick_spec(), LOCAL_OWNER)
    execute_job(job.id)
    monkeypatch.setenv("FINETUNE_SAMPLER_KEEP_MODEL", "false")
    reset_caches()
    alive_at_release = []
    release = sampling.release_model

    def counting_release():
        release()
        gc.collect()
        alive_at_release.append(sum(isinstance(o, PeftModel) for o in gc.get_objects()))

    monkeypatch.setattr(sampling, "release_model", counting_release)
    sample = samples.create_sample(job.id, LOCAL_OWNER, SampleRequest(prompt="Hi", max_new_tokens=4))

    sampling.answer(sample.id)

    assert samples.get_sample(job.id, sample.id, LOCAL_OWNER).status == "succeeded"
    assert alive_at_release == [0]
