"""The ensemble stage: probabilities of one or more runs + a decision -> submission CSV (+ combined probs).

The decision is `tune`'s decision.json (per-model temperatures, weights, per-attribute prior
correction), or plain `--weights`, or equal weights. The submission, its rejects CSV and the combined
probability file are written by predict's own writer, so the layout, the filler, the column remaps
and the mode fill of rejected rows are exactly predict's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vlmtax.data.taxonomy import Taxonomy
from vlmtax.errors import VlmtaxError
from vlmtax.evaluate.decision import combine, decide, prior_of
from vlmtax.fileio import atomic_path, check_writable, file_sha256, guard_outputs, read_json, write_csv
from vlmtax.inference.outputs import submission_frames
from vlmtax.inference.probs import (
    ProbsFile,
    check_same_rows,
    check_taxonomy,
    first_reject,
    read_probs,
    signature,
    stack,
)
from vlmtax.inference.rows import Row

DECISION_KIND = "vlmtax-decision"


@dataclass
class Rule:
    """How to turn the models' probabilities into one value per attribute."""

    weights: np.ndarray  # default weights (one per model)
    temperatures: np.ndarray
    per_attribute: dict[tuple[str, str], tuple[np.ndarray, float]] = field(default_factory=dict)  # weights, tau

    def for_attribute(self, category: str, name: str) -> tuple[np.ndarray, float]:
        return self.per_attribute.get((category, name), (self.weights, 0.0))


def parse_weights(text: str, n_models: int) -> np.ndarray:
    try:
        weights = np.array([float(w) for w in text.split(",")])
    except ValueError:
        raise VlmtaxError(f"--weights {text!r} is not a comma-separated list of numbers",
                          "write e.g. --weights 0.6,0.4") from None
    if len(weights) != n_models:
        raise VlmtaxError(f"--weights gives {len(weights)} weight(s) for {n_models} probability file(s)",
                          "give one weight per file, in the same order")
    check_weights(weights, f"--weights {text!r}", "e.g. --weights 0.6,0.4")
    return weights / weights.sum()


def check_weights(weights: np.ndarray, what: str, fix: str) -> None:
    """Ensemble weights, from the command line or a decision file: non-negative, finite, a positive sum."""
    if (weights < 0).any() or not np.isfinite(weights).all() or weights.sum() <= 0:
        raise VlmtaxError(f"{what} must be non-negative with a positive sum", fix)


def _decision_numbers(decision: dict[str, Any], n: int, path: str) -> None:
    """A hand-edited decision file is held to the same rule as --weights (and temperatures must be positive)."""
    fix = f"re-run `vlmtax tune`, or fix the numbers in {path}"
    try:
        sets = [("weights", decision.get("weights") or [1 / n] * n)]
        sets += [(f"weights of {a['category']}/{a['attribute']}", a["weights"]) for a in decision["attributes"]]
        temps = np.array([m["temperature"] for m in decision["models"]], float)
        taus = np.array([a["tau"] for a in decision["attributes"]], float)
        arrays = [(what, np.array(w, float)) for what, w in sets]
    except (KeyError, TypeError, ValueError):
        raise VlmtaxError(f"decision file {path} lacks or garbles weights, temperatures or taus", fix) from None
    for what, w in arrays:
        if w.shape != (n,):
            raise VlmtaxError(f"decision file {path}: {what} has {w.size} number(s) for {n} model(s)", fix)
        check_weights(w, f"decision file {path}: {what} {w.tolist()}", fix)
    if not (np.isfinite(temps).all() and (temps > 0).all()) or not np.isfinite(taus).all():
        raise VlmtaxError(f"decision file {path}: temperatures must be positive and taus finite "
                          f"(temperatures {temps.tolist()})", fix)


def rule_from_decision(decision: dict[str, Any], files: list[ProbsFile], taxonomy: Taxonomy,
                       path: str | Path = "--decision") -> Rule:
    """The decision's rule, after checking it was made for models like these (count and taxonomy)."""
    models = decision["models"]
    if len(models) != len(files):
        raise VlmtaxError(f"the decision was made for {len(models)} model(s), got {len(files)} probability file(s)",
                          "pass the test probabilities of the models tuned, in the decision's order: "
                          + ", ".join(m["probs"] for m in models))
    if decision["taxonomy"]["signature"] != signature(taxonomy):
        raise VlmtaxError("the decision was made for models with another taxonomy (allowed values differ)",
                          "tune on validation probabilities of these runs")
    _decision_numbers(decision, len(files), str(path))
    rule = Rule(np.array(decision.get("weights") or [1 / len(files)] * len(files)),
                np.array([m["temperature"] for m in models]))
    for a in decision["attributes"]:
        rule.per_attribute[(a["category"], a["attribute"])] = (np.array(a["weights"]), float(a["tau"]))
    return rule


def load_decision(path: str | Path) -> dict[str, Any]:
    decision = read_json(path, "decision file")
    if not isinstance(decision, dict) or decision.get("kind") != DECISION_KIND:
        raise VlmtaxError(f"{path} is not a decision file", "pass the --out of `vlmtax tune`")
    return decision


