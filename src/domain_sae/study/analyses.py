"""The analyses the config turns on (``analyses``), each a function of one hook's trained and measured runs
(:class:`HookContext`) returning a JSON-ready dict. They read the main runs (:func:`.runs.main_runs`: first seed,
middle of the sparsity ladder, the headline budget):

- ``matrix``: every main SAE on every held-out set, all model-pass metrics and per segment (from the measurements);
- ``overlap``: decoder max-cosine both ways and Hungarian matching for the seed controls, general vs scratch and vs
  its fine-tune, scratch vs scratch; per-latent drift (cosine to the parent's decoder vector); latents of the
  general SAE that fire on one domain only, with their top examples;
- ``probing``: k-sparse probes on the labels a domain's data gives (:func:`.inputs.StudyInputs.probes`);
- ``directions``: capture of the difference-of-means direction between two prompt sets (top-k LS, OMP);
- ``steering``: the steering domain's latent of its scratch and fine-tuned SAEs, the difference of means and a
  random direction added (and projected out) at the hook: CE change per domain, greedy generations;
- ``features``: a feature store of the main SAEs (``dsae dashboard``);
- ``convergence``: is every reference SAE trained? Each general and scratch SAE's held-out EV against tokens with
  its final slope per doubling and stop (with ``train_to_plateau``), and the seed-to-seed dictionary overlap at the
  end (:func:`domain_sae.analysis.convergence.seed_overlap`, every pair of seeds of the general SAE and of each
  domain's scratch SAE, at the middle sparsity) beside the 30-53% of converged SAEs (Paulo & Belrose 2025).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..analysis.convergence import seed_overlap
from ..analysis.direction_capture import diff_of_means, direction_capture
from ..analysis.matched import most_rotated
from ..analysis.overlap import compare_dictionaries, decoder_drift, domain_specific_latents, top_activating_examples
from ..analysis.probing import CHAT_ROLES, PY_TOKEN_TYPES, probe_all
from ..analysis.steering import latent_direction, random_direction_like, steering_sweep
from ..evaluation import HeldoutData, SAESet
from ..features import build_feature_store
from ..models.hooks import resolve_hook
from .config import GENERAL, StudyConfig
from .inputs import StudyInputs, generation_prompt_ids, prompt_activations
from .measure import Measurements
from .runs import Run, SAEStore

DRIFT_BINS = 50                 # histogram of decoder cosines to the parent, over [-1, 1]
DOMAIN_LATENT_DENSITY = 1e-3    # a latent "fires on a domain" at this held-out density or more
TOP_LATENTS, TOP_EXAMPLES = 3, 3
ENCODE_CHUNK = 16               # held-out sequences per SAE encode in the top-example search
DIRECTION_KS = range(1, 65)     # k of the top-k least-squares and OMP curves
N_GENERATION_PROMPTS = 2        # steered generations when generation_prompts is empty: the first prompts of set B


@dataclass
class HookContext:
    """One hook's study: config, model, inputs, SAE store, measurements and the main runs by label."""

    cfg: StudyConfig
    hook: str
    out: Path
    lm: Any
    inputs: StudyInputs
    store: SAEStore
    meas: Measurements
    main: dict[str, Run]
    log: Callable[[str], None] = print
    memo: dict = field(default_factory=dict)

    @property
    def point(self):
        return resolve_hook(self.lm.model, self.hook)

    def sae(self, label: str) -> Any:
        return self.store.measured(self.main[label])

    def ft(self, d: str) -> str:
        return f"{GENERAL}→{d}"

    def prompt_acts(self) -> tuple[list[str], list[str], torch.Tensor, torch.Tensor]:
        if "prompts" not in self.memo:
            a, b = self.inputs.prompts()
            self.memo["prompts"] = (a, b, prompt_activations(self.lm, self.point, a),
                                    prompt_activations(self.lm, self.point, b))
        return self.memo["prompts"]

    @torch.no_grad()
    def density(self, label: str, d: str) -> torch.Tensor:
        """Per-latent firing density of a main SAE on domain ``d``'s reconstruction set."""
        return (self.sae(label).encode(self.inputs.hook_data(self.hook).held[d].flat) > 0).double().mean(0)


def matrix(ctx: HookContext) -> dict:
    out = {}
    for label, run in ctx.main.items():
        rec = ctx.meas.get(run)
        out[label] = {s: {**v["metrics"], "se": v["se"], "segments": v["segments"]} for s, v in rec["lm"].items()}
    return out


