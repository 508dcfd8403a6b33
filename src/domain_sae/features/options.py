"""Options of a feature-store build (what ``dsae features`` exposes as flags)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FeatureOptions:
    """Sizes of what is kept per latent, and how the build runs."""
    top_k: int = 20                 # top activating contexts over all datasets
    top_k_per_dataset: int = 10     # top contexts of each dataset (side by side)
    window_before: int = 10         # context tokens shown before the firing token
    window_after: int = 4           # ... and after it
    n_intervals: int = 5            # equal-probability activation-quantile intervals
    per_interval: int = 3           # samples per interval
    reservoir: int = 256            # uniform sample of active positions per latent (quantiles, interval samples)
    candidates_factor: int = 3      # top candidates kept per latent = factor * max(top_k, top_k_per_dataset)
    n_logits: int = 10              # top positive / negative direct-path tokens
    n_neighbours: int = 10          # nearest latents by decoder cosine
    hist_bins: int = 100            # log10-activation histogram bins over [hist_lo, hist_hi]
    hist_lo: float = -6.0
    hist_hi: float = 4.0
    batch_size: int = 8             # sequences per model forward
    chunk_tokens: int = 0           # tokens per SAE-encode chunk (0: sized to ~256 MiB of temporaries)
    exclude_special: bool = True    # special-token positions do not count in the statistics
    match_threshold: float = 0.7    # decoder cosine for "matched" on the comparison page
    max_hungarian_latents: int = 20000
    seed: int = 0
    max_memory_gb: float | None = None  # refuse to start when the prediction is above this

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
