"""End-to-end training (``objective`` kl / kl+mse; the formulas are in :mod:`domain_sae.training.objectives`): the
SAE spliced in at its hook of the frozen model, trained on KL(p_clean || p_SAE) of next-token distributions.

One step on a batch of n whole sequences ``(input_ids, segments)`` [n, T] of the training split:

1. activations a [n, T, d] at the hook (truncated forward, no gradients), in chunks of ``model_batch_size``;
2. the SAE's own loss on x' = s a[splice] over the whole batch (splice = the evaluation's splice positions, the
   training mask: no PAD and, with ``exclude_special_tokens``, no SPECIAL): R, S and x̂' [N, d];
3. per chunk: clean logits z (no gradients) and patched logits y, the hook's activation being a with a[splice]
   replaced by x̂'/s (a leaf tensor), gradients enabled through the model's later layers; KL per counted position
   by the evaluation's one definition (:class:`~domain_sae.evaluation.next_token.CleanLogits`), counted positions by
   its rule (:func:`~domain_sae.evaluation.positions.lm_positions`: t counts iff segments[t] != PAD and
   segments[t+1] not in {PAD, SPECIAL}); (sum_chunk KL) / M is backpropagated to the leaf, M = counted positions
   of the batch;
4. one backward through the SAE of (S + w R) + <x̂', g>, g = dKL/dx̂' = (leaf gradient) / s: the SAE's parameters
   receive exactly dL/dtheta. The model is frozen (``requires_grad`` off) and receives no gradient.

Cost per token: steps 1 and 3 are about three forward passes and one backward pass through the layers after the
hook, against one truncated forward for an MSE step; docs/finetuning.md has the measured figures.
"""

from __future__ import annotations

import torch

from ..config import ConfigError, TrainConfig
from ..data.segments import PAD
from ..evaluation.next_token import CleanLogits
from ..evaluation.positions import lm_positions, splice_positions
from ..models.hooks import HookPoint, capture, forward_with_capture, forward_with_patch
from ..training import distributed, fastpath
from ..training.objectives import TokenBatchSource, objective_total, with_kl

__all__ = ["KLObjective", "token_batch_source", "check_end_to_end"]


def check_end_to_end(cfg: TrainConfig, *, source=None, many: bool = False) -> None:
    """Refuse what an end-to-end objective cannot run with (the config-only cases are in ``cfg.validate()``)."""
    if cfg.objective == "mse":
        return
    if many:
        raise ConfigError(f"objective {cfg.objective} trains one SAE spliced into the model at a time, so it cannot "
                          f"run in a saes: list (one shared activation pass); train each SAE with its own dsae "
                          f"finetune --objective {cfg.objective}, or use objective mse in the list.")
    if source is not None and not isinstance(source, TokenBatchSource):
        raise ConfigError(f"objective {cfg.objective} reads whole token sequences and runs the live model, but an "
                          f"activation source ({type(source).__name__}) was passed; leave source out (the tokens "
                          f"come from cfg.data), or use objective mse with that source.")
    if distributed.info().world_size > 1:
        raise ConfigError(f"objective {cfg.objective} runs in one process; run it without torchrun (on one GPU).")


def _chunks(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


def _attention(segs: torch.Tensor, device) -> torch.Tensor | None:
    valid = segs != PAD
    return None if bool(valid.all()) else valid.long().to(device)


def token_batch_source(cfg: TrainConfig, lm, hook: HookPoint) -> TokenBatchSource:
    """Batches of train_batch_size_tokens / context_size sequences of the training split (repeating), with the
    hook's activations for the first-buffer scale estimate."""
    from ..data.token_stream import TokenStream
    device = next(lm.model.parameters()).device

    def activation_fn(input_ids: torch.Tensor) -> torch.Tensor:
        return capture(lm.model, hook, input_ids.to(device)).float()

    stream = TokenStream(cfg, lm.tokenizer, split="train", repeat=True)
    return TokenBatchSource(stream, cfg.train_batch_size_tokens // cfg.context_size, activation_fn=activation_fn,
                            buffer_tokens=cfg.buffer_size_tokens, exclude_special=cfg.exclude_special_tokens)


class KLObjective:
    """The step of the module docstring for ``lm`` (a LoadedModel or torch module) at ``hook``."""

    def __init__(self, cfg: TrainConfig, lm, hook: HookPoint):
        self.cfg, self.hook = cfg, hook
        self.model = lm if isinstance(lm, torch.nn.Module) else lm.model
        self.model.requires_grad_(False)  # frozen: gradients flow through it into the SAE only
        self.model_device = next(self.model.parameters()).device
        self.chunk = int(cfg.model_batch_size)

    def batch_tokens(self, batch) -> int:
        return int(batch[0].numel())

    def step(self, trainer, batch, l1: float, dead_mask, n_dead):
        ids, segs = batch[0].to(torch.long), batch[1]
        s, n = trainer.activation_scale, ids.shape[0]
        attn = [_attention(segs[c], self.model_device) for c in _chunks(n, self.chunk)]
        with torch.no_grad():
            a = torch.cat([capture(self.model, self.hook, ids[c].to(self.model_device), m)
                           for c, m in zip(_chunks(n, self.chunk), attn)])
        splice = splice_positions(segs, self.cfg.exclude_special_tokens).to(a.device)
        x = a[splice].to(trainer.device, trainer.dtype) * s
        if x.shape[0] == 0:
            raise ConfigError("A training batch holds no position the SAE is trained on (every token is padding or "
                              "special); check the data, or set exclude_special_tokens to false.")
        with fastpath.autocast_context(self.cfg, trainer.device):
            out = trainer.sae_loss(x, l1, dead_mask=dead_mask, n_dead=n_dead)
        x_hat = out.x_hat.detach().to(a.device, a.dtype) / s          # the reconstruction at the model's scale
        counted = lm_positions(segs)
        m_total = max(int(counted.sum()), 1)
        grad = torch.zeros_like(x_hat)
        kl_sum = torch.zeros((), dtype=torch.float64, device=a.device)
        offset = 0
        for c, mask in zip(_chunks(n, self.chunk), attn):
            k = int(splice[c].sum())
            leaf = x_hat[offset:offset + k].clone().requires_grad_(True)
            patched = a[c].masked_scatter(splice[c][..., None], leaf)
            chunk_ids = ids[c].to(self.model_device)
            with torch.no_grad():
                clean_logits, _ = forward_with_capture(self.model, self.hook, chunk_ids, mask)
            logits = forward_with_patch(self.model, self.hook, chunk_ids, lambda _a, p=patched: p, mask, grad=True)
            rows = tuple(r.to(clean_logits.device) for r in counted[c].nonzero(as_tuple=True))
            targets = chunk_ids[:, 1:][counted[c].to(chunk_ids.device)].to(clean_logits.device)
            _, kl = CleanLogits(clean_logits, rows, targets).terms(logits)
            if kl.numel() and k:
                (kl.sum() / m_total).backward()
                grad[offset:offset + k] = leaf.grad
            kl_sum += kl.detach().sum()
            offset += k
            del clean_logits, logits, kl
        kl_mean = (kl_sum / m_total).to(out.mse.device, torch.float32)
        total = objective_total(self.cfg.objective, kl_mean, out, self.cfg.kl_mse_weight)
        sae_part = total - kl_mean  # S + w R: the SAE's own terms of L
        torch.autograd.backward([sae_part, out.x_hat], [None, (grad / s).to(out.x_hat.device, out.x_hat.dtype)])
        return x, with_kl(out, total.detach(), kl_mean)