def drift_summary(parent: Any, child: Any, alive: torch.Tensor) -> dict[str, Any]:
    """Cosine of each latent's decoder vector to its value in the parent: mean, median, quantiles, fractions below
    0.9 and 0.5, histogram, the most rotated alive latents."""
    cos = decoder_drift(parent.W_dec.detach(), child.W_dec.detach()).double()
    counts = torch.histc(cos.clamp(-1, 1), bins=DRIFT_BINS, min=-1, max=1)
    return {"mean": float(cos.mean()), "median": float(cos.median()),
            "quantiles": {str(q): float(torch.quantile(cos, q)) for q in (0.01, 0.1, 0.5)},
            "frac_below_0.9": float((cos < 0.9).double().mean()), "frac_below_0.5": float((cos < 0.5).double().mean()),
            "hist_counts": [int(v) for v in counts], "hist_edges": torch.linspace(-1, 1, DRIFT_BINS + 1).tolist(),
            "most_rotated": most_rotated(cos, 10, alive=alive > 0)}


def _domain_specific(ctx: HookContext, d: str) -> dict[str, Any]:
    """Latents of the general SAE alive on ``d`` and dead on every other domain, with their top examples."""
    dens = {o: ctx.density(GENERAL, o) for o in ctx.cfg.domains}
    others = torch.stack([dens[o] for o in dens if o != d]).amax(0)
    spec = domain_specific_latents(dens[d], others, alive_threshold=DOMAIN_LATENT_DENSITY, dead_threshold=0.0)
    h, gen = ctx.inputs.hook_data(ctx.hook).held[d], ctx.sae(GENERAL)
    top, examples = [int(v) for v in spec.a_only[:TOP_LATENTS]], []
    if top:
        with torch.no_grad():
            f = torch.cat([gen.encode(h.acts[i:i + ENCODE_CHUNK])[..., top]
                           for i in range(0, len(h.acts), ENCODE_CHUNK)])
        for j, i in enumerate(top):
            ex = top_activating_examples(f[..., j], h.ids, k=TOP_EXAMPLES, mask=h.mask, tokenizer=ctx.lm.tokenizer)
            examples.append({"latent": i, "density": float(dens[d][i]),
                             "examples": [{k: e[k] for k in ("value", "prefix", "token", "suffix") if k in e}
                                          for e in ex]})
    return {"count": int(len(spec.a_only)), "top": examples}


def overlap(ctx: HookContext) -> dict:
    cfg, thr, doms = ctx.cfg, ctx.cfg.match_threshold, list(ctx.cfg.domains)
    other = f"{GENERAL} (seed {cfg.other_seed})"
    pairs = [(GENERAL, other)] if other in ctx.main else []
    pairs += [(GENERAL, f"{d} scratch") for d in doms]
    pairs += [(f"{a} scratch", f"{b} scratch") for i, a in enumerate(doms) for b in doms[i + 1:]]
    pairs += [(GENERAL, ctx.ft(d)) for d in doms if ctx.ft(d) in ctx.main]
    out: dict = {"threshold": thr, "pairs": {}, "drift": {}, "domain_specific": {}}
    for a, b in pairs:
        out["pairs"][f"{a} vs {b}"] = {"a": a, "b": b, **compare_dictionaries(ctx.sae(a), ctx.sae(b), thr)}
    if len(cfg.seeds) > 1:  # the scratch SAEs' own seed control
        for d in doms:
            s2 = ctx.store.get(Run("scratch", d, cfg.seeds[1], cfg.middle_sparsity))
            out["pairs"][f"{d} scratch vs seed {cfg.seeds[1]}"] = {
                "a": f"{d} scratch", "b": f"{d} scratch (seed {cfg.seeds[1]})",
                **compare_dictionaries(ctx.sae(f"{d} scratch"), s2, thr)}
    for d in doms:
        if ctx.ft(d) in ctx.main:
            out["drift"][ctx.ft(d)] = drift_summary(ctx.sae(GENERAL), ctx.sae(ctx.ft(d)), ctx.density(ctx.ft(d), d))
        if len(doms) > 1:
            out["domain_specific"][d] = _domain_specific(ctx, d)
    return out


def probing(ctx: HookContext) -> dict:
    out = {}
    for d, data in ctx.inputs.probes(ctx.hook).items():
        encoders = {label: ctx.sae(label).encode for label in (GENERAL, f"{d} scratch", ctx.ft(d)) if label in ctx.main}
        names, one_vs_rest = (PY_TOKEN_TYPES, True) if data["kind"] == "code" else (CHAT_ROLES, False)
        with torch.no_grad():
            out[d] = {"labels": data["kind"], **probe_all(data["acts"], data["labels"], names, encoders,
                                                          one_vs_rest=one_vs_rest, ks=ctx.cfg.probe_ks,
                                                          seed=ctx.cfg.seeds[0])}
    return out


def directions(ctx: HookContext) -> dict:
    a, b, acts_a, acts_b = ctx.prompt_acts()
    return {"labels": list(ctx.cfg.prompt_labels), "n_prompts": [len(a), len(b)], "example_prompts": [a[:3], b[:3]],
            "per_sae": {label: direction_capture(ctx.sae(label), acts_a, acts_b, DIRECTION_KS) for label in ctx.main}}


