"""Stage: processed images kept in memory between epochs, for both routes' training collators.

Decoding an image and running the image processor costs the same every epoch, and on a CPU it is a
tenth to a third of a small model's training step. Both collators keep each processed image here
(up to a byte budget, first come first kept, the rest processed every time) and join them per batch.
The processors are deterministic, so a batch from the cache equals a fresh one bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch


def per_image(inputs: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """One processor call's output split into single-image inputs (views; joined again by `torch.cat` per key).

    Qwen-family processors give a variable number of patch rows per image (`image_grid_thw`); the
    others one block per image.
    """
    if "image_grid_thw" in inputs:
        grids = inputs["image_grid_thw"]
        blocks = inputs["pixel_values"].split(grids.prod(-1).tolist())
        return [{"pixel_values": b, "image_grid_thw": g[None]} for b, g in zip(blocks, grids)]
    return [{"pixel_values": p[None]} for p in inputs["pixel_values"]]


class PixelCache:
    """Processed single-image inputs by key (a row index or an image path), up to `budget` bytes."""

    def __init__(self, budget: int):
        self.budget, self.used = budget, 0
        self.items: dict[Hashable, dict[str, torch.Tensor]] = {}

    def batch(self, keys: list[Any], process: Callable[[list[Any]], dict[str, torch.Tensor]],
              ) -> dict[str, torch.Tensor]:
        """The inputs of `keys` in order; `process` (one processor call) handles the keys not kept yet."""
        missing = [k for k in dict.fromkeys(keys) if k not in self.items]
        fresh = {}
        if missing:
            out = process(missing)
            fresh = dict(zip(missing, per_image(out)))
            for key, single in fresh.items():
                size = sum(t.numel() * t.element_size() for t in single.values())
                if self.used + size <= self.budget:  # a copy, so that it does not hold its batch's storage
                    self.items[key] = {name: t.clone() for name, t in single.items()}
                    self.used += size
            if missing == list(keys):  # nothing was kept before and no key repeats: the call's output is the batch
                return out
        items = [self.items.get(k) or fresh[k] for k in keys]
        return {name: torch.cat([it[name] for it in items]) for name in items[0]}


def pixel_cache(recipe: Any) -> PixelCache | None:
    """The recipe's cache (train.pixel_cache_mb), or None: turned off, or with dataloader workers, whose
    copies of the collator would not outlive an epoch."""
    mb = recipe.train.pixel_cache_mb
    return PixelCache(mb * 2**20) if mb and recipe.train.num_workers == 0 else None
