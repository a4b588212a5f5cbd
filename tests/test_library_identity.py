"""The catalog records which library it belongs to (revision 0008): the same library opened from
another mount path is recognised (and logged), a library folder of another library is refused."""

from __future__ import annotations

import logging
import os
import shutil

import pytest
from click.testing import CliRunner
from conftest import synthetic_photo, url_args

from dinoseek.indexer.errors import LibraryError, LibraryMismatchError
from dinoseek.indexer.identity import ID_FILE, folder_library_id
from dinoseek.indexer.library import Library
from dinoseek.indexer.pipeline import Options, run_index
from dinoseek.model import Encoder
from dinoseek.retrieval.api import LibrarySearch
from dinoseek.retrieval.cli import main


@pytest.fixture(scope="module")
def encoder(tiny_folder):
    return Encoder.from_pretrained(tiny_folder, precision="fp32")


def photos(root, seeds=range(3)):
    root.mkdir(parents=True)
    for i in seeds:
        synthetic_photo(120, 90, seed=i).save(root / f"p{i}.jpg", quality=92)
    return root


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_a_new_library_records_its_id_in_the_catalog_and_its_folder(tmp_path, encoder, catalog_url):
    root = photos(tmp_path / "photos")
    with Library.open(root, url=catalog_url, write=True, create=True) as library:
        run_index(library, encoder, Options(workers=0))
        library_id = library.library_id
        assert library.catalog.library_identity() == (library_id, os.fsencode(str(root)))
    assert folder_library_id(root / ".dinoseek") == library_id and len(library_id) == 32
    info = invoke("info", root, *url_args(catalog_url), "--json")
    assert info.exit_code == 0 and f'"library_id": "{library_id}"' in info.output


def test_the_same_library_at_another_mount_path_opens_and_is_logged(tmp_path, encoder, catalog_url, caplog):
    """The photo folder (with its ROOT/.dinoseek) reached at another path, as a second machine mounts
    a share: the same library id, so it is the same library; readers log it, writers record it."""
    first = photos(tmp_path / "mnt-a" / "photos")
    with Library.open(first, url=catalog_url, write=True, create=True) as library:
        run_index(library, encoder, Options(workers=0))
        library_id = library.library_id
    second = tmp_path / "mnt-b" / "photos"
    second.parent.mkdir()
    os.rename(first, second)  # the same folder, another path
    with caplog.at_level(logging.INFO, logger="dinoseek.indexer.identity"):
        with Library.open(second, url=catalog_url) as reader, LibrarySearch(reader) as lib:
            assert reader.library_id == library_id
            assert sorted(h.path for h in lib.similar("p0.jpg", k=2)) == ["p1.jpg", "p2.jpg"]
            assert reader.verify() == []
    assert f"library {library_id} opened from {second} (last used from {first})" in caplog.text
    with Library.open(second, url=catalog_url) as reader:  # a reader records nothing
        assert reader.catalog.library_identity() == (library_id, os.fsencode(str(first)))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dinoseek.indexer.identity"):
        with Library.open(second, url=catalog_url, write=True) as writer:
            assert run_index(writer, encoder, Options(workers=0))["embedded"] == 0  # nothing re-read
            assert writer.catalog.library_identity() == (library_id, os.fsencode(str(second)))
    assert f"opened from {second} (last used from {first}): recorded" in caplog.text


