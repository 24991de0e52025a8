"""answer: one format rendered, segmented and parsed back; snapping to the vocabulary."""

from vlmtax.answer import answer_segments, parse_answer, render_answer, render_prompt, snap
from vlmtax.taxonomy import Attribute, Category


def _cat() -> Category:
    def attr(name: str, column: str, values: list[str]) -> Attribute:
        return Attribute(name=name, column=column, values=values, counts={v: 1 for v in values}, mode=values[0])

    return Category(name="Kurtis", len=2, attributes=[attr("color", "attr_1", ["navy blue", "red"]),
                                                       attr("sleeve_length", "attr_2", ["three-quarter sleeves"])])


def test_render_and_parse_round_trip():
    cat = _cat()
    values = {"color": "navy blue", "sleeve_length": "three-quarter sleeves"}
    text = render_answer(cat, values)
    assert text == "color: navy blue\nsleeve_length: three-quarter sleeves"
    assert parse_answer(text, cat) == values


def test_segments_concatenate_to_the_text_and_tag_values():
    cat = _cat()
    values = {"color": "red", "sleeve_length": "three-quarter sleeves"}
    segs = answer_segments(cat, values)
    assert "".join(s.text for s in segs) == render_answer(cat, values)
    assert [(s.text, s.attribute) for s in segs if s.attribute] == [(" red", "color"),
                                                                     (" three-quarter sleeves", "sleeve_length")]


def test_parse_is_lenient_with_free_text():
    cat = _cat()
    text = "Sure!\n\n**Color**:  Navy   Blue.\nsomething else\nsleeve_length - long"
    assert parse_answer(text, cat) == {"color": "navy blue", "sleeve_length": None}


def test_snap():
    allowed = ["navy blue", "red"]
    assert snap("red", allowed) == ("red", False)
    assert snap("navy", allowed) == ("navy blue", True)
    assert snap(None, allowed) == ("navy blue", True)


def test_prompt_names_category_and_attributes():
    prompt = render_prompt(_cat())
    assert prompt.startswith("<image>") and "Kurtis" in prompt and "color, sleeve_length" in prompt
