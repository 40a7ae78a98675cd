"""The fleet simulation (bench/fleet_sim.py), short: 5 workers of three GPU sizes, 100 jobs from 5
owners with mixed sizes and priorities, through the real database, Redis, dispatcher, claim,
progress and finish path (the trainer sleeps). Its invariants, not its timings: no job on a GPU
that doesn't hold it, every job run, priorities first, a newly arrived owner's single job ahead
of every other owner's backlog, and a bounded number of statements per dispatch whatever the
length of the queue."""

from __future__ import annotations

import pytest

from app.services.scheduler import PREEMPT_LOOKS_AT
from tests.conftest import reset_caches
from tests.test_preflight import phi2_base

FLEET = (2, 2, 1)  # T4, L4, A100


@pytest.mark.slow
def test_a_small_fleet_runs_every_job_where_it_fits_in_priority_and_turn_order(redis_env, monkeypatch):
    from bench.fleet_sim import drop_queues, simulate

    monkeypatch.setenv("FINETUNE_BROKER_URL", redis_env["FINETUNE_BROKER_URL"])
    reset_caches()

    try:
        result, record = simulate(FLEET, jobs=100, owners=5, speed=20, base=phi2_base(redis_env))
    finally:
        drop_queues(redis_env["FINETUNE_BROKER_URL"])  # and their bindings, which the fixture leaves

    assert result["misplaced"] == 0 and result["jobs_run"] == 101
    assert all(run.needs_bytes is not None for run in record.runs)  # every job was estimated
    waits = result["wait_s_by_priority_mean"]
    assert waits["high"] < waits["normal"] < waits["low"]
    # the new owner's one job waits for no other owner's backlog: at most the ids already on
    # their way to a worker when it came (one per worker) start before it
    assert result["jobs_not_high_started_while_late_job_waited"] <= sum(FLEET)
    # statements per dispatch: a fixed few, two per class, three per job placed, three per
    # waiting high job looked at for a preemption; never one per waiting job
    classes = len(FLEET)
    for queued, statements, placed, _ in record.dispatches:
        assert statements <= 6 + 2 * classes + 3 * placed + 3 * PREEMPT_LOOKS_AT, (queued, statements, placed)
