"""The tune stage: validation probabilities of one or more runs + truth -> decision.json.

Chooses, on the validation rows, what `vlmtax ensemble` applies to test rows: a temperature per model
(validation log-loss), ensemble weights on a simplex grid (one set for all attributes or one per
attribute) and a prior correction `argmax_v p(v|x) / prior(v)^tau` per attribute, all maximising the
official metric. A tau above 0 is kept only when a paired bootstrap of the validation rows shows its
gain over tau = 0 in at least `min_share` of the resamples (default 90%); otherwise argmax stays.
A k-fold estimate (the whole choice refitted without each fold, scored on it) is reported next to the
in-sample score, so the user sees how much of the gain is overfit. With two or more models, the same folds
also estimate each model alone (its temperature, tau by the same noise rule); when no ensemble beats the
best of them out of sample, that model alone is the decision (`select`, on by default).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import vlmtax
from vlmtax.data.taxonomy import Taxonomy, normalise
from vlmtax.errors import VlmtaxError
from vlmtax.evaluate.decision import (
    AttrData,
    bootstrap_share,
    combine,
    decide,
    ece,
    fit_temperature,
    prior_of,
    score_attr,
    score_table,
    simplex_grid,
    simplex_sample,
    simplex_size,
)
from vlmtax.evaluate.ensemble import DECISION_KIND, Rule, apply_rule, load_inputs
from vlmtax.evaluate.metric import compute_metric
from vlmtax.fileio import check_writable, file_sha256, guard_outputs, read_csv, write_json
from vlmtax.inference.probs import ProbsFile, signature, stack

DEFAULT_TAUS = [round(0.1 * i, 1) for i in range(11)]


@dataclass
class Settings:
    weights_by: str = "global"  # global | attribute
    weight_step: float = 0.1
    taus: tuple[float, ...] = tuple(DEFAULT_TAUS)
    temperature: bool = True
    folds: int = 5
    bootstrap: int = 200
    min_share: float = 0.9
    seed: int = 0
    select: bool = True  # fall back to the best single model when the ensemble does not beat it out of sample
    max_points: int = 2000  # above this many simplex grid points, a seeded random sample of this many of them


def weight_candidates(n_models: int, s: Settings) -> np.ndarray:
    """The ensemble weights every fit tries: the whole simplex grid, or past `max_points` the same seeded random
    sample of it for every fit (so the k-fold rule compares like with like). The grid grows as C(1/step + n - 1,
    n - 1): 1,001 points for 5 models at step 0.1, 19,448 for 8."""
    if simplex_size(n_models, s.weight_step) <= s.max_points:
        return simplex_grid(n_models, s.weight_step)
    return simplex_sample(n_models, s.weight_step, s.max_points, s.seed)


def cost_line(attrs: list[AttrData], n_models: int, s: Settings) -> str:
    """One line before the search: its size and a time estimate from one timed pass over a few weight points."""
    import time

    full, points = simplex_size(n_models, s.weight_step), len(weight_candidates(n_models, s))
    folds = s.folds if s.folds >= 2 else 0
    fits = 1 + folds  # over every weight point; each model alone (select) is one point a fold
    singles = folds * n_models if n_models > 1 and s.select else 0
    probe = weight_candidates(n_models, s)[:5]
    start = time.perf_counter()
    for a in attrs:
        score_table(a, probe, list(s.taus), np.ones(n_models))
    seconds = (time.perf_counter() - start) / len(probe) * (points * fits + singles)
    search = (f"{points:,} weight points" if points == full else
              f"random search: {points:,} of the {full:,} grid points (--max-points)")
    return (f"tune: {n_models} model(s), {search} x {len(s.taus)} taus x {len(attrs)} attributes, {fits} fits: "
            f"about {seconds:,.0f} s")


@dataclass
class Fit:
    temperatures: np.ndarray
    weights: list[np.ndarray]  # per attribute
    taus: list[float]
    best_taus: list[float]  # before the noise rule
    shares: list[float | None]  # bootstrap share of the best tau's win (None: tau 0 was best)
    global_weights: np.ndarray | None


def attr_data(files: list[ProbsFile], truth, taxonomy: Taxonomy) -> list[AttrData]:
    """Every (category, attribute) with labels in the truth, aligned with the probability files."""
    ids = truth["id"].fillna("").astype(str).str.strip().tolist()
    cats = [" ".join(str(c).split()) if isinstance(c, str) else "" for c in truth["Category"]]
    first = files[0]
    pos = []
    for rid, cat in zip(ids, cats):
        if rid not in first.index:
            raise VlmtaxError(f"truth id {rid!r} is not in {first.path}",
                              "predict the models on the same validation CSV as --truth")
        if first.rows[first.index[rid]].category != cat:
            raise VlmtaxError(f"truth id {rid!r} has category {cat!r}, {first.path} says "
                              f"{first.rows[first.index[rid]].category!r}", "pass the matching truth CSV")
        pos.append(first.index[rid])
    fill = normalise(taxonomy.filler)
    out: list[AttrData] = []
    for cat in taxonomy.categories.values():
        in_cat = [k for k, c in enumerate(cats) if c == cat.name]
        for attr in cat.attributes:
            col = truth[attr.column] if attr.column in truth.columns else None
            labels = {k: normalise(col.iloc[k]) for k in in_cat} if col is not None else {}
            labels = {k: v for k, v in labels.items() if v is not None and v != fill}
            if not labels:
                continue
            extra = sorted(set(labels.values()) - set(attr.values))
            code = {v: i for i, v in enumerate([*attr.values, *extra])}
            probs, where = stack(files, cat.name, attr.name, attr.values)
            local = {int(p): j for j, p in enumerate(where)}
            model_rows = [(local[pos[k]], code[v]) for k, v in labels.items() if pos[k] in local]
            fixed = [code[v] for k, v in labels.items() if pos[k] not in local]
            sel = np.array([j for j, _ in model_rows], dtype=int)
            prior = prior_of([attr.counts.get(v, 0) for v in attr.values])
            out.append(AttrData(
                cat.name, attr.name, attr.column, list(attr.values), prior,
                probs[:, sel], np.array([c for _, c in model_rows], dtype=int), np.array(fixed, dtype=int),
                np.full(len(fixed), attr.values.index(attr.mode), dtype=int), len(code), where[sel]))
    per_cat: dict[str, int] = {}
    for a in out:
        per_cat[a.category] = per_cat.get(a.category, 0) + 1
    for a in out:
        a.weight = 1 / len(per_cat) / per_cat[a.category]
    if not out:
        raise VlmtaxError("the truth holds no label for any attribute of the taxonomy",
                          "pass the validation CSV (prepare writes val.csv) as --truth")
    return out


def fit(attrs: list[AttrData], n_models: int, s: Settings, subsets: list[np.ndarray] | None = None,
        grid: np.ndarray | None = None) -> Fit:
    """The decision on the given row subsets (None: all rows), weights from `grid` (default: the simplex)."""
    sub = subsets or [None] * len(attrs)
    temps = np.ones(n_models)
    if s.temperature:
        temps = np.array([fit_temperature([(a.probs[m] if r is None else a.probs[m][r],
                                            a.truth if r is None else a.truth[r]) for a, r in zip(attrs, sub)])
                          for m in range(n_models)])
    grid = weight_candidates(n_models, s) if grid is None else grid
    tables = [score_table(a, grid, list(s.taus), temps, r) for a, r in zip(attrs, sub)]
    if s.weights_by == "global":
        g = int(np.argmax(sum(a.weight * t.max(axis=1) for a, t in zip(attrs, tables))))
        picks = [g] * len(attrs)
    else:
        picks = [int(np.argmax(t.max(axis=1))) for t in tables]
    taus, best, shares = [], [], []
    for a, r, t, w in zip(attrs, sub, tables, picks):
        j = int(np.argmax(t[w]))
        share = None
        if j > 0 and t[w, j] > t[w, 0]:
            pooled = combine(a.probs if r is None else a.probs[:, r], grid[w], temps)
            share = bootstrap_share(a, decide(pooled, a.prior, s.taus[j]), decide(pooled, a.prior, 0.0), r,
                                    s.bootstrap, s.seed)
        best.append(s.taus[j])
        shares.append(share)
        taus.append(s.taus[j] if share is not None and share >= s.min_share else 0.0)
    return Fit(temps, [grid[w] for w in picks], taus, best, shares,
               grid[picks[0]] if s.weights_by == "global" else None)


def predict_rows(a: AttrData, f: Fit, k: int, rows: np.ndarray | None = None) -> np.ndarray:
    probs = a.probs if rows is None else a.probs[:, rows]
    return decide(combine(probs, f.weights[k], f.temperatures), a.prior, f.taus[k])


def cross_validate(attrs: list[AttrData], n_models: int, s: Settings, grid: np.ndarray | None = None) -> list[float]:
    """Out-of-fold attribute scores: each fold predicted by the decision fitted on the other folds."""
    rng = np.random.default_rng(s.seed)
    every = np.unique(np.concatenate([a.rows for a in attrs]))
    fold_of = dict(zip(every.tolist(), (rng.permutation(len(every)) % s.folds).tolist()))
    folds = [np.array([fold_of[int(p)] for p in a.rows], dtype=int) for a in attrs]
    oof = [np.zeros(len(a.truth), dtype=int) for a in attrs]
    for k in range(s.folds):
        f = fit(attrs, n_models, s, [np.flatnonzero(fo != k) for fo in folds], grid)
        for i, (a, fo) in enumerate(zip(attrs, folds)):
            held = np.flatnonzero(fo == k)
            oof[i][held] = predict_rows(a, f, i, held)
    return [score_attr(a, p) for a, p in zip(attrs, oof)]


def weighted(attrs: list[AttrData], scores: list[float]) -> float:
    """Attribute scores -> the metric's final (categories equal, attributes equal within a category)."""
    return float(sum(a.weight * c for a, c in zip(attrs, scores)))


