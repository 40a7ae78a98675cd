"""Proof on a GPU: the default recipe through the worker's own `execute_job` on Phi-2's shapes.

Builds Phi-2 from its real config (random weights, real tokenizer), then for each compute
dtype runs the default job spec on real oasst1 rows (fewer steps, checkpoints more often):
an uninterrupted run, and a run cancelled after its first checkpoint and resumed from it.
A last run of two steps on 4×2048-token micro-batches gives the worst-case peak memory.
Prints a JSON report and writes it to --out.

    python bench/gpu_recipe.py --out /tmp/report.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "examples" / "data" / "oasst1" / "en-validation.jsonl"


def build_phi2(directory: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(REPO / "bench" / "phi-2-config.json")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(REPO / "examples" / "tiny-phi2").save_pretrained(directory)
    del model
    torch.cuda.empty_cache()


def long_chats(path: Path, count: int) -> None:
    """Chat records longer than 2048 tokens: every micro-batch is a full 4×2048."""
    words = DATA.read_text()[:200_000].split()
    with path.open("w") as f:
        for i in range(count):
            text = " ".join(words[i * 50 : i * 50 + 3000])
            f.write(
                json.dumps(
                    {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": text}]}
                )
                + "\n"
            )


def cancel_after(job_id: str, name: str) -> None:
    from app.models import LOCAL_OWNER
    from app.services import jobs

    while not any(c.name == name for c in jobs.list_checkpoints(job_id, LOCAL_OWNER)):
        time.sleep(0.1)
    jobs.cancel_job(job_id, LOCAL_OWNER)


def run(spec, cancel_at: str | None = None) -> dict:
    import torch

    from app.models import LOCAL_OWNER
    from app.services import jobs
    from worker.tasks import execute_job

    torch.cuda.reset_peak_memory_stats()
    job = jobs.create_job(spec, LOCAL_OWNER)
    started = time.perf_counter()
    if cancel_at:
        canceller = threading.Thread(target=cancel_after, args=(job.id, cancel_at))
        canceller.start()
        execute_job(job.id)
        canceller.join()
        stopped = jobs.get_job(job.id, LOCAL_OWNER)
        jobs.resume_job(job.id, LOCAL_OWNER, None)
        execute_job(job.id)
    else:
        stopped = None
    if not cancel_at:
        execute_job(job.id)
    done = jobs.get_job(job.id, LOCAL_OWNER)
    rows = jobs.list_metrics(job.id, LOCAL_OWNER, None, 10_000).items
    events = jobs.list_events(job.id, LOCAL_OWNER, None, 1000).items
    saves = [e.data for e in events if e.message.startswith("saved ")]
    return {
        "job": job.id,
        "status": done.status,
        "error": done.error,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "cancelled_at_step": stopped.current_step if stopped else None,
        "resumed_from": done.resume_from,
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
        "tokens_per_second": [round(r.tokens_per_second or 0) for r in rows],
        "loss": [round(r.loss, 5) if r.loss else None for r in rows],
        "learning_rate": [r.learning_rate for r in rows],
        "checkpoint_saves": saves,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--save-steps", type=int, default=4)
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    parser.add_argument("--out", type=Path, default=Path("gpu-recipe.json"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="gpu-recipe-"))
    os.environ.update(
        FINETUNE_DATA_DIR=str(work / "data"), FINETUNE_BROKER_URL="memory://", FINETUNE_FLUSH_INTERVAL_S="0"
    )
    import torch

    from app import migrate
    from app.spec import JobSpec

    migrate.upgrade()
    model_dir = work / "phi-2-random"
    t0 = time.perf_counter()
    build_phi2(model_dir)
    report: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "build_model_seconds": round(time.perf_counter() - t0, 1),
        "runs": {},
    }
    for dtype in args.dtypes:
        spec = JobSpec.model_validate(
            {
                "base_model": str(model_dir),
                "dataset": {"source": str(DATA)},
                "quantization": {"compute_dtype": dtype},
                "training": {"max_steps": args.steps, "save_steps": args.save_steps, "logging_steps": 1},
            }
        )
        reference = run(spec)
        resumed = run(spec, cancel_at=f"checkpoint-{args.save_steps}")
        after = [s for s in range(args.steps) if s + 1 > args.save_steps]
        report["runs"][dtype] = {
            "uninterrupted": reference,
            "cancelled_and_resumed": resumed,
            "max_abs_loss_difference_after_resume": max(
                abs(resumed["loss"][i] - reference["loss"][i]) for i in after
            ),
            "learning_rates_equal_after_resume": all(
                abs(resumed["learning_rate"][i] - reference["learning_rate"][i]) < 1e-12 for i in after
            ),
        }
        print(
            json.dumps({dtype: {k: v for k, v in report["runs"][dtype].items() if "run" not in k}}),
            flush=True,
        )
    long_file = work / "long.jsonl"
    long_chats(long_file, 32)
    worst = JobSpec.model_validate(
        {
            "base_model": str(model_dir),
            "dataset": {"source": str(long_file)},
            "quantization": {"compute_dtype": "float16"},
            "training": {"max_steps": 2, "save_steps": 100},
        }
    )
    report["worst_case_4x2048_float16"] = run(worst)
    text = json.dumps(report, indent=1)
    print(text)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