def test_a_postgresql_catalog_refuses_the_folder_of_another_library(tmp_path, encoder, postgres_server):
    """Two libraries, each with its catalog in its own database: a catalog opened with the other's
    folder is refused in one line (its FAISS files and journals are not this catalog's)."""
    url_a, url_b = postgres_server.create_database(), postgres_server.create_database()
    try:
        root_a, root_b = photos(tmp_path / "a"), photos(tmp_path / "b", seeds=range(3, 6))
        for root, url in ((root_a, url_a), (root_b, url_b)):
            with Library.open(root, url=url, write=True, create=True) as library:
                run_index(library, encoder, Options(workers=0))
        id_a, id_b = folder_library_id(root_a / ".dinoseek"), folder_library_id(root_b / ".dinoseek")
        assert id_a != id_b
        before = sorted(os.listdir(root_b / ".dinoseek"))
        for write in (False, True):
            with pytest.raises(LibraryMismatchError, match=f"belongs to library {id_b}, but the catalog .* to library "
                                                           f"{id_a} \\(last used with photos at {root_a}\\)"):
                Library.open(root_b, url=url_a, write=write)
        for args in (("info", root_b), ("verify", root_b, "--repair"), ("similar", "p3.jpg", "--root", root_b),
                     ("dedup", root_b, "--exact")):
            result = invoke(*args, "--url", url_a)
            assert result.exit_code == 1 and len(result.output.splitlines()) == 1, result.output
            assert result.output.startswith(f"Error: {root_b / '.dinoseek'} belongs to library {id_b}")
        assert sorted(os.listdir(root_b / ".dinoseek")) == before  # nothing was written there
        with Library.open(root_a, url=url_a) as library:  # and the catalog still records its own root
            assert library.catalog.library_identity() == (id_a, os.fsencode(str(root_a)))
        # A new, empty database with an existing library's folder: refused too, nothing recorded.
        url_c = postgres_server.create_database()
        try:
            with pytest.raises(LibraryMismatchError, match="records no library"):
                Library.open(root_a, url=url_c, write=True, create=True)
        finally:
            postgres_server.drop_database(url_c)
    finally:
        postgres_server.drop_database(url_a)
        postgres_server.drop_database(url_b)


def test_a_new_folder_for_an_existing_catalog_becomes_that_librarys(tmp_path, encoder, postgres_url, caplog):
    """A folder with no library id yet (a new machine's own library folder): the writer gives it the
    catalog's id, the indexes are rebuilt from the catalog there, and it is that library's from then on."""
    root = photos(tmp_path / "photos")
    with Library.open(root, url=postgres_url, write=True, create=True) as library:
        run_index(library, encoder, Options(workers=0))
        library_id = library.library_id
    other_folder = tmp_path / "elsewhere" / "lib"
    with caplog.at_level(logging.WARNING, logger="dinoseek.indexer.identity"):
        with Library.open(root, folder=other_folder, url=postgres_url, write=True, create=True) as library:
            library.load_indexes()
            assert library.verify() == [] and library.info()["counts"] == {"embedded": 3}
    assert f"library folder {other_folder} had no library id: it is now library {library_id}'s" in caplog.text
    assert folder_library_id(other_folder) == library_id


def test_another_photo_folder_cannot_claim_an_existing_catalog(tmp_path, encoder, tiny_folder, postgres_url):
    """A folder without a library id at another path, given the URL of an existing catalog: if none
    of the catalog's files are there as they were, it is another folder (adopting it would re-embed
    its files into this library); with them there (the same photos mounted elsewhere) it is adopted."""
    root = photos(tmp_path / "photos")
    with Library.open(root, url=postgres_url, write=True, create=True) as library:
        run_index(library, encoder, Options(workers=0))
        library_id = library.library_id
    copies = tmp_path / "copies"
    copies.mkdir()
    for photo in root.glob("*.jpg"):
        shutil.copyfile(photo, copies / photo.name)  # the same names and bytes, new times
        later = photo.stat().st_mtime + 60
        os.utime(copies / photo.name, (later, later))
    with pytest.raises(LibraryMismatchError, match="holds none of its catalogued files as they were"):
        Library.open(copies, url=postgres_url, write=True, create=True)
    assert not (copies / ".dinoseek").exists()  # nothing left behind
    result = invoke("index", copies, *url_args(postgres_url), "--weights", tiny_folder)
    assert result.exit_code == 1 and "a new library needs its own catalog" in result.output
    mounted = tmp_path / "mounted"
    shutil.copytree(root, mounted, ignore=shutil.ignore_patterns(".dinoseek"))  # times kept, as a mount shows them
    with Library.open(mounted, url=postgres_url, write=True, create=True) as library:
        assert library.library_id == library_id and library.info()["counts"] == {"embedded": 3}


