"""examples/train_minimal.py, the way into the code, runs as written: on a tiny model in seconds (default suite) and on
the offline default SmolLM2 at a small size (slow). It takes the steps asked for and the SAE it saves loads back; on
the tiny model (random activations: nothing to learn but sparsity) its sparsity term and L0 go down, on SmolLM2 its
explained variance climbs past 0.3."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model
from domain_sae.training.loggers import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "train_minimal.py"


def _example():
    spec = importlib.util.spec_from_file_location("train_minimal", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_run(summary, tokens: int):
    """The run trained: the steps and tokens asked for, a log every 4 steps, an SAE that loads back."""
    from domain_sae.sae.io import load_sae
    assert summary["steps"] == tokens // 1024 and summary["training_tokens"] == tokens
    logs = read_jsonl(Path(summary["run_dir"]) / "metrics.jsonl")
    assert [r["step"] for r in logs] == list(range(4, tokens // 1024 + 1, 4))
    sae = load_sae(summary["sae_dir"])
    assert sae.cfg.architecture == "standard" and sae.cfg.d_sae == 4 * sae.cfg.d_in
    assert sae.cfg.metadata["hook_name"] == "blocks.0.hook_mlp_out"
    return sae, logs


def test_train_minimal_on_a_tiny_model(tmp_path, smol_tokenizer, capsys):
    model_dir = tmp_path / "tiny-model"
    make_tiny_model("llama").save_pretrained(model_dir)
    smol_tokenizer.save_pretrained(model_dir)
    summary = _example().main(["--model", str(model_dir), "--tokens", "8192", "--context-size", "32",
                               "--out", str(tmp_path / "run")])
    _, logs = _check_run(summary, 8192)  # a random model's activations: only sparsity to learn
    assert logs[-1]["losses/l1_loss"] < logs[0]["losses/l1_loss"] and logs[-1]["metrics/l0"] < logs[0]["metrics/l0"]
    assert f"SAE saved to {tmp_path / 'run' / 'sae'}" in capsys.readouterr().out
    assert (tmp_path / "run" / "metrics.jsonl").is_file() and (tmp_path / "run" / "summary.md").is_file()


@pytest.mark.slow
def test_train_minimal_as_a_script_on_the_offline_default(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--tokens", "16384", "--out", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"SAE saved to {out / 'sae'}: 16 steps" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    sae, logs = _check_run(summary, 16384)
    assert sae.cfg.d_in == 576 and torch.isfinite(sae.W_dec).all()
    assert logs[-1]["metrics/explained_variance"] > 0.3 > logs[0]["metrics/explained_variance"]
