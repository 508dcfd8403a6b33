"""Cost per token of fine-tuning objectives: mse (the SAE's own loss on live activations) vs kl / kl+mse (the SAE
spliced in at its hook, KL of next-token distributions, backward through the frozen model's later layers).

    python benchmarks/bench_finetune_objectives.py [--model smollm2-135m-instruct]
        [--hook blocks.0.hook_mlp_out --hook blocks.15.hook_resid_post] [--objective mse --objective kl]
        [--tokens 8192] [--batch 1024] [--context-size 128] [--model-batch-size 8] [--expansion 8] [--tiny]

Per hook: a parent SAE trained briefly on ``chat`` (not timed), then one `dsae finetune` per objective on ``code``
from that parent, each on the same tokens. Reports the training loop's tokens/s (``summary.json``
``tokens_per_second``: every step, including the model passes; the live store's first buffer, read before the loop
for the scale estimate, is one batch here, as is the KL source's) and the wall time of the whole call, and the ratio
of each objective to mse. Writes JSON + Markdown to benchmarks/results/ with the date, CPU model and core count.
``--tiny`` is a smoke run whose figures mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from machine import cpu_model  # noqa: E402

from domain_sae.config import TrainConfig, build_config  # noqa: E402
from domain_sae.runs import single as pipeline  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--hook", action="append", help="repeatable; default blocks.0.hook_mlp_out and "
                                                   "blocks.15.hook_resid_post")
    p.add_argument("--objective", action="append", choices=["mse", "kl", "kl+mse"],
                   help="repeatable; default mse and kl")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--model-batch-size", type=int, default=8)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--tiny", action="store_true", help="Smoke run: 512 tokens, batch 256, context 64.")
    a = p.parse_args(argv)
    hooks = a.hook or ["blocks.0.hook_mlp_out", "blocks.15.hook_resid_post"]
    objectives = a.objective or ["mse", "kl"]
    if a.tiny:
        a.tokens, a.batch, a.context_size, a.expansion = 512, 256, 64, 2
    lm = pipeline.load_lm(build_config(TrainConfig, overrides={"model": a.model, "device": a.device}))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for hook in hooks:
            common = dict(model=a.model, device=a.device, hook=hook, context_size=a.context_size,
                          expansion_factor=a.expansion, train_batch_size_tokens=a.batch, buffer_size_tokens=a.batch,
                          model_batch_size=a.model_batch_size, eval_every=0, log_every=10**6,
                          resume_checkpoint_minutes=0, output_dir=tmp)
            parent = pipeline.train(build_config(TrainConfig, overrides={
                **common, "data": "chat", "training_tokens": max(a.tokens, 4 * a.batch), "run_name": f"parent-{hook}"}),
                lm=lm, quiet=True).sae_dir
            for objective in objectives:
                cfg = build_config(TrainConfig, overrides={**common, "data": "code", "from_sae": str(parent),
                                                           "objective": objective, "training_tokens": a.tokens,
                                                           "run_name": f"ft-{hook}-{objective}"})
                t0 = time.perf_counter()
                res = pipeline.finetune(cfg, lm=lm, quiet=True)
                wall = time.perf_counter() - t0
                rows.append({"hook": hook, "objective": objective, "tokens": a.tokens,
                             "loop_tokens_per_s": res.summary["tokens_per_second"],
                             "wall_s": wall, "wall_tokens_per_s": a.tokens / wall})
                print(json.dumps(rows[-1]), flush=True)
    for r in rows:
        base = next(x for x in rows if x["hook"] == r["hook"] and x["objective"] == "mse") \
            if "mse" in objectives else None
        r["slowdown_vs_mse"] = base["loop_tokens_per_s"] / r["loop_tokens_per_s"] if base else None
    meta = {"date": datetime.date.today().isoformat(), "cpu": cpu_model(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.get_device_name(0)
            if torch.cuda.is_available() else None, "args": vars(a)}
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    tag = "tiny" if a.tiny else "full"
    (out / f"finetune_objectives_{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# Fine-tuning objectives: tokens/s ({meta['date']}, {meta['cpu']}, {meta['cores']} cores"
             f"{', ' + meta['cuda'] if meta['cuda'] else ''})", "",
             "| hook | objective | loop tokens/s | wall s | slower than mse |", "|---|---|---|---|---|"]
    for r in rows:
        slow = f"{r['slowdown_vs_mse']:.1f}x" if r["slowdown_vs_mse"] else "-"
        lines.append(f"| {r['hook']} | {r['objective']} | {r['loop_tokens_per_s']:,.0f} | {r['wall_s']:.1f} | "
                     f"{slow} |")
    (out / f"finetune_objectives_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return {"meta": meta, "rows": rows}


if __name__ == "__main__":
    main()
