"""Language-model metrics of SAEs spliced into the model, on held-out token batches (SPEC section 3).

Inputs: ``input_ids`` and ``segments`` of shape [N, T] (segment codes of ``domain_sae.data.segments``) and
optionally ``doc_ids`` [N, T] (the document of each token, -1 for inserted BOS/padding; default: each sequence is
its own document). Sequences are processed in mini-batches of ``batch_size``; PAD positions are masked out of
attention. For every mini-batch:

1. clean pass: logits and the hook's activation ``a`` [B, T, d_in] in one forward;
2. for each SAE: ``x̂ = decode(encode(a))``, then a full forward in which the hook's output is ``x̂`` at the splice
   positions and ``a`` elsewhere (:func:`.positions.splice_positions`: by default the SAE's training mask, i.e.
   not PAD and, with ``exclude_special``, not SPECIAL; ``splice_all_positions=True``: every position, as SAELens);
3. zero ablation: the hook's output set to zero at the same splice positions;
4. optional mean ablation (a second baseline, labelled ``mean_ablation``): the hook's output set at the splice
   positions to x̄, the mean activation over all reconstruction positions (neither PAD nor SPECIAL) of the
   evaluation, computed by a capture-only pre-pass.

Counted positions and groups: :mod:`.positions` (next-token position t counts iff segments[t] != PAD and
segments[t+1] not in {PAD, SPECIAL}, in the segment of its target; the headline ``overall`` group counts content
tokens only: text, user, assistant, system). With p = softmax(clean logits[t]), q = softmax(patched logits[t])
(:mod:`.next_token`: float32 elementwise, float64 sums and logs), over the M counted positions of a group:

- CE = -(1/M) Σ_t log q(token[t+1]) in nats (``ce_loss_without_sae`` uses p);
- KL = (1/M) Σ_t Σ_v p(v) (log p(v) - log q(v));
- ``ce_loss_score`` = (CE_abl - CE_sae) / (CE_abl - CE_clean); ``delta_loss`` = CE_sae - CE_clean;
  ``kl_div_score`` = (KL_abl - KL_sae) / KL_abl (NaN when a denominator is 0); the mean-ablation variants use
  CE_mean / KL_mean in place of CE_abl / KL_abl.

Reconstruction metrics (:mod:`.metrics`) use the activations of the clean pass at the reconstruction positions of
each group; the pre-pass gives each group's exact mean (two-pass per-token EV without keeping activations).
Error bars (``n_bootstrap`` > 0): a bootstrap over documents of every metric, :mod:`.uncertainty`.

All sums are float64, everything runs under ``torch.no_grad`` and is deterministic (no sampling; fixed order).
The clean pass and the ablations are shared by all SAEs evaluated together (one hook, one splice mask).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable, Mapping, NamedTuple, Optional

import torch
from torch import Tensor

from ..data.segments import PAD
from ..models.hooks import as_hook, capture, forward_with_capture, forward_with_patch
from ..models.load import as_module
from .metrics import MetricError, ReconstructionAccumulator
from .next_token import CleanLogits
from .patching import reconstruct, replace_at
from .positions import (ALL_TOKENS, OVERALL, groups, has_template, lm_positions, reconstruction_positions,
                        splice_positions, token_counts)
from .uncertainty import (MAX_FIRE_TABLE, DocumentSums, SumKey, bootstrap_weights, error_bars,
                          reconstruction_from_totals, reconstruction_token_stats)

__all__ = ["SAEResult", "Condition", "CLEAN", "ZERO", "MEAN", "evaluate_saes_on_tokens", "lm_from_totals",
           "splice_description", "group_means", "ReconstructionSums", "results_of", "clusters"]


class Condition(NamedTuple):
    """What ran at the hook for a CE / KL sum: ``kind`` ``clean`` (nothing spliced), ``sae`` (the reconstruction of
    the SAE labelled ``sae``), ``zero`` or ``mean`` (the ablations)."""

    kind: str
    sae: str = ""


CLEAN, ZERO, MEAN = Condition("clean"), Condition("zero"), Condition("mean")


def splice_description(all_positions: bool, exclude_special: bool = True) -> str:
    """How the SAE was spliced, as eval.json records it and eval.md prints it beside the CE numbers."""
    if all_positions:
        return "all_positions"
    return "training_mask" + ("" if exclude_special else "_with_special")


@dataclass
class SAEResult:
    """Evaluation of one SAE on one token set: ``metrics`` (flat, SPEC names, headline = content tokens),
    ``segments`` (the same keys per segment name, plus ``all_tokens``), ``errors`` ({group: {metric: {"se",
    "ci95_low", "ci95_high"}}}, empty without bootstrap), ``log10_feature_density`` (float64 [d_sae]),
    ``tokens`` (counts), ``splice`` (see :func:`splice_description`) and ``documents``: this SAE's per-document
    sums of the headline group, ``{"doc_ids": [D], "sae": its Condition, "lm": {SumKey: [D]}, "rec": {SumKey:
    [D, ...]}}`` (rows in ``doc_ids`` order, no fire table; the input of paired statistics,
    ``analysis.docstats.DocStats.from_result``)."""

    metrics: dict[str, float]
    segments: dict[str, dict[str, float]] = field(default_factory=dict)
    log10_feature_density: Optional[Tensor] = None
    tokens: dict[str, int] = field(default_factory=dict)
    errors: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    splice: str = "training_mask"
    documents: dict = field(default_factory=dict)


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    ok = (den != 0) & torch.isfinite(den)
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.full_like(num, float("nan")))


def lm_from_totals(t: Mapping[Hashable, Tensor], g: str, sae_cond: Condition, mean_ablation: bool
                   ) -> dict[str, Tensor]:
    """CE/KL metrics of group ``g`` from the totals ``SumKey(g, "n")``, ``SumKey(g, "ce", condition)`` and
    ``SumKey(g, "kl", condition)`` (module docstring formulas; leading dims of the totals, e.g. [B] bootstrap
    replicates, are kept)."""
    n = t[SumKey(g, "n")]

    def mean(stat: str, cond: Condition) -> Tensor:
        return _ratio(t[SumKey(g, stat, cond)], n)

    ce_clean, ce_sae, ce_abl = mean("ce", CLEAN), mean("ce", sae_cond), mean("ce", ZERO)
    kl_sae, kl_abl = mean("kl", sae_cond), mean("kl", ZERO)
    out = {"metrics/ce_loss_without_sae": ce_clean, "metrics/ce_loss_with_sae": ce_sae,
           "metrics/ce_loss_with_ablation": ce_abl, "metrics/ce_loss_score": _ratio(ce_abl - ce_sae, ce_abl - ce_clean),
           "metrics/delta_loss": ce_sae - ce_clean, "metrics/kl_div_with_sae": kl_sae,
           "metrics/kl_div_with_ablation": kl_abl, "metrics/kl_div_score": _ratio(kl_abl - kl_sae, kl_abl)}
    if mean_ablation:
        ce_mean, kl_mean = mean("ce", MEAN), mean("kl", MEAN)
        out.update({"metrics/ce_loss_with_mean_ablation": ce_mean, "metrics/kl_div_with_mean_ablation": kl_mean,
                    "metrics/ce_loss_score_mean_ablation": _ratio(ce_mean - ce_sae, ce_mean - ce_clean),
                    "metrics/kl_div_score_mean_ablation": _ratio(kl_mean - kl_sae, kl_mean)})
    return out


def _validate(input_ids: Tensor, segments: Tensor, doc_ids: Optional[Tensor], *, n_saes: int,
              batch_size: int) -> tuple[Tensor, Tensor, Tensor]:
    if not n_saes:
        raise MetricError("No SAE to evaluate.")
    if batch_size <= 0:
        raise MetricError(f"batch_size must be positive (got {batch_size}).")
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    segs = torch.as_tensor(segments).to(torch.int64)
    if ids.ndim == 1:
        ids, segs = ids[None], segs[None]
        doc_ids = None if doc_ids is None else torch.as_tensor(doc_ids)[None]
    if ids.ndim != 2 or ids.shape != segs.shape:
        raise MetricError(f"input_ids {tuple(ids.shape)} and segments {tuple(segs.shape)} must both be [N, T].")
    if ids.shape[1] < 2:
        raise MetricError("Sequences need at least 2 tokens to have a next-token target; raise context_size.")
    if not bool(lm_positions(segs).any()):
        raise MetricError("No next-token target can be counted: every target is PAD or SPECIAL. Evaluate on data "
                          "with ordinary text tokens (check the held-out split is not empty).")
    if doc_ids is None:
        docs = torch.arange(ids.shape[0])[:, None].expand(ids.shape).clone()
    else:
        docs = torch.as_tensor(doc_ids, dtype=torch.long)
        if docs.shape != ids.shape:
            raise MetricError(f"doc_ids {tuple(docs.shape)} must have the shape of input_ids {tuple(ids.shape)}.")
    return ids, segs, docs


def clusters(docs: Tensor) -> tuple[Tensor, int]:
    """Cluster index per token in [0, D) for document ids >= 0, D for -1 (inserted BOS/padding, never counted)."""
    valid = docs >= 0
    uniq = torch.unique(docs[valid])
    idx = torch.full_like(docs, len(uniq))
    idx[valid] = torch.searchsorted(uniq, docs[valid])
    return idx, len(uniq)


def group_means(batches) -> dict[str, Tensor]:
    """Exact float64 mean activation per group (all groups of :func:`.positions.groups`) over ``batches``, an
    iterable of ``(a [B, T, d], segments [B, T])``."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    for a, s in batches:
        for g, m in groups(s, reconstruction_positions(s), True, with_all=True).items():
            xs = a[m.to(a.device)].to(torch.float64)
            sums[g] = sums.get(g, 0) + xs.sum(0)
            counts[g] = counts.get(g, 0) + xs.shape[0]
    return {g: sums[g] / counts[g] for g in sums if counts[g] > 0}


