"""Constrained decoding for hybrid models whose linear-attention layers are recurrences (Qwen3.5), a batch at a time.

The tree mask of `decoding.py` lays every candidate value side by side in one sequence; through a recurrence the
values would read each other's state. Here each candidate gets its own row, on a copy of its input row's state,
and every input row of the batch branches in the same forward. Each input row carries a state (its cache row)
and `pending`: forced text not yet fed through that state, at least one token, whose last position scores the
first token of each value.

1. Prompt: ONE forward of the prompts with their images, left padded. Padding at the start of a sequence is exact
   in Qwen3.5's own implementation: its linear layers zero the hidden states of padded positions, so their keys
   and values are zero and the recurrent and convolution states stay exactly zero until the first real token
   (the same path `generate` takes); the attention layers mask padded keys.
2. Branch, one forward per attribute: for every input row and every allowed value, a row of [pending + value],
   on a copy of the input row's state, right padded to the longest. Right padding only follows the positions
   scored, so it cannot change a score. The space a shorter row leaves is filled with the fixed text after the
   value (all but its last token), so that the row of the chosen value usually ends with no padding at all.
3. If every chosen row ends unpadded, its state IS the input row's next state (forced text fed, value and fixed
   text included): the copies of the other candidates are dropped, no further forward. Otherwise the branch
   is discarded, and the chosen value and the fixed text join `pending`; an advance forward then feeds the
   first c tokens of every row's pending text, c the same for every row (all but the last token of the
   shortest), so that no padding ever enters a state in mid-sequence (the recurrence cannot skip it).

Cost per batch: one forward for the prompts, one per attribute of the longest category, plus one advance for
each attribute whose chosen values left a row padded; copies of the state for every candidate of every input
row while a branch lasts (bounded by BRANCH_STATE_BYTES per forward: beyond it the branch is split into forwards
of fewer rows, and the attribute is followed by an advance). The scores are the tree-mask decoder's: value
tokens plus the closing token, softmaxed over the values, equal to teacher forcing within 1e-4
(tests/generate/test_decoding.py).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from vlmtax.data.taxonomy import Category

# Cache (recurrent and convolution states, attention KV) copied for the candidates of one branch forward at most:
# 512 MiB, about 22 candidates of Qwen3.5-2B at a 300-token prompt (docs/decoding.md).
BRANCH_STATE_BYTES = 1 << 29


@dataclass
class RowResult:
    values: dict[str, str]  # attribute name -> allowed value
    logliks: dict[str, list[float]] = field(default_factory=dict)  # attribute -> score of each allowed value
    snapped: int = 0  # free mode: slots whose generated text was not an allowed value


def tree_mask(keymask: torch.Tensor, group: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive (A, 1, W, L+W) mask. `keymask` (A, L): usable cache entries. `group` (A, W): 0 forced text,
    k+1 value k, -1 padding. A query sees usable cache entries, earlier forced text, and earlier tokens of
    its own value; padding sees itself only (so no row of the softmax is empty)."""
    width = group.shape[1]
    idx = torch.arange(width, device=group.device)
    causal = idx[None, :, None] >= idx[None, None, :]
    key_group = group[:, None, :]
    same = (key_group == 0) | (key_group == group[:, :, None])
    new = causal & same & (key_group >= 0) & (group[:, :, None] >= 0)
    new |= torch.eye(width, dtype=torch.bool, device=group.device)[None]
    allowed = torch.cat([keymask[:, None, :].expand(-1, width, -1), new], dim=-1)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=group.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


@dataclass
class _Row:
    """One input row between forwards."""

    result: Any  # its RowResult
    slots: list[Any]  # its category's Slots
    step: int  # index of the slot to branch on next
    pending: list[int]  # forced tokens not yet fed through the state (at least one)
    pos: int  # text position of pending[0]


def _masks(decoder: Any, keymask: torch.Tensor, real: torch.Tensor, padded_prompt: bool) -> dict[str, Any]:
    """Per layer type: the attention layers' 4D mask (usable cache entries + causal over real tokens; padding sees
    itself only, so no softmax row is empty) and the linear layers' 2D padding mask (None: nothing to zero)."""
    group = torch.where(real, 0, -1)
    full = tree_mask(keymask, group, decoder.model.dtype)
    linear = real.long() if padded_prompt else None
    types = set(decoder.model.config.get_text_config().layer_types)
    return {t: (full if t == "full_attention" else linear) for t in types}


