"""Schema migrations: a registry written by the first released schema (version 1,
tests/data/registry-v1.sql) opens under this hatrack with every row intact, on SQLite
and on PostgreSQL. Rows are compared against the dump itself, never against copies
of what the code returns."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import (JSON, BigInteger, Boolean, Column, DateTime, Float, ForeignKey, Index, Integer, MetaData,
                        String, Table, UniqueConstraint, create_engine, select, text)
from sqlalchemy.schema import CreateIndex, CreateTable

from hatrack.registry import Registry, RegistryError, ScoreIn, migrations
from hatrack.registry.db import init_schema, make_engine, normalise_url

DATA = Path(__file__).parent / "data"
V1_SQL = DATA / "registry-v1.sql"
_spec = importlib.util.spec_from_file_location("make_registry_v1", DATA / "make_registry_v1.py")
make_v1 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_v1)

# ---------------------------------------------------------------- schema 1, frozen

V1 = MetaData()
_AV = "adapter_versions.id"
Table("schema_version", V1, Column("id", Integer, primary_key=True), Column("version", Integer, nullable=False))
Table("base_models", V1,
      Column("id", Integer, primary_key=True), Column("name", String(64), nullable=False),
      Column("source", String, nullable=False), Column("path", String, nullable=False),
      Column("fingerprint", String(64), nullable=False), Column("chat_template_sha256", String(64)),
      Column("created", DateTime, nullable=False),
      Index("ix_base_models_name", "name", unique=True))
Table("adapter_versions", V1,
      Column("id", Integer, primary_key=True), Column("name", String(64), nullable=False),
      Column("version", Integer, nullable=False), Column("status", String(16), nullable=False),
      Column("created", DateTime, nullable=False), Column("base_name", String(64), nullable=False),
      Column("base_fingerprint", String(64), nullable=False), Column("base_source", String),
      Column("quantization", String(32)), Column("parent_version", Integer),
      Column("dataset_sha256", String(64)), Column("dataset_rows", Integer), Column("dataset_source", String),
      Column("train_config", JSON), Column("seed", Integer), Column("train_metrics", JSON),
      Column("lib_versions", JSON), Column("chat_template_sha256", String(64)),
      Column("sha256", String(64), nullable=False), Column("size", BigInteger, nullable=False),
      UniqueConstraint("name", "version", name="uq_adapter_name_version"),
      Index("ix_adapter_versions_base_name", "base_name"),
      Index("ix_adapter_versions_dataset_sha256", "dataset_sha256"),
      Index("ix_adapter_versions_name", "name"), Index("ix_adapter_versions_sha256", "sha256"))
Table("tags", V1,
      Column("id", Integer, primary_key=True),
      Column("version_id", Integer, ForeignKey(_AV, ondelete="CASCADE"), nullable=False),
      Column("key", String(64), nullable=False), Column("value", String(256), nullable=False),
      UniqueConstraint("version_id", "key", name="uq_tag_version_key"),
      Index("ix_tags_version_id", "version_id"))
Table("scores", V1,
      Column("id", Integer, primary_key=True),
      Column("version_id", Integer, ForeignKey(_AV, ondelete="CASCADE"), nullable=False),
      Column("metric", String(64), nullable=False), Column("value", Float, nullable=False),
      Column("base_value", Float), Column("dataset_sha256", String(64)),
      Column("split", String(256), nullable=False), Column("created", DateTime, nullable=False),
      Index("ix_scores_version_id", "version_id"))
Table("aliases", V1,
      Column("id", Integer, primary_key=True), Column("name", String(64), nullable=False),
      Column("alias", String(64), nullable=False), Column("version", Integer, nullable=False),
      Column("updated", DateTime, nullable=False),
      UniqueConstraint("name", "alias", name="uq_alias_name_alias"), Index("ix_aliases_name", "name"))
Table("alias_history", V1,
      Column("id", Integer, primary_key=True), Column("name", String(64), nullable=False),
      Column("alias", String(64), nullable=False), Column("from_version", Integer),
      Column("to_version", Integer), Column("forced", Boolean, nullable=False),
      Column("created", DateTime, nullable=False), Index("ix_alias_history_name", "name"))
Table("api_keys", V1,
      Column("id", String(32), primary_key=True), Column("tenant", String(64), nullable=False),
      Column("patterns", JSON, nullable=False), Column("secret_sha256", String(64), nullable=False),
      Column("created", DateTime, nullable=False), Column("revoked", DateTime),
      Index("ix_api_keys_secret_sha256", "secret_sha256", unique=True))


def _norm(sql: str) -> str:
    return " ".join(sql.replace("(", " ( ").replace(")", " ) ").replace(",", " , ").split())


def test_frozen_v1_tables_are_the_dumped_schema():
    """The copy above is what schema 1 really was: the same DDL as in the dump."""
    dumped = {_norm(s) for s in re.findall(r"^CREATE (?:TABLE|UNIQUE INDEX|INDEX) .*?;$", V1_SQL.read_text(),
                                              flags=re.S | re.M)}
    dialect = create_engine("sqlite://").dialect
    frozen = {_norm(str(CreateTable(t).compile(dialect=dialect)) + ";") for t in V1.sorted_tables}
    frozen |= {_norm(str(CreateIndex(i).compile(dialect=dialect)) + ";") for t in V1.sorted_tables for i in t.indexes}
    assert frozen == dumped


# ---------------------------------------------------------------- a schema-1 registry, on either database


@dataclass
class OldRegistry:
    kind: str
    url: str  # what HATRACK_DB_URL would say (plain postgresql:// for PostgreSQL)
    pristine: Path  # the dump loaded as-is: the rows every check compares against
    env: dict


def _load_dump(path: Path) -> Path:
    conn = sqlite3.connect(path)
    conn.executescript(V1_SQL.read_text())
    conn.close()
    return path


def _copy_into_postgresql(pristine: Path, url: str) -> None:
    """Schema 1 on PostgreSQL: the frozen tables, the dump's rows, the id sequences
    where a registry that made those rows would have left them."""
    src, dst = create_engine(f"sqlite:///{pristine}"), make_engine(url)
    with dst.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
        V1.create_all(conn)
        with src.connect() as old:
            for table in V1.sorted_tables:
                rows = [dict(r._mapping) for r in old.execute(select(table))]
                conn.execute(table.insert(), rows)
                if isinstance(table.c.id.type, Integer):
                    conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), "
                                      f"(SELECT max(id) FROM {table.name}))"))
    src.dispose()
    dst.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def old_registry(request, hatrack_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> OldRegistry:
    pristine = _load_dump(tmp_path / "pristine.db")
    env = dict(os.environ, HATRACK_HOME=str(hatrack_home))
    env.pop("HATRACK_DB_URL", None)
    if request.param == "sqlite":
        db = _load_dump(hatrack_home / "registry.db")  # where Registry() looks by default
        return OldRegistry("sqlite", f"sqlite:///{db}", pristine, env)
    server = request.getfixturevalue("pg_url")
    if not server:
        pytest.skip("PostgreSQL is not available here")
    url = server.replace("postgresql+psycopg://", "postgresql://")  # the plain form must work too
    _copy_into_postgresql(pristine, url)
    monkeypatch.setenv("HATRACK_DB_URL", url)
    return OldRegistry("postgresql", url, pristine, dict(env, HATRACK_DB_URL=url))


def _rows(url: str, table: Table) -> list[tuple]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(select(*table.c).order_by(table.c.id))]
    finally:
        engine.dispose()


def _version(url: str) -> int:
    engine = make_engine(url)
    with engine.connect() as conn:
        version = conn.execute(text("SELECT version FROM schema_version")).scalar_one()
    engine.dispose()
    return version


def assert_every_row_survived(old: OldRegistry) -> None:
    pristine_url = f"sqlite:///{old.pristine}"
    for table in V1.sorted_tables:
        before = _rows(pristine_url, table)
        assert before, f"the fixture has no {table.name} rows: it would prove nothing"
        if table.name == "schema_version":
            continue
        assert _rows(old.url, table) == before, f"{table.name} rows changed in the upgrade"
    if old.kind == "sqlite":  # the stored values themselves, byte for byte
        raw_old, raw_new = sqlite3.connect(old.pristine), sqlite3.connect(old.url.removeprefix("sqlite:///"))
        for table in V1.sorted_tables:
            cols = ", ".join(f'"{c.name}"' for c in table.c)
            q = f"SELECT {cols} FROM {table.name} ORDER BY id"
            if table.name != "schema_version":
                assert raw_new.execute(q).fetchall() == raw_old.execute(q).fetchall()
        raw_old.close()
        raw_new.close()


def _cli(old: OldRegistry, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hatrack.cli.main", *args], env=old.env,
                          capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------- the upgrade


def test_v1_registry_upgrades_in_place_without_loss(old_registry: OldRegistry, tmp_path: Path):
    old = old_registry
    assert _version(old.url) == 1
    reg = Registry()
    assert _version(old.url) == migrations.LATEST == 4
    assert_every_row_survived(old)

    # the new column is there, and empty for every old score
    with reg.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*), count(rows), count(precision) FROM scores")).one() == (14, 0, 0)
        assert conn.execute(text("SELECT count(*), count(lora) FROM adapter_versions")).one()[1] == 0
        assert conn.execute(text("SELECT count(origin) FROM adapter_versions")).one()[0] == 0
    assert init_schema(reg.engine) == []  # a second open has nothing to do

    # the registry's own views agree with the dump
    pristine = sqlite3.connect(old.pristine)
    pristine.row_factory = sqlite3.Row
    bases = {r["name"]: r for r in pristine.execute("SELECT * FROM base_models")}
    assert {b.name: b.fingerprint for b in reg.list_bases()} == {n: r["fingerprint"] for n, r in bases.items()}
    keys = {r["id"]: r for r in pristine.execute("SELECT * FROM api_keys")}
    assert {k.id: (k.tenant, k.patterns, k.revoked is not None) for k in reg.list_keys()} == {
        i: (r["tenant"], json.loads(r["patterns"]), r["revoked"] is not None) for i, r in keys.items()}

    # the CLI, as a separate process, reads every version with its tags, scores and aliases
    listed = json.loads(_cli(old, "list", "--json").stdout)
    versions = pristine.execute("SELECT * FROM adapter_versions ORDER BY name, version").fetchall()
    assert [(r["name"], r["version"], r["sha256"]) for r in listed] == [
        (v["name"], v["version"], v["sha256"]) for v in versions]
    for v in versions:
        proc = _cli(old, "show", f"{v['name']}@{v['version']}", "--json")
        assert proc.returncode == 0, proc.stderr
        info = json.loads(proc.stdout)
        assert info["tags"] == {r["key"]: r["value"] for r in
                                pristine.execute("SELECT * FROM tags WHERE version_id = ?", (v["id"],))}
        assert info["train_config"] == json.loads(v["train_config"])
        assert info["train_metrics"] == json.loads(v["train_metrics"])
        assert info["parent_version"] == v["parent_version"] and info["dataset_rows"] == v["dataset_rows"]
        scores = pristine.execute("SELECT * FROM scores WHERE version_id = ? ORDER BY created, id", (v["id"],))
        assert [(s["metric"], s["value"], s["base_value"], s["split"], s["dataset_sha256"], s["rows"])
                for s in info["score_rows"]] == [
            (s["metric"], s["value"], s["base_value"], s["split"], s["dataset_sha256"], None) for s in scores]
        assert info["aliases"] == sorted(r["alias"] for r in pristine.execute(
            "SELECT alias FROM aliases WHERE name = ? AND version = ?", (v["name"], v["version"])))
    pristine.close()

    # new writes work on the upgraded registry: the same base weights, a version 4 with rows
    base = make_v1.write_base(tmp_path / "base")
    from hatrack import basemodel

    fingerprint = basemodel.fingerprint(base)
    assert fingerprint == bases[make_v1.BASE_NAME]["fingerprint"]
    reg.add_base(make_v1.BASE_NAME, "hand-made:tiny-v1", base, fingerprint)
    new = reg.register(make_v1.write_adapter(tmp_path / "new", "after-upgrade"), name="acme-support",
                       base=make_v1.BASE_NAME, tags={"customer": "acme"},
                       scores=[ScoreIn("eval_loss", 1.0, 2.25, "f" * 64, rows=12)])
    assert new.version == 4
    info = reg.version_info("acme-support", 4)
    assert [(s["metric"], s["rows"]) for s in info["score_rows"]] == [("eval_loss", 12)]
    reg.set_alias("acme-support", "prod", 4)
    assert reg.resolve("acme-support").version == 4
    assert "rows" in _cli(old, "show", "acme-support@4").stdout


def test_newer_registry_is_refused_in_one_line(old_registry: OldRegistry):
    old = old_registry
    engine = make_engine(old.url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE schema_version SET version = 99"))
    engine.dispose()
    with pytest.raises(RegistryError, match=r"schema version 99 is newer than this hatrack understands \(4\)"):
        Registry()
    proc = _cli(old, "list", "--json")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "error: registry schema version 99 is newer than this hatrack understands (4): upgrade hatrack"]
    assert _version(old.url) == 99
    assert_every_row_survived(old)  # untouched: no rows column was added either
    engine = make_engine(old.url)
    with engine.connect() as conn:
        assert "rows" not in {c.name for c in _reflect_scores(conn)}
    engine.dispose()


def _reflect_scores(conn):
    meta = MetaData()
    return Table("scores", meta, autoload_with=conn).c


_OPENER = """
import json, os, sys, time
from pathlib import Path
from hatrack.registry import Registry, migrations
from hatrack.registry.db import init_schema, make_engine

