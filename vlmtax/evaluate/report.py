"""The report stage: an error-analysis folder for one submission (and others beside it), opened offline.

`vlmtax report` scores each submission with `vlmtax.evaluate.score.score_frames` (the numbers `score --json`
writes, copied verbatim), then derives what a score alone hides from the metric's own scored cells
(`MetricResult.pairs` and `.ids`): per attribute the confusion matrix, per-value precision/recall/F1,
the mistakes with their probabilities, and calibration when `--probs` is given. `vlmtax.evaluate.report_html`
turns these figures into index.html, thumbnails and per-attribute gallery scripts.
"""

from __future__ import annotations

import heapq
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import vlmtax
from vlmtax.data.taxonomy import Taxonomy
from vlmtax.errors import VlmtaxError
from vlmtax.evaluate.metric import MetricResult
from vlmtax.evaluate.score import build_report, score_frames
from vlmtax.fileio import atomic_dir, check_writable, guard_outputs, read_csv
from vlmtax.inference.probs import ProbsFile, read_probs

N_BINS = 10  # reliability diagram bins of equal width over [0, 1]
TOP_K = 3  # probabilities shown per mistake


def report(truth: str | Path, pred: str | Path, out: str | Path, probs: str | Path | None = None,
           images: str | Path | None = None, taxonomy: str | Path | None = None,
           compare: list[str | Path] | tuple = (), labels: list[str] | None = None) -> Path:
    """Write the report folder `out` (index.html, figures.json, thumbs/, gallery/); returns index.html's path.
    `labels` names the submissions (default: their file stems)."""
    from vlmtax.evaluate.report_html import write_folder

    inputs: dict[str, str | Path | None] = {"--truth": truth, "--pred": pred, "--probs": probs,
                                            "--images": images, "--taxonomy": taxonomy}
    inputs.update({f"--compare {c}": c for c in compare})
    guard_outputs(inputs, {"--out": out})
    check_writable(out, "--out", "dir")
    if images is not None and not Path(images).is_dir():
        raise VlmtaxError(f"--images {images} is not a folder", "pass the folder that holds the test images")
    truth_df = read_csv(truth, "truth CSV", ["id", "Category"])
    tax = Taxonomy.load(taxonomy) if taxonomy is not None else None
    paths = [Path(pred), *map(Path, compare)]
    runs = []
    for label, path in zip(labels or run_labels(paths), paths):
        frame = read_csv(path, "prediction CSV", ["id", "Category"])
        check_ids(truth_df, frame, path)
        result, base, source = score_frames(truth_df, frame, tax)
        scored = build_report(result, base, baseline_source=source)
        # The same fields `score --json` adds, so that the two JSONs can be compared whole.
        scored.update(truth=str(truth), pred=str(path), taxonomy=None if taxonomy is None else str(taxonomy))
        runs.append((label, result, scored))
    probs_file = read_probs(probs) if probs is not None else None
    if probs_file is not None and not set(probs_file.index) & _ids(truth_df):
        raise VlmtaxError(f"no id of probabilities file {probs} is in the truth CSV {truth}",
                          "pass the --probs that `predict` wrote for this --pred")
    figures = build_figures(runs, probs_file)
    figures.update(truth=str(truth), pred=str(pred), probs=None if probs is None else str(probs),
                   images=None if images is None else str(images))
    mistakes = {a["key"]: a.pop("mistakes") for a in figures["attributes"]}
    with atomic_dir(out) as tmp:
        write_folder(tmp, figures, mistakes, truth_df, Path(images) if images is not None else None)
    return Path(out) / "index.html"


def run_labels(paths: list[Path]) -> list[str]:
    """Short names for the submissions: file stems, with the parent folder added where stems repeat."""
    stems = [p.stem for p in paths]
    labels = [f"{p.parent.name}/{p.stem}" if stems.count(p.stem) > 1 else p.stem for p in paths]
    return [f"{lab} ({i + 1})" if labels.count(lab) > 1 else lab for i, lab in enumerate(labels)]


