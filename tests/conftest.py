"""Fixtures that build real things: a migrated SQLite or Postgres database, a real broker,
the real tiny Phi model. Postgres and Redis join when FINETUNE_TEST_POSTGRES_URL /
FINETUNE_TEST_REDIS_URL are set (.ci/run sets both)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

# There is no model hub here: a hub id (the default tokenizer of an upload's token statistics,
# say) fails at once in every test process instead of after ~48 s of connection retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Python's compiled modules, kept outside the checkout and the venv: the venv is installed without
# them (Makefile: --no-compile) and the CI machine's environment, like the Dockerfile's, sets
# PYTHONDONTWRITEBYTECODE, so every process the suite starts compiled torch, transformers and
# peft from source again (a training process's imports: 17 s, 10 s compiled; an API's 4.5 s,
# 1.5 s). Set here for this process and, through the environment, for the ones it starts.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
os.environ.setdefault("PYTHONPYCACHEPREFIX", str(Path(tempfile.gettempdir()) / "finetune-test-pycache"))
sys.dont_write_bytecode = False
sys.pycache_prefix = os.environ["PYTHONPYCACHEPREFIX"]

REPO = Path(__file__).resolve().parent.parent
DEMO_JOB = REPO / "examples" / "demo-job.json"
DEMO_MODEL = REPO / "examples" / "tiny-phi2"

POSTGRES_URL = os.environ.get("FINETUNE_TEST_POSTGRES_URL")
REDIS_URL = os.environ.get("FINETUNE_TEST_REDIS_URL")

needs_redis = pytest.mark.skipif(not REDIS_URL, reason="FINETUNE_TEST_REDIS_URL not set")

DATABASES = ["sqlite"] + (["postgres"] if POSTGRES_URL else [])

# For slow tests whose subject is not the database: run them on SQLite only (the database
# paths they use are exercised on both elsewhere). Keeps CI within its time.
sqlite_only = pytest.mark.parametrize("service_env", ["sqlite"], indirect=True)

# The owner whose API key the test clients send.
TEST_OWNER = "alice"


def demo_spec(*, eval_samples: int | None = None, **training: object) -> dict:
    """The demo job, with training overrides (e.g. fewer steps for a quick test) and, to save
    time where eval_loss is not the subject, fewer validation samples."""
    spec = json.loads(DEMO_JOB.read_text())
    if eval_samples is not None:
        spec["dataset"]["max_eval_samples"] = eval_samples
    spec["base_model"] = str(DEMO_MODEL)
    for key in ("source", "validation_source"):
        spec["dataset"][key] = str(REPO / spec["dataset"][key])
    spec["training"].update(training)
    return spec


def reset_caches() -> None:
    from app import db, queue, settings

    if db.get_engine.cache_info().currsize:
        db.get_engine().dispose()
    for cached in (settings.get_settings, db.get_engine, db._session_factory, queue.get_celery):
        cached.cache_clear()


@contextmanager
def fresh_postgres_database(template: str | None = None) -> Iterator[str]:
    """A new database on the test server (empty, or a copy of `template`), dropped afterwards."""
    assert POSTGRES_URL
    name = "finetune_test_" + secrets.token_hex(6)
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else "")))
    try:
        yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


class MigratedTemplates:
    """Each kind of database migrated once per test session; every test gets a copy of it (a
    copied SQLite file, a Postgres database created from a template), not a fresh migration."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.sqlite: Path | None = None
        self.postgres: str | None = None
        self._postgres_cleanup = ExitStack()

    @contextmanager
    def copy(self, kind: str, data_dir: Path) -> Iterator[str]:
        from app import migrate

        if kind == "postgres":
            if self.postgres is None:
                url = self._postgres_cleanup.enter_context(fresh_postgres_database())
                migrate.upgrade(url)
                self.postgres = make_url(url).database
            with fresh_postgres_database(template=self.postgres) as url:
                yield url
            return
        if self.sqlite is None:
            self.sqlite = self.directory / "template.db"
            migrate.upgrade(f"sqlite:///{self.sqlite}")
        target = data_dir / "finetune.db"
        shutil.copyfile(self.sqlite, target)
        yield f"sqlite:///{target}"

    def close(self) -> None:
        self._postgres_cleanup.close()


