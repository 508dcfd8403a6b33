"""LM metrics with an SAE spliced into a tiny random Llama, each checked against an independent computation: a
plain forward plus our own torch forward hook on layer 0, and torch's cross_entropy / kl_div."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_model
from domain_sae.evaluation import MetricError, evaluate_sae, make_evaluator, token_counts


VOCAB, D = 101, 32
HOOK = "blocks.0.hook_resid_post"  # output of decoder layer 0
PAD, SPECIAL, TEXT, USER, ASSISTANT, TEMPLATE = -1, 0, 1, 2, 3, 4


class TinySAE(torch.nn.Module):
    """ReLU SAE with explicit weights (encode/decode only: what evaluation needs)."""

    def __init__(self, W_enc, b_enc, W_dec, b_dec):
        super().__init__()
        self.W_enc = torch.nn.Parameter(W_enc)
        self.b_enc = torch.nn.Parameter(b_enc)
        self.W_dec = torch.nn.Parameter(W_dec)
        self.b_dec = torch.nn.Parameter(b_dec)

    def encode(self, x):
        return torch.relu(x @ self.W_enc + self.b_enc)

    def decode(self, f):
        return f @ self.W_dec + self.b_dec

    def forward(self, x):
        return self.decode(self.encode(x))


def identity_sae(d=D):
    """x̂ = relu(x) - relu(-x) = x exactly."""
    eye = torch.eye(d)
    return TinySAE(torch.cat([eye, -eye], 1), torch.zeros(2 * d), torch.cat([eye, -eye], 0), torch.zeros(d))


def zero_sae(d=D, k=8):
    return TinySAE(torch.zeros(d, k), torch.zeros(k), torch.zeros(k, d), torch.zeros(d))


def random_sae(d=D, k=64, seed=3):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, k, generator=g) / math.sqrt(d)
    return TinySAE(W, torch.zeros(k), W.T.clone() * 0.9, torch.full((d,), 0.01))


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llama", vocab_size=VOCAB, d_model=D)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (5, 14), generator=g)
    segs = torch.full((5, 14), TEXT, dtype=torch.int8)
    segs[:, 0] = SPECIAL                                   # BOS
    segs[0, 1:4], segs[0, 4] = TEMPLATE, SPECIAL           # chat-like row: template, marker, user, assistant
    segs[0, 5:9], segs[0, 9:] = USER, ASSISTANT
    segs[1, 6] = SPECIAL                                   # a marker in the middle
    segs[2, 10:] = PAD                                     # tail padding
    segs[3, 1:7], segs[3, 7:] = USER, ASSISTANT
    return ids, segs


# ----------------------------------------------------------------------------------------------------------------
# Independent reference

def _layer0(model, fn):
    def hook(_m, _inp, out):
        if isinstance(out, tuple):
            return (fn(out[0]),) + tuple(out[1:])
        return fn(out)
    return model.model.layers[0].register_forward_hook(hook)


@torch.no_grad()
def _run(model, ids, segs, fn=None):
    """(logits, layer-0 output as seen by the hook) of one full forward, optionally patched by fn."""
    box = {}

    def record(a):
        box["a"] = a.clone()
        return fn(a) if fn is not None else a

    attn = (segs != PAD).long()
    h = _layer0(model, record)
    try:
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
    finally:
        h.remove()
    return logits, box["a"]


def _counted(segs):
    return (segs[:, :-1] != PAD) & (segs[:, 1:] != PAD) & (segs[:, 1:] != SPECIAL)


def _content(segs):
    """Headline positions: text, user, assistant (no template, special or padding)."""
    return (segs == TEXT) | (segs == USER) | (segs == ASSISTANT)


def _trained(segs):
    """The SAE's training mask with exclude_special: neither padding nor special."""
    return (segs != PAD) & (segs != SPECIAL)


def _ce(logits, ids, mask):
    per = F.cross_entropy(logits[:, :-1].double().reshape(-1, VOCAB), ids[:, 1:].reshape(-1),
                          reduction="none").reshape(mask.shape)
    return float(per[mask].mean())


def _kl(clean, patched, mask):
    lp = torch.log_softmax(clean[:, :-1].double(), -1)
    lq = torch.log_softmax(patched[:, :-1].double(), -1)
    per = F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)
    return float(per[mask].mean())


# ----------------------------------------------------------------------------------------------------------------

def test_token_counts_exclude_pad_and_special(batch):
    _, segs = batch
    c = token_counts(segs)
    n_pad = 4
    n_special = 5 + 1 + 1
    assert c["tokens/total"] == 70 and c["tokens/pad"] == n_pad and c["tokens/special"] == n_special
    assert c["tokens/reconstruction_counted"] == 70 - n_pad - n_special
    # targets: 13 per row; row 0 loses its marker target, row 1 its marker target, row 2 its 4 pad targets
    assert c["tokens/lm_counted"] == int(_counted(segs.long()).sum()) == 5 * 13 - 1 - 1 - 4
    assert c["tokens/lm_excluded_special_target"] == 2


