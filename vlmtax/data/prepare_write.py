"""The prepare stage's outputs: training records, dataset_info.json, validation truth, the report, and
the rule for replacing an --out folder (only one that prepare wrote for the same CSV).

Everything is written into a temporary folder that replaces --out at the end (fileio.atomic_dir).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vlmtax import __version__
from vlmtax.data.taxonomy import SLOT_COLUMNS, Taxonomy
from vlmtax.errors import VlmtaxError
from vlmtax.fileio import atomic_dir, write_json

PREPARE_META_FILE = "prepare_meta.json"  # not meta.META_FILE (vlmtax_meta.json), which is a run dir's
# Everything prepare writes. A rerun replaces these and nothing else: a folder holding any other file
# is refused rather than replaced, so files the user keeps there are never deleted.
OWN_FILES = frozenset({"train.json", "val.json", "dataset_info.json", "report.json", "taxonomy.json", "val.csv",
                       "rejects.csv", PREPARE_META_FILE})


def check_out_dir(out: Path, fingerprint: dict[str, Any]) -> None:
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


def make_record(fmt: str, prompt: str, answer: str, image: str, meta: dict[str, Any],
                system: str | None = None) -> dict[str, Any]:
    """One training record; the template's system text, if any, as LLaMA-Factory reads it."""
    if fmt == "sharegpt":
        head = [] if system is None else [{"role": "system", "content": system}]
        rec = {"messages": head + [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
    else:
        rec = {"instruction": prompt, "input": "", "output": answer, **({} if system is None else {"system": system})}
    rec["images"] = [image]
    rec.update(meta)
    return rec


def _dataset_info(fmt: str, system: bool) -> dict[str, Any]:
    """LLaMA-Factory's dataset_info.json for the records (an Alpaca `system` column only where records hold one)."""
    if fmt == "sharegpt":
        entry = {
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "images": "images"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                     "system_tag": "system"},
        }
    else:
        columns = {"prompt": "instruction", "query": "input", "response": "output", "images": "images"}
        entry = {"formatting": "alpaca", "columns": {**columns, **({"system": "system"} if system else {})}}
    return {"vlmtax_train": {"file_name": "train.json", **entry}, "vlmtax_val": {"file_name": "val.json", **entry}}


def write_dataset(out: Path, fmt: str, train: list[dict[str, Any]], val: list[dict[str, Any]],
                  report: dict[str, Any], taxonomy: Taxonomy, truth: pd.DataFrame, rejects: pd.DataFrame,
                  meta: dict[str, Any]) -> None:
    """Every output file at once: --out holds all of them or is left as it was."""
    with atomic_dir(out) as tmp:
        info = _dataset_info(fmt, taxonomy.template.system is not None)
        for name, obj in (("train.json", train), ("val.json", val), ("dataset_info.json", info),
                          ("report.json", report)):
            # No indent: json's C encoder only runs without one (7x faster on a 70k-row catalogue).
            write_json(tmp / name, obj, indent=None)
        taxonomy.save(tmp / "taxonomy.json")
        truth_frame(truth, taxonomy).to_csv(tmp / "val.csv", index=False)
        rejects.to_csv(tmp / "rejects.csv", index=False)
        write_json(tmp / PREPARE_META_FILE, meta)


def truth_frame(rows: pd.DataFrame, taxonomy: Taxonomy) -> pd.DataFrame:
    """Validation truth in submission layout: original columns, missing labels empty, filler past len."""
    out = rows[["id", "Category", "len"]].copy()
    for c in SLOT_COLUMNS:
        out[c] = taxonomy.filler
    for name, cat in taxonomy.categories.items():
        sel = (rows["Category"] == name).to_numpy()
        for attr in cat.attributes:
            out.loc[sel, attr.column] = rows.loc[sel, attr.column].fillna("").to_numpy()
    return out


def build_report(frame, taxonomy, reasons, kept, val_rows, filled, missing, n_tokens) -> dict[str, Any]:
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


def write_rejects_only(out: Path, rejects: pd.DataFrame, fingerprint: dict[str, Any]) -> None:
    """Nothing to train on: still leave rejects.csv (and the counts) where the user will look."""
    report = {"rows": len(rejects), "kept": 0, "per_reason": dict(Counter(rejects["reason"]))}
    with atomic_dir(out) as tmp:
        rejects.to_csv(tmp / "rejects.csv", index=False)
        write_json(tmp / "report.json", report)
        write_json(tmp / PREPARE_META_FILE, {**fingerprint, "vlmtax": __version__})


def all_rejected(rejects: pd.DataFrame, out: Path, images: Path, pattern: str) -> VlmtaxError:
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
