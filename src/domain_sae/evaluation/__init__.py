"""Faithful SAE evaluation (SPEC section 3): streaming float64 reconstruction metrics, language-model metrics
with the SAE spliced in (CE/KL, zero and mean ablation, per segment) and the SAE × dataset matrix of `dsae eval`.

Heavy modules (models, plotting) are imported lazily, so importing this package is cheap.
"""

from .lm_metrics import (SAEResult, evaluate_saes_on_tokens, lm_positions, reconstruction_positions,
                         segment_name, token_counts)
from .metrics import MetricError, ReconstructionAccumulator
from .runner import (EvalCompatibilityError, EvalError, check_sae_compatible, eval_matrix, evaluate,
                     evaluate_sae, make_evaluator, same_model_name)

__all__ = [
    "EvalCompatibilityError", "EvalError", "MetricError", "ReconstructionAccumulator", "SAEResult",
    "check_sae_compatible", "eval_matrix", "evaluate", "evaluate_sae", "evaluate_saes_on_tokens", "lm_positions",
    "make_evaluator", "reconstruction_positions", "same_model_name", "segment_name", "token_counts",
]
