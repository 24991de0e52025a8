"""The one place that renders and parses prompt and answer text, from the run's template (template.py).

The default template (`data_templates/lines.yaml`) answers one line per attribute, in the category's taxonomy
order, no trailing newline:

    color: navy blue
    pattern: solid

`json.yaml` answers one JSON object, `{"color": "navy blue", "pattern": "solid"}`. Any layout is fixed text
around each value, so the answer is also exposed as segments (fixed text / value): training tokenises it
piece by piece and masks single values, and constrained decoding forces the fixed pieces and scores the
values with exactly the tokens the model was trained on. One space right before a value is tokenised with
the value (` navy`), as byte-level BPE tokenisers split words; every other fixed character stays fixed.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from vlmtax.data.taxonomy import Category, Taxonomy
from vlmtax.data.template import PLACEHOLDER, Template, load_template, substitute
from vlmtax.errors import VlmtaxError

IMAGE_PLACEHOLDER = "<image>"
DEFAULT_TEMPLATE = Template()
_DECORATION = r"[\s`*\"'-]*"  # markdown and quotes free generation puts around a key


@dataclass(frozen=True)
class Segment:
    """A piece of the answer. `attribute` is set on value pieces only."""

    text: str
    attribute: str | None = None


@dataclass(frozen=True)
class Layout:
    """A category's answer as fixed texts: fixed[i] precedes value i, fixed[-1] follows the last value."""

    fixed: list[str]
    prefixes: list[str]  # the space tokenised with each value ("" when the fixed text does not end in one)


def render_prompt(category: Category, template: Template = DEFAULT_TEMPLATE, image: str = IMAGE_PLACEHOLDER) -> str:
    allowed = "\n".join(substitute(template.allowed_line, {"name": a.name, "values": ", ".join(a.values)})
                        for a in category.attributes)
    return substitute(template.prompt, {"image": image, "category": category.name, "allowed": allowed,
                                        "attributes": ", ".join(category.attribute_names())})


def escape(value: str, template: Template) -> str:
    return json.dumps(value, ensure_ascii=False)[1:-1] if template.answer.escape == "json" else value


def _field_parts(template: Template, name: str) -> tuple[str, str]:
    """The field's text before and after {value}, with {name} filled in."""
    before, after = PLACEHOLDER.sub(lambda m: "\0" if m.group(1) == "value" else m.group(0),
                                    template.answer.field).split("\0")
    return substitute(before, {"name": name}), substitute(after, {"name": name})


def layout(category: Category, template: Template = DEFAULT_TEMPLATE) -> Layout:
    answer = template.answer
    fixed, prefixes, closing = [], [], ""
    for i, attr in enumerate(category.attributes):
        before, after = _field_parts(template, attr.name)
        text = (closing + answer.separator if i else answer.begin) + before
        prefix = " " if text.endswith(" ") else ""
        fixed.append(text[: len(text) - len(prefix)])
        prefixes.append(prefix)
        closing = after
    fixed.append(closing + answer.end)
    return Layout(fixed, prefixes)


def answer_segments(category: Category, values: dict[str, str],
                    template: Template = DEFAULT_TEMPLATE) -> list[Segment]:
    """Fixed texts and values, alternating; a value carries the space before it; the closing text last."""
    lay = layout(category, template)
    segments: list[Segment] = []
    for i, attr in enumerate(category.attributes):
        if lay.fixed[i]:
            segments.append(Segment(lay.fixed[i]))
        segments.append(Segment(lay.prefixes[i] + escape(values[attr.name], template), attr.name))
    if lay.fixed[-1]:
        segments.append(Segment(lay.fixed[-1]))
    return segments


def render_answer(category: Category, values: dict[str, str], template: Template = DEFAULT_TEMPLATE) -> str:
    return "".join(s.text for s in answer_segments(category, values, template))


