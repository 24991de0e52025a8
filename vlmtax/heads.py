"""The classify route's heads: one classifier per (category, attribute) over shared image features.

Category-aware like the Meesho winners: a row only passes through its own category's heads, so a
`Sarees` image is never asked for a T-shirt's neck. Each head is a linear layer or a small MLP; an
optional shared trunk (seed 001's multitask head) sits between the features and every head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlmtax.taxonomy import Taxonomy


@dataclass(frozen=True)
class HeadSpec:
    category: str
    attribute: str
    slot: int  # the attribute's position in its category (the column of the label matrix)
    values: tuple[str, ...]


def head_layout(taxonomy: Taxonomy) -> list[HeadSpec]:
    """Every (category, attribute) in taxonomy order, with its allowed values in taxonomy order."""
    return [HeadSpec(cat.name, a.name, slot, tuple(a.values))
            for cat in taxonomy.categories.values() for slot, a in enumerate(cat.attributes)]


def layout_matches(layout: list[HeadSpec], taxonomy: Taxonomy) -> str | None:
    """None when `taxonomy` has exactly the heads' categories, attributes and values; else the first difference."""
    want = {(h.category, h.attribute): h.values for h in layout}
    have = {(h.category, h.attribute): h.values for h in head_layout(taxonomy)}
    for key in sorted(set(want) | set(have)):
        if key not in want:
            return f"{key[0]}/{key[1]} has no head"
        if key not in have:
            return f"{key[0]}/{key[1]} is not in the taxonomy"
        if want[key] != have[key]:
            return f"{key[0]}/{key[1]} values differ ({len(have[key])} in the taxonomy, {len(want[key])} in the heads)"
    return None


class Heads(nn.Module):
    """Features [B, D] + category index per row -> logits per head for the rows of that head's category."""

    def __init__(self, layout: list[HeadSpec], dim: int, kind: str = "mlp", width: int = 256, dropout: float = 0.1,
                 trunk: int | None = None):
        super().__init__()
        self.layout = layout
        self.categories = list(dict.fromkeys(h.category for h in layout))
        # Frozen features come at any scale; a normalisation makes one learning rate fit every backbone.
        self.norm = nn.LayerNorm(dim)
        self.trunk = nn.Sequential(nn.Linear(dim, trunk), nn.GELU(), nn.Dropout(dropout)) if trunk else nn.Identity()
        d = trunk or dim

        def head(n: int) -> nn.Module:
            if kind == "linear":
                return nn.Sequential(nn.Dropout(dropout), nn.Linear(d, n))
            return nn.Sequential(nn.Linear(d, width), nn.GELU(), nn.Dropout(dropout), nn.Linear(width, n))

        self.heads = nn.ModuleList(head(len(h.values)) for h in layout)

    def forward(self, features: torch.Tensor, category: torch.Tensor) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """(head index, row indices, logits) for every head whose category has rows in the batch."""
        x = self.trunk(self.norm(features.float()))
        out = []
        for c, name in enumerate(self.categories):
            rows = (category == c).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            xc = x[rows]
            out += [(i, rows, self.heads[i](xc)) for i, h in enumerate(self.layout) if h.category == name]
        return out


class Classifier(nn.Module):
    """Backbone (absent when features come precomputed) + heads; what the trainer optimises."""

    accepts_loss_kwargs = False  # the trainer's loss divides by the known labels itself

    def __init__(self, heads: Heads, encoder: nn.Module | None = None):
        super().__init__()
        self.encoder = encoder
        self.heads = heads

    def forward(self, category: torch.Tensor, features: torch.Tensor | None = None, **pixels: torch.Tensor):
        if features is None:
            features = self.encoder(**pixels)
        return self.heads(features, category)


@torch.no_grad()
def head_probabilities(heads: Heads, features: torch.Tensor,
                       category: torch.Tensor) -> list[dict[str, dict[str, float]]]:
    """Per row: {attribute: {value: probability}} over its category's heads."""
    rows: list[dict[str, dict[str, float]]] = [{} for _ in range(features.shape[0])]
    for i, idx, logits in heads(features, category):
        spec = heads.layout[i]
        for r, p in zip(idx.tolist(), logits.float().softmax(-1).tolist()):
            rows[r][spec.attribute] = dict(zip(spec.values, p))
    return rows
