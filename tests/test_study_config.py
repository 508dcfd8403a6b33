"""Study options, the runs as data (plan, parents, names, eval sets, cache sizes), the plan's estimate, the
activation sources (exact general shares, continued runs start after the general SAE's positions) and prompts."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from domain_sae.activations.mixture import MixtureSource, split_evenly
from domain_sae.config import ConfigError
from domain_sae.data.mixture import weighted_shares
from domain_sae.study.config import CONDITIONS, StudyConfig, load_study_config
from domain_sae.study.inputs import _read_prompts, probe_kind
from domain_sae.study.plan import estimate, estimate_minutes, format_plan
from domain_sae.study.runs import (KINDS, Run, _refills, cache_tokens, eval_sets, general_parts, main_runs,
                                   plan_runs, wants_lm)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _cfg(**kw) -> StudyConfig:
    values = dict(domains={"chat": "chat", "code": "code"}, train_batch_size_tokens=128, buffer_size_tokens=512,
                  general_tokens=512, scratch_tokens=512, budgets=[128, 256], seeds=[1, 2], control_seed=None,
                  sparsity=[0.5, 2.0], residual_tokens=256, conditions=list(CONDITIONS))
    values.update(kw)
    return StudyConfig(**values).validate()


# ----------------------------------------------------------------------------------------------------------------
# config

def test_bundled_configs_load_and_fit_their_budgets():
    demo, quick, full = (load_study_config(CONFIGS / f"study_{n}.yaml") for n in ("demo", "quick", "full"))
    assert demo.domains == {"chat": "chat", "code": "code"} and demo.headline < demo.scratch_tokens
    assert estimate_minutes(demo) < 15 and estimate_minutes(quick) < 6  # `dsae demo` within 15 min on 2 cores
    assert full.sparsity_knob == "k" and len(full.hooks) == 2 and full.seeds == [42, 43, 44]
    for name in ("small", "large"):
        load_study_config(CONFIGS / f"study_{name}.yaml")


def test_scale_config_meets_the_issue_and_its_plan_is_an_upper_bound():
    """configs/study_scale.yaml: width >= 8 x d_in (576), TopK, both depths, general and scratch to the plateau, budgets
    log-spaced 10k..1M, the three controls and the KL fine-tune, 2-3 seeds, >= 32k model-pass tokens per set."""
    cfg = load_study_config(CONFIGS / "study_scale.yaml")
    assert cfg.expansion_factor * 576 >= 4608 and cfg.architecture == "topk" and cfg.train_to_plateau
    assert cfg.hooks == ["blocks.0.hook_mlp_out", "blocks.15.hook_resid_post"] and 2 <= len(cfg.seeds) <= 3
    assert cfg.budgets[0] >= 10_000 and cfg.budgets[-1] >= 1_000_000 and cfg.eval_tokens >= 32_768
    ratios = [b / a for a, b in zip(cfg.budgets, cfg.budgets[1:])]
    assert max(ratios) / min(ratios) < 1.1  # log-spaced
    assert {"continue", "scratch_total", "finetune_kl"} <= set(cfg.conditions) and "convergence" in cfg.analyses
    assert set(cfg.kl_budgets) < set(cfg.budgets)
    runs = plan_runs(cfg)
    assert not [r for r in runs if r.kind == "finetune_kl" and r.budget not in cfg.kl_budgets]
    # planned tokens: the caps (the reference SAEs stop at their plateau or one pass, scratch_total at T_g + b)
    assert Run("general", None, 42, 32).tokens(cfg) == cfg.plateau_max_tokens
    assert Run("scratch", "chat", 42, 32).tokens(cfg) == cfg.plateau_max_tokens + max(cfg.budgets)
    assert Run("scratch_total", "chat", 42, 32, 10240).tokens(cfg) == cfg.plateau_max_tokens + 10240
    est = estimate(cfg)
    assert est["upper_bound"] and "at most" in format_plan(cfg, est)
    # scratch_total is taken from the scratch runs: its tokens are not counted again
    without = estimate(load_study_config(CONFIGS / "study_scale.yaml", {"conditions": [
        "general", "scratch", "finetune", "finetune_kl", "continue"]}))
    assert est["stages"]["blocks.0.hook_mlp_out: train"]["tokens"]["sae"] == \
        without["stages"]["blocks.0.hook_mlp_out: train"]["tokens"]["sae"] + 6 * max(cfg.budgets)


def test_every_option_of_a_bundled_config_is_an_option():
    """No option is inherited unused: every StudyConfig field is read by the engine (checked by name in the study
    package's source, outside config.py's own declaration)."""
    src = "".join(p.read_text() for p in (Path(__file__).resolve().parents[1] / "src/domain_sae/study").glob("*.py")
                  if p.name != "config.py")
    own = (Path(__file__).resolve().parents[1] / "src/domain_sae/study/config.py").read_text()
    body = own.split("# -- derived", 1)[1]
    unread = [f for f in StudyConfig.__dataclass_fields__
              if not any(f"{o}.{f}" in src for o in ("cfg", "c")) and f"self.{f}" not in body
              and f"cfg['{f}']" not in src and f'"{f}"' not in src]
    assert unread == []


@pytest.mark.parametrize("values, match", [
    ({"domains": {}}, "at least one"),
    ({"domains": {"general": "chat", "code": "code"}}, "reserved"),
    ({"domains": {"a@b": "chat"}}, "reserved"),
    ({"domains": {"chat": "chat", "code": 3}}, "strings"),
    ({"steer_domain": "legal"}, "steer_domain"),
    ({"control_seed": 1}, "control_seed"),
    ({"budgets": [100]}, "budgets"),
    ({"budgets": [256, 128]}, "budgets"),
    ({"headline_budget": 200}, "headline_budget"),
    ({"conditions": ["general", "finetune"]}, "scratch"),
    ({"conditions": ["general", "scratch", "magic"]}, "unknown"),
    ({"analyses": ["vibes"]}, "unknown"),
    ({"architecture": "matryoshka"}, "architecture"),
    ({"architecture": "topk", "sparsity": [4, 4.5]}, "integers"),
    ({"sparsity": [1.0, 1.0]}, "distinct"),
    ({"general_mix": {"prose": 0}}, "positive weights"),
    ({"buffer_size_tokens": 10}, "buffer_size_tokens"),
    ({"prompt_labels": ["a"]}, "prompt_labels"),
    ({"match_threshold": 1.5}, "match_threshold"),
    ({"kl_budgets": [100]}, "kl_budgets"),
    ({"train_to_plateau": True, "plateau_first_tokens": 64}, "plateau_first_tokens"),
    ({"train_to_plateau": True, "plateau_max_tokens": 100}, "plateau_max_tokens"),
    ({"n_paired_bootstrap": 10}, "n_paired_bootstrap"),
])
def test_invalid_options_are_refused_with_the_option_named(values, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(**values)


def test_load_rejects_unknown_options_and_applies_overrides(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("domains: {legal: my_legal.jsonl, med: med.parquet}\nsteer_domain: legal\ngeneral_tokens: 8192\n")
    cfg = load_study_config(p, {"scratch_tokens": 1e4})
    assert cfg.domains == {"legal": "my_legal.jsonl", "med": "med.parquet"} and cfg.scratch_tokens == 10_000
    assert cfg.general_weights() == {"legal": 1.0, "med": 1.0}  # empty general_mix: equal shares of the domains
    p.write_text("general_tokenz: 5\n")
    with pytest.raises(ConfigError, match="general_tokens"):
        load_study_config(p)


def test_derived_values():
    cfg = _cfg(general_mix={"prose": 0.4, "chat": 0.3, "code": 0.3}, sparsity=[2.0, 5.0, 12.0])
    assert cfg.corpora() == {"chat": "chat", "code": "code", "prose": "prose"}
    assert cfg.middle_sparsity == 5.0 == cfg.residual_sparsity and cfg.headline == 256 and cfg.other_seed == 2
    assert cfg.steer == "code" and cfg.sparsity_knob == "l1"
    k = _cfg(architecture="topk", sparsity=[4, 8, 16], seeds=[7], control_seed=9)
    assert k.sparsity_knob == "k" and k.residual_sparsity == 4 and k.other_seed == 9  # stack L0 2 x 4 in range


# ----------------------------------------------------------------------------------------------------------------
# runs

def test_plan_runs_counts_parents_and_names():
    cfg = _cfg()
    runs = plan_runs(cfg)
    S, L, D, B = 2, 2, 2, 2
    per_domain = S * L * (1 + 4 * B) + S  # scratch + 4 per-budget kinds, residual once per seed
    assert len(runs) == S * L + S * L * B + D * per_domain  # general, continue, domains
    assert len({r.dirname(cfg.sparsity_knob) for r in runs}) == len(runs)
    seen = set()
    for r in runs:  # parents come first, with the same seed and sparsity
        p = r.parent()
        assert p is None or (p in seen and p.seed == r.seed and p.sparsity == r.sparsity)
        seen.add(r)
    kl = Run("finetune_kl", "chat", 1, 0.5, 128)
    assert kl in runs and KINDS["finetune_kl"].options == {"objective": "kl"} and KINDS["finetune_kl"].live
    assert Run("scratch_total", "code", 1, 0.5, 128).tokens(cfg) == 512 + 128  # equal total tokens
    assert Run("continue", None, 1, 0.5, 256).condition == "general continued @ 256"
    assert {r.sparsity for r in runs if r.kind == "residual"} == {cfg.residual_sparsity}
    one = _cfg(seeds=[42], control_seed=43, sparsity=[5.0], conditions=["general", "scratch", "finetune"])
    assert [r.seed for r in plan_runs(one) if r.kind == "general"] == [42, 43]  # the seed control: general only


def test_main_runs_eval_sets_and_model_pass_choice():
    cfg = _cfg(analyses=["matrix"], ce_for_budgets=False)
    main = main_runs(cfg)
    assert list(main) == ["general", "general (seed 2)", "chat scratch", "code scratch", "general→chat",
                          "general→code"]
    assert main["general→chat"] == Run("finetune", "chat", 1, 2.0, 256)
    assert eval_sets(cfg, main["chat scratch"]) == ["general", "chat", "code"]  # the matrix: every set
    assert eval_sets(cfg, Run("scratch", "chat", 2, 2.0)) == ["chat"]
    assert eval_sets(cfg, Run("finetune", "chat", 2, 0.5, 128)) == ["chat", "general"]  # forgetting
    assert eval_sets(cfg, Run("continue", None, 1, 0.5, 128)) == ["general", "chat", "code"]
    assert not wants_lm(cfg, Run("finetune", "chat", 1, 0.5, 128)) and wants_lm(cfg, main["general→chat"])


def test_cache_sizes_cover_every_consumer():
    cfg = _cfg(general_mix={"prose": 0.4, "chat": 0.3, "code": 0.3})
    parts = general_parts(cfg)
    assert {k: b for k, (b, _) in parts.items()} == weighted_shares(128, cfg.general_weights())
    b, buf = parts["prose"]
    # the general SAE reads whole refills of each part, the continued runs the refills after them
    assert cache_tokens(cfg, "prose") == (_refills(512, b, buf, 128) + _refills(256, b, buf, 128)) * buf
    assert cache_tokens(cfg, "chat") == 512 + 256  # scratch at equal total tokens: general + largest budget
    assert _refills(512, 64, 256, 128) == math.ceil(4 / 4)


def test_estimate_counts_every_hook():
    one = estimate(_cfg(hooks=["blocks.0.hook_mlp_out"]))
    two = estimate(_cfg(hooks=["blocks.0.hook_mlp_out", "blocks.15.hook_resid_post"]))
    assert two["minutes"] > one["minutes"] > 0 and one["runs_per_hook"] == len(plan_runs(_cfg()))
    assert "blocks.15.hook_resid_post: train" in two["stages"]
    deep = estimate(_cfg(hooks=["blocks.15.hook_resid_post"]))["stages"]["caches"]["seconds"]
    assert deep > one["stages"]["caches"]["seconds"]  # a deeper hook costs more of the model per cached token
    text = format_plan(_cfg(), one)
    assert text.startswith("Study plan") and "total" in text


# ----------------------------------------------------------------------------------------------------------------
# inputs

class _Counter:
    """A fake activation source: batches of ``value + step`` of width 2; state = steps served."""

    def __init__(self, value: float, batch: int):
        self.value, self.batch, self.step = value, batch, 0

    def __next__(self):
        self.step += 1
        return torch.full((self.batch, 2), self.value + self.step)

    def first_buffer(self):
        return torch.full((3 * self.batch, 2), self.value)

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, s):
        self.step = s["step"]


def test_mixture_source_serves_exact_shares_and_resumes():
    assert split_evenly(10, 3) == [4, 3, 3] and sum(split_evenly(4096, 3)) == 4096
    mix = MixtureSource(_Counter(0, 3), _Counter(100, 2))
    b = next(mix)
    assert b.shape == (5, 2) and b[:3, 0].tolist() == [1, 1, 1] and b[3:, 0].tolist() == [101, 101]
    state = mix.state_dict()
    expected = next(mix)
    other = MixtureSource(_Counter(0, 3), _Counter(100, 2))
    other.load_state_dict(state)
    assert torch.equal(next(other), expected)


def test_what_a_domain_is_comes_from_its_data(tmp_path):
    assert probe_kind("chat") == "chat" and probe_kind("code") == "code"
    (tmp_path / "notes.txt").write_text("Dear diary, today it rained (again) and I stayed in.\n")
    assert probe_kind(str(tmp_path / "notes.txt")) is None
    py = tmp_path / "py"
    py.mkdir()
    (py / "a.py").write_text("def f(x):\n    return x + 1\n")
    assert probe_kind(str(py)) == "code"  # a domain named anything holding Python gets the token-type probe


def test_prompt_files(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("first prompt\n\n  second prompt  \nthird\n")
    assert _read_prompts(str(p), 2) == ["first prompt", "second prompt"]
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ConfigError, match="no prompts"):
        _read_prompts(str(tmp_path / "empty.txt"), 5)
