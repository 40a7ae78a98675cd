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
from typing import Annotated, Any

from fastapi import APIRouter, Path
from fastapi.responses import StreamingResponse
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

from .completion_requests import ChatCompletionRequest, CompletionRequest, SamplingRequest
from .errors import ERROR_RESPONSES
from .objects import fine_tuned_model, model_name, unix

SAMPLER_RESPONSES: dict[int | str, dict[str, Any]] = {
    502: {"description": "The sampler could not answer; the message says why."},
    504: {"description": "The sampler did not answer within FINETUNE_COMPLETION_TIMEOUT_S."},
}
router = APIRouter(prefix="/v1", tags=["openai"], responses=ERROR_RESPONSES)
Object = dict[str, Any]
CHECKPOINT_SUFFIX = ":ckpt-step-"
# /v1/models lists the base models of the owner's newest this many jobs.
BASES_LOOKED_AT = 1000


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


# --- completions ---------------------------------------------------------------------------


async def _samples(request: SamplingRequest, owner: str, prompts: list[Prompt]) -> list[SampleRead]:
    """A sample for each prompt, answered by the model the request names."""
    model = await run_in_threadpool(resolve, request.model, owner)
    prompts = [dataclasses.replace(p, checkpoint=model.checkpoint, adapter=model.adapter) for p in prompts]
    return await run_in_threadpool(samples.create_samples, model.job_id, owner, prompts)


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


async def _all_answered(made: list[SampleRead], owner: str) -> list[SampleRead]:
    """The samples once answered, in order (the sampler answers one at a time: each may take
    FINETUNE_COMPLETION_TIMEOUT_S after the one before)."""
    return [await _answered(sample, owner) for sample in made]


def _usage(*answered: SampleRead) -> Object:
    prompt = sum(s.prompt_tokens or 0 for s in answered)
    completion = sum(s.completion_tokens or 0 for s in answered)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def legacy_logprobs(sample: SampleRead) -> Object | None:
    """A text completion's `logprobs`, as OpenAI's legacy completions give them: the top tokens
    at each place, and always the one chosen (so up to logprobs + 1 of them)."""
    if sample.logprobs is None:
        return None
    tops: list[dict[str, float] | None] = []
    for entry in sample.logprobs:
        top = None
        if entry["top"] is not None:
            top = {token: logprob for token, logprob in entry["top"]}
            top.setdefault(entry["token"], entry["logprob"])
        tops.append(top)
    return {
        "tokens": [e["token"] for e in sample.logprobs],
        "token_logprobs": [e["logprob"] for e in sample.logprobs],
        "top_logprobs": tops,
        "text_offset": [e["offset"] for e in sample.logprobs],
    }


def chat_logprobs(sample: SampleRead) -> Object | None:
    """A chat answer's `logprobs`: each token of the reply with its `top_logprobs` likeliest."""
    if sample.logprobs is None:
        return None

    def token(text: str, logprob: float) -> Object:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = [
        {**token(e["token"], e["logprob"]), "top_logprobs": [token(t, lp) for t, lp in e["top"] or []]}
        for e in sample.logprobs
    ]
    return {"content": content, "refusal": None}


@router.post("/chat/completions", responses=SAMPLER_RESPONSES, response_model=None)
async def chat_completions(request: ChatCompletionRequest, owner: Owner) -> Object | StreamingResponse:
    """Answer a conversation with a fine-tuned model, rendered as its job was trained (`Human:` /
    `Assistant:`). `stream: true` sends OpenAI's `chat.completion.chunk` events; `logprobs: true`
    (with `top_logprobs`) each reply token's log-probability."""
    made = await _samples(request, owner, request.prompts())
    if request.stream:
        return _stream(made, owner, request, "chat.completion.chunk")
    [sample] = await _all_answered(made, owner)
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
                "logprobs": chat_logprobs(sample),
            }
        ],
        "usage": _usage(sample),
    }


@router.post("/completions", responses=SAMPLER_RESPONSES, response_model=None)
async def completions(request: CompletionRequest, owner: Owner) -> Object | StreamingResponse:
    """Continue a text (or token ids) with a fine-tuned model, as it is (no chat format); several
    prompts are answered one choice each, `index` in their order. `logprobs`, `echo` and
    `max_tokens: 0` as OpenAI's legacy completions have them: `echo: true, max_tokens: 0,
    logprobs: 1` gives the log-probability of each of the prompt's tokens."""
    made = await _samples(request, owner, request.prompts())
    if request.stream:
        return _stream(made, owner, request, "text_completion")
    answered = await _all_answered(made, owner)
    return {
        "id": f"cmpl-{answered[0].id}",
        "object": "text_completion",
        "created": unix(answered[0].created_at),
        "model": request.model,
        "choices": [
            {
                "index": index,
                "text": sample.completion,
                "finish_reason": sample.finish_reason,
                "logprobs": legacy_logprobs(sample),
            }
            for index, sample in enumerate(answered)
        ],
        "usage": _usage(*answered),
    }


def _stream(made: list[SampleRead], owner: str, request: SamplingRequest, kind: str) -> StreamingResponse:
    """OpenAI's server-sent events: a chunk for each piece of text the sampler adds, one with
    the finish reason (and the logprobs, all in it, if asked), one with the usage if asked, then
    `[DONE]`; several prompts' choices one after the other, each with its `index`. A failure
    mid-stream is an `error` event, which the client raises; a database outage is waited
    through until the completion's deadline."""
    chat = kind == "chat.completion.chunk"
    first_sample = made[0]
    head = {
        "id": ("chatcmpl-" if chat else "cmpl-") + first_sample.id,
        "object": kind,
        "model": request.model,
    }

    def chunk(
        text: str | None,
        finish_reason: str | None,
        first: bool = False,
        index: int = 0,
        logprobs: Object | None = None,
    ) -> str:
        if chat:
            delta = (
                {"role": "assistant", "content": text or ""}
                if first
                else {}
                if text is None
                else {"content": text}
            )
            choice: Object = {
                "index": index,
                "delta": delta,
                "finish_reason": finish_reason,
                "logprobs": logprobs,
            }
        else:
            choice = {
                "index": index,
                "text": text or "",
                "finish_reason": finish_reason,
                "logprobs": logprobs,
            }
        return _event({**head, "created": unix(first_sample.created_at), "choices": [choice]})

    async def events() -> AsyncIterator[str]:
        yield chunk("", None, first=True)
        answered = []
        for index, sample in enumerate(made):
            sent = ""
            latest = sample
            try:
                async for latest in _updates(sample, owner):
                    text = latest.completion or ""
                    if text.startswith(sent) and len(text) > len(sent):
                        yield chunk(text[len(sent) :], None, index=index)
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
            logprobs = chat_logprobs(latest) if chat else legacy_logprobs(latest)
            yield chunk(None, latest.finish_reason, index=index, logprobs=logprobs)
            answered.append(latest)
        if request.stream_options and request.stream_options.include_usage:
            usage = _usage(*answered)
            yield _event({**head, "created": unix(first_sample.created_at), "choices": [], "usage": usage})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _event(data: Object) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _error(message: str, code: str) -> str:
    """An error mid-stream, as OpenAI sends one (its client raises it)."""
    return _event({"error": {"message": message, "type": "server_error", "code": code}})
