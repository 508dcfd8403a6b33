"""ActivationStore on the real stack: chat data through the SmolLM2 tokenizer into a tiny random Llama, captured
at a hook. Exact resume through TokenStream.skip, and the kept positions are the non-special ones."""

from __future__ import annotations

import pytest
import torch

from domain_sae.activations.live import ActivationStore, refill_seed
from domain_sae.config import TrainConfig
from domain_sae.data.token_stream import TokenStream
from domain_sae.data.segments import training_mask
from domain_sae.models.hooks import capture, hook_d_in, resolve_hook


@pytest.fixture
def live(tiny_lm):
    cfg = TrainConfig(data="chat", context_size=32, max_rows=300, hook="blocks.0.hook_mlp_out")
    hook = resolve_hook(tiny_lm.model, cfg.hook)
    d_in = hook_d_in(tiny_lm.model, hook)

    def fn(ids):
        return capture(tiny_lm.model, hook, ids)

    def make():
        stream = TokenStream(cfg, tiny_lm.tokenizer, split="train", repeat=True)
        return ActivationStore(fn, stream, d_in=d_in, batch_size=50, buffer_tokens=200, model_batch_size=4,
                               exclude_special=True, seed=7)

    return cfg, fn, d_in, make


def test_live_store_serves_non_special_positions_and_resumes_exactly(live, tiny_lm):
    cfg, fn, d_in, make = live
    store = make()
    first = store.first_buffer()
    # independent: the same sequences through the model, masked with the data package's rule
    stream = TokenStream(cfg, tiny_lm.tokenizer, split="train")
    seqs = [s for _, s in zip(range(store.sequences_consumed), stream)]
    ids = torch.stack([s[0] for s in seqs])
    segs = torch.stack([s[1] for s in seqs])
    expected = fn(ids)[training_mask(segs, True)]
    assert first.shape == expected.shape and first.shape[1] == d_in
    perm = torch.randperm(expected.shape[0], generator=torch.Generator().manual_seed(refill_seed(7, 0)))
    torch.testing.assert_close(first, expected.float()[perm])

    for _ in range(6):
        next(store)
    state = store.state_dict()
    rest = [next(store) for _ in range(5)]
    resumed = make()
    resumed.load_state_dict(state)
    for r in rest:
        assert torch.equal(next(resumed), r)
