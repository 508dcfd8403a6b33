"""The rigorous study (`dsae compare configs/study_full.yaml`): matched sparsity, several seeds, a general corpus
that is general, two depths, the gap-closed curve, baselines and sparse probing. Options: :mod:`.full_config`.

For each hook: caches and held-out sets (:mod:`.full_prepare`), every SAE of the plan (:mod:`.full_runs`),
reconstruction and CE measurements (:mod:`.full_measure`), findings (:mod:`.full_analysis`); then one report
(:mod:`.full_report`). The study is resumable: finished caches, SAEs, measurements and hook findings are on disk
and are reused when the same command runs again (``<out>/<hook>/findings.json`` marks a finished hook).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..models.hooks import resolve_hook
from ..runs.single import load_lm
from .config import GENERAL
from .full_analysis import domain_findings, overlap_findings, probing_findings
from .full_config import FullStudyConfig
from .full_measure import Measurements, eval_sets_of
from .full_prepare import cache_tokens, prepare_hook
from .full_report import write_full_report
from .full_runs import SAEStore, plan_runs
from .plan import ASSUMED, REFERENCE_D_IN, Throughput
from .saes import train_config

__all__ = ["run_full_study", "full_estimate", "format_full_plan"]

QUESTION = ("Does fine-tuning a general SAE on domain data give the benefit of a domain SAE trained from scratch, "
            "with far fewer tokens? Compared at matched L0, over seeds, at two depths.")


def _layer_fraction(hook: str, n_layers: int = 30) -> float:
    """Fraction of the model a truncated forward to ``hook`` runs (blocks.L.* -> (L + 1) / n_layers)."""
    parts = hook.split(".")
    if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit():
        return min(1.0, (int(parts[1]) + 1) / n_layers)
    return 1.0


def full_estimate(cfg: FullStudyConfig, rates: Throughput = ASSUMED, d_in: int = REFERENCE_D_IN) -> dict:
    """Seconds per kind of work, per hook (assumed throughputs of :mod:`.plan`; a truncated pass to layer L costs
    the fraction (L + 1) / 30 of a full pass, at least the layer-0 rate)."""
    d_sae = cfg.d_sae or cfg.expansion_factor * d_in
    runs = plan_runs(cfg)
    sae_tokens = sum(r.tokens for r in runs)
    n_sets = sum(len(eval_sets_of(r, list(cfg.domains))) for r in runs if cfg.wants_ce(r))
    out: dict = {"runs_per_hook": len(runs), "sae_tokens_per_hook": sae_tokens, "hooks": {}}
    for hook in cfg.hooks:
        trunc_rate = min(rates.truncated_tokens_per_s, rates.full_tokens_per_s / _layer_fraction(hook))
        cached = sum(cache_tokens(cfg, n) for n in cfg.corpora())
        held = max(cfg.recon_tokens, cfg.eval_tokens) * len(cfg.corpora())
        secs = {"caches": (cached + held) / trunc_rate,
                "saes": sae_tokens / rates.sae_rate(d_in, d_sae) + len(runs) * rates.run_overhead_seconds,
                "ce": (n_sets + 2 * math.ceil(n_sets / 16) * (len(cfg.domains) + 1)) * cfg.eval_tokens
                / rates.full_tokens_per_s,
                "probing": cfg.probe_tokens / trunc_rate + 60}
        out["hooks"][hook] = {k: round(v) for k, v in secs.items()}
    out["total_minutes"] = round(sum(sum(h.values()) for h in out["hooks"].values()) / 60 + rates.load_seconds / 60,
                                 1)
    return out


def format_full_plan(cfg: FullStudyConfig, est: dict) -> str:
    lines = [f"[study] rigorous study: hooks {cfg.hooks}, seeds {cfg.seeds}, {cfg.architecture} SAEs, "
             f"{cfg.knob_label} ladder {cfg.sparsity_ladder}, budgets "
             f"{cfg.budget_ladder}, general mixture {cfg.general_mix}",
             f"[study] {est['runs_per_hook']} SAEs per hook ({est['sae_tokens_per_hook']:,} SAE training tokens)"]
    for hook, secs in est["hooks"].items():
        lines.append(f"[study]   {hook}: " + ", ".join(f"{k} ~{v / 60:.0f} min" for k, v in secs.items()))
    lines.append(f"[study] estimated total: about {est['total_minutes']:.0f} min on 2 CPU cores (assumed "
                 f"throughputs; a resumed study skips what is on disk)")
    return "\n".join(lines)


@torch.no_grad()
def _density(sae: Any, acts: torch.Tensor) -> torch.Tensor:
    return (sae.encode(acts) > 0).double().mean(0)


def _hook_study(cfg: FullStudyConfig, hook: str, out: Path, lm: Any, log: Callable[[str], None]) -> dict:
    done = out / "findings.json"
    if done.is_file():
        log(f"[study] {hook}: finished earlier, findings reused ({done})")
        return json.loads(done.read_text())
    t0 = time.monotonic()
    inp = prepare_hook(cfg, hook, out, lm, log)
    store = SAEStore(cfg, hook, out, inp.caches, lm, inp.hook, log)
    meas = Measurements(out, store, inp.held, inp.ce_sets, cfg.ce_blocks, log)
    runs = plan_runs(cfg)
    t_prep = time.monotonic()
    for i, spec in enumerate(runs):
        store.get(spec)
        meas.reconstruction([spec])
        store.forget(lambda s: s.kind == "general")
        if (i + 1) % 10 == 0:
            log(f"[study]   {hook}: {i + 1}/{len(runs)} SAEs ready")
    t_train = time.monotonic()
    meas.ce([r for r in runs if cfg.wants_ce(r)])
    t_ce = time.monotonic()
    res: dict = {"domains": {}}
    for d in cfg.domains:
        own = [r for r in runs if r.domain == d or r.kind == "general"]
        res["domains"][d] = domain_findings(cfg, d, meas.points(d, own), meas.points(GENERAL, own))
    dens = {}
    for d in cfg.domains:
        hb_spec = next(r for r in runs if r.kind == "finetuned" and r.domain == d and r.seed == cfg.seeds[0]
                       and r.sparsity == cfg.middle_sparsity and r.budget == res["domains"][d]["headline_budget"])
        dens[d] = _density(store.get(hb_spec), inp.held[d].flat)
    res["overlap"] = overlap_findings(cfg, store, dens)
    res["probing"] = probing_findings(cfg, store, inp.probes)
    res["timing_seconds"] = {"prepare": round(t_prep - t0, 1), "saes": round(t_train - t_prep, 1),
                             "ce": round(t_ce - t_train, 1), "analysis": round(time.monotonic() - t_ce, 1)}
    res["cache_tokens"] = inp.cache_tokens
    done.write_text(json.dumps(res, indent=1, default=str))
    return res


def run_full_study(cfg: FullStudyConfig, out_dir: Optional[str | Path] = None, *, lm: Any = None,
                   log: Callable[[str], None] = print, keep_cache: bool = False) -> dict:
    """Run (or resume) the rigorous study and write results.json, report.md and figures into ``out_dir``."""
    cfg.validate()
    out = Path(out_dir or cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    est = full_estimate(cfg)
    log(format_full_plan(cfg, est))
    t0 = time.monotonic()
    if lm is None:
        lm = load_lm(train_config(cfg, data=next(iter(cfg.domains.values())), tokens=cfg.train_batch_size_tokens,
                                  seed=0, lr=cfg.lr, name="probe", output_dir=out / "saes"))
    for hook in cfg.hooks:
        resolve_hook(lm.model, hook)  # a wrong hook name fails before hours of work
    results: dict = {"schema": "domain-sae/full-study-results", "schema_version": 1, "question": QUESTION,
                     "model": cfg.model, "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
                     "estimate": est, "hooks": {}}
    for hook in cfg.hooks:
        hook_out = out / hook.replace("/", "_")
        try:
            results["hooks"][hook] = _hook_study(cfg, hook, hook_out, lm, log)
        finally:
            if not keep_cache:
                shutil.rmtree(hook_out / "cache", ignore_errors=True)
    results["timing_seconds"] = {"total": round(time.monotonic() - t0, 1),
                                 **{h: r.get("timing_seconds", {}) for h, r in results["hooks"].items()}}
    paths = write_full_report(results, out)
    log(f"[study] done in {time.monotonic() - t0:.0f} s; report: {paths['report_md']}")
    return {**results, **{k: str(v) for k, v in paths.items()}}
