"""Classify-route losses: neutral settings are plain CE, weights and margins equal their formulas, masked labels
carry no gradient; heads route rows by category; samplers keep their promises."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlmtax.heads.losses import IGNORE, LossCfg, class_balanced_weights, class_weights, head_loss, ldam_margins
from vlmtax.heads.model import Heads, HeadSpec
from vlmtax.heads.samplers import BalancedSampler, CategorySampler, RandomSampler, balanced_row_weights

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
    shapes = {c: (rows.tolist(), tuple(logits.shape)) for c, rows, logits in out}
    assert shapes == {0: ([1, 4], (2, 2, 3)), 1: ([0, 2, 3], (3, 1, 4))}
    per_head = {i: (rows.tolist(), tuple(logits.shape)) for i, rows, logits in heads.per_head(out)}
    assert per_head == {0: ([1, 4], (2, 2)), 1: ([1, 4], (2, 3)), 2: ([0, 2, 3], (3, 4))}


FUSED_LAYOUT = [HeadSpec("A", "color", 0, ("red", "blue")), HeadSpec("A", "size", 1, ("s", "m", "l", "xl")),
                HeadSpec("A", "fit", 2, ("slim", "loose", "boxy")), HeadSpec("B", "color", 0, ("x", "y", "z")),
                HeadSpec("B", "print", 1, ("p", "q"))]


def separate_heads(kind: str, dim: int, width: int) -> torch.nn.ModuleList:
    """The earlier layout: one module per head, called one by one (`heads.{i}` in the state dict)."""
    def head(n: int) -> torch.nn.Module:
        if kind == "linear":
            return torch.nn.Sequential(torch.nn.Dropout(0.0), torch.nn.Linear(dim, n))
        return torch.nn.Sequential(torch.nn.Linear(dim, width), torch.nn.GELU(), torch.nn.Dropout(0.0),
                                   torch.nn.Linear(width, n))
    return torch.nn.ModuleList(head(len(h.values)) for h in FUSED_LAYOUT)


@pytest.mark.parametrize("kind", ["mlp", "linear"])
@pytest.mark.parametrize("cfg", [LossCfg("ce", label_smoothing=0.1), LossCfg("cb_focal", gamma=2.0),
                                 LossCfg("ldam", drw_start=0.5), LossCfg("focal", beta=0.99, gamma=1.0)])
def test_fused_heads_equal_separate_heads_in_logits_loss_and_gradients(kind, cfg):
    from vlmtax.heads.losses import category_loss_table
    from vlmtax.heads.model import category_groups, fuse_per_head_state, load_heads_state, values_mask
    from vlmtax.heads.trainer import heads_loss

    torch.manual_seed(0)
    dim, width = 6, 5
    old = separate_heads(kind, dim, width)
    fused = Heads(FUSED_LAYOUT, dim=dim, kind=kind, width=width, dropout=0.0)
    norm = fused.norm.state_dict()
    load_heads_state(fused, {**{f"norm.{k}": v for k, v in norm.items()},
                             **{f"heads.{k}": v for k, v in old.state_dict().items()}})
    feats, cats = torch.randn(7, dim), torch.tensor([0, 1, 1, 0, 0, 1, 0])
    targets = torch.tensor([[0, 3, 2], [2, 1, IGNORE], [IGNORE, 0, IGNORE], [1, IGNORE, 0], [IGNORE, IGNORE, IGNORE],
                            [0, 0, IGNORE], [1, 2, 1]])
    counts = [torch.tensor([5, 2]), torch.tensor([1, 4, 9, 2]), torch.tensor([3, 3, 1]), torch.tensor([6, 1, 2]),
              torch.tensor([4, 7])]
    attr_w = [1.0, 2.0, 0.5, 1.5, 1.0]
    for progress in (0.0, 0.9):
        fused.zero_grad()
        old.zero_grad()
        x = fused.norm(feats)
        total, n = 0.0, 0
        for i, h in enumerate(FUSED_LAYOUT):  # the earlier trainer loop: head by head
            rows = (cats == ["A", "B"].index(h.category)).nonzero(as_tuple=True)[0]
            s, k = head_loss(old[i](x[rows]), targets[rows, h.slot], cfg, counts[i], progress)
            total, n = total + s * attr_w[i], n + k
        (total / n).backward()
        outputs = fused(feats, cats)
        for i, rows, logits in fused.per_head(outputs):
            x_rows = fused.norm(feats)[rows]
            torch.testing.assert_close(logits, old[i](x_rows), atol=1e-6, rtol=0)
        tables = [category_loss_table(cfg, values_mask(FUSED_LAYOUT, g), [counts[i] for i in g], [attr_w[i] for i in g])
                  for g in category_groups(FUSED_LAYOUT)]
        loss = heads_loss(outputs, targets, tables, cfg, progress)
        loss.backward()
        assert loss.item() == pytest.approx((total / n).item(), rel=1e-6, abs=1e-6)
        grads = fuse_per_head_state(FUSED_LAYOUT, kind, {f"heads.{k}": p.grad for k, p in old.named_parameters()})
        for name, p in fused.named_parameters():
            if name.startswith("norm."):
                continue
            torch.testing.assert_close(p.grad, grads[name], atol=1e-6, rtol=1e-6)


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
