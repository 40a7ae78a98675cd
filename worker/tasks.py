"""The tasks: run a job, analyze an upload, answer a sample, each given only an id; the
database rows record how they ended."""

from __future__ import annotations

import logging
import os

from app.models import JobStatus
from app.queue import TASK_ANALYZE_DATASET, TASK_GENERATE_SAMPLE, TASK_RUN_JOB
from app.services import jobs, runs
from app.services.runs import CANCEL, PAUSE, SHUTDOWN, LeaseLost
from app.settings import get_settings
from worker.celery_app import celery
from worker.lease import LeaseKeeper
from worker.shutdown import stop_on_signal

log = logging.getLogger(__name__)


@celery.task(name=TASK_RUN_JOB)
def run_job(job_id: str) -> None:
    execute_job(job_id)


@celery.task(name=TASK_ANALYZE_DATASET)
def analyze_dataset(dataset_id: str, tokenizer: str, max_seq_length: int) -> None:
    from worker.analysis import analyze_dataset as analyze

    analyze(dataset_id, tokenizer, max_seq_length)


@celery.task(name=TASK_GENERATE_SAMPLE)
def generate_sample(sample_id: str) -> None:
    from worker.sampling import answer

    answer(sample_id)


def execute_job(job_id: str) -> None:
    """Claim the job, train it under a lease, record how it ended. A worker that loses its
    lease (the sweeper gave the job to another) stops and writes nothing more."""
    claim = runs.claim_job(job_id)
    if claim is None:
        # Cancelled before it started, or a second delivery of its id (a broker redelivery, an
        # id sent again by the sweeper) while another worker has it or after it ended.
        status = runs.skip_delivery(job_id)
        log.info("job %s is %s, not queued; delivery skipped", job_id, status)
        return
    log.info("job %s: attempt %d, resume from %s", job_id, claim.attempt, claim.resume_from or "start")
    settings = get_settings()
    try:
        with LeaseKeeper(claim, settings.lease_s / 3), stop_on_signal() as stop:
            try:
                # Imported here, in the task's own child process (the worker's parent never loads
                # torch or CUDA), and under the lease: the import alone takes seconds.
                from app.spec import JobSpec

                if JobSpec.model_validate(claim.spec).resources.gpus > 1:
                    from worker.training.distributed import launch

                    outcome = launch(claim, settings, stop)
                else:
                    # One process, one GPU: with more visible, the Trainer would spread the job
                    # over all of them (DataParallel). A deployment that gives this worker
                    # another GPU sets CUDA_VISIBLE_DEVICES itself (compose: FINETUNE_GPU).
                    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")
                    from worker.training.recipe import run_training

                    outcome = run_training(claim, settings, stop)
            except LeaseLost:
                raise
            except Exception as exc:
                log.exception("job %s failed", job_id)
                runs.finish_job(
                    claim, JobStatus.FAILED, "training failed", error=f"{type(exc).__name__}: {exc}"
                )
                return
            steps = outcome.summary["steps"]
            if outcome.stopped == SHUTDOWN:
                runs.hand_back(claim, "worker shutting down")
                jobs.dispatch(job_id)
                return
            if outcome.stopped == CANCEL:
                runs.finish_job(claim, JobStatus.CANCELLED, f"cancelled at step {steps}")
                return
            if outcome.stopped == PAUSE:
                runs.finish_job(claim, JobStatus.PAUSED, f"paused at step {steps}; checkpoint-{steps} saved")
                return
            adapter = outcome.adapter
            assert adapter is not None
            runs.finish_job(
                claim,
                JobStatus.SUCCEEDED,
                f"finished: {outcome.summary}",
                adapter={
                    "path": str(adapter.path),
                    "size_bytes": adapter.size_bytes,
                    "sha256": adapter.sha256,
                },
            )
    except LeaseLost as exc:
        log.warning("%s; stopped without writing more", exc)
