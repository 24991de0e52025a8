"""answer: each template's layout rendered, segmented and parsed back; ambiguous layouts refused; snapping."""

from pathlib import Path

import pytest

from vlmtax.data.answer import (
    DEFAULT_TEMPLATE,
    answer_segments,
    check_layout,
    parse_answer,
    render_answer,
    render_prompt,
    snap,
)
from vlmtax.data.taxonomy import Attribute, Category, Taxonomy
from vlmtax.data.template import AnswerLayout, Template, load_template
from vlmtax.errors import VlmtaxError


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


DATA_TEMPLATES = Path(__file__).resolve().parents[2] / "data_templates"
EXPECTED = {  # the exact answer text of each shipped template for one fixed record
    "lines": "color: navy blue\nsleeve_length: three-quarter sleeves",
    "json": '{"color": "navy blue", "sleeve_length": "three-quarter sleeves"}',
    "json_with_values": '{"color": "navy blue", "sleeve_length": "three-quarter sleeves"}',
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_shipped_template_renders_its_exact_text_and_parses_it_back(name):
    template, cat = load_template(DATA_TEMPLATES / f"{name}.yaml"), _cat()
    values = {"color": "navy blue", "sleeve_length": "three-quarter sleeves"}
    text = render_answer(cat, values, template)
    assert text == EXPECTED[name]
    assert "".join(s.text for s in answer_segments(cat, values, template)) == text
    assert parse_answer(text, cat, template) == values


def test_lines_yaml_is_the_built_in_default():
    assert load_template(DATA_TEMPLATES / "lines.yaml") == DEFAULT_TEMPLATE


def test_json_values_are_escaped_and_segmented_on_word_boundaries():
    template, cat = load_template(DATA_TEMPLATES / "json.yaml"), _cat()
    segs = answer_segments(cat, {"color": 'a "b"', "sleeve_length": "three-quarter sleeves"}, template)
    assert [s.text for s in segs] == ['{"color": "', 'a \\"b\\"', '", "sleeve_length": "', "three-quarter sleeves",
                                      '"}']


def test_json_parse_is_lenient_with_free_text():
    template, cat = load_template(DATA_TEMPLATES / "json.yaml"), _cat()
    text = 'Here you go:\n```json\n{"sleeve_length":"Long",\n  "Color" : "Navy Blue"}\n```'
    assert parse_answer(text, cat, template) == {"color": "navy blue", "sleeve_length": "long"}


def test_the_prompt_can_list_allowed_values():
    template = load_template(DATA_TEMPLATES / "json_with_values.yaml")
    prompt = render_prompt(_cat(), template)
    assert "color: navy blue, red\nsleeve_length: three-quarter sleeves\n" in prompt
    assert "{" not in prompt.replace("{image}", "")


def _taxonomy() -> Taxonomy:
    return Taxonomy(categories={"Kurtis": _cat()})


def test_a_layout_without_separators_is_ambiguous():
    template = Template(name="bare", answer=AnswerLayout(field="{value}", separator=" "))
    with pytest.raises(VlmtaxError, match="only whitespace separates color from sleeve_length"):
        check_layout(template, _taxonomy())


def test_a_separator_inside_a_value_is_ambiguous():
    template = Template(name="dash", answer=AnswerLayout(field="{value}", separator="-"))
    with pytest.raises(VlmtaxError, match="'navy blue' of color contains|'three-quarter"):
        check_layout(template, Taxonomy(categories={"K": _cat().model_copy(
            update={"attributes": [_cat().attributes[1], _cat().attributes[0]]})}))
    check_layout(Template(name="pipe", answer=AnswerLayout(field="{value}", separator=" | ")), _taxonomy())
