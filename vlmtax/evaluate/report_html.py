"""The report stage's output: the folder `vlmtax report` writes from the figures `vlmtax.evaluate.report` computes.

index.html (rendered from report.html.j2, CSS and JavaScript inline, nothing fetched), figures.json,
thumbs/ (each mistaken row's image once, downscaled) and gallery/N.js (one attribute's mistakes, loaded
by a script tag only when its gallery is opened: fetch() of a local file is refused under file://,
a script tag is not, so the page works offline without a server).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
from markupsafe import Markup

from vlmtax.data.catalogue import DEFAULT_IMAGE_PATTERN, image_path
from vlmtax.fileio import write_json
from vlmtax.progress import progress_iter

THUMB_PX = 96  # longest side of a gallery thumbnail
THUMB_QUALITY = 80
SHEET = 8  # thumbnails per side of one sheet image


def write_folder(folder: Path, figures: dict[str, Any], mistakes: dict[str, list[dict]], truth: pd.DataFrame,
                 images: Path | None) -> None:
    """Thumbnails, gallery scripts, figures.json and index.html into `folder` (a fresh temporary folder)."""
    thumbs = write_thumbnails(folder / "thumbs", truth, mistakes, images) if images is not None else {}
    (folder / "gallery").mkdir()
    for k, attr in enumerate(figures["attributes"]):
        rows = [{**m, "img": thumbs.get(m["id"])} for m in mistakes[attr["key"]]]
        # JSON is valid JavaScript; "</" is escaped so that no value can close the script element early.
        text = json.dumps(rows, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")
        (folder / "gallery" / f"{k}.js").write_text(f"vlmtaxGallery({k},{text});\n", encoding="utf-8")
    write_json(folder / "figures.json", figures, indent=None)
    (folder / "index.html").write_text(render(figures), encoding="utf-8")


def _thumb(src: Path) -> Any:
    """The image downscaled to fit THUMB_PX x THUMB_PX, or None when it is missing or unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(src) as im:
            im.draft("RGB", (THUMB_PX, THUMB_PX))  # JPEG: decode at a reduced scale, much faster on big photos
            im = im.convert("RGB")
            im.thumbnail((THUMB_PX, THUMB_PX))
            return im
    except (OSError, UnidentifiedImageError, ValueError):
        return None  # a missing or broken image shows as "no image" on its card, never stops the report