def choose(attrs: list[AttrData], n: int, s: Settings) -> tuple[Fit, list, dict[str, Any]]:
    """The tuned ensemble, or the best single model when it is at least as good out of sample.

    Returns the chosen fit, its per-attribute k-fold scores and what was compared."""
    f = fit(attrs, n, s)
    if s.folds < 2:
        return f, [None] * len(attrs), {"rule": "ensemble", "cv_ensemble": None, "cv_single": None}
    cv = cross_validate(attrs, n, s)
    report: dict[str, Any] = {"rule": "ensemble", "cv_ensemble": weighted(attrs, cv), "cv_single": None}
    if n < 2 or not s.select:
        return f, cv, report
    alone = [cross_validate(attrs, n, s, np.eye(n)[[m]]) for m in range(n)]
    report["cv_single"] = [weighted(attrs, c) for c in alone]
    best = int(np.argmax(report["cv_single"]))
    if report["cv_single"][best] >= report["cv_ensemble"]:
        report["rule"] = f"model {best + 1} alone"
        return fit(attrs, n, s, grid=np.eye(n)[[best]]), alone[best], report
    return f, cv, report


def official(files, tax, truth, rule: Rule) -> float:
    rows, done = apply_rule(files, tax, rule)
    from vlmtax.inference.outputs import submission_frames

    return compute_metric(truth, submission_frames(rows, done, tax, False)[0], tax).final


