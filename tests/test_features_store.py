"""The feature store against brute force on the tiny in-process Llama: densities, histograms, top-k contexts,
quantile samples, AUROC, logit effects, neighbours, comparisons, provenance and the atomic build."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
import torch
from feature_helpers import HOOK, finetuned_copy, heldout_sets, make_sae
from scipy.optimize import linear_sum_assignment

from domain_sae.errors import UserError
from domain_sae.evaluation import HeldoutData, SAESet
from domain_sae.features import build as build_mod
from domain_sae.features.build import build_feature_store
from domain_sae.features.options import FeatureOptions
from domain_sae.features.schema import StoreError, open_store
from domain_sae.features.queries import FeatureStore, NotFound
from domain_sae.models.hooks import capture, resolve_hook

OPTS = {"top_k": 5, "top_k_per_dataset": 3, "window_before": 3, "window_after": 2, "n_intervals": 4,
        "per_interval": 2, "reservoir": 512, "candidates_factor": 40, "n_logits": 5, "n_neighbours": 4}


@pytest.fixture(scope="module")
def module_lm(smol_tokenizer):
    from conftest import make_tiny_model

    from domain_sae.models.load import LoadedModel
    return LoadedModel(model=make_tiny_model("llama"), tokenizer=smol_tokenizer, name="tiny-llama",
                       source="in-process", family="llama")


@pytest.fixture(scope="module")
def built(module_lm, tmp_path_factory):
    tiny_lm, tmp_path = module_lm, tmp_path_factory.mktemp("store")
    parent = make_sae(1)
    child = finetuned_copy(parent, 2, str(tmp_path / "parent"))
    held = heldout_sets(tiny_lm.tokenizer)
    out = build_feature_store(SAESet.of([parent, child], [tmp_path / "parent", tmp_path / "child"]),
                              HeldoutData.live(["chat", "code"], given=held), tmp_path / "f.sqlite", n_tokens=192,
                              lm=tiny_lm, options=FeatureOptions(**OPTS), write=None)
    return out, [parent, child], held


def brute(tiny_lm, sae, held):
    """Per dataset: f [N, T, d] of every position, the kept mask and the ids."""
    hp = resolve_hook(tiny_lm.model, HOOK)
    out = []
    for spec in ("chat", "code"):
        ids, segs = held[spec]
        with torch.no_grad():
            f = sae.encode(capture(tiny_lm.model, hp, ids))
        out.append((f, (segs != 0) & (segs != -1), ids))
    return out


def dedup_top(entries, k, ids_by_ds, wb, wa, exclude=()):
    """Independent greedy dedup: identical windows or overlapping windows in one sequence are skipped."""
    chosen, keys = [], set()
    for v, ds, s, p in entries:
        if (ds, s, p) in exclude:
            continue
        T = ids_by_ds[ds].shape[1]
        lo, hi = max(0, p - wb), min(T, p + wa + 1)
        key = (tuple(ids_by_ds[ds][s, lo:hi].tolist()), p - lo)
        if key in keys or any(c[1] == ds and c[2] == s and abs(c[3] - p) <= wb + wa for c in chosen):
            continue
        keys.add(key)
        chosen.append((v, ds, s, p))
        if len(chosen) == k:
            break
    return chosen


def test_densities_means_max_and_histogram(built, module_lm):
    tiny_lm = module_lm
    out, saes, held = built
    st = FeatureStore(out)
    for j, sae in enumerate(saes):
        bf = brute(tiny_lm, sae, held)
        for i in (0, 7, 31):
            feat = st.feature(j, i)
            vals = torch.cat([f[..., i][m] for f, m, _ in bf])
            act = vals[vals > 0].double()
            assert feat["n_active"] == int((vals > 0).sum())
            assert feat["density"] == pytest.approx(float((vals > 0).double().mean()))
            assert feat["max_act"] == pytest.approx(float(vals.max()), rel=1e-5)
            assert feat["mean_act"] == pytest.approx(float(act.mean()) if act.numel() else 0.0, rel=1e-5)
            for d, (f, m, _) in zip(feat["per_dataset"], bf):
                v = f[..., i][m]
                assert d["density"] == pytest.approx(float((v > 0).double().mean()))
            edges = np.array(feat["histogram"]["log10_edges"])
            expect, _ = np.histogram(np.clip(np.log10(act.numpy()), edges[0], edges[-1] - 1e-12), bins=edges)
            assert feat["histogram"]["counts"] == expect.tolist()


def test_top_k_contexts_match_brute_force(built, module_lm):
    out, saes, held = built
    st = FeatureStore(out)
    bf = brute(module_lm, saes[0], held)
    ids_by_ds = [b[2] for b in bf]
    for i in range(0, 48, 5):
        entries = []
        for ds, (f, m, _) in enumerate(bf):
            for s, p in torch.nonzero(m & (f[..., i] > 0)).tolist():
                entries.append((float(f[s, p, i]), ds, s, p))
        entries.sort(key=lambda e: -e[0])
        want = dedup_top(entries, OPTS["top_k"], ids_by_ds, OPTS["window_before"], OPTS["window_after"])
        feat = st.feature(0, i)
        got = [(e["value"], e["ds"], e["seq"], e["pos"]) for e in feat["top"]]
        assert [g[1:] for g in got] == [w[1:] for w in want]
        assert np.allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-5)
        for ex in feat["top"]:  # the activation of every token of the window, and the window itself
            f = bf[ex["ds"]][0]
            lo, hi = ex["lo"], ex["lo"] + len(ex["acts"])
            assert lo == max(0, ex["pos"] - OPTS["window_before"])
            assert hi == min(f.shape[1], ex["pos"] + OPTS["window_after"] + 1)
            kept = bf[ex["ds"]][1][ex["seq"], lo:hi]  # the SAE is not applied at special/pad positions: 0
            assert np.allclose(ex["acts"], (f[ex["seq"], lo:hi, i] * kept).numpy(), atol=1e-5)
            assert ex["ids"] == held[["chat", "code"][ex["ds"]]][0][ex["seq"], lo:hi].tolist()
        for d, block in enumerate(feat["top_by_dataset"]):
            want_d = dedup_top([e for e in entries if e[1] == d], OPTS["top_k_per_dataset"], ids_by_ds,
                               OPTS["window_before"], OPTS["window_after"])
            assert [(e["ds"], e["seq"], e["pos"]) for e in block["examples"]] == [w[1:] for w in want_d]


def test_quantile_samples_are_active_in_their_interval_and_disjoint_from_top(built, module_lm):
    out, saes, held = built
    st = FeatureStore(out)
    bf = brute(module_lm, saes[1], held)
    checked = 0
    for i in range(48):
        feat = st.feature(1, i)
        vals = torch.cat([f[..., i][m] for f, m, _ in bf])
        act = vals[vals > 0].double().numpy()
        if act.size < 10:
            continue
        # the reservoir (512) holds every active position here, so the interval bounds are exact quantiles
        expect = np.quantile(act, np.linspace(0, 1, OPTS["n_intervals"] + 1))
        assert np.allclose([q["lo"] for q in feat["quantiles"]] + [feat["quantiles"][-1]["hi"]], expect, rtol=1e-5)
        top = {(e["ds"], e["seq"], e["pos"]) for e in feat["top"]}
        top |= {(e["ds"], e["seq"], e["pos"]) for b in feat["top_by_dataset"] for e in b["examples"]}
        for q in feat["quantiles"]:
            assert q["examples"], "every interval of an often-active latent gets samples"
            for e in q["examples"]:
                true = float(bf[e["ds"]][0][e["seq"], e["pos"], i])
                assert true > 0 and bool(bf[e["ds"]][1][e["seq"], e["pos"]])
                assert e["value"] == pytest.approx(true, rel=1e-5)
                assert q["lo"] - 1e-6 <= e["value"] <= q["hi"] + 1e-6
                assert (e["ds"], e["seq"], e["pos"]) not in top
        checked += 1
    assert checked > 10


def test_auroc_between_datasets(built, module_lm):
    out, saes, held = built
    st = FeatureStore(out)
    bf = brute(module_lm, saes[0], held)
    edges = np.array(st.meta["hist_edges"])
    for i in range(0, 48, 3):
        a = bf[0][0][..., i][bf[0][1]].double().numpy()
        b = bf[1][0][..., i][bf[1][1]].double().numpy()
        want = ((a[:, None] > b[None, :]).mean() + 0.5 * (a[:, None] == b[None, :]).mean())
        # binned ties: at most half the same-bin mass products (module docstring of accumulate)
        ha, _ = np.histogram(np.log10(a[a > 0]), bins=edges)
        hb, _ = np.histogram(np.log10(b[b > 0]), bins=edges)
        bound = 0.5 * (ha * hb).sum() / (a.size * b.size) + 1e-9
        got = st.feature(0, i)["per_dataset"]
        assert abs(got[0]["auroc"] - want) <= bound
        assert got[1]["auroc"] == pytest.approx(1 - got[0]["auroc"], abs=1e-9)


def test_logit_effects_and_neighbours(built, module_lm):
    out, saes, _ = built
    st = FeatureStore(out)
    sae = saes[0]
    model = module_lm.model
    W_U = model.lm_head.weight.detach()
    g = model.model.norm.weight.detach()                 # RMSNorm: no centring
    eff = (sae.W_dec.detach() * g) @ W_U.T
    U = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True)
    cos = U @ U.T
    cos.fill_diagonal_(-2)
    for i in (0, 5, 40):
        feat = st.feature(0, i)
        pos = torch.topk(eff[i], 5)
        neg = torch.topk(-eff[i], 5)
        assert [t[0] for t in feat["logits"]["positive"]] == pos.indices.tolist()
        assert np.allclose([t[2] for t in feat["logits"]["positive"]], pos.values.numpy(), atol=1e-4)
        assert [t[0] for t in feat["logits"]["negative"]] == neg.indices.tolist()
        assert feat["logits"]["label"] == "direct path"
        nb = torch.topk(cos[i], 4)
        assert [n[0] for n in feat["neighbours"]] == nb.indices.tolist()
        assert np.allclose([n[1] for n in feat["neighbours"]], nb.values.numpy(), atol=1e-4)


def test_comparison_matching_and_rotation(built):
    out, saes, _ = built
    st = FeatureStore(out)
    c = st.compare(per_page=500)
    A = saes[0].W_dec.detach().double()
    Bm = saes[1].W_dec.detach().double()
    C = (A / A.norm(dim=1, keepdim=True)) @ (Bm / Bm.norm(dim=1, keepdim=True)).T
    r, cidx = linear_sum_assignment(C.numpy(), maximize=True)
    assert sorted((p["a"], p["b"]) for p in c["pairs"]) == sorted(zip(r.tolist(), cidx.tolist()))
    assert c["matched_fraction"] == pytest.approx(float((C.numpy()[r, cidx] >= 0.7).mean()))
    assert c["parent"] == c["a"]
    same = torch.nn.functional.cosine_similarity(A, Bm, dim=1)
    lowest = torch.argsort(same)[:5].tolist()
    assert [x["latent"] for x in c["rotated"][:5]] == lowest
    assert all(u["best_pair_cosine"] < 0.7 for u in c["unmatched_a"])


def test_provenance_schema_and_sequences(built):
    out, _, held = built
    conn = open_store(out)
    meta = {k: json.loads(v) for k, v in conn.execute("SELECT key, value FROM meta")}
    prov = meta["provenance"]
    assert meta["schema_version"] == 1 and meta["complete"] is True
    assert [d["spec"] for d in prov["datasets"]] == ["chat", "code"]
    assert prov["datasets"][0]["tokens"] == held["chat"][0].numel()
    assert prov["datasets"][0]["kept_tokens"] == int((held["chat"][1] != 0).sum())
    assert prov["model"]["name"] == "tiny-llama" and prov["tool_version"]
    assert [s["hook"] for s in prov["saes"]] == [HOOK, HOOK] and "sha256" in prov["saes"][0]
    st = FeatureStore(out)
    with pytest.raises(NotFound):
        st.feature(0, 48)
    with pytest.raises(NotFound):
        st.sae("nope")


def test_sort_search_and_paging(built):
    out, _, _ = built
    st = FeatureStore(out)
    dens = [st.feature(0, i)["density"] for i in range(48)]
    page0 = st.list_features(0, sort="density", per_page=10)
    page1 = st.list_features(0, sort="density", per_page=10, page=1)
    assert page0["total"] == 48
    got = [r["density"] for r in page0["rows"] + page1["rows"]]
    assert got == sorted(dens, reverse=True)[:20]
    hits = st.list_features(0, q="<script>", per_page=500)
    texts = {i: st.conn.execute("SELECT search_text FROM latents WHERE sae_id=0 AND latent=?", (i,)).fetchone()[0]
             for i in range(48)}
    assert {r["latent"] for r in hits["rows"]} == {i for i, t in texts.items() if "<script>" in t}
    assert st.list_features(0, q="#7")["rows"][0]["latent"] == 7
    assert st.list_features(0, q="100%_")["total"] == 0   # LIKE wildcards are literal


def test_killed_build_leaves_no_store_and_existing_store_is_kept(tiny_lm, tmp_path, monkeypatch):
    held = heldout_sets(tiny_lm.tokenizer)
    out = tmp_path / "f.sqlite"

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(build_mod, "finalize_sae", boom)
    with pytest.raises(KeyboardInterrupt):
        build_feature_store(SAESet.of([make_sae(1)]), HeldoutData.live(["chat"], given=held), out, n_tokens=64,
                            lm=tiny_lm, write=None)
    assert not out.exists() and not list(tmp_path.glob("f.sqlite.tmp-*"))
    out.write_bytes(b"old")
    with pytest.raises(UserError, match="already exists"):
        build_feature_store(SAESet.of([make_sae(1)]), HeldoutData.live(["chat"], given=held), out, n_tokens=64,
                            lm=tiny_lm, write=None)
    assert out.read_bytes() == b"old"


def test_unfinished_or_foreign_store_is_refused(tmp_path, built):
    out, _, _ = built
    bad = tmp_path / "half.sqlite"
    bad.write_bytes(out.read_bytes())
    c = sqlite3.connect(bad)
    c.execute("UPDATE meta SET value = 'false' WHERE key = 'complete'")
    c.commit()
    c.close()
    with pytest.raises(StoreError, match="unfinished"):
        open_store(bad)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(StoreError):
        open_store(junk)


def test_memory_is_predicted_and_limited(tiny_lm, tmp_path):
    held = heldout_sets(tiny_lm.tokenizer)
    lines = []
    with pytest.raises(UserError, match="max-memory-gb"):
        build_feature_store(SAESet.of([make_sae(1)]), HeldoutData.live(["chat"], given=held), tmp_path / "f.sqlite",
                            n_tokens=64, lm=tiny_lm, options=FeatureOptions(max_memory_gb=1e-6), write=lines.append)
    assert "predicted peak memory" in lines[0]
    small = build_mod.predict_memory([1000], [32], 2, FeatureOptions(), model_bytes=0, context_size=32, d_model=32,
                                     vocab=100)
    big = build_mod.predict_memory([32768], [32], 2, FeatureOptions(), model_bytes=0, context_size=32, d_model=32,
                                   vocab=100)
    assert big["accumulators"] == pytest.approx(32.768 * small["accumulators"])


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_window_activations_are_the_architectures_own(arch, module_lm, tmp_path):
    """The TopK family selects per token (a latent with a positive pre-activation that is not among the k largest
    shows 0) and JumpReLU gates by its threshold: every window value equals sae.encode at that position."""
    from domain_sae.sae.model_config import SAEModelConfig
    from domain_sae.sae.registry import get_sae_class
    extra = {"k": 4} if arch == "topk" else {"jumprelu_init_threshold": 1.0}
    sae = get_sae_class(arch)(SAEModelConfig(architecture=arch, d_in=32, d_sae=48, apply_b_dec_to_input=False,
                                             metadata={"hook_name": HOOK, "model_name": "tiny-llama",
                                                       "context_size": 32},
                                             **extra))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(32, 48, generator=g) * (3.0 if arch == "topk" else 100.0))
        sae.b_enc.fill_(0.1 if arch == "topk" else -0.3)
    held = heldout_sets(module_lm.tokenizer)
    out = build_feature_store(SAESet.of([sae], [tmp_path / arch]), HeldoutData.live(["chat", "code"], given=held),
                              tmp_path / "f.sqlite", n_tokens=192, lm=module_lm, options=FeatureOptions(**OPTS),
                              write=None)
    st = FeatureStore(out)
    bf = brute(module_lm, sae, held)
    hp = resolve_hook(module_lm.model, HOOK)
    pre = [sae.encode_pre(capture(module_lm.model, hp, held[spec][0])).detach() for spec in ("chat", "code")]
    checked = suppressed = 0
    for i in range(48):
        for ex in st.feature(0, i)["top"]:
            f, kept = bf[ex["ds"]][0], bf[ex["ds"]][1]
            lo, hi = ex["lo"], ex["lo"] + len(ex["acts"])
            want = (f[ex["seq"], lo:hi, i] * kept[ex["seq"], lo:hi]).numpy()
            assert np.allclose(ex["acts"], want, atol=1e-5)
            z = pre[ex["ds"]][ex["seq"], lo:hi, i].numpy()
            suppressed += int(((z > 0) & (want == 0) & kept[ex["seq"], lo:hi].numpy()).sum())
            checked += len(want)
    assert checked > 100 and suppressed > 0  # the gate mattered: ReLU(z) alone would have shown those