def _clean(raw: str, template: Template) -> str | None:
    raw = raw.strip()
    if template.answer.escape == "json":
        try:
            raw = json.loads(f'"{raw}"')
        except json.JSONDecodeError:
            pass
    value = " ".join(raw.split()).strip("`*\"' ,.").lower()
    return value or None


def _parse_exact(text: str, lay: Layout) -> list[str] | None:
    """Values between the fixed texts, read in order; None when the text does not follow the layout."""
    pos = text.find(lay.fixed[0])
    if pos < 0:
        return None
    pos += len(lay.fixed[0])
    raw = []
    for closer in lay.fixed[1:]:
        end = text.find(closer, pos) if closer else -1
        if end < 0 and closer:
            return None
        if not closer:  # values never hold a line break (prepare collapses whitespace)
            end = text.find("\n", pos) if "\n" in text[pos:] else len(text)
        raw.append(text[pos:end])
        pos = end + len(closer)
    return raw


def _flex(text: str) -> str:
    """A regex for fixed text that tolerates any whitespace inside it (`"color" : "` for `"color": "`)."""
    return r"\s*".join(re.escape(c) for c in text if not c.isspace())


def _parse_lenient(text: str, category: Category, template: Template) -> list[str | None]:
    """Each attribute's value after its key, wherever it is: for free generation that strays from the layout."""
    found: list[str | None] = []
    for attr in category.attributes:
        before, after = _field_parts(template, attr.name)
        head, _, tail = before.partition(attr.name) if attr.name in before else ("", "", before)
        key = (_flex(head) + _DECORATION + rf"(?<!\w){re.escape(attr.name)}(?!\w)" + _DECORATION + _flex(tail)
               if attr.name in before else None)
        match = re.search(key, text, flags=re.IGNORECASE) if key else None
        if match is None:
            found.append(None)
            continue
        rest = text[match.end():].split("\n", 1)[0]
        closer = after.strip() or template.answer.separator.strip()
        end = re.search(r"(?<!\\)" + re.escape(closer), rest) if closer else None  # not an escaped quote
        found.append(rest[: end.start()] if end else rest)
    return found


def parse_answer(text: str, category: Category, template: Template = DEFAULT_TEMPLATE) -> dict[str, str | None]:
    """Read an answer back; attributes that are absent come back as None.

    The layout is read exactly when the text follows it; otherwise each attribute is looked up by its key,
    lenient on what free generation produces: surrounding text, case, markdown, whitespace, extra lines.
    """
    raw = _parse_exact(text, layout(category, template))
    if raw is None:
        raw = _parse_lenient(text, category, template)
    return {a.name: None if r is None else _clean(r, template) for a, r in zip(category.attributes, raw)}


def check_layout(template: Template, taxonomy: Taxonomy) -> None:
    """Refuse a layout whose fixed texts cannot tell where one value ends and the next begins."""
    for cat in taxonomy.categories.values():
        lay = layout(cat, template)
        for i, attr in enumerate(cat.attributes[:-1]):
            closer, nxt = lay.fixed[i + 1], cat.attributes[i + 1].name
            if not closer.strip():
                raise VlmtaxError(
                    f"template {template.name}: in {cat.name}, only whitespace separates {attr.name} from {nxt}, "
                    "so the answer cannot be parsed", "put a separator or the attribute names between the values")
            clash = next((v for v in attr.values if closer in lay.prefixes[i] + escape(v, template)), None)
            if clash is not None:
                raise VlmtaxError(
                    f"template {template.name}: in {cat.name}, the value {clash!r} of {attr.name} contains the "
                    f"text {closer!r} that ends it, so the answer cannot be parsed",
                    "use a separator that no value contains, or put the attribute names in answer.field")


def with_template(taxonomy: Taxonomy, path: str | Path | None) -> Taxonomy:
    """The taxonomy with the template file at `path` in place of its own (checked against its values)."""
    if path is None:
        return taxonomy
    template = load_template(path)
    check_layout(template, taxonomy)
    return taxonomy.model_copy(update={"template": template})


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
