"""Atomic file output and small shared readers: nothing half-written is ever left behind."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from vlmtax.errors import VlmtaxError, first_line


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success rename it onto `path`, on failure delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `path`, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (catalogue CSVs can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    """Write JSON atomically. indent=None for large files: json's C encoder only runs without an indent."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")


def write_csv(path: str | Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def read_json(path: str | Path, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise VlmtaxError(f"{what} not found: {path}", "check the path")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VlmtaxError(f"{what} {path} is not valid JSON ({exc})", "regenerate or fix the file") from None


def read_csv(path: str | Path, what: str, required: list[str]) -> pd.DataFrame:
    """Read a CSV as strings (ids keep their form), checking that `required` columns are present."""
    path = Path(path)
    if not path.is_file():
        raise VlmtaxError(f"{what} not found: {path}", "check the path")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    except pd.errors.EmptyDataError:
        raise VlmtaxError(f"{what} {path} is empty", "pass a CSV with a header and at least one row") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise VlmtaxError(f"{what} {path} cannot be parsed: {first_line(exc)}",
                          "check that it is a comma-separated CSV") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise VlmtaxError(
            f"{what} {path} lacks required column(s) {', '.join(missing)} (has: {', '.join(map(str, frame.columns))})",
            f"the file needs the columns {', '.join(required)} (Meesho layout)",
        )
    if frame.empty:
        raise VlmtaxError(f"{what} {path} has a header but no rows", "pass a CSV with at least one row")
    return frame
