"""A fleet on one machine (issue 29): many workers of three GPU sizes, thousands of jobs from many
owners with mixed sizes and priorities, through the service's real routing.

Real: the database (Postgres or SQLite), the broker (Redis), job creation with its pre-flight
estimate (`jobs.create_job`, phi-2's config.json at four training sizes: 4.2, 12.7, 21.8 and
41.0 GiB), the dispatcher (`scheduler.dispatch`, run as a worker runs it after each job and as the
API's sweep runs it), the class queues, and each worker's claim, lease-renewing progress
writes, preemption hand-back and finish (`app.services.runs`). Stand-ins: the workers are
threads of this process, each consuming its class's queue with kombu as a Celery worker does,
and the trainer sleeps (the job's `metadata.sim_s` seconds, in 4 progress steps) instead of
training; their GPUs are rows in the registry.

It reports: jobs placed on a GPU that doesn't hold them (must be 0); fitting-worker idle time
while a job it holds waited; each owner's share of GPU time while every owner still had jobs
waiting, against the fair share; the wait of one job from an owner arriving mid-run (the others
have dozens queued); waits by priority; dispatch latency (one `dispatch` call, and a worker's
gap from finishing a job to receiving its next id); database statements per dispatch as the
queue shrinks (SQLAlchemy's before_cursor_execute, counted on the dispatching thread only).

usage: python3 bench/fleet_sim.py [--workers 20,20,10] [--jobs 2000] [--owners 20]
       [--database-url URL (default: a fresh database on FINETUNE_TEST_POSTGRES_URL's server,
        else SQLite)] [--broker-url redis://127.0.0.1:6379/9] [--speed 1.0] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue as stdlib_queue
import random
import secrets
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

log = logging.getLogger("fleet_sim")

MIB = 2**20
# (name, MiB, bf16): a 16 GB T4, a 24 GB L4, an 80 GB A100
CARDS = [("Tesla T4", 15360, False), ("NVIDIA L4", 23034, True), ("NVIDIA A100 80GB", 81920, True)]
# training sizes of phi-2 (batch_size, gradient_checkpointing, max_seq_length), their share of the
# jobs and the simulated seconds of a job of each (before --speed)
SIZES = [
    ((1, True, 512), 0.4, 1.0),  # 4.2 GiB: any card
    ((4, True, 2048), 0.3, 1.5),  # 12.7 GiB: any card
    ((8, True, 2048), 0.2, 2.0),  # 21.8 GiB: L4 or A100
    ((2, False, 2048), 0.1, 3.0),  # 41.0 GiB: A100 only
]
PRIORITIES = [("high", 0.1), ("normal", 0.7), ("low", 0.2)]
PROGRESS_STEPS = 4
LOCK = threading.Lock()  # the count of waiting jobs, shared by the threads


@dataclass
class Run:
    job_id: str
    owner: str
    priority: str
    worker: str
    card_bytes: int
    needs_bytes: int | None
    received: float
    claimed: float
    ended: float = 0.0
    outcome: str = ""


@dataclass
class Record:
    """What the simulation saw, appended to from every thread (lists are thread-safe to append)."""

    runs: list[Run] = field(default_factory=list)
    dispatches: list[tuple[int, int, int, float]] = field(
        default_factory=list
    )  # (waiting, statements, placed, s)
    gaps: list[float] = field(default_factory=list)  # a worker's finish → its next id
    submitted: dict[str, float] = field(default_factory=dict)
    late_job: str | None = None


def configure(database_url: str, broker_url: str, data_dir: Path, local_root: Path) -> None:
    os.environ.update(
        FINETUNE_DATABASE_URL=database_url,
        FINETUNE_BROKER_URL=broker_url,
        FINETUNE_DATA_DIR=str(data_dir),
        FINETUNE_LOCAL_ROOTS=json.dumps([str(local_root)]),
        FINETUNE_QUEUE=f"fleet-sim-{secrets.token_hex(4)}",
        FINETUNE_AUTH="false",
        HF_HUB_OFFLINE="1",
    )
    from app import db, queue, settings

    for cached in (settings.get_settings, db.get_engine, db._session_factory, queue.get_celery):
        cached.cache_clear()


def phi2_base(folder: Path) -> str:
    config = json.loads((REPO / "bench" / "phi-2-config.json").read_text())
    config.pop("auto_map", None)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


class Counter:
    """Statements the database ran on the thread that is dispatching."""

    def __init__(self) -> None:
        self.local = threading.local()

    def __call__(self, *_args: Any) -> None:
        if getattr(self.local, "active", False):
            self.local.count += 1

    def dispatch(self, record: Record, waiting: list[int]) -> list[str]:
        from app.services import scheduler

        self.local.active, self.local.count = True, 0
        started = time.perf_counter()
        try:
            placed = scheduler.dispatch()
        finally:
            self.local.active = False
        record.dispatches.append((waiting[0], self.local.count, len(placed), time.perf_counter() - started))
        return placed


def worker_loop(
    name: str,
    card: tuple[str, int, bool],
    counter: Counter,
    record: Record,
    waiting: list[int],
    stop: threading.Event,
    registered: threading.Barrier,
) -> None:
    """One worker: register (and dispatch, as worker.heartbeat does), then take ids from its
    class's queue, claim, sleep in steps writing progress, finish (or hand back when paused
    for a high-priority job), dispatch."""
    from app.queue import get_celery, job_queue
    from app.routing import GpuClass, class_queue
    from app.services import workers

    gpus = [{"name": card[0], "memory_bytes": card[1] * MIB, "bf16": card[2], "capability": "0.0"}]
    signature = GpuClass.of(gpus).signature
    workers.register(name, job_queue(), gpus, signature)
    registered.wait()
    renewed = time.monotonic()
    counter.dispatch(record, waiting)
    finished_at = None
    with get_celery().connection_for_read() as connection:
        inbox = connection.SimpleQueue(class_queue(signature))
        while not stop.is_set():
            if time.monotonic() - renewed > workers.RENEW_S:  # as worker.heartbeat renews it
                workers.register(name, job_queue(), gpus, signature)
                renewed = time.monotonic()
            try:
                message = inbox.get(block=True, timeout=0.5)
            except stdlib_queue.Empty:
                continue
            if finished_at is not None:
                record.gaps.append(time.monotonic() - finished_at)
            job_id = message.decode()[0][0]
            try:
                finished_at = run_one(job_id, name, card, signature, record, waiting) or finished_at
            except Exception:  # a worker logs what went wrong and takes the next id
                log.exception("%s: job %s", name, job_id)
            message.ack()
            counter.dispatch(record, waiting)
        inbox.close()
    workers.unregister(name)


def run_one(
    job_id: str, name: str, card: tuple[str, int, bool], signature: str, record: Record, waiting: list[int]
) -> float | None:
    """A worker's run of one delivered id, as worker.tasks.execute_job with a sleeping trainer;
    when it ended (None: the id was another's)."""
    from app.models import JobStatus
    from app.services import runs
    from app.services.runs import PAUSE

    received = time.monotonic()
    claim = runs.claim_job(job_id, routed_to=signature)
    if claim is None:  # a second delivery of an id another took: dropped, as JobDelivery does
        return None
    with LOCK:
        waiting[0] -= 1
    owner, needs_bytes = _owner_and_needs(job_id)
    run = Run(
        job_id, owner, claim.spec.priority, name, card[1] * MIB, needs_bytes, received, time.monotonic()
    )
    record.runs.append(run)
    seconds = float((claim.spec.metadata or {}).get("sim_s", "1"))
    stopped = None
    for step in range(1, PROGRESS_STEPS + 1):
        time.sleep(seconds / PROGRESS_STEPS)
        row = {"step": step, "loss": 1.0 / step, "time": _now()}
        stopped = runs.report_progress(claim, step, [row])
        if stopped == PAUSE:
            break
    if stopped == PAUSE and (high := runs.preempted_for(claim)):
        runs.hand_back(claim, f"paused for the high-priority job {high}")
        with LOCK:
            waiting[0] += 1
        run.outcome = "preempted"
    else:
        runs.finish_job(claim, JobStatus.SUCCEEDED, "done")
        run.outcome = "succeeded"
    run.ended = time.monotonic()
    return run.ended


def _owner_and_needs(job_id: str) -> tuple[str, int | None]:
    from app.db import session_scope
    from app.models import Job

    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job.owner, job.needs_bytes


def _now():
    from app.models import utcnow

    return utcnow()


def sweeper_loop(counter: Counter, record: Record, waiting: list[int], stop: threading.Event) -> None:
    """The API's periodic sweep (lease expiry, lost ids, dispatch), every 2 s."""
    from app.services.sweeper import sweep

    while not stop.wait(2.0):
        sweep()
        counter.dispatch(record, waiting)


def submit(spec_of: dict[str, Any], owner: str, record: Record) -> str:
    from app.services import jobs
    from app.spec import JobSpec

    submitted = time.monotonic()  # before: creating a job dispatches it, and a worker may take it at once
    job = jobs.create_job(JobSpec.model_validate(spec_of), owner)
    record.submitted[job.id] = submitted
    return job.id


def job_spec(
    base: str, rng: random.Random, speed: float, priority: str | None = None, size: int | None = None
) -> dict[str, Any]:
    chosen = SIZES[size] if size is not None else rng.choices(SIZES, weights=[s[1] for s in SIZES])[0]
    (batch, checkpointing, length), _, seconds = chosen
    priority = priority or rng.choices([p for p, _ in PRIORITIES], weights=[w for _, w in PRIORITIES])[0]
    return {
        "base_model": base,
        "priority": priority,
        "training": {"batch_size": batch, "gradient_checkpointing": checkpointing, "max_seq_length": length},
        "metadata": {"sim_s": f"{seconds * rng.uniform(0.75, 1.25) / speed:.3f}"},
    }


def simulate(
    fleet: tuple[int, int, int],
    jobs: int,
    owners: int,
    speed: float,
    base: str,
    seed: int = 29,
    late_high: float = 0.05,
) -> tuple[dict[str, Any], Record]:
    """Submit `jobs` (minus a share `late_high` of high-priority ones, submitted while the fleet
    runs), start the fleet, add one job of a new owner mid-run, run until every job has ended."""
    from sqlalchemy import event

    from app.db import get_engine

    rng = random.Random(seed)
    record = Record()
    counter = Counter()
    event.listen(get_engine(), "before_cursor_execute", counter)
    late = int(jobs * late_high)
    submitting = time.monotonic()
    names = [f"owner{n:02d}" for n in range(owners)]
    for n in range(jobs - late):
        submit(job_spec(base, rng, speed), names[n % owners], record)
    submit_s = time.monotonic() - submitting
    waiting = [jobs - late]
    stop = threading.Event()
    threads = []
    # the whole fleet is registered before the late jobs come: the pre-flight check judges a job
    # by the GPUs registered when it is submitted, and a thread not yet started has none
    fleet_registered = threading.Barrier(sum(fleet) + 1)
    started = time.monotonic()
    for kind, count in enumerate(fleet):
        for n in range(count):
            name = f"sim-{CARDS[kind][0].split()[-1].lower()}-{n}@fleet"
            threads.append(
                threading.Thread(
                    target=worker_loop,
                    args=(name, CARDS[kind], counter, record, waiting, stop, fleet_registered),
                )
            )
    threads.append(threading.Thread(target=sweeper_loop, args=(counter, record, waiting, stop)))
    for thread in threads:
        thread.start()
    fleet_registered.wait()
    # the late high-priority jobs arrive over the run's first part; then one job of a new owner
    # (the smallest size: any worker holds it), while every other owner still has dozens queued
    for _ in range(late):
        time.sleep(0.1 / speed)
        with LOCK:
            waiting[0] += 1
        submit(job_spec(base, rng, speed, priority="high"), names[rng.randrange(owners)], record)
    time.sleep(1.0 / speed)
    with LOCK:
        waiting[0] += 1
    record.late_job = submit(job_spec(base, rng, speed, priority="normal", size=0), "latecomer", record)
    total = jobs + 1
    deadline = time.monotonic() + max(600.0, 10 * jobs / speed)
    while sum(run.outcome == "succeeded" for run in record.runs) < total:
        if time.monotonic() > deadline:
            raise SystemExit(f"gave up: {sum(r.outcome == 'succeeded' for r in record.runs)} of {total} ran")
        time.sleep(0.2)
    elapsed = time.monotonic() - started
    stop.set()
    for thread in threads:
        thread.join()
    event.remove(get_engine(), "before_cursor_execute", counter)
    result = report(record, fleet, owners, elapsed)
    result["submit_s_before_the_fleet_starts"] = round(submit_s, 1)
    return result, record


def report(record: Record, fleet: tuple[int, int, int], owners: int, elapsed: float) -> dict[str, Any]:
    runs = [run for run in record.runs if run.ended]
    misplaced = [
        run.job_id for run in runs if run.needs_bytes is not None and run.needs_bytes > run.card_bytes
    ]
    # idle while a job the worker's card holds was waiting: from a worker's finish to the start
    # of a job it could have taken that was submitted before that finish and claimed after it
    by_worker = defaultdict(list)
    for run in runs:
        by_worker[run.worker].append(run)
    idle = 0.0
    claims = sorted(runs, key=lambda run: run.claimed)
    for worker_runs in by_worker.values():
        worker_runs.sort(key=lambda run: run.claimed)
        card = worker_runs[0].card_bytes
        for before, after in zip(worker_runs, [*worker_runs[1:], None], strict=True):
            free_at = before.ended
            next_own = after.received if after else float("inf")
            # the earliest job this card holds, waiting at free_at, that someone claimed later
            waiting_fit = next(
                (
                    run.claimed
                    for run in claims
                    if run.claimed > free_at
                    and record.submitted[run.job_id] < free_at
                    and (run.needs_bytes or 0) <= card
                ),
                None,
            )
            if waiting_fit is not None:
                idle += max(0.0, min(next_own, waiting_fit) - free_at)
    # GPU time by owner while every owner still had a job waiting (until the first owner's last start)
    done = [run for run in runs if run.owner != "latecomer"]
    window_end = min(
        max(run.claimed for run in done if run.owner == owner) for owner in {r.owner for r in done}
    )
    window_start = min(run.claimed for run in done)
    share: dict[str, float] = defaultdict(float)
    for run in done:
        share[run.owner] += max(0.0, min(run.ended, window_end) - max(run.claimed, window_start))
    total_share = sum(share.values()) or 1.0
    shares = {owner: round(seconds / total_share, 4) for owner, seconds in sorted(share.items())}
    waits: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        if run.outcome == "succeeded" or run.outcome == "preempted":
            waits[run.priority].append(run.claimed - record.submitted[run.job_id])
    late = next(run for run in runs if run.job_id == record.late_job)
    late_submitted = record.submitted[late.job_id]
    ahead_of_late = sum(
        late_submitted < run.received < late.received and run.priority != "high" for run in runs
    )
    mean_s = statistics.mean(run.ended - run.claimed for run in runs if run.outcome == "succeeded")
    dispatch_s = sorted(d[3] for d in record.dispatches)
    longest = max(d[0] for d in record.dispatches) or 1
    buckets: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for queued, statements, placed, _ in record.dispatches:
        label = f"{(queued * 4 // (longest + 1)) * 25}-{(queued * 4 // (longest + 1)) * 25 + 25}%"
        buckets[label].append((statements, placed))
    return {
        "fleet": dict(zip([card[0] for card in CARDS], fleet, strict=True)),
        "jobs_run": len({run.job_id for run in runs}),
        "preempted_runs": sum(run.outcome == "preempted" for run in runs),
        "elapsed_s": round(elapsed, 1),
        "misplaced": len(misplaced),
        "idle_while_fitting_job_waited_s": round(idle, 2),
        "worker_busy_s": round(sum(run.ended - run.claimed for run in runs), 1),
        "gpu_share_while_all_owners_waited": shares,
        "fair_share": round(1 / owners, 4),
        "share_min_max": [min(shares.values()), max(shares.values())],
        "late_owner_wait_s": round(late.claimed - record.submitted[late.job_id], 2),
        "mean_job_s": round(mean_s, 2),
        "late_owner_job_s": round(late.ended - late.claimed, 2),
        "jobs_not_high_started_while_late_job_waited": ahead_of_late,
        "wait_s_by_priority_mean": {p: round(statistics.mean(w), 2) for p, w in waits.items()},
        "dispatch_call_ms_p50_p99": [round(1000 * percentile(dispatch_s, q), 2) for q in (0.5, 0.99)],
        "finish_to_next_id_ms_p50_p99": [
            round(1000 * percentile(sorted(record.gaps), q), 1) for q in (0.5, 0.99)
        ],
        "dispatches": len(record.dispatches),
        "statements_per_dispatch_by_queue_length": {
            label: {
                "dispatches": len(rows),
                "mean": round(statistics.mean(s for s, _ in rows), 2),
                "max": max(s for s, _ in rows),
                "per_job_placed": round(sum(s for s, _ in rows) / max(1, sum(p for _, p in rows)), 2),
                "max_when_placing_one": max((s for s, p in rows if p == 1), default=None),
            }
            for label, rows in sorted(buckets.items(), key=lambda item: int(item[0].split("-")[0]))
        },
        "longest_queue": longest,
    }


def scale_probe(queued: int, fleet_workers: int, owners: int, samples: int = 20) -> dict[str, Any]:
    """One dispatcher at a larger scale than the run above can simulate here: `queued` waiting
    jobs (written straight into the table, mixed owners, priorities and sizes) and `fleet_workers`
    registered workers in the three classes. The first dispatch fills every free worker; then
    `samples` times one job ends and one dispatch places the next: its time and statements."""
    from sqlalchemy import event, insert, select, update

    from app.db import get_engine, session_scope
    from app.ids import new_job_id
    from app.models import Job, JobStatus, utcnow
    from app.queue import job_queue
    from app.routing import GpuClass
    from app.services import workers
    from app.spec import PRIORITY_RANKS

    rng = random.Random(7)
    for n in range(fleet_workers):
        card = CARDS[0 if n % 5 < 2 else 1 if n % 5 < 4 else 2]
        gpus = [{"name": card[0], "memory_bytes": card[1] * MIB, "bf16": card[2], "capability": "0.0"}]
        workers.register(f"probe-{n}@fleet", job_queue(), gpus, GpuClass.of(gpus).signature)
    sizes = [4.2, 12.7, 21.8, 41.0]
    now = utcnow()
    started = time.monotonic()
    for first in range(0, queued, 5000):
        rows = [
            {
                "id": new_job_id(),
                "owner": f"owner{rng.randrange(owners):02d}",
                "status": JobStatus.QUEUED,
                "spec": {},
                "created_at": now,
                "updated_at": now,
                "current_step": 0,
                "attempts": 0,
                "cancel_requested": False,
                "pause_requested": False,
                "priority": PRIORITY_RANKS[rng.choices(["high", "normal", "low"], [1, 7, 2])[0]],
                "needs_bytes": int(rng.choices(sizes, [4, 3, 2, 1])[0] * 2**30),
                "needs_gpus": 1,
                "needs_bf16": False,
            }
            for _ in range(min(5000, queued - first))
        ]
        with session_scope() as session:
            session.execute(insert(Job), rows)
    written_s = time.monotonic() - started
    counter, record = Counter(), Record()
    event.listen(get_engine(), "before_cursor_execute", counter)
    try:
        waiting = [queued]
        first_placed = counter.dispatch(record, waiting)
        for _ in range(samples):
            with session_scope() as session:  # one routed job ends
                job_id = session.scalar(
                    select(Job.id).where(Job.status == JobStatus.QUEUED, Job.routed_to.is_not(None)).limit(1)
                )
                session.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.SUCCEEDED))
            counter.dispatch(record, waiting)
    finally:
        event.remove(get_engine(), "before_cursor_execute", counter)
    first, rest = record.dispatches[0], record.dispatches[1:]
    return {
        "queued": queued,
        "workers": fleet_workers,
        "rows_written_s": round(written_s, 1),
        "first_dispatch": {"placed": len(first_placed), "statements": first[1], "s": round(first[3], 2)},
        "one_job_dispatch_ms_p50_max": [
            round(1000 * percentile(sorted(d[3] for d in rest), 0.5), 1),
            round(1000 * max(d[3] for d in rest), 1),
        ],
        "one_job_dispatch_statements": sorted({d[1] for d in rest}),
    }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    return values[min(len(values) - 1, int(q * len(values)))]


