"""Compiled decoder layers kept on the data volume, so a job's first step skips the compile.

torch.compile's work for a job (Inductor's FX graphs, AOTAutograd's forward/backward pairs, the
Triton kernels and their autotuning, dynamo's record of which dimensions turned out dynamic)
lands by default in /tmp, which a restarted container loses. The worker points Inductor and
Triton at a folder under the data volume instead, one folder per key: torch and Triton versions,
the GPU's name and compute capability, and the model's config (the shapes and the code paths a
layer compiles to). Two jobs on the same base and card share the folder; a new torch, a new card
or a new base starts a folder of its own (the caches' own keys would tell them apart anyway; the
folder per key keeps one that grows stale removable as a whole).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

# config fields that name or place the model but don't change what a layer compiles to
_NOT_SHAPE = ("_name_or_path", "name_or_path", "transformers_version", "_commit_hash")


def cache_key(config: Any) -> str:
    """A short readable key: torch version, GPU, and a hash of the model's config."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover - a CPU build
        triton_version = "none"
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        gpu = f"{torch.cuda.get_device_name()}-sm{major}{minor}"
    else:
        gpu = "cpu"
    fields = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    described = json.dumps(
        {k: v for k, v in fields.items() if k not in _NOT_SHAPE}, sort_keys=True, default=str
    )
    digest = hashlib.sha256(f"{triton_version}\n{described}".encode()).hexdigest()[:16]
    readable = f"torch-{torch.__version__}-{gpu}-{fields.get('model_type', 'model')}"
    return "".join(c if c.isalnum() or c in "-._" else "_" for c in readable) + f"-{digest}"


def use_compile_cache(root: Path, config: Any) -> Path:
    """Point Inductor's and Triton's caches at `root`/<cache_key> (made if missing); returns it.

    Both are read from the environment when a compile needs them, so this takes effect for
    every compile after it in this process (and its compile workers started after it)."""
    folder = root / cache_key(config)
    (folder / "triton").mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    os.environ["TRITON_CACHE_DIR"] = str(folder / "triton")
    return folder


def cache_size_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
