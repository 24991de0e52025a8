"""taxonomy: normalisation, vocabulary and mode, remap slot order, load/save validation."""

import pandas as pd
import pytest

from vlmtax.data.taxonomy import Remap, Taxonomy, build_taxonomy, normalise, slot_order
from vlmtax.errors import VlmtaxError


def test_normalise():
    assert normalise("  Navy \n Blue\n") == "navy blue"
    assert normalise("") is None and normalise("   ") is None and normalise(float("nan")) is None
    assert normalise(None) is None


def test_mode_ties_break_alphabetically_and_counts_ordered():
    frame = pd.DataFrame({"Category": ["A"] * 4, "attr_1": ["b", "a", "b", "a"], "attr_2": ["x", None, None, "y"]})
    tax = build_taxonomy(frame, {"A": ["one", "two"]}, [])
    one, two = tax.categories["A"].attributes
    assert one.mode == "a" and one.values == ["a", "b"]
    assert two.counts == {"x": 1, "y": 1}


def test_attribute_with_no_labels_falls_back_to_filler():
    frame = pd.DataFrame({"Category": ["A"], "attr_1": [None]})
    tax = build_taxonomy(frame, {"A": ["one"]}, [], filler="dummy")
    assert tax.categories["A"].attributes[0].values == ["dummy"]


def test_slot_order_and_remap_parse():
    r = Remap.parse("Sarees:attr_1<->attr_4")
    assert (r.category, r.a, r.b) == ("Sarees", "attr_1", "attr_4")
    assert slot_order(5, [r], "Sarees")[:4] == ["attr_4", "attr_2", "attr_3", "attr_1"]
    assert slot_order(5, [r], "Kurtis")[0] == "attr_1"
    with pytest.raises(VlmtaxError, match="only 3"):
        slot_order(3, [r], "Sarees")
    with pytest.raises(VlmtaxError, match="remap"):
        Remap.parse("Sarees attr_1 attr_4")


def test_load_rejects_invalid_file(tmp_path):
    bad = tmp_path / "t.json"
    bad.write_text('{"categories": {"A": {"name": "A"}}}')
    with pytest.raises(VlmtaxError, match="invalid"):
        Taxonomy.load(bad)
    with pytest.raises(VlmtaxError, match="unknown category"):
        Taxonomy(categories={}).category("B")
