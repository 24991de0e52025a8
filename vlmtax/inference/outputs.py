"""Prediction outputs: decoded records -> the submission's attribute columns, the rejects file and the per-value
probability lines, written atomically (the submission last)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from vlmtax.data.catalogue import REJECT_COLUMNS
from vlmtax.data.taxonomy import SLOT_COLUMNS, Taxonomy
from vlmtax.errors import VlmtaxError
from vlmtax.fileio import atomic_path, write_csv
from vlmtax.inference.rows import Row


def softmax(scores: list[float]) -> list[float]:
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    total = sum(exps)
    return [e / total for e in exps]


def submission_frames(rows: list[Row], done: dict[int, dict[str, Any]], taxonomy: Taxonomy,
                      want_probs: bool) -> tuple[pd.DataFrame, pd.DataFrame, list[dict[str, Any]]]:
    """Submission rows (input order), rejects, probability lines: a row without a decoded record gets its
    category's modes (and its reject reason), an unknown category the filler."""
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
                         dict(zip(a.values, softmax(rec["logliks"][a.name])))} for a in cat.attributes}
            prob_lines.append({"id": row.id, "Category": row.category_text, "attributes": attrs,
                               **({"reject": reject[0]} if reject else {})})
    return (pd.DataFrame(table, columns=["id", "Category", "len", *SLOT_COLUMNS]),
            pd.DataFrame(rejects, columns=REJECT_COLUMNS), prob_lines)


def write_outputs(rows: list[Row], done: dict[int, dict[str, Any]], tax: Taxonomy, out: Path, probs: str | Path | None,
            mode: str, rejects_path: Path, partials: list[Path]) -> dict[str, Any]:
    """Write rejects, probabilities and the submission (atomically, the submission last); the report."""
    table, rejects, prob_lines = submission_frames(rows, done, tax, probs is not None)
    write_csv(rejects_path, rejects)
    if len(rejects) == len(rows):
        for path in partials:
            path.unlink(missing_ok=True)
        top = ", ".join(f"{r} {n}" for r, n in rejects["reason"].value_counts().head(3).items())
        raise VlmtaxError(f"every row was rejected ({top}); reasons per row in {rejects_path}, no submission written",
                          "check --images, --image-pattern and that --csv's categories are in the model's taxonomy")
    if probs is not None:
        with atomic_path(probs) as tmp:
            tmp.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in prob_lines), encoding="utf-8")
    write_csv(out, table)
    predicted = sum(1 for r in done.values() if "values" in r)
    report = {"rows": len(rows), "predicted": predicted, "rejected": len(rejects), "mode": mode, "out": str(out),
              "rejects": str(rejects_path), "probs": str(probs) if probs else None,
              "summary": f"wrote {len(rows)} rows to {out} ({predicted} predicted, {len(rejects)} rejected -> "
                         f"{rejects_path})"}
    if mode == "free":
        report.update(snapped=sum(r.get("snapped", 0) for r in done.values()),
                      slots=sum(len(r["values"]) for r in done.values() if "values" in r))
    return report
