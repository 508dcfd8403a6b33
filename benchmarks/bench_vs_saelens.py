"""SAE training step, ours vs SAELens 6, on identical shapes and data (run inside .venv-saelens: `make bench-saelens`).

Both steps: forward (ReLU SAE), MSE + decoder-norm-scaled L1, backward, global grad-norm clip to 1, Adam step.
SAELens: StandardTrainingSAE.training_forward_pass (its trainer's per-step work on the SAE). Ours: Trainer._train_step
(the same work plus our sparsity statistics update). Batch [B, d_in] of Gaussian activations.

    python benchmarks/bench_vs_saelens.py [--d-in 576] [--expansion 4] [--batch 4096] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_sae_step import saelens_train_step  # same folder (run as a script)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def time_steps(step, steps: int) -> float:
    for _ in range(3):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t) / steps


def saelens_step(x: torch.Tensor, d_sae: int, lr: float, l1: float):
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=x.shape[1], d_sae=d_sae, l1_coefficient=l1,
                                                        dtype="float32", device="cpu"))
    return saelens_train_step(sae, x, {"l1": l1}, None, lr=lr)


def our_step(x: torch.Tensor, d_sae: int, lr: float, l1: float, tmp: str):
    from domain_sae.runs import single as pipeline
    from domain_sae.config import TrainConfig
    from domain_sae.sae.init import initialize
    from domain_sae.training.trainer import Trainer
    cfg = TrainConfig(d_sae=d_sae, lr=lr, l1_coefficient=l1, training_tokens=10 ** 9,
                      train_batch_size_tokens=x.shape[0], normalize_activations="none").validate()
    sae = pipeline.new_sae(cfg, x.shape[1], {})
    initialize(sae, cfg, None, torch.Generator().manual_seed(0))
    trainer = Trainer(sae, cfg, iter(()), tmp, loggers=[], verbose=False)
    return lambda: trainer._train_step(x)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--expansion", type=int, default=4)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args(argv)
    torch.manual_seed(0)
    x = torch.randn(a.batch, a.d_in)
    d_sae = a.expansion * a.d_in
    import sae_lens
    with tempfile.TemporaryDirectory() as tmp:
        ours = time_steps(our_step(x, d_sae, 1e-3, 5.0, tmp), a.steps)
    theirs = time_steps(saelens_step(x, d_sae, 1e-3, 5.0), a.steps)
    res = {"d_in": a.d_in, "d_sae": d_sae, "batch": a.batch, "torch_threads": torch.get_num_threads(),
           "sae_lens_version": sae_lens.__version__,
           "ours_tokens_per_second": a.batch / ours, "saelens_tokens_per_second": a.batch / theirs,
           "speedup": theirs / ours}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vs_saelens_cpu.json").write_text(json.dumps(res, indent=2))
    md = (f"# SAE training step: domain-sae vs SAELens {sae_lens.__version__} (CPU, {res['torch_threads']} threads)\n\n"
          f"d_in {a.d_in}, d_sae {d_sae}, batch {a.batch}\n\n| | tokens/s |\n|---|---|\n"
          f"| domain-sae | {res['ours_tokens_per_second']:,.0f} |\n"
          f"| SAELens | {res['saelens_tokens_per_second']:,.0f} |\n"
          f"| speed-up | {res['speedup']:.2f}x |\n")
    (out / "vs_saelens_cpu.md").write_text(md)
    print(md)
    return res


if __name__ == "__main__":
    main()
