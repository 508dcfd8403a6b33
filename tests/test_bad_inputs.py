"""Bad inputs that used to destroy files or end in a traceback (issue 12). Each case checks: rc 2 (or the
UserError the CLI turns into rc 2), a one-paragraph message naming the problem and the fix, no traceback, and a
sentinel file that existed before is still there, byte for byte."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model

from domain_sae.runs import single as pipeline
from domain_sae.cli import main
from domain_sae.config import ConfigError, TrainConfig, build_config
from domain_sae.errors import UserError
from domain_sae.util.outdirs import MARKER, OutputDirError, output_kind, prepare_output_dir
from domain_sae.sae.standard import SAEModelConfig, StandardSAE

HOOK = "blocks.1.hook_resid_post"
SENTINEL = b"my notes \x00\xff -- do not delete\n"


def sentinel(directory):
    """A user's file in ``directory`` (created with its parents); returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    p = directory / "notes.md"
    p.write_bytes(SENTINEL)
    return p


def intact(p) -> bool:
    return p.is_file() and p.read_bytes() == SENTINEL


def run_cli(args, capsys) -> tuple[int, str]:
    rc = main([str(a) for a in args])
    err = capsys.readouterr().err
    return rc, err


def assert_one_paragraph(err: str, *needles: str) -> None:
    assert "Traceback" not in err, err
    text = err.strip()
    assert text and "\n\n" not in text and len(text.splitlines()) <= 3, err
    for n in needles:
        assert n in text, (n, err)


def train_args(tiny_model_dir, out, *extra):
    return ["train", "--model", tiny_model_dir, "--hook", HOOK, "--data", "code", "--max-rows", "20", "--context-size",
            "32", "--training-tokens", "512", "--train-batch-size-tokens", "256", "--buffer-size-tokens", "512",
            "--eval-every", "0", "--output-dir", out, *extra]


def tiny_cfg(tmp_path, **kw):
    base = dict(hook=HOOK, data="chat", max_rows=300, context_size=32, expansion_factor=2, training_tokens=2048,  # noqa: C408
                train_batch_size_tokens=256, buffer_size_tokens=1024, lr=3e-3, l1_coefficient=1.0, log_every=2,
                eval_every=0, n_checkpoints=1, feature_sampling_window=4, dead_feature_window=4,
                output_dir=str(tmp_path / "runs"), run_name="r", resume_checkpoint_minutes=0)
    base.update(kw)
    return build_config(TrainConfig, overrides=base)


def saved_sae(path, d_in=32):
    sae = StandardSAE(SAEModelConfig(d_in=d_in, d_sae=48, metadata={"model_name": "tiny-llama", "hook_name": HOOK,
                                                                     "context_size": 32}))
    sae.save(path)
    return path


def study_file(tmp_path, **values):
    base = {"domains": {"chat": "chat", "code": "code"}, "train_batch_size_tokens": 64, "buffer_size_tokens": 128,
            "general_tokens": 128, "scratch_tokens": 128, "budgets": [64]}
    base.update(values)
    p = tmp_path / "study.json.yaml"
    p.write_text(json.dumps(base))
    return p


# --------------------------------------------------------------------------------------------------------------
# 1. Names that become paths are single safe components

@pytest.mark.parametrize("name", ["../../../victim", "a/b", "..", ".", "", " x", "x\\y", "a\x00b"])
def test_run_name_must_be_one_path_component(tmp_path, name):
    with pytest.raises(ConfigError, match="single path component"):
        tiny_cfg(tmp_path, run_name=name)


def test_study_domain_name_with_dotdot_is_refused(tmp_path, capsys):
    victim = tmp_path / "victim"
    note = sentinel(victim)
    cfg = study_file(tmp_path, domains={"../../../victim": "chat", "code": "code"})
    rc, err = run_cli(["compare", cfg, "--out", tmp_path / "out" / "study"], capsys)
    assert rc == 2
    assert_one_paragraph(err, "../../../victim", "single path component")
    assert intact(note) and sorted(p.name for p in victim.iterdir()) == ["notes.md"]
    assert not (tmp_path / "out").exists()


def test_cli_run_name_with_separator(tmp_path, tiny_model_dir, capsys):
    victim = tmp_path / "victim"
    note = sentinel(victim)
    rc, err = run_cli(train_args(tiny_model_dir, tmp_path / "runs", "--run-name", "../victim", "--overwrite"), capsys)
    assert rc == 2
    assert_one_paragraph(err, "run_name", "single path component")
    assert intact(note)


