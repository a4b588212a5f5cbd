"""Apply pending Alembic revisions on open, after backing up an existing SQLite catalog."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

log = logging.getLogger(__name__)
SCRIPT_LOCATION = str(Path(__file__).resolve().parents[1] / "migrations")


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    return config


def head_revision() -> str:
    return ScriptDirectory.from_config(_config()).get_current_head()


def upgrade(engine: Engine, sqlite_file: Path | None) -> bool:
    """Bring the catalog to head; returns True if anything was applied.

    An existing SQLite catalog is first copied (SQLite's online backup, WAL-safe) to
    `catalog.sqlite.bak-<revision>`, so an interrupted migration can always be redone from it.
    """
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    head = head_revision()
    if current == head:
        return False
    if current is not None and sqlite_file is not None and sqlite_file.exists():
        backup = sqlite_file.with_name(f"{sqlite_file.name}.bak-{current}")
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
