"""Stages 3, 5, 6 and 7 of the study: the matrix (every SAE on every held-out set), dictionary overlap, direction
capture and steering. Each stage is a function of the earlier stages' typed results and returns its own; the
``to_json`` of a result is what results.json holds under that stage's key."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..analysis.direction_capture import diff_of_means, direction_capture
from ..analysis.overlap import compare_dictionaries, decoder_drift, domain_specific_latents, top_activating_examples
from ..analysis.steering import latent_direction, random_direction_like, steering_sweep
from ..evaluation import evaluate_saes_on_tokens
from .config import CONTROL, GENERAL, finetuned_name, scratch_name
from .inputs import generation_prompt_ids, mix_tokens, prompt_activations, prompt_sets
from .plan import N_GENERATION_PROMPTS
from .prepare import StudyError, StudyInputs
from .saes import BudgetResults, TrainedSAEs

DRIFT_BINS = 50                 # histogram of decoder cosines to the parent, over [-1, 1]
DOMAIN_LATENT_DENSITY = 1e-3    # a latent "fires on a domain" at this held-out density or more
TOP_LATENTS, TOP_EXAMPLES = 3, 3
ENCODE_CHUNK = 16               # held-out sequences per SAE encode in the top-example search
DIRECTION_KS = range(1, 65)     # k of the top-k least-squares and OMP curves


# ----------------------------------------------------------------------------------------------------------------
# Stage 3: matrix

@dataclass
class MatrixResults:
    """``matrix``: SAE -> eval set -> SPEC 3 metrics and ``segments``; ``eval_sets``: set -> token counts."""

    matrix: dict[str, dict[str, Any]]
    eval_sets: dict[str, dict[str, int]]


def matrix(inp: StudyInputs, trained: TrainedSAEs) -> MatrixResults:
    sets = inp.eval_tokens(inp.cfg.eval_tokens)
    sets = {GENERAL: mix_tokens(list(sets.values())), **sets}
    saes = trained.saes
    out: dict[str, dict[str, Any]] = {name: {} for name in saes}
    counted: dict[str, dict[str, int]] = {}
    n_tok = sum(int(ids.numel()) for ids, _ in sets.values())
    with inp.timer("matrix", f"{len(saes)} SAEs x {len(sets)} held-out sets (CE/KL with model passes)") as rec:
        for ds, (ids, segs) in sets.items():
            res = evaluate_saes_on_tokens(saes, inp.lm, inp.hook, ids, segs, per_segment=True)
            for name, r in res.items():
                out[name][ds] = {**r.metrics, "segments": r.segments}
            first = next(iter(res.values())).metrics
            counted[ds] = {"sequences": int(ids.shape[0]), "tokens": int(ids.numel()),
                           "lm_counted": int(first.get("tokens/lm_counted", 0)),
                           "reconstruction_counted": int(first.get("tokens/reconstruction_counted", 0))}
        rec.tokens = {"full": n_tok * (len(saes) + 2), "truncated": n_tok}
    return MatrixResults(out, counted)


# ----------------------------------------------------------------------------------------------------------------
# Stage 5: overlap

@dataclass
class OverlapResults:
    """``pairs``: "A vs B" -> compare_dictionaries; ``drift``: fine-tuned SAE -> decoder cosine to its parent;
    ``domain_specific``: domain -> general-SAE latents that fire only there, with top examples."""

    threshold: float
    pairs: dict[str, Any] = field(default_factory=dict)
    drift: dict[str, Any] = field(default_factory=dict)
    domain_specific: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def overlap_pairs(domains: list[str]) -> list[tuple[str, str]]:
    """(general, control), (general, each scratch), (scratch, scratch), (general, each fine-tuned)."""
    pairs = [(GENERAL, CONTROL)] + [(GENERAL, scratch_name(d)) for d in domains]
    pairs += [(scratch_name(a), scratch_name(b)) for i, a in enumerate(domains) for b in domains[i + 1:]]
    return pairs + [(GENERAL, finetuned_name(d)) for d in domains]


def drift_summary(parent_dec: torch.Tensor, child_dec: torch.Tensor) -> dict[str, Any]:
    """Cosine of each latent's decoder vector to its value in the parent: mean, median, fractions, histogram."""
    drift = decoder_drift(parent_dec, child_dec).double()
    counts = torch.histc(drift.clamp(-1, 1), bins=DRIFT_BINS, min=-1, max=1)
    return {"mean": float(drift.mean()), "median": float(drift.median()),
            "frac_below_0.9": float((drift < 0.9).double().mean()),
            "frac_below_0.5": float((drift < 0.5).double().mean()),
            "hist_counts": [int(v) for v in counts], "hist_edges": torch.linspace(-1, 1, DRIFT_BINS + 1).tolist()}


