"""The classify route's batch order: random, one category per batch (seed 003), or class-balanced (seed 004).

Each sampler is reseeded per epoch (`set_epoch`, called by the trainer), so a run is reproducible and a
resumed run sees the same order as an uninterrupted one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from vlmtax.heads.losses import IGNORE


class _Seeded(Sampler[int]):
    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)

    def __len__(self) -> int:
        return self.n


class CategorySampler(_Seeded):
    """Whole batches from one category each; a category's last short batch is topped up from itself."""

    def __init__(self, categories: list[int], batch_size: int, seed: int):
        self.groups: dict[int, list[int]] = {}
        for i, c in enumerate(categories):
            self.groups.setdefault(c, []).append(i)
        self.batch_size = batch_size
        n = sum(-(-len(g) // batch_size) * batch_size for g in self.groups.values())
        super().__init__(n, seed)

    def batches(self) -> list[list[int]]:
        g = self._generator()
        out = []
        for idx in self.groups.values():
            perm = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
            short = -len(perm) % self.batch_size
            perm += [idx[j] for j in torch.randint(len(idx), (short,), generator=g).tolist()]
            out += [perm[k: k + self.batch_size] for k in range(0, len(perm), self.batch_size)]
        return [out[j] for j in torch.randperm(len(out), generator=g).tolist()]

    def __iter__(self) -> Iterator[int]:
        return iter([i for b in self.batches() for i in b])


def balanced_row_weights(categories: list[int], labels: torch.Tensor) -> torch.Tensor:
    """Row weight = mean over its known labels of 1 / (count of that value in its category's attribute)."""
    counts = Counter((c, j, int(v)) for c, row in zip(categories, labels.tolist())
                     for j, v in enumerate(row) if v != IGNORE)
    weights = []
    for c, row in zip(categories, labels.tolist()):
        inv = [1.0 / counts[(c, j, int(v))] for j, v in enumerate(row) if v != IGNORE]
        weights.append(sum(inv) / len(inv) if inv else 0.0)
    w = torch.tensor(weights, dtype=torch.double)
    return w if w.sum() > 0 else torch.ones_like(w)


class BalancedSampler(_Seeded):
    """Rows drawn with replacement, rare values up-weighted (a class-weighted sampler)."""

    def __init__(self, categories: list[int], labels: torch.Tensor, seed: int):
        self.weights = balanced_row_weights(categories, labels)
        super().__init__(len(categories), seed)

    def __iter__(self) -> Iterator[int]:
        return iter(torch.multinomial(self.weights, self.n, replacement=True, generator=self._generator()).tolist())


class RandomSampler(_Seeded):
    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.n, generator=self._generator()).tolist())


def make_sampler(kind: str, categories: list[int], labels: torch.Tensor, batch_size: int, seed: int) -> Sampler:
    if kind == "category":
        return CategorySampler(categories, batch_size, seed)
    if kind == "balanced":
        return BalancedSampler(categories, labels, seed)
    return RandomSampler(len(categories), seed)
