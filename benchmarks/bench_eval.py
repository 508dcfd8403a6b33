"""Evaluation throughput on the offline default: tokens/s of `evaluate_saes_on_tokens` (clean pass, zero ablation
and one spliced pass per SAE, float64 metrics) and of the plain model forward it is built on.

    python benchmarks/bench_eval.py [--tokens 4096] [--saes 2] [--context 256] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from domain_sae.config import TrainConfig  # noqa: E402
from domain_sae.data.token_stream import heldout_batch  # noqa: E402
from domain_sae.evaluation.lm_metrics import evaluate_saes_on_tokens  # noqa: E402
from domain_sae.models.hooks import hook_d_in, resolve_hook  # noqa: E402
from domain_sae.models.load import load_model, resolve_device  # noqa: E402
from domain_sae.sae.standard import SAEModelConfig, StandardSAE  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--hook", default="blocks.0.hook_mlp_out")
    p.add_argument("--data", default="chat")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--saes", type=int, default=2)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args(argv)
    device = resolve_device(a.device)
    lm = load_model(a.model, device=device)
    hook = resolve_hook(lm.model, a.hook)
    d_in = hook_d_in(lm.model, hook)
    ids, segs = heldout_batch(TrainConfig(data=a.data, context_size=a.context), lm.tokenizer, a.tokens)
    torch.manual_seed(0)
    saes = {}
    for i in range(a.saes):
        sae = StandardSAE(SAEModelConfig(d_in=d_in, d_sae=4 * d_in)).to(device)
        with torch.no_grad():
            sae.W_dec.normal_(0, 0.05)
            sae.W_enc.copy_(sae.W_dec.T)
        saes[f"sae{i}"] = sae
    n_tok = ids.numel()
    with torch.no_grad():
        t = time.perf_counter()
        for i in range(0, len(ids), a.batch):
            lm.model(ids[i:i + a.batch].to(device))
        fwd_s = time.perf_counter() - t
    t = time.perf_counter()
    evaluate_saes_on_tokens(saes, lm, hook, ids, segs, batch_size=a.batch)
    eval_s = time.perf_counter() - t
    passes = 2 + a.saes + 1  # clean, zero ablation, one per SAE, plus the capture pass for exact means
    res = {"device": device, "model": a.model, "hook": a.hook, "tokens": n_tok, "context": a.context,
           "saes": a.saes, "model_forward_tokens_per_second": n_tok / fwd_s,
           "eval_seconds": eval_s, "eval_tokens_per_second_all_saes": n_tok / eval_s,
           "eval_token_sae_pairs_per_second": n_tok * a.saes / eval_s, "forward_passes_per_token": passes}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"eval_{device.split(':')[0]}"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2))
    md = (f"# Evaluation throughput ({device})\n\n{a.model} at {a.hook}, {n_tok:,} held-out tokens of {a.data} "
          f"(context {a.context}, {a.batch} sequences per pass), {a.saes} SAEs of width {4 * d_in}\n\n"
          f"| measure | value |\n|---|---|\n"
          f"| plain model forward | {res['model_forward_tokens_per_second']:,.0f} tokens/s |\n"
          f"| full evaluation (CE/KL clean, ablation, {a.saes} spliced SAEs, reconstruction) | "
          f"{res['eval_tokens_per_second_all_saes']:,.0f} tokens/s ({eval_s:.1f} s) |\n"
          f"| per (token, SAE) pair | {res['eval_token_sae_pairs_per_second']:,.0f} /s |\n")
    (out / f"{stem}.md").write_text(md)
    print(md)
    return res


if __name__ == "__main__":
    main()
