"""What ids and names look like: the one definition that models, specs and every route's checks
read. An id of the wrong shape can't exist and is never sent to the database."""

from __future__ import annotations

import re
import secrets

# 96 random bits: ids are unguessable, so they can double as capability links.
_RANDOM = r"[0-9a-f]{24}"
STEP = r"[0-9]{1,12}"

# Patterns without anchors, for routes' path and query parameters; compiled and anchored below.
JOB_ID_PATTERN = rf"job_{_RANDOM}"
DATASET_ID_PATTERN = rf"ds_{_RANDOM}"
SAMPLE_ID_PATTERN = rf"smp_{_RANDOM}"
EXPORT_ID_PATTERN = rf"exp_{_RANDOM}"
CHECKPOINT_NAME_PATTERN = rf"checkpoint-{STEP}"

JOB_ID = re.compile(f"^{JOB_ID_PATTERN}$")
DATASET_ID = re.compile(f"^{DATASET_ID_PATTERN}$")
SAMPLE_ID = re.compile(f"^{SAMPLE_ID_PATTERN}$")
EXPORT_ID = re.compile(f"^{EXPORT_ID_PATTERN}$")
CHECKPOINT_NAME = re.compile(f"^{CHECKPOINT_NAME_PATTERN}$")


def _new(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def new_job_id() -> str:
    return _new("job_")


def new_dataset_id() -> str:
    return _new("ds_")


def new_sample_id() -> str:
    return _new("smp_")


def new_export_id() -> str:
    return _new("exp_")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step}"
