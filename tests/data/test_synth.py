"""synth: byte-for-byte determinism, Meesho layout and dtypes, label statistics, visible attributes, CLI."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlmtax.data import synth as synth_module
from vlmtax.data.catalogue import read_category_attributes
from vlmtax.data.synth import _Painter, load_stats, synth
from vlmtax.data.taxonomy import SLOT_COLUMNS, normalise
from vlmtax.errors import VlmtaxError

STATS = load_stats()
ATTRS = {c["name"]: [a["name"] for a in c["attributes"]] for c in STATS["categories"]}
VOCAB = {c["name"]: [set(a["values"]) for a in c["attributes"]] for c in STATS["categories"]}
SIZE = 64


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """3000 training rows: enough for label frequencies and for averaging pixels per label."""
    out = synth(tmp_path_factory.mktemp("big") / "cat", rows=3000, test_rows=10, seed=7, image_size=SIZE)
    return out, _read(out / "train.csv")


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path: Path) -> None:
    a = _hashes(synth(tmp_path / "a", rows=40, test_rows=10, seed=3, image_size=32))
    b = _hashes(synth(tmp_path / "b", rows=40, test_rows=10, seed=3, image_size=32))
    c = _hashes(synth(tmp_path / "c", rows=40, test_rows=10, seed=4, image_size=32))
    assert a == b
    assert len(a) == 4 + 50
    assert a.keys() == c.keys()
    assert a["train.csv"] != c["train.csv"]
    assert sum(a[k] != c[k] for k in a if k.endswith(".jpg")) > 40


def test_layout_and_dtypes(tmp_path: Path) -> None:
    out = synth(tmp_path / "cat", rows=40, test_rows=10, seed=0, image_size=32)
    assert sorted(p.name for p in out.iterdir()) == [
        "category_attributes.parquet", "test.csv", "test_images", "test_labels.csv", "train.csv", "train_images"]
    slots = ["id", "Category", "len", *SLOT_COLUMNS]
    train, test, truth = _read(out / "train.csv"), _read(out / "test.csv"), _read(out / "test_labels.csv")
    assert list(train.columns) == slots and list(truth.columns) == slots
    assert list(test.columns) == ["id", "Category"]
    assert set(train["Category"]) == set(ATTRS)  # 40 rows are enough for every category
    assert test["id"].tolist() == truth["id"].tolist() and test["Category"].tolist() == truth["Category"].tolist()
    train_ids, test_ids = [int(i) for i in train["id"]], [int(i) for i in test["id"]]
    assert len(set(train_ids + test_ids)) == 50

    for frame, filler in ((train, ""), (truth, "dummy")):
        for _, row in frame.iterrows():
            n = len(ATTRS[row["Category"]])
            assert int(row["len"]) == n
            assert all(row[c] == filler for c in SLOT_COLUMNS[n:])
            for col, vocab in zip(SLOT_COLUMNS[:n], VOCAB[row["Category"]]):
                assert row[col] == "" or normalise(row[col]) in vocab

    for folder, ids in (("train_images", train_ids), ("test_images", test_ids)):
        assert sorted(p.name for p in (out / folder).iterdir()) == sorted(f"{i:06d}.jpg" for i in ids)
        with Image.open(out / folder / f"{ids[0]:06d}.jpg") as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (32, 32))

    table = pq.read_table(out / "category_attributes.parquet")
    assert table.schema.field("Category").type == pa.string()
    assert table.schema.field("No_of_attribute").type == pa.int64()
    assert table.schema.field("Attribute_list").type == pa.list_(pa.string())
    records = table.to_pylist()
    assert {r["Category"]: r["Attribute_list"] for r in records} == ATTRS
    assert all(r["No_of_attribute"] == len(r["Attribute_list"]) for r in records)
    assert "ocassion" in ATTRS["Women Tops & Tunics"]
    assert read_category_attributes(out / "category_attributes.parquet").attributes == ATTRS


def test_label_statistics_follow_meesho(big) -> None:
    _, train = big
    n_rows = len(train)
    total = sum(c["rows"] for c in STATS["categories"])
    raw = [v for col in SLOT_COLUMNS for v in train[col] if v]
    assert any(v != normalise(v) for v in raw)  # Meesho's stray spaces, newlines and capitals
    for cat in STATS["categories"]:
        rows = train[train["Category"] == cat["name"]]
        assert abs(len(rows) - n_rows * cat["rows"] / total) <= 1
        n = len(rows)
        for col, attr in zip(SLOT_COLUMNS, cat["attributes"]):
            cells = [normalise(v) for v in rows[col]]
            present = [v for v in cells if v is not None]
            assert set(present) <= set(attr["values"])
            p_missing = attr["missing"] / cat["rows"]
            assert abs((n - len(present)) / n - p_missing) < 4 * math.sqrt(p_missing * (1 - p_missing) / n) + 0.01
            top, top_count = max(attr["values"].items(), key=lambda kv: kv[1])
            p_top = top_count / sum(attr["values"].values())
            share = present.count(top) / len(present)
            assert abs(share - p_top) < 4 * math.sqrt(p_top * (1 - p_top) / len(present)) + 0.01, (cat, col)


def _images(out: Path, ids) -> np.ndarray:
    return np.stack([np.asarray(Image.open(out / "train_images" / f"{int(i):06d}.jpg"), float) for i in ids])


def _garment(images: np.ndarray) -> np.ndarray:
    """Per pixel, how far it is from the image's background (its top-left corner)."""
    background = images[:, :4, :4].mean(axis=(1, 2), keepdims=True)
    return np.abs(images - background).sum(axis=-1)


