"""Answers samples (POST /jobs/{id}/generate) in `finetune sampler`: the job's base model, in
4-bit as it was trained, plus the adapter or checkpoint the sample names; on the GPU when it has
room beside a training (worker/placement.py), else on the CPU. On a CPU the last model loaded
stays in memory, so prompts to the same adapter answer at once; on a GPU it is freed after each
answer (FINETUNE_SAMPLER_KEEP_MODEL)."""

from __future__ import annotations

import gc
import logging
from functools import lru_cache
from pathlib import Path

import torch
from peft import PeftModel

from app.conversations import HUMAN, Turn
from app.db import session_scope
from app.models import Job
from app.services.samples import finish_sample, start_sample
from app.settings import get_settings
from app.spec import JobSpec
from app.storage import job_files
from worker.placement import answer_device
from worker.training.data import format_segments
from worker.training.model import compute_dtype, load_quantized_model, load_tokenizer

log = logging.getLogger(__name__)


def prompt_text(prompt: str) -> str:
    """The prompt as the recipe formats a conversation, ending where the Assistant speaks."""
    human = "".join(text for text, _ in format_segments([Turn(HUMAN, prompt)], eos=""))
    return human + "\nAssistant: "


@lru_cache(maxsize=1)
def _model(spec_json: str, adapter_dir: str, device: str):
    spec = JobSpec.model_validate_json(spec_json)
    tokenizer = load_tokenizer(spec.base_model)
    base = load_quantized_model(spec, sampling_dtype(spec, device), device)
    model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    return model, tokenizer


def sampling_dtype(spec: JobSpec, device: str) -> torch.dtype:
    """The training's compute dtype on a GPU; float32 on a CPU (which has no fast float16)."""
    return compute_dtype(spec.quantization) if device == "cuda" else torch.float32


def answer(sample_id: str) -> None:
    sample = start_sample(sample_id)
    if sample is None:
        log.info("sample %s is not queued; skipped", sample_id)
        return
    try:
        completion = _complete(sample)
    except Exception as exc:
        log.exception("sample %s failed", sample_id)
        finish_sample(sample_id, error=f"{type(exc).__name__}: {exc}")
        return
    finally:
        # After _complete has returned, nothing here refers to the model any more: freed now,
        # its GPU memory goes back to the card (a reference left would keep it reserved).
        if not keep_model():
            release_model()
    finish_sample(sample_id, completion=completion)


def _complete(sample) -> str:
    with session_scope() as session:
        job = session.get(Job, sample.job_id)
        if job is None:  # deleted since the sample was queued
            raise LookupError(f"job {sample.job_id} no longer exists")
        spec = JobSpec.model_validate(job.spec)
    files = job_files(sample.job_id)
    adapter_dir = files.checkpoint_dir(sample.checkpoint) if sample.checkpoint else files.adapter_dir
    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{sample.checkpoint or 'the adapter'} is no longer on disk")
    device = _device_for(spec, sample)
    model, tokenizer = _model(spec.model_dump_json(), str(adapter_dir), device)
    return generate(model, tokenizer, sample.prompt, sample.max_new_tokens, sample.temperature)


def _device_for(spec: JobSpec, sample) -> str:
    """The GPU if the answer fits there beside what runs on it (a training), else the CPU; the
    room counts a model this process keeps as its own. Sized for the longest prompt a job takes."""
    tokens = spec.training.max_seq_length + sample.max_new_tokens
    return answer_device(spec.base_model, tokens, sampling_dtype(spec, "cuda"))


def keep_model() -> bool:
    setting = get_settings().sampler_keep_model
    return not torch.cuda.is_available() if setting == "auto" else setting == "true"


def release_model() -> None:
    """Give the model's memory back (the GPU's to a training beside this process)."""
    _model.cache_clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.inference_mode()
def generate(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float) -> str:
    inputs = tokenizer(prompt_text(prompt), return_tensors="pt").to(model.device)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    output = model.generate(
        **inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling
    )
    text = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    # The model may go on to write the Human's next turn: the answer ends before it.
    return text.split(f"\n{HUMAN}:")[0].strip()
