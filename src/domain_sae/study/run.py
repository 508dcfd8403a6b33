"""The domain-adaptation study, stage by stage (`dsae compare CONFIG`, `dsae demo`).

1. load/caches  the model; one truncated model pass per domain into an on-disk activation cache (training split),
                plus held-out token sets and their activations.
2. train        general (equal shares of every domain) + its seed control, every domain from scratch, the general
                SAE fine-tuned on every domain; all from the caches (the model never runs again for training).
3. matrix       every SAE x held-out eval set {general, each domain}: CE/KL with full model passes (one clean and one
                zero-ablation pass per batch shared by all SAEs) + reconstruction metrics.
4. budgets      fine-tuned vs scratch at several token budgets per domain (reconstruction on held-out activations),
                and the forgetting of the fine-tuned SAEs on general data.
5. overlap      decoder max-cosine both ways, Hungarian matched fraction (seed control as yardstick), drift of the
                fine-tuned latents, domain-specific latents of the general SAE with their top examples.
6. directions   difference-of-means direction between two prompt sets; how each SAE captures it.
7. steering     domain latents (scratch and fine-tuned), the difference-of-means direction and a random direction
                of equal norm added at the hook (and ablated): CE change per domain, greedy generations.
8. report       results.json, report.md, report.html (plots embedded).
"""

from __future__ import annotations

import math
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..errors import UserError
from .config import CONTROL, GENERAL, StudyConfig, finetuned_name, scratch_name
from .inputs import (HeldoutActivations, MixtureSource, generation_prompt_ids, heldout_activations,
                     prompt_activations, prompt_sets, split_evenly)
from .plan import (ASSUMED, Throughput, cache_tokens_per_domain, d_sae_of, estimate_minutes, format_plan,
                   heldout_tokens_per_domain, refine, remaining_seconds, study_plan)

__all__ = ["run_study", "estimate_minutes", "Study", "StudyError"]

EV = "metrics/explained_variance"
RECON_KEYS = (EV, "metrics/mse", "metrics/cossim", "metrics/l0", "sparsity/dead_fraction",
              "metrics/relative_reconstruction_bias")


class StudyError(UserError):
    """The study cannot go on (e.g. a domain has no held-out data); the message says what to change."""


class _Stages:
    """Wall-clock time and token counts of each stage, printed as they finish."""

    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.records: dict[str, dict[str, Any]] = {}

    @contextmanager
    def __call__(self, name: str, what: str):
        self.log(f"[study] {name}: {what}")
        rec: dict[str, Any] = {"what": what, "tokens": {}}
        t = time.monotonic()
        yield rec
        rec["seconds"] = round(time.monotonic() - t, 1)
        self.records[name] = rec
        self.log(f"[study] {name} done in {rec['seconds']:.0f} s")


def _recon_summary(m: dict) -> dict:
    return {k.split("/")[-1]: m[k] for k in RECON_KEYS if k in m}


