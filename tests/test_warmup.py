"""A worker's pool child imports the training stack while it waits for a job (worker.warmup)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import sqlite_only
from tests.helpers import wait_until
from tests.processes import finetune_process

pytestmark = [pytest.mark.e2e, sqlite_only]

IMPORTED = re.compile(r"warm-up: training modules imported in [\d.]+ s \(process (\d+)\)")


def parent_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^PPid:\s+(\d+)", status, re.MULTILINE).group(1))  # type: ignore[union-attr]


def test_a_workers_pool_child_imports_the_training_modules_before_any_job(service_env, tmp_path):
    # given a worker that was sent no job
    with finetune_process("worker", service_env, tmp_path) as worker:
        log = tmp_path / "worker.log"

        # then its pool child has imported the job's training modules by itself
        found = wait_until(
            lambda: IMPORTED.search(log.read_text()),
            120,
            what="the pool child's warm-up to log its imports",
            every=0.5,
            state=lambda: log.read_text()[-3000:],
        )
        child = int(found.group(1))
        assert child != worker.pid, "the warm-up ran in the worker's parent, which must not import torch"
        assert parent_of(child) == worker.pid
        assert "importing the training modules failed" not in log.read_text()
