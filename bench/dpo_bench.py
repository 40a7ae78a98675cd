"""DPO training throughput on one GPU: TRL's DPOTrainer (the peer) and the service's own DPO step
(`service`: this card's speed plan; `service_recompute`: gradient checkpointing kept, the memory
a T4 job has), on the same model and the same preference pairs.

Model: Phi-2's shapes (bench/phi-2-config.json) with random weights (no hub on the GPU machine),
NF4 with double quantization, compute dtype bf16 (or fp16, `--dtype float16`), LoRA r16/α32/
dropout 0.05 on q_proj,k_proj,v_proj,dense, 4 pairs a micro-batch × 4 micro-batches (16 pairs an
optimizer step), lr 2e-4 cosine with warm-up 0.03, paged AdamW 32-bit, max length 2048, gradient
checkpointing (use_reentrant False), β 0.1, the reference = the base model (the adapter disabled),
reference log-probs computed in each step (not precomputed).

Pairs: `--pairs` of them (default: what the run trains), lengths (prompt, chosen, rejected)
drawn with replacement, seeded, from the real oasst1 English rank pairs in Phi-2 tokens
(bench/oasst1-en-rank-pair-lengths-phi2.txt, written by bench/dpo_pairs.py: 212 pairs), random
token ids. Each pair is capped at `--max-length` (prompt + longer completion; the prompt is cut).

Figures (each variant, over its timed steps, after `--warmup` steps):
- pairs_s: preference pairs trained per second;
- real_tok_s: the pairs' real tokens per second, both sequences of a pair with the prompt in each
  ((prompt + chosen) + (prompt + rejected)), no padding: the same count for every variant;
- computed_tok_s: the tokens the variant's forward passes ran per second, padding included (one
  policy forward; the reference forward runs the same tokens again);
- sec_per_step (16 pairs), step_s (each step's host time; the clock waits for the GPU only at the
  timed window's ends), peak_gib / reserved_gib (torch.cuda.max_memory_allocated /
  max_memory_reserved from the start of training: model, adapter, optimizer and activations);
- gpu_busy_share: torch.profiler over `--profile-steps` more steps: the GPU's kernel time per
  computed token there, times the computed tokens of a timed step, over the timed s/step (the
  profiled steps' own pairs differ from the timed ones', so their kernel time is scaled by tokens
  rather than used per step); kernel_ms_per_1k_tokens is per 1,000 real tokens.

Every variant runs in its own process (peak memory separate); the model is built once and saved
(`--model`, default /tmp/phi2-random-dpo, or /tmp/phi2-tiny-dpo with `--tiny`).

usage (on the GPU machine, wheels installed: bench/gpu_wheels.sh):
    python3 bench/dpo_bench.py --variants trl --out dpo.json [--warmup 3 --steps 8 --profile-steps 1]
    python3 bench/dpo_bench.py --tiny --variants trl --out /tmp/dpo.json --warmup 1 --steps 2 \\
        --batch-size 2 --accumulation 2     # CPU smoke (2 layers, hidden 64, max length 256): ~2 min
Prints one line per variant and writes them all to --out (the children's output to OUT.log).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
LENGTHS = BENCH / "oasst1-en-rank-pair-lengths-phi2.txt"
PHI2_CONFIG = BENCH / "phi-2-config.json"
TOKENIZER = REPO / "examples" / "tiny-phi2"  # microsoft/phi-2's tokenizer
TINY = dict(
    num_hidden_layers=2, hidden_size=64, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4
)
EOS = 50256
LORA = dict(
    r=16,
    lora_alpha=32,
    lora_dropout=0.05,
    bias="none",
    task_type="CAUSAL_LM",
    target_modules=["q_proj", "k_proj", "v_proj", "dense"],
)


@dataclass
class Options:
    """The recipe and the run's length; what every variant's process gets."""

    model_dir: str
    tiny: bool = False
    dtype: str = "bfloat16"
    batch_size: int = 4  # pairs a micro-batch
    accumulation: int = 4  # micro-batches an optimizer step
    learning_rate: float = 2e-4
    warmup_ratio: float = 0.03
    optim: str = "paged_adamw_32bit"
    max_length: int = 2048
    beta: float = 0.1
    checkpointing: bool = True
    warmup: int = 3  # untimed optimizer steps
    steps: int = 8  # timed optimizer steps
    profile_steps: int = 1  # profiled optimizer steps after the timed ones (0: no profile)
    pairs: int | None = None  # pairs in the data set (default: as many as the run trains)
    seed: int = 0
    lengths: str = str(LENGTHS)
    extra: dict = field(default_factory=dict)  # variant-specific settings

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps + self.profile_steps

    @property
    def pairs_per_step(self) -> int:
        return self.batch_size * self.accumulation


@dataclass
class Pair:
    prompt_ids: list[int]
    chosen_ids: list[int]  # the reply's tokens, EOS last
    rejected_ids: list[int]

    @property
    def real_tokens(self) -> int:
        """Both sequences of the pair, the prompt in each, no padding."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


