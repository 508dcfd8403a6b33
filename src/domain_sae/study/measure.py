"""Measurements of every run, cached per run (``<out>/<hook>/measure/<run dir>.json``): a resumed study never measures
a finished SAE twice; a measurement is redone only when its run was retrained or its held-out set changed.

- ``recon[set]``: explained variance (float64, about the set's mean) with its jackknife se over held-out sequences,
  and L0, on the set's counted positions (:func:`domain_sae.analysis.matched.ev_with_se`); every run, every set of
  :func:`.runs.eval_sets`. Beside it, ``<run dir>.<set>.recon.npz``: the per-document sums of the reconstruction
  statistics (:func:`recon_doc_stats`, the evaluation's :func:`~domain_sae.evaluation.uncertainty.
  reconstruction_token_stats` about the set's mean, summed per held-out document), so that explained variance too
  is compared by a paired bootstrap over documents.
- ``lm[set]``: the evaluation's metrics with the SAE spliced in (:func:`domain_sae.evaluation.evaluate_saes_on_tokens`:
  CE-loss score, KL score, Δ CE, EV, L0, dead fraction, per segment) with bootstrap standard errors over held-out
  documents (``n_bootstrap``); the runs of :func:`.runs.wants_lm`. SAEs are evaluated in groups of
  :data:`CE_GROUP` that share the clean and ablation passes. Beside it, ``<run dir>.<set>.npz``: the per-document
  sums of that evaluation (:class:`domain_sae.analysis.docstats.DocStats`, :meth:`Measurements.doc_stats`), so
  that any two runs measured on a set can be compared by a paired bootstrap over its documents
  (:mod:`domain_sae.analysis.paired`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from ..analysis.docstats import REC, DocStats
from ..analysis.matched import RunPoint, ev_with_se
from ..evaluation import evaluate_saes_on_tokens
from ..evaluation.uncertainty import DocumentSums, SumKey, reconstruction_token_stats
from ..util.jsonsafe import write_json
from .config import StudyConfig
from .inputs import HeldoutActivations, HookData
from .runs import DONE_MARKER, Run, SAEStore, eval_sets, wants_lm

CE_GROUP = 16           # SAEs evaluated together per set (shared clean and ablation passes)
RECON_CHUNK = 4096
SE_KEYS = ("metrics/ce_loss_score", "metrics/kl_div_score", "metrics/delta_loss", "metrics/explained_variance")
SEGMENT_KEYS = ("metrics/explained_variance", "metrics/ce_loss_score", "tokens/reconstruction_counted",
                "tokens/lm_counted")


@torch.no_grad()
def recon_with_se(sae: Any, held: HeldoutActivations, docs: Optional[DocumentSums] = None) -> dict[str, float]:
    """EV with its per-sequence jackknife se, and L0, on the counted positions of ``held``; with ``docs`` (one
    cluster per distinct document id of the counted positions, in sorted order) their per-document reconstruction
    sums are added to it (:func:`recon_doc_stats`)."""
    x = held.flat
    groups = torch.arange(held.acts.shape[0])[:, None].expand(held.mask.shape)[held.mask]
    cluster = torch.unique(held.docs[held.mask], return_inverse=True)[1]
    mean = x.double().mean(0)
    x_hats, l0 = [], 0.0
    for i in range(0, x.shape[0], RECON_CHUNK):
        x_hat, f = sae.forward_with_latents(x[i:i + RECON_CHUNK])
        x_hats.append(x_hat.float())
        l0 += float((f > 0).sum())
        if docs is not None:
            for k, v in reconstruction_token_stats(x[i:i + RECON_CHUNK], x_hat, f, mean, False).items():
                docs.add(SumKey(REC, k), v, cluster[i:i + RECON_CHUNK])
    ev, se = ev_with_se(x, torch.cat(x_hats), groups)
    return {"ev": ev, "ev_se": se, "l0": l0 / max(1, x.shape[0]), "tokens": int(x.shape[0])}


def recon_doc_stats(sae: Any, held: HeldoutActivations) -> tuple[dict[str, float], DocStats]:
    """:func:`recon_with_se` and the per-document sums of the reconstruction statistics on ``held`` as a
    :class:`DocStats` (key group ``rec``; document ids: those of the counted positions; shift c = the set's mean
    activation, the same for every SAE): its explained variance is 1 - Σe / (Σv - ||Σdx||² / Σn), the value of
    ``ev`` (the same formula over the same positions)."""
    ids = torch.unique(held.docs[held.mask])
    sums = DocumentSums(int(ids.numel()))
    rec = recon_with_se(sae, held, sums)
    return rec, DocStats(ids.numpy(), sums.sums)


class Measurements:
    """The per-run measurement files of one hook, and the run points the findings read."""

    def __init__(self, cfg: StudyConfig, out: Path, store: SAEStore, data: Callable[[], HookData],
                 log: Callable[[str], None] = print):
        self.cfg, self.dir, self.store, self.data, self.log = cfg, Path(out) / "measure", store, data, log
        self.dir.mkdir(parents=True, exist_ok=True)
        self._cache: dict[Run, dict] = {}

    def _path(self, run: Run) -> Path:
        return self.dir / f"{run.dirname(self.cfg.sparsity_knob)}.json"

    def trained_id(self, run: Run) -> str:
        """Identifies the trained SAE (its done marker): a retrained run invalidates its measurements."""
        marker = self.store.run_dir(run) / DONE_MARKER
        return hashlib.sha256(marker.read_bytes()).hexdigest()[:16] if marker.is_file() else ""

    def get(self, run: Run) -> dict:
        if run not in self._cache:
            p = self._path(run)
            rec = json.loads(p.read_text()) if p.is_file() else {}
            if rec.get("trained") != self.trained_id(run) or not self.trained_id(run):
                rec = {"trained": self.trained_id(run), "recon": {}, "lm": {}}
            self._cache[run] = rec
        return self._cache[run]

    def _save(self, run: Run) -> None:
        write_json(self._path(run), self._cache[run], indent=1)

    def _fresh(self, rec: dict, kind: str, s: str, tokens: int) -> bool:
        return s in rec[kind] and rec[kind][s].get("tokens") == tokens

    def reconstruction(self, run: Run) -> None:
        """``recon`` of ``run`` on each of its sets that lacks one (trains the run first when needed)."""
        self.store.get(run)
        rec = self.get(run)
        held = self.data().held
        todo = [s for s in eval_sets(self.cfg, run) if not self._fresh(rec, "recon", s, int(held[s].mask.sum()))
                or not self._recon_path(run, s).is_file()]
        twin = self.twin(run)
        for s in [s for s in todo if twin is not None and self._fresh(self.get(twin), "recon", s,
                                                                       int(held[s].mask.sum()))]:
            self._copy(twin, run, "recon", s)
            todo.remove(s)
        if todo:
            sae = self.store.measured(run)
            for s in todo:
                rec["recon"][s], docs = recon_doc_stats(sae, held[s])
                docs.save(self._recon_path(run, s))
            self._save(run)

    def lm(self, runs: Sequence[Run]) -> int:
        """``lm`` of every run of ``runs`` wanting one, on each of its sets that lacks it; returns the number of
        (SAE, set) pairs evaluated."""
        sets = self.data().lm_sets
        todos = {s: [r for r in runs if wants_lm(self.cfg, r, s) and s in eval_sets(self.cfg, r)
                     and not self._fresh(self.get(r), "lm", s, int(h.mask.sum()))] for s, h in sets.items()}
        copies = {}
        for s, todo in todos.items():  # a run whose SAE is another's takes that one's measurement
            copies[s] = [(r, t) for r in todo if (t := self.twin(r)) is not None
                         and (t in todo or self._fresh(self.get(t), "lm", s, int(sets[s].mask.sum())))]
            todos[s] = [r for r in todo if r not in dict(copies[s])]
        total, done, t0 = sum(len(t) for t in todos.values()), 0, time.monotonic()
        if total:
            self.log(f"[study]   {self.store.hook}: model-pass metrics of {total} (SAE, set) pairs, in groups of "
                     f"{CE_GROUP} sharing the clean and ablation passes")
        for s, todo in todos.items():
            h = sets[s]
            for g in range(0, len(todo), CE_GROUP):
                group = todo[g:g + CE_GROUP]
                saes = {str(i): self.store.measured(r) for i, r in enumerate(group)}
                res = evaluate_saes_on_tokens(saes, self.store.lm, self.store.hook, h.ids, h.segments,
                                              per_segment=True, doc_ids=h.docs, n_bootstrap=self.cfg.n_bootstrap,
                                              bootstrap_seed=self.cfg.seeds[0])
                for i, r in enumerate(group):
                    DocStats.from_result(res[str(i)]).save(self._docs_path(r, s))
                    self.get(r)["lm"][s] = _lm_record(res[str(i)], int(h.mask.sum()))
                    self._save(r)
                done += len(group)
                self.store.forget()
                left = (time.monotonic() - t0) / done * (total - done)
                self.log(f"[study]   {self.store.hook}: {done}/{total} pairs measured, about {left / 60:.0f} min left")
            for r, t in copies[s]:
                self._copy(t, r, "lm", s)
        return done

    def twin(self, run: Run) -> Optional[Run]:
        """An earlier run with the very SAE of ``run``: a scratch_total taken from its scratch run (:mod:`.plateau`)
        at the token count where the scratch SAE stopped, or where a smaller budget's scratch_total was taken (both
        capped at one pass); None otherwise."""
        marker = self.store.marker(run)
        if run.kind != "scratch_total" or "from_run" not in marker:
            return None
        scratch = Run("scratch", run.domain, run.seed, run.sparsity)
        if self.store.marker(scratch).get("tokens") == marker["tokens"]:
            return scratch
        for b in self.cfg.budgets_of("scratch_total"):
            other = Run("scratch_total", run.domain, run.seed, run.sparsity, b)
            if b >= run.budget:
                return None
            m = self.store.marker(other)
            if "from_run" in m and m.get("tokens") == marker["tokens"]:
                return other
        return None

    def _copy(self, src: Run, dst: Run, kind: str, s: str) -> None:
        """``dst``'s ``kind`` measurement on set ``s`` (record and per-document sums) copied from ``src``."""
        self.get(dst)[kind][s] = {**self.get(src)[kind][s], "copied_from": src.dirname(self.cfg.sparsity_knob)}
        path = self._docs_path if kind == "lm" else self._recon_path
        shutil.copyfile(path(src, s), path(dst, s))
        self._save(dst)

    def _docs_path(self, run: Run, s: str) -> Path:
        return self.dir / f"{run.dirname(self.cfg.sparsity_knob)}.{s}.npz"

    def _recon_path(self, run: Run, s: str) -> Path:
        return self.dir / f"{run.dirname(self.cfg.sparsity_knob)}.{s}.recon.npz"

    def doc_stats(self, run: Run, s: str, kind: str = "lm") -> Optional[DocStats]:
        """The per-document sums of ``run``'s model-pass measurement (``kind="lm"``) or reconstruction measurement
        (``"recon"``) on set ``s``, the input of paired comparisons; None when it was not measured (or is stale)."""
        rec = self.get(run).get(kind, {})
        path = self._docs_path(run, s) if kind == "lm" else self._recon_path(run, s)
        return DocStats.load(path) if s in rec and path.is_file() else None

    def points(self, eval_set: str, runs: Sequence[Run]) -> list[RunPoint]:
        """Run points of ``runs`` on ``eval_set``: L0 (with a one-value sparsity ladder, the ladder's value: runs
        are compared at equal sparsity setting, their own L0s reported beside), ``ev`` and, when measured, ``ce``
        (CE-loss score), each with its se."""
        out = []
        for run in runs:
            rec = self.get(run)
            r = rec["recon"].get(eval_set)
            if r is None:
                continue
            l0 = r["l0"] if len(self.cfg.sparsity) > 1 else float(run.sparsity)
            metrics, se = {"l0": l0, "l0_measured": r["l0"], "ev": r["ev"]}, {"ev": r["ev_se"]}
            c = rec["lm"].get(eval_set)
            if c is not None:
                metrics["ce"], se["ce"] = c["metrics"]["metrics/ce_loss_score"], c["se"].get("metrics/ce_loss_score")
            out.append(RunPoint(run.condition, run.seed, run.sparsity, metrics, se))
        return out


def _lm_record(r: Any, tokens: int) -> dict:
    """What results.json keeps of one SAEResult: every overall metric, the bootstrap se of :data:`SE_KEYS`, the
    segments' headline metrics."""
    errors = r.errors.get("overall", {})
    return {"tokens": tokens, "metrics": dict(r.metrics),
            "se": {k: (errors.get(k) or {}).get("se") for k in SE_KEYS},
            "segments": {g: {k: v for k, v in m.items() if k in SEGMENT_KEYS} for g, m in r.segments.items()}}