class Study:
    """The study's state between stages: model, caches, held-out sets, SAEs, results (JSON-ready)."""

    def __init__(self, cfg: StudyConfig, out_dir: Path, *, lm: Any = None, log: Callable[[str], None] = print,
                 measure: bool = True, keep_saes: bool = True):
        self.cfg, self.out, self.log = cfg.validate(), Path(out_dir), log
        self.lm, self.measure, self.keep_saes = lm, measure, keep_saes
        self.stage = _Stages(log)
        self.domains = list(cfg.domains)
        self.results: dict[str, Any] = {
            "schema": "domain-sae/study-results", "schema_version": 1,
            "question": "Does fine-tuning a general SAE on domain data give the benefit of a domain SAE trained from "
                        "scratch, with far fewer tokens?",
            "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, "domains": self.domains}
        self.saes: dict[str, Any] = {}
        self.rates: Throughput = ASSUMED
        self._refined: set[str] = set()

    # -- helpers ------------------------------------------------------------------------------------------------
    def _train_cfg(self, *, data: str, tokens: int, seed: int, lr: float, name: str):
        from ..config import TrainConfig
        cfg = self.cfg
        steps = max(1, tokens // cfg.train_batch_size_tokens)
        return TrainConfig(model=cfg.model, hook=cfg.hook, device=cfg.device, data=data,
                           context_size=cfg.context_size, holdout_fraction=cfg.holdout_fraction,
                           expansion_factor=cfg.expansion_factor, d_sae=cfg.d_sae, training_tokens=tokens,
                           train_batch_size_tokens=cfg.train_batch_size_tokens,
                           buffer_size_tokens=cfg.buffer_size_tokens, lr=lr, lr_warm_up_steps=steps // 20,
                           lr_decay_steps=steps // 5, l1_coefficient=cfg.l1_coefficient,
                           l1_warm_up_steps=steps // 20, feature_sampling_window=max(10, steps // 4),
                           dead_feature_window=max(10, steps // 4), seed=seed, eval_every=0,
                           log_every=max(1, steps // 10), n_checkpoints=0, resume_checkpoint_minutes=0,
                           output_dir=str(self.out / "saes"), run_name=name, overwrite=True).validate()

    def _source(self, domain: str, seed: int):
        """Batches of one domain's cache, or for ``general`` equal shares of every domain's cache."""
        from ..activations.cache import CachedActivationSource
        cfg = self.cfg
        n = len(self.domains)

        def one(d: str, batch: int, buffer: int):
            return CachedActivationSource(self.caches[d], batch_size=batch, buffer_tokens=buffer, seed=seed,
                                          repeat=True)
        if domain == GENERAL:
            batches = split_evenly(cfg.train_batch_size_tokens, n)
            buffers = split_evenly(cfg.buffer_size_tokens, n)
            return MixtureSource(*(one(d, b, max(b, buf)) for d, b, buf in zip(self.domains, batches, buffers)))
        return one(domain, cfg.train_batch_size_tokens, cfg.buffer_size_tokens)

    def _train(self, name: str, domain: str, tokens: int, *, seed: Optional[int] = None, parent=None):
        from .. import pipeline
        cfg = self.cfg
        data = "+".join(cfg.domains.values()) if domain == GENERAL else cfg.domains[domain]
        seed = cfg.seed if seed is None else seed
        tcfg = self._train_cfg(data=data, tokens=tokens, seed=seed, lr=cfg.finetune_lr if parent else cfg.lr,
                               name=name.replace(" ", "_").replace("→", "_to_").replace("(", "").replace(")", ""))
        t = time.monotonic()
        # quiet: no per-run progress line or printed table (each run still writes summary.md in its directory)
        res = pipeline.train(tcfg, lm=self.lm, source=self._source(domain, seed), init_sae=parent, quiet=True)
        self.log(f"[study]   {name}: {tokens:,} tokens in {time.monotonic() - t:.0f} s"
                 + (" (fine-tuned from general)" if parent is not None else ""))
        if not self.keep_saes:
            shutil.rmtree(res.run_dir, ignore_errors=True)
        return res.sae.eval()

    @torch.no_grad()
    def recon(self, sae, acts: HeldoutActivations) -> tuple[dict, torch.Tensor]:
        """Reconstruction metrics (SPEC 3, float64) of ``sae`` on held-out activations, and per-latent density."""
        from ..evaluation.metrics import ReconstructionAccumulator
        x = acts.flat
        acc = ReconstructionAccumulator(x.shape[-1], sae.cfg.d_sae)
        for i in range(0, len(x), 4096):
            xb = x[i:i + 4096]
            x_hat, f = sae.forward_with_latents(xb)
            acc.update(xb, x_hat, f)
        return acc.compute(), acc.feature_density()

    def update_estimate(self) -> None:
        """Refine the throughputs from the stages finished so far and print the remaining time."""
        if not self.measure:
            return
        d_in = getattr(self, "d_in", None)
        for name, rec in self.stage.records.items():
            if name not in self._refined:
                self._refined.add(name)
                self.rates = refine(self.rates, name, rec["seconds"], rec.get("tokens", {}), runs=rec.get("runs", 0),
                                    d_in=d_in or 576, d_sae=getattr(self, "d_sae", 2304))
        left = remaining_seconds(self.cfg, self.rates, set(self.stage.records), d_in)
        self.log(f"[study] estimated time left: about {left / 60:.1f} min (throughputs {self.rates.source})")

    # -- 1 ------------------------------------------------------------------------------------------------------
    def prepare(self):
        from ..activations.cache import build_activation_cache, read_manifest
        from ..data.pipeline import TokenStream, heldout_batch
        from ..models.hooks import capture, hook_d_in, resolve_hook
        from ..pipeline import load_lm
        cfg = self.cfg
        with self.stage("load", f"model {cfg.model}, hook {cfg.hook}") as rec:
            if self.lm is None:
                self.lm = load_lm(self._train_cfg(data=next(iter(cfg.domains.values())),
                                                  tokens=cfg.train_batch_size_tokens, seed=0, lr=cfg.lr,
                                                  name="probe"))
            self.hook = resolve_hook(self.lm.model, cfg.hook)
            self.d_in = hook_d_in(self.lm.model, self.hook)
            self.d_sae = d_sae_of(cfg, self.d_in)
        self.results["estimate"] = {"minutes": round(estimate_minutes(cfg, self.rates, self.d_in), 1),
                                    "rates": asdict(self.rates)}
        per_domain, n_held = cache_tokens_per_domain(cfg), heldout_tokens_per_domain(cfg)
        self.caches: dict[str, Path] = {}
        self.heldout_tokens: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        held_acts: dict[str, HeldoutActivations] = {}
        device = next(self.lm.model.parameters()).device
        cached: dict[str, int] = {}
        with self.stage("caches", f"one model pass per domain: {per_domain:,} training tokens each, "
                                  f"{n_held:,} held-out tokens") as rec:
            for name, spec in cfg.domains.items():
                dcfg = self._train_cfg(data=spec, tokens=cfg.train_batch_size_tokens, seed=0, lr=cfg.lr, name=name)
                path = self.out / "cache" / name
                stream = TokenStream(dcfg, self.lm.tokenizer, split="train", repeat=True)
                build_activation_cache(lambda ids: capture(self.lm.model, self.hook, ids.to(device)).float(),
                                       stream, path, per_domain, d_in=self.d_in, metadata={"domain": name},
                                       overwrite=True)
                cached[name] = int(read_manifest(path).get("n_tokens", per_domain))
                self.caches[name] = path
                ids, segs = heldout_batch(dcfg, self.lm.tokenizer, n_held)
                self.heldout_tokens[name] = (ids, segs)
                held_acts[name] = heldout_activations(self.lm, self.hook, ids, segs)
                if int(held_acts[name].mask.sum()) == 0:
                    raise StudyError(f"Domain {name!r} ({spec}) has no countable held-out tokens; raise "
                                     f"holdout_fraction or use a larger dataset.")
            rec["tokens"] = {"truncated": sum(cached.values()) + sum(int(t[0].numel())
                                                                      for t in self.heldout_tokens.values())}
        self.heldout_acts = {GENERAL: self._mix({d: held_acts[d] for d in self.domains}), **held_acts}
        self.results["model"] = {"name": cfg.model, "hook": cfg.hook, "source": getattr(self.lm, "source", ""),
                                 "d_in": self.d_in, "d_sae": self.d_sae}
        self.results["data"] = {
            "cache_tokens": cached,
            "heldout_sequences": {d: int(t[0].shape[0]) for d, t in self.heldout_tokens.items()},
            "recon_tokens_counted": {d: int(h.mask.sum()) for d, h in self.heldout_acts.items()}}

    def _mix(self, parts: dict[str, Any]):
        """The general held-out set: the first 1/n of every domain's sequences (same size as one domain's set)."""
        n = len(parts)
        if all(isinstance(p, HeldoutActivations) for p in parts.values()):
            return HeldoutActivations.concat(*(
                HeldoutActivations(*(getattr(p, f)[:max(1, math.ceil(len(p.ids) / n))]
                                     for f in ("acts", "ids", "segments", "mask"))) for p in parts.values()))
        ids = torch.cat([p[0][:max(1, math.ceil(len(p[0]) / n))] for p in parts.values()])
        segs = torch.cat([p[1][:max(1, math.ceil(len(p[1]) / n))] for p in parts.values()])
        return ids, segs

    # -- 2 ------------------------------------------------------------------------------------------------------
    def train_main(self):
        cfg = self.cfg
        n = len(self.domains)
        total = 2 * cfg.general_tokens + n * (cfg.scratch_tokens + cfg.finetune_tokens)
        with self.stage("train", f"general + seed control, {n} domains from scratch, general fine-tuned to each "
                                 f"domain ({total:,} SAE tokens)") as rec:
            self.saes[GENERAL] = self._train(GENERAL, GENERAL, cfg.general_tokens)
            self.saes[CONTROL] = self._train(CONTROL, GENERAL, cfg.general_tokens, seed=cfg.control_seed)
            for d in self.domains:
                self.saes[scratch_name(d)] = self._train(scratch_name(d), d, cfg.scratch_tokens)
            for d in self.domains:
                self.saes[finetuned_name(d)] = self._train(finetuned_name(d), d, cfg.finetune_tokens,
                                                           parent=self.saes[GENERAL])
            rec["tokens"], rec["runs"] = {"sae": total}, 2 + 2 * n
        info = {GENERAL: ("general", None, cfg.general_tokens, 0, cfg.seed),
                CONTROL: ("control", None, cfg.general_tokens, 0, cfg.control_seed)}
        for d in self.domains:
            info[scratch_name(d)] = ("scratch", d, cfg.scratch_tokens, 0, cfg.seed)
            info[finetuned_name(d)] = ("finetuned", d, cfg.finetune_tokens, cfg.general_tokens, cfg.seed)
        self.results["saes"] = {
            name: {"kind": k, "domain": d, "training_tokens": t, "parent_tokens": p, "total_tokens": t + p,
                   "seed": s, "lineage": (getattr(self.saes[name].cfg, "metadata", None) or {}).get("lineage")}
            for name, (k, d, t, p, s) in sorted(info.items(), key=lambda kv: list(self.saes).index(kv[0]))}

    # -- 3 ------------------------------------------------------------------------------------------------------
    def matrix(self):
        from ..evaluation.lm_metrics import evaluate_saes_on_tokens
        cfg = self.cfg
        sets = {}
        for d in self.domains:
            ids, segs = self.heldout_tokens[d]
            k = max(1, math.ceil(cfg.eval_tokens / ids.shape[1]))
            sets[d] = (ids[:k], segs[:k])
        sets = {GENERAL: self._mix(sets), **sets}
        out: dict[str, dict[str, Any]] = {name: {} for name in self.saes}
        counted: dict[str, dict[str, int]] = {}
        n_tok = sum(int(ids.numel()) for ids, _ in sets.values())
        with self.stage("matrix", f"{len(self.saes)} SAEs x {len(sets)} held-out sets (CE/KL with model "
                                  f"passes)") as rec:
            for ds, (ids, segs) in sets.items():
                res = evaluate_saes_on_tokens(self.saes, self.lm, self.hook, ids, segs, per_segment=True)
                for name, r in res.items():
                    out[name][ds] = {**r.metrics, "segments": r.segments}
                first = next(iter(res.values())).metrics
                counted[ds] = {"sequences": int(ids.shape[0]), "tokens": int(ids.numel()),
                               "lm_counted": int(first.get("tokens/lm_counted", 0)),
                               "reconstruction_counted": int(first.get("tokens/reconstruction_counted", 0))}
            rec["tokens"] = {"full": n_tok * (len(self.saes) + 2), "truncated": n_tok}
        self.results["matrix"] = out
        self.results["data"]["eval_sets"] = counted

    # -- 4 ------------------------------------------------------------------------------------------------------
    def budgets(self):
        cfg = self.cfg
        curves: dict[str, Any] = {}
        recon: dict[str, dict[str, Any]] = {}
        sets = [GENERAL, *self.domains]
        with self.stage("budgets", f"fine-tuned vs scratch at {cfg.budgets} tokens on each domain") as rec:
            self.densities: dict[str, dict[str, torch.Tensor]] = {}
            for name, sae in self.saes.items():
                recon[name] = {}
                for s in sets:
                    m, dens = self.recon(sae, self.heldout_acts[s])
                    recon[name][s] = _recon_summary(m)
                    self.densities.setdefault(name, {})[s] = dens
            gen = self.saes[GENERAL]
            for d in self.domains:
                c: dict[str, Any] = {"tokens": list(cfg.budgets), "scratch": [], "finetuned": [],
                                     "finetuned_on_general": []}
                for b in cfg.budgets:
                    s = self._train(f"budget {d} scratch {b}", d, b)
                    f = self._train(f"budget {d} finetuned {b}", d, b, parent=gen)
                    c["scratch"].append(_recon_summary(self.recon(s, self.heldout_acts[d])[0]))
                    c["finetuned"].append(_recon_summary(self.recon(f, self.heldout_acts[d])[0]))
                    c["finetuned_on_general"].append(_recon_summary(self.recon(f, self.heldout_acts[GENERAL])[0]))
                curves[d] = c
            rec["tokens"] = {"sae": 2 * len(self.domains) * sum(cfg.budgets)}
            rec["runs"] = 2 * len(self.domains) * len(cfg.budgets)
        self.results["recon"] = recon
        self.results["budgets"] = curves

    # -- 5 ------------------------------------------------------------------------------------------------------
    def overlap(self):
        from ..analysis.overlap import compare_dictionaries, decoder_drift, domain_specific_latents, \
            top_activating_examples
        cfg = self.cfg
        pairs = [(GENERAL, CONTROL)] + [(GENERAL, scratch_name(d)) for d in self.domains]
        pairs += [(scratch_name(a), scratch_name(b)) for i, a in enumerate(self.domains)
                  for b in self.domains[i + 1:]]
        pairs += [(GENERAL, finetuned_name(d)) for d in self.domains]
        out: dict[str, Any] = {"threshold": cfg.match_threshold, "pairs": {}, "drift": {}, "domain_specific": {}}
        with self.stage("overlap", f"{len(pairs)} pairs: decoder max-cosine, Hungarian matching; drift; "
                                   f"domain-specific latents"):
            for a, b in pairs:
                r = compare_dictionaries(self.saes[a], self.saes[b], cfg.match_threshold)
                out["pairs"][f"{a} vs {b}"] = {"a": a, "b": b, **r}
            for d in self.domains:
                drift = decoder_drift(self.saes[GENERAL].W_dec.detach(),
                                      self.saes[finetuned_name(d)].W_dec.detach()).double()
                counts = torch.histc(drift.clamp(-1, 1), bins=50, min=-1, max=1)
                out["drift"][finetuned_name(d)] = {
                    "mean": float(drift.mean()), "median": float(drift.median()),
                    "frac_below_0.9": float((drift < 0.9).double().mean()),
                    "frac_below_0.5": float((drift < 0.5).double().mean()),
                    "hist_counts": [int(v) for v in counts], "hist_edges": torch.linspace(-1, 1, 51).tolist()}
            gen, dens = self.saes[GENERAL], self.densities[GENERAL]
            tok = self.lm.tokenizer
            for d in self.domains:
                others = torch.stack([dens[o] for o in self.domains if o != d]).amax(0)
                spec = domain_specific_latents(dens[d], others, alive_threshold=1e-3, dead_threshold=0.0)
                h = self.heldout_acts[d]
                top = [int(v) for v in spec.a_only[:3]]
                examples = []
                if top:
                    with torch.no_grad():
                        f = torch.cat([gen.encode(h.acts[i:i + 16])[..., top] for i in range(0, len(h.acts), 16)])
                    for j, i in enumerate(top):
                        ex = top_activating_examples(f[..., j], h.ids, k=3, mask=h.mask, tokenizer=tok)
                        examples.append({"latent": i, "density": float(dens[d][i]),
                                         "examples": [{k: e[k] for k in ("value", "prefix", "token", "suffix")
                                                       if k in e} for e in ex]})
                out["domain_specific"][d] = {"count": int(len(spec.a_only)), "top": examples}
        self.results["overlap"] = out

    # -- 6 ------------------------------------------------------------------------------------------------------
    def directions(self):
        from ..analysis.directions import direction_capture
        cfg = self.cfg
        a_label, b_label = cfg.prompt_labels
        with self.stage("directions", f"difference of means: {cfg.n_prompts} {a_label} vs {cfg.n_prompts} "
                                      f"{b_label}"):
            a, b = prompt_sets(cfg)
            if len(a) < 2 or len(b) < 2:
                raise StudyError(f"The prompt sets hold {len(a)} and {len(b)} prompts; each needs at least 2 "
                                 f"(set prompts_a / prompts_b to files with one prompt per line).")
            self.prompts = (a, b)
            self.acts_a = prompt_activations(self.lm, self.hook, a)
            self.acts_b = prompt_activations(self.lm, self.hook, b)
            per = {name: direction_capture(sae, self.acts_a, self.acts_b, range(1, 65))
                   for name, sae in self.saes.items()}
        self.results["directions"] = {"labels": [a_label, b_label], "n_prompts": [len(a), len(b)],
                                      "example_prompts": [a[:3], b[:3]], "per_sae": per}

    # -- 7 ------------------------------------------------------------------------------------------------------
    def steering(self):
        from ..analysis.directions import diff_of_means
        from ..analysis.steering import latent_direction, random_direction_like, steering_sweep
        cfg = self.cfg
        d = cfg.steer_domain
        others = [o for o in self.domains if o != d]
        directions: dict[str, torch.Tensor] = {}
        chosen = {}
        for name in (scratch_name(d), finetuned_name(d)):
            # the latent firing most more on held-out d than on the other domains (mean activation difference)
            sae = self.saes[name]
            with torch.no_grad():
                mean_f = {s: sae.encode(self.heldout_acts[s].flat).double().mean(0) for s in self.domains}
            score = mean_f[d] - torch.stack([mean_f[o] for o in others]).mean(0)
            latent = int(score.argmax())
            chosen[name] = {"latent": latent, "mean_activation_difference": float(score[latent]),
                            "density": {s: float(self.densities[name][s][latent]) for s in self.domains}}
            directions[f"{name} latent {latent}"] = latent_direction(sae, latent).float()
        dom = diff_of_means(self.acts_a, self.acts_b).float()
        directions[f"diff-of-means ({cfg.prompt_labels[0]} − {cfg.prompt_labels[1]})"] = dom
        g = torch.Generator().manual_seed(cfg.seed)
        directions["random"] = random_direction_like(dom, g)
        norm = float(self.heldout_acts[GENERAL].flat.norm(dim=-1).mean())
        strengths = [s * norm for s in cfg.steering_strengths]
        held = {}
        for o in self.domains:
            ids, segs = self.heldout_tokens[o]
            k = max(1, math.ceil(cfg.steering_tokens / ids.shape[1]))
            held[o] = (ids[:k], segs[:k])
        texts = [self.prompts[1][0], "Tell me about your weekend."]
        prompts = [generation_prompt_ids(self.lm, p) for p in texts]
        gen_tokens = cfg.generate_tokens if cfg.generate_tokens > 0 else 0
        n_tok = sum(int(i.numel()) for i, _ in held.values())
        with self.stage("steering", f"{len(directions)} directions x {len(strengths)} strengths, CE change on "
                                    f"{', '.join(held)}") as rec:
            add = steering_sweep(self.lm, self.hook, directions, strengths, held, mode="add", unit_norm=True,
                                 prompts=prompts if gen_tokens else (), max_new_tokens=gen_tokens)
            ablate = steering_sweep(self.lm, self.hook, {k: v for k, v in directions.items() if k != "random"},
                                    [1.0], held, mode="ablate")
            rec["tokens"] = {"full": n_tok * (1 + len(directions) * len(strengths) + len(directions) - 1),
                             "generated": len(prompts) * (1 + len(directions) * len(strengths)) * gen_tokens}
        self.results["steering"] = {
            "domain": d, "chosen": chosen, "directions": list(directions), "mean_activation_norm": norm,
            "relative_strengths": list(cfg.steering_strengths), "add": add, "ablate": ablate,
            "prompts": texts, "tokens": {o: int(held[o][0].numel()) for o in held}}


def run_study(cfg: StudyConfig, out_dir: Optional[str | Path] = None, *, lm: Any = None,
              log: Callable[[str], None] = print, measure: bool = True, keep_saes: bool = True,
              keep_cache: bool = False) -> dict:
    """Run every stage and write results.json, report.md and report.html into ``out_dir`` (default
    ``cfg.output_dir``); returns the results dict (as written to results.json, plus the report paths).

    ``lm``: an already loaded model (tests, notebooks); ``measure``: refine the throughputs from each finished
    stage and print the time left; ``keep_saes``: keep every trained SAE under ``out_dir/saes``; ``keep_cache``: keep the activation
    caches (large; rebuilt in one model pass)."""
    from .report import write_report
    cfg.validate()
    out = Path(out_dir or cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log(format_plan(study_plan(cfg)))
    study = Study(cfg, out, lm=lm, log=log, measure=measure, keep_saes=keep_saes)
    t0 = time.monotonic()
    try:
        for step in (study.prepare, study.train_main, study.matrix, study.budgets, study.overlap, study.directions,
                     study.steering):
            step()
            study.update_estimate()
    finally:
        if not keep_cache:
            shutil.rmtree(out / "cache", ignore_errors=True)
    study.results["stages"] = study.stage.records
    study.results["timing_seconds"] = {**{k: v["seconds"] for k, v in study.stage.records.items()},
                                       "total": round(time.monotonic() - t0, 1)}
    study.results["versions"] = _versions()
    paths = write_report(study.results, out)
    log(f"[study] done in {time.monotonic() - t0:.0f} s; report: {paths['report_html']}")
    return {**study.results, **{k: str(v) for k, v in paths.items()}}


def _versions() -> dict[str, str]:
    import platform
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": platform.python_version()}
    for pkg in ("domain-sae", "torch", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out
