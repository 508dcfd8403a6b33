"""``dsae dashboard STORE``: serve the app with uvicorn (127.0.0.1 unless told otherwise), or export it."""

from __future__ import annotations

import sys
from pathlib import Path

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def serve(store: str | Path, *, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu",
          load_model: bool = True, max_candidates: int = 128, ablation_batch: int = 16) -> None:
    import uvicorn

    from .app import create_app
    if host not in LOCAL_HOSTS:
        print(f"warning: binding to {host}: anyone who can reach this machine on port {port} can read the store and "
              f"run prompts, steering and live tests through the model. Use --host 127.0.0.1 to keep it local.",
              file=sys.stderr)
    app = create_app(store, device=device, load_model=load_model, max_candidates=max_candidates,
                     ablation_batch=ablation_batch)
    print(f"Serving {store} on http://{'[' + host + ']' if ':' in host else host}:{port}/ (Ctrl-C to stop)",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def export(store: str | Path, out_dir: str | Path, max_latents: int | None = None) -> Path:
    from .export import export_site
    return export_site(store, out_dir, max_latents=max_latents)


def free_port(host: str = "127.0.0.1") -> int:
    import socket
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class BackgroundServer:
    """Serve an app from a thread (tests, benchmarks, screenshots): ``with BackgroundServer(app) as url: ...``."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None):
        import uvicorn
        self.host, self.port = host, port or free_port(host)
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="error"))
        self.thread = None

    def __enter__(self) -> str:
        import threading
        import time
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            if time.time() - t0 > 30 or not self.thread.is_alive():
                raise RuntimeError("the dashboard server did not start")
            time.sleep(0.05)
        return f"http://{self.host}:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)
