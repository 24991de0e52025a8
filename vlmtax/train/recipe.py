"""The recipe: the schema (train/schema.py) loaded from YAML with `key=value` overrides, checked once."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from vlmtax.errors import VlmtaxError
from vlmtax.train.schema import Recipe


def _suggest(loc: tuple, model: type[BaseModel]) -> str:
    """Closest valid key for an unknown one, walking the schema along `loc`."""
    fields = model.model_fields
    for part in loc[:-1]:
        ann = fields.get(str(part))
        sub = getattr(ann, "annotation", None) if ann else None
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            fields = sub.model_fields
    close = difflib.get_close_matches(str(loc[-1]), list(fields), n=1, cutoff=0.5)
    return f"did you mean {'.'.join(map(str, loc[:-1] + (close[0],)))}?" if close else (
        f"valid keys here: {', '.join(fields)}")


def _check_route_keys(recipe: Recipe, source: str) -> None:
    """Keys one route reads and the other would silently ignore."""
    if recipe.task == "generate" and "heads" in recipe.model_fields_set:
        raise VlmtaxError(f"{source}: heads.* configures the classify route, but the recipe has task: generate "
                          "(the default), which would ignore it and train a VLM",
                          "add `task: classify` to train heads on a vision backbone, or remove the heads block")
    if recipe.task == "classify":
        t = recipe.train
        for key, given, why in (
                ("train.packing", t.packing, "classify batches hold images, not token sequences"),
                ("train.cache_vision", t.cache_vision, "heads.mode=frozen caches features itself (heads.cache_dir)"),
                ("train.extra", t.extra, "the classify trainer takes only the recipe's own keys")):
            if given:
                raise VlmtaxError(f"{source}: {key} is for the generate route; task: classify would ignore it",
                                  f"remove {key} ({why})")


def _validate(data: dict[str, Any], source: str) -> Recipe:
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            raise VlmtaxError(f"{source}: unknown recipe key {key!r}", _suggest(err["loc"], Recipe)) from None
        if err["type"] == "missing":
            raise VlmtaxError(f"{source}: recipe key {key!r} is required", f"add `{key}: ...` to the recipe") from None
        raise VlmtaxError(f"{source}: recipe key {key!r}: {err['msg']}", "see docs/recipes.md") from None
    _check_route_keys(recipe, source)
    return recipe


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`train.epochs=1 lora.rank=8`: dotted keys, values parsed as YAML scalars."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise VlmtaxError(f"bad override {item!r}", "write overrides as key=value, e.g. train.epochs=1")
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise VlmtaxError(f"override {item!r}: {part} is not a section", "override a leaf key")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            # Kept as a literal string, `lora.target=[q_proj` once trained LoRA on the vision blocks only.
            raise VlmtaxError(f"override {item!r}: the value is not valid YAML",
                              "close brackets and quotes, e.g. lora.target=[q_proj,v_proj] or key='text'") from None
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise VlmtaxError(f"recipe not found: {path}", "pass a recipe YAML, e.g. recipes/tiny_cpu.yaml")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise VlmtaxError(f"recipe {path} is not UTF-8 text (a binary or differently encoded file?)",
                          "pass a recipe YAML saved as UTF-8, e.g. a copy of recipes/tiny_cpu.yaml") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise VlmtaxError(f"recipe {path} is not valid YAML{where}", "fix the YAML syntax") from None
    if not isinstance(data, dict):
        raise VlmtaxError(f"recipe {path} is not a mapping of keys", "see recipes/ for examples")
    recipe = _validate(apply_overrides(data, overrides or []), str(path))
    if recipe.train.extra:
        from vlmtax.train.trainer_extra import check_extra  # imports TRL: only when there is something to check

        check_extra(recipe, str(path))
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    # A generate run's recipe.yaml leaves out the heads block, so that it loads again as a recipe.
    exclude = {"heads"} if recipe.task == "generate" else None
    return yaml.safe_dump(recipe.model_dump(mode="json", exclude=exclude), sort_keys=False)
