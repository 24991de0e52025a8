"""train.eval_metric: the official metric inside sft, best checkpoint by score, patience, meta; stratified sample."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import TINY_RECIPE, quiet_console, tiny_overrides
from safetensors.torch import load_file

from vlmtax.errors import VlmtaxError
from vlmtax.evaluate.score import score
from vlmtax.sft import sft
from vlmtax.train.evaluation import sample_truth

pytestmark = pytest.mark.usefixtures("single_thread")


def test_metric_in_trainer_equals_score_and_best_checkpoint_is_the_best_step(tiny_model_dir, prepared_dir, tmp_path):
    out = tmp_path / "run"
    sft(TINY_RECIPE, tiny_overrides(tiny_model_dir, prepared_dir, out, "train.max_steps=6", "train.save_steps=2",
                                    "train.batch_size=4", "train.eval_metric=true", "train.best_by=score",
                                    "train.patience=2", "train.save_total_limit=1"))
    meta = json.loads((out / "vlmtax_meta.json").read_text())
    history = json.loads(sorted(out.glob("checkpoint-*"))[-1].joinpath("trainer_state.json").read_text())
    logged = [h for h in history["log_history"] if "eval_score" in h]
    assert logged and {h["step"] for h in logged} <= {2, 4, 6}
    for h in logged:  # what the trainer logged is what `vlmtax score` says of the same predictions
        report = score(out / "eval" / "truth.csv", out / "eval" / f"predictions-step{h['step']}.csv",
                       taxonomy=out / "taxonomy.json", console=quiet_console())
        assert h["eval_score"] == pytest.approx(report["final"], abs=1e-12)
        for cat, figs in report["categories"].items():
            for name, a in figs["attributes"].items():
                if a["score"] is not None:
                    assert h[f"eval_score/{cat}/{name}"] == pytest.approx(a["score"], abs=1e-12)
    best = max(logged, key=lambda h: h["eval_score"])  # first of equal scores, as the Trainer keeps it
    summary = meta["eval_metric"]
    assert summary["best_step"] == best["step"] and summary["best_score"] == pytest.approx(best["eval_score"])
    assert history["best_model_checkpoint"].endswith(f"checkpoint-{best['step']}")
    # load_best_model_at_end: the run dir holds the best checkpoint's weights.
    final, kept = load_file(out / "model.safetensors"), load_file(
        out / f"checkpoint-{best['step']}" / "model.safetensors")
    assert all((final[k] == kept[k]).all() for k in final)
    if len(logged) < 3:  # stopped early: the evaluations after the best did not improve on it
        assert all(h["eval_score"] <= best["eval_score"] for h in logged if h["step"] > best["step"])


def test_stratified_sample_is_fixed_and_keeps_every_category():
    truth = pd.DataFrame({"id": [str(i) for i in range(100)], "Category": ["a"] * 80 + ["b"] * 15 + ["c"] * 5})
    one, two = sample_truth(truth, 20, 0), sample_truth(truth, 20, 0)
    assert one.equals(two) and len(one) == 20
    assert one["Category"].value_counts().to_dict() == {"a": 16, "b": 3, "c": 1}
    assert one["id"].astype(int).is_monotonic_increasing
    assert sample_truth(truth, None, 0).equals(truth)


@pytest.mark.parametrize("extra, message", [
    (["train.best_by=score"], "needs train.eval_metric"),
    (["train.patience=2"], "needs train.best_by"),
])
def test_bad_combinations_are_one_line_errors(tiny_model_dir, prepared_dir, tmp_path, extra, message):
    with pytest.raises(VlmtaxError, match=message):
        sft(TINY_RECIPE, tiny_overrides(tiny_model_dir, prepared_dir, tmp_path / "run", "train.max_steps=1", *extra))


def test_generate_route_decodes_with_the_runs_template(json_run_dir, synth_dir, tmp_path):
    """The in-training metric decodes as predict does, in the run's own answer layout (here JSON)."""
    from vlmtax.data.records import load_records
    from vlmtax.data.run_taxonomy import load_taxonomy
    from vlmtax.fileio import read_csv
    from vlmtax.generate.predictor import generate_route
    from vlmtax.models.loading import load_for_inference
    from vlmtax.predict import predict
    from vlmtax.train.evaluation import plan_eval_rows

    data = json_run_dir.parent / "data"
    taxonomy = load_taxonomy(json_run_dir, None)
    assert taxonomy.template.name == "json"
    truth = read_csv(data / "val.csv", "truth", ["id", "Category"]).head(8)
    truth.to_csv(tmp_path / "val8.csv", index=False)
    rows = plan_eval_rows(truth, load_records(data, "val.json"), taxonomy)
    model, processor, _ = load_for_inference(json_run_dir)
    decoded = generate_route(processor, 4, taxonomy.template)(model, rows)
    predict(model=json_run_dir, csv=tmp_path / "val8.csv", images=synth_dir / "train_images",
            out=tmp_path / "sub.csv", probs=tmp_path / "p.jsonl", batch_size=4)
    lines = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    for row, line in zip(rows, lines):
        assert decoded[row.index]["values"] == {a: v["value"] for a, v in line["attributes"].items()}
