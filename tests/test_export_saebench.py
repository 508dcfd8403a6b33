"""`dsae eval --format saebench` and `dsae export saebench EVAL_JSON OUT`, run as docs/exports.md shows them (every
`dsae` line of the page runs as written, offline, on tiny fixtures): SAEBench core-eval files whose field names,
nesting and types are SAEBench's (encoded below from its source), whose numbers are eval.json's, the same from both
commands and on every rerun; bad input is one error paragraph."""

from __future__ import annotations

import json
import math
import re
import shlex
import uuid
from pathlib import Path

import pytest
from feature_helpers import make_sae

from domain_sae.cli import main

# ---------------------------------------------------------------------------------------------------------------
# SAEBench's core evaluation output: CoreEvalOutput, its metric categories and CoreEvalConfig, in
# https://github.com/adamkarvonen/SAEBench/blob/8042bb3828c6340da8d12062324e92b2077c571c/sae_bench/evals/core/eval_output.py
# https://github.com/adamkarvonen/SAEBench/blob/8042bb3828c6340da8d12062324e92b2077c571c/sae_bench/evals/core/eval_config.py
# https://github.com/adamkarvonen/SAEBench/blob/8042bb3828c6340da8d12062324e92b2077c571c/sae_bench/evals/base_eval_output.py
# (pydantic dataclasses: `float` fields are JSON numbers, `str | None` may be null, `Any | None` anything).
NUMBER, INTEGER, STRING, BOOL, OBJECT, ARRAY, ANY = "number", "integer", "string", "boolean", "object", "array", "any"
TOP = {"eval_type_id": STRING, "eval_config": OBJECT, "eval_id": STRING, "datetime_epoch_millis": INTEGER,
       "eval_result_metrics": OBJECT, "eval_result_details": ARRAY, "sae_bench_commit_hash": STRING,
       "sae_lens_id": STRING + "?", "sae_lens_release_id": STRING + "?", "sae_lens_version": STRING + "?",
       "sae_cfg_dict": OBJECT + "?", "eval_result_unstructured": ANY}
CONFIG = {"model_name": STRING, "llm_dtype": STRING, "batch_size_prompts": INTEGER,
          "n_eval_reconstruction_batches": INTEGER, "n_eval_sparsity_variance_batches": INTEGER, "dataset": STRING,
          "context_size": INTEGER, "compute_kl": BOOL, "compute_ce_loss": BOOL, "compute_l2_norms": BOOL,
          "compute_sparsity_metrics": BOOL, "compute_variance_metrics": BOOL,
          "compute_featurewise_density_statistics": BOOL, "compute_featurewise_weight_based_metrics": BOOL,
          "exclude_special_tokens_from_reconstruction": BOOL, "verbose": BOOL}
CATEGORIES = {
    "model_behavior_preservation": {"kl_div_score": NUMBER, "kl_div_with_ablation": NUMBER, "kl_div_with_sae": NUMBER},
    "model_performance_preservation": {"ce_loss_score": NUMBER, "ce_loss_with_ablation": NUMBER,
                                       "ce_loss_with_sae": NUMBER, "ce_loss_without_sae": NUMBER},
    "reconstruction_quality": {"explained_variance": NUMBER, "explained_variance_legacy": NUMBER, "mse": NUMBER,
                               "cossim": NUMBER},
    "shrinkage": {"l2_norm_in": NUMBER, "l2_norm_out": NUMBER, "l2_ratio": NUMBER,
                  "relative_reconstruction_bias": NUMBER},
    "sparsity": {"l0": NUMBER, "l1": NUMBER},
    "token_stats": {"total_tokens_eval_reconstruction": INTEGER, "total_tokens_eval_sparsity_variance": INTEGER},
    "misc_metrics": {"freq_over_1_percent": NUMBER, "freq_over_10_percent": NUMBER,
                     "normalized_freq_over_1_percent": NUMBER, "normalized_freq_over_10_percent": NUMBER,
                     "average_max_encoder_cosine_sim": NUMBER, "average_max_decoder_cosine_sim": NUMBER,
                     "frac_alive": NUMBER},
}
# What `dsae eval` does not compute (docs/exports.md): null in our files.
NOT_COMPUTED = {"shrinkage.l2_norm_in", "shrinkage.l2_norm_out", "sparsity.l1", "misc_metrics.freq_over_1_percent",
                "misc_metrics.normalized_freq_over_1_percent", "misc_metrics.normalized_freq_over_10_percent",
                "misc_metrics.average_max_encoder_cosine_sim", "misc_metrics.average_max_decoder_cosine_sim"}
