"""The schema is built only by the migrations, and they match the models (`alembic check`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text

from app import migrate
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
