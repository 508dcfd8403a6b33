"""The domain-adaptation study, stage by stage (`dsae compare CONFIG`, `dsae demo`).

1. load/caches  the model; one truncated model pass per domain into an on-disk activation cache (training split),
                plus held-out token sets and their activations                       (:mod:`.prepare`)
2. train        general (equal shares of every domain) + its seed control, every domain from scratch, the general
                SAE fine-tuned on every domain; all from the caches                  (:func:`.saes.train_main`)
3. matrix       every SAE x held-out eval set {general, each domain}: CE/KL with full model passes (one clean and one
                zero-ablation pass per batch shared by all SAEs) + reconstruction metrics (:func:`.measures.matrix`)
4. budgets      fine-tuned vs scratch at several token budgets per domain (reconstruction on held-out activations),
                and the forgetting of the fine-tuned SAEs on general data          (:func:`.saes.budgets`)
5. overlap      decoder max-cosine both ways, Hungarian matched fraction (seed control as yardstick), drift of the
                fine-tuned latents, domain-specific latents of the general SAE with their top examples
6. directions   difference-of-means direction between two prompt sets; how each SAE captures it.
7. steering     domain latents (scratch and fine-tuned), the difference-of-means direction and a random direction
                of equal norm added at the hook (and ablated): CE change per domain, greedy generations.
8. report       results.json, report.md, report.html (plots embedded)                (:mod:`.report`)

Each stage is a function of the typed results of the stages before it; :func:`run_study` runs them in order and
assembles results.json.
"""

from __future__ import annotations

import platform
import shutil
import time
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable, Optional

from ..features import build_feature_store
from . import measures, saes
from .config import StudyConfig
from .plan import ASSUMED, Throughput, estimate_minutes, format_plan, refine, remaining_seconds, study_plan
from .prepare import StageTimer, StudyError, StudyInputs, prepare
from .report import write_report

__all__ = ["run_study", "estimate_minutes", "StudyError"]

QUESTION = ("Does fine-tuning a general SAE on domain data give the benefit of a domain SAE trained from scratch, "
            "with far fewer tokens?")


class _Estimate:
    """Throughputs refined from every finished stage, and the remaining time printed after each stage."""

    def __init__(self, cfg: StudyConfig, timer: StageTimer, log: Callable[[str], None], measure: bool):
        self.cfg, self.timer, self.log, self.measure = cfg, timer, log, measure
        self.rates: Throughput = ASSUMED
        self._refined: set[str] = set()

    def update(self, inp: StudyInputs) -> None:
        if not self.measure:
            return
        for name, rec in self.timer.records.items():
            if name not in self._refined:
                self._refined.add(name)
                self.rates = refine(self.rates, name, rec.seconds, rec.tokens, runs=rec.runs, d_in=inp.d_in,
                                    d_sae=inp.d_sae)
        left = remaining_seconds(self.cfg, self.rates, set(self.timer.records), inp.d_in)
        self.log(f"[study] estimated time left: about {left / 60:.1f} min (throughputs {self.rates.source})")


def run_study(cfg: StudyConfig, out_dir: Optional[str | Path] = None, *, lm: Any = None,
              log: Callable[[str], None] = print, measure: bool = True, keep_saes: bool = True,
              keep_cache: bool = False) -> dict:
    """Run every stage and write results.json, report.md and report.html into ``out_dir`` (default
    ``cfg.output_dir``); returns the results dict (as written to results.json, plus the report paths).

    ``lm``: an already loaded model (tests, notebooks); ``measure``: refine the throughputs from each finished
    stage and print the time left; ``keep_saes``: keep every trained SAE under ``out_dir/saes``; ``keep_cache``:
    keep the activation caches (large; rebuilt in one model pass)."""
    cfg.validate()
    out = Path(out_dir or cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log(format_plan(study_plan(cfg)))
    timer = StageTimer(log)
    est = _Estimate(cfg, timer, log, measure)
    t0 = time.monotonic()
    try:
        inp = prepare(cfg, out, lm=lm, timer=timer, log=log, keep_saes=keep_saes)
        estimate = {"minutes": round(estimate_minutes(cfg, est.rates, inp.d_in), 1), "rates": asdict(est.rates)}
        est.update(inp)
        trained = saes.train_main(inp)
        est.update(inp)
        mat = measures.matrix(inp, trained)
        est.update(inp)
        bud = saes.budgets(inp, trained)
        est.update(inp)
        ovl = measures.overlap(inp, trained, bud)
        est.update(inp)
        dirs = measures.directions(inp, trained)
        est.update(inp)
        steer = measures.steering(inp, trained, bud, dirs)
        est.update(inp)
        store = feature_store(inp, trained)
    finally:
        if not keep_cache:
            shutil.rmtree(out / "cache", ignore_errors=True)
    data = {**inp.data_json(), "eval_sets": mat.eval_sets}
    results: dict[str, Any] = {
        "schema": "domain-sae/study-results", "schema_version": 1, "question": QUESTION,
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, "domains": inp.domains,
        "estimate": estimate, "model": inp.model_json(), "data": data, "saes": trained.table, "matrix": mat.matrix,
        "recon": bud.recon, "budgets": bud.curves, "overlap": ovl.to_json(), "directions": dirs.to_json(),
        "steering": steer.to_json(), "feature_store": store,
        "stages": {k: v.to_json() for k, v in timer.records.items()},
        "timing_seconds": {**{k: v.seconds for k, v in timer.records.items()},
                           "total": round(time.monotonic() - t0, 1)},
        "versions": _versions()}
    paths = write_report(results, out)
    log(f"[study] done in {time.monotonic() - t0:.0f} s; report: {paths['report_html']}")
    return {**results, **{k: str(v) for k, v in paths.items()}}


def feature_store(inp: StudyInputs, trained: saes.TrainedSAEs) -> Optional[dict]:
    """Stage 8: the feature store of the main SAEs over ``feature_tokens`` held-out tokens of every domain (the same
    held-out sequences as the matrix), at ``out/features.sqlite``; None when ``feature_tokens`` is 0."""
    cfg = inp.cfg
    if cfg.feature_tokens <= 0:
        return None
    path = inp.out / "features.sqlite"
    specs = {d: str(spec) for d, spec in cfg.domains.items()}
    n_tokens = cfg.feature_tokens
    heldout = {}
    for d in inp.domains:  # the first n_tokens of the held-out sequences the matrix used
        ids, segs = inp.heldout_tokens[d]
        n_seq = max(1, -(-n_tokens // int(ids.shape[1])))
        heldout[specs[d]] = (ids[:n_seq], segs[:n_seq])
    with inp.timer("features", f"feature store of {len(trained.saes)} SAEs on {n_tokens:,} held-out tokens of "
                               f"each domain") as rec:
        build_feature_store(list(trained.saes), list(heldout), n_tokens, path, lm=inp.lm,
                            saes=list(trained.saes.values()), hook=cfg.hook, heldout=heldout, overwrite=True,
                            write=inp.log)
        rec.tokens = {"truncated": n_tokens * len(heldout)}
    return {"path": path.name, "saes": list(trained.saes), "tokens_per_domain": n_tokens,
            "command": f"dsae dashboard {path}"}


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("domain-sae", "torch", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out
