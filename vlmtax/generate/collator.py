"""Records -> batches: chat template, images through the processor, labels only on answer tokens.

TRL's own VLM path trains on prompt tokens too and cannot mask single attribute values, so vlmtax
builds its batches here: prompt, image and padding tokens get -100; answer tokens keep their ids,
except the tokens of values marked missing (`prepare --missing mask`). Nothing is ever truncated:
a record over the length budget is an error, because cutting through image tokens crashes Qwen2-VL.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from vlmtax.data.answer import answer_segments
from vlmtax.data.chat import SequenceBuilder, TokenCounter
from vlmtax.data.pixel_cache import PixelCache
from vlmtax.data.records import load_image, record_prompt_answer, record_values
from vlmtax.data.taxonomy import Taxonomy
from vlmtax.errors import VlmtaxError
from vlmtax.generate.packing import packed_batch

IGNORE = -100


class Collator:
    """Callable for the Trainer's DataLoader: rows are {"index": i} into `records`.

    Images of a batch go through the image processor in one call; each record's ids come from
    `chat.SequenceBuilder`, the same builder merge's probe uses.
    """

    def __init__(self, processor: Any, taxonomy: Taxonomy, records: list[dict[str, Any]], max_length: int,
                 vision_cache: Any = None, packing: bool = False, pixel_cache: PixelCache | None = None):
        self.processor = processor
        self.packing = packing  # several records per row (packing.py)
        # Row capacity when packing: None = the batch's longest record, so no row is wider than unpacked
        # (sdpa and eager attend over the whole masked row); train.max_length with flash-attention's varlen.
        self.pack_capacity: int | None = None
        self.vision_cache = vision_cache  # a vision_cache.VisionCache: features instead of pixels
        self.pixel_cache = pixel_cache  # processed images kept in memory between epochs
        self.taxonomy = taxonomy
        self.records = records
        self.max_length = max_length
        self.sequences = SequenceBuilder(processor, taxonomy.template.system)
        self.segments = self.sequences.segments
        self.pad_id = processor.tokenizer.pad_token_id
        self.image_pad = self.sequences.image_pad
        self.tokens = 0  # running totals, for the padding fraction the benchmark reports
        self.padding = 0

    def encode(self, rec: dict[str, Any], image_tokens: list[int]) -> dict[str, list[int]]:
        prompt, _ = record_prompt_answer(rec)
        category = self.taxonomy.category(rec["category"])
        segments = answer_segments(category, record_values(rec, self.taxonomy), self.taxonomy.template)
        prompt_ids, answer_ids, owners = self.sequences.build(prompt, segments, image_tokens)
        masked = set(rec.get("masked") or [])
        ids = prompt_ids + answer_ids
        if len(ids) > self.max_length:
            raise VlmtaxError(
                f"record {rec.get('id')} has {len(ids)} tokens, over train.max_length={self.max_length}",
                "raise train.max_length, lower image.max_pixels, or re-run prepare with --model and --max-length",
            )
        labels = [IGNORE] * len(prompt_ids) + [IGNORE if o in masked else t for t, o in zip(answer_ids, owners)]
        return {"input_ids": ids, "labels": labels}

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        recs = [self.records[int(r["index"])] for r in rows]
        paths = [p for rec in recs for p in rec["images"]]
        if self.vision_cache is not None:
            vision, per_image = self.vision_cache.batch(paths)
        elif self.pixel_cache is not None and paths:
            vision = self.pixel_cache.batch(paths, lambda todo: self.sequences.image_inputs(
                [load_image(p) for p in todo])[0])
            per_image = self.sequences.image_tokens(vision["image_grid_thw"])
        else:
            vision, per_image = self.sequences.image_inputs([load_image(p) for p in paths])
        items, start = [], 0
        for rec in recs:
            n = len(rec["images"])
            items.append(self.encode(rec, per_image[start:start + n]))
            start += n
        if self.packing:
            capacity = self.pack_capacity or max(len(it["input_ids"]) for it in items)
            batch, padding = packed_batch(items, [len(rec["images"]) for rec in recs], vision, per_image,
                                          capacity, self.pad_id, self.image_pad)
            self.tokens += batch["input_ids"].numel()
            self.padding += padding
            return batch
        width = max(len(it["input_ids"]) for it in items)
        # Right padding: the loss ignores the tail, and Qwen2-VL's rope index reads the attention mask.
        input_ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
        attention = torch.zeros((len(items), width), dtype=torch.long)
        for row, it in enumerate(items):
            n = len(it["input_ids"])
            input_ids[row, :n] = torch.tensor(it["input_ids"])
            labels[row, :n] = torch.tensor(it["labels"])
            attention[row, :n] = 1
        self.tokens += input_ids.numel()
        self.padding += int((attention == 0).sum())
        batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels,
                 # marks image tokens for Qwen2-VL's multimodal rope (transformers 5)
                 "mm_token_type_ids": (input_ids == self.image_pad).long()}
        batch.update(vision)
        return batch


def record_lengths(processor: Any, taxonomy: Taxonomy, records: list[dict[str, Any]], min_pixels: int,
                   max_pixels: int) -> list[int]:
    """Token count of every record (from image headers, no decoding), for length-grouped batches."""
    counter = TokenCounter(processor, min_pixels, max_pixels, taxonomy.template.system)
    lengths = []
    for rec in records:
        with Image.open(rec["images"][0]) as img:
            width, height = img.size
        category = taxonomy.category(rec["category"])
        segments = answer_segments(category, record_values(rec, taxonomy), taxonomy.template)
        lengths.append(counter.count(record_prompt_answer(rec)[0], segments, width, height))
    return lengths
