"""Records -> batches: chat template, images through the processor, labels only on answer tokens.

TRL's own VLM path trains on prompt tokens too and cannot mask single attribute values, so vlmtax
builds its batches here: prompt, image and padding tokens get -100; answer tokens keep their ids,
except the tokens of values marked missing (`prepare --missing mask`). Nothing is ever truncated:
a record over the length budget is an error, because cutting through image tokens crashes Qwen2-VL.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlmtax.answer import answer_segments, parse_answer
from vlmtax.chat import SegmentTokenizer, TokenCounter, prompt_text
from vlmtax.errors import VlmtaxError
from vlmtax.taxonomy import Taxonomy

IGNORE = -100


def record_prompt_answer(rec: dict[str, Any]) -> tuple[str, str]:
    """The user prompt and assistant answer of a ShareGPT or Alpaca record."""
    if "messages" in rec:
        user = next(m["content"] for m in rec["messages"] if m["role"] == "user")
        answer = next(m["content"] for m in rec["messages"] if m["role"] == "assistant")
        return user, answer
    return rec["instruction"] + (rec.get("input") or ""), rec["output"]


def record_values(rec: dict[str, Any], taxonomy: Taxonomy) -> dict[str, str]:
    """Attribute values of a record: its `attributes` field, or its answer text parsed back."""
    category = taxonomy.category(rec["category"])
    values = rec.get("attributes") or parse_answer(record_prompt_answer(rec)[1], category)
    gaps = [a.name for a in category.attributes if not values.get(a.name)]
    if gaps:
        raise VlmtaxError(f"record {rec.get('id')} has no value for {', '.join(gaps)}", "re-run `vlmtax prepare`")
    return values


def load_records(data_dir: Path, name: str) -> list[dict[str, Any]]:
    path = data_dir / name
    if not path.is_file():
        raise VlmtaxError(f"{path} not found", "point `data:` at a `vlmtax prepare` output folder")
    records = json.loads(path.read_text(encoding="utf-8"))
    for rec in records:
        if "category" not in rec or "images" not in rec:
            raise VlmtaxError(f"{path}: record {rec.get('id')} lacks category/images", "re-run `vlmtax prepare`")
    return records


def load_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as exc:
        raise VlmtaxError(f"cannot read image {path}: {exc}", "re-run `vlmtax prepare` to reject bad images") from None


class Collator:
    """Callable for the Trainer's DataLoader: rows are {"index": i} into `records`."""

    def __init__(self, processor: Any, taxonomy: Taxonomy, records: list[dict[str, Any]], max_length: int):
        self.processor = processor
        self.taxonomy = taxonomy
        self.records = records
        self.max_length = max_length
        self.segments = SegmentTokenizer(processor.tokenizer)
        self.pad_id = processor.tokenizer.pad_token_id

    def encode(self, rec: dict[str, Any]) -> dict[str, Any]:
        prompt, _ = record_prompt_answer(rec)
        category = self.taxonomy.category(rec["category"])
        segments = answer_segments(category, record_values(rec, self.taxonomy))
        images = [load_image(p) for p in rec["images"]]
        enc = self.processor(text=[prompt_text(self.processor, prompt)], images=images or None, return_tensors="pt")
        prompt_ids = enc["input_ids"][0].tolist()
        answer_ids, owners = self.segments.answer(segments)
        masked = set(rec.get("masked") or [])
        ids = prompt_ids + answer_ids
        if len(ids) > self.max_length:
            raise VlmtaxError(
                f"record {rec.get('id')} has {len(ids)} tokens, over train.max_length={self.max_length}",
                "raise train.max_length, lower image.max_pixels, or re-run prepare with --model and --max-length",
            )
        labels = [IGNORE] * len(prompt_ids) + [IGNORE if o in masked else t for t, o in zip(answer_ids, owners)]
        out = {"input_ids": ids, "labels": labels}
        if "mm_token_type_ids" in enc:  # marks image tokens for Qwen2-VL's multimodal rope (transformers 5)
            out["mm_token_type_ids"] = enc["mm_token_type_ids"][0].tolist() + [0] * len(answer_ids)
        for key in ("pixel_values", "image_grid_thw"):
            if key in enc:
                out[key] = enc[key]
        return out

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        items = [self.encode(self.records[int(r["index"])]) for r in rows]
        width = max(len(it["input_ids"]) for it in items)
        # Right padding: the loss ignores the tail, and Qwen2-VL's rope index reads the attention mask.
        input_ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
        attention = torch.zeros((len(items), width), dtype=torch.long)
        token_types = torch.zeros((len(items), width), dtype=torch.long)
        for row, it in enumerate(items):
            n = len(it["input_ids"])
            input_ids[row, :n] = torch.tensor(it["input_ids"])
            labels[row, :n] = torch.tensor(it["labels"])
            attention[row, :n] = 1
            if "mm_token_type_ids" in it:
                token_types[row, :n] = torch.tensor(it["mm_token_type_ids"])
        batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
        if any("mm_token_type_ids" in it for it in items):
            batch["mm_token_type_ids"] = token_types
        if any("pixel_values" in it for it in items):
            batch["pixel_values"] = torch.cat([it["pixel_values"] for it in items if "pixel_values" in it])
            batch["image_grid_thw"] = torch.cat([it["image_grid_thw"] for it in items if "image_grid_thw" in it])
        return batch


def record_lengths(processor: Any, taxonomy: Taxonomy, records: list[dict[str, Any]], min_pixels: int,
                   max_pixels: int) -> list[int]:
    """Token count of every record (from image headers, no decoding), for length-grouped batches."""
    counter = TokenCounter(processor, min_pixels, max_pixels)
    lengths = []
    for rec in records:
        with Image.open(rec["images"][0]) as img:
            width, height = img.size
        category = taxonomy.category(rec["category"])
        segments = answer_segments(category, record_values(rec, taxonomy))
        lengths.append(counter.count(record_prompt_answer(rec)[0], segments, width, height))
    return lengths
