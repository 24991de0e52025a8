"""Reading a catalogue: the category-attribute file and image paths (confined to their folder).

The image checks themselves live in imagecheck.py."""

from __future__ import annotations

import functools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from vlmtax.data.taxonomy import N_SLOTS, SLOT_COLUMNS, Remap, normalise
from vlmtax.errors import VlmtaxError, first_line

DEFAULT_IMAGE_PATTERN = "{id:06d}.jpg"
# Columns of a rejects CSV (prepare's rejects.csv, predict's <out>.rejects.csv).
REJECT_COLUMNS = ["id", "Category", "reason", "detail"]


@dataclass
class CategoryAttributes:
    """Category -> attribute names in attr_1.. order, plus remaps declared alongside them, plus the declared
    closed vocabularies: category -> attribute -> allowed values (normalised), for attributes that list `values:`."""

    attributes: dict[str, list[str]]
    remaps: list[Remap]
    values: dict[str, dict[str, list[str]]] = field(default_factory=dict)


def _declared(entries: object, where: str) -> tuple[object, dict[str, list[str]]]:
    """Attribute entries that are `{name: color, values: [red, ...]}`: their names, and their declared values."""
    if not isinstance(entries, list) or not any(isinstance(e, dict) for e in entries):
        return entries, {}
    names: list[object] = []
    values: dict[str, list[str]] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            names.append(entry)
            continue
        if "name" not in entry or not set(entry) <= {"name", "values"}:
            raise VlmtaxError(f"{where}: attribute entry {entry!r} needs `name` (and optionally `values`) only",
                              "write {name: color, values: [red, blue]}")
        names.append(entry["name"])
        if entry.get("values") is not None:
            raw = entry["values"]
            listed = [normalise(v) for v in raw] if isinstance(raw, list) else []
            if not listed or None in listed:
                raise VlmtaxError(f"{where}: values of {entry['name']!r} must be a non-empty list of labels",
                                  "list the allowed labels, e.g. values: [red, blue]")
            values[str(entry["name"]).strip()] = list(dict.fromkeys(listed))
    return names, values


def _as_list(value: object, where: str) -> list[str]:
    """An attribute list as written in the file: a list (parquet, json, yaml) or its string form ("['a', 'b']")."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                parsed = json.loads(text.replace("'", '"'))
            except json.JSONDecodeError:
                parsed = [p.strip(" '\"") for p in text.strip("[]").split(",")]
        else:
            parsed = [text] if text else []
        value = parsed
    if value is None or isinstance(value, (float, int, bool, dict)) or not hasattr(value, "__iter__"):
        raise VlmtaxError(f"{where}: the attribute list is {value!r}, not a list of names",
                          "give a list of attribute names, e.g. [color, pattern]")
    names = list(value)  # numpy arrays and lists from parquet
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise VlmtaxError(f"{where}: attribute name {name!r} is empty or not text",
                              "give every attribute a non-empty name")
    return [n.strip() for n in names]  # otherwise verbatim: Meesho really spells one `ocassion`


def _count(value: object, where: str) -> int:
    """No_of_attribute as an integer; null, NaN, fractions and text are errors."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)) and not hasattr(value, "__int__"):
        raise VlmtaxError(f"{where}: No_of_attribute {value!r} is not a whole number", "give the attribute count")
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not math.isfinite(number) or number != int(number):
        raise VlmtaxError(f"{where}: No_of_attribute {value!r} is not a whole number", "give the attribute count")
    return int(number)


def _parse_remaps(raw: object, path: Path) -> list[Remap]:
    if not isinstance(raw, list):
        raise VlmtaxError(f"{path}: remaps must be a list", "write remaps: ['Sarees:attr_1<->attr_4']")
    remaps = []
    for item in raw:
        if isinstance(item, str):
            remaps.append(Remap.parse(item))
        elif isinstance(item, dict) and set(item) == {"category", "a", "b"} and all(
                isinstance(v, str) and re.fullmatch(r"attr_\d+", v) for v in (item["a"], item["b"])):
            remaps.append(Remap(category=" ".join(str(item["category"]).split()), a=item["a"], b=item["b"]))
        else:
            raise VlmtaxError(f"{path}: bad remap entry {item!r}",
                              "write 'CATEGORY:attr_1<->attr_4' or {category: C, a: attr_1, b: attr_4}")
    return remaps


