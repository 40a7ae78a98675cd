"""OpenAI's models and completions API under /v1, answered by `finetune sampler` through the same
samples as `POST /jobs/{id}/generate`: the model a job trained is called with the official
client, `client.chat.completions.create(model=job.fine_tuned_model, messages=[...])`.

A model id is a job's `fine_tuned_model` (`ft:<base>:<owner>:<suffix>:<job id>`), one of its
checkpoints' (`…:ckpt-step-N`), or the base model one of the owner's jobs trained on (its `model`,
answered without an adapter). Another owner's model is a 404, as everywhere."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from app.api.auth import Owner
from app.api.waiting import sample_updates
from app.db import UNREACHABLE
from app.errors import DatabaseUnavailable, JobNotFound, ModelNotFound, SampleFailed, SampleTimedOut
from app.ids import JOB_ID, checkpoint_name
from app.models import JobStatus, SampleStatus
from app.schemas import JobRead, SampleRead
from app.services import jobs, samples
from app.services.samples import Prompt
from app.settings import get_settings
from app.spec import stored_spec

from .errors import ERROR_RESPONSES
from .objects import fine_tuned_model, model_name, unix

SAMPLER_RESPONSES: dict[int | str, dict[str, Any]] = {
    502: {"description": "The sampler could not answer; the message says why."},
    504: {"description": "The sampler did not answer within FINETUNE_COMPLETION_TIMEOUT_S."},
}
router = APIRouter(prefix="/v1", tags=["openai"], responses=ERROR_RESPONSES)
Object = dict[str, Any]
# Without max_tokens (or max_completion_tokens), an answer ends after this many tokens.
DEFAULT_MAX_TOKENS = 256
CHECKPOINT_SUFFIX = ":ckpt-step-"
# /v1/models lists the base models of the owner's newest this many jobs.
BASES_LOOKED_AT = 1000


# --- requests ---------------------------------------------------------------------------------


StopText = Annotated[str, Field(min_length=1, max_length=64)]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str = Field(max_length=32_000)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, Field(max_length=32_000)] | Annotated[list[TextPart], Field(max_length=64)]
    name: str | None = Field(None, max_length=64)

    def as_turn(self) -> dict[str, str]:
        """As the sampler renders it: a developer message is a system one; text parts joined."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """What both completion routes take. Any other field (logprobs, tools, n > 1, …) is a 400
    naming it: this service doesn't do it, and silently ignoring it would answer something else."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        max_length=512, description="A fine-tuned model's or checkpoint's id (GET /v1/models)."
    )
    max_tokens: int | None = Field(None, ge=1, le=2048)
    temperature: float = Field(1.0, ge=0, le=2, description="0 answers greedily.")
    top_p: float = Field(1.0, gt=0, le=1)
    stop: StopText | Annotated[list[StopText], Field(max_length=4)] | None = Field(
        None, description="Up to 4 strings; the answer ends before the first."
    )
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="The same seed, the same answer.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    user: str | None = Field(None, max_length=256)

    def to_prompt(
        self, messages: list[dict[str, str]] | None, text: str | None, max_tokens: int | None
    ) -> Prompt:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        return Prompt(
            messages=messages,
            text=text,
            max_new_tokens=max_tokens or self.max_tokens or DEFAULT_MAX_TOKENS,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=stop or None,
            seed=self.seed,
        )


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(None, ge=1, le=2048)


class CompletionRequest(_Sampling):
    prompt: str = Field(min_length=1, max_length=32_000, description="Continued as it is (no chat format).")
    max_tokens: int | None = Field(16, ge=1, le=2048)


# --- models -----------------------------------------------------------------------------------


def model_object(model_id: str, created: Any, owner: str) -> Object:
    return {"id": model_id, "object": "model", "created": unix(created), "owned_by": owner}


def base_models(owner: str) -> dict[str, JobRead]:
    """The base models of the owner's jobs, by the name a job's `model` shows (a hub id, or a
    local folder's name), each with the newest job that named it: the sampler loads the base
    as that job trained on it (4-bit, its quantization settings). Only bases the owner named
    themselves: another owner's local model is not reachable this way."""
    found: dict[str, JobRead] = {}
    for job in jobs.list_jobs(owner, None, BASES_LOOKED_AT, None).items:
        found.setdefault(model_name(stored_spec(job.spec)), job)
    return found


