"""The training a job runs, top to bottom: data, model, trainer, train, adapter.

`run_training` is the one entry point: the Celery task calls it, and so do the GPU proof
and the tests.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

from app.services.runs import Claim, log_message, recorded_checkpoints
from app.settings import Settings
from app.spec import JobSpec
from app.storage import JobFiles
from worker.doctor import unsupported_gpus
from worker.training.artifacts import ZipInfo, write_model_card, zip_directory
from worker.training.callbacks import FollowerCallback, JobProgressCallback
from worker.training.data import IGNORE_INDEX, TrainingData, build_eval_data, build_training_data
from worker.training.model import compute_dtype, load_quantized_lora_model, load_tokenizer
from worker.training.packing import (
    PackedData,
    block_causal_mask,
    collate_packed,
    plan_full_rows,
    plan_steps,
)
from worker.training.speed import (
    SpeedPlan,
    accept_bnb_adam_state,
    apply_speed_plan,
    document_block_mask,
    optimizer_name,
    plan_speed,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    # None: trained to the end; else why it stopped early (callbacks.CANCEL, PAUSE or SHUTDOWN;
    # a pause or a shutdown saved a checkpoint of the step it stopped at)
    stopped: str | None
    adapter: ZipInfo | None
    summary: dict[str, Any]


def _warmup(ratio: float) -> dict[str, Any]:
    # transformers 5 dropped warmup_ratio: a float warmup_steps below 1 is read as a ratio.
    if "warmup_ratio" in inspect.signature(TrainingArguments.__init__).parameters:
        return {"warmup_ratio": ratio}
    return {"warmup_steps": ratio}


def world_size() -> int:
    """Processes training this job together (torchrun sets WORLD_SIZE; 1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


FULL_ROWS = "full_rows"


def packing_mode(spec: JobSpec) -> str:
    """`per_step` (the default: each optimizer step packs the recipe's batch_size ×
    gradient_accumulation_steps samples) or `full_rows` (rows filled to max_seq_length;
    a step is gradient_accumulation_steps micro-batches of batch_size full rows)."""
    return FULL_ROWS if spec.training.packing_mode == FULL_ROWS else "per_step"


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
        include_num_input_tokens_seen="non_padding",
        seed=t.seed,
        data_seed=t.seed,
        report_to="none",
        disable_tqdm=True,
        ddp_find_unused_parameters=False if world_size() > 1 else None,
        **_warmup(t.warmup_ratio),
    )


