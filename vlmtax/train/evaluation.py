"""The in-training evaluation stage: the official metric on the validation split at every evaluation of `sft`.

At each evaluation a fixed, stratified sample of val.csv (`train.eval_rows`) is decoded by a
"rows -> records" callable and scored with `vlmtax.evaluate.metric` on the very submission table predict would
write. Each route brings its callable (`attach(..., predict_rows)`: generate/predictor.py's constrained
decoder, heads/predictor.py's heads): it receives the model being trained and predict's planned rows and
returns predict's records `{row index: {"values": {attribute: value}}}`.
The score goes into the metrics the Trainer uses for `train.best_by: score` and `train.patience`,
into the trainer log (and TensorBoard), into `<output_dir>/eval/` as CSVs and into vlmtax_meta.json.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from transformers import TrainerCallback

from vlmtax.data.taxonomy import Taxonomy
from vlmtax.errors import VlmtaxError
from vlmtax.evaluate.metric import MetricResult, compute_metric
from vlmtax.inference.outputs import submission_frames
from vlmtax.inference.rows import Row

PredictRows = Callable[[Any, list[Row]], dict[int, dict[str, Any]]]


def eval_args(recipe: Any, has_eval: bool) -> dict[str, Any]:
    """Trainer arguments for evaluation and best-checkpoint selection (evaluations fall on checkpoints)."""
    t = recipe.train
    if t.best_by == "score" and not t.eval_metric:
        raise VlmtaxError("train.best_by=score needs train.eval_metric=true", "set train.eval_metric=true")
    if t.patience is not None and t.best_by is None:
        raise VlmtaxError("train.patience needs train.best_by (score or loss)", "set train.best_by=score or loss")
    if (t.eval_metric or t.best_by) and not has_eval:
        raise VlmtaxError("train.eval_metric/best_by need a validation split, and the data has no val.json",
                          "re-run prepare with --val-fraction above 0")
    if not has_eval or not (t.eval or t.eval_metric or t.best_by):
        return {"eval_strategy": "no"}
    out: dict[str, Any] = {"eval_strategy": "steps", "eval_steps": t.save_steps} if t.save_steps else \
        {"eval_strategy": "epoch"}
    if t.best_by:
        out.update(load_best_model_at_end=True, metric_for_best_model=f"eval_{t.best_by}",
                   greater_is_better=t.best_by == "score")
    return out


def sample_truth(truth: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    """A fixed sample of `n` truth rows, stratified by category (each category's share kept, at least one
    row each), in file order; all rows when `n` is None or covers them."""
    if n is None or n >= len(truth):
        return truth.reset_index(drop=True)
    rng = np.random.default_rng(seed)
    groups = {c: np.flatnonzero(truth["Category"].to_numpy() == c) for c in dict.fromkeys(truth["Category"])}
    quota = {c: max(1, round(n * len(g) / len(truth))) for c, g in groups.items()}
    while sum(quota.values()) > n and max(quota.values()) > 1:  # rounding up every small group can overshoot
        quota[max(quota, key=quota.get)] -= 1
    keep = np.concatenate([rng.choice(g, min(quota[c], len(g)), replace=False) for c, g in groups.items()])
    return truth.iloc[np.sort(keep)].reset_index(drop=True)


def plan_eval_rows(truth: pd.DataFrame, records: list[dict[str, Any]], taxonomy: Taxonomy) -> list[Row]:
    """predict's Row for each truth row, its image taken from the prepared val.json record of the same id."""
    images = {str(r.get("id")): r["images"][0] for r in records}
    rows = []
    for i, (rid, cat) in enumerate(zip(truth["id"].astype(str), truth["Category"].astype(str))):
        if rid not in images:
            raise VlmtaxError(f"val.csv id {rid} has no record in val.json", "re-run `vlmtax prepare`")
        path = Path(images[rid])
        with Image.open(path) as img:
            pixels = img.size[0] * img.size[1]
        rows.append(Row(i, rid, cat, taxonomy.categories.get(cat), path, pixels))
    return rows


