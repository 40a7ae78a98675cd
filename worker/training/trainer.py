"""What the recipe's trainer stage builds from: a job's TrainingArguments, its packed data, and
the two Trainer subclasses (padded and packed batches)."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from app.spec import JobSpec
from worker.training.data import TrainingData
from worker.training.layer_compile import LayerCompile
from worker.training.packing import (
    INPUT_TOKENS,
    PackedData,
    block_causal_mask,
    plan_full_rows,
    plan_steps,
)
from worker.training.speed import (
    SpeedPlan,
    accept_bnb_adam_state,
    document_block_mask,
    optimizer_name,
)
from worker.training.step_graphs import StepGraphs

FULL_ROWS = "full_rows"


def world_size() -> int:
    """Processes training this job together (torchrun sets WORLD_SIZE; 1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def packing_mode(spec: JobSpec) -> str:
    """`per_step` (the default: each optimizer step packs the recipe's batch_size ×
    gradient_accumulation_steps samples) or `full_rows` (rows filled to max_seq_length;
    a step is gradient_accumulation_steps micro-batches of batch_size full rows)."""
    return FULL_ROWS if spec.training.packing_mode == FULL_ROWS else "per_step"


def _warmup(ratio: float) -> dict[str, Any]:
    # transformers 5 dropped warmup_ratio: a float warmup_steps below 1 is read as a ratio.
    if "warmup_ratio" in inspect.signature(TrainingArguments.__init__).parameters:
        return {"warmup_ratio": ratio}
    return {"warmup_steps": ratio}


def training_arguments(
    spec: JobSpec,
    output_dir: Path,
    dtype: torch.dtype,
    evaluate: bool,
    speed: SpeedPlan | None = None,
    full_rows: bool | None = None,
) -> TrainingArguments:
    t = spec.training
    on_gpu = torch.cuda.is_available()
    full_rows = packing_mode(spec) == FULL_ROWS if full_rows is None else full_rows
    # The Trainer's own checkpointing only when the layers are not compiled (compiled layers are
    # checkpointed from outside by worker.training.speed) and the plan keeps recomputation.
    checkpointing = t.gradient_checkpointing
    if speed is not None:
        checkpointing = speed.checkpointing and not speed.compile_layers
    # Packed, each item is one process's share of an optimizer step (see worker.training.packing);
    # padded, the processes split the accumulation steps. Either way a step takes
    # batch_size × gradient_accumulation_steps samples, however many GPUs. Full rows: an item
    # is a micro-batch of batch_size full rows, and the processes split the accumulation steps.
    if t.packing and full_rows:
        batch_size, accumulation = 1, max(1, t.gradient_accumulation_steps // world_size())
    elif t.packing:
        batch_size, accumulation = 1, 1
    else:
        batch_size, accumulation = t.batch_size, t.gradient_accumulation_steps // world_size()
    return TrainingArguments(
        eval_strategy="steps" if evaluate else "no",
        eval_steps=t.eval_steps or t.save_steps,
        per_device_eval_batch_size=batch_size,
        output_dir=str(output_dir),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        remove_unused_columns=not t.packing,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        optim=optimizer_name(t.optimizer, speed),
        gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        # Mixed precision is a GPU matter; on a CPU the 4-bit layers compute in `dtype` as they are.
        fp16=on_gpu and dtype == torch.float16,
        bf16=on_gpu and dtype == torch.bfloat16,
        use_cpu=not on_gpu,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        logging_strategy="steps",
        logging_steps=t.logging_steps,
        logging_first_step=True,
        # Packed on one process, PackedTrainer counts the tokens on the host; the Trainer's own
        # count reads each micro-batch's back from the GPU, waiting for it (see PackedTrainer).
        include_num_input_tokens_seen="no" if t.packing and world_size() == 1 else "non_padding",
        # The logged loss is the steps' plain mean: the Trainer's nan/inf filter would wait for
        # every micro-batch's loss on the host (a nan shows as nan, which is what happened).
        logging_nan_inf_filter=False,
        # Pinned batches copied without waiting: the host prepares the next micro-batch while
        # the GPU still runs this one.
        dataloader_pin_memory=on_gpu,
        accelerator_config={"non_blocking": on_gpu},
        seed=t.seed,
        data_seed=t.seed,
        report_to="none",
        disable_tqdm=True,
        ddp_find_unused_parameters=False if world_size() > 1 else None,
        **_warmup(t.warmup_ratio),
    )


def _packed(data: TrainingData, spec: JobSpec, samples_per_item: int, full_rows: bool = False) -> PackedData:
    t = spec.training
    lengths = [len(sample.input_ids) for sample in data.samples]
    if full_rows:
        steps = plan_full_rows(lengths, t.batch_size, t.max_seq_length, t.seed)
    else:
        steps = plan_steps(lengths, samples_per_item, t.batch_size, t.max_seq_length, t.seed)
    return PackedData(data.samples, steps)


class ServiceTrainer(Trainer):
    """The Trainer, whose torch AdamW also resumes from a bitsandbytes AdamW checkpoint
    (worker.training.speed runs paged_adamw_32bit as the fused torch AdamW on a GPU)."""

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        accept_bnb_adam_state(self.optimizer)
        return optimizer


class PackedTrainer(ServiceTrainer):
    """Trains on packed steps: turns the collator's per-token sample numbers into a
    sample-diagonal causal mask on the model's device; on a GPU whose speed plan says so, runs
    each micro-batch as a CUDA graph (worker.training.step_graphs).

    Nothing in a step waits for the GPU, so the host queues the next micro-batch while the GPU
    runs this one: the tokens seen are counted from the collator's `INPUT_TOKENS` (an int) where
    `training_arguments` turned the Trainer's own count off, and the arguments drop the nan/inf
    loss filter and blocking input copies. The loss is read back only when it is logged."""

    mask_dtype: torch.dtype = torch.float32
    mask_kind: str = "sdpa"  # "flex": a FlexAttention BlockMask (worker.training.speed)
    step_graphs: StepGraphs | None = None
    # the first micro-batches eager while the layers compile (worker.training.layer_compile)
    layer_compile: LayerCompile | None = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        compile = self.layer_compile
        if compile is not None and not compile.switched:
            if compile.ready():
                compile.switch(self)
            else:
                compile.eager_micro_batches += 1
        inputs = dict(inputs)
        tokens = inputs.pop(INPUT_TOKENS, None)
        if tokens is not None and self.args.include_num_input_tokens_seen == "no":
            self.state.num_input_tokens_seen += tokens
        dropout = getattr(model, "counter_dropout", None)
        if dropout is not None:
            dropout.next_micro_batch()
        if self.step_graphs is None:
            return super().training_step(model, inputs, num_items_in_batch)
        run = super().training_step
        return self.step_graphs.step(
            model, inputs, num_items_in_batch, lambda batch, items: run(model, batch, items)
        )

    def compute_loss(self, model, inputs, *args, **kwargs):
        inputs = dict(inputs)
        inputs.pop(INPUT_TOKENS, None)  # evaluation's batches
        sequence_ids = inputs.pop("sequence_ids")
        if self.layer_compile is not None:
            self.layer_compile.sequence_ids = sequence_ids  # its compile's BlockMask
        if self.mask_kind == "flex":
            inputs["attention_mask"] = document_block_mask(sequence_ids)
        else:
            inputs["attention_mask"] = block_causal_mask(sequence_ids, self.mask_dtype)
        return super().compute_loss(model, inputs, *args, **kwargs)
