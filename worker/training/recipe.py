"""The training a job runs, in stages read top to bottom: setup → data → model → trainer → train
→ save.

`run_training` is the one entry point: the Celery task calls it, so does each rank of a
data-parallel job (worker.training.distributed), the GPU proof and the tests. Each stage is one
function below, handing the next what it holds (`JobSetup`, `JobData`, `JobModel`, the Trainer,
the summary). What the trainer stage builds from (TrainingArguments, packed data, the Trainer
subclasses) is in worker.training.trainer; every path of the job's folder is in app.storage.
"""

from __future__ import annotations

import dataclasses
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

from app.services import runs
from app.services.lineage import init_adapter_dir
from app.services.runs import SHUTDOWN, Claim, log_message, recorded_checkpoints
from app.settings import Settings
from app.spec import JobSpec
from app.storage import JobFiles, job_files
from worker.doctor import unsupported_gpus
from worker.training.artifacts import ZipInfo, name_the_base, write_model_card, zip_directory
from worker.training.callbacks import FollowerCallback, JobProgressCallback
from worker.training.compile_cache import use_compile_cache
from worker.training.data import IGNORE_INDEX, TrainingData, build_eval_data, build_training_data
from worker.training.dpo import REFERENCE_ADAPTER, DpoTrainer, collate_pair_step, pack_pairs
from worker.training.fused_loss import use_hidden_states_head
from worker.training.layer_compile import LayerCompile
from worker.training.model import compute_dtype, load_quantized_lora_model, load_tokenizer
from worker.training.packing import collate_step
from worker.training.preference_data import PairData, build_eval_pair_data, build_pair_data
from worker.training.speed import SpeedPlan, apply_speed_plan, for_dpo, job_step_graphs, plan_speed
from worker.training.tracking import tracking

# Also imported from here by bench/ and tests (their home before the trainer stage moved out).
from worker.training.trainer import (
    FULL_ROWS,
    PackedTrainer,
    ServiceTrainer,
    _packed,
    packing_mode,
    training_arguments,
    world_size,
)

log = logging.getLogger(__name__)

Progress = JobProgressCallback | FollowerCallback


@dataclass(frozen=True)
class Outcome:
    # None: trained to the end; else why it stopped early (callbacks.CANCEL, PAUSE or SHUTDOWN;
    # a pause or a shutdown saved a checkpoint of the step it stopped at)
    stopped: str | None
    adapter: ZipInfo | None
    summary: dict[str, Any]


def run_training(claim: Claim, settings: Settings, stop: threading.Event | None = None) -> Outcome:
    """Train `claim`'s job to its end, or until a cancel, a pause or `stop` (a worker shutdown):
    asked while the job loads, they are taken before the next stage, and it doesn't train."""
    job = set_up(claim, settings)
    started = time.perf_counter()
    data = load_data(job)
    if stopped := _asked_to_stop(job, stop):
        return Outcome(stopped, adapter=None, summary={"steps": 0, "trained": False})
    model = load_model(job)
    if stopped := _asked_to_stop(job, stop):
        return Outcome(stopped, adapter=None, summary={"steps": 0, "trained": False})
    log.info("job %s: data and model ready in %.1f s", job.id, time.perf_counter() - started)
    progress = progress_callback(job, settings.flush_interval_s, stop)
    trainer = build_trainer(job, data, model, progress)
    with tracking(job.claim, settings, job.files.root, job.main) as tracker:  # the spec's integrations
        summary = train(job, trainer, progress)
        if progress.stopped is not None:
            return Outcome(progress.stopped, adapter=None, summary=summary)
        adapter = save(job, trainer, summary)
        if adapter is not None:
            tracker.log_adapter(adapter.path)
    return Outcome(stopped=None, adapter=adapter, summary=summary)


def _asked_to_stop(job: JobSetup, stop: threading.Event | None) -> str | None:
    """A cancel or pause the owner asked for, or a worker shutdown, while the job loaded (one
    process only: the ranks of a data-parallel job take it together, at the first step)."""
    if world_size() > 1:
        return None
    if stop is not None and stop.is_set():
        return SHUTDOWN
    return runs.requested_stop(job.claim)


# setup


