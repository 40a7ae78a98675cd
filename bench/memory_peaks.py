"""Peak GPU memory of several job specs, measured through the worker's own `execute_job`, so that a
pure-Python memory estimate can be checked against real numbers.

Two bases, random weights built on the GPU in float16 and saved to a temporary folder: Phi-2 (its
real config, bench/phi-2-config.json; examples/tiny-phi2's tokenizer) and a Llama of
TinyLlama-1.1B's shape (examples/stories260K's tokenizer: its ids are < 512). The data are chats
longer than 2048 tokens (`gpu_recipe.long_chats`), so every micro-batch is full: batch_size rows
of max_seq_length tokens. Every run takes a T4's path (`t4_budget.like_a_t4`: eager decoder
layers, the memory-efficient sdpa kernel with the dense packed mask, gradient checkpointing as
the spec says) for two optimizer steps; the allocator's peak is reset before each run.

Per run the report holds the spec (base_model shown as "phi-2" / "llama-1.1b"), how the job
ended, `torch.cuda.max_memory_allocated()` / `max_memory_reserved()`, the memory right after the
model was loaded, what the process holds outside PyTorch's allocator (CUDA context, kernels), the
wall time and the loss per step. At the top: the GPU, versions, both configs and the parameter
counts (all, and the nn.Linear weights bitsandbytes quantizes: every one but lm_head).

    python bench/memory_peaks.py --out memory-peaks.json   # a GPU: ~5 min
    python bench/memory_peaks.py --tiny --out /tmp/x.json  # CPU: the plumbing only (tiny models)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from gpu_recipe import build_phi2, long_chats  # noqa: E402
from t4_budget import like_a_t4, versions  # noqa: E402

GIB = 2**30
LLAMA_1B = dict(  # TinyLlama-1.1B's shape
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def training(**values) -> dict:
    return {"training": values}


# letter: (base, what, overrides of the spec's sections)
RUNS = {
    "A": ("phi-2", "default: 4 x 2048, accum 4, checkpointing, r 16 auto", {}),
    "B": ("phi-2", "batch 1, accum 16, 2048", training(batch_size=1, gradient_accumulation_steps=16)),
    "C": ("phi-2", "batch 4 x 1024", training(max_seq_length=1024)),
    "D": ("phi-2", "batch 8, accum 2, 2048", training(batch_size=8, gradient_accumulation_steps=2)),
    "E": ("phi-2", "lora r 64 all-linear, 4 x 2048", {"lora": {"r": 64, "target_modules": "all-linear"}}),
    "F": (
        "phi-2",
        "no checkpointing, batch 1 x 1024, accum 16",
        training(
            gradient_checkpointing=False, batch_size=1, gradient_accumulation_steps=16, max_seq_length=1024
        ),
    ),
    "G": (
        "phi-2",
        "no checkpointing, batch 2 x 2048, accum 8",
        training(gradient_checkpointing=False, batch_size=2, gradient_accumulation_steps=8),
    ),
    "H": ("phi-2", "default in bfloat16", {"quantization": {"compute_dtype": "bfloat16"}}),
    "I": ("llama-1.1b", "4 x 2048, checkpointing", {}),
    "J": (
        "llama-1.1b",
        "no checkpointing, batch 1 x 2048, accum 16",
        training(gradient_checkpointing=False, batch_size=1, gradient_accumulation_steps=16),
    ),
}


# ---------------------------------------------------------------- models


def build_llama(directory: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA_1B), dtype=torch.float16)
    model.save_pretrained(directory)  # writes config.json too
    AutoTokenizer.from_pretrained(REPO / "examples" / "stories260K").save_pretrained(directory)
    del model
    torch.cuda.empty_cache()


def parameter_counts(model_dir: Path) -> dict:
    """Counted on a meta-device copy of the model (same config, no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear = {name: m.weight.numel() for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    head = sum(n for name, n in linear.items() if name.split(".")[-1] == "lm_head")
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "linear_weights_quantized": sum(linear.values()) - head,
        "lm_head": head,
        "embedding": model.get_input_embeddings().weight.numel(),
        "linear_layers_quantized": len(linear) - (1 if head else 0),
        "config": config.to_dict(),
    }


# ---------------------------------------------------------------- memory


def context_overhead() -> dict:
    """What the process holds on the GPU outside PyTorch's allocator, right after CUDA starts."""
    import torch

    torch.cuda.init()
    torch.ones(1, device="cuda")
    torch.cuda.synchronize()
    return outside_allocator()


def outside_allocator() -> dict:
    import torch

    free, total = torch.cuda.mem_get_info()
    reserved = torch.cuda.memory_reserved()
    return {
        "device_used_bytes": total - free,
        "reserved_bytes": reserved,
        "overhead_bytes": total - free - reserved,
        "overhead_gib": round((total - free - reserved) / GIB, 3),
    }


LOADED: dict = {}  # the last run's memory right after its model was loaded (`watch_model_load`)


def watch_model_load() -> None:
    """Wraps recipe.load_model (once) to note in LOADED the memory right after the model is loaded."""
    import torch

    import worker.training.recipe as recipe

    if getattr(recipe.load_model, "watched", False):
        return
    load = recipe.load_model

    def load_model(job):
        loaded = load(job)
        if torch.cuda.is_available():
            LOADED["allocated_after_load_bytes"] = torch.cuda.memory_allocated()
            LOADED["peak_allocated_during_load_bytes"] = torch.cuda.max_memory_allocated()
        LOADED["speed_plan"] = loaded.speed.describe()
        return loaded

    load_model.watched = True  # type: ignore[attr-defined]
    recipe.load_model = load_model


# ---------------------------------------------------------------- one run


def merged(base: dict, overrides: dict) -> dict:
    out = {**base}
    for section, values in overrides.items():
        out[section] = {**base.get(section, {}), **values}
    return out


def measure(letter: str, spec_dict: dict, base_name: str, what: str) -> dict:
    import torch

    from app.models import LOCAL_OWNER
    from app.services import jobs
    from app.spec import JobSpec
    from worker.tasks import execute_job

    cuda = torch.cuda.is_available()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    result: dict = {"run": letter, "what": what}
    started = time.perf_counter()
    try:
        spec = JobSpec.model_validate(spec_dict)
        shown = spec.model_dump(mode="json")
        shown["base_model"] = base_name
        shown["dataset"]["source"] = "long-chats.jsonl"
        result["spec"] = shown
        # left over from earlier runs (held throughout this one, so inside its peaks)
        result["allocated_before_bytes"] = torch.cuda.memory_allocated() if cuda else None
        result["reserved_before_bytes"] = torch.cuda.memory_reserved() if cuda else None
        LOADED.clear()
        watch_model_load()
        job = jobs.create_job(spec, LOCAL_OWNER)
        try:
            execute_job(job.id)
        except Exception as exc:  # execute_job records failures itself; this is anything else
            result["raised"] = f"{type(exc).__name__}: {exc}"
        done = jobs.get_job(job.id, LOCAL_OWNER)
        rows = jobs.list_metrics(job.id, LOCAL_OWNER, None, 10_000).items
        events = jobs.list_events(job.id, LOCAL_OWNER, None, 1000).items
        result.update(
            status=str(done.status.value if hasattr(done.status, "value") else done.status),
            error=done.error,
            steps=done.current_step,
            loss=[r.loss for r in rows if r.loss is not None],
            events=[e.message for e in events],
            **LOADED,
        )
    except Exception as exc:
        result.update(status="error", error=f"{type(exc).__name__}: {exc}")
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    if cuda:
        allocated, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        result.update(
            peak_allocated_bytes=allocated,
            peak_reserved_bytes=reserved,
            peak_allocated_gib=round(allocated / GIB, 3),
            peak_reserved_gib=round(reserved / GIB, 3),
            outside_allocator_after=outside_allocator(),
        )
    return result


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("memory-peaks.json"))
    parser.add_argument("--runs", default="".join(RUNS), help="letters of the runs, e.g. ABI")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--records", type=int, default=64)
    parser.add_argument("--tiny", action="store_true", help="examples' tiny models, short rows (CPU check)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="memory-peaks-")).resolve()
    inputs = work / "inputs"
    inputs.mkdir()
    os.environ.update(
        FINETUNE_DATA_DIR=str(work / "data"),
        FINETUNE_BROKER_URL="memory://",
        FINETUNE_FLUSH_INTERVAL_S="0",
        FINETUNE_LOCAL_ROOTS=json.dumps([str(inputs), str(REPO / "examples")]),
    )
    os.environ.pop("FINETUNE_DATABASE_URL", None)
    import torch

    from app import migrate

    cuda = torch.cuda.is_available()
    report: dict = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/memory_peaks.py", *sys.argv[1:]]),
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "gpu_total_bytes": torch.cuda.mem_get_info()[1] if cuda else None,
        "versions": versions(),
        "context_overhead": context_overhead() if cuda else None,
    }
    report["as_t4"] = like_a_t4(training=True)
    migrate.upgrade()

    t0 = time.perf_counter()
    if args.tiny:
        models = {"phi-2": REPO / "examples" / "tiny-phi2", "llama-1.1b": REPO / "examples" / "stories260K"}
    else:
        models = {"phi-2": inputs / "phi-2-random", "llama-1.1b": inputs / "llama-1.1b-random"}
        build_phi2(models["phi-2"])
        build_llama(models["llama-1.1b"])
    report["build_models_seconds"] = round(time.perf_counter() - t0, 1)
    report["models"] = {name: parameter_counts(path) for name, path in models.items()}
    data = inputs / "long-chats.jsonl"
    long_chats(data, args.records)
    report["dataset"] = f"long-chats.jsonl: gpu_recipe.long_chats, {args.records} chats of > 2048 tokens"
    print(json.dumps({k: v for k, v in report.items() if k != "models"}, indent=1), flush=True)

    report["runs"] = []
    for letter in args.runs:
        base_name, what, overrides = RUNS[letter]
        base = {
            "base_model": str(models[base_name]),
            "dataset": {"source": str(data), "validation_split": None},
            "quantization": {"compute_dtype": "float16"},
            "training": {"max_steps": args.steps, "save_steps": 100, "logging_steps": 1},
        }
        spec_dict = merged(base, overrides)
        if args.tiny:  # a CPU: float32, short rows
            spec_dict = merged(spec_dict, {"quantization": {"compute_dtype": "float32"}})
            length = min(128, spec_dict["training"].get("max_seq_length", 2048) // 16)
            spec_dict = merged(spec_dict, {"training": {"max_seq_length": length}})
        result = measure(letter, spec_dict, base_name, what)
        report["runs"].append(result)
        print(
            f"run {letter} ({base_name}, {what}): {result['status']} steps={result.get('steps')} "
            f"peak allocated {result.get('peak_allocated_gib')} GiB, reserved "
            f"{result.get('peak_reserved_gib')} GiB, {result['wall_seconds']} s, loss {result.get('loss')}"
            + (f"\n  error: {result['error']}" if result.get("error") else ""),
            flush=True,
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1, default=str))  # what is done so far
    report["total_seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(report, indent=1, default=str)
    print(text)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
