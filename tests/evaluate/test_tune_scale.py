"""tune with many models: a cost line before the search, and past --max-points a seeded random sample of the
simplex grid under the same k-fold rule (8 models at step 0.1 are 19,448 grid points)."""

from __future__ import annotations

import numpy as np
import pytest
from test_tune import COLOURS, _probs, _taxonomy, _truth

from vlmtax.evaluate import decision
from vlmtax.evaluate.decision import simplex_grid, simplex_sample, simplex_size
from vlmtax.evaluate.tune import Settings, tune


def test_simplex_sample_stays_on_the_grid():
    assert simplex_size(8, 0.1) == 19448 and simplex_size(3, 0.1) == len(simplex_grid(3, 0.1))
    sample = simplex_sample(8, 0.1, 500, seed=0)
    assert sample.shape == (500, 8) and len({tuple(w) for w in sample}) == 500
    assert np.allclose(sample.sum(axis=1), 1) and np.allclose(sample * 10, np.round(sample * 10))
    assert {tuple(np.eye(8)[m]) for m in range(8)} <= {tuple(w) for w in sample}  # each model alone is tried
    assert np.array_equal(sample, simplex_sample(8, 0.1, 500, seed=0))


def test_eight_models_are_searched_within_the_budget(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(3)
    truth = [COLOURS[i % 3] for i in range(60)]
    good = []
    for lab in truth:  # right on 80% of the rows
        k = COLOURS.index(lab) if rng.random() < 0.8 else int(rng.integers(0, 3))
        p = np.full(3, 0.15)
        p[k] = 0.7
        good.append(p.tolist())
    files = [_probs(tmp_path / "m0.jsonl", good)]
    files += [_probs(tmp_path / f"m{m}.jsonl", rng.dirichlet([1, 1, 1], 60).tolist()) for m in range(1, 8)]
    sizes = []
    real = decision.score_table

    def counted(data, grid, *args, **kwargs):
        sizes.append(len(grid))
        return real(data, grid, *args, **kwargs)

    monkeypatch.setattr("vlmtax.evaluate.tune.score_table", counted)
    dec = tune(files, _truth(tmp_path / "t.csv", truth), tmp_path / "d.json",
               _taxonomy(tmp_path, {"red": 5, "blue": 5, "green": 5}),
               Settings(taus=(0.0, 0.5), max_points=300, bootstrap=20))
    line = capsys.readouterr().err
    assert "random search: 300 of the 19,448 grid points" in line and "about" in line
    assert max(sizes) == 300  # the full grid is never built
    assert dec["scores"]["cv_tuned"] is not None  # the same k-fold choice between ensemble and single models
    assert dec["scores"]["tuned"] >= max(dec["scores"]["single"]) - 1e-9


def test_max_points_below_one_is_refused(tmp_path):
    from vlmtax.errors import VlmtaxError

    with pytest.raises(VlmtaxError, match="--max-points 0"):
        tune([tmp_path / "a.jsonl"], tmp_path / "t.csv", tmp_path / "d.json", tmp_path / "tax.json",
             Settings(max_points=0))