@dataclass(frozen=True)
class JobSetup:
    """What every stage works from: the claim, its spec, the job's files, and whether this is the
    main process (rank 0 of a data-parallel run, or the only process), the one that talks to the
    database and owns the files."""

    claim: Claim
    spec: JobSpec
    files: JobFiles
    main: bool
    # where compiled layers are kept between jobs (worker.training.compile_cache)
    compile_cache: Path

    @property
    def id(self) -> str:
        return self.claim.job_id

    def say(self, message: str, **data: Any) -> None:
        """Add an event to the job's (from the main process only)."""
        if self.main:
            log_message(self.id, message, **data)


def set_up(claim: Claim, settings: Settings) -> JobSetup:
    """The job's JobSetup. Before training: removes checkpoint files a kill left unrecorded,
    seeds every generator, and fails on GPUs this build cannot run on."""
    main = int(os.environ.get("RANK", "0")) == 0
    job = JobSetup(
        claim, claim.spec, job_files(claim.job_id, settings), main, settings.data_dir / "compile-cache"
    )
    leftovers = job.files.remove_unrecorded(recorded_checkpoints(job.id)) if main else []
    if leftovers:
        log_message(job.id, f"removed {len(leftovers)} incomplete checkpoint files", files=leftovers)
    set_seed(job.spec.training.seed)
    unsupported = unsupported_gpus()
    if unsupported:
        raise RuntimeError("; ".join(unsupported))
    return job


# data


@dataclass(frozen=True)
class JobData:
    """The tokenizer and the job's tokenized samples (`eval`: None when the spec names none)."""

    tokenizer: Any
    train: TrainingData | PairData  # preference pairs for a DPO job
    eval: TrainingData | PairData | None


def load_data(job: JobSetup) -> JobData:
    """Tokenizes the job's training and validation samples (a DPO job's preference pairs), and
    says how many there are."""
    spec = job.spec
    tokenizer = load_tokenizer(spec.base_model)
    if spec.dpo is not None:
        return _load_pairs(job, tokenizer)
    train_data = build_training_data(spec.dataset, tokenizer, spec.training.max_seq_length)
    eval_data = build_eval_data(spec.dataset, tokenizer, spec.training.max_seq_length)
    eval_samples = len(eval_data) if eval_data else 0
    job.say(
        f"data ready: {len(train_data)} training samples, {eval_samples} validation samples",
        samples=len(train_data),
        eval_samples=eval_samples,
        truncated=train_data.truncated,
        dropped=train_data.dropped,
    )
    return JobData(tokenizer, train_data, eval_data)


def _load_pairs(job: JobSetup, tokenizer: Any) -> JobData:
    spec = job.spec
    train_pairs = build_pair_data(spec.dataset, tokenizer, spec.training.max_seq_length)
    eval_pairs = build_eval_pair_data(spec.dataset, tokenizer, spec.training.max_seq_length)
    eval_count = len(eval_pairs) if eval_pairs else 0
    job.say(
        f"data ready: {len(train_pairs)} preference pairs, {eval_count} validation pairs",
        pairs=len(train_pairs),
        eval_pairs=eval_count,
        truncated=train_pairs.truncated,
        dropped=train_pairs.dropped,
    )
    return JobData(tokenizer, train_pairs, eval_pairs)


# model


@dataclass(frozen=True)
class JobModel:
    """The 4-bit base model with its LoRA layers, the dtype it computes in, and the speed plan
    (worker.training.speed) applied to it."""

    model: Any
    dtype: torch.dtype
    speed: SpeedPlan
    # DPO: lm_head taken out of the forward (worker.training.dpo scores completion tokens with
    # it; None: the model's own logits), and the frozen reference adapter's name (None: the base)
    head: torch.nn.Linear | None = None
    reference_adapter: str | None = None
    # the layers compiling beside the first steps (worker.training.layer_compile), or None
    layer_compile: LayerCompile | None = None


