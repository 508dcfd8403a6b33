"""CleanLogits (float32 elementwise, float64 sums) against a float64 log-softmax written out independently."""

import pytest
import torch

from domain_sae.evaluation.next_token import CleanLogits, token_ce


@pytest.mark.parametrize("vocab", [1000, 49152 + 7])
def test_ce_and_kl_match_float64_log_softmax(vocab):
    g = torch.Generator().manual_seed(0)
    b, t = 3, 17
    z = torch.randn(b, t, vocab, generator=g) * 3 + 5
    y = z + 0.05 * torch.randn(b, t, vocab, generator=g)       # a close patched run: KL ~ 1e-3
    counted = torch.rand(b, t, generator=g) > 0.3
    rows = counted.nonzero(as_tuple=True)
    targets = torch.randint(vocab, (rows[0].numel(),), generator=g)

    clean = CleanLogits(z, rows, targets)
    ce_clean, none = clean.terms(None)
    ce, kl = clean.terms(y)

    lp = torch.log_softmax(z[rows].double(), -1)
    lq = torch.log_softmax(y[rows].double(), -1)
    ref_clean = -lp.gather(1, targets[:, None]).squeeze(1)
    ref_ce = -lq.gather(1, targets[:, None]).squeeze(1)
    ref_kl = (lp.exp() * (lp - lq)).sum(-1)
    assert none is None and ce.dtype == kl.dtype == torch.float64
    assert torch.allclose(ce_clean, ref_clean, rtol=0, atol=1e-6)
    assert torch.allclose(ce, ref_ce, rtol=0, atol=1e-6)
    assert torch.allclose(kl, ref_kl, rtol=0, atol=1e-6)
    assert float(ref_kl.mean()) > 1e-4                              # the KL checked is not trivially 0
    assert float(kl.mean()) == pytest.approx(float(ref_kl.mean()), rel=1e-4)


def test_identical_logits_give_zero_kl():
    z = torch.randn(2, 5, 300)
    rows = torch.ones(2, 5, dtype=torch.bool).nonzero(as_tuple=True)
    targets = torch.randint(300, (10,))
    ce0, _ = CleanLogits(z, rows, targets).terms(None)
    ce, kl = CleanLogits(z, rows, targets).terms(z.clone())
    assert torch.equal(ce, ce0)
    assert kl.abs().max() < 1e-6


def test_token_ce_matches_float64_log_softmax():
    z = torch.randn(40, 777) * 4
    targets = torch.randint(777, (40,))
    ref = -torch.log_softmax(z.double(), -1).gather(1, targets[:, None]).squeeze(1)
    assert torch.allclose(token_ce(z, targets), ref, rtol=0, atol=1e-6)
