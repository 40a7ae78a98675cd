"""The GPUs this worker may use, as it registers them (`app.services.workers`): read from
`nvidia-smi`, which asks the driver without creating a CUDA context (the Celery consumer that
registers must not: its forked pool child trains on CUDA). CUDA_VISIBLE_DEVICES narrows the
list as it narrows CUDA's; FINETUNE_GPU_MEMORY_GIB caps what each may use."""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

from app.settings import get_settings

QUERY = "index,uuid,name,memory.total,compute_cap"


def _visible(rows: list[list[str]]) -> list[list[str]]:
    wanted = os.environ.get("CUDA_VISIBLE_DEVICES")
    if wanted is None:
        return rows
    chosen = []
    for item in (part.strip() for part in wanted.split(",") if part.strip()):
        # an index, a whole UUID, or a UUID's unique prefix (GPU-8a3…)
        match = [row for row in rows if item == row[0] or (len(item) > 4 and row[1].startswith(item))]
        if not match:
            break  # CUDA stops at the first entry it can't find
        chosen.append(match[0])
    return chosen


def visible_gpus() -> list[dict[str, Any]]:
    """[{"name", "memory_bytes", "bf16", "capability"}] for each GPU; [] where there is none
    (no driver, no nvidia-smi) or nvidia-smi fails."""
    command = shutil.which("nvidia-smi")
    if command is None:
        return []
    try:
        out = subprocess.run(
            [command, f"--query-gpu={QUERY}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    rows = [[cell.strip() for cell in line.split(",")] for line in out.splitlines() if line.strip()]
    cap = get_settings().gpu_memory_gib
    gpus = []
    for row in _visible([row for row in rows if len(row) == 5]):
        try:
            memory = int(float(row[3]) * 2**20)  # MiB
            major, _, minor = row[4].partition(".")
            capability = (int(major), int(minor or 0))
        except ValueError:
            continue
        if cap:
            memory = min(memory, int(cap * 2**30))
        gpus.append(
            {
                "name": row[2],
                "memory_bytes": memory,
                "bf16": capability >= (8, 0),
                "capability": f"{capability[0]}.{capability[1]}",
            }
        )
    return gpus
