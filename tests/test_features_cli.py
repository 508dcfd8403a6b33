"""`dsae features` and `dsae dashboard --export` end to end through the CLI, on a tiny model saved to disk."""

from __future__ import annotations

import json

import pytest

from feature_helpers import TEXTS_A, TEXTS_B, make_sae

from domain_sae.cli import main
from domain_sae.errors import UserError
from domain_sae.features.build import _prepare_out
from domain_sae.features.queries import FeatureStore


def test_cli_builds_store_and_exports(tmp_path, smol_tokenizer, capsys):
    from conftest import make_tiny_model
    model_dir = tmp_path / "tiny_model"
    make_tiny_model("llama").save_pretrained(model_dir)
    smol_tokenizer.save_pretrained(model_dir)
    sae = make_sae(1, metadata={"model_name": str(model_dir), "holdout_fraction": 1.0, "context_size": 32})
    sae.save(tmp_path / "run" / "sae")
    for name, texts in (("a.jsonl", TEXTS_A), ("b.jsonl", TEXTS_B)):
        (tmp_path / name).write_text("".join(json.dumps({"text": t * 3}) + "\n" for t in texts))
    store = tmp_path / "f.sqlite"
    args = ["features", str(tmp_path / "run" / "sae"), "--data", str(tmp_path / "a.jsonl"), "--data",
            str(tmp_path / "b.jsonl"), "--tokens", "128", "--out", str(store), "--top-k", "4"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "predicted peak memory" in err and "ETA" in err
    st = FeatureStore(store)
    assert st.saes[0]["label"] == "run" and len(st.datasets) == 2
    assert st.datasets[0]["n_tokens"] == 128
    assert main(args) == 2                                   # refuses to overwrite
    assert "already exists" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    assert main(["dashboard", str(store), "--export", str(tmp_path / "site"), "--export-latents", "3"]) == 0
    assert (tmp_path / "site" / "feature" / "0" / "2.html").is_file()
    assert not (tmp_path / "site" / "feature" / "0" / "3.html").exists()
    assert main(["dashboard", str(tmp_path / "missing.sqlite")]) == 2
    assert main(["dashboard", str(store), "--ablation-latents", "0"]) == 2  # refused before anything is served
    assert "--ablation-latents must be at least 1" in capsys.readouterr().err


def test_overwrite_never_replaces_a_file_that_is_not_a_store(tmp_path):
    notes = tmp_path / "notes.sqlite"
    notes.write_bytes(b"my notes, not a store")
    with pytest.raises(UserError, match="not a domain-sae feature store"):
        _prepare_out(notes, overwrite=True)
    assert notes.read_bytes() == b"my notes, not a store"
