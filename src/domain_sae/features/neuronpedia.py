"""Neuronpedia upload files from a feature store (``dsae export neuronpedia STORE OUT``).

Schema: the request body of Neuronpedia's feature upload, ``POST /api/feature/upload-batch`` (repository
hijohnnylin/neuronpedia, file ``apps/webapp/app/api/feature/upload-batch/route.tsx``, its yup ``uploadBatchSchema``,
last changed in :data:`SCHEMA_COMMIT` (2025-05-29), read at :data:`READ_AT`; the Python client's
``FeatureRequest.upload_batch``, ``webapp-python-client/neuronpedia/requests/feature_request.py``, sends the same
body)::

    {"modelId": str, "source": str,                           # lowercase; the source (SAE) must exist
     "features": [{                                           # 1 to 128 per request, unique indices
        "index": int,                                         # 0 .. 10,000,000
        "density": float,                                     # optional, 0 .. 1
        "topLogits": [{"token": str, "value": float}] | null, # at most 20; bottomLogits the same
        "bottomLogits": [...] | null,
        "explanations": [{"text": str, "methodName": str | null, "modelName": str | null}],   # optional
        "activations": [{                                     # at least 1
            "tokens": [str], "values": [float],               # 1 .. 1024 each, same length, no empty token
            "quantileMin": float | null, "quantileMax": float | null, "quantileFraction": float | null}]}]}

Written: ``OUT/<source>/batch-NNNN.json`` per SAE of the store, each one request body of up to 128 latents, and
``OUT/manifest.json`` (schema version, store, model id, per source the files, the number of latents and the
latents left out). Per latent, from the store (:meth:`.queries.FeatureStore.feature`):

- ``index`` = the latent; ``density`` = n_active / n_kept over all datasets of the store.
- ``topLogits`` / ``bottomLogits`` = the direct-path logit effects (the store's positive / negative lists, the
  first 20), null when the store has none (hook width differs from the unembedding's, or n_logits = 0).
- ``explanations`` = [] (a store of schema version 1 holds no explanations).
- ``activations`` = the top contexts over all datasets (quantile fields null), then the quantile-interval samples
  (``quantileMin`` / ``quantileMax`` = the interval's bounds, ``quantileFraction`` = 1 / n_intervals: the
  intervals are equal-probability intervals of the latent's active values). ``tokens`` = the store's per-token
  display texts of the context window, ``values`` = this latent's activation on each of them. Neuronpedia refuses
  an empty token string; a token whose bytes are completed by a later one (empty in the store, its character
  shown on the completing token) is written as U+FFFD, the replacement character Neuronpedia shows for such
  tokens.

A latent that never fired has no context, and Neuronpedia requires at least one activation per feature: such
latents are left out and listed in the manifest. ``modelId`` defaults to the store's model name (its last path
component, lowercased, characters outside ``a-z0-9._-`` -> "-"); ``source`` to Neuronpedia's ``LAYER-SET`` form
(layer from the hook ``blocks.LAYER...``, set = the SAE label made lowercase the same way).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from .. import __version__
from ..util.jsonsafe import write_json
from ..util.outdirs import new_output_dir
from .queries import FeatureStore
from .schema import StoreError

__all__ = ["NeuronpediaExportError", "SCHEMA_COMMIT", "BATCH_SIZE", "export_neuronpedia", "feature_body"]

SCHEMA_REPOSITORY = "hijohnnylin/neuronpedia"
SCHEMA_FILE = "apps/webapp/app/api/feature/upload-batch/route.tsx"
SCHEMA_COMMIT = "1e8e576fa1ab04e16f759791a8c6ac79e18444a2"
READ_AT = "ebb8426fc550ad5d1f76d52c271a624af3c08a57"
ENDPOINT = "POST /api/feature/upload-batch"
BATCH_SIZE = 128       # features per request (the schema's max)
MAX_LOGITS = 20        # topLogits / bottomLogits entries (the schema's max)
EMPTY_TOKEN = "\ufffd"


class NeuronpediaExportError(StoreError):
    """A Neuronpedia export that cannot be written as asked (unknown SAE, ids that do not fit Neuronpedia)."""


def slug(text: str) -> str:
    """Lowercase, runs of characters outside ``a-z0-9._`` as one "-", no "-" at either end (no "__" either:
    Neuronpedia reads "__" in a source id as a separator)."""
    s = re.sub(r"[^a-z0-9._]+", "-", str(text).lower()).replace("__", "-").strip("-.")
    return re.sub(r"-{2,}", "-", s)


def default_source(sae: dict) -> str:
    m = re.match(r"blocks\.(\d+)\.", sae.get("hook") or "")
    if m is None:
        raise NeuronpediaExportError(
            f"SAE {sae['label']} is at hook {sae.get('hook')!r}, which names no layer, so its Neuronpedia source id "
            f"(LAYER-SET, e.g. 6-res-jb) cannot be derived; pass --source with --sae {sae['label']}.")
    return f"{int(m.group(1))}-{slug(sae['label']) or 'sae'}"


def _token(text: str) -> str:
    return text if text else EMPTY_TOKEN


def _logits(entries: Sequence) -> list[dict] | None:
    if not entries:
        return None
    return [{"token": _token(text), "value": float(value)} for _, text, value in entries[:MAX_LOGITS]]


def _activation(example: dict, interval: dict | None, n_intervals: int) -> dict:
    return {"tokens": [_token(t) for t in example["texts"]], "values": [float(v) for v in example["acts"]],
            "quantileMin": None if interval is None else float(interval["lo"]),
            "quantileMax": None if interval is None else float(interval["hi"]),
            "quantileFraction": None if interval is None else 1.0 / n_intervals}


def feature_body(feature: dict) -> dict | None:
    """One entry of ``features`` for the output of :meth:`FeatureStore.feature`; None for a latent with no
    context (it never fired)."""
    if not feature["top"]:
        return None
    quant = feature["quantiles"]
    acts = [_activation(e, None, 1) for e in feature["top"]]
    acts += [_activation(e, q, len(quant)) for q in quant for e in q["examples"]]
    return {"index": int(feature["latent"]), "density": float(feature["density"]),
            "topLogits": _logits(feature["logits"]["positive"]),
            "bottomLogits": _logits(feature["logits"]["negative"]),
            "explanations": [], "activations": acts}


def _batches(store: FeatureStore, sae: dict, skipped: list[int]) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for latent in range(sae["d_sae"]):
        body = feature_body(store.feature(sae["sae_id"], latent))
        if body is None:
            skipped.append(latent)
            continue
        batch.append(body)
        if len(batch) == BATCH_SIZE:
            yield batch
            batch = []
    if batch:
        yield batch


def _selected(store: FeatureStore, refs: Sequence[str] | None) -> list[dict]:
    return [store.sae(r) for r in refs] if refs else list(store.saes)


def export_neuronpedia(store_path: str | Path, out: str | Path, *, saes: Sequence[str] | None = None,
                       model_id: str | None = None, source: str | None = None, overwrite: bool = False) -> dict:
    """Write the upload files (module docstring) of the store's SAEs (``saes``: labels or ids; default all) to
    ``out``, all at once (``out`` appears only when complete); refuses an existing ``out`` that is not an earlier
    Neuronpedia export, and an earlier one unless ``overwrite``. Returns the manifest."""
    with FeatureStore(store_path) as store:
        chosen = _selected(store, saes)
        if source is not None and len(chosen) != 1:
            raise NeuronpediaExportError(
                f"--source names one Neuronpedia source, but {len(chosen)} SAEs are exported "
                f"({', '.join(s['label'] for s in chosen)}); pick one with --sae LABEL, or drop --source.")
        model = slug(model_id if model_id is not None else
                     Path(str(((store.meta.get("provenance") or {}).get("model") or {}).get("name") or "")).name)
        if not model:
            raise NeuronpediaExportError("The store names no model; pass --model-id, Neuronpedia's id of the model "
                                         "(e.g. gpt2-small).")
        ids = [slug(source) if source is not None else default_source(s) for s in chosen]
        if not all(ids) or len(set(ids)) != len(ids):
            raise NeuronpediaExportError(f"The Neuronpedia source ids {ids} are empty or not distinct; pass "
                                         f"--sae LABEL --source ID for each SAE.")
        manifest = {"format": "neuronpedia-upload-batch", "endpoint": ENDPOINT,
                    "schema": {"repository": SCHEMA_REPOSITORY, "file": SCHEMA_FILE, "commit": SCHEMA_COMMIT,
                               "read_at": READ_AT},
                    "tool": {"name": "domain-sae", "version": __version__}, "store": str(store.path),
                    "store_provenance": {k: (store.meta.get("provenance") or {}).get(k)
                                         for k in ("tool_version", "created", "model", "datasets")},
                    "modelId": model, "sources": []}
        with new_output_dir(out, "neuronpedia-export", overwrite=overwrite, option="OUT") as tmp:
            for sae, sid in zip(chosen, ids):
                (tmp / sid).mkdir()
                skipped: list[int] = []
                files, n = [], 0
                for k, batch in enumerate(_batches(store, sae, skipped)):
                    name = f"{sid}/batch-{k:04d}.json"
                    write_json(tmp / name, {"modelId": model, "source": sid, "features": batch}, indent=None)
                    files.append(name)
                    n += len(batch)
                manifest["sources"].append({"sae": sae["label"], "hook": sae["hook"], "d_sae": sae["d_sae"],
                                            "source": sid, "files": files, "features": n,
                                            "left_out_never_fired": skipped})
            write_json(tmp / "manifest.json", manifest)
    return manifest