def check_ids(truth: pd.DataFrame, pred: pd.DataFrame, path: Path) -> None:
    """A submission that shares no id with the truth is the wrong file, not a bad model: say so."""
    p = _ids(pred)
    if not _ids(truth) & p:
        example = next(iter(sorted(p)), "")
        raise VlmtaxError(f"no id of prediction CSV {path} is in the truth CSV (e.g. {example!r})",
                          "pass the submission predicted for this truth's rows")


def _ids(frame: pd.DataFrame) -> set[str]:
    return set(frame["id"].dropna().astype(str).str.strip())


def points_lost(scored: dict[str, Any]) -> dict[tuple[str, str], float]:
    """Metric points (x100) each attribute costs the final score: final = mean over categories of the mean
    over their scored attributes, so one attribute weighs 1 / (categories x its category's attributes)."""
    cats = {c: v for c, v in scored["categories"].items() if v["score"] is not None}
    out = {}
    for cat, c in cats.items():
        kept = [a for a, v in c["attributes"].items() if v["score"] is not None]
        for a in kept:
            out[(cat, a)] = 100 * (1 - c["attributes"][a]["score"]) / (len(cats) * len(kept))
    return out


def build_figures(runs: list[tuple[str, MetricResult, dict]], probs: ProbsFile | None) -> dict[str, Any]:
    """Everything the page shows: the score reports, the overview sorted by points lost, per attribute."""
    labels = [label for label, _, _ in runs]
    lost = [points_lost(scored) for _, _, scored in runs]
    main = runs[0][2]
    overview = []
    for cat, c in main["categories"].items():
        for name, a in c["attributes"].items():
            if a["score"] is None:
                continue
            scores = [r[2]["categories"][cat]["attributes"][name]["score"] for r in runs]
            best = max(s for s in scores if s is not None)
            overview.append({
                "category": cat, "attribute": name, "support": a["support"], "baseline": a["baseline"],
                "runs": [{"micro": r[2]["categories"][cat]["attributes"][name]["micro"],
                          "macro": r[2]["categories"][cat]["attributes"][name]["macro"], "score": s,
                          "gain": None if s is None or a["baseline"] is None else s - a["baseline"],
                          "points_lost": lost[i].get((cat, name)), "winner": len(runs) > 1 and s == best}
                         for i, (r, s) in enumerate(zip(runs, scores))],
            })
    overview.sort(key=lambda row: -(row["runs"][0]["points_lost"] or 0.0))
    attributes = [attribute_figures(runs[0][1], cat.name, attr, probs)
                  for cat in runs[0][1].categories for attr in cat.attributes if attr.score is not None]
    return {"vlmtax_version": vlmtax.__version__, "labels": labels, "runs": [s for _, _, s in runs],
            "overview": overview, "attributes": attributes}


def confusion(y_true: np.ndarray, y_pred: np.ndarray, order: list[str]) -> tuple[list[str], np.ndarray]:
    """The full confusion matrix over the union of true and predicted labels (the labels macro-F1 averages
    over): vocabulary order first, then labels outside it (e.g. no prediction) in order of first sight."""
    seen = set(y_true.tolist()) | set(y_pred.tolist())
    labels = [v for v in order if v in seen] + [v for v in dict.fromkeys([*y_true, *y_pred]) if v not in order]
    index = {v: i for i, v in enumerate(labels)}
    matrix = np.zeros((len(labels), len(labels)), dtype=int)
    np.add.at(matrix, ([index[v] for v in y_true], [index[v] for v in y_pred]), 1)
    return labels, matrix


def per_value(labels: list[str], matrix: np.ndarray, vocab: set[str]) -> list[dict[str, Any]]:
    """Precision, recall, F1 and support per label; a label never predicted has no precision, one never
    true no recall (both flagged). F1 is the same per-label figure whose mean is the metric's macro-F1."""
    tp, true_n, pred_n = np.diag(matrix), matrix.sum(axis=1), matrix.sum(axis=0)
    return [{"value": v, "support": int(true_n[i]), "predicted": int(pred_n[i]),
             "precision": float(tp[i] / pred_n[i]) if pred_n[i] else None,
             "recall": float(tp[i] / true_n[i]) if true_n[i] else None,
             "f1": float(2 * tp[i] / (true_n[i] + pred_n[i])),
             "never_predicted": bool(pred_n[i] == 0), "never_true": bool(true_n[i] == 0),
             "in_vocabulary": v in vocab} for i, v in enumerate(labels)]


