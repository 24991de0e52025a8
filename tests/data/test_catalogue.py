"""catalogue: the shipped schema templates (data_templates/catalogue, dataset_info.json) are what they claim."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from conftest import DATA_TEMPLATES

from vlmtax.data.catalogue import read_category_attributes
from vlmtax.data.prepare_write import _dataset_info
from vlmtax.data.taxonomy import SLOT_COLUMNS

# The shared label statistics the file was written from, beside the repository (absent in a bare checkout).
STATS = next((p for p in (Path(__file__).resolve().parents[3] / "shared" / "meesho_label_stats.json",
                          Path("/work/shared/meesho_label_stats.json")) if p.is_file()), None)


def test_catalogue_template_matches_the_meesho_layout_and_label_stats():
    spec = read_category_attributes(DATA_TEMPLATES / "catalogue" / "category_attributes.yaml")
    assert list(pd.read_csv(DATA_TEMPLATES / "catalogue" / "train.csv").columns) == \
        ["id", "Category", "len", *SLOT_COLUMNS]
    assert list(pd.read_csv(DATA_TEMPLATES / "catalogue" / "test.csv").columns) == ["id", "Category"]
    assert len(spec.attributes) == 5 and spec.attributes["Sarees"][3] == "color"
    assert "ocassion" in spec.attributes["Women Tops & Tunics"]
    if STATS is not None:
        for cat in json.loads(STATS.read_text())["categories"]:
            assert spec.attributes[cat["name"]] == [a["name"] for a in cat["attributes"]]
            assert spec.values[cat["name"]] == {a["name"]: list(a["values"]) for a in cat["attributes"]}


def test_dataset_info_template_is_what_prepare_writes():
    info = json.loads((DATA_TEMPLATES / "dataset_info.json").read_text())
    alpaca = {f"{k}_alpaca": v for k, v in _dataset_info("alpaca", False).items()}
    assert info == {**_dataset_info("sharegpt", False), **alpaca}
