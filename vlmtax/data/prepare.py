"""The prepare stage: catalogue CSV + images + category attributes -> training records and taxonomy.

Outputs (all written into a temporary folder and renamed at the end, so a failed run leaves nothing):
train.json, val.json (ShareGPT or Alpaca), dataset_info.json (LLaMA-Factory), taxonomy.json,
val.csv (validation truth in submission layout), rejects.csv, report.json, prepare_meta.json.
The steps, in order: check inputs, resolve and check images, fill missing labels, count tokens,
split, write (prepare_write.py).
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vlmtax import __version__
from vlmtax.data.answer import check_layout, render_answer, render_prompt
from vlmtax.data.catalogue import (
    DEFAULT_IMAGE_PATTERN,
    MIN_SIDE,
    REJECT_COLUMNS,
    CategoryAttributes,
    ambiguous_rows,
    geometry_reject,
    read_category_attributes,
    row_images,
    undeclared_labels,
)
from vlmtax.data.imagecheck import VERIFY_MODES, cache_file, check_images
from vlmtax.data.prepare_write import (
    all_rejected,
    build_report,
    check_out_dir,
    make_record,
    write_dataset,
    write_rejects_only,
)
from vlmtax.data.taxonomy import DEFAULT_FILLER, SLOT_COLUMNS, Remap, Taxonomy, build_taxonomy, normalise
from vlmtax.data.template import Template, load_template
from vlmtax.errors import VlmtaxError
from vlmtax.fileio import check_writable, file_sha256, guard_outputs, read_csv

FORMATS = ("sharegpt", "alpaca")
MISSING_RULES = ("mode", "mask", "skip")
MAP_UNKNOWN = ("mode", "reject")


@dataclass
class Verdicts:
    """Per input row: why it is rejected (None: kept so far) and the detail shown in rejects.csv."""

    reasons: list[str | None]
    details: list[str]

    def reject(self, i: int, reason: str, detail: str) -> None:
        self.reasons[i], self.details[i] = reason, detail

    def live(self) -> list[int]:
        return [i for i, r in enumerate(self.reasons) if r is None]


def prepare(
    csv: str | Path,
    images: str | Path,
    attributes: str | Path,
    out: str | Path,
    format: str = "sharegpt",
    missing: str = "mode",
    filler: str = DEFAULT_FILLER,
    val_fraction: float = 0.1,
    seed: int = 42,
    model: str | Path | None = None,
    max_pixels: int = 262144,
    min_pixels: int = 3136,
    max_length: int = 2048,
    strict: bool = False,
    image_pattern: str = DEFAULT_IMAGE_PATTERN,
    remaps: list[str] | None = None,
    workers: int | None = None,
    verify_images: str = "fast",
    image_cache: bool = True,
    trust_remote_code: bool = False,
    template: str | Path | None = None,
    map_unknown: str = "reject",
) -> dict[str, Any]:
    """Prepare a catalogue for fine-tuning; returns the report (also written as report.json)."""
    csv, images, out = Path(csv), Path(images), Path(out)
    _check_options(format, missing, verify_images, val_fraction, images)
    if max_pixels < min_pixels:  # 0 or below divides by zero in the token count
        raise VlmtaxError(f"--max-pixels {max_pixels} is below the smallest image budget ({min_pixels} pixels)",
                          f"use at least {min_pixels}, e.g. the default 262144")
    if map_unknown not in MAP_UNKNOWN:
        raise VlmtaxError(f"unknown --map-unknown rule {map_unknown!r}", f"use one of {', '.join(MAP_UNKNOWN)}")
    guard_outputs({"--csv": csv, "--images": images, "--attributes": attributes, "--model": model,
                   "--template": template}, {"--out": out})
    chosen = load_template(template) if template is not None else Template()
    check_writable(out, "--out", "dir")
    filler = normalise(filler) or DEFAULT_FILLER
    frame, spec, declared = _read_inputs(csv, attributes, remaps)
    fingerprint = {"csv": str(csv.resolve()), "csv_sha256": file_sha256(csv)}
    check_out_dir(out, fingerprint)
    processor = _load_processor(model, trust_remote_code) if model is not None else None

    verdicts = Verdicts(_row_rejects(frame, spec.attributes), [""] * len(frame))
    paths, sizes = _resolve_images(frame, images, image_pattern, verdicts, _min_side(processor),
                                   workers=workers, verify=verify_images, image_cache=image_cache)
    unknown = _out_of_schema(frame, spec, verdicts, map_unknown)
    taxonomy = build_taxonomy(frame.iloc[verdicts.live()], spec.attributes, declared, filler, spec.values)
    taxonomy.template = chosen
    check_layout(chosen, taxonomy)
    _check_filler(taxonomy)
    rows = frame.to_dict("records")  # plain dicts: row access by position is far cheaper than .iloc
    _map_to_mode(rows, unknown, taxonomy)
    records_meta, filled_counts = _fill(rows, taxonomy, missing, verdicts)
    n_tokens: dict[int, int] = {}
    if processor is not None:
        from vlmtax.data.chat import count_tokens  # torch: only with --model

        n_tokens = count_tokens(processor, taxonomy, frame, records_meta, sizes, min_pixels, max_pixels)
        records_meta = _apply_budget(records_meta, n_tokens, max_length, verdicts)

    rejects = _rejects(rows, verdicts, spec.attributes, strict)
    if not records_meta:
        write_rejects_only(out, rejects, fingerprint)
        raise all_rejected(rejects, out, images, image_pattern)
    train, val, kept, val_rows = _split(format, rows, taxonomy, records_meta, paths, n_tokens, val_fraction, seed)
    report = build_report(frame, taxonomy, verdicts.reasons, kept, val_rows, filled_counts, missing, n_tokens)
    report.update(train_records=len(train), val_records=len(val), rejected=len(rejects),
                  untrained_categories=_untrained(taxonomy))
    meta = {**fingerprint, "vlmtax": __version__, "format": format, "missing": missing, "filler": filler,
            "val_fraction": val_fraction, "seed": seed, "images": str(images.resolve()),
            "image_pattern": image_pattern, "verify_images": verify_images,
            "model": str(model) if model else None, "template": chosen.name, "map_unknown": map_unknown,
            "max_pixels": max_pixels, "min_pixels": min_pixels, "max_length": max_length}
    write_dataset(out, format, train, val, report, taxonomy, frame.iloc[val_rows], rejects, meta)
    return report


def _untrained(taxonomy: Taxonomy) -> list[str]:
    """Categories no training row labels: said in one warning line (predict rejects their test rows)."""
    untrained = [c.name for c in taxonomy.categories.values() if not c.trained()]
    if untrained:
        one = len(untrained) == 1
        print(f"warning: {len(untrained)} categor{'y' if one else 'ies'} of the attribute file "
              f"{'has' if one else 'have'} no labelled training row ({', '.join(untrained[:5])}"
              f"{', ...' if len(untrained) > 5 else ''}): a model cannot learn them, and predict rejects their "
              "test rows as untrained_category", file=sys.stderr, flush=True)
    return untrained


def _check_options(format: str, missing: str, verify_images: str, val_fraction: float, images: Path) -> None:
    if format not in FORMATS:
        raise VlmtaxError(f"unknown format {format!r}", f"use one of {', '.join(FORMATS)}")
    if missing not in MISSING_RULES:
        raise VlmtaxError(f"unknown missing-label rule {missing!r}", f"use one of {', '.join(MISSING_RULES)}")
    if verify_images not in VERIFY_MODES:
        raise VlmtaxError(f"unknown image check {verify_images!r}", f"use one of {', '.join(VERIFY_MODES)}")
    if not 0 <= val_fraction < 1:
        raise VlmtaxError(f"--val-fraction {val_fraction} is out of range", "use a share in [0, 1)")
    if not images.is_dir():
        raise VlmtaxError(f"image folder not found: {images}", "pass --images DIR holding the catalogue images")


def _read_inputs(csv: Path, attributes: str | Path,
                 remaps: list[str] | None) -> tuple[pd.DataFrame, CategoryAttributes, list[Remap]]:
    """The catalogue (ids, categories and slots normalised), the category attributes, the checked remaps."""
    frame = read_csv(csv, "catalogue CSV", ["id", "Category", "len"])
    spec = read_category_attributes(attributes)
    declared = spec.remaps + [Remap.parse(r) for r in remaps or []]
    seen_remaps: set[tuple[str, frozenset[str]]] = set()
    for r in declared:
        key = (r.category, frozenset((r.a, r.b)))
        if key in seen_remaps:
            raise VlmtaxError(f"remap {r.category}:{r.a}<->{r.b} is declared twice",
                              "declare it once (attribute file or --remap): a second swap undoes the first")
        seen_remaps.add(key)
        if r.category not in spec.attributes:
            raise VlmtaxError(f"remap names unknown category {r.category!r}", "use a category of the attribute file")
    needed = max(len(a) for a in spec.attributes.values())
    absent = [c for c in SLOT_COLUMNS[:needed] if c not in frame.columns]
    if absent:
        raise VlmtaxError(
            f"catalogue CSV {csv} lacks column(s) {', '.join(absent)} that the categories need",
            "add the attr_i columns (empty where not applicable)",
        )

    # Object columns keep None as None (pandas' string dtype would turn it into NaN).
    def column(values: Any) -> pd.Series:
        return pd.Series(list(values), index=frame.index, dtype=object)

    for c in SLOT_COLUMNS:
        frame[c] = column(map(normalise, frame[c]) if c in frame.columns else [None] * len(frame))
    frame["id"] = column(None if pd.isna(v) else str(v).strip() for v in frame["id"])
    frame["Category"] = column(None if pd.isna(v) else " ".join(str(v).split()) for v in frame["Category"])
    return frame, spec, declared


def _resolve_images(frame: pd.DataFrame, images: Path, pattern: str, verdicts: Verdicts, min_side: int, *,
                    workers: int | None, verify: str,
                    image_cache: bool) -> tuple[list[Path | None], dict[int, tuple[int, int]]]:
    """Each surviving row's image path, checked (readable, not truncated, a shape the model takes); sizes."""
    paths: list[Path | None] = [None] * len(frame)
    resolved = row_images(frame, images, pattern, skip=[r is not None for r in verdicts.reasons])
    for i, (path, reject) in enumerate(resolved):
        paths[i] = path
        if reject:
            verdicts.reject(i, *reject)
    _reject_ambiguous(verdicts, paths, frame["id"])
    todo = verdicts.live()
    sizes: dict[int, tuple[int, int]] = {}
    checks = check_images([str(paths[i]) for i in todo], workers=workers, verify=verify,
                          cache=cache_file(images) if image_cache else None)
    for i, (reason, w, h) in zip(todo, checks):
        if reason:
            verdicts.reject(i, reason, str(paths[i]))
        elif (refused := geometry_reject(w, h, min_side)) is not None:
            verdicts.reject(i, refused[0], f"{paths[i]}: {refused[1]}")
        else:
            sizes[i] = (w, h)
    return paths, sizes


