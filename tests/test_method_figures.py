"""A method's own figures (DPO's rewards, margins, accuracies, log-probabilities) in every
surface of a job's metric rows: stored and merged per step, the logs as JSON, text, CSV and a
live stream, `logs --follow`, and OpenAI's job events and result file. Rows move through the
services a worker calls, on a real database (no worker, no model)."""

from __future__ import annotations

import asyncio
import csv
import io
import json

from app.api.logs import CSV_COLUMNS, metric_events
from app.client import commands
from app.client.http import ServiceClient
from app.models import utcnow
from app.services import runs
from tests.conftest import TEST_OWNER
from tests.helpers import metric_stream

# As TRL's DPOTrainer logs them: a training row's, then its evaluation's.
TRAIN = {
    "rewards/chosen": 0.12,
    "rewards/rejected": -0.05,
    "rewards/margins": 0.17,
    "rewards/accuracies": 0.75,
    "logps/chosen": -85.2,
    "logps/rejected": -97.0,
}
EVAL = {f"eval_{name}": value / 2 for name, value in TRAIN.items()}


def running_job(client) -> runs.Claim:
    response = client.post("/jobs", json={})
    assert response.status_code == 201, response.text
    return runs.claim_job(response.json()["id"])


def train_row(step: int, **figures: float) -> dict:
    loss = round(0.69 - step / 100, 2)
    return {"step": step, "loss": loss, "learning_rate": 1e-5, "time": utcnow(), "figures": figures}


def eval_row(step: int, **figures: float) -> dict:
    return {"step": step, "eval_loss": 0.7, "time": utcnow(), "figures": figures}


def dpo_job(client) -> runs.Claim:
    """Steps 1-3 trained, step 2 evaluated (its evaluation in a later write than its row)."""
    claim = running_job(client)
    runs.report_progress(claim, 2, [train_row(1, **TRAIN), train_row(2, **TRAIN)])
    runs.report_progress(claim, 2, [eval_row(2, **EVAL)])
    runs.report_progress(claim, 3, [train_row(3, **TRAIN)])
    return claim


def logs(client, job_id: str, **params) -> list[dict]:
    return client.get(f"/jobs/{job_id}/logs", params=params).json()["items"]


def test_a_steps_training_and_evaluation_figures_are_merged_into_its_row(client):
    claim = running_job(client)
    # given a training row, then in a later write its evaluation
    runs.report_progress(claim, 1, [train_row(1, **TRAIN)])
    runs.report_progress(claim, 1, [eval_row(1, **EVAL)])
    # and a step whose row and evaluation arrive in one write, the evaluation first
    runs.report_progress(claim, 2, [eval_row(2, **EVAL), train_row(2, **TRAIN)])
    # a figure named again takes the later value; a row without figures leaves them
    runs.report_progress(claim, 2, [train_row(2, **{"rewards/margins": 0.5}), eval_row(2)])
    # a figure that is not a number (a diverged step) is left out; the row's others are kept
    runs.report_progress(claim, 3, [train_row(3, **{"rewards/margins": float("nan"), "rewards/chosen": 1.0})])
    runs.report_progress(claim, 3, [train_row(3, **{"rewards/rejected": float("inf")})])

    rows = logs(client, claim.job_id)
    assert rows[0]["figures"] == TRAIN | EVAL
    assert rows[1]["figures"] == TRAIN | EVAL | {"rewards/margins": 0.5}
    assert rows[2]["figures"] == {"rewards/chosen": 1.0}
    # the fixed columns merge as before
    assert [(r["loss"], r["eval_loss"]) for r in rows] == [(0.68, 0.7), (0.67, 0.7), (0.66, None)]


def test_a_supervised_jobs_rows_have_no_figures_and_its_tables_no_figure_columns(client):
    claim = running_job(client)
    runs.report_progress(claim, 2, [{"step": 1, "loss": 2.0, "time": utcnow()}, eval_row(1)])
    runs.report_progress(claim, 2, [{"step": 2, "loss": 1.9, "time": utcnow(), "figures": None}])

    assert [r["figures"] for r in logs(client, claim.job_id)] == [None, None]
    table = client.get(f"/jobs/{claim.job_id}/logs", params={"format": "csv"}).text
    assert table.splitlines()[0] == ",".join(CSV_COLUMNS)
    text = client.get(f"/jobs/{claim.job_id}/logs", params={"format": "text"}).text
    assert text.splitlines()[0].endswith("step=1 loss=2.0000 eval_loss=0.7000")


