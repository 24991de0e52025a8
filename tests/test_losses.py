"""Classify-route losses: neutral settings are plain CE, weights and margins equal their formulas, masked labels
carry no gradient; heads route rows by category; samplers keep their promises."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlmtax.heads import Heads, HeadSpec
from vlmtax.losses import IGNORE, LossCfg, class_balanced_weights, class_weights, head_loss, ldam_margins
from vlmtax.samplers import BalancedSampler, CategorySampler, RandomSampler, balanced_row_weights

LOGITS = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.3, -0.2], [-1.0, 2.5, 0.0], [0.7, 0.7, 0.7]])
TARGETS = torch.tensor([0, 2, 1, 0])
COUNTS = torch.tensor([10, 1, 4])


def plain_ce() -> float:
    return F.cross_entropy(LOGITS, TARGETS, reduction="sum").item()


@pytest.mark.parametrize("cfg", [
    LossCfg("ce"), LossCfg("ce", beta=0.0), LossCfg("focal", gamma=0.0), LossCfg("cb_focal", beta=0.0, gamma=0.0),
    LossCfg("ldam", max_margin=0.0, scale=1.0, drw_start=1.0),
])
def test_each_loss_reduces_to_cross_entropy_at_its_neutral_setting(cfg):
    loss, n = head_loss(LOGITS, TARGETS, cfg, COUNTS)
    assert n == 4
    assert loss.item() == pytest.approx(plain_ce(), rel=1e-6)


def test_non_neutral_settings_change_the_loss():
    base = plain_ce()
    for cfg in (LossCfg("ce", label_smoothing=0.1), LossCfg("ce", beta=0.9), LossCfg("focal", gamma=2.0),
                LossCfg("ldam", max_margin=0.5, scale=1.0)):
        assert head_loss(LOGITS, TARGETS, cfg, COUNTS)[0].item() != pytest.approx(base, rel=1e-4), cfg


def test_class_balanced_weights_equal_the_effective_number_formula():
    beta = 0.9
    raw = [(1 - beta) / (1 - beta ** n) for n in (10, 1, 4)]  # 0.15354, 1.0, 0.29078
    expected = [3 * w / sum(raw) for w in raw]
    assert class_balanced_weights(COUNTS, beta).tolist() == pytest.approx(expected, rel=1e-6)
    loss, _ = head_loss(LOGITS, TARGETS, LossCfg("ce", beta=beta), COUNTS)
    per_row = F.cross_entropy(LOGITS, TARGETS, reduction="none")
    assert loss.item() == pytest.approx(sum(expected[t] * c for t, c in zip(TARGETS.tolist(), per_row.tolist())))


def test_focal_loss_equals_its_formula():
    gamma = 2.0
    p = LOGITS.softmax(-1)[torch.arange(4), TARGETS]
    expected = sum(-((1 - pi) ** gamma) * math.log(pi) for pi in p.tolist())
    assert head_loss(LOGITS, TARGETS, LossCfg("focal", gamma=gamma), COUNTS)[0].item() == pytest.approx(expected)


def test_ldam_margins_and_deferred_reweighting():
    margins = ldam_margins(COUNTS, 0.5)
    raw = [n ** -0.25 for n in (10, 1, 4)]
    assert margins.tolist() == pytest.approx([0.5 * r / max(raw) for r in raw])  # rarest class: 0.5
    cfg = LossCfg("ldam", max_margin=0.5, scale=2.0, drw_start=0.5)
    z = LOGITS.clone()
    z[torch.arange(4), TARGETS] -= margins[TARGETS]
    expected = F.cross_entropy(2.0 * z, TARGETS, reduction="sum").item()
    assert head_loss(LOGITS, TARGETS, cfg, COUNTS, progress=0.2)[0].item() == pytest.approx(expected, rel=1e-6)
    assert class_weights(cfg, COUNTS, 0.2) is None
    assert torch.allclose(class_weights(cfg, COUNTS, 0.6), class_balanced_weights(COUNTS, 0.999))


def test_a_masked_label_contributes_nothing_and_gets_zero_gradient():
    logits = LOGITS.clone().requires_grad_(True)
    targets = TARGETS.clone()
    targets[1] = IGNORE
    for cfg in (LossCfg("ce", label_smoothing=0.1), LossCfg("cb_focal"), LossCfg("ldam", drw_start=0.0)):
        logits.grad = None
        loss, n = head_loss(logits, targets, cfg, COUNTS, progress=1.0)
        loss.backward()
        assert n == 3
        assert torch.count_nonzero(logits.grad[1]) == 0
        assert torch.count_nonzero(logits.grad[0]) > 0
    all_masked, n = head_loss(logits, torch.full((4,), IGNORE), LossCfg(), COUNTS)
    assert n == 0 and all_masked.item() == 0.0


def test_heads_only_see_rows_of_their_category():
    layout = [HeadSpec("A", "color", 0, ("red", "blue")), HeadSpec("A", "size", 1, ("s", "m", "l")),
              HeadSpec("B", "color", 0, ("x", "y", "z", "w"))]
    heads = Heads(layout, dim=8, kind="mlp", width=4, trunk=6)
    out = heads(torch.randn(5, 8), torch.tensor([1, 0, 1, 1, 0]))
    shapes = {i: (rows.tolist(), tuple(logits.shape)) for i, rows, logits in out}
    assert shapes == {0: ([1, 4], (2, 2)), 1: ([1, 4], (2, 3)), 2: ([0, 2, 3], (3, 4))}


def test_samplers():
    cats = [0] * 10 + [1] * 5 + [2] * 3
    cs = CategorySampler(cats, batch_size=4, seed=1)
    batches = cs.batches()
    assert all(len(b) == 4 and len({cats[i] for i in b}) == 1 for b in batches)
    assert {i for b in batches for i in b} == set(range(len(cats)))  # every row seen each epoch
    assert len(list(cs)) == len(cs)
    rs = RandomSampler(len(cats), seed=3)
    first = list(rs)
    assert sorted(first) == list(range(len(cats))) and list(rs) == first
    rs.set_epoch(1)
    assert list(rs) != first
    labels = torch.tensor([[0]] * 9 + [[1]] + [[0]] * 5 + [[IGNORE]] * 3)
    w = balanced_row_weights(cats, labels)
    assert w[9].item() == pytest.approx(1.0) and w[0].item() == pytest.approx(1 / 9) and w[15].item() == 0.0
    draws = list(BalancedSampler(cats, labels, seed=0))
    assert 15 not in draws and 16 not in draws and len(draws) == len(cats)
