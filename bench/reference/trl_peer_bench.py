"""Peer anchor: TRL's SFTTrainer with packing, same QLoRA recipe and data lengths as qlora_bench.py.

usage: python3 trl_bench.py MODEL_DIR STRATEGY [--steps N] [--lengths FILE]
STRATEGY: bfd (TRL default packing, padding-free) | wrapped | none
"""

import json, sys, time

import torch

sys.path.insert(0, ".")
from seed_recipe_bench import lengths, make_samples  # noqa: E402


def main(model_dir, strategy, steps, lengths_file):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer
    import trl

    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=q, dtype=torch.bfloat16, device_map={"": 0}, attn_implementation="sdpa"
    )
    samples = make_samples(lengths(lengths_file))
    ds = Dataset.from_dict({"input_ids": samples})
    kw = dict(
        output_dir="/tmp/trl_out",
        per_device_train_batch_size=4,
        gradient_accumulation_steps=4,
        learning_rate=2e-4,
        lr_scheduler_type="cosine",
        max_steps=steps,
        optim="paged_adamw_32bit",
        bf16=True,
        gradient_checkpointing=True,
        logging_steps=1000,
        save_strategy="no",
        report_to=[],
        max_length=2048,
        packing=strategy != "none",
        dataset_num_proc=8,
    )
    if strategy == "wrapped":
        kw["packing_strategy"] = "wrapped"
    import inspect

    ok = inspect.signature(SFTConfig.__init__).parameters
    args = SFTConfig(**{k: v for k, v in kw.items() if k in ok})
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "dense"],
    )
    tr = SFTTrainer(model=model, args=args, train_dataset=ds, peft_config=lora)
    counter = {"real": 0}
    inner = tr.data_collator

    def counting(batch):
        out = inner(batch)
        lab = out.get("labels")
        counter["real"] += int((lab != -100).sum()) if lab is not None else out["input_ids"].numel()
        return out

    tr.data_collator = counting
    marks = []

    class Clock(TrainerCallback):
        def on_step_end(self, a, s, c, **k):
            torch.cuda.synchronize()
            marks.append((time.time(), counter["real"]))

    tr.add_callback(Clock())
    torch.cuda.reset_peak_memory_stats()
    tr.train()
    (ta, ra), (tb, rb) = marks[1], marks[-1]
    print(
        "RESULT",
        json.dumps(
            dict(
                variant=f"trl_{strategy}",
                trl=trl.__version__,
                steps=len(marks) - 2,
                sec_per_step=(tb - ta) / (len(marks) - 2),
                real_tok_s=(rb - ra) / (tb - ta),
                peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                reserved_gib=torch.cuda.max_memory_reserved() / 2**30,
                padding_free=getattr(args, "padding_free", None),
                gpu=torch.cuda.get_device_name(0),
            )
        ),
    )


if __name__ == "__main__":
    a = sys.argv[1:]
    steps = int(a[a.index("--steps") + 1]) if "--steps" in a else 10
    lf = a[a.index("--lengths") + 1] if "--lengths" in a else None
    main(a[0], a[1], steps, lf)
