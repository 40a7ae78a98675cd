"""Engine and sessions: SQLite (WAL, busy timeout) or Postgres, chosen by the URL."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache, partial
from typing import Any, TypeVar, cast

from sqlalchemy import CursorResult, Engine, Executable, create_engine, event, text
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker
from tenacity import RetryCallState, retry, retry_if_exception_type, wait_exponential

from app.settings import get_settings

# The database did not answer (down, restarting, locked, no free connection): nothing was
# changed, and the same request may succeed shortly.
UNREACHABLE = (OperationalError, InterfaceError, PoolTimeout)


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        busy_s = get_settings().sqlite_busy_timeout_s
        engine = create_engine(url, connect_args={"timeout": busy_s, "check_same_thread": False})
        event.listen(engine, "connect", partial(_sqlite_pragmas, busy_ms=int(busy_s * 1000)))
        return engine
    return create_engine(url, pool_pre_ping=True)


def _sqlite_pragmas(dbapi_conn, _record, busy_ms: int) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


@lru_cache
def get_engine() -> Engine:
    settings = get_settings()
    if settings.database_url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    return make_engine(settings.database_url)


def _forget_parents_connections() -> None:
    """In a forked child (a Celery pool process): open new connections rather than share the
    parent's sockets (SQLAlchemy's advice for forking)."""
    if get_engine.cache_info().currsize:
        get_engine().dispose(close=False)


os.register_at_fork(after_in_child=_forget_parents_connections)


@lru_cache
def _session_factory() -> sessionmaker[Session]:
    return sessionmaker(get_engine(), expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session that commits on success and rolls back on error: the one place we commit."""
    session = _session_factory()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def serialize(session: Session, key: str) -> None:
    """Hold a lock named `key` until the session's transaction ends, so that a check and the
    write it allows (count the queued jobs, then insert one) can't interleave with another
    request's. PostgreSQL: an advisory lock per key. SQLite: its one write lock, taken now by
    a write that changes nothing (it serializes every writer anyway)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"), {"key": key})
    else:
        session.execute(text("UPDATE jobs SET id = id WHERE 0"))


F = TypeVar("F", bound=Callable)


def _lease_has_passed(state: RetryCallState) -> bool:
    elapsed = state.seconds_since_start  # None only before the first attempt has an outcome
    return elapsed is not None and elapsed >= get_settings().lease_s


def retry_while_unreachable(fn: F) -> F:
    """Retry `fn` while the database is unreachable, restarting or locked, for up to one lease
    period (after that the job's lease is gone anyway). For a worker's writes, which must not
    fail a training over a database blip. `fn` must be safe to run again."""
    return cast(
        F,
        retry(
            retry=retry_if_exception_type(UNREACHABLE),
            wait=wait_exponential(multiplier=0.2, max=5),
            stop=_lease_has_passed,
            reraise=True,
        )(fn),
    )


def changed_rows(session: Session, statement: Executable) -> int:
    """How many rows an UPDATE or DELETE changed: a conditional update's answer (0: the row was
    no longer as the statement required, another writer won)."""
    return cast("CursorResult[Any]", session.execute(statement)).rowcount
