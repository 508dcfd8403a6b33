"""Background ablation jobs of the prompt page: one worker thread (the model runs one job at a time, under the
same lock as the synchronous part), progress readable while it runs, the last ``keep`` jobs retained."""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class JobRunner:
    def __init__(self, lock: threading.Lock, keep: int = 32):
        self.lock = lock
        self.keep = keep
        self.jobs: OrderedDict[str, dict] = OrderedDict()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dsae-ablation")
        self._jobs_lock = threading.Lock()

    def submit(self, total: int, work: Callable[[Callable[[int, int], None]], Any]) -> str:
        """Run ``work(progress)`` in the background; returns the job id."""
        job_id = uuid.uuid4().hex[:16]
        job = {"status": "queued", "done": 0, "total": int(total), "result": None, "error": None}
        with self._jobs_lock:
            self.jobs[job_id] = job
            while len(self.jobs) > self.keep:
                self.jobs.popitem(last=False)

        def progress(done: int, tot: int) -> None:
            job["done"], job["total"] = int(done), int(tot)

        def run() -> None:
            job["status"] = "running"
            try:
                with self.lock:
                    job["result"] = work(progress)
                job["status"] = "done"
            except Exception as e:  # noqa: BLE001 - reported to the client as JSON
                job["status"], job["error"] = "error", f"{type(e).__name__}: {e}"
        self.pool.submit(run)
        return job_id

    def get(self, job_id: str) -> dict | None:
        with self._jobs_lock:
            job = self.jobs.get(job_id)
            return None if job is None else dict(job)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
