"""A fresh pool child imports the training stack while it waits for its job.

Every job runs in a new child (worker_max_tasks_per_child=1), and the child's first job used to
start by importing torch, transformers, peft and bitsandbytes: 15-20 s on two CPU cores. Celery
forks the next child as soon as the previous job ends (the first at worker start), so the child
starts that import from `worker_process_init` in a thread (Celery's parent waits only seconds
for a child's init to return) and the job finds it done, or part done.

Not in the parent: bitsandbytes' import initializes CUDA, and a parent with CUDA can't fork
children that use it. Not all of it on a CUDA build either: CUDA reads CUDA_VISIBLE_DEVICES once,
when it initializes, and a one-GPU job narrows it to GPU 0 only once it knows it is one
(worker.tasks); so there the warm-up stops short of peft and bitsandbytes, and their few seconds
stay in the job.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time

from celery.signals import worker_process_init

log = logging.getLogger(__name__)

# What a job imports before it trains, less what initializes CUDA: peft, which imports
# bitsandbytes, and whatever imports peft (worker.training.model, transformers' Trainer and its
# callbacks). 13 of the 17 s here; tests/test_boundaries.py checks that it stays CUDA-free.
WITHOUT_CUDA = (
    "torch",
    "transformers.modeling_utils",
    "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto",
    "transformers.data.data_collator",
    "datasets",
    "worker.training.data",
    "worker.training.preference_data",
    "worker.training.tracking",
)
# The job's own entry point: all the rest, where the torch build has no CUDA to initialize.
EVERYTHING = ("worker.training.recipe",)

NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"
_thread: threading.Thread | None = None
# The worker's parent imports this module; its pool children are forks of it. (The sampler's
# solo pool sends worker_process_init too, in the one process that runs its tasks: not warmed.)
_parent = os.getpid()


def training_modules() -> tuple[str, ...]:
    import torch

    return WITHOUT_CUDA if torch.backends.cuda.is_built() else WITHOUT_CUDA + EVERYTHING


def import_training_modules() -> None:
    started = time.monotonic()
    # while importing, torch.cuda.is_available() asks NVML instead of initializing CUDA, should
    # anything imported here ask it (see above: the job decides which GPUs CUDA sees); the job
    # itself keeps torch's own check
    nvml_check = os.environ.get(NVML_CHECK)
    os.environ[NVML_CHECK] = "1"
    try:
        for name in training_modules():
            importlib.import_module(name)
    except Exception:  # the job's own import fails the same way, and reports it on the job
        log.warning("warm-up: importing the training modules failed", exc_info=True)
        return
    finally:
        if nvml_check is None:
            os.environ.pop(NVML_CHECK, None)
        else:
            os.environ[NVML_CHECK] = nvml_check
    took = time.monotonic() - started
    log.info("warm-up: training modules imported in %.1f s (process %d)", took, os.getpid())


@worker_process_init.connect
def _start_warm_up(**_: object) -> None:
    global _thread
    if os.getpid() == _parent:
        return
    _thread = threading.Thread(target=import_training_modules, name="warm-up", daemon=True)
    _thread.start()


def wait_for_warm_up() -> None:
    """Let the warm-up finish before the job imports the same modules itself: one thread importing
    them, not two at once inside packages with import cycles (torch, transformers)."""
    if _thread is not None and _thread.is_alive():
        log.info("warm-up: the job waits for its imports to finish")
        _thread.join()
