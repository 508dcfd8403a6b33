"""The rigorous study: its run plan, config checks, the general mixture's exact token shares, the estimate, and
(marked slow: about 10 minutes on 2 cores) the whole study end to end on a tiny model, then resumed."""

from __future__ import annotations

import json

import pytest
import torch

from domain_sae.activations.cache import build_activation_cache
from domain_sae.config import ConfigError
from domain_sae.data.mixture import weighted_shares
from domain_sae.study.config import GENERAL, scratch_name
from domain_sae.study.full import full_estimate, run_full_study
from domain_sae.study.full_config import FullStudyConfig, is_full_config
from domain_sae.study.full_runs import (SAEStore, budget_condition, general_source, plan_runs, residual_condition,
                                        spec_of)


def _cfg(**kw) -> FullStudyConfig:
    values = dict(model="tiny-llama", hooks=["blocks.1.hook_resid_post"], device="cpu", context_size=32,
                  expansion_factor=2, train_batch_size_tokens=128, buffer_size_tokens=512, general_tokens=512,
                  scratch_tokens=512, finetune_tokens=256, budgets=[128, 256], budget_ladder=[128, 256],
                  seeds=[1, 2], l1_ladder=[0.5, 2.0], eval_tokens=64, recon_tokens=128, residual_d_sae=16,
                  residual_tokens=256, probe_tokens=256, probe_ks=[1, 2], n_prompts=3)
    values.update(kw)
    return FullStudyConfig(**values).validate()


def test_plan_runs_and_parents():
    cfg = _cfg()
    runs = plan_runs(cfg)
    S, L, D, B = 2, 2, 2, 2
    assert len(runs) == S * L + D * (S * L * (1 + 2 * B) + S)
    assert len({r.dirname for r in runs}) == len(runs)
    seen = set()
    for r in runs:  # parents come first
        p = r.parent(cfg)
        assert p is None or p in seen
        seen.add(r)
    ft = [r for r in runs if r.condition == budget_condition("chat", 256)]
    assert {(r.seed, r.sparsity) for r in ft} == {(s, l1) for s in (1, 2) for l1 in (0.5, 2.0)}
    res = [r for r in runs if r.condition == residual_condition("code")]
    assert {r.sparsity for r in res} == {cfg.residual_sparsity} == {cfg.middle_sparsity} and len(res) == 2
    assert sum(r.condition == scratch_name("chat") for r in runs) == S * L
    assert cfg.corpora() == {"chat": "chat", "code": "code", "prose": "prose"}


def test_config_checks():
    for bad in (dict(seeds=[1]), dict(l1_ladder=[1.0]), dict(budget_ladder=[256, 128]), dict(ce_blocks=1),
                dict(general_mix={"prose": 0}), dict(budget_ladder=[64, 256])):
        with pytest.raises(ConfigError):
            _cfg(**bad)
    assert is_full_config({"seeds": [1, 2]}) and not is_full_config({"lr": 1e-3})


def test_ce_for_budgets_off_keeps_the_headline_budget():
    cfg = _cfg(ce_for_budgets=False, budget_ladder=[128, 256, 512], finetune_tokens=256)
    assert cfg.headline_budget == 256
    ce = {(r.kind, r.budget) for r in plan_runs(cfg) if cfg.wants_ce(r)}
    assert ("finetuned", 256) in ce and ("scratch_budget", 256) in ce and ("general", None) in ce
    assert not any(b in (128, 512) for _, b in ce)
    assert all(_cfg().wants_ce(r) for r in plan_runs(_cfg()))


def test_topk_study_varies_k_not_l1():
    cfg = _cfg(architecture="topk", k_ladder=[4, 8, 16])
    assert cfg.sparsity_knob == "k" and cfg.sparsity_ladder == [4, 8, 16] and cfg.middle_sparsity == 8
    runs = plan_runs(cfg)
    assert {r.sparsity for r in runs if r.kind == "scratch"} == {4, 8, 16}
    assert all("_k_" in r.dirname and "_l1_" not in r.dirname for r in runs)
    assert {r.sparsity for r in runs if r.kind == "residual"} == {4}  # stack L0 2 x 4 inside [4, 16]
    assert cfg.with_sparsity(16).k == 16 and cfg.with_sparsity(16).l1_coefficient == cfg.l1_coefficient
    assert _cfg().with_sparsity(3.0).l1_coefficient == 3.0  # ReLU: the ladder is the L1 coefficient
    for bad in (dict(k_ladder=[8]), dict(k_ladder=[8, 8]), dict(k_ladder=[0, 8])):
        with pytest.raises(ConfigError, match="k_ladder"):
            _cfg(architecture="topk", **bad)
    with pytest.raises(ConfigError, match="architecture"):
        _cfg(architecture="matryoshka")


