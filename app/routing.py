"""Which workers may take a job: the one rule, in Python and in SQL.

A worker's class is the signature of the GPUs it registered: how many, the memory of the
smallest (a data-parallel job holds the whole model on each), and whether all do bfloat16. Each
class has its own broker queue, `<FINETUNE_QUEUE>.gpus.<signature>`, which every worker of the
class consumes (`finetune worker` picks it from the GPUs it sees), so a job id published there
reaches only GPUs that hold the job; Celery and the broker do the delivery, the dispatcher
(`app.services.scheduler`) only picks the queue. A worker without a GPU (a laptop, CI) is the
class `cpu`: it trains anything, slowly, as it always did.

A job's needs are stored with it when it is queued (`Job.needs_bytes`, `needs_gpus`,
`needs_bf16`), from the pre-flight estimate; a job whose memory could not be estimated (no
config.json reachable) needs only the GPU count and dtype.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, and_, or_, true

from app.memory_estimate import GIB
from app.models import Job
from app.settings import get_settings

MIB = 2**20
CPU = "cpu"
_SIGNATURE = re.compile(r"^(?P<count>\d+)x(?P<mib>\d+)mib(?P<bf16>-bf16)?$")


@dataclass(frozen=True)
class Needs:
    """What a job asks of a worker's GPUs."""

    bytes: int | None  # per GPU; None: not estimated
    gpus: int
    bf16: bool

    def describe(self, free: bool = False) -> str:
        """'a GPU with ≥ 41.0 GiB', 'a free GPU …', '2 GPUs of one worker with ≥ 12.0 GiB each'."""
        memory = f"≥ {self.bytes / GIB:.1f} GiB" if self.bytes is not None else "any memory"
        adjective = "free " if free else ""
        if self.gpus > 1:
            count, memory = f"{self.gpus} {adjective}GPUs of one worker", f"{memory} each"
        else:
            count = f"a {adjective}GPU"
        return f"{count} with {memory}" + (" and bfloat16" if self.bf16 else "")

    @classmethod
    def of(cls, job: Job) -> Needs:
        return cls(job.needs_bytes, job.needs_gpus, job.needs_bf16)


@dataclass(frozen=True)
class GpuClass:
    """A worker's GPUs as the router sees them: `count` cards of at least `memory_bytes` each."""

    count: int
    memory_bytes: int
    bf16: bool

    @classmethod
    def of(cls, gpus: Sequence[dict[str, Any]]) -> GpuClass:
        """The class of a worker's registered GPUs (`worker.gpus.visible_gpus`); memory rounds
        down to the MiB, so hosts with the same card share one class."""
        if not gpus:
            return cls(0, 0, False)
        smallest = min(int(gpu["memory_bytes"]) for gpu in gpus)
        return cls(len(gpus), smallest // MIB * MIB, all(bool(gpu["bf16"]) for gpu in gpus))

    @classmethod
    def parse(cls, signature: str) -> GpuClass | None:
        if signature == CPU:
            return cls(0, 0, False)
        match = _SIGNATURE.match(signature)
        if match is None:
            return None
        return cls(int(match["count"]), int(match["mib"]) * MIB, bool(match["bf16"]))

    @property
    def signature(self) -> str:
        if not self.count:
            return CPU
        return f"{self.count}x{self.memory_bytes // MIB}mib" + ("-bf16" if self.bf16 else "")

    def describe(self) -> str:
        if not self.count:
            return "a CPU worker"
        return f"{self.count}× {self.memory_bytes / GIB:.1f} GiB" + (" bf16" if self.bf16 else "")

    def holds(self, needs: Needs) -> bool:
        """The rule; `holds_sql` says the same over the jobs table."""
        if not self.count:
            return True  # trains on the CPU
        return (
            needs.gpus <= self.count
            and (needs.bytes is None or needs.bytes <= self.memory_bytes)
            and (self.bf16 or not needs.bf16)
        )

    def holds_sql(self) -> ColumnElement[bool]:
        if not self.count:
            return true()
        conditions = [
            Job.needs_gpus <= self.count,
            or_(Job.needs_bytes.is_(None), Job.needs_bytes <= self.memory_bytes),
        ]
        if not self.bf16:
            conditions.append(Job.needs_bf16.is_(False))
        return and_(*conditions)


def class_queue(signature: str) -> str:
    """The broker queue of a worker class."""
    return f"{get_settings().queue}.gpus.{signature}"


def signature_of_queue(queue: str) -> str | None:
    """The class a queue name belongs to, or None for another queue (the sampler's)."""
    prefix = f"{get_settings().queue}.gpus."
    if not queue.startswith(prefix):
        return None
    signature = queue.removeprefix(prefix)
    return signature if GpuClass.parse(signature) is not None else None
