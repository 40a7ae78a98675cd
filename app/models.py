"""Database tables. The database owns job state; the queue only carries job ids."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from app.ids import new_dataset_id, new_export_id, new_job_id, new_sample_id


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_key_id() -> str:
    return "key_" + secrets.token_hex(8)


# Who owns what when authentication is off (`finetune dev` on loopback), and the rows made
# before owners existed.
LOCAL_OWNER = "local"


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime")
        return value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON}


class JobStatus(StrEnum):
    """A job's status. Which moves between them exist, and who makes each: `app.lifecycle`."""

    QUEUED = "queued"
    RUNNING = "running"
    # stopped on request with a checkpoint of the step it reached; resume continues from there
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """Ended: succeeded, failed or cancelled (a finish time is set)."""
        return self in TERMINAL_STATUSES

    @property
    def stopped(self) -> bool:
        """No worker has it and nothing changes until a user acts (resume): paused or ended."""
        return self in STOPPED_STATUSES


TERMINAL_STATUSES = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
STOPPED_STATUSES = (JobStatus.PAUSED, *TERMINAL_STATUSES)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("owner", "idempotency_key", name="uq_jobs_owner_idempotency_key"),
        # The dispatcher's reads (app/services/scheduler.py): the heads of the unrouted queue by
        # priority and owner, and the jobs in flight on each class and for each owner.
        Index("ix_jobs_dispatch_order", "status", "routed_to", "priority", "owner", "created_at"),
        Index("ix_jobs_status_owner", "status", "owner"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=new_job_id)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[JobStatus] = mapped_column(
        Enum(JobStatus, native_enum=False, length=16, values_callable=lambda cls: [m.value for m in cls]),
        default=JobStatus.QUEUED,
        index=True,
    )
    spec: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    current_step: Mapped[int] = mapped_column(default=0)
    total_steps: Mapped[int | None]
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    pause_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # Tokens trained on so far (padding not counted), as the trainer counts them.
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger)
    # A create request that is retried finds the job its first attempt made: by the client's
    # Idempotency-Key, or else (a retry without a key) by the SHA-256 of the request.
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    # The worker training the job holds a lease it renews; an expired one means the worker died.
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(index=True)
    # When its id was last sent to the broker; the sweeper sends it again if the broker lost it.
    dispatched_at: Mapped[datetime | None]
    # Checkpoint name the next run starts from; null means from step 0.
    resume_from: Mapped[str | None] = mapped_column(String(64))
    adapter_path: Mapped[str | None] = mapped_column(Text)
    adapter_size_bytes: Mapped[int | None]
    adapter_sha256: Mapped[str | None] = mapped_column(String(64))
    # The spec's priority as a rank the dispatcher sorts on: 0 high, 1 normal, 2 low.
    priority: Mapped[int] = mapped_column(Integer, default=1)
    # What the job asks of a worker's GPUs (app/routing.py), from the pre-flight estimate:
    # bytes per GPU (null: not estimated), how many GPUs, bfloat16.
    needs_bytes: Mapped[int | None] = mapped_column(BigInteger)
    needs_gpus: Mapped[int] = mapped_column(Integer, default=1)
    needs_bf16: Mapped[bool] = mapped_column(Boolean, default=False)
    # The worker class whose queue its id was published to (app/routing.py); null while it
    # waits for the dispatcher. Kept while it runs: a class's busy workers are counted by it.
    routed_to: Mapped[str | None] = mapped_column(String(64))
    # The high-priority job this running one is pausing for (its next checkpoint); it goes back
    # in line instead of staying paused, and resumes by itself when a GPU frees.
    preempted_for: Mapped[str | None] = mapped_column(String(40))


class OwnerTurn(Base):
    """When an owner's job was last given a worker: among owners with as many jobs in flight,
    the one whose turn is longest ago goes next (app/services/scheduler.py), so owners take turns."""

    __tablename__ = "owner_turns"

    owner: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_turn_at: Mapped[datetime]


