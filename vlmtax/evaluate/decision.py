"""The decision rule shared by tune and ensemble: per-model temperature, a weighted linear pool of the
models' probabilities, and a prior-corrected argmax `argmax_v p(v|x) / prior(v)^tau`.

Also the arithmetic tune searches with: the official attribute score (harmonic mean of micro- and
macro-F1, `vlmtax.evaluate.metric`) on integer-coded labels so that thousands of candidates stay cheap, the
simplex grid of ensemble weights, the temperature fit and the expected calibration error.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from vlmtax.evaluate.metric import harmonic

_TINY = 1e-300  # log(0) guard: a value with probability 0 can still win when every value has 0


@dataclass
class AttrData:
    """One (category, attribute) of the truth: the models' probabilities on its scored rows."""

    category: str
    name: str
    column: str
    values: list[str]  # the taxonomy's allowed values: codes 0..k-1
    prior: np.ndarray  # (k,) training frequency of each value
    probs: np.ndarray  # (models, n, k) on rows that no input rejects and whose truth is present
    truth: np.ndarray  # (n,) codes; a truth label outside the vocabulary gets a code >= k
    fixed_truth: np.ndarray  # codes of scored rows some input rejected (their prediction is fixed)
    fixed_pred: np.ndarray  # the fixed prediction there (the mode, as predict writes it)
    n_labels: int  # k + truth labels outside the vocabulary
    rows: np.ndarray  # (n,) positions of the scored rows in the probability files
    weight: float = 0.0  # share of this attribute in the final score (1 / categories / its category's attributes)


def f1_codes(truth: np.ndarray, pred: np.ndarray, n_labels: int) -> float:
    """The official attribute score on integer labels: harmonic mean of micro-F1 and macro-F1 over the
    union of true and predicted labels (same arithmetic as `vlmtax.evaluate.metric.f1_micro_macro`)."""
    if len(truth) == 0:
        return 0.0
    hit = truth == pred
    tp = np.bincount(truth[hit], minlength=n_labels)
    denom = np.bincount(truth, minlength=n_labels) + np.bincount(pred, minlength=n_labels)
    used = denom > 0
    return harmonic(float(hit.mean()), float((2 * tp[used] / denom[used]).mean()))


def temper(probs: np.ndarray, temperature: float) -> np.ndarray:
    """p^(1/T), renormalised over the last axis (T > 1 flattens, T < 1 sharpens; argmax unchanged)."""
    if temperature == 1.0:
        return probs
    logp = np.log(np.maximum(probs, _TINY)) / temperature
    logp -= logp.max(axis=-1, keepdims=True)
    out = np.exp(logp)
    return out / out.sum(axis=-1, keepdims=True)


def combine(probs: np.ndarray, weights: np.ndarray, temperatures: np.ndarray | None = None) -> np.ndarray:
    """Weighted linear pool of (models, n, k) probabilities -> (n, k)."""
    if temperatures is not None:
        probs = np.stack([temper(p, t) for p, t in zip(probs, temperatures)])
    return np.tensordot(np.asarray(weights, float) / np.sum(weights), probs, axes=1)


def prior_of(counts: list[float]) -> np.ndarray:
    """The training frequency of each value, as `decide` divides by it. A value never seen in training (declared,
    count 0) counts as the rarest seen one: a zero prior would make it win every row once tau > 0. No count at
    all (a category without training rows) gives the uniform prior, which corrects nothing."""
    prior = np.asarray(counts, float)
    seen = prior[prior > 0]
    if not len(seen):
        return np.full(len(prior), 1 / max(len(prior), 1))
    prior = np.where(prior > 0, prior, seen.min())
    return prior / prior.sum()


def decide(probs: np.ndarray, prior: np.ndarray, tau: float) -> np.ndarray:
    """argmax_v p(v|x) / prior(v)^tau; tau = 0 is the plain argmax (first value on ties)."""
    if tau == 0:
        return probs.argmax(axis=-1)
    return (np.log(np.maximum(probs, _TINY)) - tau * np.log(prior_floor(prior))).argmax(axis=-1)


def prior_floor(prior: np.ndarray) -> np.ndarray:
    """A declared value never seen in training (prior 0) counts as rare as the rarest seen one: -tau*log(0) is
    +inf, and that value would win every row for any tau > 0."""
    seen = prior[prior > 0]
    return np.maximum(prior, seen.min()) if len(seen) else np.full_like(prior, 1.0 / max(len(prior), 1), float)


def score_attr(data: AttrData, pred: np.ndarray, rows: np.ndarray | None = None) -> float:
    """Attribute score of codes `pred` on the model rows `rows` (default all) plus the fixed rows."""
    sel = slice(None) if rows is None else rows
    truth = np.concatenate([data.truth[sel], data.fixed_truth])
    return f1_codes(truth, np.concatenate([pred, data.fixed_pred]), data.n_labels)


