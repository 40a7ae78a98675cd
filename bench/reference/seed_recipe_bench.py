"""CEO-side anchor benchmark: the seed's QLoRA recipe on the Phi-2 architecture.

Random weights (no hub access on the device machine), real shapes. Measures
trained (non-pad) tokens per second and peak GPU memory for several
data-layout variants, each in its own process so peak memory is clean.

usage: python3 qlora_bench.py prepare DIR
       python3 qlora_bench.py run DIR VARIANT [--steps N] [--lengths FILE]
"""

import json, math, os, random, sys, time

import torch

PHI2 = dict(
    vocab_size=51200,
    hidden_size=2560,
    intermediate_size=10240,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    hidden_act="gelu_new",
    max_position_embeddings=2048,
    partial_rotary_factor=0.4,
    layer_norm_eps=1e-5,
    resid_pdrop=0.1,
    embd_pdrop=0.0,
    attention_dropout=0.0,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    bos_token_id=50256,
    eos_token_id=50256,
)


def prepare(out):
    from transformers import PhiConfig, PhiForCausalLM

    cfg = PhiConfig(**PHI2)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = PhiForCausalLM(cfg).to(torch.float16)
    model.save_pretrained(out, safe_serialization=True)
    print("saved", out, sum(p.numel() for p in model.parameters()) / 1e9, "B params")


def lengths(path, n=6000, seed=0):
    if path:
        ls = [int(x) for x in open(path).read().split()]
        rnd = random.Random(seed)
        return [rnd.choice(ls) for _ in range(n)]
    rnd = random.Random(seed)
    # lognormal, median 180 tokens, long tail; capped at 2048
    return [max(8, min(2048, int(rnd.lognormvariate(math.log(180), 0.9)))) for _ in range(n)]


def make_samples(ls, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50000, (l,), generator=g).tolist() for l in ls]


def pack(samples, block=2048):
    blocks, cur = [], []
    for s in samples:
        cur.extend(s + [50256])
        while len(cur) >= block:
            blocks.append(cur[:block])
            cur = cur[block:]
    return blocks


def pack_docs(samples, block=2048):
    """Greedy packing that keeps sample boundaries (sample ids per token); no sample is split."""
    rows, cur, doc = [], [], []
    for i, s in enumerate(samples):
        s = s[: block - 1] + [50256]
        if len(cur) + len(s) > block:
            rows.append((cur, doc))
            cur, doc = [], []
        cur = cur + s
        doc = doc + [i] * len(s)
    return rows


