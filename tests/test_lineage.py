"""A job that continues from an earlier job's adapter (`init_from`): checked and filled in when it
is created, over a real database (no worker: the earlier jobs are moved through the services a
worker calls)."""

from __future__ import annotations

from app.services import runs
from app.services.lineage import init_adapter_dir
from app.spec import InitFrom, JobSpec
from app.storage import job_files
from tests.conftest import DEMO_MODEL
from tests.test_preflight import T4, phi2_base, register

EARLIER = {
    "base_model": str(DEMO_MODEL),
    "quantization": {"compute_dtype": "float32"},
    "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
}


def submit(client, body: dict) -> dict:
    response = client.post("/jobs", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def succeeded(client, body: dict = EARLIER) -> dict:
    """A job that trained (as far as the database knows) and left its adapter on disk."""
    job = submit(client, body)
    files = job_files(job["id"])
    files.adapter_dir.mkdir(parents=True)
    (files.adapter_dir / "adapter_config.json").write_text("{}")
    claim = runs.claim_job(job["id"])
    adapter = {"path": str(files.adapter_zip), "size_bytes": 22, "sha256": "0" * 64}
    runs.finish_job(claim, "succeeded", "done", adapter=adapter)
    return job


def running_with_checkpoint(client, body: dict, step: int) -> dict:
    job = submit(client, body)
    claim = runs.claim_job(job["id"])
    zip_path = job_files(job["id"]).checkpoint_zip(f"checkpoint-{step}")
    runs.record_checkpoint(claim, f"checkpoint-{step}", step, str(zip_path), 22, "0" * 64, keep=2)
    return job


def refusal(client, body: dict, path: str = "/jobs") -> tuple[str, str]:
    response = client.post(path, json=body)
    assert response.status_code == 422, response.text
    [problem] = response.json()["detail"]
    return problem["field"], problem["message"]


def test_a_job_takes_its_base_quantization_and_lora_from_the_job_it_continues(client):
    earlier = succeeded(client)

    # the same value set again is no conflict; the rest of the spec is the new job's own
    again = {"init_from": {"job": earlier["id"]}, "lora": {"r": 8}, "training": {"max_steps": 5}}
    job = submit(client, again)

    spec = job["spec"]
    assert spec["init_from"] == {"job": earlier["id"], "checkpoint": None}
    for inherited in ("base_model", "quantization", "lora"):
        assert spec[inherited] == earlier["spec"][inherited], inherited
    assert spec["training"]["max_steps"] == 5
    assert init_adapter_dir(InitFrom(job=earlier["id"])) == job_files(earlier["id"]).adapter_dir


def test_a_chain_continues_from_a_checkpoint_of_a_job_that_continued_from_another(client):
    first = succeeded(client)
    second = running_with_checkpoint(client, {"init_from": {"job": first["id"]}}, step=2)

    third = submit(client, {"init_from": {"job": second["id"], "checkpoint": "checkpoint-2"}})

    assert third["spec"]["base_model"] == str(DEMO_MODEL) and third["spec"]["lora"]["r"] == 8
    assert init_adapter_dir(InitFrom(job=second["id"], checkpoint="checkpoint-2")) == (
        job_files(second["id"]).checkpoint_dir("checkpoint-2")
    )


def test_an_earlier_job_that_is_not_the_owners_is_no_job(client):
    from app.services import jobs

    others = jobs.create_job(JobSpec(), "bob").id
    nobody = "job_" + "0" * 24

    for job_id in (others, nobody):
        assert refusal(client, {"init_from": {"job": job_id}}) == ("init_from.job", f"no job {job_id!r}")


def test_an_adapter_that_is_not_there_is_refused_naming_the_field(client):
    running = running_with_checkpoint(client, EARLIER, step=2)

    field, message = refusal(client, {"init_from": {"job": running["id"]}})
    assert field == "init_from.job"
    assert "running and has no final adapter yet" in message and "init_from.checkpoint" in message
    assert "kept: checkpoint-2" in message

    field, message = refusal(client, {"init_from": {"job": running["id"], "checkpoint": "checkpoint-7"}})
    assert field == "init_from.checkpoint"
    assert "no checkpoint 'checkpoint-7'" in message and "kept: checkpoint-2" in message


def test_a_field_the_adapter_fixes_set_to_something_else_is_refused(client, service_env):
    earlier = succeeded(client)
    before = len(client.get("/jobs").json()["items"])
    continues = {"init_from": {"job": earlier["id"]}}

    field, message = refusal(client, {**continues, "base_model": "microsoft/phi-2"})
    assert field == "base_model"
    assert f"comes from the earlier job {earlier['id']}" in message and str(DEMO_MODEL) in message
    assert refusal(client, {**continues, "lora": {"r": 16}})[0] == "lora.r"
    assert refusal(client, {**continues, "quantization": {"compute_dtype": "float16"}})[0] == (
        "quantization.compute_dtype"
    )
    assert len(client.get("/jobs").json()["items"]) == before  # nothing queued


def test_preflight_estimates_the_earlier_jobs_base(client, service_env):
    register("celery@t4-box", T4)
    base = phi2_base(service_env)
    earlier = succeeded(client, {"base_model": base})
    own = client.post("/preflight", json={"base_model": base}).json()

    report = client.post("/preflight", json={"init_from": {"job": earlier["id"]}}).json()

    assert own["needs_gib"] and report["needs_gib"] == own["needs_gib"] and report["fits"] is True
    nobody = {"init_from": {"job": "job_" + "0" * 24}}
    assert refusal(client, nobody, "/preflight")[0] == "init_from.job"
