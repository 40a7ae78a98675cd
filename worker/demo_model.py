"""Writes the offline demo model: Phi-2's architecture and tokenizer, shrunk, from a fixed seed."""

from __future__ import annotations

from pathlib import Path

WEIGHTS = "model.safetensors"


def ensure_demo_model(directory: Path, seed: int = 0) -> Path:
    """Add seeded random weights to a folder holding a Phi config and tokenizer; idempotent."""
    if (directory / WEIGHTS).exists():
        return directory
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tmp = directory / ".tmp-weights"
    model.save_pretrained(tmp)
    (tmp / WEIGHTS).replace(directory / WEIGHTS)
    for leftover in tmp.iterdir():
        leftover.unlink()
    tmp.rmdir()
    return directory