def _ids(train: pd.DataFrame, category: str, column: str, value: str, **others: str) -> pd.Series:
    rows = train[(train["Category"] == category) & (train[column].map(normalise) == value)]
    for col, val in others.items():
        rows = rows[rows[col].map(normalise) == val]
    assert len(rows) >= 5, (category, column, value)
    return rows["id"]


def _box(y0: float, y1: float, x0: float, x1: float) -> tuple[slice, slice]:
    return slice(int(y0 * SIZE), int(y1 * SIZE)), slice(int(x0 * SIZE), int(x1 * SIZE))


def test_colour_is_visible(big) -> None:
    out, train = big
    chest = (slice(None), *_box(0.36, 0.5, 0.42, 0.58))
    black = _images(out, _ids(train, "Men Tshirts", "attr_1", "black"))[chest].mean()
    white = _images(out, _ids(train, "Men Tshirts", "attr_1", "white"))[chest].mean()
    assert black < 90 and white > 200


def test_pattern_is_visible(big) -> None:
    out, train = big
    body = (slice(None), *_box(0.3, 0.7, 0.36, 0.64))
    spread = {}
    for value in ("solid", "printed"):
        ids = pd.concat([_ids(train, "Men Tshirts", "attr_3", value, attr_1=c) for c in ("black", "white")])
        spread[value] = _images(out, ids)[body].std(axis=(1, 2)).mean()  # spatial, per channel
    assert spread["printed"] > 2 * spread["solid"]


def test_stripes_and_checks_are_drawn() -> None:
    painter = _Painter(SIZE, np.random.default_rng(0))
    r = np.full(32, 0.5)
    body = _box(0.3, 0.7, 0.36, 0.64)

    def spread(**values: str) -> float:
        return painter.draw("Women Tops & Tunics", {"color": "blue", **values}, r)[body].std(axis=(0, 1)).mean()

    solid = spread(pattern="solid", print_or_pattern_type="solid")
    assert spread(pattern="striped", print_or_pattern_type="default") > 3 * solid
    assert spread(pattern="default", print_or_pattern_type="checked") > 3 * solid


def test_sleeve_and_garment_length_are_visible(big) -> None:
    out, train = big
    arms = _box(0.45, 0.62, 0.12, 0.27), _box(0.45, 0.62, 0.73, 0.88)

    def coverage(ids, boxes) -> float:
        g = _garment(_images(out, ids))
        return float(np.mean([g[(slice(None), *b)].mean() for b in boxes]))

    long = coverage(_ids(train, "Men Tshirts", "attr_5", "long sleeves"), arms)
    short = coverage(_ids(train, "Men Tshirts", "attr_5", "short sleeves"), arms)
    assert long > 4 * short
    hem = [_box(0.62, 0.85, 0.42, 0.58)]
    long = coverage(_ids(train, "Women Tshirts", "attr_3", "long"), hem)
    crop = coverage(_ids(train, "Women Tshirts", "attr_3", "crop"), hem)
    assert long > 4 * crop
    ankle = [_box(0.84, 0.92, 0.42, 0.58)]
    calf = coverage(_ids(train, "Kurtis", "attr_3", "calf length"), ankle)
    knee = coverage(_ids(train, "Kurtis", "attr_3", "knee length"), ankle)
    assert calf > 4 * knee


def test_refuses_bad_input_and_leaves_nothing_behind(tmp_path: Path, monkeypatch) -> None:
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    with pytest.raises(VlmtaxError, match="not empty"):
        synth(full, rows=5)
    for bad in ({"rows": 0}, {"test_rows": 0}, {"seed": -1}, {"image_size": 8}, {"rows": 2.5}):
        with pytest.raises(VlmtaxError):
            synth(tmp_path / "new", **bad)

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synth_module._Painter, "draw", boom)
    with pytest.raises(RuntimeError):
        synth(tmp_path / "broken", rows=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


def test_cli(tmp_path: Path) -> None:
    env = {**os.environ, "VLMTAX_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "vlmtax", "synth", str(tmp_path / "cat"), "--rows", "20", "--test-rows", "5"]
    ok = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert len(list((tmp_path / "cat" / "train_images").iterdir())) == 20
    again = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert again.returncode == 2
    assert len(again.stderr.strip().splitlines()) == 1 and "not empty" in again.stderr