def pair_lengths(path: str | Path = LENGTHS) -> list[tuple[int, int, int]]:
    rows = [line.split() for line in Path(path).read_text().splitlines() if line.strip()]
    return [(int(p), int(c), int(r)) for p, c, r in rows]


def make_pairs(opts: Options) -> list[Pair]:
    """`opts.pairs` pairs (default: one per pair the run trains), lengths drawn with replacement
    from the length file, capped at max_length (prompt cut), random ids below 50,000 (no EOS),
    each completion ending with EOS."""
    count = opts.pairs or opts.total_steps * opts.pairs_per_step
    table = pair_lengths(opts.lengths)
    rnd = random.Random(opts.seed)
    out = []
    for _ in range(count):
        p, c, r = rnd.choice(table)
        c, r = min(c, opts.max_length - 1), min(r, opts.max_length - 1)
        p = max(1, min(p, opts.max_length - max(c, r)))

        def ids(n: int) -> list[int]:
            return [rnd.randrange(50000) for _ in range(n)]

        out.append(Pair(ids(p), ids(c - 1) + [EOS], ids(r - 1) + [EOS]))
    return out


# ---------------------------------------------------------------------------------------------
# Measurement shared by every variant: a Trainer callback that keeps the clock, the memory peaks
# and the profile, and counts that each variant's collator feeds.


