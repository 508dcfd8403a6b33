"""`dsae export neuronpedia STORE OUT`: every file is a request body that Neuronpedia's feature upload accepts
(checked field by field against its schema, encoded below) and holds the store's own numbers (read back from the
SQLite file with plain SQL, not through the export's code); bad input is one error paragraph."""

from __future__ import annotations

import json
import math
import sqlite3

import numpy as np
import pytest
import torch
from feature_helpers import finetuned_copy, heldout_sets, make_sae

from domain_sae.cli import main
from domain_sae.evaluation.heldout_data import HeldoutData
from domain_sae.evaluation.sae_set import SAESet
from domain_sae.features import neuronpedia
from domain_sae.features.build import build_feature_store
from domain_sae.features.options import FeatureOptions

OPTS = {"top_k": 4, "top_k_per_dataset": 2, "window_before": 3, "window_after": 2, "n_intervals": 3,
        "per_interval": 2, "reservoir": 256, "candidates_factor": 10, "n_logits": 25, "n_neighbours": 3}
DEAD = 5  # a latent of the first SAE that can never fire

# ---------------------------------------------------------------------------------------------------------------
# Neuronpedia's upload schema, as its server checks it: the yup `uploadBatchSchema` of POST /api/feature/upload-batch
# and the route's own checks after it (tokens and values of equal length, unique indices), in
# https://github.com/hijohnnylin/neuronpedia/blob/1e8e576fa1ab04e16f759791a8c6ac79e18444a2/apps/webapp/app/api/feature/upload-batch/route.tsx
# yup's string().required() refuses "" as well as a missing value; number() refuses NaN; .optional() allows a
# missing key, .nullable() a null.
LOGIT = {"token": ("string", True), "value": ("number", True)}
EXPLANATION = {"text": ("string", True), "methodName": ("string?", False), "modelName": ("string?", False)}
ACTIVATION = {"tokens": ("tokens", True), "values": ("numbers", True), "quantileMax": ("number?", False),
              "quantileMin": ("number?", False), "quantileFraction": ("number?", False)}
FEATURE = {"index": ("integer", True), "density": ("number", False), "topLogits": ("logits?", False),
           "bottomLogits": ("logits?", False), "explanations": ("explanations", False),
           "activations": ("activations", True)}
BODY = {"modelId": ("lowercase", True), "source": ("lowercase", True), "features": ("features", True)}


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_upload_batch(body) -> list[str]:
    """The schema's complaints about ``body`` (empty when Neuronpedia's upload would accept it)."""
    errors: list[str] = []

    def need(ok: bool, path: str, what: str) -> None:
        if not ok:
            errors.append(f"{path}: {what}")

    def obj(value, fields: dict, path: str) -> None:
        if not isinstance(value, dict):
            return need(False, path, "not an object")
        need(set(value) <= set(fields), path, f"unknown keys {sorted(set(value) - set(fields))}")  # we add none
        for key, (kind, required) in fields.items():
            if key not in value:
                need(not required, f"{path}.{key}", "required")
                continue
            check(value[key], kind, f"{path}.{key}")

    def check(v, kind: str, path: str) -> None:
        if kind.endswith("?"):
            if v is None:
                return
            kind = kind[:-1]
        if kind in ("string", "lowercase"):
            need(isinstance(v, str) and v != "", path, "non-empty string")
            if kind == "lowercase" and isinstance(v, str):
                need(v == v.lower(), path, "lowercase")
            if path.endswith(".text"):
                need(isinstance(v, str) and len(v) <= 512, path, "at most 512 characters")
        elif kind == "number":
            need(_is_num(v), path, "number")
            if _is_num(v) and path.endswith(".density"):
                need(0 <= v <= 1, path, "in [0, 1]")
            if _is_num(v) and path.endswith(("quantileMax", "quantileMin")):
                need(v <= 99999999, path, "at most 99999999")
            if _is_num(v) and path.endswith("quantileFraction"):
                need(0 <= v <= 1, path, "in [0, 1]")
        elif kind == "integer":
            need(_is_num(v) and float(v).is_integer() and 0 <= v <= 10_000_000, path, "integer in [0, 1e7]")
        elif kind == "tokens":
            need(isinstance(v, list) and 1 <= len(v) <= 1024, path, "1..1024 tokens")
            for i, t in enumerate(v if isinstance(v, list) else []):
                need(isinstance(t, str) and t != "", f"{path}[{i}]", "non-empty string")
        elif kind == "numbers":
            need(isinstance(v, list) and 1 <= len(v) <= 1024, path, "1..1024 values")
            for i, x in enumerate(v if isinstance(v, list) else []):
                need(_is_num(x), f"{path}[{i}]", "number")
        elif kind == "logits":
            need(isinstance(v, list) and len(v) <= 20, path, "at most 20 entries")
            for i, e in enumerate(v if isinstance(v, list) else []):
                obj(e, LOGIT, f"{path}[{i}]")
        elif kind == "explanations":
            need(isinstance(v, list), path, "array")
            for i, e in enumerate(v if isinstance(v, list) else []):
                obj(e, EXPLANATION, f"{path}[{i}]")
        elif kind == "activations":
            need(isinstance(v, list) and len(v) >= 1, path, "at least 1 activation")
            for i, a in enumerate(v if isinstance(v, list) else []):
                obj(a, ACTIVATION, f"{path}[{i}]")
                if isinstance(a, dict) and isinstance(a.get("tokens"), list) and isinstance(a.get("values"), list):
                    need(len(a["tokens"]) == len(a["values"]), f"{path}[{i}]", "tokens and values differ in length")
        elif kind == "features":
            need(isinstance(v, list) and 1 <= len(v) <= 128, path, "1..128 features")
            for i, f in enumerate(v if isinstance(v, list) else []):
                obj(f, FEATURE, f"{path}[{i}]")
            idx = [f.get("index") for f in v if isinstance(f, dict)] if isinstance(v, list) else []
            need(len(set(idx)) == len(idx), path, "indices not unique")
        else:  # pragma: no cover - a typo in the tables above
            raise AssertionError(kind)

    obj(body, BODY, "body")
    return errors


# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def store(smol_tokenizer, tmp_path_factory):
    from conftest import make_tiny_model

    from domain_sae.models.load import LoadedModel
    lm = LoadedModel(model=make_tiny_model("llama"), tokenizer=smol_tokenizer, name="/models/Tiny-Llama_v1",
                     source="in-process", family="llama")
    tmp = tmp_path_factory.mktemp("np")
    parent = make_sae(1)
    child = finetuned_copy(parent, 2, str(tmp / "parent"))
    with torch.no_grad():
        parent.b_enc[DEAD] = -1e9
    for sae in (parent, child):  # a model named by its path, as a local model is
        sae.cfg.metadata["model_name"] = lm.name
    return build_feature_store(SAESet.of([parent, child], [tmp / "parent", tmp / "child"]),
                               HeldoutData.live(["chat", "code"], given=heldout_sets(smol_tokenizer)),
                               tmp / "f.sqlite", n_tokens=192, lm=lm, options=FeatureOptions(**OPTS), write=None)


def _read_sql(path):
    """What the store holds per (sae, latent), read with plain SQL."""
    conn = sqlite3.connect(path)
    texts = {(ds, s): json.loads(t) for ds, s, t in conn.execute("SELECT ds_id, seq, texts FROM sequences")}
    lat = {(r[0], r[1]): {"density": r[2], "pos": json.loads(r[3]), "neg": json.loads(r[4]),
                          "intervals": json.loads(r[5])}
           for r in conn.execute("SELECT sae_id, latent, density, logits_pos, logits_neg, intervals FROM latents")}
    ex = {}
    for sid, lt, kind, interval, ds, seq, lo, acts in conn.execute(
            "SELECT sae_id, latent, kind, interval, ds_id, seq, lo, acts FROM examples WHERE scope = -1 "
            "ORDER BY sae_id, latent, kind DESC, interval, rank"):   # 'top' before 'quantile'
        a = np.frombuffer(acts, np.float32)
        ex.setdefault((sid, lt), []).append((kind, interval, texts[(ds, seq)][lo:lo + len(a)], a))
    labels = {i: lab for i, lab in conn.execute("SELECT sae_id, label FROM saes")}
    conn.close()
    return lat, ex, labels