@pytest.mark.parametrize("all_positions", [False, True])
def test_ce_kl_and_scores_match_manual(model, batch, all_positions):
    """The spliced positions are exactly the training mask (or everything with splice_all_positions): checked
    against our own forward hook that patches those positions; headline = content targets."""
    ids, segs = batch
    sae = random_sae()
    out = evaluate_sae(sae, model, HOOK, ids, segs, batch_size=2, splice_all_positions=all_positions)
    where = torch.ones(segs.shape, dtype=torch.bool) if all_positions else _trained(segs)
    counted = _counted(segs.long())
    mask = counted & _content(segs[:, 1:])
    clean, _ = _run(model, ids, segs)
    with_sae, _ = _run(model, ids, segs, lambda a: torch.where(where[..., None], sae(a), a))
    zero, _ = _run(model, ids, segs, lambda a: torch.where(where[..., None], torch.zeros_like(a), a))
    ce_c, ce_s, ce_z = _ce(clean, ids, mask), _ce(with_sae, ids, mask), _ce(zero, ids, mask)
    kl_s, kl_z = _kl(clean, with_sae, mask), _kl(clean, zero, mask)
    assert out["metrics/ce_loss_without_sae"] == pytest.approx(ce_c, rel=1e-6)
    assert out["metrics/ce_loss_with_sae"] == pytest.approx(ce_s, rel=1e-6)
    assert out["metrics/ce_loss_with_ablation"] == pytest.approx(ce_z, rel=1e-6)
    assert out["metrics/ce_loss_score"] == pytest.approx((ce_z - ce_s) / (ce_z - ce_c), rel=1e-4)
    assert out["metrics/delta_loss"] == pytest.approx(ce_s - ce_c, rel=1e-4, abs=1e-7)
    assert out["metrics/kl_div_with_sae"] == pytest.approx(kl_s, rel=1e-5)
    assert out["metrics/kl_div_with_ablation"] == pytest.approx(kl_z, rel=1e-5)
    assert out["metrics/kl_div_score"] == pytest.approx((kl_z - kl_s) / kl_z, rel=1e-5)
    assert out["tokens/lm_counted"] == int(mask.sum()) < int(counted.sum())
    # the other convention gives other numbers (the splice matters on this batch)
    other = evaluate_sae(sae, model, HOOK, ids, segs, batch_size=2, splice_all_positions=not all_positions)
    assert other["metrics/ce_loss_with_sae"] != pytest.approx(out["metrics/ce_loss_with_sae"], rel=1e-6)

    # per segment: by the segment of the TARGET token; all_tokens = every counted target (template included)
    tseg = segs[:, 1:].long()
    for code, name in [(TEXT, "text"), (USER, "user"), (ASSISTANT, "assistant"), (TEMPLATE, "template"),
                       (None, "all_tokens")]:
        m = counted if code is None else counted & (tseg == code)
        block = out["segments"][name]
        assert block["tokens/lm_counted"] == int(m.sum())
        assert block["metrics/ce_loss_with_sae"] == pytest.approx(_ce(with_sae, ids, m), rel=1e-6)
        # float32 elementwise KL (evaluation/next_token.py): absolute error <= 1e-6 per position by contract;
        # a small segment's KL (~2e-3) is off by ~4e-8, above rel=1e-5 on some CPUs
        assert block["metrics/kl_div_with_sae"] == pytest.approx(_kl(clean, with_sae, m), rel=1e-5, abs=1e-6)
    assert "special" not in " ".join(out["segments"])


def test_reconstruction_metrics_match_numpy(model, batch):
    ids, segs = batch
    sae = random_sae()
    out = evaluate_sae(sae, model, HOOK, ids, segs, batch_size=3)
    _, a = _run(model, ids, segs)
    keep = (segs != PAD) & (segs != SPECIAL)
    for name, sel in [("overall", keep & _content(segs)), ("all_tokens", keep), ("user", keep & (segs == USER))]:
        x = a[sel].double().numpy()
        with torch.no_grad():
            xh = sae(a[sel]).double().numpy()
        e = ((x - xh) ** 2).sum(1)
        v = ((x - x.mean(0)) ** 2).sum(1)
        block = out if name == "overall" else out["segments"][name]
        assert block["tokens/reconstruction_counted"] == int(sel.sum())
        assert block["metrics/explained_variance"] == pytest.approx(1 - e.sum() / v.sum(), rel=1e-5)
        assert block["metrics/explained_variance_std"] == pytest.approx(np.std(1 - e / v), rel=1e-5)
        cos = (x * xh).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(xh, axis=1))
        assert block["metrics/cossim"] == pytest.approx(cos.mean(), rel=1e-5)
        with torch.no_grad():
            f = sae.encode(a[sel])
        assert block["metrics/l0"] == pytest.approx(float((f > 0).sum(1).double().mean()), rel=1e-12)


