"""From one SAE's accumulators to store rows: statistics, AUROC, examples (with window activations), logit
effects and neighbours.

Example selection (top-k, per dataset and overall; quantile samples), greedy in order of value (top-k) or of the
reservoir's random keys (quantile samples); a candidate is skipped when

- its window ``[pos - window_before, pos + window_after]`` (clipped to the sequence) holds the same token ids at the
  same offset as an already chosen example (repeated text, e.g. a chat template), or
- it lies in the same sequence as a chosen example with overlapping windows (``|pos - pos'| <= before + after``).

Quantile samples: the reservoir (a uniform sample of the latent's active positions) gives the percentile table
and ``n_intervals`` equal-probability intervals ``[q_j, q_{j+1}]`` of the active values; each interval gets up to
``per_interval`` samples, never a position that is among the top-k examples (overall or per dataset).
The window activations are those of the SAE's own encode at every window position t, without encoding the whole
window: ``z_i(t) = (x_t - a b_dec) . W_enc[:, i] + b_enc[i]`` of the spilled hook activations, shown as
``f_i(t) = ReLU(z_i(t)) * 1[z_i(t) > theta_i] * 1[ReLU(z_i(t)) >= (1 - 1e-4) tau(t)]``, where theta_i is the
latent's JumpReLU threshold (0 for the other architectures) and tau(t) is the smallest non-zero activation of any
latent at t (stored by the streaming pass; +inf where none fired). The tau gate is what makes it exact for the
TopK family (latent i is among the selected at t iff its value reaches the smallest selected one) and changes
nothing for ReLU (every positive latent reaches the smallest positive one); 0 at positions a held-out activation
cache does not hold (special tokens of a cache built without them).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .accumulate import LatentAccumulator, auroc_from_histograms, merged_reservoir
from .detok import single_token_text
from .logit_effects import find_unembedding, logit_effects, nearest_latents
from .options import FeatureOptions

LOC_SHIFT = 1 << 40  # global location = dataset index * LOC_SHIFT + seq * T + pos


def _window(pos: int, T: int, opts: FeatureOptions) -> tuple[int, int]:
    return max(0, pos - opts.window_before), min(T, pos + opts.window_after + 1)


def select_examples(cands, k: int, ids: Sequence[np.ndarray], opts: FeatureOptions, exclude=frozenset()) -> list:
    """Greedy dedup (module docstring) of ``cands``: iterable of ``(value, ds, seq, pos)`` in priority order."""
    chosen, keys, spans = [], set(), {}
    for v, ds, seq, pos in cands:
        if (ds, seq, pos) in exclude:
            continue
        T = ids[ds].shape[1]
        lo, hi = _window(pos, T, opts)
        key = (ids[ds][seq, lo:hi].tobytes(), pos - lo)
        if key in keys or any(abs(pos - p) <= opts.window_before + opts.window_after
                              for p in spans.get((ds, seq), ())):
            continue
        keys.add(key)
        spans.setdefault((ds, seq), []).append(pos)
        chosen.append((float(v), ds, seq, pos))
        if len(chosen) >= k:
            break
    return chosen


def _split_loc(loc: int, T: int) -> tuple[int, int, int]:
    ds, rest = divmod(int(loc), LOC_SHIFT)
    seq, pos = divmod(rest, T)
    return ds, seq, pos


def _stats_rows(j: int, accs: list[LatentAccumulator]) -> tuple[list, list, np.ndarray, np.ndarray]:
    """Per-dataset rows, per-latent overall arrays (density, mean, max, n_active) and AUROC [n_ds, d]."""
    d = accs[0].d
    n_act = torch.stack([a.n_active for a in accs])           # [K, d]
    kept = torch.tensor([a.n_kept for a in accs], dtype=torch.int64)
    hists = [a.histogram() for a in accs]
    K = len(accs)
    auroc = np.full((K, d), np.nan)
    if K > 1:
        total_h, total_in = sum(hists), sum(kept[k] - n_act[k] for k in range(K))
        for k in range(K):
            inact = kept[k] - n_act[k]
            auroc[k] = auroc_from_histograms(hists[k], inact, total_h - hists[k], total_in - inact).numpy()
    ds_rows = []
    for k, a in enumerate(accs):
        dens = (a.n_active.double() / max(a.n_kept, 1)).numpy()
        mean = (a.sum / a.n_active.clamp_min(1)).numpy()
        for i in range(d):
            ds_rows.append((j, i, k, float(dens[i]), float(mean[i]), float(a.max[i]), int(a.n_active[i]),
                            None if np.isnan(auroc[k, i]) else float(auroc[k, i])))
    tot_act = n_act.sum(0)
    overall = {"density": (tot_act.double() / max(int(kept.sum()), 1)).numpy(),
               "mean": (sum(a.sum for a in accs) / tot_act.clamp_min(1)).numpy(),
               "max": torch.stack([a.max for a in accs]).max(0).values.numpy(), "n_active": tot_act.numpy(),
               "hist": sum(hists).numpy()}
    return ds_rows, overall, auroc, kept.numpy()


def _quantile_part(vals: np.ndarray, opts: FeatureOptions) -> tuple[np.ndarray, np.ndarray]:
    if vals.size == 0:
        return np.zeros(0, np.float32), np.zeros(0)
    table = np.quantile(vals.astype(np.float64), np.linspace(0, 1, 101)).astype(np.float32)
    edges = np.quantile(vals.astype(np.float64), np.linspace(0, 1, opts.n_intervals + 1))
    return table, edges


def finalize_sae(conn: sqlite3.Connection, j: int, sae: Any, accs: list[LatentAccumulator],
                 seq_ids: list[torch.Tensor], seq_texts: list[list[list[str]]], spills: list[np.ndarray],
                 opts: FeatureOptions, lm: Any, gates: list[np.ndarray]) -> None:
    """Write the ``latents``, ``latent_datasets`` and ``examples`` rows of SAE ``j`` (``gates``: tau [N, T] per
    dataset, module docstring). Reason for the length: the
    per-latent loop assembles every piece of the latent's row in one pass over its candidates."""
    ids = [t.numpy() for t in seq_ids]
    T = ids[0].shape[1]
    ds_rows, overall, auroc, _ = _stats_rows(j, accs)
    conn.executemany("INSERT INTO latent_datasets VALUES (?, ?, ?, ?, ?, ?, ?, ?)", ds_rows)
    offsets = [k * LOC_SHIFT for k in range(len(accs))]
    r_keys, r_vals, r_locs = (t.numpy() for t in merged_reservoir(accs, offsets))
    tops = [(a.top_vals.numpy(), a.top_locs.numpy()) for a in accs]
    W_enc = sae.W_enc.detach().to("cpu", torch.float32).numpy()
    b_enc = sae.b_enc.detach().to("cpu", torch.float32).numpy()
    shift = sae.b_dec.detach().to("cpu", torch.float32).numpy() if sae.cfg.apply_b_dec_to_input else 0.0
    theta = getattr(sae, "threshold", None)  # JumpReLU's per-latent threshold
    theta = np.zeros(sae.d_sae, np.float32) if theta is None else theta.detach().to("cpu", torch.float32).numpy()
    logits = _logit_tables(sae, lm, opts)
    nb_v, nb_i = nearest_latents(sae.W_dec, opts.n_neighbours)
    hist_rows, ex_rows = [], []
    for i in range(sae.d_sae):
        per_ds, merged = [], []
        for k, (tv, tl) in enumerate(tops):
            c = [(tv[r, i], k, *divmod(int(tl[r, i]), T)) for r in range(tv.shape[0]) if np.isfinite(tv[r, i])]
            per_ds.append(c)
            merged.extend(c)
        merged.sort(key=lambda c: -c[0])
        top = select_examples(merged, opts.top_k, ids, opts)
        ds_tops = [select_examples(c, opts.top_k_per_dataset, ids, opts) for c in per_ds]
        taken = {(e[1], e[2], e[3]) for e in top} | {(e[1], e[2], e[3]) for t in ds_tops for e in t}
        valid = np.isfinite(r_keys[:, i])
        vals, locs = r_vals[valid, i], r_locs[valid, i]
        table, edges = _quantile_part(vals, opts)
        quant = []
        if edges.size:
            which = np.clip(np.searchsorted(edges[1:-1], vals, side="right"), 0, opts.n_intervals - 1)
            for q in range(opts.n_intervals):
                cands = [(vals[r], *_split_loc(locs[r], T)) for r in np.nonzero(which == q)[0]]
                quant.append(select_examples(cands, opts.per_interval, ids, opts, exclude=taken))
        for scope, kind, groups in [(-1, "top", [top])] + [(k, "top", [t]) for k, t in enumerate(ds_tops)] + \
                [(-1, "quantile", quant)]:
            for interval, group in enumerate(groups):
                for rank, (v, ds, seq, pos) in enumerate(group):
                    lo, hi = _window(pos, T, opts)
                    x = spills[ds][seq, lo:hi]
                    z = ((x - shift) @ W_enc[:, i] + b_enc[i]).astype(np.float32)
                    f = np.maximum(z, 0) * (z > theta[i]) * (np.maximum(z, 0) >= (1 - 1e-4) * gates[ds][seq, lo:hi])
                    acts = np.nan_to_num(f.astype(np.float32), nan=0.0)  # NaN: a position a cache does not hold
                    ex_rows.append((j, i, scope, kind, rank, interval if kind == "quantile" else None, ds, seq,
                                    pos, v, lo, acts.tobytes()))
        search = " \u2016 ".join("".join(seq_texts[ds][seq][max(0, pos - opts.window_before):
                                                              pos + opts.window_after + 1])
                                 for _, ds, seq, pos in top[:10])
        spec = auroc[:, i]
        has = not np.all(np.isnan(spec))
        hist_rows.append((j, i, float(overall["density"][i]), float(overall["mean"][i]), float(overall["max"][i]),
                          int(overall["n_active"][i]), overall["hist"][i].astype(np.int64).tobytes(), table.tobytes(),
                          float(np.nanmax(spec)) if has else None, int(np.nanargmax(spec)) if has else None,
                          json.dumps(logits[0][i] if logits else []), json.dumps(logits[1][i] if logits else []),
                          json.dumps([[int(a), round(float(b), 5)] for a, b in zip(nb_i[i], nb_v[i])]),
                          json.dumps([float(e) for e in edges]), search))
        if len(ex_rows) > 20000:
            conn.executemany("INSERT INTO examples VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", ex_rows)
            ex_rows = []
    conn.executemany("INSERT INTO examples VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", ex_rows)
    conn.executemany("INSERT INTO latents VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", hist_rows)


def _logit_tables(sae: Any, lm: Any, opts: FeatureOptions):
    """Per latent ``[[token_id, text, effect], ...]`` positive and negative lists (direct path), or None when the
    hook width differs from the unembedding's (the direct path is not defined there) or n_logits is 0."""
    un = find_unembedding(lm.model)
    if un is None or opts.n_logits == 0 or un.W_U.shape[1] != sae.d_in:
        return None
    pv, pi, nv, ni = logit_effects(sae.W_dec, un, opts.n_logits)
    cache: dict[int, str] = {}

    def text(t: int) -> str:
        if t not in cache:
            cache[t] = single_token_text(lm.tokenizer, t)
        return cache[t]

    pos = [[[int(t), text(int(t)), round(float(v), 5)] for t, v in zip(pi[i], pv[i])] for i in range(sae.d_sae)]
    neg = [[[int(t), text(int(t)), round(float(v), 5)] for t, v in zip(ni[i], nv[i])] for i in range(sae.d_sae)]
    return pos, neg
