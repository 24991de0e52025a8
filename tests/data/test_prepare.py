"""prepare: filling rules, remaps, normalisation, split, rejects, atomic output, CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from vlmtax.data.prepare import _stratified_split, prepare
from vlmtax.data.taxonomy import Taxonomy
from vlmtax.errors import VlmtaxError

ATTRS = {"categories": {"Tees": ["color", "neck", "sleeve"], "Sarees": ["border", "blouse", "color"]}}


def _csv(path: Path, rows: list[dict]) -> Path:
    frame = pd.DataFrame(rows)
    for k in range(1, 11):
        if f"attr_{k}" not in frame:
            frame[f"attr_{k}"] = None
    frame.to_csv(path, index=False)
    return path


@pytest.fixture()
def catalogue(tmp_path: Path) -> dict[str, Path]:
    """Six rows with known gaps: Tees colour modes to red, neck to round, sleeve to short."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(1, 7):
        Image.new("RGB", (40, 30), (40 * i, 10, 10)).save(images / f"{i:06d}.jpg")
    rows = [
        {"id": 1, "Category": "Tees", "len": 3, "attr_1": "Red", "attr_2": "round", "attr_3": "short"},
        {"id": 2, "Category": "Tees", "len": 3, "attr_1": " red\n", "attr_2": None, "attr_3": "long"},
        {"id": 3, "Category": "Tees", "len": 3, "attr_1": "BLUE", "attr_2": "round", "attr_3": None},
        {"id": 4, "Category": "Tees", "len": 3, "attr_1": "red", "attr_2": "polo", "attr_3": "short"},
        {"id": 5, "Category": "Sarees", "len": 3, "attr_1": "zari", "attr_2": "same  as saree", "attr_3": "Pink"},
        {"id": 6, "Category": "Sarees", "len": 3, "attr_1": None, "attr_2": "solid", "attr_3": "pink"},
    ]
    attrs = tmp_path / "attrs.json"
    attrs.write_text(json.dumps(ATTRS))
    return {"csv": _csv(tmp_path / "train.csv", rows), "images": images, "attributes": attrs, "root": tmp_path}


def _run(cat: dict[str, Path], out: str = "out", **kw) -> tuple[dict, Path]:
    out_dir = cat["root"] / out
    kw.setdefault("val_fraction", 0.0)
    report = prepare(csv=cat["csv"], images=cat["images"], attributes=cat["attributes"], out=out_dir, **kw)
    return report, out_dir


def _records(out: Path) -> dict[str, dict]:
    recs = json.loads((out / "train.json").read_text()) + json.loads((out / "val.json").read_text())
    return {r["id"]: r for r in recs}


def test_mode_fills_missing_labels_with_category_mode(catalogue):
    _, out = _run(catalogue, missing="mode")
    recs = _records(out)
    assert recs["2"]["messages"][1]["content"] == "color: red\nneck: round\nsleeve: long"
    assert recs["3"]["messages"][1]["content"] == "color: blue\nneck: round\nsleeve: short"
    assert recs["6"]["attributes"] == {"border": "zari", "blouse": "solid", "color": "pink"}
    assert all(r["masked"] == [] for r in recs.values())
    assert recs["1"]["messages"][0]["content"].startswith("<image>")
    prompt = recs["1"]["messages"][0]["content"]
    assert "Tees" in prompt and "color, neck, sleeve" in prompt


def test_mask_keeps_value_in_text_and_lists_it(catalogue):
    _, out = _run(catalogue, missing="mask")
    recs = _records(out)
    assert recs["2"]["messages"][1]["content"] == "color: red\nneck: round\nsleeve: long"
    assert recs["2"]["masked"] == ["neck"]
    assert recs["3"]["masked"] == ["sleeve"]
    assert recs["6"]["masked"] == ["border"]
    assert recs["1"]["masked"] == []


def test_skip_drops_rows_with_gaps_and_reports_them(catalogue):
    report, out = _run(catalogue, missing="skip")
    assert sorted(_records(out)) == ["1", "4", "5"]
    rejects = pd.read_csv(out / "rejects.csv", dtype=str)
    assert sorted(rejects["id"]) == ["2", "3", "6"]
    assert set(rejects["reason"]) == {"missing_labels"}
    assert report["per_reason"] == {"missing_labels": 3}


def test_normalisation_and_vocabulary(catalogue):
    _, out = _run(catalogue)
    tax = Taxonomy.load(out / "taxonomy.json")
    color = tax.categories["Tees"].attributes[0]
    assert color.values == ["red", "blue"] and color.counts == {"red": 3, "blue": 1} and color.mode == "red"
    assert tax.categories["Sarees"].attributes[1].values == ["same as saree", "solid"]