def fresh_database(server_url: str) -> tuple[str, Any]:
    """A new Postgres database on `server_url`'s server, migrated; and how to drop it."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from app import migrate

    name = f"fleet_sim_{secrets.token_hex(4)}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    migrate.upgrade(url)

    def drop() -> None:
        from app.db import get_engine

        get_engine().dispose()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return url, drop


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", default="20,20,10", help="T4,L4,A100 workers")
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--owners", type=int, default=20)
    parser.add_argument("--speed", type=float, default=1.0, help="divides every job's simulated seconds")
    parser.add_argument("--database-url", default="")
    parser.add_argument(
        "--broker-url", default=os.environ.get("FINETUNE_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--scale-probe",
        metavar="QUEUED,WORKERS",
        help="instead of the run: time the dispatcher with this many jobs waiting and workers registered",
    )
    args = parser.parse_args()
    fleet = tuple(int(n) for n in args.workers.split(","))
    assert len(fleet) == 3
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        drop = None
        url = args.database_url
        if not url and os.environ.get("FINETUNE_TEST_POSTGRES_URL"):
            url, drop = fresh_database(os.environ["FINETUNE_TEST_POSTGRES_URL"])
        elif not url:
            from app import migrate

            url = f"sqlite:///{root / 'finetune.db'}"
            migrate.upgrade(url)
        configure(url, args.broker_url, root / "data", root)
        try:
            if args.scale_probe:
                queued, registered = (int(n) for n in args.scale_probe.split(","))
                result = scale_probe(queued, registered, args.owners)
            else:
                result, _ = simulate(fleet, args.jobs, args.owners, args.speed, phi2_base(root / "phi-2"))
        finally:
            drop_queues(args.broker_url)
            if drop:
                drop()
    result["database"] = "postgresql" if url.startswith("postgresql") else "sqlite"
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


def drop_queues(broker_url: str) -> None:
    """The simulation's own queues on the broker (its FINETUNE_QUEUE prefix), nothing else."""
    if not broker_url.startswith("redis"):
        return
    import redis

    from app.settings import get_settings

    client = redis.Redis.from_url(broker_url)
    prefix = get_settings().queue
    for pattern in (f"{prefix}*", f"_kombu.binding*.{prefix}*"):
        for key in client.scan_iter(match=pattern):
            client.delete(key)
    client.close()


if __name__ == "__main__":
    main()
