"""Trainer throughput on the offline default (or any model): tokens/s for model + SAE and for the SAE step alone.

    python benchmarks/bench_train.py [--model smollm2-135m-instruct] [--hook blocks.0.hook_mlp_out]
                                     [--expansion 4] [--batch 4096] [--steps 30] [--device auto]

Reports (JSON + Markdown in benchmarks/results/):
  * sae_step: optimizer steps on a fixed batch of real activations (forward, loss, backward, clip, Adam, stats);
    tokens/s, GFLOP/s with 12 * B * d_in * d_sae FLOPs per step (encode + decode forward 4BDS, backward 8BDS), and
    utilisation = that rate / the rate of a plain [B, d_in] x [d_in, d_sae] matmul measured on the same device;
  * end_to_end: `pipeline.train` with the live model (truncated forward to the hook, buffer, shuffle, SAE step);
  * peak memory (process RSS; CUDA max allocated when on a GPU).
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
from domain_sae.config import TrainConfig, build_config  # noqa: E402
from domain_sae.models.hooks import hook_d_in, resolve_hook  # noqa: E402
from domain_sae.models.load import load_model, resolve_device  # noqa: E402


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def matmul_rate(b: int, d_in: int, d_sae: int, device, reps: int = 20) -> float:
    """FLOP/s of a plain fp32 [b, d_in] @ [d_in, d_sae] matmul: the practical peak for the SAE's shapes."""
    a = torch.randn(b, d_in, device=device)
    w = torch.randn(d_in, d_sae, device=device)
    for _ in range(3):
        a @ w
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ w
    _sync(device)
    return 2 * b * d_in * d_sae * reps / (time.perf_counter() - t)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--hook", default="blocks.0.hook_mlp_out")
    p.add_argument("--data", default="chat")
    p.add_argument("--expansion", type=int, default=4)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args(argv)
    device = resolve_device(a.device)
    torch.manual_seed(0)

    lm = load_model(a.model, device=device)
    hook = resolve_hook(lm.model, a.hook)
    d_in = hook_d_in(lm.model, hook)
    d_sae = a.expansion * d_in
    tokens = a.steps * a.batch
    with tempfile.TemporaryDirectory() as tmp:
        cfg = build_config(TrainConfig, overrides=dict(
            model=a.model, hook=a.hook, data=a.data, device=device, context_size=a.context,
            expansion_factor=a.expansion,
            training_tokens=tokens, train_batch_size_tokens=a.batch, buffer_size_tokens=4 * a.batch, eval_every=0,
            log_every=10, output_dir=tmp, resume_checkpoint_minutes=0))

        # End to end: live model + buffer + SAE step (includes the scale estimate on the first buffer).
        t = time.perf_counter()
        result = pipeline.train(cfg, lm=lm)
        _sync(device)
        e2e_s = time.perf_counter() - t

        # SAE step alone, on a batch of real activations, with the trainer's own step function.
        store = pipeline.live_activation_store(cfg, lm, hook, d_in)
        batch = store.next_batch().to(device)
        sae, source, _, scale = pipeline._prepare(cfg, lm, hook, d_in, store, None, None, lambda s: {},
                                                  resuming=False)
        trainer = pipeline._make_trainer(Path(tmp) / "step", cfg, sae, source, None, scale)
        for _ in range(3):
            trainer._train_step(batch)
        _sync(device)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        for _ in range(a.steps):
            trainer._train_step(batch)
        _sync(device)
        step_s = (time.perf_counter() - t) / a.steps

    flops_step = 12 * a.batch * d_in * d_sae
    peak = matmul_rate(a.batch, d_in, d_sae, device)
    res = {
        "device": device, "cpu": cpu_model(), "torch_threads": torch.get_num_threads(),
        "model": a.model, "hook": a.hook, "d_in": d_in, "d_sae": d_sae, "batch_tokens": a.batch,
        "sae_step": {"seconds_per_step": step_s, "tokens_per_second": a.batch / step_s,
                     "gflops_per_second": flops_step / step_s / 1e9,
                     "matmul_peak_gflops_per_second": peak / 1e9,
                     "utilisation_of_matmul_peak": flops_step / step_s / peak},
        "end_to_end": {"tokens": tokens, "seconds": e2e_s, "tokens_per_second": tokens / e2e_s,
                       "trainer_reported_tokens_per_second": result.summary.get("tokens_per_second")},
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
    }
    if device.startswith("cuda"):
        res["cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"train_{device.split(':')[0]}"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2))
    md = (f"# Trainer throughput ({device}, {res['torch_threads']} threads)\n\n"
          f"{a.model} at {a.hook}: d_in {d_in}, d_sae {d_sae}, batch {a.batch} tokens\n\n"
          f"| measure | value |\n|---|---|\n"
          f"| SAE step alone | {res['sae_step']['tokens_per_second']:,.0f} tokens/s "
          f"({step_s * 1e3:.1f} ms/step) |\n"
          f"| SAE step FLOP rate | {res['sae_step']['gflops_per_second']:.1f} GFLOP/s "
          f"({100 * res['sae_step']['utilisation_of_matmul_peak']:.0f}% of a plain matmul's "
          f"{peak / 1e9:.1f} GFLOP/s) |\n"
          f"| model + SAE end to end | {res['end_to_end']['tokens_per_second']:,.0f} tokens/s "
          f"({tokens:,} tokens in {e2e_s:.1f} s, incl. scale estimate and saving) |\n"
          f"| peak RSS | {res['peak_rss_gib']:.2f} GiB |\n")
    (out / f"{stem}.md").write_text(md)
    print(md)
    return res


if __name__ == "__main__":
    main()
