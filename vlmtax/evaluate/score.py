"""The score stage: read a truth CSV and a submission, report the competition metric and a baseline.

The arithmetic lives in `vlmtax.evaluate.metric`; this module reads files, scores the constant baseline
alongside the model (a score means little without it), prints rich tables and writes JSON and a PNG.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import vlmtax
from vlmtax.data.taxonomy import Taxonomy
from vlmtax.errors import VlmtaxError
from vlmtax.evaluate.metric import MetricResult, compute_metric, constant_prediction, modes_from_frame
from vlmtax.fileio import atomic_path, check_writable, guard_outputs, read_csv, write_json

_WEAKEST = 3  # confusion matrices drawn for this many lowest-scoring attributes
_MAX_LABELS = 12  # beyond this a confusion matrix is unreadable; the rarest labels are pooled


def score(
    truth: str | Path,
    pred: str | Path,
    taxonomy: str | Path | None = None,
    json_out: str | Path | None = None,
    plot: str | Path | None = None,
    baseline: str | Path | None = None,
    console: Console | None = None,
    detail: bool = True,
) -> dict[str, Any]:
    """Score `pred` against `truth`; print tables, optionally write JSON and a PNG; return the report.

    `baseline` is an optional training CSV whose per-attribute modes define the constant baseline;
    without it the taxonomy's modes are used, or, with no taxonomy, the truth's own modes. `detail=False`
    prints the per-category table alone (the JSON and the plot keep every figure): the demo's terminal.
    """
    guard_outputs({"--truth": truth, "--pred": pred, "--taxonomy": taxonomy, "--baseline": baseline},
                  {"--json": json_out, "--plot": plot})
    if json_out is not None and plot is not None and Path(json_out).resolve() == Path(plot).resolve():
        raise VlmtaxError(f"--json and --plot are the same file {json_out}", "pass two different paths")
    for what, path in (("--json", json_out), ("--plot", plot)):
        if path is not None:
            check_writable(path, what, "file")
    truth_df = read_csv(truth, "truth CSV", ["id", "Category"])
    pred_df = read_csv(pred, "prediction CSV", ["id", "Category"])
    tax = Taxonomy.load(taxonomy) if taxonomy is not None else None
    base_df = read_csv(baseline, "baseline training CSV", ["Category"]) if baseline is not None else None
    result, base, source = score_frames(truth_df, pred_df, tax, base_df)
    if baseline is not None:
        source = f"modes of {baseline}"
    report = build_report(result, base, baseline_source=source)
    report.update(truth=str(truth), pred=str(pred), taxonomy=None if taxonomy is None else str(taxonomy))
    # Wide tables when logged to a file: rich draws 80 columns off a terminal, eliding most cells.
    print_report(result, base, console or Console(width=None if sys.stdout.isatty() else 160), detail)
    if json_out is not None:
        write_json(json_out, report)
    if plot is not None:
        draw_plot(result, base, plot)
    return report


def score_frames(truth: pd.DataFrame, pred: pd.DataFrame, taxonomy: Taxonomy | None,
                 baseline: pd.DataFrame | None = None) -> tuple[MetricResult, MetricResult, str]:
    """The model's metric, the constant baseline's (on the same resolved taxonomy) and where its modes came
    from: what `score` prints and `report` draws, so that both show the same numbers."""
    result = compute_metric(truth, pred, taxonomy)
    modes = None
    if baseline is not None:
        modes = modes_from_frame(baseline, result.taxonomy)
        source = "modes of the baseline training CSV"
    else:
        source = "taxonomy modes" if taxonomy is not None else "truth modes"
    # Scored with the resolved taxonomy so that both runs use the same attributes and vocabularies.
    base = compute_metric(truth, constant_prediction(truth, result.taxonomy, modes), result.taxonomy)
    return result, base, source


def build_report(result: MetricResult, base: MetricResult, baseline_source: str = "") -> dict[str, Any]:
    """JSON-ready figures: final, per category, per attribute (each with its baseline), input checks."""
    categories: dict[str, Any] = {}
    for cat in result.categories:
        bcat = base.category(cat.name)
        attributes = {}
        for attr, battr in zip(cat.attributes, bcat.attributes):
            fig = {k: v for k, v in asdict(attr).items() if k != "name"}
            attributes[attr.name] = {**fig, "baseline": battr.score}
        categories[cat.name] = {
            "score": cat.score, "baseline": bcat.score, "rows": cat.rows, "left_out": cat.left_out,
            "attributes": attributes,
        }
    return {
        "vlmtax_version": vlmtax.__version__,
        "final": result.final,
        "baseline": {"final": base.final, "source": baseline_source},
        "categories": categories,
        "checks": asdict(result.checks),
    }


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if pct else f"{x:.4f}"


def print_report(result: MetricResult, base: MetricResult, console: Console, detail: bool = True) -> None:
    for line in result.checks.problems():
        console.print(f"[yellow]check:[/] {escape(line)}")

    cats = Table(title="per category", title_justify="left")
    for name in ("category", "score", "baseline", "rows", "attributes", "left out (no truth)"):
        text = name in ("category", "left out (no truth)")
        cats.add_column(name, justify="left" if text else "right", no_wrap=name == "category")
    for cat in result.categories:
        cats.add_row(escape(cat.name), _fmt(cat.score), _fmt(base.category(cat.name).score), str(cat.rows),
                     str(len(cat.attributes) - len(cat.left_out)), escape(", ".join(cat.left_out)))
    console.print(cats)
    if detail:
        console.print(_attribute_table(result, base))
    console.print(f"[bold]final score {result.final:.4f}[/] (constant baseline {base.final:.4f})")


def _attribute_table(result: MetricResult, base: MetricResult) -> Table:
    attrs = Table(title="per attribute", title_justify="left", caption_justify="left",
                  caption="score: harmonic mean of micro- and macro-F1; oov: share of predictions outside "
                  "the vocabulary")
    for name in ("category", "attribute", "micro", "macro", "score", "baseline", "support", "oov"):
        text = name in ("category", "attribute")
        attrs.add_column(name, justify="left" if text else "right", no_wrap=text)
    for cat in result.categories:
        for attr, battr in zip(cat.attributes, base.category(cat.name).attributes):
            label = attr.name if attr.name == attr.column else f"{attr.name} ({attr.column})"
            attrs.add_row(escape(cat.name), escape(label), _fmt(attr.micro), _fmt(attr.macro), _fmt(attr.score),
                          _fmt(battr.score), str(attr.support), _fmt(attr.out_of_vocab, pct=True))
    return attrs


def _confusion(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Counts over the most frequent labels, the rest pooled, so that the matrix stays legible."""
    labels, counts = np.unique(np.concatenate([y_true, y_pred]).astype(str), return_counts=True)
    order = [str(v) for v in labels[np.argsort(-counts, kind="stable")]]
    keep = order[: _MAX_LABELS - 1] if len(order) > _MAX_LABELS else order
    names = keep + (["(other)"] if len(keep) < len(order) else [])
    index = {v: i for i, v in enumerate(keep)}
    matrix = np.zeros((len(names), len(names)), dtype=int)
    for t, p in zip(y_true, y_pred):
        matrix[index.get(str(t), len(names) - 1), index.get(str(p), len(names) - 1)] += 1
    return names, matrix


