"""Apply pending Alembic revisions on open, after backing up an existing SQLite catalog."""

from __future__ import annotations

import functools
import importlib.resources
import logging
import sqlite3
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

from .errors import CatalogTooNewError

log = logging.getLogger(__name__)


def _config() -> Config:
    config = Config()
    # The installed `migrations` package, found by import rather than as a folder next to this
    # one: that layout holds in a source checkout only, not once installed (or renamespaced).
    config.set_main_option("script_location", str(importlib.resources.files("dinoseek.migrations")))
    return config


@functools.cache
def _scripts() -> ScriptDirectory:
    """The revision scripts, read once per process (every library open asks for the head)."""
    return ScriptDirectory.from_config(_config())


def head_revision() -> str:
    return _scripts().get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The catalog's schema revision; CatalogTooNewError for one this version has no script for
    (a newer dinoseek wrote it: Alembic could neither migrate nor read it safely)."""
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    if current is not None and current not in {s.revision for s in _scripts().walk_revisions()}:
        raise CatalogTooNewError(f"the catalog's schema revision {current!r} is newer than this version of dinoseek "
                                 f"knows (up to {head_revision()!r}); upgrade dinoseek to open it")
    return current


def at_head(engine: Engine) -> bool:
    return current_revision(engine) == head_revision()


def upgrade(engine: Engine, sqlite_file: Path | None) -> bool:
    """Bring the catalog to head; returns True if anything was applied.

    An existing SQLite catalog is first copied (SQLite's online backup, WAL-safe) to
    `catalog.sqlite.bak-<revision>`, so an interrupted migration can always be redone from it.
    """
    current = current_revision(engine)
    head = head_revision()
    if current == head:
        return False
    backup = sqlite_file.with_name(f"{sqlite_file.name}.bak-{current}") if sqlite_file else None
    # An existing backup is from before an interrupted attempt: never overwrite it with the catalog
    # that attempt may have left half-migrated (SQLite DDL is transactional here, but be safe).
    if current is not None and backup is not None and sqlite_file.exists() and not backup.exists():
        source, target = sqlite3.connect(sqlite_file), sqlite3.connect(backup)
        try:
            source.backup(target)
        finally:
            source.close()
            target.close()
        log.info("catalog backed up to %s before migrating %s -> %s", backup, current, head)
    config = _config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    return True
