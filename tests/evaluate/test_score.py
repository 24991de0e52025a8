"""The score stage: the metric against hand arithmetic and scikit-learn, input checks, outputs, CLI."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from sklearn.metrics import f1_score

from vlmtax.data.taxonomy import Attribute, Category, Taxonomy
from vlmtax.errors import VlmtaxError
from vlmtax.evaluate.metric import NO_PREDICTION, compute_metric, constant_prediction, f1_micro_macro, infer_taxonomy
from vlmtax.evaluate.score import score

Row = tuple[str, str, int, list[str | None]]


def frame(rows: list[Row]) -> pd.DataFrame:
    """Submission-layout frame; slots past the given values hold the filler, None is an empty cell."""
    records = []
    for row_id, cat, n, values in rows:
        cells = list(values) + ["dummy"] * (10 - len(values))
        records.append({"id": row_id, "Category": cat, "len": str(n), **{f"attr_{i + 1}": v for i, v in
                                                                          enumerate(cells)}})
    return pd.DataFrame(records)


def write(path: Path, df: pd.DataFrame) -> Path:
    df.to_csv(path, index=False)
    return path


def quiet() -> Console:
    return Console(file=io.StringIO(), width=160)


# Shirts (len 2) and Bags (len 1). The filler slot past len differs between files on purpose.
TRUTH = frame([
    ("1", "Shirts", 2, ["red", "long", "dummy"]),
    ("2", "Shirts", 2, ["red", "long", "dummy"]),
    ("3", "Shirts", 2, ["red", "short", "dummy"]),
    ("4", "Shirts", 2, ["blue", None, "dummy"]),  # missing sleeve label: this row is not scored for it
    ("5", "Shirts", 2, ["white", "long", "dummy"]),
    ("6", "Bags", 1, ["leather", "dummy"]),
    ("7", "Bags", 1, ["leather", "dummy"]),
])
PRED = frame([
    ("1", "Shirts", 2, ["red", "long", "whatever"]),
    ("2", "Shirts", 2, ["red", "short", "whatever"]),
    ("3", "Shirts", 2, ["blue", "short", "whatever"]),
    ("4", "Shirts", 2, ["green", "long", "whatever"]),
    ("5", "Shirts", 2, ["red", "long", "whatever"]),
    ("6", "Bags", 1, ["leather", "oops"]),
    ("7", "Bags", 1, ["leather", "oops"]),
])
# attr_1 (colour): true red red red blue white / pred red red blue green red; labels red blue white green.
#   micro = accuracy = 2/5. F1: red tp=2, 3 true, 3 pred -> 4/6 = 2/3; blue 0; white (true, never
#   predicted) 0; green (predicted, never true) 0. macro = (2/3)/4 = 1/6.
#   harmonic = 2 * 2/5 * 1/6 / (2/5 + 1/6) = (2/15) / (17/30) = 4/17.
# attr_2 (sleeve), row 4 skipped: true long long short long / pred long short short long.
#   micro = 3/4. F1: long tp=2, 3 true, 2 pred -> 4/5; short tp=1, 1 true, 2 pred -> 2/3; macro = 11/15.
#   harmonic = 2 * 3/4 * 11/15 / (3/4 + 11/15) = (11/10) / (89/60) = 66/89.
SHIRTS = (4 / 17 + 66 / 89) / 2
FINAL = (SHIRTS + 1.0) / 2  # Bags is perfect; its attr_2 (filler slot past len) is ignored


def test_hand_computed_values() -> None:
    r = compute_metric(TRUTH, PRED)
    color = r.attribute("Shirts", "attr_1")
    assert (color.micro, color.macro) == pytest.approx((2 / 5, 1 / 6))
    assert color.score == pytest.approx(4 / 17)
    sleeve = r.attribute("Shirts", "attr_2")
    assert (sleeve.micro, sleeve.macro, sleeve.score) == pytest.approx((3 / 4, 11 / 15, 66 / 89))
    assert sleeve.support == 4  # the empty truth cell is skipped
    assert r.category("Shirts").score == pytest.approx(SHIRTS)
    assert [a.name for a in r.category("Bags").attributes] == ["attr_1"]
    assert r.category("Bags").score == 1.0
    assert r.final == pytest.approx(FINAL)
    assert color.out_of_vocab == pytest.approx(1 / 5)  # green: the vocabulary is what the truth holds
    assert r.checks.problems() == ["1 predicted value(s) outside the vocabulary"]


def test_f1_matches_sklearn_and_edge_values() -> None:
    assert f1_micro_macro(np.array(["a", "a"]), np.array(["b", "b"])) == (0.0, 0.0)
    rng = np.random.default_rng(1)
    for _ in range(25):
        n = int(rng.integers(1, 40))
        t, p = rng.choice(list("abcde"), n), rng.choice(list("abcxy"), n)
        micro, macro = f1_micro_macro(t, p)
        assert micro == pytest.approx(f1_score(t, p, average="micro"))
        assert macro == pytest.approx(f1_score(t, p, average="macro"))


def test_values_are_normalised_and_perfect_scores_one() -> None:
    pred = PRED.copy()
    pred["attr_1"] = ["  RED", "Red ", "blue", "green", "red"] + ["Leather"] * 2
    assert compute_metric(TRUTH, pred).attribute("Shirts", "attr_1").micro == pytest.approx(2 / 5)
    assert compute_metric(TRUTH, TRUTH.copy()).final == 1.0


def test_attribute_without_truth_is_left_out() -> None:
    truth = frame([("1", "A", 2, ["x", None]), ("2", "A", 2, ["y", "dummy"])])
    pred = frame([("1", "A", 2, ["x", "p"]), ("2", "A", 2, ["x", "q"])])
    cat = compute_metric(truth, pred).category("A")
    assert cat.left_out == ["attr_2"]
    # attr_1: micro 1/2; x F1 = 2/3, y 0 -> macro 1/3; harmonic = (1/3) / (5/6) = 2/5.
    assert cat.score == pytest.approx(2 / 5)


def test_input_checks() -> None:
    truth = frame([(str(i), "A", 1, [v]) for i, v in enumerate(["x", "x", "y", "y", "x"], 1)])
    truth = pd.concat([truth, frame([("1", "A", 1, ["y"])])], ignore_index=True)  # duplicate truth id
    pred = frame([
        ("1", "A", 1, ["x"]),
        ("2", "A", 1, ["x"]),
        ("2", "A", 1, ["y"]),  # duplicate: the first copy counts
        ("3", "B", 1, ["y"]),  # wrong category: counted wrong even though the value matches
        ("4", "A", 1, [None]),  # empty cell
        ("99", "A", 1, ["x"]),  # not in the truth: ignored
    ])  # id 5 is missing
    r = compute_metric(truth, pred)
    c = r.checks
    assert (c.missing_ids, c.extra_ids, c.duplicate_truth_ids, c.duplicate_pred_ids) == (1, 1, 1, 1)
    assert (c.category_mismatch, c.empty_cells) == (1, 1)
    assert c.examples["missing_ids"] == ["5"] and c.examples["category_mismatch"] == ["3"]
    assert len(c.problems()) >= 6
    # Scored: true x x y y x / pred x x NP NP NP. micro 2/5; F1 x = 2*2/(3+2) = 4/5, y 0, NP 0 ->
    # macro 4/15; harmonic = 2 * 2/5 * 4/15 / (2/5 + 4/15) = (16/75) / (2/3) = 8/25.
    attr = r.attribute("A", "attr_1")
    assert attr.score == pytest.approx(8 / 25)
    assert attr.no_prediction == 3
    y_true, y_pred = r.pairs[("A", "attr_1")]
    assert list(y_pred) == ["x", "x", NO_PREDICTION, NO_PREDICTION, NO_PREDICTION]


def reference_final(truth: pd.DataFrame, pred: pd.DataFrame) -> float:
    """Straightforward re-implementation with scikit-learn (ids already aligned, values normalised)."""
    cats = []
    for _, rows in truth.groupby("Category"):
        p = pred.set_index("id").loc[rows["id"]]
        attrs = []
        for i in range(1, int(rows["len"].iloc[0]) + 1):
            col = f"attr_{i}"
            keep = rows[col].notna().to_numpy() & (rows[col] != "dummy").to_numpy()
            if keep.any():
                t, y = rows[col].to_numpy()[keep], p[col].fillna("<empty>").to_numpy()[keep]
                mi, ma = f1_score(t, y, average="micro"), f1_score(t, y, average="macro")
                attrs.append(0.0 if mi + ma == 0 else 2 * mi * ma / (mi + ma))
        cats.append(np.mean(attrs))
    return float(np.mean(cats))


def test_agrees_with_sklearn_on_random_frame() -> None:
    rng = np.random.default_rng(0)
    lens = {"A": 2, "B": 3, "C": 4}
    vocab = ["v0", "v1", "v2", "v3", "v4"]
    rows_t, rows_p = [], []
    for i in range(500):
        cat = str(rng.choice(list(lens)))
        n = lens[cat]
        t = [None if rng.random() < 0.1 else str(rng.choice(vocab[: 2 + n])) for _ in range(n)]
        p = [v if v and rng.random() < 0.5 else str(rng.choice(vocab + ["oov"])) for v in t]
        p = [None if rng.random() < 0.03 else v for v in p]
        rows_t.append((str(i), cat, n, t))
        rows_p.append((str(i), cat, n, p))
    truth, pred = frame(rows_t), frame(rows_p)
    r = compute_metric(truth, pred)
    assert r.final == pytest.approx(reference_final(truth, pred), abs=1e-12)
    assert 0 < r.final < 1
    assert r.checks.empty_cells > 0 and r.checks.out_of_vocab_cells > 0


def test_baseline_is_constant_mode_prediction(tmp_path: Path) -> None:
    console = quiet()
    report = score(write(tmp_path / "t.csv", TRUTH), write(tmp_path / "p.csv", PRED), console=console)
    printed = console.file.getvalue()
    assert "per category" in printed and "per attribute" in printed
    assert f"final score {FINAL:.4f} (constant baseline {report['baseline']['final']:.4f})" in printed
    # Hand-built constant prediction from the truth's modes (no ties in TRUTH).
    const = TRUTH.copy()
    for (cat, col) in [("Shirts", "attr_1"), ("Shirts", "attr_2"), ("Bags", "attr_1")]:
        rows = TRUTH["Category"] == cat
        const.loc[rows, col] = Counter(v for v in TRUTH.loc[rows, col] if v).most_common(1)[0][0]
    expected = compute_metric(TRUTH, const)
    assert report["baseline"]["final"] == pytest.approx(expected.final)
    assert report["categories"]["Shirts"]["baseline"] == pytest.approx(expected.category("Shirts").score)
    assert report["final"] == pytest.approx(FINAL)


def test_taxonomy_columns_vocabulary_and_modes(tmp_path: Path) -> None:
    def attr(name: str, column: str, values: list[str]) -> Attribute:
        return Attribute(name=name, column=column, values=values, counts={v: 1 for v in values}, mode=values[0])

    # Sleeve is read from attr_2 under its own name; the taxonomy's mode ("short") is not the truth's.
    tax = Taxonomy(categories={
        "Shirts": Category(name="Shirts", len=2, attributes=[
            attr("color", "attr_1", ["red", "blue", "white"]), attr("sleeve", "attr_2", ["short", "long"])]),
        "Shoes": Category(name="Shoes", len=1, attributes=[attr("type", "attr_1", ["boot"])]),
    })
    tax.save(tmp_path / "taxonomy.json")
    report = score(write(tmp_path / "t.csv", TRUTH), write(tmp_path / "p.csv", PRED),
                   taxonomy=tmp_path / "taxonomy.json", console=quiet())
    shirts = report["categories"]["Shirts"]["attributes"]
    assert shirts["color"]["score"] == pytest.approx(4 / 17)
    assert shirts["color"]["out_of_vocab"] == pytest.approx(1 / 5)  # green
    assert report["checks"]["categories_not_in_taxonomy"] == ["Bags"]  # inferred from the truth
    assert report["checks"]["categories_without_rows"] == ["Shoes"]
    const = constant_prediction(TRUTH, compute_metric(TRUTH, PRED, tax).taxonomy)
    assert set(const.loc[const["Category"] == "Shirts", "attr_2"]) == {"short"}
    assert report["baseline"]["final"] == pytest.approx(compute_metric(TRUTH, const, tax).final)


def test_inference_needs_len() -> None:
    assert infer_taxonomy(TRUTH).categories["Shirts"].len == 2
    with pytest.raises(VlmtaxError, match="len"):
        compute_metric(TRUTH.drop(columns="len"), PRED)
    with pytest.raises(VlmtaxError, match="attr_2"):
        compute_metric(TRUTH, PRED.drop(columns="attr_2"))


def test_json_and_png_written(tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = score(write(tmp_path / "t.csv", TRUTH), write(tmp_path / "p.csv", PRED),
                   json_out=out / "m.json", plot=out / "m.png", console=quiet())
    data = json.loads((out / "m.json").read_text())
    assert data == json.loads(json.dumps(report))
    assert data["final"] == pytest.approx(FINAL)
    assert set(data) >= {"final", "baseline", "categories", "checks", "truth", "pred", "taxonomy"}
    attr = data["categories"]["Shirts"]["attributes"]["attr_1"]
    assert set(attr) == {"column", "micro", "macro", "score", "baseline", "support", "out_of_vocab",
                         "no_prediction"}
    assert (out / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["m.json", "m.png"]  # no temp files left


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlmtax", "score", *args], capture_output=True, text=True,
                          timeout=120)


def test_cli(tmp_path: Path) -> None:
    truth, pred = write(tmp_path / "t.csv", TRUTH), write(tmp_path / "p.csv", PRED)
    ok = run_cli("--truth", str(truth), "--pred", str(pred), "--json", str(tmp_path / "j.json"))
    assert ok.returncode == 0, ok.stderr
    assert f"final score {FINAL:.4f}" in ok.stdout
    assert (tmp_path / "j.json").is_file()

    bad = write(tmp_path / "bad.csv", PRED.drop(columns="attr_2"))
    err = run_cli("--truth", str(truth), "--pred", str(bad))
    assert err.returncode == 2
    assert err.stderr.strip().startswith("error:") and "attr_2" in err.stderr
    assert len(err.stderr.strip().splitlines()) == 1


def test_baseline_from_training_csv(tmp_path: Path) -> None:
    train = frame([("a", "Shirts", 2, ["blue", "short"]), ("b", "Shirts", 2, ["blue", "long"]),
                   ("c", "Shirts", 2, ["red", "short"])])
    report = score(write(tmp_path / "t.csv", TRUTH), write(tmp_path / "p.csv", PRED),
                   baseline=write(tmp_path / "train.csv", train), console=quiet())
    const = TRUTH.copy()
    shirts = const["Category"] == "Shirts"
    const.loc[shirts, "attr_1"], const.loc[shirts, "attr_2"] = "blue", "short"  # training modes
    const.loc[~shirts, "attr_1"] = "leather"  # Bags is absent from training: the truth's mode stands in
    assert report["baseline"]["final"] == pytest.approx(compute_metric(TRUTH, const).final)
    assert report["baseline"]["source"].startswith("modes of")