def _domain_specific(inp: StudyInputs, gen: Any, dens: dict[str, torch.Tensor], d: str) -> dict[str, Any]:
    """Latents of the general SAE alive on ``d`` and dead on every other domain, with their top examples."""
    others = torch.stack([dens[o] for o in inp.domains if o != d]).amax(0)
    spec = domain_specific_latents(dens[d], others, alive_threshold=DOMAIN_LATENT_DENSITY, dead_threshold=0.0)
    h = inp.heldout_acts[d]
    top = [int(v) for v in spec.a_only[:TOP_LATENTS]]
    examples = []
    if top:
        with torch.no_grad():
            f = torch.cat([gen.encode(h.acts[i:i + ENCODE_CHUNK])[..., top]
                           for i in range(0, len(h.acts), ENCODE_CHUNK)])
        for j, i in enumerate(top):
            ex = top_activating_examples(f[..., j], h.ids, k=TOP_EXAMPLES, mask=h.mask, tokenizer=inp.lm.tokenizer)
            examples.append({"latent": i, "density": float(dens[d][i]),
                             "examples": [{k: e[k] for k in ("value", "prefix", "token", "suffix") if k in e}
                                          for e in ex]})
    return {"count": int(len(spec.a_only)), "top": examples}


def overlap(inp: StudyInputs, trained: TrainedSAEs, budgets: BudgetResults) -> OverlapResults:
    saes = trained.saes
    pairs = overlap_pairs(inp.domains)
    out = OverlapResults(inp.cfg.match_threshold)
    with inp.timer("overlap", f"{len(pairs)} pairs: decoder max-cosine, Hungarian matching; drift; "
                              f"domain-specific latents"):
        for a, b in pairs:
            out.pairs[f"{a} vs {b}"] = {"a": a, "b": b, **compare_dictionaries(saes[a], saes[b], out.threshold)}
        for d in inp.domains:
            out.drift[finetuned_name(d)] = drift_summary(saes[GENERAL].W_dec.detach(),
                                                         saes[finetuned_name(d)].W_dec.detach())
        for d in inp.domains:
            out.domain_specific[d] = _domain_specific(inp, saes[GENERAL], budgets.densities[GENERAL], d)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Stage 6: directions

@dataclass
class DirectionResults:
    """The difference-of-means analysis: prompt sets A and B, their mean activations, and per SAE the capture
    curves of :func:`domain_sae.analysis.direction_capture.direction_capture`."""

    labels: list[str]
    prompts: tuple[list[str], list[str]]
    acts_a: torch.Tensor = field(repr=False)
    acts_b: torch.Tensor = field(repr=False)
    per_sae: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        a, b = self.prompts
        return {"labels": list(self.labels), "n_prompts": [len(a), len(b)], "example_prompts": [a[:3], b[:3]],
                "per_sae": self.per_sae}


def directions(inp: StudyInputs, trained: TrainedSAEs) -> DirectionResults:
    cfg = inp.cfg
    a_label, b_label = cfg.prompt_labels
    with inp.timer("directions", f"difference of means: {cfg.n_prompts} {a_label} vs {cfg.n_prompts} {b_label}"):
        a, b = prompt_sets(cfg)
        if len(a) < 2 or len(b) < 2:
            raise StudyError(f"The prompt sets hold {len(a)} and {len(b)} prompts; each needs at least 2 (set "
                             f"prompts_a / prompts_b to files with one prompt per line).")
        res = DirectionResults([a_label, b_label], (a, b), prompt_activations(inp.lm, inp.hook, a),
                               prompt_activations(inp.lm, inp.hook, b))
        res.per_sae = {name: direction_capture(sae, res.acts_a, res.acts_b, DIRECTION_KS)
                       for name, sae in trained.saes.items()}
    return res


