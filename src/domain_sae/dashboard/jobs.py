"""Background ablation jobs of the prompt page: one daemon worker thread (the model runs one job at a time, under
the same lock as the synchronous part; a stopping server never waits for it), progress readable while it runs, the
last ``keep`` jobs retained. A new prompt supersedes the older jobs: queued ones are skipped and a running one stops
at its next batch (status ``cancelled``), so the model works on what is on the screen."""

from __future__ import annotations

import queue
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any


class _Cancelled(Exception):
    pass


class JobRunner:
    def __init__(self, lock: threading.Lock, keep: int = 32):
        self.lock = lock
        self.keep = keep
        self.jobs: OrderedDict[str, dict] = OrderedDict()
        self.queue: queue.Queue[Callable[[], None]] = queue.Queue()
        self._jobs_lock = threading.Lock()
        threading.Thread(target=self._worker, name="dsae-ablation", daemon=True).start()

    def _worker(self) -> None:
        while True:
            self.queue.get()()

    def submit(self, total: int, work: Callable[[Callable[[int, int], None]], Any]) -> str:
        """Run ``work(progress)`` in the background; returns the job id."""
        job_id = uuid.uuid4().hex[:16]
        job = {"status": "queued", "done": 0, "total": int(total), "result": None, "error": None}
        with self._jobs_lock:
            for old in self.jobs.values():
                if old["status"] in ("queued", "running"):
                    old["status"] = "cancelled"
            self.jobs[job_id] = job
            while len(self.jobs) > self.keep:
                self.jobs.popitem(last=False)

        def progress(done: int, tot: int) -> None:
            job["done"], job["total"] = int(done), int(tot)
            if job["status"] == "cancelled":
                raise _Cancelled

        def run() -> None:
            if job["status"] == "cancelled":
                return
            job["status"] = "running"
            try:
                with self.lock:
                    job["result"] = work(progress)
                job["status"] = "done"
            except _Cancelled:
                job["status"] = "cancelled"
            except Exception as e:  # noqa: BLE001 - reported to the client as JSON
                job["status"], job["error"] = "error", f"{type(e).__name__}: {e}"
        self.queue.put(run)
        return job_id

    def get(self, job_id: str) -> dict | None:
        with self._jobs_lock:
            job = self.jobs.get(job_id)
            return None if job is None else dict(job)