def apply_rule(files: list[ProbsFile], taxonomy: Taxonomy, rule: Rule) -> tuple[list[Row], dict[int, dict]]:
    """Rows and decoded records in predict's internal form: the combined probabilities travel as log
    probabilities (predict's writer softmaxes them back), the decided values as the row's values."""
    first = files[0]
    rows = []
    for i, r in enumerate(first.rows):
        cat = taxonomy.categories.get(r.category)
        reject = first_reject(files, i) or (None if cat else ("unknown_category", f"{r.category!r} is not in "
                                                                                  "the taxonomy"))
        rows.append(Row(i, r.id, r.category, cat, None, reject=reject))
    done: dict[int, dict] = {}
    for cat in taxonomy.categories.values():
        for attr in cat.attributes:
            probs, where = stack(files, cat.name, attr.name, attr.values)
            if not len(where):
                continue
            weights, tau = rule.for_attribute(cat.name, attr.name)
            pooled = combine(probs, weights, rule.temperatures)
            picks = decide(pooled, prior_of([attr.counts.get(v, 0) for v in attr.values]), tau)
            with np.errstate(divide="ignore"):
                logp = np.log(pooled)
            for j, i in enumerate(where):
                rec = done.setdefault(int(i), {"row": int(i), "values": {}, "logliks": {}})
                rec["values"][attr.name] = attr.values[picks[j]]
                rec["logliks"][attr.name] = logp[j].tolist()
    return rows, done


def write_outputs(rows: list[Row], done: dict[int, dict], taxonomy: Taxonomy, out: Path,
                  probs_out: Path | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    table, rejects, prob_lines = submission_frames(rows, done, taxonomy, probs_out is not None)
    write_csv(out.with_name(out.stem + ".rejects.csv"), rejects)
    if probs_out is not None:
        with atomic_path(probs_out) as tmp:
            tmp.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in prob_lines), encoding="utf-8")
    write_csv(out, table)
    return table, rejects


def load_inputs(probs: list[str | Path], taxonomy: str | Path) -> tuple[list[ProbsFile], Taxonomy]:
    if not probs:
        raise VlmtaxError("no probability file given", "pass one or more `predict --probs` outputs")
    files = [read_probs(p) for p in probs]
    check_same_rows(files)
    tax = Taxonomy.load(taxonomy)
    check_taxonomy(files, tax, f"taxonomy {taxonomy}")
    return files, tax


def ensemble(probs: list[str | Path], out: str | Path, decision: str | Path | None = None,
             weights: str | None = None, probs_out: str | Path | None = None,
             taxonomy: str | Path | None = None) -> dict[str, Any]:
    """Combine the probability files into a submission CSV (and `<out stem>.rejects.csv`, and `probs_out`)."""
    out = Path(out)
    if decision is not None and weights is not None:
        raise VlmtaxError("--decision and --weights both given", "pass one: the decision holds its own weights")
    dec = load_decision(decision) if decision is not None else None
    if taxonomy is None:
        if dec is None:
            raise VlmtaxError("no taxonomy: ensemble needs the runs' taxonomy.json",
                              "pass --taxonomy RUN_DIR/taxonomy.json (or --decision, which names it)")
        taxonomy = dec["taxonomy"]["path"]
        if not Path(taxonomy).is_file() or file_sha256(taxonomy) != dec["taxonomy"]["sha256"]:
            raise VlmtaxError(f"the decision's taxonomy {taxonomy} is gone or changed since tune",
                              "pass --taxonomy RUN_DIR/taxonomy.json")
    rejects_out = out.with_name(out.stem + ".rejects.csv")
    guard_outputs({"--decision": decision, "--taxonomy": taxonomy, **{f"probs file {p}": p for p in probs}},
                  {"--out": out, "--probs": probs_out, "the rejects file": rejects_out})
    if probs_out is not None and Path(probs_out).resolve() in (out.resolve(), rejects_out.resolve()):
        raise VlmtaxError(f"--probs {probs_out} is the same file as --out or its rejects file", "pass another path")
    for what, target in (("--out", out), ("--probs", probs_out)):
        if target is not None:
            check_writable(target, what)
    files, tax = load_inputs(probs, taxonomy)
    n = len(files)
    if dec is not None:
        rule = rule_from_decision(dec, files, tax, decision)
    else:
        rule = Rule(parse_weights(weights, n) if weights is not None else np.full(n, 1 / n), np.ones(n))
    rows, done = apply_rule(files, tax, rule)
    table, rejects = write_outputs(rows, done, tax, out, Path(probs_out) if probs_out else None)
    print(f"wrote {len(table)} rows to {out} from {n} model(s) ({len(rejects)} rejected -> "
          f"{out.with_name(out.stem + '.rejects.csv')})", flush=True)
    return {"rows": len(table), "rejected": len(rejects), "models": n, "out": str(out),
            "probs": str(probs_out) if probs_out else None, "weights": rule.weights.tolist()}
