"""The service's own training path on the GPU, timed like bench/reference/seed_recipe_bench.py.

Same model (Phi-2 shapes, random weights, saved by `seed_recipe_bench.py prepare`), same
samples (lengths drawn from the real oasst1-en length file, random token ids), and the
worker's own code: `load_quantized_lora_model`, `training_arguments`, the packing planners,
`PackedTrainer`, the speed settings of `worker.training.speed`, and optionally the real
metric callback writing to a SQLite database.

One process loads the model once and measures one or more variants one after another
(`--variants`: a JSON list of objects; keys below), each with its own Trainer and optimizer.
Every variant reports trained tok/s and s/step over its timed steps, then profiles its last
`profile_steps` steps with torch.profiler: the GPU's kernel time per step, its share of the
(unprofiled) step time, kernel ms per 1,000 trained tokens and kernel launches per step.

usage: python3 bench/service_bench.py MODEL_DIR --dtype bfloat16|float16 [--lengths FILE]
       [--callback] [--variants JSON]   (or the single-variant flags below)
   or: python3 -m torch.distributed.run --standalone --nproc-per-node 2 bench/service_bench.py …
       (data-parallel: each GPU takes its share of every step, as a `resources.gpus: 2` job does)

Variant keys: name, steps (timed), warmup, profile_steps, accumulation (gradient_accumulation
_steps), batch_size, attention ("cudnn": sdpa's default order; "auto": the worker's choice),
compile (decoder layers compiled), plain_4bit (their 4-bit matmuls as torch ops compiled into
them, worker.training.nf4), graphs (micro-batches as CUDA graphs, worker.training.step_graphs),
checkpointing (true/false; "auto": the worker's choice), optim,
full_rows, row_multiple, fused_loss (the loss fused with lm_head, worker.training.fused_loss),
as_t4 (flash and cuDNN sdpa off, as on a T4), recompute_budget (with checkpointing: the share
of a compiled layer's activations it keeps, worker.training.speed.SpeedPlan.recompute_budget;
unset: whole layers recomputed), first_sight (CUDA graphs: a new shape captured the first time it
comes, StepGraphs.capture_at_first_sight), one_row (a step's rows laid end to end as one row,
SpeedPlan.one_row; with compiled layers), expandable_segments (the caching allocator's
expandable_segments setting, for this variant's training: measured on an H100 2026-12-07, no gain),
host_syncs (true: the Trainer's per-micro-batch waits as before round five: its nan/inf loss
filter, its token count read back from the GPU, blocking input copies).

The clock waits for the GPU only at the timed window's ends (and the profiled one's), as a job
does between its logged steps: per-step times (`step_s`) are the host's.
Each variant also counts the host's waits for the GPU over its timed steps
(`torch.cuda.set_sync_debug_mode`): `syncs_per_step`, and where in Python they were
(`sync_sites`); with CUDA graphs, why captures failed (`graph_failures`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench" / "reference"))

AS_ON_MAIN = {"attention": "cudnn", "compile": False, "checkpointing": True, "row_multiple": 1}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--lengths")
    parser.add_argument("--callback", action="store_true", help="stream metrics to a database")
    parser.add_argument("--variants", help="JSON list of variants (see the docstring)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--accumulation", type=int, default=4, help="gradient_accumulation_steps")
    parser.add_argument("--fast", action="store_true", help="the worker's speed plan (default: as on main)")
    parser.add_argument("--full-rows", action="store_true")
    parser.add_argument("--profile", action="store_true", help="print the profiler's tables too")
    parser.add_argument(
        "--check",
        choices=["eager", "full"],
        help="compare losses and LoRA gradients first (full: compiled layers too)",
    )
    args = parser.parse_args()
    variants = (
        json.loads(args.variants)
        if args.variants
        else [
            {
                "name": "service",
                "steps": args.steps,
                "accumulation": args.accumulation,
                "full_rows": args.full_rows,
                **(
                    {"attention": "auto", "compile": True, "checkpointing": True, "row_multiple": 64}
                    if args.fast
                    else {}
                ),
            }
        ]
    )
    # Under torchrun (data-parallel): one process per GPU, each takes its share of every step.
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))

    data_dir = Path(tempfile.mkdtemp(prefix="bench-data-"))
    os.environ.update(FINETUNE_DATA_DIR=str(data_dir), FINETUNE_LEASE_S="3600", FINETUNE_FLUSH_INTERVAL_S="1")
    # the spec accepts a local model only under FINETUNE_LOCAL_ROOTS
    os.environ["FINETUNE_LOCAL_ROOTS"] = json.dumps([str(Path(args.model_dir).resolve())])

    import torch

    if world > 1:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    from seed_recipe_bench import lengths, make_samples

    from worker.training.data import TokenizedSample, TrainingData
    from worker.training.model import load_quantized_lora_model

    spec = _spec(args.model_dir, args.dtype, 4, 12)
    dtype = getattr(torch, args.dtype)
    started = time.time()
    model = load_quantized_lora_model(spec, dtype)
    load_s = time.time() - started
    samples = [TokenizedSample(ids, list(ids)) for ids in make_samples(lengths(args.lengths))]
    data = TrainingData(samples, len(samples), 0, {})
    callbacks: list = [_progress_callback(spec, data_dir)] if args.callback else []
    if args.check:
        print("RESULT", json.dumps(_check(model, data, dtype, compiled=args.check == "full")), flush=True)
    for variant in variants:
        try:
            result = _run_variant(variant, model, data, args, dtype, data_dir, callbacks, rank, world)
        except Exception as exc:  # report and go on with the next variant
            import traceback

            traceback.print_exc()
            result = {"name": variant.get("name"), "error": f"{type(exc).__name__}: {str(exc)[:400]}"}
        if result is not None:
            gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
            result.update(load_s=load_s, dtype=args.dtype, gpu=gpu)
            print("RESULT", json.dumps(result), flush=True)


def _spec(model_dir: str, dtype: str, accumulation: int, steps: int, batch_size: int = 4):
    from app.spec import JobSpec

    return JobSpec.model_validate(
        {
            "base_model": model_dir,
            "quantization": {"compute_dtype": dtype},
            "training": {
                "max_steps": steps,
                "save_steps": 10_000,
                "batch_size": batch_size,
                "gradient_accumulation_steps": accumulation,
            },
        }
    )


def _run_variant(variant, model, data, args, dtype, data_dir, callbacks, rank, world):  # noqa: C901
    import torch
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()
    from worker.training.fused_loss import use_model_loss
    from worker.training.nf4 import use_bitsandbytes_matmul
    from worker.training.packing import INPUT_TOKENS, collate_step
    from worker.training.recipe import PackedTrainer, _packed, training_arguments
    from worker.training.speed import (
        FLEX_BLOCK,
        SpeedPlan,
        apply_speed_plan,
        choose_attention,
        plan_speed,
        restore_decoder_layers,
        use_sdpa_attention,
    )
    from worker.training.step_graphs import StepGraphs, use_torch_dropout

    v = {**AS_ON_MAIN, "steps": 12, "warmup": 2, "profile_steps": 2, "accumulation": 4, "batch_size": 4}
    v.update(variant)
    full_rows = bool(v.get("full_rows"))
    warm, timed, profiled = v["warmup"], v["steps"], v["profile_steps"]
    total = warm + timed + profiled
    spec = _spec(args.model_dir, args.dtype, v["accumulation"], total, v["batch_size"])
    t = spec.training

    restore_decoder_layers(model)
    use_bitsandbytes_matmul(model)
    use_model_loss(model)
    use_torch_dropout(model)
    micro_tokens = t.batch_size * t.max_seq_length
    if v["checkpointing"] == "auto":
        plan = plan_speed(model.config, micro_tokens, True, compile_layers=bool(v["compile"]))
    else:
        plan = SpeedPlan(checkpointing=bool(v["checkpointing"]), compile_layers=bool(v["compile"]))
    # attention: "cudnn" is sdpa's own order (cuDNN first on Hopper), "auto" the worker's choice
    if cuda:
        torch.backends.cuda.enable_cudnn_sdp(True)
        torch.backends.cuda.enable_flash_sdp(not v.get("as_t4"))  # a T4 has neither kernel
    if v.get("as_t4"):
        torch.backends.cuda.enable_cudnn_sdp(False)
    capability = torch.cuda.get_device_capability() if cuda else (0, 0)
    plan.attention = choose_attention(capability) if v["attention"] == "auto" else "sdpa default order"
    if v.get("as_t4"):
        plan.attention = "memory-efficient sdpa (as a T4: flash and cuDNN off)"
    plan.row_multiple = int(v["row_multiple"])
    plan.mask = v.get("mask", "sdpa")
    plan.one_row = bool(v.get("one_row")) and plan.compile_layers
    plan.plain_4bit = bool(v.get("plain_4bit"))
    plan.graphs = bool(v.get("graphs")) and plan.compile_layers and world == 1
    plan.fused_loss = bool(v.get("fused_loss"))
    plan.recompute_budget = v.get("recompute_budget")  # a new one compiles anew (apply_speed_plan)
    if plan.mask == "flex":
        plan.attention = "FlexAttention, document block mask"
        plan.row_multiple = max(plan.row_multiple, FLEX_BLOCK)
    # compiled at the first step, as before worker.training.layer_compile: a variant's steady
    # steps are measured (its first step column is the whole compile)
    plan.compile_while_training = False
    use_sdpa_attention(model)
    apply_speed_plan(model, plan)

    counter = {"real": 0, "computed": 0}

    def collate(batch):
        out = collate_step(batch, pad_token_id=50256, row_multiple=plan.row_multiple, one_row=plan.one_row)
        counter["real"] += out[INPUT_TOKENS]
        counter["computed"] += out["input_ids"].numel()
        return out

    per_process = t.batch_size * t.gradient_accumulation_steps // world
    train_set = _packed(data, spec, per_process, full_rows)
    marks: list[tuple[float, int, int]] = []
    prof: dict = {}

    syncs = _SyncCounter()

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kwargs):
            if state.global_step == 1:  # time to first step: compiles, first eager micro-batches
                if cuda:
                    torch.cuda.synchronize()
                first_step.append(time.time() - train_started)
            if cuda and state.global_step in (warm, warm + timed, total):
                torch.cuda.synchronize()
            marks.append((time.time(), counter["real"], counter["computed"]))
            if graphs is not None and state.global_step in (warm, warm + timed):
                graph_marks.append(graphs.stats())
            if cuda and state.global_step == warm:
                syncs.start()
            if cuda and state.global_step == warm + timed:
                syncs.stop()
            if state.global_step == warm + timed and profiled:
                activities = [torch.profiler.ProfilerActivity.CPU]
                if cuda:
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                prof["profiler"] = torch.profiler.profile(activities=activities)
                prof["profiler"].__enter__()
            if state.global_step == total and "profiler" in prof:
                prof["profiler"].__exit__(None, None, None)

    out_dir = data_dir / f"out-{v.get('name', 'x')}".replace(" ", "_")
    training_args = training_arguments(spec, out_dir, dtype, evaluate=False, speed=plan, full_rows=full_rows)
    if v.get("optim"):
        training_args.optim = v["optim"]
    if v.get("host_syncs"):  # the Trainer's waits for the GPU, as before round five
        training_args.logging_nan_inf_filter = True
        training_args.include_num_input_tokens_seen = "non_padding"
        training_args.dataloader_pin_memory = False
        training_args.accelerator_config.non_blocking = False
    trainer = PackedTrainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        data_collator=collate,
        callbacks=[*callbacks, Clock()],
    )
    trainer.mask_dtype = dtype if cuda else torch.float32
    trainer.mask_kind = plan.mask
    graphs = StepGraphs(bool(v.get("first_sight"))) if plan.graphs else None
    trainer.step_graphs = graphs
    graph_marks: list[dict] = []
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    first_step: list[float] = []
    train_started = time.time()
    expandable = bool(v.get("expandable_segments"))
    if expandable:
        _set_expandable_segments(True)
    try:
        trainer.train()
    finally:
        if expandable:  # this variant's alone (the bench's next ones map plain segments)
            _set_expandable_segments(False)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    reserved = torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0
    (t0, r0, c0), (t1, r1, c1) = marks[warm - 1], marks[warm + timed - 1]
    pr = marks[-1][1] - r1  # trained tokens of the profiled steps
    if world > 1:  # every process trained its share: sum the tokens over them
        import torch.distributed as dist

        totals = torch.tensor([r1 - r0, c1 - c0, pr], dtype=torch.float64, device="cuda" if cuda else "cpu")
        dist.all_reduce(totals)
        r0, c0, r1, c1, pr = 0, 0, int(totals[0]), int(totals[1]), int(totals[2])
    # a step: one item per process (per-step packing) or `accumulation` micro-batches in all
    samples_per_step = train_set.mean_samples_per_step * (
        t.gradient_accumulation_steps if full_rows else world
    )
    result = {
        "name": v.get("name"),
        "variant": {k: v[k] for k in sorted(v) if k not in ("name", "tables")},
        "plan": plan.describe(),
        "gpus": world,
        "accumulation": t.gradient_accumulation_steps,
        "full_rows": full_rows,
        "steps": timed,
        "sec_per_step": (t1 - t0) / timed,
        "step_s": [round(b[0] - a[0], 3) for a, b in zip(marks, marks[1:], strict=False)],
        "real_tok_s": (r1 - r0) / (t1 - t0),
        "computed_tok_s": (c1 - c0) / (t1 - t0),
        "samples_per_step": samples_per_step,
        "fill": train_set.fill_of(plan.one_row, plan.row_multiple),
        "steps_per_epoch": len(data) / samples_per_step,
        "peak_gib": peak,
        "reserved_gib": reserved,
        "first_step_s": first_step[0] if first_step else None,
    }
    if syncs.count is not None:
        result["syncs_per_step"] = syncs.count / timed
        result["sync_sites"] = syncs.sites
    if graphs is not None:  # micro-batches and replays over the timed steps, and in all
        result["graphs"] = graphs.describe()
        result["graph_failures"] = graphs.stats()["failures"]
        if len(graph_marks) == 2:
            result["timed_replayed"] = graph_marks[1]["replayed"] - graph_marks[0]["replayed"]
            result["timed_micro_batches"] = graph_marks[1]["micro_batches"] - graph_marks[0]["micro_batches"]
    if "profiler" in prof:
        tables = args.profile or bool(v.get("tables"))
        result.update(_profile_figures(prof["profiler"], profiled, pr, result["real_tok_s"], tables))
    if rank != 0:
        return None
    return result


def _set_expandable_segments(on: bool) -> None:
    """The caching allocator's `expandable_segments` setting, for the segments it maps from now on."""
    import torch

    setting = f"expandable_segments:{on}"
    if hasattr(torch._C, "_accelerator_setAllocatorSettings"):  # torch ≥ 2.12
        torch._C._accelerator_setAllocatorSettings(setting)
    else:  # torch 2.11 (the GPU machine's)
        torch.cuda.memory._set_allocator_settings(setting)