class MetricCallback(TrainerCallback):
    """Scores the validation sample at each evaluation; keeps the history for the log, the table and the meta."""

    def __init__(self, predict_rows: PredictRows, rows: list[Row], truth: pd.DataFrame, taxonomy: Taxonomy,
                 out_dir: Path, log: Callable[[dict[str, float]], None], is_main: Callable[[], bool]):
        self.predict_rows, self.rows, self.truth, self.taxonomy = predict_rows, rows, truth, taxonomy
        self.out_dir, self.log, self.is_main = out_dir, log, is_main
        self.history: list[dict[str, Any]] = []
        self.seconds = 0.0
        self.started: float | None = None
        self.training_seconds: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def score(self, model: Any) -> tuple[MetricResult, pd.DataFrame]:
        was_training = model.training
        model.eval()
        try:
            done = self.predict_rows(model, [r for r in self.rows if r.reject is None])
        finally:
            model.train(was_training)
        table = submission_frames(self.rows, done, self.taxonomy, False)[0]
        return compute_metric(self.truth, table, self.taxonomy), table

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        started = time.perf_counter()
        result, table = self.score(model)
        attrs = {f"{c.name}/{a.name}": a.score for c in result.categories for a in c.attributes if a.score is not None}
        logged = {"eval_score": result.final, **{f"eval_score/{k}": v for k, v in attrs.items()}}
        if metrics is not None:
            metrics.update(logged)  # the dict the Trainer picks the best checkpoint and stops early from
        self.history.append({"step": state.global_step, "score": result.final, "attributes": attrs})
        if self.is_main():
            (self.out_dir / "eval").mkdir(parents=True, exist_ok=True)
            if not (self.out_dir / "eval" / "truth.csv").exists():
                self.truth.to_csv(self.out_dir / "eval" / "truth.csv", index=False)
            table.to_csv(self.out_dir / "eval" / f"predictions-step{state.global_step}.csv", index=False)
        self.log(logged)
        self.seconds += time.perf_counter() - started

    def summary(self) -> dict[str, Any] | None:
        if not self.history:
            return None
        best = max(self.history, key=lambda h: h["score"])  # first of equal scores, as the Trainer keeps it
        return {"best_score": best["score"], "best_step": best["step"], "best_attributes": best["attributes"],
                "rows": len(self.rows), "seconds": round(self.seconds, 2),
                "training_seconds": None if self.training_seconds is None else round(self.training_seconds, 2),
                "history": [{"step": h["step"], "score": h["score"]} for h in self.history]}

    def on_train_end(self, args, state, control, **kwargs):
        if self.started is not None:  # evaluations included: their share is seconds / training_seconds
            self.training_seconds = time.perf_counter() - self.started
        if self.history and self.is_main():
            print_table(self.summary(), self.history[-1])


def print_table(summary: dict[str, Any], last: dict[str, Any]) -> None:
    import sys

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"validation metric ({summary['rows']} rows): best at step {summary['best_step']}",
                  title_justify="left")
    for name in ("category/attribute", f"best (step {summary['best_step']})", f"last (step {last['step']})"):
        table.add_column(name, justify="left" if name.startswith("category") else "right")
    for key, value in summary["best_attributes"].items():
        table.add_row(escape(key), f"{value:.4f}", f"{last['attributes'].get(key, float('nan')):.4f}")
    table.add_row("[bold]final[/]", f"[bold]{summary['best_score']:.4f}[/]", f"{last['score']:.4f}")
    Console(stderr=True, width=None if sys.stderr.isatty() else 160).print(table)


class BestWeights(TrainerCallback):
    """Puts the best checkpoint's weights into a fully fine-tuned model at the end of training (the
    Trainer's load_best_model_at_end silently keeps the last weights: see loading.restore_full_weights).
    PEFT adapters load through load_adapter, which is unaffected."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        from vlmtax.models.loading import restore_full_weights

        if state.best_model_checkpoint is not None and model is not None:
            restore_full_weights(model, state.best_model_checkpoint)


def attach(trainer: Any, recipe: Any, taxonomy: Taxonomy, val_records: list[dict[str, Any]],
           predict_rows: PredictRows) -> MetricCallback | None:
    """Add the metric callback (and early stopping) to a trainer as the recipe asks; returns the callback."""
    from transformers import EarlyStoppingCallback

    from vlmtax.fileio import read_csv

    t = recipe.train
    callback = None
    if t.eval_metric:
        truth = sample_truth(read_csv(recipe.data / "val.csv", "validation truth", ["id", "Category"]),
                             t.eval_rows, t.seed)
        callback = MetricCallback(predict_rows,
                                  plan_eval_rows(truth, val_records, taxonomy), truth, taxonomy,
                                  Path(recipe.output_dir), trainer.log, trainer.is_world_process_zero)
        trainer.add_callback(callback)
    if t.best_by is not None:
        trainer.add_callback(BestWeights())
    if t.patience is not None:  # after the metric callback, which puts the score into the metrics it reads
        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=t.patience))
    return callback
