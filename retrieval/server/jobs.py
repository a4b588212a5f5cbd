"""Apply and undo as background jobs: the request answers at once, the page polls done/total.

Each job runs in a thread of its own, so the event loop keeps serving. Its progress is the step the
library code itself reports (model.progress: "apply" or "undo", in files): the server installs a
display that counts the steps opened in a job's thread into that job, and hands every other step to
the display that was there before (the CLI's bar or lines on the server's terminal).
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from dinoseek.model import progress as progress_module

KINDS = ("apply", "undo")
KEPT_JOBS = 100  # finished jobs remembered for polling; older ones are forgotten


class JobFailed(Exception):
    """A job ended with a reason to show (one line) and, where there is one, a partial result."""

    def __init__(self, message: str, result: dict | None = None) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class Job:
    id: str
    kind: str  # apply | undo
    state: str = "running"  # running | done | failed
    done: int = 0
    total: int | None = None
    result: dict | None = None
    error: str | None = None
    thread: threading.Thread | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {"id": self.id, "kind": self.kind, "state": self.state, "done": self.done, "total": self.total,
                "result": self.result, "error": self.error}


class Jobs:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}

    def running(self) -> Job | None:
        with self._lock:
            return next((j for j in self._jobs.values() if j.state == "running"), None)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def start(self, kind: str, work: Callable[[], dict], cleanup: Callable[[], None], total: int | None = None) -> Job:
        """Run `work()` in a thread; its dict is the job's result, JobFailed or any exception its
        error (one line). `cleanup()` runs after it, whatever happened (closes the writer)."""
        job = Job(secrets.token_hex(8), kind, total=total)
        display = _install_display()

        def run() -> None:
            display.jobs[threading.get_ident()] = job
            try:
                job.result, job.state = work(), "done"
            except JobFailed as e:
                job.result, job.error, job.state = e.result, str(e), "failed"
            except Exception as e:  # noqa: BLE001 - the page is told; the server goes on
                job.error, job.state = (str(e).splitlines() or [type(e).__name__])[0], "failed"
            finally:
                display.jobs.pop(threading.get_ident(), None)
                cleanup()

        job.thread = threading.Thread(target=run, name=f"dinoseek-{kind}-{job.id}", daemon=True)
        with self._lock:
            self._jobs[job.id] = job
            finished = [k for k, j in self._jobs.items() if j.state != "running"]
            for old in finished[:max(0, len(self._jobs) - KEPT_JOBS)]:
                del self._jobs[old]
        job.thread.start()
        return job


class _JobStep:
    """What the display hands back for a step of a job (tqdm's interface, as model.progress expects)."""

    def __init__(self, job: Job, total: int | None, counted: bool) -> None:
        self.job, self.counted = job, counted
        self.total = total

    @property
    def total(self) -> int | None:
        return self.job.total

    @total.setter
    def total(self, total: int | None) -> None:
        if self.counted:
            self.job.total = total

    def update(self, n: int = 1) -> None:
        if self.counted:
            self.job.done += n

    def close(self) -> None:
        pass


class _JobDisplay:
    """model.progress's display while the server runs: steps of job threads count into their job
    (only the step named like the job: "apply", "undo"), every other step goes to `previous`."""

    def __init__(self, previous) -> None:
        self.previous = previous
        self.jobs: dict[int, Job] = {}
        self.stream = getattr(previous, "stream", None)

    def open(self, total, what, unit):
        job = self.jobs.get(threading.get_ident())
        if job is not None:
            return _JobStep(job, total, counted=what == job.kind)
        return self.previous.open(total, what, unit) if self.previous is not None else None

    def mode_for(self, stream) -> str:
        return self.previous.mode_for(stream) if self.previous is not None else "lines"


_install_lock = threading.Lock()


def _install_display() -> _JobDisplay:
    """Put a _JobDisplay in front of the installed display, once. model.progress has no public way
    to add a display of one's own (the CLI installs its own with showing_progress), hence the
    module attribute: the same one showing_progress sets."""
    with _install_lock:
        current = progress_module._display
        if not isinstance(current, _JobDisplay):
            current = _JobDisplay(current)
            progress_module._display = current
        return current
