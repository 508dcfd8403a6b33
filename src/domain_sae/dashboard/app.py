"""The web app: ``create_app(store_path)`` -> FastAPI application.

Pages ``/`` (feature list), ``/feature/{latent}?sae=``, ``/prompt``, ``/compare?a=&b=``; JSON under ``/api/``:
``store``, ``features``, ``feature/{latent}``, ``compare``, ``POST prompt`` (metrics 1-3 at once and a job id) and
``prompt/{job}`` (the ablation column with its progress). Assets are served from a fixed list of names (no path
from a request ever reaches the file system); unknown latents, SAEs and jobs answer 404 with a message; bad prompt
requests answer 400 with ``{"error": ...}``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from ..features.prompt import (
    PromptError,
    ablation_effects,
    analyse_prompt,
    rank_ablation,
    tokenize_prompt,
)
from ..features.schema import StoreError
from ..features.queries import FeatureStore, NotFound
from .jobs import JobRunner
from .pages import CSP, _clean, asset_bytes, error_page, render_page

MEDIA = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}


class _Models:
    """The language model and the SAEs for the prompt page, loaded on first use (or given)."""

    def __init__(self, store: FeatureStore, lm: Any, saes: Mapping[str, Any] | None, device: str,
                 load_lm: Callable[[], Any] | None):
        self.store, self.lm, self.saes, self.device = store, lm, dict(saes or {}), device
        self.load_lm = load_lm
        self.tables: dict[str, Any] = {}

    def get(self, sae_label: str) -> tuple[Any, Any, Any]:
        if self.lm is None:
            if self.load_lm is None:
                raise PromptError("This dashboard was started without a model (--no-model); the prompt page needs "
                                  "one. Restart without --no-model.")
            self.lm = self.load_lm()
        if sae_label not in self.saes:
            from ..sae.io import load_sae
            info = self.store.sae(sae_label)
            self.saes[sae_label] = load_sae(info["path"]).to(self.lm.device)
        if sae_label not in self.tables:
            self.tables[sae_label] = self.store.quantile_table(sae_label)
        return self.lm, self.saes[sae_label], self.tables[sae_label]


def create_app(store_path: str | Path, *, lm: Any = None, saes: Mapping[str, Any] | None = None,
               device: str = "cpu", load_model: bool = True, top_n: int = 8, ablation_batch: int = 16,
               max_candidates: int = 128) -> FastAPI:
    """The app over the store at ``store_path``. ``lm``/``saes`` (label -> SAE) reuse loaded objects; otherwise
    the store's model and SAE paths are loaded on the first prompt (never when ``load_model`` is false)."""
    store = FeatureStore(store_path)
    prov = store.meta.get("provenance") or {}

    def _load():
        from ..models.load import load_model as _lm
        return _lm(prov.get("model", {}).get("name") or "smollm2-135m-instruct", device=device)
    models = _Models(store, lm, saes, device, _load if load_model else None)
    lock = threading.Lock()
    jobs = JobRunner(lock)
    app = FastAPI(title="domain-sae features", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store, app.state.jobs = store, jobs

    @app.middleware("http")
    async def headers(request: Request, call_next):
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": str(exc)}, status_code=404)
        return HTMLResponse(error_page(str(exc)), status_code=404)

    @app.exception_handler(StoreError)
    async def bad_store_request(request: Request, exc: StoreError):
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(PromptError)
    async def bad_prompt(request: Request, exc: PromptError):
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(404)
    async def unknown_route(request: Request, exc):
        msg = f"There is no page {request.url.path}."
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": msg}, status_code=404)
        return HTMLResponse(error_page(msg), status_code=404)

    @app.get("/", response_class=HTMLResponse)
    def index():
        return render_page("list")

    @app.get("/feature/{latent}", response_class=HTMLResponse)
    def feature_page(latent: str, sae: str | None = None):
        s = store.sae(sae)
        if not latent.isdigit():
            raise NotFound(f"{latent!r} is not a latent index; use /feature/<number>.")
        store._check_latent(s, int(latent))
        return render_page("feature", params={"latent": latent, "sae": s["label"]}, title=f"{s['label']} #{latent}")

    @app.get("/prompt", response_class=HTMLResponse)
    def prompt_page(sae: str | None = None):
        return render_page("prompt", params={"sae": store.sae(sae)["label"]})

    @app.get("/compare", response_class=HTMLResponse)
    def compare_page(a: str | None = None, b: str | None = None):
        return render_page("compare", params={"a": a or "", "b": b or ""})

    @app.get("/assets/{name}")
    def asset(name: str):
        data = asset_bytes(name)
        if data is None:
            raise NotFound(f"There is no asset {name!r}.")
        return Response(data, media_type=MEDIA[name])

    @app.get("/api/store")
    def api_store():
        return _clean(store.summary())

    @app.get("/api/features")
    def api_features(sae: str | None = None, q: str = "", sort: str = "density", order: str = "desc",
                     page: int = 0, per_page: int = 50):
        return _clean(store.list_features(sae, q=q, sort=sort, order=order, page=page, per_page=per_page))

    @app.get("/api/feature/{latent}")
    def api_feature(latent: str, sae: str | None = None):
        if not latent.isdigit():
            raise NotFound(f"{latent!r} is not a latent index.")
        return _clean(store.feature(sae, int(latent)))

    @app.get("/api/compare")
    def api_compare(a: str | None = None, b: str | None = None, page: int = 0, per_page: int = 50):
        return _clean(store.compare(a or None, b or None, page=page, per_page=per_page))

    @app.post("/api/prompt")
    async def api_prompt(request: Request):
        try:
            body = await request.json()
        except Exception:  # noqa: BLE001 - any unreadable body is the client's error
            raise PromptError("The request body must be JSON: {\"text\": \"...\"} or {\"messages\": [...]}.") from None
        if not isinstance(body, dict):
            raise PromptError("The request body must be a JSON object.")
        unknown = set(body) - {"text", "messages", "sae"}
        if unknown:
            raise PromptError(f"Unknown field(s) {', '.join(sorted(unknown))}; use text, messages and sae.")
        info = store.sae(body.get("sae"))
        return _run_prompt(body, info)

    def _run_prompt(body: dict, info: dict) -> dict:
        with lock:
            lm_, sae_, table = models.get(info["label"])
            bos = bool((prov.get("data_config") or {}).get("prepend_bos", True))
            ids, segs = tokenize_prompt(lm_.tokenizer, body.get("text"), body.get("messages"), prepend_bos=bos)
            result, state = analyse_prompt(lm_, sae_, info["hook"], ids, segs, table, top_n=top_n,
                                           max_candidates=max_candidates)

        def work(progress):
            effects = ablation_effects(lm_, sae_, info["hook"], state, batch_size=ablation_batch, progress=progress)
            return rank_ablation(effects, state, top_n)
        result["job"] = jobs.submit(len(state.candidates), work)
        result["sae"] = info["label"]
        return _clean(result)

    @app.get("/api/prompt/{job_id}")
    def api_job(job_id: str):
        job = jobs.get(job_id)
        if job is None:
            raise NotFound(f"No prompt job {job_id!r} (it may have expired); submit the prompt again.")
        return _clean({"status": job["status"], "done": job["done"], "total": job["total"],
                       "ablation": job["result"], "error": job["error"]})
    return app