def slowed(real):
    def slow(conn):  # hold the schema lock long enough for the other processes to arrive
        time.sleep(0.5)
        real.apply(conn)
    return migrations.Step(real.to_version, real.description, slow)
migrations.STEPS = tuple(slowed(step) for step in migrations.STEPS)

engine = make_engine(sys.argv[1])
Path(sys.argv[2] + "." + sys.argv[3]).touch()
while not Path(sys.argv[2]).exists():
    time.sleep(0.002)
with engine.connect() as conn:
    seen = migrations.read_version(conn)
applied = [s.to_version for s in init_schema(engine)]
count = len(Registry(sys.argv[1]).list_versions())
print(json.dumps({"seen": seen, "applied": applied, "versions": count}))
"""


def test_processes_opening_one_old_registry_at_once_upgrade_it_once(old_registry: OldRegistry, tmp_path: Path):
    old, n = old_registry, 4
    gate = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _OPENER, old.url, str(gate), str(i)], env=old.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]
    deadline = time.time() + 120
    while not all(Path(f"{gate}.{i}").exists() for i in range(n)):
        assert time.time() < deadline and all(p.poll() is None for p in procs), "an opener did not start"
        time.sleep(0.01)
    gate.touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    steps = list(range(2, migrations.LATEST + 1))
    # each step is applied once, by whichever process holds the lock when it is due
    assert sorted(v for r in results for v in r["applied"]) == steps
    assert sum(r["seen"] == 1 for r in results) >= 2, f"the openers did not overlap: {results}"
    assert all(r["versions"] == 4 for r in results)
    assert _version(old.url) == 4
    assert_every_row_survived(old)


def test_opening_a_rollback_journal_file_waits_for_a_writer_instead_of_failing(tmp_path: Path):
    # an older tool's file is in rollback-journal mode; switching it to WAL needs the file
    # to itself, and SQLite refuses at once (no busy wait) while another connection holds
    # the write lock, as a process mid-way through the same switch or an old writer does
    path = tmp_path / "old.db"
    _load_dump(path)
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("BEGIN IMMEDIATE")  # the write lock, held for half a second
    release = threading.Timer(0.5, lambda: writer.execute("COMMIT"))
    release.start()
    engine = make_engine(f"sqlite:///{path}")
    started = time.monotonic()
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar_one() == "wal"
    finally:
        engine.dispose()
        release.join()
        writer.close()
    assert time.monotonic() - started >= 0.4, "it did not wait for the writer: the test proved nothing"


def test_empty_database_gets_the_latest_schema_directly(registry_db: str, hatrack_home: Path):
    url = os.environ.get("HATRACK_DB_URL") or f"sqlite:///{hatrack_home / 'registry.db'}"
    engine = make_engine(url)
    assert init_schema(engine) == []  # created, not stepped through the migrations
    with engine.connect() as conn:
        assert migrations.read_version(conn) == 4
        assert "rows" in {c.name for c in _reflect_scores(conn)}
    engine.dispose()


def test_plain_postgresql_urls_use_psycopg():
    assert normalise_url("postgresql://u:p@h:5432/db") == "postgresql+psycopg://u:p@h:5432/db"
    assert normalise_url("postgres://h/db") == "postgresql+psycopg://h/db"
    assert normalise_url("postgresql+psycopg://h/db") == "postgresql+psycopg://h/db"
    assert normalise_url("sqlite:////x/registry.db") == "sqlite:////x/registry.db"
    assert make_engine("postgresql://h/db").dialect.driver == "psycopg"
