"""The service's own training path on the GPU, timed like bench/reference/seed_recipe_bench.py.

Same model (Phi-2 shapes, random weights, saved by `seed_recipe_bench.py prepare`), same
samples (lengths drawn from the real oasst1-en length file, random token ids), and the
worker's own code: `load_quantized_lora_model`, `training_arguments`, the packing planner and
`PackedTrainer`, and optionally the real metric callback writing to a SQLite database.

usage: python3 bench/service_bench.py MODEL_DIR --dtype bfloat16|float16 [--steps N]
       [--lengths FILE] [--callback] [--accumulation N] [--profile]
   or: python3 -m torch.distributed.run --standalone --nproc-per-node 2 bench/service_bench.py …
       (data-parallel: each GPU takes its share of every step, as a `resources.gpus: 2` job does)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench" / "reference"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--lengths")
    parser.add_argument("--callback", action="store_true", help="stream metrics to a database")
    parser.add_argument("--accumulation", type=int, default=4, help="gradient_accumulation_steps")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (experiment)")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler summary of 3 steps")
    args = parser.parse_args()
    # Under torchrun (data-parallel): one process per GPU, each takes its share of every step.
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))

    data_dir = Path(tempfile.mkdtemp(prefix="bench-data-"))
    os.environ.update(FINETUNE_DATA_DIR=str(data_dir), FINETUNE_LEASE_S="3600", FINETUNE_FLUSH_INTERVAL_S="1")

    import torch

    if world > 1:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    from seed_recipe_bench import lengths, make_samples
    from transformers import TrainerCallback

    from app.spec import JobSpec
    from worker.training.data import TokenizedSample, TrainingData
    from worker.training.model import load_quantized_lora_model
    from worker.training.packing import collate_packed
    from worker.training.recipe import PackedTrainer, _packed, training_arguments

    spec = JobSpec.model_validate(
        {
            "base_model": args.model_dir,
            "quantization": {"compute_dtype": args.dtype},
            "training": {
                "max_steps": args.steps,
                "save_steps": 10_000,
                "gradient_accumulation_steps": args.accumulation,
            },
        }
    )
    dtype = getattr(torch, args.dtype)
    started = time.time()
    model = load_quantized_lora_model(spec, dtype)
    load_s = time.time() - started

    samples = [TokenizedSample(ids, list(ids)) for ids in make_samples(lengths(args.lengths))]
    data = TrainingData(samples, len(samples), 0, {})
    counter = {"real": 0, "computed": 0}
    callbacks: list = []

    def collate(batch):
        out = collate_packed(batch, pad_token_id=50256)
        counter["real"] += int((out["sequence_ids"] > 0).sum())
        counter["computed"] += out["input_ids"].numel()
        return out

    t = spec.training
    train_set = _packed(data, spec, t.batch_size * t.gradient_accumulation_steps // world)
    if args.callback:
        callbacks.append(_progress_callback(spec, data_dir))

    marks = []

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kwargs):
            torch.cuda.synchronize()
            marks.append((time.time(), counter["real"], counter["computed"]))
            if args.profile and state.global_step == 4:
                self.profiler = torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                )
                self.profiler.__enter__()
                self.started = time.time()
            if args.profile and state.global_step == 7 and rank == 0:
                self.profiler.__exit__(None, None, None)
                wall = time.time() - self.started
                events = self.profiler.key_averages()
                # kernels only: an op's self device time repeats its kernels'
                gpu_busy = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 1e6
                print(events.table(sort_by="self_cpu_time_total", row_limit=15))
                print(events.table(sort_by="self_device_time_total", row_limit=10))
                launches = sum(
                    e.count for e in events if e.key.startswith(("cudaLaunchKernel", "cuLaunchKernel"))
                )
                print(
                    f"PROFILE 3 steps: wall {wall:.2f} s, GPU kernels busy {gpu_busy:.2f} s "
                    f"({100 * gpu_busy / wall:.0f} % of wall), {launches} kernel launches"
                )

    out_dir = data_dir / "out"
    training_args = training_arguments(spec, out_dir, dtype, evaluate=False)
    if args.compile:
        training_args.torch_compile = True
        training_args.torch_compile_backend = "inductor"
    trainer = PackedTrainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        data_collator=collate,
        callbacks=[*callbacks, Clock()],
    )
    trainer.mask_dtype = dtype
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    warm = 2
    (t0, r0, c0), (t1, r1, c1) = marks[warm - 1], marks[-1]
    if world > 1:  # every process trained its share: sum the tokens over them
        import torch.distributed as dist

        totals = torch.tensor([r1 - r0, c1 - c0], dtype=torch.float64, device="cuda")
        dist.all_reduce(totals)
        r0, c0, r1, c1 = 0, 0, int(totals[0]), int(totals[1])
        if rank != 0:
            return
    result = {
        "variant": "service" + ("_callback" if args.callback else "") + ("_compiled" if args.compile else ""),
        "gpus": world,
        "accumulation": args.accumulation,
        "dtype": args.dtype,
        "steps": len(marks) - warm,
        "sec_per_step": (t1 - t0) / (len(marks) - warm),
        "real_tok_s": (r1 - r0) / (t1 - t0),
        "computed_tok_s": (c1 - c0) / (t1 - t0),
        "samples_per_step": train_set.mean_samples_per_step,
        "fill": train_set.fill,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        "load_s": load_s,
        "gpu": torch.cuda.get_device_name(0),
    }
    print("RESULT", json.dumps(result))


def _progress_callback(spec, data_dir: Path):
    """The worker's real metric callback, on a real claim in a SQLite database."""
    from app import migrate
    from app.db import session_scope
    from app.models import Job, JobStatus
    from app.services.runs import claim_job
    from app.storage import JobFiles
    from worker.training.callbacks import JobProgressCallback

    migrate.upgrade()
    with session_scope() as session:
        job = Job(owner="bench", status=JobStatus.QUEUED, spec=spec.model_dump(mode="json"))
        session.add(job)
        session.flush()
        job_id = job.id
    claim = claim_job(job_id)
    return JobProgressCallback(claim, JobFiles(data_dir / "jobs" / job_id), 1.0, threading.Event())


if __name__ == "__main__":
    main()
