"""The dashboard's model endpoints; every one checks its body first (:mod:`.requests`), then hands the model work
to the :class:`~.worker.ModelWorker` and awaits it without blocking the event loop.

- ``POST /api/prompt`` ``{text | messages, sae}``: metrics 1-3 of every token (:mod:`domain_sae.features.prompt`)
  and ``job``, the id of the ablation job that fills in metric 4 one batch at a time (background priority). A new
  prompt supersedes the running one (it stops before its next batch).
- ``POST /api/steer`` ``{text | messages, sae, latent, mode (add|clamp), strength, max_new_tokens}``: ``job``
  at once; the job's result is :func:`domain_sae.features.steer.steer_steps`'s (continuations without and with the
  intervention, loss change on the prompt). A new steering request supersedes the running one.
- ``POST /api/live`` ``{text | messages, sae, latent}``: the latent's activation and quantile on every token
  (:func:`domain_sae.features.prompt.latent_trace`).
- ``GET /api/job/{id}``: ``{id, kind, status, done, total, result, error}``; ``DELETE /api/job/{id}`` cancels it
  (within one ablation batch or one generated token). A client that disconnects while it awaits a prompt's metrics or
a live test cancels that work.

Answers: 400 ``{"error"}`` for a bad body or prompt (also from a server without a model, at once), 404 for an
unknown SAE or job, 409 when a newer request of the same kind replaced this one before it answered, 500 with the
message when the model work failed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ..errors import UserError
from ..features.prompt import (
    PromptError,
    ablation_batches,
    analyse_prompt,
    latent_trace,
    rank_ablation,
    tokenize_prompt,
)
from ..features.queries import FeatureStore, NotFound
from ..features.steer import MAX_NEW_TOKENS, MAX_STRENGTH, MODES, continuation_prompt, steer_steps
from .pages import _clean
from .requests import choice_of, latent_of, number_of, parse_body, prompt_of, sae_of
from .worker import BACKGROUND, INTERACTIVE, ModelWorker, Task

PROMPT_FIELDS = ("text", "messages", "sae")
EXAMPLE = '{"text": "..."} or {"messages": [{"role": "user", "content": "..."}]}'


class Models:
    """The language model and the SAEs, loaded on first use in the worker thread (or given)."""

    def __init__(self, store: FeatureStore, lm: Any, saes: Mapping[str, Any] | None,
                 load_lm: Callable[[], Any] | None):
        self.store, self.lm, self.saes, self.load_lm = store, lm, dict(saes or {}), load_lm
        self.tables: dict[str, Any] = {}

    @property
    def available(self) -> bool:
        return self.lm is not None or self.load_lm is not None

    def require(self) -> None:
        if not self.available:
            raise PromptError("This dashboard was started without a model (--no-model); the prompt page, steering "
                              "and live tests need one. Restart without --no-model.")

    def get(self, sae_label: str) -> tuple[Any, Any, Any]:
        """``(lm, sae, quantile table)``; loads what is missing (call from the worker only)."""
        self.require()
        if self.lm is None:
            self.lm = self.load_lm()
        if sae_label not in self.saes:
            from ..sae.io import load_sae
            self.saes[sae_label] = load_sae(self.store.sae(sae_label)["path"]).to(self.lm.device)
        if sae_label not in self.tables:
            self.tables[sae_label] = self.store.quantile_table(sae_label)
        return self.lm, self.saes[sae_label], self.tables[sae_label]


def _one_step(fn: Callable[[Task], Any]) -> Callable[[Task], Any]:
    def steps(task: Task):
        yield from ()
        return fn(task)
    return steps


async def _answer(task: Task, request: Request) -> Any:
    """The task's answer, awaited without blocking the event loop; a client that disconnects meanwhile cancels the
    task (checked every 0.2 s)."""
    answer = asyncio.wrap_future(task.answer)
    try:
        while not (await asyncio.wait({answer}, timeout=0.2))[0]:
            if await request.is_disconnected():
                task.cancelled.set()
                answer.cancel()
                return JSONResponse({"error": "The client went away."}, status_code=499)
        return answer.result()
    except (UserError, NotFound):
        raise
    except Exception as e:  # noqa: BLE001 - the model work failed: the client gets the message
        return JSONResponse({"error": f"{type(e).__name__}: {e}"}, status_code=500)


def add_model_routes(app: FastAPI, store: FeatureStore, models: Models, worker: ModelWorker, *, top_n: int,
                     ablation_batch: int, max_candidates: int, prepend_bos: bool) -> None:
    async def body(request: Request, fields: tuple[str, ...]) -> dict:
        return parse_body(await request.body(), fields, EXAMPLE)

    def tokens(lm: Any, text: Any, messages: Any) -> tuple[list[int], list[int]]:
        return tokenize_prompt(lm.tokenizer, text, messages, prepend_bos=prepend_bos)

    @app.post("/api/prompt")
    async def api_prompt(request: Request):
        b = await body(request, PROMPT_FIELDS)
        text, messages = prompt_of(b)
        info = sae_of(store, b)
        models.require()

        def steps(task: Task):
            lm, sae, table = models.get(info["label"])
            ids, segs = tokens(lm, text, messages)
            result, state = analyse_prompt(lm, sae, info["hook"], ids, segs, table, top_n=top_n,
                                           max_candidates=max_candidates)
            task.total = len(state.candidates)
            task.reply(_clean({**result, "job": task.id, "sae": info["label"]}))
            yield BACKGROUND              # from here on, a waiting request or a newer prompt goes first
            effects: dict = {}
            for done, _ in ablation_batches(lm, sae, info["hook"], state, effects, batch_size=ablation_batch):
                task.done = done
                yield BACKGROUND
            return _clean(rank_ablation(effects, state, top_n))
        return await _answer(worker.submit("prompt", steps), request)

    @app.post("/api/steer")
    async def api_steer(request: Request):
        b = await body(request, PROMPT_FIELDS + ("latent", "mode", "strength", "max_new_tokens"))
        text, messages = prompt_of(b)
        info = sae_of(store, b)
        latent = latent_of(b, info)
        mode = choice_of(b, "mode", MODES)
        strength = number_of(b, "strength", 4.0, -MAX_STRENGTH, MAX_STRENGTH)
        n_new = number_of(b, "max_new_tokens", 24, 1, MAX_NEW_TOKENS, integer=True)
        models.require()

        def steps(task: Task):
            lm, sae, _ = models.get(info["label"])
            unit = store.feature(info["label"], latent)["max_act"] or 0.0
            ids, segs = continuation_prompt(lm.tokenizer, *tokens(lm, text, messages), messages)
            yield INTERACTIVE
            res = yield from steer_steps(lm, sae, info["hook"], ids, segs, latent, mode=mode, strength=strength,
                                         unit=unit, max_new_tokens=n_new, check=task.check, tick=task.advance)
            return _clean({**res, "sae": info["label"]})
        task = worker.submit("steer", steps, total=2 + 2 * n_new)
        return {"job": task.id, "total": task.total}

    @app.post("/api/live")
    async def api_live(request: Request):
        b = await body(request, PROMPT_FIELDS + ("latent",))
        text, messages = prompt_of(b)
        info = sae_of(store, b)
        latent = latent_of(b, info)
        models.require()

        def live(task: Task) -> dict:
            lm, sae, table = models.get(info["label"])
            ids, segs = tokens(lm, text, messages)
            return _clean({**latent_trace(lm, sae, info["hook"], ids, segs, latent, table), "sae": info["label"]})
        return await _answer(worker.submit("live", _one_step(live)), request)

    @app.get("/api/job/{job_id}")
    async def api_job(job_id: str):
        task = worker.get(job_id)
        if task is None:
            raise NotFound(f"No job {job_id!r} (it may have expired); send the request again.")
        return _clean(task.view())

    @app.delete("/api/job/{job_id}")
    async def api_cancel(job_id: str):
        task = worker.cancel(job_id)
        if task is None:
            raise NotFound(f"No job {job_id!r} (it may have expired).")
        return {"id": task.id, "status": task.status, "cancelling": task.cancelled.is_set()}