def test_remap_applied_recorded_and_truth_keeps_original_columns(catalogue):
    _, out = _run(catalogue, remaps=["Sarees:attr_1<->attr_3"], val_fraction=0.5)
    tax = Taxonomy.load(out / "taxonomy.json")
    sarees = tax.categories["Sarees"]
    assert [(a.name, a.column) for a in sarees.attributes] == [("color", "attr_3"), ("blouse", "attr_2"),
                                                               ("border", "attr_1")]
    assert tax.remaps[0].category == "Sarees"
    recs = _records(out)
    assert recs["5"]["messages"][1]["content"] == "color: pink\nblouse: same as saree\nborder: zari"
    truth = pd.read_csv(out / "val.csv", dtype=str, keep_default_na=False)
    saree_row = truth[truth["Category"] == "Sarees"].iloc[0]
    assert saree_row["attr_3"] == "pink" and saree_row["attr_4"] == "dummy"


def test_remap_from_attribute_file(catalogue):
    spec = dict(ATTRS, remaps=["Sarees:attr_1<->attr_3"])
    catalogue["attributes"].write_text(json.dumps(spec))
    _, out = _run(catalogue)
    assert Taxonomy.load(out / "taxonomy.json").categories["Sarees"].attributes[0].name == "color"


def test_stratified_split_is_deterministic_and_per_category():
    cats = pd.Series(["a"] * 50 + ["b"] * 30 + ["c"] * 2)
    m1 = _stratified_split(cats, 0.2, seed=7)
    assert np.array_equal(m1, _stratified_split(cats, 0.2, seed=7))
    assert not np.array_equal(m1, _stratified_split(cats, 0.2, seed=8))
    assert m1[:50].sum() == 10 and m1[50:80].sum() == 6 and m1[80:].sum() == 1


def test_val_csv_is_truth_in_submission_layout(catalogue):
    report, out = _run(catalogue, val_fraction=0.5)
    truth = pd.read_csv(out / "val.csv", dtype=str, keep_default_na=False)
    assert list(truth.columns) == ["id", "Category", "len"] + [f"attr_{i}" for i in range(1, 11)]
    assert len(truth) == report["val_records"] == 3
    assert (truth[[f"attr_{i}" for i in range(4, 11)]] == "dummy").all().all()
    val_ids = {r["id"] for r in json.loads((out / "val.json").read_text())}
    assert set(truth["id"]) == val_ids


