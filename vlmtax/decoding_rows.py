"""Constrained decoding for hybrid models whose linear-attention layers are recurrences (Qwen3.5).

The tree mask of `decoding.py` lays every candidate value side by side in one sequence; through a recurrence
the values would read each other's state. Here each candidate gets its own row instead:

1. Advance: ONE forward of the forced text (the prompt with its image and the first key, later the chosen
   value and the next key) on the row's own state. Its last position scores each value's first token.
2. Branch: the state (the recurrent and convolution states, and the full-attention layers' KV cache) is
   copied once per candidate, and ONE forward over the candidates, one per row, right padded, scores the
   rest of each value and the token that closes it. Right padding never reaches a scored position, and the
   branch is discarded: the chosen value comes back as forced text of the next advance.

Cost per input row: two forwards per attribute (prompt included in the first), batch 1 for the advance and
K rows for the branch, and K copies of the state while a branch lasts (KV cache of the one-in-four attention
layers plus a fixed-size recurrent state per linear layer). Rows go one at a time: a recurrence cannot skip
padding in the middle of a sequence, so rows whose forced texts differ in length cannot share an advance.
The scores are the tree-mask decoder's: value tokens plus the closing token, softmaxed over the values.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from vlmtax.taxonomy import Category


def _positions(decoder: Any, start: int, length: int, rows: int = 1) -> torch.Tensor:
    pos = torch.arange(start, start + length, device=decoder.model.device)[None].expand(rows, -1)
    return decoder.family.positions(pos)


def _advance(decoder: Any, cache: Any, ids: list[int], start: int, prompt: dict | None) -> tuple[torch.Tensor, Any]:
    """Forced text (after the prompt on the first call) through the row's state; the last position's hidden."""
    device = decoder.model.device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    pos = _positions(decoder, start, len(ids))
    kwargs: dict[str, Any] = {}
    if prompt is not None:
        input_ids = torch.cat([prompt["input_ids"], input_ids], dim=1)
        pos = torch.cat([prompt["position_ids"], pos], dim=-1)
        kwargs = {k: prompt[k] for k in ("pixel_values", "image_grid_thw") if k in prompt}
    decoder.forward_calls += 1
    out = decoder.model.model(input_ids=input_ids, position_ids=pos, cache=cache, use_cache=True, **kwargs)
    return out.last_hidden_state[:, -1:], out.cache


def _branch_scores(decoder: Any, cache: Any, hidden: torch.Tensor, slot: Any, start: int) -> torch.Tensor:
    """(values,) scores of every value of `slot` after the advanced state in `cache` (left untouched)."""
    device = decoder.model.device
    n, width = len(slot.values), max(map(len, slot.value_ids))
    first = decoder._target_logprobs(hidden, torch.tensor([slot.first], device=device),
                                     torch.zeros((1, 0), dtype=torch.long, device=device))[0, 0]
    ids = torch.full((n, width), decoder.pad_id, dtype=torch.long, device=device)
    target = torch.zeros((n, width), dtype=torch.long, device=device)
    used = torch.zeros((n, width), dtype=torch.bool, device=device)
    for k, value in enumerate(slot.value_ids):
        ids[k, : len(value)] = torch.tensor(value, device=device)
        target[k, : len(value)] = torch.tensor([*value[1:], slot.next_ids[0]], device=device)
        used[k, : len(value)] = True
    branch = copy.deepcopy(cache)
    branch.reorder_cache(torch.zeros(n, dtype=torch.long, device=device))
    decoder.forward_calls += 1
    out = decoder.model.model(input_ids=ids, position_ids=_positions(decoder, start, width, n),
                              cache=branch, use_cache=True)
    del branch
    # Position j of a value predicts its token j + 1 (or the closer after its last token).
    per_token = decoder._target_logprobs(out.last_hidden_state, target[:, :1], target[:, 1:])[:, :, 0]
    return first + torch.where(used, per_token, 0.0).sum(dim=1)


@torch.no_grad()
def decode_rowwise(decoder: Any, images: list[Any], categories: list[Category]) -> list[Any]:
    """`ConstrainedDecoder.decode` for a family that may not tree-mask, one input row at a time."""
    from vlmtax.decoding import RowResult

    results = []
    for image, category in zip(images, categories):
        prompt, next_pos = decoder._prompt([image], [category])
        start = int(next_pos[0])
        plan, result = decoder.plans(category), RowResult(values={})
        forced, cache = list(plan.key0), None
        for i, slot in enumerate(plan.slots):
            hidden, cache = _advance(decoder, cache, forced, start, prompt if i == 0 else None)
            start += len(forced)
            scores = _branch_scores(decoder, cache, hidden, slot, start)
            decoder.check_finite(scores, slot)
            k = int(scores.argmax())
            result.values[slot.attribute] = slot.values[k]
            result.logliks[slot.attribute] = scores.tolist()
            forced = list(slot.value_ids[k]) + list(slot.next_ids)
        results.append(result)
    return results
