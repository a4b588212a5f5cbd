"""Progress of long steps: a bar with counts on a terminal, count lines every few seconds elsewhere,
never on stdout; Ctrl-C says what was saved and how to go on.

The display is tqdm's (model/progress.py); these tests drive it through the CLI on a real
pseudo-terminal, through pipes, and through CliRunner, and check the step reports of the library
code (index, calibrate, int4 calibration) through a display installed on a StringIO.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import select
import shlex
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import synthetic_photo

from dinoseek.model.progress import describe, progress, showing_progress, track
from dinoseek.retrieval.cli import main

REPO = Path(__file__).resolve().parents[1]
COUNT_LINE = re.compile(r"^index: (\d[\d,]*)/(\d[\d,]*) images \(\d+%\)")


def invoke(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


@pytest.fixture()
def photos(tmp_path) -> Path:
    """30 small photos and one file that is not an image, under a root whose name needs quoting."""
    root = tmp_path / "my photos"
    root.mkdir()
    for i in range(30):
        synthetic_photo(64, 48, seed=i).save(root / f"p{i:02d}.jpg", quality=85)
    (root / "broken.jpg").write_bytes(b"<html>not a photo</html>")
    return root


def index_args(root, weights, *extra):
    return ["index", root, "--weights", weights, "--precision", "fp32", "--workers", 0, *extra]


# ---- the line format ------------------------------------------------------------------------------
def test_a_count_line_names_counts_percent_rate_and_eta():
    assert describe("index", 1200, 10_000, "images", rate=85.0) == "index: 1,200/10,000 images (12%), 85/s, ETA 1m44s"
    assert describe("scan", 12_345, None, "files", rate=5000.0) == "scan: 12,345 files, 5,000/s"
    assert describe("grouping", 3, 8, "pairs", rate=0.5) == "grouping: 3/8 pairs (37%), 0.5/s, ETA 10s"
    assert describe("index", 40, 40, "images", rate=9.5, elapsed=3725, finished=True) == \
        "index: 40/40 images (100%), 9.5/s, in 1h02m"


# ---- the API library code uses ---------------------------------------------------------------------
def test_without_a_display_a_step_only_counts(capsys):
    with progress(5, "grouping", unit="pairs") as step:
        step.update(2)
        step.update()
    assert step.done == 3
    assert list(track(range(4), "thumbnails")) == [0, 1, 2, 3]
    with progress(None, "scan", unit="files") as step:
        assert sum(step.count(iter(range(5)))) == 10
    assert step.done == 5
    assert capsys.readouterr() == ("", "")


def test_plain_lines_are_throttled_to_the_interval_and_carry_counts(monkeypatch):
    monkeypatch.setenv("DINOSEEK_PROGRESS_INTERVAL", "0.2")
    out = io.StringIO()  # not a terminal
    started = time.monotonic()
    with showing_progress(out):
        for _ in track(range(60), "grouping", unit="pairs"):
            time.sleep(0.02)
    elapsed = time.monotonic() - started
    lines = out.getvalue().splitlines()
    assert 2 <= len(lines) <= elapsed / 0.2 + 2, lines  # far fewer than one per item
    assert all(re.match(r"^grouping: \d+/60 pairs \(\d+%\)", line) for line in lines), lines
    assert lines[-1].startswith("grouping: 60/60 pairs (100%)") and ", in " in lines[-1]


@pytest.mark.parametrize("mode", ["bar", "lines"])
def test_short_steps_show_nothing(monkeypatch, mode):
    """A bar only after a second; lines only after the interval (default 10 s)."""
    monkeypatch.delenv("DINOSEEK_PROGRESS_INTERVAL", raising=False)
    out = io.StringIO()
    with showing_progress(out, mode=mode):
        for _ in track(range(100), "quick"):
            time.sleep(0.001)
    assert out.getvalue() == ""


def test_echo_writes_a_line_above_the_bar(monkeypatch):
    from dinoseek.model.progress import echo

    monkeypatch.setenv("DINOSEEK_PROGRESS_INTERVAL", "0")
    out = io.StringIO()
    with showing_progress(out, mode="bar"), progress(4, "apply", unit="files") as step:
        step.update(2)
        echo("skipped a.jpg: changed since the plan")
        step.update(2)
    shown = out.getvalue()
    assert "\rskipped a.jpg: changed since the plan\n" in shown  # the bar cleared, the line, then the bar again
    assert shown.rindex("4/4") > shown.index("skipped a.jpg")


def test_a_total_learnt_later_is_shown(monkeypatch):
    monkeypatch.setenv("DINOSEEK_PROGRESS_INTERVAL", "0")
    out = io.StringIO()
    with showing_progress(out), progress(None, "candidates", unit="pairs") as step:
        step.update(3)
        step.total = 10
        step.update(2)
    assert out.getvalue().splitlines()[-1].startswith("candidates: 5/10 pairs (50%)")


def test_progress_off_shows_nothing(monkeypatch):
    monkeypatch.setenv("DINOSEEK_PROGRESS_INTERVAL", "0")
    monkeypatch.setenv("DINOSEEK_PROGRESS", "off")
    out = io.StringIO()
    with showing_progress(out):
        for _ in track(range(5), "index"):
            pass
    assert out.getvalue() == ""


def test_a_terminal_without_a_size_still_gets_a_bar(monkeypatch):
    """A bare pty reports 0 columns; tqdm would draw an empty bar in it."""
    monkeypatch.setenv("DINOSEEK_PROGRESS_INTERVAL", "0")
    master, slave = pty.openpty()
    with os.fdopen(slave, "w") as terminal:
        with showing_progress(terminal):
            for _ in track(range(7), "index"):
                pass
        terminal.flush()
        shown = _read_all(master, until=b"7/7")
    os.close(master)
    assert b"index: 100%" in shown and b"7/7" in shown


def test_int4_calibration_reports_its_blocks(tiny_folder, monkeypatch):
    from dinoseek.model import load_vit
    from dinoseek.model.gptq import calibration_images, quantize_vit_int4_gptq
    from dinoseek.model.preprocess import preprocess

    monkeypatch.setenv("DINOSEEK_PROGRESS_INTERVAL", "0")
    vit = load_vit(tiny_folder).float()
    out = io.StringIO()
    with showing_progress(out):
        quantize_vit_int4_gptq(vit, preprocess(calibration_images(count=2, size=64)))
    blocks = len(vit.blocks)
    assert out.getvalue().splitlines()[-1].startswith(f"int4 calibration: {blocks}/{blocks} blocks (100%)")


# ---- the CLI ---------------------------------------------------------------------------------------
def _read_all(fd: int, until: bytes | None = None, timeout: float = 10) -> bytes:
    """What a terminal shows: read the pty's master side until EOF (or `until` appears)."""
    data = b""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if not ready:
            if until is not None and until in data:
                break
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the other side closed (Linux: EIO)
            break
        if not chunk:
            break
        data += chunk
    return data