def test_an_sqlite_library_folder_with_another_librarys_id_is_refused(tmp_path, encoder):
    root_a, root_b = photos(tmp_path / "a"), photos(tmp_path / "b", seeds=range(3, 6))
    for root in (root_a, root_b):
        with Library.open(root, write=True, create=True) as library:
            run_index(library, encoder, Options(workers=0))
    (root_b / ".dinoseek" / ID_FILE).write_bytes((root_a / ".dinoseek" / ID_FILE).read_bytes())
    result = invoke("info", root_b)
    assert result.exit_code == 1 and len(result.output.splitlines()) == 1
    assert "belongs to library" in result.output and "catalog.sqlite to library" in result.output


def test_an_sqlite_catalog_from_before_the_identity_learns_its_folders_id(tmp_path, encoder):
    """The folder's own catalog restored from before revision 0008 (its migration backup) is still
    that folder's library: it opens, and the next writer records the folder's id in it."""
    root = photos(tmp_path / "photos")
    with Library.open(root, write=True, create=True) as library:
        run_index(library, encoder, Options(workers=0))
        library_id = library.library_id
        with library.catalog.engine.begin() as connection:
            connection.exec_driver_sql("DELETE FROM library")  # as a catalog made before 0008 is
    with Library.open(root) as reader:
        assert reader.library_id == library_id and reader.info()["total"] == 3
    with Library.open(root, write=True) as writer:
        assert writer.catalog.library_identity() == (library_id, os.fsencode(str(root)))


@pytest.mark.parametrize("content", [b"", b"not an id\n", b"\xff" * 40])
def test_a_damaged_library_id_file_is_refused_in_one_line(tmp_path, encoder, catalog_url, content):
    root = photos(tmp_path / "photos", seeds=[0])
    with Library.open(root, url=catalog_url, write=True, create=True) as library:
        run_index(library, encoder, Options(workers=0))
    (root / ".dinoseek" / ID_FILE).write_bytes(content)
    with pytest.raises(LibraryError, match="does not hold a library id"):
        Library.open(root, url=catalog_url, write=True)
    result = invoke("info", root, *url_args(catalog_url))
    assert result.exit_code == 1 and len(result.output.splitlines()) == 1
    assert "library-id does not hold a library id" in result.output


def test_a_failed_first_run_leaves_no_library_id_behind(tmp_path, catalog_url):
    root = photos(tmp_path / "photos", seeds=[0])
    with pytest.raises(RuntimeError), Library.open(root, url=catalog_url, write=True, create=True):
        raise RuntimeError("the model could not be loaded")
    assert not (root / ".dinoseek").exists()


def test_the_catalog_url_can_come_from_the_environment_and_is_suggested_when_missing(tmp_path, encoder, postgres_url):
    root = photos(tmp_path / "photos")
    with Library.open(root, url=postgres_url, write=True, create=True) as library:
        run_index(library, encoder, Options(workers=0))
    result = CliRunner().invoke(main, ["info", str(root), "--json"], env={"DINOSEEK_URL": postgres_url})
    assert result.exit_code == 0 and '"embedded": 3' in result.output
    forgot = CliRunner().invoke(main, ["info", str(root)], env={"DINOSEEK_URL": None})
    assert forgot.exit_code == 1
    assert "if its catalog is on a database server, open it with that catalog's URL" in forgot.output


def test_a_command_line_shown_to_the_user_hides_the_catalog_password():
    from dinoseek.retrieval.cli import _hide_password

    assert _hide_password("postgresql+psycopg://me:s3cret@db.example/photos") == \
        "postgresql+psycopg://me:***@db.example/photos"
    assert _hide_password("sqlite:////tmp/c.sqlite") == "sqlite:////tmp/c.sqlite"


def test_a_new_library_folder_for_a_shared_catalog_indexes_with_the_recorded_model(tmp_path, tiny_folder,
                                                                                  postgres_url):
    """No --model or --weights: the model is the one the catalog records, not the default one."""
    root = photos(tmp_path / "photos")
    first = invoke("index", root, *url_args(postgres_url), "--weights", tiny_folder)
    assert first.exit_code == 0, first.output
    shutil.copyfile(root / "p0.jpg", root / "p9.jpg")  # one new file to embed
    result = invoke("index", root, "--library", tmp_path / "machine-b", *url_args(postgres_url))
    assert result.exit_code == 0, result.output
    assert "1 embedded" in result.output and folder_library_id(tmp_path / "machine-b") is not None
