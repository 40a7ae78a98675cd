"""Answers samples in `finetune sampler`: `POST /jobs/{id}/generate`, `/v1/chat/completions` and
`/v1/completions`. The job's base model, in 4-bit as it was trained, carries the adapters of the
jobs and checkpoints it answers for: a second adapter of the same base is loaded beside the
first and switched to, not a second base (`FINETUNE_SAMPLER_ADAPTERS` are kept), unless one of
them trained biases (peft writes those into the base: it is loaded afresh instead). On the GPU when
it has room beside a training (worker/placement.py), else on the CPU. On a CPU the model stays
loaded between answers; on a GPU it is freed after each (FINETUNE_SAMPLER_KEEP_MODEL). While it
generates, the text so far is written to the sample's row, which a streaming request reads."""

from __future__ import annotations

import gc
import hashlib
import logging
import time
from collections import OrderedDict
from contextlib import AbstractContextManager as ContextManager
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from peft import PeftModel
from transformers.generation.streamers import BaseStreamer

from app.conversations import HUMAN, Turn
from app.formats import CHAT_ROLES
from app.models import Sample
from app.services.queued_work import Lease
from app.services.samples import finish_sample, start_sample, write_partial
from app.settings import get_settings
from app.spec import DEFAULT_TEMPLATE, JobSpec
from worker.adapters import adapter_folder, job_spec, trained_biases
from worker.lease import LeaseKeeper
from worker.logprobs import read_prompt, scored_tokens
from worker.placement import answer_device
from worker.training.data import prompt_ids
from worker.training.model import compute_dtype, load_quantized_model, load_tokenizer

log = logging.getLogger(__name__)

# How often a growing answer is written to its row for a stream to read.
PARTIAL_WRITE_S = 0.25


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    # asked for: each token's {"token", "logprob", "offset", "top"} (see scored_tokens)
    logprobs: list[dict[str, Any]] | None = None


def conversation(messages: list[dict[str, str]]) -> list[Turn]:
    return [Turn(CHAT_ROLES.get(m["role"], HUMAN), m["content"]) for m in messages]


class Models:
    """The loaded base model (one at a time) and, on it, the adapters used last."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.model: Any = None
        self.tokenizer: Any = None
        # the adapters on the base, oldest first: name -> whether it trained biases
        self.adapters: OrderedDict[str, bool] = OrderedDict()

    def get(self, spec: JobSpec, adapter_dir: Path | None, device: str) -> tuple[Any, Any, ContextManager]:
        """The base `spec` names with the adapter in `adapter_dir` active (None: the base alone),
        loading what isn't loaded yet, and the context to generate in."""
        key = (spec.base_model, spec.quantization.model_dump_json(), device)
        if key != self.key:
            self.release()
            self.tokenizer = load_tokenizer(spec.base_model)
            self.model = load_quantized_model(spec, sampling_dtype(spec, device), device)
            self.key = key
        if adapter_dir is None:
            if any(self.adapters.values()):
                self.release()  # a loaded adapter's biases are in the base now
                return self.get(spec, None, device)
            base_alone = self.model.disable_adapter() if isinstance(self.model, PeftModel) else nullcontext()
            return self.model, self.tokenizer, base_alone
        name = "a" + hashlib.sha256(str(adapter_dir).encode()).hexdigest()[:16]
        if name in self.adapters:
            self.adapters.move_to_end(name)
        else:
            biased = trained_biases(adapter_dir)
            if self.adapters and (biased or any(self.adapters.values())):
                # an adapter with biases writes them into the base: it can't share one
                self.release()
                return self.get(spec, adapter_dir, device)
            if not isinstance(self.model, PeftModel):
                self.model = PeftModel.from_pretrained(self.model, str(adapter_dir), adapter_name=name)
            else:
                self.model.load_adapter(str(adapter_dir), adapter_name=name)
            self.adapters[name] = biased
            while len(self.adapters) > get_settings().sampler_adapters:
                oldest, _ = self.adapters.popitem(last=False)
                self.model.delete_adapter(oldest)
        self.model.set_adapter(name)
        self.model.eval()
        return self.model, self.tokenizer, nullcontext()

    def release(self) -> None:
        """Give the model's memory back (the GPU's to a training beside this process)."""
        self.key, self.model, self.tokenizer = None, None, None
        self.adapters.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


