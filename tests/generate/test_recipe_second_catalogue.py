"""recipes/tiny_cpu.yaml beyond the demo: on another synthetic catalogue (seed 7, 600 rows instead of the demo's
4,000) the shipped recipe still learns to read colour off the images.

Its budget was once 8 epochs of the demo's 3,600 training rows (904 optimiser steps); on 540 rows that is 136
steps, and the model learned nothing from the images (colour at the constant baseline; a floor of 300 steps did
no better). `train.min_steps: 900` is the floor that holds on both: the demo's run is unchanged, and this
catalogue trains 900 steps. Measured: colour +0.79 to +0.90 per category, final 0.606 vs baseline 0.408.
"""

from __future__ import annotations

import json

import pytest
from conftest import SAREES_REMAP, TINY_RECIPE, cli_exit_code

COLOUR_MARGIN = 0.5  # issue 25's bar: colour beats the constant baseline by this, mean over the categories


@pytest.mark.slow
def test_tiny_cpu_learns_colour_on_a_second_catalogue(tmp_path, tiny_model_dir):
    cat, data, run = tmp_path / "cat", tmp_path / "data", tmp_path / "run"
    assert cli_exit_code(["synth", str(cat), "--seed", "7", "--rows", "600", "--test-rows", "150"]) == 0
    assert cli_exit_code(["prepare", "--csv", str(cat / "train.csv"), "--images", str(cat / "train_images"),
                          "--attributes", str(cat / "category_attributes.parquet"), "--out", str(data),
                          "--model", str(tiny_model_dir), "--max-pixels", "12544", "--missing", "mask",
                          "--remap", SAREES_REMAP]) == 0
    assert cli_exit_code(["sft", str(TINY_RECIPE), f"model={tiny_model_dir}", f"data={data}",
                          f"output_dir={run}"]) == 0
    meta = json.loads((run / "vlmtax_meta.json").read_text())
    assert meta["global_step"] == 900  # the floor, not 8 epochs of 540 rows (136 steps)
    assert cli_exit_code(["predict", "--model", str(run), "--csv", str(cat / "test.csv"), "--images",
                          str(cat / "test_images"), "--out", str(tmp_path / "sub.csv")]) == 0
    assert cli_exit_code(["score", "--truth", str(cat / "test_labels.csv"), "--pred", str(tmp_path / "sub.csv"),
                          "--taxonomy", str(run / "taxonomy.json"), "--json", str(tmp_path / "score.json")]) == 0
    report = json.loads((tmp_path / "score.json").read_text())
    gains = {c: a["attributes"]["color"]["score"] - a["attributes"]["color"]["baseline"]
             for c, a in report["categories"].items() if a["attributes"].get("color", {}).get("score") is not None}
    print("colour gain per category:", {k: round(v, 3) for k, v in gains.items()})
    assert sum(gains.values()) / len(gains) >= COLOUR_MARGIN, gains