@torch.no_grad()
def _group_means(model, hook, ids: Tensor, segs: Tensor, batch_size: int, device) -> dict[str, Tensor]:
    """:func:`group_means` of the hook's activations, capture-only pre-pass."""
    def batches():
        for i in range(0, ids.shape[0], batch_size):
            s = segs[i:i + batch_size]
            valid = s != PAD
            attn = None if bool(valid.all()) else valid.long().to(device)
            yield capture(model, hook, ids[i:i + batch_size].to(device), attention_mask=attn), s
    return group_means(batches())


class ReconstructionSums:
    """The reconstruction metrics of one SAE over batches: a float64 :class:`.metrics.ReconstructionAccumulator`
    per group (point values) and per-document sums of :func:`.uncertainty.reconstruction_token_stats` (bootstrap)."""

    def __init__(self, means: Mapping[str, Tensor], n_docs: int):
        self.means, self.n_docs = means, int(n_docs)
        self.accs: dict[str, ReconstructionAccumulator] = {}
        self.docs = DocumentSums(self.n_docs + 1)

    def add(self, sae: Any, a: Tensor, rec_groups: Mapping[str, Tensor], cluster: Tensor) -> Tensor:
        """Add batch ``a`` [B, T, d] (groups: boolean [B, T] masks; cluster: document index per token); returns
        x̂ (for splicing)."""
        x_hat, f = reconstruct(sae, a)
        for g, m in rec_groups.items():
            if g not in self.accs:
                self.accs[g] = ReconstructionAccumulator(a.shape[-1], f.shape[-1], mean=self.means.get(g))
            md = m.to(a.device)
            self.accs[g].update(a, x_hat, f, mask=md)
            fires = g == OVERALL and self.n_docs * f.shape[-1] <= MAX_FIRE_TABLE
            for k, v in reconstruction_token_stats(a[md], x_hat[md], f[md], self.means[g], fires).items():
                self.docs.add(SumKey(g, k), v, cluster[m])
        return x_hat


