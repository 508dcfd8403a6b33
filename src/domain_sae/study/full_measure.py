"""Measurements of the rigorous study, cached per run (``<out>/<hook>/measure/<run dir>.json``) so a resumed study
never measures a finished SAE twice.

- Reconstruction on a held-out set (truncated model pass, once per set): explained variance with its jackknife se
  over held-out sequences, and L0 (:func:`domain_sae.analysis.matched.ev_with_se`).
- CE-loss score on a held-out token set (full model passes): the set is cut into ``ce_blocks`` blocks of
  sequences; every block is evaluated for a group of SAEs at once (one clean and one ablation pass shared), and the
  score and its jackknife se come from the block sums (:func:`domain_sae.analysis.matched.ce_score_with_se`).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..analysis.matched import RunPoint, ce_score_with_se, ev_with_se
from ..evaluation import evaluate_saes_on_tokens
from ..sae.residual import ResidualStackSAE
from .config import GENERAL
from .full_runs import RunSpec, SAEStore
from .inputs import HeldoutActivations

__all__ = ["eval_sets_of", "measured_sae", "recon_with_se", "Measurements", "CE_GROUP"]

CE_GROUP = 16          # SAEs evaluated together per block (shared clean and ablation passes)
RECON_CHUNK = 4096


def eval_sets_of(spec: RunSpec, domains: Sequence[str]) -> list[str]:
    """Held-out sets a run is measured on: its domain, plus the general set where forgetting or the general SAE's
    own quality is asked (fine-tuned and residual runs); the general SAE on every set."""
    if spec.kind == "general":
        return [GENERAL, *domains]
    if spec.kind in ("finetuned", "residual"):
        return [spec.domain, GENERAL]
    return [spec.domain]


def measured_sae(store: SAEStore, spec: RunSpec) -> Any:
    """The SAE that is measured for ``spec``: the stack general + residual for residual runs."""
    sae = store.get(spec)
    if spec.kind == "residual":
        return ResidualStackSAE(store.get(spec.parent(store.cfg)), sae)
    return sae


@torch.no_grad()
def recon_with_se(sae: Any, held: HeldoutActivations) -> dict[str, float]:
    """EV (float64, about the mean of the set) with its per-sequence jackknife se, L0, on the counted positions."""
    x = held.flat
    groups = torch.arange(held.acts.shape[0])[:, None].expand(held.mask.shape)[held.mask]
    x_hats, l0 = [], 0.0
    for i in range(0, x.shape[0], RECON_CHUNK):
        x_hat, f = sae.forward_with_latents(x[i:i + RECON_CHUNK])
        x_hats.append(x_hat.float())
        l0 += float((f > 0).sum())
    ev, se = ev_with_se(x, torch.cat(x_hats), groups)
    return {"ev": ev, "ev_se": se, "l0": l0 / max(1, x.shape[0])}


class Measurements:
    """Per-run measurement cache of one hook, and the run points of every eval set for the analyses."""

    def __init__(self, out: Path, store: SAEStore, held: dict[str, HeldoutActivations],
                 ce_sets: dict[str, tuple[torch.Tensor, torch.Tensor]], ce_blocks: int,
                 log: Callable[[str], None] = print):
        self.dir = Path(out) / "measure"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.store, self.held, self.ce_sets, self.ce_blocks, self.log = store, held, ce_sets, ce_blocks, log
        self.data: dict[RunSpec, dict] = {}
        self.domains = list(store.cfg.domains)

    def _path(self, spec: RunSpec) -> Path:
        return self.dir / f"{spec.dirname}.json"

    def _load(self, spec: RunSpec) -> dict:
        if spec not in self.data:
            p = self._path(spec)
            self.data[spec] = json.loads(p.read_text()) if p.is_file() else {"recon": {}, "ce": {}}
        return self.data[spec]

    def _save(self, spec: RunSpec) -> None:
        tmp = self._path(spec).with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data[spec], indent=1))
        tmp.replace(self._path(spec))

    def reconstruction(self, specs: Sequence[RunSpec]) -> None:
        for spec in specs:
            rec = self._load(spec)
            todo = [s for s in eval_sets_of(spec, self.domains) if s not in rec["recon"]]
            if todo:
                sae = measured_sae(self.store, spec)
                for s in todo:
                    rec["recon"][s] = recon_with_se(sae, self.held[s])
                self._save(spec)

    def ce(self, specs: Sequence[RunSpec]) -> int:
        """CE-loss score (with jackknife se) of every spec on its eval sets that lack one; returns the number of
        (SAE, set) pairs evaluated."""
        n_done = 0
        todos = {s: [sp for sp in specs if s in eval_sets_of(sp, self.domains) and s not in self._load(sp)["ce"]]
                 for s in self.ce_sets}
        total, t0 = sum(len(t) for t in todos.values()), time.monotonic()
        if total:
            self.log(f"[study]   CE-loss scores: {total} (SAE, set) pairs, in groups of {CE_GROUP} sharing the "
                     f"clean and ablation passes")
        for s, (ids, segs) in self.ce_sets.items():
            todo = todos[s]
            for g in range(0, len(todo), CE_GROUP):
                group = todo[g:g + CE_GROUP]
                saes = {sp.dirname: measured_sae(self.store, sp) for sp in group}
                blocks: dict[str, list[dict]] = {sp.dirname: [] for sp in group}
                step = math.ceil(ids.shape[0] / self.ce_blocks)
                for b in range(0, ids.shape[0], step):
                    res = evaluate_saes_on_tokens(saes, self.store.lm, self.store.lm_hook, ids[b:b + step],
                                                  segs[b:b + step], per_segment=False)
                    for name, r in res.items():
                        m = r.metrics
                        blocks[name].append({"ce_loss_without_sae": m["metrics/ce_loss_without_sae"],
                                             "ce_loss_with_sae": m["metrics/ce_loss_with_sae"],
                                             "ce_loss_with_ablation": m["metrics/ce_loss_with_ablation"],
                                             "n_tokens": int(m.get("tokens/lm_counted", 0) or r.tokens.get(
                                                 "lm_counted", 0))})
                for sp in group:
                    score, se = ce_score_with_se(blocks[sp.dirname])
                    self._load(sp)["ce"][s] = {"ce": score, "ce_se": se, "blocks": blocks[sp.dirname]}
                    self._save(sp)
                    n_done += 1
                self.store.forget(lambda sp: sp.kind == "general")
                eta = (time.monotonic() - t0) / n_done * (total - n_done)
                self.log(f"[study]   CE-loss scores: {n_done}/{total} pairs done, about {eta / 60:.0f} min left")
        return n_done

    def points(self, eval_set: str, specs: Sequence[RunSpec]) -> list[RunPoint]:
        """Run points (L0, EV, CE score when measured) of ``specs`` on ``eval_set``."""
        out = []
        for spec in specs:
            rec = self._load(spec)
            r = rec["recon"].get(eval_set)
            if r is None:
                continue
            metrics, se = {"l0": r["l0"], "ev": r["ev"]}, {"ev": r["ev_se"]}
            c = rec["ce"].get(eval_set)
            if c is not None:
                metrics["ce"], se["ce"] = c["ce"], c["ce_se"]
            out.append(RunPoint(spec.condition, spec.seed, spec.sparsity, metrics, se))
        return out