def load_model(job: JobSetup) -> JobModel:
    """Loads the model (from the adapter the job continues from, if any) and applies the speed
    plan for the job's shapes (said on a GPU)."""
    spec = job.spec
    dtype = compute_dtype(spec.quantization)
    init = init_adapter_dir(spec.init_from) if spec.init_from else None
    reference = REFERENCE_ADAPTER if spec.dpo is not None and _reference_is_init(job) else None
    model = load_quantized_lora_model(spec, dtype, init, reference)
    if init is not None and spec.init_from is not None:
        job.say(f"training continues from {spec.init_from.job} ({init.name})", init_from=init.name)
    t = spec.training
    speed = plan_speed(
        model.config,
        t.batch_size * t.max_seq_length,
        t.gradient_checkpointing,
        packed=t.packing,
        processes=world_size(),
        # a DPO step is its own (two forwards and the pairs' loss), not one graph of the Trainer's
        graphs=False if spec.dpo is not None else None,
    )
    if spec.dpo is not None:
        for_dpo(speed)
    if speed.compile_layers:
        speed.notes.append(
            f"compiled layers kept in {use_compile_cache(job.compile_cache, model.config).name}"
        )
    layer_compile = apply_speed_plan(model, speed)
    if layer_compile is not None:
        layer_compile.say = job.say
    head = use_hidden_states_head(model) if spec.dpo is not None else None
    if torch.cuda.is_available():
        job.say(f"training step: {speed.describe()}", speed=dataclasses.asdict(speed))
    return JobModel(model, dtype, speed, head, reference, layer_compile)


def _reference_is_init(job: JobSetup) -> bool:
    """Whether a DPO job's reference is the adapter it continues from (else: the base)."""
    settings = job.spec.dpo
    if settings is None or job.spec.init_from is None:
        return False
    return settings.reference in ("auto", "init")


# trainer


def progress_callback(job: JobSetup, flush_interval_s: float, stop: threading.Event | None) -> Progress:
    """The main process's callback streams metrics, zips and records checkpoints and stops the
    training on a cancel, a pause or `stop`; other ranks' follow its decisions."""
    if job.main:
        return JobProgressCallback(job.claim, job.files, flush_interval_s, stop or threading.Event())
    return FollowerCallback()


def build_trainer(job: JobSetup, data: JobData, model: JobModel, progress: Progress) -> Trainer:
    """The Trainer for the job: its arguments, and its samples packed (the default) or padded."""
    args = training_arguments(
        job.spec, job.files.output_dir, model.dtype, evaluate=data.eval is not None, speed=model.speed
    )
    if job.spec.dpo is not None:
        return _dpo_trainer(job, data, model, args, progress)
    if job.spec.training.packing:
        return _packed_trainer(job, data, model, args, progress)
    return ServiceTrainer(
        model=model.model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=DataCollatorForSeq2Seq(
            data.tokenizer, label_pad_token_id=IGNORE_INDEX, padding="longest"
        ),
        processing_class=data.tokenizer,
        callbacks=[progress],
    )


def _packed_trainer(
    job: JobSetup, data: JobData, model: JobModel, args: TrainingArguments, progress: Progress
) -> PackedTrainer:
    """A PackedTrainer over the samples packed into items (worker.training.packing), said."""
    spec, t = job.spec, job.spec.training
    full_rows = packing_mode(spec) == FULL_ROWS
    per_process = t.batch_size * t.gradient_accumulation_steps // world_size()
    assert isinstance(data.train, TrainingData)  # a supervised job's samples
    train_set, eval_set = _packed(data.train, spec, per_process, full_rows), None
    if isinstance(data.eval, TrainingData):
        eval_set = _packed(data.eval, spec, t.batch_size)
    what = f"micro-batches of {t.batch_size} full rows" if full_rows else f"items of {per_process} samples"
    fill = train_set.fill_of(model.speed.one_row, model.speed.row_multiple)
    job.say(
        f"packed {len(data.train)} samples into {len(train_set)} {what} "
        f"for {world_size()} process(es): {train_set.mean_samples_per_step:.2f} samples per item"
        + (", each item's rows as one row" if model.speed.one_row else "")
        + f", {fill:.1%} of computed tokens real",
        steps=len(train_set),
        samples_per_step=round(train_set.mean_samples_per_step, 3),
        fill=round(fill, 4),
    )
    trainer = PackedTrainer(
        model=model.model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=partial(
            collate_step,
            pad_token_id=data.tokenizer.pad_token_id,
            row_multiple=model.speed.row_multiple,
            one_row=model.speed.one_row,
        ),
        processing_class=data.tokenizer,
        callbacks=[progress],
    )
    trainer.mask_dtype = model.dtype if torch.cuda.is_available() else torch.float32
    trainer.mask_kind = model.speed.mask
    if model.layer_compile is not None:  # eager, the dense mask, until it switches them
        trainer.layer_compile, trainer.mask_kind = model.layer_compile, "sdpa"
    elif model.speed.graphs:
        trainer.step_graphs = job_step_graphs()
    return trainer