# SAEBench metric <- eval.json key (docs/exports.md)
FROM_EVAL = {"kl_div_score": "metrics/kl_div_score", "kl_div_with_ablation": "metrics/kl_div_with_ablation",
             "kl_div_with_sae": "metrics/kl_div_with_sae", "ce_loss_score": "metrics/ce_loss_score",
             "ce_loss_with_ablation": "metrics/ce_loss_with_ablation", "ce_loss_with_sae": "metrics/ce_loss_with_sae",
             "ce_loss_without_sae": "metrics/ce_loss_without_sae", "explained_variance": "metrics/explained_variance",
             "explained_variance_legacy": "metrics/explained_variance_per_token_mean", "mse": "metrics/mse",
             "cossim": "metrics/cossim", "l2_ratio": "metrics/l2_ratio",
             "relative_reconstruction_bias": "metrics/relative_reconstruction_bias", "l0": "metrics/l0",
             "total_tokens_eval_reconstruction": "tokens/lm_counted",
             "total_tokens_eval_sparsity_variance": "metrics/n_tokens",
             "freq_over_10_percent": "sparsity/dense_fraction"}


def _type_ok(v, kind: str) -> bool:
    if kind.endswith("?") and v is None:
        return True
    kind = kind.rstrip("?")
    return {NUMBER: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
            INTEGER: isinstance(v, int) and not isinstance(v, bool), STRING: isinstance(v, str),
            BOOL: isinstance(v, bool), OBJECT: isinstance(v, dict), ARRAY: isinstance(v, list), ANY: True}[kind]


def schema_errors(doc: dict, allowed_null: set[str]) -> list[str]:
    errors = []
    for fields, value, path in [(TOP, doc, ""), (CONFIG, doc.get("eval_config"), "eval_config.")]:
        if set(value or {}) != set(fields):
            errors.append(f"{path or 'top'} keys {sorted(set(value or {}) ^ set(fields))}")
        errors += [f"{path}{k}: not {t}" for k, t in fields.items() if k in (value or {}) and not _type_ok(value[k], t)]
    metrics = doc.get("eval_result_metrics") or {}
    if set(metrics) != set(CATEGORIES):
        errors.append(f"categories {sorted(set(metrics) ^ set(CATEGORIES))}")
    for cat, fields in CATEGORIES.items():
        block = metrics.get(cat) or {}
        if set(block) != set(fields):
            errors.append(f"{cat} keys {sorted(set(block) ^ set(fields))}")
        for k, t in fields.items():
            if k in block and not (_type_ok(block[k], t) or (block[k] is None and f"{cat}.{k}" in allowed_null)):
                errors.append(f"{cat}.{k}: {block[k]!r} is not {t}")
    if doc.get("eval_type_id") != "core":
        errors.append("eval_type_id is not core")
    if not 0 <= (doc.get("datetime_epoch_millis") or -1) <= 9999999999999:   # BaseEvalOutput's validator
        errors.append("datetime_epoch_millis out of range")
    return errors


# ---------------------------------------------------------------------------------------------------------------

DOC = Path(__file__).resolve().parents[1] / "docs" / "exports.md"


def doc_commands() -> list[list[str]]:
    """The `dsae` lines of the first bash block of docs/exports.md."""
    block = re.search(r"```bash\n(.*?)```", DOC.read_text(), re.S).group(1)
    return [shlex.split(line) for line in block.splitlines() if line.startswith("dsae ")]


