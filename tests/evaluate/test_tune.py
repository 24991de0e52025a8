"""tune and ensemble on hand-made probability files (no model), plus one byte-for-byte check against predict."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from vlmtax.data.taxonomy import SLOT_COLUMNS, build_taxonomy
from vlmtax.errors import VlmtaxError
from vlmtax.evaluate.decision import f1_codes, simplex_grid
from vlmtax.evaluate.ensemble import ensemble
from vlmtax.evaluate.metric import compute_metric, f1_micro_macro, harmonic
from vlmtax.evaluate.tune import Settings, tune

COLOURS = ["red", "blue", "green"]


def _taxonomy(tmp_path: Path, counts: dict[str, int]) -> Path:
    """One category `Shirts` with attribute `color` (attr_1) whose training counts are `counts`."""
    values = [v for v, n in counts.items() for _ in range(n)]
    frame = pd.DataFrame({"Category": ["Shirts"] * len(values), "attr_1": values})
    path = tmp_path / "taxonomy.json"
    build_taxonomy(frame, {"Shirts": ["color"]}, remaps=[]).save(path)
    return path


def _probs(path: Path, rows: list[list[float]], values=COLOURS, reject: dict[int, str] | None = None) -> Path:
    lines = []
    for i, p in enumerate(rows):
        if reject and i in reject:
            lines.append({"id": str(i), "Category": "Shirts", "attributes": {}, "reject": reject[i]})
            continue
        probs = dict(zip(values, p))
        lines.append({"id": str(i), "Category": "Shirts", "attributes": {
            "color": {"column": "attr_1", "value": max(probs, key=probs.get), "probs": probs}}})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _truth(path: Path, labels: list[str]) -> Path:
    frame = pd.DataFrame({"id": [str(i) for i in range(len(labels))], "Category": "Shirts", "len": 1,
                          "attr_1": labels, **{c: "dummy" for c in SLOT_COLUMNS[1:]}})
    frame.to_csv(path, index=False)
    return path


def test_f1_codes_equals_the_official_metric():
    rng = np.random.default_rng(0)
    for _ in range(20):
        t, p = rng.integers(0, 5, 40), rng.integers(0, 4, 40)
        assert f1_codes(t, p, 6) == pytest.approx(harmonic(*f1_micro_macro(t.astype(str), p.astype(str))))


def test_simplex_grid_covers_the_simplex_evenest_first():
    grid = simplex_grid(3, 0.25)
    assert len(grid) == 15 and np.allclose(grid.sum(axis=1), 1)
    assert np.allclose(simplex_grid(2, 0.5)[0], [0.5, 0.5])


def test_grid_search_finds_the_known_best_weights(tmp_path):
    """Model A is right on rows 0-9 and wrong elsewhere, B the reverse; each is confident only where it is
    right except on rows 10-14, where A is confidently wrong. Only weights near 0.3/0.7 get every row."""
    tax = _taxonomy(tmp_path, {"red": 5, "blue": 5, "green": 5})
    truth = [COLOURS[i % 3] for i in range(20)]
    a, b = [], []
    for i, lab in enumerate(truth):
        k, wrong = COLOURS.index(lab), (COLOURS.index(lab) + 1) % 3
        pa, pb = np.full(3, 0.05), np.full(3, 0.05)
        if i < 10:  # A right (0.9), B wrong but unsure (0.5)
            pa[k], pb[wrong], pb[k] = 0.9, 0.5, 0.45
        else:  # A wrong (0.6 vs 0.35), B right (0.9)
            pa[wrong], pa[k], pb[k] = 0.6, 0.35, 0.9
        a.append((pa / pa.sum()).tolist())
        b.append((pb / pb.sum()).tolist())
    pa_path, pb_path = _probs(tmp_path / "a.jsonl", a), _probs(tmp_path / "b.jsonl", b)
    dec = tune([pa_path, pb_path], _truth(tmp_path / "t.csv", truth), tmp_path / "d.json", tax,
               Settings(taus=(0.0,), temperature=False, folds=0))
    # Every row right needs w_a * 0.9 + w_b * 0.05 > w_a * 0.05 + w_b * 0.5 (w_a > 0.346) and
    # w_a * 0.6 + w_b * 0.05 < w_a * 0.35 + w_b * 0.9 (w_a < 0.773): the evenest such grid point is 0.5.
    assert dec["scores"]["tuned"] == pytest.approx(1.0)
    assert 0.346 < dec["weights"][0] < 0.773
    assert dec["scores"]["single"][0] < 1 and dec["scores"]["single"][1] < 1



def _noisy_pair(tmp_path: Path, n: int = 240):
    """Model A is right on 80% of the rows, model B is uniform noise: no mix of the two beats A."""
    rng = np.random.default_rng(5)
    truth = rng.choice(COLOURS, n).tolist()
    a = []
    for lab in truth:
        k = COLOURS.index(lab) if rng.random() < 0.8 else int(rng.integers(0, 3))
        p = np.full(3, 0.15)
        p[k] = 0.7
        a.append(p.tolist())
    b = rng.dirichlet([1, 1, 1], n).tolist()
    return truth, _probs(tmp_path / "a.jsonl", a), _probs(tmp_path / "b.jsonl", b)


def test_the_best_single_model_is_chosen_when_no_ensemble_beats_it_out_of_sample(tmp_path):
    tax = _taxonomy(tmp_path, {"red": 5, "blue": 5, "green": 5})
    truth, a, b = _noisy_pair(tmp_path)
    truth_csv = _truth(tmp_path / "t.csv", truth)
    dec = tune([b, a], truth_csv, tmp_path / "d.json", tax, Settings(folds=3, bootstrap=50, taus=(0.0,)))
    choice = dec["scores"]["choice"]
    assert choice["rule"] == "model 2 alone"
    assert choice["cv_single"][1] >= choice["cv_ensemble"] and choice["cv_single"][1] > choice["cv_single"][0]
    assert dec["weights"] == [0.0, 1.0] and all(r["weights"] == [0.0, 1.0] for r in dec["attributes"])
    assert dec["scores"]["tuned"] == pytest.approx(dec["scores"]["single"][1])
    # Applied to the same files, the decision writes model A's own argmax submission.
    ensemble([b, a], tmp_path / "chosen.csv", decision=tmp_path / "d.json")
    ensemble([a], tmp_path / "a.csv", weights="1", taxonomy=tax)
    assert (tmp_path / "chosen.csv").read_bytes() == (tmp_path / "a.csv").read_bytes()
    # --no-select keeps the tuned ensemble whatever the estimate says.
    forced = tune([b, a], truth_csv, tmp_path / "e.json", tax, Settings(folds=3, bootstrap=50, taus=(0.0,),
                                                                         select=False))
    assert forced["scores"]["choice"]["rule"] == "ensemble" and forced["scores"]["choice"]["cv_single"] is None


def test_the_ensemble_is_kept_when_it_beats_every_single_model_out_of_sample(tmp_path):
    """Two models each right on a different half of the rows (as in the grid-search test), many rows."""
    tax = _taxonomy(tmp_path, {"red": 5, "blue": 5, "green": 5})
    rng = np.random.default_rng(2)
    truth = rng.choice(COLOURS, 200).tolist()
    a, b = [], []
    for i, lab in enumerate(truth):
        k, wrong = COLOURS.index(lab), (COLOURS.index(lab) + 1) % 3
        pa, pb = np.full(3, 0.05), np.full(3, 0.05)
        if i % 2:
            pa[k], pb[wrong], pb[k] = 0.9, 0.5, 0.45
        else:
            pa[wrong], pa[k], pb[k] = 0.6, 0.35, 0.9
        a.append((pa / pa.sum()).tolist())
        b.append((pb / pb.sum()).tolist())
    dec = tune([_probs(tmp_path / "a.jsonl", a), _probs(tmp_path / "b.jsonl", b)], _truth(tmp_path / "t.csv", truth),
               tmp_path / "d.json", tax, Settings(folds=3, bootstrap=50, taus=(0.0,), temperature=False))
    choice = dec["scores"]["choice"]
    assert choice["rule"] == "ensemble" and choice["cv_ensemble"] > max(choice["cv_single"])
    assert dec["scores"]["tuned"] == pytest.approx(1.0)

def _skewed(tmp_path: Path, n: int = 300, seed: int = 0):
    """A model that over-predicts the frequent value: true rare values get a probability just below it."""
    rng = np.random.default_rng(seed)
    truth = rng.choice(COLOURS, n, p=[0.7, 0.2, 0.1])
    rows = []
    for lab in truth:
        p = np.array([0.5, 0.25, 0.25]) if lab == "red" else np.array([0.45, 0.4, 0.15] if lab == "blue"
                                                                     else [0.45, 0.15, 0.4])
        rows.append((p * rng.uniform(0.9, 1.1, 3)).tolist())
    return truth.tolist(), rows


def test_prior_correction_raises_macro_f1_on_a_skewed_example(tmp_path):
    tax = _taxonomy(tmp_path, {"red": 70, "blue": 20, "green": 10})
    truth, rows = _skewed(tmp_path)
    probs = _probs(tmp_path / "p.jsonl", [(np.array(r) / sum(r)).tolist() for r in rows])
    truth_csv = _truth(tmp_path / "t.csv", truth)
    dec = tune([probs], truth_csv, tmp_path / "d.json", tax, Settings(folds=3, bootstrap=100))
    attr = dec["attributes"][0]
    assert attr["tau"] > 0 and attr["bootstrap_share"] >= 0.9
    assert dec["scores"]["tuned"] > dec["scores"]["argmax"] + 0.1
    assert dec["scores"]["cv_tuned"] > dec["scores"]["argmax"]
    # Applied to fresh rows of the same kind, the tuned rule's macro-F1 beats argmax's.
    test_truth, test_rows = _skewed(tmp_path, seed=1)
    test_probs = _probs(tmp_path / "q.jsonl", [(np.array(r) / sum(r)).tolist() for r in test_rows])
    truth_frame = pd.read_csv(_truth(tmp_path / "tt.csv", test_truth), dtype=str)
    macro = {}
    for name, kw in (("argmax", {"weights": "1"}), ("tuned", {"decision": tmp_path / "d.json"})):
        ensemble([test_probs], tmp_path / f"{name}.csv", taxonomy=tax, **kw)
        pred = pd.read_csv(tmp_path / f"{name}.csv", dtype=str)
        macro[name] = compute_metric(truth_frame, pred).categories[0].attributes[0].macro
    assert macro["tuned"] > macro["argmax"] + 0.1


def test_tau_stays_zero_when_the_gain_is_noise(tmp_path):
    tax = _taxonomy(tmp_path, {"red": 70, "blue": 20, "green": 10})
    rng = np.random.default_rng(3)
    truth = rng.choice(COLOURS, 60, p=[0.7, 0.2, 0.1]).tolist()
    rows = rng.dirichlet([1, 1, 1], 60).tolist()  # pure noise: any gain of tau > 0 is luck
    dec = tune([_probs(tmp_path / "p.jsonl", rows)], _truth(tmp_path / "t.csv", truth), tmp_path / "d.json",
               tax, Settings(folds=0))
    attr = dec["attributes"][0]
    assert attr["tau"] == 0 or attr["bootstrap_share"] >= 0.9


def test_ensemble_propagates_rejects_and_writes_combined_probs(tmp_path):
    tax = _taxonomy(tmp_path, {"red": 3, "blue": 2, "green": 1})
    rows = [[0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]
    a = _probs(tmp_path / "a.jsonl", rows)
    b = _probs(tmp_path / "b.jsonl", [[0.1, 0.1, 0.8], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]], reject={2: "missing_image"})
    ensemble([a, b], tmp_path / "s.csv", weights="3,1", probs_out=tmp_path / "c.jsonl", taxonomy=tax)
    sub = pd.read_csv(tmp_path / "s.csv", dtype=str)
    assert sub["attr_1"].tolist() == ["red", "blue", "red"]  # row 2 rejected: the mode, as predict fills it
    assert (sub[SLOT_COLUMNS[1:]] == "dummy").all().all()
    rejects = pd.read_csv(tmp_path / "s.rejects.csv", dtype=str)
    assert rejects["id"].tolist() == ["2"] and rejects["reason"].tolist() == ["missing_image"]
    lines = [json.loads(x) for x in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert lines[2]["reject"] == "missing_image" and lines[2]["attributes"] == {}
    assert lines[0]["attributes"]["color"]["probs"]["red"] == pytest.approx(0.75 * 0.6 + 0.25 * 0.1)


@pytest.mark.parametrize("case, message", [
    ("ids", "cover different rows"),
    ("category", "has category"),
    ("values", "Shirts/color: allowed values differ"),
    ("weights", "gives 1 weight(s) for 2"),
    ("decision", "decision was made for 1 model"),
])
def test_each_error_is_one_line(tmp_path, case, message):
    tax = _taxonomy(tmp_path, {"red": 3, "blue": 2, "green": 1})
    rows = [[0.6, 0.3, 0.1], [0.1, 0.8, 0.1]]
    a = _probs(tmp_path / "a.jsonl", rows)
    b = _probs(tmp_path / "b.jsonl", rows)
    kw = {"taxonomy": tax}
    if case == "ids":
        _probs(b, rows[:1])
    elif case == "category":
        b.write_text(b.read_text().replace('"Shirts"', '"Sarees"', 1))
    elif case == "values":
        _probs(b, [[0.5, 0.3, 0.2]] * 2, values=["red", "blue", "black"])
    elif case == "weights":
        kw["weights"] = "1"
    elif case == "decision":
        tune([a], _truth(tmp_path / "t.csv", ["red", "blue"]), tmp_path / "d.json", tax, Settings(folds=0))
        kw["decision"] = tmp_path / "d.json"
    with pytest.raises(VlmtaxError, match=re.escape(message)) as err:
        ensemble([a, b], tmp_path / "s.csv", **kw)
    assert "\n" not in str(err.value) and err.value.fix
    assert not (tmp_path / "s.csv").exists()


def test_cli_error_is_one_line_without_traceback(tmp_path):
    tax = _taxonomy(tmp_path, {"red": 3, "blue": 2, "green": 1})
    a = _probs(tmp_path / "a.jsonl", [[0.6, 0.3, 0.1], [0.1, 0.8, 0.1]])
    b = _probs(tmp_path / "b.jsonl", [[0.6, 0.3, 0.1]])
    proc = subprocess.run([sys.executable, "-m", "vlmtax", "ensemble", str(a), str(b), "--out",
                           str(tmp_path / "s.csv"), "--taxonomy", str(tax)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "cover different rows" in proc.stderr, proc.stderr
    assert not (tmp_path / "s.csv").exists()


def test_tune_errors(tmp_path):
    tax = _taxonomy(tmp_path, {"red": 3, "blue": 2, "green": 1})
    a = _probs(tmp_path / "a.jsonl", [[0.6, 0.3, 0.1]])
    with pytest.raises(VlmtaxError, match="truth id '1' is not in"):
        tune([a], _truth(tmp_path / "t.csv", ["red", "blue"]), tmp_path / "d.json", tax)
    with pytest.raises(VlmtaxError, match="include 0"):
        tune([a], _truth(tmp_path / "t.csv", ["red"]), tmp_path / "d.json", tax, Settings(taus=(0.5,)))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(VlmtaxError, match="line 1: not JSON"):
        tune([tmp_path / "bad.jsonl"], tmp_path / "t.csv", tmp_path / "d.json", tax)
    assert not (tmp_path / "d.json").exists()
