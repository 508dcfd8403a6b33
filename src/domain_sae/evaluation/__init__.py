"""Faithful SAE evaluation (SPEC section 3): streaming float64 reconstruction metrics, language-model metrics
with the SAE spliced in (CE/KL, zero and mean ablation, per segment), error bars over documents and the SAE ×
dataset matrix of `dsae eval`.

Modules: ``metrics`` (reconstruction accumulator, a leaf the trainer also uses), ``positions`` (counted, headline
and splice positions), ``patching`` (model plumbing), ``uncertainty`` (per-document sums, bootstrap),
``lm_metrics`` (one token set, several SAEs), ``heldout`` (held-out options from the SAEs' metadata), ``runner``
(evaluate_sae, the trainer's evaluator, eval_matrix), ``report`` (JSON, Markdown, PNG).
"""

from .heldout import EvalError, resolve_eval_config
from .lm_metrics import SAEResult, evaluate_saes_on_tokens
from .metrics import MetricError, ReconstructionAccumulator
from .positions import lm_positions, reconstruction_positions, segment_name, splice_positions, token_counts
from .runner import (EvalCompatibilityError, check_sae_compatible, eval_matrix, evaluate, evaluate_sae,
                     make_evaluator, same_model_name)

__all__ = [
    "EvalCompatibilityError", "EvalError", "MetricError", "ReconstructionAccumulator", "SAEResult",
    "check_sae_compatible", "eval_matrix", "evaluate", "evaluate_sae", "evaluate_saes_on_tokens", "lm_positions",
    "make_evaluator", "reconstruction_positions", "resolve_eval_config", "same_model_name", "segment_name",
    "splice_positions", "token_counts",
]