def callable_models(owner: str) -> list[Object]:
    """The owner's fine-tuned models (jobs that succeeded) and their kept checkpoints, newest
    job first, then the base models of their jobs."""
    found = []
    for job, checkpoints in samples.callable_jobs(owner):
        if job.status == JobStatus.SUCCEEDED:
            found.append(model_object(fine_tuned_model(job), job.finished_at or job.updated_at, owner))
        found += [
            model_object(fine_tuned_model(job, c.step), c.created_at, owner) for c in reversed(checkpoints)
        ]
    found += [model_object(name, job.created_at, owner) for name, job in base_models(owner).items()]
    return found


@dataclasses.dataclass(frozen=True)
class ModelTarget:
    """What answers for a model id: a job's final adapter, one of its checkpoints, or (adapter
    False) the base model the job trained on."""

    job_id: str
    checkpoint: str | None = None
    adapter: bool = True


def resolve(model_id: str, owner: str) -> ModelTarget:
    """What a model id names, if the owner may call it; else ModelNotFound."""
    if not model_id.startswith("ft:"):
        job = base_models(owner).get(model_id)
        if job is None:
            raise ModelNotFound(f"no model {model_id!r}; GET /v1/models lists yours")
        return ModelTarget(job.id, adapter=False)
    name, step = model_id, None
    if CHECKPOINT_SUFFIX in model_id:
        name, _, digits = model_id.rpartition(CHECKPOINT_SUFFIX)
        step = int(digits) if digits.isdigit() and len(digits) <= 9 else None
        if step is None:
            raise ModelNotFound(f"no model {model_id!r}")
    job_id = name.rpartition(":")[2]
    try:
        job = jobs.get_job(job_id, owner) if name.startswith("ft:") and JOB_ID.match(job_id) else None
    except JobNotFound:
        job = None
    if job is None or fine_tuned_model(job, step) != model_id:
        raise ModelNotFound(f"no model {model_id!r}; GET /v1/models lists yours")
    if step is None:
        if job.status != JobStatus.SUCCEEDED:
            raise ModelNotFound(
                f"job {job.id} is {job.status}: its model exists once it succeeds; "
                f"a checkpoint can be called as {fine_tuned_model(job, 0)[:-1]}N"
            )
        return ModelTarget(job.id)
    name = checkpoint_name(step)
    if name not in {c.name for c in jobs.list_checkpoints(job.id, owner)}:
        raise ModelNotFound(f"job {job.id} has no checkpoint at step {step} (kept: GET /v1/models)")
    return ModelTarget(job.id, name)


@router.get("/models")
def list_models(owner: Owner) -> Object:
    return {"object": "list", "data": callable_models(owner)}


@router.get("/models/{model:path}")
def retrieve_model(owner: Owner, model: Annotated[str, Path(max_length=512)]) -> Object:
    found = next((m for m in callable_models(owner) if m["id"] == model), None)
    if found is None:
        resolve(model, owner)  # says why
        raise ModelNotFound(f"no model {model!r}")
    return found


# --- completions ------------------------------------------------------------------------------


async def _sample(request: _Sampling, owner: str, prompt: Prompt) -> SampleRead:
    model = await run_in_threadpool(resolve, request.model, owner)
    prompt = dataclasses.replace(prompt, checkpoint=model.checkpoint, adapter=model.adapter)
    return await run_in_threadpool(samples.create_sample, model.job_id, owner, prompt)


async def _updates(sample: SampleRead, owner: str) -> AsyncIterator[SampleRead]:
    """The sample's row each time it may have changed, until it is answered (or failed);
    SampleTimedOut after FINETUNE_COMPLETION_TIMEOUT_S."""
    timeout_s = get_settings().completion_timeout_s
    async for update in sample_updates(sample, owner, timeout_s):
        sample = update
        yield update
    if sample.status not in SampleStatus.FINAL:
        raise SampleTimedOut(f"no answer within {timeout_s:g} s; try again")


