"""The predict stage: test CSV + images + model -> submission CSV (+ per-value probabilities, rejects).

Rows are planned up front (known category? image there?) and cut into fixed batches, sorted by category
and image size so that padding and the candidate blocks of constrained decoding line up. Each decoded
batch is appended to `<out>.partial` (JSONL; first line a fingerprint of the arguments). A rerun with
the same arguments keeps those rows and decodes only the batches still missing, each with exactly its
original rows, so the resumed CSV is identical to an uninterrupted run's. The final files are written
atomically, then the partial file is removed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from vlmtax.catalogue import DEFAULT_IMAGE_PATTERN, image_path
from vlmtax.errors import VlmtaxError
from vlmtax.fileio import atomic_path, file_sha256, read_csv, write_csv
from vlmtax.progress import progress_iter
from vlmtax.taxonomy import SLOT_COLUMNS, Category, Taxonomy

MODES = ("constrained", "free")
REJECT_COLUMNS = ["id", "Category", "reason", "detail"]


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
    rel_col = frame["image"] if "image" in frame.columns else [None] * len(frame)
    rows = []
    for i, (raw_id, raw_cat, rel) in enumerate(zip(frame["id"], frame["Category"], rel_col)):
        row_id = "" if pd.isna(raw_id) else str(raw_id).strip()
        cat_text = "" if pd.isna(raw_cat) else " ".join(str(raw_cat).split())
        row = Row(i, row_id, cat_text, taxonomy.categories.get(cat_text), None)
        rows.append(row)
        if row.category is None:
            row.reject = ("unknown_category", f"{cat_text!r} is not in the taxonomy")
            continue
        rel = None if rel is None or pd.isna(rel) or not str(rel).strip() else str(rel).strip()
        row.image, reason = image_path(images, row_id, rel, image_pattern)
        if reason:
            row.reject = (reason, str(rel if rel is not None else image_pattern))
        elif not row.image.is_file():
            row.reject = ("missing_image", str(row.image))
        else:
            try:
                with Image.open(row.image) as img:
                    row.pixels = img.size[0] * img.size[1]
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                row.reject = ("unreadable_image", f"{row.image}: {exc}")
    return rows


def make_batches(rows: list[Row], batch_size: int) -> list[list[Row]]:
    todo = sorted((r for r in rows if r.reject is None), key=lambda r: (r.category.name, r.pixels, r.index))
    return [todo[i: i + batch_size] for i in range(0, len(todo), batch_size)]


class Partial:
    """Rows done so far, one JSON object a line after a fingerprint line; a torn last line is dropped."""

    def __init__(self, path: Path, fingerprint: dict[str, Any]):
        self.path, self.fingerprint = path, fingerprint

    def load(self) -> dict[int, dict[str, Any]]:
        done: dict[int, dict[str, Any]] = {}
        if self.path.is_file():
            lines = self.path.read_text(encoding="utf-8").split("\n")
            try:
                header = json.loads(lines[0])
            except json.JSONDecodeError:
                header = {}
            same = header.get("fingerprint") == self.fingerprint
            if not same and any(line.strip() for line in lines[1:]):
                raise VlmtaxError(f"{self.path} holds an interrupted prediction made with other arguments",
                                  "rerun with the same arguments to resume it, or delete it to start over")
            for line in lines[1:] if same else []:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    break  # killed mid-write: this row and any after it are decoded again
                done[rec["row"]] = rec
        with atomic_path(self.path) as tmp:  # rewrite clean, so appends never land on a torn line
            tmp.write_text("".join(json.dumps(x) + "\n" for x in [{"fingerprint": self.fingerprint},
                                                                   *done.values()]), encoding="utf-8")
        return done

    def append(self, records: list[dict[str, Any]]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())


def _decode_batch(decoder: Any, batch: list[Row], mode: str, want_probs: bool) -> list[dict[str, Any]]:
    from vlmtax.decoding import free_decode

    records, images, ok = [], [], []
    for row in batch:
        try:
            with Image.open(row.image) as img:
                images.append(img.convert("RGB"))
            ok.append(row)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            records.append({"row": row.index, "reject": ["unreadable_image", f"{row.image}: {exc}"]})
    if ok:
        categories = [r.category for r in ok]
        results = decoder.decode(images, categories) if mode == "constrained" else \
            free_decode(decoder.model, decoder.processor, images, categories, decoder.plans)
        for row, res in zip(ok, results):
            rec: dict[str, Any] = {"row": row.index, "values": res.values, "snapped": res.snapped}
            if want_probs:
                rec["logliks"] = res.logliks
                if getattr(res, "probs", None) is not None:  # classify runs give probabilities directly
                    rec["probs"] = res.probs
            records.append(rec)
    return records


def _softmax(scores: list[float]) -> list[float]:
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    total = sum(exps)
    return [e / total for e in exps]


def _outputs(rows: list[Row], done: dict[int, dict[str, Any]], taxonomy: Taxonomy, want_probs: bool):
    """Submission rows (input order), rejects, probability lines."""
    table, rejects, prob_lines = [], [], []
    for row in rows:
        rec = done.get(row.index, {})
        reject = row.reject or (tuple(rec["reject"]) if "reject" in rec else None)
        cat = row.category
        line = dict.fromkeys(SLOT_COLUMNS, taxonomy.filler)
        if cat is not None:
            values = rec.get("values") or {a.name: a.mode for a in cat.attributes}
            line.update({a.column: values[a.name] for a in cat.attributes})
        table.append({"id": row.id, "Category": row.category_text, "len": cat.len if cat else 0, **line})
        if reject:
            rejects.append({"id": row.id, "Category": row.category_text, "reason": reject[0], "detail": reject[1]})
        if want_probs:
            attrs = {} if reject or cat is None else {
                a.name: {"column": a.column, "value": rec["values"][a.name],
                         "probs": rec["probs"][a.name] if "probs" in rec else
                         dict(zip(a.values, _softmax(rec["logliks"][a.name])))} for a in cat.attributes}
            prob_lines.append({"id": row.id, "Category": row.category_text, "attributes": attrs,
                               **({"reject": reject[0]} if reject else {})})
    return (pd.DataFrame(table, columns=["id", "Category", "len", *SLOT_COLUMNS]),
            pd.DataFrame(rejects, columns=REJECT_COLUMNS), prob_lines)


def predict(model: str | Path, csv: str | Path, images: str | Path, out: str | Path,
            taxonomy: str | Path | None = None, batch_size: int = 8, probs: str | Path | None = None,
            mode: str = "constrained", image_pattern: str = DEFAULT_IMAGE_PATTERN, dtype: str = "auto",
            device: str | None = None, on_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write the submission CSV (and `<out stem>.rejects.csv`, and `probs` if given); returns a summary.

    `on_batch(n)` is called after the n-th decoded batch has been saved (progress hooks, tests).
    """
    from vlmtax.loading import inspect_model_dir, load_taxonomy

    csv, images, out = Path(csv), Path(images), Path(out)
    if mode not in MODES:
        raise VlmtaxError(f"unknown mode {mode!r}", f"use one of {', '.join(MODES)}")
    if batch_size < 1:
        raise VlmtaxError(f"--batch-size {batch_size} is not positive", "use 1 or more")
    if probs is not None and mode != "constrained":
        raise VlmtaxError("--probs needs --mode constrained", "drop --probs or use constrained decoding")
    if out.is_dir() or (probs is not None and Path(probs).resolve() == out.resolve()):
        raise VlmtaxError(f"--out {out} is a folder or the same file as --probs", "pass a CSV file path")
    if not images.is_dir():
        raise VlmtaxError(f"image folder not found: {images}", "pass --images DIR holding the test images")
    from vlmtax.heads_predict import heads_run_root

    heads_root = heads_run_root(model)
    if heads_root is not None and mode != "constrained":
        raise VlmtaxError(f"{model} is a classify run: its heads only ever give allowed values",
                          "drop --mode free (classify runs predict with the default mode)")
    model_dir = inspect_model_dir(model) if heads_root is None else None
    tax = load_taxonomy(model, taxonomy)
    frame = read_csv(csv, "test CSV", ["id", "Category"])
    if csv.resolve() == out.resolve():
        raise VlmtaxError("--out would overwrite the test CSV", "pass another --out path")

    rows = plan_rows(frame, tax, images, image_pattern)
    batches = make_batches(rows, batch_size)
    fingerprint = {"csv_sha256": file_sha256(csv), "model": str(Path(model).resolve()), "images": str(images.resolve()),
                   "taxonomy_sha256": hashlib.sha256(tax.model_dump_json().encode()).hexdigest(), "mode": mode,
                   "batch_size": batch_size, "image_pattern": image_pattern, "probs": probs is not None,
                   "dtype": dtype}
    partial = Partial(out.with_name(out.name + ".partial"), fingerprint)
    done = partial.load()
    pending = [(n, b) for n, b in enumerate(batches) if any(r.index not in done for r in b)]
    decoder, started, todo = None, time.perf_counter(), 0
    if pending and heads_root is not None:
        from vlmtax.heads_predict import HeadsPredictor

        decoder = HeadsPredictor(model, tax, device)
    elif pending:
        from vlmtax.decoding import ConstrainedDecoder
        from vlmtax.loading import load_for_inference

        loaded, processor, _ = load_for_inference(model_dir.path, dtype=dtype, device=device)
        decoder = ConstrainedDecoder(loaded, processor)
    if pending:

        def run() -> Iterator[dict[str, Any]]:
            for n, batch in pending:
                fresh = [r for r in _decode_batch(decoder, batch, mode, probs is not None) if r["row"] not in done]
                partial.append(fresh)
                done.update((r["row"], r) for r in fresh)
                if on_batch is not None:
                    on_batch(n)
                yield from fresh

        todo = sum(r.index not in done for _, b in pending for r in b)
        for _ in progress_iter(run(), total=todo, desc=f"predicting ({mode})", unit="rows"):
            pass
    seconds = time.perf_counter() - started

    table, rejects, prob_lines = _outputs(rows, done, tax, probs is not None)
    rejects_path = out.with_name(out.stem + ".rejects.csv")
    write_csv(rejects_path, rejects)
    if probs is not None:
        with atomic_path(probs) as tmp:
            tmp.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in prob_lines), encoding="utf-8")
    write_csv(out, table)
    partial.path.unlink(missing_ok=True)

    predicted = sum(1 for r in done.values() if "values" in r)
    snapped = sum(r.get("snapped", 0) for r in done.values())
    slots = sum(len(r["values"]) for r in done.values() if "values" in r)
    report = {"rows": len(rows), "predicted": predicted, "rejected": len(rejects), "mode": mode, "out": str(out),
              "rejects": str(rejects_path), "probs": str(probs) if probs else None, "seconds": round(seconds, 3),
              "rows_per_s": round(todo / seconds, 2) if todo else None,
              "forward_calls": decoder.forward_calls if decoder else 0}
    if mode == "free":
        report.update(snapped=snapped, slots=slots)
    summary = f"wrote {len(rows)} rows to {out} ({predicted} predicted, {len(rejects)} rejected -> {rejects_path})"
    if todo:
        summary += f"; decoded {todo} rows at {todo / seconds:.1f} rows/s"
    if mode == "free":
        summary += f"; {snapped} of {slots} generated values were not allowed and were snapped"
    print(summary, flush=True)
    return report

