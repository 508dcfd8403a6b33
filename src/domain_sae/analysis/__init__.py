"""Comparing SAEs: dictionary overlap (max cosine, Hungarian matching, drift, domain-specific latents), direction
capture (difference of means, reconstruction cosine, top-k least squares, orthogonal matching pursuit) and steering
(add/ablate a direction at the hook; generations and cross-entropy change)."""

from .direction_capture import (best_single_latent, diff_of_means, direction_capture, mean_activation_difference, omp,
                         omp_curve, reconstruction_cosine, topk_least_squares_curve)
from .errors import AnalysisError
from .overlap import (DomainSpecificLatents, Matching, compare_dictionaries, cosine_matrix, decoder_drift,
                      decoder_matrix, domain_specific_latents, hungarian_match, matched_fraction, max_cosine,
                      top_activating_examples)
from .steering import (ce_change, generate_with_patch, latent_direction, next_token_ce, random_direction_like,
                       steer_patch, steering_sweep)

__all__ = [
    "AnalysisError", "DomainSpecificLatents", "Matching", "best_single_latent", "ce_change", "compare_dictionaries",
    "cosine_matrix", "decoder_drift", "decoder_matrix", "diff_of_means", "direction_capture", "domain_specific_latents",
    "generate_with_patch", "hungarian_match", "latent_direction", "matched_fraction", "max_cosine",
    "mean_activation_difference", "next_token_ce", "omp", "omp_curve", "random_direction_like",
    "reconstruction_cosine", "steer_patch", "steering_sweep", "top_activating_examples", "topk_least_squares_curve",
]
