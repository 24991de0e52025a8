"""Probability files, the contract between predict and tune/ensemble: read, validate, align, stack.

A `predict --probs` JSONL holds one line per input row, in input order: `{"id", "Category",
"attributes": {name: {"column", "value", "probs": {value: p}}}}`, or a `"reject"` reason and no
attributes. Both routes write it. This module reads such files, checks that several of them describe
the same rows under the same taxonomy (one-line errors that name the first difference), and stacks
one attribute's probabilities into arrays in the taxonomy's value order for tune and ensemble.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlmtax.data.taxonomy import Taxonomy
from vlmtax.errors import VlmtaxError
from vlmtax.fileio import file_sha256


@dataclass
class ProbRow:
    id: str
    category: str
    attributes: dict[str, dict]  # name -> {"column", "value", "probs": {value: p}}
    reject: str | None = None


@dataclass
class ProbsFile:
    path: Path
    sha256: str
    rows: list[ProbRow]
    index: dict[str, int] = field(default_factory=dict)  # id -> position

    def __len__(self) -> int:
        return len(self.rows)


def _line_error(path: Path, n: int, what: str) -> VlmtaxError:
    return VlmtaxError(f"probabilities file {path} line {n}: {what}",
                       "pass a file written by `vlmtax predict --probs` (or `vlmtax ensemble --probs`)")


def read_probs(path: str | Path) -> ProbsFile:
    """One probabilities JSONL, checked line by line (layout, numbers, unique ids)."""
    path = Path(path)
    if not path.is_file():
        raise VlmtaxError(f"probabilities file not found: {path}", "check the path (predict --probs writes it)")
    rows: list[ProbRow] = []
    index: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise _line_error(path, n, f"not JSON ({exc.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("attributes"), dict) or "id" not in rec:
                raise _line_error(path, n, "expected an object with id, Category and attributes")
            for name, attr in rec["attributes"].items():
                probs = attr.get("probs") if isinstance(attr, dict) else None
                if not isinstance(probs, dict) or not probs or not all(
                        isinstance(p, (int, float)) and 0 <= p <= 1 for p in probs.values()):
                    raise _line_error(path, n, f"attribute {name!r} has no valid probs (numbers in [0, 1])")
            row = ProbRow(str(rec["id"]), str(rec.get("Category", "")), rec["attributes"], rec.get("reject"))
            if row.id in index:
                raise _line_error(path, n, f"id {row.id!r} appears twice")
            index[row.id] = len(rows)
            rows.append(row)
    if not rows:
        raise VlmtaxError(f"probabilities file {path} holds no rows", "pass a non-empty predict --probs output")
    return ProbsFile(path, file_sha256(path), rows, index)


def check_same_rows(files: list[ProbsFile]) -> None:
    """Every file covers the same ids, in the same order, with the same categories."""
    first = files[0]
    for other in files[1:]:
        if len(other) != len(first) or any(a.id != b.id for a, b in zip(first.rows, other.rows)):
            missing = next((r.id for r in first.rows if r.id not in other.index), None)
            extra = next((r.id for r in other.rows if r.id not in first.index), None)
            detail = (f"id {missing!r} is in {first.path} only" if missing is not None else
                      f"id {extra!r} is in {other.path} only" if extra is not None else "the row order differs")
            raise VlmtaxError(f"{first.path} and {other.path} cover different rows ({detail})",
                              "predict every model on the same CSV")
        for a, b in zip(first.rows, other.rows):
            if a.category != b.category:
                raise VlmtaxError(f"id {a.id!r} has category {a.category!r} in {first.path} but {b.category!r} "
                                  f"in {other.path}", "predict every model on the same CSV")


def value_sets(files: list[ProbsFile]) -> dict[tuple[str, str], tuple[str, list[str]]]:
    """(category, attribute) -> (column, values) as the first file's rows show them; checks that every
    file agrees (same taxonomy), naming the first attribute whose allowed values differ."""
    seen: dict[tuple[str, str], tuple[str, list[str], Path]] = {}
    for pf in files:
        for row in pf.rows:
            for name, attr in row.attributes.items():
                key = (row.category, name)
                values = list(attr["probs"])
                if key not in seen:
                    seen[key] = (attr.get("column", ""), values, pf.path)
                elif set(values) != set(seen[key][1]) or attr.get("column", "") != seen[key][0]:
                    raise VlmtaxError(
                        f"{row.category}/{name}: allowed values differ between {seen[key][2]} and {pf.path} "
                        "(runs with different taxonomies)", "ensemble runs trained on the same prepared data")
    return {k: (c, v) for k, (c, v, _) in seen.items()}


def check_taxonomy(files: list[ProbsFile], taxonomy: Taxonomy, where: str) -> None:
    """The files' value sets are the taxonomy's (so its priors, modes and filler apply to them)."""
    for (cat, name), (column, values) in value_sets(files).items():
        category = taxonomy.categories.get(cat)
        attr = next((a for a in category.attributes if a.name == name), None) if category else None
        if attr is None or set(attr.values) != set(values) or attr.column != column:
            raise VlmtaxError(f"{cat}/{name}: allowed values in {files[0].path} differ from {where} "
                              "(runs with different taxonomies)", "pass the taxonomy.json of the runs' data")


def signature(taxonomy: Taxonomy) -> str:
    """A short hash of what tune and ensemble depend on: categories, attributes, columns, value sets."""
    import hashlib

    parts = [(c.name, a.name, a.column, sorted(a.values)) for c in taxonomy.categories.values() for a in c.attributes]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def stack(files: list[ProbsFile], category: str, name: str, values: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(models, rows, values) probabilities of one attribute, in `values` order, over the rows of `category`
    that no file rejects; and those rows' positions."""
    rows = [i for i, r in enumerate(files[0].rows) if r.category == category
            and all(pf.rows[i].reject is None and name in pf.rows[i].attributes for pf in files)]
    out = np.zeros((len(files), len(rows), len(values)))
    for m, pf in enumerate(files):
        for j, i in enumerate(rows):
            probs = pf.rows[i].attributes[name]["probs"]
            out[m, j] = [probs.get(v, 0.0) for v in values]
    total = out.sum(axis=2, keepdims=True)
    return out / np.where(total > 0, total, 1.0), np.array(rows, dtype=int)


def first_reject(files: list[ProbsFile], i: int) -> tuple[str, str] | None:
    """The reason a row is rejected in any input (the first file that rejects it), with that file."""
    for pf in files:
        if pf.rows[i].reject is not None:
            return str(pf.rows[i].reject), f"rejected in {pf.path}"
    return None
