"""The model worker: the one thread that does the dashboard's model work (prompt analysis, ablation jobs, steering,
live tests), so no request handler ever waits for the model on the event loop.

A task is a generator: each ``next()`` runs one bounded unit of model work (one ablation batch, one steering
step) and yields the priority of its next unit; its return value is the task's result. The worker keeps a priority
queue of tasks (``INTERACTIVE`` before ``BACKGROUND``, first come first served within one), runs one unit of the
first, and puts it back. So an answer someone waits for (the first metrics of a prompt, a live test) runs after at
most one unit of a background job (one ablation batch), and a cancelled task stops at its next unit.

A new task of a kind supersedes the unfinished tasks of that kind (``supersede=True``): they are flagged cancelled
at once and dropped by the worker before their next unit ("the model works on what is on the screen"). A task is
also cancelled by id, and when the request awaiting its answer goes away (the client disconnected); model code
that runs long within one unit calls ``task.check()`` (it raises :class:`Cancelled`). The last ``keep`` tasks stay
readable (status, progress, result, error): beyond them the oldest finished ones are forgotten, never an
unfinished one.
"""

from __future__ import annotations

import itertools
import queue
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Generator
from concurrent.futures import Future
from typing import Any

from ..errors import UserError

INTERACTIVE, BACKGROUND = 0, 1
Steps = Generator[int, None, Any]


class Cancelled(Exception):
    """Raised inside a task by :meth:`Task.check` once the task is cancelled."""


class Superseded(UserError):
    """The request was replaced by a newer one of the same kind (or cancelled) before it answered."""


class Task:
    """One unit of model work: status ``queued`` -> ``running`` -> ``done`` | ``cancelled`` | ``error``, progress
    ``done``/``total``, ``answer`` (a future the request handler awaits: the task's first answer, set by the task
    itself with :meth:`reply` or, else, its result)."""

    def __init__(self, kind: str, total: int = 0):
        self.id = uuid.uuid4().hex[:16]
        self.kind, self.total, self.done = kind, int(total), 0
        self.status, self.result, self.error = "queued", None, None
        self.cancelled = threading.Event()
        self.answer: Future = Future()
        self.answer.add_done_callback(lambda f: f.cancelled() and self.cancelled.set())   # nobody waits any more

    def check(self) -> None:
        if self.cancelled.is_set():
            raise Cancelled

    def advance(self, n: int = 1) -> None:
        self.done = min(self.done + n, self.total) if self.total else self.done + n

    def reply(self, value: Any) -> None:
        if not self.answer.done():
            self.answer.set_result(value)

    def view(self) -> dict:
        return {"id": self.id, "kind": self.kind, "status": self.status, "done": self.done, "total": self.total,
                "result": self.result, "error": self.error}


class ModelWorker:
    def __init__(self, keep: int = 64):
        self.keep = keep
        self.tasks: OrderedDict[str, Task] = OrderedDict()
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="dsae-model-worker", daemon=True)
        self._thread.start()

    def submit(self, kind: str, steps: Callable[[Task], Steps], *, total: int = 0, supersede: bool = True) -> Task:
        """Queue ``steps(task)`` (a generator, module docstring) at interactive priority; returns the task."""
        task = Task(kind, total)
        with self._lock:
            if supersede:
                for old in self.tasks.values():
                    if old.kind == kind and old.status in ("queued", "running"):
                        old.cancelled.set()
            self.tasks[task.id] = task
            finished = [k for k, t in self.tasks.items() if t.status in ("done", "cancelled", "error")]
            for k in finished[:max(0, len(self.tasks) - self.keep)]:
                del self.tasks[k]
        self._queue.put((INTERACTIVE, next(self._order), task, steps(task)))
        return task

    def cancel(self, task_id: str) -> Task | None:
        task = self.get(task_id)
        if task is not None and task.status in ("queued", "running"):
            task.cancelled.set()
        return task

    def get(self, task_id: str) -> Task | None:
        with self._lock:
            return self.tasks.get(task_id)

    def _finish(self, task: Task, gen: Steps, status: str, exc: BaseException | None = None) -> None:
        gen.close()
        task.status = status
        if task.answer.done():
            return
        if status == "done":
            task.answer.set_result(task.result)
        elif status == "cancelled":
            task.answer.set_exception(Superseded(f"This {task.kind} request was cancelled or replaced by a newer "
                                                 f"one before it finished; send it again."))
        else:
            task.answer.set_exception(exc or RuntimeError(task.error))

    def _run(self) -> None:
        while True:
            _, _, task, gen = self._queue.get()
            if task.cancelled.is_set():
                self._finish(task, gen, "cancelled")
                continue
            task.status = "running"
            try:
                priority = next(gen)
            except StopIteration as stop:
                task.result = stop.value
                self._finish(task, gen, "done")
            except Cancelled:
                self._finish(task, gen, "cancelled")
            except Exception as e:  # noqa: BLE001 - reported to the client, the worker goes on
                task.error = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
                self._finish(task, gen, "error", e)
            else:
                self._queue.put((BACKGROUND if priority == BACKGROUND else INTERACTIVE, next(self._order), task, gen))
