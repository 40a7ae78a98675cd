"""Before a job is queued: does any registered worker have a GPU that can hold it?

The estimate (`app.memory_estimate`) needs the base's config.json: a local base's own, or a hub
model's from the Hugging Face cache (fetched once where the hub is reachable). The GPUs are
those the live workers of the job queue registered (`app.services.workers`).

A spec no registered GPU can hold is refused (422) with what to change; one that can't be
checked (no worker registered, a config that can't be read) is queued with a warning event.
`POST /preflight` and `finetune doctor SPEC` show the same result without queueing.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.architectures import ModelShape, UnreadableConfig, shape
from app.errors import InvalidFields
from app.memory_estimate import GIB, MemoryEstimate, estimate
from app.queue import job_queue
from app.routing import GpuClass, Needs
from app.schemas import FieldProblem, GpuRead, PreflightRead
from app.services import workers
from app.spec import JobSpec, split_revision

log = logging.getLogger(__name__)

# A hub config fetch may hold up a POST /jobs this long.
HUB_TIMEOUT_S = 5.0
# The shortest max_seq_length a suggestion offers.
SHORTEST_SUGGESTED_LENGTH = 256


@dataclass(frozen=True)
class Gpu:
    worker: str
    name: str
    memory_bytes: int
    bf16: bool

    def describe(self) -> str:
        return f"{self.name} ({self.memory_bytes / GIB:.1f} GiB)"


@dataclass
class Preflight:
    estimate: MemoryEstimate | None
    gpus: list[Gpu]
    workers: int
    # (field, message): why the spec can't run on any registered GPU
    problems: list[tuple[str, str]] = field(default_factory=list)
    # what the job's events should say (checked and fits, or why it wasn't checked)
    notes: list[str] = field(default_factory=list)
    fits: bool | None = None  # None: not checked


def _read_config(path: Path) -> dict[str, Any]:
    config = json.loads(path.read_text())
    if not isinstance(config, dict):
        raise ValueError("config.json is not a JSON object")
    return config


# hub configs found (a revision's config doesn't change) and when each missing one was last
# asked for; both bounded (the oldest entry goes)
_hub_configs: dict[tuple[str, str | None], dict[str, Any]] = {}
_hub_misses: dict[tuple[str, str | None], float] = {}
HUB_CACHE_SIZE = 256
HUB_MISS_RETRY_S = 300.0  # a base missing while the hub was unreachable is asked for again


def _hub_config(name: str, revision: str | None) -> dict[str, Any] | None:
    """A hub model's config.json: from the Hugging Face cache, else fetched (not with
    HF_HUB_OFFLINE); None when neither has it. A config found is kept for the process's life; a
    missing one is asked for again after HUB_MISS_RETRY_S, not on every submission (each asking
    can wait HUB_TIMEOUT_S)."""
    key = (name, revision)
    if key in _hub_configs:
        return _hub_configs[key]
    missed_at = _hub_misses.get(key)
    if missed_at is not None and time.monotonic() - missed_at < HUB_MISS_RETRY_S:
        return None
    config = _fetch_hub_config(name, revision)
    _hub_misses.pop(key, None)
    _remember(_hub_configs if config is not None else _hub_misses, key, config or time.monotonic())
    return config


def _remember(cache: dict, key: tuple[str, str | None], value: Any) -> None:
    if len(cache) >= HUB_CACHE_SIZE:
        cache.pop(next(iter(cache)))
    cache[key] = value


def _fetch_hub_config(name: str, revision: str | None) -> dict[str, Any] | None:
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json", revision=revision)
    if isinstance(cached, str):
        return _read_config(Path(cached))
    try:
        path = hf_hub_download(name, "config.json", revision=revision, etag_timeout=HUB_TIMEOUT_S)
        return _read_config(Path(path))
    except Exception as exc:  # offline, unreachable, gated, missing: the estimate is skipped
        log.info("no config.json for %s: %s", name, type(exc).__name__)
        return None


def base_shape(base_model: str) -> tuple[ModelShape | None, str]:
    """The base's shape, or None and why it couldn't be read."""
    try:
        if Path(base_model).is_absolute():
            config: dict[str, Any] | None = _read_config(Path(base_model) / "config.json")
        else:
            config = _hub_config(*split_revision(base_model))
        if config is None:
            return None, f"{base_model}'s config.json is neither in the Hugging Face cache nor reachable"
        return shape(config), ""
    except UnreadableConfig as exc:
        return None, f"the base's {exc}"
    except OSError:
        return None, "the base's config.json can't be read"
    except ValueError:
        return None, "the base's config.json is not a JSON object"


def registered_gpus() -> tuple[int, list[Gpu]]:
    """How many live workers take jobs, and their GPUs."""
    live = workers.live_workers(job_queue())
    gpus = [
        Gpu(worker.name, gpu["name"], int(gpu["memory_bytes"]), bool(gpu["bf16"]))
        for worker in live
        for gpu in worker.gpus
    ]
    return len(live), gpus


def _holds(spec: JobSpec, gpus: list[Gpu], need: int) -> bool:
    """One worker's GPUs hold the job, by the router's rule (`app.routing`: `resources.gpus`
    cards that each hold `need` bytes; data-parallel, each holds the whole model)."""
    by_worker: dict[str, list[dict[str, Any]]] = {}
    for gpu in gpus:
        by_worker.setdefault(gpu.worker, []).append({"memory_bytes": gpu.memory_bytes, "bf16": gpu.bf16})
    wanted = Needs(need, spec.resources.gpus, bf16=False)  # bfloat16 is checked on its own in `check`
    return any(GpuClass.of(cards).holds(wanted) for cards in by_worker.values())


def _with_training(spec: JobSpec, **changes: Any) -> JobSpec:
    return spec.model_copy(update={"training": spec.training.model_copy(update=changes)})


def suggestions(spec: JobSpec, model: ModelShape, gpus: list[Gpu]) -> list[str]:
    """Changes to the spec's training section, each enough alone to fit one of `gpus`."""

    def fits(candidate: JobSpec) -> bool:
        return _holds(candidate, gpus, estimate(candidate, model).needs_bytes)

    t = spec.training
    found = []
    if not t.gradient_checkpointing and fits(_with_training(spec, gradient_checkpointing=True)):
        found.append("training.gradient_checkpointing: true (recomputes activations instead of keeping them)")
    samples = t.batch_size * t.gradient_accumulation_steps
    smaller = range(t.batch_size - 1, 0, -1)
    # a batch size that divides the step's samples first: the step stays the same
    for batch in [b for b in smaller if samples % b == 0] + [b for b in smaller if samples % b]:
        if fits(_with_training(spec, batch_size=batch)):
            keep = (
                f" with gradient_accumulation_steps: {samples // batch} to keep {samples} samples a step"
                if samples % batch == 0
                else ""
            )
            found.append(f"training.batch_size: {batch}{keep}")
            break
    length = t.max_seq_length // 2
    while length >= SHORTEST_SUGGESTED_LENGTH:
        if fits(_with_training(spec, max_seq_length=length)):
            found.append(f"training.max_seq_length: {length} (longer samples are cut)")
            break
        length //= 2
    return found


