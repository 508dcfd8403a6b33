"""Learning-rate and sparsity-coefficient schedules (SPEC section 1), as pure functions of the step.

Notation: t = optimizer step counted from 0, T = ``cfg.total_steps``, W = ``lr_warm_up_steps``,
D = ``lr_decay_steps``, M = T - W - D (steps of the main schedule), lr_end = ``cfg.lr_end`` or lr / 10.

    warm-up   (t < W):              lr_t = lr * (t + 1) / W                      (lr/W at t = 0, lr at t = W - 1)
    main      (W <= t < T - D):     constant:  lr_t = lr
                                    cosine:    lr_t = lr_end + (lr - lr_end) * (1 + cos(pi * (t - W) / M)) / 2
    decay     (t >= T - D):         lr_t = base * (1 - (t - (T - D)) / D),  base = lr (constant) or lr_end (cosine)
                                    (base at the first decay step, reaching 0 one step after the last)

    lambda_t = l1_coefficient * min(t / l1_warm_up_steps, 1)   (l1_coefficient when l1_warm_up_steps = 0)

Being pure functions of ``t``, the schedules need no state in checkpoints: resuming at step t gives the same values.
"""

from __future__ import annotations

import math

__all__ = ["lr_at", "l1_at", "lr_end_of"]


def lr_end_of(cfg) -> float:
    """End learning rate of cosine annealing: ``cfg.lr_end`` or lr / 10."""
    return cfg.lr / 10.0 if getattr(cfg, "lr_end", None) is None else float(cfg.lr_end)


def lr_at(step: int, cfg) -> float:
    """Learning rate of optimizer step ``step`` (0-based); see the module docstring for the formula."""
    lr = float(cfg.lr)
    total = int(cfg.total_steps)
    warm = int(cfg.lr_warm_up_steps)
    decay = int(cfg.lr_decay_steps)
    cosine = cfg.lr_scheduler_name == "cosineannealing"
    if step < warm:
        return lr * (step + 1) / warm
    decay_start = total - decay
    if decay > 0 and step >= decay_start:
        base = lr_end_of(cfg) if cosine else lr
        return base * max(0.0, 1.0 - (step - decay_start) / decay)
    if not cosine:
        return lr
    main = total - warm - decay
    if main <= 0:
        return lr
    end = lr_end_of(cfg)
    u = min(step - warm, main)
    return end + (lr - end) * (1.0 + math.cos(math.pi * u / main)) / 2.0


def l1_at(step: int, cfg) -> float:
    """Sparsity coefficient of step ``step``: lambda * min(step / l1_warm_up_steps, 1)."""
    l1 = float(cfg.l1_coefficient)
    warm = int(cfg.l1_warm_up_steps)
    if warm <= 0:
        return l1
    return l1 * min(step / warm, 1.0)