models = Models()


def sampling_dtype(spec: JobSpec, device: str) -> torch.dtype:
    """The training's compute dtype on a GPU; float32 on a CPU (which has no fast float16)."""
    return compute_dtype(spec.quantization) if device == "cuda" else torch.float32


def answer(sample_id: str) -> None:
    taken = start_sample(sample_id)
    if taken is None:
        log.info("sample %s is not queued; skipped", sample_id)
        return
    sample, lease = taken
    try:
        with LeaseKeeper(lease, get_settings().lease_s / 3):
            result = _complete(sample, lease)
    except Exception as exc:
        log.exception("sample %s failed", sample_id)
        finish_sample(lease, error=f"{type(exc).__name__}: {exc}")
        return
    finally:
        # After _complete has returned, nothing here refers to the model any more: freed now,
        # its GPU memory goes back to the card (a reference left would keep it reserved).
        if not keep_model():
            release_model()
    finish_sample(
        lease,
        completion=result.text,
        finish_reason=result.finish_reason,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        logprobs=result.logprobs,
    )


def _complete(sample: Sample, lease: Lease) -> Answer:
    spec = job_spec(sample.job_id)
    adapter_dir = adapter_folder(sample.job_id, sample.checkpoint) if sample.adapter else None
    device = _device_for(spec, sample)
    model, tokenizer, context = models.get(spec, adapter_dir, device)
    last_write = [time.monotonic()]

    def on_text(text: str) -> None:
        if time.monotonic() - last_write[0] >= PARTIAL_WRITE_S:
            write_partial(lease, text)
            last_write[0] = time.monotonic()

    with context:
        return generate(model, tokenizer, sample, on_text, template=spec.dataset.template)


def _device_for(spec: JobSpec, sample: Sample) -> str:
    """The GPU if the answer fits there beside what runs on it (a training), else the CPU; the
    room counts a model this process keeps as its own. Sized for the longest prompt a job takes."""
    tokens = spec.training.max_seq_length + sample.max_new_tokens
    return answer_device(spec.base_model, tokens, sampling_dtype(spec, "cuda"))


def keep_model() -> bool:
    setting = get_settings().sampler_keep_model
    return not torch.cuda.is_available() if setting == "auto" else setting == "true"


def release_model() -> None:
    models.release()


