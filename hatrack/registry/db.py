"""The database engine: SQLite in HATRACK_HOME by default (WAL, 30 s busy timeout,
foreign keys on), or HATRACK_DB_URL. On first use an empty database gets the tables
and the schema version; an older registry is upgraded in place (migrations.py),
safely when several processes open it at once."""

from __future__ import annotations

import sqlite3
import time

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import create_engine

from hatrack.registry import migrations

BUSY_TIMEOUT_MS = 30_000


def _enter_wal(cur: sqlite3.Cursor) -> None:
    """Switching a rollback-journal file (one an older tool made) to WAL needs the file
    to itself, and SQLite answers "database is locked" at once rather than calling the
    busy handler: several processes opening such a file together would fail. Retry
    within the busy timeout, as every other statement waits."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    pause = 0.005
    while True:
        try:
            cur.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    _enter_wal(cur)
    cur.execute("PRAGMA foreign_keys = ON")
    cur.close()


def normalise_url(url: str) -> str:
    """`postgresql://` (or `postgres://`) means psycopg 3, the PostgreSQL driver hatrack
    installs; SQLAlchemy alone would reach for psycopg2."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def make_engine(url: str) -> Engine:
    url = normalise_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_MS / 1000})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True)
    return engine


def init_schema(engine: Engine) -> list[migrations.Step]:
    """Make the database current: nothing to do (the usual case, read-only), create an
    empty one, or upgrade an older one. A newer one is refused. Returns the upgrade
    steps this process applied."""
    with engine.connect() as conn:
        version = migrations.read_version(conn)
    migrations.refuse_newer(version)
    if version == migrations.LATEST:
        return []
    return migrations.upgrade(engine)
