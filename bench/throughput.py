"""Side-by-side training throughput on one GPU: the seed recipe, TRL's packed SFTTrainer (what a
user would pick today) and the service's own path, with each speed change of
worker/training/speed.py measured alone and together, on the same model (Phi-2 shapes, random
weights) and the same real oasst1-en length distribution.

The seed and TRL each run in their own process; the service's variants of one dtype share a
process (the model is loaded once; each variant gets its own Trainer and optimizer, and its peak
memory is measured from an emptied cache).

usage (on the GPU machine, wheels installed):
    python3 bench/throughput.py --out FILE.json [--only GROUP ...] [--pick VARIANT ...]
Prints one line per variant and writes them all to FILE.json; docs/benchmarks.md has results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
LENGTHS = BENCH / "oasst1-en-message-lengths-phi2.txt"
EPOCH_TOKENS = sum(int(x) for x in LENGTHS.read_text().split())  # 4.88 M: every English message

MAIN = {"attention": "cudnn", "compile": False, "checkpointing": True, "row_multiple": 1}
FAST = {"attention": "auto", "row_multiple": 64}
FLEX = {"attention": "auto", "mask": "flex", "compile": True}  # the new default (speed.plan_speed)
FULL = {"full_rows": True, "steps": 5, "warmup": 2, "profile_steps": 1}

# The default recipe (16 samples a step) as on main, then one change at a time, then together.
# The first variant of each compiled kind warms up longer: its first steps compile.
SERVICE = [
    {"name": "as on main", **MAIN, "tables": True},
    {"name": "cuDNN attention off", **MAIN, "attention": "auto"},
    {"name": "+ compiled layers (sdpa, dense mask)", **FAST, "compile": True, "warmup": 8},
    {"name": "+ FlexAttention block mask (new default)", **FLEX, "warmup": 8, "tables": True},
    {"name": "new default, fused AdamW instead of paged", **FLEX, "optim": "adamw_torch_fused"},
    {"name": "new default, no recompute (big card: H200 default)", **FLEX, "checkpointing": False},
    {"name": "full rows, eager (cuDNN off)", **MAIN, **FAST, **FULL},
    {"name": "full rows, new default", **FLEX, **FULL},
    {"name": "full rows, new default, no recompute (H200)", **FLEX, **FULL, "checkpointing": False},
]
# The one-command table's second run: the paged default measured after a warm-up variant has
# compiled the layers (a job compiles in its first steps once; see docs/benchmarks.md).
SERVICE_WARM = [
    {"name": "new default, fused AdamW (compiles first)", **FLEX, "optim": "adamw_torch_fused", "warmup": 8},
    {"name": "new default (paged AdamW), compiled already", **FLEX},
    {"name": "new default, no recompute (H200 default)", **FLEX, "checkpointing": False},
    {
        "name": "64 samples a step, new default, no recompute",
        **FLEX,
        "accumulation": 16,
        "checkpointing": False,
    },
]
# Issue 14, round three: the 4-bit matmuls compiled into the layers (worker.training.nf4), against
# the round-two default they replace; fused AdamW in all (what the worker runs on a GPU).
FUSED = {**FLEX, "optim": "adamw_torch_fused"}
SERVICE_PLAIN_4BIT = [
    {"name": "round-two default (bitsandbytes matmul), fused AdamW", **FUSED, "warmup": 8},
    {"name": "+ 4-bit matmuls compiled into the layers", **FUSED, "plain_4bit": True, "warmup": 8},
    {
        "name": "+ 4-bit compiled, no recompute (H200 default)",
        **FUSED,
        "plain_4bit": True,
        "checkpointing": False,
    },
    {
        "name": "full rows, 4-bit compiled, no recompute",
        **FUSED,
        **FULL,
        "plain_4bit": True,
        "checkpointing": False,
    },
]
SERVICE_FP16 = [
    {"name": "as on main", **MAIN},
    {"name": "new default", **FLEX, "warmup": 8},
    {"name": "new default, no recompute (H200 default)", **FLEX, "checkpointing": False},
    {"name": "full rows, new default, no recompute (H200 default)", **FLEX, **FULL, "checkpointing": False},
]
# Two GPUs (round three): the variants measured against SERVICE_PLAIN_4BIT's one-GPU rows. Full
# rows warm up 6 steps: the 4th step of a compiled run compiles one more graph (~20 s, once).
SERVICE_2GPU = [
    {
        "name": "full rows, 4-bit compiled, no recompute",
        **FUSED,
        **FULL,
        "plain_4bit": True,
        "checkpointing": False,
        "warmup": 6,
    },
    {
        "name": "default, 4-bit compiled, no recompute",
        **FUSED,
        "plain_4bit": True,
        "checkpointing": False,
        "warmup": 6,
    },
    {"name": "default, 4-bit compiled", **FUSED, "plain_4bit": True},
]

# Issue 14, round four: each micro-batch shape's forward + backward as a CUDA graph
# (worker.training.step_graphs), against round three's default. A job meets a few dozen shapes;
# each runs eagerly the first time it comes and is captured the second, so the graph variants
# warm up through 60 steps and report how many of their timed micro-batches were replays.
PLAIN = {**FUSED, "plain_4bit": True}
GRAPHS = {**PLAIN, "graphs": True, "warmup": 60, "steps": 20}
SERVICE_GRAPHS = [
    {"name": "CUDA graphs, recompute", **GRAPHS},
    {"name": "CUDA graphs, no recompute (H200 default)", **GRAPHS, "checkpointing": False},
    {"name": "round-three default (4-bit compiled), recompute", **PLAIN},
    {"name": "round-three default, no recompute", **PLAIN, "checkpointing": False},
    {"name": "full rows, CUDA graphs, no recompute", **GRAPHS, **FULL, "warmup": 3, "checkpointing": False},
]

# Issue 14, round five: the loss fused with lm_head (worker.training.fused_loss) and a step that
# never waits for the GPU (the Trainer's per-micro-batch waits gone), against round four's
# default, which is measured again here (the clock now waits for the GPU only at the timed
# window's ends, as a job does between logged steps).
ROUND_FOUR = {**GRAPHS, "host_syncs": True}
ROUND_FIVE = {**GRAPHS, "fused_loss": True}
SERVICE_ROUND_FIVE = [
    {"name": "round four: CUDA graphs, recompute", **ROUND_FOUR},
    {"name": "+ loss fused with lm_head", **ROUND_FOUR, "fused_loss": True},
    {"name": "+ no waits for the GPU (new default)", **ROUND_FIVE},
    {"name": "new default, no recompute (H200 default)", **ROUND_FIVE, "checkpointing": False},
    {
        "name": "full rows, new default, no recompute",
        **ROUND_FIVE,
        **FULL,
        "warmup": 3,
        "checkpointing": False,
    },
]

# Issue 30, round six: recomputation spent between whole layers and none. With checkpointing on,
# the compiled layers keep a share (`recompute_budget`) of the activations they would keep without
# it and recompute the rest inside their compiled backward (worker.training.speed.SpeedPlan). The
# curve of tok/s against reserved memory, round five's default (whole layers) and none beside it.
ROUND_SIX = {**ROUND_FIVE, "warmup": 30, "steps": 40}
FIRST_SIGHT = {**ROUND_SIX, "first_sight": True}
# A step's rows end to end as one row (SpeedPlan.one_row, the default since 2026-12-07): no padding
# between rows, and the compiled layers meet one batch size (rows of 1 and of 2 compiled two graphs,
# the second mid-job: inside a first-sight capture it failed the capture).
ONE_ROW = {**FIRST_SIGHT, "one_row": True}
EXPANDABLE = {**ONE_ROW, "expandable_segments": True}
# Variants of one budget share a compile (a new budget compiles anew): the whole-layer ones first.
SERVICE_ROUND_SIX = [
    {"name": "whole layers recomputed, one row (default)", **ONE_ROW},
    {"name": "whole layers, one row, expandable segments", **EXPANDABLE},
    {"name": "layers keep 10% of their activations, one row", **ONE_ROW, "recompute_budget": 0.1},
    {"name": "keep 10%, one row, expandable segments", **EXPANDABLE, "recompute_budget": 0.1},
    {"name": "no recompute, one row, expandable segments", **EXPANDABLE, "checkpointing": False},
]
# The rest of the curve (measured 2026-12-07 with the rows variant: docs/benchmarks.md, round six)
SERVICE_ROUND_SIX_CURVE = [
    {"name": "whole layers, first sight, rows (the default before one row)", **FIRST_SIGHT},
    *(
        {"name": f"layers keep {b:.0%} of their activations, one row", **ONE_ROW, "recompute_budget": b}
        for b in (0.2, 0.3)
    ),
    {"name": "no recompute, one row", **ONE_ROW, "checkpointing": False},
]
# The T4's plan (compute capability 7.5, fp16; flash and cuDNN sdpa off, as a T4 has neither) on a
# bigger card: the default (eager layers, dense mask, whole layers recomputed) and the compiled
# forms measured for it (docs/benchmarks.md, round six, fifth session; the dense mask and sdpa's
# memory-efficient kernel kept): the operator's opt-in (FINETUNE_COMPILE_PRE_AMPERE=1: rows, no
# CUDA graphs) and the two not taken (one row; rows with graphs).
T4_ROUND_FIVE = {
    "as_t4": True,
    "attention": "auto",
    "compile": False,
    "checkpointing": True,
    "row_multiple": 1,
    "fused_loss": True,
    "optim": "adamw_torch_fused",
    "warmup": 3,
    "steps": 8,
}
T4_COMPILED = {
    **T4_ROUND_FIVE,
    "compile": True,
    "plain_4bit": True,
    "graphs": True,
    "row_multiple": 64,
    "warmup": 30,
    "steps": 12,
    "first_sight": True,
    "recompute_budget": 0.1,
}
T4_EAGER = {"name": "T4 plan, round five (eager)", **T4_ROUND_FIVE}
T4_ONE_ROW = {
    **T4_COMPILED,
    "name": "T4 candidate: compiled layers, CUDA graphs, one row, keep 10%",
    "one_row": True,
}
T4_ROWS = {
    **T4_COMPILED,
    "name": "T4 candidate: compiled layers, CUDA graphs, rows, keep 10%",
    "one_row": False,
}
T4_OPT_IN = {**T4_ROWS, "name": "T4 opt-in: compiled layers, rows, no graphs, keep 10%", "graphs": False}
# The T4's worst case: every micro-batch 4 × 2048 tokens (as docs/deploy.md's budget assumes). One
# row is then 8,192 tokens under the dense mask, whose attention costs four rows' four times over.
T4_LONG = {"full_rows": True, "warmup": 2, "steps": 3, "profile_steps": 1}
SERVICE_T4 = [T4_EAGER, T4_OPT_IN]


def _service(dtype: str, variants: list[dict], *extra: str) -> list[str]:
    return ["service_bench.py", "{model}", "--dtype", dtype, *extra, "--variants", json.dumps(variants)]


GROUPS = {
    "seed": ["reference/seed_recipe_bench.py", "run", "{model}", "seed", "--steps", "5"],
    "trl": ["reference/trl_peer_bench.py", "{model}", "bfd", "--steps", "6"],
    "service bf16": _service("bfloat16", SERVICE, "--check", "full"),
    "service bf16, warm": _service("bfloat16", SERVICE_WARM, "--check", "eager"),
    "service fp16": _service("float16", SERVICE_FP16),
    "service bf16, plain 4-bit": _service("bfloat16", SERVICE_PLAIN_4BIT, "--check", "full"),
    "service fp16, plain 4-bit": _service("float16", SERVICE_PLAIN_4BIT[:3]),
    "service bf16, 2 GPUs": ["torchrun:2", *_service("bfloat16", SERVICE_2GPU)],
    "service bf16, graphs": _service("bfloat16", SERVICE_GRAPHS),
    "service fp16, graphs": _service("float16", SERVICE_GRAPHS[:3]),
    "service bf16, round five": _service("bfloat16", SERVICE_ROUND_FIVE),
    "service fp16, round five": _service("float16", SERVICE_ROUND_FIVE[2:3]),
    "service bf16, round six": _service("bfloat16", SERVICE_ROUND_SIX),
    "service bf16, round six curve": _service("bfloat16", SERVICE_ROUND_SIX_CURVE),
    "service fp16, T4 plan": _service("float16", SERVICE_T4),
    "service fp16, T4 plan, long rows": _service("float16", [{**v, **T4_LONG} for v in SERVICE_T4]),
    # one variant a process: reserved memory is the process's high-water mark
    "service fp16, T4 one row": _service("float16", [T4_ONE_ROW]),
    "service fp16, T4 one row, long rows": _service("float16", [{**T4_ONE_ROW, **T4_LONG}]),
    "service fp16, T4 rows": _service("float16", [T4_ROWS]),
    "service fp16, T4 rows, long rows": _service("float16", [{**T4_ROWS, **T4_LONG}]),
    "service fp16, T4 opt-in": _service("float16", [T4_OPT_IN]),
    "service fp16, T4 opt-in, long rows": _service("float16", [{**T4_OPT_IN, **T4_LONG}]),
}
# What one plain `python3 bench/throughput.py --out FILE` runs: the peers, the service's default and
# the recomputation curve (round six), and the T4's plan against its opt-in (398.6 s on an H100 on
# 2026-12-07 with the one-row candidate in the opt-in's place, which started slower: 29 s to 21 s).
# Earlier rounds: `--only GROUP`; two GPUs: `--only "service bf16, 2 GPUs"` (a machine with two GPUs).
DEFAULT_GROUPS = ["seed", "trl", "service bf16, round six", "service fp16, T4 plan"]
LABELS = {"seed": "seed recipe, fp16, pad to 2048", "trl": "TRL SFTTrainer packing=bfd, bf16"}


def run(group: str, argv: list[str], model: str, pick: list[str] | None, log) -> list[dict]:
    launcher = [sys.executable]
    if argv[0].startswith("torchrun:"):
        processes = argv[0].split(":")[1]
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
        argv = argv[1:]
    if pick and "--variants" in argv:
        at = argv.index("--variants") + 1
        chosen = [v for v in json.loads(argv[at]) if v["name"] in pick]
        if not chosen:
            return []
        argv = [*argv[:at], json.dumps(chosen), *argv[at + 1 :]]
    script = BENCH / argv[0]
    command = [
        *launcher,
        str(script),
        *[a.replace("{model}", model) for a in argv[1:]],
        "--lengths",
        str(LENGTHS),
    ]
    env = dict(os.environ)
    if len(launcher) == 1:
        # One process: one GPU (with more visible, the Trainer would spread it with DataParallel).
        env.setdefault("CUDA_VISIBLE_DEVICES", "0")
    started = time.time()
    log.write(f"==== {group}: {' '.join(command)}\n")
    log.flush()
    offset = log.tell()
    # straight into the log (stdout and stderr), so a run cut short still leaves what it printed
    done = subprocess.run(
        command, cwd=script.parent, stdout=log, stderr=subprocess.STDOUT, text=True, env=env
    )
    log.flush()
    with open(log.name) as again:
        again.seek(offset)
        output = again.read()
    results = []
    for line in output.splitlines():
        if not line.startswith("RESULT "):
            continue
        result = json.loads(line.removeprefix("RESULT "))
        name = result.get("name")
        result["name"] = f"{group}: {name}" if name else LABELS.get(group, group)
        result["group"] = group
        if "real_tok_s" in result:
            result["epoch_hours"] = EPOCH_TOKENS / result["real_tok_s"] / 3600
        results.append(result)
    if not results:
        results.append({"name": group, "error": f"exit {done.returncode}: {output[-3000:]}"})
    for result in results:
        result["process_wall_s"] = round(time.time() - started, 1)
    return results


def line(result: dict) -> str:
    if "error" in result:
        return f"{result['name']}: FAILED {result['error'][-600:]}"
    if result.get("check"):
        return f"{result['name']}: " + json.dumps(
            {k: v for k, v in result.items() if "diff" in k or "loss" in k}
        )
    busy = result.get("gpu_busy_share")
    per_k = result.get("kernel_ms_per_1k_tokens")
    return (
        f"{result['name']:58s} {result['real_tok_s']:8.0f} tok/s {result.get('sec_per_step', 0):6.3f} s/step "
        + (f"first step {result['first_step_s']:5.1f} s " if result.get("first_step_s") is not None else "")
        + (f"busy {100 * busy:5.1f}% {per_k:6.1f} ms/1k " if busy is not None else "")
        + f"peak {result['peak_gib']:.2f}/{result['reserved_gib']:.2f} GiB"
        + (f" syncs/step {result['syncs_per_step']:.1f}" if "syncs_per_step" in result else "")
        + (
            f" replayed {result['timed_replayed']}/{result['timed_micro_batches']}"
            if "timed_replayed" in result
            else ""
        )
        + (f" capture failures {result['graph_failures']}" if result.get("graph_failures") else "")
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="/tmp/phi2-random")
    parser.add_argument("--only", nargs="*", help="groups to run: " + ", ".join(GROUPS))
    parser.add_argument("--pick", nargs="*", help="service variants to run (default all)")
    args = parser.parse_args()
    if not Path(args.model, "config.json").exists():
        subprocess.run(
            [sys.executable, "seed_recipe_bench.py", "prepare", args.model],
            cwd=BENCH / "reference",
            check=True,
        )
    results: list[dict] = []
    with open(Path(args.out).with_suffix(".log"), "w") as log:
        for group, argv in GROUPS.items():
            if group not in (args.only or DEFAULT_GROUPS):
                continue
            for result in run(group, argv, args.model, args.pick, log):
                results.append(result)
                print(line(result), flush=True)
            Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