@pytest.mark.parametrize("verify", ["fast", "full"])
def test_every_reject_reason(tmp_path: Path, verify: str):
    images = tmp_path / "images"
    images.mkdir()
    for i in (1, 2, 3, 4, 5, 9):
        Image.new("RGB", (32, 32), (200, 0, 0)).save(images / f"{i:06d}.jpg")
    (images / "000006.jpg").write_bytes(b"not an image at all")
    good = (images / "000001.jpg").read_bytes()
    (images / "000007.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG
    (tmp_path / "secret.jpg").write_bytes(good)
    base = {"attr_1": "red", "attr_2": "round", "attr_3": "short"}
    rows = [
        {"id": 1, "Category": "Tees", "len": 3, **base},
        {"id": 1, "Category": "Tees", "len": 3, **base},  # duplicate_id
        {"id": 2, "Category": "Hats", "len": 3, **base},  # unknown_category
        {"id": 3, "Category": "Tees", "len": 5, **base},  # len_mismatch
        {"id": 8, "Category": "Tees", "len": 3, **base},  # missing_image
        {"id": 6, "Category": "Tees", "len": 3, **base},  # unreadable_image
        {"id": 7, "Category": "Tees", "len": 3, **base},  # truncated -> unreadable_image
        {"id": 9, "Category": "Tees", "len": 3, **base, "image": "../secret.jpg"},  # image_outside_folder
    ]
    attrs = tmp_path / "attrs.json"
    attrs.write_text(json.dumps(ATTRS))
    report = prepare(csv=_csv(tmp_path / "t.csv", rows), images=images, attributes=attrs, out=tmp_path / "out",
                     val_fraction=0.0, verify_images=verify)
    rejects = pd.read_csv(tmp_path / "out" / "rejects.csv", dtype=str)
    got = dict(zip(rejects["reason"], rejects["id"]))
    assert report["per_reason"] == {"duplicate_id": 1, "unknown_category": 1, "len_mismatch": 1,
                                    "missing_image": 1, "unreadable_image": 2, "image_outside_folder": 1}
    assert got["unknown_category"] == "2" and got["len_mismatch"] == "3" and got["image_outside_folder"] == "9"
    assert sorted(rejects[rejects["reason"] == "unreadable_image"]["id"]) == ["6", "7"]
    assert report["train_records"] == 1
    assert json.loads((tmp_path / "out" / "prepare_meta.json").read_text())["verify_images"] == verify

    with pytest.raises(VlmtaxError, match="--strict"):
        prepare(csv=tmp_path / "t.csv", images=images, attributes=attrs, out=tmp_path / "strict", strict=True)
    assert not (tmp_path / "strict").exists()


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK", "I;16"])
def test_any_pil_mode_is_accepted(tmp_path: Path, mode: str):
    images = tmp_path / "images"
    images.mkdir()
    ext = "tif" if mode in ("CMYK", "I;16") else "png"
    Image.new(mode, (24, 24)).save(images / f"000001.{ext}")
    attrs = tmp_path / "attrs.json"
    attrs.write_text(json.dumps(ATTRS))
    csv = _csv(tmp_path / "t.csv", [{"id": 1, "Category": "Tees", "len": 3, "attr_1": "a", "attr_2": "b",
                                     "attr_3": "c"}])
    report = prepare(csv=csv, images=images, attributes=attrs, out=tmp_path / "out", val_fraction=0.0,
                     image_pattern="{id:06d}." + ext)
    assert report["rejected"] == 0 and report["train_records"] == 1


def test_alpaca_format_and_dataset_info(catalogue):
    _, out = _run(catalogue, format="alpaca")
    rec = json.loads((out / "train.json").read_text())[0]
    assert set(rec) >= {"instruction", "input", "output", "images"}
    assert rec["output"].startswith("color: ")
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["vlmtax_train"]["columns"]["response"] == "output"
    assert info["vlmtax_train"]["file_name"] == "train.json"


def test_sharegpt_dataset_info_matches_llamafactory_keys(catalogue):
    _, out = _run(catalogue)
    info = json.loads((out / "dataset_info.json").read_text())["vlmtax_train"]
    assert info["formatting"] == "sharegpt"
    assert info["columns"] == {"messages": "messages", "images": "images"}
    assert info["tags"]["user_tag"] == "user" and info["tags"]["assistant_tag"] == "assistant"


def test_file_problems_are_errors_without_partial_output(catalogue, tmp_path: Path):
    bad = tmp_path / "bad.csv"
    bad.write_text("id,Category\n1,Tees\n")
    with pytest.raises(VlmtaxError, match="len"):
        prepare(csv=bad, images=catalogue["images"], attributes=catalogue["attributes"], out=tmp_path / "o1")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(VlmtaxError, match="empty"):
        prepare(csv=empty, images=catalogue["images"], attributes=catalogue["attributes"], out=tmp_path / "o2")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 nonsense")
    with pytest.raises(VlmtaxError, match="cannot read"):
        prepare(csv=catalogue["csv"], images=catalogue["images"], attributes=broken, out=tmp_path / "o3")
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3))


def test_every_row_rejected_counts_the_reasons(catalogue, tmp_path: Path):
    empty_images = tmp_path / "no_images"
    empty_images.mkdir()
    n_rows = len(pd.read_csv(catalogue["csv"]))
    with pytest.raises(VlmtaxError, match=rf"every row was rejected \(missing_image {n_rows}\)"):
        prepare(csv=catalogue["csv"], images=empty_images, attributes=catalogue["attributes"], out=tmp_path / "o")
    # No training records, but the reasons are still where the user looks.
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["prepare_meta.json", "rejects.csv", "report.json"]
    assert len(pd.read_csv(tmp_path / "o" / "rejects.csv")) == n_rows


def test_out_dir_holding_another_dataset_is_refused(catalogue, tmp_path: Path):
    _run(catalogue)
    _run(catalogue)  # the same dataset again is fine: it is replaced
    other = tmp_path / "other.csv"
    other.write_text(catalogue["csv"].read_text().replace("zari", "woven"))
    with pytest.raises(VlmtaxError, match="different dataset"):
        prepare(csv=other, images=catalogue["images"], attributes=catalogue["attributes"],
                out=catalogue["root"] / "out")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    with pytest.raises(VlmtaxError, match="files prepare did not write"):
        prepare(csv=catalogue["csv"], images=catalogue["images"], attributes=catalogue["attributes"], out=junk)
    assert (junk / "notes.txt").read_text() == "mine"
    (catalogue["root"] / "out" / "notes.txt").write_text("mine too")  # a file the user keeps in a dataset
    with pytest.raises(VlmtaxError, match=r"files prepare did not write \(notes.txt\)"):
        _run(catalogue)
    assert (catalogue["root"] / "out" / "notes.txt").read_text() == "mine too"