@pytest.fixture(scope="session")
def migrated_templates(tmp_path_factory) -> Iterator[MigratedTemplates]:
    templates = MigratedTemplates(tmp_path_factory.mktemp("migrated"))
    yield templates
    templates.close()


@pytest.fixture(scope="session")
def demo_model() -> Path:
    from worker.demo_model import ensure_demo_model

    return ensure_demo_model(DEMO_MODEL)


@pytest.fixture(params=DATABASES)
def service_env(request, tmp_path: Path, monkeypatch, migrated_templates) -> Iterator[dict[str, str]]:
    """FINETUNE_* settings for one test: its own data dir, a migrated database (a copy of the
    session's), a broker in a SQLite file (tests that need Redis set their own). Applied to this
    process and returned for child processes."""

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (tmp_path / "models").mkdir()  # an operator's folder of local models and data (`local_models`)
    with migrated_templates.copy(request.param, data_dir) as url:
        env = {
            "FINETUNE_DATA_DIR": str(data_dir),
            "FINETUNE_DATABASE_URL": url,
            "FINETUNE_BROKER_URL": f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}",
            "FINETUNE_LOCAL_ROOTS": json.dumps([str(REPO / "examples"), str(tmp_path / "models")]),
            # its own queue names: test runs sharing a Redis never take each other's job ids
            "FINETUNE_QUEUE": unique_queue(),
            "FINETUNE_FLUSH_INTERVAL_S": "0",
            "FINETUNE_STREAM_POLL_S": "0.1",
        }
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        reset_caches()
        yield env
        reset_caches()


@pytest.fixture
def tmp_path_allowed(tmp_path: Path, monkeypatch) -> Iterator[Path]:
    """tmp_path, as a folder job specs may name local models and data in (FINETUNE_LOCAL_ROOTS)."""
    monkeypatch.setenv("FINETUNE_LOCAL_ROOTS", json.dumps([str(tmp_path)]))
    monkeypatch.setenv("FINETUNE_DATA_DIR", str(tmp_path / "data"))
    reset_caches()
    yield tmp_path
    reset_caches()


def local_models(service_env: dict[str, str]) -> Path:
    """The test's folder under FINETUNE_LOCAL_ROOTS for local models and data of its own."""
    return Path(service_env["FINETUNE_DATA_DIR"]).parent / "models"


def bearer(owner: str = TEST_OWNER) -> dict[str, str]:
    """Headers with a new API key for `owner` (in the database the test's settings name)."""
    from app.services.keys import create_key

    return {"Authorization": f"Bearer {create_key(owner)}"}


@pytest.fixture
def client(service_env):
    """The app in-process, sending an API key of TEST_OWNER's."""
    from fastapi.testclient import TestClient

    from app.api.main import create_app

    with TestClient(create_app(), headers=bearer()) as test_client:
        yield test_client


def unique_queue() -> str:
    return f"finetune-test-{secrets.token_hex(6)}"


def drop_queues(redis_url: str, queue: str) -> None:
    """Remove what kombu kept in Redis for `queue` and `queue.samples` (their messages, at
    every priority, and bindings), leaving other runs' keys alone."""
    import redis

    client = redis.Redis.from_url(redis_url)
    for pattern in (f"{queue}*", f"_kombu.binding.{queue}*"):
        for key in client.scan_iter(match=pattern):
            client.delete(key)
    client.close()


@pytest.fixture
def redis_env(service_env) -> Iterator[dict[str, str]]:
    """service_env with the test Redis as broker, under the test's own queue names; the test is
    skipped, with the reason, where FINETUNE_TEST_REDIS_URL is not set (a fresh machine)."""
    if not REDIS_URL:
        pytest.skip("needs Redis: FINETUNE_TEST_REDIS_URL not set")
    yield {**service_env, "FINETUNE_BROKER_URL": REDIS_URL, "FINETUNE_FLUSH_INTERVAL_S": "0.5"}
    drop_queues(REDIS_URL, service_env["FINETUNE_QUEUE"])


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `gpu` are skipped, with the reason, where torch sees no CUDA device."""
    gpu_tests = [item for item in items if "gpu" in item.keywords]
    if not gpu_tests:
        return
    import torch

    if not torch.cuda.is_available():
        for item in gpu_tests:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (marker gpu)"))