@torch.no_grad()
def evaluate_saes_on_tokens(saes: Mapping[str, Any], lm: Any, hook: Any, input_ids: Tensor, segments: Tensor, *,
                            batch_size: int = 8, mean_ablation: bool = False, per_segment: bool = True,
                            doc_ids: Optional[Tensor] = None, exclude_special: bool = True,
                            splice_all_positions: bool = False, n_bootstrap: int = 0,
                            bootstrap_seed: int = 0) -> dict[str, SAEResult]:
    """Evaluate every SAE of ``saes`` (label -> SAE with ``encode``/``decode``/``W_dec``) at ``hook`` of ``lm`` (a
    ``LoadedModel`` or a torch module) on ``input_ids``/``segments`` [N, T]; returns label -> :class:`SAEResult`.

    Definitions: module docstring. ``exclude_special``: the SAEs' training mask (their ``exclude_special_tokens``);
    ``n_bootstrap`` replicates over documents (``doc_ids``) give the error bars. Results do not depend on
    ``batch_size`` beyond floating-point rounding of the model itself.
    """
    ids, segs, docs = _validate(input_ids, segments, doc_ids, n_saes=len(saes), batch_size=batch_size)
    cluster, n_docs = clusters(docs)
    model = as_module(lm)
    hook = as_hook(model, hook)
    device = next(model.parameters()).device
    means = _group_means(model, hook, ids, segs, batch_size, device)
    if OVERALL not in means:
        raise MetricError("No content token (text, user, assistant or system) to evaluate on: the tokens are all "
                          "special or chat-template text. Evaluate on data with ordinary content.")
    recon = {label: ReconstructionSums(means, n_docs) for label in saes}
    lm_sums = DocumentSums(n_docs + 1)
    conds = {label: Condition("sae", label) for label in saes}
    with_all = per_segment and has_template(segs)

    for i in range(0, ids.shape[0], batch_size):
        x_ids, s, c = ids[i:i + batch_size].to(device), segs[i:i + batch_size], cluster[i:i + batch_size]
        valid = s != PAD
        attn = None if bool(valid.all()) else valid.long().to(device)
        where = splice_positions(s, exclude_special, splice_all_positions)
        clean_logits, a = forward_with_capture(model, hook, x_ids, attention_mask=attn)
        counted = lm_positions(s)
        rows = tuple(r.to(clean_logits.device) for r in counted.nonzero(as_tuple=True))
        targets = x_ids[:, 1:][counted.to(device)].to(clean_logits.device)
        tgt_doc = c[:, 1:][counted]
        tgt_groups = {g: m[counted] for g, m in groups(s[:, 1:], counted, per_segment, with_all).items()}
        rec_groups = groups(s, reconstruction_positions(s), per_segment, with_all)

        def add_terms(cond: Condition, ce: Tensor, kl: Optional[Tensor]) -> None:
            for g, m in tgt_groups.items():
                lm_sums.add(SumKey(g, "ce", cond), ce.cpu()[m], tgt_doc[m])
                if kl is not None:
                    lm_sums.add(SumKey(g, "kl", cond), kl.cpu()[m], tgt_doc[m])

        def patched(value: Tensor) -> Tensor:
            return forward_with_patch(model, hook, x_ids, replace_at(value, where), attention_mask=attn)

        for g, m in tgt_groups.items():
            lm_sums.add(SumKey(g, "n"), torch.ones(int(m.sum())), tgt_doc[m])
        clean = CleanLogits(clean_logits, rows, targets)
        add_terms(CLEAN, *clean.terms(None))
        for label, sae in saes.items():
            x_hat = recon[label].add(sae, a, rec_groups, c)
            add_terms(conds[label], *clean.terms(patched(x_hat)))
        add_terms(ZERO, *clean.terms(patched(torch.zeros_like(a))))
        if mean_ablation:
            add_terms(MEAN, *clean.terms(patched(means[ALL_TOKENS])))

    extra = (token_counts(segs), splice_description(splice_all_positions, exclude_special))
    return results_of(recon, lm_sums, conds, mean_ablation, n_docs, n_bootstrap, bootstrap_seed, *extra,
                      doc_ids=torch.unique(docs[docs >= 0]))


