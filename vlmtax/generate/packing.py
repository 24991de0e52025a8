"""Packed batches for sft: several records per row, each attending only to itself, with its own M-RoPE.

`train.packing` puts a batch's records into as few rows as fit (first-fit decreasing), so padding
shrinks to the tail of each row. A row holds at most `train.max_length` tokens with flash-attention,
whose varlen kernels attend within each record only; with sdpa or eager the masked attention still
spans the whole row (quadratic in its width), so rows are kept no wider than the batch's longest record
and records fill the others' padding. Three things keep a packed row equal to its records trained apart:
- attention stays inside each record: the model gets no attention mask but 4-row position ids whose
  first row (the text positions) restarts at 0 at each record; transformers turns that into a
  block-diagonal mask for sdpa and eager, and into varlen attention with flash-attention;
- each record's M-RoPE positions come from the model's own rope index, run on that record alone (run on
  the packed row it would continue one record's positions into the next: LLaMA-Factory's #7754);
- the loss is the same sum over the same answer tokens divided by the same count.
The tail padding forms one more segment, with no loss.
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE = -100


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Record indices per row: longest first, each into the first row with room; rows keep input order."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return [sorted(row) for row in rows]


def _reorder(vision: dict[str, torch.Tensor], per_image: list[int], image_order: list[int]) -> dict[str, torch.Tensor]:
    """The batch's image tensors in packed order (pixel patches or cached features, split per image)."""
    if not vision:
        return vision
    grid = vision["image_grid_thw"]
    out = {"image_grid_thw": grid[image_order]}
    for key, sizes in (("pixel_values", grid.prod(-1).tolist()), ("image_embeds", per_image)):
        if key in vision:
            parts = torch.split(vision[key], sizes)
            out[key] = torch.cat([parts[i] for i in image_order])
    return out


def packed_batch(items: list[dict[str, list[int]]], images_per_record: list[int], vision: dict[str, torch.Tensor],
                 per_image: list[int], capacity: int, pad_id: int, image_pad: int) -> tuple[dict[str, Any], int]:
    """The collator's batch with records packed into rows; also the number of padding tokens."""
    rows = first_fit([len(it["input_ids"]) for it in items], capacity)
    first_image = [sum(images_per_record[:i]) for i in range(len(items))]
    width = max(sum(len(items[i]["input_ids"]) for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    spans, image_order = [], []
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            n = len(items[i]["input_ids"])
            input_ids[r, start:start + n] = torch.tensor(items[i]["input_ids"])
            labels[r, start:start + n] = torch.tensor(items[i]["labels"])
            spans.append((r, start, n, images_per_record[i]))
            image_order.extend(range(first_image[i], first_image[i] + images_per_record[i]))
            start += n
    padding = input_ids.numel() - sum(s[2] for s in spans)
    batch = {"input_ids": input_ids, "labels": labels, "mm_token_type_ids": (input_ids == image_pad).long(),
             "packed_spans": torch.tensor(spans, dtype=torch.long), **_reorder(vision, per_image, image_order)}
    return batch, padding


def check_family(model: Any) -> None:
    """train.packing only where the family table allows it (models/families.py: attention-only families)."""
    from vlmtax.errors import VlmtaxError
    from vlmtax.models.families import FAMILIES, family_of

    family = family_of(model)
    if not family.packing:
        able = ", ".join(f.name for f in FAMILIES.values() if f.packing)
        raise VlmtaxError(f"train.packing is not supported for {family.label}: its recurrent layers would carry "
                          "one packed record's state into the next" if not family.tree_mask else
                          f"train.packing is not supported for {family.label}",
                          f"set train.packing=false (supported: {able})")


def rope_model(model: Any) -> Any:
    """The module that owns the family's rope index (Qwen2VLModel and its kin)."""
    for module in model.modules():
        if hasattr(module, "get_rope_index") and hasattr(module, "language_model"):
            return module
    raise ValueError("this model has no rope index (get_rope_index); train.packing needs a Qwen-VL family model")


def positions(model: Any, inputs: dict[str, Any], spans: torch.Tensor) -> torch.Tensor:
    """(4, rows, width) position ids: text positions restarting per record (the mask), then M-RoPE per record."""
    ids, types = inputs["input_ids"], inputs["mm_token_type_ids"]
    rows, width = ids.shape
    out = torch.arange(width, device=ids.device).expand(4, rows, width).clone()
    grids = inputs.get("image_grid_thw")
    owner, image = rope_model(model), 0
    for r, start, n, n_images in spans.tolist():
        end = start + n
        grid = grids[image:image + n_images] if n_images else None
        mrope, _ = owner.get_rope_index(ids[r:r + 1, start:end], types[r:r + 1, start:end], image_grid_thw=grid)
        out[1:, r, start:end] = mrope[:, 0]
        out[0, r, start:end] = torch.arange(n, device=ids.device)
        image += n_images
    for r in range(rows):  # the tail padding: its own segment, so no record attends to it
        used = int(spans[spans[:, 0] == r, 2].sum())
        out[:, r, used:] = torch.arange(width - used, device=ids.device)
    return out


def model_inputs(model: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """A packed batch gets its position ids here (the model's rope index needs the model)."""
    spans = inputs.pop("packed_spans", None)
    if spans is not None:
        inputs["position_ids"] = positions(model, inputs, spans)
    return inputs
