"""Study options, the plan/time estimate, and the study's inputs (mixture source, held-out mix, prompt files)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from domain_sae.activations.mixture import MixtureSource, split_evenly
from domain_sae.config import ConfigError
from domain_sae.study.config import StudyConfig, load_study_config
from domain_sae.study.inputs import _read_prompts
from domain_sae.study.plan import (ASSUMED, Throughput, cache_tokens_per_domain, estimate_minutes, format_plan,
                                   n_overlap_pairs, study_plan)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# ----------------------------------------------------------------------------------------------------------------
# config

def test_bundled_configs_load_and_fit_their_budgets():
    demo = load_study_config(CONFIGS / "study_demo.yaml")
    quick = load_study_config(CONFIGS / "study_quick.yaml")
    assert demo.domains == {"chat": "chat", "code": "code"}
    assert demo.finetune_tokens < demo.scratch_tokens
    # `dsae demo` must finish within 30 minutes on 2 cores, `--quick` in about 5 (assumed throughputs)
    assert estimate_minutes(demo) < 25
    assert estimate_minutes(quick) < 6


def test_defaults_are_valid_and_name_the_saes():
    cfg = StudyConfig().validate()
    assert cfg.sae_names() == ["general", "general (seed 2)", "chat scratch", "code scratch", "general→chat",
                               "general→code"]


@pytest.mark.parametrize("values, match", [
    ({"domains": {"chat": "chat"}}, "at least two"),
    ({"domains": {"general": "chat", "code": "code"}}, "reserved"),
    ({"domains": {"chat": "chat", "code": 3}}, "strings"),
    ({"steer_domain": "legal"}, "steer_domain"),
    ({"control_seed": 42}, "control_seed"),
    ({"budgets": [100]}, "budgets"),
    ({"budgets": []}, "budgets"),
    ({"finetune_tokens": 10}, "finetune_tokens"),
    ({"buffer_size_tokens": 10}, "buffer_size_tokens"),
    ({"prompt_labels": ["a"]}, "prompt_labels"),
    ({"steering_strengths": []}, "steering_strengths"),
    ({"match_threshold": 1.5}, "match_threshold"),
])
def test_invalid_options_are_refused_with_the_option_named(values, match):
    with pytest.raises(ConfigError, match=match):
        StudyConfig(**values).validate()


def test_load_rejects_unknown_options_and_applies_overrides(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("domains: {legal: my_legal.jsonl, med: med.parquet}\nsteer_domain: legal\ngeneral_tokens: 8192\n")
    cfg = load_study_config(p, {"scratch_tokens": 1e4})
    assert cfg.domains == {"legal": "my_legal.jsonl", "med": "med.parquet"} and cfg.scratch_tokens == 10_000
    p.write_text("general_tokenz: 5\n")
    with pytest.raises(ConfigError, match="general_tokens"):
        load_study_config(p)


# ----------------------------------------------------------------------------------------------------------------
# plan

def test_plan_counts_tokens_per_stage():
    cfg = StudyConfig(domains={"a": "a", "b": "b", "c": "c"}, general_tokens=30_000, scratch_tokens=20_000,
                      finetune_tokens=5_000, budgets=[4096, 8192], eval_tokens=1000, steering_strengths=[1.0, 2.0],
                      steering_tokens=500, generate_tokens=10)
    st = {s.name: s for s in study_plan(cfg)}
    assert cache_tokens_per_domain(cfg) == 20_000  # max(scratch, general / 3, finetune, largest budget)
    assert st["train"].tokens["sae"] == 2 * 30_000 + 3 * 20_000 + 3 * 5_000 and st["train"].runs == 8
    assert st["budgets"].tokens["sae"] == 2 * 3 * (4096 + 8192) and st["budgets"].runs == 12
    # matrix: 4 eval sets x 1000 tokens x (8 SAEs + clean + zero-ablation) full passes
    assert st["matrix"].tokens["full"] == 4 * 1000 * (8 + 2)
    # steering: per domain clean + 4 directions x 2 strengths + 3 ablations; 2 prompts x (1 + 8) x 10 generated
    assert st["steering"].tokens == {"full": 3 * 500 * (1 + 8 + 3), "generated": 2 * 9 * 10}
    assert n_overlap_pairs(3) == 1 + 3 + 3 + 3
    # seconds follow from tokens / rates: halving the SAE rate adds exactly the SAE time again
    slow = Throughput(sae_tokens_per_s=ASSUMED.sae_tokens_per_s / 2)
    sae_s = (st["train"].tokens["sae"] + st["budgets"].tokens["sae"]) / ASSUMED.sae_rate(576, 2304)
    assert estimate_minutes(cfg, slow) * 60 == pytest.approx(estimate_minutes(cfg) * 60 + sae_s)


def test_sae_rate_scales_with_size_and_plan_prints():
    assert ASSUMED.sae_rate(576, 4608) == pytest.approx(ASSUMED.sae_tokens_per_s / 2)
    text = format_plan(study_plan(StudyConfig()))
    assert text.startswith("Study plan") and "total" in text and "matrix" in text


def test_refine_rates_from_finished_stages():
    from domain_sae.study.plan import refine, remaining_seconds
    cfg = StudyConfig()
    # caches ran at half the assumed speed: only the truncated rate changes
    r = refine(ASSUMED, "caches", 10.0, {"truncated": int(ASSUMED.truncated_tokens_per_s * 5)})
    assert r.truncated_tokens_per_s == pytest.approx(ASSUMED.truncated_tokens_per_s / 2)
    assert r.full_tokens_per_s == ASSUMED.full_tokens_per_s and r.sae_tokens_per_s == ASSUMED.sae_tokens_per_s
    assert "measured" in r.source
    # SAE rate from a training stage, net of the per-run overhead, converted to the reference size
    r2 = refine(r, "train", 100.0 + 6 * r.run_overhead_seconds, {"sae": 300_000}, runs=6, d_in=576, d_sae=4608)
    assert r2.sae_rate(576, 4608) == pytest.approx(3000.0)
    r3 = refine(r2, "matrix", 20.0, {"full": 10_000})
    assert r3.full_tokens_per_s == pytest.approx(500.0)
    assert r3.generate_seconds_per_token == pytest.approx(r2.generate_seconds_per_token * r2.full_tokens_per_s / 500)
    assert refine(r3, "overlap", 3.0, {}) == r3
    done = {"load", "caches", "train"}
    left = remaining_seconds(cfg, r3, done)
    assert left == pytest.approx(sum(s.seconds for s in study_plan(cfg, r3) if s.name not in done))


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


def test_split_evenly():
    assert split_evenly(10, 3) == [4, 3, 3] and sum(split_evenly(4096, 3)) == 4096
    assert split_evenly(8, 2) == [4, 4]


def test_mixture_source_serves_equal_shares_and_resumes():
    mix = MixtureSource(_Counter(0, 3), _Counter(100, 2))
    b = next(mix)
    assert b.shape == (5, 2) and b[:3, 0].tolist() == [1, 1, 1] and b[3:, 0].tolist() == [101, 101]
    assert mix.first_buffer().shape == (15, 2)
    state = mix.state_dict()
    expected = next(mix)
    other = MixtureSource(_Counter(0, 3), _Counter(100, 2))
    other.load_state_dict(state)
    assert torch.equal(next(other), expected)
    with pytest.raises(ValueError, match="parts"):
        MixtureSource(_Counter(0, 1)).load_state_dict(state)


def test_prompt_files(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("first prompt\n\n  second prompt  \nthird\n")
    assert _read_prompts(str(p), 2) == ["first prompt", "second prompt"]
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ConfigError, match="no prompts"):
        _read_prompts(str(tmp_path / "empty.txt"), 5)


def test_default_prompt_sets_come_from_the_offline_corpora():
    from domain_sae.study.inputs import prompt_sets
    a, b = prompt_sets(StudyConfig(n_prompts=5))
    assert len(a) == 5 and len(b) == 5
    assert all(p.startswith("Write a Python function") for p in a)
    assert len(set(b)) == 5 and not any(p.startswith("Write a Python function") for p in b)
