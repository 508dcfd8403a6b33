"""JSONL logger (truncation for resume), console line, optional W&B, plots and the summary table."""

from __future__ import annotations

import io
import sys

import pytest

from domain_sae.training.loggers import (ConsoleProgress, JSONLLogger, MultiLogger, WandbLogger,
                                         WandbNotInstalledError, read_jsonl)
from domain_sae.training.plots import plot_training_curves, summary_table


def test_jsonl_log_and_truncate(tmp_path):
    lg = JSONLLogger(tmp_path / "m.jsonl")
    for s in (10, 20, 30, 40):
        lg.log(s, {"losses/mse_loss": s / 10, "metrics/l0": 3})
    lg.truncate_after(20)
    lg.log(30, {"losses/mse_loss": 9.0})
    lg.close()
    recs = read_jsonl(tmp_path / "m.jsonl")
    assert [r["step"] for r in recs] == [10, 20, 30]
    assert recs[-1] == {"step": 30, "losses/mse_loss": 9.0}
    with open(tmp_path / "m.jsonl", "a") as f:
        f.write('{"step": 40, "losses/ms')  # torn line from a killed process
    assert [r["step"] for r in read_jsonl(tmp_path / "m.jsonl")] == [10, 20, 30]
    lg.resume(0)
    assert read_jsonl(tmp_path / "m.jsonl") == []


def test_multilogger_fans_out_and_finds(tmp_path):
    a, b = JSONLLogger(tmp_path / "a.jsonl"), JSONLLogger(tmp_path / "b.jsonl")
    m = MultiLogger([a, MultiLogger([b])])
    m.log(1, {"x": 1.0})
    m.close()
    assert read_jsonl(tmp_path / "a.jsonl") == read_jsonl(tmp_path / "b.jsonl") == [{"step": 1, "x": 1.0}]
    assert m.find(JSONLLogger) is a


def test_console_progress_shows_metrics():
    buf = io.StringIO()
    p = ConsoleProgress(1000, disable=False, file=buf)
    p.log(10, {"details/n_training_tokens": 400, "losses/mse_loss": 0.5, "metrics/l0": 12.0,
               "metrics/explained_variance": 0.87})
    p.close()
    out = buf.getvalue()
    assert "EV=0.870" in out and "L0=12.0" in out and "mse=0.5" in out and "400" in out


def test_wandb_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(WandbNotInstalledError, match=r"pip install 'domain-sae\[wandb\]'"):
        WandbLogger("proj")


def test_plot_and_summary(tmp_path):
    recs = [{"step": s, "details/n_training_tokens": 100 * s, "losses/mse_loss": 1 / s, "metrics/l0": 50 - s,
             "metrics/explained_variance": 1 - 1 / s, "details/current_learning_rate": 1e-3,
             "sparsity/dead_features": 0} for s in range(1, 11)]
    recs[-1]["metrics/ce_loss_score"] = 0.9
    png = plot_training_curves(recs, tmp_path / "curves.png", title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = summary_table(recs, {"activation scale s": 1.5})
    assert "| explained variance (last training batch) (`metrics/explained_variance`) | 0.9000 |" in table
    assert "CE loss score" in table and "| activation scale s | 1.5 |" in table
