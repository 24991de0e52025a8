"""The classify route's heads: one classifier per (category, attribute) over shared image features.

Category-aware like the Meesho winners: a row only passes through its own category's heads, so a
`Sarees` image is never asked for a T-shirt's neck. Each head is a linear layer or a small MLP; an
optional shared trunk (seed 001's multitask head) sits between the features and every head.

The heads of one category run fused: one matmul for every attribute's first layer and one batched
matmul for their output layers, whose value axis is padded to the category's longest value list
(`values_mask` marks the real values). A Python loop per head cost more than the tiny backbone's
forward; per category there are a handful of ops whatever the number of attributes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from vlmtax.data.taxonomy import Taxonomy

# A classify run dir's files (heads/train.py writes them, heads/predictor.py reads them).
CLASSIFIER_FILE = "classifier.json"
HEADS_WEIGHTS, BACKBONE_WEIGHTS, KNN_BANK = "heads.safetensors", "backbone.safetensors", "knn.safetensors"


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


def category_groups(layout: list[HeadSpec]) -> list[list[int]]:
    """Layout indices per category, categories in first-seen order, heads in slot order."""
    cats = list(dict.fromkeys(h.category for h in layout))
    return [sorted((i for i, h in enumerate(layout) if h.category == c), key=lambda i: layout[i].slot) for c in cats]


def values_mask(layout: list[HeadSpec], group: list[int]) -> torch.Tensor:
    """[attributes, longest value list] bool: True where a padded column is a real value."""
    sizes = [len(layout[i].values) for i in group]
    return torch.arange(max(sizes))[None, :] < torch.tensor(sizes)[:, None]


class Heads(nn.Module):
    """Features [B, D] + category index per row -> padded logits per category for that category's rows.

    Parameters per category c with k attributes (value lists padded to n): `hidden.c` [k*width, D]
    (MLP only: every attribute's first layer, stacked), `weight.c` [k, in, n] and `bias.c` [k, n] (the
    output layers; `in` is the width, or the feature size for linear heads). Padded columns never
    get a gradient and stay zero.
    """

    def __init__(self, layout: list[HeadSpec], dim: int, kind: str = "mlp", width: int = 256, dropout: float = 0.1,
                 trunk: int | None = None):
        super().__init__()
        self.layout, self.kind, self.width = layout, kind, width
        self.categories = list(dict.fromkeys(h.category for h in layout))
        self.groups = category_groups(layout)
        # Frozen features come at any scale; a normalisation makes one learning rate fit every backbone.
        self.norm = nn.LayerNorm(dim)
        self.trunk = nn.Sequential(nn.Linear(dim, trunk), nn.GELU(), nn.Dropout(dropout)) if trunk else nn.Identity()
        self.drop = nn.Dropout(dropout)
        d = trunk or dim
        fan_in = d if kind == "linear" else width
        self.hidden = nn.ModuleList(nn.Linear(d, len(g) * width) for g in self.groups) if kind != "linear" else None
        self.weight, self.bias = nn.ParameterList(), nn.ParameterList()
        for c, g in enumerate(self.groups):
            mask = values_mask(layout, g)
            self.register_buffer(f"mask{c}", mask, persistent=False)
            # nn.Linear's own initialisation, head by head: uniform(+-1/sqrt(fan_in)), padding zero
            bound = 1.0 / math.sqrt(fan_in)
            w = torch.empty(len(g), fan_in, mask.shape[1]).uniform_(-bound, bound) * mask[:, None, :]
            b = torch.empty(mask.shape).uniform_(-bound, bound) * mask
            self.weight.append(nn.Parameter(w))
            self.bias.append(nn.Parameter(b))

    def mask(self, c: int) -> torch.Tensor:
        return getattr(self, f"mask{c}")

    def forward(self, features: torch.Tensor, category: torch.Tensor) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """(category index, row indices, logits [rows, attributes, padded values]) per category in the batch.

        Padded value columns hold junk: read them through `mask(c)` (the loss and probabilities do).
        """
        x = self.trunk(self.norm(features.float()))
        out = []
        for c, g in enumerate(self.groups):
            rows = (category == c).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            xc = x[rows]
            if self.hidden is None:  # each linear head drops its own input units, as separate heads would
                h = self.drop(xc[:, None, :].expand(-1, len(g), -1))
            else:
                h = self.drop(nn.functional.gelu(self.hidden[c](xc))).view(len(rows), len(g), self.width)
            logits = torch.einsum("bki,kin->bkn", h, self.weight[c]) + self.bias[c]
            out.append((c, rows, logits))
        return out

    def per_head(self, outputs: list[tuple[int, torch.Tensor, torch.Tensor]]):
        """The fused outputs as (layout index, row indices, logits [rows, values]) per head."""
        for c, rows, logits in outputs:
            for a, i in enumerate(self.groups[c]):
                yield i, rows, logits[:, a, : len(self.layout[i].values)]


def fuse_per_head_state(layout: list[HeadSpec], kind: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict of the earlier one-module-per-head layout (`heads.{i}...`) in the fused layout.

    Runs saved before the heads were fused keep loading; the tests use it to check the fused forward
    against separate heads on the same weights.
    """
    out = {k: v for k, v in state.items() if not k.startswith("heads.")}
    last = "1" if kind == "linear" else "3"
    for c, g in enumerate(category_groups(layout)):
        mask = values_mask(layout, g)
        n = mask.shape[1]
        pad = [torch.nn.functional.pad(state[f"heads.{i}.{last}.weight"].T, (0, n - len(layout[i].values))) for i in g]
        out[f"weight.{c}"] = torch.stack(pad)
        out[f"bias.{c}"] = torch.stack([torch.nn.functional.pad(state[f"heads.{i}.{last}.bias"],
                                                                (0, n - len(layout[i].values))) for i in g])
        if kind != "linear":
            out[f"hidden.{c}.weight"] = torch.cat([state[f"heads.{i}.0.weight"] for i in g])
            out[f"hidden.{c}.bias"] = torch.cat([state[f"heads.{i}.0.bias"] for i in g])
    return out


def load_heads_state(heads: Heads, state: dict[str, torch.Tensor]) -> None:
    if any(k.startswith("heads.") for k in state):
        state = fuse_per_head_state(heads.layout, heads.kind, state)
    heads.load_state_dict(state)


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
    for c, idx, logits in heads(features, category):
        probs = logits.float().masked_fill(~heads.mask(c), float("-inf")).softmax(-1).cpu().tolist()
        for r, per_attr in zip(idx.tolist(), probs):
            for i, p in zip(heads.groups[c], per_attr):
                spec = heads.layout[i]
                rows[r][spec.attribute] = dict(zip(spec.values, p))
    return rows
