"""Files a user downloads: zips written atomically, with their sha256, and the model card."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.storage import being_written


@dataclass(frozen=True)
class ZipInfo:
    path: Path
    size_bytes: int
    sha256: str


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


def write_model_card(card: Path, spec: dict[str, Any], job_id: str, summary: dict[str, Any]) -> None:
    """The adapter's README.md (`JobFiles.model_card`): what it was trained from, how, and how
    it ended."""
    dataset = spec["dataset"]
    modules = spec["lora"]["target_modules"]  # "auto" and "all-linear" as peft resolved them:
    peft_config = card.parent / "adapter_config.json"
    if peft_config.is_file():
        resolved = json.loads(peft_config.read_text()).get("target_modules")
        modules = sorted(resolved) if isinstance(resolved, list) else resolved or modules
    lines = [
        f"# LoRA adapter for {spec['base_model']}",
        "",
        f"Trained by the fine-tune service, job `{job_id}`.",
        "",
        f"- Base model: `{spec['base_model']}` (4-bit {spec['quantization']['quant_type']}, "
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
        "```python",
        "from peft import AutoPeftModelForCausalLM",
        'model = AutoPeftModelForCausalLM.from_pretrained("path/to/this/folder")',
        "```",
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
