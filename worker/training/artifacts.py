"""Files a user downloads: zips written atomically, with their sha256, and the model card."""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.spec import split_revision
from app.storage import being_written, sha256_of


@dataclass(frozen=True)
class ZipInfo:
    path: Path
    size_bytes: int
    sha256: str


def zip_directory(source: Path, target: Path) -> ZipInfo:
    """Zip `source` to `target` via a temporary file and a rename, so `target` is whole or absent.

    Stored, not deflated: weights and optimizer states barely compress, and the zip is written
    while training waits.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = being_written(target)
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
        for file in sorted(p for p in source.rglob("*") if p.is_file()):
            archive.write(file, arcname=str(Path(source.name) / file.relative_to(source)))
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)
    return ZipInfo(target, target.stat().st_size, sha256_of(target))


def base_model_name(base_model: str) -> str:
    """How the model card names the base: the hub id, or a local folder's name."""
    return Path(base_model).name if Path(base_model).is_absolute() else base_model


def name_the_base(adapter_dir: Path, base_model: str) -> None:
    """The adapter's config names its base so that `AutoPeftModelForCausalLM` finds it: a hub
    base by its id (a revision the spec pinned as peft's `revision`), a local one by the path the
    spec holds (absolute, resolved at submission), which loads where that folder is. The folder's
    name alone (the card's) loaded nowhere: it was looked up on the hub."""
    name, revision = split_revision(base_model)
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = name
    config["revision"] = revision
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_model_card(card: Path, spec: dict[str, Any], job_id: str, summary: dict[str, Any]) -> None:
    """The adapter's README.md (`JobFiles.model_card`): what it was trained from, how, and how
    it ended."""
    dataset, quantization = spec["dataset"], spec["quantization"]
    base, revision = split_revision(base_model_name(spec["base_model"]))
    pinned = f', revision="{revision}"' if revision else ""
    dtype = quantization["compute_dtype"]
    if dtype == "auto":
        dtype = "bfloat16  # float16 on a GPU without bfloat16 (a T4)"
    modules = spec["lora"]["target_modules"]  # "auto" and "all-linear" as peft resolved them:
    peft_config = card.parent / "adapter_config.json"
    if peft_config.is_file():
        resolved = json.loads(peft_config.read_text()).get("target_modules")
        modules = sorted(resolved) if isinstance(resolved, list) else resolved or modules
    lines = [
        f"# LoRA adapter for {base}",
        "",
        f"Trained by the fine-tune service, job `{job_id}`.",
        "",
        f"- Base model: `{base}` (4-bit {spec['quantization']['quant_type']}, "
        f"double quant {spec['quantization']['double_quant']})",
        f"- Data: `{dataset['source']}` split `{dataset['split']}`, languages {dataset['languages']}, "
        f"loss on {dataset['train_on']} tokens",
        f"- LoRA: r={spec['lora']['r']}, alpha={spec['lora']['alpha']}, dropout={spec['lora']['dropout']}, "
        f"modules {modules}",
    ]
    lines += [f"- {key.replace('_', ' ').capitalize()}: {value}" for key, value in summary.items()]
    lines += [
        "",
        "## Use",
        "",
        "Exactly as the service trained and samples it: the base in 4-bit, then this adapter.",
        "",
        "```python",
        "import torch",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig",
        "",
        "quantization = BitsAndBytesConfig(",
        f'    load_in_4bit=True, bnb_4bit_quant_type="{quantization["quant_type"]}",',
        f"    bnb_4bit_use_double_quant={quantization['double_quant']}, "
        f"bnb_4bit_compute_dtype=torch.{dtype},",
        ")",
        f'base = AutoModelForCausalLM.from_pretrained("{base}"{pinned}, quantization_config=quantization)',
        'model = PeftModel.from_pretrained(base, "path/to/this/folder")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
        "```",
        "",
        "A base loaded in full precision instead gives slightly different output (the adapter",
        "learned against the 4-bit weights); the service's `merged` export merges it into those.",
        "`adapter_config.json` names the base as the job did "
        f"(`{split_revision(spec['base_model'])[0]}`), so that",
        '`AutoPeftModelForCausalLM.from_pretrained("path/to/this/folder")` finds it (in full precision).',
        "",
        "Prompts are formatted as `Human: …` then `Assistant: ` on a new line.",
        "",
        "## Job spec",
        "",
        "```json",
        json.dumps(spec, indent=2),
        "```",
        "",
    ]
    card.write_text("\n".join(lines))
