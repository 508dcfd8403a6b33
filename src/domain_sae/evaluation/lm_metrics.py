"""Language-model metrics of SAEs spliced into the model, on held-out token batches (SPEC section 3).

Inputs: ``input_ids`` and ``segments`` of shape [N, T] (segment codes of ``domain_sae.data.segments``: PAD=-1,
SPECIAL=0, TEXT=1, USER=2, ASSISTANT=3, TEMPLATE=4, SYSTEM=5). Sequences are processed in mini-batches of
``batch_size``; PAD positions are masked out of attention. For every mini-batch:

1. clean pass: logits and the hook's activation ``a`` [B, T, d_in] in one forward;
2. for each SAE: ``x̂ = decode(encode(a))``, then a full forward with the hook's output replaced by ``x̂`` at EVERY
   position (``models.hooks.forward_with_patch``);
3. zero ablation: the hook's output replaced by zeros at every position;
4. optional mean ablation (a second baseline, always labelled ``mean_ablation``): the hook's output replaced at
   every position by x̄, the mean activation over the evaluation's reconstruction tokens (positions that are
   neither PAD nor SPECIAL), computed by a capture-only pre-pass.

Counted next-token positions. Position t predicts token t+1 and counts iff segments[t] != PAD and
segments[t+1] != PAD and segments[t+1] != SPECIAL: the source may be a special token (BOS predicting the first
word counts), the target may not. Each counted position belongs to the segment of its TARGET token.
With p = softmax(clean logits[t]) and q = softmax(patched logits[t]) (log-softmax in float64):

- CE = -(1/M) Σ_t log q(token[t+1]) in nats over the M counted positions (``ce_loss_without_sae`` uses p);
- KL = (1/M) Σ_t Σ_v p(v) (log p(v) - log q(v));
- ``ce_loss_score`` = (CE_abl - CE_sae) / (CE_abl - CE_clean); ``delta_loss`` = CE_sae - CE_clean;
  ``kl_div_score`` = (KL_abl - KL_sae) / KL_abl (NaN when a denominator is 0);
- the mean-ablation variants use CE_mean / KL_mean in place of CE_abl / KL_abl.

Reconstruction metrics (:mod:`.metrics`) use the activations captured in the clean pass at the positions that are
neither PAD nor SPECIAL, each position in the segment of its own token. The pre-pass gives each group's exact mean,
so the per-token explained variance is the two-pass value without keeping activations in memory.

All sums are float64, everything runs under ``torch.no_grad`` and is deterministic (no sampling; fixed order).
The zero/mean ablations and the clean pass are shared by all SAEs evaluated together at one hook.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor

from .metrics import MetricError, ReconstructionAccumulator

__all__ = ["SAEResult", "SEGMENT_NAMES", "evaluate_saes_on_tokens", "lm_positions", "reconstruction_positions",
           "segment_codes", "segment_name", "token_counts"]

# Fallbacks matching docs/architecture.md, used when domain_sae.data.segments is not importable.
_PAD, _SPECIAL = -1, 0
SEGMENT_NAMES = {1: "text", 2: "user", 3: "assistant", 4: "template", 5: "system"}
# Rows of log-softmax computed at once (rows x vocab float64 values, ~64 MB for a 50k vocabulary).
_LOGIT_ELEMENTS_PER_CHUNK = 8_000_000


def segment_codes() -> tuple[int, int]:
    """(PAD, SPECIAL) segment codes."""
    try:
        from domain_sae.data.segments import PAD, SPECIAL
        return int(PAD), int(SPECIAL)
    except ImportError:
        return _PAD, _SPECIAL


def segment_name(code: int) -> str:
    """Human name of a segment code (``text``, ``user``, ``assistant``, ``template``, ``system``)."""
    try:
        from domain_sae.data.segments import SEGMENT_NAMES as names
    except ImportError:
        names = SEGMENT_NAMES
    return names.get(int(code), f"segment_{int(code)}")


def lm_positions(segments: Tensor) -> Tensor:
    """Boolean [N, T-1]: position t counts for next-token metrics (see the module docstring)."""
    pad, special = segment_codes()
    src, tgt = segments[:, :-1], segments[:, 1:]
    return (src != pad) & (tgt != pad) & (tgt != special)


def reconstruction_positions(segments: Tensor) -> Tensor:
    """Boolean [N, T]: positions whose activation counts in the reconstruction metrics (not PAD, not SPECIAL)."""
    pad, special = segment_codes()
    return (segments != pad) & (segments != special)


def token_counts(segments: Tensor) -> dict[str, int]:
    """How many positions exist, are padding/special, and are counted by each family of metrics."""
    pad, special = segment_codes()
    lm = lm_positions(segments)
    valid_pair = (segments[:, :-1] != pad) & (segments[:, 1:] != pad)
    return {
        "tokens/sequences": int(segments.shape[0]),
        "tokens/total": int(segments.numel()),
        "tokens/pad": int((segments == pad).sum()),
        "tokens/special": int((segments == special).sum()),
        "tokens/reconstruction_counted": int(reconstruction_positions(segments).sum()),
        "tokens/lm_counted": int(lm.sum()),
        "tokens/lm_excluded_special_target": int((valid_pair & (segments[:, 1:] == special)).sum()),
    }


# ----------------------------------------------------------------------------------------------------------------
# Model plumbing

def _hooks():
    from domain_sae.models import hooks
    return hooks


def _module(lm: Any) -> torch.nn.Module:
    """The torch module of a ``LoadedModel`` (``lm.model``) or the module itself (an HF causal LM has its own
    ``.model`` attribute, the decoder stack, which must not be unwrapped)."""
    return lm if isinstance(lm, torch.nn.Module) else lm.model


def _resolve(model: torch.nn.Module, hook: Any) -> Any:
    return _hooks().resolve_hook(model, hook) if isinstance(hook, str) else hook


def _clean_forward(model, hook, ids: Tensor, attn: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(logits [B, T, V], activation at the hook [B, T, d_in]) from one unpatched forward."""
    h = _hooks()
    if hasattr(h, "forward_with_capture"):
        out = h.forward_with_capture(model, hook, ids, attention_mask=attn)
        if isinstance(out, tuple):
            return out[0], out[1]
        return out.logits, out.activations  # a result object
    box: dict[str, Tensor] = {}

    def record(a: Tensor) -> Tensor:
        box["a"] = a.detach().clone()
        return a

    logits = h.forward_with_patch(model, hook, ids, record, attention_mask=attn)
    return logits, box["a"]