def run(model_dir, variant, steps, lengths_file):
    from transformers import (
        AutoModelForCausalLM,
        BitsAndBytesConfig,
        Trainer,
        TrainingArguments,
        TrainerCallback,
    )
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    bf16 = "bf16" in variant
    compute = torch.bfloat16 if bf16 else torch.float16
    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=q, dtype=compute, device_map={"": 0}, attn_implementation="sdpa"
    )
    model.config.use_cache = False
    if "lean" in variant:  # no fp32 upcast of lm_head/embeddings/norms
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    else:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "dense"],
    )
    model = get_peft_model(model, lora)
    load_s = time.time() - t0

    ls = lengths(lengths_file)
    samples = make_samples(ls)
    mode = variant.split("_")[0]
    bf16 = "bf16" in variant
    compute = torch.bfloat16 if bf16 else torch.float16
    if mode == "packed":
        samples = pack(samples)
    if mode == "packed4d":
        ds = [{"input_ids": r, "doc": d} for r, d in pack_docs(samples)]
    else:
        ds = [{"input_ids": s} for s in samples]

    counter = {"real": 0, "total": 0}

    def collate(batch):
        if mode == "seed":
            L = 2048  # padding="max_length", max_length=2048 as in the seed
        else:
            L = max(len(b["input_ids"]) for b in batch)
            L = (L + 7) // 8 * 8
        ids = torch.full((len(batch), L), 50256, dtype=torch.long)
        att = torch.zeros((len(batch), L), dtype=torch.long)
        for i, b in enumerate(batch):
            x = b["input_ids"][:L]
            ids[i, : len(x)] = torch.tensor(x)
            att[i, : len(x)] = 1
        labels = ids.clone()
        labels[att == 0] = -100
        counter["real"] += int(att.sum())
        counter["total"] += ids.numel()
        if mode == "packed4d":  # per-sample causal attention, positions restart per sample
            doc = torch.full((len(batch), L), -1, dtype=torch.long)
            pos = torch.zeros((len(batch), L), dtype=torch.long)
            for i, b in enumerate(batch):
                d = torch.tensor(b["doc"])
                doc[i, : len(d)] = d
                starts = torch.cat([torch.tensor([True]), d[1:] != d[:-1]])
                idx = torch.arange(len(d))
                first = torch.cummax(torch.where(starts, idx, 0), 0).values
                pos[i, : len(d)] = idx - first
                labels[i, : len(d)][starts] = -100  # first token of a sample has no context
            causal = torch.tril(torch.ones(L, L, dtype=torch.bool))
            allowed = (doc[:, :, None] == doc[:, None, :]) & causal & (doc[:, :, None] >= 0)
            allowed |= torch.eye(L, dtype=torch.bool)  # padded rows attend to themselves
            mask = torch.zeros(len(batch), 1, L, L, dtype=compute).masked_fill(
                ~allowed[:, None], torch.finfo(compute).min
            )
            return {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "labels": labels}
        return {"input_ids": ids, "attention_mask": att, "labels": labels}

    marks = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            marks.append((time.time(), counter["real"], counter["total"]))

    import inspect

    kw = dict(
        output_dir=f"/tmp/out_{variant}",
        per_device_train_batch_size=4,
        gradient_accumulation_steps=4,
        learning_rate=2e-4,
        lr_scheduler_type="cosine",
        warmup_ratio=0.03,
        max_steps=steps,
        optim="paged_adamw_32bit",
        fp16=not bf16,
        bf16=bf16,
        gradient_checkpointing=True,
        logging_steps=1000,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        group_by_length=(mode == "grouped"),
        remove_unused_columns=False,
    )
    ok = inspect.signature(TrainingArguments.__init__).parameters
    if "warmup_ratio" not in ok:
        kw["warmup_steps"] = kw.pop("warmup_ratio")  # v5: a float < 1 is a ratio
    dropped = [k for k in kw if k not in ok]
    print("dropped TrainingArguments:", dropped)
    args = TrainingArguments(**{k: v for k, v in kw.items() if k in ok})
    torch.cuda.reset_peak_memory_stats()
    tr = Trainer(model=model, args=args, train_dataset=ds, data_collator=collate, callbacks=[Clock()])
    tr.train()
    w = 2  # warm-up steps excluded
    (ta, ra, pa), (tb, rb, pb) = marks[w - 1], marks[-1]
    dt = tb - ta
    res = dict(
        variant=variant,
        steps=len(marks) - w,
        sec_per_step=dt / (len(marks) - w),
        real_tok_s=(rb - ra) / dt,
        computed_tok_s=(pb - pa) / dt,
        pad_share=1 - (rb - ra) / max(1, pb - pa),
        peak_gib=torch.cuda.max_memory_allocated() / 2**30,
        reserved_gib=torch.cuda.max_memory_reserved() / 2**30,
        load_s=load_s,
        gpu=torch.cuda.get_device_name(0),
    )
    print("RESULT", json.dumps(res))


if __name__ == "__main__":
    a = sys.argv[1:]
    if a[0] == "prepare":
        prepare(a[1])
    else:
        steps = int(a[a.index("--steps") + 1]) if "--steps" in a else 8
        lf = a[a.index("--lengths") + 1] if "--lengths" in a else None
        run(a[1], a[2], steps, lf)
