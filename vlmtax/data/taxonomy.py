"""The taxonomy stage: each category's ordered attributes, their allowed values, counts and modes.

Written by `prepare` as taxonomy.json, copied into every run dir, read by `predict` and `score`.
The order of a category's attributes is the order used in prompts and answers (after remaps);
each attribute also records the CSV column it came from so that predictions land back there. It also
carries the prompt/answer template (template.py), so every run dir holds the one it was trained with.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from pathlib import Path

import pandas as pd
from pydantic import BaseModel, Field, ValidationError

from vlmtax.data.template import Template
from vlmtax.errors import VlmtaxError
from vlmtax.fileio import read_json, write_json

N_SLOTS = 10
SLOT_COLUMNS = [f"attr_{i}" for i in range(1, N_SLOTS + 1)]
DEFAULT_FILLER = "dummy"
_WS = re.compile(r"\s+")
_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"))


def normalise(value: object) -> str | None:
    """NFKC, drop zero-width characters, strip, collapse inner whitespace, lower-case; empty or NaN becomes
    None (a missing label). NFKC folds look-alikes (full-width letters, non-breaking spaces) so that they do
    not become values of their own."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    text = str(value)
    if not text.isascii():  # the common all-ASCII label skips the Unicode work
        text = unicodedata.normalize("NFKC", text).translate(_ZERO_WIDTH)
    text = _WS.sub(" ", text).strip().lower()
    return text or None


class Attribute(BaseModel):
    name: str
    column: str  # the catalogue/submission column that holds this attribute
    values: list[str]  # allowed values, most frequent first
    counts: dict[str, int]
    mode: str


class Category(BaseModel):
    name: str
    len: int
    attributes: list[Attribute]

    def attribute_names(self) -> list[str]:
        return [a.name for a in self.attributes]

    def trained(self) -> bool:
        """Whether any training row gave it a label (a category of the attribute file with no rows, or only
        empty labels, has just the filler as its values and nothing a model could have learned)."""
        return not self.attributes or any(sum(a.counts.values()) > 0 for a in self.attributes)


class Remap(BaseModel):
    """Swap two slots of one category (seed 000 moved Sarees colour from attr_4 to attr_1)."""

    category: str
    a: str
    b: str

    @classmethod
    def parse(cls, text: str) -> Remap:
        m = re.fullmatch(r"\s*(.+?)\s*:\s*(attr_\d+)\s*<->\s*(attr_\d+)\s*", text)
        if not m:
            raise VlmtaxError(f"bad remap {text!r}", "write it as 'CATEGORY:attr_1<->attr_4'")
        return cls(category=m.group(1), a=m.group(2), b=m.group(3))


class Taxonomy(BaseModel):
    version: int = 1
    filler: str = DEFAULT_FILLER
    remaps: list[Remap] = Field(default_factory=list)
    categories: dict[str, Category]
    # The prompt/answer template the data was rendered with (a taxonomy without one predates templates: lines).
    template: Template = Field(default_factory=Template)

    def category(self, name: str) -> Category:
        try:
            return self.categories[name]
        except KeyError:
            raise VlmtaxError(
                f"unknown category {name!r} (known: {', '.join(sorted(self.categories))})",
                "use a taxonomy built from a catalogue that has this category",
            ) from None

    def save(self, path: str | Path) -> None:
        write_json(path, self.model_dump())

    @classmethod
    def load(cls, path: str | Path) -> Taxonomy:
        data = read_json(path, "taxonomy file")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            raise VlmtaxError(
                f"taxonomy file {path} is invalid at {loc}: {first['msg']}", "regenerate it with `vlmtax prepare`"
            ) from None


def slot_order(n_attributes: int, remaps: list[Remap], category: str) -> list[str]:
    """Columns in prompt order for a category: attr_1..attr_n with the category's declared swaps applied."""
    cols = SLOT_COLUMNS[:n_attributes]
    for r in remaps:
        if r.category != category:
            continue
        for c in (r.a, r.b):
            if c not in cols:
                raise VlmtaxError(
                    f"remap {r.category}:{r.a}<->{r.b} names {c}, but {category} has only {n_attributes} attributes",
                    "remap slots inside attr_1..attr_len",
                )
        i, j = cols.index(r.a), cols.index(r.b)
        cols[i], cols[j] = cols[j], cols[i]
    return cols


def build_taxonomy(
    frame: pd.DataFrame,
    category_attributes: dict[str, list[str]],
    remaps: list[Remap],
    filler: str = DEFAULT_FILLER,
    declared: dict[str, dict[str, list[str]]] | None = None,
) -> Taxonomy:
    """Learn each attribute's vocabulary from already-normalised catalogue rows; an attribute with declared
    values keeps exactly those (seen ones most frequent first, then the unseen ones, count 0: still allowed).

    A remap swaps which CSV column feeds which position: after `Sarees:attr_1<->attr_4` the first
    attribute of Sarees is `color` read from attr_4, and predict writes it back to attr_4.
    """
    categories: dict[str, Category] = {}
    for name, attr_names in category_attributes.items():
        rows = frame[frame["Category"] == name]
        attrs = []
        for column in slot_order(len(attr_names), remaps, name):
            attr_name = attr_names[SLOT_COLUMNS.index(column)]
            counter = Counter(v for v in rows[column] if isinstance(v, str)) if column in rows else Counter()
            # Most frequent first; ties broken alphabetically so the mode is deterministic.
            ordered = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))
            closed = (declared or {}).get(name, {}).get(attr_name)
            if closed is not None:
                ordered += [(v, 0) for v in closed if v not in counter]
            values = [v for v, _ in ordered] or [filler]
            attrs.append(
                Attribute(name=attr_name, column=column, values=values, counts=dict(ordered), mode=values[0])
            )
        categories[name] = Category(name=name, len=len(attr_names), attributes=attrs)
    return Taxonomy(filler=filler, remaps=list(remaps), categories=categories)
