"""Data-parallel training (torch.distributed, gloo on CPU): two processes, each training on its half of every
batch, end with the same SAE as one process training on the whole batches; only rank 0 writes files; a
two-rank run resumes exactly from its checkpoint."""

import json
import os
import shutil
import socket

import pytest
import torch
import torch.multiprocessing as mp

from training_helpers import SyntheticSparseSource, make_sae, tiny_config

CFG = dict(training_tokens=128 * 24, n_checkpoints=1, log_every=4, architecture="standard")


class RankSlice:
    """Rank r's rows [r B/W, (r + 1) B/W) of every batch of a source (the combined batch is the source's)."""

    def __init__(self, source, rank, world):
        self.source, self.rank, self.world = source, rank, world

    def __iter__(self):
        return self

    def __next__(self):
        b = next(self.source)
        n = b.shape[0] // self.world
        return b[self.rank * n:(self.rank + 1) * n]

    def first_buffer(self):
        return self.source.first_buffer()

    def state_dict(self):
        return self.source.state_dict()

    def load_state_dict(self, state):
        self.source.load_state_dict(state)


def _train(run_dir, rank, world, resume_steps=None, **kw):
    from domain_sae.training.trainer import Trainer
    cfg = tiny_config(**{**CFG, **kw})
    src = SyntheticSparseSource(batch_size=cfg.train_batch_size_tokens, buffer_tokens=cfg.buffer_size_tokens,
                                seed=cfg.seed)
    source = RankSlice(src, rank, world) if world > 1 else src
    trainer = Trainer(make_sae(cfg), cfg, source, run_dir, verbose=False)
    if resume_steps is not None:
        trainer.resume()
    trainer.train()
    return trainer


def _worker(rank, world, port, run_dir, resume, kw):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from domain_sae.training import distributed
    distributed.init_from_env()
    try:
        trainer = _train(run_dir, rank, world, resume_steps=True if resume else None, **kw)
        if rank == 1:  # the other rank holds the same parameters
            torch.save(trainer.sae.state_dict(), os.path.join(os.path.dirname(run_dir), "rank1.pt"))
    finally:
        distributed.shutdown()  # both ranks leave together (see its docstring)
    # Everything is written and the group is gone: leave without the interpreter's teardown, where gloo's threads
    # still abort a spawned worker now and then (about one run in fifteen even after the barrier); an exception
    # above still propagates to mp.spawn as usual.
    os._exit(0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(run_dir, resume=False, **kw):
    mp.spawn(_worker, args=(2, _free_port(), str(run_dir), resume, kw), nprocs=2, join=True)


@pytest.mark.parametrize("arch", [dict(), dict(architecture="topk", k=8, aux_k_coefficient=0.03)])
def test_two_ranks_equal_one_process_on_the_combined_batches(tmp_path, arch):
    torch.set_num_threads(1)
    single = _train(tmp_path / "single", 0, 1, **arch)
    _spawn(tmp_path / "ddp" / "run", **arch)
    state = torch.load(tmp_path / "ddp" / "rank1.pt")
    from domain_sae.sae.io import load_sae
    ddp_sae = load_sae(tmp_path / "ddp" / "run" / "sae")
    single_sae = single.final_sae()
    for name, p in single.sae.state_dict().items():
        torch.testing.assert_close(state[name], p, rtol=1e-4, atol=1e-5)
    for name, p in single_sae.state_dict().items():
        if name.startswith("_"):  # kernel-choice counters (a loaded SAE starts them afresh)
            continue
        torch.testing.assert_close(ddp_sae.state_dict()[name], p, rtol=1e-4, atol=1e-5)
    # only rank 0 wrote: one metrics file whose token counts are the global ones
    recs = [json.loads(line) for line in (tmp_path / "ddp" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["details/n_training_tokens"] == 128 * 24
    ref = [json.loads(line) for line in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [r["step"] for r in ref]
    assert sorted(os.listdir(tmp_path / "ddp")) == ["rank1.pt", "run"]


def test_two_rank_run_resumes_from_its_checkpoint(tmp_path):
    from domain_sae.training import checkpoint as ckpt
    _spawn(tmp_path / "full" / "run")
    full = torch.load(tmp_path / "full" / "rank1.pt")
    # keep only the intermediate checkpoint, as if the job had been killed after it
    run = tmp_path / "killed" / "run"
    shutil.copytree(tmp_path / "full" / "run", run)
    for step, kind, path in ckpt.list_checkpoints(run):
        if step == 24:
            shutil.rmtree(path)
    assert len(ckpt.load_checkpoint(ckpt.latest_checkpoint(run)).state["source_ranks"]) == 2
    _spawn(run, resume=True)
    resumed = torch.load(tmp_path / "killed" / "rank1.pt")
    for name, p in full.items():
        torch.testing.assert_close(resumed[name], p, rtol=0, atol=0)