def _fill(rows: list[dict[str, Any]], taxonomy: Taxonomy, missing: str,
          verdicts: Verdicts) -> tuple[list[tuple[int, dict[str, str], list[str]]], Counter[str]]:
    """Len-aware filling of slots 1..len (slots past len never enter the answer text): (row, values, masked)
    per kept row, and the count of filled labels per category/attribute."""
    records_meta: list[tuple[int, dict[str, str], list[str]]] = []
    filled_counts: Counter[str] = Counter()
    for i in verdicts.live():
        row = rows[i]
        cat = taxonomy.categories[row["Category"]]
        values: dict[str, str] = {}
        masked: list[str] = []
        for attr in cat.attributes:
            value = row[attr.column]
            if value is None:
                filled_counts[f"{cat.name}/{attr.name}"] += 1
                masked.append(attr.name)
                value = attr.mode
            values[attr.name] = value
        if masked and missing == "skip":
            verdicts.reject(i, "missing_labels", ", ".join(masked))
            continue
        records_meta.append((i, values, masked if missing == "mask" else []))
    return records_meta, filled_counts


def _out_of_schema(frame: pd.DataFrame, spec: CategoryAttributes, verdicts: Verdicts,
                   map_unknown: str) -> list[tuple[int, str, str]]:
    """Labels outside an attribute's declared `values:`: reject the row (`value_not_in_schema`), or clear the
    label (so it counts for nothing) and return the (row, column, attribute) cells to set to the mode."""
    cells = []
    for i, column, attr, value in undeclared_labels(frame, spec, verdicts.live()):
        if map_unknown == "reject":
            if verdicts.reasons[i] is None:
                verdicts.reject(i, "value_not_in_schema", f"{attr}={value!r} is not a declared value")
        else:
            frame.iloc[i, frame.columns.get_loc(column)] = None
            cells.append((i, column, attr))
    return cells