def _dpo_trainer(
    job: JobSetup, data: JobData, model: JobModel, args: TrainingArguments, progress: Progress
) -> DpoTrainer:
    """A DpoTrainer over the pairs packed into steps (worker.training.dpo), said."""
    spec, t = job.spec, job.spec.training
    assert isinstance(data.train, PairData) and spec.dpo is not None
    per_step = t.batch_size * t.gradient_accumulation_steps // world_size()
    train_set = pack_pairs(data.train.pairs, per_step, t.batch_size, t.max_seq_length, t.seed)
    eval_set = None
    if isinstance(data.eval, PairData):
        eval_set = pack_pairs(data.eval.pairs, per_step, t.batch_size, t.max_seq_length, t.seed)
    micro_batches = sum(len(step.micro_batches) for step in train_set.steps)
    fill = train_set.fill
    job.say(
        f"packed {len(data.train)} pairs into {len(train_set)} steps of {per_step} pairs "
        f"({micro_batches / max(1, len(train_set)):.2f} micro-batches of at most {t.batch_size} rows a step) "
        f"for {world_size()} process(es), {train_set.shared_share:.0%} of pairs with their prompt computed "
        f"once: {fill:.1%} of computed tokens real; reference: "
        + ("the adapter it continues from, frozen" if model.reference_adapter else "the base (adapter off)"),
        steps=len(train_set),
        micro_batches=micro_batches,
        fill=round(fill, 4),
        shared_prompt=round(train_set.shared_share, 4),
    )
    trainer = DpoTrainer(
        model=model.model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=partial(
            collate_pair_step, pad_token_id=data.tokenizer.pad_token_id, row_multiple=model.speed.row_multiple
        ),
        processing_class=data.tokenizer,
        callbacks=[progress],
        settings=spec.dpo,
        head=model.head,
        reference_adapter=model.reference_adapter,
    )
    trainer.mask_dtype = model.dtype if torch.cuda.is_available() else torch.float32
    trainer.mask_kind = model.speed.mask
    return trainer


# train


def train(job: JobSetup, trainer: Trainer, progress: Progress) -> dict[str, Any]:
    """Trains (from the claim's checkpoint when it resumes one) and returns the run's summary:
    steps, the last training and validation losses, the mean training loss."""
    resume_from = job.claim.resume_from
    resume_dir = job.files.unzipped_checkpoint(resume_from, job.claim.resume_sha256) if resume_from else None
    if resume_dir is not None and not resume_dir.is_dir():
        raise FileNotFoundError(f"checkpoint {resume_from} is missing on disk")
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir else None)
    finally:
        progress.close()
        layer_compile = getattr(trainer, "layer_compile", None)
        if layer_compile is not None and job.main:
            layer_compile.close()
    graphs = getattr(trainer, "step_graphs", None)
    if graphs is not None and job.main:
        job.say(graphs.describe(), **graphs.stats())
    history = trainer.state.log_history
    return {
        "steps": trainer.state.global_step,
        "final_train_loss": _last(history, "loss"),
        "final_eval_loss": _last(history, "eval_loss"),
        "train_loss_mean": round(result.training_loss, 4),
    }


def _last(history: list[dict[str, Any]], key: str) -> float | None:
    return next((entry[key] for entry in reversed(history) if key in entry), None)


# save


def save(job: JobSetup, trainer: Trainer, summary: dict[str, Any]) -> ZipInfo | None:
    """Saves the trained adapter (every rank takes part, rank 0 writes) and, on the main process,
    makes it the job's adapter; returns its zip (None on other ranks)."""
    staged = job.files.adapter_staging_dir
    if job.main:
        shutil.rmtree(staged, ignore_errors=True)
    trainer.save_model(str(staged))
    if not job.main:
        return None
    return _publish_adapter(staged, job, summary)


def _publish_adapter(staged: Path, job: JobSetup, summary: dict[str, Any]) -> ZipInfo:
    """`staged` (adapter weights, adapter config, tokenizer files) becomes the job's adapter,
    with its model card, and is zipped."""
    files = job.files
    shutil.rmtree(files.adapter_dir, ignore_errors=True)
    staged.rename(files.adapter_dir)
    name_the_base(files.adapter_dir, job.spec.base_model)
    write_model_card(files.model_card, job.spec.model_dump(mode="json"), job.id, summary)
    adapter = zip_directory(files.adapter_dir, files.adapter_zip)
    files.store.put(adapter.path)  # whole in the store before the job's row records it
    return adapter