def calibration(attrs: list[AttrData], f: Fit, n: int) -> dict[str, Any]:
    def cells(weights, temps):
        return [(combine(a.probs, weights(k), temps), a.truth) for k, a in enumerate(attrs)]

    even = np.full(n, 1 / n)
    models = [{"before": ece(cells(lambda k, m=m: np.eye(n)[m], None)),
               "after": ece(cells(lambda k, m=m: np.eye(n)[m], f.temperatures))} for m in range(n)]
    return {"before": ece(cells(lambda k: even, None)), "after": ece(cells(lambda k: f.weights[k], f.temperatures)),
            "models": models, "bins": 15}


def tune(probs: list[str | Path], truth: str | Path, out: str | Path, taxonomy: str | Path,
         settings: Settings | None = None, console: Console | None = None, detail: bool = True) -> dict[str, Any]:
    """Choose the decision on validation rows; print the per-attribute table (`detail=False`: the summary lines
    alone, as the demo prints it); write decision.json."""
    s = settings or Settings()
    check_settings(s)
    guard_outputs({"--truth": truth, "--taxonomy": taxonomy, **{f"probs file {p}": p for p in probs}},
                  {"--out": out})
    check_writable(out, "--out")
    files, tax = load_inputs(probs, taxonomy)
    truth_df = read_csv(truth, "truth CSV", ["id", "Category"])
    attrs = attr_data(files, truth_df, tax)
    n = len(files)
    sys.stderr.write(cost_line(attrs, n, s) + "\n")
    f, cv, chosen = choose(attrs, n, s)
    even = np.full(n, 1 / n)
    rows = []
    for k, a in enumerate(attrs):
        rows.append({"category": a.category, "attribute": a.name, "column": a.column, "support": len(a.truth) +
                     len(a.fixed_truth), "weights": [round(float(w), 4) for w in f.weights[k]], "tau": f.taus[k],
                     "best_tau": f.best_taus[k], "bootstrap_share": f.shares[k],
                     "argmax": score_attr(a, decide(combine(a.probs, even), a.prior, 0.0)),
                     "tuned": score_attr(a, predict_rows(a, f, k)), "cv_tuned": cv[k]})
    rule = Rule(f.global_weights if f.global_weights is not None else even, f.temperatures,
                {(a.category, a.name): (f.weights[k], f.taus[k]) for k, a in enumerate(attrs)})
    scores = {"argmax": official(files, tax, truth_df, Rule(even, np.ones(n))),
              "tuned": official(files, tax, truth_df, rule),
              "cv_tuned": None if s.folds < 2 else weighted(attrs, cv),
              "single": [official(files, tax, truth_df, Rule(np.eye(n)[m], np.ones(n))) for m in range(n)],
              "choice": chosen}
    decision = {
        "kind": DECISION_KIND, "vlmtax_version": vlmtax.__version__,
        "models": [{"probs": str(p.path), "sha256": p.sha256, "temperature": float(t)}
                   for p, t in zip(files, f.temperatures)],
        "truth": {"path": str(Path(truth).resolve()), "sha256": file_sha256(truth)},
        "taxonomy": {"path": str(Path(taxonomy).resolve()), "sha256": file_sha256(taxonomy),
                     "signature": signature(tax)},
        "settings": {**s.__dict__, "taus": list(s.taus)},
        "weights": None if f.global_weights is None else [float(w) for w in f.global_weights],
        "attributes": rows, "scores": scores, "ece": calibration(attrs, f, n),
    }
    write_json(out, decision)
    print_table(decision, console or Console(width=None if sys.stdout.isatty() else 160), detail)
    return decision