def _category_name(raw: object, path: Path) -> str:
    name = " ".join(str(raw).split()) if raw is not None and not (isinstance(raw, float) and raw != raw) else ""
    if not name:
        raise VlmtaxError(f"{path}: a category has an empty name ({raw!r})", "give every category a name")
    return name


def _add(attributes: dict[str, list[str]], name: str, attrs: list[str], path: Path) -> None:
    if name in attributes:
        raise VlmtaxError(f"{path}: category {name!r} is listed twice", "list each category once")
    attributes[name] = attrs


def read_category_attributes(path: str | Path) -> CategoryAttributes:
    """Meesho's category_attributes.parquet, or the same as JSON/YAML records or a mapping."""
    path = Path(path)
    if not path.is_file():
        raise VlmtaxError(f"category-attribute file not found: {path}",
                          "pass --attributes FILE (parquet, json or yaml)")
    suffix = path.suffix.lower()
    remaps: list[Remap] = []
    try:
        if suffix == ".parquet":
            data: object = pd.read_parquet(path).to_dict("records")
        elif suffix in (".json", ".yaml", ".yml"):
            text = path.read_text(encoding="utf-8")
            data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
        else:
            raise VlmtaxError(f"unsupported category-attribute file type {suffix!r}", "use .parquet, .json or .yaml")
    except VlmtaxError:
        raise
    except Exception as exc:  # parquet/json/yaml parsers raise many types; all mean "unreadable"
        raise VlmtaxError(f"cannot read category-attribute file {path}: {first_line(exc)}",
                          "check the file's format") from None

    if isinstance(data, dict) and "categories" in data:
        remaps = _parse_remaps(data.get("remaps") or [], path)
        data = data["categories"]
    attributes: dict[str, list[str]] = {}
    values: dict[str, dict[str, list[str]]] = {}
    if isinstance(data, dict):
        for raw, attrs in data.items():
            name = _category_name(raw, path)
            attrs, declared = _declared(attrs, f"{path}: category {name!r}")
            _add(attributes, name, _as_list(attrs, f"{path}: category {name!r}"), path)
            if declared:
                values[name] = declared
    elif isinstance(data, list) and all(isinstance(r, dict) for r in data):
        for rec in data:
            if "Category" not in rec or "Attribute_list" not in rec:
                raise VlmtaxError(
                    f"category-attribute file {path} records need Category and Attribute_list",
                    "use Meesho's layout (Category, No_of_attribute, Attribute_list)",
                )
            name = _category_name(rec["Category"], path)
            where = f"{path}: category {name!r}"
            attrs = _as_list(rec["Attribute_list"], where)
            n = _count(rec["No_of_attribute"], where) if "No_of_attribute" in rec else None
            if n is not None and n != len(attrs):
                raise VlmtaxError(f"{where} says No_of_attribute={n} but lists {len(attrs)} attributes",
                                  "make the two agree")
            _add(attributes, name, attrs, path)
    else:
        raise VlmtaxError(f"category-attribute file {path} has an unexpected structure", "see docs/data-formats.md")
    if not attributes:
        raise VlmtaxError(f"category-attribute file {path} lists no categories", "add at least one category")
    for name, attrs in attributes.items():
        if not 1 <= len(attrs) <= N_SLOTS:
            raise VlmtaxError(f"category {name!r} has {len(attrs)} attributes", f"use 1 to {N_SLOTS} attributes")
        if len(set(attrs)) != len(attrs):
            twice = next(a for a in attrs if attrs.count(a) > 1)
            raise VlmtaxError(f"category {name!r} repeats the attribute name {twice!r}",
                              "give each attribute a unique name")
    return CategoryAttributes(attributes=attributes, remaps=remaps, values=values)


