"""Activation cache: round trip, manifest, atomic build, serving with the store's shuffle/state logic."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from domain_sae.activations.cache import CachedActivationSource, CacheError, build_activation_cache, read_manifest
from domain_sae.activations.live import refill_seed
from training_helpers import FakeTokenStream, kept_rows, make_activation_fn

D = 6


def build(tmp_path, n_tokens=100, name="cache", **kw):
    fn = make_activation_fn(D)
    stream = FakeTokenStream(n_sequences=40)
    kw.setdefault("shard_tokens", 32)
    path = build_activation_cache(fn, stream, tmp_path / name, n_tokens, model_batch_size=3,
                                  metadata={"hook_name": "blocks.0.hook_mlp_out"}, **kw)
    return path, fn, stream


def test_round_trip_matches_independent_kept_positions(tmp_path):
    path, fn, stream = build(tmp_path, n_tokens=100)
    m = read_manifest(path)
    assert m["n_tokens"] == 100 and m["d_in"] == D and m["dtype"] == "float16"
    assert [s["n_tokens"] for s in m["shards"]] == [32, 32, 32, 4]
    assert m["metadata"]["hook_name"] == "blocks.0.hook_mlp_out" and m["exclude_special"] is True
    shards = [load_file(str(path / s["file"])) for s in m["shards"]]
    acts = torch.cat([s["activations"] for s in shards])
    ids = torch.cat([s["token_ids"] for s in shards])
    segs = torch.cat([s["segments"] for s in shards])
    exp_acts, exp_ids, exp_segs = kept_rows(stream, fn, 0, m["n_sequences"])
    assert acts.dtype == torch.float16 and segs.dtype == torch.int8
    torch.testing.assert_close(acts, exp_acts[:100].half(), rtol=0, atol=0)
    assert torch.equal(ids.long(), exp_ids[:100]) and torch.equal(segs, exp_segs[:100])
    assert not any(".tmp-" in p.name for p in tmp_path.iterdir())


def test_cached_source_serves_seeded_shuffle_and_resumes_exactly(tmp_path):
    path, fn, stream = build(tmp_path, n_tokens=100)
    src = CachedActivationSource(path, batch_size=8, buffer_tokens=30, seed=11)
    assert src.d_in == D and src.n_tokens == 100
    acts = kept_rows(stream, fn, 0, 40)[0][:100].half().float()
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(refill_seed(11, 0)))
    first = torch.cat([next(src) for _ in range(3)])  # 30 // 8 = 3 batches, 6 leftover dropped
    torch.testing.assert_close(first, acts[:30][perm][:24], rtol=0, atol=0)

    ref = CachedActivationSource(path, batch_size=8, buffer_tokens=30, seed=11)
    for _ in range(4):
        next(ref)
    state = ref.state_dict()
    assert state["positions_before_refill"] == 30 and state["batches_served"] == 1
    rest = []
    try:
        while True:
            rest.append(next(ref))
    except StopIteration:
        pass
    assert len(rest) == 2 + 3 + 1  # refill 1 (2 left), refill 2 (3), refill 3 = last 10 positions (1 batch)
    resumed = CachedActivationSource(path, batch_size=8, buffer_tokens=30, seed=11)
    resumed.load_state_dict(state)
    for r in rest:
        assert torch.equal(next(resumed), r)


def test_repeat_wraps_around(tmp_path):
    path, *_ = build(tmp_path, n_tokens=40)
    src = CachedActivationSource(path, batch_size=10, buffer_tokens=40, seed=0, repeat=True)
    a = torch.cat([next(src) for _ in range(4)])
    b = torch.cat([next(src) for _ in range(4)])
    # second epoch: same rows, another permutation
    assert torch.equal(a.sort(0).values, b.sort(0).values) and not torch.equal(a, b)


def test_special_filter_at_read_time(tmp_path):
    path, fn, stream = build(tmp_path, n_tokens=60, exclude_special=False)
    assert read_manifest(path)["exclude_special"] is False
    segs = torch.cat([load_file(str(path / s["file"]))["segments"] for s in read_manifest(path)["shards"]])
    assert (segs == 0).any() and not (segs == -1).any()
    n_nonspecial = int((segs != 0).sum())
    src = CachedActivationSource(path, batch_size=1, buffer_tokens=1000, seed=0, exclude_special=True)
    served = []
    try:
        while True:
            served.append(next(src))
    except StopIteration:
        pass
    assert len(served) == n_nonspecial
    path2, *_ = build(tmp_path, n_tokens=20, name="c2")
    with pytest.raises(CacheError, match="exclude_special=False"):
        CachedActivationSource(path2, batch_size=4, buffer_tokens=8, exclude_special=False)


def test_failed_build_leaves_nothing_and_overwrite_is_atomic(tmp_path):
    path, *_ = build(tmp_path, n_tokens=50)
    before = read_manifest(path)
    calls = {"n": 0}
    good = make_activation_fn(D)

    def crashing(ids):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash mid-build")
        return good(ids)

    with pytest.raises(RuntimeError, match="simulated"):
        build_activation_cache(crashing, FakeTokenStream(), path, 80, model_batch_size=2, shard_tokens=8,
                               overwrite=True)
    assert read_manifest(path) == before  # the old cache is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
    with pytest.raises(CacheError, match="already exists"):
        build(tmp_path, n_tokens=10)
    build(tmp_path, n_tokens=70, overwrite=True)
    assert read_manifest(path)["n_tokens"] == 70


def test_short_stream_warns_and_overflow_is_reported(tmp_path):
    with pytest.warns(UserWarning, match="holds"):
        path, *_ = build(tmp_path, n_tokens=10_000)
    assert 0 < read_manifest(path)["n_tokens"] < 10_000
    with pytest.raises(CacheError, match="overflow float16"):
        build_activation_cache(lambda ids: torch.full((*ids.shape, D), 1e6), FakeTokenStream(), tmp_path / "o", 10)
    assert not (tmp_path / "o").exists()
    big = build_activation_cache(lambda ids: torch.full((*ids.shape, D), 1e6), FakeTokenStream(), tmp_path / "o",
                                 10, dtype="float32")
    assert read_manifest(big)["dtype"] == "float32"


def test_missing_or_corrupt_cache(tmp_path):
    with pytest.raises(CacheError, match="not an activation cache"):
        CachedActivationSource(tmp_path, batch_size=1, buffer_tokens=1)
    path, *_ = build(tmp_path, n_tokens=40)
    (path / read_manifest(path)["shards"][0]["file"]).unlink()
    with pytest.raises(CacheError, match="lacks shard"):
        read_manifest(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(CacheError, match="corrupt"):
        read_manifest(path)


def test_a_rebuild_removes_what_a_killed_build_left(tmp_path):
    # a kill by SIGTERM skips the atomic writer's cleanup: its temporary directory stays beside the cache
    (tmp_path / "cache.tmp-dead1").mkdir()
    (tmp_path / "cache.tmp-dead1" / "shard_00000.safetensors").write_bytes(b"half")
    (tmp_path / "other.tmp-busy").mkdir()  # another cache's build: left alone
    build(tmp_path)
    assert not (tmp_path / "cache.tmp-dead1").exists() and (tmp_path / "other.tmp-busy").is_dir()
    assert read_manifest(tmp_path / "cache")["n_tokens"] == 100
