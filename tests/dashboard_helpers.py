"""Shared pieces of the dashboard tests: the tiny in-process Llama as a LoadedModel, feature stores built over the
planted held-out texts of feature_helpers (one SAE, two unrelated SAEs, a fine-tuned pair), waiting for a job and
the greedy / loss computations the steering tests compare with (full forwards, no KV cache)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from feature_helpers import finetuned_copy, heldout_sets, make_sae

from domain_sae.evaluation.heldout_data import HeldoutData
from domain_sae.evaluation.sae_set import SAESet
from domain_sae.features.build import build_feature_store
from domain_sae.features.options import FeatureOptions
from domain_sae.models.hooks import forward_with_patch

OPTS = dict(top_k=6, top_k_per_dataset=4, window_before=6, window_after=3)


def tiny_model(tokenizer):
    """The tiny random Llama of conftest with the real SmolLM2 tokenizer, named as make_sae's metadata says."""
    from conftest import make_tiny_model

    from domain_sae.models.load import LoadedModel
    return LoadedModel(make_tiny_model("llama"), tokenizer, "tiny-llama", "in-process", "llama")


def build_store(tmp: Path, lm, saes: dict, *, name: str = "f.sqlite", tokens: int = 192, **options) -> Path:
    """A store of ``saes`` (label -> SAE, saved nowhere: the label is the last part of its path ``tmp/label``) over
    the chat and code texts of feature_helpers."""
    paths = [tmp / label for label in saes]
    return build_feature_store(SAESet.of(list(saes.values()), paths),
                               HeldoutData.live(["chat", "code"], given=heldout_sets(lm.tokenizer)), tmp / name,
                               n_tokens=tokens, lm=lm, options=FeatureOptions(**{**OPTS, **options}), write=None)


def store_kinds(tmp: Path, lm, d_sae: int = 16) -> dict[str, tuple[Path, dict]]:
    """Three stores: ``one`` (one SAE), ``two`` (two unrelated SAEs on the hook), ``pair`` (a fine-tuned pair)."""
    out = {}
    one = {"solo": make_sae(11, d_sae=d_sae)}
    two = {"left": make_sae(12, d_sae=d_sae), "right": make_sae(13, d_sae=d_sae)}
    parent = make_sae(14, d_sae=d_sae)
    pair = {"base": parent, "base_code": finetuned_copy(parent, 15, str(tmp / "pair" / "base"))}
    for kind, saes in (("one", one), ("two", two), ("pair", pair)):
        (tmp / kind).mkdir(exist_ok=True)
        out[kind] = (build_store(tmp / kind, lm, saes), saes)
    return out


def wait_job(get, job_id: str, timeout: float = 120.0) -> dict:
    """Poll ``get(f"/api/job/{job_id}")`` until the job ends; its JSON."""
    t0 = time.time()
    while True:
        j = get(f"/api/job/{job_id}").json()
        if j["status"] in ("done", "error", "cancelled"):
            return j
        if time.time() - t0 > timeout:
            raise AssertionError(f"job {job_id} still {j['status']} after {timeout} s")
        time.sleep(0.02)


@torch.no_grad()
def greedy(model, hook, ids: list[int], patch, n: int) -> list[int]:
    """Greedy continuation by full forwards of the whole sequence at every step (no cache), patched at every
    position (``patch`` None: clean)."""
    x = torch.tensor([ids])
    new = []
    for _ in range(n):
        logits = model(input_ids=x, use_cache=False).logits if patch is None else \
            forward_with_patch(model, hook, x, patch)
        nxt = int(logits[0, -1].argmax())
        new.append(nxt)
        x = torch.cat([x, torch.tensor([[nxt]])], dim=1)
    return new


@torch.no_grad()
def prompt_ce(model, hook, ids: list[int], patch) -> torch.Tensor:
    """[T-1] next-token cross-entropy of every target of the prompt (float64 log-softmax)."""
    x = torch.tensor([ids])
    logits = model(input_ids=x, use_cache=False).logits if patch is None else forward_with_patch(model, hook, x, patch)
    return F.cross_entropy(logits[0, :-1].double(), x[0, 1:], reduction="none")
