"""On a CUDA GPU only (marker `gpu`: skipped where there is none, as on CI; run them on a GPU
box with `pytest -m gpu`): the worker's real training path with the GPU fast path against the
eager recipe, and the sampler's placement reading the card's real free memory."""

from __future__ import annotations

import pytest

from app.models import LOCAL_OWNER
from app.services import jobs
from tests.test_training import quick_spec
from worker.tasks import execute_job

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("demo_model")]


def losses(job_id: str) -> list[float]:
    return [row.loss for row in jobs.list_metrics(job_id, LOCAL_OWNER, None, 100).items]


def test_the_fast_path_trains_the_loss_the_eager_recipe_trains(service_env, monkeypatch):
    """Per-layer compile, FlexAttention with the document block mask, fused AdamW, the loss
    fused with lm_head and micro-batches replayed as CUDA graphs after the first two
    (worker/training/speed.py, step_graphs.py, fused_loss.py) against FINETUNE_FAST_PATH=0:
    the same steps within 2 % (kernels differ: fused, reordered float32 sums), dropout off (its
    draws differ between the paths). The compiled path here compiles at the first step; a third
    job starts eagerly while its layers compile beside it (worker/training/layer_compile.py), and
    says whether they were compiled before its 8 steps ended."""
    from worker.training import speed

    spec = quick_spec(max_steps=8, save_steps=100, lora={"dropout": 0.0})
    runs, jobs_by_path = {}, {}
    for path, fast, beside in (("fast", "1", False), ("eager", "0", False), ("beside", "1", True)):
        monkeypatch.setenv("FINETUNE_FAST_PATH", fast)
        monkeypatch.setattr(speed, "COMPILE_WHILE_TRAINING", beside)
        job = jobs.create_job(spec, LOCAL_OWNER)
        execute_job(job.id)
        assert jobs.get_job(job.id, LOCAL_OWNER).status == "succeeded"
        runs[path], jobs_by_path[path] = losses(job.id), job.id
    assert len(runs["fast"]) == len(runs["eager"]) == len(runs["beside"]) == 8
    assert runs["fast"] == pytest.approx(runs["eager"], rel=0.02)
    assert runs["beside"] == pytest.approx(runs["eager"], rel=0.02)
    events = jobs.list_events(jobs_by_path["fast"], LOCAL_OWNER, None, 200).items
    plan = next(e for e in events if e.message.startswith("training step:"))
    assert plan.data["speed"]["fused_loss"], plan.message
    graphs = [e for e in events if e.message.startswith("CUDA graphs:")]
    assert graphs and graphs[-1].data["replayed"] > 0, [e.message for e in events]
    beside = [e.message for e in jobs.list_events(jobs_by_path["beside"], LOCAL_OWNER, None, 200).items]
    said = [m for m in beside if m.startswith(("decoder layers compiled in", "the training ended before"))]
    assert len(said) == 1, "\n".join(beside)


def test_the_sampler_answers_on_this_gpu_when_the_model_fits(service_env):
    import torch

    from worker.placement import answer_device

    assert answer_device(str(quick_spec().base_model), 2048, torch.float16) == "cuda"
