"""Feature store and dashboard on the offline default: store build time and size (per 1k latents and per 100k
tokens), peak memory, page load times, the prompt page's latency for a 64-token prompt, and the server under load.

    python benchmarks/bench_features.py [--d-sae 2304] [--tokens 16384] [--sae DIR ...] [--prompt-tokens 64]
                                        [--readers 16] [--load-seconds 30] [--second-prompts 5]

Without --sae a random SAE with about 1.5% firing density (like a trained one) is used (saved to a temporary
folder), so the figures do not depend on a training run. Tiny check: --d-sae 64 --tokens 256 --prompt-tokens 16
--pages 3 --load-seconds 3 --second-prompts 2.

Load (``load_*``): the store is served as ``dsae dashboard STORE`` serves it, in its own process (its model and SAE
loaded from the store's provenance, warmed by one prompt). ``--readers`` threads of this process read random
``/api/feature/<i>`` pages for ``--load-seconds`` seconds, first with the server idle, then while a prompt's
ablation job runs (a new prompt is sent whenever the running job ends, so one is always in flight): median and
99th-percentile latency of each phase and the share of the busy phase a job was running. Then, each time with a
job in flight, a second prompt is sent ``--second-prompts`` times: the time until its first three metrics arrive
(its answer) and how far the job it replaced had got.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from domain_sae.dashboard.app import create_app  # noqa: E402
from domain_sae.dashboard.serve import BackgroundServer, free_port  # noqa: E402
from domain_sae.evaluation import HeldoutData, SAESet  # noqa: E402
from domain_sae.features.build import build_feature_store  # noqa: E402
from domain_sae.models.hooks import capture, resolve_hook  # noqa: E402
from domain_sae.models.load import load_model  # noqa: E402
from domain_sae.sae.io import load_sae  # noqa: E402
from domain_sae.sae.standard import SAEModelConfig, StandardSAE  # noqa: E402

PROMPT = ("User: Could you write a Python function that reads a CSV file and returns the rows as dictionaries? "
          "Assistant: Sure! Here is one:\n\nimport csv\n\ndef read_rows(path):\n    with open(path) as f:\n"
          "        return list(csv.DictReader(f))\n\nIt opens the file and reads every row into a dict keyed by "
          "the header, which is handy for small files.")


def random_sae(lm, hook: str, d_sae: int, seed: int = 0) -> StandardSAE:
    """Random encoder scaled so that z ~ N(0, 1) on real activations, bias -2.17: ~1.5% density."""
    ids = torch.tensor([lm.tokenizer(PROMPT)["input_ids"][:128]])
    a = capture(lm.model, resolve_hook(lm.model, hook), ids)
    d_in = a.shape[-1]
    g = torch.Generator().manual_seed(seed)
    sae = StandardSAE(SAEModelConfig(architecture="standard", d_in=d_in, d_sae=d_sae, dtype="float32",
                                     apply_b_dec_to_input=False, normalize_activations="none",
                                     metadata={"hook_name": hook, "model_name": lm.name, "context_size": 256}))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g) / float(a.std() * d_in ** 0.5))
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=g) / d_in ** 0.5)
        sae.b_enc.fill_(-2.17)
    return sae


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _page_times(url: str, latents: list[int], n: int) -> dict:
    import httpx
    out = {}
    with httpx.Client(base_url=url, timeout=120) as c:
        t = time.perf_counter()
        c.get("/api/features", params={"sort": "density", "per_page": 50}).raise_for_status()
        out["feature_list_api_ms"] = 1000 * (time.perf_counter() - t)
        t = time.perf_counter()
        c.get("/api/features", params={"q": "the", "per_page": 50}).raise_for_status()
        out["feature_search_api_ms"] = 1000 * (time.perf_counter() - t)
        times = []
        for i in latents[:n]:
            t = time.perf_counter()
            c.get(f"/api/feature/{i}").raise_for_status()
            times.append(1000 * (time.perf_counter() - t))
        out["feature_api_median_ms"] = statistics.median(times)
    if os.path.exists("/usr/bin/chromium"):
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            return out
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu",
                                  "--disable-background-networking", "--disable-component-update",
                                  "--disable-sync", "--no-first-run"])
            page = b.new_page()
            times = []
            for i in latents[:n]:
                t = time.perf_counter()
                page.goto(f"{url}/feature/{i}")
                page.wait_for_selector("#top-examples")
                times.append(1000 * (time.perf_counter() - t))
            out["feature_page_browser_median_ms"] = statistics.median(times)
            t = time.perf_counter()
            page.goto(url + "/")
            page.wait_for_selector("#feature-table tbody tr")
            out["list_page_browser_ms"] = 1000 * (time.perf_counter() - t)
            b.close()
    return out


def _prompt_text(tokenizer, n_tokens: int) -> str:
    """A prompt of about ``n_tokens`` tokens with its BOS."""
    return tokenizer.decode(tokenizer(PROMPT * 4, add_special_tokens=False)["input_ids"][:n_tokens - 1])


def _prompt_times(url: str, tokenizer, n_tokens: int) -> dict:
    import httpx
    text = _prompt_text(tokenizer, n_tokens)
    with httpx.Client(base_url=url, timeout=600) as c:
        t = time.perf_counter()
        r = c.post("/api/prompt", json={"text": text})
        r.raise_for_status()
        first = time.perf_counter() - t
        res = r.json()
        while True:
            j = _job(c, res["job"])
            if j["status"] in ("done", "error"):
                break
            time.sleep(0.1)
        total = time.perf_counter() - t
    return {"prompt_tokens": res["n_tokens"], "prompt_first_three_metrics_s": first, "prompt_with_ablation_s": total,
            "ablation_candidates": len(res["candidates"]), "ablation_status": j["status"]}


def _percentile(xs: list[float], q: float) -> float:
    """The q-quantile of xs (nearest rank: the smallest value with at least a share q of the values at or below)."""
    xs = sorted(xs)
    return xs[max(0, min(len(xs) - 1, math.ceil(q * len(xs)) - 1))]


def _readers(url: str, latents: list[int], n: int, seconds: float) -> list[float]:
    """Latencies (ms) of ``n`` threads each reading random feature pages for ``seconds``."""
    import httpx
    stop, out, lock = threading.Event(), [], threading.Lock()

    def read(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=url, timeout=60) as c:
            while not stop.is_set():
                t = time.perf_counter()
                c.get(f"/api/feature/{rng.choice(latents)}").raise_for_status()
                with lock:
                    out.append(1000 * (time.perf_counter() - t))
    threads = [threading.Thread(target=read, args=(k,)) for k in range(n)]
    for th in threads:
        th.start()
    time.sleep(seconds)
    stop.set()
    for th in threads:
        th.join()
    return out


def _job(c, job_id: str) -> dict:
    return c.get(f"/api/job/{job_id}").json()


def _serve(store: Path, device: str) -> tuple[subprocess.Popen, str]:
    """``dsae dashboard STORE`` in its own process; its URL once it answers."""
    import httpx
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", "import sys; from domain_sae.cli import main; "
                               "sys.exit(main(sys.argv[1:]))", "dashboard", str(store), "--port", str(port),
                               "--device", device], env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            httpx.get(url + "/api/store", timeout=5).raise_for_status()
            return server, url
        except httpx.TransportError:
            time.sleep(0.2)
    server.terminate()
    raise RuntimeError("the dashboard server did not start")


def _load_times(store: Path, latents: list[int], text: str, a) -> dict:
    """The server under ``a.readers`` readers, idle and with a prompt job always in flight; the second-prompt
    latency (module docstring)."""
    import httpx
    server, url = _serve(store, a.device)
    out: dict = {"load_readers": a.readers, "load_seconds": a.load_seconds}
    try:
        with httpx.Client(base_url=url, timeout=600) as c:
            warm = c.post("/api/prompt", json={"text": text}).json()       # loads the model and the SAE
            while _job(c, warm["job"])["status"] not in ("done", "error", "cancelled"):
                time.sleep(0.2)
            idle = _readers(url, latents, a.readers, a.load_seconds)
            stop, running = threading.Event(), []

            def keep_busy() -> None:
                with httpx.Client(base_url=url, timeout=600) as k:
                    job = k.post("/api/prompt", json={"text": text}).json()["job"]
                    while not stop.is_set():
                        st = _job(k, job)["status"]
                        running.append(st == "running")
                        if st in ("done", "error", "cancelled"):
                            job = k.post("/api/prompt", json={"text": text}).json()["job"]
                        time.sleep(0.05)
            busy_thread = threading.Thread(target=keep_busy)
            busy_thread.start()
            time.sleep(1.0)
            busy = _readers(url, latents, a.readers, a.load_seconds)
            stop.set()
            busy_thread.join()
            for name, xs in (("idle", idle), ("busy", busy)):
                out[f"load_feature_api_{name}_requests"] = len(xs)
                out[f"load_feature_api_{name}_median_ms"] = statistics.median(xs)
                out[f"load_feature_api_{name}_p99_ms"] = _percentile(xs, 0.99)
            out["load_busy_share_job_running"] = sum(running) / max(1, len(running))
            seconds, replaced = [], []
            job = c.post("/api/prompt", json={"text": text}).json()["job"]
            for k in range(a.second_prompts):
                while (j := _job(c, job))["status"] == "queued" or (j["status"] == "running" and j["done"] < 1):
                    time.sleep(0.01)
                t = time.perf_counter()
                r = c.post("/api/prompt", json={"text": f"({k}) " + text})
                seconds.append(time.perf_counter() - t)
                r.raise_for_status()
                old = _job(c, job)
                replaced.append(f"{old['status']} at {old['done']}/{old['total']}")
                job = r.json()["job"]
            out["second_prompt_first_metrics_median_s"] = statistics.median(seconds)
            out["second_prompt_first_metrics_max_s"] = max(seconds)
            out["second_prompt_replaced_jobs"] = "; ".join(replaced)
    finally:
        server.terminate()
        server.wait(30)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--hook", default="blocks.0.hook_mlp_out")
    p.add_argument("--sae", action="append", default=None, help="SAE directories (default: one random SAE)")
    p.add_argument("--d-sae", type=int, default=2304)
    p.add_argument("--data", action="append", default=None)
    p.add_argument("--tokens", type=int, default=16384, help="held-out tokens per dataset")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--pages", type=int, default=20, help="feature pages to time")
    p.add_argument("--readers", type=int, default=16, help="concurrent readers of the feature API in the load test")
    p.add_argument("--load-seconds", type=float, default=30.0, help="seconds of each load phase (idle, busy)")
    p.add_argument("--second-prompts", type=int, default=5, help="second prompts timed while a job runs")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    lm = load_model(a.model)
    saes = [load_sae(s) for s in a.sae] if a.sae else [random_sae(lm, a.hook, a.d_sae)]
    datasets = a.data or ["chat", "code"]
    rss0 = _rss_mib()
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "features.sqlite"
        paths = a.sae or [str(saes[0].save(Path(tmp) / "random_sae"))]   # on disk: the load test's server reads it
        t = time.perf_counter()
        build_feature_store(SAESet.of(saes, paths), HeldoutData.live(datasets), store, n_tokens=a.tokens, lm=lm)
        build_s = time.perf_counter() - t
        size = store.stat().st_size
        prov = json.loads(__import__("sqlite3").connect(store).execute(
            "SELECT value FROM meta WHERE key = 'provenance'").fetchone()[0])
        n_lat = sum(s.d_sae for s in saes)
        n_tok = sum(d["tokens"] for d in prov["datasets"])
        res = {"model": a.model, "hook": a.hook, "d_sae_total": n_lat, "tokens_total": n_tok,
               "build_s": build_s, "store_mb": size / 1e6,
               "build_s_per_1k_latents": build_s / (n_lat / 1000), "build_s_per_100k_tokens": build_s / (n_tok / 1e5),
               "store_mb_per_1k_latents": size / 1e6 / (n_lat / 1000),
               "store_mb_per_100k_tokens": size / 1e6 / (n_tok / 1e5),
               "peak_rss_mib": _rss_mib(), "rss_before_build_mib": rss0,
               "predicted_peak_mib": prov["predicted_memory_bytes"]["peak"] / 2**20, "threads": torch.get_num_threads()}
        app = create_app(store, lm=lm, saes={s["label"]: sae for s, sae in zip(prov["saes"], saes)})
        with BackgroundServer(app) as url:
            res.update(_page_times(url, list(range(0, n_lat, max(1, n_lat // a.pages))), a.pages))
            res.update(_prompt_times(url, lm.tokenizer, a.prompt_tokens))
        res.update(_load_times(store, list(range(saes[0].d_sae)), _prompt_text(lm.tokenizer, a.prompt_tokens), a))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_features.json").write_text(json.dumps(res, indent=2))
    md = ["| measure | value |", "|---|---|"] + [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                                                  for k, v in res.items()]
    (out / "bench_features.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return res


if __name__ == "__main__":
    main()
