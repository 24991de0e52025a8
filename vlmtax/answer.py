"""The one place that renders and parses prompt and answer text.

Answer format (one line per attribute, in the category's taxonomy order, no trailing newline):

    color: navy blue
    pattern: solid
    sleeve_length: short sleeves

The answer is also exposed as segments (fixed text / value / separator) so that training can
tokenise it piece by piece, mask individual values, and constrained decoding can force the fixed
pieces and score the values with exactly the same tokens the model was trained on.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from vlmtax.taxonomy import Category

IMAGE_PLACEHOLDER = "<image>"
KEY_SEP = ":"
VALUE_PREFIX = " "
LINE_SEP = "\n"

PROMPT_TEMPLATE = (
    "{image}This is a product image from the category {category}. "
    "Fill in its attributes: {attributes}. "
    "Answer with one line per attribute, formatted as `attribute: value`."
)


@dataclass(frozen=True)
class Segment:
    """A piece of the answer. `attribute` is set on value pieces only."""

    text: str
    attribute: str | None = None


def render_prompt(category: Category, template: str = PROMPT_TEMPLATE, image: str = IMAGE_PLACEHOLDER) -> str:
    return template.format(image=image, category=category.name, attributes=", ".join(category.attribute_names()))


def key_text(index: int, attribute: str) -> str:
    """Fixed text before value number `index` (the line break of the previous line included)."""
    return (LINE_SEP if index else "") + attribute + KEY_SEP


def answer_segments(category: Category, values: dict[str, str]) -> list[Segment]:
    """Fixed keys and values, alternating; the value text carries its leading space."""
    segments: list[Segment] = []
    for i, attr in enumerate(category.attributes):
        segments.append(Segment(key_text(i, attr.name)))
        segments.append(Segment(VALUE_PREFIX + values[attr.name], attr.name))
    return segments


def render_answer(category: Category, values: dict[str, str]) -> str:
    return "".join(s.text for s in answer_segments(category, values))


def parse_answer(text: str, category: Category) -> dict[str, str | None]:
    """Read `attribute: value` lines back; attributes that are absent come back as None.

    Lenient on what free generation produces: surrounding whitespace, case, blank lines, extra lines.
    """
    wanted = {a.name.lower(): a.name for a in category.attributes}
    out: dict[str, str | None] = {a.name: None for a in category.attributes}
    for line in text.splitlines():
        key, sep, value = line.partition(KEY_SEP)
        if not sep:
            continue
        name = wanted.get(key.strip().strip("`*-\" ").lower())
        if name is not None and out[name] is None:
            value = " ".join(value.split()).strip("`*\"' ,.").lower()
            out[name] = value or None
    return out


def snap(value: str | None, allowed: list[str]) -> tuple[str, bool]:
    """Closest allowed value (exact, then fuzzy); the flag says whether snapping changed it.

    `allowed` must be ordered most frequent first: an unparseable value falls back to the mode.
    """
    if value is not None and value in allowed:
        return value, False
    if value:
        close = difflib.get_close_matches(value, allowed, n=1, cutoff=0.0)
        if close:
            return close[0], True
    return allowed[0], True