def _caches(cfg, tmp_path, d_in=4):
    """A cache per general-mix corpus; every activation of corpus i is i + noise."""
    caches = {}
    for i, name in enumerate(cfg.general_mix):
        gen = torch.Generator().manual_seed(i)

        def fn(ids, i=i, gen=gen):
            return float(i) + torch.randn((*ids.shape, d_in), generator=gen)
        stream = [(torch.arange(32), torch.ones(32, dtype=torch.int8)) for _ in range(64)]
        caches[name] = build_activation_cache(fn, stream, tmp_path / name, 2048, d_in=d_in)
    return caches


def test_topk_study_run_trains_a_topk_sae_at_the_ladder_k(tiny_lm, tmp_path):
    cfg = _cfg(architecture="topk", k_ladder=[2, 3], hooks=["blocks.0.hook_resid_post"])
    caches = _caches(cfg, tmp_path, d_in=tiny_lm.model.config.hidden_size)
    store = SAEStore(cfg, cfg.hooks[0], tmp_path / "out", caches, tiny_lm, None, log=lambda _: None)
    spec = spec_of(cfg, "scratch", "chat", 1, sparsity=2)
    sae = store.get(spec)
    assert sae.cfg.architecture == "topk" and sae.cfg.k == 2
    z = sae.encode(torch.randn(64, sae.cfg.d_in))
    assert int((z > 0).sum(-1).max()) <= 2  # TopK: at most k latents per token
    assert store.is_done(spec) and store.trained_now == 1
    ft = store.get(spec_of(cfg, "finetuned", "chat", 1, budget=128, sparsity=3))  # trains its general parent too
    assert ft.cfg.k == 3 and store.trained_now == 3


def test_general_source_has_exact_token_shares(tmp_path):
    cfg = _cfg()
    caches = {}
    for i, name in enumerate(cfg.general_mix):
        def fn(ids, i=i):  # every activation of corpus i holds the value i
            return torch.full((*ids.shape, 4), float(i))
        stream = [(torch.arange(32), torch.ones(32, dtype=torch.int8)) for _ in range(64)]
        caches[name] = build_activation_cache(fn, stream, tmp_path / name, 2048, d_in=4)
    src = general_source(cfg, caches, seed=0)
    shares = weighted_shares(cfg.train_batch_size_tokens, cfg.general_mix)
    for _ in range(5):
        batch = next(src)
        assert batch.shape == (cfg.train_batch_size_tokens, 4)
        for i, name in enumerate(cfg.general_mix):
            assert int((batch[:, 0] == i).sum()) == shares[name]


def test_estimate_counts_every_hook():
    one = full_estimate(_cfg())
    two = full_estimate(_cfg(hooks=["blocks.0.hook_mlp_out", "blocks.1.hook_resid_post"]))
    assert one["runs_per_hook"] == len(plan_runs(_cfg())) and one["total_minutes"] > 0
    assert two["total_minutes"] > one["total_minutes"]
    deep = full_estimate(_cfg(hooks=["blocks.15.hook_resid_post"]))["hooks"]["blocks.15.hook_resid_post"]
    shallow = two["hooks"]["blocks.0.hook_mlp_out"]
    assert deep["caches"] > shallow["caches"]  # a deeper hook costs more of the model per cached token


@pytest.mark.slow
def test_full_study_end_to_end_and_resume(smol_tokenizer, tmp_path):
    from conftest import make_tiny_model

    from domain_sae.models.load import LoadedModel
    torch.manual_seed(0)
    lm = LoadedModel(model=make_tiny_model("llama"), tokenizer=smol_tokenizer, name="tiny-llama",
                     source="in-process", family="llama")
    cfg = _cfg(output_dir=str(tmp_path))
    logs: list[str] = []
    res = run_full_study(cfg, tmp_path, lm=lm, log=logs.append)
    assert any("estimated total" in line for line in logs[:6])  # the plan and estimate come first
    stored = json.loads((tmp_path / "results.json").read_text())
    hook = stored["hooks"]["blocks.1.hook_resid_post"]
    for d in ("chat", "code"):
        ev = hook["domains"][d]["metrics"]["ev"]
        assert ev["table"]["by_l0"] and GENERAL in ev["table"]["by_l0"][0]
        assert len(ev["gap_finetuned"]["budgets"]) + len(ev["gap_finetuned"]["not_at_l0"]) == 2
        assert "ce" in hook["domains"][d]["metrics"]
    assert "general vs general (other seed)" in hook["overlap"]["pairs"]
    assert set(hook["probing"]) == {"chat", "code"}
    assert (tmp_path / "report.md").is_file() and res["report_md"].endswith("report.md")
    assert "## Answer" in (tmp_path / "report.md").read_text() and (tmp_path / "report.html").is_file()
    logs.clear()
    run_full_study(cfg, tmp_path, lm=lm, log=logs.append)  # resumed: nothing is trained again
    assert not any("tokens in" in line for line in logs)


