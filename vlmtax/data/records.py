"""Prepared records: reading train.json/val.json, a record's prompt, answer, values and image.

Shared by training (the collator), merge's verification probe and the classify route, so none of them
imports another stage's internals to read a record.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from PIL import Image

from vlmtax.data.answer import parse_answer
from vlmtax.data.taxonomy import Taxonomy
from vlmtax.errors import VlmtaxError


def check_data_dir(data: Path) -> None:
    """The prepared data a recipe names is there (both routes read train.json and taxonomy.json)."""
    if not data.is_dir():
        raise VlmtaxError(f"data dir {data} not found", "run `vlmtax prepare` and point `data:` at its --out")
    for name in ("train.json", "taxonomy.json"):
        if not (data / name).is_file():
            raise VlmtaxError(f"data dir {data} has no {name}", "run `vlmtax prepare` and point `data:` at its --out")


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
    values = rec.get("attributes") or parse_answer(record_prompt_answer(rec)[1], category, taxonomy.template)
    gaps = [a.name for a in category.attributes if not values.get(a.name)]
    if gaps:
        raise VlmtaxError(f"record {rec.get('id')} has no value for {', '.join(gaps)}", "re-run `vlmtax prepare`")
    return values


def load_records(data_dir: Path, name: str) -> list[dict[str, Any]]:
    """The records of `data_dir/name`, checked: a list of records whose first images all exist."""
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
    """A record's image as RGB; an unreadable file is a one-line error."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as exc:
        raise VlmtaxError(f"cannot read image {path}: {exc}", "re-run `vlmtax prepare` to reject bad images") from None
