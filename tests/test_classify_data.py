"""classify_data.Collate's pixel cache: cached batches equal fresh ones, the budget holds, augmented rows stay out."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_overrides
from safetensors.torch import load_file
from test_classify import FAST, HEADS_RECIPE

import vlmtax.records
from vlmtax.backbone import load_image_processor, set_qwen_pixels
from vlmtax.classify_data import Collate, load_classify_data
from vlmtax.sft import sft


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """Every image path Collate decodes, in order."""
    seen: list[str] = []
    real = vlmtax.records.load_image

    def counting(path):
        seen.append(path)
        return real(path)

    monkeypatch.setattr(vlmtax.records, "load_image", counting)
    return seen


@pytest.fixture(params=["clip", "qwen tower"])
def processor(request, tiny_clip_dir, tiny_model_dir):
    if request.param == "clip":
        return load_image_processor(tiny_clip_dir)
    proc = load_image_processor(tiny_model_dir)
    set_qwen_pixels(proc, 3136, 12544)  # a variable number of patch rows per image
    return proc


def assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_cached_batches_equal_fresh_ones_and_skip_decoding(processor, prepared_dir, loads):
    data = load_classify_data(prepared_dir)
    fresh, cached = Collate(data, processor), Collate(data, processor, pixel_cache_bytes=2**30)
    rows = [3, 0, 7, 3, len(data.train.images)]  # a repeated row and a validation row
    assert_equal(cached(rows), fresh(rows))
    decoded = len(loads)
    assert_equal(cached(rows[::-1]), fresh(rows[::-1]))  # a new order of the same rows: read from memory
    assert len(loads) == decoded + len(rows)  # only the uncached collator decoded again
    assert sorted(cached.pixels) == sorted(set(rows))
    assert cached.pixel_bytes == sum(t.numel() * t.element_size() for d in cached.pixels.values() for t in d.values())


def test_the_budget_caps_what_is_kept(tiny_clip_dir, prepared_dir, loads):
    data = load_classify_data(prepared_dir)
    processor = load_image_processor(tiny_clip_dir)
    one = 3 * 64 * 64 * 4  # a 64 px fp32 image of the tiny CLIP
    collate = Collate(data, processor, pixel_cache_bytes=2 * one + 10)
    fresh = Collate(data, processor)
    assert_equal(collate([0, 1, 2, 3]), fresh([0, 1, 2, 3]))
    assert sorted(collate.pixels) == [0, 1] and collate.pixel_bytes == 2 * one
    loads.clear()
    assert_equal(collate([1, 2, 0, 3]), fresh([1, 2, 0, 3]))
    assert loads == [data.train.images[2], data.train.images[3]] + [data.train.images[r] for r in (1, 2, 0, 3)]


def test_augmented_training_rows_are_never_cached(tiny_clip_dir, prepared_dir):
    data = load_classify_data(prepared_dir)
    flip = SimpleNamespace(calls=0)

    def augment(img):
        flip.calls += 1
        return img.transpose(0)

    collate = Collate(data, load_image_processor(tiny_clip_dir), augment=augment, pixel_cache_bytes=2**30)
    n = len(data.train.images)
    for _ in range(2):
        collate([0, 1])
    assert flip.calls == 4 and not collate.pixels  # augmented every time, nothing kept
    collate([n, n + 1])  # validation rows: never augmented, so kept
    assert sorted(collate.pixels) == [n, n + 1] and flip.calls == 4


def test_training_with_the_cache_equals_training_without(tiny_clip_dir, prepared_dir, tmp_path, loads):
    """Over an epoch and a half (the rest of the steps read their images from memory): the same weights
    either way, and each training image decoded once with the cache."""
    data = load_classify_data(prepared_dir)
    weights, decoded = [], []
    for mb in (1024, 0):
        out = tmp_path / f"run-{mb}"
        loads.clear()
        sft(HEADS_RECIPE, tiny_overrides(tiny_clip_dir, prepared_dir, out, *FAST, "heads.mode=full",
                                         "train.batch_size=16", "train.max_steps=7", f"heads.pixel_cache_mb={mb}"))
        decoded.append(len(loads))
        weights.append({**load_file(out / "heads.safetensors"), **load_file(out / "backbone.safetensors")})
    assert 7 * 16 > len(data.train.images)  # the test's premise: the run goes past one epoch
    assert decoded[0] == len(data.train.images) < decoded[1]  # uncached: each batch (+1 read ahead)
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k
