"""Image checks for prepare: is each catalogue image there, readable and complete, and how big is it.

Two depths (`prepare --verify-images`):

- `fast` (default): parse the header (format, size) and require the format's end marker -- JPEG's
  end-of-image marker after the scan data, PNG's IEND chunk. Truncation, the common failure (an
  interrupted download or copy), loses the end marker, so it is caught at a fraction of a decode
  (about 0.1 ms instead of 3-5 ms for a 512x683 JPEG). Formats without such a marker are decoded.
- `full`: decode every pixel. Also catches damage in the middle of a file whose end is intact.

Results are cached per image folder, keyed by path, size, mtime and inode, in the user cache folder
(`$VLMTAX_CACHE_DIR`, else `$XDG_CACHE_HOME/vlmtax`, else `~/.cache/vlmtax`), so a rerun over the
same images only stats them. A `full` result also answers a later `fast` request, not the reverse.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from vlmtax.errors import VlmtaxError
from vlmtax.fileio import cache_dir, write_json
from vlmtax.progress import progress_iter

VERIFY_MODES = ("fast", "full")
_LEVEL = {"fast": 1, "full": 2}
# The end marker must sit in the file's last bytes (a little trailing padding is tolerated) and after
# the start of the image data, so an embedded thumbnail's marker near the header never counts.
_TAIL_BYTES = 1024
_END_MARKERS = {"JPEG": b"\xff\xd9", "MPO": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}
_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)
CACHE_VERSION = 1

CheckResult = tuple[str | None, int, int]


def _has_end_marker(path: str, marker: bytes, data_start: int) -> bool:
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        start = max(data_start, size - _TAIL_BYTES)
        f.seek(start)
        return f.read().rfind(marker) >= 0


def check_image(path: str, verify: str = "fast") -> CheckResult:
    """(reject reason or None, width, height) for one image, checked to the depth `verify`."""
    if not os.path.isfile(path):
        return "missing_image", 0, 0
    try:
        with Image.open(path) as img:
            width, height = img.size
            marker = _END_MARKERS.get(img.format or "")
            if verify == "full" or marker is None or not img.tile:
                img.load()
            elif not _has_end_marker(path, marker, img.tile[0][2]):
                return "unreadable_image", 0, 0
    except _ERRORS:
        return "unreadable_image", 0, 0
    return None, width, height


def _check_full(path: str) -> CheckResult:
    return check_image(path, "full")


def cache_file(images: str | Path) -> Path:
    """Where the checks of the images under one folder are cached."""
    root = os.path.realpath(images)
    return cache_dir() / "image-checks" / f"{hashlib.sha256(root.encode()).hexdigest()[:20]}.json"


def _load_cache(path: Path) -> dict[str, list]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # absent or damaged: the checks are simply redone
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        return {}
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


def _run_checks(paths: list[str], verify: str, workers: int | None, desc: str) -> list[CheckResult]:
    fn = _check_full if verify == "full" else check_image
    workers = workers or min(os.cpu_count() or 1, 8)
    if workers <= 1 or len(paths) < 64:
        return list(progress_iter(map(fn, paths), total=len(paths), desc=desc))
    chunk = max(16, len(paths) // (workers * 16))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(progress_iter(pool.map(fn, paths, chunksize=chunk), total=len(paths), desc=desc))


def check_images(paths: list[str], workers: int | None = None, verify: str = "fast", cache: Path | None = None,
                 desc: str = "checking images") -> list[CheckResult]:
    """Check every image (in parallel worker processes, with a progress bar), reusing cached results.

    `cache` is a JSON file from `cache_file`; None checks everything afresh and stores nothing.
    """
    if verify not in _LEVEL:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, not {verify!r}")
    level = _LEVEL[verify]
    entries = _load_cache(cache) if cache is not None else {}
    results: list[CheckResult | None] = [None] * len(paths)
    keys: dict[int, list[int]] = {}
    todo: list[int] = []
    for i, path in enumerate(paths):
        try:
            st = os.stat(path)
        except OSError:
            results[i] = ("missing_image", 0, 0)
            continue
        key = [st.st_size, st.st_mtime_ns, st.st_ino]
        hit = entries.get(path)
        if hit is not None and hit[:3] == key and hit[3] >= level:
            results[i] = (hit[4], hit[5], hit[6])
        else:
            keys[i] = key
            todo.append(i)
    for i, result in zip(todo, _run_checks([paths[i] for i in todo], verify, workers, desc)):
        results[i] = result
        if result[0] != "missing_image":
            entries[paths[i]] = [*keys[i], level, *result]
    if cache is not None and todo:
        try:
            write_json(cache, {"version": CACHE_VERSION, "entries": entries}, indent=None)
        except (OSError, VlmtaxError):
            pass  # an unwritable cache folder only costs the next run its speed-up
    return results  # type: ignore[return-value]