# ----------------------------------------------------------------------------------------------------------------
# Stage 7: steering

@dataclass
class SteeringResults:
    """Steering along the chosen domain latents, the difference of means and a random direction: CE change per
    domain when added (``add``) or projected out (``ablate``), greedy generations on ``prompts``."""

    domain: str
    chosen: dict[str, Any]
    directions: list[str]
    mean_activation_norm: float
    relative_strengths: list[float]
    add: dict[str, Any]
    ablate: dict[str, Any]
    prompts: list[str]
    tokens: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _steering_latent(inp: StudyInputs, budgets: BudgetResults, name: str, sae: Any) -> dict[str, Any]:
    """The latent of ``sae`` firing most more on held-out steer_domain than on the other domains (difference of
    mean activations)."""
    d = inp.cfg.steer_domain
    others = [o for o in inp.domains if o != d]
    with torch.no_grad():
        mean_f = {s: sae.encode(inp.heldout_acts[s].flat).double().mean(0) for s in inp.domains}
    score = mean_f[d] - torch.stack([mean_f[o] for o in others]).mean(0)
    latent = int(score.argmax())
    return {"latent": latent, "mean_activation_difference": float(score[latent]),
            "density": {s: float(budgets.densities[name][s][latent]) for s in inp.domains}}


def steering_directions(inp: StudyInputs, trained: TrainedSAEs, budgets: BudgetResults,
                        dirs: DirectionResults) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Named directions to steer along (domain latents of the scratch and fine-tuned SAEs, the difference of means,
    a random direction of its norm) and the chosen latents."""
    cfg = inp.cfg
    out: dict[str, torch.Tensor] = {}
    chosen = {}
    for name in (scratch_name(cfg.steer_domain), finetuned_name(cfg.steer_domain)):
        chosen[name] = _steering_latent(inp, budgets, name, trained.saes[name])
        latent = chosen[name]["latent"]
        out[f"{name} latent {latent}"] = latent_direction(trained.saes[name], latent).float()
    dom = diff_of_means(dirs.acts_a, dirs.acts_b).float()
    out[f"diff-of-means ({cfg.prompt_labels[0]} − {cfg.prompt_labels[1]})"] = dom
    out["random"] = random_direction_like(dom, torch.Generator().manual_seed(cfg.seed))
    return out, chosen


def steering(inp: StudyInputs, trained: TrainedSAEs, budgets: BudgetResults, dirs: DirectionResults
             ) -> SteeringResults:
    cfg = inp.cfg
    directions_, chosen = steering_directions(inp, trained, budgets, dirs)
    norm = float(inp.heldout_acts[GENERAL].flat.norm(dim=-1).mean())
    strengths = [s * norm for s in cfg.steering_strengths]
    held = inp.eval_tokens(cfg.steering_tokens)
    texts = list(cfg.generation_prompts) or dirs.prompts[1][:N_GENERATION_PROMPTS]
    prompts = [generation_prompt_ids(inp.lm, p) for p in texts]
    gen_tokens = max(0, cfg.generate_tokens)
    n_tok = sum(int(i.numel()) for i, _ in held.values())
    with inp.timer("steering", f"{len(directions_)} directions x {len(strengths)} strengths, CE change on "
                               f"{', '.join(held)}") as rec:
        add = steering_sweep(inp.lm, inp.hook, directions_, strengths, held, mode="add", unit_norm=True,
                             prompts=prompts if gen_tokens else (), max_new_tokens=gen_tokens)
        ablate = steering_sweep(inp.lm, inp.hook, {k: v for k, v in directions_.items() if k != "random"},
                                [1.0], held, mode="ablate")
        rec.tokens = {"full": n_tok * (1 + len(directions_) * len(strengths) + len(directions_) - 1),
                      "generated": len(prompts) * (1 + len(directions_) * len(strengths)) * gen_tokens}
    return SteeringResults(cfg.steer_domain, chosen, list(directions_), norm, list(cfg.steering_strengths), add,
                           ablate, texts, {o: int(held[o][0].numel()) for o in held})
