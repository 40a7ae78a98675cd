"""DPO learns a real preference on a real pretrained model: stories260K, 4-bit, LoRA, through the
worker's own `execute_job`, on pairs whose chosen side is a story's coherent continuation and whose
rejected side is the same words shuffled (examples/data/stories-preferences; bench/dpo_learning.py
made them and runs the longer version). Held-out accuracy, read from the job's own metric rows,
goes from 0 (policy = reference: every pair a tie) to at least 0.9."""

from __future__ import annotations

import math

import pytest

from app.models import LOCAL_OWNER
from app.services import jobs
from app.spec import JobSpec
from tests.conftest import REPO, sqlite_only

PAIRS = REPO / "examples" / "data" / "stories-preferences"


@pytest.mark.slow
@sqlite_only  # its subject is what DPO learns, not the database
def test_dpo_on_stories260k_learns_to_prefer_the_coherent_continuation(service_env):
    from worker.tasks import execute_job

    spec = JobSpec.model_validate(
        {
            "base_model": str(REPO / "examples" / "stories260K"),
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1}}},
            "dataset": {
                "source": str(PAIRS / "train.jsonl"),
                "validation_source": str(PAIRS / "validation.jsonl"),
                "max_eval_samples": 32,
            },
            "quantization": {"compute_dtype": "float32"},
            "lora": {"dropout": 0.0},
            "training": {
                "max_steps": 4,
                "batch_size": 4,
                "gradient_accumulation_steps": 2,
                "learning_rate": 2e-3,
                "warmup_ratio": 0.05,
                "max_seq_length": 128,
                "logging_steps": 1,
                "eval_steps": 2,
                "save_steps": 4,
                "save_total_limit": 1,
            },
        }
    )
    job = jobs.create_job(spec, LOCAL_OWNER)

    execute_job(job.id)

    done = jobs.get_job(job.id, LOCAL_OWNER)
    assert done.status == "succeeded", done.error
    rows = jobs.list_metrics(job.id, LOCAL_OWNER, None, 100).items
    assert [r.step for r in rows] == [1, 2, 3, 4]
    # step 1 (learning rate 0: the warmup starts there) is the reference itself: every pair ties
    first = rows[0]
    assert first.loss == pytest.approx(math.log(2), abs=1e-4)
    assert first.figures["rewards/accuracies"] == 0 and first.figures["rewards/margins"] == 0
    evals = [r for r in rows if r.eval_loss is not None]
    assert [r.step for r in evals] == [2, 4]
    accuracies = [r.figures["eval_rewards/accuracies"] for r in evals]
    margins = [r.figures["eval_rewards/margins"] for r in evals]
    assert accuracies[-1] >= 0.9, accuracies
    assert 0 < margins[0] < margins[1], margins
    assert evals[-1].eval_loss < math.log(2) / 2, [r.eval_loss for r in evals]