def simplex_grid(n_models: int, step: float) -> np.ndarray:
    """Every weight vector on the simplex with the given step, the most even ones first (ties go to them)."""
    if n_models == 1:
        return np.ones((1, 1))
    parts = round(1 / step)
    grid = np.array([c for c in itertools.product(range(parts + 1), repeat=n_models) if sum(c) == parts], float)
    grid /= parts
    return grid[np.argsort(np.abs(grid - 1 / n_models).sum(axis=1), kind="stable")]


def simplex_size(n_models: int, step: float) -> int:
    """Points of `simplex_grid(n_models, step)`, without building it: C(1/step + n - 1, n - 1)."""
    from math import comb

    return comb(round(1 / step) + n_models - 1, n_models - 1)


def simplex_sample(n_models: int, step: float, points: int, seed: int) -> np.ndarray:
    """`points` weight vectors on the simplex grid, for when the full grid is too large: the even one first
    (ties go to it), each model alone, then uniform (Dirichlet(1)) draws snapped to the grid step, no repeats."""
    parts = round(1 / step)
    picked = {tuple(c): None for c in np.eye(n_models, dtype=int) * parts}
    even = np.full(n_models, parts // n_models)
    even[: parts - even.sum()] += 1
    picked = {tuple(even): None, **picked}
    rng = np.random.default_rng(seed)
    while len(picked) < points:
        for w in rng.dirichlet(np.ones(n_models), points):
            c = np.floor(w * parts).astype(int)
            c[np.argsort(w * parts - c)[::-1][: parts - c.sum()]] += 1  # largest remainders round up
            picked.setdefault(tuple(c), None)
            if len(picked) >= points:
                break
    return np.array(list(picked), float) / parts


def score_table(data: AttrData, grid: np.ndarray, taus: list[float], temperatures: np.ndarray,
                rows: np.ndarray | None = None) -> np.ndarray:
    """(weights, taus) -> attribute score on `rows`."""
    probs = data.probs if rows is None else data.probs[:, rows]
    probs = np.stack([temper(p, t) for p, t in zip(probs, temperatures)])  # once, not once per grid point
    out = np.zeros((len(grid), len(taus)))
    for i, w in enumerate(grid):
        pooled = combine(probs, w)
        for j, tau in enumerate(taus):
            out[i, j] = score_attr(data, decide(pooled, data.prior, tau), rows)
    return out


def bootstrap_share(data: AttrData, pred_a: np.ndarray, pred_b: np.ndarray, rows: np.ndarray | None,
                    n: int, seed: int) -> float:
    """Share of row resamples on which prediction `a` scores strictly above prediction `b`."""
    truth = np.concatenate([data.truth if rows is None else data.truth[rows], data.fixed_truth])
    a = np.concatenate([pred_a, data.fixed_pred])
    b = np.concatenate([pred_b, data.fixed_pred])
    rng = np.random.default_rng(seed)
    wins = 0
    for _ in range(n):
        idx = rng.integers(0, len(truth), len(truth))
        wins += f1_codes(truth[idx], a[idx], data.n_labels) > f1_codes(truth[idx], b[idx], data.n_labels)
    return wins / n


def fit_temperature(cells: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Temperature minimising the log-loss of one model on (probs (n, k), true codes (n,)) pairs;
    rows whose truth lies outside the vocabulary carry no likelihood and are skipped."""
    from scipy.optimize import minimize_scalar

    pairs = [(p[t < p.shape[1]], t[t < p.shape[1]]) for p, t in cells]
    pairs = [(p, t) for p, t in pairs if len(t)]
    if not pairs:
        return 1.0

    def nll(log_t: float) -> float:
        total = 0.0
        for p, t in pairs:
            total -= np.log(np.maximum(temper(p, float(np.exp(log_t)))[np.arange(len(t)), t], _TINY)).sum()
        return total

    res = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded", options={"xatol": 1e-3})
    return round(float(np.exp(res.x)), 4)


def ece(cells: list[tuple[np.ndarray, np.ndarray]], bins: int = 15) -> float:
    """Expected calibration error of the top-1 confidence over (probs (n, k), true codes (n,)) pairs."""
    conf = np.concatenate([p.max(axis=1) for p, _ in cells]) if cells else np.zeros(0)
    hit = np.concatenate([p.argmax(axis=1) == t for p, t in cells]) if cells else np.zeros(0)
    if not len(conf):
        return 0.0
    which = np.minimum((conf * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            total += m.sum() * abs(conf[m].mean() - hit[m].mean())
    return float(total / len(conf))
