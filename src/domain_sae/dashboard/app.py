"""The web app: ``create_app(store_path)`` -> FastAPI application.

Pages ``/`` (feature list), ``/feature/{latent}?sae=`` (with the steering and live-test panels), ``/prompt`` (with
the steering panel), ``/compare?a=&b=``; JSON under ``/api/``: ``store``, ``features``, ``feature/{latent}``,
``compare`` (read from the store, never waiting for the model) and the model endpoints of :mod:`.model_api`
(``POST prompt``, ``POST steer``, ``POST live``, ``GET/DELETE job/{id}``), whose work runs in one worker thread
(:mod:`.worker`). Assets are served from a fixed list of names (no path from a request ever reaches the file
system); unknown latents, SAEs and jobs answer 404 with a message; bad requests answer 400 with ``{"error": ...}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.datastructures import MutableHeaders

from ..errors import UserError
from ..features.queries import FeatureStore, NotFound
from .model_api import Models, add_model_routes
from .pages import CSP, _clean, asset_bytes, error_page, render_page
from .worker import ModelWorker, Superseded

MEDIA = {"app.js": "text/javascript; charset=utf-8", "panels.js": "text/javascript; charset=utf-8",
         "style.css": "text/css; charset=utf-8"}


class SecurityHeaders:
    """ASGI middleware: the Content-Security-Policy and two more headers on every response (plain ASGI, so a
    request's own receive channel, e.g. its disconnect, reaches the endpoint unchanged)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                h = MutableHeaders(scope=message)
                h["Content-Security-Policy"] = CSP
                h["X-Content-Type-Options"] = "nosniff"
                h["Referrer-Policy"] = "no-referrer"
            await send(message)
        await self.app(scope, receive, send_with_headers)


def create_app(store_path: str | Path, *, lm: Any = None, saes: Mapping[str, Any] | None = None,
               device: str = "cpu", load_model: bool = True, top_n: int = 8, ablation_batch: int = 16,
               max_candidates: int = 128) -> FastAPI:
    """The app over the store at ``store_path``. ``lm``/``saes`` (label -> SAE) reuse loaded objects; otherwise
    the store's model and SAE paths are loaded on the first model request, in the worker thread (never when
    ``load_model`` is false)."""
    store = FeatureStore(store_path)
    prov = store.meta.get("provenance") or {}

    def _load():
        from ..models.load import load_model as _lm
        return _lm(prov.get("model", {}).get("name") or "smollm2-135m-instruct", device=device)
    models = Models(store, lm, saes, _load if load_model else None)
    worker = ModelWorker()
    app = FastAPI(title="domain-sae features", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store, app.state.models, app.state.worker = store, models, worker

    app.add_middleware(SecurityHeaders)

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": str(exc)}, status_code=404)
        return HTMLResponse(error_page(str(exc)), status_code=404)

    @app.exception_handler(Superseded)
    async def superseded(request: Request, exc: Superseded):
        return JSONResponse({"error": str(exc)}, status_code=409)

    @app.exception_handler(UserError)
    async def bad_request(request: Request, exc: UserError):
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

    bos = bool((prov.get("data_config") or {}).get("prepend_bos", True))
    add_model_routes(app, store, models, worker, top_n=top_n, ablation_batch=ablation_batch,
                     max_candidates=max_candidates, prepend_bos=bos)
    return app
