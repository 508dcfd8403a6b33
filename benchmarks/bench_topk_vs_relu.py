"""Quality at equal tokens: TopK SAEs against the ReLU + L1 frontier at the same L0, on the offline default.

    python benchmarks/bench_topk_vs_relu.py [--hook blocks.0.hook_mlp_out] [--data chat] [--tokens 200000]
                                            [--l1 2 5 12 30] [--k 16 32 64] [--heldout 8192] [--tiny]

One activation cache of the training split (`dsae cache`), then from it every SAE at the same number of training
tokens, the same width (expansion 4) and the study's schedule: ReLU SAEs at each L1 coefficient of ``--l1`` and TopK
SAEs at each k of ``--k``. Each is measured on held-out activations (the split `dsae eval` uses): explained variance
(float64, about the mean) with its per-sequence jackknife error, and L0. The ReLU points make a frontier in log L0;
each TopK SAE is compared with the frontier interpolated at its own L0 (inside the frontier's range only, never
extrapolated). The issue's bar: a TopK SAE reaches at least the EV of the ReLU SAE at the same L0. Writes JSON +
Markdown to benchmarks/results/ (``--tiny``: a smoke run on a few thousand tokens, figures meaningless, nothing
written).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from domain_sae.runs import single as pipeline  # noqa: E402
from domain_sae.activations.hook_cache import build_cache  # noqa: E402
from domain_sae.analysis.stats import ExtrapolationError, Frontier  # noqa: E402
from domain_sae.config import TrainConfig, build_config  # noqa: E402
from domain_sae.activations.heldout_cache import open_heldout_cache  # noqa: E402
from domain_sae.study.config import study_schedule  # noqa: E402
from domain_sae.study.inputs import HeldoutActivations  # noqa: E402
from domain_sae.study.measure import recon_with_se  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--hook", default="blocks.0.hook_mlp_out")
    p.add_argument("--data", default="chat")
    p.add_argument("--tokens", type=int, default=200_000)
    p.add_argument("--l1", type=float, nargs="+", default=[2.0, 5.0, 12.0, 30.0])
    p.add_argument("--k", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--heldout", type=int, default=8192)
    p.add_argument("--context-size", type=int, default=256)
    p.add_argument("--tiny", action="store_true")
    a = p.parse_args(argv)
    if a.tiny:
        a.tokens, a.heldout, a.l1, a.k = 8192, 1024, [2.0, 12.0], [8, 16]
    work = Path(tempfile.mkdtemp(prefix="bench_topk_relu_"))
    base = dict(model=a.model, hook=a.hook, data=a.data, context_size=a.context_size, expansion_factor=4,
                training_tokens=a.tokens, train_batch_size_tokens=4096 if not a.tiny else 1024,
                buffer_size_tokens=65536 if not a.tiny else 4096, lr=2e-3, eval_every=0, n_checkpoints=0,
                resume_checkpoint_minutes=0, output_dir=str(work / "runs"))
    # the schedule every study SAE trains with (LR warm-up and decay, L1 warm-up), the same for both architectures
    base.update(study_schedule(max(1, a.tokens // base["train_batch_size_tokens"])))
    cfg = build_config(TrainConfig, overrides={**base, "run_name": "probe"})
    lm = pipeline.load_lm(cfg)
    t0 = time.perf_counter()
    cache = build_cache(lm, [a.hook], cfg, work / "cache", a.tokens + 4 * cfg.train_batch_size_tokens)
    held = HeldoutActivations.of_cache(open_heldout_cache(
        build_cache(lm, [a.hook], cfg, work / "heldout", a.heldout, split="heldout"), a.hook))
    rows = []
    for arch, values in (("standard", a.l1), ("topk", a.k)):
        for v in values:
            knob = {"l1_coefficient": v} if arch == "standard" else {"k": v}
            run = build_config(TrainConfig, overrides={**base, "architecture": arch, **knob, "activations": str(cache),
                                                       "run_name": f"{arch}_{v:g}"})
            t = time.perf_counter()
            sae = pipeline.train(run, lm=lm, quiet=True).sae.eval()
            m = recon_with_se(sae, held)
            rows.append({"architecture": arch, "knob": "l1" if arch == "standard" else "k", "value": v, **m,
                         "seconds": round(time.perf_counter() - t, 1)})
            print(f"{arch:8s} {'L1' if arch == 'standard' else 'k'}={v:<6g} L0 {m['l0']:7.1f}  EV {m['ev']:.4f} "
                  f"± {m['ev_se']:.4f}", flush=True)
    relu = [r for r in rows if r["architecture"] == "standard"]
    frontier = Frontier.from_points([r["l0"] for r in relu], [r["ev"] for r in relu], [r["ev_se"] for r in relu],
                                    name="ReLU + L1 frontier")
    for r in rows:
        if r["architecture"] != "topk":
            continue
        try:
            ev, se = frontier.at(r["l0"])
            r["relu_ev_at_same_l0"], r["relu_ev_se"] = ev, se
            r["topk_minus_relu"] = r["ev"] - ev
        except ExtrapolationError as e:
            r["relu_ev_at_same_l0"] = None
            r["why"] = str(e)
    result = {"model": a.model, "hook": a.hook, "data": a.data, "tokens": a.tokens, "d_sae": 4 * held.flat.shape[-1],
              "heldout_tokens": int(held.flat.shape[0]), "rows": rows,
              "seconds": round(time.perf_counter() - t0, 1), "tiny": a.tiny}
    lines = [f"# TopK vs ReLU at the same L0 ({a.model}, {a.hook}, {a.data}, {a.tokens:,} training tokens each, "
             f"d_sae {result['d_sae']}, {result['heldout_tokens']:,} held-out tokens)", "",
             "| SAE | L0 | EV ± jackknife se | ReLU frontier EV at this L0 | TopK − ReLU |", "|---|---|---|---|---|"]
    for r in rows:
        name = f"ReLU L1={r['value']:g}" if r["architecture"] == "standard" else f"TopK k={r['value']:g}"
        fr = r.get("relu_ev_at_same_l0")
        lines.append(f"| {name} | {r['l0']:.1f} | {r['ev']:.4f} ± {r['ev_se']:.4f} | "
                     + (f"{fr:.4f} ± {r['relu_ev_se']:.4f} | {r['topk_minus_relu']:+.4f} |" if fr is not None else
                        ("outside the ReLU L0 range | |" if r["architecture"] == "topk" else "| |")))
    print("\n".join(lines))
    if not a.tiny:
        out = ROOT / "benchmarks" / "results"
        out.mkdir(parents=True, exist_ok=True)
        (out / "topk_vs_relu.json").write_text(json.dumps(result, indent=2))
        (out / "topk_vs_relu.md").write_text("\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main()
