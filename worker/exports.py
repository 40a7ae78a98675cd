"""Makes exports (`POST /jobs/{id}/exports`) in `finetune sampler`'s process, on the CPU (a
training keeps the GPU): the base is loaded in 4-bit as it was trained, dequantized to the job's
compute dtype, the adapter merged into it; the result is a plain transformers model folder
(zipped), or that model written as one GGUF file (worker/gguf.py)."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoTokenizer
from transformers.utils import cached_file

from app.models import Export, ExportFormat
from app.services.exports import finish_export, start_export
from app.settings import get_settings
from app.spec import JobSpec, split_revision
from app.storage import being_written, job_files, sha256_of
from worker.adapters import adapter_folder, job_spec
from worker.lease import LeaseKeeper
from worker.training.artifacts import zip_directory
from worker.training.hub import fetching
from worker.training.model import compute_dtype, load_quantized_model, load_tokenizer

log = logging.getLogger(__name__)


def export(export_id: str) -> None:
    taken = start_export(export_id)
    if taken is None:
        log.info("export %s is not queued; skipped", export_id)
        return
    row, lease = taken
    store = job_files(row.job_id).store
    try:
        with LeaseKeeper(lease, get_settings().lease_s / 3):
            path = _make(row)
            size_bytes, sha256 = path.stat().st_size, sha256_of(path)
            location = store.put(path)  # whole in the store before the row records it
            store.evict(path)
    except Exception as exc:
        log.exception("export %s failed", export_id)
        finish_export(lease, error=f"{type(exc).__name__}: {exc}")
        return
    name = f"{row.job_id}-{row.checkpoint or 'final'}-{row.format}{path.suffix}"
    finish_export(lease, path=location, filename=name, size_bytes=size_bytes, sha256=sha256)


def _make(export: Export) -> Path:
    spec = job_spec(export.job_id)
    adapter_dir = adapter_folder(export.job_id, export.checkpoint)
    files = job_files(export.job_id)
    files.exports_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=files.exports_dir, prefix=".work-") as work:
        merged = Path(work) / "merged"
        write_merged(spec, adapter_dir, merged)
        target = files.export_file(export.id, export.format)
        if export.format == ExportFormat.GGUF:
            from worker.gguf import write_gguf

            write_gguf(merged, being_written(target))
        else:
            zip_directory(merged, being_written(target))
        being_written(target).replace(target)
    return target


def merged_model(spec: JobSpec, adapter_dir: Path) -> torch.nn.Module:
    """The base dequantized from the 4-bit weights the adapter was trained against (not the
    original 16-bit ones, which differ by the quantization error), in the job's compute dtype,
    with the adapter merged in: a plain transformers model."""
    base = load_quantized_model(spec, compute_dtype(spec.quantization), "cpu")
    base = base.dequantize()
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def write_merged(spec: JobSpec, adapter_dir: Path, target: Path) -> None:
    """The merged model as a folder `AutoModelForCausalLM.from_pretrained` loads without peft:
    safetensors, config, generation config and the tokenizer the job trained with."""
    model = merged_model(spec, adapter_dir)
    # from_pretrained would read the 4-bit settings back and quantize again
    model.config.quantization_config = None
    if hasattr(model.config, "_pre_quantization_dtype"):
        del model.config._pre_quantization_dtype
    model.save_pretrained(target, safe_serialization=True)
    if (adapter_dir / "tokenizer_config.json").is_file():  # saved with the adapter
        tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    else:
        tokenizer = load_tokenizer(spec.base_model)
    tokenizer.save_pretrained(target)
    copy_sentencepiece_model(tokenizer, spec.base_model, target)
    card = adapter_dir / "README.md"
    if card.is_file():
        shutil.copy(card, target / "README.md")


def copy_sentencepiece_model(tokenizer: Any, base_model: str, target: Path) -> None:
    """transformers saves a SentencePiece tokenizer without its model (tokenizer.model), which
    holds the piece scores llama.cpp tokenizes a Llama-family GGUF by (worker/gguf.py): the
    base's copy (its folder, or the hub cache) joins the saved tokenizer, where the base has one."""
    sentencepiece = "tokenizer.model" in tokenizer.vocab_files_names.values()
    if not sentencepiece or (target / "tokenizer.model").is_file():
        return
    name, revision = split_revision(base_model)
    with fetching("tokenizer", base_model):
        found = cached_file(
            name,
            "tokenizer.model",
            revision=revision,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
    if found is not None:
        shutil.copy(found, target / "tokenizer.model")
