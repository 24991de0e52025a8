"""The prepare stage: catalogue CSV + images + category attributes -> training records and taxonomy.

Outputs (all written into a temporary folder and renamed at the end, so a failed run leaves nothing):
train.json, val.json (ShareGPT or Alpaca), dataset_info.json (LLaMA-Factory), taxonomy.json,
val.csv (validation truth in submission layout), rejects.csv, report.json, prepare_meta.json.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vlmtax import __version__
from vlmtax.answer import answer_segments, render_answer, render_prompt
from vlmtax.catalogue import (
    DEFAULT_IMAGE_PATTERN,
    MIN_SIDE,
    REJECT_COLUMNS,
    ambiguous_rows,
    geometry_reject,
    image_path,
    read_category_attributes,
)
from vlmtax.errors import VlmtaxError
from vlmtax.fileio import atomic_dir, check_writable, file_sha256, guard_outputs, read_csv, write_json
from vlmtax.imagecheck import VERIFY_MODES, cache_file, check_images
from vlmtax.taxonomy import DEFAULT_FILLER, SLOT_COLUMNS, Remap, Taxonomy, build_taxonomy, normalise

FORMATS = ("sharegpt", "alpaca")
MISSING_RULES = ("mode", "mask", "skip")
PREPARE_META_FILE = "prepare_meta.json"  # not meta.META_FILE (vlmtax_meta.json), which is a run dir's
# Everything prepare writes. A rerun replaces these and nothing else: a folder holding any other file
# is refused rather than replaced, so files the user keeps there are never deleted.
OWN_FILES = frozenset({"train.json", "val.json", "dataset_info.json", "report.json", "taxonomy.json", "val.csv",
                       "rejects.csv", PREPARE_META_FILE})


def _check_out_dir(out: Path, fingerprint: dict[str, Any]) -> None:
    """Refuse to replace a folder that holds something other than this same dataset."""
    if not out.exists():
        return
    if not out.is_dir():
        raise VlmtaxError(f"output path {out} is a file", "pass a folder for --out")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    foreign = [name for name in entries if name not in OWN_FILES]
    if foreign:
        raise VlmtaxError(
            f"output folder {out} holds files prepare did not write ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); replacing the folder would delete them",
            "choose a new or empty --out folder")
    meta = out / PREPARE_META_FILE
    try:
        old = json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError):
        raise VlmtaxError(
            f"output folder {out} already holds files that are not a vlmtax dataset", "choose an empty --out folder"
        ) from None
    if old.get("csv_sha256") != fingerprint["csv_sha256"] or old.get("csv") != fingerprint["csv"]:
        raise VlmtaxError(
            f"output folder {out} already holds a different dataset (prepared from {old.get('csv')})",
            "choose another --out folder or delete it",
        )


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


def _record(fmt: str, prompt: str, answer: str, image: str, meta: dict[str, Any]) -> dict[str, Any]:
    if fmt == "sharegpt":
        rec = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
    else:
        rec = {"instruction": prompt, "input": "", "output": answer}
    rec["images"] = [image]
    rec.update(meta)
    return rec


def _dataset_info(fmt: str) -> dict[str, Any]:
    if fmt == "sharegpt":
        entry = {
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "images": "images"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
        }
    else:
        entry = {"formatting": "alpaca", "columns": {"prompt": "instruction", "query": "input", "response": "output",
                                                    "images": "images"}}
    return {"vlmtax_train": {"file_name": "train.json", **entry}, "vlmtax_val": {"file_name": "val.json", **entry}}


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
) -> dict[str, Any]:
    """Prepare a catalogue for fine-tuning; returns the report (also written as report.json)."""
    csv, images, out = Path(csv), Path(images), Path(out)
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
    guard_outputs({"--csv": csv, "--images": images, "--attributes": attributes, "--model": model}, {"--out": out})
    check_writable(out, "--out", "dir")
    filler = normalise(filler) or DEFAULT_FILLER

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

    fingerprint = {"csv": str(csv.resolve()), "csv_sha256": file_sha256(csv)}
    _check_out_dir(out, fingerprint)
    processor = _load_processor(model, trust_remote_code) if model is not None else None

    # Structural checks, then image checks on the rows that survive them.
    reasons = _row_rejects(frame, spec.attributes)
    details = [""] * len(frame)
    paths: list[Path | None] = [None] * len(frame)
    rel_col = frame["image"] if "image" in frame.columns else pd.Series([None] * len(frame))
    for i, (row_id, rel) in enumerate(zip(frame["id"], rel_col)):
        if reasons[i] is None:
            rel = None if rel is None or pd.isna(rel) or not str(rel).strip() else str(rel).strip()
            paths[i], reasons[i] = image_path(images, row_id, rel, image_pattern)
            if reasons[i]:
                details[i] = str(rel if rel is not None else image_pattern)
    _reject_ambiguous(reasons, details, paths, frame["id"])
    todo = [i for i, r in enumerate(reasons) if r is None]
    sizes: dict[int, tuple[int, int]] = {}
    min_side = _min_side(processor)
    checks = check_images([str(paths[i]) for i in todo], workers=workers, verify=verify_images,
                          cache=cache_file(images) if image_cache else None)
    for i, (reason, w, h) in zip(todo, checks):
        if reason:
            reasons[i], details[i] = reason, str(paths[i])
        elif (refused := geometry_reject(w, h, min_side)) is not None:
            reasons[i], details[i] = refused[0], f"{paths[i]}: {refused[1]}"
        else:
            sizes[i] = (w, h)

    ok = [i for i, r in enumerate(reasons) if r is None]
    taxonomy = build_taxonomy(frame.iloc[ok], spec.attributes, declared, filler)
    _check_filler(taxonomy)
    rows = frame.to_dict("records")  # plain dicts: row access by position is far cheaper than .iloc

    # Len-aware filling of slots 1..len; slots past len never enter the answer text.
    records_meta: list[tuple[int, dict[str, str], list[str]]] = []
    filled_counts: Counter[str] = Counter()
    for i in ok:
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
            reasons[i], details[i] = "missing_labels", ", ".join(masked)
            continue
        records_meta.append((i, values, masked if missing == "mask" else []))

    # Token budget: a record that does not fit would have to be truncated through its image tokens.
    n_tokens: dict[int, int] = {}
    if processor is not None:
        n_tokens = _count_tokens(processor, taxonomy, frame, records_meta, sizes, min_pixels, max_pixels)
        for i, _, _ in records_meta:
            if n_tokens[i] > max_length:
                reasons[i], details[i] = "too_long", f"{n_tokens[i]} tokens > --max-length {max_length}"
        records_meta = [m for m in records_meta if reasons[m[0]] is None]

    rejects = pd.DataFrame(
        [
            {"id": rows[i]["id"], "Category": rows[i]["Category"], "reason": r,
             "detail": _detail(r, rows[i], spec.attributes, details[i])}
            for i, r in enumerate(reasons) if r is not None
        ],
        columns=REJECT_COLUMNS,
    )
    if strict and len(rejects):
        first = rejects.iloc[0]
        raise VlmtaxError(
            f"--strict: {len(rejects)} row(s) rejected, first id {first['id']}: {first['reason']} {first['detail']}",
            "fix the catalogue or drop --strict to write them to rejects.csv",
        )
    if not records_meta:
        _write_rejects_only(out, rejects, fingerprint)
        raise _all_rejected(rejects, out, images, image_pattern)

    kept = [m[0] for m in records_meta]
    is_val = dict(zip(kept, _stratified_split(frame["Category"].iloc[kept].reset_index(drop=True), val_fraction,
                                                seed)))
    train, val = [], []
    for i, values, masked in records_meta:
        cat = taxonomy.categories[rows[i]["Category"]]
        meta = {"id": rows[i]["id"], "category": cat.name, "attributes": values, "masked": masked}
        if i in n_tokens:
            meta["n_tokens"] = n_tokens[i]
        rec = _record(format, render_prompt(cat), render_answer(cat, values), str(paths[i]), meta)
        (val if is_val[i] else train).append(rec)

    val_rows = [i for i in kept if is_val[i]]
    report = _report(frame, taxonomy, reasons, kept, val_rows, filled_counts, missing, n_tokens)
    report.update(train_records=len(train), val_records=len(val), rejected=len(rejects))
    with atomic_dir(out) as tmp:
        for name, obj in (("train.json", train), ("val.json", val), ("dataset_info.json", _dataset_info(format)),
                          ("report.json", report)):
            # No indent: json's C encoder only runs without one (7x faster on a 70k-row catalogue).
            write_json(tmp / name, obj, indent=None)
        taxonomy.save(tmp / "taxonomy.json")
        _truth_frame(frame.iloc[val_rows], taxonomy).to_csv(tmp / "val.csv", index=False)
        rejects.to_csv(tmp / "rejects.csv", index=False)
        meta = {**fingerprint, "vlmtax": __version__, "format": format, "missing": missing, "filler": filler,
                "val_fraction": val_fraction, "seed": seed, "images": str(images.resolve()),
                "image_pattern": image_pattern, "verify_images": verify_images,
                "model": str(model) if model else None,
                "max_pixels": max_pixels, "min_pixels": min_pixels, "max_length": max_length}
        write_json(tmp / PREPARE_META_FILE, meta)
    return report


def _truth_frame(rows: pd.DataFrame, taxonomy: Taxonomy) -> pd.DataFrame:
    """Validation truth in submission layout: original columns, missing labels empty, filler past len."""
    out = rows[["id", "Category", "len"]].copy()
    for c in SLOT_COLUMNS:
        out[c] = taxonomy.filler
    for name, cat in taxonomy.categories.items():
        sel = (rows["Category"] == name).to_numpy()
        for attr in cat.attributes:
            out.loc[sel, attr.column] = rows.loc[sel, attr.column].fillna("").to_numpy()
    return out


def _report(frame, taxonomy, reasons, kept, val_rows, filled, missing, n_tokens) -> dict[str, Any]:
    kept_cats = Counter(frame["Category"].iloc[kept])
    val_cats = Counter(frame["Category"].iloc[val_rows])
    per_reason = Counter(r for r in reasons if r is not None)
    per_category = {
        name: {"rows": int((frame["Category"] == name).sum()), "kept": kept_cats.get(name, 0),
               "val": val_cats.get(name, 0),
               "rejected": dict(Counter(r for r, c in zip(reasons, frame["Category"]) if r and c == name))}
        for name in taxonomy.categories
    }
    per_attribute = {
        f"{name}/{a.name}": {"column": a.column, "values": len(a.values), "mode": a.mode,
                             "missing": filled.get(f"{name}/{a.name}", 0)}
        for name, cat in taxonomy.categories.items() for a in cat.attributes
    }
    report: dict[str, Any] = {"rows": len(frame), "kept": len(kept), "missing_rule": missing,
                              "per_reason": dict(per_reason), "per_category": per_category,
                              "per_attribute": per_attribute}
    if n_tokens:
        counts = np.array([n_tokens[i] for i in kept])
        report["tokens"] = {"min": int(counts.min()), "max": int(counts.max()), "mean": float(counts.mean())}
    return report


def _load_processor(model: str | Path, trust_remote_code: bool) -> Any:
    from vlmtax.loading import load_processor

    if not Path(model).exists():
        raise VlmtaxError(f"--model {model} does not exist", "pass a local model folder (no hub access here)")
    return load_processor(model, padding_side=None, trust_remote_code=trust_remote_code)


def _count_tokens(processor, taxonomy, frame, records_meta, sizes, min_pixels, max_pixels) -> dict[int, int]:
    from vlmtax.chat import TokenCounter

    counter = TokenCounter(processor, min_pixels, max_pixels)
    counts: dict[int, int] = {}
    for i, values, _ in records_meta:
        cat = taxonomy.categories[frame["Category"].iat[i]]
        counts[i] = counter.count(render_prompt(cat), answer_segments(cat, values), *sizes[i])
    return counts


def _min_side(processor: Any) -> int:
    """The model processor's patch size; Qwen2-VL's without --model."""
    patch = getattr(getattr(processor, "image_processor", None), "patch_size", None)
    return patch if isinstance(patch, int) else MIN_SIDE


def _reject_ambiguous(reasons: list[str | None], details: list[str], paths: list[Path | None], ids: pd.Series) -> None:
    """Rows whose ids name one image file (`1` and `01`) would train on each other's picture: reject all."""
    live = [p if r is None else None for p, r in zip(paths, reasons)]
    for i in ambiguous_rows(live):
        others = [str(ids.iat[j]) for j, p in enumerate(live) if p == live[i] and j != i]
        reasons[i], details[i] = "ambiguous_image", f"{live[i]} is also the image of id {', '.join(others[:3])}"