def draw_plot(result: MetricResult, base: MetricResult, path: str | Path) -> None:
    """Per-attribute bars (model vs baseline) grouped by category, then the weakest attributes' confusions."""
    # The object API needs no pyplot, so no global backend is switched (Agg renders the PNG).
    from matplotlib.figure import Figure

    bars = [(c.name, a, base.attribute(c.name, a.name)) for c in result.categories for a in c.attributes
            if a.score is not None]
    weakest = sorted(bars, key=lambda b: b[1].score)[:_WEAKEST]
    fig = Figure(figsize=(max(8.0, 0.5 * len(bars) + 3), 10), layout="constrained")
    grid = fig.add_gridspec(2, max(1, len(weakest)), height_ratios=[1, 1.2])
    ax = fig.add_subplot(grid[0, :])

    # A one-slot gap between categories keeps the groups apart without a legend per group.
    x, pos, starts = 0.0, [], []
    for i, (cat, _, _) in enumerate(bars):
        if i == 0 or bars[i - 1][0] != cat:
            x += 0 if i == 0 else 1
            starts.append((x, cat))
        pos.append(x)
        x += 1
    pos_arr = np.array(pos)
    ax.bar(pos_arr - 0.2, [b[1].score for b in bars], width=0.4, label=f"model (final {result.final:.3f})")
    ax.bar(pos_arr + 0.2, [b[2].score or 0.0 for b in bars], width=0.4, color="0.7",
           label=f"constant baseline (final {base.final:.3f})")
    ax.set_xticks(pos_arr, [b[1].name for b in bars], rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("harmonic mean of micro- and macro-F1")
    for start, cat in starts:
        ax.text(start - 0.4, 1.05, cat, fontsize=9, fontweight="bold")
        if start:
            ax.axvline(start - 1, color="0.85", lw=0.8)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=2, fontsize=8, frameon=False)

    for k, (cat, attr, _) in enumerate(weakest):
        names, matrix = _confusion(*result.pairs[(cat, attr.column)])
        cax = fig.add_subplot(grid[1, k])
        rows = matrix.sum(axis=1, keepdims=True)
        shares = matrix / np.maximum(rows, 1)  # row-normalised: colour shows recall, text the counts
        cax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        cax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        cax.set_yticks(range(len(names)), names, fontsize=7)
        cax.set_xlabel("predicted", fontsize=8)
        cax.set_ylabel("true", fontsize=8)
        cax.set_title(f"{cat} / {attr.name}: {attr.score:.3f}", fontsize=9)
        for (i, j), n in np.ndenumerate(matrix):
            if n:
                cax.text(j, i, str(n), ha="center", va="center", fontsize=6,
                         color="white" if shares[i, j] > 0.5 else "black")

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