def _map_to_mode(rows: list[dict[str, Any]], cells: list[tuple[int, str, str]], taxonomy: Taxonomy) -> None:
    for i, column, attr in cells:
        cat = taxonomy.categories[rows[i]["Category"]]
        rows[i][column] = next(a.mode for a in cat.attributes if a.name == attr)


def _apply_budget(records_meta: list[tuple[int, dict[str, str], list[str]]], n_tokens: dict[int, int],
                  max_length: int, verdicts: Verdicts) -> list[tuple[int, dict[str, str], list[str]]]:
    """A record that does not fit would have to be truncated through its image tokens: reject it."""
    for i, _, _ in records_meta:
        if n_tokens[i] > max_length:
            verdicts.reject(i, "too_long", f"{n_tokens[i]} tokens > --max-length {max_length}")
    return [m for m in records_meta if verdicts.reasons[m[0]] is None]


def _rejects(rows: list[dict[str, Any]], verdicts: Verdicts, cat_attrs: dict[str, list[str]],
             strict: bool) -> pd.DataFrame:
    rejects = pd.DataFrame(
        [
            {"id": rows[i]["id"], "Category": rows[i]["Category"], "reason": r,
             "detail": _detail(r, rows[i], cat_attrs, verdicts.details[i])}
            for i, r in enumerate(verdicts.reasons) if r is not None
        ],
        columns=REJECT_COLUMNS,
    )
    if strict and len(rejects):
        first = rejects.iloc[0]
        raise VlmtaxError(
            f"--strict: {len(rejects)} row(s) rejected, first id {first['id']}: {first['reason']} {first['detail']}",
            "fix the catalogue or drop --strict to write them to rejects.csv",
        )
    return rejects


