"""pixel_cache: cached batches equal fresh ones in both routes' collators, the budget holds, augmented rows
stay out, and training with the cache gives the same weights as without."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import HEADS_FAST, HEADS_RECIPE, RECIPES, tiny_overrides
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor

import vlmtax.data.records
from vlmtax.data.pixel_cache import PixelCache
from vlmtax.data.taxonomy import Taxonomy
from vlmtax.generate.collator import Collator
from vlmtax.heads.data import Collate, load_classify_data
from vlmtax.models.backbone import load_image_processor, process_images, set_qwen_pixels
from vlmtax.sft import sft


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """Every image path the collators decode, in order."""
    seen: list[str] = []
    real = vlmtax.data.records.load_image

    def counting(path):
        seen.append(path)
        return real(path)

    monkeypatch.setattr(vlmtax.data.records, "load_image", counting)
    monkeypatch.setattr(vlmtax.generate.collator, "load_image", counting)
    return seen


def assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_images_of_different_sizes_split_and_join_exactly(tiny_model_dir):
    """A Qwen processor gives each image its own number of patch rows: kept one by one, joined in any order."""
    processor = load_image_processor(tiny_model_dir)
    set_qwen_pixels(processor, 3136, 50176)
    images = {k: Image.new("RGB", size, (40 * k, 90, 200 - 30 * k)) for k, size in
              enumerate([(112, 112), (224, 84), (56, 168), (140, 140)])}
    calls = []

    def process(keys):
        calls.append(list(keys))
        return process_images(processor, [images[k] for k in keys])

    cache = PixelCache(2**30)
    order = [2, 0, 3, 1, 2]
    assert_equal(cache.batch(order, process), process_images(processor, [images[k] for k in order]))
    assert calls == [[2, 0, 3, 1]]  # one processor call, each image once
    assert len({int(v["pixel_values"].shape[0]) for v in cache.items.values()}) > 1
    assert_equal(cache.batch([1, 3], process), process_images(processor, [images[1], images[3]]))
    assert calls == [[2, 0, 3, 1]]  # the second batch came from memory


@pytest.fixture(params=["clip", "qwen tower"])
def processor(request, tiny_clip_dir, tiny_model_dir):
    if request.param == "clip":
        return load_image_processor(tiny_clip_dir)
    proc = load_image_processor(tiny_model_dir)
    set_qwen_pixels(proc, 3136, 12544)
    return proc


def test_classify_batches_from_the_cache_equal_fresh_ones(processor, prepared_dir, loads):
    data = load_classify_data(prepared_dir)
    fresh, cached = Collate(data, processor), Collate(data, processor, pixel_cache=PixelCache(2**30))
    rows = [3, 0, 7, 3, len(data.train.images)]  # a repeated row and a validation row
    assert_equal(cached(rows), fresh(rows))
    decoded = len(loads)
    assert_equal(cached(rows[::-1]), fresh(rows[::-1]))
    assert len(loads) == decoded + len(rows)  # only the uncached collator decoded again
    cache = cached.pixel_cache
    assert sorted(cache.items) == sorted(set(rows))
    assert cache.used == sum(t.numel() * t.element_size() for d in cache.items.values() for t in d.values())


def test_the_budget_caps_what_is_kept(tiny_clip_dir, prepared_dir, loads):
    data = load_classify_data(prepared_dir)
    processor = load_image_processor(tiny_clip_dir)
    one = 3 * 64 * 64 * 4  # a 64 px fp32 image of the tiny CLIP
    collate, fresh = Collate(data, processor, pixel_cache=PixelCache(2 * one + 10)), Collate(data, processor)
    assert_equal(collate([0, 1, 2, 3]), fresh([0, 1, 2, 3]))
    assert sorted(collate.pixel_cache.items) == [0, 1] and collate.pixel_cache.used == 2 * one
    loads.clear()
    assert_equal(collate([1, 2, 0, 3]), fresh([1, 2, 0, 3]))
    assert loads == [data.train.images[2], data.train.images[3]] + [data.train.images[r] for r in (1, 2, 0, 3)]


def test_augmented_training_rows_are_never_cached(tiny_clip_dir, prepared_dir):
    data = load_classify_data(prepared_dir)
    calls = []

    def augment(img):
        calls.append(img.size)
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)

    collate = Collate(data, load_image_processor(tiny_clip_dir), augment=augment, pixel_cache=PixelCache(2**30))
    n = len(data.train.images)
    for _ in range(2):
        collate([0, 1])
    assert len(calls) == 4 and not collate.pixel_cache.items  # augmented every time, nothing kept
    collate([n, n + 1])  # validation rows: never augmented, so kept
    assert sorted(collate.pixel_cache.items) == [n, n + 1] and len(calls) == 4


def test_generate_batches_from_the_cache_equal_fresh_ones(tiny_model_dir, prepared_dir, loads):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    taxonomy = Taxonomy.load(prepared_dir / "taxonomy.json")
    records = json.loads((prepared_dir / "train.json").read_text())[:6]
    for packing in (False, True):
        fresh = Collator(processor, taxonomy, records, 4096, packing=packing)
        cached = Collator(processor, taxonomy, records, 4096, packing=packing, pixel_cache=PixelCache(2**30))
        for rows in ([4, 1, 4, 0], [0, 4, 1, 5]):
            batch = [{"index": r} for r in rows]
            assert_equal(cached(batch), fresh(batch))
        assert sorted(cached.pixel_cache.items) == sorted(records[r]["images"][0] for r in (0, 1, 4, 5))
    loads.clear()
    cached([{"index": 0}, {"index": 5}])
    assert loads == []


def trained_weights(route: str, mb: int, model: Path, data: Path, out: Path) -> dict[str, torch.Tensor]:
    if route == "classify":
        sft(HEADS_RECIPE, tiny_overrides(model, data, out, *HEADS_FAST, "heads.mode=full", "train.batch_size=16",
                                         "train.max_steps=7", f"train.pixel_cache_mb={mb}"))
        return {**load_file(out / "heads.safetensors"), **load_file(out / "backbone.safetensors")}
    sft(RECIPES / "tiny_cpu.yaml", tiny_overrides(model, data, out, "train.batch_size=16", "train.max_steps=7",
                                                  "train.eval=false", f"train.pixel_cache_mb={mb}"))
    return load_file(out / "model.safetensors")


@pytest.mark.parametrize("route", ["classify", "generate"])
def test_training_with_the_cache_equals_training_without(route, tiny_clip_dir, tiny_model_dir, prepared_dir,
                                                         tmp_path, loads):
    """Over an epoch and a half (the later steps read their images from memory): the same weights either
    way, and each training image decoded once with the cache."""
    n_train = len(json.loads((prepared_dir / "train.json").read_text()))
    model = tiny_clip_dir if route == "classify" else tiny_model_dir
    weights, decoded = [], []
    for mb in (1024, 0):
        loads.clear()
        weights.append(trained_weights(route, mb, model, prepared_dir, tmp_path / f"run-{mb}"))
        decoded.append(len(loads))
    assert 7 * 16 > n_train  # the test's premise: the run goes past one epoch
    assert decoded[0] == n_train < decoded[1]  # without the cache every batch is decoded (and one read ahead)
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k
