"""Train one sparse autoencoder by hand: the four parts `dsae train` wires together, in the order data flows.

    .venv/bin/python examples/train_minimal.py                         # SmolLM2-135M-Instruct (offline), chat
    .venv/bin/python examples/train_minimal.py --tokens 16384 --out runs/minimal_small

1. a language model and a hook point     domain_sae.models (load_model, resolve_hook, capture)
2. an activation source                  TokenStream (training split -> fixed-length token sequences) feeding an
                                         ActivationStore (the hook's activations at the kept positions, shuffled)
3. an SAE                                StandardSAE (ReLU + L1), initialised as `dsae train` initialises it
4. the trainer                           Trainer: Adam on the SAE loss; logs, checkpoints, the final SAE in OUT/sae
                                         (SAELens format; domain_sae.sae.io.load_sae reads it back)
docs/architecture.md maps the packages; docs/options.md lists every TrainConfig option used below.
"""

import argparse
from pathlib import Path

import torch

from domain_sae.activations.live import ActivationStore
from domain_sae.config import TrainConfig
from domain_sae.data.token_stream import TokenStream
from domain_sae.models.hooks import capture, hook_d_in, resolve_hook
from domain_sae.models.load import load_model
from domain_sae.sae.init import initialize
from domain_sae.sae.model_config import SAEModelConfig
from domain_sae.sae.standard import StandardSAE
from domain_sae.training.trainer import Trainer


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="Train one SAE by hand (see the module docstring).")
    p.add_argument("--model", default="smollm2-135m-instruct", help="alias, .gguf file, local directory or hub id")
    p.add_argument("--hook", default="blocks.0.hook_mlp_out")
    p.add_argument("--data", default="chat", help="chat, code, prose, general, a file, ... (as dsae train --data)")
    p.add_argument("--tokens", type=int, default=200_000, help="training tokens (default 200000)")
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--out", default="runs/minimal", help="run directory (default runs/minimal)")
    a = p.parse_args(argv)
    cfg = TrainConfig(model=a.model, hook=a.hook, data=a.data, context_size=a.context_size, training_tokens=a.tokens,
                      train_batch_size_tokens=1024, buffer_size_tokens=8192, lr=1e-3, l1_coefficient=5.0,
                      log_every=4, eval_every=0).validate()

    # 1. The model; `capture` stops the forward pass right after the hooked module (layer 0: one layer of compute).
    lm = load_model(cfg.model)
    hook = resolve_hook(lm.model, cfg.hook)
    d_in = hook_d_in(lm.model, hook)

    # 2. Training-split sequences -> activations [n, d_in] at the positions SAE training keeps, in a shuffled buffer.
    stream = TokenStream(cfg, lm.tokenizer, split="train", repeat=True)
    source = ActivationStore(lambda ids: capture(lm.model, hook, ids).float(), stream, d_in=d_in,
                             batch_size=cfg.train_batch_size_tokens, buffer_tokens=cfg.buffer_size_tokens,
                             exclude_special=cfg.exclude_special_tokens, seed=cfg.seed)

    # The SAE sees x' = s x, s = sqrt(d_in) / E||x|| on the first buffer (SPEC 1, expected_average_only_in).
    scale = d_in ** 0.5 / float(source.first_buffer().norm(dim=-1).mean())

    # 3. z = (x' - b_dec) W_enc + b_enc, f = ReLU(z), x_hat' = f W_dec + b_dec (docs/architectures.md).
    meta = {"model_name": lm.name, "hook_name": cfg.hook, "context_size": cfg.context_size, "dataset_path": cfg.data}
    sae = StandardSAE(SAEModelConfig(d_in=d_in, d_sae=4 * d_in, metadata=meta))
    initialize(sae, cfg, generator=torch.Generator().manual_seed(cfg.seed))

    # 4. training_tokens / train_batch_size_tokens Adam steps on mse + lambda * sum_i f_i ||W_dec,i||; the saved SAE
    #    has s folded into its weights, so it takes raw activations.
    summary = Trainer(sae, cfg, source, Path(a.out), activation_scale=scale, verbose=False).train()
    m = summary["metrics"]
    print(f"SAE saved to {summary['sae_dir']}: {summary['steps']} steps, explained variance "
          f"{m['metrics/explained_variance']:.3f}, L0 {m['metrics/l0']:.1f} (last training batch)")
    return summary


if __name__ == "__main__":
    main()
