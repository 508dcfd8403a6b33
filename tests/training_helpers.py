"""Helpers for the activations/training tests: synthetic token streams and activation functions (no model), and
(run as a script) a tiny deterministic training run used by the kill-and-resume test."""

from __future__ import annotations

import torch


class FakeTokenStream:
    """Deterministic sequences: sequence i has ids (i * 7 + arange(ctx)) % vocab and segment codes drawn from a
    generator seeded by i (some -1 padding at the end, some 0 special tokens). ``skip(n)`` before iterating."""

    def __init__(self, n_sequences: int | None = 50, ctx: int = 8, vocab: int = 97, seed: int = 0):
        self.n_sequences, self.ctx, self.vocab, self.seed = n_sequences, ctx, vocab, seed
        self._start = 0
        self.skipped_with_skip = 0

    def sequence(self, i: int):
        ids = (i * 7 + torch.arange(self.ctx)) % self.vocab
        g = torch.Generator().manual_seed(self.seed * 100003 + i)
        segs = torch.randint(1, 4, (self.ctx,), generator=g).to(torch.int8)
        segs[0] = 0  # BOS
        n_pad = int(torch.randint(0, 3, (1,), generator=g))
        if n_pad:
            segs[-n_pad:] = -1
        return ids, segs

    def skip(self, n: int) -> None:
        self._start += n
        self.skipped_with_skip += n

    def __iter__(self):
        i = self._start
        while self.n_sequences is None or i < self.n_sequences:
            yield self.sequence(i)
            i += 1


class PlainStream:
    """The same data without skip(): the store must advance it by reading."""

    def __init__(self, **kw):
        self._inner = FakeTokenStream(**kw)

    def __iter__(self):
        return iter(self._inner)


def make_activation_fn(d_in: int = 6, vocab: int = 97, seed: int = 1):
    """acts[b, t] = E[id] + 0.01 * t, a deterministic function of the token and its position."""
    E = torch.randn(vocab, d_in, generator=torch.Generator().manual_seed(seed))

    def fn(input_ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1], dtype=torch.float32)[None, :, None]
        return E[input_ids] + 0.01 * pos

    return fn


def write_cache(path, acts: torch.Tensor, token_ids: torch.Tensor, segments: torch.Tensor, *, shard_tokens: int,
                exclude_special: bool = True, metadata: dict | None = None):
    """A single-hook activation cache holding exactly these rows (the layout CachedActivationSource reads, as
    activations.hook_cache.build_cache writes it per hook), ``shard_tokens`` rows a shard; returns ``path``."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file
    path = Path(path)
    path.mkdir(parents=True)
    shards = []
    for i, a in enumerate(range(0, acts.shape[0], shard_tokens)):
        name = f"shard_{i:05d}.safetensors"
        save_file({"activations": acts[a:a + shard_tokens].contiguous(),
                   "token_ids": token_ids[a:a + shard_tokens].to(torch.int32).contiguous(),
                   "segments": segments[a:a + shard_tokens].to(torch.int8).contiguous()}, str(path / name))
        shards.append({"file": name, "n_tokens": int(acts[a:a + shard_tokens].shape[0])})
    dtype = str(acts.dtype).removeprefix("torch.")
    (path / "manifest.json").write_text(json.dumps({
        "format": "domain-sae-activation-cache", "version": 1, "d_in": int(acts.shape[1]),
        "n_tokens": int(acts.shape[0]), "n_sequences": 0, "dtype": dtype, "exclude_special": exclude_special,
        "shards": shards, "metadata": dict(metadata or {})}))
    return path


def kept_rows(stream: FakeTokenStream, act_fn, start: int, stop: int, exclude_special: bool = True):
    """Independent computation: activations, ids and segments of the kept positions of sequences [start, stop)."""
    acts, ids_out, segs_out = [], [], []
    for i in range(start, stop):
        ids, segs = stream.sequence(i)
        a = act_fn(ids[None])[0]
        keep = (segs != -1) & ((segs != 0) if exclude_special else torch.ones_like(segs, dtype=torch.bool))
        acts.append(a[keep])
        ids_out.append(ids[keep])
        segs_out.append(segs[keep])
    return torch.cat(acts), torch.cat(ids_out), torch.cat(segs_out)


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic SAE training data and a tiny deterministic training run.

from domain_sae.activations.live import ShuffleBufferSource  # noqa: E402


class SyntheticSparseSource(ShuffleBufferSource):
    """x = c @ D + offset: sparse non-negative codes c over ``n_features`` random unit directions D in ``d_in``
    dimensions (a low-rank sparse source an SAE can learn). The rows of a refill are a pure function of
    (seed, cursor), so the source has exactly the store's refill/shuffle/state behaviour."""

    _cursor_key = "rows_before_refill"

    def __init__(self, *, d_in=16, n_features=32, p_active=0.08, batch_size=128, buffer_tokens=512, seed=0,
                 delay_s: float = 0.0):
        super().__init__(batch_size=batch_size, buffer_tokens=buffer_tokens, seed=seed)
        g = torch.Generator().manual_seed(seed + 1)
        D = torch.randn(n_features, d_in, generator=g)
        self.D = D / D.norm(dim=1, keepdim=True)
        self.offset = 0.3 * torch.randn(d_in, generator=g)
        self.d_in, self.n_features, self.p_active, self.delay_s = d_in, n_features, p_active, delay_s

    def _read_refill(self):
        n = self.buffer_tokens
        g = torch.Generator().manual_seed(self.seed * 7919 + self._cursor)
        active = torch.rand(n, self.n_features, generator=g) < self.p_active
        mags = 0.5 + torch.rand(n, self.n_features, generator=g)
        self._cursor += n
        return (active * mags) @ self.D + self.offset

    def _seek(self, cursor):
        self._cursor = cursor

    def __next__(self):
        if self.delay_s:
            import time
            time.sleep(self.delay_s)
        return super().__next__()


