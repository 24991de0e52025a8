"""The score stage's metric: the official Meesho visual-taxonomy F1, computed from two frames.

Pure (no files, no printing) so that `vlmtax score`, the demo and the tests share one implementation.
For each (category, attribute), over the rows of that category whose true value is present: micro-F1
and macro-F1 (macro over the union of true and predicted labels, as scikit-learn does), attribute
score = their harmonic mean; category score = mean over its attributes; final = mean over categories.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from vlmtax.data.taxonomy import DEFAULT_FILLER, N_SLOTS, SLOT_COLUMNS, Taxonomy, build_taxonomy, normalise
from vlmtax.errors import VlmtaxError

# Stands in for a missing row, a wrong-category row or an empty cell. Upper case on purpose:
# normalise() lower-cases, so no real value can ever equal it, and as a label of its own it lowers
# macro-F1 exactly like any other value outside the vocabulary.
NO_PREDICTION = "<NO PREDICTION>"
_EXAMPLES = 5


@dataclass
class AttributeScore:
    name: str
    column: str
    micro: float
    macro: float
    score: float | None  # None: the truth holds no value for it, so it is left out of the category mean
    support: int
    out_of_vocab: float | None  # share of real (non-empty) predictions outside the vocabulary
    no_prediction: int  # scored cells whose row was missing, in the wrong category, or empty


@dataclass
class CategoryScore:
    name: str
    rows: int
    score: float | None
    attributes: list[AttributeScore]

    @property
    def left_out(self) -> list[str]:
        return [a.name for a in self.attributes if a.score is None]


@dataclass
class InputChecks:
    truth_rows: int = 0
    pred_rows: int = 0
    missing_ids: int = 0
    extra_ids: int = 0
    duplicate_truth_ids: int = 0
    duplicate_pred_ids: int = 0
    category_mismatch: int = 0
    empty_cells: int = 0
    out_of_vocab_cells: int = 0
    rows_without_id: int = 0
    truth_rows_without_category: int = 0
    categories_not_in_taxonomy: list[str] = field(default_factory=list)
    categories_without_rows: list[str] = field(default_factory=list)
    inconsistent_len: list[str] = field(default_factory=list)
    examples: dict[str, list[str]] = field(default_factory=dict)  # a few ids per problem, to act on

    def problems(self) -> list[str]:
        """One plain sentence per problem found (with example ids); empty when the inputs are clean."""
        lines = {
            "missing_ids": (self.missing_ids, f"{self.missing_ids} truth id(s) missing from the prediction, "
                            "counted as wrong"),
            "extra_ids": (self.extra_ids, f"{self.extra_ids} prediction id(s) not in the truth, ignored"),
            "duplicate_truth_ids": (self.duplicate_truth_ids, f"{self.duplicate_truth_ids} duplicate id(s) in "
                                    "the truth, first kept"),
            "duplicate_pred_ids": (self.duplicate_pred_ids, f"{self.duplicate_pred_ids} duplicate id(s) in the "
                                   "prediction, first kept"),
            "category_mismatch": (self.category_mismatch, f"{self.category_mismatch} row(s) whose predicted "
                                  "Category differs from the truth's, scored under the truth's and counted as wrong"),
            "empty_cells": (self.empty_cells, f"{self.empty_cells} empty prediction cell(s) where a label "
                            "exists, counted as wrong"),
            "out_of_vocab_cells": (self.out_of_vocab_cells, f"{self.out_of_vocab_cells} predicted value(s) "
                                   "outside the vocabulary"),
            "rows_without_id": (self.rows_without_id, f"{self.rows_without_id} row(s) without an id, ignored"),
            "truth_rows_without_category": (self.truth_rows_without_category, f"{self.truth_rows_without_category}"
                                            " truth row(s) without a Category, ignored"),
            "categories_not_in_taxonomy": (self.categories_not_in_taxonomy, "categories not in the taxonomy, "
                                           f"inferred from the truth: {', '.join(self.categories_not_in_taxonomy)}"),
            "categories_without_rows": (self.categories_without_rows, "taxonomy categories absent from the "
                                        f"truth, left out: {', '.join(self.categories_without_rows)}"),
            "inconsistent_len": (self.inconsistent_len, "categories whose len varies in the truth, largest "
                                 f"used: {', '.join(self.inconsistent_len)}"),
        }
        return [text + (f" (e.g. id {', '.join(self.examples[key])})" if key in self.examples else "")
                for key, (count, text) in lines.items() if count]


@dataclass
class MetricResult:
    final: float
    categories: list[CategoryScore]
    checks: InputChecks
    taxonomy: Taxonomy = field(repr=False)
    # (category, column) -> (true labels, predicted labels) of the scored cells, for confusion matrices.
    pairs: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)
    # (category, column) -> the truth ids of those cells, in the same order (for galleries of mistakes).
    ids: dict[tuple[str, str], np.ndarray] = field(default_factory=dict, repr=False)

    def category(self, name: str) -> CategoryScore:
        for c in self.categories:
            if c.name == name:
                return c
        raise KeyError(name)

    def attribute(self, category: str, name: str) -> AttributeScore:
        for a in self.category(category).attributes:
            if a.name == name:
                return a
        raise KeyError(f"{category}/{name}")


def f1_micro_macro(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[float, float]:
    """Micro- and macro-F1 of single-label predictions, labels = union of both sides (sklearn's default)."""
    n = len(y_true)
    if n == 0:
        return 0.0, 0.0
    codes, uniques = pd.factorize(np.concatenate([np.asarray(y_true, object), np.asarray(y_pred, object)]))
    t, p = codes[:n], codes[n:]
    k = len(uniques)
    hit = t == p
    tp = np.bincount(t[hit], minlength=k)
    # Every label in the union occurs at least once on one side, so the denominator is never 0.
    per_label = 2 * tp / (np.bincount(t, minlength=k) + np.bincount(p, minlength=k))
    # With one label per row and all labels counted, micro precision = micro recall = accuracy.
    return float(hit.mean()), float(per_label.mean())


def harmonic(micro: float, macro: float) -> float:
    return 0.0 if micro + macro == 0 else 2 * micro * macro / (micro + macro)


def _column(frame: pd.DataFrame, col: str, clean: Callable[[object], str | None]) -> np.ndarray:
    # na_value=None: pandas' own NA objects would otherwise reach normalise() and read as text "<na>".
    # Cleaning each distinct value once keeps a 70k-row catalogue fast (columns repeat a few values).
    codes, uniques = pd.factorize(frame[col].to_numpy(dtype=object, na_value=None))
    cleaned = np.array([clean(v) for v in uniques] + [clean(None)], dtype=object)
    return cleaned[codes]  # code -1 (missing) picks the last entry


def _text(frame: pd.DataFrame, col: str) -> np.ndarray:
    return _column(frame, col, lambda v: "" if v is None else str(v).strip())


def _require(frame: pd.DataFrame, what: str, columns: list[str], why: str = "",
             fix: str = "use the Meesho layout (id, Category, len, attr_1..attr_10)") -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise VlmtaxError(f"{what} lacks column(s) {', '.join(missing)}{why}", fix)


def infer_taxonomy(truth: pd.DataFrame, filler: str = DEFAULT_FILLER) -> Taxonomy:
    """Categories, lens and vocabularies as seen in the truth: attribute names are their columns attr_i."""
    _require(truth, "truth", ["Category", "len"], ", needed to infer the taxonomy",
             "add it or pass --taxonomy taxonomy.json")
    cats = _text(truth, "Category")
    lens = pd.to_numeric(pd.Series(_text(truth, "len")), errors="coerce").to_numpy()
    attrs: dict[str, list[str]] = {}
    for name in dict.fromkeys(c for c in cats if c):
        known = lens[(cats == name) & ~np.isnan(lens)]
        if not len(known) or not 1 <= known.max() <= N_SLOTS or known.max() != int(known.max()):
            raise VlmtaxError(f"truth category {name!r} has no valid len (1..{N_SLOTS})",
                              "fix the len column or pass --taxonomy taxonomy.json")
        attrs[name] = SLOT_COLUMNS[: int(known.max())]
    norm = pd.DataFrame({"Category": cats})
    fill = normalise(filler)
    for col in SLOT_COLUMNS:
        if col in truth.columns:
            norm[col] = _column(truth, col, lambda v: None if normalise(v) == fill else normalise(v))
    return build_taxonomy(norm, attrs, remaps=[], filler=filler)


def _resolve(truth: pd.DataFrame, taxonomy: Taxonomy | None, checks: InputChecks) -> Taxonomy:
    """The given taxonomy, completed with inferred entries for truth categories it lacks."""
    if taxonomy is None:
        return infer_taxonomy(truth)
    cats = _text(truth, "Category")
    seen = list(dict.fromkeys(c for c in cats if c))
    checks.categories_not_in_taxonomy = [c for c in seen if c not in taxonomy.categories]
    checks.categories_without_rows = [c for c in taxonomy.categories if c not in seen]
    if not checks.categories_not_in_taxonomy:
        return taxonomy
    extra = infer_taxonomy(truth[np.isin(cats, checks.categories_not_in_taxonomy)], taxonomy.filler)
    return taxonomy.model_copy(update={"categories": {**taxonomy.categories, **extra.categories}})


def _dedupe(frame: pd.DataFrame, checks: InputChecks, key: str) -> pd.DataFrame:
    ids = _text(frame, "id")
    frame = frame.assign(id=ids)
    checks.rows_without_id += int((ids == "").sum())
    frame = frame[ids != ""]
    dup = frame["id"].duplicated().to_numpy()
    setattr(checks, key, int(dup.sum()))
    if dup.any():
        checks.examples[key] = list(dict.fromkeys(frame["id"][dup].tolist()))[:_EXAMPLES]
    return frame[~dup].reset_index(drop=True)


def compute_metric(truth: pd.DataFrame, pred: pd.DataFrame, taxonomy: Taxonomy | None = None) -> MetricResult:
    """Score `pred` against `truth` (both in the submission layout, cells as read from CSV)."""
    _require(truth, "truth", ["id", "Category"])
    _require(pred, "prediction", ["id", "Category"])
    checks = InputChecks(truth_rows=len(truth), pred_rows=len(pred))
    tax = _resolve(truth, taxonomy, checks)
    truth_cats = set(_text(truth, "Category"))
    if taxonomy is None:
        lens = pd.DataFrame({"c": _text(truth, "Category"), "n": _text(truth, "len")}).groupby("c")["n"].nunique()
        checks.inconsistent_len = [str(c) for c in lens[lens > 1].index if c]
    # Only the columns of categories actually present are required, so a trimmed file still scores.
    needed = sorted({a.column for c in tax.categories.values() if c.name in truth_cats for a in c.attributes},
                    key=SLOT_COLUMNS.index)
    _require(truth, "truth", needed, ", which the taxonomy names")
    _require(pred, "prediction", needed, ", which the taxonomy names")

    t = _dedupe(truth, checks, "duplicate_truth_ids")
    p = _dedupe(pred, checks, "duplicate_pred_ids")
    t_cat = _text(t, "Category")
    checks.truth_rows_without_category = int((t_cat == "").sum())
    t_ids, p_ids = set(t["id"]), set(p["id"])
    found = np.array([i in p_ids for i in t["id"]], dtype=bool)
    extra = np.array([i not in t_ids for i in p["id"]], dtype=bool)
    aligned = p.set_index("id").reindex(t["id"]).reset_index(drop=True)
    mismatch = found & (_text(aligned, "Category") != t_cat)
    checks.missing_ids, checks.extra_ids = int((~found).sum()), int(extra.sum())
    checks.category_mismatch = int(mismatch.sum())
    for key, ids in (("missing_ids", t["id"][~found]), ("extra_ids", p["id"][extra]),
                     ("category_mismatch", t["id"][mismatch])):
        if len(ids):
            checks.examples[key] = ids.iloc[:_EXAMPLES].tolist()
    unusable = ~found | mismatch
    fill = normalise(tax.filler)
    # A truth cell holding the filler is "not applicable", i.e. no label to score.
    truth_cols = {c: _column(t, c, lambda v: None if normalise(v) == fill else normalise(v)) for c in needed}
    pred_cols = {c: _column(aligned, c, normalise) for c in needed}

    categories: list[CategoryScore] = []
    pairs: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
    cell_ids: dict[tuple[str, str], np.ndarray] = {}
    t_ids_arr = t["id"].to_numpy(dtype=object)
    for cat in tax.categories.values():
        rows = t_cat == cat.name
        if not rows.any():
            continue
        scores: list[AttributeScore] = []
        for attr in cat.attributes:
            y_true = truth_cols[attr.column][rows]
            present = np.array([v is not None for v in y_true], dtype=bool)
            y_true = y_true[present]
            y_pred = pred_cols[attr.column][rows][present]
            bad = unusable[rows][present]
            empty = np.array([v is None for v in y_pred], dtype=bool) & ~bad
            y_pred[bad | empty] = NO_PREDICTION
            real = y_pred[~(bad | empty)]
            vocab = set(attr.values)
            oov = int(sum(v not in vocab for v in real))
            checks.empty_cells += int(empty.sum())
            checks.out_of_vocab_cells += oov
            micro, macro = f1_micro_macro(y_true, y_pred)
            support = int(present.sum())
            scores.append(AttributeScore(
                name=attr.name, column=attr.column, micro=micro, macro=macro,
                score=harmonic(micro, macro) if support else None, support=support,
                out_of_vocab=oov / len(real) if len(real) else None, no_prediction=int((bad | empty).sum()),
            ))
            pairs[(cat.name, attr.column)] = (y_true, y_pred)
            cell_ids[(cat.name, attr.column)] = t_ids_arr[rows][present]
        kept = [a.score for a in scores if a.score is not None]
        categories.append(CategoryScore(cat.name, int(rows.sum()), float(np.mean(kept)) if kept else None, scores))
    kept = [c.score for c in categories if c.score is not None]
    if not kept:
        raise VlmtaxError("the truth holds no label to score (every attribute cell is empty or the filler)",
                          "pass a truth CSV with labels in attr_1..attr_len")
    return MetricResult(float(np.mean(kept)), categories, checks, tax, pairs, cell_ids)


def constant_prediction(
    truth: pd.DataFrame, taxonomy: Taxonomy, modes: dict[tuple[str, str], str] | None = None
) -> pd.DataFrame:
    """The constant baseline: every row gets its attribute's mode (taxonomy's, or `modes[(category, column)]`)."""
    out = pd.DataFrame({"id": _text(truth, "id"), "Category": _text(truth, "Category")})
    cells = {col: np.full(len(out), taxonomy.filler, dtype=object) for col in SLOT_COLUMNS}
    for cat in taxonomy.categories.values():
        rows = out["Category"].to_numpy() == cat.name
        for attr in cat.attributes:
            cells[attr.column][rows] = (modes or {}).get((cat.name, attr.column), attr.mode)
    return out.assign(len=[str(len(taxonomy.categories[c].attributes)) if c in taxonomy.categories else ""
                           for c in out["Category"]], **cells)


def modes_from_frame(frame: pd.DataFrame, taxonomy: Taxonomy) -> dict[tuple[str, str], str]:
    """Most common value per (category, column) in a training frame; ties broken alphabetically."""
    _require(frame, "baseline training CSV", ["Category"])
    cats = _text(frame, "Category")
    fill = normalise(taxonomy.filler)
    out: dict[tuple[str, str], str] = {}
    for cat in taxonomy.categories.values():
        for attr in cat.attributes:
            if attr.column not in frame.columns:
                continue
            values = [v for v in _column(frame[cats == cat.name], attr.column, normalise) if v and v != fill]
            if values:
                counts = pd.Series(values).value_counts()
                out[(cat.name, attr.column)] = min(counts.index[counts == counts.max()])
    return out

