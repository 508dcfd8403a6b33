"""End-to-end (KL) training, objective kl / kl+mse, on the tiny in-process model: one step's loss and SAE gradients
equal a direct float64 computation (own hook, log_softmax, autograd), a killed fine-tune resumes to the same SAE,
bad combinations are refused in one paragraph, and `dsae finetune --objective kl` runs from the command line (the
tiny model here; the offline default in a slow test)."""

import copy
import json

import pytest
import torch

from domain_sae.cli import main
from domain_sae.config import ConfigError, TrainConfig, build_config
from domain_sae.data.segments import PAD, SPECIAL
from domain_sae.models.hooks import resolve_hook
from domain_sae.runs import many as multirun, single as pipeline
from domain_sae.runs.kl_objective import KLObjective, token_batch_source
from domain_sae.sae.init import initialize
from domain_sae.sae.io import load_sae
from domain_sae.training import checkpoint as ckpt
from training_helpers import killed_copy
from domain_sae.training.trainer import Trainer

HOOK = "blocks.1.hook_resid_post"


def tiny_cfg(tmp_path, **kw):
    base = dict(hook=HOOK, data="chat", max_rows=300, context_size=32, expansion_factor=2, training_tokens=512,
                train_batch_size_tokens=64, buffer_size_tokens=128, lr=3e-3, l1_coefficient=1.0, log_every=1,
                eval_every=0, n_checkpoints=0, output_dir=str(tmp_path / "runs"), run_name="r",
                resume_checkpoint_minutes=0, model_batch_size=1)
    base.update(kw)
    return build_config(TrainConfig, overrides=base)


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _direct_forward(model, input_ids, attention_mask, replace=None):
    """(logits, activation at HOOK) from the model's own decoder layer 1 via a plain torch forward hook: the
    activation is its output (first element when a tuple), optionally replaced by ``replace`` (with gradients)."""
    store = {}

    def fn(module, args, output):
        a = output[0] if isinstance(output, tuple) else output
        store["a"] = a
        if replace is None:
            return None
        return (replace,) + tuple(output[1:]) if isinstance(output, tuple) else replace

    handle = model.model.layers[1].register_forward_hook(fn)
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    finally:
        handle.remove()
    return logits, store["a"]


@pytest.mark.parametrize("objective,weight,l1", [("kl", 1.0, 0.0), ("kl", 1.0, 0.3), ("kl+mse", 0.5, 0.3)])
def test_step_equals_a_direct_kl_computation(tmp_path, tiny_lm, objective, weight, l1):
    # 5 sequences per step in model chunks of 2 (uneven), activation scale s != 1; the last sequence ends in padding
    # (masked out of attention, never spliced or counted) and the chat template gives SPECIAL positions.
    cfg = tiny_cfg(tmp_path, objective=objective, kl_mse_weight=weight, train_batch_size_tokens=5 * 32,
                   buffer_size_tokens=5 * 32, model_batch_size=2)
    hook = resolve_hook(tiny_lm.model, HOOK)
    ids, segs = next(token_batch_source(cfg, tiny_lm, hook))
    ids[4, 25:], segs[4, 25:] = 0, PAD
    assert ids.shape == (5, 32) and bool((segs == SPECIAL).any())
    sae = pipeline.new_sae(cfg, 32, {})
    initialize(sae, cfg, None, torch.Generator().manual_seed(0))
    reference = copy.deepcopy(sae)
    s = 1.7
    trainer = Trainer(sae, cfg, None, tmp_path / "r", loggers=[], activation_scale=s, verbose=False,
                      objective=KLObjective(cfg, tiny_lm, hook))
    _, out = trainer.objective.step(trainer, (ids, segs), l1, None, None)

    # Direct: one forward of the whole batch, the SAE's reconstruction written into the activation, float64 KL.
    model = tiny_lm.model
    attn = (segs != PAD).long()
    with torch.no_grad():
        clean, a = _direct_forward(model, ids, attn)
    keep = (segs != PAD) & (segs != SPECIAL)
    own = reference.loss(a[keep] * s, l1)
    patched_a = a.detach().clone()
    patched_a[keep] = own.x_hat / s
    logits, _ = _direct_forward(model, ids, attn, replace=patched_a)
    counted = (segs[:, :-1] != PAD) & (segs[:, 1:] != PAD) & (segs[:, 1:] != SPECIAL)
    logp = torch.log_softmax(clean[:, :-1][counted].double(), -1)
    logq = torch.log_softmax(logits[:, :-1][counted].double(), -1)
    kl = (logp.exp() * (logp - logq)).sum(-1).mean()
    total = kl + own.raw_l1 + (weight * own.mse if objective == "kl+mse" else 0.0)
    total.backward()

    assert float(out.terms["kl_loss"]) == pytest.approx(float(kl.detach()), rel=1e-5)
    assert float(out.total) == pytest.approx(float(total.detach()), rel=1e-5)
    assert float(kl.detach()) > 0
    ref_params = dict(reference.named_parameters())
    for name, p in sae.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-4, atol=1e-7)
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())  # the model stays frozen


