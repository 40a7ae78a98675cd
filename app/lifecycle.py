"""Every status change a job can make, and who makes it: the one place for these rules.

OWNER_ACTIONS says what a job's owner may do in each status and where it takes the job;
SERVICE_MOVES what the worker and the sweeper do. `app.services.transitions.move_job`, the one
function that changes a job's status, refuses any move not listed here. Every job response lists
the owner's actions allowed now (`actions`), and the dashboard and the CLI read that list
instead of keeping rules of their own. Changing a rule is changing a line here."""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

from app.models import TERMINAL_STATUSES, JobStatus


class JobAction(StrEnum):
    PAUSE = "pause"
    CANCEL = "cancel"
    RESUME = "resume"


# The action is taken by the job's worker at its next step boundary (a checkpoint is saved
# first); the job stays running until then, with `pause_requested` / `cancel_requested` set.
AT_NEXT_STEP = "at the next step"

# Where a stop asked for AT_NEXT_STEP takes a running job once its worker gets there.
AT_NEXT_STEP_ENDS_IN = {JobAction.PAUSE: JobStatus.PAUSED, JobAction.CANCEL: JobStatus.CANCELLED}

# For each status, the owner's actions allowed in it and where each one takes the job.
OWNER_ACTIONS: dict[JobStatus, dict[JobAction, JobStatus | str]] = {
    JobStatus.QUEUED: {JobAction.PAUSE: JobStatus.PAUSED, JobAction.CANCEL: JobStatus.CANCELLED},
    JobStatus.RUNNING: {JobAction.PAUSE: AT_NEXT_STEP, JobAction.CANCEL: AT_NEXT_STEP},
    JobStatus.PAUSED: {JobAction.RESUME: JobStatus.QUEUED, JobAction.CANCEL: JobStatus.CANCELLED},
    JobStatus.FAILED: {JobAction.RESUME: JobStatus.QUEUED},
    JobStatus.CANCELLED: {JobAction.RESUME: JobStatus.QUEUED},
    JobStatus.SUCCEEDED: {},
}


def statuses_allowing(action: JobAction, *, at_once: bool | None = None) -> tuple[JobStatus, ...]:
    """The statuses in which `action` is allowed (only those where it takes effect at once, or
    only those where the worker takes it at its next step, if `at_once` says)."""
    return tuple(
        status
        for status, actions in OWNER_ACTIONS.items()
        if action in actions and (at_once is None or (actions[action] != AT_NEXT_STEP) == at_once)
    )


def allowed_actions(
    status: JobStatus, *, pause_requested: bool = False, cancel_requested: bool = False
) -> list[JobAction]:
    """The owner's actions allowed now. A stop already asked for is not asked again; a job being
    cancelled is not paused."""
    actions = list(OWNER_ACTIONS.get(status, {}))
    if cancel_requested:
        actions = [a for a in actions if a not in (JobAction.PAUSE, JobAction.CANCEL)]
    if pause_requested:
        actions = [a for a in actions if a != JobAction.PAUSE]
    return actions


def refusal(action: JobAction, status: JobStatus) -> str:
    """Why `action` is a 409 in `status`, naming the statuses that allow it."""
    return f"job is {status}; only {_either(statuses_allowing(action))} jobs can be {_done(action)}"


def _done(action: JobAction) -> str:
    return {JobAction.PAUSE: "paused", JobAction.CANCEL: "cancelled", JobAction.RESUME: "resumed"}[action]


def _either(statuses: Iterable[str]) -> str:
    names = list(statuses)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


# What the service itself moves a job through: (from, to, who, when). The worker and the sweeper
# make these moves (app/services/runs.py, app/services/sweeper.py); together with OWNER_ACTIONS
# they are every status change there is, and docs/architecture.md's diagram is drawn from both.
SERVICE_MOVES: tuple[tuple[JobStatus, JobStatus, str, str], ...] = (
    (JobStatus.QUEUED, JobStatus.RUNNING, "worker", "claims it under a lease"),
    (JobStatus.RUNNING, JobStatus.SUCCEEDED, "worker", "every step trained, adapter saved"),
    (JobStatus.RUNNING, JobStatus.FAILED, "worker", "training raised"),
    (JobStatus.RUNNING, JobStatus.PAUSED, "worker", "pause requested, checkpoint saved"),
    (JobStatus.RUNNING, JobStatus.CANCELLED, "worker", "cancel requested"),
    (
        JobStatus.RUNNING,
        JobStatus.QUEUED,
        "worker",
        "shutting down, or paused for a high-priority job: handed back without spending an attempt",
    ),
    (JobStatus.RUNNING, JobStatus.QUEUED, "sweeper", "lease expired, queued from the last checkpoint"),
    (JobStatus.RUNNING, JobStatus.FAILED, "sweeper", "lease expired, attempts used up"),
    (JobStatus.RUNNING, JobStatus.PAUSED, "sweeper", "lease expired while pausing"),
    (JobStatus.RUNNING, JobStatus.CANCELLED, "sweeper", "lease expired while cancelling"),
)


# Every (from, to) pair a status change may make: the owner's and the service's.
MOVES: frozenset[tuple[JobStatus, JobStatus]] = frozenset(
    [
        (status, target)
        for status, actions in OWNER_ACTIONS.items()
        for target in actions.values()
        if isinstance(target, JobStatus)
    ]
    + [(before, after) for before, after, _, _ in SERVICE_MOVES]
)


class IllegalMove(ValueError):
    """A status change that no rule here allows: a bug in the caller, never a user's error."""


def check_move(before: JobStatus, after: JobStatus) -> None:
    if (before, after) not in MOVES:
        raise IllegalMove(f"no rule moves a job from {before} to {after}")


def state_diagram() -> str:
    """The lifecycle as a Mermaid state diagram: the owner's actions and the service's moves."""
    lines = ["stateDiagram-v2", f"    [*] --> {JobStatus.QUEUED}: POST /jobs"]
    for status, actions in OWNER_ACTIONS.items():
        for action, target in actions.items():
            if target == AT_NEXT_STEP:
                lines.append(f"    {status} --> {status}: {action} (taken at the next step)")
            else:
                lines.append(f"    {status} --> {target}: {action}")
    for before, after, who, when in SERVICE_MOVES:
        lines.append(f"    {before} --> {after}: {who}, {when}")
    lines += [f"    {status} --> [*]" for status in TERMINAL_STATUSES if not OWNER_ACTIONS[status]]
    return "\n".join(lines)