def _forward(decoder: Any, cache: Any, keymask: torch.Tensor, seqs: list[list[int]], starts: list[int],
             prompt: dict | None = None) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """One forward of `seqs` (right padded) after each row's cache, or after the left-padded prompt. Returns the
    hidden states of `seqs`' positions, the cache, and its usable-entry mask."""
    device = decoder.model.device
    width = max(map(len, seqs))
    ids = torch.tensor([s + [decoder.pad_id] * (width - len(s)) for s in seqs], dtype=torch.long, device=device)
    real = torch.tensor([[j < len(s) for j in range(width)] for s in seqs], dtype=torch.bool, device=device)
    pos = decoder.family.positions(torch.tensor(starts, device=device)[:, None] + torch.arange(width, device=device))
    # transformers' reference delta rule pads every sequence to whole chunks (64 tokens by default): a branch or
    # an advance a few tokens wide would cost a 64-token prefill per row. transformers passes the argument to an
    # installed kernel (FLA's) only if its signature names it.
    kwargs: dict[str, Any] = {"chunk_size": max(1, min(width, 64))}
    if prompt is not None:
        ids = torch.cat([prompt["input_ids"], ids], dim=1)
        real = torch.cat([prompt["attention_mask"].bool(), real], dim=1)
        pos = torch.cat([prompt["position_ids"], pos], dim=-1)
        kwargs = {k: prompt[k] for k in ("pixel_values", "image_grid_thw") if k in prompt}
    mask = _masks(decoder, keymask, real, prompt is not None)
    decoder.forward_calls += 1
    out = decoder.model.model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                              **kwargs)
    return out.last_hidden_state[:, ids.shape[1] - width:], out.cache, torch.cat([keymask, real], dim=1)


def _state_bytes(cache: Any, rows: int) -> int:
    """Bytes of cache per row (every tensor its layers hold: attention KV, convolution and recurrent states)."""
    total = 0
    for layer in cache.layers:
        for value in vars(layer).values():
            tensors = value.values() if isinstance(value, dict) else [value]
            total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor) and t.dim())
    return total // max(rows, 1)


def _groups(cache: Any, rows: list[_Row]) -> list[tuple[int, int]]:
    """Consecutive input rows whose candidates' state copies fit in BRANCH_STATE_BYTES (one row at least)."""
    per_row, groups, start, used = _state_bytes(cache, len(rows)), [], 0, 0
    for a, row in enumerate(rows):
        size = per_row * len(row.slots[row.step].values)
        if a > start and used + size > BRANCH_STATE_BYTES:
            groups.append((start, a))
            start, used = a, 0
        used += size
    return groups + [(start, len(rows))]


def _branch(decoder: Any, cache: Any, keymask: torch.Tensor, rows: list[_Row], first: int) -> tuple[
        list[torch.Tensor], Any, torch.Tensor, list[int]]:
    """Every value of each row's slot in its own row, on a copy of the row's state (`rows` are the cache's rows
    `first`, `first + 1`, ...; `cache` is left as it is).
    Returns each input row's (values,) scores, the candidate rows' cache and usable-entry mask, and how many
    tokens of the fixed text after its value each candidate row fed (-1: its row ended in padding)."""
    seqs, starts, index, scored, target = [], [], [], [], []
    for a, row in enumerate(rows):
        slot = row.slots[row.step]
        for value in slot.value_ids:
            n = len(row.pending)
            scored.append(range(n - 1, n + len(value)))  # position j scores the token after it: value, closer
            target += [*value, slot.next_ids[0]]
            seqs.append(row.pending + list(value))
            starts.append(row.pos)
            index.append(first + a)
    width, fed = max(map(len, seqs)), []
    for seq, a in zip(seqs, index):  # fill with the fixed text after the value, keeping its last token pending
        next_ids = rows[a - first].slots[rows[a - first].step].next_ids
        m = max(0, min(width - len(seq), len(next_ids) - 1))
        seq += next_ids[:m]
        fed.append(m if len(seq) == width else -1)
    index_t = torch.tensor(index, device=keymask.device)
    branch = copy.deepcopy(cache)
    branch.reorder_cache(index_t)
    hidden, branch, branch_mask = _forward(decoder, branch, keymask[index_t], seqs, starts)
    device = hidden.device
    row_idx = torch.tensor([k for k, r in enumerate(scored) for _ in r], device=device)
    pos_idx = torch.tensor([j for r in scored for j in r], device=device)
    logp = decoder.chunked_logprobs(hidden[row_idx, pos_idx], torch.tensor(target, device=device)[:, None])[:, 0]
    per_candidate = torch.zeros(len(seqs), device=device).index_add_(0, row_idx, logp).cpu()
    counts = [len(row.slots[row.step].values) for row in rows]
    return list(per_candidate.split(counts)), branch, branch_mask, fed