def attribute_figures(result: MetricResult, category: str, attr: Any, probs: ProbsFile | None) -> dict[str, Any]:
    """One attribute's section: confusion, per-value table, missing truth, calibration, mistakes."""
    y_true, y_pred = result.pairs[(category, attr.column)]
    ids = result.ids[(category, attr.column)]
    tax_attr = next(a for a in result.taxonomy.categories[category].attributes if a.column == attr.column)
    labels, matrix = confusion(y_true, y_pred, list(tax_attr.values))
    rows = result.category(category).rows
    dist = probabilities(probs, ids, category, attr.column) if probs is not None else None
    conf = None
    if dist is not None:
        conf = np.array([d.get(p, 0.0) / sum(d.values()) if d is not None else np.nan for d, p in zip(dist, y_pred)])
    wrong = np.flatnonzero(y_true != y_pred)
    index = {v: i for i, v in enumerate(labels)}
    mistakes = [{"id": str(ids[i]), "t": index[y_true[i]], "p": index[y_pred[i]],
                 "conf": None if conf is None or np.isnan(conf[i]) else round(float(conf[i]), 4),
                 "top": None if dist is None or dist[i] is None else top_k(dist[i])}
                for i in wrong]
    return {
        "key": f"{category}/{attr.name}", "category": category, "attribute": attr.name, "column": attr.column,
        "score": attr.score, "micro": attr.micro, "macro": attr.macro, "support": attr.support, "rows": rows,
        "missing_truth": rows - attr.support, "missing_share": (rows - attr.support) / rows if rows else 0.0,
        "labels": labels, "confusion": matrix.tolist(), "per_value": per_value(labels, matrix, set(tax_attr.values)),
        "n_mistakes": len(wrong), "calibration": None if conf is None else calibration(conf, y_true == y_pred),
        "mistakes": mistakes,
    }


def probabilities(probs: ProbsFile, ids: np.ndarray, category: str, column: str) -> list[dict[str, float] | None]:
    """Each scored cell's value -> probability (as the file gives them, not yet normalised), None where the
    file has no such row or attribute (a rejected row, another category). Matched on the column, which
    both routes write, so an inferred taxonomy (attributes named attr_i) matches the runs' names too."""
    out: list[dict[str, float] | None] = []
    for row_id in ids:
        pos = probs.index.get(str(row_id))
        row = probs.rows[pos] if pos is not None else None
        attr = None
        if row is not None and row.reject is None and row.category == category:
            attr = next((a for a in row.attributes.values() if a.get("column") == column), None)
        out.append(attr["probs"] if attr is not None and sum(attr["probs"].values()) > 0 else None)
    return out


def top_k(dist: dict[str, float]) -> list[list[Any]]:
    """The TOP_K most probable values with their probabilities, normalised to sum 1 over the attribute."""
    total = sum(dist.values())
    return [[str(v), round(p / total, 4)] for v, p in heapq.nlargest(TOP_K, dist.items(), key=lambda kv: kv[1])]


def calibration(confidence: np.ndarray, correct: np.ndarray) -> dict[str, Any] | None:
    """Reliability bins and the expected calibration error of the probability given to the predicted value
    (the submission's, so a decision rule other than argmax is judged as it was applied)."""
    known = ~np.isnan(confidence)
    conf, hit = confidence[known], correct[known].astype(float)
    if not len(conf):
        return None
    which = np.minimum((conf * N_BINS).astype(int), N_BINS - 1)
    bins, ece = [], 0.0
    for b in range(N_BINS):
        sel = which == b
        n = int(sel.sum())
        if n:
            gap = abs(hit[sel].mean() - conf[sel].mean())
            ece += n / len(conf) * gap
        bins.append({"lo": b / N_BINS, "hi": (b + 1) / N_BINS, "count": n,
                     "confidence": float(conf[sel].mean()) if n else None,
                     "accuracy": float(hit[sel].mean()) if n else None})
    return {"ece": float(ece), "rows": int(len(conf)), "bins": bins}