def check_settings(s: Settings) -> None:
    if s.weights_by not in ("global", "attribute"):
        raise VlmtaxError(f"--weights-by {s.weights_by!r} is unknown", "use global or attribute")
    if not 0 < s.weight_step <= 1 or abs(round(1 / s.weight_step) * s.weight_step - 1) > 1e-9:
        raise VlmtaxError(f"--weight-step {s.weight_step} does not divide 1", "use e.g. 0.1, 0.05 or 0.25")
    if s.max_points < 1:
        raise VlmtaxError(f"--max-points {s.max_points} is below 1", "use e.g. 2000")
    if not s.taus or any(not 0 <= t <= 1 for t in s.taus) or 0 not in s.taus:
        raise VlmtaxError(f"--taus {','.join(map(str, s.taus))} must lie in [0, 1] and include 0",
                          "e.g. --taus 0,0.25,0.5,0.75,1 (--taus 0 keeps argmax)")
    if s.folds < 0 or s.folds == 1 or not 0 <= s.min_share <= 1 or s.bootstrap < 1:
        raise VlmtaxError("--folds must be 0 (none) or at least 2, --min-share in [0, 1], --bootstrap >= 1",
                          "use the defaults (5 folds, 0.9, 200)")


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def print_table(decision: dict[str, Any], console: Console, detail: bool = True) -> None:
    if detail:
        console.print(attribute_table(decision))
    sc, e = decision["scores"], decision["ece"]
    singles = ", ".join(f"{x:.4f}" for x in sc["single"])
    console.print(f"[bold]final: argmax {sc['argmax']:.4f}, tuned {sc['tuned']:.4f} (in-sample), "
                  f"cv {_f(sc['cv_tuned'])}[/]; single models {singles}; temperatures "
                  + ", ".join(f"{m['temperature']:.3f}" for m in decision["models"])
                  + f"; ECE {e['before']:.4f} -> {e['after']:.4f}")
    ch = sc.get("choice") or {}
    if ch.get("cv_single"):
        console.print(f"[bold]decision: {ch['rule']}[/] (k-fold: tuned ensemble {ch['cv_ensemble']:.4f}, "
                      + ", ".join(f"model {m + 1} alone {x:.4f}" for m, x in enumerate(ch["cv_single"])) + ")")


