"""Time to the first trained step, through the worker's own `execute_job`: cold, then warm.

Builds Phi-2 from its real config (random weights, real tokenizer), then runs the default job
spec (bf16, `logging_steps: 1`, real oasst1 rows) in fresh processes one after another, all on
one data volume: the first finds no compiled layers there (cold), the next ones find what the
first left in the volume's compile cache (worker.training.compile_cache), as a restarted
worker would. Each reports, from the job's own events and rows: seconds from the "training
step" event to the first step's end and to the first logged row, the step timeline, mean tok/s
of the rows after `--steady-from`, torch.compile's own counters (graphs compiled,
recompiles and their reasons, cache hits and misses, compile seconds), and the first
micro-batches' timeline (each one's seconds, after a synchronize, and whether it ran eagerly, was
captured as a CUDA graph or replayed one; captures' seconds apart).

A run's name may end in a plan variant, measured on the same volume: `warm-no-graphs` (the
micro-batches never captured as CUDA graphs), `warm-sdpa` (the dense mask instead of
FlexAttention: compiles a layer of its own, so it is cold for that layer), `warm-second-sight`
(a new shape captured the second time it comes: speed.CAPTURE_AT_FIRST_SIGHT off); and a name
ending in `-inline` compiles the layers at the first step, the training waiting for it (as before
worker.training.layer_compile), e.g. `cold-inline warm-inline cold warm`. A `cold…` run after the
first gets a volume of its own (the runs after it use that one).

    python bench/first_step.py --out first-step.json [--runs cold-inline warm-inline cold warm] [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from gpu_recipe import DATA  # noqa: E402


def child(args) -> dict:
    os.environ.update(
        FINETUNE_DATA_DIR=args.data_dir, FINETUNE_BROKER_URL="memory://", FINETUNE_FLUSH_INTERVAL_S="0"
    )
    os.environ["FINETUNE_LOCAL_ROOTS"] = json.dumps([args.model, str(DATA.parent)])
    started = time.perf_counter()
    import torch
    from torch._dynamo.utils import compile_times, counters

    from app import migrate
    from app.models import LOCAL_OWNER
    from app.services import jobs
    from app.spec import JobSpec
    from worker.tasks import execute_job

    imported_s = time.perf_counter() - started
    timeline = _time_micro_batches(args.run)
    migrate.upgrade()
    spec = JobSpec.model_validate(
        {
            "base_model": args.model,
            "dataset": {"source": str(DATA)},
            "quantization": {"compute_dtype": "bfloat16"},
            "training": {"max_steps": args.steps, "save_steps": 10_000, "logging_steps": 1},
        }
    )
    job = jobs.create_job(spec, LOCAL_OWNER)
    t0 = time.perf_counter()
    execute_job(job.id)
    wall = time.perf_counter() - t0
    done = jobs.get_job(job.id, LOCAL_OWNER)
    rows = jobs.list_metrics(job.id, LOCAL_OWNER, None, 10_000).items
    events = jobs.list_events(job.id, LOCAL_OWNER, None, 1000).items
    began = next((e.time for e in events if e.message.startswith("training step")), None)

    def said(prefix: str, key: str):
        return next(((e.data or {}).get(key) for e in events if e.message.startswith(prefix)), None)

    steady = [r.tokens_per_second for r in rows if r.step >= args.steady_from and r.tokens_per_second]
    result = {
        "run": args.run,
        "status": str(done.status),
        "error": done.error,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "import_s": round(imported_s, 1),
        "job_wall_s": round(wall, 1),
        "first_step_s": said("first step", "first_step_seconds"),
        "first_row_s": said("first row", "first_row_seconds"),
        "row_s_after_training_step": [round((r.time - began).total_seconds(), 2) for r in rows]
        if began
        else [],
        "steady_tok_s_mean": round(sum(steady) / len(steady)) if steady else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)
        if torch.cuda.is_available()
        else None,
        "events": [f"{(e.time - events[0].time).total_seconds():7.2f} s  {e.message[:300]}" for e in events],
        "first_micro_batches": timeline,
        "counters": {
            k: dict(v)
            for k, v in counters.items()
            if k in ("stats", "aot_autograd", "inductor", "recompiles")
        },
        "compile_times": compile_times(repr="str", aggregate=True)[:3000],
        "cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
    }
    return result


FIRST_MICRO_BATCHES = 48


def _time_micro_batches(run: str) -> list[dict]:
    """The job's plan as the run's name asks, and each of its first micro-batches timed (a
    synchronize after each: only for these), with what the CUDA graphs did with it."""
    import torch

    from worker.training import recipe, speed, step_graphs, trainer

    if run.endswith("-no-graphs"):
        recipe.plan_speed = partial(recipe.plan_speed, graphs=False)
    elif run.endswith("-sdpa"):
        recipe.plan_speed = partial(recipe.plan_speed, flex=False)
    elif run.endswith("-second-sight"):
        speed.CAPTURE_AT_FIRST_SIGHT = False
    if run.endswith("-inline"):  # the layers compile at the first step, the steps waiting for it
        speed.COMPILE_WHILE_TRAINING = False
    timeline: list[dict] = []
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    training_step = trainer.PackedTrainer.training_step
    capture = step_graphs.StepGraphs._capture

    def timed_step(self, model, inputs, num_items_in_batch=None):
        if len(timeline) >= FIRST_MICRO_BATCHES:
            return training_step(self, model, inputs, num_items_in_batch)
        graphs = self.step_graphs
        replays = graphs.replays if graphs else 0
        sync()
        began = time.perf_counter()
        loss = training_step(self, model, inputs, num_items_in_batch)
        sync()
        entry = {"s": round(time.perf_counter() - began, 3), "shape": list(inputs["input_ids"].shape)}
        entry["ran"] = "replayed" if graphs and graphs.replays > replays else "eager"
        compile = self.layer_compile
        entry["layers"] = "compiled" if compile is None or compile.switched else "eager, compiling beside"
        timeline.append(entry)
        return loss

    def timed_capture(self, *args, **kwargs):
        began = time.perf_counter()
        captured = capture(self, *args, **kwargs)
        if len(timeline) < FIRST_MICRO_BATCHES:
            timeline.append({"capture_s": round(time.perf_counter() - began, 3), "ok": captured is not None})
        return captured

    trainer.PackedTrainer.training_step = timed_step
    step_graphs.StepGraphs._capture = timed_capture
    return timeline


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("first-step.json"))
    parser.add_argument("--runs", nargs="+", default=["cold-inline", "warm-inline", "cold", "warm"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--steady-from", type=int, default=20)
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--run")
    parser.add_argument("--model")
    parser.add_argument("--data-dir")
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    work = Path(tempfile.mkdtemp(prefix="first-step-"))
    model = work / "phi-2-random"
    build = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys; sys.path[:0]={[str(REPO), str(REPO / 'bench')]!r}; "
            f"from gpu_recipe import build_phi2; from pathlib import Path; build_phi2(Path({str(model)!r}))",
        ],
        check=True,
    )
    del build
    report: dict = {"runs": []}
    data_dir = work / "data"  # one data volume for every run: the compile cache lives on it
    for index, name in enumerate(args.runs):
        if index and name.startswith("cold"):  # a cold run after the first: a volume of its own
            data_dir = work / f"data-{name}"
        env = dict(
            os.environ,
            TORCH_LOGS="recompiles",
            CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", "0"),
        )
        log = work / f"{name}.log"
        with log.open("w") as out:
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    "--run",
                    name,
                    "--model",
                    str(model),
                    "--data-dir",
                    str(data_dir),
                    "--steps",
                    str(args.steps),
                    "--steady-from",
                    str(args.steady_from),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        text = log.read_text()
        lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
        result = (
            json.loads(lines[-1].removeprefix("RESULT ")) if lines else {"run": name, "error": text[-3000:]}
        )
        result["recompile_log"] = [line[:400] for line in text.splitlines() if "ecompil" in line][:20]
        report["runs"].append(result)
        print(
            json.dumps(
                {
                    k: result.get(k)
                    for k in (
                        "run",
                        "first_step_s",
                        "first_row_s",
                        "steady_tok_s_mean",
                        "peak_reserved_gib",
                        "job_wall_s",
                        "error",
                    )
                }
            ),
            flush=True,
        )
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
