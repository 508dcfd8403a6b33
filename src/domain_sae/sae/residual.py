"""A frozen base SAE plus a residual SAE trained on its reconstruction error, used as one SAE.

With B the base (e.g. the general SAE, frozen) and R the residual SAE (trained on r = x - B(x), see
:mod:`domain_sae.activations.residual`):

    encode(x) = [f_B, f_R]     f_B = B.encode(x),  f_R = R.encode(x - B.decode(f_B))      shape [..., d_B + d_R]
    decode(f) = B.decode(f[..., :d_B]) + R.decode(f[..., d_B:])
    forward(x) = decode(encode(x)) = B(x) + R(x - B(x))

so every evaluation that computes ``decode(encode(x))`` (reconstruction metrics, CE/KL with the SAE spliced in)
measures the stack. ``W_dec`` is the two decoders stacked ([d_B + d_R, d_in]: latent i's direction, base latents
first), L0 is the sum of both parts' L0. ``save(dir)`` writes ``dir/base`` and ``dir/residual`` (each a normal
SAELens-compatible SAE directory) and ``dir/residual_stack.json``; :meth:`ResidualStackSAE.load` reads it back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import torch
from torch import nn

from ..util.jsonsafe import write_json
from .io import load_sae
from .standard import SAECompatibilityError, SAEModelConfig

__all__ = ["ResidualStackSAE", "STACK_FILE"]

STACK_FILE = "residual_stack.json"
_FORMAT = "domain-sae-residual-stack"


class ResidualStackSAE(nn.Module):
    """``base`` followed by ``residual`` (module docstring). The stack is for evaluation: it leaves both SAEs'
    ``requires_grad`` as they are (the base may be shared, e.g. as the parent of fine-tuning runs)."""

    def __init__(self, base: nn.Module, residual: nn.Module):
        super().__init__()
        if base.cfg.d_in != residual.cfg.d_in:
            raise SAECompatibilityError(f"The residual SAE has d_in={residual.cfg.d_in} but the base SAE "
                                        f"d_in={base.cfg.d_in}; train the residual SAE on the base SAE's hook.")
        self.base = base
        self.residual = residual
        meta = dict(base.cfg.metadata or {})
        meta["residual_stack"] = {"base_d_sae": int(base.cfg.d_sae), "residual_d_sae": int(residual.cfg.d_sae),
                                  "residual_metadata": dict(residual.cfg.metadata or {})}
        self.cfg = SAEModelConfig(architecture="residual_stack", d_in=int(base.cfg.d_in),
                                  d_sae=int(base.cfg.d_sae) + int(residual.cfg.d_sae), dtype=base.cfg.dtype,
                                  metadata=meta)

    @property
    def d_base(self) -> int:
        return int(self.base.cfg.d_sae)

    @property
    def d_in(self) -> int:
        return int(self.cfg.d_in)

    @property
    def d_sae(self) -> int:
        return int(self.cfg.d_sae)

    @property
    def device(self) -> torch.device:
        return self.base.W_dec.device

    @property
    def dtype(self) -> torch.dtype:
        return self.base.W_dec.dtype

    @property
    def W_dec(self) -> torch.Tensor:
        """[d_B + d_R, d_in]: base decoder rows, then residual decoder rows."""
        return torch.cat([self.base.W_dec, self.residual.W_dec.to(self.base.W_dec.dtype)])

    @property
    def b_dec(self) -> torch.Tensor:
        """The stack's output bias b_dec,B + b_dec,R (what decode(0) returns)."""
        return self.base.b_dec + self.residual.b_dec.to(self.base.b_dec.dtype)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        f_base = self.base.encode(x)
        r = x.to(self.dtype) - self.base.decode(f_base)
        return torch.cat([f_base, self.residual.encode(r).to(f_base.dtype)], dim=-1)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        f_base, f_res = f[..., :self.d_base], f[..., self.d_base:]
        return self.base.decode(f_base) + self.residual.decode(f_res).to(self.dtype)

    def forward_with_latents(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encode(x)
        return self.decode(f), f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_latents(x)[0]

    def save(self, path: Union[str, Path]) -> Path:
        """Write ``path/base``, ``path/residual`` and ``path/residual_stack.json``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.base.save(path / "base")
        self.residual.save(path / "residual")
        write_json(path / STACK_FILE, {"format": _FORMAT, "version": 1, "base": "base", "residual": "residual"})
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "ResidualStackSAE":
        path = Path(path)
        f = path / STACK_FILE
        if not f.is_file():
            raise SAECompatibilityError(f"{path} is not a residual-stack SAE directory (no {STACK_FILE}); write one "
                                        f"with ResidualStackSAE.save().")
        spec = json.loads(f.read_text())
        return cls(load_sae(path / spec["base"]), load_sae(path / spec["residual"]))