# --------------------------------------------------------------------------------------------------------------
# 2. --overwrite replaces only a domain-sae run; every writer refuses a foreign non-empty directory

def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path, tiny_model_dir, capsys):
    note = sentinel(tmp_path / "runs" / "userdir2")
    rc, err = run_cli(train_args(tiny_model_dir, tmp_path / "runs", "--run-name", "userdir2", "--overwrite"), capsys)
    assert rc == 2
    assert_one_paragraph(err, "userdir2", "does not hold a domain-sae training run", "only replaces")
    assert "pass --overwrite" not in err
    assert intact(note)
    # without --overwrite the refusal does not recommend it either
    rc, err = run_cli(train_args(tiny_model_dir, tmp_path / "runs", "--run-name", "userdir2"), capsys)
    assert rc == 2 and "--overwrite" not in err
    assert_one_paragraph(err, "Choose a new or empty directory")
    assert intact(note) and sorted(p.name for p in note.parent.iterdir()) == ["notes.md"]


def test_overwrite_replaces_a_run(tmp_path, tiny_lm):
    cfg = tiny_cfg(tmp_path, training_tokens=512, n_checkpoints=0)
    run = pipeline.train(cfg, lm=tiny_lm, quiet=True).run_dir
    assert output_kind(run) == "run" and (run / MARKER).is_file()
    (run / "stale.txt").write_text("from the old run")
    cfg.overwrite = True
    pipeline.train(cfg, lm=tiny_lm, quiet=True)
    assert not (run / "stale.txt").exists() and (run / "sae" / "cfg.json").is_file()


def test_overwrite_does_not_replace_another_kind(tmp_path, tiny_lm):
    out = prepare_output_dir(tmp_path / "runs" / "r", "eval")
    (out / "eval.md").write_text("an evaluation")
    with pytest.raises(OutputDirError, match="holds a domain-sae evaluation output, not a training run"):
        pipeline.train(tiny_cfg(tmp_path, training_tokens=512, overwrite=True), lm=tiny_lm, quiet=True)
    assert (out / "eval.md").read_text() == "an evaluation"


def test_eval_out_refuses_a_foreign_directory(tmp_path, capsys):
    sae = saved_sae(tmp_path / "sae")
    note = sentinel(tmp_path / "mine")
    rc, err = run_cli(["eval", sae, "--data", "chat", "--out", tmp_path / "mine"], capsys)
    assert rc == 2
    assert_one_paragraph(err, "mine", "does not hold a domain-sae evaluation output")
    assert intact(note) and sorted(p.name for p in note.parent.iterdir()) == ["notes.md"]


def test_compare_out_refuses_a_foreign_directory(tmp_path, capsys):
    note = sentinel(tmp_path / "mine")
    rc, err = run_cli(["compare", study_file(tmp_path), "--out", tmp_path / "mine"], capsys)
    assert rc == 2
    assert_one_paragraph(err, "does not hold a domain-sae study output")
    assert intact(note) and sorted(p.name for p in note.parent.iterdir()) == ["notes.md"]


def test_activation_cache_overwrite_only_replaces_a_cache(tmp_path, tiny_lm):
    from domain_sae.activations.hook_cache import build_cache
    from domain_sae.config import DataConfig
    cfg = DataConfig(model="tiny-llama", data="chat", max_rows=50, context_size=32, model_batch_size=4)
    note = sentinel(tmp_path / "victim")
    with pytest.raises(OutputDirError, match="does not hold a domain-sae activation cache"):
        build_cache(tiny_lm, [HOOK], cfg, tmp_path / "victim", 64, overwrite=True)
    assert intact(note) and sorted(p.name for p in note.parent.iterdir()) == ["notes.md"]
    path = build_cache(tiny_lm, [HOOK], cfg, tmp_path / "cache", 64)
    assert output_kind(path) == "activation-cache"
    build_cache(tiny_lm, [HOOK], cfg, path, 32, overwrite=True)  # a cache is replaced
    assert json.loads((path / "manifest.json").read_text())["n_tokens"] == 32
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_output_dir_rules():
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        assert prepare_output_dir(d / "new" / "deep", "eval").is_dir()  # absent: created with the marker
        assert output_kind(d / "new" / "deep") == "eval"
        (d / "f").write_text("x")
        with pytest.raises(OutputDirError, match="is a file"):
            prepare_output_dir(d / "f", "eval")
        with pytest.raises(OutputDirError, match="which is a file"):
            prepare_output_dir(d / "f" / "sub", "eval")
        assert issubclass(OutputDirError, UserError)
        (d / "legacy").mkdir()
        (d / "legacy" / "manifest.json").write_text(json.dumps({"format": "something-else"}))
        assert output_kind(d / "legacy") is None  # a foreign manifest.json is not a cache


