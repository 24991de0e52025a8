"""The synth stage: a synthetic catalogue in Meesho's exact layout, for tests, the demo and benchmarks.

Labels follow the real Meesho label statistics shipped as `vlmtax/data/meesho_label_stats.json`
(category shares, value frequencies, missing rates, attribute order). Images are drawn so that the
visible attributes (colour, pattern, sleeve length, garment length, plus neck, fit and saree border
cues) can really be read off them; the other attributes only follow their label distribution, like
real noisy labels. The same seed gives byte-identical files.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from vlmtax.data.taxonomy import DEFAULT_FILLER, SLOT_COLUMNS
from vlmtax.errors import VlmtaxError
from vlmtax.fileio import atomic_dir
from vlmtax.progress import progress_iter

JPEG_QUALITY = 90
MAX_IDS = 1_000_000  # keeps ids at six digits, so the default `{id:06d}.jpg` names stay the same width
PALETTE = {
    "black": (25, 25, 28), "white": (250, 250, 248), "red": (200, 30, 35), "maroon": (120, 20, 40),
    "navy blue": (25, 35, 95), "blue": (40, 100, 210), "yellow": (240, 205, 40), "green": (40, 140, 60),
    "pink": (240, 130, 170), "purple": (120, 50, 150), "grey": (128, 128, 128), "orange": (240, 130, 30),
    "cream": (238, 224, 188), "peach": (250, 185, 150), "default": (172, 160, 142),
}
MULTI = [PALETTE[c] for c in ("red", "blue", "yellow", "green", "purple", "orange")]
GOLD = (212, 172, 60)
# Geometry in fractions of the image side; sleeves hang beside the body from the shoulder line.
SLEEVE = {"sleeveless": 0.0, "short sleeves": 0.13, "three-quarter sleeves": 0.3, "long sleeves": 0.46}
BOTTOM = {"crop": 0.55, "regular": 0.74, "long": 0.9, "knee length": 0.8, "calf length": 0.94}
HALF_WIDTH = {"fitted": 0.15, "straight": 0.17, "loose": 0.22, "boxy": 0.24, "a-line": 0.16}
BORDER_WIDTH = {"small border": 0.04, "big border": 0.1, "no border": 0.0}
BORDER_INK = {"zari": GOLD, "temple border": (170, 30, 30)}
# Attributes describing one visual fact share a uniform draw (inverse-CDF over frequency order), so
# their labels mostly agree (solid pattern with solid print, sleeveless with sleeveless styling)
# while each keeps its own marginal distribution exactly.
COUPLED = [("pattern", "print_or_pattern_type"), ("sleeve_length", "sleeve_styling"), ("border", "border_width")]
# Raw-label noise seen in Meesho's train.csv; `taxonomy.normalise` must undo all of it.
NOISE = [lambda v: v + "\n", lambda v: f"  {v} ", str.upper, str.title, lambda v: v.replace(" ", "  ") + " "]


def load_stats() -> dict:
    """The Meesho label statistics shipped with the package."""
    text = resources.files("vlmtax").joinpath("data/meesho_label_stats.json").read_text(encoding="utf-8")
    return json.loads(text)


def _allocate(total: int, weights: list[int]) -> np.ndarray:
    """Rows per category proportional to `weights` (largest remainder), each present once affordable."""
    share = np.asarray(weights, float) / sum(weights) * total
    counts = np.floor(share).astype(int)
    counts[np.argsort(counts - share, kind="stable")[: total - counts.sum()]] += 1
    while total >= len(counts) and (counts == 0).any():
        counts[np.argmax(counts)] -= 1
        counts[np.argmin(counts)] += 1
    return counts


def _sample(stats: dict, n: int, rng: np.random.Generator) -> list[tuple[str, list[str], list[str | None]]]:
    """(category, drawn values, labels) per row: images show the drawn value even where the label is missing."""
    records = []
    for cat, k in zip(stats["categories"], _allocate(n, [c["rows"] for c in stats["categories"]])):
        shared: dict[tuple[str, ...], np.ndarray] = {}
        drawn, labels = [], []
        for attr in cat["attributes"]:
            group = next((g for g in COUPLED if attr["name"] in g), (attr["name"],))
            if group not in shared:
                shared[group] = rng.random(k)
            names, freq = list(attr["values"]), np.fromiter(attr["values"].values(), float)
            idx = np.minimum(np.searchsorted(np.cumsum(freq) / freq.sum(), shared[group], side="right"), len(names) - 1)
            missing = rng.random(k) < attr["missing"] / cat["rows"]
            drawn.append([names[i] for i in idx])
            labels.append([None if m else names[i] for m, i in zip(missing, idx)])
        records += [(cat["name"], [d[j] for d in drawn], [lab[j] for lab in labels]) for j in range(k)]
    return [records[i] for i in rng.permutation(n)]


def _add_noise(records: list, rng: np.random.Generator) -> None:
    cells = [(i, j) for i, (_, _, lab) in enumerate(records) for j, v in enumerate(lab) if v is not None]
    if not cells:
        return
    n = min(len(cells), max(3, len(cells) // 300))
    for k, variant in zip(rng.choice(len(cells), n, replace=False), rng.integers(len(NOISE), size=n)):
        i, j = cells[k]
        records[i][2][j] = NOISE[variant](records[i][2][j])


def _frame(ids: range, records: list, filler: str | None) -> pd.DataFrame:
    data: dict[str, list] = {"id": list(ids), "Category": [c for c, _, _ in records]}
    data["len"] = [len(d) for _, d, _ in records]
    for i, col in enumerate(SLOT_COLUMNS):
        data[col] = [lab[i] if i < len(lab) else filler for _, _, lab in records]
    return pd.DataFrame(data)


class _Painter:
    """Draws one garment per row with numpy masks at the target size: no resize, about 0.3 ms at 64 px."""

    def __init__(self, size: int, rng: np.random.Generator):
        self.s = size
        centres = (np.arange(size) + 0.5) / size
        self.y, self.x = centres[:, None], centres[None, :]
        # Sensor-like noise: one shared bank, cropped at a random offset per image (cheap, not identical).
        self.noise = rng.integers(-6, 7, size=(2 * size, 2 * size, 3)).astype(np.float64)

    def _px(self, f: float) -> int:
        return int(min(max(f, 0.0), 1.0) * self.s)

    def box(self, a: np.ndarray, x0: float, y0: float, x1: float, y1: float, value) -> None:
        r0, c0 = self._px(y0), self._px(x0)
        a[r0 : max(self._px(y1), r0 + 1), c0 : max(self._px(x1), c0 + 1)] = value

    def draw(self, category: str, v: dict[str, str], r: np.ndarray) -> np.ndarray:
        s = self.s
        cx, top = 0.5 + (r[1] - 0.5) * 0.06, 0.2 + (r[2] - 0.5) * 0.04
        colour = v.get("color", "default")
        base = np.array(PALETTE.get(colour, PALETTE["default"]), float) * (0.92 + 0.14 * r[3])
        tex = np.empty((s, s, 3))
        if colour == "multicolor":
            first = int(r[6] * len(MULTI))
            bands = np.array([MULTI[(first + 2 * k) % len(MULTI)] for k in range(3)], float)
            tex[:] = bands[(np.arange(s) * 6 // s) % 3][:, None, :]
        else:
            tex[:] = base
        dark_ink = colour == "multicolor" or base @ (0.299, 0.587, 0.114) > 140
        ink = np.array((40, 40, 55) if dark_ink else (235, 232, 225), float)
        self.texture(tex, v, r, cx, top, ink, base)
        img = np.empty((s, s, 3))
        img[:] = np.array([222, 219, 214]) + (r[0] - 0.5) * 24
        if category == "Sarees":
            self.saree(img, tex, v, cx, ink, base)
        else:
            mask = self.tee(tex, v, cx, top, ink, 0.8 if category == "Kurtis" else 0.74)
            img[mask] = tex[mask]
        oy, ox = int(r[4] * s), int(r[5] * s)
        return np.clip(img + self.noise[oy : oy + s, ox : ox + s], 0, 255).astype(np.uint8)

    def texture(self, tex, v, r, cx, top, ink, base) -> None:
        pattern, kind = v.get("pattern"), v.get("print_or_pattern_type")
        period = max(2, self.s // 16)
        phase = np.arange(self.s) + int(r[7] * period)
        rows = phase // period % 2 == 1
        if pattern in ("zari woven", "woven design"):  # thin woven threads, so the fabric colour still shows
            tex[phase % (2 * period) < max(1, period // 2)] = GOLD if pattern == "zari woven" else base * 0.65
        elif "stripe" in f"{pattern} {kind}":
            tex[rows] = ink
        if kind == "checked":
            tex[rows] = ink
            tex[:, rows] = ink
        elif kind == "typography":  # two lines of letter-like bars of uneven height across the chest
            for i in range(10):
                gx, gy = cx - 0.14 + (i % 5) * 0.06, top + 0.12 + (i // 5) * 0.09
                self.box(tex, gx, gy + 0.03 * r[10 + i], gx + 0.04, gy + 0.07, ink)
        elif kind not in (None, "solid", "default") or pattern == "printed":  # scattered motifs
            for i in range(8):
                mx, my = 0.2 + 0.56 * r[10 + 2 * i], 0.22 + 0.66 * r[11 + 2 * i]
                self.box(tex, mx, my, mx + 0.06, my + 0.02, ink)
                self.box(tex, mx + 0.02, my - 0.02, mx + 0.04, my + 0.04, ink)

    def tee(self, tex, v, cx, top, ink, default_bottom) -> np.ndarray:
        """T-shirt, top or kurti: body (fit sets width, length sets hem), sleeves, neck."""
        y, x = self.y, self.x
        fit = v.get("fit_shape")
        hw, flare = HALF_WIDTH.get(fit, 0.19), 0.25 if fit == "a-line" else 0.0
        bottom = BOTTOM.get(v.get("length"), default_bottom)
        mask = (np.abs(x - cx) <= hw + flare * np.clip(y - top - 0.2, 0, None)) & (y >= top) & (y < bottom)
        reach = SLEEVE.get(v.get("sleeve_length"), SLEEVE["short sleeves"])
        for x0 in (cx - hw - 0.08, cx + hw) if reach else ():
            self.box(mask, x0, top, x0 + 0.08, top + reach, True)
        neck = v.get("neck") or v.get("neck_collar") or "round"
        if neck in ("polo", "high"):  # a standing collar instead of a cut-out
            self.box(mask, cx - 0.06, top - 0.04, cx + 0.06, top, True)
            self.box(tex, cx - 0.06, top - 0.04, cx + 0.06, top, ink)
            if neck == "polo":
                self.box(tex, cx - 0.012, top, cx + 0.012, top + 0.1, ink)
        elif neck == "v-neck":
            mask &= ~((y >= top) & (np.abs(x - cx) < (top + 0.12 - y) * 0.5))
        elif neck == "square neck":
            self.box(mask, cx - 0.06, top, cx + 0.06, top + 0.06, False)
        else:
            mask &= (x - cx) ** 2 + (y - top) ** 2 >= 0.06**2
        return mask

    def saree(self, img, tex, v, cx, ink, base) -> None:
        """Blouse, skirt and a diagonal pallu over the shoulder, with a hem and pallu border."""
        y, x = self.y, self.x
        skirt = (np.abs(x - cx) < 0.2) & (y > 0.32) & (y < 0.95)
        d = y - 0.14 + 1.33 * (x - cx - 0.14)  # vertical offset from the shoulder-to-hip diagonal
        pallu = (np.abs(d) < 0.1) & (y > 0.1) & (y < 0.95) & (x > cx - 0.26)
        border = v.get("border")
        width = 0.0 if border == "no border" else BORDER_WIDTH.get(v.get("border_width"), 0.04)
        edge = np.array(BORDER_INK.get(border, ink if border == "solid" else base * 0.6), float)
        blouses = {"same as saree": None, "same as border": edge, "solid": base}
        blouse = blouses.get(v.get("blouse_pattern"), base * 0.75)
        bodice = np.zeros((self.s, self.s), bool)
        self.box(bodice, cx - 0.11, 0.14, cx + 0.11, 0.33, True)
        img[bodice] = tex[bodice] if blouse is None else blouse
        mask = skirt | pallu
        sheer = 0.6 if v.get("transparency") == "yes" else 1.0  # sheer fabric lets the background through
        img[mask] = sheer * tex[mask] + (1 - sheer) * img[mask]
        if width:
            img[(skirt & (y > 0.95 - width)) | (pallu & (d > 0.1 - width))] = edge


def synth(out_dir: str | Path, rows: int = 400, test_rows: int = 100, seed: int = 0, image_size: int = 112) -> Path:
    """Write train/test CSVs, hidden test labels, images and category_attributes.parquet into `out_dir`."""
    out = Path(out_dir)
    limits = (("rows", rows, 1), ("test_rows", test_rows, 1), ("seed", seed, 0), ("image_size", image_size, 16))
    for name, value, low in limits:
        if not isinstance(value, (int, np.integer)) or value < low:
            raise VlmtaxError(f"{name} must be an integer >= {low}, got {value!r}", f"pass a {name} of at least {low}")
    if rows + test_rows > MAX_IDS:
        raise VlmtaxError(f"rows + test_rows = {rows + test_rows} exceeds {MAX_IDS}", "generate fewer rows")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise VlmtaxError(f"output folder {out} exists and is not empty (or is a file)", "pass a new or empty folder")
    stats = load_stats()
    names = {c["name"]: [a["name"] for a in c["attributes"]] for c in stats["categories"]}
    label_rng, image_rng = np.random.default_rng(seed).spawn(2)
    train, test = _sample(stats, rows, label_rng), _sample(stats, test_rows, label_rng)
    _add_noise(train, label_rng)
    train_ids, test_ids = range(rows), range(rows, rows + test_rows)
    with atomic_dir(out) as tmp:
        _frame(train_ids, train, None).to_csv(tmp / "train.csv", index=False, lineterminator="\n")
        _frame(test_ids, test, None)[["id", "Category"]].to_csv(tmp / "test.csv", index=False, lineterminator="\n")
        _frame(test_ids, test, DEFAULT_FILLER).to_csv(tmp / "test_labels.csv", index=False, lineterminator="\n")
        table = pa.table({
            "Category": pa.array(list(names), pa.string()),
            "No_of_attribute": pa.array([len(a) for a in names.values()], pa.int64()),
            "Attribute_list": pa.array(list(names.values()), pa.list_(pa.string())),
        })
        pq.write_table(table, tmp / "category_attributes.parquet")
        painter = _Painter(image_size, image_rng)
        for split, ids, records in (("train", train_ids, train), ("test", test_ids, test)):
            folder = tmp / f"{split}_images"
            folder.mkdir()
            jitter = image_rng.random((len(records), 32))
            items = zip(ids, records, jitter)
            for rid, (cat, drawn, _), r in progress_iter(items, len(records), f"synth {split} images", "img"):
                arr = painter.draw(cat, dict(zip(names[cat], drawn)), r)
                Image.fromarray(arr).save(folder / f"{rid:06d}.jpg", format="JPEG", quality=JPEG_QUALITY)
    return out
