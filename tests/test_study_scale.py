"""The study at scale (issue #19) on a tiny random Llama: training in stages (pauses, the caller's stop, an exact
resume after a kill), the reference SAEs trained to the plateau (curve at exact doublings, the stop recomputed
independently, one pass over a small corpus), scratch_total taken from the scratch trajectory (the same SAE as one
trained alone), paired verdicts (checked against a direct paired bootstrap of the stored per-document sums), the
report's new sections, and (slow) a study killed inside a plateau run and resumed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from domain_sae.analysis.convergence import plateau_checkpoints
from domain_sae.analysis.docstats import DocStats, metric_function, side_values
from domain_sae.analysis.paired import paired_bootstrap
from domain_sae.config import TrainConfig, build_config
from domain_sae.runs import single
from domain_sae.sae.io import load_sae
from domain_sae.study import run_study
from domain_sae.study.config import plateau_schedule
from domain_sae.study.plan import estimate, format_plan
from domain_sae.study.runs import Run, plan_runs
from domain_sae.training.checkpoint import list_checkpoints

from test_study_run import HOOK, strict_json, tiny_config, tiny_lm_of


def stage_cfg(tmp_path, name: str) -> TrainConfig:
    return build_config(TrainConfig, overrides=dict(
        hook=HOOK, data="chat", max_rows=300, context_size=32, expansion_factor=2, architecture="topk", k=4,
        training_tokens=2048, train_batch_size_tokens=256, buffer_size_tokens=1024, lr=3e-3, eval_every=0,
        n_checkpoints=0, resume_checkpoint_minutes=0, output_dir=str(tmp_path), run_name=name,
        **plateau_schedule(2)))


class Stop(Exception):
    pass


def test_train_in_stages_pauses_stops_and_resumes_exactly(tmp_path, tiny_lm):
    seen: dict[int, torch.Tensor] = {}

    def record(step, sae):
        seen[step] = sae.W_dec.detach().clone()
        return True
    full = single.train_in_stages(stage_cfg(tmp_path, "full"), [2, 4, 8], record, lm=tiny_lm, quiet=True)
    assert sorted(seen) == [2, 4, 8] and full.summary["steps"] == 8
    assert [c[0] for c in list_checkpoints(full.run_dir)] == [8]  # only the last pause's full state is kept
    # the caller stops at step 4: the run ends there, complete, with the SAE the longer run had at step 4
    short = single.train_in_stages(stage_cfg(tmp_path, "short"), [2, 4, 8], lambda s, sae: s < 4, lm=tiny_lm,
                                   quiet=True)
    assert short.summary["steps"] == 4
    torch.testing.assert_close(load_sae(short.run_dir / "sae").W_dec, seen[4])
    assert json.loads((short.run_dir / "status.json").read_text())["state"] == "complete"

    # killed at the pause after step 4, then the same call again: continues from that checkpoint, asks again at 4
    def kill(step, sae):
        if step == 4:
            raise Stop
        return True
    with pytest.raises(Stop):
        single.train_in_stages(stage_cfg(tmp_path, "killed"), [2, 4, 8], kill, lm=tiny_lm, quiet=True)
    asked: list[int] = []
    again = single.train_in_stages(stage_cfg(tmp_path, "killed"), [2, 4, 8],
                                   lambda s, sae: asked.append(s) or True, lm=tiny_lm, quiet=True)
    assert asked == [4, 8]
    torch.testing.assert_close(again.sae.W_dec, full.sae.W_dec)
    losses = [[json.loads(line)["losses/overall_loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]
              for d in (full.run_dir, again.run_dir)]
    assert losses[0] == losses[1]


def small_corpus(path, n: int = 40) -> str:
    """A corpus small enough that one pass over its training split comes before any cap."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    rows = [{"text": " ".join(words[(i * 7 + j) % len(words)] for j in range(12 + i % 9)) + f" number {i}."}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


SCALE = dict(architecture="topk", sparsity=[4], seeds=[1, 2], train_to_plateau=True, plateau_first_tokens=256,
             plateau_max_tokens=2048, budgets=[128, 256], kl_budgets=[128], holdout_fraction=0.15,
             conditions=["general", "scratch", "finetune", "finetune_kl", "continue", "scratch_total"],
             analyses=["convergence"], ce_for_budgets=True, ce_general_every_budget=False, n_paired_bootstrap=200)


def scale_config(out, corpus: str, **kw):
    return tiny_config(out, **{**SCALE, "domains": {"chat": "chat", "notes": corpus}, **kw})


@pytest.fixture(scope="module")
def scale_study(smol_tokenizer, tmp_path_factory):
    lm = tiny_lm_of(smol_tokenizer)
    out = tmp_path_factory.mktemp("scale")
    cfg = scale_config(out, small_corpus(out.parent / f"{out.name}_notes.jsonl"))
    logs: list[str] = []
    res = run_study(cfg, out, lm=lm, log=logs.append, keep_cache=True)
    return cfg, res, out, logs, lm


