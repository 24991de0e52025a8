"""ensemble against predict on a trained tiny run: one model, tau 0 reproduces predict's CSV byte for byte."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from vlmtax.evaluate.ensemble import ensemble
from vlmtax.evaluate.tune import Settings, tune
from vlmtax.predict import predict

pytestmark = pytest.mark.usefixtures("single_thread")


def test_one_model_at_tau_zero_reproduces_predict(trained_run_dir, synth_dir, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(synth_dir / "test_images", images)
    test = pd.read_csv(synth_dir / "test.csv", dtype=str)
    extra = pd.DataFrame([{"id": "900001", "Category": "Socks"},  # unknown category
                          {"id": "900002", "Category": test.iloc[0]["Category"]}])  # no image
    pd.concat([test.iloc[:3], extra, test.iloc[3:]], ignore_index=True).to_csv(tmp_path / "test.csv", index=False)
    predict(model=trained_run_dir, csv=tmp_path / "test.csv", images=images, out=tmp_path / "pred.csv",
            probs=tmp_path / "pred.jsonl", batch_size=8)
    tax = trained_run_dir / "taxonomy.json"
    dec = tune([tmp_path / "pred.jsonl"], synth_dir / "test_labels.csv", tmp_path / "d.json", tax,
               Settings(taus=(0.0,), folds=0))
    assert all(a["tau"] == 0 for a in dec["attributes"])
    ensemble([tmp_path / "pred.jsonl"], tmp_path / "ens.csv", decision=tmp_path / "d.json",
             probs_out=tmp_path / "ens.jsonl")
    assert (tmp_path / "ens.csv").read_bytes() == (tmp_path / "pred.csv").read_bytes()
    # Same rejects, same reasons (the detail says which input rejected the row).
    a, b = (pd.read_csv(tmp_path / n, dtype=str) for n in ("pred.rejects.csv", "ens.rejects.csv"))
    assert a[["id", "reason"]].equals(b[["id", "reason"]]) and len(a) == 2
    # The combined probabilities of one model at temperature 1 are its own.
    dec_t1 = json.loads((tmp_path / "d.json").read_text())
    dec_t1["models"][0]["temperature"] = 1.0
    (tmp_path / "d1.json").write_text(json.dumps(dec_t1))
    ensemble([tmp_path / "pred.jsonl"], tmp_path / "ens1.csv", decision=tmp_path / "d1.json",
             probs_out=tmp_path / "ens1.jsonl")
    for x, y in zip(*((json.loads(s) for s in (tmp_path / n).read_text().splitlines())
                      for n in ("pred.jsonl", "ens1.jsonl"))):
        assert x.keys() == y.keys() and x.get("reject") == y.get("reject")
        for name, attr in x["attributes"].items():
            assert y["attributes"][name]["value"] == attr["value"]
            assert y["attributes"][name]["probs"] == pytest.approx(attr["probs"], abs=1e-9)