def test_text_logs_print_the_figures_after_the_standard_fields(client):
    job_id = dpo_job(client).job_id

    lines = client.get(f"/jobs/{job_id}/logs", params={"format": "text"}).text.splitlines()
    assert lines[0].split(" ", 1)[1] == (
        "step=1 loss=0.6800 lr=1.000e-05 logps/chosen=-85.2 logps/rejected=-97 rewards/accuracies=0.75"
        " rewards/chosen=0.12 rewards/margins=0.17 rewards/rejected=-0.05"
    )
    assert " eval_loss=0.7000 lr=1.000e-05 eval_logps/chosen=-42.6 " in lines[1]
    assert lines[1].endswith(" rewards/rejected=-0.05")


def test_csv_logs_have_a_column_per_figure_of_the_job_on_every_page(client):
    job_id = dpo_job(client).job_id
    names = sorted(TRAIN | EVAL)

    table = list(csv.reader(io.StringIO(client.get(f"/jobs/{job_id}/logs", params={"format": "csv"}).text)))
    assert table[0] == [*CSV_COLUMNS, *names]
    step_2 = dict(zip(table[0], table[2], strict=True))
    assert {name: float(step_2[name]) for name in names} == TRAIN | EVAL
    step_1 = dict(zip(table[0], table[1], strict=True))
    assert [step_1[name] for name in EVAL] == [""] * len(EVAL)
    # a page without an evaluated step still has the eval set's columns
    page = client.get(f"/jobs/{job_id}/logs", params={"format": "csv", "after_step": 2}).text
    assert next(csv.reader(io.StringIO(page))) == [*CSV_COLUMNS, *names]


def test_the_live_stream_and_logs_follow_carry_the_figures(client, capsys):
    claim = running_job(client)
    runs.report_progress(claim, 1, [train_row(1, **TRAIN)])

    async def watch() -> list[tuple[str, int, dict | None]]:
        seen = []
        async for event in metric_events(claim.job_id, TEST_OWNER, -1):
            if event["event"] == "end":
                return seen
            row = json.loads(event["data"])
            seen.append((event["event"], row["step"], row["figures"]))
            if len(seen) == 1:  # step 1 sent; its evaluation arrives after it, then the job ends
                runs.report_progress(claim, 1, [eval_row(1, **EVAL)])
                runs.finish_job(claim, "succeeded", "finished")
        raise AssertionError("the stream ended without an end event")

    assert asyncio.run(watch()) == [("metric", 1, TRAIN), ("eval", 1, TRAIN | EVAL)]

    # over HTTP, the finished job's row already merged: its metric event, then its eval event
    events = metric_stream(client, claim.job_id)
    assert [(e.event, e.json().get("figures")) for e in events] == [
        ("metric", TRAIN | EVAL),
        ("eval", TRAIN | EVAL),
        ("end", None),
    ]

    # and from the command line: accuracy and margin, the eval set's once evaluated
    service = ServiceClient("http://testserver")
    service.http.close()
    service.http = client  # the app in-process (closed by its fixture)
    commands._follow(service, claim.job_id)
    step, evaluation, _ = capsys.readouterr().out.splitlines()
    assert step.startswith("step 1 ") and evaluation.startswith("eval 1 ")
    assert step.endswith("  acc 0.75 margin 0.17  eval acc 0.38 margin 0.085")


def test_openai_events_and_result_file_carry_the_figures_by_their_names(client):
    claim = dpo_job(client)
    runs.finish_job(claim, "succeeded", "finished")
    job_id = claim.job_id

    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
    metrics = {e["data"]["step"]: e["data"] for e in events if e["type"] == "metrics"}
    assert metrics[2]["train_loss"] == 0.67 and metrics[2]["valid_loss"] == 0.7
    assert {name: metrics[2][name] for name in TRAIN | EVAL} == TRAIN | EVAL
    assert "eval_rewards/margins" not in metrics[1] and metrics[1]["rewards/margins"] == 0.17

    [results] = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["result_files"]
    table = list(csv.DictReader(io.StringIO(client.get(f"/v1/files/{results}/content").text)))
    assert [row["step"] for row in table] == ["1", "2", "3"]
    assert float(table[1]["train_loss"]) == 0.67 and float(table[1]["eval_rewards/accuracies"]) == 0.375
    assert list(table[0])[-len(TRAIN | EVAL) :] == sorted(TRAIN | EVAL)
