"""The registry's schema versions and the ordered steps between them.

Version 1 is the first released schema. Each step takes a database from version N to
N+1 with portable SQL (SQLite and PostgreSQL) and runs in its own transaction, with
the new version stamped in that same transaction. Every transaction that changes the
schema first takes the registry's schema lock (SQLite: BEGIN IMMEDIATE, the write
lock; PostgreSQL: a transaction-scoped advisory lock) and reads the version again
under it, so when several processes open the same old registry at once, one upgrades
and the others find the work done. An empty database gets the latest tables at once.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, Iterator

from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine
from sqlmodel import SQLModel

from hatrack.registry import tables
from hatrack.registry.errors import RegistryError

log = logging.getLogger(__name__)

FIRST_VERSION = 1
# PostgreSQL advisory lock key for schema changes ("hatrack" in ASCII)
PG_LOCK_KEY = 0x6861747261636B


@dataclass(frozen=True)
class Step:
    to_version: int  # takes a database from to_version - 1 to to_version
    description: str
    apply: Callable[[Connection], None]


def add_column(conn: Connection, table: str, column: str, ddl_type: str) -> None:
    """ALTER TABLE ... ADD COLUMN, skipped where the column is already there (or the
    table is missing: it is then created whole, in its latest shape, after the steps)."""
    insp = inspect(conn)
    if not insp.has_table(table) or column in {c["name"] for c in insp.get_columns(table)}:
        return
    quote = conn.dialect.identifier_preparer.quote
    conn.exec_driver_sql(f"ALTER TABLE {quote(table)} ADD COLUMN {quote(column)} {ddl_type}")


def _v2_score_rows(conn: Connection) -> None:
    add_column(conn, "scores", "rows", "INTEGER")


def _v3_precision_and_lora(conn: Connection) -> None:
    add_column(conn, "scores", "precision", "VARCHAR(32)")
    add_column(conn, "adapter_versions", "lora", "JSON")


def _v4_origin(conn: Connection) -> None:
    add_column(conn, "adapter_versions", "origin", "JSON")


STEPS: tuple[Step, ...] = (
    Step(2, "scores.rows: how many eval rows each score was computed on", _v2_score_rows),
    Step(3, "scores.precision (the base precision a score was measured at) and adapter_versions.lora "
            "(rank, alpha, target modules)", _v3_precision_and_lora),
    Step(4, "adapter_versions.origin: the Hub repository and commit a pulled version came from", _v4_origin),
)
LATEST = FIRST_VERSION + len(STEPS)
assert [s.to_version for s in STEPS] == list(range(FIRST_VERSION + 1, LATEST + 1)), "steps out of order"
assert LATEST == tables.SCHEMA_VERSION, "tables.SCHEMA_VERSION and the migration steps disagree"


def read_version(conn: Connection) -> int | None:
    """The stored schema version; None for an empty database. Tables without a
    version row are version 1: the first release stamped them in a second commit."""
    insp = inspect(conn)
    if insp.has_table(tables.SchemaVersion.__tablename__):
        row = conn.execute(text("SELECT version FROM schema_version WHERE id = 1")).first()
        if row is not None:
            return int(row[0])
    return FIRST_VERSION if insp.has_table(tables.AdapterVersion.__tablename__) else None


def refuse_newer(version: int | None) -> None:
    if version is not None and version > LATEST:
        raise RegistryError(
            f"registry schema version {version} is newer than this hatrack understands ({LATEST}): upgrade hatrack"
        )


@contextlib.contextmanager
def schema_lock(engine: Engine) -> Iterator[Connection]:
    """One transaction holding the schema lock; commits when the block ends cleanly."""
    with engine.connect() as conn:
        if conn.dialect.name != "sqlite":
            with conn.begin():
                if conn.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LOCK_KEY})
                yield conn
            return
        # pysqlite would open a plain deferred BEGIN, and not before DDL: issue our own
        conn.execution_options(isolation_level="AUTOCOMMIT")
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            with contextlib.suppress(Exception):
                conn.exec_driver_sql("ROLLBACK")
            raise
        conn.exec_driver_sql("COMMIT")


def _stamp(conn: Connection, version: int) -> None:
    tables.SchemaVersion.__table__.create(conn, checkfirst=True)
    if conn.execute(text("UPDATE schema_version SET version = :v WHERE id = 1"), {"v": version}).rowcount == 0:
        conn.execute(text("INSERT INTO schema_version (id, version) VALUES (1, :v)"), {"v": version})


def upgrade(engine: Engine) -> list[Step]:
    """Bring the database to LATEST; return the steps this process applied (none when
    it was current, empty, or another process did them)."""
    applied: list[Step] = []
    while True:
        with schema_lock(engine) as conn:
            version = read_version(conn)
            refuse_newer(version)
            if version is None:
                SQLModel.metadata.create_all(conn)
                _stamp(conn, LATEST)
                return applied
            if version == LATEST:
                return applied
            step = STEPS[version - FIRST_VERSION]
            step.apply(conn)
            if step.to_version == LATEST:
                SQLModel.metadata.create_all(conn)  # tables missing from an unfinished first open
            _stamp(conn, step.to_version)
        applied.append(step)
        log.info("registry schema upgraded to version %d: %s", step.to_version, step.description)
