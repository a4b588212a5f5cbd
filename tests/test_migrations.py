"""The catalog schema comes from Alembic revisions, applied on open with a backup first."""

from __future__ import annotations

import hashlib
import sqlite3
from datetime import datetime, timezone

import pytest
from alembic import command
from sqlalchemy import create_engine, inspect, text

from conftest import catalog_at_revision

from dinoseek.indexer import migrate
from dinoseek.indexer.catalog import Base
from dinoseek.indexer.library import Library


def test_new_library_is_at_head(tmp_path):
    with Library.open(tmp_path, write=True, create=True) as library:
        assert migrate.upgrade(library.catalog.engine, library.folder / "catalog.sqlite") is False  # nothing pending
    db = sqlite3.connect(tmp_path / ".dinoseek/catalog.sqlite")
    assert db.execute("select version_num from alembic_version").fetchone() == (migrate.head_revision(),)
    assert db.execute("pragma journal_mode").fetchone() == ("wal",)


def catalog_engine(tmp_path, catalog_url):
    """An engine on the backend under test: an SQLite file where the library keeps it, or PostgreSQL."""
    folder = tmp_path / ".dinoseek"  # the library folder (FAISS files, journals) on either backend
    folder.mkdir(exist_ok=True)
    if catalog_url is None:
        return create_engine(f"sqlite:///{folder / 'catalog.sqlite'}")
    return create_engine(catalog_url)


def test_revisions_build_the_models_schema(tmp_path, catalog_url):
    """The migrations and the SQLAlchemy models describe the same tables and columns, on both backends."""
    engine = catalog_engine(tmp_path, catalog_url)
    migrate.upgrade(engine, None)
    inspector = inspect(engine)
    for table in Base.metadata.sorted_tables:
        migrated = {c["name"]: c for c in inspector.get_columns(table.name)}
        assert set(migrated) == {c.name for c in table.columns}, table.name
        if engine.dialect.name == "postgresql":  # the types too: SQLite's are affinities, PostgreSQL's are exact
            for column in table.columns:
                expected = column.type.compile(dialect=engine.dialect)
                got = migrated[column.name]["type"].compile(dialect=engine.dialect)
                assert (column.name, got) == (column.name, expected), table.name
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:  # ids are 64-bit, their sequences too (revision 0006)
            for table in ("images", "runs"):
                assert connection.exec_driver_sql(
                    f"SELECT data_type FROM information_schema.sequences "
                    f"WHERE sequence_name = '{table}_id_seq'").scalar() == "bigint"
                connection.exec_driver_sql(f"SELECT setval('{table}_id_seq', {2**40})")
            connection.exec_driver_sql("INSERT INTO images (path, path_sha256, path_text, folder, size, mtime_ns, "
                                       "status) VALUES ('\\x61'::bytea, sha256('\\x61'::bytea), 'a', '.', 1, 0, "
                                       "'embedded')")
            assert connection.exec_driver_sql("SELECT id FROM images").scalar() == 2**40 + 1
    engine.dispose()


