"""The domain-adaptation study, hook by hook (`dsae compare CONFIG`, `dsae demo`): one engine for every config.

For each hook of ``hooks``: every run of the plan is trained (once; :class:`.runs.SAEStore`) and its reconstruction
measured, then the model-pass metrics of the runs that want them (:class:`.measure.Measurements`), the findings per
domain (:mod:`.findings`) and the analyses the config turns on (:mod:`.analyses`); then one report
(:mod:`.report`). Resumable at every level: finished SAEs, measurements and analyses are on disk and reused when
the same command runs again (``<out>/<hook>/hook.json`` marks a finished hook); caches are built when first needed
and removed at the end of a finished study (``keep_cache`` keeps them; a study that stops early keeps them for the
next invocation).
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable, Optional

from ..config import DataConfig, to_dict
from ..models.hooks import hook_d_in, resolve_hook
from ..runs.single import load_lm
from ..util.jsonsafe import jsonable, write_json
from ..util.outdirs import prepare_output_dir
from .analyses import ANALYSES, HookContext
from .config import GENERAL, StudyConfig, slug
from .findings import domain_findings
from .inputs import StudyInputs
from .measure import Measurements, recon_with_se
from .plan import estimate, format_plan
from .report import SCHEMA, SCHEMA_VERSION, write_report
from .runs import SAEStore, main_runs, plan_runs
from .verdicts import PairedVerdicts

QUESTION = ("Does fine-tuning a general SAE on domain data give the benefit of a domain SAE trained from scratch, "
            "with far fewer tokens?")


def _identity(cfg: StudyConfig, *extra: Any) -> str:
    """A key of everything a cached hook result depends on: the options (not where the output goes) and ``extra``."""
    values = {k: v for k, v in to_dict(cfg).items() if k != "output_dir"}
    return hashlib.sha256(json.dumps([SCHEMA_VERSION, values, *extra], sort_keys=True,
                                     default=str).encode()).hexdigest()[:16]


def _saved(path: Path, key: str) -> Optional[dict]:
    """The result saved at ``path`` if it was saved under ``key``, else None."""
    try:
        saved = json.loads(path.read_text())
        return saved["value"] if saved.get("key") == key else None
    except (OSError, ValueError, KeyError, AttributeError):
        return None


def _save(path: Path, key: str, value: Any) -> dict:
    value = jsonable(value)
    write_json(path, {"key": key, "value": value}, indent=1)
    return value


def hook_study(cfg: StudyConfig, hook: str, out: Path, lm: Any, inputs: StudyInputs,
               log: Callable[[str], None] = print) -> dict:
    """Train, measure and analyse at one hook (module docstring); the hook's part of results.json. A finished hook
    (``hook.json`` of the same options and the same trained SAEs) is read back."""
    hout = out / slug(hook)
    store = SAEStore(cfg, hook, hout, lambda: inputs.train_caches(hook), lm, log,
                     one_pass=lambda: inputs.one_pass(hook),
                     held_ev=lambda sae, s: recon_with_se(sae, inputs.hook_data(hook).held[s]))
    meas = Measurements(cfg, hout, store, lambda: inputs.hook_data(hook), log)
    runs = plan_runs(cfg)

    def key() -> str:
        return _identity(cfg, hook, [meas.trained_id(r) for r in runs])
    path = hout / "hook.json"
    saved = _saved(path, key()) if all(store.is_done(r) for r in runs) else None
    if saved is not None:
        log(f"[study] {hook}: finished earlier, results reused ({path})")
        return saved
    value = _hook_results(cfg, hook, hout, lm, inputs, store, meas, log)
    return _save(path, key(), value)


def _hook_results(cfg: StudyConfig, hook: str, hout: Path, lm: Any, inputs: StudyInputs, store: SAEStore,
                  meas: Measurements, log: Callable[[str], None]) -> dict:
    runs, t0 = plan_runs(cfg), time.monotonic()
    for i, run in enumerate(runs):
        meas.reconstruction(run)
        store.forget()
        if (i + 1) % 10 == 0 or i + 1 == len(runs):
            log(f"[study]   {hook}: {i + 1}/{len(runs)} SAEs trained and measured")
    t_train = time.monotonic()
    meas.lm(runs)
    t_lm = time.monotonic()
    findings = {}
    for d in cfg.domains:
        own = [r for r in runs if r.domain in (d, None)]
        findings[d] = domain_findings(cfg, d, meas.points(d, own), meas.points(GENERAL, own),
                                      PairedVerdicts(cfg, meas, own, d), PairedVerdicts(cfg, meas, own, GENERAL))
    main = main_runs(cfg)
    ctx = HookContext(cfg, hook, hout, lm, inputs, store, meas, main, log)
    key = _identity(cfg, hook, [meas.trained_id(r) for r in main.values()])
    analyses = {}
    for name in cfg.analyses:
        path = hout / "analyses" / f"{name}.json"
        analyses[name] = _saved(path, key)
        if analyses[name] is None:
            log(f"[study]   {hook}: {name}")
            analyses[name] = _save(path, key, ANALYSES[name](ctx))
    point = resolve_hook(lm.model, hook)
    return {"d_in": hook_d_in(lm.model, point), "sampling": dict(inputs.sampling),
            "sets": set_sizes(inputs.hook_data(hook)),
            "measurements": {r.dirname(cfg.sparsity_knob): {"condition": r.condition, "seed": r.seed,
                                                             "sparsity": r.sparsity, **meas.get(r)} for r in runs},
            "main": {label: r.dirname(cfg.sparsity_knob) for label, r in main.items()},
            "training": training_records(cfg, store, runs),
            "findings": findings, "analyses": analyses,
            "seconds": {"train_and_reconstruction": round(t_train - t0, 1),
                        "model_pass_metrics": round(t_lm - t_train, 1), "analyses": round(time.monotonic() - t_lm, 1)}}


def set_sizes(data: Any) -> dict:
    """Held-out set -> counted tokens and distinct documents of its reconstruction set (explained variance, L0)
    and of its model-pass set (CE-loss score, KL), the units of every paired bootstrap."""
    def size(h: Any) -> dict:
        docs = h.docs[h.mask]
        return {"tokens": int(h.mask.sum()), "documents": int(docs[docs >= 0].unique().numel())}
    return {s: {"reconstruction": size(data.held[s]), "model_pass": size(data.lm_sets[s])}
            for s in data.lm_sets}


def training_records(cfg: StudyConfig, store: SAEStore, runs: list) -> dict:
    """Run id -> {kind, condition, seed, tokens trained, planned tokens} and, for runs trained in stages (the
    plateau), the held-out EV curve, the stop and its reason, the limits (from the run's done marker)."""
    keep = ("curve", "stop", "cap_tokens", "split_tokens", "limit_tokens", "limit_by", "continue_headroom", "capped",
            "target_tokens", "from_run")
    out = {}
    for r in runs:
        marker = store.marker(r)
        out[r.dirname(cfg.sparsity_knob)] = {"kind": r.kind, "condition": r.condition, "seed": r.seed,
                                             "sparsity": r.sparsity, "budget": r.budget,
                                             "tokens": store.trained_tokens(r), "planned_tokens": r.tokens(cfg),
                                             **{k: marker[k] for k in keep if k in marker}}
    return out


def run_study(cfg: StudyConfig, out_dir: Optional[str | Path] = None, *, lm: Any = None,
              log: Callable[[str], None] = print, keep_cache: bool = False) -> dict:
    """Run (or resume) the study and write results.json, report.md, report.html and the figures into ``out_dir``
    (default ``cfg.output_dir``; the one rule for output directories: a new, empty or earlier study directory,
    :func:`~domain_sae.util.outdirs.prepare_output_dir`); returns the results dict plus the report paths. ``lm``: an
    already loaded model (tests, notebooks)."""
    cfg.validate()
    out = prepare_output_dir(Path(out_dir or cfg.output_dir), "study", option="--out")
    est = estimate(cfg)
    log(format_plan(cfg, est))
    t0 = time.monotonic()
    if lm is None:
        lm = load_lm(DataConfig(model=cfg.model, device=cfg.device))
    for hook in cfg.hooks:
        resolve_hook(lm.model, hook)  # a wrong hook name fails before any work
    inputs = StudyInputs(cfg, out, lm, log)
    hooks: dict[str, Any] = {}
    for hook in cfg.hooks:
        log(f"[study] {hook}")
        hooks[hook] = hook_study(cfg, hook, out, lm, inputs, log)
    if not keep_cache:  # kept when the study stops early: a resumed study reads them again
        inputs.remove_caches()
    runs = {r.dirname(cfg.sparsity_knob): {"kind": r.kind, "condition": r.condition, "domain": r.domain,
                                          "seed": r.seed, "sparsity": r.sparsity, "budget": r.budget,
                                          "tokens": r.tokens(cfg), "parent": r.parent() and r.parent().dirname(
                                              cfg.sparsity_knob)} for r in plan_runs(cfg)}
    results: dict[str, Any] = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "question": QUESTION,
        "config": to_dict(cfg), "model": {"name": cfg.model, "source": getattr(lm, "source", None)},
        "estimate": est, "runs": runs, "hooks": hooks, "versions": _versions(),
        "timing_seconds": {"total": round(time.monotonic() - t0, 1)}}
    paths = write_report(results, out)
    log(f"[study] done in {time.monotonic() - t0:.0f} s; report: {paths['report_html']}")
    return {**results, **{k: str(v) for k, v in paths.items()}}


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("domain-sae", "torch", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out