def test_killed_kl_finetune_resumes_to_the_same_sae(tmp_path, tiny_lm):
    parent = pipeline.train(tiny_cfg(tmp_path, run_name="parent", log_every=4), lm=tiny_lm, quiet=True).sae_dir
    cfg = tiny_cfg(tmp_path, objective="kl", from_sae=str(parent), data="code", run_name="ft", training_tokens=384,
                   n_checkpoints=1)
    res = pipeline.finetune(cfg, lm=tiny_lm, quiet=True)
    full = res.run_dir
    expected = records(full)
    assert [r["step"] for r in expected] == list(range(1, 7)) and expected[-1]["details/n_training_tokens"] == 384
    assert all(r["losses/kl_loss"] > 0 for r in expected)
    assert res.summary["training_tokens"] == 384
    meta = load_sae(res.sae_dir).cfg.metadata
    assert meta["objective"] == "kl" and meta["lineage"]["tokens_after"] == 512 + 384

    # Killed after its mid-run checkpoint (step 3): the final outputs and the final checkpoint are gone.
    killed = killed_copy(full, tmp_path / "killed", after_step=3)
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(killed)).state["source"]["sequences_served"] == 3 * 2
    resumed = pipeline.resume(killed, lm=tiny_lm)
    got = records(killed)
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for a, b in zip(got, expected):
        assert (a["losses/overall_loss"], a["losses/kl_loss"]) == (b["losses/overall_loss"], b["losses/kl_loss"])
    for k, v in load_sae(full / "sae").state_dict().items():
        assert torch.equal(load_sae(killed / "sae").state_dict()[k], v), k
    assert resumed.summary["resumed_from"]


def test_bad_combinations_are_refused(tmp_path, tiny_lm):
    with pytest.raises(ConfigError, match="cannot train from an activation cache"):
        tiny_cfg(tmp_path, objective="kl", activations=str(tmp_path))
    with pytest.raises(ConfigError, match="only weighs the mse term of objective kl\\+mse"):
        tiny_cfg(tmp_path, objective="kl", kl_mse_weight=0.5)
    with pytest.raises(ConfigError, match="multiple of context_size"):
        tiny_cfg(tmp_path, objective="kl+mse", train_batch_size_tokens=80)
    with pytest.raises(ConfigError, match="kl_mse_weight must be >= 0"):
        tiny_cfg(tmp_path, objective="kl+mse", kl_mse_weight=-1.0)
    with pytest.raises(ConfigError, match="saes: list"):
        multirun.train_many(tiny_cfg(tmp_path, objective="kl"), [{"name": "a"}], lm=tiny_lm, quiet=True)
    with pytest.raises(ConfigError, match="saes: list"):
        multirun.train_many(tiny_cfg(tmp_path), [{"name": "a", "objective": "kl"}], lm=tiny_lm, quiet=True)
    from training_helpers import SyntheticSparseSource
    with pytest.raises(ConfigError, match="an activation source"):
        pipeline.train(tiny_cfg(tmp_path, objective="kl"), lm=tiny_lm, source=SyntheticSparseSource())
    assert not (tmp_path / "runs").exists()


def test_cli_finetune_objective_kl(tmp_path, tiny_model_dir, capsys):
    common = ["--model", str(tiny_model_dir), "--hook", HOOK, "--max-rows", "40", "--context-size", "32",
              "--train-batch-size-tokens", "64", "--buffer-size-tokens", "128", "--eval-every", "0",
              "--output-dir", str(tmp_path / "runs")]
    assert main(["train", "--data", "chat", "--training-tokens", "256", "--run-name", "general", *common]) == 0
    parent = tmp_path / "runs" / "general" / "sae"
    ft = ["finetune", "--from", str(parent), "--data", "code", "--training-tokens", "128", "--objective", "kl",
          *common]
    assert main(ft) == 0
    assert "Fine-tuned SAE saved to" in capsys.readouterr().out
    run = next((tmp_path / "runs").glob("ft_*_kl"))
    assert records(run)[-1]["losses/kl_loss"] > 0
    # one paragraph, no traceback, nothing written
    assert main(ft + ["--activations", str(tmp_path), "--run-name", "bad"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: objective kl splices the SAE into the live model") and "Traceback" not in err
    assert "\n\n" not in err.strip() and not (tmp_path / "runs" / "bad").exists()
    assert main(["finetune", "--from", str(parent), "--objective", "kl", "--kl-mse-weight", "2"]) == 2
    assert "pass --objective kl+mse" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_kl_finetune_on_the_offline_default(tmp_path, capsys):
    """`dsae finetune --objective kl+mse` on SmolLM2-135M-Instruct (the default model and hook), tiny token counts."""
    common = ["--max-rows", "200", "--context-size", "64", "--train-batch-size-tokens", "128",
              "--buffer-size-tokens", "256", "--eval-every", "0", "--output-dir", str(tmp_path / "runs")]
    assert main(["train", "--data", "chat", "--training-tokens", "256", "--run-name", "general", *common]) == 0
    assert main(["finetune", "--from", str(tmp_path / "runs" / "general" / "sae"), "--data", "code",
                 "--objective", "kl+mse", "--kl-mse-weight", "0.1", "--training-tokens", "256", "--run-name", "ft",
                 *common]) == 0
    recs = records(tmp_path / "runs" / "ft")
    assert recs[-1]["details/n_training_tokens"] == 256 and recs[-1]["losses/kl_loss"] > 0
    assert load_sae(tmp_path / "runs" / "ft" / "sae").cfg.metadata["objective"] == "kl+mse"
