"""Reading an activation cache of one hook: the rows served, with the store's shuffle/state logic (seeded refills,
exact resume, epochs), special tokens filtered at read time, missing or corrupt caches refused; and the multi-hook
builder's refusal of activations that overflow the cache dtype. (Building caches: test_activations_hook_cache.py.)"""

from __future__ import annotations

import pytest
import torch

from domain_sae.activations.cache import CachedActivationSource, CacheError, read_manifest
from domain_sae.activations.live import refill_seed
from training_helpers import FakeTokenStream, kept_rows, make_activation_fn, write_cache

D = 6


def build(tmp_path, n_tokens=100, name="cache", exclude_special=True, dtype=torch.float16):
    """A cache of the first ``n_tokens`` kept rows of a synthetic stream (independently computed rows)."""
    fn, stream = make_activation_fn(D), FakeTokenStream(n_sequences=40)
    acts, ids, segs = kept_rows(stream, fn, 0, 40, exclude_special=exclude_special)
    path = write_cache(tmp_path / name, acts[:n_tokens].to(dtype), ids[:n_tokens], segs[:n_tokens], shard_tokens=32,
                       exclude_special=exclude_special, metadata={"hook_name": "blocks.0.hook_mlp_out"})
    return path, acts[:n_tokens].to(dtype).float()


def drain(src) -> list[torch.Tensor]:
    out = []
    try:
        while True:
            out.append(next(src))
    except StopIteration:
        return out


def test_serves_every_row_once_across_shards(tmp_path):
    path, acts = build(tmp_path, n_tokens=100)
    m = read_manifest(path)
    assert m["n_tokens"] == 100 and m["d_in"] == D and [s["n_tokens"] for s in m["shards"]] == [32, 32, 32, 4]
    src = CachedActivationSource(path, batch_size=10, buffer_tokens=100, seed=3)
    served = torch.cat(drain(src))
    assert served.dtype == torch.float32 and served.shape == (100, D)
    torch.testing.assert_close(served.sort(0).values, acts.sort(0).values, rtol=0, atol=0)


def test_cached_source_serves_seeded_shuffle_and_resumes_exactly(tmp_path):
    path, acts = build(tmp_path, n_tokens=100)
    src = CachedActivationSource(path, batch_size=8, buffer_tokens=30, seed=11)
    assert src.d_in == D and src.n_tokens == 100
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(refill_seed(11, 0)))
    first = torch.cat([next(src) for _ in range(3)])  # 30 // 8 = 3 batches, 6 leftover dropped
    torch.testing.assert_close(first, acts[:30][perm][:24], rtol=0, atol=0)

    ref = CachedActivationSource(path, batch_size=8, buffer_tokens=30, seed=11)
    for _ in range(4):
        next(ref)
    state = ref.state_dict()
    assert state["positions_before_refill"] == 30 and state["batches_served"] == 1
    rest = drain(ref)
    assert len(rest) == 2 + 3 + 1  # refill 1 (2 left), refill 2 (3), refill 3 = last 10 positions (1 batch)
    resumed = CachedActivationSource(path, batch_size=8, buffer_tokens=30, seed=11)
    resumed.load_state_dict(state)
    for r in rest:
        assert torch.equal(next(resumed), r)


def test_repeat_wraps_around(tmp_path):
    path, _ = build(tmp_path, n_tokens=40)
    src = CachedActivationSource(path, batch_size=10, buffer_tokens=40, seed=0, repeat=True)
    a = torch.cat([next(src) for _ in range(4)])
    b = torch.cat([next(src) for _ in range(4)])
    # second epoch: same rows, another permutation
    assert torch.equal(a.sort(0).values, b.sort(0).values) and not torch.equal(a, b)


def test_special_filter_at_read_time(tmp_path):
    path, acts = build(tmp_path, n_tokens=60, exclude_special=False)
    segs = torch.cat([kept_rows(FakeTokenStream(n_sequences=40), make_activation_fn(D), 0, 40,
                                exclude_special=False)[2]])[:60]
    assert (segs == 0).any() and not (segs == -1).any()
    src = CachedActivationSource(path, batch_size=1, buffer_tokens=1000, seed=0, exclude_special=True)
    served = torch.cat(drain(src))
    want = acts[segs != 0]
    assert served.shape == want.shape
    torch.testing.assert_close(served.sort(0).values, want.sort(0).values, rtol=0, atol=0)
    path2, _ = build(tmp_path, n_tokens=20, name="c2")
    with pytest.raises(CacheError, match="exclude_special=False"):
        CachedActivationSource(path2, batch_size=4, buffer_tokens=8, exclude_special=False)


def test_missing_or_corrupt_cache(tmp_path):
    with pytest.raises(CacheError, match="not an activation cache"):
        CachedActivationSource(tmp_path, batch_size=1, buffer_tokens=1)
    path, _ = build(tmp_path, n_tokens=40)
    (path / read_manifest(path)["shards"][0]["file"]).unlink()
    with pytest.raises(CacheError, match="lacks shard"):
        read_manifest(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(CacheError, match="corrupt"):
        read_manifest(path)


def test_activations_that_overflow_the_cache_dtype_are_refused(tmp_path, tiny_lm):
    from domain_sae.activations.hook_cache import build_cache
    from domain_sae.config import DataConfig
    hook = "blocks.0.hook_mlp_out"
    mlp = tiny_lm.model.model.layers[0].mlp
    handle = mlp.register_forward_hook(lambda m, i, o: o * 1e9)  # activations far beyond float16's 65504
    try:
        cfg = DataConfig(model="tiny-llama", data="chat", max_rows=50, context_size=32, model_batch_size=4)
        with pytest.raises(CacheError, match="overflow float16"):
            build_cache(tiny_lm, [hook], cfg, tmp_path / "c16", 64, dtype="float16")
        build_cache(tiny_lm, [hook], cfg, tmp_path / "c32", 64, dtype="float32")  # float32 holds them
    finally:
        handle.remove()
    assert read_manifest(tmp_path / "c32" / hook)["dtype"] == "float32"
