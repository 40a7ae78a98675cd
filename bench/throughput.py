"""Side-by-side training throughput on one GPU: the seed recipe, TRL's packed SFTTrainer (what a
user would pick today) and the service's own path, on the same model (Phi-2 shapes, random
weights), the same real oasst1-en length distribution, in float16 and bfloat16. Each variant
runs in its own process so its peak memory is its own.

usage (on the GPU machine, wheels installed): python3 bench/throughput.py --out FILE.json
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

VARIANTS = {
    "seed fp16 (pad to 2048)": ["reference/seed_recipe_bench.py", "run", "{model}", "seed", "--steps", "8"],
    "TRL SFTTrainer packing=bfd, bf16": ["reference/trl_peer_bench.py", "{model}", "bfd", "--steps", "10"],
    "service bf16": ["service_bench.py", "{model}", "--dtype", "bfloat16", "--steps", "30"],
    "service fp16": ["service_bench.py", "{model}", "--dtype", "float16", "--steps", "30"],
    "service bf16 + metric callback": [
        "service_bench.py",
        "{model}",
        "--dtype",
        "bfloat16",
        "--steps",
        "30",
        "--callback",
    ],
    # Not the recipe: 4 × 16 = 64 samples a step (~8k tokens, full rows), to show the packed
    # path's speed once a step is large enough to hide the per-step host overhead.
    "service bf16, 64 samples/step": [
        "service_bench.py",
        "{model}",
        "--dtype",
        "bfloat16",
        "--steps",
        "12",
        "--accumulation",
        "16",
    ],
    # Data-parallel on two GPUs (`resources.gpus: 2`): the same steps, each GPU half of each.
    "service bf16, 2 GPUs": [
        "torchrun:2",
        "service_bench.py",
        "{model}",
        "--dtype",
        "bfloat16",
        "--steps",
        "30",
    ],
    "service bf16, 64 samples/step, 2 GPUs": [
        "torchrun:2",
        "service_bench.py",
        "{model}",
        "--dtype",
        "bfloat16",
        "--steps",
        "12",
        "--accumulation",
        "16",
    ],
    "service bf16, profiled": [
        "service_bench.py",
        "{model}",
        "--dtype",
        "bfloat16",
        "--steps",
        "10",
        "--profile",
    ],
    "service fp16, 64 samples/step": [
        "service_bench.py",
        "{model}",
        "--dtype",
        "float16",
        "--steps",
        "12",
        "--accumulation",
        "16",
    ],
}


def run(name: str, argv: list[str], model: str) -> dict:
    launcher = [sys.executable]
    if argv[0].startswith("torchrun:"):
        processes = argv[0].split(":")[1]
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
        argv = argv[1:]
    script = BENCH / argv[0]
    command = [
        *launcher,
        str(script),
        *[a.format(model=model) for a in argv[1:]],
        "--lengths",
        str(LENGTHS),
    ]
    env = dict(os.environ)
    if len(launcher) == 1:
        # One process: one GPU (with more visible, the Trainer would spread it with DataParallel).
        env.setdefault("CUDA_VISIBLE_DEVICES", "0")
    started = time.time()
    done = subprocess.run(command, cwd=script.parent, capture_output=True, text=True, env=env)
    for profile_line in (ln for ln in done.stdout.splitlines() if ln.startswith("PROFILE")):
        print(profile_line, flush=True)
    if "--profile" in argv:
        print(done.stdout[-12000:], flush=True)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        return {"name": name, "error": (done.stderr or done.stdout)[-3000:]}
    result = json.loads(line.removeprefix("RESULT "))
    result.update(name=name, wall_s=round(time.time() - started, 1))
    result["epoch_hours"] = EPOCH_TOKENS / result["real_tok_s"] / 3600
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="/tmp/phi2-random")
    parser.add_argument("--only", nargs="*", help="names of variants to run (default all)")
    args = parser.parse_args()
    if not Path(args.model, "config.json").exists():
        subprocess.run(
            [sys.executable, "seed_recipe_bench.py", "prepare", args.model],
            cwd=BENCH / "reference",
            check=True,
        )
    results = []
    for name, argv in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        result = run(name, argv, args.model)
        results.append(result)
        if "error" in result:
            print(f"{name}: FAILED\n{result['error']}", flush=True)
            continue
        print(
            f"{name:36s} {result['real_tok_s']:8.0f} trained tok/s  "
            f"{result.get('computed_tok_s', float('nan')):8.0f} computed tok/s  "
            f"peak {result['peak_gib']:.2f} / reserved {result['reserved_gib']:.2f} GiB  "
            f"epoch {result['epoch_hours']:.2f} h  ({result['gpu']})",
            flush=True,
        )
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