def results_of(recon: Mapping[str, ReconstructionSums], lm_sums: DocumentSums, conds: Mapping[str, Condition],
               mean_ablation: bool, n_docs: int, n_bootstrap: int, bootstrap_seed: int, counts: dict,
               splice: str, doc_ids: Optional[Tensor] = None) -> dict[str, SAEResult]:
    """label -> :class:`SAEResult` from the sums of the pass (``lm_sums`` empty: reconstruction metrics only);
    with ``doc_ids`` (the sorted ids of the clusters) each result carries its per-document sums."""
    weights = None
    if n_bootstrap > 0:  # the extra zero column is the cluster of inserted BOS / padding (never counted)
        weights = torch.cat([bootstrap_weights(n_docs, n_bootstrap, bootstrap_seed),
                             torch.zeros(n_bootstrap, 1, dtype=torch.float64)], 1)
    lm_reps = lm_sums.totals(weights) if weights is not None else None
    out = {label: _result(r.accs, r.docs, lm_sums, lm_reps, weights, conds[label], mean_ablation, counts, splice)
           for label, r in recon.items()}
    if doc_ids is not None:
        d, keep = len(doc_ids), (None, CLEAN, ZERO, MEAN)
        for label, res in out.items():
            res.documents = {"doc_ids": doc_ids, "sae": conds[label],
                             "lm": {k: v[:d] for k, v in lm_sums.sums.items()
                                    if k.group == OVERALL and k.condition in keep + (conds[label],)},
                             "rec": {k: v[:d] for k, v in recon[label].docs.sums.items()
                                     if k.group == OVERALL and k.stat != "fires"}}
    return out


