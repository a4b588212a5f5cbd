"""`dinoseek index --ray`: decoding and embedding on Ray (a local runtime and a real `ray start`
cluster) give the library a local run gives; a killed encoder worker and a killed driver cost
nothing but time; without Ray the flag is a one-line error."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from collection import make_collection
from conftest import synthetic_photo

from dinoseek.indexer.catalog import EMBEDDED, ImageRow
from dinoseek.indexer.library import Library
from dinoseek.retrieval.cli import main

# Skipped without Ray, unless DINOSEEK_REQUIRE_RAY=1 (.ci/run), where they run and fail instead.
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None and os.environ.get("DINOSEEK_REQUIRE_RAY") != "1",
                               reason="ray is not installed (dinoseek[ray])")
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}  # nothing can be reached from the test machines anyway
# Every column of a row that a run computes (not ids, run ids or the vectors, compared by cosine).
COLUMNS = ("status", "reason", "size", "mtime_ns", "sha256", "width", "height", "format", "frames", "captured_at",
           "camera")


@pytest.fixture(autouse=True)
def _quiet_ray(monkeypatch):
    for name, value in RAY_ENV.items():
        monkeypatch.setenv(name, value)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def index_args(root, weights, *extra):
    return ["index", root, "--weights", weights, "--precision", "fp32", *extra]


def make_photos(root: Path, bulk: int = 0) -> set[bytes]:
    """The awkward collection (failures, a nested folder, a non-UTF-8 name), an exact copy for
    dedup, and `bulk` plain photos; returns the paths that must end up embedded."""
    expected = make_collection(root)
    (root / "holiday" / "beach-copy.jpg").write_bytes((root / "holiday" / "beach.jpg").read_bytes())
    expected["holiday/beach-copy.jpg"] = "ok"
    if bulk:
        (root / "bulk").mkdir()
    for i in range(bulk):
        synthetic_photo(480, 360, seed=500 + i).save(root / "bulk" / f"{i:03d}.jpg", quality=85)
        expected[f"bulk/{i:03d}.jpg"] = "ok"
    return {os.fsencode(p) for p, status in expected.items() if status == "ok"}


def catalog_rows(root, folder=None) -> dict[bytes, tuple]:
    with Library.open(root, folder=folder) as library, library.catalog.session() as s:
        return {r.path: (tuple(getattr(r, c) for c in COLUMNS), r.cls, r.patch) for r in s.query(ImageRow)}


def assert_same_library(ours: dict, reference: dict) -> None:
    """Same paths and columns; both vectors of every embedded image with cosine >= 0.9999."""
    assert {p: r[0] for p, r in ours.items()} == {p: r[0] for p, r in reference.items()}
    for path, (columns, *vectors) in reference.items():
        for kind, mine, theirs in zip(("cls", "patch"), ours[path][1:], vectors):
            if theirs is None:
                assert mine is None, (path, kind)
                continue
            a, b = (np.frombuffer(v, np.float16).astype(np.float32) for v in (mine, theirs))
            assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) >= 0.9999, (path, kind)


def assert_complete(root, embedded: set[bytes]) -> None:
    """One row per path, the decodable ones embedded, each with one vector in each index."""
    with Library.open(root, write=True) as library:
        library.load_indexes()
        assert library.verify() == []
        with library.catalog.session() as s:
            paths = [r.path for r in s.query(ImageRow)]
            assert {r.path for r in s.query(ImageRow).filter(ImageRow.status == EMBEDDED)} == embedded
        assert len(paths) == len(set(paths))
        for kind, index in library.load_indexes().items():
            assert len(index.ids()) == len(set(index.ids().tolist())) == len(embedded), kind


# ---- the same library with and without Ray ----------------------------------------------------

@needs_ray
def test_ray_local_gives_the_library_a_local_run_gives(tmp_path, tiny_folder, caplog):
    """`--ray local` on 2 CPUs: the same rows (failures and their reasons included) and vectors as
    the local pipeline; then a moved file and a quarantined file put back are matched by hash, as a
    local run matches them (nothing re-embedded)."""
    from dinoseek.retrieval.actions import apply
    from dinoseek.retrieval.dedup import find_duplicates

    root = tmp_path / "photos"
    embedded = make_photos(root)
    local, ray_lib = tmp_path / "local-library", tmp_path / "ray-library"
    result = invoke(*index_args(root, tiny_folder, "--workers", 1, "--library", local))
    assert result.exit_code == 0, result.output
    with caplog.at_level(logging.INFO, logger="dinoseek"):
        result = invoke(*index_args(root, tiny_folder, "--library", ray_lib, "--ray", "local", "--ray-cpus", 2,
                                    "--batch-size", 4, "-v"))
    assert result.exit_code == 0, result.output
    assert "embedding on Ray: 1 encoder actor(s) on cpu" in caplog.text  # 1 CPU embeds, 1 decodes
    assert f"{len(embedded)} embedded, 0 moved, 5 failed, 0 removed" in result.output
    assert_same_library(catalog_rows(root, ray_lib), catalog_rows(root, local))
    with Library.open(root, folder=ray_lib, write=True) as library:
        library.load_indexes()
        assert library.verify() == []
        before = catalog_rows(root, ray_lib)
        # dedup sets the exact copy aside; it is put back by hand, unchanged: a restore
        done = apply(library, find_duplicates(library, threshold=0.999), "move").done
    assert [step.src.name for step in done] == ["beach-copy.jpg"]
    shutil.move(done[0].dst, done[0].src)
    os.rename(root / "holiday" / "dune.webp", root / "holiday" / "nested" / "dune.webp")
    result = invoke(*index_args(root, tiny_folder, "--library", ray_lib, "--ray", "local", "--ray-cpus", 2))
    assert result.exit_code == 0, result.output
    assert "0 embedded, 1 moved, 0 failed, 0 removed" in result.output
    after = catalog_rows(root, ray_lib)
    assert after[b"holiday/nested/dune.webp"][1:] == before[b"holiday/dune.webp"][1:]  # vectors kept
    assert after[b"holiday/beach-copy.jpg"] == before[b"holiday/beach-copy.jpg"]  # embedded again, as it was
    assert b"holiday/dune.webp" not in after


@needs_ray
def test_a_ray_start_cluster_addressed_by_host_and_port(tmp_path, tiny_folder):
    """A real cluster (`ray start --head`, its own port and temp dir, loopback only), reached with
    `--ray 127.0.0.1:PORT`: the same rows as a local run."""
    root = tmp_path / "photos"
    make_photos(root)
    local = tmp_path / "local-library"
    result = invoke(*index_args(root, tiny_folder, "--workers", 0, "--library", local))
    assert result.exit_code == 0, result.output
    cluster = ray_cluster(cpus=2)
    with cluster as address:
        # In a process of its own, as a user runs it: a Ray client in this process (the other tests'
        # local runtimes) keeps the node address it first saw, and would look for the cluster there.
        result = subprocess.run(cli_command(root, tiny_folder, ray=address), capture_output=True, text=True,
                                timeout=300, env={**os.environ, **RAY_ENV, **cluster.auth})
    assert result.returncode == 0, result.stdout + result.stderr
    assert_same_library(catalog_rows(root), catalog_rows(root, local))


# ---- faults -----------------------------------------------------------------------------------

def start_driver(root, tiny_folder, *, bulk: int, output) -> tuple[subprocess.Popen, set[bytes]]:
    """Photos made under `root` (see make_photos) and `index --ray local` started on them in batches
    of 2, its own session (stop_tree ends what it started), stdout and stderr to `output`."""
    embedded = make_photos(root, bulk=bulk)
    driver = subprocess.Popen(cli_command(root, tiny_folder, "--batch-size", 2), stdout=output,
                              stderr=subprocess.STDOUT, env={**os.environ, **RAY_ENV}, start_new_session=True)
    return driver, embedded


@needs_ray
def test_a_killed_encoder_worker_has_its_batch_retried(tmp_path, tiny_folder):
    """SIGKILL the encoder actor's process (found by pid among the driver's descendants) while
    the run is under way: Ray restarts it, the batch is retried, the run finishes complete."""
    root = tmp_path / "photos"
    driver, embedded = start_driver(root, tiny_folder, bulk=150, output=subprocess.PIPE)
    started = set()
    try:
        actor = wait_for(lambda: next(iter(processes_of(driver.pid, "_EncodeBatch")), None), driver, "encoder actor")
        wait_for(lambda: embedded_rows(root) >= 4 or None, driver, "a first committed batch")
        started = descendants(driver.pid)
        before = set(processes_of(driver.pid, "_EncodeBatch"))
        os.kill(actor, signal.SIGKILL)
        killed_at = embedded_rows(root)
        # Ray restarts the actor: a new encoder process (an actor starts in seconds, the rest of the
        # run takes longer, so it is seen before the driver ends).
        restarted = wait_for(lambda: next(iter(set(processes_of(driver.pid, "_EncodeBatch")) - before), None),
                             driver, "a restarted encoder actor")
        output = driver.communicate(timeout=240)[0].decode(errors="replace")
    finally:
        stop_tree(driver, started)
    assert driver.returncode == 0, output[-3000:]
    assert killed_at < len(embedded), "the run ended before the kill: nothing was tested"
    assert restarted != actor and not alive(actor)
    assert f"{len(embedded)} embedded" in output
    assert_complete(root, embedded)


@needs_ray
def test_a_killed_driver_is_resumed_by_running_the_command_again(tmp_path, tiny_folder):
    """SIGKILL the driver (which started the local runtime) mid-run: its Ray processes go with it;
    the same command run again finishes with exactly one row and one vector per image."""
    root = tmp_path / "photos"
    driver, embedded = start_driver(root, tiny_folder, bulk=100, output=subprocess.DEVNULL)
    started = set()
    try:
        wait_for(lambda: embedded_rows(root) >= 4 or None, driver, "a first committed batch")
        started = descendants(driver.pid)
        actors = processes_of(driver.pid, "_EncodeBatch") + processes_of(driver.pid, "raylet")
        assert len(actors) >= 2, "no encoder actor or raylet under the driver"
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        assert embedded_rows(root) < len(embedded), "the run ended before the kill: nothing was tested"
        # The raylet and the workers share the driver's fate (parent-death signal); Ray's dashboard
        # and runtime-env agents notice later (about a minute here, once their calls to the dead GCS
        # time out) and are ended by stop_tree, by pid.
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in actors) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in actors if alive(pid)], "the encoder actor or raylet outlived the driver"
    finally:
        stop_tree(driver, started)
    result = invoke(*index_args(root, tiny_folder, "--ray", "local", "--ray-cpus", 2))
    assert result.exit_code == 0, result.output
    assert_complete(root, embedded)


def test_without_ray_the_flag_is_a_one_line_error(tmp_path, tiny_folder, monkeypatch):
    root = tmp_path / "photos"
    root.mkdir()
    synthetic_photo(64, 64).save(root / "a.jpg")
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when not installed
    result = invoke(*index_args(root, tiny_folder, "--ray", "local"))
    assert result.exit_code == 1, repr(result.exception)
    assert result.output == "Error: running on Ray needs Ray, which is not installed: pip install 'dinoseek[ray]'\n"
    assert not (root / ".dinoseek").exists()  # refused before anything was made
    import dinoseek.indexer.pipeline  # noqa: F401 - the project itself imports without Ray
    import dinoseek.indexer.ray_executor  # noqa: F401


def test_ray_only_options_need_ray(tmp_path, tiny_folder):
    result = invoke(*index_args(tmp_path, tiny_folder, "--ray-actors", 2))
    assert result.exit_code == 2 and "--ray-cpus and --ray-actors need --ray" in result.output
    result = invoke(*index_args(tmp_path, tiny_folder, "--ray", "auto", "--ray-cpus", 2))
    assert result.exit_code == 2 and "it needs --ray local" in result.output


@needs_ray
def test_a_cluster_that_refuses_the_driver_says_how_to_authenticate(monkeypatch):
    """Ray's own error for a missing token is a bare "Failed to connect" (the cause only in its log)."""
    import ray

    from dinoseek.indexer.errors import RayClusterError
    from dinoseek.indexer.ray_executor import RayOptions, connected

    def refuse(*args, **kwargs):
        raise ConnectionError("Failed to connect to Ray cluster at 192.0.2.2:6379")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with pytest.raises(RayClusterError, match="set RAY_AUTH_MODE=token here and its token"), \
            connected(RayOptions("192.0.2.2:6379")):
        pass
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # the token was given: no hint
    with pytest.raises(RayClusterError) as refused, connected(RayOptions("192.0.2.2:6379")):
        pass
    assert "RAY_AUTH_MODE" not in str(refused.value)


