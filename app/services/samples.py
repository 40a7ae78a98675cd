"""Samples: a prompt answered by a job's base model plus its adapter or a checkpoint. The
API stores the request and sends its id to `finetune sampler`, which writes the answer."""

from __future__ import annotations

from sqlalchemy import select, update

from app.db import changed_rows, session_scope
from app.errors import BrokerUnavailable, CheckpointNotFound, JobStateConflict, SampleNotFound
from app.models import Checkpoint, Sample, SampleStatus, utcnow
from app.queue import enqueue_sample
from app.schemas import SampleRead, SampleRequest
from app.services.jobs import owned_job


def create_sample(job_id: str, owner: str, request: SampleRequest) -> SampleRead:
    with session_scope() as session:
        job = owned_job(session, job_id, owner)
        checkpoints = list(
            session.scalars(
                select(Checkpoint.name).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)
            )
        )
        if request.checkpoint is not None and request.checkpoint not in checkpoints:
            raise CheckpointNotFound(f"job {job_id} has no checkpoint {request.checkpoint!r}")
        checkpoint = request.checkpoint
        if checkpoint is None and not job.adapter_path:
            if not checkpoints:
                raise JobStateConflict(
                    f"job is {job.status} and has no adapter or checkpoint yet; nothing to sample from"
                )
            checkpoint = checkpoints[-1]
        sample = Sample(
            job_id=job_id,
            checkpoint=checkpoint,
            prompt=request.prompt,
            max_new_tokens=request.max_new_tokens,
            temperature=request.temperature,
        )
        session.add(sample)
        session.flush()
        read = SampleRead.model_validate(sample)
    try:
        enqueue_sample(read.id)
    except BrokerUnavailable as exc:
        finish_sample(read.id, error=str(exc))
        raise
    return read


def get_sample(job_id: str, sample_id: str, owner: str) -> SampleRead:
    with session_scope() as session:
        owned_job(session, job_id, owner)
        sample = session.get(Sample, sample_id)
        if sample is None or sample.job_id != job_id:
            raise SampleNotFound(f"job {job_id} has no sample {sample_id!r}")
        return SampleRead.model_validate(sample)


def start_sample(sample_id: str) -> Sample | None:
    """The sampler takes a queued sample (None if it is gone or already taken)."""
    with session_scope() as session:
        taken = changed_rows(
            session,
            update(Sample)
            .where(Sample.id == sample_id, Sample.status == SampleStatus.QUEUED)
            .values(status=SampleStatus.RUNNING),
        )
        if not taken:
            return None
        sample = session.get(Sample, sample_id)
        session.expunge(sample)
        return sample


def finish_sample(sample_id: str, *, completion: str | None = None, error: str | None = None) -> None:
    status = SampleStatus.FAILED if error is not None else SampleStatus.SUCCEEDED
    with session_scope() as session:
        session.execute(
            update(Sample)
            .where(Sample.id == sample_id)
            .values(status=status, completion=completion, error=error, finished_at=utcnow())
        )