def check(spec: JobSpec) -> Preflight:
    model, unread = base_shape(spec.base_model)
    memory = estimate(spec, model) if model is not None else None
    count, gpus = registered_gpus()
    result = Preflight(estimate=memory, gpus=gpus, workers=count)
    if count == 0:
        result.notes.append(
            "pre-flight: no worker is registered, so nothing checked that a GPU can hold this job"
            + (f" (it needs {memory.describe()})" if memory else "")
        )
        return result
    if not gpus:
        result.notes.append("pre-flight: the registered workers have no GPU; the job trains on a CPU")
        return result
    if spec.quantization.compute_dtype == "bfloat16":
        gpus = [gpu for gpu in gpus if gpu.bf16]
        if not gpus:
            result.problems.append(
                (
                    "quantization.compute_dtype",
                    "no registered GPU supports bfloat16 ("
                    + ", ".join(sorted({g.name for g in result.gpus}))
                    + "); use 'auto' or 'float16'",
                )
            )
    most = max(Counter(gpu.worker for gpu in gpus).values(), default=0)
    if gpus and spec.resources.gpus > most:
        result.problems.append(
            (
                "resources.gpus",
                f"{spec.resources.gpus} GPUs on one worker; the registered workers have at most {most}",
            )
        )
    if memory is None:
        result.notes.append(f"pre-flight: memory not estimated: {unread}")
    elif gpus and not result.problems:
        largest = max(gpus, key=lambda gpu: gpu.memory_bytes)
        if _holds(spec, gpus, memory.needs_bytes):
            result.notes.append(f"pre-flight: needs {memory.describe()}; fits {largest.describe()}")
        else:
            options = suggestions(spec, model, gpus) if model is not None else []
            remedy = (
                "Fits with any one of: " + "; ".join(options) if options else "No training change fits it"
            )
            message = (
                f"needs {memory.describe()}; the largest registered GPU is {largest.describe()}. {remedy}"
            )
            result.problems.append(("training", message + " (finetune doctor SPEC shows the estimate)"))
    result.fits = not result.problems if (memory is not None or result.problems) else None
    return result


def read(result: Preflight) -> PreflightRead:
    """The API's view: worker names stay on the server (they name its hosts)."""
    memory = result.estimate
    numbers = {name: n for n, name in enumerate(sorted({gpu.worker for gpu in result.gpus}), start=1)}
    return PreflightRead(
        fits=result.fits,
        needs_gib=round(memory.needs_bytes / GIB, 2) if memory else None,
        peak_allocated_gib=round(memory.peak_bytes / GIB, 2) if memory else None,
        micro_batch=f"{memory.rows} × {memory.tokens // memory.rows} tokens" if memory else None,
        parts_gib={part: round(size / GIB, 2) for part, size in memory.parts.items()} if memory else None,
        workers=result.workers,
        gpus=[
            GpuRead(
                worker=numbers[gpu.worker],
                name=gpu.name,
                memory_gib=round(gpu.memory_bytes / GIB, 1),
                bf16=gpu.bf16,
                holds_job=gpu.memory_bytes >= memory.needs_bytes if memory else None,
            )
            for gpu in result.gpus
        ],
        problems=[FieldProblem(field=name, message=message) for name, message in result.problems],
        notes=result.notes,
    )


def needs(spec: JobSpec, result: Preflight) -> Needs:
    """What the router asks of a worker for this job (`app.routing`)."""
    return Needs(
        result.estimate.needs_bytes if result.estimate else None,
        spec.resources.gpus,
        spec.quantization.compute_dtype == "bfloat16",
    )


def admit(spec: JobSpec) -> tuple[list[str], Needs]:
    """The notes for a job's events and what it needs of a worker, or InvalidFields when no
    registered GPU can hold it."""
    result = check(spec)
    if result.problems:
        raise InvalidFields(*result.problems)
    return result.notes, needs(spec, result)