# --------------------------------------------------------------------------------------------------------------
# 3 + 6. Float options finite and in range; a diverging run is stopped

@pytest.mark.parametrize("flag,value,needle", [
    ("--lr", "inf", "finite"), ("--l1-coefficient", "inf", "finite"), ("--lr", "nan", "finite"),
    ("--adam-beta1", "2", "adam_beta1 must be in [0, 1)"), ("--adam-beta2", "1", "adam_beta2 must be in [0, 1)"),
    ("--grad-clip-norm", "-1", "grad_clip_norm must be >= 0"),
    ("--decoder-init-norm", "0", "decoder_init_norm must be positive"),
    ("--holdout-fraction", "1", "holdout_fraction must be in [0, 1)"),
    ("--dead-feature-threshold", "2", "dead_feature_threshold"),
])
def test_float_options_are_validated_before_anything_is_created(tmp_path, tiny_model_dir, capsys, flag, value, needle):
    note = sentinel(tmp_path / "runs")
    rc, err = run_cli(train_args(tiny_model_dir, tmp_path / "runs", "--run-name", "r", flag, value), capsys)
    assert rc == 2
    assert_one_paragraph(err, needle)
    assert intact(note) and sorted(p.name for p in note.parent.iterdir()) == ["notes.md"]


class _NaNAfter:
    """A synthetic source whose batches turn to NaN after ``n`` good ones (a diverging run, deterministically)."""

    def __init__(self, n, **kw):
        from training_helpers import SyntheticSparseSource
        self.inner, self.n, self.served = SyntheticSparseSource(**kw), n, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.inner)
        self.served += 1
        return batch * float("nan") if self.served > self.n else batch

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, tiny_lm):
    from training_helpers import tiny_config

    from domain_sae.sae.io import load_sae
    from domain_sae.training.trainer import TrainingDivergedError
    cfg = tiny_config(hook=HOOK, output_dir=str(tmp_path / "runs"), run_name="div", d_sae=48)
    source = _NaNAfter(20, d_in=32, batch_size=128, buffer_tokens=512)
    with pytest.raises(TrainingDivergedError) as info:
        pipeline.train(cfg, lm=tiny_lm, source=source, quiet=True)
    msg = str(info.value)
    assert "step 21 of 60" in msg and "nan" in msg and "learning rate" in msg and "last good checkpoint" in msg
    run = tmp_path / "runs" / "div"
    assert not (run / "sae").exists()  # no NaN SAE saved as final
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_00000015"] or ckpts[-1].endswith("15"), ckpts
    good = load_sae(run / "checkpoints" / ckpts[-1] / "sae")
    assert all(torch.isfinite(p).all() for p in good.parameters())
    assert json.loads((run / "status.json").read_text())["state"] == "failed"


def test_lr_too_high_is_reported_not_saved(tmp_path, tiny_model_dir, capsys):
    rc, err = run_cli(train_args(tiny_model_dir, tmp_path / "runs", "--run-name", "hot", "--lr", "1e6",
                                 "--training-tokens", "2560"), capsys)
    assert rc == 2
    assert_one_paragraph(err, "diverged", "lower --lr")
    assert not (tmp_path / "runs" / "hot" / "sae").exists()


# --------------------------------------------------------------------------------------------------------------
# 4. Data files that are not UTF-8

@pytest.mark.parametrize("suffix,content", [
    (".jsonl", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))),
    (".jsonl", '{"text": "caf\u00e9 cr\u00e8me"}\n'.encode("latin-1")),
    (".json", '[{"text": "na\u00efve"}]'.encode("latin-1")),
])
def test_non_utf8_data_is_explained(tmp_path, tiny_lm, suffix, content):
    from domain_sae.data.sources import DataError, open_source
    p = tmp_path / f"data{suffix}"
    p.write_bytes(content)
    with pytest.raises(DataError) as info:
        list(open_source(str(p)))
    assert "not UTF-8" in str(info.value) and "iconv" in str(info.value)
    with pytest.raises(DataError, match="not UTF-8"):
        pipeline.train(tiny_cfg(tmp_path, data=str(p), max_rows=None), lm=tiny_lm, quiet=True)
    assert not (tmp_path / "runs" / "r").exists() and p.read_bytes() == content