@torch.no_grad()
def _steering_latent(ctx: HookContext, label: str) -> dict[str, Any]:
    """The latent of a main SAE firing most more on held-out steer_domain than on the other domains."""
    d, sae, held = ctx.cfg.steer, ctx.sae(label), ctx.inputs.hook_data(ctx.hook).held
    mean_f = {s: sae.encode(held[s].flat).double().mean(0) for s in ctx.cfg.domains}
    score = mean_f[d] - torch.stack([mean_f[o] for o in ctx.cfg.domains if o != d]).mean(0)
    latent = int(score.argmax())
    return {"latent": latent, "mean_activation_difference": float(score[latent]),
            "density": {s: float(ctx.density(label, s)[latent]) for s in ctx.cfg.domains}}


def steering(ctx: HookContext) -> dict:
    cfg, d = ctx.cfg, ctx.cfg.steer
    if len(cfg.domains) < 2:
        return {"unavailable": "steering compares the steering domain with the others; there is one domain"}
    dirs, chosen = {}, {}
    for label in (f"{d} scratch", ctx.ft(d)):
        if label in ctx.main:
            chosen[label] = _steering_latent(ctx, label)
            dirs[f"{label} latent {chosen[label]['latent']}"] = latent_direction(ctx.sae(label),
                                                                                 chosen[label]["latent"]).float()
    _, b, acts_a, acts_b = ctx.prompt_acts()
    dom = diff_of_means(acts_a, acts_b).float()
    dirs[f"diff-of-means ({cfg.prompt_labels[0]} − {cfg.prompt_labels[1]})"] = dom
    dirs["random"] = random_direction_like(dom, torch.Generator().manual_seed(cfg.seeds[0]))
    data = ctx.inputs.hook_data(ctx.hook)
    norm = float(data.held[GENERAL].flat.norm(dim=-1).mean())
    k = max(1, -(-cfg.steering_tokens // cfg.context_size))
    held = {s: (data.held[s].ids[:k], data.held[s].segments[:k]) for s in cfg.domains}
    texts = list(cfg.generation_prompts) or b[:N_GENERATION_PROMPTS]
    prompts = [generation_prompt_ids(ctx.lm, p) for p in texts] if cfg.generate_tokens else []
    add = steering_sweep(ctx.lm, ctx.point, dirs, [s * norm for s in cfg.steering_strengths], held, mode="add",
                         unit_norm=True, prompts=prompts, max_new_tokens=cfg.generate_tokens)
    ablate = steering_sweep(ctx.lm, ctx.point, {n: v for n, v in dirs.items() if n != "random"}, [1.0], held,
                            mode="ablate")
    return {"domain": d, "chosen": chosen, "directions": list(dirs), "mean_activation_norm": norm,
            "relative_strengths": list(cfg.steering_strengths), "add": add, "ablate": ablate, "prompts": texts,
            "tokens": {s: int(v[0].numel()) for s, v in held.items()}}


def features(ctx: HookContext) -> dict:
    cfg, data = ctx.cfg, ctx.inputs.hook_data(ctx.hook)
    path = ctx.out / "features.sqlite"
    k = max(1, -(-cfg.feature_tokens // cfg.context_size))
    heldout = {str(spec): (data.held[d].ids[:k], data.held[d].segments[:k]) for d, spec in cfg.domains.items()}
    build_feature_store(SAESet.of([ctx.sae(label) for label in ctx.main], list(ctx.main), hook=ctx.hook),
                        HeldoutData.live(list(heldout), given=heldout), path, n_tokens=cfg.feature_tokens, lm=ctx.lm,
                        overwrite=True, write=ctx.log)
    return {"path": str(path.relative_to(ctx.out.parent)), "saes": list(ctx.main),
            "tokens_per_domain": cfg.feature_tokens, "command": f"dsae dashboard {path}"}


def convergence(ctx: HookContext) -> dict:
    cfg, x = ctx.cfg, ctx.cfg.middle_sparsity
    curves = {}
    for kind, domains in (("general", [None]), ("scratch", list(cfg.domains))):
        for d in domains:
            for s in cfg.seeds:
                run = Run(kind, d, s, x)
                m = ctx.store.marker(run)
                curves[run.dirname(cfg.sparsity_knob)] = {"condition": run.condition, "seed": s,
                                                          "tokens": ctx.store.trained_tokens(run),
                                                          **{k: m[k] for k in ("curve", "stop") if k in m}}
    overlap_by = {}
    if len(cfg.seeds) > 1:
        for label, kind, d in [(GENERAL, GENERAL, None)] + [(f"{d} scratch", "scratch", d) for d in cfg.domains]:
            ov = seed_overlap([ctx.store.get(Run(kind, d, s, x)) for s in cfg.seeds], ctx.cfg.match_threshold)
            overlap_by[label] = {**ov.to_dict(), "seeds": list(cfg.seeds)}
    return {"sparsity": x, "curves": curves, "seed_overlap": overlap_by}


ANALYSES: dict[str, Callable[[HookContext], dict]] = {"matrix": matrix, "overlap": overlap, "probing": probing,
                                                     "directions": directions, "steering": steering,
                                                     "features": features, "convergence": convergence}
