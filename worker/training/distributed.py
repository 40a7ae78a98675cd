"""Data-parallel jobs (`resources.gpus` > 1): the job's process launches torchrun with one
training process per GPU and keeps what it does for a one-GPU job — the lease, the cancel and
shutdown requests, how the job ends.

Rank 0 writes to the database (metrics, checkpoints, messages) exactly as a one-GPU run does;
the other ranks only train. Each step, rank 0 tells every rank whether to stop (cancel or
worker shutdown), so they all stop at the same step. The parent asks for a shutdown
checkpoint by creating a file rank 0 looks for; rank 0 leaves the outcome in a JSON file
(those files: app.storage.RunFiles, the job folder's `run`).

Without CUDA (tests, laptops) the ranks are CPU processes talking over gloo.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import worker.offline  # noqa: F401  # a rank is a fresh interpreter: no hub kernels in it either
from app.services.runs import Claim
from app.settings import Settings, get_settings
from app.storage import RunFiles, job_files
from worker.training.artifacts import ZipInfo

log = logging.getLogger(__name__)

POLL_S = 0.5


def check_gpus(gpus: int) -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() < gpus:
        raise RuntimeError(
            f"the job asks for {gpus} GPUs (resources.gpus) and this worker sees "
            f"{torch.cuda.device_count()}; run it on a host with that many, or lower resources.gpus"
        )


def launch(claim: Claim, settings: Settings, stop: threading.Event):
    """Train `claim`'s job on `resources.gpus` processes and return its Outcome."""
    from worker.training.recipe import Outcome

    gpus = claim.spec.resources.gpus
    check_gpus(gpus)
    files = job_files(claim.job_id, settings).run
    files.root.mkdir(parents=True, exist_ok=True)
    for stale in (files.stop, files.outcome):
        stale.unlink(missing_ok=True)
    files.claim.write_text(claim.to_json())

    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={gpus}",
        "-m",
        "worker.training.distributed",
        str(files.root),
    ]
    log.info("job %s: training on %d processes: %s", claim.job_id, gpus, " ".join(command))
    with files.log.open("ab") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        while process.poll() is None:
            if stop.is_set() and not files.stop.exists():
                files.stop.touch()  # rank 0 saves a checkpoint at the next step and all stop
            time.sleep(POLL_S)
    if process.returncode != 0 or not files.outcome.exists():
        tail = files.log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"torchrun exited with {process.returncode}; its log ends:\n{tail}")
    result = json.loads(files.outcome.read_text())
    adapter = result["adapter"]
    if adapter is not None:
        adapter = ZipInfo(Path(adapter["path"]), adapter["size_bytes"], adapter["sha256"])
    return Outcome(result["stopped"], adapter, result["summary"])


class StopFile(threading.Event):
    """An Event that is set once `path` exists (checked when asked)."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def is_set(self) -> bool:
        if not super().is_set() and self.path.exists():
            self.set()
        return super().is_set()


def rank_main(root: Path) -> None:
    """One rank of a data-parallel job (started by torchrun)."""
    import torch

    from worker.training.recipe import run_training

    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    logging.basicConfig(
        level=get_settings().log_level.upper(),
        format=f"%(asctime)s rank {rank} %(levelname)s %(name)s: %(message)s",
    )
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    files = RunFiles(root)
    claim = Claim.from_json(files.claim.read_text())
    outcome = run_training(claim, get_settings(), StopFile(files.stop))
    if rank == 0:
        adapter = dataclasses.asdict(outcome.adapter) if outcome.adapter else None
        if adapter:
            adapter["path"] = str(adapter["path"])
        result = {
            "stopped": outcome.stopped,
            "adapter": adapter,
            "summary": outcome.summary,
        }
        files.outcome_partial.write_text(json.dumps(result))
        os.replace(files.outcome_partial, files.outcome)


if __name__ == "__main__":
    rank_main(Path(sys.argv[1]))