class Metric(Base):
    __tablename__ = "metrics"
    __table_args__ = (UniqueConstraint("job_id", "step", name="uq_metrics_job_step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int]
    epoch: Mapped[float | None] = mapped_column(Float)
    loss: Mapped[float | None] = mapped_column(Float)
    eval_loss: Mapped[float | None] = mapped_column(Float)
    learning_rate: Mapped[float | None] = mapped_column(Float)
    grad_norm: Mapped[float | None] = mapped_column(Float)
    tokens_per_second: Mapped[float | None] = mapped_column(Float)
    # A method's own figures at this step, by name (DPO: "rewards/chosen", "rewards/accuracies",
    # "eval_rewards/margins", …): new figures need no schema change.
    figures: Mapped[dict[str, Any] | None]
    time: Mapped[datetime] = mapped_column(default=utcnow)


class Event(Base):
    __tablename__ = "events"
    __table_args__ = (Index("ix_events_job_id_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    time: Mapped[datetime] = mapped_column(default=utcnow)
    # "state" for status changes, "message" for everything else.
    kind: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None]


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "name", name="uq_checkpoints_job_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    step: Mapped[int]
    # The zip a user downloads; the unzipped directory beside it is what resume reads.
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int]
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class DatasetStatus:
    READY = "ready"
    INVALID = "invalid"


class Dataset(Base):
    """An uploaded training file and what validating it found."""

    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=new_dataset_id)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    format: Mapped[str | None] = mapped_column(String(32))
    report: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class ApiKey(Base):
    """A key is `<id>.<secret>`; only the secret's SHA-256 is stored. The id finds the row,
    the hash is compared in constant time."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=new_key_id)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class DeliveryStatus:
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class Notification(Base):
    """A job's end, to be POSTed to its `notify_url` (an outbox: written in the same transaction
    as the final status, delivered with retries by the API's sweeper)."""

    __tablename__ = "notifications"
    __table_args__ = (Index("ix_notifications_status_next", "status", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.PENDING)
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class SampleStatus:
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    FINAL = (SUCCEEDED, FAILED)


class LeasedWork:
    """Columns of work a worker takes one at a time (samples, exports), leased as jobs are: the
    taker renews its lease while it works; the sweeper re-queues the row when it expires, or
    fails it once it has used max_attempts; one no worker took is failed, or (an export) sent
    again first (app.services.queued_work)."""

    attempts: Mapped[int] = mapped_column(default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(index=True)
    # When its id was last sent, while it waits to be taken; null once taken (or failed unsent)
    dispatched_at: Mapped[datetime | None] = mapped_column(default=utcnow, index=True)
    # Times its id was sent again because no worker took it (exports; a sample is failed instead)
    resends: Mapped[int] = mapped_column(default=0)


class Sample(LeasedWork, Base):
    """A prompt answered by a job's base model plus its adapter (or one of its checkpoints):
    `POST /jobs/{id}/generate` and the OpenAI-style `/v1/chat/completions` and `/v1/completions`.
    While it runs, `completion` holds the text so far (a stream reads it as it grows)."""

    __tablename__ = "samples"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=new_sample_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    # null: the final adapter
    checkpoint: Mapped[str | None] = mapped_column(String(64))
    # The last thing the user said, or a raw prompt's text (shown in listings)
    prompt: Mapped[str] = mapped_column(Text)
    # False: the job's base model alone answers (a base listed by /v1/models), no adapter
    adapter: Mapped[bool] = mapped_column(Boolean, default=True)
    # The conversation to answer ({"role", "content"} items), rendered as the job was trained;
    # null: `prompt` (or `prompt_ids`) is continued as it is (/v1/completions)
    messages: Mapped[list[dict[str, str]] | None] = mapped_column(JSON)
    # Token ids continued as they are, not re-tokenized (/v1/completions); `prompt` is empty then
    prompt_ids: Mapped[list[int] | None] = mapped_column(JSON)
    max_new_tokens: Mapped[int]
    temperature: Mapped[float] = mapped_column(Float)
    top_p: Mapped[float] = mapped_column(Float, default=1.0)
    stop: Mapped[list[str] | None] = mapped_column(JSON)
    seed: Mapped[int | None] = mapped_column(BigInteger)
    # The prompt's text first in `completion`, and its tokens first in `logprobs`
    echo: Mapped[bool] = mapped_column(Boolean, default=False)
    # null: no log-probabilities; k: each token's, with the k likeliest tokens in its place
    top_logprobs: Mapped[int | None]
    status: Mapped[str] = mapped_column(String(16), default=SampleStatus.QUEUED)
    completion: Mapped[str | None] = mapped_column(Text)
    # With top_logprobs: the answer's tokens (an echoed prompt's first), each
    # {"token", "logprob", "offset" (where its text starts in `completion`), "top": [[token, logprob]]}
    logprobs: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    # "stop" (the model ended its reply, or a stop string) or "length" (max_new_tokens reached)
    finish_reason: Mapped[str | None] = mapped_column(String(16))
    prompt_tokens: Mapped[int | None]
    completion_tokens: Mapped[int | None]
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]


class ExportFormat(StrEnum):
    # the base dequantized from 4-bit with the adapter merged: safetensors, config, tokenizer
    MERGED = "merged"
    # the merged model as one GGUF file (llama.cpp, Ollama, LM Studio)
    GGUF = "gguf"


class Export(LeasedWork, Base):
    """A job's adapter (or a checkpoint's) made into a model that loads without the service:
    made by `finetune sampler`'s process, downloaded with its SHA-256."""

    __tablename__ = "exports"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=new_export_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    # null: the final adapter
    checkpoint: Mapped[str | None] = mapped_column(String(64))
    format: Mapped[str] = mapped_column(String(16))
    # queued, running, succeeded or failed (SampleStatus's values)
    status: Mapped[str] = mapped_column(String(16), default=SampleStatus.QUEUED)
    path: Mapped[str | None] = mapped_column(Text)
    filename: Mapped[str | None] = mapped_column(String(255))
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]


class Worker(Base):
    """A running Celery worker as it registered itself (`worker.heartbeat`): which queue it takes
    and the GPUs it sees, renewed while it runs. The pre-flight check (`app.services.preflight`)
    measures a job spec against the GPUs of the workers seen lately."""

    __tablename__ = "workers"

    # Celery's node name: celery@host, sampler@host
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    queue: Mapped[str] = mapped_column(String(255), index=True)
    # [{"name", "memory_bytes" (what the service may use), "bf16", "capability"}]; [] on a CPU
    gpus: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    seen_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    # A training worker's class (app/routing.py), whose queue it consumes; null for a sampler.
    gpu_class: Mapped[str | None] = mapped_column(String(64))