def undeclared_labels(frame: pd.DataFrame, spec: CategoryAttributes,
                      rows: list[int]) -> list[tuple[int, str, str, str]]:
    """(row, column, attribute, label) of every label outside its attribute's declared values, among `rows`."""
    found = []
    for i in rows:
        declared = spec.values.get(frame["Category"].iat[i])
        if not declared:
            continue
        for column, attr in zip(SLOT_COLUMNS, spec.attributes[frame["Category"].iat[i]]):
            value = frame[column].iat[i]
            if attr in declared and value is not None and value not in declared[attr]:
                found.append((i, column, attr, value))
    return found


@functools.lru_cache(maxsize=1024)
def _root(images: str) -> str:
    return os.path.realpath(images)


def image_path(images: Path, row_id: str, rel: str | None, pattern: str) -> tuple[Path | None, str | None]:
    """Resolve a row's image inside the folder `images`; returns (path, None) or (None, reject reason).

    `..` segments are collapsed lexically, so a CSV cannot point outside the folder; the folder itself is
    resolved once, and a symlink inside it is resolved and must stay inside it too.
    """
    root = _root(str(images))
    if rel is None:
        try:
            rel = pattern.format(id=int(row_id) if row_id.strip().isdigit() else row_id)
        except (ValueError, TypeError, KeyError, IndexError):
            return None, "bad_id"
    candidate = os.path.normpath(os.path.join(root, rel))
    if os.path.commonpath([root, candidate]) != root or candidate == root:
        return None, "image_outside_folder"
    if os.path.islink(candidate) or _root(os.path.dirname(candidate)) != os.path.dirname(candidate):
        # A symlink (the file or a folder on the way) may point outside: resolve it, then confine again.
        real = os.path.realpath(candidate)
        if os.path.commonpath([root, real]) != root:
            return None, "image_outside_folder"
    return Path(candidate), None


def row_images(frame: Any, images: Path, pattern: str,
               skip: list[bool] | None = None) -> list[tuple[Path | None, tuple[str, str] | None]]:
    """Each row's image: its `image` column where set, else `pattern` from its id; (path, None) or
    (None, (reason, detail)). Rows marked in `skip` (already rejected) get (None, None)."""
    rel_col = frame["image"] if "image" in frame.columns else [None] * len(frame)
    out: list[tuple[Path | None, tuple[str, str] | None]] = []
    for i, (row_id, rel) in enumerate(zip(frame["id"], rel_col)):
        if skip is not None and skip[i]:
            out.append((None, None))
            continue
        row_id = "" if pd.isna(row_id) else str(row_id).strip()
        rel = None if rel is None or pd.isna(rel) or not str(rel).strip() else str(rel).strip()
        path, reason = image_path(images, row_id, rel, pattern)
        out.append((path, (reason, str(rel if rel is not None else pattern)) if reason else None))
    return out


MAX_ASPECT_RATIO = 200  # Qwen2-VL's smart_resize raises above this
# Qwen2-VL's patch size. Smaller sides are refused by older processors and mangled by newer ones
# (a 1x3 image is read as 3 channels of one pixel row).
MIN_SIDE = 14


def geometry_reject(width: int, height: int, min_side: int = MIN_SIDE) -> tuple[str, str] | None:
    """(reason, detail) for an image the model's processor would refuse or mangle, else None."""
    if min(width, height) < min_side:
        return "image_too_small", f"{width}x{height} px: each side must be at least {min_side} px"
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        return "extreme_aspect_ratio", f"{width}x{height} px: aspect ratio above {MAX_ASPECT_RATIO}"
    return None


def ambiguous_rows(paths: list[Path | None]) -> set[int]:
    """Rows whose image file is also another row's (ids `1` and `01` both give 000001.jpg)."""
    owners: dict[Path, list[int]] = {}
    for i, p in enumerate(paths):
        if p is not None:
            owners.setdefault(p, []).append(i)
    return {i for rows in owners.values() if len(rows) > 1 for i in rows}
