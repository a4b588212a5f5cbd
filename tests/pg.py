"""A real PostgreSQL server for the test session: `initdb` + `pg_ctl` in a temporary folder.

The server listens on a Unix socket only (no TCP port, `listen_addresses=''`), in a folder made for
it, and is stopped (`pg_ctl stop -m immediate`) and removed at the end of the session. `initdb` and
`postgres` refuse to run as root: run as root, the binaries run as the `postgres` user (created if
missing) through `runuser`. Each test that asks for a PostgreSQL catalog gets a database of its own.

Where no PostgreSQL binaries are found, PostgreSQL tests skip with the reason; with
DINOSEEK_REQUIRE_POSTGRES=1 (what `.ci/run` sets) they fail instead.
References: pytest-postgresql's process fixture (the same steps, as a plain fixture here).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

REQUIRE = os.environ.get("DINOSEEK_REQUIRE_POSTGRES") == "1"
PG_USER = "postgres"


def find_bin_dir() -> Path | None:
    """The folder holding `initdb`, `pg_ctl` and `postgres`: $PG_BIN, then PATH, then Debian's layout."""
    candidates = [os.environ.get("PG_BIN")]
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(str(Path(on_path).resolve().parent))
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for candidate in filter(None, candidates):
        if all((Path(candidate) / tool).exists() for tool in ("initdb", "pg_ctl", "postgres")):
            return Path(candidate)
    return None


def unavailable(reason: str):
    if REQUIRE:
        pytest.fail(f"PostgreSQL is required (DINOSEEK_REQUIRE_POSTGRES=1) but {reason}")
    pytest.skip(f"PostgreSQL tests skipped: {reason}")


class Server:
    """One running PostgreSQL cluster, reachable through the Unix socket in `socket_dir`."""

    def __init__(self, bin_dir: Path, base: Path, as_user: str | None) -> None:
        self.bin_dir, self.base, self.as_user = bin_dir, base, as_user
        self.data, self.socket_dir = base / "data", base / "socket"
        self.user = as_user or pwd.getpwuid(os.getuid()).pw_name  # initdb makes the OS user the superuser

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if self.as_user:
            command = ["runuser", "-u", self.as_user, "--", *command]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=self.base)

    def start(self) -> None:
        for folder in (self.data, self.socket_dir):
            folder.mkdir(mode=0o700)
        if self.as_user:
            entry = pwd.getpwnam(self.as_user)
            for folder in (self.base, self.data, self.socket_dir):
                os.chown(folder, entry.pw_uid, entry.pw_gid)
        done = self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", self.user, "-E", "UTF8",
                         "--no-locale", "--no-sync")
        if done.returncode:
            raise RuntimeError(f"initdb failed: {done.stderr.strip() or done.stdout.strip()}")
        options = f"-c listen_addresses='' -c unix_socket_directories={self.socket_dir} -c fsync=off " \
                  "-c full_page_writes=off -c max_connections=200"
        done = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.base / "server.log"), "-o", options,
                         "-w", "-t", "60", "start")
        if done.returncode:
            log = (self.base / "server.log").read_text(errors="replace") if (self.base / "server.log").exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {done.stderr.strip()} {log[-2000:]}")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=60)

    def stop_if_running(self) -> None:
        """After a failed start: a postmaster may be up all the same (pg_ctl timed out waiting)."""
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(Exception):
                self.stop()

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL of `database`, through the socket (psycopg reads `host` as a folder)."""
        return f"postgresql+psycopg://{self.user}@/{database}?host={self.socket_dir}"

    def create_database(self) -> str:
        """A new, empty database; returns its URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        self._admin(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def copy_database(self, url: str) -> str:
        """A new database holding a copy of `url`'s (PostgreSQL's TEMPLATE: nobody may be connected
        to it meanwhile); returns its URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        self._admin(f'CREATE DATABASE "{name}" TEMPLATE "{database_name(url)}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{database_name(url)}" WITH (FORCE)')

    def _admin(self, statement: str) -> None:
        """One statement outside a transaction (CREATE/DROP DATABASE cannot run in one)."""
        from sqlalchemy import create_engine

        engine = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as connection:
                connection.exec_driver_sql(statement)
        finally:
            engine.dispose()


def database_name(url: str) -> str:
    """The database a URL names (its `?host=` is a folder path: the last "/" is not the database's)."""
    from sqlalchemy.engine import make_url

    return make_url(url).database


def ensure_user(name: str) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                       check=True, capture_output=True)


@pytest.fixture(scope="session")
def postgres_server():
    """The session's PostgreSQL server (skips, or fails when required, where none can run)."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        unavailable("no PostgreSQL binaries (initdb, pg_ctl, postgres) on PATH, in $PG_BIN or /usr/lib/postgresql")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        unavailable("the psycopg driver is not installed (pip install 'dinoseek[postgres]')")
    as_user = None
    if os.getuid() == 0:
        ensure_user(PG_USER)
        as_user = PG_USER
    # Short path: a Unix socket's path is limited to ~107 bytes, pytest's tmp folders can be longer.
    base = Path(tempfile.mkdtemp(prefix="dinoseek-pg-", dir="/tmp"))
    os.chmod(base, 0o755)
    server = Server(bin_dir, base, as_user)
    try:
        server.start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        server.stop_if_running()
        shutil.rmtree(base, ignore_errors=True)
        unavailable(f"the server did not start: {e}")
    try:
        yield server
    finally:
        try:
            server.stop()
        finally:
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh database on the session's server, dropped after the test."""
    url = postgres_server.create_database()
    yield url
    postgres_server.drop_database(url)


@pytest.fixture(scope="module")
def postgres_url_module(postgres_server):
    """A fresh database for a whole test module (for module-scoped fixtures that build a library
    once), dropped after the module."""
    url = postgres_server.create_database()
    yield url
    postgres_server.drop_database(url)
