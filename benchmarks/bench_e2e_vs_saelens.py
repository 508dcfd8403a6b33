"""Model + SAE end to end: `dsae train` (pipeline.train) vs SAELens's LanguageModelSAETrainingRunner, same data.

Run inside .venv-saelens (it has both):

    .venv-saelens/bin/python benchmarks/bench_e2e_vs_saelens.py [--tokens 262144] [--expansion 8] [--context 128]
                                                                [--architecture standard|topk] [--k 32]
                                                                [--data chat|pretokenized]

Workload (issue 9's end-to-end target): the offline default SmolLM2-135M-Instruct, the layer-0 MLP output
(ours `blocks.0.hook_mlp_out`; SAELens, which wraps a Hugging Face model in its `HookedProxyLM`, the same module
`model.layers.0.mlp`, and stops the forward after it as we do), ReLU + L1 SAE (or with ``--architecture topk``
SAELens's TopK and ours, k 32) with 8 x 576 = 4,608 latents, lr 1e-3, L1 5, batch 4,096 tokens, context 128,
fp32 on CPU. Both read the same token sequences: the first
``--tokens`` tokens (plus two buffers' worth) of the training split of the built-in `chat` data, packed by our
data pipeline (chat template, BOS per sequence) and handed to SAELens as a pre-tokenized dataset
(`override_dataset`). Both keep a
shuffle buffer of 16 batches, 65,536 tokens (our buffer_size_tokens; SAELens's n_batches_in_buffer x context
size, with its half-refill mixing), both run the model on 16 sequences per forward (our model_batch_size, SAELens's
store_batch_size_prompts), neither evaluates or checkpoints during training, SAELens logs nothing to wandb.
With ``--data chat`` (default) ours does more work on the data side: it renders and tokenizes the chat data as it
trains (SAELens reads the pre-tokenized sequences) and skips the special-token positions (so it runs the model on a
few % more tokens). ``--data pretokenized`` removes both differences: ours reads the very sequences SAELens gets,
from a local JSONL file of ``input_ids`` (no BOS added, no held-out share, no deduplication, special tokens kept),
so both train on every position of the same token ids.

The SAELens model is our already loaded model (`override_model`: the GGUF file of the offline default cannot be
loaded by SAELens's own loader without a network), so both time training only, not model loading. SAELens
estimates no normalisation (normalize_activations "none" in both). Timed: the runner's `run()` and our
`pipeline.train`, each in this process, one after the other. Writes JSON + Markdown to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
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
from domain_sae.data.token_stream import TokenStream  # noqa: E402
from domain_sae.models.load import load_model  # noqa: E402

HF_HOOK = "model.layers.0.mlp"
DATA_NOTE = {"chat": "ours tokenizes the chat data as it trains, SAELens reads it pre-tokenized",
             "pretokenized": "both read the same pre-tokenized sequences and train on every position"}


def _sequences(cfg: TrainConfig, tokenizer, n_tokens: int) -> list[list[int]]:
    out: list[list[int]] = []
    for ids, _ in TokenStream(cfg, tokenizer, split="train", repeat=True):
        out.append(ids.tolist())
        if len(out) * cfg.context_size >= n_tokens:
            return out
    raise SystemExit("the training split ended before --tokens tokens")


def _pretokenized(cfg: TrainConfig, seqs: list[list[int]], tmp: str) -> TrainConfig:
    """``cfg`` reading ``seqs`` as they are: a JSONL file of input_ids, packed without BOS into the same rows."""
    path = Path(tmp) / "sequences.jsonl"
    path.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in seqs))
    return dataclasses.replace(cfg, data=str(path), prepend_bos=False, holdout_fraction=0.0, deduplicate=False,
                               exclude_special_tokens=False)


def _ours(cfg: TrainConfig, lm, seqs: list[list[int]]) -> float:
    t = time.perf_counter()
    res = pipeline.train(cfg, lm=lm, quiet=True)
    sec = time.perf_counter() - t
    print(f"domain-sae: {cfg.training_tokens:,} tokens in {sec:.1f} s; final L0 "
          f"{res.summary.get('metrics', {}).get('metrics/l0', float('nan')):.1f}", flush=True)
    return sec


def _saelens(a, lm, seqs: list[list[int]], tmp: str) -> float:
    import datasets
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
    from sae_lens.load_model import HookedProxyLM
    from sae_lens.saes.standard_sae import StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

    logging.getLogger("sae_lens").setLevel(logging.ERROR)
    sae_cfg = (TopKTrainingSAEConfig(d_in=576, d_sae=a.expansion * 576, k=a.k, dtype="float32", device="cpu")
               if a.architecture == "topk" else
               StandardTrainingSAEConfig(d_in=576, d_sae=a.expansion * 576, l1_coefficient=5.0, dtype="float32",
                                         device="cpu"))
    cfg = LanguageModelSAERunnerConfig(
        sae=sae_cfg,
        model_name="smollm2-135m-instruct", model_class_name="AutoModelForCausalLM", hook_name=HF_HOOK,
        dataset_path="local", is_dataset_tokenized=True, streaming=False, context_size=a.context,
        prepend_bos=False, training_tokens=a.tokens, train_batch_size_tokens=a.batch,
        n_batches_in_buffer=16 * a.batch // a.context, store_batch_size_prompts=16, lr=1e-3, device="cpu",
        dtype="float32",
        logger=LoggingConfig(log_to_wandb=False), n_checkpoints=0, save_final_checkpoint=False,
        checkpoint_path=str(Path(tmp) / "ckpt"), output_path=str(Path(tmp) / "out"), verbose=False,
        n_eval_batches=0, feature_sampling_window=1000, dead_feature_window=1000)
    model = HookedProxyLM(lm.model, lm.tokenizer, hook_names=[HF_HOOK])
    ds = datasets.Dataset.from_dict({"input_ids": seqs})
    runner = LanguageModelSAETrainingRunner(cfg, override_dataset=ds, override_model=model)
    t = time.perf_counter()
    runner.run()
    sec = time.perf_counter() - t
    print(f"SAELens: {a.tokens:,} tokens in {sec:.1f} s", flush=True)
    return sec


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=262144)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--architecture", choices=["standard", "topk"], default="standard")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--data", choices=["chat", "pretokenized"], default="chat")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args(argv)
    torch.manual_seed(0)
    lm = load_model("smollm2-135m-instruct")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = build_config(TrainConfig, overrides=dict(
            model="smollm2-135m-instruct", hook="blocks.0.hook_mlp_out", data="chat", context_size=a.context,
            expansion_factor=a.expansion, training_tokens=a.tokens, train_batch_size_tokens=a.batch,
            buffer_size_tokens=16 * a.batch, lr=1e-3, l1_coefficient=5.0, normalize_activations="none",
            architecture=a.architecture, k=a.k, model_batch_size=16,  # = SAELens's store_batch_size_prompts
            eval_every=0, n_checkpoints=0, resume_checkpoint_minutes=0, output_dir=tmp))
        # the training tokens plus two shuffle buffers: both read past the last trained batch to fill theirs
        seqs = _sequences(cfg, lm.tokenizer, a.tokens + 2 * 16 * a.batch)
        if a.data == "pretokenized":
            cfg = _pretokenized(cfg, seqs, tmp)
        ours = _ours(cfg, lm, seqs)
        try:
            theirs = _saelens(a, lm, seqs, tmp)
        except ImportError:
            theirs = None
            print("sae_lens is not installed: run this inside .venv-saelens (make bench-saelens)")
    res = {"architecture": a.architecture, "k": a.k if a.architecture == "topk" else None, "data": a.data,
           "cpu": cpu_model(), "torch_threads": torch.get_num_threads(),
           "tokens": a.tokens, "d_sae": a.expansion * 576, "context": a.context, "batch": a.batch,
           "ours_seconds": ours, "ours_tokens_per_second": a.tokens / ours,
           "saelens_seconds": theirs, "saelens_tokens_per_second": a.tokens / theirs if theirs else None,
           "speedup": theirs / ours if theirs else None,
           "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "e2e_vs_saelens_cpu" + ("" if a.architecture == "standard" else f"_{a.architecture}") \
        + ("" if a.data == "chat" else f"_{a.data}")
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    md = ["# Model + SAE end to end: domain-sae vs SAELens LanguageModelSAETrainingRunner (CPU)", "",
          f"SmolLM2-135M-Instruct layer-0 MLP out, {a.architecture}"
          + (f" k={a.k}" if a.architecture == "topk" else " (ReLU + L1 5)")
          + f", d_sae {res['d_sae']}, ctx {a.context}, batch {a.batch}, "
          f"{a.tokens:,} chat tokens ({DATA_NOTE[a.data]}), fp32, {res['torch_threads']} threads", "",
          "| | seconds | tokens/s |", "|---|---|---|",
          f"| domain-sae | {ours:.1f} | {a.tokens / ours:,.0f} |"]
    if theirs:
        md += [f"| SAELens | {theirs:.1f} | {a.tokens / theirs:,.0f} |", "",
               f"speed-up: **{theirs / ours:.2f}x**"]
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return res


if __name__ == "__main__":
    main()
