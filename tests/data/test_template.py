"""template: shipped YAML files load; unknown keys or placeholders, no {value} or {image}: one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlmtax.data.template import Template, load_template, substitute
from vlmtax.errors import VlmtaxError

DATA_TEMPLATES = Path(__file__).resolve().parents[2] / "data_templates"


@pytest.mark.parametrize("name", ["lines", "json", "json_with_values"])
def test_shipped_templates_load(name):
    assert load_template(DATA_TEMPLATES / f"{name}.yaml").name == name


@pytest.mark.parametrize("text, problem", [
    ("prompt: '{image} {colour}'\n", "prompt has unknown placeholder {colour}"),
    ("answer: {field: '{name}={valeu}'}\n", "answer.field has unknown placeholder {valeu}"),
    ("answer: {field: '{name}'}\n", "answer.field must hold {value} exactly once"),
    ("prompt: 'no image here'\n", "the prompt must hold {image} exactly once"),
    ("answer: {sep: ','}\n", "invalid at answer.sep"),
    ("answer: {escape: xml}\n", "invalid at answer.escape"),
    ("- a list\n", "is not a mapping"),
    ("prompt: [unclosed\n", "cannot read template"),
])
def test_bad_templates_are_one_line_errors(tmp_path, text, problem):
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(VlmtaxError, match=None) as err:
        load_template(path)
    assert problem in str(err.value) and "\n" not in str(err.value)


def test_missing_file_and_literal_braces():
    with pytest.raises(VlmtaxError, match="template file not found"):
        load_template(DATA_TEMPLATES / "nope.yaml")
    # Braces around anything but a bare word are text: a JSON example needs no escaping.
    assert substitute('{image}e.g. {"color": "red"} for {category}', {"image": "<image>", "category": "Tees"}) == \
        '<image>e.g. {"color": "red"} for Tees'
    assert Template().answer.field == "{name}: {value}"