def test_reference_saes_train_to_the_plateau_or_one_pass(scale_study):
    cfg, res, out, _, _ = scale_study
    hook = strict_json(out / "results.json")["hooks"][HOOK]
    root = json.loads((out / "cache" / "notes" / "manifest.json").read_text())
    assert root["n_tokens"] < root["tokens_requested"]  # the small corpus is cached whole: its one pass is known
    for run in [r for r in plan_runs(cfg) if r.kind in ("general", "scratch")]:
        t = hook["training"][run.dirname("k")]
        steps = [c["steps"] for c in t["curve"]]
        assert steps == plateau_checkpoints(2, t["limit_tokens"] // 128, 2)[:len(steps)]  # doublings of 2 and 3
        assert set(steps[:6]) <= {2, 3, 4, 6, 8, 12, t["limit_tokens"] // 128}
        assert t["tokens"] == steps[-1] * 128 == t["curve"][-1]["tokens"]
        assert t["stop"]["reason"] in ("plateau", "one_pass", "max_tokens") and t["stop"]["stopped"]
        # the slope over the last doubling, recomputed: least squares of EV on log2(tokens)
        tok = np.array([c["tokens"] for c in t["curve"]], float)
        ev = np.array([c["ev"] for c in t["curve"]])
        w = tok >= tok.max() / 2
        if tok.min() <= tok.max() / 2:
            assert t["stop"]["slope_per_doubling"] == pytest.approx(np.polyfit(np.log2(tok[w]), ev[w], 1)[0])
            assert (t["stop"]["reason"] == "plateau") == (t["stop"]["slope_per_doubling"] < 0.005)
        # the curve's last point is the SAE kept: its EV on the run's own set as measured afterwards
        own = run.domain or "general"
        assert t["curve"][-1]["ev"] == pytest.approx(hook["measurements"][run.dirname("k")]["recon"][own]["ev"])
        if run.domain == "notes":
            assert t["split_tokens"] == root["n_tokens"] and t["limit_tokens"] == min(2048, root["n_tokens"])
            assert t["tokens"] <= root["n_tokens"]
        if t["stop"]["reason"] == "max_tokens":
            assert t["tokens"] == 2048


def test_runs_sized_by_the_general_sae_and_scratch_total_from_its_trajectory(scale_study):
    cfg, res, out, _, lm = scale_study
    hook = strict_json(out / "results.json")["hooks"][HOOK]
    tr = hook["training"]
    split = json.loads((out / "cache" / "notes" / "manifest.json").read_text())["n_tokens"]
    for d in ("chat", "notes"):
        for s in (1, 2):
            t_g = tr[Run("general", None, s, 4).dirname("k")]["tokens"]
            for b in (128, 256):
                r = tr[Run("scratch_total", d, s, 4, b).dirname("k")]
                want = min(t_g + b, split) if d == "notes" else t_g + b
                assert r["tokens"] == want // 128 * 128 and r["planned_tokens"] == 2048 + b
    # a scratch_total trained alone (same recipe, seed, data) is the SAE taken from the scratch run
    from domain_sae.study.inputs import StudyInputs
    from domain_sae.study.runs import SAEStore
    run = Run("scratch_total", "chat", 1, 4, 128)
    inputs = StudyInputs(cfg, out, lm, log=lambda _: None)
    store = SAEStore(cfg, HOOK, out / HOOK, lambda: inputs.train_caches(HOOK), lm, lambda _: None,
                     one_pass=lambda: inputs.one_pass(HOOK))
    taken = load_sae(store.run_dir(run) / "sae")
    assert store.marker(run)["from_run"] == Run("scratch", "chat", 1, 4).dirname("k")
    (store.run_dir(run) / "study_done.json").unlink()
    alone = store.get(run)
    assert "from_run" not in store.marker(run) and store.marker(run)["tokens"] == tr[run.dirname("k")]["tokens"]
    torch.testing.assert_close(alone.W_dec, taken.W_dec)
    torch.testing.assert_close(alone.W_enc, taken.W_enc)


def test_verdicts_are_paired_bootstraps_of_the_stored_sums(scale_study):
    cfg, res, out, _, _ = scale_study
    hook = strict_json(out / "results.json")["hooks"][HOOK]
    meas = out / HOOK / "measure"
    f = hook["findings"]["chat"]["metrics"]
    ft, sc = Run("finetune", "chat", 1, 4, 256), Run("scratch", "chat", 1, 4)
    for metric, suffix, key in (("ev", "recon.npz", "metrics/explained_variance"),
                                ("ce", "npz", "metrics/ce_loss_score")):
        diffs = f[metric]["differences"]
        assert {x["test"] for x in diffs} == {"paired"} and all("documents" in x["label"] for x in diffs)
        x = next(x for x in diffs if x["a"] == "general→chat @ 256" and x["b"] == "chat scratch")
        side = {n: [DocStats.load(meas / f"{Run(kind, 'chat', s, 4, b).dirname('k')}.chat.{suffix}")
                    for s in (1, 2)] for n, kind, b in (("a", "finetune", 256), ("b", "scratch", None))}
        direct = paired_bootstrap(side["a"], side["b"], key, n_boot=200, seed=1)
        assert (x["diff"], x["low"], x["high"]) == pytest.approx((direct.diff, direct.low, direct.high))
        assert f[metric]["resolvable"]["min"] > 0
        assert {r["test"] for r in [f[metric]["gaps"][k] for k in ("finetune", "continue", "scratch_total")]} \
            == {"paired"}
    # the per-document sums give the stored values
    for run, kind, key in ((ft, "recon", "metrics/explained_variance"), (sc, "lm", "metrics/ce_loss_score")):
        stats = DocStats.load(meas / f"{run.dirname('k')}.chat.{'recon.npz' if kind == 'recon' else 'npz'}")
        want = hook["measurements"][run.dirname("k")][kind]["chat"]
        want = want["ev"] if kind == "recon" else want["metrics"][key]
        assert float(side_values(stats, *metric_function(key), None)) == pytest.approx(want, abs=1e-6)
    # the KL fine-tune beside the MSE one, and the CE degradation recovered (Karvonen's unit)
    assert any(x["a"] == "general→chat (KL) @ 128" and x["b"] == "general→chat @ 128"
               for x in f["ce"]["differences"])
    rec = f["ce"]["recovered"]["finetune_kl"]["rows"][0]
    g = [DocStats.load(meas / f"{Run('general', None, s, 4).dirname('k')}.chat.npz") for s in (1, 2)]
    k = [DocStats.load(meas / f"{Run('finetune_kl', 'chat', s, 4, 128).dirname('k')}.chat.npz") for s in (1, 2)]
    score = lambda xs: np.mean([float(side_values(x, *metric_function("metrics/ce_loss_score"), None))  # noqa
                                for x in xs])
    assert rec["fraction"] == pytest.approx((score(k) - score(g)) / (1 - score(g)))


def test_sets_report_and_plan(scale_study):
    cfg, res, out, logs, _ = scale_study
    stored = strict_json(out / "results.json")
    sets = stored["hooks"][HOOK]["sets"]
    assert set(sets) == {"general", "chat", "notes"} and sets["chat"]["model_pass"]["documents"] >= 1
    md = (out / "report.md").read_text()
    for text in ("Are the reference SAEs trained?", "Beside the literature", "Smallest resolvable difference",
                 "MSE vs end-to-end (KL) fine-tuning", "Kissane", "Karvonen", "Held-out sets at"):
        assert text in md, text
    assert (out / f"plateau_{HOOK}.png").is_file()
    conv = stored["hooks"][HOOK]["analyses"]["convergence"]
    assert set(conv["seed_overlap"]) == {"general", "chat scratch", "notes scratch"}
    assert all(0 <= v["mean"] <= 1 and v["reference"] == [0.30, 0.53] for v in conv["seed_overlap"].values())
    assert "at most" in format_plan(cfg, estimate(cfg)) and logs[0].startswith("Study plan")
    # a scratch_total at its scratch SAE's very token count is that SAE: measured once, its measurement copied
    tr, ms = stored["hooks"][HOOK]["training"], stored["hooks"][HOOK]["measurements"]
    twins = [(rid, t) for rid, t in tr.items() if t["kind"] == "scratch_total"
             and t["tokens"] == tr[Run("scratch", t["condition"].split()[0], t["seed"], 4).dirname("k")]["tokens"]]
    for rid, t in twins:
        scratch = Run("scratch", t["condition"].split()[0], t["seed"], 4).dirname("k")
        d = t["condition"].split()[0]
        assert ms[rid]["recon"][d]["copied_from"] == scratch == ms[rid]["lm"][d]["copied_from"]
        assert ms[rid]["recon"][d]["ev"] == ms[scratch]["recon"][d]["ev"]
    copied = [rid for rid, m in ms.items() if any("copied_from" in v for v in m["recon"].values())]
    assert all(tr[rid]["kind"] == "scratch_total" for rid in copied) and len(copied) >= len(twins)


@pytest.mark.slow
def test_a_study_killed_inside_a_plateau_run_resumes_it(smol_tokenizer, tmp_path, scale_study):
    cfg_ref, ref, _, _, _ = scale_study
    lm = tiny_lm_of(smol_tokenizer)
    corpus = small_corpus(tmp_path / "notes.jsonl")
    cfg = scale_config(tmp_path / "b", corpus)
    pauses: list[str] = []

    def kill_at_second_pause(line: str) -> None:  # killed after the curve took its second point, not a stop
        if "held-out EV" in line:
            pauses.append(line)
            if len(pauses) == 2:
                raise Stop
    with pytest.raises(Stop):
        run_study(cfg, tmp_path / "b", lm=lm, log=kill_at_second_pause)
    logs: list[str] = []
    res = run_study(cfg, tmp_path / "b", lm=lm, log=logs.append)
    first = [line for line in logs if "held-out EV" in line][0]
    assert "continue" in pauses[1] and pauses[1] == first  # continued from that checkpoint, asked there again
    for rid, t in ref["hooks"][HOOK]["training"].items():
        got = res["hooks"][HOOK]["training"][rid]
        assert got["tokens"] == t["tokens"], rid
        if "curve" in t:
            assert [c["ev"] for c in got["curve"]] == pytest.approx([c["ev"] for c in t["curve"]], abs=1e-6)
