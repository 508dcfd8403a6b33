"""Training from an activation cache vs from the live model, at a mid layer of the offline default.

    python benchmarks/bench_cache.py [--model smollm2-135m-instruct] [--hook blocks.15.hook_resid_post]
                                     [--tokens 262144] [--expansion 8] [--batch 4096] [--dtype float32]
                                     [--device auto] [--architecture standard|topk] [--k 32] [--tiny]

Three timings on the same tokens (the training split of --data): building the cache (`dsae cache`: one model
pass, stopped after the hook), `pipeline.train` from the live model (model forward + SAE step), and
`pipeline.train` from the cache (SAE step + shard reads). Prints tokens/s of both trainings and their ratio
(target >= 5x at layer 15), the cache build rate, peak memory, and writes JSON + Markdown to benchmarks/results/.
``--tiny`` is a smoke run (a few thousand tokens) that checks the script works; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from machine import cpu_model  # noqa: E402

from domain_sae.runs import single as pipeline  # noqa: E402
from domain_sae.activations.hook_cache import build_cache  # noqa: E402
from domain_sae.config import TrainConfig, build_config  # noqa: E402


def _peak_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        rss = max(rss, torch.cuda.max_memory_allocated() / 2**20)
    return rss


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--hook", default="blocks.15.hook_resid_post")
    p.add_argument("--data", default="chat")
    p.add_argument("--tokens", type=int, default=262_144)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--architecture", choices=["standard", "topk"], default="standard",
                   help="standard (ReLU + L1 5; dense until its density falls below the sparse switch) or topk "
                        "(sparse from the first step)")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--tiny", action="store_true", help="Smoke run: 4096 tokens, batch 512, expansion 2.")
    a = p.parse_args(argv)
    if a.tiny:
        a.tokens, a.batch, a.expansion, a.context_size = 4096, 512, 2, 64
    work = Path(tempfile.mkdtemp(prefix="bench_cache_"))
    base = dict(model=a.model, hook=a.hook, data=a.data, context_size=a.context_size, expansion_factor=a.expansion,
                training_tokens=a.tokens, train_batch_size_tokens=a.batch, buffer_size_tokens=4 * a.batch,
                lr=1e-3, l1_coefficient=5.0, eval_every=0, log_every=50, n_checkpoints=0, device=a.device,
                resume_checkpoint_minutes=0, output_dir=str(work / "runs"), model_batch_size=16,
                architecture=a.architecture, k=a.k)
    cfg_live = build_config(TrainConfig, overrides={**base, "run_name": "live"})
    lm = pipeline.load_lm(cfg_live)

    t = time.perf_counter()
    # cache a little more than the training tokens: the buffer drops each refill's last partial batch
    cache = build_cache(lm, [a.hook], cfg_live, work / "cache", a.tokens + 4 * a.batch, dtype=a.dtype)
    build_s = time.perf_counter() - t

    live = pipeline.train(cfg_live, lm=lm, quiet=True).summary
    cfg_cache = build_config(TrainConfig, overrides={**base, "run_name": "cached", "activations": str(cache)})
    cached = pipeline.train(cfg_cache, lm=lm, quiet=True).summary
    live_tps, cache_tps = live["tokens_per_second"], cached["tokens_per_second"]
    result = {"model": a.model, "hook": a.hook, "architecture": a.architecture,
              "k": a.k if a.architecture == "topk" else None, "tokens": a.tokens, "batch": a.batch,
              "expansion": a.expansion,
              "cache_dtype": a.dtype, "device": str(next(lm.model.parameters()).device),
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "cpu": cpu_model(), "threads": torch.get_num_threads(),
              "cache_build_tokens_per_second": (a.tokens + 4 * a.batch) / build_s,
              "live_tokens_per_second": live_tps, "cache_tokens_per_second": cache_tps,
              "ratio": cache_tps / live_tps if live_tps else None, "peak_memory_mb": _peak_mb(), "tiny": a.tiny}
    print(f"train from the live model: {live_tps:,.0f} tokens/s")
    print(f"train from the cache:      {cache_tps:,.0f} tokens/s")
    print(f"ratio cache / live:        {result['ratio']:.2f}x (target >= 5x at a mid layer)")
    print(f"cache build:               {result['cache_build_tokens_per_second']:,.0f} tokens/s; peak memory "
          f"{result['peak_memory_mb']:,.0f} MB")
    if not a.tiny:
        out = ROOT / "benchmarks" / "results"
        out.mkdir(parents=True, exist_ok=True)
        stem = "bench_cache" + ("" if a.architecture == "standard" else f"_{a.architecture}")
        (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
        (out / f"{stem}.md").write_text(
            f"{a.architecture}, {a.tokens:,} tokens, batch {a.batch}, {a.expansion}x latents\n\n"
            "| training source | tokens/s |\n|---|---|\n"
            f"| live model ({a.hook}) | {live_tps:,.0f} |\n| activation cache | {cache_tps:,.0f} |\n"
            f"| ratio | {result['ratio']:.2f}x |\n")
    return result


if __name__ == "__main__":
    main()
