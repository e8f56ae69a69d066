"""Alembic migrations of the registry schema, run programmatically (no alembic.ini).

``upgrade_to_head(conn, where)`` brings the registry on ``conn`` (an autocommit SQLAlchemy
connection) to the newest revision in versions/, in ONE database transaction (SQLite:
``BEGIN IMMEDIATE``; PostgreSQL: the registry's advisory write lock), so a failed migration
changes nothing. A registry made before Alembic (tables, no alembic_version) is adopted by the
first revision. A revision this code does not know (a newer tinc-hub wrote it) is refused
before anything is written.

A new revision: a new file in versions/ (script.py.mako is its template) whose
``down_revision`` is the current head; raise ``registry_contract.SCHEMA_REVISION`` to it (a test checks).
"""

from pathlib import Path
from typing import Any, List

HERE = Path(__file__).resolve().parent


def script_directory() -> Any:
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(HERE))


def head_revision() -> str:
    return script_directory().get_current_head()


def refuse_unknown_revision(revision: Any, where: str) -> None:
    """Raise RegistrySchemaError when ``revision`` (None: an empty database, "legacy": tables
    made before Alembic) is not one of this code's: a newer tinc-hub wrote the registry."""
    from alembic.util import CommandError

    from ..registry_contract import RegistrySchemaError

    if revision in (None, "legacy"):
        return
    script = script_directory()
    try:
        known = script.get_revision(revision) is not None
    except CommandError:
        known = False
    if not known:
        raise RegistrySchemaError(
            f"registry {where} has schema revision {revision!r}, newer than this tinc-hub knows"
            f" (its newest: {script.get_current_head()!r}); nothing was changed",
            "upgrade tinc-hub on this machine to the version the other hubs run")


def upgrade_to_head(conn: Any, where: str) -> List[str]:
    """Migrate; returns the revisions applied (empty when current)."""
    import sqlalchemy as sa
    from alembic import command
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext

    from ..registry_contract import WRITE_LOCK_KEY

    script = script_directory()
    head = script.get_current_head()

    def current() -> Any:
        return MigrationContext.configure(conn).get_current_revision()

    def check(revision: Any) -> None:
        refuse_unknown_revision(revision, where)

    check(current())
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        conn.exec_driver_sql("BEGIN ISOLATION LEVEL READ COMMITTED")
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(WRITE_LOCK_KEY)))
    try:
        before = current()  # again, under the lock
        check(before)
        if before == head:
            conn.exec_driver_sql("ROLLBACK")
            return []
        config = Config()
        config.set_main_option("script_location", str(HERE))
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
        applied = [rev.revision for rev in script.iterate_revisions(head, before)]
        conn.exec_driver_sql("COMMIT")
    except BaseException:
        conn.exec_driver_sql("ROLLBACK")
        raise
    return list(reversed(applied))
