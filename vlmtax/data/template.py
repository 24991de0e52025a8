"""Prompt/answer templates (`data_templates/*.yaml`, `prepare --template`): the wording and the answer layout as data.

A template holds an optional system text, the user prompt with placeholders, and the answer layout as fixed
text around each value. It travels inside taxonomy.json, so every run dir and merged dir carries the one it
was trained with; `answer.py` renders and parses from it. Placeholders are `{word}`: any other `{word}` is
an error, and braces that do not enclose a bare word (a JSON example in a prompt, `{` of a JSON answer) are
plain text, so no escaping is needed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from vlmtax.errors import VlmtaxError, first_line

PLACEHOLDER = re.compile(r"\{(\w+)\}")
# {image}: where the image goes; {category}: its name; {attributes}: its attribute names, comma separated;
# {allowed}: one line per attribute with its allowed values (costs tokens; prepare counts them).
PROMPT_FIELDS = ("image", "category", "attributes", "allowed")
FIELD_FIELDS = ("name", "value")


class AnswerLayout(BaseModel):
    """begin + field(attribute 1) + separator + field(attribute 2) + ... + end; `field` holds {value} once."""

    model_config = ConfigDict(extra="forbid")
    begin: str = ""
    field: str = "{name}: {value}"
    separator: str = "\n"
    end: str = ""
    escape: Literal["none", "json"] = "none"  # json: values written as JSON string contents


class Template(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "lines"
    system: str | None = None
    prompt: str = ("{image}This is a product image from the category {category}. "
                   "Fill in its attributes: {attributes}. "
                   "Answer with one line per attribute, formatted as `attribute: value`.")
    allowed_line: str = "{name}: {values}"  # one line of {allowed}; {values} is the comma-separated list
    answer: AnswerLayout = AnswerLayout()


def substitute(text: str, fields: dict[str, str]) -> str:
    """Fill `{word}` placeholders in one pass (a substituted value is never substituted again)."""
    return PLACEHOLDER.sub(lambda m: fields[m.group(1)], text)


def _check_placeholders(where: str, text: str, allowed: tuple[str, ...], path: str) -> None:
    unknown = [m for m in PLACEHOLDER.findall(text) if m not in allowed]
    if unknown:
        raise VlmtaxError(f"template {path}: {where} has unknown placeholder {{{unknown[0]}}}",
                          f"use only {', '.join('{' + a + '}' for a in allowed)} there")


def check_template(template: Template, path: str = "(built in)") -> Template:
    """Placeholders known, {value} once in the field, {image} once in the prompt (no taxonomy needed)."""
    _check_placeholders("prompt", template.prompt, PROMPT_FIELDS, path)
    if template.system is not None:
        _check_placeholders("system", template.system, (), path)
    _check_placeholders("allowed_line", template.allowed_line, ("name", "values"), path)
    layout = template.answer
    _check_placeholders("answer.field", layout.field, FIELD_FIELDS, path)
    for key in ("begin", "separator", "end"):
        _check_placeholders(f"answer.{key}", getattr(layout, key), (), path)
    if PLACEHOLDER.findall(layout.field).count("value") != 1:
        raise VlmtaxError(f"template {path}: answer.field must hold {{value}} exactly once",
                          "write it like '{name}: {value}'")
    if PLACEHOLDER.findall(template.prompt).count("image") != 1:
        raise VlmtaxError(f"template {path}: the prompt must hold {{image}} exactly once",
                          "put {image} where the picture goes, usually at the start")
    return template


def load_template(path: str | Path) -> Template:
    """A template YAML file, validated; every problem is one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise VlmtaxError(f"template file not found: {path}", "pass --template FILE, e.g. data_templates/json.yaml")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise VlmtaxError(f"cannot read template {path}: {first_line(exc)}", "check the file's YAML") from None
    if not isinstance(data, dict):
        raise VlmtaxError(f"template {path} is not a mapping", "see data_templates/README.md for the keys")
    try:
        template = Template.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise VlmtaxError(f"template {path} is invalid at {loc}: {err['msg']}",
                          "see data_templates/README.md for the keys") from None
    return check_template(template, str(path))