def test_index_on_a_real_terminal_shows_a_bar_with_counts_rate_and_eta(photos, tiny_folder):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a 120-column terminal
    env = {**os.environ, "DINOSEEK_PROGRESS_INTERVAL": "0"}  # show it even if the run takes under a second
    env.pop("DINOSEEK_PROGRESS", None)
    process = subprocess.Popen([sys.executable, "-m", "dinoseek.retrieval.cli",
                                *map(str, index_args(photos, tiny_folder, "--batch-size", 2))],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, cwd=REPO, env=env)
    os.close(slave)
    try:
        terminal = _read_all(master, timeout=300).decode(errors="replace")
        out, _ = process.communicate(timeout=60)
    finally:
        os.close(master)
    assert process.returncode == 0, terminal[-2000:]
    # tqdm's bar, redrawn in place: percentage, the bar, done/total, elapsed<remaining, rate
    assert re.search(r"index: +\d+%\|.*\| \d+/31 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+ images/s\]", terminal), terminal
    assert "index: 100%" in terminal and "31/31" in terminal
    assert "\r" in terminal and "embedding (" not in terminal
    assert out.decode().startswith("30 embedded, 0 moved, 1 failed")  # stdout: the summary only


def test_index_without_a_terminal_prints_count_lines_not_one_line_per_image(photos, tiny_folder, monkeypatch):
    from dinoseek.indexer import pipeline

    flush = pipeline._BatchWriter.flush

    def slow_flush(self):  # a slow model: the run takes long enough for several lines
        time.sleep(0.1)
        flush(self)

    monkeypatch.setattr(pipeline._BatchWriter, "flush", slow_flush)
    started = time.monotonic()
    result = invoke(*index_args(photos, tiny_folder, "--batch-size", 2), env={"DINOSEEK_PROGRESS_INTERVAL": "0.3"})
    elapsed = time.monotonic() - started
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("index: ")]
    assert lines and all(COUNT_LINE.match(line) for line in lines), result.stderr
    assert 2 <= len(lines) <= elapsed / 0.3 + 2 and len(lines) < 31, lines  # throttled: never one per image
    assert lines[-1].startswith("index: 31/31 images (100%)")
    assert "\r" not in result.stderr and "embedding" not in result.stderr
    assert result.stdout.startswith("30 embedded") and "index:" not in result.stdout  # progress: stderr only


