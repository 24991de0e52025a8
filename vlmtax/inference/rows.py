"""Prediction rows: each input row planned once (known category? image there and readable?), cut into fixed
batches sorted by category and image size, and decoded a batch at a time by either route's decoder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from vlmtax.data.catalogue import geometry_reject, row_images
from vlmtax.data.taxonomy import Category, Taxonomy
from vlmtax.errors import first_line


@dataclass
class Row:
    index: int  # position in the input CSV
    id: str
    category_text: str
    category: Category | None
    image: Path | None
    pixels: int = 0
    reject: tuple[str, str] | None = None


def plan_rows(frame: pd.DataFrame, taxonomy: Taxonomy, images: Path, image_pattern: str) -> list[Row]:
    """Every input row, with the reason it cannot go to the model (unknown category, no image) if any."""
    cat_texts = ["" if pd.isna(c) else " ".join(str(c).split()) for c in frame["Category"]]
    known = [taxonomy.categories.get(c) for c in cat_texts]
    resolved = row_images(frame, images, image_pattern, skip=[c is None for c in known])
    rows = []
    for i, (raw_id, cat_text, cat, (path, reject)) in enumerate(zip(frame["id"], cat_texts, known, resolved)):
        row = Row(i, "" if pd.isna(raw_id) else str(raw_id).strip(), cat_text, cat, path)
        rows.append(row)
        if row.category is None:
            row.reject = ("unknown_category", f"{cat_text!r} is not in the taxonomy")
        elif not row.category.trained():
            # The model never saw this category: its slots can only hold the filler, which is no prediction.
            row.reject = ("untrained_category", f"no training row of {cat_text!r} held a label")
        elif reject:
            row.reject = reject
        elif not row.image.is_file():
            row.reject = ("missing_image", str(row.image))
        else:
            try:
                with Image.open(row.image) as img:
                    row.pixels = img.size[0] * img.size[1]
                    refused = geometry_reject(*img.size)
                if refused is not None:
                    row.reject = (refused[0], f"{row.image}: {refused[1]}")
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                row.reject = ("unreadable_image", f"{row.image}: {exc}")
    return rows


def make_batches(rows: list[Row], batch_size: int) -> list[list[Row]]:
    todo = sorted((r for r in rows if r.reject is None), key=lambda r: (r.category.name, r.pixels, r.index))
    return [todo[i: i + batch_size] for i in range(0, len(todo), batch_size)]


def decode_batch(decoder: Any, batch: list[Row], want_probs: bool) -> list[dict[str, Any]]:
    """One batch through a route's decoder (`decode(images, categories)`, either route): predict's records, an
    unreadable image or one the processor refuses rejected alone, its batch decoded row by row."""
    records, images, ok = [], [], []
    for row in batch:
        try:
            with Image.open(row.image) as img:
                images.append(img.convert("RGB"))
            ok.append(row)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            records.append({"row": row.index, "reject": ["unreadable_image", f"{row.image}: {exc}"]})
    if ok:
        try:
            results: list[Any] = decoder.decode(images, [r.category for r in ok])
        except ValueError:
            # The processor refused an image of the batch: decode row by row, so only that row is rejected.
            results = []
            for row, img in zip(ok, images):
                try:
                    results.extend(decoder.decode([img], [row.category]))
                except ValueError as exc:
                    results.append(None)
                    first = first_line(exc)[:200]
                    records.append({"row": row.index, "reject": ["processor_refused", f"{row.image}: {first}"]})
        for row, res in zip(ok, results):
            if res is None:
                continue
            rec: dict[str, Any] = {"row": row.index, "values": res.values, "snapped": res.snapped}
            if want_probs:
                rec["logliks"] = res.logliks
                if getattr(res, "probs", None) is not None:  # classify runs give probabilities directly
                    rec["probs"] = res.probs
            records.append(rec)
    return records