def test_parquet_attribute_file_in_meesho_layout(catalogue, tmp_path: Path):
    frame = pd.DataFrame({"Category": ["Tees", "Sarees"], "No_of_attribute": [3, 3],
                          "Attribute_list": [["color", "neck", "sleeve"], ["border", "blouse", "color"]]})
    path = tmp_path / "category_attributes.parquet"
    frame.to_parquet(path)
    report = prepare(csv=catalogue["csv"], images=catalogue["images"], attributes=path, out=tmp_path / "o",
                     val_fraction=0.0)
    assert report["train_records"] == 6


def test_cli_one_line_error_and_exit_code(catalogue, tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, "-m", "vlmtax", "prepare", "--csv", str(tmp_path / "nope.csv"), "--images",
         str(catalogue["images"]), "--attributes", str(catalogue["attributes"]), "--out", str(tmp_path / "o")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "nope.csv" in proc.stderr and "Traceback" not in proc.stderr


def test_a_remap_declared_twice_is_an_error(catalogue):
    spec = dict(ATTRS, remaps=["Sarees:attr_1<->attr_3"])
    catalogue["attributes"].write_text(json.dumps(spec))
    with pytest.raises(VlmtaxError, match="declared twice"):
        _run(catalogue, remaps=["Sarees:attr_3<->attr_1"])


DATA_TEMPLATES = Path(__file__).resolve().parents[2] / "data_templates"


def test_a_template_renders_the_records_and_travels_in_the_taxonomy(catalogue):
    _, out = _run(catalogue, template=DATA_TEMPLATES / "json_with_values.yaml")
    rec = _records(out)["1"]
    system, user, answer = (m["content"] for m in rec["messages"])
    assert system.startswith("You label product photos") and "color: red, blue\n" in user
    assert answer == '{"color": "red", "neck": "round", "sleeve": "short"}'
    tax = Taxonomy.load(out / "taxonomy.json")
    assert tax.template.name == "json_with_values" and tax.template.answer.begin == "{"
    assert json.loads((out / "prepare_meta.json").read_text())["template"] == "json_with_values"
    _, alpaca = _run(catalogue, out="alpaca", format="alpaca", template=DATA_TEMPLATES / "json_with_values.yaml")
    assert json.loads((alpaca / "dataset_info.json").read_text())["vlmtax_train"]["columns"]["system"] == "system"
    assert json.loads((alpaca / "train.json").read_text())[0]["system"] == system


@pytest.mark.parametrize("text, problem", [
    ("prompt: '{image}Fill {atributes}'\n", "unknown placeholder {atributes}"),
    ("answer: {field: '{value}', separator: ' '}\n", "only whitespace separates color from neck"),
])
def test_cli_refuses_a_bad_template_in_one_line(catalogue, tmp_path: Path, text: str, problem: str):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    proc = subprocess.run(
        [sys.executable, "-m", "vlmtax", "prepare", "--csv", str(catalogue["csv"]), "--images",
         str(catalogue["images"]), "--attributes", str(catalogue["attributes"]), "--out", str(tmp_path / "o"),
         "--template", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and problem in proc.stderr
    assert not (tmp_path / "o").exists()


def _declare(catalogue, values: list[str]) -> None:
    spec = {"categories": {"Tees": [{"name": "color", "values": values}, "neck", "sleeve"],
                           "Sarees": ATTRS["categories"]["Sarees"]}}
    catalogue["attributes"].write_text(json.dumps(spec))


def test_declared_values_close_the_vocabulary_and_reject_other_labels(catalogue):
    _declare(catalogue, ["Red", "green"])
    report, out = _run(catalogue)
    rejects = pd.read_csv(out / "rejects.csv", dtype=str)
    assert rejects[["id", "reason"]].values.tolist() == [["3", "value_not_in_schema"]]
    assert "color='blue'" in rejects["detail"].iat[0]
    color = Taxonomy.load(out / "taxonomy.json").categories["Tees"].attributes[0]
    assert color.values == ["red", "green"] and color.counts == {"red": 3, "green": 0}  # unseen stays allowed
    assert report["per_reason"] == {"value_not_in_schema": 1}


def test_map_unknown_mode_keeps_the_row_with_the_mode(catalogue):
    _declare(catalogue, ["red", "green"])
    _, out = _run(catalogue, map_unknown="mode")
    assert _records(out)["3"]["attributes"]["color"] == "red"
    assert pd.read_csv(out / "rejects.csv").empty


def test_declared_values_must_be_a_list(catalogue):
    _declare(catalogue, [])
    with pytest.raises(VlmtaxError, match="values of 'color' must be a non-empty list"):
        _run(catalogue)