def _sheet(chunk: list[tuple[str, Path]], dst: Path) -> list[tuple[str, int]]:
    """Paste a chunk's thumbnails into one sheet (SHEET x SHEET cells) saved as `dst`; (id, cell) per image."""
    from PIL import Image

    sheet = Image.new("RGB", (SHEET * THUMB_PX, SHEET * THUMB_PX), (244, 244, 244))
    placed = []
    for cell, (row_id, src) in enumerate(chunk):
        im = _thumb(src)
        if im is not None:
            x, y = (cell % SHEET) * THUMB_PX, (cell // SHEET) * THUMB_PX
            sheet.paste(im, (x + (THUMB_PX - im.width) // 2, y + (THUMB_PX - im.height) // 2))
            placed.append((row_id, cell))
    if placed:
        sheet.save(dst, "JPEG", quality=THUMB_QUALITY)
    return placed


def write_thumbnails(folder: Path, truth: pd.DataFrame, mistakes: dict[str, list[dict]],
                     images: Path) -> dict[str, list]:
    """Every row that is mistaken somewhere (shared by all its attributes), downscaled once into sheets of
    SHEET x SHEET thumbnails; id -> [sheet file, cell]. Sheets, not one file per row: creating 30k small
    files costs more than decoding the images (and a browser fetches one sheet for many cards)."""
    folder.mkdir()
    wanted = {m["id"] for rows in mistakes.values() for m in rows}
    ids = truth["id"].fillna("").astype(str).str.strip()
    rel = truth["image"] if "image" in truth.columns else pd.Series([None] * len(truth))
    jobs: dict[str, Path] = {}
    for row_id, r in zip(ids, rel):
        if row_id in wanted and row_id not in jobs:
            r = None if r is None or pd.isna(r) or not str(r).strip() else str(r).strip()
            src, _ = image_path(images, row_id, r, DEFAULT_IMAGE_PATTERN)
            if src is not None:  # a path outside --images is refused as it is everywhere else
                jobs[row_id] = src
    items = list(jobs.items())
    size = SHEET * SHEET
    chunks = [items[i:i + size] for i in range(0, len(items), size)]
    done: dict[str, list] = {}
    # Pillow releases the GIL while decoding, resizing and encoding, so threads use every core.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = pool.map(lambda n: _sheet(chunks[n], folder / f"{n}.jpg"), range(len(chunks)))
        for n, placed in enumerate(progress_iter(results, total=len(chunks), desc="report: thumbnails", unit="sheet")):
            done.update({row_id: [f"thumbs/{n}.jpg", cell] for row_id, cell in placed})
    return done


def reliability_svg(cal: dict[str, Any], size: int = 180) -> Markup:
    """A reliability diagram: accuracy per confidence bin as bars, the diagonal as perfect calibration."""
    pad = 24
    inner = size - 2 * pad

    def xy(x: float, y: float) -> tuple[float, float]:
        return pad + x * inner, size - pad - y * inner

    parts = [f'<svg class="rel" width="{size}" height="{size}" viewBox="0 0 {size} {size}" role="img">',
             f'<rect x="{pad}" y="{pad}" width="{inner}" height="{inner}" fill="#fafafa" stroke="#999"/>']
    for b in cal["bins"]:
        if not b["count"]:
            continue
        x0, y0 = xy(b["lo"], b["accuracy"])
        width = inner * (b["hi"] - b["lo"]) - 1
        parts.append(f'<rect x="{x0:.1f}" y="{y0:.1f}" width="{width:.1f}" height="{size - pad - y0:.1f}" '
                     f'fill="#4a7fb5"><title>confidence {b["lo"]:.1f}-{b["hi"]:.1f}: {b["count"]} rows, '
                     f'accuracy {b["accuracy"]:.3f}, mean confidence {b["confidence"]:.3f}</title></rect>')
    (ax, ay), (bx, by) = xy(0, 0), xy(1, 1)
    parts.append(f'<line x1="{ax}" y1="{ay}" x2="{bx}" y2="{by}" stroke="#d33" stroke-dasharray="4 3"/>')
    parts.append(f'<text x="{size / 2}" y="{size - 4}" text-anchor="middle" font-size="10">confidence</text>')
    parts.append(f'<text x="10" y="{size / 2}" font-size="10" transform="rotate(-90 10 {size / 2})" '
                 'text-anchor="middle">accuracy</text></svg>')
    return Markup("".join(parts))


def render(figures: dict[str, Any]) -> str:
    """index.html from the package's template (autoescaped: values and ids are the user's data)."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(loader=FileSystemLoader(Path(__file__).parent), autoescape=select_autoescape(["html", "j2"]))
    env.filters["num"] = lambda x, d=4: "-" if x is None else f"{x:.{d}f}"
    env.filters["pct"] = lambda x: "-" if x is None else f"{100 * x:.1f}%"
    shares = [[[n / max(sum(row), 1) for n in row] for row in a["confusion"]] for a in figures["attributes"]]
    # What the gallery script needs per attribute; the rows themselves come from gallery/N.js on demand.
    meta = [{"labels": a["labels"]} for a in figures["attributes"]]
    return env.get_template("report.html.j2").render(
        f=figures, shares=shares, sheet=SHEET, px=THUMB_PX, meta=meta, has_probs=figures["probs"] is not None,
        svg={k: reliability_svg(a["calibration"]) for k, a in enumerate(figures["attributes"]) if a["calibration"]},
        problems=_problems(figures["runs"][0]["checks"]))


def _problems(checks: dict[str, Any]) -> list[str]:
    from vlmtax.evaluate.metric import InputChecks

    return InputChecks(**checks).problems()