def test_export_is_accepted_by_the_upload_schema_and_holds_the_store(store, tmp_path, capsys):
    out = tmp_path / "np"
    assert main(["export", "neuronpedia", str(store), str(out)]) == 0
    assert "never-fired latents left out" in capsys.readouterr().out
    man = json.loads((out / "manifest.json").read_text())
    assert man["schema"]["commit"] == neuronpedia.SCHEMA_COMMIT and man["endpoint"] == "POST /api/feature/upload-batch"
    assert man["modelId"] == "tiny-llama_v1"   # last path component of the model name, lowercase
    assert [s["source"] for s in man["sources"]] == ["0-parent", "0-child"]   # LAYER-SET from blocks.0.hook_mlp_out
    lat, ex, labels = _read_sql(store)
    by_label = {v: k for k, v in labels.items()}
    n_replaced = 0
    for src in man["sources"]:
        sid = by_label[src["sae"]]
        seen = []
        for name in src["files"]:
            body = json.loads((out / name).read_text())
            assert validate_upload_batch(body) == [], name
            assert body["modelId"] == man["modelId"] and body["source"] == src["source"]
            for f in body["features"]:
                i = f["index"]
                seen.append(i)
                row = lat[(sid, i)]
                assert f["density"] == pytest.approx(row["density"], rel=1e-12) and f["explanations"] == []
                assert len(row["pos"]) == 25 and len(f["topLogits"]) == 20   # the schema's max of 20
                assert [(g["token"], g["value"]) for g in f["topLogits"]] == \
                    [(t or "\ufffd", v) for _, t, v in row["pos"][:20]]
                assert [(g["token"], g["value"]) for g in f["bottomLogits"]] == \
                    [(t or "\ufffd", v) for _, t, v in row["neg"][:20]]
                stored = ex[(sid, i)]
                assert len(f["activations"]) == len(stored)
                n_int = len(row["intervals"]) - 1
                for a, (kind, interval, texts, acts) in zip(f["activations"], stored):
                    assert a["tokens"] == [t if t else "\ufffd" for t in texts]
                    n_replaced += sum(t == "" for t in texts)
                    assert np.allclose(a["values"], acts, atol=1e-6)
                    if kind == "top":
                        assert a["quantileMin"] is a["quantileMax"] is a["quantileFraction"] is None
                    else:
                        assert (a["quantileMin"], a["quantileMax"]) == (row["intervals"][interval],
                                                                        row["intervals"][interval + 1])
                        assert a["quantileFraction"] == pytest.approx(1 / n_int)
        dead = [i for i in range(48) if (sid, i) not in ex]
        assert src["left_out_never_fired"] == dead and sorted(seen + dead) == list(range(48))
        assert src["features"] == len(seen) and len(seen) == len(set(seen))
    assert man["sources"][0]["left_out_never_fired"] == [DEAD]
    assert n_replaced > 0   # the multi-byte characters of the fixture texts were exercised


def test_the_schema_check_refuses_what_neuronpedia_refuses():
    good = {"modelId": "m", "source": "0-x", "features": [
        {"index": 3, "density": 0.5, "topLogits": None, "bottomLogits": [{"token": "a", "value": 1.0}],
         "explanations": [], "activations": [{"tokens": ["a", "b"], "values": [0.0, 1.0], "quantileMin": None,
                                              "quantileMax": None, "quantileFraction": None}]}]}
    assert validate_upload_batch(good) == []
    bad = json.loads(json.dumps(good))
    feat = bad["features"][0]
    feat["activations"][0]["tokens"] = ["", "b", "c"]
    feat["topLogits"] = [{"token": "t", "value": 1.0}] * 21
    feat["density"] = 1.5
    bad["source"] = "0-X"
    errs = "\n".join(validate_upload_batch(bad))
    for what in ("tokens[0]: non-empty", "differ in length", "at most 20", "density: in [0, 1]", "lowercase"):
        assert what in errs
    assert validate_upload_batch({**good, "features": []}) and validate_upload_batch(
        {**good, "features": [{**good["features"][0], "activations": []}]})


def test_batches_of_at_most_the_batch_size_and_one_sae_with_its_own_ids(store, tmp_path, monkeypatch):
    monkeypatch.setattr(neuronpedia, "BATCH_SIZE", 20)
    man = neuronpedia.export_neuronpedia(store, tmp_path / "one", saes=["child"], model_id="Gemma-2-2B",
                                         source="12-Res-JB")
    (src,) = man["sources"]
    assert man["modelId"] == "gemma-2-2b" and src["source"] == "12-res-jb" and src["sae"] == "child"
    sizes = [len(json.loads((tmp_path / "one" / f).read_text())["features"]) for f in src["files"]]
    assert sizes == [20, 20, 8]   # the child SAE has no dead latent


def test_bad_input_is_one_error_paragraph(store, tmp_path, capsys):
    def err(args) -> str:
        assert main(["export", "neuronpedia", *args]) == 2
        text = capsys.readouterr().err
        assert text.startswith("error: ") and "Traceback" not in text and text.count("\n") == 1
        return text

    assert "does not exist" in err([str(tmp_path / "missing.sqlite"), str(tmp_path / "o1")])
    notes = tmp_path / "notes.txt"
    notes.write_text("not a store")
    assert "not a feature store" in err([str(notes), str(tmp_path / "o2")])
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("mine")
    assert "not empty" in err([str(store), str(theirs)])
    assert (theirs / "keep.txt").read_text() == "mine" and not (theirs / "manifest.json").exists()
    assert "--source names one" in err([str(store), str(tmp_path / "o3"), "--source", "1-x"])
    assert "no SAE 'nope'" in err([str(store), str(tmp_path / "o4"), "--sae", "nope"])
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))
    assert main(["export", "neuronpedia", str(store), str(tmp_path / "o5"), "--sae", "parent"]) == 0
    assert "already holds a domain-sae Neuronpedia export" in err([str(store), str(tmp_path / "o5")])
    assert main(["export", "neuronpedia", str(store), str(tmp_path / "o5"), "--overwrite"]) == 0
    assert len(json.loads((tmp_path / "o5" / "manifest.json").read_text())["sources"]) == 2
