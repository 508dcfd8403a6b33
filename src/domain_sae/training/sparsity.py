"""Latent firing statistics during training (SPEC sections 1 and 3).

Per optimizer step, with f the batch's latents [B, d_sae] and fired_i = #{tokens : f_i > 0}:

* ``steps_since_fired_i``: +1 every step, reset to 0 on a step where latent i fired.
  ``sparsity/dead_features`` = #{i : steps_since_fired_i >= dead_feature_window} (not fired in the last
  dead_feature_window steps); ``sparsity/mean_passes_since_fired`` = mean_i steps_since_fired_i.
* Every ``feature_sampling_window`` steps, with p_i = (window firings of i) / (window tokens):
  ``metrics/mean_log10_feature_sparsity`` = mean_i log10(p_i + 1e-10), ``sparsity/below_1e-5`` = #{p_i < 1e-5},
  ``sparsity/below_1e-6`` = #{p_i < 1e-6}, ``sparsity/below_dead_threshold`` = #{p_i < dead_feature_threshold};
  then the window resets.
* Whole run: ``log10_density()`` = log10(total firings / total tokens + 1e-10), what ``sparsity.safetensors``
  holds.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..config import TrainConfig

__all__ = ["SparsityTracker"]

EPS = 1e-10


class SparsityTracker:
    """Firing statistics of ``d_sae`` latents (windows as arguments, or :meth:`from_config`)."""

    def __init__(self, d_sae: int, feature_sampling_window: int = 1000, dead_feature_window: int = 1000,
                 dead_feature_threshold: float = 1e-8):
        if feature_sampling_window <= 0 or dead_feature_window <= 0:
            raise ValueError("feature_sampling_window and dead_feature_window must be positive.")
        self.d_sae = int(d_sae)
        self.feature_sampling_window = int(feature_sampling_window)
        self.dead_feature_window = int(dead_feature_window)
        self.dead_feature_threshold = float(dead_feature_threshold)
        self.steps_since_fired = torch.zeros(self.d_sae, dtype=torch.long)
        self.window_counts = torch.zeros(self.d_sae, dtype=torch.long)
        self.total_counts = torch.zeros(self.d_sae, dtype=torch.long)
        self.window_tokens = 0
        self.window_steps = 0
        self.total_tokens = 0
        self.steps = 0
        self.last_window: Optional[dict[str, float]] = None
        self._pending: Optional[dict[str, float]] = None

    @classmethod
    def from_config(cls, d_sae: int, cfg: TrainConfig) -> "SparsityTracker":
        """The tracker with the three windows of a TrainConfig."""
        return cls(d_sae, cfg.feature_sampling_window, cfg.dead_feature_window, cfg.dead_feature_threshold)

    def _to(self, device: torch.device) -> None:
        if self.steps_since_fired.device != device:
            self.steps_since_fired = self.steps_since_fired.to(device)
            self.window_counts = self.window_counts.to(device)
            self.total_counts = self.total_counts.to(device)

    @torch.no_grad()
    def update(self, f: torch.Tensor) -> Optional[dict[str, float]]:
        """Account one optimizer step's latents ``f`` [B, d_sae]. Returns the window statistics when this step
        closes a sampling window, else None."""
        f = f.detach().reshape(-1, self.d_sae)
        return self.update_counts((f > 0).sum(0), f.shape[0])

    @torch.no_grad()
    def update_counts(self, fired: torch.Tensor, n_tokens: int) -> Optional[dict[str, float]]:
        """Account one step from ``fired`` [d_sae] = #{tokens : f_i > 0} over ``n_tokens`` tokens (what
        :meth:`update` computes from f; sparse latents give it without densifying)."""
        self._to(fired.device)
        self.window_counts += fired
        self.total_counts += fired
        # (torch.where, not masked assignment: no host sync on GPU)
        self.steps_since_fired = torch.where(fired > 0, 0, self.steps_since_fired + 1)
        self.window_tokens += int(n_tokens)
        self.total_tokens += int(n_tokens)
        self.window_steps += 1
        self.steps += 1
        if self.window_steps >= self.feature_sampling_window:
            stats = self.window_stats()
            self.window_counts.zero_()
            self.window_tokens = 0
            self.window_steps = 0
            self.last_window = stats
            self._pending = stats
            return stats
        return None

    def window_stats(self) -> dict[str, float]:
        """Statistics of the current (possibly partial) window."""
        p = self.window_counts.double() / max(self.window_tokens, 1)
        return {
            "metrics/mean_log10_feature_sparsity": float(torch.log10(p + EPS).mean()),
            "sparsity/below_1e-5": int((p < 1e-5).sum()),
            "sparsity/below_1e-6": int((p < 1e-6).sum()),
            "sparsity/below_dead_threshold": int((p < self.dead_feature_threshold).sum()),
        }

    def pop_window_stats(self) -> Optional[dict[str, float]]:
        """The statistics of the last window that ended since the previous call (for the next log), or None."""
        stats, self._pending = self._pending, None
        return stats

    def dead_mask(self) -> torch.Tensor:
        return self.steps_since_fired >= self.dead_feature_window

    def step_metrics(self) -> dict[str, float]:
        """``sparsity/dead_features`` and ``sparsity/mean_passes_since_fired`` now."""
        return {"sparsity/dead_features": int(self.dead_mask().sum()),
                "sparsity/mean_passes_since_fired": float(self.steps_since_fired.double().mean())}

    def density(self) -> torch.Tensor:
        """Firing density of each latent over the whole run, float64 [d_sae]."""
        return self.total_counts.double().cpu() / max(self.total_tokens, 1)

    def log10_density(self) -> torch.Tensor:
        """log10(p + 1e-10) over the whole run, float32 [d_sae] (``sparsity.safetensors``)."""
        return torch.log10(self.density() + EPS).float()

    # -- state ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Tensors (CPU) and plain numbers; ``tensors`` go to safetensors, the rest to JSON."""
        return {
            "tensors": {"steps_since_fired": self.steps_since_fired.cpu().clone(),
                        "window_counts": self.window_counts.cpu().clone(),
                        "total_counts": self.total_counts.cpu().clone()},
            "scalars": {"window_tokens": self.window_tokens, "window_steps": self.window_steps,
                        "total_tokens": self.total_tokens, "steps": self.steps, "last_window": self.last_window,
                        "pending": self._pending, "d_sae": self.d_sae},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        t, s = state["tensors"], state["scalars"]
        if int(s["d_sae"]) != self.d_sae:
            raise ValueError(f"Sparsity state is for d_sae={s['d_sae']}, this tracker has {self.d_sae}.")
        device = self.steps_since_fired.device
        self.steps_since_fired = t["steps_since_fired"].to(device, torch.long).clone()
        self.window_counts = t["window_counts"].to(device, torch.long).clone()
        self.total_counts = t["total_counts"].to(device, torch.long).clone()
        self.window_tokens = int(s["window_tokens"])
        self.window_steps = int(s["window_steps"])
        self.total_tokens = int(s["total_tokens"])
        self.steps = int(s["steps"])
        self.last_window = s.get("last_window")
        self._pending = s.get("pending")