# --------------------------------------------------------------------------------------------------------------
# 5. Output locations that are files; eval creates --out only after its checks

def test_output_dir_or_run_name_that_is_a_file_fails_before_the_model_loads(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_bytes(SENTINEL)
    # the model path does not exist: the output check must come first, so the message is about the output
    bogus_model = tmp_path / "no-such-model"
    rc, err = run_cli(train_args(bogus_model, f, "--run-name", "r"), capsys)
    assert rc == 2 and intact(f)
    assert_one_paragraph(err, "which is a file", "Choose a directory path")
    rc, err = run_cli(train_args(bogus_model, tmp_path, "--run-name", "afile"), capsys)
    assert rc == 2 and intact(f)
    assert_one_paragraph(err, "is a file")
    rc, err = run_cli(train_args(bogus_model, f), capsys)  # default run name: the parent is still checked first
    assert rc == 2 and intact(f) and "is a file" in err


def test_eval_out_file_and_no_out_before_checks(tmp_path, tiny_model_dir, capsys):
    sae = saved_sae(tmp_path / "sae")
    f = tmp_path / "afile"
    f.write_bytes(SENTINEL)
    rc, err = run_cli(["eval", sae, "--model", tiny_model_dir, "--data", "chat", "--out", f], capsys)
    assert rc == 2 and intact(f)
    assert_one_paragraph(err, "is a file")
    out = tmp_path / "never"
    rc, err = run_cli(["eval", sae, "--model", tiny_model_dir, "--data", "chat", "--hook", "blocks.0.hook_mlp_out",
                       "--out", out], capsys)
    assert rc == 2 and "Traceback" not in err
    assert not out.exists()


# --------------------------------------------------------------------------------------------------------------
# 7. Pickled weights are refused with the way out

def test_pickled_model_weights_are_refused(tmp_path, smol_tokenizer, capsys):
    from domain_sae.models.load import ModelLoadError, load_model
    d = tmp_path / "pickled"
    model = make_tiny_model("llama")
    model.save_pretrained(d)
    smol_tokenizer.save_pretrained(d)
    for f in d.glob("*.safetensors"):  # the weights as an old-style pickle instead
        f.unlink()
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    assert (d / "pytorch_model.bin").is_file() and not list(d.glob("*.safetensors"))
    before = (d / "pytorch_model.bin").read_bytes()
    with pytest.raises(ModelLoadError) as info:
        load_model(str(d))
    msg = str(info.value)
    assert "pickle format" in msg and "safe_serialization=True" in msg and "weights_only=False" not in msg
    rc, err = run_cli(train_args(d, tmp_path / "runs", "--run-name", "r"), capsys)
    assert rc == 2
    assert_one_paragraph(err, "pickle format", "safetensors")
    assert (d / "pytorch_model.bin").read_bytes() == before and not (tmp_path / "runs" / "r").exists()


# --------------------------------------------------------------------------------------------------------------
# 8. Markdown writers escape text from data

def test_eval_markdown_escapes_labels_and_specs():
    from domain_sae.evaluation.report import eval_markdown
    evil = "<script>alert(1)</script>|*x*"
    summary = {"model": {"name": "<iframe src=x>", "family": "llama"},
               "datasets": {evil: {"spec": evil, "tokens": {}}},
               "saes": {evil: {"path": evil, "hook": "h", "trained_on": "<b>"}},
               "results": [{"sae": evil, "dataset": evil, "metrics": {},
                            "segments": {"<i>user</i>": {}, "assistant": {}}}]}
    md = eval_markdown(summary)
    assert "<script>" not in md and "<iframe" not in md and "<b>" not in md and "<i>" not in md
    assert "&lt;script&gt;" in md and "\\|\\*x\\*" in md


def test_training_summary_escapes_the_run_name(tmp_path, tiny_lm):
    run = pipeline.train(tiny_cfg(tmp_path, run_name="a_b_c", training_tokens=512, n_checkpoints=0), lm=tiny_lm,
                         quiet=True).run_dir
    assert (run / "summary.md").read_text().startswith("# Training summary: a\\_b\\_c\n")


# --------------------------------------------------------------------------------------------------------------
# 9 + 10. A run killed before its first checkpoint restarts; temporaries are cleaned

def _dead_pid() -> int:
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _as_killed_before_first_checkpoint(run, pid):
    import shutil
    import socket
    shutil.rmtree(run / "checkpoints", ignore_errors=True)
    shutil.rmtree(run / "sae", ignore_errors=True)
    (run / "status.json").write_text(json.dumps({"state": "running", "pid": pid, "host": socket.gethostname()}))


def test_run_killed_before_first_checkpoint_restarts(tmp_path, tiny_model_dir, capsys):
    import socket
    args = train_args(tiny_model_dir, tmp_path / "runs", "--run-name", "k")
    assert main([str(a) for a in args]) == 0
    run = tmp_path / "runs" / "k"
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "complete" and status["host"] == socket.gethostname() and isinstance(status["pid"], int)
    note = run / "my-notes.txt"  # the user's file inside the run survives a restart
    note.write_bytes(SENTINEL)
    _as_killed_before_first_checkpoint(run, _dead_pid())
    capsys.readouterr()
    assert main([str(a) for a in args]) == 0  # the same command simply starts it again
    assert json.loads((run / "status.json").read_text())["state"] == "complete" and (run / "sae").is_dir()
    _as_killed_before_first_checkpoint(run, _dead_pid())
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0  # and so does --resume
    assert "starting it again from step 0" in capsys.readouterr().err
    assert json.loads((run / "status.json").read_text())["state"] == "complete"
    assert note.read_bytes() == SENTINEL


def test_live_process_is_reported_running(tmp_path, tiny_model_dir, capsys):
    import subprocess
    import sys
    args = train_args(tiny_model_dir, tmp_path / "runs", "--run-name", "live")
    assert main([str(a) for a in args]) == 0
    run = tmp_path / "runs" / "live"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _as_killed_before_first_checkpoint(run, proc.pid)
        capsys.readouterr()
        for cmd in (args, ["train", "--resume", run]):
            rc, err = run_cli(cmd, capsys)
            assert rc == 2
            assert_one_paragraph(err, f"process {proc.pid}", "being trained right now")
    finally:
        proc.kill()
        proc.wait()


def test_resume_cleans_every_temporary_directory(tmp_path, tiny_lm):
    import shutil
    cfg = tiny_cfg(tmp_path, n_checkpoints=1)
    run = pipeline.train(cfg, lm=tiny_lm, quiet=True).run_dir
    ckpts = sorted((run / "checkpoints").iterdir())
    for c in ckpts[1:]:
        shutil.rmtree(c)
    shutil.rmtree(run / "sae")
    (run / "sae.tmp-abc123").mkdir()  # a kill during the final sae/ write
    (run / "sae.tmp-abc123" / "cfg.json").write_text("{}")
    (run / "sae.old-xyz").mkdir()
    (run / "checkpoints" / "step_00000099.tmp-q").mkdir()
    (run / ".status.json.tmp-k1ll3d").write_text("{")  # a kill during a status write (util.atomic.atomic_file)
    pipeline.write_status(run, "interrupted")
    pipeline.resume(run, lm=tiny_lm)
    left = [p for p in run.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    assert left == [] and (run / "sae" / "cfg.json").is_file()


# --------------------------------------------------------------------------------------------------------------
# 11. CLI: no abbreviations, "did you mean", paths that do not exist

def test_option_prefixes_are_refused_with_a_suggestion(tmp_path, tiny_model_dir, capsys):
    rc, err = run_cli(train_args(tiny_model_dir, tmp_path / "runs", "--training-tok", "8192"), capsys)
    assert rc == 2 and "Traceback" not in err
    assert "'--training-tok'" in err and "did you mean --training-tokens" in err
    assert not (tmp_path / "runs").exists()
    rc, err = run_cli(["eval", "x", "--tokns", "5"], capsys)
    assert rc == 2 and "did you mean --tokens" in err


def test_missing_relative_sae_path_is_not_taken_for_a_release(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    rc, err = run_cli(["eval", "runs/typo/sae", "--data", "chat"], capsys)
    assert rc == 2
    assert_one_paragraph(err, "runs/typo/sae does not exist")
    assert "release" not in err.split("does not exist")[0]
    rc, err = run_cli(["finetune", "--from", "runs/typo/sae", "--data", "code", "--run-name", "ft"], capsys)
    assert rc == 2 and "runs/typo/sae does not exist" in err
    assert not (tmp_path / "eval_out").exists()