def tiny_config(**kw):
    from domain_sae.config import TrainConfig
    base = dict(training_tokens=128 * 60, train_batch_size_tokens=128, buffer_size_tokens=512, lr=4e-3,
                l1_coefficient=0.3, l1_warm_up_steps=10, lr_warm_up_steps=5, lr_decay_steps=10, log_every=5,
                eval_every=0, feature_sampling_window=10, dead_feature_window=20, n_checkpoints=3, seed=0,
                resume_checkpoint_minutes=0.0, normalize_activations="none", d_sae=64)
    base.update(kw)
    return TrainConfig(**base).validate()


def make_sae(cfg, d_in=16, sample=None):
    """A StandardSAE built and initialised the way the pipeline does it (deterministic for a given seed)."""
    from domain_sae.sae.standard import SAEModelConfig, StandardSAE
    torch.manual_seed(cfg.seed)
    mcfg = SAEModelConfig(architecture="standard", d_in=d_in, d_sae=cfg.d_sae, dtype=cfg.dtype,
                          apply_b_dec_to_input=cfg.apply_b_dec_to_input,
                          normalize_activations=cfg.normalize_activations,
                          mse_loss_normalization=cfg.mse_loss_normalization, lp_norm=cfg.lp_norm,
                          scale_sparsity_penalty_by_decoder_norm=cfg.scale_sparsity_penalty_by_decoder_norm,
                          normalize_sae_decoder=cfg.normalize_sae_decoder,
                          metadata={"model_name": "synthetic", "hook_name": "synthetic", "context_size": 8,
                                    "prepend_bos": True, "dataset_path": "synthetic",
                                    "training_tokens": cfg.training_tokens})
    sae = StandardSAE(mcfg)
    try:
        from domain_sae.sae.init import initialize
    except ImportError:
        return sae
    initialize(sae, cfg, sample, torch.Generator().manual_seed(cfg.seed))
    return sae


def run_tiny(run_dir, *, resume=False, delay_s=0.0, evaluator=None, **cfg_kw):
    """Train (or resume) the tiny deterministic run; returns the summary. One thread, so that a run in another
    process produces bit-identical numbers."""
    from domain_sae.training.trainer import Trainer
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = tiny_config(**cfg_kw)
        source = SyntheticSparseSource(batch_size=cfg.train_batch_size_tokens, buffer_tokens=cfg.buffer_size_tokens,
                                       seed=cfg.seed, delay_s=delay_s)
        trainer = Trainer(make_sae(cfg), cfg, source, run_dir, evaluator=evaluator, verbose=False)
        if resume:
            trainer.resume()
        return trainer.train()
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":  # python tests/training_helpers.py RUN_DIR [--resume] [--delay S]
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--delay", type=float, default=0.0)
    a = ap.parse_args()
    run_tiny(a.run_dir, resume=a.resume, delay_s=a.delay)


def killed_copy(full, killed, after_step: int):
    """A copy of the finished run ``full`` as a kill right after its checkpoint at ``after_step`` leaves it: later
    checkpoints, the final ``sae/`` and the finished status gone (status "running"). Returns ``killed``."""
    import shutil
    from domain_sae.runs.directory import write_status
    from domain_sae.training import checkpoint as ckpt
    shutil.copytree(full, killed)
    for step, _, path in ckpt.list_checkpoints(killed):
        if step > after_step:
            shutil.rmtree(path)
    shutil.rmtree(killed / "sae")
    write_status(killed, "running")
    return killed
