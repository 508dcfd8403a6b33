"""Options of a feature-store build (what ``dsae features`` exposes as flags)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config.fields import opt


@dataclass
class FeatureOptions:
    """Sizes of what is kept per latent, and how the build runs."""
    top_k: int = opt(20, 'Top activating contexts over all datasets.')
    top_k_per_dataset: int = opt(10, 'Top contexts of each dataset (side by side).')
    window_before: int = opt(10, 'Context tokens shown before the firing token.')
    window_after: int = opt(4, 'Context tokens shown after the firing token.')
    n_intervals: int = opt(5, 'Equal-probability activation-quantile intervals.')
    per_interval: int = opt(3, 'Samples per interval.')
    reservoir: int = opt(256, 'Uniform sample of active positions per latent (quantiles, interval samples).')
    candidates_factor: int = opt(3, 'Top candidates kept per latent = factor * max(top_k, top_k_per_dataset).')
    n_logits: int = opt(10, 'Top positive / negative direct-path tokens.')
    n_neighbours: int = opt(10, 'Nearest latents by decoder cosine.')
    hist_bins: int = opt(100, 'Log10-activation histogram bins over [hist_lo, hist_hi].')
    hist_lo: float = opt(-6.0, 'Lower edge of the log10-activation histogram.')
    hist_hi: float = opt(4.0, 'Upper edge of the log10-activation histogram.')
    batch_size: int = opt(8, 'Sequences per model forward.')
    chunk_tokens: int = opt(0, 'Tokens per SAE-encode chunk (0: sized to ~256 MiB of temporaries).')
    exclude_special: bool = opt(True, 'Special-token positions do not count in the statistics.')
    match_threshold: float = opt(0.7, 'Decoder cosine for "matched" on the comparison page.')
    max_hungarian_latents: int = opt(20000, 'Largest SAE pair matched one-to-one (Hungarian) on the comparison page.')
    seed: int = opt(0, 'Seed of the per-latent reservoir samples.')
    max_memory_gb: float | None = opt(None, 'Refuse to start when the predicted peak memory is above this (GiB).')

    @property
    def n_candidates(self) -> int:
        return self.candidates_factor * max(self.top_k, self.top_k_per_dataset)

    def check(self) -> None:
        from .schema import StoreError
        for name in ("top_k", "top_k_per_dataset", "n_intervals", "per_interval", "reservoir", "hist_bins",
                     "batch_size", "candidates_factor"):
            if getattr(self, name) < 1:
                raise StoreError(f"Feature option {name} must be at least 1 (got {getattr(self, name)}).")
        for name in ("window_before", "window_after", "n_logits", "n_neighbours", "chunk_tokens"):
            if getattr(self, name) < 0:
                raise StoreError(f"Feature option {name} must be 0 or more (got {getattr(self, name)}).")
        if self.hist_hi <= self.hist_lo:
            raise StoreError("hist_hi must be above hist_lo.")