def _patched_forward(model, hook, ids: Tensor, attn: Optional[Tensor], fn: Callable[[Tensor], Tensor]) -> Tensor:
    return _hooks().forward_with_patch(model, hook, ids, fn, attention_mask=attn)


def _replace_with(value: Tensor, broadcast: bool = False) -> Callable[[Tensor], Tensor]:
    """A patch function returning ``value`` (same shape as the activation, or a [d_in] vector to broadcast)."""
    def patch(a: Tensor) -> Tensor:
        if broadcast:
            if value.shape[-1] != a.shape[-1]:
                raise MetricError(f"patch vector has {value.shape[-1]} values, the hook's activation has "
                                  f"{a.shape[-1]}.")
            return value.to(device=a.device, dtype=a.dtype).expand_as(a).clone()
        if value.shape != a.shape:
            raise MetricError(f"replacement {tuple(value.shape)} does not match the hook's activation "
                              f"{tuple(a.shape)}.")
        return value.to(device=a.device, dtype=a.dtype)
    return patch


def _sae_device_dtype(sae: Any, fallback: Tensor) -> tuple[torch.device, torch.dtype]:
    params = list(sae.parameters()) if hasattr(sae, "parameters") else []
    if params:
        return params[0].device, params[0].dtype
    return fallback.device, torch.float32


def _sae_widths(sae: Any) -> tuple[Optional[int], Optional[int]]:
    cfg = getattr(sae, "cfg", None)
    d_in = getattr(cfg, "d_in", None) if cfg is not None else None
    d_sae = getattr(cfg, "d_sae", None) if cfg is not None else None
    if d_in is None and hasattr(sae, "W_dec"):
        d_sae, d_in = sae.W_dec.shape
    return d_in, d_sae