def _advance(decoder: Any, cache: Any, keymask: torch.Tensor, rows: list[_Row],
             prompt: dict | None = None) -> tuple[Any, torch.Tensor]:
    """Feed the same number of pending tokens of every row (all but the last of the shortest), after the prompts
    on the first call: no padding but the prompts' own, at their start."""
    c = min(len(r.pending) for r in rows) - 1
    if c <= 0 and prompt is None:
        return cache, keymask
    _, cache, keymask = _forward(decoder, cache, keymask, [r.pending[:c] for r in rows], [r.pos for r in rows],
                                 prompt)
    for r in rows:
        r.pending, r.pos = r.pending[c:], r.pos + c
    return cache, keymask


@torch.no_grad()
def decode_rowwise(decoder: Any, images: list[Any], categories: list[Category]) -> list[Any]:
    """`ConstrainedDecoder.decode` for a family that may not tree-mask: the whole batch at once, a row per candidate."""
    prompt, next_pos = decoder._prompt(images, categories)
    rows = []
    for category, start in zip(categories, next_pos.tolist()):
        plan = decoder.plans(category)
        rows.append(_Row(RowResult(values={}), plan.slots, 0, list(plan.key0), int(start)))
    results = [r.result for r in rows]
    empty = torch.zeros((len(rows), 0), dtype=torch.bool, device=decoder.model.device)
    cache, keymask = _advance(decoder, None, empty, rows, prompt)
    while rows:
        cache, keymask, rows = _attribute(decoder, cache, keymask, rows)
    return results


def _attribute(decoder: Any, cache: Any, keymask: torch.Tensor, rows: list[_Row]) -> tuple[Any, torch.Tensor, list]:
    """Branch every row on its current slot, record the choice, and bring the state of the rows that go on past it."""
    groups, picked, carried = _groups(cache, rows), [], None
    for first, last in groups:
        scores, branch, branch_mask, fed = _branch(decoder, cache, keymask, rows[first:last], first)
        offset = 0
        for row, s in zip(rows[first:last], scores):
            slot = row.slots[row.step]
            decoder.check_finite(s, slot)
            k = int(s.argmax())
            row.result.values[slot.attribute] = slot.values[k]
            row.result.logliks[slot.attribute] = s.tolist()
            picked.append((offset + k, k, fed[offset + k]))
            offset += len(s)
        carried = (branch, branch_mask) if len(groups) == 1 else None
        del branch, branch_mask  # a split branch frees its copies before the next part makes its own
    keep = [a for a, row in enumerate(rows) if row.step + 1 < len(row.slots)]
    if not keep:
        return cache, keymask, []
    if carried and all(picked[a][2] >= 0 for a in keep):  # every chosen row carries its input row's next state
        index = torch.tensor([picked[a][0] for a in keep], device=keymask.device)
        cache, keymask = carried[0], carried[1][index]
        cache.reorder_cache(index)
        for a in keep:
            row, (_, k, m) = rows[a], picked[a]
            slot = row.slots[row.step]
            row.pos += len(row.pending) + len(slot.value_ids[k]) + m
            row.pending, row.step = list(slot.next_ids[m:]), row.step + 1
        return cache, keymask, [rows[a] for a in keep]
    if len(keep) < len(rows):  # rows whose category has no attribute left leave the batch
        index = torch.tensor(keep, device=keymask.device)
        cache.reorder_cache(index)
        keymask = keymask[index]
    for a in keep:
        row, slot = rows[a], rows[a].slots[rows[a].step]
        row.pending += list(slot.value_ids[picked[a][1]]) + list(slot.next_ids)
        row.step += 1
    out = [rows[a] for a in keep]
    return (*_advance(decoder, cache, keymask, out), out)