def test_topk_conditions_are_compared_at_a_ladder_k_not_between_ladder_points():
    from domain_sae.analysis.matched import RunPoint
    from domain_sae.study.full_analysis import comparison_l0, middle_l0
    cfg = _cfg(architecture="topk", k_ladder=[16, 64])
    pts = [RunPoint(c, s, k, {"l0": k - 0.01 * s, "ev": 0.5 + k / 1000}) for c in ("general", "chat scratch")
           for s in (1, 2) for k in (16, 64)]
    conds = ["general", "chat scratch"]
    assert comparison_l0(cfg, pts, conds, "ev") == pytest.approx(63.98)  # k = 64, clipped to the common range
    assert middle_l0(pts, conds, "ev") == pytest.approx((15.99 * 63.98) ** 0.5)  # ReLU: geometric middle
    assert comparison_l0(_cfg(), pts, conds, "ev") == middle_l0(pts, conds, "ev")


def test_report_opens_with_the_answer_and_renders_html(tmp_path):
    """Findings from synthetic run points (scratch better than general by 0.1, fine-tunes closing a known share of
    the gap) through the report: the answer names the difference and the gap closed, in both formats."""
    from domain_sae.analysis.matched import RunPoint
    from domain_sae.study.full_analysis import domain_findings
    from domain_sae.study.full_report import write_full_report
    from domain_sae.study.full_runs import scratch_budget_condition
    cfg = _cfg(architecture="topk", k_ladder=[16, 64], seeds=[1, 2, 3], budget_ladder=[128, 256],
               finetune_tokens=256, domains={"chat": "chat", "code": "code"})
    value = {GENERAL: 0.5, scratch_name("chat"): 0.6, budget_condition("chat", 128): 0.53,
             budget_condition("chat", 256): 0.58, scratch_budget_condition("chat", 128): 0.4,
             scratch_budget_condition("chat", 256): 0.45}
    pts, gen_pts = [], []
    for cond, v in value.items():
        for seed in (1, 2, 3):
            for k in (16, 64):
                m = {"l0": float(k), "ev": v + k / 1000 + 0.001 * seed, "ce": v + 0.3 + 0.001 * seed}
                pts.append(RunPoint(cond, seed, k, m, {"ev": 1e-4, "ce": 1e-4}))
                if cond == GENERAL or "→" in cond:
                    gen_pts.append(RunPoint(cond, seed, k, {**m, "ev": 0.7, "ce": 0.9}, {"ev": 1e-4, "ce": 1e-4}))
    dom = domain_findings(cfg, "chat", pts, gen_pts)
    assert dom["metrics"]["ev"]["l0"] == 64.0  # compared at the ladder's middle k
    row = next(r for r in dom["metrics"]["ev"]["gap_finetuned"]["budgets"] if r["budget"] == 256)
    assert row["fraction"] == pytest.approx(0.8)  # (0.58 - 0.5) / (0.6 - 0.5)
    results = {"question": "Q?", "model": "tiny", "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
               "hooks": {"blocks.1.hook_resid_post": {"domains": {"chat": dom}, "overlap": {}, "probing": {},
                                                      "timing_seconds": {"saes": 60.0}}}}
    paths = write_full_report(results, tmp_path)
    md = paths["report_md"].read_text()
    answer = md.split("## Answer", 1)[1].split("## Hook", 1)[0]
    assert "chat" in answer and "gap closed at 256 tokens: 80%" in answer and "a difference" in answer
    html = paths["report_html"].read_text()
    assert "<h2>Answer</h2>" in html and "data:image/png;base64," in html and "gap closed at 256 tokens: 80%" in html