def _result(accs, rec_sums: DocumentSums, lm_sums: DocumentSums, lm_reps, weights, cond: Condition,
            mean_ablation: bool, counts: dict, splice: str) -> SAEResult:
    """One SAE's :class:`SAEResult`: point values per group, then the bootstrap error bars per group."""
    lm_point = lm_sums.totals()
    names = list(dict.fromkeys(list(accs) + [k.group for k in lm_point if k.stat == "n"]))
    rec_reps = rec_sums.totals(weights) if weights is not None else None
    blocks: dict[str, dict[str, float]] = {}
    errors: dict[str, dict[str, dict[str, float]]] = {}
    for g in names:
        block: dict[str, float] = {}
        if g in accs:
            block.update(accs[g].compute())
        block["tokens/reconstruction_counted"] = accs[g].n if g in accs else 0
        n_key = SumKey(g, "n")
        if n_key in lm_point:
            block.update({k: float(v) for k, v in lm_from_totals(lm_point, g, cond, mean_ablation).items()})
            per_doc = lm_sums.sums[n_key]
            block["tokens/lm_counted"] = int(lm_point[n_key])
            block["tokens/documents"] = int((per_doc > 0).sum())
        else:
            block["tokens/lm_counted"] = 0
        blocks[g] = block
        if weights is not None:
            reps: dict[str, Tensor] = {}
            if g in accs:
                reps.update(reconstruction_from_totals(rec_reps, g))
            if n_key in lm_point:
                reps.update(lm_from_totals(lm_reps, g, cond, mean_ablation))
            errors[g] = error_bars(reps)
    overall = blocks.pop(OVERALL)
    return SAEResult(metrics=overall, segments=blocks if len(blocks) else {},
                     log10_feature_density=accs[OVERALL].log10_feature_density().cpu(), tokens=dict(counts),
                     errors=errors, splice=splice)