def _check_filler(taxonomy: Taxonomy) -> None:
    """A filler that is also a real label would make scoring drop that label's true rows."""
    for cat in taxonomy.categories.values():
        for attr in cat.attributes:
            if taxonomy.filler in attr.counts:
                raise VlmtaxError(f"--filler {taxonomy.filler!r} is a real value of {cat.name}/{attr.name}",
                                  "pass a --filler that no attribute uses (the default is 'dummy')")


def _write_rejects_only(out: Path, rejects: pd.DataFrame, fingerprint: dict[str, Any]) -> None:
    """Nothing to train on: still leave rejects.csv (and the counts) where the user will look."""
    report = {"rows": len(rejects), "kept": 0, "per_reason": dict(Counter(rejects["reason"]))}
    with atomic_dir(out) as tmp:
        rejects.to_csv(tmp / "rejects.csv", index=False)
        write_json(tmp / "report.json", report)
        write_json(tmp / PREPARE_META_FILE, {**fingerprint, "vlmtax": __version__})


def _all_rejected(rejects: pd.DataFrame, out: Path, images: Path, pattern: str) -> VlmtaxError:
    counts = Counter(rejects["reason"]).most_common()
    top = ", ".join(f"{reason} {n}" for reason, n in counts[:3])
    reason = counts[0][0]
    if reason in ("missing_image", "image_outside_folder", "ambiguous_image", "bad_id"):
        first = rejects.loc[rejects["reason"] == reason, "detail"].iat[0]
        fix = f"check --images {images} and --image-pattern {pattern!r} (first {reason}: {first})"
    elif reason in ("unknown_category", "len_mismatch"):
        fix = ("check that --attributes belongs to this catalogue, and the CSV for shifted columns "
               "(an unquoted comma in a value)")
    else:
        fix = "see the reasons per row"
    return VlmtaxError(f"every row was rejected ({top}); reasons per row in {out / 'rejects.csv'}", fix)
