"""The device side of a training step: TF32, bf16 autocast with fp32 master weights, fused Adam and an optional
torch.compile of the SAE loss (options in :class:`domain_sae.config.architecture.FastPathConfig`).

The same functions run on every device; on CPU they resolve to plain fp32 (autocast ``auto`` -> off, TF32 is
CUDA-only), so the CPU tests exercise the code the GPU runs (fused Adam runs on both). Under bf16 autocast the
matrix products run in bfloat16 while parameters, Adam moments and the loss stay float32, so no GradScaler is
needed (bf16 has fp32's exponent range). Host reads of statistics happen every ``host_sync_every(cfg, device)``
steps only.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from ..config import TrainConfig


def autocast_dtype(cfg: TrainConfig, device: torch.device):
    """torch.bfloat16 when the SAE step runs under autocast, else None (``autocast`` auto = bf16 on CUDA only)."""
    mode = cfg.autocast
    if mode == "auto":
        mode = "bfloat16" if device.type == "cuda" else "none"
    return torch.bfloat16 if mode == "bfloat16" else None


def autocast_context(cfg: TrainConfig, device: torch.device):
    """The context manager around the SAE's forward and loss."""
    dt = autocast_dtype(cfg, device)
    if dt is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dt)


def configure_matmul_precision(cfg: TrainConfig, device: torch.device) -> None:
    """Allow TF32 matrix products on CUDA when ``cfg.tf32``."""
    if device.type == "cuda" and cfg.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def make_optimizer(params, cfg: TrainConfig, device: torch.device) -> torch.optim.Adam:
    """Adam(lr, betas), no weight decay; torch's fused kernel when ``cfg.fused_adam`` (CUDA and CPU: on CPU it is
    several times faster than the per-tensor loop, which matters once the sparse kernels make the products cheap)."""
    fused = bool(cfg.fused_adam and device.type in ("cuda", "cpu"))
    return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=0.0,
                            **({"fused": True} if fused else {}))


def loss_function(sae, cfg: TrainConfig) -> Callable:
    """``sae.loss``, compiled with ``cfg.compile_backend`` when set."""
    if not cfg.compile_backend:
        return sae.loss
    return torch.compile(sae.loss, backend=cfg.compile_backend, dynamic=True)


def host_sync_every(cfg: TrainConfig, device: torch.device) -> int:
    """Steps between host reads of device statistics (dead-latent count for AuxK): every step on CPU, where a read
    is free, every ``log_every`` steps on accelerators."""
    return 1 if device.type == "cpu" else max(1, int(cfg.log_every))