def attribute_table(decision: dict[str, Any]) -> Table:
    t = Table(title="tune: per attribute (validation rows)", title_justify="left", caption_justify="left",
              caption="argmax: equal weights, tau 0; tuned: in-sample; cv: k-fold out-of-sample; "
              "share: bootstrap wins of the best tau over 0 (kept when >= min_share)")
    for name in ("category", "attribute", "support", "argmax", "tuned", "cv", "tau", "best tau", "share", "weights"):
        t.add_column(name, justify="left" if name in ("category", "attribute", "weights") else "right")
    for a in decision["attributes"]:
        t.add_row(escape(a["category"]), escape(a["attribute"]), str(a["support"]), _f(a["argmax"]), _f(a["tuned"]),
                  _f(a["cv_tuned"]), f"{a['tau']:.2f}", f"{a['best_tau']:.2f}", _f(a["bootstrap_share"]),
                  ",".join(f"{w:.2f}" for w in a["weights"]))
    return t


def tune_and_ensemble(val_probs: list[str | Path], test_probs: list[str | Path], val_truth: str | Path,
                      taxonomy: str | Path, out_dir: str | Path, test_truth: str | Path | None = None,
                      settings: Settings | None = None, console: Console | None = None,
                      detail: bool = True) -> dict[str, Any]:
    """Tune on the validation probabilities, apply the decision to the test probabilities (the demo's last
    step); with `test_truth`, also score the ensemble's submission. Writes decision.json, ensemble.csv
    and ensemble.probs.jsonl into `out_dir`."""
    from vlmtax.evaluate.ensemble import ensemble

    out_dir = Path(out_dir)
    decision = tune(val_probs, val_truth, out_dir / "decision.json", taxonomy, settings, console, detail)
    submission = out_dir / "ensemble.csv"
    ensemble(test_probs, submission, decision=out_dir / "decision.json", probs_out=out_dir / "ensemble.probs.jsonl",
             taxonomy=taxonomy)
    result: dict[str, Any] = {"decision": str(out_dir / "decision.json"), "submission": str(submission),
                              "val": decision["scores"], "score": None}
    if test_truth is not None:
        truth = read_csv(test_truth, "test truth CSV", ["id", "Category"])
        pred = read_csv(submission, "ensemble submission", ["id", "Category"])
        result["score"] = compute_metric(truth, pred, Taxonomy.load(taxonomy)).final
    return result
