"""The model worker (dashboard/worker.py) and the server that never freezes: priorities, superseding within one
step, cancellation, errors; over HTTP, the old freeze (an ablation job in flight, a second prompt, /api/store
polled meanwhile) now answers every poll within 200 ms, and the second prompt stops the first job."""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
import httpx  # noqa: E402 (after the skip checks)
from dashboard_helpers import build_store, tiny_model, wait_job
from feature_helpers import make_sae

from domain_sae.dashboard.app import create_app
from domain_sae.dashboard.serve import BackgroundServer
from domain_sae.dashboard.worker import BACKGROUND, INTERACTIVE, ModelWorker, Superseded


def _wait(cond, timeout: float = 10.0) -> None:
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise AssertionError("timed out")
        time.sleep(0.005)


def test_interactive_work_goes_before_the_next_background_step():
    w = ModelWorker()
    order, go = [], threading.Event()

    def job(task):
        for i in range(4):
            if i == 0:
                go.wait(10)
            order.append(f"bg{i}")
            yield BACKGROUND

    def quick(task):
        order.append("fg")
        yield from ()
        return 42
    bg = w.submit("prompt", job)
    _wait(lambda: bg.status == "running")
    fg = w.submit("live", quick)
    go.set()
    assert fg.answer.result(10) == 42
    _wait(lambda: bg.status == "done")
    assert order == ["bg0", "fg", "bg1", "bg2", "bg3"]


def test_a_newer_task_of_a_kind_stops_the_older_within_one_step():
    w = ModelWorker()
    steps: dict[str, int] = {}

    def job(name):
        def steps_of(task):
            for _ in range(200):
                time.sleep(0.005)
                steps[name] = steps.get(name, 0) + 1
                yield BACKGROUND
            return name
        return steps_of
    a = w.submit("prompt", job("a"))
    _wait(lambda: steps.get("a", 0) >= 3)
    at_submit = steps["a"]
    b = w.submit("prompt", job("b"))
    assert a.cancelled.is_set()
    _wait(lambda: b.status == "done")
    assert a.status == "cancelled" and steps["a"] <= at_submit + 1 and b.result == "b"
    with pytest.raises(Superseded):
        a.answer.result(1)
    other = w.submit("steer", job("c"))       # another kind is not superseded by a prompt
    w.submit("prompt", job("d"))
    _wait(lambda: other.status == "done", 30)


def test_errors_and_cancelled_queued_tasks_answer_and_the_worker_goes_on():
    w = ModelWorker()
    hold = threading.Event()

    def blocker(task):
        hold.wait(10)
        yield INTERACTIVE

    def boom(task):
        yield from ()
        raise ValueError("bad latent")

    def fine(task):
        yield from ()
        return "ok"
    w.submit("blocker", blocker)
    queued = w.submit("steer", fine)
    assert w.cancel(queued.id) is queued and w.cancel("nope") is None
    failing = w.submit("live", boom)
    after = w.submit("other", fine)
    hold.set()
    assert after.answer.result(10) == "ok"
    with pytest.raises(Superseded):
        queued.answer.result(1)
    with pytest.raises(ValueError, match="bad latent"):
        failing.answer.result(1)
    assert queued.view()["status"] == "cancelled" and queued.done == 0
    assert failing.view() == {**failing.view(), "status": "error", "error": "ValueError: bad latent"}


def test_nobody_waiting_cancels_and_finished_tasks_are_forgotten_first():
    w = ModelWorker(keep=3)
    hold = threading.Event()

    def blocker(task):
        hold.wait(10)
        yield INTERACTIVE

    def fine(task):
        yield from ()
        return "ok"
    running = w.submit("blocker", blocker)
    gone = w.submit("live", fine)
    assert gone.answer.cancel() and gone.cancelled.is_set()     # the awaiting request went away
    hold.set()
    _wait(lambda: gone.status == "cancelled" and running.status == "done")
    hold.clear()
    slow = w.submit("steer", blocker)
    _wait(lambda: slow.status == "running")
    for _ in range(4):
        w.submit("other", fine, supersede=False)
    assert w.get(slow.id) is slow and len(w.tasks) == 5       # unfinished tasks are kept, finished ones dropped
    assert w.get(running.id) is None and w.get(gone.id) is None
    hold.set()


LONG = ("Hello there! How are you doing today? I am fine, thank you. We went to the market and bought apples, "
        "pears and a small cake for the party. def add(a, b):\n    return a + b\n") * 2


def test_no_freeze_while_a_job_runs_and_a_second_prompt_arrives(smol_tokenizer, tmp_path):
    """The freeze of the old server: an ablation job in flight (one latent per batch), a second prompt arrives and
    /api/store is polled meanwhile. Every poll answers within 200 ms, the second prompt gets its metrics while the
    first job is stopped (cancelled, not finished), and the second job completes."""
    lm = tiny_model(smol_tokenizer)
    sae = make_sae(21, d_sae=96)
    path = build_store(tmp_path, lm, {"general": sae})
    app = create_app(path, lm=lm, saes={"general": sae}, ablation_batch=1, max_candidates=96)
    lat: list[float] = []
    with BackgroundServer(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        first = c.post("/api/prompt", json={"text": LONG}).json()
        assert first["n_tokens"] > 60 and len(first["candidates"]) >= 40   # a job of 40+ one-latent batches
        _wait(lambda: c.get(f"/api/job/{first['job']}").json()["done"] >= 2, 60)
        second: dict = {}

        def post_second():
            with httpx.Client(base_url=url, timeout=60) as c2:
                t0 = time.perf_counter()
                second["r"] = c2.post("/api/prompt", json={"text": "Tell me about " + LONG[:200]})
                second["s"] = time.perf_counter() - t0
        th = threading.Thread(target=post_second)
        th.start()
        while th.is_alive() or len(lat) < 20:
            t0 = time.perf_counter()
            assert c.get("/api/store").status_code == 200
            lat.append(time.perf_counter() - t0)
            time.sleep(0.01)
        th.join()
        j1 = c.get(f"/api/job/{first['job']}").json()
        assert second["r"].status_code == 200
        assert j1["status"] == "cancelled" and j1["done"] < j1["total"], j1
        assert wait_job(c.get, second["r"].json()["job"])["status"] == "done"
    assert max(lat) < 0.2, f"slowest /api/store poll {max(lat):.3f} s of {len(lat)}"


def test_a_client_that_goes_away_cancels_its_work(smol_tokenizer, tmp_path):
    """The worker is held by another task; a live test whose client gives up (timeout) is cancelled before it runs,
    and every answer carries the security headers."""
    lm = tiny_model(smol_tokenizer)
    sae = make_sae(22, d_sae=8)
    app = create_app(build_store(tmp_path, lm, {"g": sae}), lm=lm, saes={"g": sae})
    hold = threading.Event()

    def blocker(task):
        hold.wait(20)
        yield INTERACTIVE
    with BackgroundServer(app) as url:
        app.state.worker.submit("blocker", blocker)
        with pytest.raises(httpx.TimeoutException):
            httpx.post(url + "/api/live", json={"text": "hi there", "latent": 1}, timeout=0.5)
        live = next(t for t in app.state.worker.tasks.values() if t.kind == "live")
        _wait(lambda: live.cancelled.is_set())
        hold.set()
        _wait(lambda: live.status == "cancelled")
        for path in ("/", "/api/store", "/api/nothing"):
            assert "frame-ancestors 'none'" in httpx.get(url + path).headers["content-security-policy"]
