"""DPO learns a real preference on a real pretrained model, shown in the job's own metric rows.

1. Pairs. `examples/stories260K` (Karpathy's tinyllamas stories260K, MIT) writes short stories on
   the CPU, seeded, from a few openings ("Once upon a time", "One day", "Lily", "Tom and", …;
   temperature 0.9, 60 new tokens). Each story is split into a prompt (its first sentence) and a
   continuation (the rest, up to its last whole word). The chosen side is the model's own coherent
   continuation; the rejected side is the same continuation with its words shuffled (seeded): the
   same words, so the same tokens give or take a few, in an incoherent order. The pairs are written
   in TRL's text preference format (`{"prompt", "chosen", "rejected"}`, each side continuing the
   prompt as text) as `train.jsonl` and a held-out `validation.jsonl` (different stories).
2. A DPO job through the service's own path, in this process, as tests/test_training.py runs one:
   `jobs.create_job` then `worker.tasks.execute_job` (a temporary data dir and SQLite database),
   base model stories260K in 4-bit NF4, LoRA on its attention projections, reference the base
   (adapter off), validation on the held-out pairs every few steps.
3. The table, from the job's metric rows (`jobs.list_metrics`: their `figures`): step, loss,
   eval_loss and the implicit-reward figures as TRL names them. Exit status 1 if the last held-out
   accuracy (`eval_rewards/accuracies`: the share of held-out pairs whose chosen side's implicit
   reward β·(log π − log π_ref) is above the rejected side's) is below --min-accuracy.

Before the first update the policy is the reference: every implicit reward is 0, each pair a
tie, which TRL (and so this service) counts as not preferred: accuracy 0.0, loss ln 2. The
first optimizer step's learning rate is 0 (the warmup starts there), so with `--eval-steps 1`
step 1's evaluation is that state.

usage: .venv/bin/python bench/dpo_learning.py [--out DIR] [--pairs 300 --eval-pairs 60]
       [--rejected shuffled|other-story] [--steps 16 --eval-steps 1 --lr 2e-3 --beta 0.1
       --batch-size 4 --accumulation 2 --rank 16 --target auto]
       [--data DIR]   (reuse train.jsonl / validation.jsonl from DIR instead of sampling)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODEL = REPO / "examples" / "stories260K"
OPENINGS = ("Once upon a time", "One day", "Lily", "Tom and", "The little dog", "Sue wanted")
# A story's first sentence ends at the first of these followed by a space.
SENTENCE_END = re.compile(r"[.!?](?=\s)")
MIN_CONTINUATION_WORDS = 8
COLUMNS = (
    ("step", "step"),
    ("loss", "loss"),
    ("eval_loss", "eval_loss"),
    ("eval_rewards/accuracies", "eval acc"),
    ("eval_rewards/margins", "eval margin"),
    ("rewards/accuracies", "train acc"),
)


# 1. pairs


def sample_stories(count: int, seed: int, temperature: float, new_tokens: int) -> list[str]:
    """`count` stories from stories260K (float32, CPU), spread over OPENINGS, whitespace collapsed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL).eval()
    torch.manual_seed(seed)
    stories = []
    per_opening = -(-count // len(OPENINGS))
    for opening in OPENINGS:
        ids = tokenizer(opening, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(
                ids,
                do_sample=True,
                temperature=temperature,
                top_k=0,
                max_new_tokens=new_tokens,
                num_return_sequences=per_opening,
                pad_token_id=tokenizer.eos_token_id,
            )
        for row in out:
            stories.append(" ".join(tokenizer.decode(row, skip_special_tokens=True).split()))
    return stories


def split_story(story: str) -> tuple[str, str] | None:
    """(prompt, continuation): the first sentence, and the rest up to its last whole word
    (generation stops mid-word) with a leading space; None if too little is left."""
    end = SENTENCE_END.search(story)
    if end is None:
        return None
    prompt, rest = story[: end.end()], story[end.end() :]
    words = rest.split()
    if not story.endswith((".", "!", "?", '"')):
        words = words[:-1]  # the last word may be cut off
    if len(words) < MIN_CONTINUATION_WORDS:
        return None
    return prompt, " " + " ".join(words)


def shuffled(continuation: str, rng: random.Random) -> str | None:
    """The continuation's words in a random order (never their own); None if it can't differ."""
    words = continuation.split()
    for _ in range(20):
        order = words[:]
        rng.shuffle(order)
        if order != words:
            return " " + " ".join(order)
    return None


def make_pairs(count: int, seed: int, temperature: float, new_tokens: int) -> list[dict[str, str]]:
    """Preference pairs from sampled stories, in TRL's text format; a few more stories are
    sampled than needed, since some split badly."""
    rng = random.Random(seed)
    pairs = []
    stories = sample_stories(int(count * 1.25) + len(OPENINGS), seed, temperature, new_tokens)
    random.Random(seed).shuffle(stories)  # mix the openings before the train/validation split
    for story in stories:
        split = split_story(story)
        if split is None:
            continue
        prompt, chosen = split
        rejected = shuffled(chosen, rng)
        if rejected is not None:
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        if len(pairs) == count:
            return pairs
    raise SystemExit(f"only {len(pairs)} usable stories of {len(stories)}; sample more")


def other_story_pairs(pairs: list[dict[str, str]]) -> list[dict[str, str]]:
    """The harder variant (`--rejected other-story`): the rejected side is the next pair's
    coherent continuation, a story that does not follow this prompt."""
    return [
        {**pair, "rejected": pairs[(i + 1) % len(pairs)]["chosen"]}
        for i, pair in enumerate(pairs)
        if pairs[(i + 1) % len(pairs)]["chosen"] != pair["chosen"]
    ]


def write_jsonl(path: Path, records: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


# 2. the job


def job_spec(train: Path, validation: Path, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "name": "dpo-learning-stories260K",
        "base_model": str(MODEL),
        "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": args.beta, "loss_type": "sigmoid"}}},
        "dataset": {"source": str(train), "validation_source": str(validation), "format": "preference"},
        "quantization": {"compute_dtype": "float32"},  # a CPU computes in float32
        "lora": {"r": args.rank, "alpha": 2 * args.rank, "dropout": 0.0, "target_modules": args.target},
        "training": {
            "max_steps": args.steps,
            "batch_size": args.batch_size,
            "gradient_accumulation_steps": args.accumulation,
            "learning_rate": args.lr,
            "lr_scheduler": "cosine",
            "warmup_ratio": 0.05,
            "max_seq_length": args.max_seq_length,
            "logging_steps": 1,
            "eval_steps": args.eval_steps,
            "save_steps": args.steps,
            "save_total_limit": 1,
            "seed": args.seed,
        },
    }


