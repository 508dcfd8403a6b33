"""What sharing batched matrix products across same-shape SAEs could gain: the ceiling, measured.

Several SAEs of one shape trained from one model pass (a multi-SAE `dsae train`: sweeps over L1, k or seeds at
one hook) each run the same two big products per step on the same batch ``x`` [B, d_in]: the encoder forward
``x @ W_enc_j`` [B, d_sae] and the encoder weight gradient ``x^T @ G_j`` [d_in, d_sae]. Sharing means computing
them for all n SAEs at once, either as one product with the n weight matrices side by side
(``x @ [W_1 | ... | W_n]``) or as one batched product (``torch.bmm`` over [n, d_in, d_sae]). This script times the
three forms on the same inputs, fp32, at the issue's CPU shape (d_in 576, 4,608 latents, batch 4,096) for n = 2,
4 and 8, and prints tokens/s per SAE and the speed-up of the shared forms over n separate products. The products
are the whole of the dense step's FLOPs, so the speed-up here bounds what a shared step could gain (the stacking
copies and the per-SAE optimizer steps would only take from it).

    .venv/bin/python benchmarks/bench_grouped_products.py [--batch 4096] [--d-in 576] [--d-sae 4608] [--device cpu]

Writes benchmarks/results/grouped_products_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from machine import cpu_model

ROOT = Path(__file__).resolve().parents[1]


def _time(fn, device: str, reps: int) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def measure(n: int, batch: int, d_in: int, d_sae: int, device: str, reps: int) -> dict:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(batch, d_in, generator=g).to(device)
    ws = [(torch.randn(d_in, d_sae, generator=g) * 0.02).to(device) for _ in range(n)]
    gs = [torch.randn(batch, d_sae, generator=g).to(device) for _ in range(n)]
    w_cat, w_bat = torch.cat(ws, 1), torch.stack(ws)
    g_cat, g_bat = torch.cat(gs, 1), torch.stack(gs)
    xt = x.t().contiguous()
    forms = {
        "separate": lambda: ([x @ w for w in ws], [xt @ gr for gr in gs]),
        "concatenated": lambda: (x @ w_cat, xt @ g_cat),
        "batched": lambda: (torch.bmm(x.expand(n, batch, d_in), w_bat), torch.bmm(xt.expand(n, d_in, batch), g_bat)),
    }
    sec = {name: float("inf") for name in forms}
    for _ in range(3):  # interleaved rounds, best of three: clock and cache warm-up hit every form alike
        for name, fn in forms.items():
            sec[name] = min(sec[name], _time(fn, device, reps))
    flops = 2 * 2 * batch * d_in * d_sae * n
    return {"n_saes": n, "seconds": sec, "gflops": {k: flops / v / 1e9 for k, v in sec.items()},
            "speedup_concatenated": sec["separate"] / sec["concatenated"],
            "speedup_batched": sec["separate"] / sec["batched"]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args(argv)
    rows = [measure(n, a.batch, a.d_in, a.d_sae, a.device, a.reps) for n in (2, 4, 8)]
    res = {"device": a.device, "cpu": cpu_model(),
           "gpu": torch.cuda.get_device_name() if a.device == "cuda" else None,
           "torch_threads": torch.get_num_threads(), "batch": a.batch, "d_in": a.d_in, "d_sae": a.d_sae, "rows": rows}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"grouped_products_{a.device}.json").write_text(json.dumps(res, indent=2) + "\n")
    md = [f"# Shared products across same-shape SAEs ({a.device}, {res['torch_threads']} threads)", "",
          f"Encoder forward + encoder weight gradient, batch {a.batch}, d_in {a.d_in}, d_sae {a.d_sae}, fp32.", "",
          "| SAEs | separate GFLOP/s | concatenated GFLOP/s | batched GFLOP/s | speed-up concat. | speed-up batched |",
          "|---|---|---|---|---|---|"]
    for r in rows:
        gf = r["gflops"]
        md.append(f"| {r['n_saes']} | {gf['separate']:.0f} | {gf['concatenated']:.0f} | {gf['batched']:.0f} | "
                  f"{r['speedup_concatenated']:.3f}x | {r['speedup_batched']:.3f}x |")
    (out / f"grouped_products_{a.device}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return res


if __name__ == "__main__":
    main()
