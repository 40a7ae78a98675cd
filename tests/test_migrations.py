"""The schema is built only by the migrations, and they match the models (`alembic check`)."""

from __future__ import annotations

from alembic import command
from sqlalchemy import create_engine, inspect

from app import migrate


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
