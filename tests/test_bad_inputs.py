"""Bad inputs that used to destroy files or end in a traceback (issue 12). Each case checks: rc 2 (or the
UserError the CLI turns into rc 2), a one-paragraph message naming the problem and the fix, no traceback, and a
sentinel file that existed before is still there, byte for byte."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_tiny_model
from domain_sae import pipeline
from domain_sae.cli import main
from domain_sae.config import ConfigError, TrainConfig, build_config
from domain_sae.errors import UserError, user_error_types
from domain_sae.outdirs import MARKER, OutputDirError, output_kind, prepare_output_dir
from domain_sae.sae.standard import SAEModelConfig, StandardSAE

HOOK = "blocks.1.hook_resid_post"
SENTINEL = b"my notes \x00\xff -- do not delete\n"


@pytest.fixture
def model_dir(tmp_path, smol_tokenizer):
    d = tmp_path / "tiny-model"
    make_tiny_model("llama").save_pretrained(d)
    smol_tokenizer.save_pretrained(d)
    return d


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


def train_args(model_dir, out, *extra):
    return ["train", "--model", model_dir, "--hook", HOOK, "--data", "code", "--max-rows", "20", "--context-size",
            "32", "--training-tokens", "512", "--train-batch-size-tokens", "256", "--buffer-size-tokens", "512",
            "--eval-every", "0", "--output-dir", out, *extra]


def tiny_cfg(tmp_path, **kw):
    base = dict(hook=HOOK, data="chat", max_rows=300, context_size=32, expansion_factor=2, training_tokens=2048,
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
            "general_tokens": 128, "scratch_tokens": 128, "finetune_tokens": 64, "budgets": [64]}
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


def test_cli_run_name_with_separator(tmp_path, model_dir, capsys):
    victim = tmp_path / "victim"
    note = sentinel(victim)
    rc, err = run_cli(train_args(model_dir, tmp_path / "runs", "--run-name", "../victim", "--overwrite"), capsys)
    assert rc == 2
    assert_one_paragraph(err, "run_name", "single path component")
    assert intact(note)


# --------------------------------------------------------------------------------------------------------------
# 2. --overwrite replaces only a domain-sae run; every writer refuses a foreign non-empty directory

def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path, model_dir, capsys):
    note = sentinel(tmp_path / "runs" / "userdir2")
    rc, err = run_cli(train_args(model_dir, tmp_path / "runs", "--run-name", "userdir2", "--overwrite"), capsys)
    assert rc == 2
    assert_one_paragraph(err, "userdir2", "does not hold a domain-sae training run", "only replaces")
    assert "pass --overwrite" not in err
    assert intact(note)
    # without --overwrite the refusal does not recommend it either
    rc, err = run_cli(train_args(model_dir, tmp_path / "runs", "--run-name", "userdir2"), capsys)
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


def test_activation_cache_overwrite_only_replaces_a_cache(tmp_path):
    from training_helpers import FakeTokenStream, make_activation_fn

    from domain_sae.activations.cache import build_activation_cache, read_manifest
    fn = make_activation_fn()
    note = sentinel(tmp_path / "victim")
    with pytest.raises(OutputDirError, match="does not hold a domain-sae activation cache"):
        build_activation_cache(fn, FakeTokenStream(), tmp_path / "victim", 64, overwrite=True)
    assert intact(note) and sorted(p.name for p in note.parent.iterdir()) == ["notes.md"]
    path = build_activation_cache(fn, FakeTokenStream(), tmp_path / "cache", 64)
    assert output_kind(path) == "activation-cache"
    build_activation_cache(fn, FakeTokenStream(), path, 32, overwrite=True)  # a cache is replaced
    assert read_manifest(path)["n_tokens"] == 32
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