class _SyncCounter:
    """Counts the host's waits for the GPU between `start` and `stop` (torch warns on each one
    under `set_sync_debug_mode("warn")`)."""

    def __init__(self) -> None:
        self.count: int | None = None
        self.sites: dict[str, int] = {}  # file:line of the Python call that waited
        self._recording: Any = None
        self._warnings: list = []

    def start(self) -> None:
        import torch

        self._recording = warnings.catch_warnings(record=True)
        self._warnings = self._recording.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> None:
        import torch

        if self._recording is None:
            return
        torch.cuda.set_sync_debug_mode("default")
        self._recording.__exit__(None, None, None)
        self._recording = None
        waits = [w for w in self._warnings if "synchroniz" in str(w.message)]
        self.count = len(waits)
        for w in waits:
            site = f"{Path(w.filename).name}:{w.lineno}"
            self.sites[site] = self.sites.get(site, 0) + 1


def _check(model, data, dtype, compiled: bool) -> dict:
    """One packed 4-row micro-batch, eval mode (no dropout), autocast as in training: the loss
    and LoRA gradients of the dense-mask sdpa path (the reference, as on main) against
    FlexAttention with the document block mask, eager and in compiled layers."""
    import torch

    from worker.training.nf4 import use_bitsandbytes_matmul, use_plain_4bit_matmul
    from worker.training.packing import PackedData, block_causal_mask, collate_packed, plan_steps
    from worker.training.speed import (
        compile_decoder_layers,
        document_block_mask,
        restore_decoder_layers,
        use_flex_attention,
        use_sdpa_attention,
    )

    lengths = [len(s.input_ids) for s in data.samples]
    step = plan_steps(lengths, 64, 4, 2048, seed=7)[0]
    batch = collate_packed([PackedData(data.samples, [step])[0]], 50256, row_multiple=128)
    batch = {k: v.cuda() for k, v in batch.items()}
    sequence_ids = batch.pop("sequence_ids")
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    model.eval()

    def run(mask):
        with torch.autocast("cuda", dtype=dtype):
            loss = model(**batch, attention_mask=mask).loss
        loss.backward()
        grads = {n: p.grad.detach().float().clone() for n, p in lora.items()}
        model.zero_grad(set_to_none=True)
        return loss.item(), grads

    def compare(name, got, ref):
        (loss, grads), (ref_loss, ref_grads) = got, ref
        rel = max(float((grads[n] - g).norm() / g.norm().clamp_min(1e-12)) for n, g in ref_grads.items())
        return {f"{name}_loss_diff": abs(loss - ref_loss), f"{name}_max_rel_grad_diff": rel}

    # the noise floor: the same dense mask through sdpa's cuDNN kernel, against the memory-efficient one
    torch.backends.cuda.enable_cudnn_sdp(True)
    cudnn = run(block_causal_mask(sequence_ids, dtype))
    torch.backends.cuda.enable_cudnn_sdp(False)
    out: dict = {
        "name": "check: flex and compiled vs dense sdpa",
        "check": True,
        "tokens": int((sequence_ids > 0).sum()),
    }
    reference = run(block_causal_mask(sequence_ids, dtype))
    again = run(block_causal_mask(sequence_ids, dtype))
    out.update(compare("dense_again", again, reference))  # run-to-run noise of the reference
    out.update(compare("dense_cudnn", cudnn, reference))  # another exact kernel: bf16 noise
    use_plain_4bit_matmul(model)  # the 4-bit matmuls as torch ops, eager: bitsandbytes' arithmetic
    out.update(compare("plain_4bit_eager", run(block_causal_mask(sequence_ids, dtype)), reference))
    use_bitsandbytes_matmul(model)
    use_flex_attention(model)
    try:
        out.update(compare("flex_eager", run(document_block_mask(sequence_ids)), reference))
        if compiled:
            compile_decoder_layers(model, checkpointing=True)
            out.update(compare("flex_compiled", run(document_block_mask(sequence_ids)), reference))
            restore_decoder_layers(model)
            torch._dynamo.reset()
            use_plain_4bit_matmul(model)  # what the worker's plan runs on Ampere and newer
            compile_decoder_layers(model, checkpointing=True)
            out.update(compare("flex_compiled_plain_4bit", run(document_block_mask(sequence_ids)), reference))
    finally:
        restore_decoder_layers(model)
        use_bitsandbytes_matmul(model)
        use_sdpa_attention(model)
        model.train()
    out["reference_loss"] = reference[0]
    return out


def _profile_figures(profiler, steps: int, trained_tokens: int, tok_s: float, tables: bool) -> dict:
    """The profiled steps' GPU kernel time (per step and per 1,000 trained tokens) and launches;
    `gpu_busy_share`: the share of the timed window the GPU computed, at the profiled steps'
    kernel time per token (the profiled steps' own wall time is the profiler's, not a job's)."""
    events = profiler.key_averages()
    # kernels only: an op's self device time repeats its kernels'
    kernel_s = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 1e6
    launches = sum(
        e.count for e in events if e.key.startswith(("cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch"))
    )
    if tables:
        print(events.table(sort_by="self_cpu_time_total", row_limit=20))
        print(events.table(sort_by="self_device_time_total", row_limit=20))
    per_step = kernel_s / steps
    kernel_s_per_token = kernel_s / max(1, trained_tokens)
    return {
        "gpu_kernel_s_per_step": per_step,
        "gpu_busy_share": kernel_s_per_token * tok_s,
        "kernel_ms_per_1k_tokens": 1000 * kernel_s_per_token * 1000,
        "launches_per_step": launches / steps,
    }


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