def run_job(spec: dict[str, Any]) -> tuple[Any, list[Any], float]:
    from app.models import LOCAL_OWNER
    from app.services import jobs
    from app.spec import JobSpec
    from worker.tasks import execute_job

    job = jobs.create_job(JobSpec.model_validate(spec), LOCAL_OWNER)
    started = time.perf_counter()
    execute_job(job.id)
    seconds = time.perf_counter() - started
    done = jobs.get_job(job.id, LOCAL_OWNER)
    rows = jobs.list_metrics(job.id, LOCAL_OWNER, None, 10_000).items
    return done, rows, seconds


# 3. the table


def figure(row: Any, name: str) -> float | None:
    if name in ("step", "loss", "eval_loss"):
        return getattr(row, name)
    return (row.figures or {}).get(name)


def table(rows: list[Any], every: int) -> str:
    """Markdown: every row with an evaluation, the first row and every `every`th."""
    lines = [
        "| " + " | ".join(label for _, label in COLUMNS) + " |",
        "|" + "---:|" * len(COLUMNS),
    ]
    for row in rows:
        if row.eval_loss is None and row.step != 1 and row.step % every:
            continue
        cells = []
        for name, _ in COLUMNS:
            value = figure(row, name)
            cells.append("" if value is None else str(value) if name == "step" else f"{value:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def final_accuracy(rows: list[Any]) -> float | None:
    evals = [figure(r, "eval_rewards/accuracies") for r in rows if r.eval_loss is not None]
    return evals[-1] if evals else None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, help="where the pairs go (default: a temporary folder)")
    parser.add_argument("--data", type=Path, help="reuse train.jsonl and validation.jsonl from here")
    parser.add_argument("--pairs", type=int, default=300, help="train + validation pairs to make")
    parser.add_argument("--eval-pairs", type=int, default=60)
    parser.add_argument(
        "--rejected",
        choices=["shuffled", "other-story"],
        default="shuffled",
        help="the rejected side: the continuation's words shuffled, or another story's continuation",
    )
    parser.add_argument("--temperature", type=float, default=0.9)
    parser.add_argument("--new-tokens", type=int, default=60)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--eval-steps", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--target", default="auto", help="lora.target_modules: auto or all-linear")
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-accuracy", type=float, default=0.9)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dpo-learning-")).resolve()
    if args.data:
        data = args.data.resolve()
    else:
        data = (args.out or work / "pairs").resolve()
        data.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        pairs = make_pairs(args.pairs, args.seed, args.temperature, args.new_tokens)
        held_out = args.eval_pairs
        train, validation = pairs[held_out:], pairs[:held_out]
        if args.rejected == "other-story":  # within each split: no held-out text is trained on
            train, validation = other_story_pairs(train), other_story_pairs(validation)
        write_jsonl(data / "train.jsonl", train)
        write_jsonl(data / "validation.jsonl", validation)
        print(
            f"{len(pairs) - held_out} train and {held_out} validation pairs in {data} "
            f"({time.perf_counter() - started:.1f} s)"
        )
    os.environ.update(
        FINETUNE_DATA_DIR=str(work / "data"),
        FINETUNE_BROKER_URL="memory://",
        FINETUNE_FLUSH_INTERVAL_S="0",
        FINETUNE_LOCAL_ROOTS=json.dumps([str(REPO / "examples"), str(data)]),
    )
    os.environ.pop("FINETUNE_DATABASE_URL", None)  # SQLite under the data dir
    from app import migrate

    migrate.upgrade()
    spec = job_spec(data / "train.jsonl", data / "validation.jsonl", args)
    done, rows, seconds = run_job(spec)
    print(f"job {done.id}: {done.status} in {seconds:.1f} s ({len(rows)} metric rows)")
    if done.status != "succeeded":
        raise SystemExit(f"the job failed: {done.error}")
    print(table(rows, args.eval_steps))
    accuracy = final_accuracy(rows)
    print(f"final held-out accuracy: {accuracy}")
    if accuracy is None or accuracy < args.min_accuracy:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