# ---- helpers: processes, clusters -------------------------------------------------------------

def cli_command(root, weights, *extra, ray: str = "local") -> list[str]:
    """`dinoseek index` in a process of its own; `--ray local` on 2 CPUs unless `ray` names a cluster."""
    cpus = ("--ray-cpus", 2) if ray == "local" else ()
    return [sys.executable, "-m", "dinoseek.retrieval.cli", *map(str, index_args(root, weights, "--ray", ray, *cpus,
                                                                                *extra))]


def embedded_rows(root) -> int:
    catalog = root / ".dinoseek" / "catalog.sqlite"
    try:
        with sqlite3.connect(f"file:{catalog}?mode=ro", uri=True, timeout=1) as db:
            return db.execute("select count(*) from images where status = ?", (EMBEDDED,)).fetchone()[0]
    except sqlite3.Error:
        return 0


def wait_for(probe, process, what, seconds=120):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = probe()
        if value is not None:
            return value
        if process.poll() is not None:
            out = process.stdout.read().decode(errors="replace") if process.stdout else ""
            pytest.fail(f"the run ended (exit {process.returncode}) before {what}: {out[-2000:]}")
        time.sleep(0.05)
    pytest.fail(f"no {what} after {seconds} s")


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def descendants(pid: int) -> set[int]:
    tree, found, todo = _children(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def processes_of(pid: int, name: str) -> list[int]:
    """Descendants of `pid` whose command line names `name` (Ray titles an actor's process
    `ray::MapWorker(MapBatches(_EncodeBatch))`)."""
    found = []
    for child in descendants(pid):
        try:
            if name in Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace"):
                found.append(child)
        except OSError:
            pass
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def stop_tree(process: subprocess.Popen, started: set[int]) -> None:
    """Stop `process` and every process it started (by pid: only ours). Drivers run in a session of
    their own, so their process group also reaches Ray processes orphaned after the snapshot."""
    pids = (descendants(process.pid) | started) if process.poll() is None else set(started)
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if process.poll() is None:
        process.kill()
        process.wait()
    for pid in pids:
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_ports(count: int, avoid: set[int]) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = _free_port()
        if port not in avoid and port not in ports:
            ports.append(port)
    return ports


class ray_cluster:
    """`ray start --head --block` on 127.0.0.1 with its own ports and temp dir, stopped afterwards.

    Stopped by ending the blocking `ray start` (it stops what it started) and then any process it
    started, by pid: `ray stop` would stop every Ray process of this user on the machine."""

    def __init__(self, cpus: int) -> None:
        self.cpus = cpus
        # Token authentication (Ray's default) with a token of this cluster's own, which the driver
        # (this process: the caller sets `auth` in its environment) presents.
        self.auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.urandom(16).hex()}

    def __enter__(self) -> str:
        ray = Path(sys.executable).with_name("ray")
        # Short: Ray's Unix sockets live under it, and a socket path is limited to ~107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
        port = _free_port()
        workers = range(port + 1, port + 201)
        agent, metrics = _free_ports(2, avoid={port, *workers})  # Ray refuses a port inside the workers' range
        command = [str(ray), "start", "--head", "--block", f"--port={port}", f"--temp-dir={self.temp_dir}",
                   "--node-ip-address=127.0.0.1", f"--num-cpus={self.cpus}", "--num-gpus=0",
                   "--include-dashboard=false", "--disable-usage-stats",
                   f"--dashboard-agent-listen-port={agent}", f"--metrics-export-port={metrics}",
                   f"--min-worker-port={workers[0]}", f"--max-worker-port={workers[-1]}"]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        env={**os.environ, **RAY_ENV, **self.auth}, start_new_session=True)
        try:
            wait_for(lambda: True if _listening(port) else None, self.process, "the cluster's GCS port", 90)
        except BaseException:
            self.__exit__()
            raise
        return f"127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        started = descendants(self.process.pid)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # `--block` stops its processes on Ctrl-C (SIGTERM: not soon)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        stop_tree(self.process, started)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_encoder_actors_reserve_half_the_cpus():
    """Without GPUs half the CPUs are reserved for embedding (the rest decode); an actor of one CPU
    runs two threads, as decoding and embedding take turns on a core. With GPUs: one actor per GPU,
    one CPU and one thread each (the GPU embeds)."""
    from dinoseek.indexer.ray_executor import RayOptions, _actor_plan

    local = RayOptions("local")
    assert _actor_plan(local, {"CPU": 2}) == (1, {"num_cpus": 1}, "cpu", 2)
    assert _actor_plan(local, {"CPU": 16}) == (2, {"num_cpus": 4}, "cpu", 4)
    assert _actor_plan(RayOptions("local", actors=4), {"CPU": 16}) == (4, {"num_cpus": 2}, "cpu", 2)
    assert _actor_plan(local, {"CPU": 32, "GPU": 2}) == (2, {"num_gpus": 1, "num_cpus": 1}, "cuda", 1)
