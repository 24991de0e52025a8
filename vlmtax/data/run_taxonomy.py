"""The taxonomy a model folder carries: run dirs, their checkpoints and merged dirs each hold a taxonomy.json,
the categories, attributes, values and answer template the model was trained on (predict and merge read it)."""

from __future__ import annotations

from pathlib import Path

from vlmtax.data.answer import with_template
from vlmtax.data.taxonomy import Taxonomy
from vlmtax.errors import VlmtaxError
from vlmtax.models.loading import run_roots

TAXONOMY_FILE = "taxonomy.json"


def load_taxonomy(model_path: str | Path, override: str | Path | None,
                  template: str | Path | None = None) -> Taxonomy:
    """--taxonomy if given, else the model folder's own (run dirs and merged dirs carry one); with --template,
    that prompt/answer template instead of the taxonomy's (a model trained elsewhere, or zero-shot)."""
    if override is not None:
        return with_template(Taxonomy.load(override), template)
    path = Path(model_path)
    for candidate in (folder / TAXONOMY_FILE for folder in run_roots(path)):
        if candidate.is_file():
            return with_template(Taxonomy.load(candidate), template)
    where = f"{path} has no {TAXONOMY_FILE}" if path.is_dir() else f"{path} is not a local folder"
    raise VlmtaxError(where, "pass --taxonomy FILE (from `vlmtax prepare`)")