def _split(fmt: str, rows: list[dict[str, Any]], taxonomy: Taxonomy,
           records_meta: list[tuple[int, dict[str, str], list[str]]], paths: list[Path | None],
           n_tokens: dict[int, int], val_fraction: float,
           seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[int], list[int]]:
    """Train and validation records, the kept row positions and the validation ones."""
    kept = [m[0] for m in records_meta]
    categories = pd.Series([rows[i]["Category"] for i in kept])
    is_val = dict(zip(kept, _stratified_split(categories, val_fraction, seed)))
    train, val = [], []
    for i, values, masked in records_meta:
        cat = taxonomy.categories[rows[i]["Category"]]
        meta = {"id": rows[i]["id"], "category": cat.name, "attributes": values, "masked": masked}
        if i in n_tokens:
            meta["n_tokens"] = n_tokens[i]
        rec = make_record(fmt, render_prompt(cat, taxonomy.template), render_answer(cat, values, taxonomy.template),
                          str(paths[i]), meta, taxonomy.template.system)
        (val if is_val[i] else train).append(rec)
    return train, val, kept, [i for i in kept if is_val[i]]


def _stratified_split(categories: pd.Series, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation rows: the same share of every category, deterministic for a seed."""
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(categories), dtype=bool)
    for name in sorted(categories.unique()):
        idx = np.flatnonzero((categories == name).to_numpy())
        n_val = int(round(len(idx) * fraction))
        if fraction > 0 and len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)  # every category seen in both splits where possible
        is_val[rng.permutation(idx)[:n_val]] = True
    return is_val


def _row_rejects(frame: pd.DataFrame, cat_attrs: dict[str, list[str]]) -> list[str | None]:
    """Per-row reject reason for structural problems (before images are looked at)."""
    reasons: list[str | None] = []
    seen: set[str] = set()
    for row_id, cat, length in zip(frame["id"], frame["Category"], frame["len"]):
        if row_id is None or pd.isna(row_id) or not str(row_id).strip():
            reasons.append("bad_id")
        elif row_id in seen:
            reasons.append("duplicate_id")
        elif cat not in cat_attrs:
            reasons.append("unknown_category")
        elif str(length).strip() != str(len(cat_attrs[cat])):
            reasons.append("len_mismatch")
        else:
            reasons.append(None)
        if row_id is not None and not pd.isna(row_id):
            seen.add(row_id)
    return reasons


def _detail(reason: str, row: dict[str, Any], cat_attrs: dict[str, list[str]], extra: str = "") -> str:
    if reason == "len_mismatch":
        return f"len={row['len']} but {row['Category']} has {len(cat_attrs[row['Category']])} attributes"
    if reason == "unknown_category":
        return f"{row['Category']!r} is not in the category-attribute file"
    if reason == "duplicate_id":
        return "the id appears earlier in the file; the first row is kept"
    return extra


def _load_processor(model: str | Path, trust_remote_code: bool) -> Any:
    from vlmtax.models.loading import load_processor

    if not Path(model).exists():
        raise VlmtaxError(f"--model {model} does not exist", "pass a local model folder (no hub access here)")
    return load_processor(model, padding_side=None, trust_remote_code=trust_remote_code)


def _min_side(processor: Any) -> int:
    """The model processor's patch size; Qwen2-VL's without --model."""
    patch = getattr(getattr(processor, "image_processor", None), "patch_size", None)
    return patch if isinstance(patch, int) else MIN_SIDE


def _reject_ambiguous(verdicts: Verdicts, paths: list[Path | None], ids: pd.Series) -> None:
    """Rows whose ids name one image file (`1` and `01`) would train on each other's picture: reject all."""
    live = [p if r is None else None for p, r in zip(paths, verdicts.reasons)]
    for i in ambiguous_rows(live):
        others = [str(ids.iat[j]) for j, p in enumerate(live) if p == live[i] and j != i]
        verdicts.reject(i, "ambiguous_image", f"{live[i]} is also the image of id {', '.join(others[:3])}")


def _check_filler(taxonomy: Taxonomy) -> None:
    """A filler that is also a real label would make scoring drop that label's true rows."""
    for cat in taxonomy.categories.values():
        for attr in cat.attributes:
            if taxonomy.filler in attr.counts:
                raise VlmtaxError(f"--filler {taxonomy.filler!r} is a real value of {cat.name}/{attr.name}",
                                  "pass a --filler that no attribute uses (the default is 'dummy')")
