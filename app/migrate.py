"""Run the Alembic migrations (the only way the schema is built, in tests too)."""

from __future__ import annotations

from alembic import command
from alembic.config import Config

from app.settings import get_settings

# A package path, not a file path: it resolves wherever `app` is imported from (a checkout, an
# editable install, a wheel in site-packages).
SCRIPT_LOCATION = "app:migrations"


def alembic_config(database_url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    config.set_main_option("sqlalchemy.url", database_url or get_settings().database_url)
    config.attributes["configure_logging"] = False
    return config


def upgrade(database_url: str | None = None) -> None:
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(database_url), "head")


def check(database_url: str | None = None) -> None:
    """Raise if the models and the migrations disagree (`alembic check`)."""
    command.check(alembic_config(database_url))