class _TextSoFar(BaseStreamer):
    """Hands the decoded answer so far to `on_text` after each generated token."""

    def __init__(self, tokenizer, on_text) -> None:
        self.tokenizer, self.on_text = tokenizer, on_text
        self.prompt_seen = False
        self.ids: list[int] = []

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() hands over the prompt first
            self.prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        self.on_text(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def end(self) -> None:
        pass


@torch.inference_mode()
def generate(
    model, tokenizer, sample: Sample, on_text=lambda text: None, template: str = DEFAULT_TEMPLATE
) -> Answer:
    """Answer the sample: its conversation rendered as the job was trained (or its raw prompt,
    text or token ids), sampled with its temperature, top_p and seed, ended by EOS, a stop
    string or its token budget (0: nothing is generated). A chat answer also ends where the
    model starts the Human's next turn. With `echo` the prompt's text comes first; with
    `top_logprobs` each token's log-probability (scored_tokens)."""
    chat = sample.messages is not None
    if sample.messages is not None:  # tokenized exactly as the job's training tokenized it
        prompt = prompt_ids(conversation(sample.messages), tokenizer, template)
        # a chat template's reply ends with its end-of-turn token (EOS, or generation_config's)
        human_speaks = [f"\n{HUMAN}:"] if template == "human_assistant" else []
        stops = [*human_speaks, *(sample.stop or [])]
    elif sample.prompt_ids is not None:  # given as ids: not re-tokenized
        prompt = _known_ids(model, sample.prompt_ids)
        stops = list(sample.stop or [])
    else:
        prompt = tokenizer(sample.prompt)["input_ids"]
        stops = list(sample.stop or [])
    echoed = ""
    if sample.echo:
        given = sample.prompt_ids is None and sample.messages is None
        echoed = sample.prompt if given else tokenizer.decode(prompt, skip_special_tokens=True)
    scoring = sample.top_logprobs is not None
    # an echoed prompt's tokens are scored by a forward pass over all but its last, whose cache
    # the answer is then generated from: the prompt is read once
    read = read_prompt(model, prompt) if scoring and sample.echo else None
    new_ids: list[int] = []
    new_logits = None
    if sample.max_new_tokens > 0:
        new_ids, new_logits = _sampled(
            model,
            tokenizer,
            sample,
            prompt,
            stops,
            lambda text: on_text(echoed + _settled(text, stops, chat)),
            cache=read.cache if read is not None else None,
            with_logits=scoring,
        )
    text, stopped = _cut(tokenizer.decode(new_ids, skip_special_tokens=True), stops)
    ended = stopped or (len(new_ids) > 0 and new_ids[-1] == tokenizer.eos_token_id)
    logprobs = None
    if scoring:
        logprobs = scored_tokens(
            tokenizer,
            prompt,
            new_ids,
            new_logits,
            cast(int, sample.top_logprobs),
            echoed=(echoed, read.logits) if read is not None else None,
            kept=len(text) if stopped else None,
        )
    return Answer(
        text=echoed + (text.strip() if chat else text),
        finish_reason="stop" if ended or len(new_ids) < sample.max_new_tokens else "length",
        prompt_tokens=len(prompt),
        completion_tokens=len(new_ids),
        logprobs=logprobs,
    )


def _known_ids(model, ids: list[int]) -> list[int]:
    """Token ids given as the prompt, if the model has an embedding for each."""
    size = model.get_input_embeddings().num_embeddings
    unknown = next((i for i in ids if not 0 <= i < size), None)
    if unknown is not None:
        raise ValueError(f"prompt: token id {unknown} is not in the model's vocabulary (0 to {size - 1})")
    return ids


def _sampled(
    model,
    tokenizer,
    sample: Sample,
    prompt: list[int],
    stops: list[str],
    on_text,
    cache: Any = None,
    with_logits: bool = False,
) -> tuple[list[int], torch.Tensor | None]:
    """The answer's token ids, sampled after `prompt` (from `cache`, the prompt's but its last
    token's, if given), and if asked the model's logits for each, before sampling changes them
    (temperature, top_p); `on_text` sees the text as it grows."""
    ids = torch.tensor([prompt], device=model.device)
    options: dict[str, Any] = {"do_sample": False}
    if sample.temperature > 0:
        options = {"do_sample": True, "temperature": sample.temperature, "top_p": sample.top_p}
        if sample.seed is not None:
            torch.manual_seed(sample.seed)
    if stops:
        options.update(stop_strings=stops, tokenizer=tokenizer)
    if cache is not None:
        options["past_key_values"] = cache
    output = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=sample.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        streamer=_TextSoFar(tokenizer, on_text),
        output_logits=with_logits,
        return_dict_in_generate=True,
        **options,
    )
    logits = torch.cat(output.logits) if with_logits else None
    return output.sequences[0, len(prompt) :].tolist(), logits


def _settled(text: str, stops: list[str], chat: bool) -> str:
    """Of the answer so far, the part no later token can change: before a stop string, and
    without a tail that may yet become one, an unfinished character, or (in a chat answer, which
    is stripped at the end) trailing whitespace. So every partial answer starts the final one."""
    text, stopped = _cut(text, stops)
    if not stopped:
        text = text.rstrip("\ufffd")
        held = [n for stop in stops for n in range(len(stop) - 1, 0, -1) if text.endswith(stop[:n])]
        text = text[: len(text) - max(held, default=0)]
    return text.strip() if chat else text


def _cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text before the first stop string in it, and whether there was one."""
    ends = [text.find(stop) for stop in stops if stop in text]
    return (text[: min(ends)], True) if ends else (text, False)
