"""The dispatcher: which queued job goes to which class of worker, and when.

Jobs stay `queued` in the database until a worker of a class that holds them (app/routing.py)
is free; then the dispatcher publishes the job's id to that class's queue, as many ids as the
class has free workers and no more. So the broker never holds a long first-in first-out line
that would defeat priorities: the order is decided here, at the moment a GPU frees, by

1. priority (high, normal, low),
2. the owner with the fewest jobs in flight (running, or published and not yet claimed),
3. the owner whose last turn (a job of theirs given a worker) is longest ago, so owners take
   turns: one with a single job waits for at most one job's turn of every other owner, however
   many those have queued (`OwnerTurn`),
4. age.

An owner at FINETUNE_MAX_RUNNING_PER_OWNER is passed over. Classes are served smallest GPUs
first, so a small job takes a small card and the big ones stay free for what needs them; any
class still takes any job it holds, so no fitting worker idles while such a job waits.

`dispatch` runs when a job is queued (created, resumed, re-queued), when a worker finishes a job
or registers, and in the API's periodic sweep. Concurrent runs (several API processes, workers)
are serialized by a lock on the decision (`app.db.serialize`: an advisory lock on Postgres,
SQLite's write lock): the decision reads counts (free workers, jobs in flight) that row locks on
job rows could not guard. Its queries do not grow with the queue: a fixed few per run, grouped by
class and by owner (bounded by the fleet and the owners), and two per job placed, all on the
index `ix_jobs_dispatch_order`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from app.db import changed_rows, serialize, session_scope
from app.errors import BrokerUnavailable
from app.models import Event, Job, JobStatus, OwnerTurn, Worker, utcnow
from app.queue import TASK_RUN_JOB, job_queue, send, waiting_messages
from app.routing import GpuClass, Needs, class_queue
from app.services.events import add_event
from app.services.workers import STALE
from app.settings import get_settings
from app.spec import PRIORITY_RANKS

log = logging.getLogger(__name__)

QUEUED, RUNNING = JobStatus.QUEUED, JobStatus.RUNNING
# Jobs that hold (or are about to hold) a worker: running, or published to a class's queue.
IN_FLIGHT = or_(Job.status == RUNNING, and_(Job.status == QUEUED, Job.routed_to.is_not(None)))
UNROUTED = and_(Job.status == QUEUED, Job.routed_to.is_(None))
NEVER = datetime.min.replace(tzinfo=UTC)  # the turn of an owner who never had one
BROKER_DOWN = "the broker did not answer; the job waits and is sent when it does"


@dataclass(frozen=True)
class LiveClass:
    gpus: GpuClass
    workers: int


def live_classes(session: Session) -> dict[str, LiveClass]:
    """The classes of the training workers that renewed their registration lately."""
    rows = session.execute(
        select(Worker.gpu_class, func.count())
        .where(Worker.queue == job_queue(), Worker.seen_at > utcnow() - STALE, Worker.gpu_class.is_not(None))
        .group_by(Worker.gpu_class)
    ).all()
    found: dict[str, LiveClass] = {}
    for signature, count in rows:
        gpus = GpuClass.parse(signature or "")
        if signature and gpus is not None:
            found[signature] = LiveClass(gpus, count)
    return found


def _in_flight_by(session: Session, column) -> dict[str, int]:
    return {
        key: count
        for key, count in session.execute(select(column, func.count()).where(IN_FLIGHT).group_by(column))
    }


def dispatch() -> list[str]:
    """Publish queued jobs to the queues of classes with free workers, in the order above.
    Returns the ids published. A broker that doesn't answer leaves the job queued and unrouted
    (its event says so, once); the next dispatch tries again."""
    placed = _place()
    sent = []
    for job_id, signature in placed:
        try:
            send(TASK_RUN_JOB, job_id, queue=class_queue(signature))
        except BrokerUnavailable as exc:
            log.warning("job %s: %s; it waits and is sent when the broker answers", job_id, exc)
            _unroute(job_id, signature, BROKER_DOWN)
            continue
        sent.append(job_id)
    return sent


def _place() -> list[tuple[str, str]]:
    """Decide and record (routed_to) which jobs go to which class now; committed before any id
    is published, so a worker that takes the id finds the row routed."""
    limit = get_settings().max_running_per_owner
    now = utcnow()
    placed: list[tuple[str, str]] = []
    with session_scope() as session:
        serialize(session, "dispatch")
        classes = live_classes(session)
        busy = _in_flight_by(session, Job.routed_to)
        free = {sig: live.workers - busy.get(sig, 0) for sig, live in classes.items()}
        free = {sig: n for sig, n in free.items() if n > 0}
        in_flight = _in_flight_by(session, Job.owner)
        turns: dict[str, datetime] = {}
        for signature in sorted(
            free, key=lambda sig: (classes[sig].gpus.memory_bytes, classes[sig].gpus.count)
        ):
            holds = classes[signature].gpus.holds_sql()
            # the oldest waiting job of each (owner, priority) this class holds
            heads = {
                (owner, priority): created
                for owner, priority, created in session.execute(
                    select(Job.owner, Job.priority, func.min(Job.created_at))
                    .where(UNROUTED, holds)
                    .group_by(Job.owner, Job.priority)
                )
            }
            _read_turns(session, turns, {owner for owner, _ in heads})
            while free[signature]:
                eligible = [
                    (priority, in_flight.get(owner, 0), turns.get(owner, NEVER), created, owner)
                    for (owner, priority), created in heads.items()
                    if not limit or in_flight.get(owner, 0) < limit
                ]
                if not eligible:
                    break
                priority, *_, owner = min(eligible)
                # this owner's next two at this priority: the one to place, and the new head
                rows = session.execute(
                    select(Job.id, Job.created_at)
                    .where(UNROUTED, holds, Job.owner == owner, Job.priority == priority)
                    .order_by(Job.created_at, Job.id)
                    .limit(2)
                ).all()
                if len(rows) > 1:
                    heads[owner, priority] = rows[1].created_at
                else:
                    del heads[owner, priority]
                if not rows:
                    continue
                job_id = rows[0].id
                changed_rows(
                    session,
                    update(Job)
                    .where(Job.id == job_id, UNROUTED)
                    .values(routed_to=signature, dispatched_at=now),
                )
                placed.append((job_id, signature))
                free[signature] -= 1
                in_flight[owner] = in_flight.get(owner, 0) + 1
                _take_turn(session, turns, owner, now)
        _preempt(session, classes, in_flight, limit)
    return placed


# How many waiting high-priority jobs one dispatch looks at for a running job to pause.
PREEMPT_LOOKS_AT = 8


def _preempt(session: Session, classes: dict[str, LiveClass], in_flight: dict[str, int], limit: int) -> None:
    """For each high-priority job still waiting (no free worker holds it), ask the lowest-priority
    running job on a class that holds it, the most recently started, to pause at its next
    checkpoint. It goes back in line then (worker/tasks.py), and its freed worker takes the
    high job: the dispatch after every finish gives it the first place. A job already pausing
    for one, or an owner at their running limit, asks for no other."""
    waiting_high = session.execute(
        select(Job.id, Job.owner, Job.needs_bytes, Job.needs_gpus, Job.needs_bf16)
        .where(UNROUTED, Job.priority == PRIORITY_RANKS["high"])
        .order_by(Job.created_at)
        .limit(PREEMPT_LOOKS_AT)
    ).all()
    if not waiting_high:
        return
    pausing_for = set(
        session.scalars(
            select(Job.preempted_for).where(Job.status == RUNNING, Job.preempted_for.is_not(None))
        )
    )
    for high_id, owner, needs_bytes, needs_gpus, needs_bf16 in waiting_high:
        if high_id in pausing_for or (limit and in_flight.get(owner, 0) >= limit):
            continue
        holding = [
            sig
            for sig, live in classes.items()
            if live.gpus.holds(Needs(needs_bytes, needs_gpus, needs_bf16))
        ]
        if not holding:
            continue
        victim = session.execute(
            select(Job.id, Job.priority)
            .where(
                Job.status == RUNNING,
                Job.routed_to.in_(holding),
                Job.priority > PRIORITY_RANKS["high"],
                Job.preempted_for.is_(None),
                Job.pause_requested.is_(False),
                Job.cancel_requested.is_(False),
            )
            .order_by(Job.priority.desc(), Job.started_at.desc())
            .limit(1)
        ).first()
        if victim is None:
            continue
        changed_rows(
            session,
            update(Job)
            .where(Job.id == victim.id, Job.status == RUNNING, Job.preempted_for.is_(None))
            .values(pause_requested=True, preempted_for=high_id),
        )
        add_event(
            session,
            victim.id,
            f"pausing at its next checkpoint for the high-priority job {high_id}, which no free GPU "
            "holds; it goes back in line and resumes by itself when a GPU frees",
            data={"preempted_for": high_id},
        )
        in_flight[owner] = in_flight.get(owner, 0) + 1  # counted against its owner's limit


def _read_turns(session: Session, turns: dict[str, datetime], owners: set[str]) -> None:
    """Add the last turns of `owners` not read yet (an owner with none has never had one)."""
    missing = owners - turns.keys()
    if missing:
        rows = session.execute(
            select(OwnerTurn.owner, OwnerTurn.last_turn_at).where(OwnerTurn.owner.in_(missing))
        )
        turns.update({owner: at for owner, at in rows})


def _take_turn(session: Session, turns: dict[str, datetime], owner: str, now: datetime) -> None:
    if owner in turns:
        session.execute(update(OwnerTurn).where(OwnerTurn.owner == owner).values(last_turn_at=now))
    else:
        session.add(OwnerTurn(owner=owner, last_turn_at=now))
        session.flush()
    turns[owner] = now


def _unroute(job_id: str, signature: str, reason: str) -> bool:
    """Put a routed, unclaimed job back in the dispatcher's line, saying why (once per reason in
    a row: a broker down for an hour doesn't fill the job's events)."""
    with session_scope() as session:
        moved = changed_rows(
            session,
            update(Job)
            .where(Job.id == job_id, Job.status == QUEUED, Job.routed_to == signature)
            .values(routed_to=None, dispatched_at=None),
        )
        last = session.scalar(
            select(Event.message).where(Event.job_id == job_id).order_by(Event.id.desc()).limit(1)
        )
        if moved and last != reason:
            add_event(session, job_id, reason, data={"class": signature})
        return bool(moved)


def redispatch() -> list[str]:
    """The API's periodic part: jobs routed to a class whose workers are all gone go back in the
    line (with an event saying so); so do those whose id has waited `redispatch_after_s`
    unclaimed while their class's queue holds fewer messages than that (the broker lost them:
    restarted without persistence, purged); then `dispatch`. Returns the ids published."""
    settings = get_settings()
    cutoff = utcnow() - timedelta(seconds=settings.redispatch_after_s)
    with session_scope() as session:
        live = live_classes(session)
        routed = session.execute(
            select(Job.id, Job.routed_to, Job.dispatched_at).where(
                Job.status == QUEUED, Job.routed_to.is_not(None)
            )
        ).all()
    stale_by_class: dict[str, list[str]] = {}
    for job_id, signature, sent_at in routed:
        if not signature:
            continue
        if signature not in live:
            gone = f"no live worker of its class ({signature}) any more; it waits for one that holds it"
            _unroute(job_id, signature, gone)
        elif sent_at is None or sent_at < cutoff:
            stale_by_class.setdefault(signature, []).append(job_id)
    for signature, ids in stale_by_class.items():
        if waiting_messages(class_queue(signature)) < len(ids):
            for job_id in ids:
                _unroute(job_id, signature, "its id was not taken from the broker in time; sent again")
    return dispatch()


def waiting(session: Session, job: Job) -> tuple[int | None, str | None]:
    """A queued job's place in the dispatcher's line (1: next; 0: published, a worker is taking
    it) and what it waits for, as a sentence; (None, None) for a job not queued.

    The place counts every waiting job of a higher priority, then owners' turns: ahead of the
    owner's k-th job at its priority are its own k-1 and up to k of every other owner's."""
    if job.status != QUEUED:
        return None, None
    classes = live_classes(session)
    needs = Needs.of(job)
    if job.routed_to is not None:
        gpus = GpuClass.parse(job.routed_to)
        where = gpus.describe() if gpus else job.routed_to
        return 0, f"a free worker ({where}) to take it from the queue"
    higher = session.scalar(select(func.count()).where(UNROUTED, Job.priority < job.priority)) or 0
    same = dict(
        session.execute(
            select(Job.owner, func.count()).where(UNROUTED, Job.priority == job.priority).group_by(Job.owner)
        ).all()
    )
    own_ahead = (
        session.scalar(
            select(func.count()).where(
                UNROUTED,
                Job.priority == job.priority,
                Job.owner == job.owner,
                or_(Job.created_at < job.created_at, and_(Job.created_at == job.created_at, Job.id < job.id)),
            )
        )
        or 0
    )
    turns = sum(min(count, own_ahead + 1) for owner, count in same.items() if owner != job.owner)
    position = higher + own_ahead + turns + 1
    limit = get_settings().max_running_per_owner
    if not classes:
        return position, "a worker to start (none is running)"
    if not any(live.gpus.holds(needs) for live in classes.values()):
        return position, f"a worker whose GPU holds it ({needs.describe()}); no running worker's does"
    if limit and _in_flight_by(session, Job.owner).get(job.owner, 0) >= limit:
        return position, f"{job.owner}'s running-job limit ({limit})"
    behind = f", behind {position - 1} job(s)" if position > 1 else ""
    return position, f"{needs.describe(free=True)}{behind}"


def unroutable_note(session: Session, needs: Needs) -> str | None:
    """The event for a job no running worker's GPUs hold (they went away since the pre-flight
    check, or the job is resumed): it waits, and is routed when such a worker registers."""
    classes = live_classes(session)
    if not classes or any(live.gpus.holds(needs) for live in classes.values()):
        return None
    return f"waits: no running worker's GPU holds it ({needs.describe()}); it is routed when one registers"