def test_verbose_logs_each_skipped_file_besides_the_counts(photos, tiny_folder, caplog):
    # Under pytest the log lines reach caplog's handler (logging keeps the first one installed).
    result = invoke(*index_args(photos, tiny_folder), "-v", env={"DINOSEEK_PROGRESS_INTERVAL": "0"})
    assert result.exit_code == 0, result.output
    logged = [r.getMessage() for r in caplog.records if r.name == "dinoseek.indexer.pipeline"]
    assert logged == ["skipped broken.jpg: not an image Pillow recognises (unidentified)"]  # none per good image
    assert any(COUNT_LINE.match(line) for line in result.stderr.splitlines())


def test_calibrate_json_stdout_is_pure_json_while_progress_goes_to_stderr(photos, tiny_folder):
    assert invoke(*index_args(photos, tiny_folder)).exit_code == 0
    result = invoke("calibrate", photos, "--weights", tiny_folder, "--precision", "fp32", "--sample", 6, "--json",
                    env={"DINOSEEK_PROGRESS_INTERVAL": "0"})
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["photos"] == 6 and data["rows"]
    stderr = result.stderr.splitlines()
    assert any(line.startswith("calibrate: altering: 6/6 photos (100%)") for line in stderr), result.stderr
    assert any(line.startswith("calibrate: embedding: 30/30 copies (100%)") for line in stderr), result.stderr


# ---- Ctrl-C ----------------------------------------------------------------------------------------
def test_ctrl_c_during_index_names_what_was_saved_and_the_resume_command(photos, tiny_folder, monkeypatch):
    from dinoseek.indexer import pipeline

    flush = pipeline._BatchWriter.flush
    calls = 0

    def interrupted_on_the_third_batch(self):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt
        flush(self)

    monkeypatch.setattr(pipeline._BatchWriter, "flush", interrupted_on_the_third_batch)
    result = invoke(*index_args(photos, tiny_folder, "--batch-size", 4))
    assert result.exit_code == 130, result.output
    again = f"dinoseek index {shlex.quote(str(photos))} --weights {shlex.quote(str(tiny_folder))}"
    assert result.stderr.splitlines()[-1] == (
        f"interrupted: 9 of 31 images saved in the catalog; run `{again}` again to resume")  # 2 batches + broken.jpg
    assert "Traceback" not in result.output

    monkeypatch.setattr(pipeline._BatchWriter, "flush", flush)
    resumed = invoke(*shlex.split(again)[1:], "--precision", "fp32", "--workers", 0)
    assert resumed.exit_code == 0, resumed.output
    assert resumed.stdout.startswith("22 embedded, 0 moved, 0 failed")  # the 9 saved ones are not read again


def test_ctrl_c_while_calibrating_says_nothing_changed(photos, tiny_folder, monkeypatch):
    from dinoseek.retrieval import calibrate

    assert invoke(*index_args(photos, tiny_folder)).exit_code == 0

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(calibrate, "calibrate", interrupted)
    result = invoke("calibrate", photos, "--weights", tiny_folder, "--precision", "fp32", "--json")
    assert result.exit_code == 130 and result.stdout == ""
    assert result.stderr == (f"interrupted: calibration changes nothing in the library; `dinoseek calibrate "
                             f"{shlex.quote(str(photos))} --weights {shlex.quote(str(tiny_folder))}` starts it again\n")


def test_observing_steps_sees_only_its_own_threads_steps():
    import threading

    from dinoseek.model.progress import observing_steps, progress

    seen = []

    def other_thread():
        with progress(3, "elsewhere") as step:
            step.update(3)

    with observing_steps(lambda step: seen.append((step.what, step.done, step.total))):
        with progress(2, "apply", unit="files") as step:
            worker = threading.Thread(target=other_thread)
            worker.start()
            worker.join()
            step.update()
            step.update()
    with progress(1, "after") as step:
        step.update()
    assert seen == [("apply", 1, 2), ("apply", 2, 2)]
