"""The database engine: SQLite in HATRACK_HOME by default (WAL, 30 s busy timeout,
foreign keys on), or HATRACK_DB_URL. Tables and the schema version row are created
on first use, safely when several processes start at once."""

from __future__ import annotations

import random
import time

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlmodel import Session, SQLModel, create_engine

from hatrack.registry import tables
from hatrack.registry.errors import RegistryError

BUSY_TIMEOUT_MS = 30_000


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA journal_mode = WAL")
    cur.execute("PRAGMA foreign_keys = ON")
    cur.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_MS / 1000})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True)
    return engine


def init_schema(engine: Engine, attempts: int = 20) -> None:
    """Create missing tables and the schema version row. Another process may be doing
    the same at the same moment: 'already exists' races are retried."""
    for attempt in range(attempts):
        try:
            SQLModel.metadata.create_all(engine)
            with Session(engine) as session:
                row = session.get(tables.SchemaVersion, 1)
                if row is None:
                    session.add(tables.SchemaVersion(id=1, version=tables.SCHEMA_VERSION))
                    session.commit()
                elif row.version > tables.SCHEMA_VERSION:
                    raise RegistryError(
                        f"registry schema version {row.version} is newer than this hatrack "
                        f"understands ({tables.SCHEMA_VERSION}): upgrade hatrack"
                    )
            return
        except (OperationalError, IntegrityError, ProgrammingError):
            # another process created the same table or row a moment earlier
            if attempt == attempts - 1:
                raise
            time.sleep(0.02 + random.random() * 0.1)
