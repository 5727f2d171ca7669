"""Engine, sessions and migrations. SQLite file by default, PostgreSQL by URL."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, inspect, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"


class StoreError(RuntimeError):
    """The database cannot be used; the message says what to fix."""


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # several processes share the file
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def _alembic_config(engine: Engine):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


# pg_advisory_lock key of the migration lock ("clmg"), the same in every codeloop process.
MIGRATION_LOCK_KEY = 0x636C6D67


def _sqlite_path(engine: Engine) -> Path | None:
    database = engine.url.database
    return Path(database) if database and database != ":memory:" else None


@contextmanager
def migration_lock(engine: Engine) -> Iterator[None]:
    """One migrating process per database; the others wait here until it is done.

    PostgreSQL: a session advisory lock (released with the connection, even if the process
    dies). SQLite: an exclusive `flock` on `<database>.migrate.lock` (released by the OS when
    the process dies)."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
        return
    path = _sqlite_path(engine) if engine.dialect.name == "sqlite" else None
    if path is None:
        yield
        return
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.migrate.lock", "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (idempotent), once per database.

    Several processes starting together on a fresh database (compose starts web, worker and
    scheduler at once) do not race: one migrates under `migration_lock`, the others wait for
    it and then find the schema current. An already current schema costs one query."""
    from alembic import command

    try:
        if _current(engine):
            return
        with migration_lock(engine):
            if _current(engine):  # another process migrated while this one waited
                log.info("database schema migrated by another process")
                return
            command.upgrade(_alembic_config(engine), "head")
    except Exception as exc:  # noqa: BLE001 - one clear message for a broken database
        raise StoreError(f"cannot migrate the database at {engine.url!r}: {exc}") from exc


def _current(engine: Engine) -> bool:
    try:
        return schema_is_current(engine)
    except Exception:  # noqa: BLE001 - no schema yet (or unreadable): migrate decides
        return False


def schema_is_current(engine: Engine) -> bool:
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config(engine)).get_current_head()
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision() == head


def insert_or_get(
    session: Session, model: type, values: Mapping[str, Any], *, key: Sequence[str]
) -> tuple[Any, bool]:
    """Insert a row unless it would break a unique constraint: (its id, created).

    `INSERT ... ON CONFLICT DO NOTHING RETURNING id` in the dialect of the session's engine
    (SQLite or PostgreSQL). When a row with the same unique values exists, nothing is
    written and the id of the row whose `key` columns equal `values` is returned (None if
    the conflict was on another unique constraint). A concurrent insert of the same key
    cannot fail the caller: PostgreSQL waits for the other transaction and then does
    nothing, SQLite serialises the writers."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        raise StoreError(f"codeloop supports SQLite and PostgreSQL, not {dialect}")
    stmt = insert(model).values(**values).on_conflict_do_nothing().returning(model.id)
    new_id = session.scalar(stmt)
    if new_id is not None:
        return new_id, True
    where = [getattr(model, column) == values[column] for column in key]
    return session.scalar(select(model.id).where(*where)), False


class Store:
    """A database: sessions, migrated on open."""

    def __init__(self, url: str, *, auto_migrate: bool = True):
        self.url = url
        self.engine = make_engine(url)
        if auto_migrate:
            migrate(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A unit of work: commits on success, rolls back on error."""
        with self._sessions() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def tables(self) -> list[str]:
        return sorted(inspect(self.engine).get_table_names())

    def close(self) -> None:
        self.engine.dispose()