def _reconstruct(sae: Any, a: Tensor) -> tuple[Tensor, Tensor]:
    """(x̂ [..., d_in] on a's device, f [..., d_sae]) for activations ``a``."""
    d_in, _ = _sae_widths(sae)
    if d_in is not None and int(d_in) != a.shape[-1]:
        raise MetricError(f"The SAE takes d_in={d_in} but the hook's activation has width {a.shape[-1]}: this SAE "
                          f"was trained at another hook or on another model. Evaluate it at its own hook/model.")
    device, dtype = _sae_device_dtype(sae, a)
    x = a.to(device=device, dtype=dtype)
    f = sae.encode(x)
    x_hat = sae.decode(f)
    if x_hat.shape != x.shape:
        raise MetricError(f"The SAE's reconstruction has shape {tuple(x_hat.shape)} for input {tuple(x.shape)}; "
                          f"its d_in must equal the hook's width {a.shape[-1]}.")
    return x_hat.to(a.device), f.to(a.device)


def _row_logprobs(logits: Tensor, rows: tuple[Tensor, Tensor]) -> Tensor:
    """float64 log-softmax of ``logits[b, t]`` for the given (b, t) index rows."""
    return torch.log_softmax(logits[rows[0], rows[1]].to(torch.float64), dim=-1)