def run_training(claim: Claim, settings: Settings, stop: threading.Event | None = None) -> Outcome:
    job_id = claim.job_id
    spec = JobSpec.model_validate(claim.spec)
    files = JobFiles(settings.job_dir(job_id))
    # Rank 0 of a data-parallel run (or the only process) talks to the database and owns the files.
    main = int(os.environ.get("RANK", "0")) == 0
    leftovers = files.remove_unrecorded(recorded_checkpoints(job_id)) if main else []
    if leftovers:
        log_message(job_id, f"removed {len(leftovers)} incomplete checkpoint files", files=leftovers)
    set_seed(spec.training.seed)
    unsupported = unsupported_gpus()
    if unsupported:
        raise RuntimeError("; ".join(unsupported))

    started = time.perf_counter()
    tokenizer = load_tokenizer(spec.base_model)
    data = build_training_data(spec.dataset, tokenizer, spec.training.max_seq_length)
    eval_data = build_eval_data(spec.dataset, tokenizer, spec.training.max_seq_length)
    eval_samples = len(eval_data) if eval_data else 0
    say = log_message if main else _quiet
    say(
        job_id,
        f"data ready: {len(data)} training samples, {eval_samples} validation samples",
        samples=len(data),
        eval_samples=eval_samples,
        truncated=data.truncated,
        dropped=data.dropped,
    )
    dtype = compute_dtype(spec.quantization)
    model = load_quantized_lora_model(spec, dtype)
    t = spec.training
    speed = plan_speed(
        model.config, t.batch_size * t.max_seq_length, t.gradient_checkpointing, packed=t.packing
    )
    apply_speed_plan(model, speed)
    if torch.cuda.is_available():
        say(job_id, f"training step: {speed.describe()}", speed=dataclasses.asdict(speed))
    log.info("job %s: data and model ready in %.1f s", job_id, time.perf_counter() - started)

    progress: JobProgressCallback | FollowerCallback = (
        JobProgressCallback(claim, files, settings.flush_interval_s, stop or threading.Event())
        if main
        else FollowerCallback()
    )
    args = training_arguments(spec, files.output_dir, dtype, evaluate=eval_data is not None, speed=speed)
    if spec.training.packing:
        full_rows = packing_mode(spec) == FULL_ROWS
        per_process = t.batch_size * t.gradient_accumulation_steps // world_size()
        train_set, eval_set = _packed(data, spec, per_process, full_rows), None
        if eval_data is not None:
            eval_set = _packed(eval_data, spec, t.batch_size)
        what = (
            f"micro-batches of {t.batch_size} full rows" if full_rows else f"items of {per_process} samples"
        )
        say(
            job_id,
            f"packed {len(data)} samples into {len(train_set)} {what} "
            f"for {world_size()} process(es): {train_set.mean_samples_per_step:.2f} samples per item, "
            f"{train_set.fill:.1%} of computed tokens real",
            steps=len(train_set),
            samples_per_step=round(train_set.mean_samples_per_step, 3),
            fill=round(train_set.fill, 4),
        )
        packed = PackedTrainer(
            model=model,
            args=args,
            train_dataset=train_set,
            eval_dataset=eval_set,
            data_collator=partial(
                collate_packed, pad_token_id=tokenizer.pad_token_id, row_multiple=speed.row_multiple
            ),
            processing_class=tokenizer,
            callbacks=[progress],
        )
        packed.mask_dtype = dtype if torch.cuda.is_available() else torch.float32
        packed.mask_kind = speed.mask
        trainer: Trainer = packed
    else:
        trainer = ServiceTrainer(
            model=model,
            args=args,
            train_dataset=data,
            eval_dataset=eval_data,
            data_collator=DataCollatorForSeq2Seq(
                tokenizer, label_pad_token_id=IGNORE_INDEX, padding="longest"
            ),
            processing_class=tokenizer,
            callbacks=[progress],
        )
    resume_dir = files.checkpoint_dir(claim.resume_from) if claim.resume_from else None
    if resume_dir is not None and not resume_dir.is_dir():
        raise FileNotFoundError(f"checkpoint {claim.resume_from} is missing on disk")
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir else None)
    finally:
        progress.close()

    summary = {
        "steps": trainer.state.global_step,
        "final_train_loss": _last(trainer.state.log_history, "loss"),
        "final_eval_loss": _last(trainer.state.log_history, "eval_loss"),
        "train_loss_mean": round(result.training_loss, 4),
    }
    if progress.stopped is not None:
        return Outcome(progress.stopped, adapter=None, summary=summary)
    saved = files.adapter_dir.with_name("adapter.new")
    if main:
        shutil.rmtree(saved, ignore_errors=True)
    trainer.save_model(str(saved))  # every rank takes part; rank 0 writes
    if not main:
        return Outcome(stopped=None, adapter=None, summary=summary)
    adapter = _save_adapter(saved, spec, job_id, files, summary)
    return Outcome(stopped=None, adapter=adapter, summary=summary)


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
    sample-diagonal causal mask on the model's device."""

    mask_dtype: torch.dtype = torch.float32
    mask_kind: str = "sdpa"  # "flex": a FlexAttention BlockMask (worker.training.speed)

    def compute_loss(self, model, inputs, *args, **kwargs):
        inputs = dict(inputs)
        sequence_ids = inputs.pop("sequence_ids")
        if self.mask_kind == "flex":
            inputs["attention_mask"] = document_block_mask(sequence_ids)
        else:
            inputs["attention_mask"] = block_causal_mask(sequence_ids, self.mask_dtype)
        return super().compute_loss(model, inputs, *args, **kwargs)


def _last(history: list[dict[str, Any]], key: str) -> float | None:
    return next((entry[key] for entry in reversed(history) if key in entry), None)


def _quiet(*_: Any, **__: Any) -> None:
    pass


def _save_adapter(saved: Path, spec: JobSpec, job_id: str, files: JobFiles, summary: dict) -> ZipInfo:
    """`saved` (adapter weights, adapter config, tokenizer files) becomes the job's adapter."""
    shutil.rmtree(files.adapter_dir, ignore_errors=True)
    saved.rename(files.adapter_dir)
    write_model_card(files.adapter_dir, spec.model_dump(mode="json"), job_id, summary)
    return zip_directory(files.adapter_dir, files.adapter_zip)
