"""Samples: a prompt answered by a job's base model plus its adapter or a checkpoint. The
API stores the request and sends its id to `finetune sampler`, which writes the answer (and,
while it generates, the text so far). `POST /jobs/{id}/generate` and the OpenAI-style
completions (app/api/openai/inference.py) are both made here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from annotated_types import Le
from sqlalchemy import or_, select

from app.db import session_scope
from app.errors import CheckpointNotFound, JobStateConflict, SampleNotFound
from app.models import Checkpoint, Job, Sample
from app.queue import enqueue_sample
from app.schemas import CheckpointRead, JobRead, SampleRead, SampleRequest
from app.services import queued_work
from app.services.jobs import checkpoint_names, owned_job
from app.services.queued_work import Lease
from app.settings import get_settings

# How long past its caller's deadline a sample may still wait to be taken: the caller's wait
# starts after the row is written, and API hosts' clocks may differ a little.
UNTAKEN_MARGIN_S = 60.0


@dataclass(frozen=True)
class Prompt:
    """What to answer: a conversation (`{"role", "content"}` items), rendered as the job was
    trained, or a raw text or token ids continued as they are; how to sample the answer; and
    whether to give log-probabilities (of the answer's tokens, and with `echo` the prompt's)."""

    messages: list[dict[str, str]] | None
    text: str | None = None
    ids: list[int] | None = None
    checkpoint: str | None = None
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] | None = None
    seed: int | None = None
    adapter: bool = True  # False: the job's base model alone answers
    echo: bool = False  # the prompt first, in the text and the logprobs
    top_logprobs: int | None = None  # None: no logprobs; k: each token's k likeliest alternatives

    @classmethod
    def from_request(cls, request: SampleRequest) -> Prompt:
        return cls(
            messages=[{"role": "user", "content": request.prompt}],
            checkpoint=request.checkpoint,
            max_new_tokens=request.max_new_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
        )


def create_sample(job_id: str, owner: str, request: SampleRequest | Prompt) -> SampleRead:
    prompt = Prompt.from_request(request) if isinstance(request, SampleRequest) else request
    return create_samples(job_id, owner, [prompt])[0]


def create_samples(job_id: str, owner: str, prompts: Sequence[Prompt]) -> list[SampleRead]:
    """One sample per prompt (several prompts of one OpenAI request), written together, then
    sent in order. If the broker stops answering midway, the sample it refused fails with the
    reason and the error is raised; those after it were never sent, and the sweeper fails them
    as not taken."""
    with session_scope() as session:
        job = owned_job(session, job_id, owner)
        checkpoints = checkpoint_names(session, job_id)
        made = []
        for prompt in prompts:
            if prompt.checkpoint is not None and prompt.checkpoint not in checkpoints:
                raise CheckpointNotFound(f"job {job_id} has no checkpoint {prompt.checkpoint!r}")
            checkpoint = prompt.checkpoint
            if checkpoint is None and prompt.adapter and not job.adapter_path:
                if not checkpoints:
                    raise JobStateConflict(
                        f"job is {job.status} and has no adapter or checkpoint yet; nothing to sample from"
                    )
                checkpoint = checkpoints[-1]
            last_said = prompt.messages[-1]["content"] if prompt.messages else prompt.text or ""
            sample = Sample(
                job_id=job_id,
                checkpoint=checkpoint,
                prompt=last_said,
                prompt_ids=prompt.ids,
                adapter=prompt.adapter,
                messages=prompt.messages,
                max_new_tokens=prompt.max_new_tokens,
                temperature=prompt.temperature,
                top_p=prompt.top_p,
                stop=prompt.stop,
                seed=prompt.seed,
                echo=prompt.echo,
                top_logprobs=prompt.top_logprobs,
            )
            session.add(sample)
            made.append(sample)
        session.flush()
        reads = [SampleRead.model_validate(sample) for sample in made]
    for read in reads:
        queued_work.send(Sample, read.id, enqueue_sample)
    return reads


def untaken_after_s() -> float:
    """How long after its id was sent a sample no sampler took is failed with the reason
    (`queued_work.sweep_untaken`), rather than sent again: the longest a request waits for an
    answer (an OpenAI-style completion's completion_timeout_s, /generate's wait_s up to its
    bound), plus UNTAKEN_MARGIN_S. A /generate caller told 202 reads the reason when it polls."""
    settings = get_settings()
    wait_bound = max(
        cast(float, m.le) for m in SampleRequest.model_fields["wait_s"].metadata if isinstance(m, Le)
    )
    return max(settings.completion_timeout_s, settings.sample_wait_s, wait_bound) + UNTAKEN_MARGIN_S


def get_sample(job_id: str, sample_id: str, owner: str) -> SampleRead:
    with session_scope() as session:
        owned_job(session, job_id, owner)
        sample = session.get(Sample, sample_id)
        if sample is None or sample.job_id != job_id:
            raise SampleNotFound(f"job {job_id} has no sample {sample_id!r}")
        return SampleRead.model_validate(sample)


def start_sample(sample_id: str) -> tuple[Sample, Lease] | None:
    """The sampler takes a queued sample under a lease (None if it is gone or already taken)."""
    return queued_work.take(Sample, sample_id)


def write_partial(lease: Lease, completion: str) -> None:
    """The answer so far, while the sampler generates it (a stream sends what is new)."""
    lease.write(completion=completion)


def finish_sample(
    lease: Lease,
    *,
    completion: str | None = None,
    error: str | None = None,
    finish_reason: str | None = None,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
    logprobs: list[dict[str, Any]] | None = None,
) -> bool:
    return queued_work.finish(
        lease,
        error=error,
        completion=completion,
        finish_reason=finish_reason,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        logprobs=logprobs,
    )


def callable_jobs(owner: str) -> list[tuple[JobRead, list[CheckpointRead]]]:
    """The owner's jobs there is something to answer with (an adapter, or a kept checkpoint),
    newest first, with their checkpoints by step."""
    with session_scope() as session:
        with_checkpoints = select(Checkpoint.job_id).distinct()
        found = session.scalars(
            select(Job)
            .where(Job.owner == owner, or_(Job.adapter_path.is_not(None), Job.id.in_(with_checkpoints)))
            .order_by(Job.created_at.desc())
        )
        result = []
        for job in found:
            checkpoints = session.scalars(
                select(Checkpoint).where(Checkpoint.job_id == job.id).order_by(Checkpoint.step)
            )
            result.append(
                (JobRead.model_validate(job), [CheckpointRead.model_validate(c) for c in checkpoints])
            )
        return result