def test_interrupted_migration_leaves_a_backup_and_reruns(tmp_path, monkeypatch):
    with Library.open(tmp_path, write=True, create=True):
        pass
    catalog = tmp_path / ".dinoseek/catalog.sqlite"
    db = sqlite3.connect(catalog)
    db.execute("update alembic_version set version_num = '0002'")  # pretend revision 0003 is pending
    db.commit()
    db.close()
    monkeypatch.setattr(migrate.command, "upgrade", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        Library.open(tmp_path, write=True)
    backup = catalog.with_name("catalog.sqlite.bak-0002")
    assert backup.exists()
    assert sqlite3.connect(backup).execute("select version_num from alembic_version").fetchone() == ("0002",)
    monkeypatch.undo()
    db = sqlite3.connect(catalog)  # the interrupted migration changed nothing: restore and re-run
    db.execute("update alembic_version set version_num = ?", (migrate.head_revision(),))
    db.commit()
    with Library.open(tmp_path, write=True) as library:
        assert library.info()["total"] == 0


def test_other_sqlalchemy_url(tmp_path):
    url = f"sqlite:///{tmp_path / 'elsewhere.sqlite'}"
    with Library.open(tmp_path, url=url, write=True, create=True) as library:
        assert library.info()["total"] == 0
    assert (tmp_path / "elsewhere.sqlite").exists()
    assert not (tmp_path / ".dinoseek/catalog.sqlite").exists()


def test_a_0002_catalog_gains_the_journals_table_and_keeps_its_rows(tmp_path):
    """Revision 0003 adds the record of applies; an older catalog is backed up, then migrated."""
    catalog = catalog_at_revision(tmp_path, "0002",
                                  "INSERT INTO images (path, path_text, folder, size, mtime_ns, status) "
                                  "VALUES (x'612e6a7067', 'a.jpg', '.', 1, 0, 'embedded')")
    with Library.open(tmp_path, write=True) as library:
        assert migrate.current_revision(library.catalog.engine) == migrate.head_revision()
        assert library.info()["total"] == 1
        assert "journals" in inspect(library.catalog.engine).get_table_names()
    backup = sqlite3.connect(catalog.with_name("catalog.sqlite.bak-0002"))
    assert "journals" not in {name for (name,) in backup.execute("select name from sqlite_master")}


def test_a_catalog_from_a_newer_version_is_refused_in_one_line(tmp_path):
    """A downgrade must not loop between "needs an upgrade" and an Alembic traceback."""
    from click.testing import CliRunner

    from dinoseek.indexer.errors import CatalogTooNewError
    from dinoseek.retrieval.cli import main

    with Library.open(tmp_path, write=True, create=True):
        pass
    db = sqlite3.connect(tmp_path / ".dinoseek/catalog.sqlite")
    db.execute("update alembic_version set version_num = '0099_future'")
    db.commit()
    db.close()
    for write in (False, True):
        with pytest.raises(CatalogTooNewError, match="newer than this version"):
            Library.open(tmp_path, write=write)
    for args in (["info", str(tmp_path)], ["verify", "--repair", str(tmp_path)], ["undo", str(tmp_path)]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1 and result.output.startswith("Error: the catalog's schema revision '0099_future'")
        assert "Traceback" not in result.output and len(result.output.splitlines()) == 1


def test_a_0004_catalog_gains_the_not_duplicate_marks_and_keeps_its_rows(tmp_path, catalog_url):
    """Revision 0005 adds the "not a duplicate" marks; a 0004 catalog is backed up (SQLite), then migrated
    with its images and journals as they were, on both backends."""
    engine = catalog_engine(tmp_path, catalog_url)
    with engine.begin() as connection:
        config = migrate._config()
        config.attributes["connection"] = connection
        command.upgrade(config, "0004")
        connection.execute(text("INSERT INTO images (path, path_text, folder, size, mtime_ns, status, sha256) "
                                "VALUES (:path, 'a.jpg', '.', 1, 0, 'embedded', :sha)"), {"path": b"a.jpg", "sha": "a" * 64})
        connection.execute(text("INSERT INTO journals (name, root, quarantine, action, created_at, purged_at) "
                                "VALUES ('j1.jsonl', :root, :quarantine, 'move', :created, :purged)"),
                           {"root": b"/p", "quarantine": b"/q", "created": datetime(2024, 1, 1, tzinfo=timezone.utc),
                            "purged": datetime(2024, 2, 1, tzinfo=timezone.utc)})
    engine.dispose()
    with Library.open(tmp_path, url=catalog_url, write=True) as library:
        assert migrate.current_revision(library.catalog.engine) == migrate.head_revision()
        assert library.info()["total"] == 1
        assert library.catalog.rows_at([b"a.jpg"]) == {b"a.jpg": ("a" * 64, "embedded")}
        root, quarantine, action, undone_at, purged_at = library.catalog.journal_records()["j1.jsonl"]
        assert (root, quarantine, action, undone_at) == (b"/p", b"/q", "move", None) and purged_at is not None
        assert library.catalog.not_duplicate_pairs() == set()
        assert library.catalog.mark_not_duplicate([("b" * 64, "a" * 64)]) == 1
    if catalog_url is not None:
        return  # PostgreSQL: backups are the server's business (pg_dump), not the library's
    backup = sqlite3.connect(tmp_path / ".dinoseek/catalog.sqlite.bak-0004")
    assert backup.execute("select version_num from alembic_version").fetchone() == ("0004",)
    assert "not_duplicate" not in {name for (name,) in backup.execute("select name from sqlite_master")}
    assert backup.execute("select count(*) from images").fetchone() == (1,)


def test_a_0006_catalog_gains_unique_path_hashes_and_keeps_its_rows(tmp_path, catalog_url, monkeypatch):
    """Revision 0007 hashes every existing path (in blocks), makes the hash unique and drops the unique
    raw path, on both backends; ids and the never-reused id counter stay as they were."""
    from importlib import import_module

    monkeypatch.setattr(import_module("dinoseek.migrations.versions.0007_path_sha256"), "BLOCK", 2)  # 3 blocks
    engine = catalog_engine(tmp_path, catalog_url)
    paths = [b"a.jpg", b"b/\xff.jpg", b"c.jpg", b"d.jpg", b"e.jpg"]
    with engine.begin() as connection:
        config = migrate._config()
        config.attributes["connection"] = connection
        command.upgrade(config, "0006")
        for i, path in enumerate(paths + [b"gone.jpg"]):
            connection.execute(text("INSERT INTO images (path, path_text, folder, size, mtime_ns, status, sha256) "
                                    "VALUES (:path, :text, '.', 1, 0, 'embedded', :sha)"),
                               {"path": path, "text": repr(path), "sha": f"{i:064x}"})
        connection.execute(text("DELETE FROM images WHERE path = :path"), {"path": b"gone.jpg"})  # the highest id
    engine.dispose()
    with Library.open(tmp_path, url=catalog_url, write=True) as library:
        assert migrate.current_revision(library.catalog.engine) == migrate.head_revision()
        with library.catalog.engine.connect() as connection:
            rows = connection.execute(text("SELECT id, path, path_sha256 FROM images ORDER BY id")).all()
        assert [(r.id, bytes(r.path), bytes(r.path_sha256)) for r in rows] == [
            (i + 1, path, hashlib.sha256(path).digest()) for i, path in enumerate(paths)]
        assert library.catalog.rows_at(paths) == {path: (f"{i:064x}", "embedded") for i, path in enumerate(paths)}
        inspector = inspect(library.catalog.engine)
        constraints = {tuple(c["column_names"]) for c in inspector.get_unique_constraints("images")}
        assert ("path_sha256",) in constraints and ("path",) not in constraints
        indexed = {tuple(i["column_names"]) for i in inspector.get_indexes("images")}
        assert ("path",) not in indexed  # a btree on the raw path would refuse long paths all the same
        new = {"path": b"new.jpg", "path_text": "new.jpg", "folder": ".", "size": 1, "mtime_ns": 0,
               "status": "truncated"}
        library.catalog.write_batch(delete_ids=[], moves=[], restores=[], inserts=[new])
        assert library.catalog.file_states()[b"new.jpg"].id == len(paths) + 2  # the deleted row's id is not reused


def test_a_0007_catalog_gains_a_library_identity_from_its_first_writer(tmp_path, catalog_url):
    """Revision 0008 adds the library's identity; a 0007 catalog keeps its rows and runs, readers can no
    longer open it until a writer migrated it, and that writer gives it an id, written into the
    library folder too (on both backends)."""
    from dinoseek.indexer.errors import NeedsUpgradeError
    from dinoseek.indexer.identity import folder_library_id

    engine = catalog_engine(tmp_path, catalog_url)
    with engine.begin() as connection:
        config = migrate._config()
        config.attributes["connection"] = connection
        command.upgrade(config, "0007")
        connection.execute(text("INSERT INTO images (path, path_sha256, path_text, folder, size, mtime_ns, status) "
                                "VALUES (:path, :digest, 'a.jpg', '.', 1, 0, 'embedded')"),
                           {"path": b"a.jpg", "digest": hashlib.sha256(b"a.jpg").digest()})
        connection.execute(text("INSERT INTO runs (started_at, status, counts) VALUES (:at, 'finished', '{}')"),
                           {"at": datetime(2024, 1, 1, tzinfo=timezone.utc)})
    engine.dispose()
    with pytest.raises(NeedsUpgradeError):
        Library.open(tmp_path, url=catalog_url)
    assert folder_library_id(tmp_path / ".dinoseek") is None
    with Library.open(tmp_path, url=catalog_url, write=True) as library:
        assert migrate.current_revision(library.catalog.engine) == "0009"  # the head: 0009 followed 0008
        info = library.info()
        assert info["total"] == 1 and info["last_run"]["status"] == "finished"
        library_id = library.library_id
        assert library.catalog.library_identity() == (library_id, str(tmp_path).encode())
    assert folder_library_id(tmp_path / ".dinoseek") == library_id and len(library_id) == 32
    with Library.open(tmp_path, url=catalog_url) as reader:  # the same id from now on
        assert reader.library_id == library_id and reader.info()["library_id"] == library_id
    if catalog_url is None:
        backup = sqlite3.connect(tmp_path / ".dinoseek/catalog.sqlite.bak-0007")
        assert "library" not in {name for (name,) in backup.execute("select name from sqlite_master")}


def test_a_0008_library_keeps_its_index_checkpoints_through_revision_0009(tmp_path, tiny_folder, catalog_url):
    """Revision 0009 records each checkpoint's generation and on-disk lists; a library indexed before
    it (its catalog taken back to 0008, index files in place) opens with its checkpoints as they were,
    generation 0 and no lists file, without a rebuild, and searches (on both backends)."""
    from test_retrieval import make_library_photos

    from dinoseek.indexer.catalog import IndexFileRow
    from dinoseek.indexer.pipeline import Options, run_index
    from dinoseek.model import Encoder

    root = tmp_path / "photos"
    make_library_photos(root)
    with Library.open(root, url=catalog_url, write=True, create=True) as library:
        run_index(library, Encoder.from_pretrained(tiny_folder, precision="fp32"), Options(workers=0))
        with library.catalog.session() as session:
            before = {r.kind: (r.factory, r.count, r.checksum) for r in session.query(IndexFileRow)}
        with library.catalog.engine.begin() as connection:
            config = migrate._config()
            config.attributes["connection"] = connection
            command.downgrade(config, "0008")
    files = {p.name: p.stat().st_mtime_ns for p in (root / ".dinoseek").glob("*.faiss")}
    assert set(before) == {"cls", "patch"} and len(files) == 2
    with Library.open(root, url=catalog_url, write=True) as library:
        assert migrate.current_revision(library.catalog.engine) == "0009"
        indexes = library.load_indexes()
        with library.catalog.session() as session:
            rows = {r.kind: r for r in session.query(IndexFileRow)}
        assert {k: (r.factory, r.count, r.checksum) for k, r in rows.items()} == before  # not rebuilt
        assert all(r.generation == 0 and r.lists_bytes is None and r.lists_checksum is None for r in rows.values())
        _, vectors = library.catalog.vectors("cls")
        scores, _ = indexes["cls"].search(vectors[:1], 1)
        assert scores[0, 0] > 0.99  # an image finds itself
    assert {p.name: p.stat().st_mtime_ns for p in (root / ".dinoseek").glob("*.faiss")} == files
