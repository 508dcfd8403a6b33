"""Faithful SAE evaluation (SPEC section 3): streaming float64 reconstruction metrics, language-model metrics
with the SAE spliced in (CE/KL, zero and mean ablation, per segment), error bars over documents and the SAE ×
held-out data matrix of `dsae eval`.

Modules: ``metrics`` (reconstruction accumulator, a leaf the trainer also uses), ``positions`` (counted, headline
and splice positions), ``patching`` (the reconstruction and the patch spliced in), ``uncertainty`` (per-document
sums with typed keys, bootstrap), ``lm_metrics`` (one token set, several SAEs), ``cache_eval`` (reconstruction
metrics from a held-out activation cache), ``heldout`` (held-out options from the SAEs' metadata), ``sae_set``
(:class:`SAESet`: load, label, hooks, the one compatibility check), ``heldout_data`` (:class:`HeldoutData`: a live
sample or held-out caches), ``runner`` (evaluate_sae, the trainer's evaluator), ``matrix`` (eval_matrix: every
SAE on every held-out set, eval.json), ``report`` (JSON, Markdown, PNG).
"""

from .heldout import EvalError, resolve_eval_config
from .heldout_data import HeldoutData, HeldoutSet
from .lm_metrics import SAEResult, evaluate_saes_on_tokens
from .matrix import eval_matrix
from .metrics import MetricError, ReconstructionAccumulator
from .positions import lm_positions, reconstruction_positions, segment_name, splice_positions, token_counts
from .runner import evaluate_sae, make_evaluator
from .sae_set import EvalCompatibilityError, SAEEntry, SAESet

__all__ = [
    "EvalCompatibilityError", "EvalError", "HeldoutData", "HeldoutSet", "MetricError", "ReconstructionAccumulator",
    "SAEEntry", "SAEResult", "SAESet", "eval_matrix", "evaluate_sae", "evaluate_saes_on_tokens", "lm_positions",
    "make_evaluator", "reconstruction_positions", "resolve_eval_config", "segment_name", "splice_positions",
    "token_counts",
]