async def _answered(sample: SampleRead, owner: str) -> SampleRead:
    async for update in _updates(sample, owner):
        sample = update
    if sample.status == SampleStatus.FAILED:
        raise SampleFailed(f"the sampler could not answer: {sample.error}")
    return sample


def _usage(sample: SampleRead) -> Object:
    prompt, completion = sample.prompt_tokens or 0, sample.completion_tokens or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@router.post("/chat/completions", responses=SAMPLER_RESPONSES, response_model=None)
async def chat_completions(request: ChatCompletionRequest, owner: Owner) -> Object | StreamingResponse:
    """Answer a conversation with a fine-tuned model, rendered as its job was trained (`Human:` /
    `Assistant:`). `stream: true` sends OpenAI's `chat.completion.chunk` events."""
    messages = [m.as_turn() for m in request.messages]
    sample = await _sample(request, owner, request.to_prompt(messages, None, request.max_completion_tokens))
    if request.stream:
        return _stream(sample, owner, request, "chat.completion.chunk")
    sample = await _answered(sample, owner)
    return {
        "id": f"chatcmpl-{sample.id}",
        "object": "chat.completion",
        "created": unix(sample.created_at),
        "model": request.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": sample.completion, "refusal": None},
                "finish_reason": sample.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": _usage(sample),
    }


@router.post("/completions", responses=SAMPLER_RESPONSES, response_model=None)
async def completions(request: CompletionRequest, owner: Owner) -> Object | StreamingResponse:
    """Continue a text with a fine-tuned model, as it is (no chat format)."""
    sample = await _sample(request, owner, request.to_prompt(None, request.prompt, None))
    if request.stream:
        return _stream(sample, owner, request, "text_completion")
    sample = await _answered(sample, owner)
    return {
        "id": f"cmpl-{sample.id}",
        "object": "text_completion",
        "created": unix(sample.created_at),
        "model": request.model,
        "choices": [
            {"index": 0, "text": sample.completion, "finish_reason": sample.finish_reason, "logprobs": None}
        ],
        "usage": _usage(sample),
    }


def _stream(sample: SampleRead, owner: str, request: _Sampling, kind: str) -> StreamingResponse:
    """OpenAI's server-sent events: a chunk for each piece of text the sampler adds, one with
    the finish reason, one with the usage if asked, then `[DONE]`. A failure mid-stream is an
    `error` event, which the client raises; a database outage is waited through until the
    completion's deadline."""
    chat = kind == "chat.completion.chunk"
    head = {"id": ("chatcmpl-" if chat else "cmpl-") + sample.id, "object": kind, "model": request.model}

    def chunk(text: str | None, finish_reason: str | None, first: bool = False) -> str:
        if chat:
            delta = (
                {"role": "assistant", "content": text or ""}
                if first
                else {}
                if text is None
                else {"content": text}
            )
            choice: Object = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        return _event({**head, "created": unix(sample.created_at), "choices": [choice]})

    async def events() -> AsyncIterator[str]:
        sent = ""
        latest = sample
        try:
            yield chunk("", None, first=True)
            async for latest in _updates(sample, owner):
                text = latest.completion or ""
                if text.startswith(sent) and len(text) > len(sent):
                    yield chunk(text[len(sent) :], None)
                    sent = text
        except SampleTimedOut as exc:
            yield _error(str(exc.detail), exc.code)
            return
        except UNREACHABLE:  # still down at the deadline (a shorter outage is waited through)
            yield _error("the database did not answer; retry shortly", DatabaseUnavailable.code)
            return
        if latest.status == SampleStatus.FAILED:
            yield _error(f"the sampler could not answer: {latest.error}", SampleFailed.code)
            return
        yield chunk(None, latest.finish_reason)
        if request.stream_options and request.stream_options.include_usage:
            yield _event({**head, "created": unix(sample.created_at), "choices": [], "usage": _usage(latest)})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _event(data: Object) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _error(message: str, code: str) -> str:
    """An error mid-stream, as OpenAI sends one (its client raises it)."""
    return _event({"error": {"message": message, "type": "server_error", "code": code}})
