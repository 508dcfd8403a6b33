"""SAE training step throughput: ReLU and TopK, dense and sparse kernels, and SAELens 6 on the same shapes.

Each workload is one full optimizer step as the trainer runs it (forward, loss, backward, grad-norm clip, Adam,
sparsity statistics); SAELens's is ``training_forward_pass`` + backward + clip + Adam. Batch [B, d_in] of Gaussian
activations. The ReLU SAE is measured at a steady-state density: b_enc is set so that each token has about
``--relu-l0`` active latents and the learning rate is 1e-12 so that it stays there (the dense step costs the same at
any density; the sparse one depends on it; Adam does the same work at any learning rate).

Printed per workload: tokens/s, peak memory (CUDA: max allocated; CPU: peak RSS of a fresh worker process) and the
fraction of the FLOP floor reached, floor = 2 B d_in d_sae (the dense encoder forward) + 8 B L0 d_in (sparse decoder
forward, its two backward products, encoder backward), divided by the step time and by the rate this machine
reaches on a dense [B, d_in] x [d_in, d_sae] product. Run SAELens's rows inside .venv-saelens.

    python benchmarks/bench_sae_step.py [--d-in 576] [--d-sae 4608] [--batch 4096] [--k 32] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

WORKLOADS = ("relu-dense", "relu-sparse", "topk-dense", "topk-sparse", "saelens-standard", "saelens-topk")


def _ours(name: str, x: torch.Tensor, a, tmp: str):
    from domain_sae.runs import single as pipeline
    from domain_sae.config import TrainConfig
    from domain_sae.sae.init import initialize
    from domain_sae.training.trainer import Trainer
    arch, kernels = name.split("-")
    # ReLU: lr 1e-12 keeps b_enc where it was set, i.e. the density at relu_l0 (with lr > 0 on Gaussian inputs L0 climbs
    # from 50 to over 200 within 5 steps, and the sparse step's cost with it); Adam does the same work at any lr.
    cfg = TrainConfig(architecture="standard" if arch == "relu" else "topk", d_sae=a.d_sae, k=a.k,
                      lr=1e-12 if arch == "relu" else 1e-3,
                      l1_coefficient=5.0, training_tokens=10 ** 9, train_batch_size_tokens=x.shape[0],
                      normalize_activations="none", kernels=kernels, device=a.device).validate()
    sae = pipeline.new_sae(cfg, x.shape[1], {}).to(x.device)
    initialize(sae, cfg, None, torch.Generator().manual_seed(0))
    if arch == "relu":  # steady-state sparsity: about relu_l0 active latents per token
        with torch.no_grad():
            z = x @ sae.W_enc
            sae.b_enc.copy_(-torch.quantile(z[:1024].float(), 1.0 - a.relu_l0 / a.d_sae, dim=0))
    trainer = Trainer(sae, cfg, iter(()), tmp, loggers=[], verbose=False)
    return lambda: trainer._train_step(x)


def _saelens(name: str, x: torch.Tensor, a):
    if name == "saelens-standard":
        from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=x.shape[1], d_sae=a.d_sae, l1_coefficient=5.0,
                                                            dtype="float32", device=a.device))
        coef = {"l1": 5.0}
    else:
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=a.d_sae, k=a.k, dtype="float32",
                                                    device=a.device))
        coef = {}
    return saelens_train_step(sae, x, coef, torch.zeros(a.d_sae, dtype=torch.bool, device=x.device), lr=1e-3)


def saelens_train_step(sae, x: torch.Tensor, coefficients: dict, dead_mask, *, lr: float):
    """One SAELens training step as a closure: training_forward_pass, backward, clip at 1.0, Adam (shared by the
    benchmarks that time SAELens)."""
    from sae_lens.saes.sae import TrainStepInput
    opt = torch.optim.Adam(sae.parameters(), lr=lr)

    def step():
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients=coefficients,
                                                       dead_neuron_mask=dead_mask, n_training_steps=0,
                                                       is_logging_step=False))
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
    return step


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(step, steps: int, warmup: int, device: str) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - t) / steps


def gemm_rate(a) -> float:
    """FLOP/s of the dense [B, d_in] x [d_in, d_sae] product on this machine."""
    x = torch.randn(a.batch, a.d_in, device=a.device)
    w = torch.randn(a.d_in, a.d_sae, device=a.device)
    sec = time_steps(lambda: x @ w, max(3, a.steps), 2, a.device)
    return 2.0 * a.batch * a.d_in * a.d_sae / sec


def run_one(name: str, a) -> dict:
    torch.manual_seed(0)
    x = torch.randn(a.batch, a.d_in, device=a.device)
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        step = _saelens(name, x, a) if name.startswith("saelens") else _ours(name, x, a, tmp)
        sec = time_steps(step, a.steps, a.warmup, a.device)
    l0 = a.relu_l0 if name.startswith(("relu", "saelens-standard")) else a.k
    floor = 2.0 * a.batch * a.d_in * a.d_sae + 8.0 * a.batch * l0 * a.d_in
    peak = (torch.cuda.max_memory_allocated() if a.device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"workload": name, "seconds_per_step": sec, "tokens_per_second": a.batch / sec,
            "peak_memory_mb": peak / 2 ** 20, "floor_flops_per_step": floor, "floor_flops_per_second": floor / sec}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--relu-l0", type=float, default=50.0)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--only", choices=WORKLOADS, help="run one workload in this process and print its JSON")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args(argv)
    if a.only:
        print(json.dumps(run_one(a.only, a)))
        return {}
    try:
        import sae_lens
        lens_version = sae_lens.__version__
    except ImportError:
        lens_version = None
    names = [n for n in WORKLOADS if lens_version or not n.startswith("saelens")]
    base = [a for a in (argv if argv is not None else sys.argv[1:])]
    rows = []
    for n in names:  # a fresh process per workload: its own peak memory, no cross-workload caching
        out = subprocess.run([sys.executable, __file__, *base, "--only", n], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{n} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    rate = gemm_rate(a)
    by = {r["workload"]: r for r in rows}
    for r in rows:
        r["fraction_of_flop_floor"] = r["floor_flops_per_second"] / rate
    ratios = {}
    for ours, theirs in (("relu-sparse", "saelens-standard"), ("relu-dense", "saelens-standard"),
                         ("topk-sparse", "saelens-topk"), ("topk-dense", "saelens-topk"),
                         ("relu-sparse", "relu-dense"), ("topk-sparse", "topk-dense")):
        if ours in by and theirs in by:
            ratios[f"{ours} / {theirs}"] = by[ours]["tokens_per_second"] / by[theirs]["tokens_per_second"]
    res = {"d_in": a.d_in, "d_sae": a.d_sae, "batch": a.batch, "k": a.k, "relu_l0": a.relu_l0, "device": a.device,
           "device_name": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
           "torch_threads": torch.get_num_threads(), "sae_lens_version": lens_version, "gemm_flops_per_second": rate,
           "rows": rows, "ratios": ratios}
    lines = [f"# SAE training step (d_in {a.d_in}, d_sae {a.d_sae}, batch {a.batch}, k {a.k}, ReLU L0 "
             f"{a.relu_l0:g}; {res['device_name']}, {res['torch_threads']} threads; SAELens {lens_version})", "",
             "| workload | tokens/s | peak memory (MB) | fraction of FLOP floor |", "|---|---|---|---|"]
    lines += [f"| {r['workload']} | {r['tokens_per_second']:,.0f} | {r['peak_memory_mb']:,.0f} | "
              f"{r['fraction_of_flop_floor']:.2f} |" for r in rows]
    lines += ["", "| ratio | x |", "|---|---|"] + [f"| {k} | {v:.2f} |" for k, v in ratios.items()]
    md = "\n".join(lines) + "\n"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "cpu" if a.device == "cpu" else "gpu"
    (out / f"sae_step_{tag}.json").write_text(json.dumps(res, indent=2))
    (out / f"sae_step_{tag}.md").write_text(md)
    print(md)
    return res


if __name__ == "__main__":
    main()