def _chunks(n_rows: int, vocab: int):
    step = max(1, _LOGIT_ELEMENTS_PER_CHUNK // max(vocab, 1))
    for s in range(0, n_rows, step):
        yield slice(s, min(s + step, n_rows))


# ----------------------------------------------------------------------------------------------------------------
# Accumulation

class _NextTokenSums:
    """Float64 sums of per-position CE and KL per condition and per group (overall + target segment)."""

    def __init__(self):
        self.count: dict[str, int] = {}
        self.ce: dict[tuple[str, str], float] = {}
        self.kl: dict[tuple[str, str], float] = {}

    def add(self, cond: str, groups: Mapping[str, Tensor], ce: Tensor, kl: Optional[Tensor], *,
            count: bool = False) -> None:
        for g, m in groups.items():
            self.ce[(cond, g)] = self.ce.get((cond, g), 0.0) + float(ce[m].sum())
            if kl is not None:
                self.kl[(cond, g)] = self.kl.get((cond, g), 0.0) + float(kl[m].sum())
            if count:
                self.count[g] = self.count.get(g, 0) + int(m.sum())

    def mean(self, table: dict, cond: str, g: str) -> float:
        n = self.count.get(g, 0)
        return table.get((cond, g), 0.0) / n if n else math.nan


def _ratio(num: float, den: float) -> float:
    return num / den if den != 0 and math.isfinite(den) else math.nan


@dataclass
class SAEResult:
    """Evaluation of one SAE on one token set: ``metrics`` (flat, SPEC names, overall), ``segments`` (the same
    keys per segment name), ``log10_feature_density`` (float64 [d_sae], log10(p_i + 1e-10)), ``tokens`` (counts)."""

    metrics: dict[str, float]
    segments: dict[str, dict[str, float]] = field(default_factory=dict)
    log10_feature_density: Optional[Tensor] = None
    tokens: dict[str, int] = field(default_factory=dict)


def _lm_block(sums: _NextTokenSums, g: str, sae_cond: str, mean_ablation: bool) -> dict[str, float]:
    ce_clean = sums.mean(sums.ce, "clean", g)
    ce_sae = sums.mean(sums.ce, sae_cond, g)
    ce_abl = sums.mean(sums.ce, "zero", g)
    kl_sae = sums.mean(sums.kl, sae_cond, g)
    kl_abl = sums.mean(sums.kl, "zero", g)
    out = {
        "metrics/ce_loss_without_sae": ce_clean,
        "metrics/ce_loss_with_sae": ce_sae,
        "metrics/ce_loss_with_ablation": ce_abl,
        "metrics/ce_loss_score": _ratio(ce_abl - ce_sae, ce_abl - ce_clean),
        "metrics/delta_loss": ce_sae - ce_clean,
        "metrics/kl_div_with_sae": kl_sae,
        "metrics/kl_div_with_ablation": kl_abl,
        "metrics/kl_div_score": _ratio(kl_abl - kl_sae, kl_abl),
    }
    if mean_ablation:
        ce_mean = sums.mean(sums.ce, "mean", g)
        kl_mean = sums.mean(sums.kl, "mean", g)
        out.update({
            "metrics/ce_loss_with_mean_ablation": ce_mean,
            "metrics/kl_div_with_mean_ablation": kl_mean,
            "metrics/ce_loss_score_mean_ablation": _ratio(ce_mean - ce_sae, ce_mean - ce_clean),
            "metrics/kl_div_score_mean_ablation": _ratio(kl_mean - kl_sae, kl_mean),
        })
    out["tokens/lm_counted"] = sums.count.get(g, 0)
    return out


# ----------------------------------------------------------------------------------------------------------------

def _validate_tokens(input_ids: Tensor, segments: Tensor) -> tuple[Tensor, Tensor]:
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    segs = torch.as_tensor(segments).to(torch.int64)
    if ids.ndim == 1:
        ids, segs = ids[None], segs[None]
    if ids.ndim != 2 or ids.shape != segs.shape:
        raise MetricError(f"input_ids {tuple(ids.shape)} and segments {tuple(segs.shape)} must both be [N, T].")
    if ids.shape[1] < 2:
        raise MetricError("Sequences need at least 2 tokens to have a next-token target; raise context_size.")
    if not bool(lm_positions(segs).any()):
        raise MetricError("No next-token target can be counted: every target is PAD or SPECIAL. Evaluate on data "
                          "with ordinary text tokens (check the held-out split is not empty).")
    return ids, segs


@torch.no_grad()
def _group_means(model, hook, ids: Tensor, segs: Tensor, batch_size: int, device: torch.device,
                 per_segment: bool) -> dict[str, Tensor]:
    """Exact float64 mean activation per group ("overall" and each segment name), capture-only pre-pass."""
    h = _hooks()
    pad, _ = segment_codes()
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    for i in range(0, ids.shape[0], batch_size):
        x_ids, s = ids[i:i + batch_size], segs[i:i + batch_size]
        valid = s != pad
        attn = None if bool(valid.all()) else valid.long().to(device)
        a = h.capture(model, hook, x_ids.to(device), attention_mask=attn)
        for g, m in _groups(s, reconstruction_positions(s), per_segment).items():
            xs = a[m.to(a.device)].to(torch.float64)
            sums[g] = sums.get(g, 0) + xs.sum(0)
            counts[g] = counts.get(g, 0) + xs.shape[0]
    return {g: sums[g] / counts[g] for g in sums if counts[g] > 0}


def _groups(seg_codes: Tensor, base: Tensor, per_segment: bool) -> dict[str, Tensor]:
    """{"overall": base, segment name: base & (code == c) ...} for the codes present under ``base``."""
    out = {"overall": base}
    if per_segment:
        for c in sorted(int(c) for c in torch.unique(seg_codes[base])):
            out[segment_name(c)] = base & (seg_codes == c)
    return out


@torch.no_grad()
def evaluate_saes_on_tokens(saes: Mapping[str, Any], lm: Any, hook: Any, input_ids: Tensor, segments: Tensor, *,
                            batch_size: int = 8, mean_ablation: bool = False,
                            per_segment: bool = True) -> dict[str, SAEResult]:
    """Evaluate every SAE of ``saes`` (label -> SAE with ``encode``/``decode``) at ``hook`` of ``lm`` (a
    ``LoadedModel`` or a torch module) on ``input_ids``/``segments`` [N, T]; returns label -> :class:`SAEResult`.

    The clean pass, zero ablation and mean ablation run once per mini-batch for all SAEs. Definitions: module
    docstring. Results do not depend on ``batch_size`` beyond floating-point rounding of the model itself.
    """
    if not saes:
        raise MetricError("No SAE to evaluate.")
    if batch_size <= 0:
        raise MetricError(f"batch_size must be positive (got {batch_size}).")
    ids, segs = _validate_tokens(input_ids, segments)
    model = _module(lm)
    hook = _resolve(model, hook)
    device = next(model.parameters()).device
    pad, _ = segment_codes()

    means = _group_means(model, hook, ids, segs, batch_size, device, per_segment)
    recon: dict[str, dict[str, ReconstructionAccumulator]] = {label: {} for label in saes}
    sums = _NextTokenSums()
    conds = {label: f"sae:{label}" for label in saes}

    for i in range(0, ids.shape[0], batch_size):
        x_ids, s = ids[i:i + batch_size].to(device), segs[i:i + batch_size]
        valid = s != pad
        attn = None if bool(valid.all()) else valid.long().to(device)
        clean_logits, a = _clean_forward(model, hook, x_ids, attn)
        counted = lm_positions(s)
        rows = counted.nonzero(as_tuple=True)
        rows_dev = (rows[0].to(clean_logits.device), rows[1].to(clean_logits.device))
        targets = x_ids[:, 1:][counted.to(device)].to(clean_logits.device)
        tgt_groups = {g: m[counted].to(clean_logits.device)
                      for g, m in _groups(s[:, 1:], counted, per_segment).items()}
        rec_groups = _groups(s, reconstruction_positions(s), per_segment)

        def next_token_terms(patched_logits: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
            """Per counted position: CE (float64) and, for a patched run, KL(p_clean || p_patched)."""
            n_rows, vocab = targets.shape[0], clean_logits.shape[-1]
            ce = torch.empty(n_rows, dtype=torch.float64, device=clean_logits.device)
            kl = None if patched_logits is None else torch.empty_like(ce)
            for sl in _chunks(n_rows, vocab):
                r = (rows_dev[0][sl], rows_dev[1][sl])
                lp_clean = _row_logprobs(clean_logits, r)
                if patched_logits is None:
                    ce[sl] = -lp_clean.gather(1, targets[sl, None]).squeeze(1)
                    continue
                lp = _row_logprobs(patched_logits, r)
                ce[sl] = -lp.gather(1, targets[sl, None]).squeeze(1)
                kl[sl] = (lp_clean.exp() * (lp_clean - lp)).sum(-1)
            return ce, kl

        ce_clean, _ = next_token_terms(None)
        sums.add("clean", tgt_groups, ce_clean, None, count=True)

        for label, sae in saes.items():
            x_hat, f = _reconstruct(sae, a)
            accs = recon[label]
            for g, m in rec_groups.items():
                if g not in accs:
                    accs[g] = ReconstructionAccumulator(a.shape[-1], f.shape[-1], mean=means.get(g))
                accs[g].update(a, x_hat, f, mask=m.to(a.device))
            patched = _patched_forward(model, hook, x_ids, attn, _replace_with(x_hat))
            sums.add(conds[label], tgt_groups, *next_token_terms(patched))
            del patched, f

        zero = _patched_forward(model, hook, x_ids, attn, _replace_with(torch.zeros_like(a)))
        sums.add("zero", tgt_groups, *next_token_terms(zero))
        del zero
        if mean_ablation:
            mean_patched = _patched_forward(model, hook, x_ids, attn, _replace_with(means["overall"], True))
            sums.add("mean", tgt_groups, *next_token_terms(mean_patched))
            del mean_patched

    counts = token_counts(segs)
    results: dict[str, SAEResult] = {}
    for label in saes:
        accs = recon[label]
        overall = {**accs["overall"].compute(), **_lm_block(sums, "overall", conds[label], mean_ablation)}
        overall["tokens/reconstruction_counted"] = accs["overall"].n
        seg_results: dict[str, dict[str, float]] = {}
        if per_segment:
            names = [g for g in list(accs) + list(sums.count) if g != "overall"]
            for g in dict.fromkeys(names):
                block: dict[str, float] = {}
                if g in accs:
                    block.update(accs[g].compute())
                    block["tokens/reconstruction_counted"] = accs[g].n
                else:
                    block["tokens/reconstruction_counted"] = 0
                if g in sums.count:
                    block.update(_lm_block(sums, g, conds[label], mean_ablation))
                else:
                    block["tokens/lm_counted"] = 0
                seg_results[g] = block
        results[label] = SAEResult(metrics=overall, segments=seg_results,
                                   log10_feature_density=accs["overall"].log10_feature_density().cpu(),
                                   tokens=dict(counts))
    return results
