"""The classify route's data: prepared records -> (image, category index, label per attribute slot) -> batches.

It reads the same `vlmtax prepare` output as the generate route: each record's `attributes` and
`masked` fields give the labels (a masked value is -100: no loss, never a class), its `images` the
picture, and taxonomy.json the head layout. Batches carry either precomputed features (frozen mode) or
processed pixels, optionally augmented with geometric transforms only (colour is a label).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlmtax.data.pixel_cache import PixelCache
from vlmtax.data.taxonomy import Taxonomy
from vlmtax.errors import VlmtaxError
from vlmtax.heads.losses import IGNORE
from vlmtax.heads.model import HeadSpec, head_layout
from vlmtax.models.backbone import process_images


@dataclass
class Split:
    images: list[str]
    categories: list[int]
    labels: torch.Tensor  # [rows, max attributes per category], IGNORE where unknown or not applicable


@dataclass
class ClassifyData:
    taxonomy: Taxonomy
    layout: list[HeadSpec]
    categories: list[str]
    train: Split
    val: Split

    def counts(self) -> list[torch.Tensor]:
        """Training value counts per head, in layout order (for class-balanced weights and LDAM margins)."""
        out = []
        cats = torch.tensor(self.train.categories)
        for h in self.layout:
            col = self.train.labels[cats == self.categories.index(h.category), h.slot]
            col = col[col != IGNORE]
            out.append(torch.bincount(col, minlength=len(h.values)))
        return out


def _split(records: list[dict[str, Any]], taxonomy: Taxonomy, categories: list[str], width: int) -> Split:
    index = {c.name: {a.name: (j, {v: k for k, v in enumerate(a.values)}) for j, a in enumerate(c.attributes)}
             for c in taxonomy.categories.values()}
    labels = torch.full((len(records), width), IGNORE, dtype=torch.long)
    cats = []
    for r, rec in enumerate(records):
        cat = taxonomy.category(rec["category"])
        cats.append(categories.index(cat.name))
        masked = set(rec.get("masked") or [])
        values = rec.get("attributes")
        if not isinstance(values, dict):
            raise VlmtaxError(f"record {rec.get('id')} has no `attributes` field", "re-run `vlmtax prepare`")
        for name, value in values.items():
            if name in masked or name not in index[cat.name]:
                continue
            j, vocab = index[cat.name][name]
            if value in vocab:
                labels[r, j] = vocab[value]
    return Split([rec["images"][0] for rec in records], cats, labels)


def load_classify_data(data_dir: Path) -> ClassifyData:
    from vlmtax.data.records import load_records

    if not (data_dir / "taxonomy.json").is_file():
        raise VlmtaxError(f"data dir {data_dir} has no taxonomy.json: a classify recipe needs the head layout it holds",
                          "point `data:` at a `vlmtax prepare` output folder (it writes taxonomy.json)")
    taxonomy = Taxonomy.load(data_dir / "taxonomy.json")
    train = load_records(data_dir, "train.json")
    if not train:
        raise VlmtaxError(f"{data_dir}/train.json holds no records", "prepare a catalogue with more rows")
    val = load_records(data_dir, "val.json") if (data_dir / "val.json").is_file() else []
    categories = list(taxonomy.categories)
    width = max(len(c.attributes) for c in taxonomy.categories.values())
    return ClassifyData(taxonomy, head_layout(taxonomy), categories, _split(train, taxonomy, categories, width),
                        _split(val, taxonomy, categories, width))


class Rows(torch.utils.data.Dataset):
    """Row indices; the collator turns a list of them into a batch."""

    def __init__(self, n: int, offset: int = 0):
        self.n, self.offset = n, offset

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i + self.offset


def augmenter(cfg: Any):
    """Random resized crop, horizontal flip, small rotation: geometry only, never colour."""
    from torchvision.transforms import v2

    def apply(img):
        steps = [v2.RandomResizedCrop((img.height, img.width), scale=(cfg.crop_scale, 1.0), antialias=True)]
        if cfg.flip:
            steps.append(v2.RandomHorizontalFlip())
        if cfg.rotation:
            steps.append(v2.RandomRotation(cfg.rotation, fill=tuple(img.getpixel((0, 0)))))
        return v2.Compose(steps)(img)

    return apply


class Collate:
    """Batches of rows over train + val (val rows are offset by the train size).

    With a `pixel_cache` (pixel_cache.py), processed images that are not augmented stay in memory, so
    later epochs and evaluations skip decoding and preprocessing.
    """

    def __init__(self, data: ClassifyData, processor: Any = None, features: torch.Tensor | None = None,
                 augment: Any = None, pixel_cache: PixelCache | None = None):
        self.images = data.train.images + data.val.images
        self.categories = torch.tensor(data.train.categories + data.val.categories, dtype=torch.long)
        self.labels = torch.cat([data.train.labels, data.val.labels])
        self.processor, self.features, self.augment = processor, features, augment
        self.n_train = len(data.train.images)
        self.pixel_cache = pixel_cache

    def __call__(self, rows: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.tensor(rows)
        batch = {"category": self.categories[idx], "targets": self.labels[idx]}
        if self.features is not None:
            batch["features"] = self.features[idx]
            return batch
        augmented = self.augment is not None and all(r < self.n_train for r in rows)  # never on validation rows
        if augmented or self.pixel_cache is None:
            batch.update(self._process(rows, augmented))
        else:
            batch.update(self.pixel_cache.batch(rows, self._process))
        return batch

    def _process(self, rows: list[int], augmented: bool = False) -> dict[str, torch.Tensor]:
        from vlmtax.data.records import load_image

        images = [load_image(self.images[r]) for r in rows]
        if augmented:
            images = [self.augment(img) for img in images]
        return process_images(self.processor, images)