class Meter:
    """Counts what a variant trains and times its optimizer steps.

    A variant has `count(pairs, real_tokens, computed_tokens)` called for every batch its trainer
    trains (`counted_when_trained`; pairs: preference pairs in it; real_tokens: their
    `Pair.real_tokens`, so the same number whatever the layout; computed_tokens: the tokens its
    forward passes run, padding included), puts `callback()` into its transformers Trainer's callbacks, trains
    `opts.total_steps` optimizer steps, then returns `result(name, **extra)`."""

    def __init__(self, opts: Options) -> None:
        import torch

        self.opts = opts
        self.cuda = torch.cuda.is_available()
        self.pairs = self.real = self.computed = 0
        self.marks: list[tuple[float, int, int, int]] = []
        self.profiler: Any = None
        self.began = False

    def count(self, pairs: int, real_tokens: int, computed_tokens: int) -> None:
        self.pairs += pairs
        self.real += real_tokens
        self.computed += computed_tokens

    def counted_when_trained(self, trainer, collate, counts) -> None:
        """Count each batch when the trainer trains it, not when the data loader collates it
        (which runs ahead of the step marks): `collate` is the trainer's collator, `counts(batch,
        collated)` gives the batch's (pairs, real tokens, computed tokens)."""
        from collections import deque

        waiting: deque = deque()

        def collating(batch):
            collated = collate(batch)
            waiting.append(counts(batch, collated))
            return collated

        train = trainer.training_step

        def training_step(*args, **kwargs):
            self.count(*waiting.popleft())
            return train(*args, **kwargs)

        trainer.data_collator = collating
        trainer.training_step = training_step

    def begin(self) -> None:
        """Start of training: memory peaks from here (the model is loaded already)."""
        import torch

        if self.cuda and not self.began:
            torch.cuda.reset_peak_memory_stats()
        self.began = True

    def step_end(self, step: int) -> None:
        import torch

        warm, timed, total = self.opts.warmup, self.opts.warmup + self.opts.steps, self.opts.total_steps
        if self.cuda and step in (warm, timed, total):
            torch.cuda.synchronize()
        self.marks.append((time.perf_counter(), self.pairs, self.real, self.computed))
        if step == timed and self.opts.profile_steps:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
        if step == total and self.profiler is not None:
            self.profiler.__exit__(None, None, None)

    def callback(self):
        from transformers import TrainerCallback

        meter = self

        class Clock(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                meter.begin()

            def on_step_end(self, args, state, control, **kwargs):
                meter.step_end(state.global_step)

        return Clock()

    def result(self, name: str, **extra: Any) -> dict:
        import torch

        o = self.opts
        if len(self.marks) < o.total_steps:
            raise RuntimeError(f"{len(self.marks)} optimizer steps ran, {o.total_steps} expected")
        (t0, p0, r0, c0), (t1, p1, r1, c1) = self.marks[o.warmup - 1], self.marks[o.warmup + o.steps - 1]
        seconds = t1 - t0
        result: dict[str, Any] = {
            "name": name,
            "device": torch.cuda.get_device_name(0) if self.cuda else "cpu",
            "dtype": o.dtype,
            "steps": o.steps,
            "warmup": o.warmup,
            "pairs_per_step": (p1 - p0) / o.steps,
            "sec_per_step": seconds / o.steps,
            "step_s": [round(b[0] - a[0], 3) for a, b in zip(self.marks, self.marks[1:], strict=False)],
            "pairs_s": (p1 - p0) / seconds,
            "real_tok_s": (r1 - r0) / seconds,
            "computed_tok_s": (c1 - c0) / seconds,
            "real_share": (r1 - r0) / max(1, c1 - c0),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None,
            "reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if self.cuda else None,
        }
        if self.profiler is not None and self.cuda:
            events = self.profiler.key_averages()
            kernel_s = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 1e6
            launches = sum(
                e.count
                for e in events
                if e.key.startswith(("cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch"))
            )
            _, _, pr, pc = self.marks[-1]
            profiled_real, profiled_computed = pr - r1, pc - c1
            per_computed = kernel_s / max(1, profiled_computed)
            result.update(
                {
                    "profile_steps": o.profile_steps,
                    "profiled_kernel_s_per_step": kernel_s / o.profile_steps,
                    "kernel_ms_per_1k_tokens": 1e6 * kernel_s / max(1, profiled_real),
                    "launches_per_step": launches / o.profile_steps,
                    "gpu_busy_share": (per_computed * (c1 - c0) / o.steps) / result["sec_per_step"],
                }
            )
        result.update(extra)
        return result


# ---------------------------------------------------------------------------------------------
# The model, built once and saved (its own process: no memory left behind for the variants).


def prepare(model_dir: str, tiny: bool) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(PHI2_CONFIG)
    if tiny:
        for key, value in TINY.items():
            setattr(config, key, value)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    model.save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(model_dir)
    print("saved", model_dir, f"{sum(p.numel() for p in model.parameters()) / 1e9:.3f} B parameters")


def load_4bit(opts: Options):
    """The recipe's QLoRA base: NF4, double quantization, compute dtype opts.dtype, sdpa."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute = getattr(torch, opts.dtype)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )
    return AutoModelForCausalLM.from_pretrained(
        opts.model_dir,
        quantization_config=quantization,
        dtype=compute,
        device_map={"": 0} if torch.cuda.is_available() else {"": "cpu"},
        attn_implementation="sdpa",
    )


# ---------------------------------------------------------------------------------------------
# Variants. Each is `fn(opts, pairs, meter) -> dict` (the meter's result), run in its own process.


def single_token_words(tokenizer) -> list[str]:
    """Words (with their leading space) that Phi-2's tokenizer makes one token each, alone and
    in any sequence of them (GPT-2's pre-tokenizer splits ` word` from ` word`)."""
    words = []
    for token, index in tokenizer.get_vocab().items():
        if token.startswith("Ġ") and token[1:].isascii() and token[1:].isalpha() and len(token) > 2:
            word = " " + token[1:]
            if tokenizer(word, add_special_tokens=False)["input_ids"] == [index]:
                words.append(word)
    return sorted(words)


def trl_variant(opts: Options, pairs: list[Pair], meter: Meter) -> dict:
    """TRL's DPOTrainer as its docs have a user run it: a 4-bit model loaded with
    BitsAndBytesConfig, `peft_config` (so the reference is the model with the adapter disabled,
    no ref_model), the dataset as text `prompt`/`chosen`/`rejected` columns, its own collator
    (right padding to the longest sequence of the micro-batch: chosen and rejected rows of 4
    pairs, 8 rows; `padding_free` is off: TRL 1.16 turns it off with a warning anyway).

    TRL 1.16's `_prepare_dataset` always tokenizes (it has no "already tokenized" check: it reads
    `prompt`/`chosen`/`rejected` text, adds EOS, then writes prompt_ids/chosen_ids/rejected_ids),
    so each pair goes in as text that tokenizes to exactly its lengths: each token is a word that
    Phi-2's tokenizer keeps as one token (` the`, ` cat`, …), the completions one word short (TRL
    appends EOS, one token). The prepared dataset's lengths are checked against the pairs'."""
    import torch
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(opts.model_dir)
    words = single_token_words(tokenizer)
    rnd = random.Random(opts.seed + 1)

    def text(n: int) -> str:
        return "".join(rnd.choice(words) for _ in range(n))

    data = Dataset.from_dict(
        {
            "prompt": [text(len(p.prompt_ids)) for p in pairs],
            "chosen": [text(len(p.chosen_ids) - 1) for p in pairs],
            "rejected": [text(len(p.rejected_ids) - 1) for p in pairs],
        }
    )
    model = load_4bit(opts)
    cuda = torch.cuda.is_available()
    fp16 = opts.dtype == "float16"
    config = DPOConfig(
        output_dir="/tmp/dpo_bench_trl",
        per_device_train_batch_size=opts.batch_size,
        gradient_accumulation_steps=opts.accumulation,
        learning_rate=opts.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=opts.warmup_ratio,  # transformers 5: a float below 1 is a ratio
        max_steps=opts.total_steps,
        optim=opts.optim,
        bf16=not fp16,
        fp16=fp16,
        gradient_checkpointing=opts.checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=1000,
        save_strategy="no",
        report_to=[],
        seed=opts.seed,
        use_cpu=not cuda,
        max_length=opts.max_length,
        beta=opts.beta,
        padding_free=False,  # TRL 1.16's default; True warns and falls back to padding
        precompute_ref_log_probs=False,  # the default: the reference forward runs in each step
    )
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA),
        callbacks=[meter.callback()],
    )
    prepared = trainer.train_dataset
    got = [
        (len(a), len(b), len(c))
        for a, b, c in zip(
            prepared["prompt_ids"], prepared["chosen_ids"], prepared["rejected_ids"], strict=True
        )
    ]
    want = [(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
    if got != want:
        bad = next(i for i, (g, w) in enumerate(zip(got, want, strict=True)) if g != w)
        raise RuntimeError(f"TRL tokenized pair {bad} to {got[bad]} tokens, not {want[bad]}")
    meter.counted_when_trained(
        trainer,
        trainer.data_collator,
        lambda _, out: (
            out["input_ids"].shape[0] // 2,
            int(out["attention_mask"].sum()),
            out["input_ids"].numel(),
        ),
    )
    trainer.train()
    return meter.result(
        "TRL 1.16 DPOTrainer (QLoRA, ref = adapter disabled, padded)",
        trl=trl.__version__,
        padding_free=trainer.padding_free,
        precompute_ref_log_probs=config.precompute_ref_log_probs,
        disable_dropout=config.disable_dropout,
    )


def service_variant(
    opts: Options, pairs: list[Pair], meter: Meter, keep_recompute: bool = False, sides_apart: bool = False
) -> dict:
    """The service's own DPO step, built as the worker builds a DPO job (worker.training.recipe:
    load_model and _dpo_trainer): the 4-bit base with the recipe's LoRA through the worker's
    loader, the speed plan for this GPU (compiled layers, FlexAttention document masks, fused AdamW;
    no CUDA graphs for DPO), lm_head taken out of the forward and completion tokens scored a
    chunk at a time, each step's 16 pairs packed padding-free into micro-batches of at most 4 rows
    of max_length, a no-grad reference forward with the adapter off. `keep_recompute`: gradient
    checkpointing kept where the plan would drop it on a big card (the memory a T4 job has).
    `sides_apart`: each side packed on its own (no prompt computed once), to measure that alone."""
    from functools import partial

    import torch

    from app.spec import stored_spec
    from worker.training.data import IGNORE_INDEX, TokenizedSample
    from worker.training.dpo import DpoTrainer, collate_pair_step, pack_pairs
    from worker.training.fused_loss import use_hidden_states_head
    from worker.training.model import compute_dtype, load_quantized_lora_model
    from worker.training.preference_data import TokenizedPair
    from worker.training.speed import apply_speed_plan, for_dpo, plan_speed
    from worker.training.trainer import training_arguments

    spec = stored_spec(
        {
            "base_model": opts.model_dir,
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": opts.beta}}},
            "quantization": {"compute_dtype": opts.dtype},
            "lora": {"r": LORA["r"], "alpha": LORA["lora_alpha"], "dropout": LORA["lora_dropout"]},
            "training": {
                "batch_size": opts.batch_size,
                "gradient_accumulation_steps": opts.accumulation,
                "learning_rate": opts.learning_rate,
                "warmup_ratio": opts.warmup_ratio,
                "optimizer": opts.optim,
                "max_seq_length": opts.max_length,
                "gradient_checkpointing": opts.checkpointing,
                "max_steps": opts.total_steps,
                "save_steps": 10**6,
                "seed": opts.seed,
            },
        }
    )
    t = spec.training
    dtype = compute_dtype(spec.quantization)
    model = load_quantized_lora_model(spec, dtype)
    speed = plan_speed(
        model.config,
        t.batch_size * t.max_seq_length,
        t.gradient_checkpointing,
        packed=True,
        graphs=False,
        drop_checkpointing=False if keep_recompute else None,
    )
    apply_speed_plan(model, for_dpo(speed))  # as the worker's DPO jobs (recipe.load_model)
    head = use_hidden_states_head(model)

    def side(p: Pair, completion: list[int]) -> TokenizedSample:
        return TokenizedSample(p.prompt_ids + completion, [IGNORE_INDEX] * len(p.prompt_ids) + completion)

    tokenized = [TokenizedPair(side(p, p.chosen_ids), side(p, p.rejected_ids)) for p in pairs]
    # sides_apart: the same packing without the shared prompt, to compare
    train_set = pack_pairs(
        tokenized, opts.pairs_per_step, t.batch_size, t.max_seq_length, t.seed, share_prompts=not sides_apart
    )
    collate = partial(collate_pair_step, pad_token_id=EOS, row_multiple=speed.row_multiple)

    def counts(items, out):
        in_it = {piece.pair for micro in items[0]["micro_batches"] for row in micro for piece in row}
        computed = sum(micro["input_ids"].numel() for micro in out["micro_batches"])
        return len(in_it), sum(pairs[p].real_tokens for p in in_it), computed

    args = training_arguments(spec, Path("/tmp/dpo_bench_service"), dtype, evaluate=False, speed=speed)
    trainer = DpoTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        data_collator=collate,
        callbacks=[meter.callback()],
        settings=spec.dpo,
        head=head,
    )
    meter.counted_when_trained(trainer, collate, counts)
    trainer.mask_dtype = dtype if torch.cuda.is_available() else torch.float32
    trainer.mask_kind = speed.mask
    trainer.train()
    name = (
        "service DPO step"
        + (", sides apart" if sides_apart else "")
        + (", recompute kept (T4-sized memory)" if keep_recompute else ", this card's plan")
    )
    return meter.result(
        name,
        plan=speed.describe(),
        micro_batches_per_step=sum(len(s.micro_batches) for s in train_set.steps) / max(1, len(train_set)),
        fill=train_set.fill,
        shared_prompt=train_set.shared_share,
    )


VARIANTS = {
    "trl": trl_variant,
    "service": service_variant,
    "service_recompute": partial(service_variant, keep_recompute=True),
    "service_recompute_apart": partial(service_variant, keep_recompute=True, sides_apart=True),
}


# ---------------------------------------------------------------------------------------------
# The harness: each variant in its own process.


def child(name: str, opts: Options) -> None:
    meter = Meter(opts)
    result = VARIANTS[name](opts, make_pairs(opts), meter)
    result["variant"] = name
    print("RESULT " + json.dumps(result), flush=True)


def line(result: dict) -> str:
    if "error" in result:
        return f"{result['variant']}: FAILED {result['error'][-1500:]}"
    busy = result.get("gpu_busy_share")
    memory = (
        f"peak {result['peak_gib']:.2f}/{result['reserved_gib']:.2f} GiB"
        if result.get("peak_gib") is not None
        else ""
    )
    return (
        f"{result['name']:60s} {result['pairs_s']:7.2f} pairs/s {result['real_tok_s']:8.0f} tok/s "
        f"({result['computed_tok_s']:.0f} computed) {result['sec_per_step']:7.3f} s/step "
        + (f"busy {100 * busy:5.1f}% " if busy is not None else "")
        + memory
    )


def run_variant(name: str, opts: Options, log) -> dict:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        name,
        "--options",
        json.dumps(asdict(opts)),
    ]
    env = dict(os.environ)
    env.setdefault("CUDA_VISIBLE_DEVICES", "0")  # one process, one GPU
    env.setdefault("PYTHONUNBUFFERED", "1")
    started = time.time()
    log.write(f"==== {name}: {' '.join(command)}\n")
    log.flush()
    offset = log.tell()
    done = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    log.flush()
    with open(log.name) as again:
        again.seek(offset)
        output = again.read()
    results = [json.loads(x.removeprefix("RESULT ")) for x in output.splitlines() if x.startswith("RESULT ")]
    result = (
        results[-1] if results else {"variant": name, "error": f"exit {done.returncode}: {output[-4000:]}"}
    )
    result["process_wall_s"] = round(time.time() - started, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="trl", help="comma-separated: " + ", ".join(VARIANTS))
    parser.add_argument("--out", help="JSON file for the results (the children's output goes to OUT.log)")
    parser.add_argument("--model", help="saved model folder (built if missing)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke: 2 layers, hidden 64, max length 256")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--profile-steps", type=int, default=1)
    parser.add_argument("--pairs", type=int)
    parser.add_argument("--batch-size", type=int, default=4, help="pairs a micro-batch")
    parser.add_argument("--accumulation", type=int, default=4, help="micro-batches an optimizer step")
    parser.add_argument("--max-length", type=int)
    parser.add_argument("--optim")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lengths", default=str(LENGTHS))
    parser.add_argument("--extra", default="{}", help="JSON object of variant-specific settings")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--options", help=argparse.SUPPRESS)
    parser.add_argument("--prepare", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prepare:
        prepare(args.prepare, args.tiny)
        return
    if args.child:
        child(args.child, Options(**json.loads(args.options)))
        return
    if not args.out:
        parser.error("--out is required")
    model = args.model or ("/tmp/phi2-tiny-dpo" if args.tiny else "/tmp/phi2-random-dpo")
    opts = Options(
        model_dir=model,
        tiny=args.tiny,
        dtype=args.dtype,
        warmup=args.warmup,
        steps=args.steps,
        profile_steps=args.profile_steps,
        pairs=args.pairs,
        batch_size=args.batch_size,
        accumulation=args.accumulation,
        seed=args.seed,
        lengths=args.lengths,
        max_length=args.max_length or (256 if args.tiny else 2048),
        extra=json.loads(args.extra),
    )
    if args.optim:
        opts.optim = args.optim
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    if not Path(model, "config.json").exists():
        started = time.time()
        subprocess.run(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--prepare",
                model,
                *(["--tiny"] if args.tiny else []),
            ],
            check=True,
            cwd=REPO,
        )
        print(f"model built and saved in {time.time() - started:.0f} s", flush=True)
    results = []
    with open(Path(args.out).with_suffix(".log"), "w") as log:
        for name in names:
            result = run_variant(name, opts, log)
            results.append(result)
            print(line(result), flush=True)
            Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