@pytest.fixture(scope="module")
def page(smol_tokenizer, tmp_path_factory):
    """docs/exports.md's commands, run as written (offline) in a folder with the page's tiny fixtures: a tiny
    random Llama saved to disk with the real SmolLM2 tokenizer and a random SAE at runs/chat/sae."""
    from conftest import make_tiny_model
    tmp = tmp_path_factory.mktemp("page")
    model_dir = tmp / "tiny_model"
    make_tiny_model("llama").save_pretrained(model_dir)
    smol_tokenizer.save_pretrained(model_dir)
    make_sae(1, metadata={"model_name": str(model_dir), "holdout_fraction": 0.5, "context_size": 32,
                          "training_tokens": 4096}).save(tmp / "runs" / "chat" / "sae")
    commands = doc_commands()
    assert [c[:3] for c in commands] == [["dsae", "features", "runs/chat/sae"], ["dsae", "export", "neuronpedia"],
                                         ["dsae", "eval", "runs/chat/sae"], ["dsae", "export", "saebench"]]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        for cmd in commands:
            assert main(cmd[1:]) == 0, cmd
    return tmp


@pytest.fixture(scope="module")
def evaluated(page):
    """The output of the page's `dsae eval ... --format saebench`."""
    return page / "eval_out"


def _files(core_dir) -> dict:
    return {p.name: json.loads(p.read_text()) for p in sorted(core_dir.iterdir())}


def test_eval_format_saebench_matches_the_schema_and_eval_json(evaluated):
    summary = json.loads((evaluated / "eval.json").read_text())
    files = _files(evaluated / "saebench" / "core")
    assert len(files) == len(summary["results"]) == 1   # one SAE on chat
    for row in summary["results"]:
        name = f"{row['sae']}_{row['dataset']}".replace("/", "_") + "_eval_results.json"   # SAEBench's naming
        doc = files[name]
        assert schema_errors(doc, NOT_COMPUTED) == [], name
        flat = {k: v for block in doc["eval_result_metrics"].values() for k, v in block.items()}
        for ours, key in FROM_EVAL.items():
            assert flat[ours] == row["metrics"][key], ours
        info = summary["saes"][row["sae"]]
        assert flat["frac_alive"] == pytest.approx(1 - row["metrics"]["sparsity/dead_features"] / info["d_sae"])
        assert all(flat[k.split(".")[1]] is None for k in NOT_COMPUTED)
        cfg = doc["eval_config"]
        n_seq = summary["datasets"][row["dataset"]]["tokens"]["tokens/sequences"]
        assert cfg["dataset"] == summary["datasets"][row["dataset"]]["spec"]
        assert cfg["batch_size_prompts"] == summary["batch_size"]
        assert cfg["n_eval_reconstruction_batches"] == cfg["n_eval_sparsity_variance_batches"] == \
            math.ceil(n_seq / summary["batch_size"])
        assert cfg["context_size"] == summary["config"]["context_size"] == 32
        assert cfg["model_name"] == summary["model"]["name"] and cfg["compute_kl"] and cfg["compute_ce_loss"]
        assert cfg["exclude_special_tokens_from_reconstruction"] is (row["splice"] == "training_mask")
        assert doc["sae_cfg_dict"]["d_sae"] == info["d_sae"] == 48 and doc["sae_cfg_dict"]["training_tokens"] == 4096
        assert doc["sae_cfg_dict"]["architecture"] == "standard"
        uuid.UUID(doc["eval_id"])
        extra = doc["eval_result_unstructured"]
        assert set(extra["not_computed"]) == NOT_COMPUTED
        assert extra["standard_errors"]["reconstruction_quality.explained_variance"] == \
            row["errors"]["overall"]["metrics/explained_variance"]["se"]
        assert extra["domain_sae_row"] == row and extra["source"]["sae"] == row["sae"]


def test_the_page_names_what_its_commands_write(page):
    text = DOC.read_text()
    man = json.loads((page / "neuronpedia_export" / "manifest.json").read_text())
    (src,) = man["sources"]
    assert src["files"][0] == "0-chat/batch-0000.json" and src["files"][0] in text
    for out in ("eval_out/saebench/core", "saebench_export/core"):
        names = sorted(p.name for p in (page / out).iterdir())
        assert names == ["chat_chat_eval_results.json"] and names[0] in text


