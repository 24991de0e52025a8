"""Provenance: every output folder records the library versions (and data) that wrote it."""

from __future__ import annotations

import hashlib
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from vlmtax import __version__

LIBRARIES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "tokenizers")
META_FILE = "vlmtax_meta.json"


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"vlmtax": __version__, "python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = None
    return out


def files_hash(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def git_revision() -> str | None:
    """The vlmtax checkout's revision, when it runs from one (pip installs have none)."""
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def run_meta(**extra: Any) -> dict[str, Any]:
    return {"versions": versions(), "git_revision": git_revision(), **extra}
