"""``dsae dashboard STORE``: serve the app with uvicorn (127.0.0.1 unless told otherwise), or export it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def serve(store: str | Path, *, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu",
          load_model: bool = True) -> None:
    import uvicorn

    from .app import create_app
    if host not in LOCAL_HOSTS:
        print(f"warning: binding to {host}: anyone who can reach this machine on port {port} can read the store and "
              f"run prompts through the model. Use --host 127.0.0.1 to keep it local.", file=sys.stderr)
    app = create_app(store, device=device, load_model=load_model)
    print(f"Serving {store} on http://{'[' + host + ']' if ':' in host else host}:{port}/ (Ctrl-C to stop)",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def export(store: str | Path, out_dir: str | Path, max_latents: Optional[int] = None) -> Path:
    from .export import export_site
    return export_site(store, out_dir, max_latents=max_latents)