def test_export_of_eval_json_equals_eval_format_and_reruns_are_identical(evaluated, tmp_path, capsys):
    path = str(evaluated / "eval.json")
    assert main(["export", "saebench", path, str(tmp_path / "one")]) == 0
    assert "Wrote 1 SAEBench core result(s)" in capsys.readouterr().out
    assert main(["export", "saebench", str(evaluated), str(tmp_path / "two")]) == 0   # the directory works too
    one = {p.name: p.read_bytes() for p in (tmp_path / "one" / "core").iterdir()}
    assert one == {p.name: p.read_bytes() for p in (evaluated / "saebench" / "core").iterdir()}
    assert one == {p.name: p.read_bytes() for p in (tmp_path / "two" / "core").iterdir()}


def test_reconstruction_only_eval_has_null_ce_and_kl(evaluated, tmp_path):
    """eval.json of `dsae eval --activations` (no model run): the CE / KL metrics are not there."""
    summary = json.loads((evaluated / "eval.json").read_text())
    summary["splice"] = "not_spliced"
    for row in summary["results"]:
        row["splice"] = "not_spliced"
        row["metrics"] = {k: v for k, v in row["metrics"].items() if not k.startswith(
            ("metrics/ce_", "metrics/kl_", "metrics/delta_loss", "tokens/lm_"))}
    (tmp_path / "eval.json").write_text(json.dumps(summary))
    assert main(["export", "saebench", str(tmp_path / "eval.json"), str(tmp_path / "out")]) == 0
    lm_only = {f"model_behavior_preservation.{k}" for k in CATEGORIES["model_behavior_preservation"]} | \
        {f"model_performance_preservation.{k}" for k in CATEGORIES["model_performance_preservation"]} | \
        {"token_stats.total_tokens_eval_reconstruction"}
    for doc in _files(tmp_path / "out" / "core").values():
        assert schema_errors(doc, NOT_COMPUTED | lm_only) == []
        assert set(doc["eval_result_unstructured"]["not_computed"]) == NOT_COMPUTED | lm_only
        cfg = doc["eval_config"]
        assert not cfg["compute_kl"] and not cfg["compute_ce_loss"] and cfg["n_eval_reconstruction_batches"] == 0
        assert cfg["compute_variance_metrics"] and doc["eval_result_metrics"]["sparsity"]["l0"] is not None


def test_bad_input_is_one_error_paragraph(evaluated, tmp_path, capsys):
    def err(*args) -> str:
        assert main(["export", "saebench", *map(str, args)]) == 2
        text = capsys.readouterr().err
        assert text.startswith("error: ") and "Traceback" not in text and text.count("\n") == 1
        return text

    assert "does not exist" in err(tmp_path / "missing.json", tmp_path / "o")
    (tmp_path / "store.sqlite").write_bytes(b"SQLite format 3\x00" + bytes(range(256)))
    assert "not a JSON file" in err(tmp_path / "store.sqlite", tmp_path / "o")
    (tmp_path / "results.json").write_text(json.dumps({"schema": "domain-sae/study-results/1"}))
    assert "not a domain-sae evaluation" in err(tmp_path / "results.json", tmp_path / "o")
    assert not (tmp_path / "o").exists()
    assert "holds a domain-sae evaluation output" in err(evaluated / "eval.json", evaluated)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("mine")
    assert "not empty" in err(evaluated / "eval.json", theirs)
    assert sorted(p.name for p in theirs.iterdir()) == ["keep.txt"]
    assert main(["export", "saebench", str(evaluated / "eval.json"), str(tmp_path / "done")]) == 0
    assert "already holds a domain-sae SAEBench export" in err(evaluated / "eval.json", tmp_path / "done")
    assert main(["export", "saebench", str(evaluated / "eval.json"), str(tmp_path / "done"), "--overwrite"]) == 0
