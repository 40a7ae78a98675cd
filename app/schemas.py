"""What the API sends and receives (apart from the job spec, in app.spec)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, computed_field, field_validator

from app.ids import CHECKPOINT_NAME
from app.lifecycle import JobAction, allowed_actions
from app.models import ExportFormat, JobStatus
from app.spec import stored_spec

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[T]
    next: str | None = Field(None, description="Cursor for the next page; null on the last.")


class ErrorBody(BaseModel):
    """Every error response: a stable code and what went wrong. For 422, `detail` is a list of
    {"field", "message", "type"}."""

    error: str = Field(description="A stable code, e.g. `job_not_found`, `validation_error`.")
    detail: Any = Field(description="For a person: a sentence, or for 422 the list of bad fields.")


# Why each documented error status is answered (the OpenAI-compatible routes reuse these).
ERROR_REASONS = {
    401: "No valid API key.",
    404: "No such thing, or not yours.",
    409: "The job's state does not allow this.",
    413: "Request body too large.",
    422: "Invalid input; `detail` lists each field and why.",
    429: "Too many queued jobs for this owner.",
    503: "The database or the broker did not answer; nothing was changed.",
}


def error_responses(body: type[BaseModel], reasons: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """FastAPI's `responses=` documenting each status with its body model and reason."""
    return {status: {"model": body, "description": reason} for status, reason in reasons.items()}


ERROR_RESPONSES = error_responses(ErrorBody, ERROR_REASONS)


