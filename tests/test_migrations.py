"""The schema is built only by the migrations, and they match the models (`alembic check`)."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import zipfile
from typing import Any

from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData, Table, create_engine, inspect, select, text
from sqlalchemy.orm import Session

from app import migrate
from app.ids import new_job_id
from app.models import Job, JobStatus, utcnow
from app.schemas import JobRead
from app.spec import JobSpec, stored_spec
from tests.conftest import REPO


def test_migrations_build_the_schema_and_agree_with_the_models(service_env):
    url = service_env["FINETUNE_DATABASE_URL"]

    migrate.check(url)  # raises when models and migrations drift apart

    engine = create_engine(url)
    tables = set(inspect(engine).get_table_names())
    engine.dispose()
    assert {"jobs", "metrics", "events", "checkpoints"} <= tables


def test_migrations_downgrade_to_nothing_and_back(service_env):
    url = service_env["FINETUNE_DATABASE_URL"]
    config = migrate.alembic_config(url)

    command.downgrade(config, "base")
    engine = create_engine(url)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    command.upgrade(config, "head")
    assert "jobs" in inspect(engine).get_table_names()
    engine.dispose()


def test_a_wheel_carries_the_migrations_and_migrates_outside_the_checkout(tmp_path):
    """Issue 17: migrations/ sat beside the package, so an installed wheel had none to run."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("app", "worker"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(tmp_path / "dist"), str(source)],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")

    shipped = set(zipfile.ZipFile(wheel).namelist())
    migrations = REPO / "app" / "migrations"
    expected = {f"app/migrations/versions/{path.name}" for path in (migrations / "versions").glob("*.py")}
    expected |= {"app/migrations/__init__.py", "app/migrations/env.py", "app/migrations/script.py.mako"}
    assert expected <= shipped, expected - shipped

    # installed (unpacked) elsewhere, run from a directory with no checkout in sight
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    database = tmp_path / "outside.db"
    env = {
        **os.environ,
        "PYTHONPATH": str(site),
        "FINETUNE_DATABASE_URL": f"sqlite:///{database}",
        "FINETUNE_DATA_DIR": str(tmp_path / "data"),
    }
    script = (
        "import app; from app import migrate; "
        f"assert app.__file__.startswith({str(site)!r}), app.__file__; migrate.upgrade()"
    )
    ran = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr

    engine = create_engine(f"sqlite:///{database}")
    with engine.connect() as connection:
        version = connection.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
    engine.dispose()
    assert version == ScriptDirectory.from_config(migrate.alembic_config("sqlite://")).get_current_head()


# The fields JobSpec gained after the first schema: a job stored before one came has no key for
# it (jobs store JobSpec's full dump, so a missing key means an older job, never a choice).
BEFORE_PACKING = ["training.packing", "training.packing_mode", "notify_url", "resources", "name", "metadata"]
FIRST_SCHEMA = BEFORE_PACKING + [
    "dataset.format",
    "dataset.conversations",
    "dataset.include_synthetic",
    "dataset.validation_split",
    "dataset.validation_source",
    "dataset.max_eval_samples",
    "training.eval_steps",
]


def stored_before(missing: list[str]) -> dict[str, Any]:
    spec = JobSpec().model_dump(mode="json")
    for name in missing:
        section, _, field = name.rpartition(".")
        del (spec[section] if section else spec)[field]
    return spec


def test_old_jobs_keep_what_their_specs_meant_when_a_default_changes(service_env):
    """Issue 17: a job stored before `training.packing` existed (default on since) resumed
    packed. 0007 writes the old meaning (packing off, and no evaluation for jobs older than
    validation_split) into every stored spec lacking the field; jobs with the field keep theirs."""
    url = service_env["FINETUNE_DATABASE_URL"]
    config = migrate.alembic_config(url)
    command.downgrade(config, "0006")

    current = JobSpec.model_validate({"training": {"packing_mode": "full_rows"}})
    specs = {
        "before_packing": stored_before(BEFORE_PACKING),
        "first_schema": stored_before(FIRST_SCHEMA),
        "current": current.model_dump(mode="json"),
    }
    specs["before_packing"]["training"]["max_steps"] = 7  # a value of the job's own stays
    engine = create_engine(url)
    old_jobs = Table("jobs", MetaData(), autoload_with=engine)  # as at 0006 (the model has more since)
    with engine.begin() as connection:
        ids = {}
        for kind, spec in specs.items():
            ids[kind] = new_job_id()
            now = utcnow()
            connection.execute(
                old_jobs.insert().values(
                    id=ids[kind],
                    owner="alice",
                    status=JobStatus.PAUSED,
                    spec=copy.deepcopy(spec),
                    created_at=now,
                    updated_at=now,
                    current_step=0,
                    attempts=0,
                    cancel_requested=False,
                    pause_requested=False,
                )
            )

    command.upgrade(config, "head")

    def stored() -> dict[str, dict[str, Any]]:
        with Session(engine) as session:
            rows = session.execute(select(Job.id, Job.spec)).all()
        return {kind: next(spec for job_id, spec in rows if job_id == ids[kind]) for kind in ids}

    after = stored()
    old = after["before_packing"]
    assert old["training"]["packing"] is False and old["training"]["packing_mode"] == "per_step"
    assert old["training"]["max_steps"] == 7
    assert old["resources"] == {"gpus": 1} and old["notify_url"] is None
    assert old["dataset"]["validation_split"] == "validation"  # it had one: kept
    assert stored_spec(old).training.packing is False  # what the worker trains a resumed job with
    # 0011: every job before methods was supervised, from a new adapter
    assert old["method"] == {"type": "supervised", "dpo": None} and old["init_from"] is None

    oldest = after["first_schema"]
    assert oldest["training"]["packing"] is False and oldest["dataset"]["validation_split"] is None
    assert oldest["dataset"]["format"] == "auto" and oldest["training"]["eval_steps"] is None
    assert stored_spec(oldest).dataset.validation_split is None  # no evaluation, as when it ran

    assert after["current"] == specs["current"]  # nothing missing, nothing written
    for spec in after.values():  # every stored spec is now complete: the API shows what is stored
        assert stored_spec(spec).model_dump(mode="json") == spec

    # downgrading is a no-op (the values are what those jobs meant all along); upgrading again
    # finds nothing to write
    command.downgrade(config, "0006")
    assert stored() == after
    command.upgrade(config, "head")
    assert stored() == after
    engine.dispose()


def test_specs_are_read_through_job_spec(service_env):
    """A stored spec lacking a field reads JobSpec's default (one place for defaults), in the API
    too, and its local paths are not checked again: a file gone since does not break a listing."""
    spec = stored_before(["training.packing_mode", "notify_url"])
    spec["base_model"] = "/models/removed-since"
    engine = create_engine(service_env["FINETUNE_DATABASE_URL"])
    with Session(engine) as session, session.begin():
        job = Job(owner="alice", status=JobStatus.PAUSED, spec=spec)
        session.add(job)
        session.flush()
        shown = JobRead.model_validate(job)
    engine.dispose()

    read = stored_spec(spec)
    assert read.training.packing_mode == "per_step" and read.base_model == "/models/removed-since"
    assert shown.spec == read.model_dump(mode="json")
    assert shown.spec["training"]["packing_mode"] == "per_step" and shown.spec["notify_url"] is None
