"""lr_at / l1_at against values computed by hand from the SPEC 1 formulas."""

from __future__ import annotations

import math

import pytest

from domain_sae.config import TrainConfig
from domain_sae.training.schedules import l1_at, lr_at


def cfg(**kw):
    base = dict(training_tokens=100, train_batch_size_tokens=1, buffer_size_tokens=1, lr=1e-3)
    base.update(kw)
    return TrainConfig(**base).validate()  # 100 steps


@pytest.mark.parametrize("step,expected", [
    (0, 2.5e-4), (1, 5e-4), (2, 7.5e-4), (3, 1e-3),      # warm-up lr*(t+1)/W, W=4: from lr/W to lr
    (4, 1e-3), (50, 1e-3), (89, 1e-3),                   # constant
    (90, 1e-3), (95, 5e-4), (99, 1e-4),                  # decay over the last D=10 steps: lr*(1-(t-90)/10)
])
def test_constant_with_warmup_and_decay(step, expected):
    assert lr_at(step, cfg(lr_warm_up_steps=4, lr_decay_steps=10)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("step,expected", [
    (0, 1e-3),
    (25, 1e-4 + 9e-4 * (1 + math.sqrt(0.5)) / 2),        # lr_end + (lr-lr_end)(1+cos(pi u/M))/2, M=100
    (50, 5.5e-4),
    (99, 1e-4 + 9e-4 * (1 + math.cos(math.pi * 0.99)) / 2),
])
def test_cosine_default_end_is_lr_over_10(step, expected):
    assert lr_at(step, cfg(lr_scheduler_name="cosineannealing")) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("step,expected", [
    (0, 1e-4), (9, 1e-3),                                # warm-up W=10
    (10, 1e-3), (45, 5e-4),                              # main M=70: u=35 is the midpoint, lr_end=0 -> lr/2
    (80, 0.0), (90, 0.0),                                # decay from lr_end=0
])
def test_cosine_explicit_end_with_warmup_and_decay(step, expected):
    c = cfg(lr_scheduler_name="cosineannealing", lr_end=0.0, lr_warm_up_steps=10, lr_decay_steps=20)
    assert lr_at(step, c) == pytest.approx(expected, abs=1e-15)


def test_cosine_decay_starts_from_lr_end():
    c = cfg(lr_scheduler_name="cosineannealing", lr_end=2e-4, lr_warm_up_steps=10, lr_decay_steps=20)
    assert lr_at(79, c) == pytest.approx(2e-4 + 8e-4 * (1 + math.cos(math.pi * 69 / 70)) / 2)
    assert lr_at(80, c) == pytest.approx(2e-4)
    assert lr_at(90, c) == pytest.approx(1e-4)
    assert lr_at(99, c) == pytest.approx(1e-5)


@pytest.mark.parametrize("step,expected", [(0, 0.0), (5, 2.5), (9, 4.5), (10, 5.0), (99, 5.0)])
def test_l1_warmup(step, expected):
    assert l1_at(step, cfg(l1_coefficient=5.0, l1_warm_up_steps=10)) == pytest.approx(expected)


def test_l1_without_warmup_is_constant():
    c = cfg(l1_coefficient=3.0)
    assert [l1_at(t, c) for t in (0, 1, 99)] == [3.0, 3.0, 3.0]
