"""Apply and undo as background jobs: the request answers at once, the page polls done/total.

Each job runs in a thread of its own, so the event loop keeps serving. Its progress is the step the
library code itself reports (model.progress: "apply" or "undo", in files), followed in the job's
own thread (progress.observing_steps); the display on the server's terminal, if any, is untouched.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from dinoseek.model.progress import observing_steps

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

        def follow(step) -> None:  # the step named like the job ("apply", "undo") is its progress
            if step.what == job.kind:
                job.done, job.total = step.done, step.total if step.total is not None else job.total

        def run() -> None:
            try:
                with observing_steps(follow):
                    job.result, job.state = work(), "done"
            except JobFailed as e:
                job.result, job.error, job.state = e.result, str(e), "failed"
            except Exception as e:  # noqa: BLE001 - the page is told; the server goes on
                job.error, job.state = (str(e).splitlines() or [type(e).__name__])[0], "failed"
            finally:
                cleanup()

        job.thread = threading.Thread(target=run, name=f"dinoseek-{kind}-{job.id}", daemon=True)
        with self._lock:
            self._jobs[job.id] = job
            finished = [k for k, j in self._jobs.items() if j.state != "running"]
            for old in finished[:max(0, len(self._jobs) - KEPT_JOBS)]:
                del self._jobs[old]
        job.thread.start()
        return job
