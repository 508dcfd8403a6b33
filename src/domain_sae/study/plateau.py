"""Training the study's reference SAEs to the plateau (``train_to_plateau``), in stages.

A general or scratch SAE trains at a constant learning rate after warm-up (:func:`.config.plateau_schedule`, so
the SAE at any checkpoint is the SAE a shorter run would give) and pauses at the optimizer steps

    s_j = :func:`domain_sae.analysis.convergence.plateau_checkpoints` (first, limit, plateau_per_doubling)

(first = ceil(plateau_first_tokens / B) steps, B = train_batch_size_tokens: exact doublings of the first one, each
checkpoint's half again a checkpoint). At each pause its held-out explained variance on its own reconstruction set
(the general mixture's, or its domain's) is measured (EV and L0, float64, from the held-out activation cache) and
:func:`domain_sae.analysis.convergence.stop_decision` is taken over the curve so far, with the run's limit as the
"one pass": the run stops when EV gains less than 0.005 per doubling over the last doubling (``plateau``) or at
its limit, whichever comes first. The limit (:func:`limits`) is

    domain SAE:   min(plateau_max_tokens, N_d)                N_d: the domain's training split, when the cache
                                                              holds all of it (else unknown)
    general SAE:  min(plateau_max_tokens, N_g - b_max)        N_g = min_p N_p B / B_p: the general tokens at which
                                                              the first mixture part p (B_p tokens of every batch)
                                                              runs out; b_max the largest budget when continue runs
                                                              (it reads fresh general tokens after the general SAE)

and the stop is called ``one_pass`` when the split set the limit, ``max_tokens`` when the cap did. Every pause
writes the SAE and the full training state (:func:`domain_sae.runs.single.train_in_stages`) and the curve
(``plateau.json`` in the run directory), so a killed study continues the run from its last pause.

``scratch_total`` under ``train_to_plateau`` is the same recipe (same schedule, seed and data order as the scratch
SAE of its seed) run to T_g + b tokens, T_g the general SAE's tokens, at most N_d (``capped`` says so). Being the
same trajectory, it is taken from the scratch SAE's run: that run also pauses at each such token count (going on
past its own stop when one is beyond it) and hands the SAE there to ``snapshots`` (the scratch SAE itself stays the
one at its stop, kept in ``plateau_sae/`` meanwhile); a scratch_total run trained alone gives the same SAE.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

from ..analysis.convergence import plateau_checkpoints, stop_decision
from ..config import TrainConfig
from ..data.mixture import weighted_shares
from ..runs import single
from ..sae.io import load_sae
from ..util.atomic import atomic_directory
from ..util.jsonsafe import jsonable, write_json
from .config import StudyConfig, plateau_schedule

PLATEAU_FILE = "plateau.json"
PLATEAU_SAE = "plateau_sae"
TO_PLATEAU = ("general", "scratch")


def to_plateau(cfg: StudyConfig, run: Any) -> bool:
    """Whether ``run`` trains to the plateau (general and scratch SAEs under ``train_to_plateau``)."""
    return cfg.train_to_plateau and run.kind in TO_PLATEAU


def staged(cfg: StudyConfig, run: Any) -> bool:
    """Whether ``run`` trains in stages with the plateau schedule: the plateau runs and scratch_total."""
    return cfg.train_to_plateau and run.kind in TO_PLATEAU + ("scratch_total",)


def first_steps(cfg: StudyConfig) -> int:
    return max(1, math.ceil(cfg.plateau_first_tokens / cfg.train_batch_size_tokens))


def schedule(cfg: StudyConfig) -> dict[str, int]:
    return plateau_schedule(first_steps(cfg))


def limits(cfg: StudyConfig, run: Any, cap: int, one_pass: dict[str, Optional[int]]) -> tuple[int, dict]:
    """(limit tokens, facts): the most tokens ``run`` trains on (module docstring) and what set it."""
    headroom = 0
    if run.domain is not None:
        split = one_pass.get(run.domain)
    else:
        shares = weighted_shares(cfg.train_batch_size_tokens, cfg.general_weights())
        ends = [one_pass[p] * cfg.train_batch_size_tokens // shares[p] for p in shares if one_pass.get(p)]
        split = min(ends) if ends else None
        headroom = max(cfg.budgets) if "continue" in cfg.conditions else 0
    room = None if split is None else max(cfg.train_batch_size_tokens, split - headroom)
    limit = int(cap if room is None else min(cap, room))
    return limit, {"cap_tokens": int(cap), "split_tokens": split, "continue_headroom": headroom,
                   "limit_tokens": limit, "limit_by": "split" if room is not None and room < cap else "cap"}


def read_record(run_dir: Path) -> dict:
    try:
        return dict(json.loads((Path(run_dir) / PLATEAU_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return {}


def _decide(cfg: StudyConfig, name: str, run_dir: Path, step: int, batch: int, last: int, sae: Any,
            evaluate: Callable[[Any], dict], record: dict, log: Callable[[str], None]) -> bool:
    """Measure the SAE at ``step``, add it to the curve (``plateau.json``) and take the stop decision."""
    m = evaluate(sae)
    curve = [c for c in read_record(run_dir).get("curve", []) if c["steps"] < step]
    curve.append({"steps": step, "tokens": step * batch, "ev": float(m["ev"]), "l0": float(m["l0"])})
    dec = stop_decision([c["tokens"] for c in curve], [c["ev"] for c in curve], last * batch)
    reason = dec.reason if dec.reason != "one_pass" else ("one_pass" if record["limit_by"] == "split"
                                                          else "max_tokens")
    text = dec.format() if reason != "max_tokens" else dec.format().replace(
        "one pass over the training split", f"the cap plateau_max_tokens = {cfg.plateau_max_tokens:,}")
    record.update(curve=curve, tokens=step * batch, stop_step=step if dec.stop else None,
                  stop={"stopped": dec.stop, "reason": reason, "text": text,
                        "slope_per_doubling": dec.plateau.slope, "plateau": dec.plateau.to_dict()})
    write_json(run_dir / PLATEAU_FILE, jsonable(record), indent=1)
    log(f"[study]     {name}: {step * batch:,} tokens, held-out EV {m['ev']:.4f}; {text}")
    return dec.stop


def train_staged(cfg: StudyConfig, tcfg: TrainConfig, *, lm: Any, source: Any, limit: int, split: dict,
                 evaluate: Optional[Callable[[Any], dict]], log: Callable[[str], None] = print,
                 snapshots: Optional[dict[int, Callable[[Any, int], None]]] = None) -> tuple[Any, dict]:
    """Train ``tcfg`` in stages to its plateau (``evaluate(sae) -> {"ev", "l0", ...}`` given) or straight to
    ``limit`` tokens (scratch_total alone); ``snapshots``: tokens -> ``fn(sae, tokens)`` called with the SAE at that
    many tokens (scratch_total from the scratch run). Returns the SAE at the stop and the record the study keeps
    (tokens, curve, stop, limits)."""
    batch = tcfg.train_batch_size_tokens
    last = max(1, limit // batch)
    snaps = {max(1, t // batch): fn for t, fn in (snapshots or {}).items()}
    checks = set(plateau_checkpoints(min(first_steps(cfg), last), last, cfg.plateau_per_doubling)) if evaluate \
        else {last}
    stops = sorted(checks | set(snaps))
    run_dir = Path(tcfg.output_dir) / tcfg.run_name
    record: dict = {"tokens": None, "stop_step": None, **split}
    first_pause = [True]

    def go_on(step: int, sae: Any) -> bool:
        if first_pause.pop() if first_pause else False:  # a run continued past its stop (snapshots) keeps it
            prev = read_record(run_dir)
            if evaluate and prev.get("stop_step") is not None and prev["stop_step"] <= step:
                record.update(prev)
        if record["stop_step"] is None and step in checks:
            if evaluate is None:
                record.update(tokens=step * batch, stop_step=step, capped=limit < tcfg.training_tokens)
            elif _decide(cfg, tcfg.run_name, run_dir, step, batch, last, sae, evaluate, record, log) and any(
                    s > step for s in snaps):
                with atomic_directory(run_dir / PLATEAU_SAE) as tmp:  # the SAE at the stop, while the run goes on
                    sae.save(tmp)
        if step in snaps:
            snaps[step](sae, step * batch)
        return record["stop_step"] is None or any(s > step for s in snaps)

    res = single.train_in_stages(tcfg, stops, go_on, lm=lm, source=source, quiet=True)
    sae = res.sae
    if record["stop_step"] is not None and record["stop_step"] < res.summary["steps"]:
        with atomic_directory(run_dir / "sae") as tmp:
            shutil.copytree(run_dir / PLATEAU_SAE, tmp, dirs_exist_ok=True)
        sae = load_sae(run_dir / "sae")
    if record["tokens"] is None and evaluate:  # a finished run read back (no pause asked)
        record.update(read_record(run_dir))
    record["tokens"] = record.get("tokens") or int(res.summary["training_tokens"])
    return sae, record
