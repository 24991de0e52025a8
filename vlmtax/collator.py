"""Records -> batches: chat template, images through the processor, labels only on answer tokens.

TRL's own VLM path trains on prompt tokens too and cannot mask single attribute values, so vlmtax
builds its batches here: prompt, image and padding tokens get -100; answer tokens keep their ids,
except the tokens of values marked missing (`prepare --missing mask`). Nothing is ever truncated:
a record over the length budget is an error, because cutting through image tokens crashes Qwen2-VL.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlmtax.answer import answer_segments, parse_answer
from vlmtax.chat import SegmentTokenizer, TokenCounter, image_pad_id, prompt_text
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
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VlmtaxError(f"{path} is damaged (not valid JSON: {exc})",
                          "re-run `vlmtax prepare` into a new --out") from None
    if not isinstance(records, list) or not all(isinstance(rec, dict) for rec in records):
        raise VlmtaxError(f"{path} is not a list of training records", "re-run `vlmtax prepare` into a new --out")
    for rec in records:
        if "category" not in rec or not isinstance(rec.get("images"), list) or not rec["images"]:
            raise VlmtaxError(f"{path}: record {rec.get('id')} lacks category/images", "re-run `vlmtax prepare`")
    # Checked up front: an image moved after prepare would otherwise stop training mid-epoch.
    gone = [rec["images"][0] for rec in records if not os.path.isfile(rec["images"][0])]
    if gone:
        raise VlmtaxError(f"{len(gone)} image(s) named in {path} are gone, e.g. {gone[0]}",
                          "restore the images, or re-run `vlmtax prepare` with the folder where they are now")
    return records


def load_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as exc:
        raise VlmtaxError(f"cannot read image {path}: {exc}", "re-run `vlmtax prepare` to reject bad images") from None


class Collator:
    """Callable for the Trainer's DataLoader: rows are {"index": i} into `records`.

    Images of a batch go through the image processor in one call and the templated prompt is tokenised
    once per distinct prompt; its <|image_pad|> is then expanded to the image's token count. This gives
    the same ids as calling the processor record by record (tested), at a fraction of the cost.
    """

    def __init__(self, processor: Any, taxonomy: Taxonomy, records: list[dict[str, Any]], max_length: int):
        self.processor = processor
        self.taxonomy = taxonomy
        self.records = records
        self.max_length = max_length
        self.segments = SegmentTokenizer(processor.tokenizer)
        self.pad_id = processor.tokenizer.pad_token_id
        self.image_pad = image_pad_id(processor)
        self.merge = processor.image_processor.merge_size ** 2
        self._prompts: dict[str, tuple[int, ...]] = {}
        self.tokens = 0  # running totals, for the padding fraction the benchmark reports
        self.padding = 0

    def prompt_ids(self, prompt: str, image_tokens: list[int]) -> list[int]:
        if prompt not in self._prompts:
            self._prompts[prompt] = self.segments.encode(prompt_text(self.processor, prompt))
        ids: list[int] = []
        counts = iter(image_tokens)
        for t in self._prompts[prompt]:
            ids.extend([t] * next(counts) if t == self.image_pad else (t,))
        return ids

    def encode(self, rec: dict[str, Any], image_tokens: list[int]) -> dict[str, list[int]]:
        prompt, _ = record_prompt_answer(rec)
        category = self.taxonomy.category(rec["category"])
        segments = answer_segments(category, record_values(rec, self.taxonomy))
        prompt_ids = self.prompt_ids(prompt, image_tokens)
        answer_ids, owners = self.segments.answer(segments)
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
        images = [load_image(p) for rec in recs for p in rec["images"]]
        vision = self.processor.image_processor(images=images, return_tensors="pt") if images else {}
        per_image = (vision["image_grid_thw"].prod(-1) // self.merge).tolist() if images else []
        items, start = [], 0
        for rec in recs:
            n = len(rec["images"])
            items.append(self.encode(rec, per_image[start:start + n]))
            start += n
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
        if images:
            batch["pixel_values"] = vision["pixel_values"]
            batch["image_grid_thw"] = vision["image_grid_thw"]
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