class _FromRow(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class JobRead(_FromRow):
    id: str
    owner: str
    status: JobStatus
    spec: dict[str, Any] = Field(description="The job spec, every field written out.")
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    current_step: int
    total_steps: int | None
    error: str | None
    attempts: int
    cancel_requested: bool
    pause_requested: bool
    resume_from: str | None
    trained_tokens: int | None = Field(description="Tokens trained on so far, padding not counted.")
    adapter_sha256: str | None
    adapter_size_bytes: int | None
    queue_position: int | None = Field(
        None,
        description="A queued job's place in line (1: next, 0: on its way to a worker); shown by "
        "GET /jobs/{id} only.",
    )
    waiting_for: str | None = Field(
        None, description="What a queued job waits for, as a sentence; shown by GET /jobs/{id} only."
    )

    @field_validator("spec")
    @classmethod
    def _through_job_spec(cls, stored: dict[str, Any]) -> dict[str, Any]:
        """The stored spec as JobSpec reads it: a field an older row lacks shows the value the
        job trains with (app/spec.py's default), not nothing."""
        return stored_spec(stored).model_dump(mode="json")

    # mypy can't type a decorator over @property; pydantic's docs give this ignore for computed_field
    @computed_field(  # type: ignore[prop-decorator]
        description="What the owner may do now: `pause`, `cancel`, `resume` (app/lifecycle.py)."
    )
    @property
    def actions(self) -> list[JobAction]:
        return allowed_actions(
            self.status, pause_requested=self.pause_requested, cancel_requested=self.cancel_requested
        )


class MetricRead(_FromRow):
    step: int
    epoch: float | None
    loss: float | None
    eval_loss: float | None
    learning_rate: float | None
    grad_norm: float | None
    tokens_per_second: float | None
    # The method's own figures at this step, named as it names them (DPO: "rewards/margins",
    # "eval_rewards/accuracies", …); None for a method that has none (supervised).
    figures: dict[str, float] | None
    time: datetime


class EventRead(_FromRow):
    id: int
    time: datetime
    kind: str
    message: str
    data: dict[str, Any] | None


class CheckpointRead(_FromRow):
    name: str
    step: int
    size_bytes: int
    sha256: str
    created_at: datetime


class ExportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: ExportFormat = Field(
        description="merged: the base dequantized from 4-bit with the adapter merged in "
        "(safetensors, config, tokenizer; loads with transformers alone); gguf: that model as "
        "one GGUF file (llama.cpp, Ollama)."
    )
    checkpoint: str | None = Field(
        None, pattern=CHECKPOINT_NAME.pattern, max_length=32, description="Default: the final adapter."
    )


class ExportRead(_FromRow):
    id: str
    job_id: str
    checkpoint: str | None
    format: str
    status: str = Field(description="queued, running, succeeded or failed.")
    filename: str | None = Field(description="What the download is saved as.")
    size_bytes: int | None
    sha256: str | None = Field(description="Of the file GET …/download serves.")
    error: str | None
    created_at: datetime
    finished_at: datetime | None


class DatasetRead(_FromRow):
    id: str
    filename: str
    size_bytes: int
    sha256: str
    status: str
    format: str | None
    report: dict[str, Any] = Field(
        description="format, records, messages, trees, languages, samples, dropped, problems "
        "(each with its line), valid, and `tokens` (length statistics, filled in by a worker)."
    )
    created_at: datetime


class ResumeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: str | None = Field(
        None, pattern=CHECKPOINT_NAME.pattern, max_length=32, description="Default: the latest checkpoint."
    )


class SampleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=8000, description="What the Human says.")
    checkpoint: str | None = Field(
        None,
        pattern=CHECKPOINT_NAME.pattern,
        max_length=32,
        description="Default: the final adapter, or the latest checkpoint while the job runs.",
    )
    max_new_tokens: int = Field(128, ge=1, le=2048)
    temperature: float = Field(0.0, ge=0, le=2, description="0 answers greedily.")
    top_p: float = Field(1.0, gt=0, le=1, description="Sample from the smallest set of tokens this likely.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="The same seed, the same answer.")
    wait_s: float | None = Field(
        None, ge=0, le=300, description="How long to wait for the answer before a 202 (default 60 s)."
    )


class SampleRead(_FromRow):
    id: str
    job_id: str
    checkpoint: str | None = Field(description="null: the final adapter.")
    prompt: str
    adapter: bool = Field(description="false: the job's base model alone answered.")
    messages: list[dict[str, str]] | None = Field(
        description="The conversation answered; null: `prompt` (or `prompt_ids`) continued as it is."
    )
    prompt_ids: list[int] | None = Field(None, description="Token ids continued as they are.")
    max_new_tokens: int
    temperature: float
    top_p: float
    stop: list[str] | None
    seed: int | None
    echo: bool = Field(False, description="The prompt comes first in `completion` and `logprobs`.")
    top_logprobs: int | None = Field(
        None, description="null: no logprobs; k: each token's with the k likeliest in its place."
    )
    status: str = Field(description="queued, running, succeeded or failed.")
    completion: str | None = Field(description="The answer; while running, the text so far.")
    logprobs: list[dict[str, Any]] | None = Field(
        None,
        description='Each token: {"token", "logprob" (null for an echoed first token), "offset" (in '
        '`completion`), "top": [[token, logprob], …]}.',
    )
    finish_reason: str | None = Field(description="stop (the model ended, or a stop string) or length.")
    prompt_tokens: int | None
    completion_tokens: int | None
    error: str | None
    created_at: datetime
    finished_at: datetime | None


class GpuRead(BaseModel):
    worker: int = Field(description="Which registered worker (numbered from 1) has this GPU.")
    name: str
    memory_gib: float = Field(description="What the service may use of it.")
    bf16: bool
    holds_job: bool | None = Field(description="Holds the spec's estimate (null: not estimated).")


class FieldProblem(BaseModel):
    field: str
    message: str


class PreflightRead(BaseModel):
    """Whether a spec fits the registered workers' GPUs; POST /jobs refuses it exactly when
    `problems` is not empty."""

    fits: bool | None = Field(description="null: not checked (no worker registered, or no estimate).")
    needs_gib: float | None = Field(description="GPU memory the job needs: the peak, fragmentation, CUDA.")
    peak_allocated_gib: float | None = Field(description="What PyTorch's allocator holds at the peak.")
    micro_batch: str | None = Field(description="The largest micro-batch, e.g. '4 × 2048 tokens'.")
    parts_gib: dict[str, float] | None = Field(description="The peak allocation, by what it holds.")
    workers: int = Field(description="Live workers that take jobs.")
    gpus: list[GpuRead]
    problems: list[FieldProblem]
    notes: list[str]