def test_identity_sae_is_perfect_and_zero_sae_is_ablation(model, batch):
    ids, segs = batch
    out = evaluate_sae(identity_sae(), model, HOOK, ids, segs, batch_size=2)
    assert out["metrics/explained_variance"] == 1.0
    assert out["metrics/ce_loss_score"] == 1.0
    assert out["metrics/delta_loss"] == 0.0
    assert out["metrics/kl_div_with_sae"] == 0.0
    assert out["metrics/kl_div_score"] == 1.0
    assert out["metrics/ce_loss_with_ablation"] > out["metrics/ce_loss_without_sae"] or \
        out["metrics/kl_div_with_ablation"] > 0

    out = evaluate_sae(zero_sae(), model, HOOK, ids, segs, batch_size=2)
    assert out["metrics/ce_loss_score"] == 0.0
    assert out["metrics/kl_div_score"] == 0.0
    assert out["metrics/ce_loss_with_sae"] == out["metrics/ce_loss_with_ablation"]
    assert out["sparsity/dead_features"] == 8 and out["metrics/l0"] == 0.0


def test_predicting_the_mean_gives_zero_explained_variance(model, batch):
    ids, segs = batch
    _, a = _run(model, ids, segs)
    keep = (segs != PAD) & (segs != SPECIAL) & _content(segs)
    mean = a[keep].double().mean(0)
    sae = TinySAE(torch.zeros(D, 4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64),
                  torch.zeros(4, D, dtype=torch.float64), mean)  # x̂ = x̄ for every token
    out = evaluate_sae(sae, model, HOOK, ids, segs, batch_size=2)
    assert out["metrics/explained_variance"] == pytest.approx(0.0, abs=1e-9)
    assert out["metrics/explained_variance_per_token_mean"] == pytest.approx(0.0, abs=1e-9)


def test_mean_ablation_matches_manual(model, batch):
    ids, segs = batch
    out = evaluate_sae(random_sae(), model, HOOK, ids, segs, batch_size=2, mean_ablation=True)
    _, a = _run(model, ids, segs)
    keep = (segs != PAD) & (segs != SPECIAL)
    mean = a[keep].double().mean(0).float()
    clean, _ = _run(model, ids, segs)
    patched, _ = _run(model, ids, segs, lambda x: torch.where(keep[..., None], mean.expand_as(x), x))
    mask = _counted(segs.long()) & _content(segs[:, 1:])
    assert out["metrics/ce_loss_with_mean_ablation"] == pytest.approx(_ce(patched, ids, mask), rel=1e-6)
    assert out["metrics/kl_div_with_mean_ablation"] == pytest.approx(_kl(clean, patched, mask), rel=1e-5)
    ce_m, ce_s, ce_c = (out["metrics/ce_loss_with_mean_ablation"], out["metrics/ce_loss_with_sae"],
                        out["metrics/ce_loss_without_sae"])
    assert out["metrics/ce_loss_score_mean_ablation"] == pytest.approx((ce_m - ce_s) / (ce_m - ce_c), rel=1e-9)


def test_batch_size_does_not_change_results_and_runs_are_deterministic(model, batch):
    ids, segs = batch
    sae = random_sae()
    a = evaluate_sae(sae, model, HOOK, ids, segs, batch_size=1)
    b = evaluate_sae(sae, model, HOOK, ids, segs, batch_size=5)
    c = evaluate_sae(sae, model, HOOK, ids, segs, batch_size=5)
    assert b == c  # bit-identical reruns
    for k, v in a.items():
        if k != "segments":
            assert b[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k


def test_evaluator_for_trainer_uses_the_same_numbers(model, batch):
    ids, segs = batch
    sae = random_sae()
    full = evaluate_sae(sae, model, HOOK, ids, segs, batch_size=2, per_segment=False)
    logged = make_evaluator(model, HOOK, ids, segs, batch_size=2)(sae)
    assert all(isinstance(v, (int, float)) for v in logged.values())
    assert logged["metrics/ce_loss_score"] == full["metrics/ce_loss_score"]
    assert logged["metrics/ce_loss_without_sae"] == full["metrics/ce_loss_without_sae"]
    assert logged["heldout/explained_variance"] == full["metrics/explained_variance"]
    assert logged["heldout/dead_features"] == full["sparsity/dead_features"]
    assert "metrics/explained_variance" not in logged and "sparsity/dead_features" not in logged


def test_mismatched_sae_and_bad_tokens_are_refused(model, batch):
    ids, segs = batch
    with pytest.raises(MetricError, match="d_in=16"):
        evaluate_sae(random_sae(d=16), model, HOOK, ids, segs)
    all_special = torch.zeros_like(segs)
    with pytest.raises(MetricError, match="No next-token target"):
        evaluate_sae(random_sae(), model, HOOK, ids, all_special)
    with pytest.raises(MetricError, match=r"\[N, T\]"):
        evaluate_sae(random_sae(), model, HOOK, ids, segs[:, :5])
