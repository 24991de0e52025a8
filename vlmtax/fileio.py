"""Atomic file output and small shared readers: nothing half-written is ever left behind."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from vlmtax.errors import VlmtaxError, first_line


def _sibling_tmp(path: Path, kind: str) -> Path:
    """A new temporary file or folder (`kind`) beside `path`, so the final rename stays on one filesystem."""
    check_writable(path, "output", kind)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "dir":
            return Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        return Path(tmp)
    except OSError as exc:
        raise os_error(exc, path) from None


def atomic_path(path: str | Path) -> contextlib.AbstractContextManager[Path]:
    """Yield a temporary sibling path; on success rename it onto `path`, on failure delete it."""
    return _atomic(Path(path), "file")


def atomic_dir(path: str | Path) -> contextlib.AbstractContextManager[Path]:
    """Yield a temporary sibling folder; on success it replaces `path`, on failure it is removed."""
    return _atomic(Path(path), "dir")


@contextlib.contextmanager
def _atomic(path: Path, kind: str) -> Iterator[Path]:
    tmp = _sibling_tmp(path, kind)
    try:
        yield tmp
        if kind == "dir" and path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except OSError as exc:  # a full disk or a vanished folder while writing: one line, nothing half-written
        raise os_error(exc, path) from None
    except VlmtaxError as exc:  # an inner atomic write failed: name the final path, not the temporary one
        if kind != "dir" or str(tmp) not in exc.problem:
            raise
        raise VlmtaxError(exc.problem.replace(str(tmp), str(path)), exc.fix) from None
    finally:
        if kind == "dir":
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


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


def _first_long_row(path: Path, first_only: bool = False) -> str | None:
    """Where the first over-long row is (a full scan only once pandas has warned, so speed does not matter);
    `first_only`: look at the first data row alone, None when it fits the header."""
    import csv

    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f)
        width = len(next(reader, []))
        for row in reader:
            if len(row) > width:
                return f"first at line {reader.line_num}: {len(row)} fields, header has {width}"
            if first_only:
                return None
    return None if first_only else "header shorter than the data"


def read_csv(path: str | Path, what: str, required: list[str]) -> pd.DataFrame:
    """Read a CSV as strings (ids keep their form), checking that `required` columns are present."""
    path = Path(path)
    if not path.is_file():
        raise VlmtaxError(f"{what} not found: {path}", "check the path")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", pd.errors.ParserWarning)
            # index_col=False: without it a row with one field too many silently shifts every column.
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""], index_col=False)
        # pandas takes one extra, empty field on the FIRST data row for a trailing delimiter and drops it
        # without a warning ("red, cotton" then shifts that row), so the first row is counted here.
        where = _first_long_row(path, first_only=True)
        if where is not None or any(issubclass(w.category, pd.errors.ParserWarning) for w in caught):
            raise VlmtaxError(f"{what} {path} has row(s) with more fields than its header "
                              f"({where or _first_long_row(path)})",
                              "quote values that contain commas, or remove the extra fields")
    except pd.errors.EmptyDataError:
        raise VlmtaxError(f"{what} {path} is empty", "pass a CSV with a header and at least one row") from None
    except pd.errors.ParserError as exc:
        if "Expected" in str(exc) and "fields" in str(exc):  # a later row with a field too many
            raise VlmtaxError(f"{what} {path} has row(s) with more fields than its header ({_first_long_row(path)})",
                              "quote values that contain commas, or remove the extra fields") from None
        raise VlmtaxError(f"{what} {path} cannot be parsed: {first_line(exc)}",
                          "check that it is a comma-separated CSV") from None
    except UnicodeDecodeError as exc:
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


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def guard_outputs(inputs: dict[str, str | Path | None], outputs: dict[str, str | Path | None]) -> None:
    """Refuse any output that equals, contains or sits inside an input of the same command.

    Used by every verb before any work starts: an output aimed at an input would overwrite the user's
    own file (a test CSV, a taxonomy, a base model's weights) or delete it when a folder is replaced.
    Paths are resolved (symlinks followed), so two spellings of one file are one file.
    """
    ins = {name: Path(p).resolve() for name, p in inputs.items() if p is not None and str(p) != ""}
    for out_name, out in outputs.items():
        if out is None:
            continue
        target = Path(out).resolve()
        for in_name, src in ins.items():
            if target == src:
                how = "is"
            elif _inside(src, target):
                how = "contains"
            elif _inside(target, src):
                how = "sits inside"
            else:
                continue
            raise VlmtaxError(f"{out_name} {out} {how} the input {in_name} {src}; writing it would destroy the input",
                              f"choose a {out_name} path outside every input")


def check_writable(path: str | Path, what: str, kind: str = "file") -> None:
    """Before any work: an output must be creatable where it is asked for (`kind` "file" or "dir")."""
    path = Path(path)
    if kind == "file" and path.is_dir():
        raise VlmtaxError(f"{what} {path} is a folder, but a file is written there", f"pass a file path for {what}")
    if kind == "dir" and path.exists() and not path.is_dir():
        raise VlmtaxError(f"{what} {path} is a file, but a folder is written there", f"pass a folder path for {what}")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise VlmtaxError(f"cannot create {what} {path}: {parent} is a file, not a folder",
                                  f"choose a {what} path under a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise VlmtaxError(f"cannot create {what} {path}: no write permission in {parent}",
                                  f"choose a {what} path in a writable folder")
            break


def os_error(exc: OSError, path: str | Path | None = None) -> VlmtaxError:
    """One line for an OS error while writing: the path, the reason, and a fix for the common cases."""
    import errno

    where = exc.filename
    if path is not None and (where is None or str(where).endswith(".tmp")):
        where = path  # the user's path, not the temporary name written first
    fixes = {errno.ENOSPC: "free disk space or write to another disk",
             errno.EDQUOT: "free disk space (quota) or write to another disk",
             errno.EACCES: "choose a writable folder", errno.EPERM: "choose a writable folder",
             errno.EROFS: "choose a folder on a writable file system",
             errno.ENOTDIR: "a parent of the path is a file: choose a path under a folder",
             errno.EISDIR: "the path is a folder: pass a file path",
             errno.ENAMETOOLONG: "use a shorter path"}
    reason = exc.strerror or str(exc)
    # An error from a write call on an open file names no path (the system gives none): say so, not "None".
    what = f"cannot write {where}" if where is not None else "a write failed"
    err = VlmtaxError(f"{what}: {reason}", fixes.get(exc.errno, "check the path and the disk"))
    err.errno = exc.errno  # type: ignore[attr-defined]  # sft undoes a run's writes on a full disk
    return err


def save_safetensors(tensors: dict[str, Any], path: str | Path) -> None:
    """safetensors' save_file, atomically; its own error for a failed write (a full disk) becomes os_error's
    one line (safetensors raises SafetensorError, not OSError, with the system's errno in its message)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp))
        except SafetensorError as exc:
            raise os_error(safetensor_os_error(exc), path) from None


def safetensor_os_error(exc: Exception) -> OSError:
    """The OSError behind a SafetensorError raised by a write ("... (os error 28)"), for os_error's one line."""
    import re

    code = re.search(r"os error (\d+)", str(exc))
    number = int(code.group(1)) if code else None
    return OSError(number, os.strerror(number) if number else first_line(exc))


def disk_full(exc: BaseException, path: str | Path) -> VlmtaxError | None:
    """The one-line error for a write under `path` that failed for want of space, else None. Such writes fail
    as OSError (open/write), SafetensorError (safetensors: checkpoints, heads), RuntimeError (torch.save, e.g.
    a Trainer's optimizer state) or as os_error's own line from an atomic write."""
    import errno

    from safetensors import SafetensorError

    full = (errno.ENOSPC, errno.EDQUOT)
    if isinstance(exc, VlmtaxError):
        return exc if getattr(exc, "errno", None) in full else None
    if isinstance(exc, SafetensorError):
        exc = safetensor_os_error(exc)
    elif isinstance(exc, RuntimeError) and "file write failed" in str(exc):  # torch's PytorchStreamWriter
        exc = OSError(errno.ENOSPC, "file write failed (a full disk?)")
    return os_error(exc, path) if isinstance(exc, OSError) and exc.errno in full else None


def remove_new_entries(folder: Path, before: set[str] | None) -> None:
    """Remove what was added to `folder` since its entries were `before` (all of it, when it did not exist)."""
    if not folder.is_dir():
        return
    for path in [folder] if before is None else [p for p in folder.iterdir() if p.name not in before]:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def cache_dir() -> Path:
    """The user cache folder for vlmtax: $VLMTAX_CACHE_DIR, else $XDG_CACHE_HOME/vlmtax or ~/.cache/vlmtax
    (image checks, command logs)."""
    if os.environ.get("VLMTAX_CACHE_DIR"):
        return Path(os.environ["VLMTAX_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vlmtax"
